//! Function types (`namespace/name`) and addresses (type + id).

use std::fmt;
use std::sync::Arc;

/// A malformed function type or address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The input does not have the expected shape.
    #[error("malformed {what}: expected {expected}, found {found:?}")]
    Malformed {
        /// What was being parsed ("function type", "address", "typename").
        what: &'static str,
        /// The expected form.
        expected: &'static str,
        /// The input as given.
        found: String,
    },
}

/// A function type, `namespace/name` (StateFun's TypeName). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TypeName {
    full: Arc<str>,
    slash: u32,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

impl TypeName {
    /// Parses `namespace/name`. The namespace may itself contain `/` (StateFun allows
    /// `com.example/greeter` only, but typenames like `type.googleapis.com/x.Y` need it);
    /// the name is what follows the last `/`.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        Self::parse_as(s, "function type")
    }

    /// Like [`TypeName::parse`], naming `what` in the error.
    pub fn parse_as(s: &str, what: &'static str) -> Result<Self, AddressError> {
        let err = || AddressError::Malformed {
            what,
            expected: "\"namespace/name\" with non-empty parts and no whitespace",
            found: s.to_string(),
        };
        let slash = s.rfind('/').ok_or_else(err)?;
        let (ns, name) = (&s[..slash], &s[slash + 1..]);
        if !valid_segment(ns) || !valid_segment(name) {
            return Err(err());
        }
        Ok(TypeName {
            full: Arc::from(s),
            slash: slash as u32,
        })
    }

    /// Builds from parts; both must be non-empty without whitespace.
    pub fn new(namespace: &str, name: &str) -> Result<Self, AddressError> {
        if namespace.contains('/') && !valid_segment(namespace) {
            return Err(AddressError::Malformed {
                what: "function type",
                expected: "a non-empty namespace",
                found: namespace.to_string(),
            });
        }
        Self::parse(&format!("{namespace}/{name}"))
    }

    /// The namespace part.
    pub fn namespace(&self) -> &str {
        &self.full[..self.slash as usize]
    }

    /// The name part.
    pub fn name(&self) -> &str {
        &self.full[self.slash as usize + 1..]
    }

    /// `namespace/name`.
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for TypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.full)
    }
}

/// A function instance: its type plus an id. One address is one virtual instance.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    /// The function type.
    pub typ: TypeName,
    /// The instance id (any non-empty string). Shared, so cloning an address (every
    /// message carries its caller's) allocates nothing.
    pub id: Arc<str>,
}

impl Address {
    /// Builds an address; the id must be non-empty.
    pub fn new(typ: TypeName, id: impl Into<Arc<str>>) -> Result<Self, AddressError> {
        let id = id.into();
        if id.is_empty() {
            return Err(AddressError::Malformed {
                what: "address",
                expected: "a non-empty id",
                found: format!("{typ}/"),
            });
        }
        Ok(Address { typ, id })
    }

    /// Builds from three parts (`namespace`, `type`, `id`), as in the wire format.
    pub fn from_parts(namespace: &str, typ: &str, id: &str) -> Result<Self, AddressError> {
        if !valid_segment(namespace)
            || namespace.contains('/')
            || !valid_segment(typ)
            || typ.contains('/')
            || id.is_empty()
        {
            return Err(AddressError::Malformed {
                what: "address",
                expected: "namespace, type and id all non-empty (namespace and type without '/' or whitespace)",
                found: format!("{namespace}/{typ}/{id}"),
            });
        }
        Ok(Address {
            typ: TypeName::parse(&format!("{namespace}/{typ}"))?,
            id: Arc::from(id),
        })
    }

    /// Parses `namespace/type/id` (the id may contain further `/`).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let mut parts = s.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some(t), Some(id)) => Self::from_parts(ns, t, id),
            _ => Err(AddressError::Malformed {
                what: "address",
                expected: "\"namespace/type/id\"",
                found: s.to_string(),
            }),
        }
    }

    /// Converts to the protobuf form.
    pub fn to_proto(&self) -> statemesh_proto::v1::Address {
        statemesh_proto::v1::Address {
            namespace: self.typ.namespace().to_string(),
            r#type: self.typ.name().to_string(),
            id: self.id.to_string(),
        }
    }

    /// Converts from the protobuf form, validating it.
    pub fn from_proto(a: &statemesh_proto::v1::Address) -> Result<Self, AddressError> {
        Self::from_parts(&a.namespace, &a.r#type, &a.id)
    }
}

impl Address {
    /// `namespace/name/id`, as [`Display`](fmt::Display) writes it, built without the
    /// formatting machinery and with one allocation of the exact size (for hot paths).
    pub fn to_text(&self) -> String {
        let t = self.typ.as_str();
        let mut s = String::with_capacity(t.len() + 1 + self.id.len());
        s.push_str(t);
        s.push('/');
        s.push_str(&self.id);
        s
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.typ, self.id)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_text_is_display() {
        for a in ["example/greeter/alice/x", "a.b/c/ü 1", "n/t/0"] {
            let a = Address::parse(a).unwrap();
            assert_eq!(a.to_text(), a.to_string());
            assert_eq!(a.to_text().capacity(), a.to_string().len());
        }
    }

    #[test]
    fn parses_addresses() {
        let a = Address::parse("example/greeter/alice/x").unwrap();
        assert_eq!(a.typ.namespace(), "example");
        assert_eq!(a.typ.name(), "greeter");
        assert_eq!(&*a.id, "alice/x");
        assert_eq!(a.to_string(), "example/greeter/alice/x");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "example",
            "example/greeter",
            "example/greeter/",
            "/greeter/a",
            "ex ample/g/a",
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(e.to_string().contains("expected"), "{e}");
        }
        assert!(TypeName::parse("greeter").is_err());
        assert!(TypeName::parse("a/").is_err());
        let t = TypeName::parse("type.googleapis.com/foo.Bar").unwrap();
        assert_eq!(t.namespace(), "type.googleapis.com");
        assert_eq!(t.name(), "foo.Bar");
    }
}
