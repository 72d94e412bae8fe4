//! A shard: the owner of a set of key groups on one actix arbiter thread.
//!
//! The shard keeps, per active address, an explicit FIFO inbox, the state cache with dirty
//! tracking, and the address's instance actor. It hands an instance at most one batch at a
//! time (FIFO per address, one batch in flight), applies the effects the instance returns
//! (messages, delayed messages, egress, state), retries failed invocations with backoff and
//! dead-letters messages that keep failing. Inboxes live here and not in actix mailboxes so
//! that pending messages stay visible to checkpoints (DESIGN.md).
//!
//! Epochs (`checkpoint/OVERVIEW.md`): on `Barrier(e)` — or the first `Marker(e)` of another
//! shard — the shard cuts epoch `e` between two messages: the state changes since the last cut
//! (plus timer and idempotency-record changes) become the epoch's delta, and its unprocessed
//! messages (inboxes, inputs of in-flight batches, and messages other shards sent before their
//! own cut that arrive after this one) its pending messages. The cut is sent to the epoch
//! driver, which writes it to blob storage and, after the commit, to sled. Outputs of an epoch
//! (`Send` acknowledgements, `Call` replies, egress records) are held until it commits.
//!
//! Invariants:
//! - an address has at most one batch in flight; messages to it are processed in arrival
//!   order (per sender);
//! - sled holds committed epochs only; an address is passivated only once every change of
//!   its state is applied to sled, so passivation never loses state;
//! - nothing an epoch produced leaves the node before the epoch commits (with checkpoints on);
//! - a failed invocation leaves no trace (its state changes and effects are undone).

mod timers;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use base64::Engine;
use prometheus::local::LocalHistogram;
use rustc_hash::FxHashMap;
use rustc_hash::FxHashSet;
use slab::Slab;
use statemesh_sdk::{Address, Effects, StateSlot, TypedValue, DEAD_LETTERS_TOPIC};
use tokio::sync::oneshot;

use crate::checkpoint::barrier::{Arrival, Barrier as Cuts};
use crate::checkpoint::driver::{DriverEvent, ShardCut};
use crate::checkpoint::format::PendingMessage;
use crate::checkpoint::idempotency::{self, IdempotencyTable, Outcome, Record};
use crate::config::NodeConfig;
use crate::error::ServiceError;
use crate::instance::{Instance, Invoke};
use crate::registry::{FunctionEntry, FunctionKind};
use crate::router::{parse_reply_id, AckTx, Envelope, Router};
use crate::store::{idempotency_key, pending_key, Change, Seq, Store, WriteBatch};
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
    /// Its pending message record (`store::pending_key`), once a cut wrote one: deleted in
    /// the epoch that processes it.
    pub record: Option<Seq>,
    /// A cut listed it among its pending messages (the next cut that finds it writes its
    /// record instead).
    pub seen: bool,
    /// The span that sent it, if it is traced (`crate::telemetry`).
    pub trace: crate::telemetry::Trace,
}

/// A message of a remote batch in flight, as the cuts see it.
struct InFlight {
    message: PendingMessage,
    record: Option<Seq>,
    seen: bool,
}

struct Slot {
    address: Address,
    kg: u32,
    inbox: VecDeque<Pending>,
    /// `None` while lent to the instance with a batch.
    state: Option<Vec<StateSlot>>,
    /// The instance actor; started when the address first has work, kept while the state is
    /// cached here (stopped earlier only if `instance_linger_ms` is set and it idles that
    /// long).
    instance: Option<Addr<Instance>>,
    entry: Arc<FunctionEntry>,
    in_flight: bool,
    retry_wait: bool,
    /// The inbox reached the remote function's `maxNumBatchRequests` (ingress is held back).
    saturated: bool,
    in_dirty_list: bool,
    last_used_ms: u64,
    readers: Vec<StateReply>,
    /// The newest epoch holding a change of this address's state (passivation waits until
    /// it is applied to sled).
    change_epoch: u64,
    /// A remote batch in flight, as pending messages (part of every cut while it runs).
    in_flight_copy: Option<Vec<InFlight>>,
    /// Listed in `busy` (has or had queued or in-flight messages since the last cut).
    in_busy_list: bool,
    /// The last cut that listed this slot's pending messages.
    cut_mark: u64,
    /// Ingress messages in the batch in flight (released from the ingress count when it
    /// returns, or by a rollback).
    in_flight_ingress: usize,
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
    /// The sending shard (`None`: ingress or recovery).
    pub from: Option<usize>,
    /// The sending shard of another node (messages between functions across nodes).
    pub remote: Option<(u64, u32)>,
    /// The sending shard's generation (a batch a shard sent before a rollback is dropped).
    pub generation: u64,
    /// Acknowledge once the epoch that received the batch commits.
    pub ack: Option<AckTx>,
    /// From another node: the ownership version of each message's key group in the sender's
    /// table (same order; empty otherwise).
    pub versions: Vec<u64>,
}

/// How often a shard looks for delayed messages due and for messages held until this node's
/// table catches up, at most (ms): a delayed message fires up to this late.
const SHARD_TICK_MS: u64 = 5;

/// How often it looks at least (ms): while it holds messages of neither kind, or only delayed
/// messages due later, its thread wakes once a second rather than 200 times (what adds one
/// due sooner makes it look sooner, through [`TickSoon`]: a schedule, key groups loaded at
/// start, at a rollback or when gained, a message held for the table).
const SHARD_IDLE_TICK_MS: u64 = 1_000;

/// Look again by the earliest delayed message's due time (the shard's own message, sent when it
/// gets one due before its next look).
#[derive(Message)]
#[rtype(result = "()")]
struct TickSoon;

/// Cut epoch `epoch` (from the epoch driver).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Barrier {
    pub epoch: u64,
}

/// Shard `from` has cut `epoch`; everything it sent before is already here.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Marker {
    pub from: usize,
    pub epoch: u64,
    /// The sending shard's generation.
    pub generation: u64,
}

/// Another node's shard `from` has cut `epoch`; everything it sent before is already here.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RemoteMarker {
    pub from: (u64, u32),
    pub epoch: u64,
    pub generation: u64,
}

/// Roll back to the last committed epoch (the epoch driver abandoned the epochs after it):
/// everything since is dropped — state changes, queued and in-flight messages, held
/// acknowledgements, replies and egress (their waiters get an error) — and the shard goes on
/// from the local store (at the committed epoch), cutting epochs after `base`. The pending
/// messages of the committed epoch are delivered again afterwards.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Rollback {
    /// The last epoch cut before the rollback (numbers are not reused).
    pub base: u64,
    /// The shard's new generation.
    pub generation: u64,
    /// The committed epoch rolled back to (for messages).
    pub committed: u64,
    /// This shard's pending messages of the committed epoch, to process first.
    pub pending: Vec<Envelope>,
    /// The participants of the cluster's epochs until the next rollback, with their shards
    /// (empty: this node alone).
    pub members: Arc<Vec<(u64, u32)>>,
}

/// A live move is done (the leader's live `Resume`; nobody rolled back): the key groups the
/// shard stopped at its cut of `at` are dropped here and, where this node serves them now,
/// loaded again from sled (which holds them at `at`: read from blob storage if they are new
/// here); their messages pending at `at` (`pending`, from blob storage) are processed first,
/// then the ones the shard kept for them since its cut. The participants of the epochs may
/// have changed (a member that owns nothing joined them).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Reconfigure {
    /// The epoch the key groups stopped at.
    pub at: u64,
    /// The shards' generation it was sent for (a rollback since makes it stale).
    pub generation: u64,
    /// The pending messages at `at` of the stopped key groups this node serves now, of this
    /// shard.
    pub pending: Vec<Envelope>,
    /// The participants from now on, with their shards (empty: this node alone).
    pub members: Arc<Vec<(u64, u32)>>,
}

/// Epoch `epoch` committed: release what it holds.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Committed {
    pub epoch: u64,
}

/// An output waiting for its epoch to commit.
enum Held {
    Ack(AckTx),
    Reply(u64, Result<TypedValue, ServiceError>),
    Egress(String, TypedValue, Option<Vec<u8>>),
}

/// An open cut: waiting for other shards' markers and for embedded batches that were in
/// flight at the cut to hand back their inputs.
struct Cut {
    epoch: u64,
    ops: Vec<Change>,
    /// (target, order: 0 in flight, 1 inbox, 2 arrived across the cut; kg; message)
    pending: Vec<(Arc<str>, u8, u32, PendingMessage)>,
    /// Embedded batches in flight at the cut, by slot, with the first record number kept for
    /// their inputs (they come before the inbox's).
    awaiting: FxHashMap<usize, u64>,
    markers_done: bool,
    /// Pending message records written in `ops`.
    recorded: u64,
}

fn pending_message(target: &Address, caller: Option<&Address>, m: &TypedValue) -> PendingMessage {
    PendingMessage {
        target: target.to_text(),
        caller: caller.map(Address::to_text).unwrap_or_default(),
        typename: m.typename().to_string(),
        value: m.value().to_vec(),
        has_value: m.has_value(),
        idempotency_key: String::new(),
    }
}

/// A message not yet at its address's inbox, as pending at a cut: with its idempotency key,
/// which has not been checked yet (its check, and the key's record, come when it is queued;
/// listed without it, a replay after a rollback or a move applied it even if the key's first
/// message had been applied meanwhile).
fn pending_envelope(env: &Envelope) -> PendingMessage {
    PendingMessage {
        idempotency_key: env.key.as_deref().unwrap_or_default().to_string(),
        ..pending_message(&env.target, env.caller.as_ref(), &env.message)
    }
}

/// The result of one batch, from the instance.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct InvokeDone {
    pub slot: usize,
    /// The generation of the shard that started the instance.
    pub generation: u64,
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

/// The generation shards start in (each rollback gives them a newer one). Not 0: a
/// participant's shard generation of 0 reads as not given (an older leader's message), and a
/// member taken into the cluster's epochs live takes the others' generation, so that a node
/// that never rolled back can take its first member in live too.
pub(crate) const FIRST_GENERATION: u64 = 1;

/// The construction parameters of a shard.
pub(crate) struct ShardOptions {
    pub index: usize,
    pub router: Router,
    pub store: Store,
    pub config: Arc<NodeConfig>,
    /// The last committed epoch at start.
    pub committed: u64,
    pub events: tokio::sync::mpsc::UnboundedSender<DriverEvent>,
    /// The recovered epoch's pending messages of this shard, in order.
    pub replay: Vec<Envelope>,
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
    /// The `invoke` spans of traced batches in flight, by slot (`crate::telemetry`).
    invoke_spans: FxHashMap<usize, Vec<tracing::Span>>,
    outgoing: Vec<Vec<Envelope>>,
    timers: Timers,
    /// The next look at `timers` and `behind` ([`Shard::arm_tick`]), and when it comes (ms
    /// since the Unix epoch; earlier if a [`TickSoon`] is on its way).
    tick: Option<SpawnHandle>,
    tick_at: u64,
    pending_writes: WriteBatch,
    /// The next `Seq::n` of a pending message record this shard writes.
    record_n: u64,
    /// The recovered epoch's pending messages, queued at start.
    replay: Vec<Envelope>,
    max_active: usize,
    invocation_hist: std::rc::Rc<LocalHistogram>,
    invocations: u64,
    /// Instance actors started since the metrics were last folded.
    actor_starts: u64,
    invocation_errors: u64,
    me: Option<Addr<Shard>>,
    /// The epoch being accumulated (the last cut + 1).
    epoch: u64,
    cuts: Cuts,
    cut: Option<Cut>,
    busy: Vec<usize>,
    held: VecDeque<(u64, Held)>,
    idem: IdempotencyTable,
    /// Calls retried with a key whose first call has not been answered yet.
    keyed_waiters: FxHashMap<String, Vec<u64>>,
    events: tokio::sync::mpsc::UnboundedSender<DriverEvent>,
    checkpointing: bool,
    /// The applied epoch at which the last eviction scan found too little to passivate.
    evict_blocked_at: Option<u64>,
    /// Bumped by each rollback: what was sent or started before it is dropped.
    generation: u64,
    /// Batches and markers of shards that already rolled back, arrived before this shard's own
    /// rollback: handled right after it (handled now, the rollback would undo them).
    early: Vec<Early>,
    /// This node.
    node: u64,
    /// The other participants of the cluster's epochs (their shards are sources of the cut;
    /// its markers go to them).
    peers: Vec<u64>,
    /// Messages for addresses other nodes own, per node, sent at the next flush.
    remote_out: std::collections::BTreeMap<u64, (String, Vec<Envelope>)>,
    /// Messages for addresses whose owner takes no part in the epochs now (it died, or is
    /// being synchronised): kept as pending messages of every cut, and delivered by the owner
    /// when it replays the committed epoch's pending messages of its key groups.
    parked: Vec<Envelope>,
    /// Messages from another node whose table is ahead of this node's: it routed them here
    /// by an ownership version this node has not applied yet (and this node's table names
    /// another owner). Held (in every cut) until the table reaches that version.
    behind: Vec<(u64, Envelope)>,
    /// A live move: the key groups this shard stopped at its cut of the move's epoch (their
    /// messages are not processed; what arrives for them after the cut is kept in
    /// `moving_out` until the move is done).
    stopped: Option<(u64, Arc<FxHashSet<u32>>)>,
    /// Messages for stopped key groups, sent or arrived after the cut they stopped at, in
    /// order: sent on to their owner once the move is done.
    moving_out: Vec<Envelope>,
    /// Slots of key groups that moved away while a batch of theirs was in flight: dropped
    /// (results and all) when it returns.
    zombies: FxHashSet<usize>,
}

/// A message from a shard of a newer generation.
enum Early {
    Deliver(Deliver),
    Marker(Marker),
    RemoteMarker(RemoteMarker),
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.me = Some(ctx.address());
        crate::instance::shard_started(ctx.address(), self.invocation_hist.clone());
        // Pending message records first, then the recovered epoch's pending messages: queued
        // before anything in the mailbox; they run once the node's first (empty) delivery
        // says every shard is known.
        self.load_from_store();
        for env in std::mem::take(&mut self.replay) {
            self.enqueue(env);
        }
        self.arm_tick(ctx);
        ctx.run_interval(Duration::from_millis(200), |act, _| act.fold_metrics());
        let sweep_ms = self
            .config
            .idle_timeout_ms
            .min(self.config.instance_linger_ms.unwrap_or(u64::MAX))
            .clamp(10, 1000);
        ctx.run_interval(Duration::from_millis(sweep_ms), |act, _| {
            act.passivate_idle();
        });
    }
}

impl Shard {
    /// Loads delayed messages and idempotency records from the local store.
    fn load_from_store(&mut self) {
        let placement = self.router.placement().clone();
        let kgs: Vec<u32> = self
            .owned_key_groups()
            .filter(|&kg| placement.is_local(kg))
            .collect();
        self.load_key_groups(&kgs);
    }

    /// Loads the delayed messages and idempotency records of key groups `kgs`.
    fn load_key_groups(&mut self, kgs: &[u32]) {
        if let Err(e) = self.timers.load(&self.store, kgs.iter().copied()) {
            tracing::error!(shard = self.index, error = %e, "cannot load delayed messages; they stay in sled until the next start");
        }
        self.tick_soon();
        let mut records = Vec::new();
        for &kg in kgs {
            match self.store.load_idempotency(kg) {
                Ok(v) => {
                    for (scope, raw) in v {
                        match Record::decode(&raw) {
                            Ok(r) => records.push((kg, scope, r)),
                            Err(e) => {
                                tracing::warn!(key_group = kg, error = %e, "skipping a corrupt idempotency record")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(key_group = kg, error = %e, "cannot load idempotency records")
                }
            }
        }
        self.idem.load(records);
        // Their pending message records, queued first (they are older than anything queued
        // after the cut that wrote them).
        for &kg in kgs {
            let loaded = match self.store.load_pending(kg) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(key_group = kg, error = %e, "cannot load pending messages; they stay in sled until the next start");
                    continue;
                }
            };
            for (seq, raw) in loaded {
                self.record_n = self.record_n.max(seq.n + 1);
                let env = match <PendingMessage as prost::Message>::decode(raw.as_slice()) {
                    Ok(m) => crate::node::envelopes(vec![(kg, m)]).pop(),
                    Err(e) => {
                        tracing::error!(key_group = kg, ?seq, error = %e, "a corrupt pending message record; deleted");
                        None
                    }
                };
                match env {
                    Some(env) => {
                        tracing::trace!(
                            shard = self.index,
                            kg,
                            ?seq,
                            id = msg_id(&env.message),
                            "pending message record loaded"
                        );
                        self.enqueue_recorded(env, Some(seq));
                    }
                    // Unreadable (logged): deleted with the next epoch, not kept for ever.
                    None => self.delete_record(kg, Some(seq)),
                }
            }
        }
    }

    pub(crate) fn new(o: ShardOptions) -> Self {
        let n = o.router.shard_count();
        let max_active = o.config.max_active_instances.div_ceil(n).max(1);
        let hist = o.router.metrics().invocation_seconds.local();
        let checkpointing = o.router.checkpointing();
        Shard {
            epoch: o.committed + 1,
            cuts: Cuts::new(o.index, n, o.committed),
            cut: None,
            busy: Vec::new(),
            held: VecDeque::new(),
            idem: IdempotencyTable::default(),
            keyed_waiters: FxHashMap::default(),
            events: o.events,
            checkpointing,
            evict_blocked_at: None,
            generation: FIRST_GENERATION,
            early: Vec::new(),
            node: o.router.placement().me(),
            peers: Vec::new(),
            remote_out: Default::default(),
            parked: Vec::new(),
            behind: Vec::new(),
            stopped: None,
            moving_out: Vec::new(),
            zombies: FxHashSet::default(),
            index: o.index,
            outgoing: (0..n).map(|_| Vec::new()).collect(),
            router: o.router,
            store: o.store,
            config: o.config,
            slots: Slab::new(),
            by_addr: FxHashMap::default(),
            ready: Vec::new(),
            dirty: Vec::new(),
            invoke_spans: FxHashMap::default(),
            timers: Timers::default(),
            tick: None,
            tick_at: 0,
            pending_writes: WriteBatch::default(),
            record_n: 0,
            replay: o.replay,
            max_active,
            invocation_hist: std::rc::Rc::new(hist),
            invocations: 0,
            actor_starts: 0,
            invocation_errors: 0,
            me: None,
        }
    }

    /// The participants of the cluster's epochs (with their shards) from epoch `base` on: the
    /// other ones' shards are sources of the cuts, and get this shard's markers.
    fn set_members(&mut self, members: &[(u64, u32)], base: u64) {
        let me = self.node;
        self.peers = members
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| *n != me)
            .collect();
        self.cuts.set_remote(
            members
                .iter()
                .filter(|(n, _)| *n != me)
                .flat_map(|&(n, s)| (0..s).map(move |j| (n, j))),
            base,
        );
    }

    /// Whether key group `kg` is stopped here (a live move).
    fn is_stopped(&self, kg: u32) -> bool {
        self.stopped.as_ref().is_some_and(|(_, s)| s.contains(&kg))
    }

    /// Keeps a message for a stopped key group until the move is done.
    fn keep_for_move(&mut self, mut env: Envelope) {
        if env.ingress {
            // Sent on as a message between functions: no longer counted as ingress here. Its
            // idempotency key goes with it (`ShardEnvelope.idempotency_key`): the new owner
            // checks and records it, so a retry there (or this being one) applies once.
            self.router.release(self.index, 1);
            env.ingress = false;
        }
        self.moving_out.push(env);
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
            change_epoch: 0,
            in_flight_copy: None,
            in_busy_list: false,
            cut_mark: 0,
            in_flight_ingress: 0,
        });
        self.by_addr.insert(address.clone(), i);
        Ok(i)
    }

    /// Holds an output until the current epoch commits (or releases it now when checkpoints
    /// are off). A caller waits for an acknowledgement or a reply: an epoch starts at once. An
    /// egress record gets one within a few milliseconds, unless one starts meanwhile for
    /// another reason (the next caller's) and takes it along; a Kafka egress, which takes its
    /// records as they are released, gets one at once.
    fn hold(&mut self, h: Held) {
        if self.checkpointing {
            match &h {
                Held::Egress(topic, ..) if !self.router.egress().is_sink(topic) => {
                    self.router.want_commit_soon(self.epoch)
                }
                _ => self.router.want_commit(),
            }
            self.held.push_back((self.epoch, h));
            self.router.set_holding(self.index, self.held.len());
        } else {
            self.release(h);
        }
    }

    fn release(&self, h: Held) {
        match h {
            Held::Ack(tx) => {
                let _ = tx.send(Ok(()));
            }
            Held::Reply(call, r) => {
                if !self.router.complete_call(call, r) {
                    tracing::debug!(call, "reply arrived after its caller stopped waiting");
                }
            }
            Held::Egress(topic, v, key) => self.router.egress().publish_durable(&topic, v, key),
        }
    }

    /// An egress record of key group `kg`: durable from its epoch on, published at commit.
    fn emit(&mut self, kg: u32, topic: String, value: TypedValue) {
        let key = self.checkpointing.then(|| {
            let key = self.router.egress().next_key(kg, self.epoch);
            self.pending_writes.put_raw(
                key.clone(),
                Some(crate::store::encode_egress(&topic, &value)),
            );
            key
        });
        self.hold(Held::Egress(topic, value, key));
    }

    fn record(&mut self, kg: u32, scope: &str, r: Record) {
        self.pending_writes
            .put_raw(idempotency_key(kg, scope), Some(r.encode()));
        self.idem.put(kg, scope, r);
    }

    /// A reply to an ingress call: recorded for its idempotency key, held until commit.
    fn handle_reply(&mut self, target: &Address, value: Result<TypedValue, ServiceError>) {
        let Some(r) = parse_reply_id(&target.id) else {
            tracing::warn!(address = %target, "malformed reply address; reply dropped");
            return;
        };
        let (kg, call) = (r.kg, r.call);
        if let Some(scope) = r.scope.map(str::to_string) {
            if let Some(rec) = self.idem.get(&scope) {
                let outcome = match &value {
                    Ok(v) => Outcome::Replied(v.clone()),
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                let seen_ms = rec.seen_ms;
                self.record(kg, &scope, Record { seen_ms, outcome });
            }
            for w in self.keyed_waiters.remove(&scope).unwrap_or_default() {
                self.hold(Held::Reply(w, value.clone()));
            }
        }
        self.hold(Held::Reply(call, value));
    }

    /// Checks an ingress message's idempotency key: false if it was seen before (then the
    /// retry is answered from the record and not applied again).
    fn first_time(&mut self, env: &Envelope) -> bool {
        let Some(key) = env.key.as_deref() else {
            return true;
        };
        let scope = idempotency::scope(&env.target.to_string(), key);
        let call = env
            .caller
            .as_ref()
            .filter(|c| self.router.is_reply_address(c))
            .and_then(|c| parse_reply_id(&c.id).map(|r| r.call));
        match self.idem.get(&scope).map(|r| r.outcome.clone()) {
            None => {
                let outcome = if call.is_some() {
                    Outcome::CallPending
                } else {
                    Outcome::Sent
                };
                self.record(
                    env.kg,
                    &scope,
                    Record {
                        seen_ms: now_ms(),
                        outcome,
                    },
                );
                return true;
            }
            Some(o) => {
                self.router.metrics().idempotent_retries.inc();
                if let Some(c) = call {
                    match o {
                        Outcome::Sent => self.hold(Held::Reply(
                            c,
                            Err(ServiceError::InvalidArgument(format!(
                                "idempotency key {key:?} was already used by a Send to {}",
                                env.target
                            ))),
                        )),
                        Outcome::CallPending => {
                            self.keyed_waiters.entry(scope).or_default().push(c)
                        }
                        Outcome::Replied(v) => self.hold(Held::Reply(c, Ok(v))),
                        Outcome::Failed(e) => {
                            self.hold(Held::Reply(c, Err(ServiceError::FunctionFailed(e))))
                        }
                    }
                }
            }
        }
        false
    }

    /// Queues a message for a local address.
    fn enqueue(&mut self, env: Envelope) {
        self.enqueue_recorded(env, None);
    }

    /// Queues a message for a local address; `record`: the message's pending message record,
    /// deleted when it is processed (or now, if it is not queued).
    fn enqueue_recorded(&mut self, env: Envelope, record: Option<Seq>) {
        // A record's message is never checked against idempotency records again (the check
        // below would drop it without deleting its record): it has no key.
        debug_assert!(record.is_none() || env.key.is_none());
        // Every path that does not queue it handles the message in this epoch: its record
        // goes with it.
        if self.router.is_reply_address(&env.target) {
            self.delete_record(env.kg, record);
            let _reply = env
                .trace
                .as_deref()
                .map(|t| crate::telemetry::child("reply", &env.target.to_string(), t));
            self.handle_reply(&env.target, Ok(env.message));
            return;
        }
        if env.key.is_some() && !self.first_time(&env) {
            if env.ingress {
                self.router.release(self.index, 1);
            }
            return;
        }
        let Some(entry) = self.router.registry().get(&env.target.typ) else {
            self.delete_record(env.kg, record);
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
                self.delete_record(env.kg, record);
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
            record,
            seen: false,
            trace: env.trace,
        });
        if !slot.in_busy_list {
            slot.in_busy_list = true;
            self.busy.push(i);
        }
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

    /// Deletes a processed message's pending message record, if it has one.
    fn delete_record(&mut self, kg: u32, record: Option<Seq>) {
        if let Some(seq) = record {
            self.pending_writes.put_raw(pending_key(kg, seq), None);
        }
    }

    /// A message of key group `kg` pending at `cut`: nothing if it has a record; listed in
    /// the cut (`order`) the first time a cut finds it (`seen`); its record written in the
    /// cut's delta (numbered from `record_n`) the second time.
    #[allow(clippy::too_many_arguments)]
    fn note_pending(
        cut: &mut Cut,
        record_n: &mut u64,
        kg: u32,
        target: &Arc<str>,
        order: u8,
        record: &mut Option<Seq>,
        seen: &mut bool,
        message: impl FnOnce() -> PendingMessage,
    ) {
        if record.is_some() {
            return;
        }
        if !*seen {
            *seen = true;
            cut.pending.push((target.clone(), order, kg, message()));
            return;
        }
        let seq = Seq {
            epoch: cut.epoch,
            n: *record_n,
        };
        *record_n += 1;
        cut.ops.push(Change::Raw(
            pending_key(kg, seq),
            Some(prost::Message::encode_to_vec(&message())),
        ));
        cut.recorded += 1;
        *record = Some(seq);
    }

    fn dispatch_ready(&mut self) {
        let now = now_ms();
        while let Some(i) = self.ready.pop() {
            if self.slots.get(i).is_some_and(|s| {
                !s.in_flight
                    && !s.retry_wait
                    && s.inbox
                        .front()
                        .is_some_and(|p| p.message.typename() == crate::admin::SET_STATE)
            }) && !self.is_stopped(self.slots[i].kg)
            {
                self.apply_state_edits(i);
            }
            let store = &self.store;
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            if slot.in_flight || slot.retry_wait || slot.inbox.is_empty() {
                continue;
            }
            if self
                .stopped
                .as_ref()
                .is_some_and(|(_, s)| s.contains(&slot.kg))
            {
                // Its messages are processed by its owner after the move.
                continue;
            }
            let cap = match &slot.entry.kind {
                FunctionKind::Remote(r) if r.max_batch() > 0 => r.max_batch(),
                FunctionKind::Remote(_) => usize::MAX,
                FunctionKind::Embedded(_) => self.config.max_batch,
            };
            // A state edit is applied between batches: the batch ends before the first one.
            let n = slot
                .inbox
                .iter()
                .take(cap)
                .position(|p| p.message.typename() == crate::admin::SET_STATE)
                .unwrap_or(slot.inbox.len().min(cap));
            if n == 0 {
                // An edit at the front of an address in retry or whose key group stopped.
                continue;
            }
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
            // Changes not yet cut go into the epoch's delta before the state is lent out.
            if slot.in_dirty_list {
                Self::write_slot(&mut self.pending_writes, slot, self.epoch);
            }
            if self.checkpointing && matches!(slot.entry.kind, FunctionKind::Remote(_)) {
                slot.in_flight_copy = Some(
                    batch
                        .iter()
                        .map(|p| InFlight {
                            // A recorded message is not listed again.
                            message: if p.record.is_some() {
                                PendingMessage::default()
                            } else {
                                pending_message(&slot.address, p.caller.as_ref(), &p.message)
                            },
                            record: p.record,
                            seen: p.seen,
                        })
                        .collect(),
                );
            }
            let mut state = slot
                .state
                .take()
                .expect("state is home when nothing is in flight");
            sync_state(store, slot, &mut state);
            slot.in_flight = true;
            slot.in_flight_ingress = batch.iter().filter(|p| p.ingress).count();
            slot.last_used_ms = now;
            if matches!(slot.entry.kind, FunctionKind::Remote(_)) {
                self.router
                    .metrics()
                    .remote_batch_size
                    .observe(batch.len() as f64);
            }
            if slot.instance.is_none() {
                slot.instance = Some(Instance::new(i, self.generation).start());
                self.actor_starts += 1;
            }
            let traceparent =
                if crate::telemetry::enabled() && batch.iter().any(|p| p.trace.is_some()) {
                    let what = slot.address.to_string();
                    let spans: Vec<tracing::Span> = batch
                        .iter()
                        .filter_map(|p| p.trace.as_deref())
                        .map(|t| crate::telemetry::child("invoke", &what, t))
                        .collect();
                    let header = spans
                        .first()
                        .and_then(crate::telemetry::TraceParent::of)
                        .map(|t| t.header());
                    self.invoke_spans.insert(i, spans);
                    header
                } else {
                    None
                };
            let instance = slot.instance.as_ref().expect("started above");
            instance.do_send(Invoke {
                address: slot.address.clone(),
                entry: slot.entry.clone(),
                batch,
                state,
                now_ms: now,
                traceparent,
            });
        }
    }

    /// Applies the state edits (`crate::admin`) at the head of the inbox of slot `i`, whose
    /// state is home: each changes the state in this epoch and is answered (held until the
    /// epoch commits) with the address's states after it.
    fn apply_state_edits(&mut self, i: usize) {
        loop {
            let slot = &mut self.slots[i];
            if slot
                .inbox
                .front()
                .is_none_or(|p| p.message.typename() != crate::admin::SET_STATE)
            {
                break;
            }
            let p = slot.inbox.pop_front().expect("checked");
            let (kg, address) = (slot.kg, slot.address.clone());
            if p.ingress {
                self.router.release(self.index, 1);
            }
            self.delete_record(kg, p.record);
            self.invocations += 1;
            // The admin API calls (its caller is a call's reply address, kept across moves
            // and recoveries); a function (its own address) or a Kafka record (none) cannot.
            let from_admin = p
                .caller
                .as_ref()
                .is_some_and(|c| self.router.is_reply_address(c));
            if !from_admin {
                // Sent by a function or a Kafka record: not the admin API's.
                self.dead_letter(
                    &address,
                    p.caller.as_ref(),
                    &p.message,
                    &format!(
                        "typename {} is reserved to the node's admin API: state edits come from `statemesh state set|delete`",
                        crate::admin::SET_STATE
                    ),
                    0,
                );
                continue;
            }
            let result = self.edit_state(i, &p.message);
            if let Err(e) = &result {
                tracing::info!(%address, error = %e, "state edit refused");
            } else {
                tracing::info!(%address, "state edited through the admin API");
            }
            self.mark_dirty(i);
            if let Some(c) = p.caller.filter(|c| self.router.is_reply_address(c)) {
                let reply = result
                    .map(|states| crate::admin::states_reply(&states))
                    .map_err(ServiceError::InvalidArgument);
                self.handle_reply(&c, reply);
            }
        }
        let slot = &self.slots[i];
        if slot.saturated && slot.inbox.is_empty() {
            self.slots[i].saturated = false;
            let address = self.slots[i].address.clone();
            self.router.set_saturated(self.index, &address, false, 0);
        }
    }

    /// Applies one state edit to slot `i`: the address's live states after it, or why not.
    fn edit_state(
        &mut self,
        i: usize,
        message: &TypedValue,
    ) -> Result<Vec<(String, TypedValue, u64)>, String> {
        use crate::admin::{NewValue, StateEdit};
        let edit = StateEdit::from_message(message)?;
        let slot = &mut self.slots[i];
        let mut state = slot.state.take().expect("state is home between batches");
        sync_state(&self.store, slot, &mut state);
        let now = now_ms();
        let result = (|| {
            let names = || {
                if state.is_empty() {
                    "it has declared none yet; a remote function declares its states when it is first invoked".to_string()
                } else {
                    format!(
                        "its states: {}",
                        state
                            .iter()
                            .map(|s| &*s.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            };
            let Some(s) = state.iter().position(|s| *s.name == *edit.name) else {
                return Err(format!(
                    "function type {} has no state named {:?} ({})",
                    slot.address.typ.as_str(),
                    edit.name,
                    names()
                ));
            };
            let s = &mut state[s];
            let value = match edit.value {
                NewValue::Delete => None,
                NewValue::Text(t) => Some(
                    crate::ingress::value_from_text(&s.typename, t.into_bytes().into())
                        .map_err(|e| format!("state {:?} ({}): {e}", edit.name, s.typename))?
                        .value()
                        .clone(),
                ),
                NewValue::Typed {
                    typename,
                    value_base64,
                } => {
                    if *typename != *s.typename {
                        return Err(format!(
                            "state {:?} holds {}, not {typename}",
                            edit.name, s.typename
                        ));
                    }
                    Some(
                        base64::engine::general_purpose::STANDARD
                            .decode(value_base64)
                            .map_err(|e| format!("value_base64: {e}"))?
                            .into(),
                    )
                }
            };
            s.expires_at_ms = match (&value, s.expiration.ttl()) {
                (Some(_), Some(ttl)) => now + ttl.as_millis() as u64,
                _ => 0,
            };
            s.value = value;
            s.dirty = true;
            Ok(())
        })();
        slot.state = Some(state);
        result.map(|()| self.read_state(&self.slots[i]))
    }

    /// Routes a message produced by an invocation or a timer.
    fn route(&mut self, target: Address, caller: Option<Address>, message: TypedValue) {
        self.route_traced(target, caller, message, None);
    }

    /// [`Shard::route`] for a message sent by a traced invocation (`trace`: its span).
    fn route_traced(
        &mut self,
        target: Address,
        caller: Option<Address>,
        message: TypedValue,
        trace: crate::telemetry::Trace,
    ) {
        let kg = self.router.key_group(&target);
        let env = Envelope {
            target,
            kg,
            caller,
            message,
            ingress: false,
            key: None,
            trace,
        };
        self.route_env(env);
    }

    /// To the owner of the envelope's key group: this shard, another one, or another node.
    fn route_env(&mut self, env: Envelope) {
        tracing::trace!(shard = self.index, kg = env.kg, id = msg_id(&env.message), stopped = self.is_stopped(env.kg), route = ?self.router.placement().route(env.kg), peers = ?self.peers, "routed");
        if self.is_stopped(env.kg) {
            self.keep_for_move(env);
            return;
        }
        if let crate::mesh::Route::Remote { node, addr } = self.router.placement().route(env.kg) {
            if self.checkpointing && !self.peers.contains(&node) {
                self.parked.push(env);
                return;
            }
            // A reply goes to the owner of its call's key group, which holds the caller.
            self.remote_out
                .entry(node)
                .or_insert_with(|| (addr, Vec::new()))
                .1
                .push(env);
            return;
        }
        let shard = self.router.shard_of(env.kg);
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
                self.router
                    .deliver_internal(s, Some(self.index), self.generation, batch);
            }
        }
        if !self.remote_out.is_empty() {
            let placement = self.router.placement().clone();
            for (node, (addr, batch)) in std::mem::take(&mut self.remote_out) {
                tracing::trace!(shard = self.index, node, generation = self.generation, ids = ?batch.iter().map(|e| msg_id(&e.message)).collect::<Vec<_>>(), "sent to a peer");
                let bytes = crate::mesh::shard_messages(
                    &placement,
                    self.node,
                    self.index,
                    self.generation,
                    batch,
                );
                placement.send_fn(&addr, crate::mesh::FnKind::Deliver, self.generation, bytes);
                let _ = node;
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
        if let Some(e) = self.router.registry().get(&target.typ) {
            e.dead_letters
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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
            let c = c.clone();
            self.handle_reply(&c, Err(e));
        }
        let record = serde_json::json!({
            "address": target.to_string(),
            "caller": caller.map(|c| c.to_string()),
            "typename": message.typename(),
            "value_base64": base64::engine::general_purpose::STANDARD.encode(message.value()),
            "error": error,
            "attempts": attempts,
        });
        let kg = self.router.key_group(target);
        self.emit(
            kg,
            DEAD_LETTERS_TOPIC.to_string(),
            TypedValue::new("statemesh/DeadLetter", record.to_string().into_bytes()),
        );
    }

    fn apply_effects(
        &mut self,
        sender: &Address,
        sender_kg: u32,
        effects: Effects,
        trace: Option<&crate::telemetry::TraceParent>,
    ) {
        // A Kafka partition instance hands on ingress records: their targets see no caller,
        // as with any ingress message (StateFun's too), and do not reply to it.
        let caller = (sender.typ.as_str() != crate::kafka::PARTITION_TYPE).then_some(sender);
        for (target, message) in effects.messages {
            self.route_traced(
                target,
                caller.cloned(),
                message,
                trace.map(|t| Box::new(*t)),
            );
        }
        let now = now_ms();
        for d in effects.delayed {
            if let Err(e) = self.timers.schedule(
                sender,
                sender_kg,
                self.epoch,
                now,
                d.clone(),
                &mut self.pending_writes,
            ) {
                self.dead_letter(&d.target, Some(sender), &d.message, &e, 0);
            }
            self.tick_soon();
        }
        for token in effects.cancellations {
            self.timers.cancel(sender, &token, &mut self.pending_writes);
        }
        for (topic, value) in effects.egress {
            self.emit(sender_kg, topic, value);
        }
    }

    /// Routes the messages held for this node's table to catch up, once it has.
    fn release_behind(&mut self) {
        if self.behind.is_empty() {
            return;
        }
        let placement = self.router.placement().clone();
        let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.behind)
            .into_iter()
            .partition(|(v, env)| placement.kg_version(env.kg) >= *v);
        self.behind = held;
        if ready.is_empty() {
            return;
        }
        for (_, env) in ready {
            self.route_env(env);
        }
        self.send_outgoing();
        self.dispatch_ready();
    }

    /// When the next look at delayed and held messages is wanted (ms since the Unix epoch):
    /// in [`SHARD_TICK_MS`] while messages wait for this node's table, else when the earliest
    /// delayed message is due, at least [`SHARD_TICK_MS`] and at most [`SHARD_IDLE_TICK_MS`]
    /// from `now`.
    fn next_look(&self, now: u64) -> u64 {
        if !self.behind.is_empty() {
            return now + SHARD_TICK_MS;
        }
        let due = self.timers.next_due().unwrap_or(u64::MAX);
        due.clamp(now + SHARD_TICK_MS, now + SHARD_IDLE_TICK_MS)
    }

    /// Looks at delayed messages and held messages again at [`Shard::next_look`].
    fn arm_tick(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.tick.take() {
            ctx.cancel_future(h);
        }
        let now = now_ms();
        self.tick_at = self.next_look(now);
        let after = Duration::from_millis(self.tick_at - now);
        self.tick = Some(ctx.run_later(after, |act, ctx| {
            act.tick = None;
            act.fire_timers();
            act.release_behind();
            act.arm_tick(ctx);
        }));
    }

    /// Delayed or held messages were added: the shard looks sooner if one is due before its
    /// next look.
    fn tick_soon(&mut self) {
        let at = self.next_look(now_ms());
        if at < self.tick_at {
            self.tick_at = at;
            if let Some(me) = &self.me {
                me.do_send(TickSoon);
            }
        }
    }

    fn fire_timers(&mut self) {
        let stopped = self.stopped.as_ref().map(|(_, s)| s.clone());
        let due = self
            .timers
            .take_due(now_ms(), &mut self.pending_writes, stopped.as_deref());
        if due.is_empty() {
            return;
        }
        tracing::trace!(target: "statemesh_node::shard::timers", shard = self.index, epoch = self.epoch, generation = self.generation, ids = ?due.iter().map(|t| msg_id(&t.message)).collect::<Vec<_>>(), "delayed messages fire");
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

    fn write_slot(batch: &mut WriteBatch, slot: &mut Slot, epoch: u64) {
        if let Some(state) = slot.state.as_mut() {
            for v in state.iter_mut().filter(|v| v.dirty) {
                batch.put_state(slot.kg, &slot.address, v);
                v.dirty = false;
                slot.change_epoch = epoch;
            }
        }
    }

    /// Whether an idle slot can be dropped: all its changes are in sled.
    fn passivable(s: &Slot, applied: u64) -> bool {
        s.idle()
            && s.readers.is_empty()
            && s.change_epoch <= applied
            && s.state
                .as_ref()
                .is_some_and(|st| !st.iter().any(|v| v.dirty))
    }

    fn passivate(&mut self, i: usize) {
        let slot = self.slots.remove(i);
        self.by_addr.remove(&slot.address);
        self.router.metrics().passivations.inc();
        // Dropping the slot drops the last `Addr` of the instance actor, which stops it.
    }

    /// Cuts the current epoch: its delta and (with checkpoints) its pending messages; sends
    /// this shard's markers to the others.
    fn begin_cut(&mut self, e: u64) {
        debug_assert_eq!(e, self.epoch);
        let t0 = std::time::Instant::now();
        // Everything produced before the cut goes out ahead of the markers.
        self.send_outgoing();
        let mut ops = std::mem::take(&mut self.pending_writes).ops;
        let mut batch = WriteBatch::default();
        for i in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.slots.get_mut(i) else {
                continue;
            };
            slot.in_dirty_list = false;
            // A lent state was written at dispatch; its batch's changes belong to the next
            // epoch and mark it dirty again when it returns.
            Self::write_slot(&mut batch, slot, e);
        }
        ops.append(&mut batch.ops);
        for (kg, scope) in self
            .idem
            .expire(now_ms(), self.config.checkpoint.idempotency_window_ms)
        {
            // Calls waiting for the first call of this key (`keyed_waiters`) keep waiting: its
            // reply still comes, and answers them (`handle_reply`).
            ops.push(Change::Raw(idempotency_key(kg, &scope), None));
        }
        // Waiting calls of keys whose record has expired, that their callers gave up on
        // (timed out): dropped (a first call that is never answered would keep them for
        // ever). While the record lives, they are bounded by its window.
        if !self.keyed_waiters.is_empty() {
            let (idem, router) = (&self.idem, &self.router);
            self.keyed_waiters.retain(|scope, calls| {
                if idem.get(scope).is_none() {
                    calls.retain(|&c| router.call_waiting(c));
                }
                !calls.is_empty()
            });
        }
        let mut cut = Cut {
            epoch: e,
            ops,
            pending: Vec::new(),
            awaiting: FxHashMap::default(),
            markers_done: true,
            recorded: 0,
        };
        if self.checkpointing {
            let behind = self.behind.iter().map(|(_, e)| e);
            for env in self.parked.iter().chain(&self.moving_out).chain(behind) {
                tracing::trace!(
                    shard = self.index,
                    epoch = e,
                    kg = env.kg,
                    id = msg_id(&env.message),
                    "parked, kept for a move or behind: pending at the cut"
                );
                cut.pending.push((
                    env.target.to_string().into(),
                    3,
                    env.kg,
                    pending_envelope(env),
                ));
            }
            let busy = std::mem::take(&mut self.busy);
            for i in busy {
                let Some(slot) = self.slots.get_mut(i) else {
                    continue;
                };
                if !slot.in_busy_list || slot.cut_mark == e {
                    continue;
                }
                slot.cut_mark = e;
                tracing::trace!(shard = self.index, epoch = e, kg = slot.kg, in_flight = slot.in_flight, copy = slot.in_flight_copy.as_ref().map(|c| c.len()), inbox = ?slot.inbox.iter().map(|p| msg_id(&p.message)).collect::<Vec<_>>(), "busy at the cut: pending");
                // A message a cut listed before and still pending is written once as a
                // record (in this epoch's delta); a new one is listed.
                let target: Arc<str> = slot.address.to_string().into();
                let kg = slot.kg;
                if slot.in_flight {
                    match &mut slot.in_flight_copy {
                        Some(copy) => {
                            for m in copy.iter_mut() {
                                Self::note_pending(
                                    &mut cut,
                                    &mut self.record_n,
                                    kg,
                                    &target,
                                    0,
                                    &mut m.record,
                                    &mut m.seen,
                                    || m.message.clone(),
                                );
                            }
                        }
                        None => {
                            // Its inputs come back before the inbox's records are read.
                            cut.awaiting.insert(i, self.record_n);
                            self.record_n += self.config.max_batch.max(1) as u64;
                        }
                    }
                }
                for p in slot.inbox.iter_mut() {
                    let address = &slot.address;
                    Self::note_pending(
                        &mut cut,
                        &mut self.record_n,
                        kg,
                        &target,
                        1,
                        &mut p.record,
                        &mut p.seen,
                        || pending_message(address, p.caller.as_ref(), &p.message),
                    );
                }
                if slot.idle() {
                    slot.in_busy_list = false;
                } else {
                    self.busy.push(i);
                }
            }
            let n = self.router.shard_count();
            for j in (0..n).filter(|j| *j != self.index) {
                self.router.marker(j, self.index, self.generation, e);
            }
            // The other participants' shards, behind what this shard sent them.
            if !self.peers.is_empty() {
                let placement = self.router.placement().clone();
                for &p in &self.peers {
                    match placement.addr_of(p) {
                        Some(addr) => placement.send_fn(
                            &addr,
                            crate::mesh::FnKind::Marker,
                            self.generation,
                            crate::mesh::shard_marker(self.node, self.index, self.generation, e),
                        ),
                        None => {
                            tracing::warn!(node = p, "a participant has no address; its epoch stalls until the leader synchronises")
                        }
                    }
                }
            }
            cut.markers_done = self.cuts.snapshot(e);
            tracing::trace!(shard = self.index, epoch = e, done = cut.markers_done, peers = ?self.peers, "cut");
        }
        self.epoch = e + 1;
        self.cut = Some(cut);
        if let Some(set) = self.router.placement().stop_at(e) {
            // A live move: from this cut on, these key groups' messages wait for their owner
            // after the move (what their inboxes and batches in flight hold is pending at
            // this cut; the new owner reads it from blob storage).
            tracing::debug!(
                shard = self.index,
                epoch = e,
                key_groups = set.len(),
                "key groups stopped for a move"
            );
            self.stopped = Some((e, set));
        }
        self.maybe_finish_cut();
        let pause = t0.elapsed();
        let m = self.router.metrics();
        m.checkpoint_cut_seconds.observe(pause.as_secs_f64());
        let us = pause.as_micros() as i64;
        if us > m.checkpoint_cut_max_us.get() {
            m.checkpoint_cut_max_us.set(us);
        }
    }

    fn maybe_finish_cut(&mut self) {
        match &self.cut {
            Some(c) if c.markers_done && c.awaiting.is_empty() => {}
            _ => return,
        }
        let cut = self.cut.take().expect("checked");
        let m = self.router.metrics();
        m.checkpoint_pending_listed.inc_by(cut.pending.len() as u64);
        m.checkpoint_pending_recorded.inc_by(cut.recorded);
        let mut pending = cut.pending;
        // Per address: in-flight inputs, then the inbox, then what arrived across the cut.
        pending.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let _ = self.events.send(DriverEvent::Cut(ShardCut {
            epoch: cut.epoch,
            shard: self.index,
            generation: self.generation,
            ops: cut.ops,
            pending: pending.into_iter().map(|(_, _, kg, m)| (kg, m)).collect(),
        }));
    }

    /// Passivates least recently used idle instances down to 90 % of the limit (at least
    /// one below it, to make room for an activation).
    fn evict_lru(&mut self) {
        let applied = self.router.applied();
        // A scan that could not make room is not repeated until sled has moved on (else every
        // activation would rescan every instance).
        if self.evict_blocked_at == Some(applied) {
            return;
        }
        let target = (self.max_active - self.max_active / 10).min(self.max_active - 1);
        let mut idle: Vec<(u64, usize)> = self
            .slots
            .iter()
            .filter(|(_, s)| Self::passivable(s, applied))
            .map(|(i, s)| (s.last_used_ms, i))
            .collect();
        idle.sort_unstable();
        let excess = self.slots.len().saturating_sub(target);
        for &(_, i) in idle.iter().take(excess) {
            self.passivate(i);
        }
        if self.slots.len() >= self.max_active {
            // What is left waits for its changes to reach sled: ask for them now.
            self.evict_blocked_at = Some(applied);
            self.router.want_apply();
        } else {
            self.evict_blocked_at = None;
        }
    }

    fn passivate_idle(&mut self) {
        if self.slots.len() >= self.max_active {
            self.evict_lru();
        }
        let now = now_ms();
        if let Some(linger) = self.config.instance_linger_ms {
            let linger_cutoff = now.saturating_sub(linger);
            for (_, s) in self.slots.iter_mut() {
                if s.instance.is_some() && s.idle() && s.last_used_ms <= linger_cutoff {
                    s.instance = None;
                }
            }
        }
        let cutoff = now.saturating_sub(self.config.idle_timeout_ms);
        let applied = self.router.applied();
        let idle: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, s)| s.last_used_ms <= cutoff && Self::passivable(s, applied))
            .map(|(i, _)| i)
            .collect();
        for i in idle {
            self.passivate(i);
        }
    }

    fn fold_metrics(&mut self) {
        let m = self.router.metrics();
        m.invocations.inc_by(std::mem::take(&mut self.invocations));
        m.actor_starts
            .inc_by(std::mem::take(&mut self.actor_starts));
        m.invocation_errors
            .inc_by(std::mem::take(&mut self.invocation_errors));
        self.invocation_hist.flush();
        crate::instance::flush_per_type();
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

/// The `"id"` field of a JSON message body, for trace logs (the crash and chaos tests' message
/// ids): follows one message through routing, cuts, moves and rollbacks.
fn msg_id(m: &TypedValue) -> &str {
    const PAT: &[u8] = b"\"id\":\"";
    let v: &[u8] = m.value();
    v.windows(PAT.len())
        .position(|w| w == PAT)
        .and_then(|i| {
            let rest = &v[i + PAT.len()..];
            let end = rest.iter().position(|&b| b == b'"')?;
            std::str::from_utf8(&rest[..end]).ok()
        })
        .unwrap_or("")
}

impl Handler<Deliver> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Self::Context) {
        if (msg.from.is_some() || msg.remote.is_some()) && msg.generation != self.generation {
            tracing::trace!(shard = self.index, generation = msg.generation, own = self.generation, remote = ?msg.remote, ids = ?msg.batch.iter().map(|e| msg_id(&e.message)).collect::<Vec<_>>(), "delivery of another generation (a newer one waits, an older one is dropped)");
            if msg.generation > self.generation {
                self.early.push(Early::Deliver(msg));
            }
            // Older: sent by another shard before a rollback, undone with everything else.
            return;
        }
        self.deliver(msg);
    }
}

impl Shard {
    fn deliver(&mut self, msg: Deliver) {
        let arrival = match (msg.from, msg.remote) {
            (Some(j), _) if self.checkpointing => self.cuts.arrival(j),
            (_, Some(r)) if self.checkpointing => self.cuts.arrival_remote(r),
            _ => Arrival::Process,
        };
        for (i, env) in msg.batch.into_iter().enumerate() {
            tracing::trace!(shard = self.index, kg = env.kg, id = msg_id(&env.message), ?arrival, from = ?msg.from, remote = ?msg.remote, "delivered");
            let mut logged = false;
            if let (Arrival::ProcessAndLog(_), Some(cut)) = (arrival, self.cut.as_mut()) {
                // Sent before the sender's cut, arriving after ours: in flight across it.
                cut.pending.push((
                    env.target.to_string().into(),
                    2,
                    env.kg,
                    pending_envelope(&env),
                ));
                logged = true;
            }
            if self.is_stopped(env.kg) {
                if logged {
                    // Pending at the cut it stopped at: its owner after the move reads it
                    // from blob storage.
                    if env.ingress {
                        self.router.release(self.index, 1);
                    }
                } else {
                    self.keep_for_move(env);
                }
                continue;
            }
            if msg.remote.is_some() && !self.router.placement().is_local(env.kg) {
                let theirs = msg.versions.get(i).copied().unwrap_or(0);
                if theirs > self.router.placement().kg_version(env.kg) {
                    // This node's table is behind the sender's, which names this node.
                    self.behind.push((theirs, env));
                    self.tick_soon();
                } else {
                    // The sender's table is behind: on to the owner.
                    self.route_env(env);
                }
                continue;
            }
            self.enqueue(env);
        }
        if let Some(ack) = msg.ack {
            self.hold(Held::Ack(ack));
        }
        self.send_outgoing();
        self.dispatch_ready();
    }
}

impl Handler<TickSoon> for Shard {
    type Result = ();

    fn handle(&mut self, _: TickSoon, ctx: &mut Self::Context) {
        self.arm_tick(ctx);
    }
}

impl Handler<Barrier> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Barrier, _: &mut Self::Context) {
        // A cluster's leader may number on after abandoned epochs: the epoch being
        // accumulated takes the number it is cut with.
        if msg.epoch >= self.epoch {
            self.epoch = msg.epoch;
            self.begin_cut(msg.epoch);
        }
    }
}

impl Handler<Marker> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Marker, _: &mut Self::Context) {
        if msg.generation != self.generation {
            if msg.generation > self.generation {
                self.early.push(Early::Marker(msg));
            }
            return;
        }
        self.marker(msg);
    }
}

impl Shard {
    fn marker(&mut self, msg: Marker) {
        if msg.epoch >= self.epoch {
            self.epoch = msg.epoch;
            self.begin_cut(msg.epoch);
        }
        if self.cuts.marker(msg.from, msg.epoch) {
            if let Some(c) = self.cut.as_mut() {
                c.markers_done = true;
            }
            self.maybe_finish_cut();
        }
    }
}

impl Handler<RemoteMarker> for Shard {
    type Result = ();

    fn handle(&mut self, msg: RemoteMarker, _: &mut Self::Context) {
        if msg.generation != self.generation {
            tracing::trace!(shard = self.index, from = ?msg.from, epoch = msg.epoch, generation = msg.generation, own = self.generation, "remote marker of another generation (a newer one waits, an older one is dropped)");
            if msg.generation > self.generation {
                self.early.push(Early::RemoteMarker(msg));
            }
            return;
        }
        self.remote_marker(msg);
    }
}

impl Shard {
    fn remote_marker(&mut self, msg: RemoteMarker) {
        tracing::trace!(shard = self.index, from = ?msg.from, epoch = msg.epoch, "remote marker");
        if !self.checkpointing {
            return;
        }
        if msg.epoch >= self.epoch {
            self.epoch = msg.epoch;
            self.begin_cut(msg.epoch);
        }
        if self.cuts.marker_remote(msg.from, msg.epoch) {
            if let Some(c) = self.cut.as_mut() {
                c.markers_done = true;
            }
            self.maybe_finish_cut();
        }
    }
}

impl Handler<Committed> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Committed, _: &mut Self::Context) {
        while self.held.front().is_some_and(|(e, _)| *e <= msg.epoch) {
            let (_, h) = self.held.pop_front().expect("non-empty");
            self.release(h);
        }
        self.router.set_holding(self.index, self.held.len());
    }
}

impl Handler<InvokeDone> for Shard {
    type Result = ();

    fn handle(&mut self, done: InvokeDone, ctx: &mut Self::Context) {
        tracing::trace!(shard = self.index, generation = done.generation, own = self.generation, zombie = self.zombies.contains(&done.slot), processed = done.processed, ids = ?done.batch.iter().map(|p| msg_id(&p.message)).collect::<Vec<_>>(), "invocation done");
        if done.generation != self.generation {
            // A batch started before a rollback: its slot and its results are gone.
            return;
        }
        let i = done.slot;
        // The batch's `invoke` spans end with this handler; what it sent continues the first.
        let spans = self.invoke_spans.remove(&i).unwrap_or_default();
        let trace = spans.first().and_then(crate::telemetry::TraceParent::of);
        if self.zombies.remove(&i) {
            // Its key group moved away meanwhile: its inputs were pending at the move's cut.
            let slot = self.slots.remove(i);
            self.router.release(self.index, slot.in_flight_ingress);
            for r in slot.readers {
                let _ = r.send(Err(ServiceError::Unavailable(format!(
                    "{} moved to another node; retry",
                    slot.address
                ))));
            }
            return;
        }
        let mut batch = done.batch;
        let (address, kg) = {
            let slot = &mut self.slots[i];
            slot.state = Some(done.state);
            slot.in_flight = false;
            slot.in_flight_ingress = 0;
            if let Some(copy) = slot.in_flight_copy.take() {
                // What the cuts made of a remote batch's inputs while it ran.
                for (p, m) in batch.iter_mut().zip(copy) {
                    p.record = m.record;
                    p.seen = m.seen;
                }
            }
            (slot.address.clone(), slot.kg)
        };
        let mut cut_ready = false;
        if let Some(cut) = self.cut.as_mut() {
            if let Some(mut n) = cut.awaiting.remove(&i) {
                // In flight at the cut: its inputs are pending messages of the cut epoch.
                let target: Arc<str> = address.to_string().into();
                for p in batch.iter_mut() {
                    Self::note_pending(
                        cut,
                        &mut n,
                        kg,
                        &target,
                        0,
                        &mut p.record,
                        &mut p.seen,
                        || pending_message(&address, p.caller.as_ref(), &p.message),
                    );
                }
                cut_ready = cut.awaiting.is_empty();
            }
        }
        if self.is_stopped(kg) {
            // In flight when its key group stopped: its inputs are pending at that cut, and
            // its owner after the move processes them; its results are dropped.
            let ingress = batch.iter().filter(|p| p.ingress).count();
            self.router.release(self.index, ingress);
            if cut_ready {
                self.maybe_finish_cut();
            }
            return;
        }
        self.invocations += done.processed as u64;
        if done.remote_failed_attempts > 0 {
            self.router
                .metrics()
                .remote_failed_attempts
                .inc_by(u64::from(done.remote_failed_attempts));
        }
        let released = batch[..done.processed].iter().filter(|p| p.ingress).count();
        self.router.release(self.index, released);
        if !done.renegotiate {
            // Processed in this epoch: their records go with the effects.
            for p in &batch[..done.processed] {
                self.delete_record(kg, p.record);
            }
        }
        self.apply_effects(&address, kg, done.effects, trace.as_ref());
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
                self.delete_record(kg, p.record);
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
                self.delete_record(kg, failed.record);
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
                let generation = self.generation;
                let waiting = address.clone();
                ctx.run_later(backoff, move |act, _| {
                    if act.generation != generation {
                        return;
                    }
                    // Still the slot it was set for: one that reuses the index of a slot
                    // removed meanwhile (`Reconfigure`) keeps its own backoff.
                    if let Some(slot) = act
                        .slots
                        .get_mut(i)
                        .filter(|s| s.retry_wait && s.address == waiting)
                    {
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
        if cut_ready {
            self.maybe_finish_cut();
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

impl Handler<Rollback> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Rollback, _: &mut Self::Context) {
        let why = || {
            ServiceError::Unavailable(format!(
                "the node rolled back to its last committed epoch {} (a failure elsewhere undid the epochs after it); retry with the same idempotency key",
                msg.committed
            ))
        };
        // Outputs of the abandoned epochs (those of committed ones were released before).
        self.router.set_holding(self.index, 0);
        for (_, h) in std::mem::take(&mut self.held) {
            match h {
                Held::Ack(tx) => {
                    let _ = tx.send(Err(why()));
                }
                Held::Reply(call, _) => {
                    self.router.complete_call(call, Err(why()));
                }
                Held::Egress(..) => {}
            }
        }
        for (_, calls) in std::mem::take(&mut self.keyed_waiters) {
            for c in calls {
                self.router.complete_call(c, Err(why()));
            }
        }
        self.invoke_spans.clear();
        let mut ingress = 0;
        for (_, slot) in std::mem::take(&mut self.slots) {
            ingress += slot.inbox.iter().filter(|p| p.ingress).count() + slot.in_flight_ingress;
            for r in slot.readers {
                let _ = r.send(Err(why()));
            }
            if slot.saturated {
                self.router
                    .set_saturated(self.index, &slot.address, false, 0);
            }
            // Dropping the slot drops the instance's last address: it stops.
        }
        self.router.release(self.index, ingress);
        self.by_addr.clear();
        self.ready.clear();
        self.dirty.clear();
        self.busy.clear();
        for o in &mut self.outgoing {
            o.clear();
        }
        self.remote_out.clear();
        self.parked.clear();
        self.behind.clear();
        self.stopped = None;
        self.moving_out.clear();
        self.zombies.clear();
        self.pending_writes = WriteBatch::default();
        self.cut = None;
        self.evict_blocked_at = None;
        self.generation = msg.generation;
        self.epoch = msg.base + 1;
        self.cuts = Cuts::new(self.index, self.router.shard_count(), msg.base);
        self.set_members(&msg.members, msg.base);
        tracing::debug!(shard = self.index, peers = ?self.peers, generation = msg.generation, base = msg.base, "shard rolled back");
        self.timers = Timers::default();
        self.idem = IdempotencyTable::default();
        self.load_from_store();
        // The committed epoch's pending messages first, then what shards that rolled back
        // first sent meanwhile. Those of key groups another node owns are carried for an
        // owner that takes no part now: parked (in every cut) until it is back.
        let (local, carried): (Vec<Envelope>, Vec<Envelope>) = msg
            .pending
            .into_iter()
            .partition(|e| self.router.placement().is_local(e.kg));
        for env in carried {
            tracing::trace!(
                shard = self.index,
                kg = env.kg,
                id = msg_id(&env.message),
                "pending at the rollback, carried"
            );
            self.route_env(env);
        }
        for env in &local {
            tracing::trace!(
                shard = self.index,
                kg = env.kg,
                id = msg_id(&env.message),
                "pending at the rollback, local"
            );
        }
        if !local.is_empty() {
            self.deliver(Deliver {
                versions: Vec::new(),
                batch: local,
                from: None,
                remote: None,
                generation: self.generation,
                ack: None,
            });
        } else {
            // The key groups' pending message records, queued by the reload.
            self.send_outgoing();
            self.dispatch_ready();
        }
        // What came early for this generation is taken now; for a newer one (this rollback
        // was overtaken: the next follows) it waits again; an older one's is dropped.
        let g = self.generation;
        for e in std::mem::take(&mut self.early) {
            let of = match &e {
                Early::Deliver(d) => d.generation,
                Early::Marker(m) => m.generation,
                Early::RemoteMarker(m) => m.generation,
            };
            match e {
                _ if of > g => self.early.push(e),
                Early::Deliver(d) if of == g => self.deliver(d),
                Early::Marker(m) if of == g => self.marker(m),
                Early::RemoteMarker(m) if of == g => self.remote_marker(m),
                _ => {}
            }
        }
    }
}

impl Handler<Reconfigure> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Reconfigure, _: &mut Self::Context) {
        if !self.checkpointing || msg.generation != self.generation {
            return;
        }
        let set = match self.stopped.take() {
            Some((at, set)) if at == msg.at => Some(set),
            Some(other) => {
                // Not this move's (a rollback came between): nothing to hand over.
                self.stopped = Some(other);
                return;
            }
            None => None,
        };
        // The participants may have changed (one that owns nothing joined).
        self.set_members(&msg.members, msg.at);
        if let Some(set) = set {
            let why = |a: &Address| {
                ServiceError::Unavailable(format!("{a} moved to another node; retry"))
            };
            let gone: Vec<usize> = self
                .slots
                .iter()
                .filter(|(_, s)| set.contains(&s.kg))
                .map(|(i, _)| i)
                .collect();
            let mut ingress = 0;
            for &i in &gone {
                let slot = &mut self.slots[i];
                self.by_addr.remove(&slot.address);
                tracing::trace!(shard = self.index, kg = slot.kg, ids = ?slot.inbox.iter().map(|p| msg_id(&p.message)).collect::<Vec<_>>(), in_flight = slot.in_flight, "moved away: inbox cleared");
                ingress += slot.inbox.iter().filter(|p| p.ingress).count();
                slot.inbox.clear();
                if slot.saturated {
                    slot.saturated = false;
                    self.router
                        .set_saturated(self.index, &slot.address, false, 0);
                }
                for r in std::mem::take(&mut slot.readers) {
                    let _ = r.send(Err(why(&slot.address)));
                }
                if slot.in_flight {
                    // Dropped when its batch returns (the slot index stays taken until then).
                    slot.in_busy_list = false;
                    slot.in_dirty_list = false;
                    self.zombies.insert(i);
                } else {
                    self.slots.remove(i);
                }
            }
            self.router.release(self.index, ingress);
            // Messages kept here for a moving key group (parked for an owner that took no
            // part, or held for this node's table to catch up) were pending at the move's cut,
            // which came before they could be kept now (a stopped key group's messages go to
            // `moving_out`): its new owner read them from this node's part. A copy kept would
            // be delivered again (released, or read again from every later cut's part).
            let dropped = forget_handed_over(&mut self.parked, &mut self.behind, &set);
            if !dropped.is_empty() {
                tracing::debug!(shard = self.index, ids = ?dropped, "moved away: parked or held messages handed over with their key groups");
            }
            let gone: FxHashSet<usize> = gone.into_iter().collect();
            self.ready.retain(|i| !gone.contains(i));
            self.busy.retain(|i| !gone.contains(i));
            self.dirty.retain(|i| !gone.contains(i));
            // Their delayed messages and idempotency records are in sled at `at` (or not
            // here at all any more): loaded again for those this node serves now.
            self.timers.drop_key_groups(&set);
            self.idem.drop_key_groups(&set);
            let placement = self.router.placement().clone();
            let mine: Vec<u32> = self
                .owned_key_groups()
                .filter(|kg| set.contains(kg) && placement.is_local(*kg))
                .collect();
            self.load_key_groups(&mine);
            // Keyed calls waiting for a first call's reply of a key group that moved: that
            // reply now comes from its new owner.
            let router = self.router.clone();
            let waiting: Vec<String> = self
                .keyed_waiters
                .keys()
                .filter(|scope| {
                    scope
                        .split('\u{1f}')
                        .next()
                        .and_then(|t| Address::parse(t).ok())
                        .is_some_and(|a| set.contains(&router.key_group(&a)))
                })
                .cloned()
                .collect();
            for scope in waiting {
                for c in self.keyed_waiters.remove(&scope).unwrap_or_default() {
                    self.router.complete_call(
                        c,
                        Err(ServiceError::Unavailable(
                            "its key group moved to another node before the call it waited for was answered; retry with the same idempotency key".into(),
                        )),
                    );
                }
            }
            tracing::debug!(
                shard = self.index,
                dropped = gone.len(),
                loaded = mine.len(),
                pending = msg.pending.len(),
                kept = self.moving_out.len(),
                "key groups handed over"
            );
        }
        // Pending at the stop, then what was kept since, in order.
        tracing::trace!(shard = self.index, pending = ?msg.pending.iter().map(|e| msg_id(&e.message)).collect::<Vec<_>>(), kept = ?self.moving_out.iter().map(|e| msg_id(&e.message)).collect::<Vec<_>>(), "after a live move: pending and kept messages");
        for env in msg.pending {
            self.enqueue(env);
        }
        for env in std::mem::take(&mut self.moving_out) {
            self.route_env(env);
        }
        self.send_outgoing();
        self.dispatch_ready();
    }
}

/// Drops the parked and held (`behind`) messages of key groups in `set`; returns their ids.
fn forget_handed_over(
    parked: &mut Vec<Envelope>,
    behind: &mut Vec<(u64, Envelope)>,
    set: &FxHashSet<u32>,
) -> Vec<String> {
    let mut dropped = Vec::new();
    let mut keep = |e: &Envelope| {
        let keep = !set.contains(&e.kg);
        if !keep {
            dropped.push(msg_id(&e.message).to_string());
        }
        keep
    };
    parked.retain(|e| keep(e));
    behind.retain(|(_, e)| keep(e));
    dropped
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(kg: u32, id: &str) -> Envelope {
        Envelope {
            target: Address::parse("a/b/c").unwrap(),
            kg,
            caller: None,
            message: TypedValue::new("json", format!("{{\"id\":\"{id}\"}}")),
            ingress: false,
            key: None,
            trace: None,
        }
    }

    /// A message listed before its idempotency key was checked (in flight across a cut, kept
    /// for a move, parked for an absent owner) keeps its key through an epoch object and a
    /// replay, so the replay checks it (a review found it dropped: a rollback or a move then
    /// applied a message whose key's first message had been applied since). One without a key
    /// comes back without one.
    #[test]
    fn a_message_listed_before_its_key_was_checked_keeps_it_through_a_replay() {
        let mut e = env(5, "m");
        e.key = Some("k-1".into());
        let bytes = prost::Message::encode_to_vec(&pending_envelope(&e));
        let listed = <PendingMessage as prost::Message>::decode(bytes.as_slice()).unwrap();
        let back = crate::node::envelopes(vec![(5, listed)]).pop().unwrap();
        assert_eq!(back.key.as_deref(), Some("k-1"));
        assert_eq!(
            (back.target, back.kg, back.message),
            (e.target, 5, e.message)
        );
        let plain = crate::node::envelopes(vec![(5, pending_envelope(&env(5, "n")))]);
        assert_eq!(plain[0].key, None);
    }

    /// A message pending at a cut is listed by the first cut that finds it, recorded once by
    /// the second (in that cut's delta, numbered from the counter given), and left alone by
    /// every later one.
    #[test]
    fn a_pending_message_is_listed_once_then_recorded_once() {
        let cut = |epoch| Cut {
            epoch,
            ops: Vec::new(),
            pending: Vec::new(),
            awaiting: FxHashMap::default(),
            markers_done: true,
            recorded: 0,
        };
        let target: Arc<str> = "a/b/c".into();
        let (mut record, mut seen, mut n) = (None, false, 7);
        let msg = || {
            pending_message(
                &Address::parse("a/b/c").unwrap(),
                None,
                &env(5, "m").message,
            )
        };
        let mut c1 = cut(10);
        Shard::note_pending(&mut c1, &mut n, 5, &target, 1, &mut record, &mut seen, msg);
        assert_eq!((c1.pending.len(), c1.ops.len(), record, n), (1, 0, None, 7));
        let mut c2 = cut(11);
        Shard::note_pending(&mut c2, &mut n, 5, &target, 1, &mut record, &mut seen, msg);
        assert!(c2.pending.is_empty());
        let seq = Seq { epoch: 11, n: 7 };
        assert_eq!((record, n, c2.recorded), (Some(seq), 8, 1));
        match &c2.ops[..] {
            [Change::Raw(k, Some(v))] => {
                assert_eq!(k, &pending_key(5, seq));
                let m = <PendingMessage as prost::Message>::decode(v.as_slice()).unwrap();
                assert_eq!(m, msg());
            }
            other => panic!("{other:?}"),
        }
        let mut c3 = cut(12);
        Shard::note_pending(&mut c3, &mut n, 5, &target, 1, &mut record, &mut seen, msg);
        assert!(c3.pending.is_empty() && c3.ops.is_empty());
        assert_eq!(n, 8);
        // Records sort as numbered: by epoch, then number.
        assert!(pending_key(5, seq) < pending_key(5, Seq { epoch: 11, n: 8 }));
        assert!(pending_key(5, Seq { epoch: 11, n: 9 }) < pending_key(5, Seq { epoch: 12, n: 0 }));
    }

    /// A hand-over drops the messages this node kept for the moving key groups (their new
    /// owner read them from this node's part at the move's cut) and keeps the others.
    #[test]
    fn a_hand_over_forgets_the_parked_and_held_messages_of_the_moving_key_groups_only() {
        let mut parked = vec![env(1, "p1"), env(2, "p2"), env(3, "p3")];
        let mut behind = vec![(7, env(2, "b2")), (7, env(4, "b4"))];
        let set: FxHashSet<u32> = [2, 4].into_iter().collect();
        let dropped = forget_handed_over(&mut parked, &mut behind, &set);
        assert_eq!(dropped, ["p2", "b2", "b4"]);
        let kgs = |v: &[Envelope]| v.iter().map(|e| e.kg).collect::<Vec<_>>();
        assert_eq!(kgs(&parked), [1, 3]);
        assert!(behind.is_empty());
        let none = forget_handed_over(&mut parked, &mut behind, &FxHashSet::default());
        assert!(none.is_empty());
        assert_eq!(kgs(&parked), [1, 3]);
    }
}
