//! A remote-function server: serves Rust [`StatefulFunction`]s over StateFun's request-reply
//! protocol (v3) on actix-web, so statemesh nodes (or StateFun itself) can call them over
//! HTTP. The function API is the same as for embedded functions.
//!
//! ```no_run
//! # use statemesh_sdk::{server::FunctionServer, FnFunction, TypeName};
//! # fn f() -> FnFunction { FnFunction::new(vec![], |_ctx, _msg| Ok(())) }
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let server = FunctionServer::new().function(TypeName::parse("my/fn").unwrap(), f());
//!     server.serve("127.0.0.1:8000").await
//! }
//! ```
//!
//! Per request: the batch's target type selects the function; if the request lacks a state
//! the function declares, the answer is an "incomplete invocation context" listing the
//! missing specs (the runtime registers them and resends the batch); otherwise each message is
//! invoked in order and the answer carries the state mutations and all effects. A failing
//! invocation fails the whole request with HTTP 500 (the runtime retries the batch; nothing of
//! it was applied).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpResponse, HttpServer};
use bytes::Bytes;
use prost::Message;
use statemesh_proto::statefun_v3 as pb;

use crate::{
    Address, Context, Effects, Expiration, StateSlot, StatefulFunction, TypeName, TypedValue,
    ValueSpecDescriptor,
};

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The body is not a `ToFunction` invocation batch.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// No function of the target type is served here.
    #[error("no function of type {0:?} is served here")]
    UnknownFunction(String),
    /// An invocation failed (or panicked).
    #[error("invocation of {address} failed: {error}")]
    Failed {
        /// The target address.
        address: String,
        /// The function's error.
        error: String,
    },
}

/// Serves stateful functions over HTTP. Cheap to clone.
#[derive(Clone, Default)]
pub struct FunctionServer {
    functions: Arc<HashMap<TypeName, Arc<dyn StatefulFunction>>>,
    /// Verify requests' signatures with this key ([`crate::signing`]).
    signing_key: Option<Arc<[u8]>>,
}

fn addr_to_pb(a: &Address) -> pb::Address {
    pb::Address {
        namespace: a.typ.namespace().to_string(),
        r#type: a.typ.name().to_string(),
        id: a.id.to_string(),
    }
}

fn value_to_pb(v: &TypedValue) -> pb::TypedValue {
    pb::TypedValue {
        typename: v.typename().to_string(),
        has_value: v.has_value(),
        value: v.value().clone(),
    }
}

fn spec_to_pb(s: &ValueSpecDescriptor) -> pb::from_function::PersistedValueSpec {
    let (mode, ms) = match s.expiration {
        Expiration::None => (0, 0),
        Expiration::AfterWrite(d) => (1, d.as_millis() as i64),
        Expiration::AfterInvoke(d) => (2, d.as_millis() as i64),
    };
    pb::from_function::PersistedValueSpec {
        state_name: s.name.to_string(),
        expiration_spec: Some(pb::from_function::ExpirationSpec {
            mode,
            expire_after_millis: ms,
        }),
        type_typename: s.typename.to_string(),
    }
}

/// Egress topics map to StateFun egress identifiers: `namespace/type` as it is; a topic
/// without a `/` is `statemesh/<topic>` (which a statemesh node publishes as `<topic>`).
fn egress_id(topic: &str) -> (String, String) {
    match topic.rsplit_once('/') {
        Some((ns, t)) => (ns.to_string(), t.to_string()),
        None => ("statemesh".to_string(), topic.to_string()),
    }
}

impl FunctionServer {
    /// A server with no functions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `f` for function type `typ`.
    pub fn function(mut self, typ: TypeName, f: impl StatefulFunction) -> Self {
        Arc::make_mut(&mut self.functions).insert(typ, Arc::new(f));
        self
    }

    /// Serves a shared function for `typ`.
    pub fn function_arc(mut self, typ: TypeName, f: Arc<dyn StatefulFunction>) -> Self {
        Arc::make_mut(&mut self.functions).insert(typ, f);
        self
    }

    /// Handles one request body (a serialized `ToFunction`) and returns the serialized
    /// `FromFunction`. Pure: no I/O.
    pub fn handle(&self, body: &[u8]) -> Result<Vec<u8>, ServeError> {
        let req = pb::ToFunction::decode(body).map_err(|e| ServeError::Malformed(e.to_string()))?;
        let Some(pb::to_function::Request::Invocation(batch)) = req.request else {
            return Err(ServeError::Malformed("expected an invocation batch".into()));
        };
        let target = batch
            .target
            .ok_or_else(|| ServeError::Malformed("batch without a target".into()))?;
        let address = Address::from_parts(&target.namespace, &target.r#type, &target.id)
            .map_err(|e| ServeError::Malformed(e.to_string()))?;
        let function = self
            .functions
            .get(&address.typ)
            .ok_or_else(|| ServeError::UnknownFunction(address.typ.to_string()))?;
        let specs = function.value_specs();

        let missing: Vec<_> = specs
            .iter()
            .filter(|s| !batch.state.iter().any(|p| p.state_name == *s.name))
            .map(spec_to_pb)
            .collect();
        if !missing.is_empty() {
            let ctx = pb::from_function::IncompleteInvocationContext {
                missing_values: missing,
            };
            return Ok(pb::FromFunction {
                response: Some(pb::from_function::Response::IncompleteInvocationContext(
                    ctx,
                )),
            }
            .encode_to_vec());
        }
        let mut slots: Vec<StateSlot> = specs
            .iter()
            .map(|spec| {
                let mut slot = StateSlot::empty(spec);
                if let Some(v) = batch
                    .state
                    .iter()
                    .find(|p| p.state_name == *spec.name)
                    .and_then(|p| p.state_value.as_ref())
                {
                    if v.has_value {
                        slot.value = Some(v.value.clone());
                    }
                }
                slot
            })
            .collect();

        // The runtime enforces TTLs; values it sends are live.
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut effects = Effects::default();
        let mut undo = Vec::new();
        for inv in batch.invocations {
            let caller = inv
                .caller
                .and_then(|c| Address::from_parts(&c.namespace, &c.r#type, &c.id).ok());
            let message = match inv.argument {
                Some(a) if a.has_value => TypedValue::new(a.typename, a.value),
                Some(a) => TypedValue::empty(a.typename),
                None => {
                    return Err(ServeError::Malformed(
                        "invocation without an argument".into(),
                    ))
                }
            };
            let mut ctx = Context::new(
                &address,
                caller.as_ref(),
                now_ms,
                &mut slots,
                &mut effects,
                &mut undo,
            );
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                function.invoke(&mut ctx, &message)
            }));
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "function panicked".to_string(),
            };
            return Err(ServeError::Failed {
                address: address.to_string(),
                error,
            });
        }

        let mut resp = pb::from_function::InvocationResponse::default();
        for s in slots.iter().filter(|s| s.dirty) {
            resp.state_mutations.push(match &s.value {
                Some(v) => pb::from_function::PersistedValueMutation {
                    mutation_type: 1,
                    state_name: s.name.to_string(),
                    state_value: Some(pb::TypedValue {
                        typename: s.typename.to_string(),
                        has_value: true,
                        value: v.clone(),
                    }),
                },
                None => pb::from_function::PersistedValueMutation {
                    mutation_type: 0,
                    state_name: s.name.to_string(),
                    state_value: None,
                },
            });
        }
        for (t, v) in &effects.messages {
            resp.outgoing_messages.push(pb::from_function::Invocation {
                target: Some(addr_to_pb(t)),
                argument: Some(value_to_pb(v)),
            });
        }
        for d in &effects.delayed {
            resp.delayed_invocations
                .push(pb::from_function::DelayedInvocation {
                    is_cancellation_request: false,
                    cancellation_token: d.cancellation_token.clone().unwrap_or_default(),
                    delay_in_ms: d
                        .delay
                        .min(Duration::from_secs(u32::MAX as u64))
                        .as_millis() as i64,
                    target: Some(addr_to_pb(&d.target)),
                    argument: Some(value_to_pb(&d.message)),
                });
        }
        for token in &effects.cancellations {
            resp.delayed_invocations
                .push(pb::from_function::DelayedInvocation {
                    is_cancellation_request: true,
                    cancellation_token: token.clone(),
                    ..Default::default()
                });
        }
        for (topic, v) in &effects.egress {
            let (egress_namespace, egress_type) = egress_id(topic);
            resp.outgoing_egresses
                .push(pb::from_function::EgressMessage {
                    egress_namespace,
                    egress_type,
                    argument: Some(value_to_pb(v)),
                });
        }
        Ok(pb::FromFunction {
            response: Some(pb::from_function::Response::InvocationResult(resp)),
        }
        .encode_to_vec())
    }

    /// The same server refusing (HTTP 401) requests not signed with `key` by a node with
    /// `[auth] function_signing_key` ([`crate::signing`]), or signed more than 5 minutes away
    /// from now.
    pub fn verify_signatures(mut self, key: impl AsRef<[u8]>) -> Self {
        self.signing_key = Some(Arc::from(key.as_ref()));
        self
    }

    /// Mounts the endpoint (`POST path`) on an actix-web app.
    pub fn configure(&self, path: &str) -> impl FnOnce(&mut web::ServiceConfig) + Clone {
        let me = self.clone();
        let path = path.to_string();
        move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(web::Data::new(me))
                .app_data(web::PayloadConfig::new(64 << 20))
                .route(&path, web::post().to(endpoint));
        }
    }

    /// Serves `POST /statefun` on a bound listener until the actix system stops.
    pub async fn serve_listener(self, listener: std::net::TcpListener) -> std::io::Result<()> {
        let configure = self.configure("/statefun");
        HttpServer::new(move || App::new().configure(configure.clone()))
            .listen(listener)?
            .run()
            .await
    }

    /// Serves `POST /statefun` on `addr` (e.g. `127.0.0.1:8000`).
    pub async fn serve(self, addr: &str) -> std::io::Result<()> {
        self.serve_listener(std::net::TcpListener::bind(addr)?)
            .await
    }
}

async fn endpoint(
    server: web::Data<FunctionServer>,
    req: actix_web::HttpRequest,
    body: Bytes,
) -> HttpResponse {
    if let Some(key) = &server.signing_key {
        let header = req
            .headers()
            .get(crate::signing::HEADER)
            .and_then(|v| v.to_str().ok());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Err(e) = crate::signing::verify(key, header, &body, now, Duration::from_secs(300)) {
            tracing::warn!(error = %e, "request refused: its signature does not verify");
            return HttpResponse::Unauthorized().body(e);
        }
    }
    match server.handle(&body) {
        Ok(b) => HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(b),
        Err(e) => {
            tracing::warn!(error = %e, "request failed");
            let status = match e {
                ServeError::Malformed(_) => actix_web::http::StatusCode::BAD_REQUEST,
                ServeError::UnknownFunction(_) => actix_web::http::StatusCode::NOT_FOUND,
                ServeError::Failed { .. } => actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            };
            HttpResponse::build(status)
                .content_type("text/plain")
                .body(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FnFunction, ValueSpec};

    fn counter() -> FnFunction {
        let total = ValueSpec::<i64>::new("total").expire_after_invoke(Duration::from_secs(5));
        FnFunction::new(vec![total.descriptor().clone()], move |ctx, msg| {
            let t = ctx.get(&total)?.unwrap_or(0) + msg.get::<i64>()?;
            ctx.set(&total, &t)?;
            ctx.reply(TypedValue::of(&t));
            ctx.send_egress("totals", TypedValue::of(&t));
            Ok(())
        })
    }

    fn request(state: Vec<pb::to_function::PersistedValue>, deltas: &[i64]) -> Vec<u8> {
        let a = |ns: &str, t: &str, id: &str| pb::Address {
            namespace: ns.into(),
            r#type: t.into(),
            id: id.into(),
        };
        pb::ToFunction {
            request: Some(pb::to_function::Request::Invocation(
                pb::to_function::InvocationBatchRequest {
                    target: Some(a("rs", "counter", "c")),
                    state,
                    invocations: deltas
                        .iter()
                        .map(|d| pb::to_function::Invocation {
                            caller: Some(a("statemesh", "reply", "1")),
                            argument: Some(value_to_pb(&TypedValue::of(d))),
                        })
                        .collect(),
                },
            )),
        }
        .encode_to_vec()
    }

    #[test]
    fn negotiates_state_then_invokes_the_batch() {
        let s = FunctionServer::new().function(TypeName::parse("rs/counter").unwrap(), counter());
        let r = pb::FromFunction::decode(&s.handle(&request(vec![], &[1])).unwrap()[..]).unwrap();
        let Some(pb::from_function::Response::IncompleteInvocationContext(ctx)) = r.response else {
            panic!("{r:?}")
        };
        assert_eq!(ctx.missing_values[0].state_name, "total");
        assert_eq!(
            ctx.missing_values[0].type_typename,
            "io.statefun.types/long"
        );
        assert_eq!(ctx.missing_values[0].expiration_spec.unwrap().mode, 2);

        let state = vec![pb::to_function::PersistedValue {
            state_name: "total".into(),
            state_value: Some(value_to_pb(&TypedValue::of(&10i64))),
        }];
        let r = pb::FromFunction::decode(&s.handle(&request(state, &[1, 2])).unwrap()[..]).unwrap();
        let Some(pb::from_function::Response::InvocationResult(res)) = r.response else {
            panic!("{r:?}")
        };
        assert_eq!(res.state_mutations.len(), 1);
        let v = res.state_mutations[0].state_value.clone().unwrap();
        assert_eq!(<i64 as crate::Codec>::decode(&v.value).unwrap(), 13);
        assert_eq!(res.outgoing_messages.len(), 2, "two replies");
        assert_eq!(res.outgoing_egresses[0].egress_namespace, "statemesh");
        assert_eq!(res.outgoing_egresses[0].egress_type, "totals");
    }

    #[test]
    fn errors() {
        let s = FunctionServer::new().function(TypeName::parse("rs/counter").unwrap(), counter());
        assert!(matches!(
            s.handle(b"\xff\xff"),
            Err(ServeError::Malformed(_))
        ));
        let other = FunctionServer::new();
        assert!(matches!(
            other.handle(&request(vec![], &[1])),
            Err(ServeError::UnknownFunction(_))
        ));
        let state = vec![pb::to_function::PersistedValue {
            state_name: "total".into(),
            state_value: None,
        }];
        let bad = {
            let mut r = pb::ToFunction::decode(&request(state, &[1])[..]).unwrap();
            if let Some(pb::to_function::Request::Invocation(b)) = &mut r.request {
                b.invocations[0].argument = Some(value_to_pb(&TypedValue::of(&"x".to_string())));
            }
            r.encode_to_vec()
        };
        assert!(matches!(s.handle(&bad), Err(ServeError::Failed { .. })));
    }
}
