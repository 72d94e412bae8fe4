//! A shard: the owner of a set of key groups on one actix arbiter thread.
//!
//! The shard keeps, per active address, an explicit FIFO inbox, the state cache with dirty
//! tracking, and the address's instance actor. It hands an instance at most one batch at a
//! time (FIFO per address, one batch in flight), applies the effects the instance returns
//! (messages, delayed messages, egress, state), retries failed invocations with backoff and
//! dead-letters messages that keep failing. Inboxes live here and not in actix mailboxes so
//! that pending messages stay visible to checkpoints (DESIGN.md).
//!
//! Invariants:
//! - an address has at most one batch in flight; messages to it are processed in arrival
//!   order (per sender);
//! - a passivated address has had its dirty state written to sled first, so passivation
//!   never loses state;
//! - a failed invocation leaves no trace (its state changes and effects are undone).

mod timers;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use base64::Engine;
use prometheus::local::LocalHistogram;
use rustc_hash::FxHashMap;
use slab::Slab;
use statemesh_sdk::{Address, Effects, StateSlot, TypedValue, DEAD_LETTERS_TOPIC};
use tokio::sync::oneshot;

use crate::config::NodeConfig;
use crate::error::ServiceError;
use crate::instance::{Instance, Invoke};
use crate::registry::{FunctionEntry, FunctionKind};
use crate::router::{Envelope, Router};
use crate::store::{Store, WriteBatch};
use timers::Timers;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Adds slots for states registered since the address was activated (remote functions
/// negotiate their states), loading their stored values.
fn sync_state(store: &Store, slot: &Slot, state: &mut Vec<StateSlot>) {
    let specs = slot.entry.specs();
    if specs.len() == state.len()
        && specs
            .iter()
            .zip(state.iter())
            .all(|(a, b)| a.name == b.name && a.typename == b.typename)
    {
        return;
    }
    for spec in specs.iter() {
        match state.iter_mut().find(|s| s.name == spec.name) {
            Some(s) => {
                s.typename = spec.typename.clone();
                s.expiration = spec.expiration;
            }
            None => match store.load_state(slot.kg, &slot.address, std::slice::from_ref(spec)) {
                Ok(mut loaded) => state.append(&mut loaded),
                Err(e) => {
                    tracing::error!(address = %slot.address, state = %spec.name, error = %e, "cannot load state; sending it as absent");
                    state.push(StateSlot::empty(spec));
                }
            },
        }
    }
}

/// Where the states of an address (name, value, expires_at_ms) are sent.
pub(crate) type StateReply = oneshot::Sender<Result<Vec<(String, TypedValue, u64)>, ServiceError>>;

/// A queued message of an address.
pub(crate) struct Pending {
    pub caller: Option<Address>,
    pub message: TypedValue,
    pub ingress: bool,
    /// Failed attempts so far.
    pub attempts: u32,
}

struct Slot {
    address: Address,
    kg: u32,
    inbox: VecDeque<Pending>,
    /// `None` while lent to the instance with a batch.
    state: Option<Vec<StateSlot>>,
    /// The instance actor; started when the address has work, stopped after it has been
    /// idle for `instance_linger_ms` (its state stays cached here until passivation).
    instance: Option<Addr<Instance>>,
    entry: Arc<FunctionEntry>,
    in_flight: bool,
    retry_wait: bool,
    /// The inbox reached the remote function's `maxNumBatchRequests` (ingress is held back).
    saturated: bool,
    in_dirty_list: bool,
    last_used_ms: u64,
    readers: Vec<StateReply>,
}

impl Slot {
    fn idle(&self) -> bool {
        !self.in_flight && !self.retry_wait && self.inbox.is_empty()
    }
}

/// Messages for the shard.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Deliver {
    pub batch: Vec<Envelope>,
}

/// The result of one batch, from the instance.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct InvokeDone {
    pub slot: usize,
    pub batch: Vec<Pending>,
    pub processed: usize,
    pub state: Vec<StateSlot>,
    pub effects: Effects,
    /// The invocation at `processed` failed (embedded): retry it, then dead-letter it.
    pub failure: Option<String>,
    /// The whole batch failed for good (remote, after its call budget): dead-letter it.
    pub batch_failure: Option<String>,
    /// The function registered more states: send the same batch again with them.
    pub renegotiate: bool,
    /// Failed remote call attempts behind this result.
    pub remote_failed_attempts: u32,
}

/// Read the states of an address.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct GetState {
    pub address: Address,
    pub kg: u32,
    pub reply: StateReply,
}

/// How much work is left (for draining on shutdown).
#[derive(Message)]
#[rtype(result = "usize")]
pub(crate) struct Outstanding;

/// Write everything dirty to sled now.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub(crate) struct FlushNow;

/// The construction parameters of a shard.
pub(crate) struct ShardOptions {
    pub index: usize,
    pub router: Router,
    pub store: Store,
    pub config: Arc<NodeConfig>,
}

/// A shard actor.
pub(crate) struct Shard {
    index: usize,
    router: Router,
    store: Store,
    config: Arc<NodeConfig>,
    slots: Slab<Slot>,
    by_addr: FxHashMap<Address, usize>,
    ready: Vec<usize>,
    dirty: Vec<usize>,
    outgoing: Vec<Vec<Envelope>>,
    timers: Timers,
    pending_writes: WriteBatch,
    max_active: usize,
    invocation_hist: std::rc::Rc<LocalHistogram>,
    invocations: u64,
    invocation_errors: u64,
    me: Option<Addr<Shard>>,
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.me = Some(ctx.address());
        let kgs: Vec<u32> = self.owned_key_groups().collect();
        if let Err(e) = self.timers.load(&self.store, kgs.into_iter()) {
            tracing::error!(shard = self.index, error = %e, "cannot load delayed messages; they stay in sled until the next start");
        }
        ctx.run_interval(Duration::from_millis(5), |act, _| act.fire_timers());
        ctx.run_interval(
            Duration::from_millis(self.config.flush_interval_ms),
            |act, _| {
                act.flush();
                act.fold_metrics();
            },
        );
        let sweep_ms = self
            .config
            .idle_timeout_ms
            .min(self.config.instance_linger_ms)
            .clamp(10, 1000);
        ctx.run_interval(Duration::from_millis(sweep_ms), |act, _| {
            act.passivate_idle();
        });
    }
}

impl Shard {
    pub(crate) fn new(o: ShardOptions) -> Self {
        let n = o.router.shard_count();
        let max_active = o.config.max_active_instances.div_ceil(n).max(1);
        let hist = o.router.metrics().invocation_seconds.local();
        Shard {
            index: o.index,
            outgoing: (0..n).map(|_| Vec::new()).collect(),
            router: o.router,
            store: o.store,
            config: o.config,
            slots: Slab::new(),
            by_addr: FxHashMap::default(),
            ready: Vec::new(),
            dirty: Vec::new(),
            timers: Timers::default(),
            pending_writes: WriteBatch::default(),
            max_active,
            invocation_hist: std::rc::Rc::new(hist),
            invocations: 0,
            invocation_errors: 0,
            me: None,
        }
    }

    fn owned_key_groups(&self) -> impl Iterator<Item = u32> + '_ {
        let n = self.router.shard_count() as u32;
        (self.index as u32..self.config.key_groups).step_by(n as usize)
    }

    /// The slot of an address, activating it (loading its state) if needed.
    fn activate(
        &mut self,
        address: &Address,
        kg: u32,
        entry: &Arc<FunctionEntry>,
    ) -> Result<usize, String> {
        if let Some(&i) = self.by_addr.get(address) {
            return Ok(i);
        }
        // Make room first, so the address being activated cannot be the one evicted.
        if self.slots.len() >= self.max_active {
            self.evict_lru();
        }
        let state = self
            .store
            .load_state(kg, address, &entry.specs())
            .map_err(|e| e.to_string())?;
        let i = self.slots.insert(Slot {
            address: address.clone(),
            kg,
            inbox: VecDeque::new(),
            state: Some(state),
            instance: None,
            entry: entry.clone(),
            in_flight: false,
            retry_wait: false,
            saturated: false,
            in_dirty_list: false,
            last_used_ms: now_ms(),
            readers: Vec::new(),
        });
        self.by_addr.insert(address.clone(), i);
        Ok(i)
    }

    /// Queues a message for a local address.
    fn enqueue(&mut self, env: Envelope) {
        let Some(entry) = self.router.registry().get(&env.target.typ) else {
            if env.ingress {
                self.router.release(self.index, 1);
            }
            let err = format!("unknown function type {:?}", env.target.typ.to_string());
            self.dead_letter(&env.target, env.caller.as_ref(), &env.message, &err, 0);
            return;
        };
        let i = match self.activate(&env.target, env.kg, &entry) {
            Ok(i) => i,
            Err(e) => {
                // Local storage is broken for this address: running the function on absent
                // state would corrupt it, so the message goes to the dead letters (with the
                // reason) instead of being applied or silently dropped.
                tracing::error!(address = %env.target, error = %e, "cannot load state; message dead-lettered");
                if env.ingress {
                    self.router.release(self.index, 1);
                }
                self.dead_letter(
                    &env.target,
                    env.caller.as_ref(),
                    &env.message,
                    &format!("cannot load state: {e}"),
                    0,
                );
                return;
            }
        };
        let slot = &mut self.slots[i];
        slot.inbox.push_back(Pending {
            caller: env.caller,
            message: env.message,
            ingress: env.ingress,
            attempts: 0,
        });
        if !slot.in_flight && !slot.retry_wait && slot.inbox.len() == 1 {
            self.ready.push(i);
        }
        if let FunctionKind::Remote(r) = &slot.entry.kind {
            let limit = r.max_batch();
            if limit > 0 && !slot.saturated && slot.inbox.len() >= limit {
                slot.saturated = true;
                self.router
                    .set_saturated(self.index, &slot.address, true, limit);
            }
        }
    }

    fn dispatch_ready(&mut self) {
        let now = now_ms();
        let store = &self.store;
        while let Some(i) = self.ready.pop() {
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            if slot.in_flight || slot.retry_wait || slot.inbox.is_empty() {
                continue;
            }
            let cap = match &slot.entry.kind {
                FunctionKind::Remote(r) if r.max_batch() > 0 => r.max_batch(),
                FunctionKind::Remote(_) => usize::MAX,
                FunctionKind::Embedded(_) => self.config.max_batch,
            };
            let n = slot.inbox.len().min(cap);
            // Taking the whole inbox hands its buffer to the batch: an idle address keeps no
            // queue capacity.
            let batch: Vec<Pending> = if n == slot.inbox.len() {
                Vec::from(std::mem::take(&mut slot.inbox))
            } else {
                slot.inbox.drain(..n).collect()
            };
            if slot.saturated && slot.inbox.len() < cap {
                slot.saturated = false;
                self.router
                    .set_saturated(self.index, &slot.address, false, cap);
            }
            let mut state = slot
                .state
                .take()
                .expect("state is home when nothing is in flight");
            sync_state(store, slot, &mut state);
            slot.in_flight = true;
            slot.last_used_ms = now;
            if matches!(slot.entry.kind, FunctionKind::Remote(_)) {
                self.router
                    .metrics()
                    .remote_batch_size
                    .observe(batch.len() as f64);
            }
            let (me, hist) = (&self.me, &self.invocation_hist);
            let instance = slot.instance.get_or_insert_with(|| {
                let shard = me.clone().expect("started");
                Instance::new(
                    slot.address.clone(),
                    slot.entry.clone(),
                    i,
                    shard,
                    hist.clone(),
                )
                .start()
            });
            instance.do_send(Invoke {
                batch,
                state,
                now_ms: now,
            });
        }
    }

    /// Routes a message produced by an invocation or a timer.
    fn route(&mut self, target: Address, caller: Option<Address>, message: TypedValue) {
        if self.router.is_reply_address(&target) {
            if !self.router.complete_call(&target, Ok(message)) {
                tracing::debug!(call = %target, "reply arrived after its caller stopped waiting");
            }
            return;
        }
        let kg = self.router.key_group(&target);
        let shard = self.router.shard_of(kg);
        let env = Envelope {
            target,
            kg,
            caller,
            message,
            ingress: false,
        };
        if shard == self.index {
            self.enqueue(env);
        } else {
            self.outgoing[shard].push(env);
        }
    }

    fn send_outgoing(&mut self) {
        for s in 0..self.outgoing.len() {
            if !self.outgoing[s].is_empty() {
                let batch = std::mem::take(&mut self.outgoing[s]);
                self.router.deliver_internal(s, batch);
            }
        }
    }

    fn dead_letter(
        &mut self,
        target: &Address,
        caller: Option<&Address>,
        message: &TypedValue,
        error: &str,
        attempts: u32,
    ) {
        tracing::warn!(address = %target, typename = message.typename(), attempts, error, "message dead-lettered");
        self.router.metrics().dead_letters.inc();
        if let Some(c) = caller.filter(|c| self.router.is_reply_address(c)) {
            // A waiting caller learns now rather than at its timeout.
            // `attempts` counts the node's own retries (embedded functions); a remote
            // function's error already says how many calls were tried.
            let tries = match attempts {
                0 => String::new(),
                1 => "after 1 attempt; ".to_string(),
                n => format!("after {n} attempts; "),
            };
            let e = ServiceError::FunctionFailed(format!(
                "{target}: {error} ({tries}the message is in {DEAD_LETTERS_TOPIC})"
            ));
            self.router.complete_call(c, Err(e));
        }
        let record = serde_json::json!({
            "address": target.to_string(),
            "caller": caller.map(|c| c.to_string()),
            "typename": message.typename(),
            "value_base64": base64::engine::general_purpose::STANDARD.encode(message.value()),
            "error": error,
            "attempts": attempts,
        });
        self.router.egress().publish(
            DEAD_LETTERS_TOPIC,
            TypedValue::new("statemesh/DeadLetter", record.to_string().into_bytes()),
        );
    }

    fn apply_effects(&mut self, sender: &Address, sender_kg: u32, effects: Effects) {
        for (target, message) in effects.messages {
            self.route(target, Some(sender.clone()), message);
        }
        let now = now_ms();
        for d in effects.delayed {
            if let Err(e) =
                self.timers
                    .schedule(sender, sender_kg, now, d.clone(), &mut self.pending_writes)
            {
                self.dead_letter(&d.target, Some(sender), &d.message, &e, 0);
            }
        }
        for token in effects.cancellations {
            self.timers.cancel(sender, &token, &mut self.pending_writes);
        }
        for (topic, value) in effects.egress {
            self.router.egress().publish(&topic, value);
        }
    }

    fn fire_timers(&mut self) {
        let due = self.timers.take_due(now_ms(), &mut self.pending_writes);
        if due.is_empty() {
            return;
        }
        for t in due {
            self.route(t.target, Some(t.sender), t.message);
        }
        self.send_outgoing();
        self.dispatch_ready();
    }

    fn mark_dirty(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if !slot.in_dirty_list
            && slot
                .state
                .as_ref()
                .is_some_and(|s| s.iter().any(|v| v.dirty))
        {
            slot.in_dirty_list = true;
            self.dirty.push(i);
        }
    }

    fn write_slot(batch: &mut WriteBatch, slot: &mut Slot) {
        if let Some(state) = slot.state.as_mut() {
            for v in state.iter_mut().filter(|v| v.dirty) {
                batch.put_state(slot.kg, &slot.address, v);
                v.dirty = false;
            }
        }
    }

    /// Writes dirty state and timer changes to sled in one batch.
    fn flush(&mut self) {
        let mut batch = std::mem::take(&mut self.pending_writes);
        let dirty = std::mem::take(&mut self.dirty);
        for i in dirty {
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            slot.in_dirty_list = false;
            if slot.state.is_none() {
                // Lent to an in-flight batch; it is marked dirty again when it returns.
                continue;
            }
            Self::write_slot(&mut batch, slot);
        }
        if let Err(e) = self.store.write(batch) {
            self.router.metrics().store_errors.inc();
            tracing::error!(shard = self.index, error = %e, "writing local state failed");
        }
    }

    fn passivate(&mut self, i: usize) {
        let mut slot = self.slots.remove(i);
        self.by_addr.remove(&slot.address);
        let mut batch = WriteBatch::default();
        Self::write_slot(&mut batch, &mut slot);
        if let Err(e) = self.store.write(batch) {
            // Keep the instance rather than lose its state.
            self.router.metrics().store_errors.inc();
            tracing::error!(address = %slot.address, error = %e, "cannot write state on passivation; keeping the instance");
            let addr = slot.address.clone();
            let j = self.slots.insert(slot);
            self.by_addr.insert(addr, j);
            return;
        }
        self.router.metrics().passivations.inc();
        // Dropping the slot drops the last `Addr` of the instance actor, which stops it.
    }

    /// Passivates least recently used idle instances down to 90 % of the limit (at least
    /// one below it, to make room for an activation).
    fn evict_lru(&mut self) {
        let target = (self.max_active - self.max_active / 10).min(self.max_active - 1);
        let mut idle: Vec<(u64, usize)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.idle() && s.readers.is_empty())
            .map(|(i, s)| (s.last_used_ms, i))
            .collect();
        idle.sort_unstable();
        let excess = self.slots.len().saturating_sub(target);
        for &(_, i) in idle.iter().take(excess) {
            self.passivate(i);
        }
    }

    fn passivate_idle(&mut self) {
        let now = now_ms();
        let linger_cutoff = now.saturating_sub(self.config.instance_linger_ms);
        for (_, s) in self.slots.iter_mut() {
            if s.instance.is_some() && s.idle() && s.last_used_ms <= linger_cutoff {
                s.instance = None;
            }
        }
        let cutoff = now.saturating_sub(self.config.idle_timeout_ms);
        let idle: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, s)| s.idle() && s.last_used_ms <= cutoff && s.readers.is_empty())
            .map(|(i, _)| i)
            .collect();
        for i in idle {
            self.passivate(i);
        }
    }

    fn fold_metrics(&mut self) {
        let m = self.router.metrics();
        m.invocations.inc_by(std::mem::take(&mut self.invocations));
        m.invocation_errors
            .inc_by(std::mem::take(&mut self.invocation_errors));
        self.invocation_hist.flush();
    }

    fn read_state(&self, slot: &Slot) -> Vec<(String, TypedValue, u64)> {
        let now = now_ms();
        slot.state
            .as_ref()
            .map(|s| {
                s.iter()
                    .filter_map(|v| {
                        v.live_value(now).map(|b| {
                            (
                                v.name.to_string(),
                                TypedValue::new(v.typename.clone(), b.clone()),
                                v.expires_at_ms,
                            )
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Handler<Deliver> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) {
        for env in msg.batch {
            self.enqueue(env);
        }
        self.send_outgoing();
        self.dispatch_ready();
    }
}

impl Handler<InvokeDone> for Shard {
    type Result = ();

    fn handle(&mut self, done: InvokeDone, ctx: &mut Self::Context) {
        let i = done.slot;
        let mut batch = done.batch;
        let (address, kg) = {
            let slot = &mut self.slots[i];
            slot.state = Some(done.state);
            slot.in_flight = false;
            (slot.address.clone(), slot.kg)
        };
        self.invocations += done.processed as u64;
        if done.remote_failed_attempts > 0 {
            self.router
                .metrics()
                .remote_failed_attempts
                .inc_by(u64::from(done.remote_failed_attempts));
        }
        let released = batch[..done.processed].iter().filter(|p| p.ingress).count();
        self.router.release(self.index, released);
        self.apply_effects(&address, kg, done.effects);
        self.mark_dirty(i);

        if done.renegotiate {
            // Same batch again, now with the states the function registered.
            let slot = &mut self.slots[i];
            for p in batch.into_iter().rev() {
                slot.inbox.push_front(p);
            }
        } else if let Some(reason) = done.batch_failure {
            self.invocation_errors += 1;
            for p in batch {
                self.invocations += 1;
                if p.ingress {
                    self.router.release(self.index, 1);
                }
                self.dead_letter(&address, p.caller.as_ref(), &p.message, &reason, 0);
            }
        } else if let Some(error) = done.failure {
            self.invocation_errors += 1;
            let mut rest: Vec<Pending> = batch.drain(done.processed..).collect();
            let failed = &mut rest[0];
            failed.attempts += 1;
            if failed.attempts >= self.config.retry.max_attempts {
                let failed = rest.remove(0);
                self.invocations += 1;
                if failed.ingress {
                    self.router.release(self.index, 1);
                }
                self.dead_letter(
                    &address,
                    failed.caller.as_ref(),
                    &failed.message,
                    &error,
                    failed.attempts,
                );
            } else {
                let backoff = self.config.retry.backoff(failed.attempts);
                tracing::info!(%address, attempt = failed.attempts, ?backoff, error, "invocation failed; retrying");
                self.slots[i].retry_wait = true;
                ctx.run_later(backoff, move |act, _| {
                    if let Some(slot) = act.slots.get_mut(i) {
                        slot.retry_wait = false;
                        act.ready.push(i);
                        act.dispatch_ready();
                    }
                });
            }
            let slot = &mut self.slots[i];
            for p in rest.into_iter().rev() {
                slot.inbox.push_front(p);
            }
        }

        let slot = &mut self.slots[i];
        if !slot.readers.is_empty() {
            let readers = std::mem::take(&mut slot.readers);
            let values = self.read_state(&self.slots[i]);
            for r in readers {
                let _ = r.send(Ok(values.clone()));
            }
        }
        let slot = &self.slots[i];
        if !slot.inbox.is_empty() && !slot.retry_wait {
            self.ready.push(i);
        }
        self.send_outgoing();
        self.dispatch_ready();
    }
}

impl Handler<GetState> for Shard {
    type Result = ();

    fn handle(&mut self, msg: GetState, _: &mut Self::Context) {
        if let Some(&i) = self.by_addr.get(&msg.address) {
            let slot = &mut self.slots[i];
            if slot.state.is_none() {
                slot.readers.push(msg.reply);
            } else {
                let _ = msg.reply.send(Ok(self.read_state(&self.slots[i])));
            }
            return;
        }
        let now = now_ms();
        let r = self
            .store
            .scan_state(msg.kg, &msg.address)
            .map(|v| {
                v.into_iter()
                    .filter(|(_, _, exp)| *exp == 0 || now < *exp)
                    .collect()
            })
            .map_err(|e| ServiceError::Internal(e.to_string()));
        let _ = msg.reply.send(r);
    }
}

impl Handler<Outstanding> for Shard {
    type Result = usize;

    fn handle(&mut self, _: Outstanding, _: &mut Self::Context) -> usize {
        self.slots
            .iter()
            .map(|(_, s)| s.inbox.len() + usize::from(s.in_flight))
            .sum()
    }
}

impl Handler<FlushNow> for Shard {
    type Result = Result<(), String>;

    fn handle(&mut self, _: FlushNow, _: &mut Self::Context) -> Self::Result {
        let all: Vec<usize> = self.slots.iter().map(|(i, _)| i).collect();
        for i in all {
            self.mark_dirty(i);
        }
        self.flush();
        self.fold_metrics();
        self.store.flush().map_err(|e| e.to_string())
    }
}

/// Node-wide gauges, computed on demand from all shards.
#[derive(Message)]
#[rtype(result = "(usize, usize, usize)")]
pub(crate) struct Gauges;

impl Handler<Gauges> for Shard {
    type Result = MessageResult<Gauges>;

    fn handle(&mut self, _: Gauges, _: &mut Self::Context) -> Self::Result {
        self.fold_metrics();
        let queued = self.slots.iter().map(|(_, s)| s.inbox.len()).sum();
        MessageResult((self.slots.len(), queued, self.timers.len()))
    }
}
