//! An async gRPC client of a statemesh node.

use futures::{Stream, StreamExt};
use statemesh_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::address::Address;
use crate::types::TypedValue;

/// A failed client request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node URL is malformed or unreachable.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The node answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The node sent something that is not a valid value.
    #[error("invalid response: {0}")]
    InvalidResponse(String),
}

impl ClientError {
    /// The gRPC status code, if the node answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// A record read from an egress topic.
#[derive(Clone, Debug, PartialEq)]
pub struct EgressRecord {
    /// The record.
    pub value: TypedValue,
    /// Its id, `"<key group>-<epoch>-<n>"`: the same at every read of this record and never
    /// another record's, so a reader that may see a record twice can drop the second. `None`
    /// when the node does not checkpoint (its records are not durable).
    pub id: Option<String>,
}

/// How a client retries requests that carry an idempotency key (requests without a key are
/// never retried: they could apply twice). A keyed request is retried when the node is
/// unreachable or restarting (`UNAVAILABLE`, `UNKNOWN` transport failures, `CANCELLED`) or
/// pushes back (`RESOURCE_EXHAUSTED`), with exponential backoff; the node answers a retry of
/// something it already applied from its idempotency record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Backoff before the second attempt; doubles per attempt.
    pub initial_backoff: std::time::Duration,
    /// Upper bound of the backoff.
    pub max_backoff: std::time::Duration,
}

impl Default for RetryPolicy {
    /// 34 attempts, 50 ms doubling to at most 500 ms (about 15 s in all). The short cap
    /// matters in a cluster: a failover takes about 2 s, and a caller should see its key
    /// group served again within a retry of that, not 2 s later.
    fn default() -> Self {
        RetryPolicy {
            attempts: 34,
            initial_backoff: std::time::Duration::from_millis(50),
            max_backoff: std::time::Duration::from_millis(500),
        }
    }
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted
    )
}

/// A client of a node and, for keyed requests, of the other nodes of its cluster. Cheap to
/// clone; clones share the connections (which reconnect by themselves after a node restarts).
///
/// A keyed request that finds its node unavailable (down, restarting, cut off from its
/// cluster, or not answering within [`Client::with_attempt_timeout`]) is retried with the
/// same idempotency key on the next node the client knows: the nodes it was given
/// ([`Client::connect_cluster`], [`Client::add_node`]) and the live members it learns from
/// the cluster (when [`Client::connect`] connects, and after a failure, at most every 5 s).
/// Any node takes any request (it forwards it to the owner), and the key makes the retry
/// apply once. Admin requests ([`Client::cluster`], [`Client::leave_cluster`],
/// [`Client::get_state`]) always go to the first node.
#[derive(Clone)]
pub struct Client {
    ingress: pb::ingress_client::IngressClient<Transport>,
    admin: pb::admin_client::AdminClient<Transport>,
    creds: Credentials,
    tls: Option<tonic::transport::ClientTlsConfig>,
    retry: RetryPolicy,
    attempt_timeout: Option<std::time::Duration>,
    nodes: std::sync::Arc<Nodes>,
}

/// The nodes a client knows; the first is the one it was connected to.
struct Nodes {
    list: std::sync::RwLock<Vec<Known>>,
    /// Index into `list` of the node ingress requests go to now.
    current: std::sync::atomic::AtomicUsize,
    /// When the members were last asked for.
    learned: std::sync::Mutex<Option<std::time::Instant>>,
}

struct Known {
    /// `host:port`, as members advertise their gRPC addresses.
    addr: String,
    ingress: pb::ingress_client::IngressClient<Transport>,
    admin: pb::admin_client::AdminClient<Transport>,
}

/// The bearer token a client sends (`authorization` metadata), shared by every node it knows.
#[derive(Clone, Default)]
pub struct Credentials(
    std::sync::Arc<
        std::sync::RwLock<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>>,
    >,
);

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = self.0.read().unwrap().clone() {
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

/// A channel that sends the client's credentials.
type Transport = InterceptedService<Channel, Credentials>;

fn set_token(creds: &Credentials, token: Option<&str>) -> Result<(), ClientError> {
    let v =
        match token {
            None => None,
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                ClientError::InvalidResponse("a token must be visible ASCII".into())
            })?),
        };
    *creds.0.write().unwrap() = v;
    Ok(())
}

/// How often a client asks for the members at most.
const LEARN_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn endpoint(
    url: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Endpoint, ClientError> {
    let err = |source| ClientError::Connect {
        url: url.to_string(),
        source,
    };
    let e = Endpoint::from_shared(url.to_string())
        .map_err(err)?
        .tcp_nodelay(true);
    match tls {
        Some(t) if url.starts_with("https://") => e.tls_config(t.clone()).map_err(err),
        _ => Ok(e),
    }
}

/// A channel that connects on its first request (within 2 s).
fn lazy_channel(
    url: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Channel, ClientError> {
    Ok(endpoint(url, tls)?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_lazy())
}

/// How [`Client::connect_with`] connects.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// A bearer token sent with every request (`authorization: Bearer <token>`), for nodes
    /// with `[auth]`.
    pub token: Option<String>,
    /// The CA (PEM) that signs the nodes' certificates, for `https://` URLs (nodes with
    /// `[tls]`).
    pub ca_pem: Option<Vec<u8>>,
}

fn known(url: &str, channel: Channel, creds: &Credentials) -> Known {
    Known {
        addr: url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string(),
        ingress: pb::ingress_client::IngressClient::with_interceptor(
            channel.clone(),
            creds.clone(),
        )
        .max_decoding_message_size(64 << 20),
        admin: pb::admin_client::AdminClient::with_interceptor(channel, creds.clone()),
    }
}

impl Client {
    fn over(
        first: Known,
        creds: Credentials,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self {
        Client {
            ingress: first.ingress.clone(),
            admin: first.admin.clone(),
            creds,
            tls,
            retry: RetryPolicy::default(),
            attempt_timeout: None,
            nodes: std::sync::Arc::new(Nodes {
                list: std::sync::RwLock::new(vec![first]),
                current: Default::default(),
                learned: Default::default(),
            }),
        }
    }

    /// Connects to a node's gRPC address, e.g. `http://127.0.0.1:5090`, and learns the other
    /// live members of its cluster (if it is in one) for keyed retries.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Client::connect_with_token(url, None).await
    }

    /// [`Client::connect`] sending a bearer token (`authorization: Bearer <token>`) with
    /// every request, for nodes with `[auth]`.
    pub async fn connect_with_token(url: &str, token: Option<&str>) -> Result<Self, ClientError> {
        Client::connect_with(
            url,
            &ConnectOptions {
                token: token.map(String::from),
                ..Default::default()
            },
        )
        .await
    }

    /// [`Client::connect`] with a token and, for `https://` URLs, the CA of the nodes'
    /// certificates. The members it learns are reached the same way.
    pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let creds = Credentials::default();
        set_token(&creds, options.token.as_deref())?;
        let tls = options.ca_pem.as_ref().map(|ca| {
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        });
        let channel = endpoint(url, tls.as_ref())?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        let client = Client::over(known(url, channel, &creds), creds, tls);
        client.learn(0).await;
        Ok(client)
    }

    /// Connects lazily: the first request connects (useful when the node is still starting).
    pub fn connect_lazy(url: &str) -> Result<Self, ClientError> {
        let creds = Credentials::default();
        Ok(Client::over(
            known(url, lazy_channel(url, None)?, &creds),
            creds,
            None,
        ))
    }

    /// The same client sending `token` as its bearer token from now on (every node it knows;
    /// `None`: none).
    pub fn with_token(self, token: Option<&str>) -> Result<Self, ClientError> {
        set_token(&self.creds, token)?;
        Ok(self)
    }

    /// A client of several nodes of one cluster, connected lazily: requests go to the first,
    /// and a keyed request moves on to the next when a node is unavailable. The live members
    /// of the cluster are learned too (after a failure), so one reachable address is enough;
    /// several survive the first being down.
    pub fn connect_cluster<S: AsRef<str>>(urls: &[S]) -> Result<Self, ClientError> {
        let Some(first) = urls.first() else {
            return Err(ClientError::InvalidResponse(
                "connect_cluster needs at least one node URL".into(),
            ));
        };
        let client = Client::connect_lazy(first.as_ref())?;
        for u in &urls[1..] {
            client.add_node(u.as_ref())?;
        }
        Ok(client)
    }

    /// Adds a node (a gRPC URL, or `host:port`) that keyed requests may be retried on.
    pub fn add_node(&self, url: &str) -> Result<(), ClientError> {
        let url = if url.contains("://") {
            url.to_string()
        } else if self.tls.is_some() {
            format!("https://{url}")
        } else {
            format!("http://{url}")
        };
        let k = known(&url, lazy_channel(&url, self.tls.as_ref())?, &self.creds);
        let mut list = self.nodes.list.write().unwrap();
        if !list.iter().any(|n| n.addr == k.addr) {
            list.push(k);
        }
        Ok(())
    }

    /// The nodes this client knows (`host:port`), the one it was connected to first.
    pub fn nodes(&self) -> Vec<String> {
        let list = self.nodes.list.read().unwrap();
        list.iter().map(|n| n.addr.clone()).collect()
    }

    /// Asks the known nodes, from `via` (an index into them) on, for the members of their
    /// cluster until one answers, and adds the live members' gRPC addresses; at most every
    /// [`LEARN_EVERY`] (a later failure asks again).
    async fn learn(&self, via: usize) {
        {
            let mut at = self.nodes.learned.lock().unwrap();
            if at.is_some_and(|t| t.elapsed() < LEARN_EVERY) {
                return;
            }
            *at = Some(std::time::Instant::now());
        }
        let admins: Vec<_> = {
            let list = self.nodes.list.read().unwrap();
            (0..list.len())
                .map(|k| list[(via + k) % list.len()].admin.clone())
                .collect()
        };
        for mut admin in admins {
            let asked = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                admin.get_cluster(pb::GetClusterRequest {}),
            )
            .await;
            if let Ok(Ok(resp)) = asked {
                for m in resp.into_inner().members {
                    if m.alive && !m.leaving && !m.grpc_addr.is_empty() {
                        let _ = self.add_node(&m.grpc_addr);
                    }
                }
                return;
            }
        }
    }

    /// The same client with another retry policy for keyed requests.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The same client with a deadline on each attempt of an ingress request: a node that
    /// does not answer within it (paused, or cut off with its connection still open) counts
    /// as unavailable, so a keyed request moves on to another node. None by default (a call
    /// waits for its reply timeout).
    pub fn with_attempt_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Runs an ingress request on the current node; if it carries an idempotency key,
    /// retries it under the policy, on the next node the client knows when this one is
    /// unavailable.
    async fn retrying<T, F, Fut>(&self, keyed: bool, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(pb::ingress_client::IngressClient<Transport>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        use std::sync::atomic::Ordering;
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 1;
        loop {
            let (at, ingress, count, addr) = {
                let list = self.nodes.list.read().unwrap();
                let at = self.nodes.current.load(Ordering::Relaxed) % list.len();
                (
                    at,
                    list[at].ingress.clone(),
                    list.len(),
                    list[at].addr.clone(),
                )
            };
            let r = match self.attempt_timeout {
                None => f(ingress).await,
                Some(d) => tokio::time::timeout(d, f(ingress))
                    .await
                    .unwrap_or_else(|_| {
                        Err(tonic::Status::unavailable(format!(
                            "no answer within {} ms",
                            d.as_millis()
                        )))
                    }),
            };
            let again = keyed && attempt < self.retry.attempts;
            match r {
                Err(s) if retryable(&s) => {
                    if s.code() != tonic::Code::ResourceExhausted {
                        // Unavailable: this request (if keyed) and the next go to the next
                        // node, and the client asks for the members it may not know yet.
                        let next = (at + 1) % count;
                        let _ = self.nodes.current.compare_exchange(
                            at,
                            next,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        if again {
                            self.learn(next).await;
                        }
                    }
                    if !again {
                        // Named: which node refused last, and how often the client tried.
                        let tried = if attempt > 1 {
                            format!(
                                "; {attempt} attempts over {} of the {count} nodes the client knows",
                                count.min(attempt as usize)
                            )
                        } else {
                            String::new()
                        };
                        return Err(tonic::Status::new(
                            s.code(),
                            format!("{} (node {addr}{tried})", s.message()),
                        ));
                    }
                }
                r => return r,
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.retry.max_backoff);
            attempt += 1;
        }
    }

    /// Sends a one-way message.
    pub async fn send(&self, target: &Address, message: TypedValue) -> Result<(), ClientError> {
        self.send_with_key(target, message, None).await
    }

    /// Sends a one-way message with an idempotency key; with a key, retried under the
    /// client's [`RetryPolicy`] and applied once.
    pub async fn send_with_key(
        &self,
        target: &Address,
        message: TypedValue,
        key: Option<&str>,
    ) -> Result<(), ClientError> {
        let req = pb::SendRequest {
            target: Some(target.to_proto()),
            message: Some(message.to_proto()),
            idempotency_key: key.unwrap_or_default().to_string(),
            traceparent: String::new(),
        };
        self.retrying(key.is_some(), |mut c| {
            let req = req.clone();
            async move { c.send(req).await }
        })
        .await?;
        Ok(())
    }

    /// Calls an address and waits for its reply (the node's default timeout applies).
    pub async fn call(
        &self,
        target: &Address,
        message: TypedValue,
    ) -> Result<TypedValue, ClientError> {
        self.call_with(target, message, None, None).await
    }

    /// Calls with an optional idempotency key and reply timeout; with a key, retried under the
    /// client's [`RetryPolicy`] and applied once (a retry gets the first call's reply).
    pub async fn call_with(
        &self,
        target: &Address,
        message: TypedValue,
        key: Option<&str>,
        timeout: Option<std::time::Duration>,
    ) -> Result<TypedValue, ClientError> {
        let req = pb::CallRequest {
            target: Some(target.to_proto()),
            message: Some(message.to_proto()),
            idempotency_key: key.unwrap_or_default().to_string(),
            timeout_ms: timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
            traceparent: String::new(),
        };
        let resp = self
            .retrying(key.is_some(), |mut c| {
                let req = req.clone();
                async move { c.call(req).await }
            })
            .await?
            .into_inner();
        resp.reply
            .map(TypedValue::from_proto)
            .ok_or_else(|| ClientError::InvalidResponse("call response without a reply".into()))
    }

    /// Streams sends in batches of up to `batch` messages; returns how many the node accepted.
    pub async fn send_stream<S>(&self, messages: S, batch: usize) -> Result<u64, ClientError>
    where
        S: Stream<Item = (Address, TypedValue)> + Send + 'static,
    {
        let frames = messages
            .map(|(a, v)| pb::SendRequest {
                target: Some(a.to_proto()),
                message: Some(v.to_proto()),
                idempotency_key: String::new(),
                traceparent: String::new(),
            })
            .ready_chunks(batch.max(1))
            .map(|messages| pb::SendBatch { messages });
        let summary = self.ingress.clone().send_stream(frames).await?.into_inner();
        Ok(summary.accepted)
    }

    /// Streams an egress topic's records as they arrive.
    pub async fn subscribe(
        &self,
        topic: &str,
    ) -> Result<impl Stream<Item = Result<TypedValue, ClientError>>, ClientError> {
        Ok(self
            .subscribe_records(topic)
            .await?
            .map(|r| r.map(|r| r.value)))
    }

    /// Streams an egress topic's records as they arrive, with their ids.
    pub async fn subscribe_records(
        &self,
        topic: &str,
    ) -> Result<impl Stream<Item = Result<EgressRecord, ClientError>>, ClientError> {
        let stream = self
            .ingress
            .clone()
            .subscribe(pb::SubscribeRequest {
                topic: topic.to_string(),
            })
            .await?
            .into_inner();
        Ok(stream.map(|r| match r {
            Ok(rec) => {
                let value = rec
                    .value
                    .map(TypedValue::from_proto)
                    .ok_or_else(|| ClientError::InvalidResponse("record without a value".into()))?;
                Ok(EgressRecord {
                    value,
                    id: (!rec.id.is_empty()).then_some(rec.id),
                })
            }
            Err(s) => Err(ClientError::Status(s)),
        }))
    }

    /// The cluster as the node sees it (leader, term, members and their key groups).
    pub async fn cluster(&self) -> Result<pb::GetClusterResponse, ClientError> {
        Ok(self
            .admin
            .clone()
            .get_cluster(pb::GetClusterRequest {})
            .await?
            .into_inner())
    }

    /// Asks the node this client talks to to leave its cluster; returns its id. It hands its
    /// key groups over to the others, leaves the Raft group and the members, and exits.
    pub async fn leave_cluster(&self) -> Result<u64, ClientError> {
        Ok(self
            .admin
            .clone()
            .leave_cluster(pb::LeaveClusterRequest {})
            .await?
            .into_inner()
            .node_id)
    }

    /// The stored states of an address: (name, value, expires_at_ms).
    pub async fn get_state(
        &self,
        address: &Address,
    ) -> Result<Vec<(String, TypedValue, u64)>, ClientError> {
        let resp = self
            .admin
            .clone()
            .get_state(pb::GetStateRequest {
                address: Some(address.to_proto()),
            })
            .await?
            .into_inner();
        Ok(states_of(resp))
    }

    /// Sets (or with [`StateChange::Delete`] deletes) the state `name` of an address through
    /// a committed epoch; returns the address's states after the change.
    pub async fn set_state(
        &self,
        address: &Address,
        name: &str,
        change: StateChange,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<(String, TypedValue, u64)>, ClientError> {
        use pb::set_state_request::Value;
        let value = match change {
            StateChange::Text(t) => Value::Text(t),
            StateChange::Typed(v) => Value::Typed(v.to_proto()),
            StateChange::Delete => Value::Delete(true),
        };
        let resp = self
            .admin
            .clone()
            .set_state(pb::SetStateRequest {
                address: Some(address.to_proto()),
                name: name.to_string(),
                value: Some(value),
                idempotency_key: idempotency_key.unwrap_or_default().to_string(),
            })
            .await?
            .into_inner();
        Ok(states_of(resp))
    }

    /// The dead letters the node this client talks to holds (those of its key groups).
    pub async fn dead_letters(
        &self,
        limit: u32,
    ) -> Result<pb::ListDeadLettersResponse, ClientError> {
        Ok(self
            .admin
            .clone()
            .list_dead_letters(pb::ListDeadLettersRequest { limit })
            .await?
            .into_inner())
    }

    /// The function types the node this client talks to invoked, with their statistics.
    pub async fn function_stats(&self) -> Result<pb::GetFunctionStatsResponse, ClientError> {
        Ok(self
            .admin
            .clone()
            .get_function_stats(pb::GetFunctionStatsRequest {})
            .await?
            .into_inner())
    }

    /// Replays a dead letter the node this client talks to holds; returns what it did.
    pub async fn replay_dead_letter(&self, id: &str) -> Result<String, ClientError> {
        Ok(self
            .admin
            .clone()
            .replay_dead_letter(pb::ReplayDeadLetterRequest { id: id.to_string() })
            .await?
            .into_inner()
            .done)
    }
}

/// The new value of a state set through [`Client::set_state`].
#[derive(Clone, Debug)]
pub enum StateChange {
    /// Text the node converts with the state's declared typename (`"42"` for a long).
    Text(String),
    /// An encoded value of the state's declared typename.
    Typed(TypedValue),
    /// Deletes the value.
    Delete,
}

fn states_of(resp: pb::GetStateResponse) -> Vec<(String, TypedValue, u64)> {
    resp.values
        .into_iter()
        .map(|v| {
            (
                v.name,
                v.value
                    .map(TypedValue::from_proto)
                    .unwrap_or_else(|| TypedValue::empty("")),
                v.expires_at_ms,
            )
        })
        .collect()
}
