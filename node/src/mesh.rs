//! The node's side of the mesh: which node owns which key group ([`Placement`], read by the
//! router on every ingress message), forwarding ingress to the owner, and the node-to-node
//! transport of the control group (`statemesh.mesh.v1.Mesh`: one stream per node pair,
//! carrying Raft messages as bytes, and the `Join` call).
//!
//! Forwarding uses the owner's own `statemesh.v1` gRPC ingress over one multiplexed HTTP/2
//! connection per peer (tonic `Channel`), marked with [`FORWARDED`]: a node that receives a
//! forwarded message for a key group it does not own answers `UNAVAILABLE` instead of
//! forwarding again (its table and the sender's disagree during a change; the client retries).
//! Acknowledgements, replies and idempotency are the owner's, so they hold whichever node a
//! client reaches.

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

/// gRPC metadata key marking a request forwarded by another node.
pub(crate) const FORWARDED: &str = "x-statemesh-forwarded";

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
}

/// Who owns what, shared by the control task (writer) and the router (readers).
pub struct Placement {
    table: RwLock<Table>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The node's main runtime: connections to peers live there, whichever thread (gRPC,
    /// an HTTP worker) first needs them.
    rt: Option<tokio::runtime::Handle>,
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
            rt: tokio::runtime::Handle::try_current().ok(),
        }
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
        let single = tokio::runtime::Handle::try_current().is_ok_and(|h| {
            h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        });
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
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// An error answered by another node, passed on as it came (same code, same text); a failed
/// connection (nothing was sent) as UNAVAILABLE naming the owner; a broken one (the request
/// may have been applied) as an error that says the outcome is unknown; the forwarding
/// deadline as a timeout.
fn from_status(node: NodeId, addr: &str, s: Status, timeout: Duration) -> ServiceError {
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
        tonic::Code::Cancelled if s.message().contains("Timeout expired") => {
            ServiceError::Timeout(timeout.as_millis() as u64)
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
    let mut text = s.message().to_string();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        let m = e.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        src = e.source();
    }
    text
}

/// Deadline of forwarded requests other than calls.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message a forwarding client or the mesh service accepts (replies and states can be
/// as large as the owner's limit allows).
const MAX_FORWARDED: usize = 256 << 20;

fn ingress_client(ch: Channel) -> pb::ingress_client::IngressClient<Channel> {
    pb::ingress_client::IngressClient::new(ch)
        .max_decoding_message_size(MAX_FORWARDED)
        .max_encoding_message_size(MAX_FORWARDED)
}

fn forwarded<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r.set_timeout(FORWARD_TIMEOUT);
    r
}

/// Forwards a `Send` to its owner.
pub(crate) async fn forward_send(
    p: &Placement,
    node: NodeId,
    addr: &str,
    target: &Address,
    message: TypedValue,
    key: Option<String>,
) -> Result<(), ServiceError> {
    let mut c = ingress_client(p.channel(addr)?);
    c.send(forwarded(pb::SendRequest {
        target: Some(target.to_proto()),
        message: Some(message.to_proto()),
        idempotency_key: key.unwrap_or_default(),
    }))
    .await
    .map(|_| ())
    .map_err(|s| from_status(node, addr, s, FORWARD_TIMEOUT))
}

/// Forwards a `Call` to its owner; the reply comes back on the same request.
pub(crate) async fn forward_call(
    p: &Placement,
    node: NodeId,
    addr: &str,
    target: &Address,
    message: TypedValue,
    timeout: Duration,
    key: Option<String>,
) -> Result<TypedValue, ServiceError> {
    let mut c = ingress_client(p.channel(addr)?);
    let mut req = forwarded(pb::CallRequest {
        target: Some(target.to_proto()),
        message: Some(message.to_proto()),
        timeout_ms: timeout.as_millis() as u64,
        idempotency_key: key.unwrap_or_default(),
    });
    req.set_timeout(timeout + Duration::from_secs(2));
    let r = c
        .call(req)
        .await
        .map_err(|s| from_status(node, addr, s, timeout))?;
    r.into_inner()
        .reply
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
) -> Option<TypedValue> {
    let mut c = mpb::mesh_client::MeshClient::new(p.channel(addr).ok()?)
        .max_decoding_message_size(MAX_FORWARDED);
    let mut req = Request::new(mpb::PopEgressRequest {
        topic: topic.to_string(),
    });
    req.set_timeout(Duration::from_secs(5));
    match c.pop_egress(req).await {
        Ok(r) => {
            let r = r.into_inner();
            r.found.then(|| {
                if r.has_value {
                    TypedValue::new(r.typename, r.value)
                } else {
                    TypedValue::empty(r.typename)
                }
            })
        }
        Err(e) => {
            tracing::debug!(node, %addr, error = %e, "cannot read a peer's egress");
            None
        }
    }
}

/// Forwards messages of one owner as one `SendStream` batch.
pub(crate) async fn forward_batch(
    p: &Placement,
    node: NodeId,
    addr: &str,
    messages: Vec<(Address, TypedValue, Option<String>)>,
) -> Result<(), ServiceError> {
    let mut c = ingress_client(p.channel(addr)?);
    let batch = pb::SendBatch {
        messages: messages
            .into_iter()
            .map(|(t, m, k)| pb::SendRequest {
                target: Some(t.to_proto()),
                message: Some(m.to_proto()),
                idempotency_key: k.unwrap_or_default(),
            })
            .collect(),
    };
    c.send_stream(forwarded(tokio_stream::once(batch)))
        .await
        .map(|_| ())
        .map_err(|s| from_status(node, addr, s, FORWARD_TIMEOUT))
}

/// Reads an address's states at its owner.
pub(crate) async fn forward_get_state(
    p: &Placement,
    node: NodeId,
    addr: &str,
    address: &Address,
) -> Result<Vec<(String, TypedValue, u64)>, ServiceError> {
    let mut c = pb::admin_client::AdminClient::new(p.channel(addr)?)
        .max_decoding_message_size(MAX_FORWARDED);
    let r = c
        .get_state(forwarded(pb::GetStateRequest {
            address: Some(address.to_proto()),
        }))
        .await
        .map_err(|s| from_status(node, addr, s, FORWARD_TIMEOUT))?;
    Ok(r.into_inner()
        .values
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
    pub egress: crate::egress::Egress,
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
        while let Some(f) = s.next().await {
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
            from = Some(f.from);
            for b in &f.raft {
                if let Err(e) = statemesh_mesh::group::check_message(b) {
                    tracing::warn!(peer = f.from, %remote, error = %e, "a peer sent bytes that are not a Raft message; disconnected");
                    return Err(Status::invalid_argument(e));
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

    async fn pop_egress(
        &self,
        req: Request<mpb::PopEgressRequest>,
    ) -> Result<Response<mpb::PopEgressReply>, Status> {
        let topic = req.into_inner().topic;
        Ok(Response::new(match self.egress.pop(&topic) {
            Some(v) => mpb::PopEgressReply {
                found: true,
                typename: v.typename().to_string(),
                has_value: v.has_value(),
                value: v.value().clone(),
            },
            None => mpb::PopEgressReply::default(),
        }))
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
    tx: mpsc::Sender<bytes::Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Queues a Raft message; false if the queue is full (the message is dropped).
    pub fn send(&self, msg: bytes::Bytes) -> bool {
        self.tx.try_send(msg).is_ok()
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
        let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(LINK_QUEUE);
        let a = addr.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let err = match connect(&a).await {
                    Err(e) => e,
                    Ok(ch) => {
                        let (ftx, frx) = mpsc::channel::<mpb::PeerFrame>(8);
                        let mut client = mpb::mesh_client::MeshClient::new(ch);
                        let call = tokio::spawn(async move {
                            client
                                .peer(tokio_stream::wrappers::ReceiverStream::new(frx))
                                .await
                        });
                        backoff = Duration::from_millis(50);
                        // Frames until the stream breaks or the link is dropped.
                        loop {
                            let Some(first) = rx.recv().await else {
                                call.abort();
                                return;
                            };
                            let mut raft = vec![first];
                            while raft.len() < 256 {
                                match rx.try_recv() {
                                    Ok(m) => raft.push(m),
                                    Err(_) => break,
                                }
                            }
                            let frame = mpb::PeerFrame {
                                from: me,
                                cluster_id: cluster_id.to_string(),
                                from_addr: my_addr.clone(),
                                raft,
                            };
                            if ftx.send(frame).await.is_err() {
                                break;
                            }
                        }
                        match call.await {
                            Ok(Err(s)) => format!("{}: {}", s.code(), s.message()),
                            _ => "stream closed".to_string(),
                        }
                    }
                };
                if backoff >= Duration::from_secs(1) {
                    tracing::warn!(peer, addr = %a, error = %err, "mesh link to a peer is down; reconnecting");
                } else {
                    tracing::debug!(peer, addr = %a, error = %err, "mesh link down; reconnecting");
                }
                let _ = inbox.try_send(ControlInput::Unreachable(peer));
                // What queued meanwhile is stale: Raft resends what still matters.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        });
        Link { addr, tx, task }
    }
}

async fn connect(addr: &str) -> Result<Channel, String> {
    endpoint(addr)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| {
            let mut text = format!("connect: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                text.push_str(&format!(": {c}"));
                src = c.source();
            }
            text
        })
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
                    if rep.leader != 0 && !rep.leader_addr.is_empty() {
                        last = format!("{addr}: not the leader (node {} is)", rep.leader);
                        targets.insert(i, rep.leader_addr);
                    } else {
                        last = format!("{addr}: the cluster has no leader yet");
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

#[cfg(test)]
mod tests {
    use super::*;
    use statemesh_mesh::control::{Command, RaftConf, Role};

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
        let join = |id: NodeId| Command::Join {
            id,
            grpc_addr: format!("127.0.0.1:{}", 9000 + id),
            http_addr: String::new(),
            role: Role::Learner,
            incarnation: 0,
            fresh: false,
        };
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
                    },
                    statemesh_mesh::control::MoveCommand {
                        kg: 1,
                        to: 2,
                        version: 0,
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
}
