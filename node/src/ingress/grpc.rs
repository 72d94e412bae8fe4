//! gRPC ingress (`statemesh.v1.Ingress`) and admin (`statemesh.v1.Admin`) over tonic.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use statemesh_proto::v1 as pb;
use statemesh_sdk::{Address, TypedValue};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ServiceError;

/// At most this many egress records a subscriber reads at once (one commit answers them;
/// like any record sent, they are lost if its stream breaks before they reach it).
const SUBSCRIBE_BATCH: usize = 64;
use crate::node::Shared;

struct IngressService {
    shared: Shared,
}

fn target_and_message(
    target: Option<pb::Address>,
    message: Option<pb::TypedValue>,
) -> Result<(Address, TypedValue), ServiceError> {
    let target =
        target.ok_or_else(|| ServiceError::InvalidArgument("missing target address".into()))?;
    let target = Address::from_proto(&target)?;
    let message = message.ok_or_else(|| ServiceError::InvalidArgument("missing message".into()))?;
    Ok((target, TypedValue::from_proto(message)))
}

/// The request's `authorization` metadata, if any.
fn authorization<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

/// The request's `traceparent` metadata, if any.
fn traceparent<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The `ingress` span of a request (its `traceparent` from the metadata, else from the
/// request's field), if it is traced.
fn ingress_span(target: &Address, header: Option<String>, field: &str) -> Option<tracing::Span> {
    if !crate::telemetry::enabled() {
        return None;
    }
    let parent = header.or_else(|| (!field.is_empty()).then(|| field.to_string()));
    crate::telemetry::ingress(&target.to_string(), parent.as_deref())
}

#[tonic::async_trait]
impl pb::ingress_server::Ingress for IngressService {
    async fn send(
        &self,
        req: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let header = traceparent(&req);
        let authz = authorization(&req).map(str::to_string);
        let r = req.into_inner();
        let (target, message) = target_and_message(r.target, r.message)?;
        self.shared
            .auth
            .ingress("grpc", authz.as_deref(), [target.typ.as_str()])?;
        let span = ingress_span(&target, header, &r.traceparent);
        let key = Some(r.idempotency_key).filter(|k| !k.is_empty());
        super::traced(self.shared.router.send_with(target, message, key), span).await?;
        Ok(Response::new(pb::SendResponse {}))
    }

    async fn call(
        &self,
        req: Request<pb::CallRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        let header = traceparent(&req);
        let authz = authorization(&req).map(str::to_string);
        let r = req.into_inner();
        let (target, message) = target_and_message(r.target, r.message)?;
        self.shared
            .auth
            .ingress("grpc", authz.as_deref(), [target.typ.as_str()])?;
        let span = ingress_span(&target, header, &r.traceparent);
        let timeout = if r.timeout_ms > 0 {
            r.timeout_ms
        } else {
            self.shared.config.call_timeout_ms
        };
        let key = Some(r.idempotency_key).filter(|k| !k.is_empty());
        let reply = super::traced(
            self.shared
                .router
                .call_with(target, message, Duration::from_millis(timeout), key),
            span,
        )
        .await?;
        Ok(Response::new(pb::CallResponse {
            reply: Some(reply.to_proto()),
        }))
    }

    async fn send_stream(
        &self,
        req: Request<Streaming<pb::SendBatch>>,
    ) -> Result<Response<pb::SendStreamSummary>, Status> {
        let authz = authorization(&req).map(str::to_string);
        let mut stream = req.into_inner();
        let mut accepted = 0u64;
        while let Some(frame) = stream.next().await {
            let frame = frame?;
            let mut batch = Vec::with_capacity(frame.messages.len());
            for m in frame.messages {
                let (t, v) = target_and_message(m.target, m.message)
                    .map_err(|e| with_progress(e, accepted))?;
                let key = Some(m.idempotency_key).filter(|k| !k.is_empty());
                batch.push((t, v, key));
            }
            self.shared
                .auth
                .ingress(
                    "grpc",
                    authz.as_deref(),
                    batch.iter().map(|(t, _, _)| t.typ.as_str()),
                )
                .map_err(|e| {
                    Status::new(
                        Status::from(e.clone()).code(),
                        format!(
                            "{} (after {accepted} messages of this stream were accepted)",
                            e.message()
                        ),
                    )
                })?;
            let n = self
                .shared
                .router
                .send_batch(batch, true)
                .await
                .map_err(|e| with_progress(e, accepted))?;
            accepted += n as u64;
        }
        Ok(Response::new(pb::SendStreamSummary { accepted }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::EgressRecord, Status>> + Send>>;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let authz = authorization(&req).map(str::to_string);
        let topic = req.into_inner().topic;
        if topic.is_empty() {
            return Err(ServiceError::InvalidArgument("missing topic".into()).into());
        }
        self.shared
            .auth
            .ingress("grpc", authz.as_deref(), [topic.as_str()])?;
        let router = self.shared.router.clone();
        let auth = self.shared.auth.clone();
        // This node's records as they come, and the records of the peers that produce them
        // (polled, 50 ms apart while everything is empty): each record popped once, where it
        // was produced, and sent once its removal is committed (the records available here
        // at once are read together, so that one commit answers them all). The token is
        // checked again before each read: a token taken out of the tokens file (read again
        // every second) ends the stream (UNAUTHENTICATED) before it takes another record.
        let start = Some((router, topic, VecDeque::new()));
        let stream = futures::stream::unfold(start, move |state| {
            let (auth, authz) = (auth.clone(), authz.clone());
            async move {
                let (router, topic, mut ready) = state?;
                let v = loop {
                    if let Some(v) = ready.pop_front() {
                        break v;
                    }
                    if let Err(d) = auth.ingress("grpc", authz.as_deref(), [topic.as_str()]) {
                        return Some((Err(Status::from(d)), None));
                    }
                    let local = router.egress().clone();
                    let mut batch = Vec::new();
                    while batch.len() < SUBSCRIBE_BATCH {
                        match local.pop(&topic) {
                            Some(p) => batch.push(p),
                            None => break,
                        }
                    }
                    if batch.is_empty() {
                        if let Some(v) = router.pop_egress(&topic).await {
                            break v;
                        }
                        tokio::select! {
                            p = local.next(&topic) => batch.push(p),
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                    if batch.iter().any(|p| p.waits()) {
                        router.want_commit();
                    }
                    for p in batch {
                        if let Some(v) = p.settled().await {
                            ready.push_back(v);
                        }
                    }
                };
                let rec = pb::EgressRecord {
                    topic: topic.clone(),
                    value: Some(v.value.to_proto()),
                    id: v.id.unwrap_or_default(),
                };
                Some((Ok(rec), Some((router, topic, ready))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn with_progress(e: ServiceError, accepted: u64) -> Status {
    let code = e.grpc_code();
    Status::new(
        code,
        format!("{e} (after {accepted} messages of this stream were accepted)"),
    )
}

struct AdminService {
    shared: Shared,
}

impl AdminService {
    /// Admits an admin request (`[auth] admin_token`).
    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        Ok(self.shared.auth.admin("grpc", authorization(req), None)?)
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn get_cluster(
        &self,
        _req: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::GetClusterResponse>, Status> {
        self.admin(&_req)?;
        let v = self.shared.cluster.lock().clone();
        Ok(Response::new(pb::GetClusterResponse {
            node_id: v.node_id,
            leader: v.leader.unwrap_or(0),
            term: v.term,
            placement_version: v.placement_version,
            committed_epoch: v.committed_epoch,
            unassigned_key_groups: v.unassigned_key_groups as u32,
            epoch_log: (v.epoch_log.max_bytes > 0).then_some(pb::EpochLog {
                epochs: v.epoch_log.epochs as u64,
                bytes: v.epoch_log.bytes,
                uploaded: v.epoch_log.uploaded,
                max_bytes: v.epoch_log.max_bytes,
            }),
            members: v
                .members
                .into_iter()
                .map(|m| pb::ClusterMember {
                    id: m.member.id,
                    generation: m.member.generation,
                    grpc_addr: m.member.grpc_addr,
                    http_addr: m.member.http_addr,
                    role: match m.member.role {
                        statemesh_mesh::control::Role::Voter => "voter".into(),
                        statemesh_mesh::control::Role::Learner => "learner".into(),
                    },
                    alive: m.member.alive,
                    key_groups: m.key_groups as u32,
                    leaving: m.member.leaving,
                })
                .collect(),
        }))
    }

    async fn leave_cluster(
        &self,
        _req: Request<pb::LeaveClusterRequest>,
    ) -> Result<Response<pb::LeaveClusterResponse>, Status> {
        self.admin(&_req)?;
        crate::cluster::leave(&self.shared.mesh).await?;
        Ok(Response::new(pb::LeaveClusterResponse {
            node_id: self.shared.cluster.lock().node_id,
        }))
    }

    async fn set_state(
        &self,
        req: Request<pb::SetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        self.admin(&req)?;
        use crate::admin::{NewValue, StateEdit};
        use pb::set_state_request::Value;
        let req = req.into_inner();
        let a = req
            .address
            .ok_or_else(|| ServiceError::InvalidArgument("missing address".into()))?;
        let address = Address::from_proto(&a).map_err(ServiceError::from)?;
        let value = match req.value {
            Some(Value::Text(t)) => NewValue::Text(t),
            Some(Value::Typed(v)) => NewValue::Typed {
                typename: v.typename,
                value_base64: base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    &v.value,
                ),
            },
            Some(Value::Delete(true)) => NewValue::Delete,
            Some(Value::Delete(false)) | None => {
                return Err(ServiceError::InvalidArgument(
                    "a value is required: text, typed, or delete".into(),
                )
                .into())
            }
        };
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        let values = self
            .shared
            .router
            .set_state(
                address,
                StateEdit {
                    name: req.name,
                    value,
                },
                std::time::Duration::from_millis(self.shared.config.call_timeout_ms),
                key,
            )
            .await?;
        Ok(Response::new(pb::GetStateResponse {
            values: crate::mesh::state_values(values),
        }))
    }

    async fn get_function_stats(
        &self,
        req: Request<pb::GetFunctionStatsRequest>,
    ) -> Result<Response<pb::GetFunctionStatsResponse>, Status> {
        self.admin(&req)?;
        Ok(Response::new(pb::GetFunctionStatsResponse {
            types: crate::admin::function_stats(self.shared.router.registry()),
            node_id: self.shared.cluster.lock().node_id,
        }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        self.admin(&req)?;
        let limit = match req.into_inner().limit {
            0 => 1000,
            n => n as usize,
        };
        let letters = self
            .shared
            .router
            .dead_letters(limit)
            .into_iter()
            .map(|l| pb::DeadLetter {
                id: l.id,
                address: l.address.unwrap_or_default(),
                egress: l.egress.unwrap_or_default(),
                typename: l.typename,
                value: l.value.into(),
                error: l.error,
                attempts: l.attempts,
                json: l.record.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListDeadLettersResponse {
            letters,
            node_id: self.shared.cluster.lock().node_id,
        }))
    }

    async fn replay_dead_letter(
        &self,
        req: Request<pb::ReplayDeadLetterRequest>,
    ) -> Result<Response<pb::ReplayDeadLetterResponse>, Status> {
        self.admin(&req)?;
        let done = self
            .shared
            .router
            .replay_dead_letter(&req.into_inner().id)
            .await?;
        Ok(Response::new(pb::ReplayDeadLetterResponse { done }))
    }

    async fn get_state(
        &self,
        req: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        self.admin(&req)?;
        let a = req
            .into_inner()
            .address
            .ok_or_else(|| ServiceError::InvalidArgument("missing address".into()))?;
        let address = Address::from_proto(&a).map_err(ServiceError::from)?;
        let values = self.shared.router.get_state(address).await?;
        Ok(Response::new(pb::GetStateResponse {
            values: crate::mesh::state_values(values),
        }))
    }
}

/// The connections of `listener` without TLS, with `TCP_NODELAY` set (as the TLS path and
/// actix-web's HTTP do): tonic applies its own `tcp_nodelay` only to listeners it binds, so
/// without this a response written while an earlier one was unacknowledged waited for the
/// client's (possibly delayed) ACK.
fn plain_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves gRPC on `listener` until the returned sender fires.
pub(crate) fn serve(
    shared: Shared,
    listener: tokio::net::TcpListener,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    // Leave room above the value limit so oversized values get our RESOURCE_EXHAUSTED
    // (naming the limit) rather than a transport error.
    let max = shared
        .config
        .max_message_bytes
        .saturating_mul(2)
        .saturating_add(1 << 20);
    let ingress = pb::ingress_server::IngressServer::new(IngressService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let mesh = statemesh_proto::mesh_v1::mesh_server::MeshServer::from_arc(shared.mesh.clone())
        .max_decoding_message_size(256 << 20);
    // With `[tls]`, only members (a certificate of the cluster's CA) reach the mesh service.
    let mesh =
        tonic::service::interceptor::InterceptedService::new(mesh, crate::tls::require_member);
    let tls = shared.tls.clone();
    let metrics = shared.router.metrics().clone();
    let admin = pb::admin_server::AdminServer::new(AdminService { shared });
    let task = tokio::spawn(async move {
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(ingress)
            .add_service(admin)
            .add_service(mesh);
        let shutdown = async {
            let _ = rx.await;
        };
        let r = match tls {
            Some(t) => {
                let incoming = crate::tls::incoming(listener, t.grpc.clone(), metrics);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            None => {
                let incoming = plain_incoming(listener);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    (tx, task)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::plain_incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.expect("a connection").unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is not set");
    }
}
