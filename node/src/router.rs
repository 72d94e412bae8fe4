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

use crate::config::AckMode;
use crate::egress::Egress;
use crate::error::ServiceError;
use crate::mesh::{Placement, Route};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::shard::{Deliver, GetState, Marker, RemoteMarker, Shard};

/// Where a shard sends a `Send`'s acknowledgement (once its epoch commits).
pub(crate) type AckTx = oneshot::Sender<Result<(), ServiceError>>;

/// A reply address's parts: `statemesh/reply/<kg>.<call id>[.<idempotency scope>]`. The key
/// group is the call target's, so replies go through the shard that owns the call's
/// idempotency record and hold the reply until its epoch commits.
pub(crate) struct ReplyTo<'a> {
    pub kg: u32,
    pub call: u64,
    pub scope: Option<&'a str>,
}

pub(crate) fn parse_reply_id(id: &str) -> Option<ReplyTo<'_>> {
    let (kg, rest) = id.split_once('.')?;
    let (call, scope) = match rest.split_once('.') {
        Some((c, s)) => (c, Some(s)),
        None => (rest, None),
    };
    Some(ReplyTo {
        kg: kg.parse().ok()?,
        call: call.parse().ok()?,
        scope,
    })
}

/// A message another node's shard sent here: target, caller, message, the target's key group
/// version in the sender's table, and a client's idempotency key (a request its old owner kept
/// during a live move).
pub(crate) type RemoteMessage = (
    Address,
    Option<Address>,
    TypedValue,
    u64,
    Option<String>,
    crate::telemetry::Trace,
);

/// A message on its way to an address.
pub(crate) struct Envelope {
    pub target: Address,
    pub kg: u32,
    pub caller: Option<Address>,
    pub message: TypedValue,
    /// Came from ingress: counts against the shard's admission limit until processed.
    pub ingress: bool,
    /// The ingress request's idempotency key.
    pub key: Option<Box<str>>,
    /// The span that sent it, if it is traced (`crate::telemetry`).
    pub trace: crate::telemetry::Trace,
}

/// Where a call's reply goes.
type ReplyTx = oneshot::Sender<Result<TypedValue, ServiceError>>;

struct Inner {
    shards: OnceLock<Vec<Addr<Shard>>>,
    queued: Vec<AtomicUsize>,
    max_queued: usize,
    max_message_bytes: usize,
    key_groups: u32,
    /// Calls waiting for their reply: the key group of the call's target, and the waiter.
    calls: Mutex<FxHashMap<u64, (u32, ReplyTx)>>,
    next_call: AtomicU64,
    /// The leading bits of this node's call ids (its node id's).
    node_bits: u64,
    reply_type: TypeName,
    registry: Arc<Registry>,
    egress: Egress,
    metrics: Metrics,
    closed: AtomicBool,
    /// Per shard: remote-function addresses whose inbox reached `maxNumBatchRequests`;
    /// ingress refuses (or, for streams, holds back) messages to them until it drains.
    saturated: Vec<parking_lot::RwLock<rustc_hash::FxHashSet<Address>>>,
    saturated_count: AtomicUsize,
    /// Checkpoints are on: acknowledgements, replies and egress wait for commits.
    checkpointing: bool,
    ack: AckMode,
    /// Something waits for a commit: the coordinator starts an epoch early.
    commit_wanted: AtomicBool,
    /// Wakes the epoch driver when `commit_wanted` turns on.
    commit_notify: tokio::sync::Notify,
    /// Wakes the epoch driver when `commit_soon` turns on.
    soon_notify: tokio::sync::Notify,
    /// The newest epoch that an output wanting a commit soon, not at once, is held in (0: none
    /// since the driver last saw that epoch's barrier); see [`Router::want_commit_soon`].
    commit_soon: AtomicU64,
    /// Per shard: how many outputs it holds for commits (see [`Router::set_holding`]).
    holding: Vec<AtomicUsize>,
    /// Why ingress is refused while checkpoints are behind (`None`: it is not).
    backpressure: Refusal,
    /// The newest epoch applied to sled (shards passivate only what it holds).
    applied: AtomicU64,
    /// Which node owns which key group (ingress for another owner is forwarded there).
    placement: Arc<Placement>,
    /// A shard must passivate but waits for sled: apply committed epochs now.
    apply_wanted: AtomicBool,
    /// The thread that applies committed epochs to sled (unparked by [`Router::want_apply`]).
    applier: parking_lot::Mutex<Option<std::thread::Thread>>,
    /// Why ingress is refused while the node rolls back (`None`: it is not).
    rolling_back: Refusal,
    /// The shards' generation (bumped by each rollback).
    generation: AtomicU64,
}

/// A reason ingress is refused for now (checked on every admission: one atomic load while
/// there is none).
#[derive(Default)]
struct Refusal {
    on: AtomicBool,
    why: parking_lot::RwLock<Option<String>>,
}

impl Refusal {
    fn set(&self, why: Option<String>) {
        let on = why.is_some();
        *self.why.write() = why;
        self.on.store(on, Ordering::SeqCst);
    }

    fn get(&self) -> Option<String> {
        if self.on.load(Ordering::Relaxed) {
            self.why.read().clone()
        } else {
            None
        }
    }
}

/// Routes messages to shards. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shard_count: usize,
        key_groups: u32,
        max_queued: usize,
        max_message_bytes: usize,
        registry: Arc<Registry>,
        egress: Egress,
        metrics: Metrics,
        checkpointing: bool,
        ack: AckMode,
        placement: Arc<Placement>,
    ) -> Self {
        // Call ids must not repeat across restarts (a reply recovered from a checkpoint must
        // not complete an unrelated new call): they count on from the start time. Nor across
        // nodes (a call's reply goes to the owner of its target's key group, a new one after a
        // move): the node id's low 16 bits lead.
        let first_call = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            << 8;
        let node_bits = (placement.me() & 0xffff) << CALL_COUNTER_BITS;
        Router {
            inner: Arc::new(Inner {
                shards: OnceLock::new(),
                queued: (0..shard_count).map(|_| AtomicUsize::new(0)).collect(),
                max_queued,
                max_message_bytes,
                key_groups,
                calls: Mutex::default(),
                next_call: AtomicU64::new(first_call),
                node_bits,
                reply_type: TypeName::parse(REPLY_TYPE).expect("valid literal type"),
                registry,
                egress,
                metrics,
                closed: AtomicBool::new(false),
                saturated: (0..shard_count).map(|_| Default::default()).collect(),
                saturated_count: AtomicUsize::new(0),
                checkpointing,
                ack,
                commit_wanted: AtomicBool::new(false),
                commit_soon: AtomicU64::new(0),
                holding: (0..shard_count).map(|_| AtomicUsize::new(0)).collect(),
                commit_notify: tokio::sync::Notify::new(),
                soon_notify: tokio::sync::Notify::new(),
                backpressure: Refusal::default(),
                applied: AtomicU64::new(0),
                apply_wanted: AtomicBool::new(false),
                applier: parking_lot::Mutex::new(None),
                rolling_back: Refusal::default(),
                generation: AtomicU64::new(crate::shard::FIRST_GENERATION),
                placement,
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

    /// The node that owns `a`'s key group, as this node last applied the key-group table
    /// (`None`: unassigned; a node alone serves those).
    pub fn owner_of(&self, a: &Address) -> Option<u64> {
        let kg = self.key_group(a) as usize;
        self.placement().owners().1.get(kg).copied().flatten()
    }

    /// The key group of an address (a reply address names its call target's).
    pub fn key_group(&self, a: &Address) -> u32 {
        if self.is_reply_address(a) {
            if let Some(r) = parse_reply_id(&a.id) {
                return r.kg % self.inner.key_groups;
            }
        }
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

    /// Whether checkpoints are on.
    pub(crate) fn checkpointing(&self) -> bool {
        self.inner.checkpointing
    }

    /// The largest message value accepted.
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }

    /// Asks for an epoch soon (something waits for a commit).
    pub(crate) fn want_commit(&self) {
        if !self.inner.commit_wanted.load(Ordering::Relaxed)
            && !self.inner.commit_wanted.swap(true, Ordering::AcqRel)
        {
            self.inner.commit_notify.notify_one();
        }
    }

    /// Asks for an epoch within [`crate::checkpoint::driver::COMMIT_SOON_MS`], for an output that
    /// nobody is blocked on (an egress record): an epoch started meanwhile for another reason
    /// takes it along, so it costs no commit of its own. (A record held while an epoch persists
    /// and asking for one at once would make the next caller wait for two commits.)
    /// `epoch`: the epoch the output is held in (the shard's open one).
    pub(crate) fn want_commit_soon(&self, epoch: u64) {
        if self.inner.commit_soon.fetch_max(epoch, Ordering::Relaxed) == 0 {
            // An idle driver sleeps until the interval's next epoch (100 ms at most): it
            // ticks every 1 ms again from now.
            self.inner.soon_notify.notify_one();
        }
    }

    /// Resolves when an output starts wanting a commit soon (none did before).
    pub(crate) async fn commit_soon_asked(&self) {
        self.inner.soon_notify.notified().await
    }

    /// The newest epoch an output that wants a commit soon is held in (0: none).
    pub(crate) fn commit_soon(&self) -> u64 {
        self.inner.commit_soon.load(Ordering::Relaxed)
    }

    /// Forgets the outputs that wanted a commit soon, held in `epoch` or before, once that
    /// epoch's barrier went out (unless a newer one came meanwhile).
    pub(crate) fn clear_commit_soon(&self, epoch: u64) {
        let _ =
            self.inner
                .commit_soon
                .compare_exchange(epoch, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Resolves when something starts waiting for a commit.
    pub(crate) async fn commit_wanted(&self) {
        self.inner.commit_notify.notified().await
    }

    /// Whether an epoch was asked for and no tick has taken the request yet.
    pub(crate) fn commit_wanted_now(&self) -> bool {
        self.inner.commit_wanted.load(Ordering::Relaxed)
    }

    /// Whether an epoch was asked for since the last call.
    pub(crate) fn take_commit_wanted(&self) -> bool {
        self.inner.commit_wanted.swap(false, Ordering::Relaxed)
    }

    /// Turns checkpoint back-pressure on (with the reason ingress reports) or off.
    pub(crate) fn set_backpressure(&self, reason: Option<String>) {
        self.inner.backpressure.set(reason);
    }

    /// Why ingress is refused because checkpoints are behind, if it is.
    pub fn backpressure(&self) -> Option<String> {
        self.inner.backpressure.get()
    }

    pub(crate) fn set_applied(&self, epoch: u64) {
        self.inner.applied.fetch_max(epoch, Ordering::SeqCst);
    }

    /// Asks for committed epochs to be applied to sled now (instances wait to be passivated,
    /// a rollback waits, the node stops): wakes the applier if it waits out its merge window.
    pub(crate) fn want_apply(&self) {
        if !self.inner.apply_wanted.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.inner.applier.lock().as_ref() {
                t.unpark();
            }
        }
    }

    /// The thread [`Router::want_apply`] wakes.
    pub(crate) fn set_applier(&self, thread: std::thread::Thread) {
        *self.inner.applier.lock() = Some(thread);
    }

    /// Whether an early apply was asked for since the last call.
    pub(crate) fn take_apply_wanted(&self) -> bool {
        self.inner.apply_wanted.swap(false, Ordering::AcqRel)
    }

    /// The newest epoch applied to the local store.
    pub(crate) fn applied(&self) -> u64 {
        self.inner.applied.load(Ordering::SeqCst)
    }

    /// Sends shard `from`'s marker of epoch `e` to shard `to` (after everything `from` sent
    /// it before its cut: the same mailbox keeps the order).
    pub(crate) fn marker(&self, to: usize, from: usize, generation: u64, epoch: u64) {
        self.shards()[to].do_send(Marker {
            from,
            epoch,
            generation,
        });
    }

    /// Stops accepting ingress (shutdown).
    pub(crate) fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_reply_address(&self, a: &Address) -> bool {
        a.typ == self.inner.reply_type
    }

    /// Shard `shard` holds `n` outputs (acknowledgements, replies, egress records) until
    /// their epochs commit. Set before the shard reports its cut of an epoch, so that the
    /// driver, having every cut of it, sees each output held in that epoch or before.
    pub(crate) fn set_holding(&self, shard: usize, n: usize) {
        self.inner.holding[shard].store(n, Ordering::Release);
    }

    /// Whether shard `shard` holds an output: a commit's release skips a shard that holds
    /// none (it would wake its thread for nothing).
    pub(crate) fn holding(&self, shard: usize) -> bool {
        self.inner.holding[shard].load(Ordering::Acquire) > 0
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
        // Here, not at validation: a stream waiting for room since before a rollback must not
        // get in ahead of the replayed messages.
        if let Some(why) = self.inner.rolling_back.get() {
            return Err(self.reject(ServiceError::Unavailable(why), "rolling_back"));
        }
        if let Some(reason) = self.inner.backpressure.get() {
            return Err(self.reject(ServiceError::Overloaded(reason), "checkpoint_backlog"));
        }
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
                key: None,
                trace: crate::telemetry::TraceParent::current(),
            },
        )
    }

    /// Admits one ingress message and hands it to its shard (with the `Send`
    /// acknowledgement to hold until its epoch commits, if any).
    fn deliver_one(
        &self,
        shard: usize,
        env: Envelope,
        ack: Option<AckTx>,
    ) -> Result<(), ServiceError> {
        self.check_saturated(shard, &env.target)?;
        self.admit(shard, 1)?;
        self.inner.metrics.ingress_messages.inc();
        self.shards()[shard].do_send(Deliver {
            versions: Vec::new(),
            batch: vec![env],
            from: None,
            remote: None,
            generation: 0,
            ack,
        });
        Ok(())
    }

    /// Sends one message from ingress, acknowledged on acceptance (returns once the owning
    /// shard has it queued; not durable).
    pub fn send(&self, target: Address, message: TypedValue) -> Result<(), ServiceError> {
        crate::admin::check_not_reserved(message.typename())?;
        self.validate(&target, &message)?;
        if let Some((node, addr, v)) = self.remote(self.key_group(&target), None)? {
            // Queued for the owner now, in this thread's order (or refused when full).
            return crate::mesh::forward_send_now(self, (node, &addr, v), &target, message);
        }
        let (shard, env) = self.envelope(target, None, message);
        self.deliver_one(shard, env, None)
    }

    /// Sends one message from ingress with the node's acknowledgement mode (by default:
    /// returns once the epoch holding it has committed) and an optional idempotency key (a
    /// retry with the same key within the window is acknowledged without applying it again).
    pub async fn send_with(
        &self,
        target: Address,
        message: TypedValue,
        key: Option<String>,
    ) -> Result<(), ServiceError> {
        crate::admin::check_not_reserved(message.typename())?;
        self.send_routed(target, message, key).await
    }

    /// [`Router::send_with`]: to the owner, routed again while a node that is not the owner
    /// refuses it (ownership is changing).
    pub(crate) async fn send_routed(
        &self,
        target: Address,
        message: TypedValue,
        key: Option<String>,
    ) -> Result<(), ServiceError> {
        self.validate(&target, &message)?;
        let key = validate_key(key)?;
        let kg = self.key_group(&target);
        let mut reroute = Reroute::new();
        loop {
            let Some(route) = self.route_again(kg, None, &mut reroute).await? else {
                continue;
            };
            let Some((node, addr, v)) = route else {
                return self.send_local_now(target, message, key)?.await;
            };
            let p = &self.inner.placement;
            let r =
                crate::mesh::forward_send(p, node, &addr, &target, message.clone(), key.clone(), v)
                    .await;
            match r {
                Err(e) if reroute.again(self, kg, v, &e).await => {}
                r => return r,
            }
        }
    }

    /// Queues a `Send` for a key group this node owns now (in the caller's order); the
    /// future waits for its acknowledgement (with the node's acknowledgement mode).
    pub(crate) fn send_local_now(
        &self,
        target: Address,
        message: TypedValue,
        key: Option<String>,
    ) -> Result<futures::future::BoxFuture<'static, Result<(), ServiceError>>, ServiceError> {
        use futures::FutureExt;
        let (shard, mut env) = self.envelope(target, None, message);
        env.key = key.map(String::into_boxed_str);
        if !(self.inner.checkpointing && self.inner.ack == AckMode::Committed) {
            self.deliver_one(shard, env, None)?;
            return Ok(futures::future::ready(Ok(())).boxed());
        }
        let (tx, rx) = oneshot::channel();
        self.deliver_one(shard, env, Some(tx))?;
        Ok(async move {
            rx.await.unwrap_or_else(|_| {
                Err(ServiceError::Unavailable(
                    "the node stopped before the message's epoch committed; retry with the same idempotency key".into(),
                ))
            })
        }
        .boxed())
    }

    /// The owner's side of a forwarded `Send`: checked and queued now, in the order the
    /// forwarding stream delivered it; the future waits for the acknowledgement.
    pub(crate) fn send_forwarded_now(
        &self,
        target: Address,
        message: TypedValue,
        key: Option<String>,
        sender_version: u64,
    ) -> Result<futures::future::BoxFuture<'static, Result<(), ServiceError>>, ServiceError> {
        self.validate(&target, &message)?;
        let key = validate_key(key)?;
        // Forwarded once already: never forwarded again (`remote` refuses if not the owner).
        self.remote(self.key_group(&target), Some(sender_version))?;
        self.send_local_now(target, message, key)
    }

    /// Sends many messages from ingress (each with an optional idempotency key); all are
    /// validated before any is sent. With `wait`, a full shard makes this wait for room (flow
    /// control for streams) instead of failing with `Overloaded`. Returns, with the node's
    /// acknowledgement mode, once all of them are committed (or accepted).
    pub async fn send_batch(
        &self,
        messages: Vec<(Address, TypedValue, Option<String>)>,
        wait: bool,
    ) -> Result<usize, ServiceError> {
        for (_, m, _) in &messages {
            crate::admin::check_not_reserved(m.typename())?;
        }
        self.send_batch_routed(messages, wait, None).await
    }

    /// [`Router::send_batch`] for a batch another node may have forwarded here (`forwarded`:
    /// the ownership version the sender routed each message by). Messages owned elsewhere go
    /// to their owners as one batch per owner, concurrently with the local ones.
    pub(crate) async fn send_batch_routed(
        &self,
        messages: Vec<(Address, TypedValue, Option<String>)>,
        wait: bool,
        forwarded: Option<&[u64]>,
    ) -> Result<usize, ServiceError> {
        for (t, m, _) in &messages {
            self.validate(t, m)?;
        }
        if let Some(versions) = forwarded {
            if versions.len() != messages.len() {
                return Err(ServiceError::InvalidArgument(format!(
                    "a forwarded batch of {} messages names {} ownership versions",
                    messages.len(),
                    versions.len()
                )));
            }
        }
        let n = messages.len();
        let messages = messages
            .into_iter()
            .map(|(t, m, k)| Ok((t, m, validate_key(k)?)))
            .collect::<Result<Vec<_>, ServiceError>>()?;
        self.route_batch(messages, wait, forwarded, Reroute::new())
            .await?;
        Ok(n)
    }

    /// Routes a batch: the local messages to the shards, the others to their owners (one
    /// batch per owner), all at once. With `wait`, it first waits while a key group of the
    /// batch moves. A batch forwarded here (`forwarded`: the versions it was routed by) is
    /// refused as a whole, with nothing applied, unless this node owns every key group of it;
    /// a part this node forwarded and the owner refused that way is routed again (within
    /// `reroute`'s time).
    fn route_batch<'a>(
        &'a self,
        mut messages: Vec<BatchMessage>,
        wait: bool,
        forwarded: Option<&'a [u64]>,
        mut reroute: Reroute,
    ) -> futures::future::BoxFuture<'a, Result<(), ServiceError>> {
        use futures::FutureExt;
        async move {
            let routes = loop {
                if wait {
                    self.wait_moves(&messages).await?;
                }
                if let Some((t, _, _)) = messages.first() {
                    self.wait_lease(self.key_group(t)).await;
                }
                let routes: Result<Vec<_>, _> = messages
                    .iter()
                    .enumerate()
                    .map(|(i, (t, _, _))| self.remote(self.key_group(t), forwarded.map(|v| v[i])))
                    .collect();
                match routes {
                    Ok(r) => break r,
                    Err(e) if forwarded.is_none() && reroute.again_batch(self, &e).await => {}
                    Err(e) => return Err(e),
                }
            };
            let mut local = Vec::with_capacity(messages.len());
            let mut remote: std::collections::BTreeMap<(u64, String), (Vec<_>, Vec<u64>)> =
                Default::default();
            for (m, route) in messages.drain(..).zip(routes) {
                match route {
                    None => local.push(m),
                    Some((node, addr, v)) => {
                        let e = remote.entry((node, addr)).or_default();
                        e.0.push(m);
                        e.1.push(v);
                    }
                }
            }
            let p = &self.inner.placement;
            let forwards = futures::future::try_join_all(remote.into_iter().map(
                |((node, addr), (batch, versions))| {
                    let mut reroute = reroute.clone();
                    async move {
                        match crate::mesh::forward_batch(p, node, &addr, &batch, versions).await {
                            Err(e) if reroute.again_batch(self, &e).await => {
                                self.route_batch(batch, wait, None, reroute).await
                            }
                            r => r,
                        }
                    }
                },
            ));
            let local = async {
                if local.is_empty() {
                    return Ok(0);
                }
                self.send_batch_local(local, wait).await
            };
            let (l, r) = futures::future::join(local, forwards).await;
            l?;
            r?;
            Ok(())
        }
        .boxed()
    }

    /// When this node owns key group `kg` but its ownership lease has lapsed, waits a moment
    /// (up to [`LEASE_GRACE`]) for the renewal already on its way: a control thread that was
    /// held up briefly renews it in milliseconds. A node cut off from the majority refuses
    /// after the wait (see `Placement::lease_refusal`).
    async fn wait_lease(&self, kg: u32) {
        let p = &self.inner.placement;
        if p.lease_refusal(kg).is_none() || !p.is_local(kg) {
            return;
        }
        let deadline = std::time::Instant::now() + LEASE_GRACE;
        while std::time::Instant::now() < deadline
            && p.lease_refusal(kg).is_some()
            && !self.inner.closed.load(Ordering::Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits while a key group of `messages` moves.
    async fn wait_moves(&self, messages: &[BatchMessage]) -> Result<(), ServiceError> {
        let p = &self.inner.placement;
        while messages
            .iter()
            .any(|(t, _, _)| p.is_moving(self.key_group(t)))
        {
            if self.inner.closed.load(Ordering::Relaxed) {
                return Err(ServiceError::Unavailable(
                    "the node is shutting down".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    async fn send_batch_local(
        &self,
        messages: Vec<BatchMessage>,
        wait: bool,
    ) -> Result<usize, ServiceError> {
        let n = messages.len();
        let mut per_shard: Vec<Vec<Envelope>> =
            (0..self.shard_count()).map(|_| Vec::new()).collect();
        for (t, m, k) in messages {
            let (s, mut env) = self.envelope(t, None, m);
            env.key = validate_key(k)?.map(String::into_boxed_str);
            per_shard[s].push(env);
        }
        let committed = self.inner.checkpointing && self.inner.ack == AckMode::Committed;
        let mut acks = Vec::new();
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
            let ack = committed.then(|| {
                let (tx, rx) = oneshot::channel();
                acks.push(rx);
                tx
            });
            self.shards()[s].do_send(Deliver {
                versions: Vec::new(),
                batch,
                from: None,
                remote: None,
                generation: 0,
                ack,
            });
        }
        for rx in acks {
            rx.await.unwrap_or_else(|_| {
                Err(ServiceError::Unavailable(
                    "the node stopped before the messages' epoch committed".into(),
                ))
            })?;
        }
        Ok(n)
    }

    /// Calls an address and waits for the reply (released once the epoch that produced it
    /// has committed).
    pub async fn call(
        &self,
        target: Address,
        message: TypedValue,
        timeout: Duration,
    ) -> Result<TypedValue, ServiceError> {
        self.call_with(target, message, timeout, None).await
    }

    /// Like [`Router::call`], with an idempotency key: a retry with the same key within the
    /// window gets the first call's reply instead of applying the call again.
    pub async fn call_with(
        &self,
        target: Address,
        message: TypedValue,
        timeout: Duration,
        key: Option<String>,
    ) -> Result<TypedValue, ServiceError> {
        crate::admin::check_not_reserved(message.typename())?;
        self.call_routed(target, message, timeout, key).await
    }

    /// The dead letters this node holds (those of its key groups), oldest first.
    pub fn dead_letters(&self, limit: usize) -> Vec<crate::admin::DeadLetter> {
        self.inner
            .egress
            .peek(statemesh_sdk::DEAD_LETTERS_TOPIC, limit)
            .iter()
            .map(crate::admin::DeadLetter::parse)
            .collect()
    }

    /// The dead letter `id` if this node holds it.
    pub fn dead_letter(&self, id: &str) -> Option<crate::admin::DeadLetter> {
        self.inner
            .egress
            .find_by_id(statemesh_sdk::DEAD_LETTERS_TOPIC, id)
            .map(|r| crate::admin::DeadLetter::parse(&r))
    }

    /// Replays the dead letter `id` this node holds, and removes it: a message to a function
    /// is sent to its address again as an ingress message (idempotency key
    /// `dead-letter/<id>`, so that a replay retried after a crash between the send and the
    /// removal is applied once), and the letter is removed once the send is acknowledged
    /// (answered once the removal committed); an egress record is moved back to its egress's
    /// queue (rewritten in place by the next epoch). Returns what it did.
    pub async fn replay_dead_letter(&self, id: &str) -> Result<String, ServiceError> {
        use statemesh_sdk::DEAD_LETTERS_TOPIC as DL;
        if id.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "a dead letter id is required (statemesh dead-letters list shows them)".into(),
            ));
        }
        let letter = self.dead_letter(id).ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "no dead letter {id} on this node (replayed or read already, or moved with its key group: list again)"
                ))
            })?;
        crate::admin::check_not_reserved(&letter.typename)?;
        let value = TypedValue::new(letter.typename.clone(), letter.value.clone());
        if let Some(address) = &letter.address {
            let target = Address::parse(address).map_err(|e| {
                ServiceError::InvalidArgument(format!("dead letter {id}: address {address:?}: {e}"))
            })?;
            self.send_routed(target, value, Some(format!("dead-letter/{id}")))
                .await?;
            let popped = self.inner.egress.pop_by_id(DL, id).map_err(|e| {
                ServiceError::Unavailable(format!(
                    "dead letter {id} was sent to {address} but not removed ({e}); replaying it again does not send it twice within the idempotency window (key dead-letter/{id})"
                ))
            })?;
            if popped.waits() {
                self.want_commit();
            }
            return match popped.settled().await {
                Some(_) => Ok(format!("sent to {address}")),
                None => Err(ServiceError::Unavailable(format!(
                    "dead letter {id} was sent to {address}, but its key group moved before its removal committed: it is still listed on its new owner, and replaying it there does not send it twice (idempotency key dead-letter/{id})"
                ))),
            };
        }
        if let Some(egress) = &letter.egress {
            if !self.inner.egress.is_sink(egress) {
                return Err(ServiceError::InvalidArgument(format!(
                    "dead letter {id} was going to egress {egress}, which this node does not run (is it still in module.yaml?)"
                )));
            }
            // Found a moment ago: gone now means key groups are moving, or another reader.
            self.inner
                .egress
                .move_by_id(DL, id, egress, value)
                .map_err(|e| {
                    ServiceError::Unavailable(format!("dead letter {id}: {e}; list again"))
                })?;
            self.want_commit();
            return Ok(format!("queued on egress {egress}"));
        }
        Err(ServiceError::InvalidArgument(format!(
            "dead letter {id} names no address or egress to replay to (it was dead-lettered because: {})",
            letter.error
        )))
    }

    /// Edits one state of `address` (`statemesh state set|delete`): applied by its owner
    /// between two invocations, as a change of an epoch, and answered with the address's
    /// states once that epoch committed (`crate::admin`). A retry with the same `key` is
    /// applied once.
    pub async fn set_state(
        &self,
        address: Address,
        edit: crate::admin::StateEdit,
        timeout: Duration,
        key: Option<String>,
    ) -> Result<Vec<(String, TypedValue, u64)>, ServiceError> {
        if edit.name.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "a state name is required".into(),
            ));
        }
        let reply = self
            .call_routed(address, edit.to_message(), timeout, key)
            .await?;
        crate::admin::parse_states_reply(&reply)
    }

    /// [`Router::call_with`]: to the owner, routed again while a node that is not the owner
    /// refuses it (ownership is changing).
    async fn call_routed(
        &self,
        target: Address,
        message: TypedValue,
        timeout: Duration,
        key: Option<String>,
    ) -> Result<TypedValue, ServiceError> {
        self.validate(&target, &message)?;
        let key = validate_key(key)?;
        let kg = self.key_group(&target);
        let mut reroute = Reroute::new();
        loop {
            let Some(route) = self.route_again(kg, None, &mut reroute).await? else {
                continue;
            };
            let Some((node, addr, v)) = route else {
                return self.call_local_now(target, message, timeout, key)?.await;
            };
            let p = &self.inner.placement;
            let r = crate::mesh::forward_call(
                p,
                (node, &addr, v),
                &target,
                message.clone(),
                timeout,
                key.clone(),
            )
            .await;
            match r {
                Err(e) if reroute.again(self, kg, v, &e).await => {}
                r => return r,
            }
        }
    }

    /// The owner's side of a forwarded `Call`: checked and queued now, in the order the
    /// forwarding stream delivered it; the future waits for the reply.
    pub(crate) fn call_forwarded_now(
        &self,
        target: Address,
        message: TypedValue,
        timeout: Duration,
        key: Option<String>,
        sender_version: u64,
    ) -> Result<futures::future::BoxFuture<'static, Result<TypedValue, ServiceError>>, ServiceError>
    {
        self.validate(&target, &message)?;
        let key = validate_key(key)?;
        self.remote(self.key_group(&target), Some(sender_version))?;
        self.call_local_now(target, message, timeout, key)
    }

    /// Queues a `Call` for a key group this node owns now; the future waits for the reply.
    fn call_local_now(
        &self,
        target: Address,
        message: TypedValue,
        timeout: Duration,
        key: Option<String>,
    ) -> Result<futures::future::BoxFuture<'static, Result<TypedValue, ServiceError>>, ServiceError>
    {
        use futures::FutureExt;
        let kg = self.key_group(&target);
        let id = self.inner.node_bits
            | (self.inner.next_call.fetch_add(1, Ordering::Relaxed) & CALL_COUNTER_MASK);
        let reply_id = match &key {
            Some(k) => format!(
                "{kg}.{id}.{}",
                crate::checkpoint::idempotency::scope(&target.to_string(), k)
            ),
            None => format!("{kg}.{id}"),
        };
        let caller = Address {
            typ: self.inner.reply_type.clone(),
            id: reply_id.into(),
        };
        let (shard, mut env) = self.envelope(target, Some(caller), message);
        env.key = key.map(String::into_boxed_str);
        // Registered before the message leaves: the reply can come back at once.
        let (tx, rx) = oneshot::channel();
        self.inner.calls.lock().insert(id, (kg, tx));
        if let Err(e) = self.deliver_one(shard, env, None) {
            self.inner.calls.lock().remove(&id);
            return Err(e);
        }
        let this = self.clone();
        Ok(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(ServiceError::Unavailable(
                    "the node dropped the call while shutting down".into(),
                )),
                Err(_) => {
                    this.inner.calls.lock().remove(&id);
                    Err(this.reject(ServiceError::Timeout(timeout.as_millis() as u64), "timeout"))
                }
            }
        }
        .boxed())
    }

    /// [`Router::remote`], waiting out a refusal of this node's own (a key group moving) for a
    /// request taken here (`forwarded`: `None`): `Ok(None)` then, to route it again.
    #[allow(clippy::type_complexity)]
    async fn route_again(
        &self,
        kg: u32,
        forwarded: Option<u64>,
        reroute: &mut Reroute,
    ) -> Result<Option<Option<(u64, String, u64)>>, ServiceError> {
        self.wait_lease(kg).await;
        match self.remote(kg, forwarded) {
            Err(e)
                if forwarded.is_none()
                    && reroute
                        .again(self, kg, self.placement().kg_version(kg), &e)
                        .await =>
            {
                Ok(None)
            }
            r => r.map(Some),
        }
    }

    /// The owner to forward key group `kg` to, with the ownership version it owns it at
    /// (`None`: this node serves it). A request that was already forwarded here
    /// (`forwarded`: the ownership version the sender routed by) is not forwarded again: it
    /// is refused with [`ServiceError::NotOwner`], and the sender routes it again.
    fn remote(
        &self,
        kg: u32,
        forwarded: Option<u64>,
    ) -> Result<Option<(u64, String, u64)>, ServiceError> {
        let p = &self.inner.placement;
        if p.is_moving(kg) {
            return Err(self.reject(
                ServiceError::NotOwner {
                    key_group: kg,
                    version: p.kg_version(kg),
                    message: format!(
                        "key group {kg} is moving to another node (its requests wait until the move is done); retry"
                    ),
                },
                "moving",
            ));
        }
        match p.route(kg) {
            Route::Local => match p.lease_refusal(kg) {
                None => Ok(None),
                Some(why) => Err(self.reject(ServiceError::Unavailable(why), "lease")),
            },
            Route::Remote { node, .. } if forwarded.is_some() => {
                let (theirs, mine) = (forwarded.unwrap_or(0), p.kg_version(kg));
                let message = if theirs > mine {
                    format!(
                        "a node forwarded key group {kg} here at ownership version {theirs}, but this node has applied only version {mine} (node {node} owns it there; ownership is changing); retry"
                    )
                } else {
                    format!(
                        "a node forwarded key group {kg} here at ownership version {theirs}, but node {node} owns it at version {mine} (ownership is changing); retry"
                    )
                };
                Err(self.reject(
                    ServiceError::NotOwner {
                        key_group: kg,
                        version: mine,
                        message,
                    },
                    "not_owner",
                ))
            }
            Route::Remote { node, addr } => Ok(Some((node, addr, p.kg_version(kg)))),
            Route::Unavailable(why) => Err(self.reject(ServiceError::Unavailable(why), "no_owner")),
        }
    }

    /// Pops the next record of an egress topic: this node's first, then (unless the request
    /// came from a peer) the peers' that own key groups. Each record is popped once, where it
    /// was produced, so a topic read from any node yields every record once.
    pub(crate) async fn pop_egress(&self, topic: &str) -> Option<crate::egress::Read> {
        if let Some(v) = self.pop_local_egress(topic).await {
            return Some(v);
        }
        for (node, addr) in self.inner.placement.producers() {
            if let Some(v) =
                crate::mesh::pop_remote_egress(&self.inner.placement, node, &addr, topic).await
            {
                return Some(v);
            }
        }
        None
    }

    /// Pops the next record of an egress topic produced here, answered once its removal is
    /// committed. A record whose key group leaves this node first is not read here (its new
    /// owner has it): the next one is tried, a few times.
    pub(crate) async fn pop_local_egress(&self, topic: &str) -> Option<crate::egress::Read> {
        for _ in 0..4 {
            let p = self.inner.egress.pop(topic)?;
            if p.waits() {
                self.want_commit();
            }
            if let Some(v) = p.settled().await {
                return Some(v);
            }
        }
        None
    }

    /// Which node owns which key group.
    pub(crate) fn placement(&self) -> &Arc<Placement> {
        &self.inner.placement
    }

    /// Whether call `id` of this node still waits for its reply (not answered, not timed out).
    pub(crate) fn call_waiting(&self, id: u64) -> bool {
        self.inner.calls.lock().contains_key(&id)
    }

    /// Completes a waiting call; false if nobody waits for it (any more).
    pub(crate) fn complete_call(&self, id: u64, value: Result<TypedValue, ServiceError>) -> bool {
        match self.inner.calls.lock().remove(&id) {
            Some((_, tx)) => tx.send(value).is_ok(),
            None => false,
        }
    }

    /// Delivers messages another node's shard `from` sent ([`RemoteMessage`]) to addresses
    /// this node owns, to their shards in the stream's order (no admission check, as between
    /// local shards).
    pub(crate) fn deliver_remote(
        &self,
        from: (u64, u32),
        generation: u64,
        batch: Vec<RemoteMessage>,
    ) {
        let mut per: Vec<(Vec<Envelope>, Vec<u64>)> = (0..self.shard_count())
            .map(|_| Default::default())
            .collect();
        for (target, caller, message, version, key, trace) in batch {
            let kg = self.key_group(&target);
            let (envs, versions) = &mut per[self.shard_of(kg)];
            envs.push(Envelope {
                target,
                kg,
                caller,
                message,
                ingress: false,
                key: key.map(String::into_boxed_str),
                trace,
            });
            versions.push(version);
        }
        for (s, (batch, versions)) in per.into_iter().enumerate() {
            if !batch.is_empty() {
                self.shards()[s].do_send(Deliver {
                    versions,
                    batch,
                    from: None,
                    remote: Some(from),
                    generation,
                    ack: None,
                });
            }
        }
    }

    /// Another node's shard `from` cut `epoch`: every local shard learns it, behind what
    /// that shard sent before.
    pub(crate) fn remote_marker(&self, from: (u64, u32), generation: u64, epoch: u64) {
        for s in self.shards() {
            s.do_send(RemoteMarker {
                from,
                epoch,
                generation,
            });
        }
    }

    /// Delivers messages produced inside the mesh to another shard (no admission check:
    /// refusing them could deadlock a cycle of functions).
    pub(crate) fn deliver_internal(
        &self,
        shard: usize,
        from: Option<usize>,
        generation: u64,
        batch: Vec<Envelope>,
    ) {
        self.shards()[shard].do_send(Deliver {
            versions: Vec::new(),
            batch,
            from,
            remote: None,
            generation,
            ack: None,
        });
    }

    /// The next shard generation (a rollback's).
    pub(crate) fn next_generation(&self) -> u64 {
        self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Ingress is refused (with the reason) while the node rolls back, or admitted again.
    pub(crate) fn set_rolling_back(&self, reason: Option<String>) {
        self.inner.rolling_back.set(reason);
    }

    /// Fails every call waiting for a reply (a rollback: the replies of calls whose messages
    /// are replayed find nobody waiting; their callers retry with their keys).
    pub(crate) fn fail_calls(&self, e: &ServiceError) {
        let calls = std::mem::take(&mut *self.inner.calls.lock());
        for (_, (_, tx)) in calls {
            let _ = tx.send(Err(e.clone()));
        }
    }

    /// Fails the calls waiting for a reply from key groups `kgs` (they moved to another node:
    /// the reply goes to the new owner, which holds no waiter for it).
    pub(crate) fn fail_calls_of(&self, kgs: &rustc_hash::FxHashSet<u32>, e: &ServiceError) {
        let gone: Vec<_> = {
            let mut calls = self.inner.calls.lock();
            let ids: Vec<u64> = calls
                .iter()
                .filter(|(_, (kg, _))| kgs.contains(kg))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| calls.remove(&id)).collect()
        };
        for (_, tx) in gone {
            let _ = tx.send(Err(e.clone()));
        }
    }

    /// The stored states of an address (from its shard's cache or sled).
    pub async fn get_state(
        &self,
        address: Address,
    ) -> Result<Vec<(String, TypedValue, u64)>, ServiceError> {
        self.get_state_routed(address, None).await
    }

    /// [`Router::get_state`] for a read another node may have forwarded here (`forwarded`:
    /// the ownership version it routed by); a read of this node's own is routed again while
    /// a node that is not the owner refuses it.
    pub(crate) async fn get_state_routed(
        &self,
        address: Address,
        forwarded: Option<u64>,
    ) -> Result<Vec<(String, TypedValue, u64)>, ServiceError> {
        if self.inner.registry.get(&address.typ).is_none() {
            return Err(ServiceError::UnknownFunction(address.typ.to_string()));
        }
        let kg = self.key_group(&address);
        let mut reroute = Reroute::new();
        loop {
            let Some(route) = self.route_again(kg, forwarded, &mut reroute).await? else {
                continue;
            };
            let Some((node, addr, v)) = route else { break };
            let p = &self.inner.placement;
            match crate::mesh::forward_get_state(p, node, &addr, &address, v).await {
                Err(e) if forwarded.is_none() && reroute.again(self, kg, v, &e).await => {}
                r => return r,
            }
        }
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

/// A call id: the node id's low 16 bits, then a counter that starts at the node's start time.
const CALL_COUNTER_BITS: u32 = 48;
const CALL_COUNTER_MASK: u64 = (1 << CALL_COUNTER_BITS) - 1;

/// How long a request refused by a node that does not own its key group keeps being routed
/// again before the refusal reaches the client.
const REROUTE_FOR: Duration = Duration::from_secs(3);

/// Routing a forwarded request again after a node that does not own its key group refused it
/// (nothing was applied there, so sending it again is safe with or without an idempotency
/// key).
#[derive(Clone)]
struct Reroute {
    deadline: Option<std::time::Instant>,
}

impl Reroute {
    fn new() -> Self {
        Reroute { deadline: None }
    }

    /// Whether to route again after `e` (a request for key group `kg` forwarded at ownership
    /// version `used`): see [`crate::mesh::Placement::settle`]. Gives up after
    /// [`REROUTE_FOR`].
    async fn again(&mut self, router: &Router, kg: u32, used: u64, e: &ServiceError) -> bool {
        let ServiceError::NotOwner { version, .. } = e else {
            return false;
        };
        let deadline = *self
            .deadline
            .get_or_insert_with(|| std::time::Instant::now() + REROUTE_FOR);
        if router.inner.closed.load(Ordering::Relaxed) {
            return false;
        }
        router.inner.metrics.rerouted.inc();
        router
            .placement()
            .settle(kg, used, *version, deadline)
            .await
    }

    /// [`Reroute::again`] for a batch refused because of key group `key_group` (named by the
    /// refusal), routed by this node's current table.
    async fn again_batch(&mut self, router: &Router, e: &ServiceError) -> bool {
        let ServiceError::NotOwner { key_group, .. } = e else {
            return false;
        };
        let used = router.placement().kg_version(*key_group);
        self.again(router, *key_group, used, e).await
    }
}

/// How long a request for a key group this node owns waits for a lapsed ownership lease to be
/// renewed before it is refused (one renewal period of the default `lease_ms`).
const LEASE_GRACE: Duration = Duration::from_millis(250);

/// A message of a batch: its target, value and idempotency key.
type BatchMessage = (Address, TypedValue, Option<String>);

/// Longest accepted idempotency key.
const MAX_KEY_BYTES: usize = 256;

fn validate_key(key: Option<String>) -> Result<Option<String>, ServiceError> {
    match key {
        Some(k) if k.is_empty() => Ok(None),
        Some(k) if k.len() > MAX_KEY_BYTES || k.chars().any(char::is_control) => {
            Err(ServiceError::InvalidArgument(format!(
                "idempotency key: expected at most {MAX_KEY_BYTES} bytes without control characters, found {} bytes",
                k.len()
            )))
        }
        k => Ok(k),
    }
}
