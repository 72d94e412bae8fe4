//! The router: address → key group → shard, ingress admission and waiting callers.
//!
//! Everything that puts a message into the mesh goes through a [`Router`]: ingress (gRPC,
//! HTTP, in-process) and shards routing the effects of invocations. It owns the table of
//! callers waiting for a reply: a `Call` invokes its target with the caller address
//! `statemesh/reply/<call id>`, and whatever the function chain sends to that address
//! completes the call without touching a shard.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::Addr;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use statemesh_sdk::{Address, TypeName, TypedValue, REPLY_TYPE};
use tokio::sync::oneshot;

use crate::egress::Egress;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::shard::{Deliver, GetState, Shard};

/// A message on its way to an address.
pub(crate) struct Envelope {
    pub target: Address,
    pub kg: u32,
    pub caller: Option<Address>,
    pub message: TypedValue,
    /// Came from ingress: counts against the shard's admission limit until processed.
    pub ingress: bool,
}

struct Inner {
    shards: OnceLock<Vec<Addr<Shard>>>,
    queued: Vec<AtomicUsize>,
    max_queued: usize,
    max_message_bytes: usize,
    key_groups: u32,
    calls: Mutex<FxHashMap<u64, oneshot::Sender<Result<TypedValue, ServiceError>>>>,
    next_call: AtomicU64,
    reply_type: TypeName,
    registry: Arc<Registry>,
    egress: Egress,
    metrics: Metrics,
    closed: AtomicBool,
    /// Per shard: remote-function addresses whose inbox reached `maxNumBatchRequests`;
    /// ingress refuses (or, for streams, holds back) messages to them until it drains.
    saturated: Vec<parking_lot::RwLock<rustc_hash::FxHashSet<Address>>>,
    saturated_count: AtomicUsize,
}

/// Routes messages to shards. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    pub(crate) fn new(
        shard_count: usize,
        key_groups: u32,
        max_queued: usize,
        max_message_bytes: usize,
        registry: Arc<Registry>,
        egress: Egress,
        metrics: Metrics,
    ) -> Self {
        Router {
            inner: Arc::new(Inner {
                shards: OnceLock::new(),
                queued: (0..shard_count).map(|_| AtomicUsize::new(0)).collect(),
                max_queued,
                max_message_bytes,
                key_groups,
                calls: Mutex::default(),
                next_call: AtomicU64::new(1),
                reply_type: TypeName::parse(REPLY_TYPE).expect("valid literal type"),
                registry,
                egress,
                metrics,
                closed: AtomicBool::new(false),
                saturated: (0..shard_count).map(|_| Default::default()).collect(),
                saturated_count: AtomicUsize::new(0),
            }),
        }
    }

    pub(crate) fn set_shards(&self, shards: Vec<Addr<Shard>>) {
        assert_eq!(
            shards.len(),
            self.inner.queued.len(),
            "one address per shard"
        );
        if self.inner.shards.set(shards).is_err() {
            panic!("shards are set once");
        }
    }

    fn shards(&self) -> &[Addr<Shard>] {
        self.inner
            .shards
            .get()
            .expect("the node sets its shards before routing")
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.queued.len()
    }

    /// The key group of an address.
    pub fn key_group(&self, a: &Address) -> u32 {
        statemesh_mesh::keygroup::key_group(
            a.typ.namespace(),
            a.typ.name(),
            &a.id,
            self.inner.key_groups,
        )
    }

    /// The shard owning a key group.
    pub fn shard_of(&self, kg: u32) -> usize {
        kg as usize % self.shard_count()
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    pub(crate) fn egress(&self) -> &Egress {
        &self.inner.egress
    }

    /// The node's metrics in the Prometheus text format (counters as of the shards' last
    /// periodic fold).
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Stops accepting ingress (shutdown).
    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_reply_address(&self, a: &Address) -> bool {
        a.typ == self.inner.reply_type
    }

    /// Messages admitted from ingress and not yet processed, per shard.
    pub(crate) fn release(&self, shard: usize, n: usize) {
        if n > 0 {
            self.inner.queued[shard].fetch_sub(n, Ordering::Relaxed);
        }
    }

    fn reject(&self, e: ServiceError, reason: &str) -> ServiceError {
        self.inner
            .metrics
            .ingress_errors
            .with_label_values(&[reason])
            .inc();
        e
    }

    /// Checks an ingress message: known function type, size.
    fn validate(&self, target: &Address, message: &TypedValue) -> Result<(), ServiceError> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(self.reject(
                ServiceError::Unavailable("the node is shutting down".into()),
                "shutdown",
            ));
        }
        if self.inner.registry.get(&target.typ).is_none() {
            return Err(self.reject(
                ServiceError::UnknownFunction(target.typ.to_string()),
                "unknown_function",
            ));
        }
        TypeName::parse_as(message.typename(), "typename").map_err(|e| {
            self.reject(
                ServiceError::InvalidArgument(e.to_string()),
                "invalid_argument",
            )
        })?;
        let size = message.value().len();
        if size > self.inner.max_message_bytes {
            return Err(self.reject(
                ServiceError::TooLarge {
                    size,
                    max: self.inner.max_message_bytes,
                },
                "too_large",
            ));
        }
        Ok(())
    }

    /// Marks (or clears) an address whose inbox reached its `maxNumBatchRequests`.
    pub(crate) fn set_saturated(
        &self,
        shard: usize,
        address: &Address,
        saturated: bool,
        limit: usize,
    ) {
        let mut set = self.inner.saturated[shard].write();
        if saturated {
            if set.insert(address.clone()) {
                self.inner.saturated_count.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%address, limit, "address saturated: back-pressure on its ingress");
            }
        } else if set.remove(address) {
            self.inner.saturated_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn check_saturated(&self, shard: usize, target: &Address) -> Result<(), ServiceError> {
        if self.inner.saturated_count.load(Ordering::Relaxed) == 0
            || !self.inner.saturated[shard].read().contains(target)
        {
            return Ok(());
        }
        Err(self.reject(
            ServiceError::Overloaded(format!(
                "{target} has reached its maxNumBatchRequests of queued messages; retry later"
            )),
            "overloaded",
        ))
    }

    fn admit(&self, shard: usize, n: usize) -> Result<(), ServiceError> {
        let q = &self.inner.queued[shard];
        let before = q.fetch_add(n, Ordering::Relaxed);
        // A batch larger than the whole limit is admitted into an empty shard, so streams
        // with big frames cannot wait forever.
        if before + n > self.inner.max_queued && before > 0 {
            q.fetch_sub(n, Ordering::Relaxed);
            return Err(self.reject(
                ServiceError::Overloaded(format!(
                    "shard {shard} has {before} queued messages (limit {}); retry later",
                    self.inner.max_queued
                )),
                "overloaded",
            ));
        }
        Ok(())
    }

    fn envelope(
        &self,
        target: Address,
        caller: Option<Address>,
        message: TypedValue,
    ) -> (usize, Envelope) {
        let kg = self.key_group(&target);
        (
            self.shard_of(kg),
            Envelope {
                target,
                kg,
                caller,
                message,
                ingress: true,
            },
        )
    }

    /// Sends one message from ingress. Returns once the owning shard has it queued.
    pub fn send(&self, target: Address, message: TypedValue) -> Result<(), ServiceError> {
        self.validate(&target, &message)?;
        let (shard, env) = self.envelope(target, None, message);
        self.check_saturated(shard, &env.target)?;
        self.admit(shard, 1)?;
        self.inner.metrics.ingress_messages.inc();
        self.shards()[shard].do_send(Deliver { batch: vec![env] });
        Ok(())
    }

    /// Sends many messages from ingress; all are validated before any is sent. With
    /// `wait`, a full shard makes this wait for room (flow control for streams) instead of
    /// failing with `Overloaded`.
    pub async fn send_batch(
        &self,
        messages: Vec<(Address, TypedValue)>,
        wait: bool,
    ) -> Result<usize, ServiceError> {
        for (t, m) in &messages {
            self.validate(t, m)?;
        }
        let n = messages.len();
        let mut per_shard: Vec<Vec<Envelope>> =
            (0..self.shard_count()).map(|_| Vec::new()).collect();
        for (t, m) in messages {
            let (s, env) = self.envelope(t, None, m);
            per_shard[s].push(env);
        }
        for (s, batch) in per_shard.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            loop {
                let admitted = batch
                    .iter()
                    .try_for_each(|e| self.check_saturated(s, &e.target))
                    .and_then(|()| self.admit(s, batch.len()));
                match admitted {
                    Ok(()) => break,
                    Err(e) if !wait => return Err(e),
                    Err(_) => {
                        if self.inner.closed.load(Ordering::Relaxed) {
                            return Err(ServiceError::Unavailable(
                                "the node is shutting down".into(),
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            self.inner
                .metrics
                .ingress_messages
                .inc_by(batch.len() as u64);
            self.shards()[s].do_send(Deliver { batch });
        }
        Ok(n)
    }

    /// Calls an address and waits for the reply.
    pub async fn call(
        &self,
        target: Address,
        message: TypedValue,
        timeout: Duration,
    ) -> Result<TypedValue, ServiceError> {
        self.validate(&target, &message)?;
        let id = self.inner.next_call.fetch_add(1, Ordering::Relaxed);
        let caller = Address {
            typ: self.inner.reply_type.clone(),
            id: id.to_string().into(),
        };
        let (shard, env) = self.envelope(target, Some(caller), message);
        self.check_saturated(shard, &env.target)?;
        self.admit(shard, 1)?;
        let (tx, rx) = oneshot::channel();
        self.inner.calls.lock().insert(id, tx);
        self.inner.metrics.ingress_messages.inc();
        self.shards()[shard].do_send(Deliver { batch: vec![env] });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServiceError::Unavailable(
                "the node dropped the call while shutting down".into(),
            )),
            Err(_) => {
                self.inner.calls.lock().remove(&id);
                Err(self.reject(ServiceError::Timeout(timeout.as_millis() as u64), "timeout"))
            }
        }
    }

    /// Completes a waiting call; false if nobody waits for it (any more).
    pub(crate) fn complete_call(
        &self,
        reply_to: &Address,
        value: Result<TypedValue, ServiceError>,
    ) -> bool {
        let Ok(id) = reply_to.id.parse::<u64>() else {
            return false;
        };
        match self.inner.calls.lock().remove(&id) {
            Some(tx) => tx.send(value).is_ok(),
            None => false,
        }
    }

    /// Delivers messages produced inside the mesh to another shard (no admission check:
    /// refusing them could deadlock a cycle of functions).
    pub(crate) fn deliver_internal(&self, shard: usize, batch: Vec<Envelope>) {
        self.shards()[shard].do_send(Deliver { batch });
    }

    /// The stored states of an address (from its shard's cache or sled).
    pub async fn get_state(
        &self,
        address: Address,
    ) -> Result<Vec<(String, TypedValue, u64)>, ServiceError> {
        if self.inner.registry.get(&address.typ).is_none() {
            return Err(ServiceError::UnknownFunction(address.typ.to_string()));
        }
        let kg = self.key_group(&address);
        let (tx, rx) = oneshot::channel();
        self.shards()[self.shard_of(kg)].do_send(GetState {
            address,
            kg,
            reply: tx,
        });
        rx.await
            .map_err(|_| ServiceError::Unavailable("the shard stopped".into()))?
    }
}
