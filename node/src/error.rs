//! The one mapping of service errors to gRPC status and HTTP status codes.

use actix_web::http::StatusCode;

/// An error answered to a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// No function of this type is registered.
    #[error("unknown function type {0:?}")]
    UnknownFunction(String),
    /// Malformed address, typename or message.
    #[error("{0}")]
    InvalidArgument(String),
    /// The message exceeds the configured maximum.
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// Queues are full; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// No reply within the timeout.
    #[error("no reply within {0} ms")]
    Timeout(u64),
    /// The node is shutting down or not ready.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Nothing found (e.g. an unknown egress topic).
    #[error("{0}")]
    NotFound(String),
    /// The invoked function kept failing; the message was dead-lettered.
    #[error("invocation failed: {0}")]
    FunctionFailed(String),
    /// A bug or I/O failure inside the node.
    #[error("internal error: {0}")]
    Internal(String),
    /// A forwarded request reached a node that does not own its key group (the two nodes'
    /// tables disagree while ownership changes): refused, nothing applied. `version` is the
    /// refusing node's ownership version of the key group; the forwarding node routes the
    /// request again once the tables agree.
    #[error("unavailable: {message}")]
    NotOwner {
        /// The key group (of a batch: the first one the node does not own).
        key_group: u32,
        /// The refusing node's ownership version of the key group.
        version: u64,
        /// What happened, for the client if routing again does not help.
        message: String,
    },
    /// The error another node (the owner of the address) answered a forwarded request with,
    /// passed on with its code and text.
    #[error("{1}")]
    Forwarded(tonic::Code, String),
}

impl ServiceError {
    /// The gRPC status code.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ServiceError::UnknownFunction(_) | ServiceError::NotFound(_) => tonic::Code::NotFound,
            ServiceError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            ServiceError::TooLarge { .. } | ServiceError::Overloaded(_) => {
                tonic::Code::ResourceExhausted
            }
            ServiceError::Timeout(_) => tonic::Code::DeadlineExceeded,
            ServiceError::Unavailable(_) | ServiceError::NotOwner { .. } => {
                tonic::Code::Unavailable
            }
            ServiceError::FunctionFailed(_) => tonic::Code::Aborted,
            ServiceError::Internal(_) => tonic::Code::Internal,
            ServiceError::Forwarded(code, _) => *code,
        }
    }

    /// The HTTP status code.
    pub fn http_status(&self) -> StatusCode {
        match self {
            ServiceError::UnknownFunction(_) | ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ServiceError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ServiceError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ServiceError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ServiceError::Unavailable(_) | ServiceError::NotOwner { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ServiceError::FunctionFailed(_) => StatusCode::BAD_GATEWAY,
            ServiceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServiceError::Forwarded(code, _) => match code {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::ResourceExhausted if is_too_large(self) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
                tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                tonic::Code::Aborted => StatusCode::BAD_GATEWAY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

fn is_too_large(e: &ServiceError) -> bool {
    matches!(e, ServiceError::Forwarded(_, m) if m.contains("exceeds the maximum"))
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

impl From<statemesh_sdk::AddressError> for ServiceError {
    fn from(e: statemesh_sdk::AddressError) -> Self {
        ServiceError::InvalidArgument(e.to_string())
    }
}

impl actix_web::ResponseError for ServiceError {
    fn status_code(&self) -> StatusCode {
        self.http_status()
    }
    fn error_response(&self) -> actix_web::HttpResponse {
        actix_web::HttpResponse::build(self.http_status())
            .content_type("application/json")
            .body(serde_json::json!({ "error": self.to_string() }).to_string())
    }
}

/// An error with its causes, `outer: cause: root cause` (a cause whose text is already there,
/// as wrapping errors often print their source, is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `text` followed by the causes from `source` on, each once.
pub fn with_causes(mut text: String, source: Option<&dyn std::error::Error>) -> String {
    let mut cur = source;
    while let Some(c) = cur {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = c.source();
    }
    text
}
