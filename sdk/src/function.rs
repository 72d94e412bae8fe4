//! The function API: what a stateful function sees of the runtime.
//!
//! A function is invoked with one message at a time for one address, and a [`Context`]
//! giving it the address, the caller, typed access to its declared states, and ways to
//! send messages (now, later, to egress, back to the caller). Effects are collected, not
//! performed: the runtime applies them atomically after the invocation returns, and
//! discards them (and any state change) if it fails, so retries are safe.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::address::Address;
use crate::spec::{Expiration, ValueSpec, ValueSpecDescriptor};
use crate::types::{Codec, DecodeError, TypedValue, WellKnown};

/// Why an invocation failed. The runtime retries it with backoff, then dead-letters the
/// message with this error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionError {
    /// A message or state value did not decode as expected.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The function used a state it did not declare.
    #[error("state {0:?} is not declared by this function type")]
    UndeclaredState(String),
    /// Any other failure of the function.
    #[error("{0}")]
    Failed(String),
}

impl FunctionError {
    /// A failure with a message.
    pub fn msg(m: impl std::fmt::Display) -> Self {
        FunctionError::Failed(m.to_string())
    }
}

/// One declared state of an address, as the runtime hands it to an invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSlot {
    /// The state name.
    pub name: Arc<str>,
    /// The typename values are stored with.
    pub typename: Arc<str>,
    /// The TTL policy.
    pub expiration: Expiration,
    /// The encoded value; `None` when absent.
    pub value: Option<Bytes>,
    /// Milliseconds since the Unix epoch when the value expires; 0 = never.
    pub expires_at_ms: u64,
    /// Changed since it was last persisted.
    pub dirty: bool,
}

impl StateSlot {
    /// An absent slot for a declared spec.
    pub fn empty(spec: &ValueSpecDescriptor) -> Self {
        StateSlot {
            name: spec.name.clone(),
            typename: spec.typename.clone(),
            expiration: spec.expiration,
            value: None,
            expires_at_ms: 0,
            dirty: false,
        }
    }

    /// The value, unless absent or expired at `now_ms`.
    pub fn live_value(&self, now_ms: u64) -> Option<&Bytes> {
        if self.expires_at_ms != 0 && now_ms >= self.expires_at_ms {
            return None;
        }
        self.value.as_ref()
    }
}

/// A message to deliver after a delay.
#[derive(Debug, Clone, PartialEq)]
pub struct DelayedMessage {
    /// How long to wait.
    pub delay: Duration,
    /// The target.
    pub target: Address,
    /// The message.
    pub message: TypedValue,
    /// Optional token to cancel it with (scoped to the sending address).
    pub cancellation_token: Option<String>,
}

/// The effects of invocations, applied by the runtime after they succeed.
#[derive(Debug, Default, Clone)]
pub struct Effects {
    /// Messages to send now.
    pub messages: Vec<(Address, TypedValue)>,
    /// Messages to send later.
    pub delayed: Vec<DelayedMessage>,
    /// Cancellation tokens of delayed messages to cancel.
    pub cancellations: Vec<String>,
    /// Records for egress topics.
    pub egress: Vec<(String, TypedValue)>,
}

impl Effects {
    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.delayed.is_empty()
            && self.cancellations.is_empty()
            && self.egress.is_empty()
    }

    fn marks(&self) -> [usize; 4] {
        [
            self.messages.len(),
            self.delayed.len(),
            self.cancellations.len(),
            self.egress.len(),
        ]
    }

    fn truncate(&mut self, m: [usize; 4]) {
        self.messages.truncate(m[0]);
        self.delayed.truncate(m[1]);
        self.cancellations.truncate(m[2]);
        self.egress.truncate(m[3]);
    }
}

/// The undo record of one state slot changed by the current invocation.
#[derive(Debug)]
#[doc(hidden)]
pub struct Undo {
    slot: usize,
    value: Option<Bytes>,
    expires_at_ms: u64,
    dirty: bool,
}

/// What an invocation sees of the runtime.
pub struct Context<'a> {
    self_address: &'a Address,
    caller: Option<&'a Address>,
    now_ms: u64,
    state: &'a mut [StateSlot],
    effects: &'a mut Effects,
    undo: &'a mut Vec<Undo>,
    marks: [usize; 4],
}

impl<'a> Context<'a> {
    /// Used by runtimes to invoke a function. `undo` is scratch space the runtime reuses.
    #[doc(hidden)]
    pub fn new(
        self_address: &'a Address,
        caller: Option<&'a Address>,
        now_ms: u64,
        state: &'a mut [StateSlot],
        effects: &'a mut Effects,
        undo: &'a mut Vec<Undo>,
    ) -> Self {
        undo.clear();
        let marks = effects.marks();
        Context {
            self_address,
            caller,
            now_ms,
            state,
            effects,
            undo,
            marks,
        }
    }

    /// Undoes this invocation's state changes and effects (the runtime calls it when the
    /// invocation fails).
    #[doc(hidden)]
    pub fn rollback(self) {
        for u in self.undo.drain(..).rev() {
            let s = &mut self.state[u.slot];
            s.value = u.value;
            s.expires_at_ms = u.expires_at_ms;
            s.dirty = u.dirty;
        }
        self.effects.truncate(self.marks);
    }

    /// The address being invoked.
    pub fn self_address(&self) -> &Address {
        self.self_address
    }

    /// The sender, if the message came from a function (or a waiting caller).
    pub fn caller(&self) -> Option<&Address> {
        self.caller
    }

    /// The invocation's clock, milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn slot(&self, name: &str) -> Result<usize, FunctionError> {
        self.state
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| FunctionError::UndeclaredState(name.to_string()))
    }

    /// Reads a state value; `None` if absent or expired.
    pub fn get<T: Codec>(&self, spec: &ValueSpec<T>) -> Result<Option<T>, FunctionError> {
        let i = self.slot(spec.name())?;
        let slot = &self.state[i];
        match slot.live_value(self.now_ms) {
            None => Ok(None),
            Some(b) => T::decode(b).map(Some).map_err(|reason| {
                FunctionError::Decode(DecodeError {
                    expected: spec.descriptor().typename.to_string(),
                    found_typename: slot.typename.to_string(),
                    reason,
                })
            }),
        }
    }

    fn write(&mut self, name: &str, value: Option<Bytes>) -> Result<(), FunctionError> {
        let i = self.slot(name)?;
        let s = &mut self.state[i];
        if !self.undo.iter().any(|u| u.slot == i) {
            self.undo.push(Undo {
                slot: i,
                value: s.value.clone(),
                expires_at_ms: s.expires_at_ms,
                dirty: s.dirty,
            });
        }
        s.expires_at_ms = match (&value, s.expiration.ttl()) {
            (Some(_), Some(ttl)) => self.now_ms + ttl.as_millis() as u64,
            _ => 0,
        };
        s.value = value;
        s.dirty = true;
        Ok(())
    }

    /// Writes a state value.
    pub fn set<T: Codec>(&mut self, spec: &ValueSpec<T>, value: &T) -> Result<(), FunctionError> {
        self.write(spec.name(), Some(value.encode()))
    }

    /// Removes a state value.
    pub fn remove<T: Codec>(&mut self, spec: &ValueSpec<T>) -> Result<(), FunctionError> {
        self.write(spec.name(), None)
    }

    /// Sends a message to another address.
    pub fn send(&mut self, target: Address, message: TypedValue) {
        self.effects.messages.push((target, message));
    }

    /// Sends a message of a built-in type.
    pub fn send_value<T: WellKnown>(&mut self, target: Address, value: &T) {
        self.send(target, TypedValue::of(value));
    }

    /// Sends a message after `delay`; with a cancellation token it can be cancelled by
    /// [`Context::cancel_delayed`] until it fires. Delayed messages survive restarts.
    pub fn send_after(
        &mut self,
        delay: Duration,
        target: Address,
        message: TypedValue,
        cancellation_token: Option<String>,
    ) {
        self.effects.delayed.push(DelayedMessage {
            delay,
            target,
            message,
            cancellation_token,
        });
    }

    /// Cancels a delayed message sent by this address with `token` (best effort: a
    /// message that already fired is not recalled).
    pub fn cancel_delayed(&mut self, token: impl Into<String>) {
        self.effects.cancellations.push(token.into());
    }

    /// Appends a record to an egress topic.
    pub fn send_egress(&mut self, topic: impl Into<String>, value: TypedValue) {
        self.effects.egress.push((topic.into(), value));
    }

    /// Sends `value` to the caller (a waiting `Call`, or the calling function). Returns
    /// false, sending nothing, when the message has no caller (a one-way ingress send).
    pub fn reply(&mut self, value: TypedValue) -> bool {
        match self.caller {
            Some(c) => {
                self.effects.messages.push((c.clone(), value));
                true
            }
            None => false,
        }
    }
}

/// A stateful function.
pub trait StatefulFunction: Send + Sync + 'static {
    /// The states this function type declares.
    fn value_specs(&self) -> Vec<ValueSpecDescriptor>;
    /// Handles one message. On error, the runtime discards the invocation's effects and
    /// retries it with backoff, then dead-letters the message.
    fn invoke(&self, ctx: &mut Context<'_>, message: &TypedValue) -> Result<(), FunctionError>;
}

type Handler = dyn Fn(&mut Context<'_>, &TypedValue) -> Result<(), FunctionError> + Send + Sync;

/// A function made of a closure and its declared states.
pub struct FnFunction {
    specs: Vec<ValueSpecDescriptor>,
    handler: Box<Handler>,
}

impl FnFunction {
    /// A function with the given states and handler.
    pub fn new<F>(specs: Vec<ValueSpecDescriptor>, handler: F) -> Self
    where
        F: Fn(&mut Context<'_>, &TypedValue) -> Result<(), FunctionError> + Send + Sync + 'static,
    {
        FnFunction {
            specs,
            handler: Box::new(handler),
        }
    }
}

impl StatefulFunction for FnFunction {
    fn value_specs(&self) -> Vec<ValueSpecDescriptor> {
        self.specs.clone()
    }
    fn invoke(&self, ctx: &mut Context<'_>, message: &TypedValue) -> Result<(), FunctionError> {
        (self.handler)(ctx, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Address;

    #[test]
    fn state_ttl_and_rollback() {
        let spec = ValueSpec::<i64>::new("n").expire_after_write(Duration::from_millis(10));
        let mut slots = vec![StateSlot::empty(spec.descriptor())];
        let me = Address::parse("a/b/c").unwrap();
        let mut eff = Effects::default();
        let mut undo = Vec::new();
        let mut ctx = Context::new(&me, None, 1000, &mut slots, &mut eff, &mut undo);
        ctx.set(&spec, &5).unwrap();
        assert_eq!(ctx.get(&spec).unwrap(), Some(5));
        ctx.send_value(me.clone(), &1i64);
        assert!(!ctx.reply(TypedValue::of(&1i64)));
        assert!(ctx.get(&ValueSpec::<i64>::new("other")).is_err());
        assert_eq!(slots[0].expires_at_ms, 1010);
        assert_eq!(eff.messages.len(), 1);

        let mut ctx = Context::new(&me, None, 1020, &mut slots, &mut eff, &mut undo);
        assert_eq!(ctx.get(&spec).unwrap(), None, "expired");
        ctx.set(&spec, &9).unwrap();
        ctx.send_value(me.clone(), &2i64);
        ctx.rollback();
        assert_eq!(slots[0].value.as_deref(), Some(&5i64.encode()[..]));
        assert_eq!(eff.messages.len(), 1);
    }
}
