//! The node's side of the mesh: which node owns which key group ([`Placement`], read by the
//! router on every ingress message), forwarding ingress to the owner, and the node-to-node
//! transport of the control group (`statemesh.mesh.v1.Mesh`: one stream per node pair,
//! carrying Raft messages as bytes, and the `Join` call).
//!
//! Forwarding runs on one batched stream per node pair (`Mesh/Forward`, per sending thread),
//! carrying `statemesh.v1` requests to the owner, which serves them as its own ingress would:
//! acknowledgements, replies and idempotency are the owner's, so they hold whichever node a
//! client reaches. A node that receives a forwarded request for a key group it does not own
//! answers `UNAVAILABLE` instead of forwarding again (its table and the sender's disagree
//! during a change; the client retries).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use statemesh_mesh::control::ClusterState;
use statemesh_mesh::placement::NodeId;
use statemesh_proto::mesh_v1 as mpb;
use statemesh_proto::v1 as pb;
use statemesh_sdk::{Address, TypedValue};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::error::ServiceError;

/// Where a key group's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// This node owns it.
    Local,
    /// Another node owns it.
    Remote {
        /// The owner.
        node: NodeId,
        /// Its gRPC address.
        addr: String,
    },
    /// No owner can serve it now (why).
    Unavailable(String),
}

/// The key-group table as this node last applied it.
#[derive(Debug, Default)]
struct Table {
    me: NodeId,
    owners: Vec<Option<NodeId>>,
    addrs: HashMap<NodeId, String>,
    /// A cluster of this node only: unassigned key groups are served here.
    lone: bool,
    /// This node is a member (its join applied).
    member: bool,
    /// The other members that own key groups (where egress records are produced).
    producers: Vec<(NodeId, String)>,
    /// The table's version (`placement_version` of the control group's state).
    version: u64,
    /// Each key group's ownership version (bumped by each of its moves).
    versions: Vec<u64>,
}

/// Who owns what, shared by the control task (writer) and the router (readers).
pub struct Placement {
    table: RwLock<Table>,
    /// A stream carrying messages between functions broke (messages may be lost): the
    /// participants must go back to the last committed epoch together. The newest shard
    /// generation it carried, plus one (0: none).
    fn_broken: std::sync::atomic::AtomicU64,
    /// Wakes the epoch driver when `fn_broken` is set (a permit is kept if it is not waiting).
    fn_broken_set: tokio::sync::Notify,
    channels: Mutex<HashMap<String, Channel>>,
    forwarders: Mutex<HashMap<String, Forwarder>>,
    /// The node's main runtime: connections to peers live there, whichever thread (gRPC,
    /// an HTTP worker) first needs them.
    rt: Option<tokio::runtime::Handle>,
    /// A live move under way: the key groups moving, and the epoch at whose cut the shards
    /// stop them. Requests for them are refused ([`ServiceError::NotOwner`]: routed again)
    /// until the move is done.
    moving: RwLock<Option<Moving>>,
    any_moving: std::sync::atomic::AtomicBool,
    /// Until when (in [`mono_ms`]) this node may serve its key groups: its ownership lease
    /// (`statemesh_mesh::failure::Lease`), kept by the control thread. `u64::MAX`: a
    /// cluster of this node alone.
    lease_until: std::sync::atomic::AtomicU64,
    /// The lease length, for messages.
    lease_ms: std::sync::atomic::AtomicU64,
}

/// Whether the fault point `mesh-partition` (tests) cuts this node's traffic with its peers
/// in this direction: `return` both ways, `return(in)` what peers send here, `return(out)`
/// what this node sends them. Checked where peer traffic enters and leaves (Raft and epoch
/// frames, forwarded requests, messages between functions, the answers to this node's
/// membership questions): a cut stream breaks, as with a real partition, and new ones are
/// refused.
pub(crate) fn cut_off(outbound: bool) -> bool {
    match crate::failpoint::eval("mesh-partition") {
        Ok(()) => false,
        Err(e) if e.ends_with(": in") => !outbound,
        Err(e) if e.ends_with(": out") => outbound,
        Err(_) => true,
    }
}

/// What a peer is told when this node is cut off by `mesh-partition`.
const CUT_OFF: &str = "this node is cut off from its peers (fault point mesh-partition)";

/// Milliseconds on this process's monotonic clock (leases and failure detection).
pub(crate) fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Key groups moving live: see [`Placement::set_moving`].
#[derive(Clone, Debug)]
pub(crate) struct Moving {
    /// The epoch at whose cut the shards stop them.
    pub at: u64,
    pub key_groups: Arc<rustc_hash::FxHashSet<u32>>,
}

impl Placement {
    /// An empty table of node `me` (routes nothing until [`Placement::update`]).
    pub(crate) fn new(me: NodeId) -> Self {
        Placement {
            table: RwLock::new(Table {
                me,
                ..Default::default()
            }),
            channels: Mutex::default(),
            forwarders: Mutex::default(),
            rt: tokio::runtime::Handle::try_current().ok(),
            fn_broken: Default::default(),
            fn_broken_set: tokio::sync::Notify::new(),
            moving: RwLock::new(None),
            any_moving: Default::default(),
            lease_until: std::sync::atomic::AtomicU64::new(u64::MAX),
            lease_ms: Default::default(),
        }
    }

    /// Sets this node's ownership lease (see [`Placement::lease_refusal`]).
    pub(crate) fn set_lease(&self, until_ms: u64, lease_ms: u64) {
        self.lease_ms
            .store(lease_ms, std::sync::atomic::Ordering::Relaxed);
        self.lease_until
            .store(until_ms, std::sync::atomic::Ordering::Release);
    }

    /// Why this node must not serve key group `kg` now although its table names it the
    /// owner: its lease expired (it has not been confirmed by a majority of the cluster
    /// lately: cut off, paused, or declared dead). `None`: it may serve.
    pub(crate) fn lease_refusal(&self, kg: u32) -> Option<String> {
        let until = self.lease_until.load(std::sync::atomic::Ordering::Acquire);
        if until == u64::MAX || mono_ms() < until {
            return None;
        }
        let me = self.me();
        Some(format!(
            "node {me} cannot confirm that it still owns key group {kg}: no majority of the cluster has confirmed its ownership within the last {} ms (its ownership lease expired: it is cut off from the others, was paused, or was declared dead); retry, or call another node",
            self.lease_ms.load(std::sync::atomic::Ordering::Relaxed)
        ))
    }

    /// Starts (`Some`) or ends (`None`) a live move of key groups: from now until it ends,
    /// requests for them are refused here, and each shard stops them at its cut of the move's
    /// epoch.
    pub(crate) fn set_moving(&self, m: Option<Moving>) {
        let on = m.is_some();
        *self.moving.write() = m;
        self.any_moving
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// The live move under way, if any.
    pub(crate) fn moving(&self) -> Option<Moving> {
        self.moving.read().clone()
    }

    /// Whether key group `kg` is moving live now.
    pub(crate) fn is_moving(&self, kg: u32) -> bool {
        self.any_moving.load(std::sync::atomic::Ordering::Acquire)
            && self
                .moving
                .read()
                .as_ref()
                .is_some_and(|m| m.key_groups.contains(&kg))
    }

    /// The key groups a shard stops at its cut of epoch `epoch` (none unless a live move
    /// stops them there).
    pub(crate) fn stop_at(&self, epoch: u64) -> Option<Arc<rustc_hash::FxHashSet<u32>>> {
        if !self.any_moving.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.moving
            .read()
            .as_ref()
            .filter(|m| m.at == epoch)
            .map(|m| m.key_groups.clone())
    }

    /// The version of the key-group table applied here.
    pub(crate) fn version(&self) -> u64 {
        self.table.read().version
    }

    /// This node.
    pub(crate) fn me(&self) -> NodeId {
        self.table.read().me
    }

    /// A member's gRPC address.
    pub(crate) fn addr_of(&self, node: NodeId) -> Option<String> {
        self.table.read().addrs.get(&node).cloned()
    }

    /// Whether this node serves key group `kg` now.
    pub(crate) fn is_local(&self, kg: u32) -> bool {
        let t = self.table.read();
        match t.owners.get(kg as usize).copied().flatten() {
            Some(o) => o == t.me,
            None => t.lone,
        }
    }

    /// Key group `kg`'s ownership version here (0: unassigned, or no table yet).
    pub(crate) fn kg_version(&self, kg: u32) -> u64 {
        self.table
            .read()
            .versions
            .get(kg as usize)
            .copied()
            .unwrap_or(0)
    }

    /// After a node refused a request for key group `kg` forwarded at ownership version
    /// `used` because it does not own it at its version `theirs`: waits until routing again
    /// can reach the owner. If the refusing node's table is ahead, until this node's has
    /// caught up; if it is behind, a moment for it to catch up. False once `deadline` passed
    /// (the refusal goes to the client).
    pub(crate) async fn settle(
        &self,
        kg: u32,
        used: u64,
        theirs: u64,
        deadline: std::time::Instant,
    ) -> bool {
        if theirs <= used {
            tokio::time::sleep(Duration::from_millis(10)).await;
            return std::time::Instant::now() < deadline;
        }
        while std::time::Instant::now() < deadline {
            if self.kg_version(kg) >= theirs {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// The table's version and the owner of each key group (`None`: unassigned).
    pub(crate) fn owners(&self) -> (u64, Vec<Option<NodeId>>) {
        let t = self.table.read();
        (t.version, t.owners.clone())
    }

    /// The key groups this node serves now.
    pub(crate) fn owned(&self, key_groups: u32) -> Vec<u32> {
        (0..key_groups).filter(|&kg| self.is_local(kg)).collect()
    }

    /// Whether messages between functions may have been lost and no epoch driver has taken
    /// that yet.
    pub(crate) fn fn_broken(&self) -> bool {
        self.fn_broken.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// Messages between functions of shard generations up to `generation` may have been
    /// lost: the epoch driver is woken to tell the leader (it takes this with
    /// [`Placement::take_fn_broken`]).
    fn set_fn_broken(&self, generation: u64) {
        self.fn_broken.fetch_max(
            generation.saturating_add(1),
            std::sync::atomic::Ordering::AcqRel,
        );
        self.fn_broken_set.notify_one();
    }

    /// Resolves once [`Placement::set_fn_broken`] was called (since the last time it resolved).
    pub(crate) async fn fn_broken_set(&self) {
        self.fn_broken_set.notified().await
    }

    /// Whether a stream of messages between functions broke since the last call: the newest
    /// shard generation whose messages may have been lost (a rollback since, into a newer
    /// generation, has made up for those of older ones).
    pub(crate) fn take_fn_broken(&self) -> Option<u64> {
        self.fn_broken
            .swap(0, std::sync::atomic::Ordering::AcqRel)
            .checked_sub(1)
    }

    /// Replaces the table by the one of `state`.
    pub(crate) fn update(&self, state: &ClusterState) {
        let me = self.table.read().me;
        let bootstrapped = state.conf.as_ref().is_some_and(|c| !c.voters.is_empty());
        let t = Table {
            me,
            owners: state.owners(),
            addrs: state
                .members
                .values()
                .map(|m| (m.id, m.grpc_addr.clone()))
                .collect(),
            lone: bootstrapped && state.members.keys().all(|&id| id == me),
            member: state.members.contains_key(&me),
            version: state.placement_version,
            versions: state.table.iter().map(|o| o.version).collect(),
            producers: state
                .members
                .values()
                .filter(|m| m.id != me && state.owned_by(m.id) > 0)
                .map(|m| (m.id, m.grpc_addr.clone()))
                .collect(),
        };
        *self.table.write() = t;
    }

    /// Where key group `kg` is served.
    pub(crate) fn route(&self, kg: u32) -> Route {
        let t = self.table.read();
        match t.owners.get(kg as usize).copied().flatten() {
            Some(o) if o == t.me => Route::Local,
            Some(o) => match t.addrs.get(&o) {
                Some(a) => Route::Remote {
                    node: o,
                    addr: a.clone(),
                },
                None => Route::Unavailable(format!(
                    "key group {kg} is owned by node {o}, which is not a member; retry"
                )),
            },
            None if t.lone => Route::Local,
            None if !t.member => Route::Unavailable(
                "this node has not received the cluster's state yet (it is joining); retry".into(),
            ),
            None => Route::Unavailable(format!(
                "key group {kg} has no owner yet (the cluster is assigning key groups); retry"
            )),
        }
    }

    /// The other members whose functions produce egress records (they own key groups).
    pub(crate) fn producers(&self) -> Vec<(NodeId, String)> {
        self.table.read().producers.clone()
    }

    /// Whether this node is alone in the cluster it bootstrapped.
    pub(crate) fn is_lone(&self) -> bool {
        self.table.read().lone
    }

    /// Whether this node can route: it is a member, or alone in its cluster.
    pub(crate) fn ready(&self) -> bool {
        let t = self.table.read();
        t.member || t.lone
    }

    /// A lazily connected channel to a peer's gRPC address (one HTTP/2 connection). Called
    /// on a single-threaded runtime (an HTTP worker), the channel is that thread's own, so a
    /// forwarded request and its connection run on one thread and never wake another; on the
    /// node's main runtime it is shared.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, ServiceError> {
        thread_local! {
            static LOCAL: std::cell::RefCell<HashMap<String, Channel>> = Default::default();
        }
        let single = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if single {
            return LOCAL.with(|l| {
                if let Some(ch) = l.borrow().get(addr) {
                    return Ok(ch.clone());
                }
                let ch = endpoint(addr)
                    .map_err(|e| ServiceError::Internal(format!("peer address {addr:?}: {e}")))?
                    .connect_lazy();
                l.borrow_mut().insert(addr.to_string(), ch.clone());
                Ok(ch)
            });
        }
        let mut c = self.channels.lock();
        if let Some(ch) = c.get(addr) {
            return Ok(ch.clone());
        }
        let _guard = self.rt.as_ref().map(|h| h.enter());
        let ch = endpoint(addr)
            .map_err(|e| ServiceError::Internal(format!("peer address {addr:?}: {e}")))?
            .connect_lazy();
        c.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }
}

fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    // With `[tls]`: mutual TLS, the peer verified against the cluster's CA.
    let tls = crate::tls::mesh_client();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let e = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    match tls {
        Some(t) => e.tls_config(t),
        None => Ok(e),
    }
}

/// An error answered by another node, passed on as it came (same code, same text); a failed
/// connection (nothing was sent) as UNAVAILABLE naming the owner; a broken one (the request
/// may have been applied) as an error that says the outcome is unknown.
fn from_status(node: NodeId, addr: &str, s: Status) -> ServiceError {
    let text = error_chain(&s);
    let not_sent = [
        "tcp connect error",
        "error trying to connect",
        "Connection refused",
    ]
    .iter()
    .any(|m| text.contains(m));
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown if not_sent => {
            ServiceError::Unavailable(format!(
                "node {node} (at {addr}), the owner of this address, is unreachable ({text}); retry"
            ))
        }
        // A transport failure after sending (a status with a source), not the owner's answer.
        tonic::Code::Unavailable | tonic::Code::Unknown
            if std::error::Error::source(&s).is_some() =>
        {
            ServiceError::Forwarded(
                tonic::Code::Unknown,
                format!(
                    "the connection to node {node} (at {addr}), the owner of this address, broke ({text}): the request may or may not have been applied; retry with an idempotency key"
                ),
            )
        }
        code => ServiceError::Forwarded(code, s.message().to_string()),
    }
}

/// A status's message with the causes tonic keeps in its source chain.
fn error_chain(s: &Status) -> String {
    crate::error::with_causes(s.message().to_string(), std::error::Error::source(s))
}

/// Deadline of forwarded requests other than calls.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message a forwarding client or the mesh service accepts (replies and states can be
/// as large as the owner's limit allows).
const MAX_FORWARDED: usize = 256 << 20;

/// Forwards a `Send` to its owner (on the node-pair forwarding stream).
pub(crate) async fn forward_send(
    p: &Placement,
    node: NodeId,
    addr: &str,
    target: &Address,
    message: TypedValue,
    key: Option<String>,
    kg_version: u64,
) -> Result<(), ServiceError> {
    let (span, traceparent) = forward_span(target);
    let req = pb::SendRequest {
        target: Some(target.to_proto()),
        message: Some(message.to_proto()),
        idempotency_key: key.unwrap_or_default(),
        traceparent,
    };
    let f = p.forward(
        node,
        addr,
        (Kind::Send, req.encode_to_vec(), kg_version),
        FORWARD_TIMEOUT,
    );
    match span {
        Some(s) => tracing::Instrument::instrument(f, s).await,
        None => f.await,
    }
    .map(|_| ())
}

/// The `forward` span of a request this node sends to the owner of its key group, if the
/// request is traced, and the `traceparent` the owner continues it from (empty if not).
fn forward_span(target: &Address) -> (Option<tracing::Span>, String) {
    let Some(parent) = crate::telemetry::TraceParent::current() else {
        return (None, String::new());
    };
    let span = crate::telemetry::child("forward", &target.to_string(), &parent);
    let header = crate::telemetry::TraceParent::of(&span)
        .map(|t| t.header())
        .unwrap_or_default();
    (Some(span), header)
}

/// Queues a fire-and-forget `Send` for its owner (`node` at `addr`, owning the key group at
/// `kg_version`) at once, behind what this thread queued before (so that one thread's messages
/// keep their order), or refuses it when the stream's queue is full. A refusal by a node that
/// does not own the key group (nothing applied) sends it again through `router` once the
/// tables agree; any other failure after that is logged: nobody waits for it.
pub(crate) fn forward_send_now(
    router: &crate::router::Router,
    (node, addr, kg_version): (NodeId, &str, u64),
    target: &Address,
    message: TypedValue,
) -> Result<(), ServiceError> {
    let p = router.placement();
    let (span, traceparent) = forward_span(target);
    let req = pb::SendRequest {
        target: Some(target.to_proto()),
        message: Some(message.to_proto()),
        idempotency_key: String::new(),
        traceparent,
    };
    let f = p.forwarder(addr)?;
    let rt =
        p.rt.clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
            .ok_or_else(|| ServiceError::Unavailable("forwarding needs a tokio runtime".into()))?;
    let (tx, rx) = oneshot::channel();
    f.tx.try_send((Kind::Send, req.encode_to_vec(), kg_version, tx))
        .map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ServiceError::Overloaded(format!(
                "the forwarding queue to node {node} (at {addr}), the owner of {target}, is full ({FORWARD_QUEUE} requests); retry later"
            )),
            mpsc::error::TrySendError::Closed(_) => ServiceError::Unavailable(format!(
                "the forwarding stream to node {node} (at {addr}) stopped; retry"
            )),
        })?;
    let target = target.clone();
    let router = router.clone();
    rt.spawn(async move {
        // The `forward` span lasts until the owner answered.
        let _span = span;
        match rx.await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => match owner_version(&s) {
                Some((theirs, kg)) => {
                    let deadline = std::time::Instant::now() + Duration::from_secs(3);
                    router.placement().settle(kg, kg_version, theirs, deadline).await;
                    if let Err(e) = router.send_routed(target.clone(), message, None).await {
                        tracing::warn!(%target, error = %e, "a message refused by a node that no longer owns its key group could not be sent again");
                    }
                }
                None => {
                    tracing::warn!(%target, node, error = %s.message(), "a forwarded message was not accepted by its owner")
                }
            },
            Err(_) => {
                tracing::warn!(%target, node, "the forwarding stream stopped before the owner answered")
            }
        }
    });
    Ok(())
}

/// Forwards a `Call` to its owner (`node` at `addr`, owning the key group at `kg_version`);
/// the reply comes back on the same stream.
pub(crate) async fn forward_call(
    p: &Placement,
    (node, addr, kg_version): (NodeId, &str, u64),
    target: &Address,
    message: TypedValue,
    timeout: Duration,
    key: Option<String>,
) -> Result<TypedValue, ServiceError> {
    let (span, traceparent) = forward_span(target);
    let req = pb::CallRequest {
        target: Some(target.to_proto()),
        message: Some(message.to_proto()),
        timeout_ms: timeout.as_millis() as u64,
        idempotency_key: key.unwrap_or_default(),
        traceparent,
    };
    let f = p.forward(
        node,
        addr,
        (Kind::Call, req.encode_to_vec(), kg_version),
        timeout + Duration::from_secs(2),
    );
    let b = match span {
        Some(s) => tracing::Instrument::instrument(f, s).await,
        None => f.await,
    }?;
    pb::CallResponse::decode(b)
        .ok()
        .and_then(|r| r.reply)
        .map(TypedValue::from_proto)
        .ok_or_else(|| {
            ServiceError::Internal(format!("node {node} answered a call without a reply"))
        })
}

/// Pops the next record of `topic` at a peer (`None`: it has none, or cannot be reached).
pub(crate) async fn pop_remote_egress(
    p: &Placement,
    node: NodeId,
    addr: &str,
    topic: &str,
) -> Option<crate::egress::Read> {
    let mut c = mpb::mesh_client::MeshClient::new(p.channel(addr).ok()?)
        .max_decoding_message_size(MAX_FORWARDED);
    let mut req = Request::new(mpb::PopEgressRequest {
        topic: topic.to_string(),
    });
    // The peer answers once the record's removal is committed there.
    req.set_timeout(Duration::from_secs(30));
    match c.pop_egress(req).await {
        Ok(r) => {
            let r = r.into_inner();
            r.found.then(|| crate::egress::Read {
                value: if r.has_value {
                    TypedValue::new(r.typename, r.value)
                } else {
                    TypedValue::empty(r.typename)
                },
                id: (!r.id.is_empty()).then_some(r.id),
            })
        }
        Err(e) => {
            tracing::debug!(node, %addr, error = %e, "cannot read a peer's egress");
            None
        }
    }
}

/// Forwards messages of one owner as one batch (the owner waits for room for them), with the
/// ownership version each was routed by.
pub(crate) async fn forward_batch(
    p: &Placement,
    node: NodeId,
    addr: &str,
    messages: &[(Address, TypedValue, Option<String>)],
    kg_versions: Vec<u64>,
) -> Result<(), ServiceError> {
    let batch = pb::SendBatch {
        messages: messages
            .iter()
            .map(|(t, m, k)| pb::SendRequest {
                target: Some(t.to_proto()),
                message: Some(m.to_proto()),
                idempotency_key: k.clone().unwrap_or_default(),
                traceparent: String::new(),
            })
            .collect(),
    };
    let request = mpb::ForwardedBatch {
        batch: Some(batch),
        kg_versions,
    };
    p.forward(
        node,
        addr,
        (Kind::SendBatch, request.encode_to_vec(), 0),
        FORWARD_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// Reads an address's states at its owner.
pub(crate) async fn forward_get_state(
    p: &Placement,
    node: NodeId,
    addr: &str,
    address: &Address,
    kg_version: u64,
) -> Result<Vec<(String, TypedValue, u64)>, ServiceError> {
    let req = pb::GetStateRequest {
        address: Some(address.to_proto()),
    };
    let b = p
        .forward(
            node,
            addr,
            (Kind::GetState, req.encode_to_vec(), kg_version),
            FORWARD_TIMEOUT,
        )
        .await?;
    let r = pb::GetStateResponse::decode(b).map_err(|e| {
        ServiceError::Internal(format!(
            "node {node} answered a state read that does not decode: {e}"
        ))
    })?;
    Ok(r.values
        .into_iter()
        .map(|v| {
            (
                v.name,
                v.value
                    .map(TypedValue::from_proto)
                    .unwrap_or_else(|| TypedValue::empty(String::new())),
                v.expires_at_ms,
            )
        })
        .collect())
}

/// An address's states as `statemesh.v1` values.
pub(crate) fn state_values(values: Vec<(String, TypedValue, u64)>) -> Vec<pb::StateValue> {
    values
        .into_iter()
        .map(|(name, v, exp)| pb::StateValue {
            name,
            value: Some(v.to_proto()),
            expires_at_ms: exp,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The forwarding stream: one per node pair (per sending thread), batched both ways.

use mpb::forward_request::Kind;
use prost::Message as _;

/// A forwarded request's reply: the encoded response, or the owner's status.
type ReplyTx = oneshot::Sender<Result<bytes::Bytes, Status>>;

/// Requests queued per forwarding stream before callers wait (flow control).
const FORWARD_QUEUE: usize = 4096;
/// Requests or replies per frame.
const FRAME: usize = 256;

/// A request to forward: its kind, encoded request and key-group ownership version.
type Outgoing = (Kind, Vec<u8>, u64);

/// The sending side of a forwarding stream to one peer.
#[derive(Clone)]
pub(crate) struct Forwarder {
    tx: mpsc::Sender<(Kind, Vec<u8>, u64, ReplyTx)>,
}

/// The metadata keys of a refusal by a node that does not own the request's key group: its
/// ownership version, and the key group.
const OWNER_VERSION: &str = "x-statemesh-owner-version";
const OWNER_KEY_GROUP: &str = "x-statemesh-key-group";

/// The status a forwarded request's refusal by a node that does not own its key group
/// travels as, from the stream's task to the waiting caller.
fn not_owner_status(message: String, version: u64, key_group: u32) -> Status {
    let mut s = Status::unavailable(message);
    s.metadata_mut()
        .insert(OWNER_VERSION, tonic::metadata::MetadataValue::from(version));
    s.metadata_mut().insert(
        OWNER_KEY_GROUP,
        tonic::metadata::MetadataValue::from(key_group),
    );
    s
}

/// The refusing node's ownership version and the key group, if `s` is a refusal by a node
/// that does not own the request's key group.
fn owner_version(s: &Status) -> Option<(u64, u32)> {
    let get = |k: &str| {
        s.metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    Some((get(OWNER_VERSION)?, get(OWNER_KEY_GROUP)? as u32))
}

impl Forwarder {
    /// Starts the stream's task on `rt` (connecting on the first request, reconnecting after
    /// a failure).
    fn start(addr: String, channel: Channel, rt: &tokio::runtime::Handle) -> Forwarder {
        let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
        rt.spawn(forwarder_task(addr, channel, rx));
        Forwarder { tx }
    }
}

async fn forwarder_task(
    addr: String,
    channel: Channel,
    mut rx: mpsc::Receiver<(Kind, Vec<u8>, u64, ReplyTx)>,
) {
    let mut next_id = 1u64;
    let mut backoff = Duration::from_millis(20);
    loop {
        let Some(first) = rx.recv().await else { return };
        let (ftx, frx) = mpsc::channel::<mpb::ForwardFrame>(64);
        let mut client = mpb::mesh_client::MeshClient::new(channel.clone())
            .max_decoding_message_size(MAX_FORWARDED)
            .max_encoding_message_size(MAX_FORWARDED);
        let mut pending: HashMap<u64, ReplyTx> = HashMap::new();
        let mut queue = vec![first];
        let stream = client
            .forward(tokio_stream::wrappers::ReceiverStream::new(frx))
            .await;
        let mut replies = match stream {
            Ok(r) => r.into_inner(),
            Err(s) => {
                // Nothing was sent: everything queued fails as the connection did.
                while let Ok(r) = rx.try_recv() {
                    queue.push(r);
                }
                for (_, _, _, reply) in queue {
                    let _ = reply.send(Err(s.clone()));
                }
                // Until the next attempt, requests fail at once as this one did (the caller
                // retries, and reaches a new owner as soon as its table names one), rather
                // than wait out the backoff.
                let until = tokio::time::Instant::now() + backoff;
                loop {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some((_, _, _, reply))) => {
                            let _ = reply.send(Err(s.clone()));
                        }
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        let broke: Status = 'stream: loop {
            if !queue.is_empty() {
                if cut_off(true) {
                    // Not sent: they fail as a refused connection would.
                    break 'stream Status::unavailable(CUT_OFF);
                }
                while queue.len() < FRAME {
                    match rx.try_recv() {
                        Ok(r) => queue.push(r),
                        Err(_) => break,
                    }
                }
                let mut requests = Vec::with_capacity(queue.len());
                for (kind, request, kg_version, reply) in queue.drain(..) {
                    let id = next_id;
                    next_id += 1;
                    pending.insert(id, reply);
                    requests.push(mpb::ForwardRequest {
                        id,
                        kind: kind as i32,
                        request: request.into(),
                        kg_version,
                    });
                }
                if ftx.send(mpb::ForwardFrame { requests }).await.is_err() {
                    break 'stream Status::unavailable("the forwarding stream closed");
                }
            }
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => queue.push(r),
                    None => return,
                },
                m = replies.message() => match m {
                    Ok(Some(frame)) => {
                        for r in frame.replies {
                            if let Some(tx) = pending.remove(&r.id) {
                                let _ = tx.send(if r.code == 0 {
                                    Ok(r.response)
                                } else if r.not_owner {
                                    Err(not_owner_status(r.message, r.owner_version, r.key_group))
                                } else {
                                    Err(Status::new(tonic::Code::from(r.code), r.message))
                                });
                            }
                        }
                    }
                    Ok(None) => break 'stream Status::unavailable("the owner closed the forwarding stream"),
                    Err(s) => break 'stream s,
                },
            }
        };
        tracing::debug!(%addr, error = %broke, pending = pending.len(), "forwarding stream broke; reconnecting");
        // Sent and unanswered: their outcome is unknown.
        for (_, tx) in pending.drain() {
            let _ = tx.send(Err(Status::unknown(format!(
                "the forwarding stream broke ({}): the request may or may not have been applied",
                broke.message()
            ))));
        }
        for (_, _, _, tx) in queue.drain(..) {
            let _ = tx.send(Err(broke.clone()));
        }
    }
}

impl Placement {
    /// Sends a request on the forwarding stream to `addr` and waits (up to `timeout`) for the
    /// owner's answer.
    async fn forward(
        &self,
        node: NodeId,
        addr: &str,
        (kind, request, kg_version): Outgoing,
        timeout: Duration,
    ) -> Result<bytes::Bytes, ServiceError> {
        let f = self.forwarder(addr)?;
        let (tx, rx) = oneshot::channel();
        if f.tx.send((kind, request, kg_version, tx)).await.is_err() {
            return Err(ServiceError::Unavailable(format!(
                "the forwarding stream to node {node} (at {addr}) stopped; retry"
            )));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(b))) => Ok(b),
            Ok(Ok(Err(s)))
                if s.code() == tonic::Code::Unknown
                    && s.message().starts_with("the forwarding stream") =>
            {
                Err(ServiceError::Forwarded(
                    tonic::Code::Unknown,
                    format!("node {node} (at {addr}), the owner of this address: {}; retry with an idempotency key", s.message()),
                ))
            }
            Ok(Ok(Err(s))) => match owner_version(&s) {
                Some((version, key_group)) => Err(ServiceError::NotOwner {
                    key_group,
                    version,
                    message: s.message().to_string(),
                }),
                None => Err(from_status(node, addr, s)),
            },
            Ok(Err(_)) => Err(ServiceError::Unavailable(format!(
                "the forwarding stream to node {node} (at {addr}) stopped; retry"
            ))),
            Err(_) => Err(ServiceError::Timeout(timeout.as_millis() as u64)),
        }
    }

    /// The forwarding stream to `addr`: the calling thread's own on a single-threaded runtime
    /// (an HTTP worker), else the node's shared one.
    fn forwarder(&self, addr: &str) -> Result<Forwarder, ServiceError> {
        thread_local! {
            static LOCAL: std::cell::RefCell<HashMap<String, Forwarder>> = Default::default();
        }
        let current = tokio::runtime::Handle::try_current().ok();
        let single = current
            .as_ref()
            .is_some_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        if let (true, Some(h)) = (single, current) {
            let ch = self.channel(addr)?;
            return Ok(LOCAL.with(|l| {
                let mut l = l.borrow_mut();
                match l.get(addr) {
                    Some(f) if !f.tx.is_closed() => f.clone(),
                    _ => {
                        let f = Forwarder::start(addr.to_string(), ch, &h);
                        l.insert(addr.to_string(), f.clone());
                        f
                    }
                }
            }));
        }
        let rt = self
            .rt
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
            .ok_or_else(|| ServiceError::Unavailable("forwarding needs a tokio runtime".into()))?;
        let ch = self.channel(addr)?;
        let mut m = self.forwarders.lock();
        match m.get(addr) {
            Some(f) if !f.tx.is_closed() => Ok(f.clone()),
            _ => {
                let f = Forwarder::start(addr.to_string(), ch, &rt);
                m.insert(addr.to_string(), f.clone());
                Ok(f)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Messages between functions on different nodes: one stream per sending shard and peer
// (FIFO per shard pair, as the cut needs), unbounded (a function's messages are never
// refused: refusing could deadlock a cycle of functions; the checkpoint back-pressure bounds
// what is in flight), not answered. A broken stream may have lost messages: the node asks
// the leader to roll every participant back to the last committed epoch.

/// What a shard sends a peer.
pub(crate) use mpb::forward_request::Kind as FnKind;

/// The sending side of a shard's stream to one peer.
#[derive(Clone)]
struct FnForwarder {
    tx: mpsc::UnboundedSender<(Kind, u64, Vec<u8>)>,
}

/// Takes the next item not sent by a generation at or below `poisoned`.
async fn next_unpoisoned(
    rx: &mut mpsc::UnboundedReceiver<(Kind, u64, Vec<u8>)>,
    poisoned: Option<u64>,
) -> Option<(Kind, u64, Vec<u8>)> {
    loop {
        let r = rx.recv().await?;
        if poisoned.is_none_or(|p| r.1 > p) {
            return Some(r);
        }
        tracing::trace!(
            generation = r.1,
            ?poisoned,
            "message to a peer dropped: its stream broke in this generation"
        );
    }
}

/// Sends the messages and markers that this thread's shards address to one peer, in order,
/// on one stream. When the stream breaks, what was in it may be lost: everything the same
/// generations of senders queue afterwards is dropped too (the stream stays *poisoned* until
/// the participants roll back together and take a newer generation), so that no marker of
/// theirs reaches the peer after a lost message (the peer would complete a cut without it).
async fn fn_forwarder_task(
    addr: String,
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<(Kind, u64, Vec<u8>)>,
    placement: std::sync::Weak<Placement>,
) {
    let mut next_id = 1u64;
    let mut poisoned: Option<u64> = None;
    // A frame that never left a stream the peer ended by stopping: the first of the next.
    let mut resend: Option<mpb::ForwardFrame> = None;
    let mut newest = 0;
    loop {
        let mut queue = Vec::new();
        if resend.is_none() {
            let Some(first) = next_unpoisoned(&mut rx, poisoned).await else {
                return;
            };
            newest = first.1;
            queue.push(first);
        }
        let (ftx, frx) = mpsc::channel::<mpb::ForwardFrame>(64);
        let mut client = mpb::mesh_client::MeshClient::new(channel.clone())
            .max_decoding_message_size(MAX_FORWARDED)
            .max_encoding_message_size(MAX_FORWARDED);
        // The response stays open as long as the stream (dropping it would end the stream).
        // It tells how the stream ended: `Some(id)` when the peer's process stopped, having
        // read every request through `id` (see `serve_forward`).
        let mut call = tokio::spawn(async move {
            let r = client
                .forward(tokio_stream::wrappers::ReceiverStream::new(frx))
                .await;
            let mut replies = match r {
                Ok(r) => r.into_inner(),
                Err(e) => return read_through(&e),
            };
            loop {
                match replies.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(e) => return read_through(&e),
                }
            }
        });
        // The last request id handed to this stream (0: none yet).
        let mut sent_through = 0u64;
        // How the stream ended, once known.
        let mut ended: Option<Option<u64>> = None;
        // A stream the peer's process ended by stopping, having read everything sent on it,
        // lost nothing: what comes next is for the next process at that address (a new
        // stream, without a rollback). A process that took part in the epochs is declared
        // dead then, and everyone rolls back; one drained first (`Mesh.Drain`) took no part
        // any more and owned nothing. Any other end, or a stop before it read everything, may
        // have lost messages: the stream is poisoned and the participants roll back.
        let let_go = |ended: Option<u64>, sent_through: u64| ended == Some(sent_through);
        let broke = loop {
            let frame = match resend.take() {
                Some(f) => f,
                None => {
                    while queue.len() < FRAME {
                        match rx.try_recv() {
                            Ok(r) if poisoned.is_none_or(|p| r.1 > p) => queue.push(r),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    let requests = queue
                        .drain(..)
                        .map(|(kind, gen, request)| {
                            next_id += 1;
                            newest = newest.max(gen);
                            mpb::ForwardRequest {
                                id: next_id,
                                kind: kind as i32,
                                request: request.into(),
                                // Rerouted by the receiver itself when its table is ahead (see
                                // `Shard::deliver`); a rollback drops what an older table sent.
                                kg_version: 0,
                            }
                        })
                        .collect();
                    mpb::ForwardFrame { requests }
                }
            };
            if let Err(e) = crate::failpoint::eval("mesh-fn-stream-break") {
                // The frame is lost with the connection.
                break Some(e);
            }
            if cut_off(true) {
                break Some(CUT_OFF.to_string());
            }
            let last = frame.requests.last().map_or(sent_through, |r| r.id);
            if let Err(e) = ftx.send(frame).await {
                let end = match ended {
                    Some(end) => end,
                    None => (&mut call).await.unwrap_or(None),
                };
                if let_go(end, sent_through) {
                    // This frame never left: it is the first of the next stream.
                    resend = Some(e.0);
                    break None;
                }
                break Some("the stream closed".to_string());
            }
            sent_through = last;
            // Waiting for the next message, a stream the peer ends is looked at at once.
            let next = if ended.is_none() {
                tokio::select! {
                    r = next_unpoisoned(&mut rx, poisoned) => Some(r),
                    end = &mut call => {
                        let end = end.unwrap_or(None);
                        ended = Some(end);
                        if let_go(end, sent_through) {
                            tracing::debug!(%addr, "the peer stopped, having read everything sent to it: its stream of messages between functions ended");
                            break None;
                        }
                        // (Found out by the next send, as before.)
                        None
                    }
                }
            } else {
                None
            };
            let next = match next {
                Some(r) => r,
                None => next_unpoisoned(&mut rx, poisoned).await,
            };
            match next {
                Some(r) => queue.push(r),
                None => return,
            }
        };
        call.abort();
        let Some(broke) = broke else {
            continue;
        };
        poisoned = Some(newest);
        tracing::warn!(%addr, error = %broke, generation = newest, "a stream of messages between functions broke; the participants go back to the last committed epoch (until then, this generation's messages to the peer are dropped)");
        if let Some(p) = placement.upgrade() {
            p.set_fn_broken(newest);
        }
    }
}

impl Placement {
    /// Queues a shard's messages or marker (of the shard's `generation`) for the peer at
    /// `addr` on this thread's stream.
    pub(crate) fn send_fn(
        self: &Arc<Self>,
        addr: &str,
        kind: Kind,
        generation: u64,
        bytes: Vec<u8>,
    ) {
        thread_local! {
            static LOCAL: std::cell::RefCell<HashMap<String, FnForwarder>> = Default::default();
            /// Peers this thread could not open a stream to, with the newest generation that
            /// lost a message for them.
            static FAILED: std::cell::RefCell<HashMap<String, u64>> = Default::default();
        }
        if FAILED.with(|f| f.borrow().get(addr).is_some_and(|&g| generation <= g)) {
            tracing::trace!(%addr, generation, "message to a peer dropped: its stream could not be opened in this generation");
            return;
        }
        let f = LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            match l.get(addr) {
                Some(f) if !f.tx.is_closed() => Some(f.clone()),
                _ => {
                    let ch = self.channel(addr).ok()?;
                    let (tx, rx) = mpsc::unbounded_channel();
                    let h = tokio::runtime::Handle::try_current()
                        .ok()
                        .or_else(|| self.rt.clone())?;
                    h.spawn(fn_forwarder_task(
                        addr.to_string(),
                        ch,
                        rx,
                        Arc::downgrade(self),
                    ));
                    let f = FnForwarder { tx };
                    l.insert(addr.to_string(), f.clone());
                    Some(f)
                }
            }
        });
        match f {
            Some(f) => {
                let _ = f.tx.send((kind, generation, bytes));
            }
            None => {
                FAILED.with(|f| f.borrow_mut().insert(addr.to_string(), generation));
                tracing::warn!(%addr, "no stream to a peer for messages between functions");
                self.set_fn_broken(generation);
            }
        }
    }
}

/// Encodes a shard's messages for a peer, each with its key group's ownership version in
/// `p`'s table.
pub(crate) fn shard_messages(
    p: &Placement,
    from_node: NodeId,
    from_shard: usize,
    generation: u64,
    batch: Vec<crate::router::Envelope>,
) -> Vec<u8> {
    let t = p.table.read();
    mpb::ShardMessages {
        from_node,
        from_shard: from_shard as u32,
        generation,
        messages: batch
            .into_iter()
            .map(|e| mpb::ShardEnvelope {
                kg_version: t.versions.get(e.kg as usize).copied().unwrap_or(0),
                target: Some(e.target.to_proto()),
                caller: e.caller.map(|c| c.to_proto()),
                message: Some(e.message.to_proto()),
                idempotency_key: e.key.map(String::from).unwrap_or_default(),
                traceparent: e.trace.map(|t| t.header()).unwrap_or_default(),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// Encodes a shard's marker for a peer.
pub(crate) fn shard_marker(
    from_node: NodeId,
    from_shard: usize,
    generation: u64,
    epoch: u64,
) -> Vec<u8> {
    mpb::ShardMarker {
        from_node,
        from_shard: from_shard as u32,
        generation,
        epoch,
    }
    .encode_to_vec()
}

/// Hands a peer's shard messages or marker to the local shards, in the stream's order.
fn take_fn(router: &crate::router::Router, r: &mpb::ForwardRequest) -> Result<(), ServiceError> {
    match Kind::try_from(r.kind) {
        Ok(Kind::Deliver) => {
            let m = mpb::ShardMessages::decode(r.request.clone()).map_err(bad)?;
            let mut batch = Vec::with_capacity(m.messages.len());
            for e in m.messages {
                let (t, v) = parts(e.target, e.message)?;
                let caller = match e.caller {
                    Some(c) => Some(Address::from_proto(&c)?),
                    None => None,
                };
                let key = Some(e.idempotency_key).filter(|k| !k.is_empty());
                let trace = crate::telemetry::TraceParent::parse(&e.traceparent)
                    .filter(|(_, sampled)| *sampled)
                    .map(|(p, _)| Box::new(p));
                batch.push((t, caller, v, e.kg_version, key, trace));
            }
            router.deliver_remote((m.from_node, m.from_shard), m.generation, batch);
            Ok(())
        }
        Ok(Kind::Marker) => {
            let m = mpb::ShardMarker::decode(r.request.clone()).map_err(bad)?;
            router.remote_marker((m.from_node, m.from_shard), m.generation, m.epoch);
            Ok(())
        }
        _ => Err(ServiceError::Internal("not a shard message".into())),
    }
}

/// Serves one forwarding stream: each request runs as its own task (as if it had come to this
/// node's ingress, but never forwarded again), replies go back batched in frames.
pub(crate) fn serve_forward(
    router: crate::router::Router,
    mut inbound: Streaming<mpb::ForwardFrame>,
    closing: tokio::sync::watch::Receiver<bool>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<mpb::ForwardReplyFrame, Status>> + Send>> {
    let (rtx, rrx) = mpsc::channel::<mpb::ForwardReply>(FORWARD_QUEUE);
    // Set when this process stops reading: the id of the last request it read, plus one.
    let stopped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stopping = stopped.clone();
    tokio::spawn(async move {
        // Once the node stopping committed its last epoch, no more requests are read: the
        // reply stream ends when those under way have answered, with `STOPPING` and the id of
        // the last request read (the sender of messages between functions learns that this
        // process is gone, and whether anything it sent was not read: see
        // `fn_forwarder_task`).
        let stop = closed(closing);
        tokio::pin!(stop);
        let mut last_read = 0u64;
        loop {
            let next = tokio::select! {
                f = inbound.next() => f,
                _ = &mut stop => {
                    stopping.store(last_read + 1, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            };
            let frame = match next {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "a forwarding stream ended");
                    return;
                }
                None => return,
            };
            if cut_off(false) {
                // Lost with the connection.
                return;
            }
            if let Some(r) = frame.requests.last() {
                last_read = last_read.max(r.id);
            }
            for r in frame.requests {
                let id = r.id;
                if matches!(Kind::try_from(r.kind), Ok(Kind::Deliver | Kind::Marker)) {
                    // Between functions: taken in the stream's order, not answered.
                    if let Err(e) = take_fn(&router, &r) {
                        tracing::warn!(error = %e, "a peer sent a shard message that does not decode; disconnected");
                        return;
                    }
                    continue;
                }
                // Sends and calls are queued here, in the stream's order (a sender's messages
                // keep their order); waiting for their acknowledgements and replies, and the
                // other kinds, run as tasks.
                let work = start_one(&router, r);
                let rtx = rtx.clone();
                tokio::spawn(async move {
                    let reply = match work.await {
                        Ok(response) => mpb::ForwardReply {
                            id,
                            code: 0,
                            message: String::new(),
                            response: response.into(),
                            ..Default::default()
                        },
                        Err(e) => {
                            let (not_owner, owner_version, key_group) = match e {
                                ServiceError::NotOwner {
                                    version, key_group, ..
                                } => (true, version, key_group),
                                _ => (false, 0, 0),
                            };
                            mpb::ForwardReply {
                                id,
                                code: e.grpc_code() as i32,
                                message: e.to_string(),
                                response: Default::default(),
                                not_owner,
                                owner_version,
                                key_group,
                            }
                        }
                    };
                    let _ = rtx.send(reply).await;
                });
            }
        }
    });
    Box::pin(futures::stream::unfold(
        Some((rrx, stopped)),
        |state| async move {
            let (mut rrx, stopped) = state?;
            let Some(first) = rrx.recv().await else {
                let read = stopped.load(std::sync::atomic::Ordering::SeqCst);
                return (read > 0).then(|| {
                    (
                        Err(Status::unavailable(format!(
                            "{STOPPING}{READ_THROUGH}{}",
                            read - 1
                        ))),
                        None,
                    )
                });
            };
            let mut replies = vec![first];
            while replies.len() < FRAME {
                match rrx.try_recv() {
                    Ok(r) => replies.push(r),
                    Err(_) => break,
                }
            }
            Some((Ok(mpb::ForwardReplyFrame { replies }), Some((rrx, stopped))))
        },
    ))
}

/// The `forwarded` span of a request another node forwarded here, if it is traced.
fn forwarded_span(target: &Address, traceparent: &str) -> Option<tracing::Span> {
    if !crate::telemetry::enabled() {
        return None;
    }
    let (parent, sampled) = crate::telemetry::TraceParent::parse(traceparent)?;
    sampled.then(|| crate::telemetry::child("forwarded", &target.to_string(), &parent))
}

/// `f` boxed, inside `span` if there is one (the span ends when `f` does).
fn traced<F>(
    f: F,
    span: Option<tracing::Span>,
) -> futures::future::BoxFuture<'static, Result<Vec<u8>, ServiceError>>
where
    F: std::future::Future<Output = Result<Vec<u8>, ServiceError>> + Send + 'static,
{
    use futures::FutureExt;
    match span {
        Some(s) => tracing::Instrument::instrument(f, s).boxed(),
        None => f.boxed(),
    }
}

/// Starts one forwarded request: a `Send` or `Call` is checked and queued at once (its
/// future waits for the outcome); the other kinds run entirely in the future.
fn start_one(
    router: &crate::router::Router,
    r: mpb::ForwardRequest,
) -> futures::future::BoxFuture<'static, Result<Vec<u8>, ServiceError>> {
    use futures::FutureExt;
    let now = match Kind::try_from(r.kind) {
        Ok(Kind::Send) => (|| {
            let q = pb::SendRequest::decode(r.request.clone()).map_err(bad)?;
            let (t, m) = parts(q.target, q.message)?;
            let key = Some(q.idempotency_key).filter(|k| !k.is_empty());
            let span = forwarded_span(&t, &q.traceparent);
            let _in = span.as_ref().map(|s| s.enter());
            let ack = router.send_forwarded_now(t, m, key, r.kg_version)?;
            Ok(traced(
                async move {
                    ack.await?;
                    Ok(pb::SendResponse {}.encode_to_vec())
                },
                span.clone(),
            ))
        })(),
        Ok(Kind::Call) => (|| {
            let q = pb::CallRequest::decode(r.request.clone()).map_err(bad)?;
            let (t, m) = parts(q.target, q.message)?;
            let key = Some(q.idempotency_key).filter(|k| !k.is_empty());
            let timeout = Duration::from_millis(q.timeout_ms.max(1));
            let span = forwarded_span(&t, &q.traceparent);
            let _in = span.as_ref().map(|s| s.enter());
            let reply = router.call_forwarded_now(t, m, timeout, key, r.kg_version)?;
            Ok(traced(
                async move {
                    let v = reply.await?;
                    Ok(pb::CallResponse {
                        reply: Some(v.to_proto()),
                    }
                    .encode_to_vec())
                },
                span.clone(),
            ))
        })(),
        _ => {
            let router = router.clone();
            return async move { serve_one(&router, r).await }.boxed();
        }
    };
    match now {
        Ok(f) => f,
        Err(e) => futures::future::ready(Err(e)).boxed(),
    }
}

/// A forwarded request that does not decode.
fn bad(e: prost::DecodeError) -> ServiceError {
    ServiceError::InvalidArgument(format!("a forwarded request does not decode: {e}"))
}

/// A forwarded message's target and value.
fn parts(
    t: Option<pb::Address>,
    m: Option<pb::TypedValue>,
) -> Result<(Address, TypedValue), ServiceError> {
    let t = t.ok_or_else(|| ServiceError::InvalidArgument("missing target address".into()))?;
    let m = m.ok_or_else(|| ServiceError::InvalidArgument("missing message".into()))?;
    Ok((Address::from_proto(&t)?, TypedValue::from_proto(m)))
}

/// The forwarded requests [`start_one`] does not queue at once: stream batches and state
/// reads.
async fn serve_one(
    router: &crate::router::Router,
    r: mpb::ForwardRequest,
) -> Result<Vec<u8>, ServiceError> {
    match Kind::try_from(r.kind) {
        Ok(Kind::Send | Kind::Call | Kind::Deliver | Kind::Marker) => Err(ServiceError::Internal(
            "sends, calls and shard messages are queued as the stream delivers them".into(),
        )),
        Ok(Kind::SendBatch) => {
            let q = mpb::ForwardedBatch::decode(r.request).map_err(bad)?;
            let messages = q.batch.map(|b| b.messages).unwrap_or_default();
            let mut batch = Vec::with_capacity(messages.len());
            for m in messages {
                let (t, v) = parts(m.target, m.message)?;
                batch.push((t, v, Some(m.idempotency_key).filter(|k| !k.is_empty())));
            }
            let accepted = router
                .send_batch_routed(batch, true, Some(&q.kg_versions))
                .await? as u64;
            Ok(pb::SendStreamSummary { accepted }.encode_to_vec())
        }
        Ok(Kind::GetState) => {
            let q = pb::GetStateRequest::decode(r.request).map_err(bad)?;
            let a = q
                .address
                .ok_or_else(|| ServiceError::InvalidArgument("missing address".into()))?;
            let values = router
                .get_state_routed(Address::from_proto(&a)?, Some(r.kg_version))
                .await?;
            Ok(pb::GetStateResponse {
                values: state_values(values),
            }
            .encode_to_vec())
        }
        Err(_) => Err(ServiceError::InvalidArgument(format!(
            "unknown forwarded request kind {}",
            r.kind
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// The control group's transport.

/// What the transport hands the control task.
pub(crate) enum ControlInput {
    /// Raft messages from a peer (checked to decode), with the address it serves on.
    Raft {
        from: NodeId,
        addr: String,
        msgs: Vec<bytes::Bytes>,
    },
    /// A node asks to join.
    Join {
        req: mpb::JoinRequest,
        reply: oneshot::Sender<Result<mpb::JoinReply, Status>>,
    },
    /// The stream to a peer failed (its messages since were dropped).
    Unreachable(NodeId),
    /// This node is asked to leave the cluster (`statemesh cluster leave`): answered once
    /// its `Leave` entry is proposed (the caller watches it go).
    Leave {
        reply: oneshot::Sender<Result<(), Status>>,
    },
    /// A peer asks whether a node is a member (`Mesh.Membership`): answered with this
    /// node's applied index and its applied members.
    Membership {
        id: NodeId,
        reply: oneshot::Sender<mpb::MembershipReply>,
    },
    /// A peer's applied control log (at `applied_index`) no longer lists this node: see
    /// `Driver::ask_if_removed`.
    RemovedAt { peer: NodeId, applied_index: u64 },
    /// This node stops (SIGTERM), its last epoch committed: answered once the group has taken
    /// its stop, or it gave up (see `Driver::stop_step`).
    Stopping { reply: oneshot::Sender<()> },
    /// This node stops (SIGTERM), before anything else: answered once the cluster has handed
    /// its key groups over and taken it out of the epochs, or it gave up (see
    /// `Driver::drain_step`).
    Draining { reply: oneshot::Sender<()> },
    /// A stopping member asks this node, as the leader, to drain it (`Mesh.Drain`).
    DrainAsk {
        id: NodeId,
        incarnation: u64,
        reply: oneshot::Sender<mpb::DrainReply>,
    },
    /// The leader's answer to this node's drain (`ask_drain`), or why there was none.
    DrainAnswer(Result<mpb::DrainReply, Status>),
    /// A stream from a peer began: its process is up, so this node's link to it, if it is
    /// waiting out its backoff, tries now ([`Link::wake`]), at the address the peer gives.
    PeerStream { from: NodeId, addr: String },
}

/// Capacity of the control task's inbox; beyond it peer messages are dropped (Raft resends).
pub(crate) const INBOX: usize = 4096;
/// Raft messages queued per peer link; beyond it they are dropped (Raft resends).
const LINK_QUEUE: usize = 1024;

/// The `statemesh.mesh.v1.Mesh` service.
pub(crate) struct MeshService {
    pub me: NodeId,
    pub cluster_id: Arc<str>,
    pub inbox: mpsc::Sender<ControlInput>,
    /// Epoch messages for the leader's side (this node's control thread).
    pub epochs: mpsc::UnboundedSender<crate::cluster::EpochRoute>,
    /// Epoch messages for this node's side (its checkpoint driver).
    pub driver: mpsc::UnboundedSender<crate::checkpoint::driver::DriverEvent>,
    pub router: crate::router::Router,
    /// Set once the node stopping has committed its last epoch: the streams peers opened to
    /// it end (they would keep the gRPC server's graceful shutdown waiting).
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl MeshService {
    /// A peer's question for the control task (`input` carries the reply), if it comes from
    /// this node's cluster; UNAVAILABLE when the task is busy, stopped, or silent for `wait`.
    async fn ask_control<T>(
        &self,
        cluster_id: &str,
        wait: Duration,
        input: impl FnOnce(oneshot::Sender<T>) -> ControlInput,
    ) -> Result<Response<T>, Status> {
        if cluster_id != &*self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "this node is a member of cluster {}, not {}",
                self.cluster_id, cluster_id
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.inbox
            .try_send(input(tx))
            .map_err(|_| Status::unavailable("the control group is busy or stopped"))?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => Ok(Response::new(r)),
            _ => Err(Status::unavailable("the control group did not answer")),
        }
    }
}

/// Resolves once `closing` is set (never, if its sender is gone without setting it).
async fn closed(mut closing: tokio::sync::watch::Receiver<bool>) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why a peer's stream ends when this node stops.
const STOPPING: &str = "the node is stopping (its last epoch committed)";
/// After [`STOPPING`], on a forwarding stream: the id of the last request read follows.
const READ_THROUGH: &str = "; requests read through id ";

/// The id of the last request a peer's stopping process read from a forwarding stream, from
/// the status that ended it (`None`: it did not end so).
fn read_through(status: &Status) -> Option<u64> {
    let m = status.message();
    let rest = m.strip_prefix(STOPPING)?.strip_prefix(READ_THROUGH)?;
    rest.parse().ok()
}

#[tonic::async_trait]
impl mpb::mesh_server::Mesh for MeshService {
    async fn peer(
        &self,
        req: Request<Streaming<mpb::PeerFrame>>,
    ) -> Result<Response<mpb::PeerAck>, Status> {
        let remote = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into());
        let mut s = req.into_inner();
        let mut from: Option<NodeId> = None;
        let stop = closed(self.closing.clone());
        tokio::pin!(stop);
        loop {
            let f = tokio::select! {
                f = s.next() => f,
                _ = &mut stop => return Err(Status::unavailable(STOPPING)),
            };
            let Some(f) = f else { break };
            if cut_off(false) {
                return Err(Status::unavailable(CUT_OFF));
            }
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(peer = ?from, %remote, error = %e, "mesh stream from a peer failed; disconnected");
                    return Err(e);
                }
            };
            let refuse = |why: String| {
                tracing::warn!(%remote, "refused a mesh stream: {why}");
                Err(Status::failed_precondition(why))
            };
            if f.cluster_id != *self.cluster_id {
                return refuse(format!(
                    "node {} belongs to cluster {:?}; this node ({}) to cluster {:?}",
                    f.from, f.cluster_id, self.me, self.cluster_id
                ));
            }
            if f.from == 0 || f.from == self.me || from.is_some_and(|x| x != f.from) {
                return refuse(format!(
                    "a frame names node {} as its sender (stream of {:?}, this node is {})",
                    f.from, from, self.me
                ));
            }
            if from.is_none() {
                let _ = self.inbox.try_send(ControlInput::PeerStream {
                    from: f.from,
                    addr: f.from_addr.clone(),
                });
            }
            from = Some(f.from);
            for b in &f.raft {
                if let Err(e) = statemesh_mesh::group::check_message(b) {
                    tracing::warn!(peer = f.from, %remote, error = %e, "a peer sent bytes that are not a Raft message; disconnected");
                    return Err(Status::invalid_argument(e));
                }
            }
            let mut epochs = Vec::with_capacity(f.epoch.len());
            for b in &f.epoch {
                match statemesh_mesh::epoch::EpochMsg::decode(b) {
                    Ok(m) => epochs.push(m),
                    Err(e) => {
                        tracing::warn!(peer = f.from, %remote, error = %e, "a peer sent bytes that are not an epoch message; disconnected");
                        return Err(Status::invalid_argument(e));
                    }
                }
            }
            for msg in epochs {
                if msg.to_leader() {
                    let _ = self.epochs.send(crate::cluster::EpochRoute::Send {
                        from: f.from,
                        to: self.me,
                        msg,
                    });
                } else {
                    let _ = self
                        .driver
                        .send(crate::checkpoint::driver::DriverEvent::Epoch { from: f.from, msg });
                }
            }
            if f.raft.is_empty() {
                continue;
            }
            // Full inbox: dropped (Raft resends), never blocks the stream's reader for long.
            let _ = self.inbox.try_send(ControlInput::Raft {
                from: f.from,
                addr: f.from_addr,
                msgs: f.raft,
            });
        }
        Ok(Response::new(mpb::PeerAck {}))
    }

    type ForwardStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<mpb::ForwardReplyFrame, Status>> + Send>,
    >;

    async fn forward(
        &self,
        req: Request<Streaming<mpb::ForwardFrame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        if cut_off(false) {
            return Err(Status::unavailable(CUT_OFF));
        }
        Ok(Response::new(serve_forward(
            self.router.clone(),
            req.into_inner(),
            self.closing.clone(),
        )))
    }

    async fn pop_egress(
        &self,
        req: Request<mpb::PopEgressRequest>,
    ) -> Result<Response<mpb::PopEgressReply>, Status> {
        let topic = req.into_inner().topic;
        Ok(Response::new(
            match self.router.pop_local_egress(&topic).await {
                Some(r) => mpb::PopEgressReply {
                    found: true,
                    typename: r.value.typename().to_string(),
                    has_value: r.value.has_value(),
                    value: r.value.value().clone(),
                    id: r.id.unwrap_or_default(),
                },
                None => mpb::PopEgressReply::default(),
            },
        ))
    }

    async fn membership(
        &self,
        req: Request<mpb::MembershipRequest>,
    ) -> Result<Response<mpb::MembershipReply>, Status> {
        if cut_off(false) {
            return Err(Status::unavailable(CUT_OFF));
        }
        let req = req.into_inner();
        self.ask_control(&req.cluster_id, Duration::from_secs(5), |reply| {
            ControlInput::Membership { id: req.id, reply }
        })
        .await
    }

    async fn drain(
        &self,
        req: Request<mpb::DrainRequest>,
    ) -> Result<Response<mpb::DrainReply>, Status> {
        if cut_off(false) {
            return Err(Status::unavailable(CUT_OFF));
        }
        if let Err(e) = crate::failpoint::eval("mesh-drain-ask") {
            return Err(if e.contains("unimplemented") {
                Status::unimplemented(e)
            } else {
                Status::unavailable(e)
            });
        }
        let req = req.into_inner();
        self.ask_control(&req.cluster_id, Duration::from_secs(2), |reply| {
            ControlInput::DrainAsk {
                id: req.id,
                incarnation: req.incarnation,
                reply,
            }
        })
        .await
    }

    async fn join(
        &self,
        req: Request<mpb::JoinRequest>,
    ) -> Result<Response<mpb::JoinReply>, Status> {
        let req = req.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument(
                "node id 0 is reserved; use a positive integer",
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.inbox
            .send(ControlInput::Join { req, reply: tx })
            .await
            .map_err(|_| Status::unavailable("the control group stopped"))?;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(r)) => r.map(Response::new),
            Ok(Err(_)) => Err(Status::unavailable(
                "the join was not applied (leadership changed); retry",
            )),
            Err(_) => Err(Status::unavailable(
                "the join was not applied within 10 s; retry",
            )),
        }
    }
}

/// The sending side of the stream to one peer.
pub(crate) struct Link {
    pub addr: String,
    tx: mpsc::Sender<Out>,
    task: tokio::task::JoinHandle<()>,
    /// Cuts the link's backoff short ([`Link::wake`]).
    wake: Arc<tokio::sync::Notify>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often a link that stays down says so again.
const LINK_DOWN_REPEAT: Duration = Duration::from_secs(60);
/// How long a link fails before it says it is down.
const LINK_DOWN_AFTER: Duration = Duration::from_millis(1500);
/// A link's first retry after it breaks (or after a connect); each next one waits twice as
/// long, up to 1 s.
const LINK_FIRST_RETRY: Duration = Duration::from_millis(50);
/// How long a stream carries frames (from its first) before a link that was down counts as
/// up again.
const LINK_PROVEN: Duration = Duration::from_secs(1);

/// A link's outage (pure bookkeeping): when it says it is down, and that it is up again.
#[derive(Default)]
struct Outage {
    /// While the link is down: failed attempts, since the first, and when it was last said
    /// (a peer killed for good was worth a warning a second, for as long as it stayed a
    /// member).
    down: Option<(u64, std::time::Instant, Option<std::time::Instant>)>,
}

impl Outage {
    /// A stream has carried frames for `LINK_PROVEN`: the outage is over. The attempts it took,
    /// if it was said.
    fn up(&mut self) -> Option<u64> {
        match self.down.take() {
            Some((attempts, _, Some(_))) => Some(attempts),
            _ => None,
        }
    }

    /// An attempt failed at `now`; its stream had lived `lived` (from its first frame, or from
    /// the connect if it carried none; zero if the connect failed). Returns whether an outage
    /// that was said is over (the stream lived `LINK_PROVEN`: what ended it is a new outage),
    /// and whether to say that the link is down now (the attempts so far): once it has failed
    /// for `LINK_DOWN_AFTER`, whether connecting fails or the peer refuses the stream, then
    /// every `LINK_DOWN_REPEAT`.
    fn failed(&mut self, now: std::time::Instant, lived: Duration) -> (Option<u64>, Option<u64>) {
        let up = if lived >= LINK_PROVEN {
            self.up()
        } else {
            None
        };
        let (attempts, since, said) = self.down.get_or_insert((0, now, None));
        *attempts += 1;
        let say = now.saturating_duration_since(*since) >= LINK_DOWN_AFTER
            && said.is_none_or(|t| now.saturating_duration_since(t) >= LINK_DOWN_REPEAT);
        if say {
            *said = Some(now);
        }
        (up, say.then_some(*attempts))
    }
}

/// How long a link's stream lived: from its first frame to its end, or from the connect if it
/// ended before its first frame was queued (an idle link: noticed only at that frame).
fn stream_lived(
    connected: std::time::Instant,
    first_sent: Option<std::time::Instant>,
    ended: std::time::Instant,
) -> Duration {
    let from = first_sent.filter(|f| *f <= ended).unwrap_or(connected);
    ended.saturating_duration_since(from)
}

/// A link's wait before it tries again: `backoff`, or less if it is woken meanwhile (its
/// peer's stream arrived). Only a wake while it waits counts (one from before is not kept).
/// True if it was woken.
async fn backoff_sleep(backoff: Duration, wake: &tokio::sync::Notify) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff) => false,
        _ = wake.notified() => true,
    }
}

/// What a link carries.
enum Out {
    Raft(bytes::Bytes),
    Epoch(bytes::Bytes),
    /// An empty frame: the stream begins ([`Link::hello`]).
    Hello,
}

impl Link {
    /// Queues a Raft message; false if the queue is full (the message is dropped).
    pub fn send(&self, msg: bytes::Bytes) -> bool {
        self.tx.try_send(Out::Raft(msg)).is_ok()
    }

    /// Queues an epoch message; false if the queue is full (dropped: the leader synchronises
    /// again when an epoch stalls).
    pub fn send_epoch(&self, msg: bytes::Bytes) -> bool {
        self.tx.try_send(Out::Epoch(msg)).is_ok()
    }

    /// Begins the stream with an empty frame: a process that starts says so to its peers,
    /// whose links to it may be waiting out a backoff of up to 1 s ([`Link::wake`]).
    pub fn hello(&self) {
        let _ = self.tx.try_send(Out::Hello);
    }

    /// A stream from the peer arrived: its process is up. If the link is waiting out its
    /// backoff (up to 1 s after a long outage), it tries now. A peer's streams come at most
    /// as often as its own link retries, so a peer that sends but refuses this node's stream
    /// is not asked more often than that.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Starts the stream from `me` to `peer` at `addr`; reconnects with backoff, and reports
    /// each failure to the control task (`ControlInput::Unreachable`).
    pub fn start(
        me: NodeId,
        my_addr: String,
        cluster_id: Arc<str>,
        peer: NodeId,
        addr: String,
        inbox: mpsc::Sender<ControlInput>,
    ) -> Link {
        let (tx, mut rx) = mpsc::channel::<Out>(LINK_QUEUE);
        let a = addr.clone();
        let wake = Arc::new(tokio::sync::Notify::new());
        let woken = wake.clone();
        let task = tokio::spawn(async move {
            let mut backoff = LINK_FIRST_RETRY;
            let mut outage = Outage::default();
            loop {
                let connected = if cut_off(true) {
                    Err(CUT_OFF.to_string())
                } else {
                    connect(&a).await
                };
                let (err, lived) = match connected {
                    Err(e) => (e, Duration::ZERO),
                    Ok(ch) => {
                        // Soon again after a connect (a link with nothing to send never
                        // proves itself, and an election waits for it).
                        backoff = LINK_FIRST_RETRY;
                        let connected_at = std::time::Instant::now();
                        let mut first_sent: Option<std::time::Instant> = None;
                        let mut proven = false;
                        let (ftx, frx) = mpsc::channel::<mpb::PeerFrame>(8);
                        let mut client = mpb::mesh_client::MeshClient::new(ch);
                        // (When it ended: the link notices only at its next frame.)
                        let call = tokio::spawn(async move {
                            let r = client
                                .peer(tokio_stream::wrappers::ReceiverStream::new(frx))
                                .await;
                            (r, std::time::Instant::now())
                        });
                        // Frames until the stream breaks or the link is dropped.
                        loop {
                            let Some(first) = rx.recv().await else {
                                call.abort();
                                return;
                            };
                            let (mut raft, mut epoch) = (Vec::new(), Vec::new());
                            let mut next = Some(first);
                            let mut n = 0;
                            while let Some(m) = next.take() {
                                match m {
                                    Out::Raft(b) => raft.push(b),
                                    Out::Epoch(b) => epoch.push(b),
                                    Out::Hello => {}
                                }
                                n += 1;
                                if n < 256 {
                                    next = rx.try_recv().ok();
                                }
                            }
                            if cut_off(true) {
                                call.abort();
                                break;
                            }
                            let frame = mpb::PeerFrame {
                                from: me,
                                cluster_id: cluster_id.to_string(),
                                from_addr: my_addr.clone(),
                                raft,
                                epoch,
                            };
                            let sending = std::time::Instant::now();
                            if ftx.send(frame).await.is_err() {
                                break;
                            }
                            // Up once the stream has carried frames for a while from its
                            // first: an outage that was reported is over. Not at the connect:
                            // a peer may take the connection and refuse the stream (cut off,
                            // stopping, of another cluster) at its first frame. ("Carried"
                            // is "queued": a peer that is hung, its TCP still accepting,
                            // counts as up until the keep-alive gives up on it.)
                            let first = *first_sent.get_or_insert(sending);
                            if !proven && first.elapsed() >= LINK_PROVEN && !call.is_finished() {
                                proven = true;
                                if let Some(attempts) = outage.up() {
                                    tracing::info!(peer, addr = %a, attempts, "mesh link to a peer is up again");
                                }
                            }
                        }
                        let (err, ended) = match call.await {
                            Ok((Err(s), t)) => (format!("{}: {}", s.code(), s.message()), t),
                            Ok((Ok(_), t)) => ("stream closed".to_string(), t),
                            Err(_) => ("stream closed".to_string(), std::time::Instant::now()),
                        };
                        (err, stream_lived(connected_at, first_sent, ended))
                    }
                };
                let (up, say) = outage.failed(std::time::Instant::now(), lived);
                if let Some(attempts) = up {
                    tracing::info!(peer, addr = %a, attempts, "mesh link to a peer is up again");
                }
                match say {
                    Some(attempts) => {
                        tracing::warn!(peer, addr = %a, error = %err, attempts, "mesh link to a peer is down; reconnecting (said again every {} s while it stays down)", LINK_DOWN_REPEAT.as_secs())
                    }
                    None => {
                        tracing::debug!(peer, addr = %a, error = %err, "mesh link down; reconnecting")
                    }
                }
                let _ = inbox.try_send(ControlInput::Unreachable(peer));
                // What queued meanwhile is stale: Raft resends what still matters.
                while rx.try_recv().is_ok() {}
                if backoff_sleep(backoff, &woken).await {
                    tracing::info!(peer, addr = %a, "mesh link to a peer tries again at once: the peer's stream arrived");
                    backoff = LINK_FIRST_RETRY;
                } else {
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        });
        Link {
            addr,
            tx,
            task,
            wake,
        }
    }
}

async fn connect(addr: &str) -> Result<Channel, String> {
    endpoint(addr)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {}", crate::error::error_chain(&e)))
}

/// Asks the leader (`addr`) to drain this node (`Mesh.Drain`), within 1 s; the answer, or why
/// there was none, goes to the control task (`ControlInput::DrainAnswer`). Traffic is cut as
/// with `mesh-partition`.
pub(crate) async fn ask_drain(
    req: mpb::DrainRequest,
    addr: String,
    inbox: mpsc::Sender<ControlInput>,
) {
    let answer = if cut_off(true) {
        Err(Status::unavailable(CUT_OFF))
    } else {
        let ask = async {
            let ch = connect(&addr).await.map_err(Status::unavailable)?;
            mpb::mesh_client::MeshClient::new(ch)
                .drain(req)
                .await
                .map(|r| r.into_inner())
        };
        match tokio::time::timeout(Duration::from_secs(1), ask).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the leader ({addr}) did not answer within 1 s"
            ))),
        }
    };
    let _ = inbox.send(ControlInput::DrainAnswer(answer)).await;
}

/// Asks `peers` (id, gRPC address) at once whether node `me` is still a member, within 2 s in
/// all; one whose applied control log is past `applied_index` and no longer lists `me` is
/// reported to the control task (`ControlInput::RemovedAt`). Traffic is cut as with
/// `mesh-partition` (the answers are what peers send here).
pub(crate) async fn ask_if_removed(
    me: NodeId,
    cluster_id: Arc<str>,
    applied_index: u64,
    peers: Vec<(NodeId, String)>,
    inbox: mpsc::Sender<ControlInput>,
) {
    if cut_off(true) {
        return;
    }
    let asks = peers.into_iter().map(|(peer, addr)| {
        let cluster_id = cluster_id.to_string();
        async move {
            let ask = async {
                let mut c = mpb::mesh_client::MeshClient::new(connect(&addr).await?);
                c.membership(mpb::MembershipRequest { cluster_id, id: me })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| crate::error::error_chain(&e))
            };
            match tokio::time::timeout(Duration::from_secs(2), ask).await {
                Ok(Ok(r)) => Some((peer, r)),
                Ok(Err(e)) => {
                    tracing::debug!(peer, %addr, error = %e, "cannot ask a peer about this node's membership");
                    None
                }
                Err(_) => {
                    tracing::debug!(peer, %addr, "a peer did not answer about this node's membership within 2 s");
                    None
                }
            }
        }
    });
    let answers = futures::future::join_all(asks).await;
    if cut_off(false) {
        return;
    }
    let removed = answers
        .into_iter()
        .flatten()
        .filter(|(_, r)| !r.member && r.applied_index > applied_index)
        .max_by_key(|(_, r)| r.applied_index);
    if let Some((peer, r)) = removed {
        let _ = inbox
            .send(ControlInput::RemovedAt {
                peer,
                applied_index: r.applied_index,
            })
            .await;
    }
}

/// Why a join did not succeed.
#[derive(Debug)]
pub(crate) struct JoinError {
    /// What happened, naming the addresses.
    pub message: String,
    /// A member refused (the node is not a member).
    pub refused: bool,
    /// A leader may have applied the join although no answer came (a call timed out or broke
    /// after reaching a member).
    pub maybe_applied: bool,
}

impl std::fmt::Display for JoinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Asks the cluster at `seeds` to let node `req.id` join, following redirects to the leader,
/// for up to `patience`. Returns the accepting reply, or why it was refused or unreachable.
pub(crate) async fn join(
    seeds: &[String],
    req: mpb::JoinRequest,
    patience: Duration,
) -> Result<mpb::JoinReply, JoinError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut last = String::from("no address tried");
    let mut maybe_applied = false;
    loop {
        let mut targets: Vec<String> = seeds.to_vec();
        let mut i = 0;
        while i < targets.len() && i < 16 {
            let addr = targets[i].clone();
            i += 1;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let ch = match tokio::time::timeout(left, connect(&addr)).await {
                Ok(Ok(ch)) => ch,
                Ok(Err(e)) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("{addr}: no answer");
                    continue;
                }
            };
            let mut c = mpb::mesh_client::MeshClient::new(ch);
            let mut r = Request::new(req.clone());
            r.set_timeout(left.max(Duration::from_millis(100)));
            match c.join(r).await {
                Ok(rep) => {
                    let rep = rep.into_inner();
                    if rep.accepted {
                        return Ok(rep);
                    }
                    match leader_to_ask(&req, &rep) {
                        Some(leader) => {
                            last = format!("{addr}: not the leader (node {} is)", rep.leader);
                            targets.insert(i, leader);
                        }
                        None if rep.leader == req.id => {
                            last = format!(
                                "{addr}: it still names this node (restarting) as the leader"
                            );
                        }
                        None => last = format!("{addr}: the cluster has no leader yet"),
                    }
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition
                            | tonic::Code::AlreadyExists
                            | tonic::Code::InvalidArgument
                    ) =>
                {
                    return Err(JoinError {
                        message: format!("refused by {addr}: {}", s.message()),
                        refused: true,
                        maybe_applied: false,
                    });
                }
                Err(s) => {
                    maybe_applied = true;
                    last = format!("{addr}: {}", s.message());
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(JoinError {
                message: format!(
                    "no member of the cluster at {} accepted the join within {} s (last: {last})",
                    seeds.join(","),
                    patience.as_secs()
                ),
                refused: false,
                maybe_applied,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader a refused join names, to ask next; none if it names no leader, or this node
/// itself: a member restarting soon after it led still finds the others naming it, and its
/// own gRPC port, bound already but not serving yet, would hold the join until its deadline.
fn leader_to_ask(req: &mpb::JoinRequest, rep: &mpb::JoinReply) -> Option<String> {
    (rep.leader != 0
        && !rep.leader_addr.is_empty()
        && rep.leader != req.id
        && rep.leader_addr != req.grpc_addr)
        .then(|| rep.leader_addr.clone())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_link_says_it_is_down_after_a_while_then_every_minute_and_up_again_once() {
        use super::{Outage, LINK_DOWN_AFTER, LINK_DOWN_REPEAT, LINK_PROVEN};
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let refused = Duration::from_millis(5);
        // A peer that refuses the stream at once, asked every 60 ms: said once it has failed
        // for LINK_DOWN_AFTER, then not again within LINK_DOWN_REPEAT.
        let mut o = Outage::default();
        let mut said = Vec::new();
        for i in 0..2_000u64 {
            if let (None, Some(n)) = o.failed(at(i * 60), refused) {
                said.push((i * 60, n));
            }
        }
        let after = LINK_DOWN_AFTER.as_millis() as u64;
        let repeat = LINK_DOWN_REPEAT.as_millis() as u64;
        // (Both are multiples of 60 ms: the thresholds are reached exactly.)
        assert_eq!(after % 60 + repeat % 60, 0);
        assert_eq!(
            said,
            [
                (after, after / 60 + 1),
                (after + repeat, (after + repeat) / 60 + 1)
            ]
        );
        // Its stream then carries frames for LINK_PROVEN: up again, with the attempts.
        assert_eq!(o.up(), Some(2_000));
        assert_eq!(o.up(), None);
        // An outage that was not said is over silently.
        let mut o = Outage::default();
        assert_eq!(o.failed(at(0), Duration::ZERO), (None, None));
        assert_eq!(o.up(), None);
        // A stream that lived LINK_PROVEN (an idle link, noticed broken late) ends a said
        // outage, and starts a new one that waits LINK_DOWN_AFTER again.
        let mut o = Outage::default();
        o.failed(at(0), Duration::ZERO);
        assert_eq!(o.failed(at(after), Duration::ZERO), (None, Some(2)));
        assert_eq!(o.failed(at(after + 5_000), LINK_PROVEN), (Some(2), None));
        assert_eq!(o.failed(at(after + 5_100), Duration::ZERO), (None, None));
        assert_eq!(
            o.failed(at(2 * after + 5_000), Duration::ZERO),
            (None, Some(3))
        );
        // A peer that carries frames for less than LINK_PROVEN and breaks, again and again,
        // stays one outage and is said.
        let mut o = Outage::default();
        let short = LINK_PROVEN - Duration::from_millis(500);
        let flaps: Vec<_> = (0..10u64).map(|i| o.failed(at(i * 600), short)).collect();
        assert!(flaps.iter().all(|f| f.0.is_none()), "{flaps:?}");
        assert_eq!(
            flaps.iter().filter(|f| f.1.is_some()).count(),
            1,
            "{flaps:?}"
        );
    }

    #[test]
    fn a_stream_lives_from_its_first_frame_or_from_the_connect_if_it_had_none() {
        use super::stream_lived;
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Refused at its first frame.
        assert_eq!(
            stream_lived(at(0), Some(at(5)), at(7)),
            Duration::from_millis(2)
        );
        // Carried frames from 5 ms to 1,505 ms.
        assert_eq!(
            stream_lived(at(0), Some(at(5)), at(1_505)),
            Duration::from_millis(1_500)
        );
        // Idle: never a frame, ended after 30 s.
        assert_eq!(
            stream_lived(at(0), None, at(30_000)),
            Duration::from_secs(30)
        );
        // Idle, ended after 30 s, its end noticed when its first frame was queued later.
        assert_eq!(
            stream_lived(at(0), Some(at(31_000)), at(30_000)),
            Duration::from_secs(30)
        );
    }

    /// A link waiting out its backoff tries again as soon as its peer's stream arrives, not
    /// up to 1 s later; a wake from before it began to wait is not kept (a peer's steady
    /// traffic would otherwise take its backoff away).
    #[tokio::test]
    async fn a_link_waiting_out_its_backoff_is_woken_by_its_peers_stream() {
        use super::backoff_sleep;
        use std::time::{Duration, Instant};
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        wake.notify_waiters();
        let t = Instant::now();
        assert!(!backoff_sleep(Duration::from_millis(200), &wake).await);
        assert!(t.elapsed() >= Duration::from_millis(200));
        let w = wake.clone();
        let waker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            w.notify_waiters();
        });
        let t = Instant::now();
        assert!(backoff_sleep(Duration::from_secs(30), &wake).await);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "woken after {:?}",
            t.elapsed()
        );
        waker.await.unwrap();
    }

    use super::*;
    use statemesh_mesh::control::{Command, RaftConf, Role};

    /// A learner `id` joining, serving gRPC at `127.0.0.1:9000 + id`.
    fn join(id: NodeId) -> Command {
        Command::Join {
            id,
            grpc_addr: format!("127.0.0.1:{}", 9000 + id),
            http_addr: String::new(),
            role: Role::Learner,
            incarnation: 0,
            fresh: false,
        }
    }

    #[test]
    fn a_join_is_not_sent_to_this_node_when_the_others_still_name_it_the_leader() {
        let req = mpb::JoinRequest {
            id: 2,
            grpc_addr: "127.0.0.1:7002".into(),
            ..Default::default()
        };
        let rep = |leader: NodeId, addr: &str| mpb::JoinReply {
            leader,
            leader_addr: addr.into(),
            ..Default::default()
        };
        assert_eq!(
            leader_to_ask(&req, &rep(3, "127.0.0.1:7003")).as_deref(),
            Some("127.0.0.1:7003")
        );
        assert_eq!(leader_to_ask(&req, &rep(2, "127.0.0.1:7002")), None);
        assert_eq!(leader_to_ask(&req, &rep(2, "127.0.0.1:9")), None);
        assert_eq!(leader_to_ask(&req, &rep(3, "127.0.0.1:7002")), None);
        assert_eq!(leader_to_ask(&req, &rep(0, "")), None);
        assert_eq!(leader_to_ask(&req, &rep(3, "")), None);
    }

    /// Lost messages between functions wake the epoch driver (a permit is kept until it
    /// waits), which then takes the flag once.
    #[tokio::test]
    async fn lost_messages_between_functions_wake_the_epoch_driver() {
        let p = Placement::new(1);
        assert!(!p.fn_broken());
        p.set_fn_broken(7);
        p.set_fn_broken(0);
        assert!(p.fn_broken());
        tokio::time::timeout(Duration::from_secs(5), p.fn_broken_set())
            .await
            .expect("the driver is woken");
        assert_eq!(p.take_fn_broken(), Some(7), "the newest generation broken");
        assert!(p.take_fn_broken().is_none() && !p.fn_broken());
        // Nothing more to wake it for.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), p.fn_broken_set())
                .await
                .is_err()
        );
        p.set_fn_broken(0);
        assert_eq!(p.take_fn_broken(), Some(0));
    }

    #[test]
    fn routes_follow_the_table() {
        let p = Placement::new(1);
        // Before the first state: nothing is known, nothing routed here.
        assert!(matches!(p.route(0), Route::Unavailable(_)));
        let mut s = ClusterState::new(4);
        s.conf = Some(RaftConf {
            voters: vec![1],
            ..Default::default()
        });
        p.update(&s);
        // A bootstrapped lone node serves unassigned key groups.
        assert_eq!(p.route(3), Route::Local);
        assert!(p.ready());
        s.apply(2, &join(1));
        s.apply(3, &join(2));
        s.apply(
            4,
            &Command::Move {
                moves: vec![
                    statemesh_mesh::control::MoveCommand {
                        kg: 0,
                        to: 1,
                        version: 0,
                        orphan: false,
                    },
                    statemesh_mesh::control::MoveCommand {
                        kg: 1,
                        to: 2,
                        version: 0,
                        orphan: false,
                    },
                ],
            },
        );
        p.update(&s);
        assert_eq!(p.route(0), Route::Local);
        assert_eq!(
            p.route(1),
            Route::Remote {
                node: 2,
                addr: "127.0.0.1:9002".into()
            }
        );
        // Two members: an unassigned key group waits for its owner.
        assert!(matches!(p.route(2), Route::Unavailable(ref w) if w.contains("no owner")));
        // A joiner that has not received the cluster's snapshot routes nothing.
        let j = Placement::new(5);
        let mut fresh = ClusterState::new(4);
        fresh.conf = Some(RaftConf::default());
        j.update(&fresh);
        assert!(matches!(j.route(0), Route::Unavailable(_)));
        assert!(!j.ready());
    }

    /// A forwarded request refused by a node that does not own its key group is routed again
    /// once the tables agree: this node's waits for the refusing node's newer version, a
    /// refusing node that is behind gets a moment, and both give up at the deadline.
    #[tokio::test]
    async fn a_refused_forward_waits_for_the_newer_table_then_routes_again() {
        use statemesh_mesh::control::MoveCommand;
        use std::time::{Duration, Instant};
        let p = Arc::new(Placement::new(1));
        let mut s = ClusterState::new(4);
        s.conf = Some(RaftConf {
            voters: vec![1],
            ..Default::default()
        });
        for (i, id) in [1, 2, 3].into_iter().enumerate() {
            s.apply(2 + i as u64, &join(id));
        }
        let mv = |kg, to, version| MoveCommand {
            kg,
            to,
            version,
            orphan: false,
        };
        s.apply(
            5,
            &Command::Move {
                moves: vec![mv(0, 2, 0)],
            },
        );
        p.update(&s);
        assert_eq!(p.kg_version(0), 1);
        assert!(matches!(p.route(0), Route::Remote { node: 2, .. }));
        // Node 2 refused at version 2 (the key group moved on to node 3): this node routes
        // again once it has applied that move too.
        let mut next = s.clone();
        next.apply(
            6,
            &Command::Move {
                moves: vec![mv(0, 3, 1)],
            },
        );
        let later = p.clone();
        let t = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            later.update(&next);
        });
        assert!(p.settle(0, 1, 2, t + Duration::from_secs(3)).await);
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(p.kg_version(0), 2);
        assert!(matches!(p.route(0), Route::Remote { node: 3, .. }));
        // The refusing node is behind (version 1 < 2): a moment for it, then again.
        let t = Instant::now();
        assert!(p.settle(0, 2, 1, t + Duration::from_secs(3)).await);
        assert!(t.elapsed() >= Duration::from_millis(10));
        // A version this node never reaches: refused after the deadline.
        let t = Instant::now();
        assert!(!p.settle(0, 2, 7, t + Duration::from_millis(40)).await);
        assert!(t.elapsed() >= Duration::from_millis(40));
        // Past the deadline nothing is retried.
        assert!(!p.settle(0, 2, 1, Instant::now()).await);
    }

    /// A lone node with the example functions and no epochs (nothing changes its table but
    /// the test), once its own start has given it every key group; and its id.
    async fn quiet_node(dir: &std::path::Path) -> (crate::node::NodeHandle, NodeId) {
        use std::time::{Duration, Instant};
        let mut config = crate::config::NodeConfig {
            data_dir: dir.to_path_buf(),
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        config.checkpoint.enabled = false;
        let node = crate::node::NodeBuilder::new(config)
            .with_examples()
            .start()
            .await
            .unwrap();
        let p = node.router().placement().clone();
        let me = p.table.read().me;
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.owners().1.first().copied().flatten() != Some(me) {
            assert!(Instant::now() < deadline, "the node took no key groups");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        (node, me)
    }

    /// A table of `me` and `other` (serving gRPC at `other_addr`) where key group `kg` moved
    /// to each of `owners` in turn.
    fn table(me: NodeId, other: (NodeId, String), kg: u32, owners: &[NodeId]) -> ClusterState {
        use statemesh_mesh::control::MoveCommand;
        let mut s = ClusterState::new(statemesh_mesh::keygroup::DEFAULT_KEY_GROUPS);
        s.conf = Some(RaftConf {
            voters: vec![me],
            ..Default::default()
        });
        s.apply(2, &join(me));
        let mut j = join(other.0);
        if let Command::Join { grpc_addr, .. } = &mut j {
            *grpc_addr = other.1;
        }
        s.apply(3, &j);
        for (v, &to) in owners.iter().enumerate() {
            s.apply(
                4 + v as u64,
                &Command::Move {
                    moves: vec![MoveCommand {
                        kg,
                        to,
                        version: v as u64,
                        orphan: false,
                    }],
                },
            );
        }
        s
    }

    /// The counter `a`'s total at this node, read as a request forwarded at version 2 (a
    /// node that does not own it refuses).
    async fn total(r: &crate::router::Router, a: &Address) -> Result<Option<i64>, ServiceError> {
        r.get_state_routed(a.clone(), Some(2)).await.map(|v| {
            v.iter()
                .find(|(name, _, _)| name == "total")
                .map(|(_, v, _)| v.get::<i64>().unwrap())
        })
    }

    /// Waits until the counter `a` holds `n` at this node.
    async fn total_reaches(r: &crate::router::Router, a: &Address, n: i64) {
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match total(r, a).await {
                Ok(Some(t)) if t == n => return,
                other if Instant::now() > deadline => panic!("counter {a}: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// A message another node's shard routed here by a table that is ahead of this node's
    /// (it moved the key group here, this node has not applied that yet): held, neither sent
    /// back to the owner this node's table names nor lost, and processed once this node's
    /// table reaches the sender's version.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_routed_here_by_a_newer_table_waits_for_this_nodes_table() {
        let dir = tempfile::tempdir().unwrap();
        let (node, me) = quiet_node(dir.path()).await;
        let r = node.router().clone();
        let p = r.placement().clone();
        let other = (me + 1, "127.0.0.1:9".to_string());
        let a = Address::parse("example/counter/held").unwrap();
        let kg = r.key_group(&a);
        p.update(&table(me, other.clone(), kg, &[other.0]));
        assert!(matches!(p.route(kg), Route::Remote { node, .. } if node == other.0));
        // The other node moved the key group back here (version 2) and sent a message by
        // that table.
        r.deliver_remote(
            (other.0, 0),
            crate::shard::FIRST_GENERATION,
            vec![(a.clone(), None, TypedValue::of(&5i64), 2, None, None)],
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let held = total(&r, &a).await;
        assert!(
            matches!(held, Err(ServiceError::NotOwner { .. })),
            "read while held: {held:?}"
        );
        p.update(&table(me, other, kg, &[me + 1, me]));
        assert_eq!(p.kg_version(kg), 2);
        total_reaches(&r, &a, 5).await;
        node.shutdown().await;
    }

    /// A client request kept by a key group's old owner during a live move travels to the new
    /// owner as a message between functions with its idempotency key: the new owner checks and
    /// records it, so the same request arriving there twice (the kept one and the client's
    /// retry, here the kept one twice) is applied once. Without the key, a retry at the new
    /// owner was applied a second time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_client_request_carries_its_idempotency_key_to_the_new_owner() {
        let dir = tempfile::tempdir().unwrap();
        let (node, me) = quiet_node(dir.path()).await;
        let r = node.router().clone();
        let p = r.placement().clone();
        let a = Address::parse("example/counter/kept").unwrap();
        let kg = r.key_group(&a);
        let env = |key: Option<&str>| crate::router::Envelope {
            target: a.clone(),
            kg,
            caller: None,
            message: TypedValue::of(&5i64),
            ingress: false,
            key: key.map(Into::into),
            trace: None,
        };
        let frame = |e| mpb::ForwardRequest {
            kind: Kind::Deliver as i32,
            request: shard_messages(&p, me + 1, 0, crate::shard::FIRST_GENERATION, vec![e]).into(),
            ..Default::default()
        };
        let decoded = mpb::ShardMessages::decode(frame(env(Some("k1"))).request).unwrap();
        assert_eq!(decoded.messages[0].idempotency_key, "k1");
        take_fn(&r, &frame(env(Some("k1")))).unwrap();
        total_reaches(&r, &a, 5).await;
        take_fn(&r, &frame(env(Some("k1")))).unwrap();
        // Without a key it is a message between functions: applied.
        take_fn(&r, &frame(env(None))).unwrap();
        total_reaches(&r, &a, 10).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(total(&r, &a).await.unwrap(), Some(10));
        node.shutdown().await;
    }

    /// A fire-and-forget `Send` forwarded to a node that does not own the key group (here:
    /// this node itself, named as the other member's address) is refused there and sent
    /// again once the tables agree, not lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fire_and_forget_send_refused_by_a_node_that_is_not_the_owner_is_sent_again() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let (node, me) = quiet_node(dir.path()).await;
        let r = node.router().clone();
        let p = r.placement().clone();
        let other = (me + 1, node.grpc_addr().to_string());
        let a = Address::parse("example/counter/refused").unwrap();
        let kg = r.key_group(&a);
        p.update(&table(me, other.clone(), kg, &[other.0]));
        let refusals = || {
            r.metrics()
                .ingress_errors
                .with_label_values(&["not_owner"])
                .get()
        };
        let before = refusals();
        r.send(a.clone(), TypedValue::of(&7i64)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while refusals() == before {
            assert!(
                Instant::now() < deadline,
                "the forwarded send was not refused"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        p.update(&table(me, other, kg, &[me + 1, me]));
        total_reaches(&r, &a, 7).await;
        node.shutdown().await;
    }
}
