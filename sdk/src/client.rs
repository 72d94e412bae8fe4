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

/// A client of one node. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    ingress: pb::ingress_client::IngressClient<Channel>,
    admin: pb::admin_client::AdminClient<Channel>,
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
        })
    }

    /// Sends a one-way message.
    pub async fn send(&self, target: &Address, message: TypedValue) -> Result<(), ClientError> {
        self.send_with_key(target, message, None).await
    }

    /// Sends a one-way message with an idempotency key.
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
        self.ingress.clone().send(req).await?;
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

    /// Calls with an optional idempotency key and reply timeout.
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
        let resp = self.ingress.clone().call(req).await?.into_inner();
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
