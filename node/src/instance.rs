//! Function instances as actix actors (DESIGN.md: "Instances are actix actors").
//!
//! One actor per active address, on its shard's arbiter. The shard hands it a batch of the
//! address's queued messages plus the address's state; the actor invokes the function for
//! each message in order and hands back the state, the collected effects and how many
//! messages succeeded. A failing or panicking invocation is rolled back and stops the batch,
//! so the shard can retry it with backoff without breaking FIFO order. actix stays inside
//! this module and the shard: nothing else depends on it.
//!
//! An instance keeps its actor for as long as the shard caches its state, so an actor must be
//! cheap to keep: it holds only its slot and generation. What it needs per batch comes with
//! the batch (its address and function) or is shared by every instance on the shard's thread
//! (the shard's address, the invocation histogram, the undo buffer).

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use prometheus::local::LocalHistogram;
use statemesh_sdk::{Address, Context as FnContext, Effects, Expiration, StateSlot, Undo};

use crate::registry::{FunctionEntry, FunctionKind};
use crate::remote::Outcome;
use crate::shard::{InvokeDone, Pending, Shard};

/// A batch for the instance.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Invoke {
    pub address: Address,
    pub entry: Arc<FunctionEntry>,
    pub batch: Vec<Pending>,
    pub state: Vec<StateSlot>,
    pub now_ms: u64,
    /// The `traceparent` of the batch's first traced message's `invoke` span (a remote call
    /// carries it).
    pub traceparent: Option<String>,
}

pub(crate) struct Instance {
    slot: usize,
    /// The shard's generation when it started this instance (its results are dropped after a
    /// rollback).
    generation: u64,
}

impl Instance {
    pub fn new(slot: usize, generation: u64) -> Self {
        Instance { slot, generation }
    }
}

/// A thread's copies of the per-type histograms, by entry address (the entry is kept alive).
type TypeHists = rustc_hash::FxHashMap<usize, (Arc<FunctionEntry>, Rc<LocalHistogram>)>;

/// What the instances on a shard's thread share.
struct ShardLocal {
    shard: Addr<Shard>,
    hist: Rc<LocalHistogram>,
    /// This thread's copies of the per-type histograms, by entry.
    per_type: RefCell<TypeHists>,
    /// Undo records of the invocation under way (kept for its capacity).
    undo: RefCell<Vec<Undo>>,
}

thread_local! {
    static LOCAL: RefCell<Option<Rc<ShardLocal>>> = const { RefCell::new(None) };
}

/// Called by a shard when it starts on its arbiter thread: the instances it starts there
/// answer it and record their invocation times in `hist`.
pub(crate) fn shard_started(shard: Addr<Shard>, hist: Rc<LocalHistogram>) {
    LOCAL.with(|l| {
        *l.borrow_mut() = Some(Rc::new(ShardLocal {
            shard,
            hist,
            per_type: RefCell::default(),
            undo: RefCell::default(),
        }))
    });
}

/// Adds this thread's per-type invocation times to the types' histograms (the shard calls
/// it when it folds its metrics).
pub(crate) fn flush_per_type() {
    LOCAL.with(|l| {
        if let Some(local) = l.borrow().as_ref() {
            for (_, h) in local.per_type.borrow().values() {
                h.flush();
            }
        }
    });
}

/// This thread's copy of `entry`'s histogram.
fn type_hist(local: &ShardLocal, entry: &Arc<FunctionEntry>) -> Rc<LocalHistogram> {
    local
        .per_type
        .borrow_mut()
        .entry(Arc::as_ptr(entry) as usize)
        .or_insert_with(|| (entry.clone(), Rc::new(entry.latency.local())))
        .1
        .clone()
}

fn local() -> Rc<ShardLocal> {
    LOCAL.with(|l| {
        l.borrow()
            .clone()
            .expect("an instance runs on the thread of the shard that started it")
    })
}

impl Actor for Instance {
    type Context = Context<Self>;
}

/// Applies TTL bookkeeping before an invocation: expired values become absent (and are
/// deleted on the next flush); values that expire after invoke get a fresh deadline.
fn refresh_ttl(state: &mut [StateSlot], now_ms: u64) {
    for s in state.iter_mut() {
        if s.value.is_none() {
            continue;
        }
        if s.expires_at_ms != 0 && now_ms >= s.expires_at_ms {
            s.value = None;
            s.expires_at_ms = 0;
            s.dirty = true;
        } else if let Expiration::AfterInvoke(ttl) = s.expiration {
            s.expires_at_ms = now_ms + ttl.as_millis() as u64;
            s.dirty = true;
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("function panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("function panicked: {s}")
    } else {
        "function panicked".to_string()
    }
}

impl Handler<Invoke> for Instance {
    type Result = ();

    fn handle(&mut self, msg: Invoke, _: &mut Self::Context) {
        let Invoke {
            address,
            entry,
            batch,
            mut state,
            now_ms,
            traceparent,
        } = msg;
        refresh_ttl(&mut state, now_ms);
        let (slot, generation) = (self.slot, self.generation);
        let local = local();
        match &entry.kind {
            FunctionKind::Embedded(function) => {
                // `sleep(ms)`: a slow function, for the tests (messages queue up behind it).
                let _ = crate::failpoint::eval("function-invoke");
                let mut effects = Effects::default();
                let mut processed = 0;
                let mut failure = None;
                let mut undo = std::mem::take(&mut *local.undo.borrow_mut());
                let per_type = type_hist(&local, &entry);
                for p in &batch {
                    let start = Instant::now();
                    let mut ctx = FnContext::new(
                        &address,
                        p.caller.as_ref(),
                        now_ms,
                        &mut state,
                        &mut effects,
                        &mut undo,
                    );
                    let result =
                        catch_unwind(AssertUnwindSafe(|| function.invoke(&mut ctx, &p.message)));
                    let took = start.elapsed().as_secs_f64();
                    local.hist.observe(took);
                    per_type.observe(took);
                    let error = match result {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(panic) => Some(panic_message(panic)),
                    };
                    if let Some(e) = error {
                        ctx.rollback();
                        failure = Some(e);
                        break;
                    }
                    processed += 1;
                }
                undo.clear();
                *local.undo.borrow_mut() = undo;
                local.shard.do_send(InvokeDone {
                    slot,
                    generation,
                    batch,
                    processed,
                    state,
                    effects,
                    failure,
                    batch_failure: None,
                    renegotiate: false,
                    remote_failed_attempts: 0,
                });
            }
            FunctionKind::Remote(remote) => {
                let remote = remote.clone();
                actix::spawn(async move {
                    let start = Instant::now();
                    let call = remote
                        .invoke(&address, &batch, &mut state, now_ms, traceparent.as_deref())
                        .await;
                    let took = start.elapsed().as_secs_f64();
                    local.hist.observe(took);
                    type_hist(&local, &entry).observe(took);
                    let mut done = InvokeDone {
                        slot,
                        generation,
                        processed: 0,
                        batch,
                        state,
                        effects: Effects::default(),
                        failure: None,
                        batch_failure: None,
                        renegotiate: false,
                        remote_failed_attempts: call.failed_attempts,
                    };
                    match call.outcome {
                        Outcome::Done(effects) => {
                            done.processed = done.batch.len();
                            done.effects = effects;
                        }
                        Outcome::NeedState(specs) => {
                            tracing::debug!(%address, states = ?specs.iter().map(|s| s.name.to_string()).collect::<Vec<_>>(), "remote function registered states");
                            entry.add_specs(specs);
                            done.renegotiate = true;
                        }
                        Outcome::Failed(reason) => done.batch_failure = Some(reason),
                    }
                    local.shard.do_send(done);
                });
            }
        }
    }
}
