//! Typed values and their encodings.
//!
//! StateFun's built-in types are encoded byte-for-byte as its wrapper messages
//! (`io.statefun.sdk.types.*Wrapper`, field 1), and default values (0, false, "") encode as
//! empty bytes, exactly like the StateFun SDKs, so values pass between statemesh, its
//! remote functions and StateFun unchanged.

use std::sync::Arc;

use bytes::Bytes;

use crate::typenames;

/// A value that could not be decoded as the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {found_typename:?} as {expected}: {reason}")]
pub struct DecodeError {
    /// The typename that was expected.
    pub expected: String,
    /// The typename the value carried.
    pub found_typename: String,
    /// What went wrong.
    pub reason: String,
}

/// A typed message or state value: a typename plus bytes (StateFun's `TypedValue`).
#[derive(Clone, PartialEq, Eq)]
pub struct TypedValue {
    typename: Arc<str>,
    has_value: bool,
    value: Bytes,
}

impl std::fmt::Debug for TypedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TypedValue({}, {} bytes)",
            self.typename,
            self.value.len()
        )
    }
}

impl TypedValue {
    /// A value of `typename` with the given encoded bytes.
    pub fn new(typename: impl Into<Arc<str>>, value: impl Into<Bytes>) -> Self {
        TypedValue {
            typename: typename.into(),
            has_value: true,
            value: value.into(),
        }
    }

    /// A value of `typename` that holds nothing (StateFun's `has_value = false`).
    pub fn empty(typename: impl Into<Arc<str>>) -> Self {
        TypedValue {
            typename: typename.into(),
            has_value: false,
            value: Bytes::new(),
        }
    }

    /// Encodes a value of a known type.
    pub fn of<T: WellKnown>(v: &T) -> Self {
        TypedValue {
            typename: T::typename_arc(),
            has_value: true,
            value: v.encode(),
        }
    }

    /// Encodes a value with an explicit typename (custom types).
    pub fn with_type<T: Codec>(typename: impl Into<Arc<str>>, v: &T) -> Self {
        TypedValue {
            typename: typename.into(),
            has_value: true,
            value: v.encode(),
        }
    }

    /// The typename.
    pub fn typename(&self) -> &str {
        &self.typename
    }

    /// The typename as a shared string.
    pub fn typename_arc(&self) -> &Arc<str> {
        &self.typename
    }

    /// Whether a value is present.
    pub fn has_value(&self) -> bool {
        self.has_value
    }

    /// The encoded bytes.
    pub fn value(&self) -> &Bytes {
        &self.value
    }

    /// Whether this value is of the well-known type `T`.
    pub fn is<T: WellKnown>(&self) -> bool {
        &*self.typename == T::TYPENAME
    }

    /// Decodes as `T`, checking the typename.
    pub fn get<T: WellKnown>(&self) -> Result<T, DecodeError> {
        if &*self.typename != T::TYPENAME {
            return Err(DecodeError {
                expected: T::TYPENAME.to_string(),
                found_typename: self.typename.to_string(),
                reason: "typename mismatch".into(),
            });
        }
        T::decode(&self.value).map_err(|reason| DecodeError {
            expected: T::TYPENAME.to_string(),
            found_typename: self.typename.to_string(),
            reason,
        })
    }

    /// Decodes as `T` without checking the typename (custom types).
    pub fn decode<T: Codec>(&self) -> Result<T, DecodeError> {
        T::decode(&self.value).map_err(|reason| DecodeError {
            expected: std::any::type_name::<T>().to_string(),
            found_typename: self.typename.to_string(),
            reason,
        })
    }

    /// Converts to the protobuf form.
    pub fn to_proto(&self) -> statemesh_proto::v1::TypedValue {
        statemesh_proto::v1::TypedValue {
            typename: self.typename.to_string(),
            has_value: self.has_value,
            value: self.value.clone(),
        }
    }

    /// Converts from the protobuf form.
    pub fn from_proto(v: statemesh_proto::v1::TypedValue) -> Self {
        TypedValue {
            typename: intern(v.typename),
            has_value: v.has_value,
            value: v.value,
        }
    }
}

/// Shares the `Arc<str>` of the built-in typenames instead of allocating one per message.
fn intern(s: String) -> Arc<str> {
    match s.as_str() {
        typenames::LONG => i64::typename_arc(),
        typenames::STRING => String::typename_arc(),
        typenames::INT => i32::typename_arc(),
        typenames::BOOL => bool::typename_arc(),
        typenames::DOUBLE => f64::typename_arc(),
        typenames::FLOAT => f32::typename_arc(),
        _ => Arc::from(s),
    }
}

/// A value type with an encoding to bytes.
pub trait Codec: Sized {
    /// Encodes to bytes.
    fn encode(&self) -> Bytes;
    /// Decodes from bytes, saying what was wrong.
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

/// A type with a fixed typename (StateFun's built-in types, or a user type that names itself).
pub trait WellKnown: Codec {
    /// The typename, e.g. `io.statefun.types/long`.
    const TYPENAME: &'static str;
    /// The typename as a shared string (the built-ins return a cached one).
    fn typename_arc() -> Arc<str> {
        Arc::from(Self::TYPENAME)
    }
}

macro_rules! cached_typename {
    ($name:expr) => {
        fn typename_arc() -> Arc<str> {
            static CACHED: std::sync::LazyLock<Arc<str>> =
                std::sync::LazyLock::new(|| Arc::from($name));
            CACHED.clone()
        }
    };
}

fn fixed<const N: usize>(bytes: &[u8], tag: u8) -> Result<[u8; N], String> {
    if bytes.is_empty() {
        return Ok([0; N]);
    }
    if bytes.len() != N + 1 || bytes[0] != tag {
        return Err(format!(
            "expected tag 0x{tag:02X} and {N} bytes, found {} bytes",
            bytes.len()
        ));
    }
    let mut out = [0; N];
    out.copy_from_slice(&bytes[1..]);
    Ok(out)
}

fn encode_fixed(tag: u8, le: &[u8], is_default: bool) -> Bytes {
    if is_default {
        return Bytes::new();
    }
    let mut v = Vec::with_capacity(1 + le.len());
    v.push(tag);
    v.extend_from_slice(le);
    Bytes::from(v)
}

impl Codec for i64 {
    fn encode(&self) -> Bytes {
        encode_fixed(0x09, &self.to_le_bytes(), *self == 0)
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        Ok(i64::from_le_bytes(fixed::<8>(b, 0x09)?))
    }
}
impl WellKnown for i64 {
    const TYPENAME: &'static str = typenames::LONG;
    cached_typename!(typenames::LONG);
}

impl Codec for i32 {
    fn encode(&self) -> Bytes {
        encode_fixed(0x0D, &self.to_le_bytes(), *self == 0)
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        Ok(i32::from_le_bytes(fixed::<4>(b, 0x0D)?))
    }
}
impl WellKnown for i32 {
    const TYPENAME: &'static str = typenames::INT;
    cached_typename!(typenames::INT);
}

impl Codec for f64 {
    fn encode(&self) -> Bytes {
        encode_fixed(0x09, &self.to_le_bytes(), self.to_bits() == 0)
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        Ok(f64::from_le_bytes(fixed::<8>(b, 0x09)?))
    }
}
impl WellKnown for f64 {
    const TYPENAME: &'static str = typenames::DOUBLE;
    cached_typename!(typenames::DOUBLE);
}

impl Codec for f32 {
    fn encode(&self) -> Bytes {
        encode_fixed(0x0D, &self.to_le_bytes(), self.to_bits() == 0)
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        Ok(f32::from_le_bytes(fixed::<4>(b, 0x0D)?))
    }
}
impl WellKnown for f32 {
    const TYPENAME: &'static str = typenames::FLOAT;
    cached_typename!(typenames::FLOAT);
}

impl Codec for bool {
    fn encode(&self) -> Bytes {
        if *self {
            Bytes::from_static(&[0x08, 0x01])
        } else {
            Bytes::new()
        }
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        match b {
            [] => Ok(false),
            [0x08, v] => Ok(*v != 0),
            _ => Err(format!("expected 08 01 or empty, found {} bytes", b.len())),
        }
    }
}
impl WellKnown for bool {
    const TYPENAME: &'static str = typenames::BOOL;
    cached_typename!(typenames::BOOL);
}

impl Codec for String {
    fn encode(&self) -> Bytes {
        if self.is_empty() {
            return Bytes::new();
        }
        let mut v = Vec::with_capacity(self.len() + 6);
        v.push(0x0A);
        prost::encoding::encode_varint(self.len() as u64, &mut v);
        v.extend_from_slice(self.as_bytes());
        Bytes::from(v)
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        if b.is_empty() {
            return Ok(String::new());
        }
        if b[0] != 0x0A {
            return Err(format!("expected tag 0x0A, found 0x{:02X}", b[0]));
        }
        let mut rest = &b[1..];
        let len = prost::encoding::decode_varint(&mut rest).map_err(|e| e.to_string())? as usize;
        if rest.len() != len {
            return Err(format!(
                "expected {len} bytes of UTF-8, found {}",
                rest.len()
            ));
        }
        String::from_utf8(rest.to_vec()).map_err(|e| e.to_string())
    }
}
impl WellKnown for String {
    const TYPENAME: &'static str = typenames::STRING;
    cached_typename!(typenames::STRING);
}

/// A custom type encoded as JSON with serde. Give it a typename with
/// [`TypedValue::with_type`] or [`crate::ValueSpec::custom`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Json<T>(pub T);

impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec for Json<T> {
    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self.0).expect(
            "serializing to a Vec does not fail for serde types without maps keyed by non-strings",
        ))
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(b)
            .map(Json)
            .map_err(|e| e.to_string())
    }
}

/// A custom type encoded as a protobuf message with prost.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Proto<T>(pub T);

impl<T: prost::Message + Default> Codec for Proto<T> {
    fn encode(&self) -> Bytes {
        Bytes::from(self.0.encode_to_vec())
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        T::decode(b).map(Proto).map_err(|e| e.to_string())
    }
}

/// Raw bytes, as they are.
impl Codec for Bytes {
    fn encode(&self) -> Bytes {
        self.clone()
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        Ok(Bytes::copy_from_slice(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_encodings_match_statefun_wrappers() {
        assert_eq!(&true.encode()[..], &[0x08, 0x01]);
        assert!(false.encode().is_empty());
        assert_eq!(&5i32.encode()[..], &[0x0D, 5, 0, 0, 0]);
        assert_eq!(&5i64.encode()[..], &[0x09, 5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            &1.5f32.encode()[..],
            &[&[0x0D][..], &1.5f32.to_le_bytes()].concat()[..]
        );
        assert_eq!(
            &(-2.0f64).encode()[..],
            &[&[0x09][..], &(-2.0f64).to_le_bytes()].concat()[..]
        );
        assert_eq!(&"hi".to_string().encode()[..], &[0x0A, 2, b'h', b'i']);
        assert!(0i64.encode().is_empty());
        assert!(String::new().encode().is_empty());
    }

    #[test]
    fn round_trips() {
        for v in [0i64, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(TypedValue::of(&v).get::<i64>().unwrap(), v);
        }
        let long = "x".repeat(300);
        assert_eq!(TypedValue::of(&long).get::<String>().unwrap(), long);
        assert!(TypedValue::of(&true).get::<bool>().unwrap());
        assert_eq!(TypedValue::of(&7i32).get::<i32>().unwrap(), 7);
    }

    #[test]
    fn rejects_wrong_type_and_garbage() {
        let e = TypedValue::of(&5i64).get::<String>().unwrap_err();
        assert!(e.to_string().contains("typename mismatch"));
        assert!(i64::decode(&[1, 2, 3]).is_err());
        assert!(String::decode(&[0x0A, 5, b'a']).is_err());
    }

    #[test]
    fn json_custom_types() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Req {
            name: String,
        }
        let v = TypedValue::with_type("example/Req", &Json(Req { name: "a".into() }));
        assert_eq!(v.typename(), "example/Req");
        assert_eq!(v.decode::<Json<Req>>().unwrap().0, Req { name: "a".into() });
    }
}
