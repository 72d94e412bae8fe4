//! Remote functions: the StateFun request-reply protocol (v3) over HTTP/1.1.
//!
//! One batch per address is in flight at a time (the shard guarantees it); messages that
//! arrive meanwhile queue in the shard's inbox and go together in the next batch, up to the
//! endpoint's `maxNumBatchRequests`. Every request carries every registered state of the
//! function type; a v3 SDK that needs more answers with an "incomplete invocation context",
//! the specs are registered, and the same batch is sent again with them.
//!
//! Failures: transport errors, 5xx and 408/409/420/429/499 — and bodies that do not decode
//! — are retried with exponential backoff within the endpoint's `call` budget; after it, or
//! at once for deterministic protocol violations (a mutation of an unregistered state, a
//! typename that differs from the registered one, an oversized body), the batch goes to
//! `statemesh/dead-letters` with the reason and the rest of the mesh keeps running.
//!
//! The call itself is pure I/O; turning a response into state changes and effects
//! ([`apply_response`]) is a pure function, tested without sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use prost::Message;
use statemesh_proto::statefun_v3 as pb;
use statemesh_sdk::{
    Address, DelayedMessage, Effects, Expiration, StateSlot, TypeName, TypedValue,
    ValueSpecDescriptor,
};

use crate::module::{Endpoint, WireProtocol};
use crate::shard::Pending;

mod v2;

/// The HTTP client of an endpoint (keep-alive pool).
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

static NEXT_POOL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A new identity for an endpoint's connection pools.
pub(crate) fn new_pool_id() -> u64 {
    NEXT_POOL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// One keep-alive pool per endpoint *per shard thread*: a connection is driven by the
    /// thread that uses it, so a call never wakes another thread.
    static POOLS: std::cell::RefCell<std::collections::HashMap<u64, HttpClient>> = Default::default();
}

/// Builds the client of an endpoint.
pub fn client_for(e: &Endpoint) -> HttpClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_connect_timeout(Some(e.connect_timeout));
    connector.set_nodelay(true);
    // `https://` endpoints: the system's roots plus `[tls] remote_ca`.
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*crate::tls::remote_client()).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(e.pool_ttl)
        .pool_max_idle_per_host(e.pool_size)
        .build(connector)
}

/// A remote function type bound to its endpoint.
pub struct RemoteFunction {
    typ: TypeName,
    endpoint: Endpoint,
    url: String,
    pool_id: u64,
    /// Sign requests with this key (`[auth] function_signing_key`).
    signing_key: Option<Arc<[u8]>>,
}

impl RemoteFunction {
    /// The URL it is called at.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// How a batch call ended.
pub enum Outcome {
    /// The function ran the whole batch: state was updated in place, these are its effects.
    Done(Effects),
    /// The function asked for these states; register them and send the same batch again.
    NeedState(Vec<ValueSpecDescriptor>),
    /// Give up on the batch: dead-letter it with this reason.
    Failed(String),
}

/// The outcome of a batch call and how many attempts failed on the way.
pub struct CallResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Attempts that failed (retried, or the last one of a failed call).
    pub failed_attempts: u32,
}

/// One failed attempt.
struct AttemptError {
    reason: String,
    retryable: bool,
}

fn retryable_status(code: u16) -> bool {
    code >= 500 || matches!(code, 408 | 409 | 420 | 429 | 499)
}

impl RemoteFunction {
    pub(crate) fn new(
        typ: TypeName,
        endpoint: Endpoint,
        pool_id: u64,
        signing_key: Option<Arc<[u8]>>,
    ) -> Self {
        let url = endpoint.url_for(typ.name());
        RemoteFunction {
            typ,
            endpoint,
            url,
            pool_id,
            signing_key,
        }
    }

    /// Most messages per batch (0 = unlimited).
    pub fn max_batch(&self) -> usize {
        self.endpoint.max_batch
    }

    fn request(
        &self,
        target: &Address,
        batch: &[Pending],
        state: &[StateSlot],
        now_ms: u64,
    ) -> Vec<u8> {
        let req = Self::request_v3(target, batch, state, now_ms);
        match self.endpoint.protocol {
            WireProtocol::V3 => req.encode_to_vec(),
            WireProtocol::V2 => v2::request(req).encode_to_vec(),
        }
    }

    fn request_v3(
        target: &Address,
        batch: &[Pending],
        state: &[StateSlot],
        now_ms: u64,
    ) -> pb::ToFunction {
        let addr = |a: &Address| pb::Address {
            namespace: a.typ.namespace().to_string(),
            r#type: a.typ.name().to_string(),
            id: a.id.to_string(),
        };
        let tv = |v: &TypedValue| pb::TypedValue {
            typename: v.typename().to_string(),
            has_value: v.has_value(),
            value: v.value().clone(),
        };
        let req = pb::ToFunction {
            request: Some(pb::to_function::Request::Invocation(
                pb::to_function::InvocationBatchRequest {
                    target: Some(addr(target)),
                    state: state
                        .iter()
                        .map(|s| pb::to_function::PersistedValue {
                            state_name: s.name.to_string(),
                            state_value: Some(match s.live_value(now_ms) {
                                Some(v) => pb::TypedValue {
                                    typename: s.typename.to_string(),
                                    has_value: true,
                                    value: v.clone(),
                                },
                                None => pb::TypedValue {
                                    typename: s.typename.to_string(),
                                    has_value: false,
                                    value: Bytes::new(),
                                },
                            }),
                        })
                        .collect(),
                    invocations: batch
                        .iter()
                        .map(|p| pb::to_function::Invocation {
                            caller: p.caller.as_ref().map(addr),
                            argument: Some(tv(&p.message)),
                        })
                        .collect(),
                },
            )),
        };
        req
    }

    async fn attempt(
        &self,
        body: Bytes,
        budget: Duration,
        traceparent: Option<&str>,
    ) -> Result<Bytes, AttemptError> {
        let mut req =
            hyper::Request::post(&self.url).header("content-type", "application/octet-stream");
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        if let Some(k) = &self.signing_key {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            req = req.header(
                statemesh_sdk::signing::HEADER,
                statemesh_sdk::signing::sign(k, now, &body),
            );
        }
        let req = req.body(Full::new(body)).map_err(|e| AttemptError {
            reason: format!("invalid endpoint URL {:?}: {e}", self.url),
            retryable: false,
        })?;
        let limit = self.endpoint.payload_max_bytes;
        let call = async {
            let client = POOLS.with(|p| {
                p.borrow_mut()
                    .entry(self.pool_id)
                    .or_insert_with(|| client_for(&self.endpoint))
                    .clone()
            });
            let resp = client.request(req).await.map_err(|e| AttemptError {
                reason: format!("transport error: {}", crate::error::error_chain(&e)),
                retryable: true,
            })?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    let too_big = e
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    AttemptError {
                        reason: if too_big {
                            format!("response body exceeds payload_max_bytes ({limit} bytes)")
                        } else {
                            format!("transport error reading the response: {e}")
                        },
                        retryable: !too_big,
                    }
                })?;
            if !(200..300).contains(&status) {
                return Err(AttemptError {
                    reason: format!("HTTP status {status}"),
                    retryable: retryable_status(status),
                });
            }
            Ok(body.to_bytes())
        };
        match tokio::time::timeout(budget, call).await {
            Ok(r) => r,
            Err(_) => Err(AttemptError {
                reason: format!("no response within {} ms", budget.as_millis()),
                retryable: true,
            }),
        }
    }

    fn decode(
        &self,
        body: &[u8],
        state: &[StateSlot],
    ) -> Result<pb::FromFunction, prost::DecodeError> {
        match self.endpoint.protocol {
            WireProtocol::V3 => pb::FromFunction::decode(body),
            WireProtocol::V2 => statemesh_proto::statefun_v2::FromFunction::decode(body)
                .map(|r| v2::response(r, state)),
        }
    }

    /// Calls the function with a batch, retrying within the call budget. Updates `state` in
    /// place on success.
    pub(crate) async fn invoke(
        &self,
        target: &Address,
        batch: &[Pending],
        state: &mut [StateSlot],
        now_ms: u64,
        traceparent: Option<&str>,
    ) -> CallResult {
        let body = Bytes::from(self.request(target, batch, state, now_ms));
        let deadline = Instant::now() + self.endpoint.call_timeout;
        let mut backoff = Duration::from_millis(10);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let err = match self.attempt(body.clone(), remaining, traceparent).await {
                Ok(resp) => match self.decode(&resp, state) {
                    Ok(ff) => {
                        let outcome = match apply_response(&self.typ, ff, state, now_ms) {
                            Outcome::Failed(reason) => {
                                tracing::error!(function = %self.typ, url = %self.url, address = %target, error = %reason, "remote function violated the protocol; dead-lettering the batch");
                                Outcome::Failed(format!("{reason} (answer of {} after {attempts} attempt(s))", self.url))
                            }
                            other => other,
                        };
                        let failed_attempts = attempts - 1 + u32::from(matches!(outcome, Outcome::Failed(_)));
                        return CallResult { outcome, failed_attempts };
                    }
                    Err(e) => AttemptError {
                        reason: format!("response is not a StateFun {:?} FromFunction message ({e}); does the endpoint speak that protocol?",
                            self.endpoint.protocol),
                        retryable: true,
                    },
                },
                Err(e) => e,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !err.retryable || remaining < Duration::from_millis(20) {
                tracing::error!(function = %self.typ, url = %self.url, address = %target, attempts, error = %err.reason, "remote call failed for good; dead-lettering the batch");
                return CallResult {
                    outcome: Outcome::Failed(format!(
                        "remote function {} at {} failed after {attempts} attempt(s): {}",
                        self.typ, self.url, err.reason
                    )),
                    failed_attempts: attempts,
                };
            }
            tracing::warn!(function = %self.typ, url = %self.url, address = %target, attempt = attempts, error = %err.reason, ?backoff, "remote call failed; retrying");
            // Use the whole budget: the last wait is cut short to leave time for one more try.
            tokio::time::sleep(backoff.min(remaining / 2)).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

fn to_address(a: Option<pb::Address>, what: &str) -> Result<Address, String> {
    let a = a.ok_or_else(|| format!("{what} without a target address"))?;
    Address::from_parts(&a.namespace, &a.r#type, &a.id).map_err(|e| format!("{what}: {e}"))
}

fn to_value(v: Option<pb::TypedValue>) -> TypedValue {
    match v {
        Some(v) if v.has_value => TypedValue::new(v.typename, v.value),
        Some(v) => TypedValue::empty(v.typename),
        None => TypedValue::empty("io.statefun.types/unknown"),
    }
}

/// Applies a `FromFunction` to the address's state and returns the batch's effects (pure).
pub(crate) fn apply_response(
    typ: &TypeName,
    ff: pb::FromFunction,
    state: &mut [StateSlot],
    now_ms: u64,
) -> Outcome {
    match ff.response {
        None => Outcome::Done(Effects::default()),
        Some(pb::from_function::Response::IncompleteInvocationContext(ctx)) => {
            let specs: Vec<ValueSpecDescriptor> = ctx
                .missing_values
                .into_iter()
                .map(|s| ValueSpecDescriptor {
                    name: Arc::from(s.state_name.as_str()),
                    typename: Arc::from(if s.type_typename.is_empty() {
                        "io.statefun.types/raw"
                    } else {
                        &s.type_typename
                    }),
                    expiration: match s.expiration_spec {
                        Some(e) if e.expire_after_millis > 0 => {
                            let d = Duration::from_millis(e.expire_after_millis as u64);
                            match e.mode {
                                1 => Expiration::AfterWrite(d),
                                2 => Expiration::AfterInvoke(d),
                                _ => Expiration::None,
                            }
                        }
                        _ => Expiration::None,
                    },
                })
                .collect();
            let missing: Vec<String> = specs
                .iter()
                .filter(|s| {
                    !state
                        .iter()
                        .any(|v| v.name == s.name && v.typename == s.typename)
                })
                .map(|s| s.name.to_string())
                .collect();
            if missing.is_empty() {
                return Outcome::Failed(format!(
                    "remote function {typ} asked again for states it was sent ({}); state negotiation cannot converge",
                    specs.iter().map(|s| s.name.to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
            Outcome::NeedState(specs)
        }
        Some(pb::from_function::Response::InvocationResult(r)) => {
            let mut effects = Effects::default();
            for m in r.outgoing_messages {
                match to_address(m.target, "outgoing message") {
                    Ok(t) => effects.messages.push((t, to_value(m.argument))),
                    Err(e) => return Outcome::Failed(format!("remote function {typ}: {e}")),
                }
            }
            for d in r.delayed_invocations {
                if d.is_cancellation_request {
                    effects.cancellations.push(d.cancellation_token);
                    continue;
                }
                match to_address(d.target, "delayed message") {
                    Ok(t) => effects.delayed.push(DelayedMessage {
                        delay: Duration::from_millis(d.delay_in_ms.max(0) as u64),
                        target: t,
                        message: to_value(d.argument),
                        cancellation_token: (!d.cancellation_token.is_empty())
                            .then_some(d.cancellation_token),
                    }),
                    Err(e) => return Outcome::Failed(format!("remote function {typ}: {e}")),
                }
            }
            for e in r.outgoing_egresses {
                let value = to_value(e.argument);
                let topic = egress_topic(&e.egress_namespace, &e.egress_type, &value);
                effects.egress.push((topic, value));
            }
            // Validate every mutation before applying any, so a bad response changes nothing.
            for m in &r.state_mutations {
                let Some(slot) = state.iter().find(|s| *s.name == m.state_name) else {
                    return Outcome::Failed(format!(
                        "remote function {typ} mutated state {:?}, which it never registered",
                        m.state_name
                    ));
                };
                if m.mutation_type == 1 {
                    let tn = m
                        .state_value
                        .as_ref()
                        .map(|v| v.typename.as_str())
                        .unwrap_or("");
                    if tn != &*slot.typename {
                        return Outcome::Failed(format!(
                            "remote function {typ} wrote state {:?} as {tn:?}, but it is registered as {:?}",
                            m.state_name, slot.typename
                        ));
                    }
                }
            }
            for m in r.state_mutations {
                let slot = state
                    .iter_mut()
                    .find(|s| *s.name == m.state_name)
                    .expect("validated above");
                slot.dirty = true;
                if m.mutation_type == 1 {
                    let v = m.state_value.map(|v| v.value).unwrap_or_default();
                    slot.expires_at_ms = match slot.expiration.ttl() {
                        Some(ttl) => now_ms + ttl.as_millis() as u64,
                        None => 0,
                    };
                    slot.value = Some(v);
                } else {
                    slot.value = None;
                    slot.expires_at_ms = 0;
                }
            }
            Outcome::Done(effects)
        }
    }
}

/// The egress topic of an egress message: the playground egress's records name their own
/// topic; `statemesh/<topic>` (what the Rust SDK's server sends for a plain topic) is
/// `<topic>`; any other egress `namespace/type` is a topic of that name.
fn egress_topic(ns: &str, typ: &str, value: &TypedValue) -> String {
    if ns == "statemesh" {
        return typ.to_string();
    }
    if ns == "io.statefun.playground"
        && typ == "egress"
        && value.typename() == "io.statefun.playground/EgressRecord"
    {
        if let Ok(rec) = serde_json::from_slice::<serde_json::Value>(value.value()) {
            if let Some(t) = rec.get("topic").and_then(|t| t.as_str()) {
                return t.to_string();
            }
        }
    }
    format!("{ns}/{typ}")
}
