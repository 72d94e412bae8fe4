//! An async gRPC client of a statemesh node.

use futures::{Stream, StreamExt};
use statemesh_proto::v1 as pb;
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

/// A client of one node. Cheap to clone; clones share the connection (which reconnects by
/// itself after the node restarts).
#[derive(Clone)]
pub struct Client {
    ingress: pb::ingress_client::IngressClient<Channel>,
    admin: pb::admin_client::AdminClient<Channel>,
    retry: RetryPolicy,
}

impl Client {
    /// Connects to a node's gRPC address, e.g. `http://127.0.0.1:5090`.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        Ok(Client {
            ingress: pb::ingress_client::IngressClient::new(channel.clone())
                .max_decoding_message_size(64 << 20),
            admin: pb::admin_client::AdminClient::new(channel),
            retry: RetryPolicy::default(),
        })
    }

    /// Connects lazily: the first request connects (useful when the node is still starting).
    pub fn connect_lazy(url: &str) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(2));
        let channel = endpoint.connect_lazy();
        Ok(Client {
            ingress: pb::ingress_client::IngressClient::new(channel.clone())
                .max_decoding_message_size(64 << 20),
            admin: pb::admin_client::AdminClient::new(channel),
            retry: RetryPolicy::default(),
        })
    }

    /// The same client with another retry policy for keyed requests.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Runs a request, retrying it under the policy if it carries an idempotency key.
    async fn retrying<T, F, Fut>(&self, keyed: bool, f: F) -> Result<T, tonic::Status>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 1;
        loop {
            match f().await {
                Err(s) if keyed && attempt < self.retry.attempts && retryable(&s) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                r => return r,
            }
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
        };
        self.retrying(key.is_some(), || {
            let (mut c, req) = (self.ingress.clone(), req.clone());
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
        };
        let resp = self
            .retrying(key.is_some(), || {
                let (mut c, req) = (self.ingress.clone(), req.clone());
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
        let stream = self
            .ingress
            .clone()
            .subscribe(pb::SubscribeRequest {
                topic: topic.to_string(),
            })
            .await?
            .into_inner();
        Ok(stream.map(|r| match r {
            Ok(rec) => rec
                .value
                .map(TypedValue::from_proto)
                .ok_or_else(|| ClientError::InvalidResponse("record without a value".into())),
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
        Ok(resp
            .values
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
            .collect())
    }
}
