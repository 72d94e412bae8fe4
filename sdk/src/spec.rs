//! Declared state values (`ValueSpec`): a name, a type and an optional TTL.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::types::{Codec, WellKnown};

/// When a state value expires (StateFun's `ExpirationSpec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expiration {
    /// Never.
    #[default]
    None,
    /// This long after the value was last written.
    AfterWrite(Duration),
    /// This long after the address was last invoked (or the value last written).
    AfterInvoke(Duration),
}

impl Expiration {
    /// The TTL, if any.
    pub fn ttl(&self) -> Option<Duration> {
        match self {
            Expiration::None => None,
            Expiration::AfterWrite(d) | Expiration::AfterInvoke(d) => Some(*d),
        }
    }
}

/// The type-erased description of a [`ValueSpec`], as the runtime registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueSpecDescriptor {
    /// The state name (unique per function type).
    pub name: Arc<str>,
    /// The typename of the stored values.
    pub typename: Arc<str>,
    /// The TTL.
    pub expiration: Expiration,
}

/// A declared state value of type `T`.
#[derive(Debug)]
pub struct ValueSpec<T> {
    desc: ValueSpecDescriptor,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ValueSpec<T> {
    fn clone(&self) -> Self {
        ValueSpec {
            desc: self.desc.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: WellKnown> ValueSpec<T> {
    /// A state of a built-in (or self-naming) type.
    pub fn new(name: &str) -> Self {
        ValueSpec {
            desc: ValueSpecDescriptor {
                name: Arc::from(name),
                typename: T::typename_arc(),
                expiration: Expiration::None,
            },
            _t: PhantomData,
        }
    }
}

impl<T: Codec> ValueSpec<T> {
    /// A state of a custom type with the given typename (e.g. `example/Cart`).
    pub fn custom(name: &str, typename: &str) -> Self {
        ValueSpec {
            desc: ValueSpecDescriptor {
                name: Arc::from(name),
                typename: Arc::from(typename),
                expiration: Expiration::None,
            },
            _t: PhantomData,
        }
    }

    /// Expires `ttl` after the last write.
    pub fn expire_after_write(mut self, ttl: Duration) -> Self {
        self.desc.expiration = Expiration::AfterWrite(ttl);
        self
    }

    /// Expires `ttl` after the last invocation of the address (or write).
    pub fn expire_after_invoke(mut self, ttl: Duration) -> Self {
        self.desc.expiration = Expiration::AfterInvoke(ttl);
        self
    }

    /// The state name.
    pub fn name(&self) -> &str {
        &self.desc.name
    }

    /// The type-erased description.
    pub fn descriptor(&self) -> &ValueSpecDescriptor {
        &self.desc
    }
}
