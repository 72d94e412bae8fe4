//! HTTP ingress and admin on actix-web.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/send/{ns}/{type}/{id}` | one-way message; 202 |
//! | `POST /v1/call/{ns}/{type}/{id}` | request-reply; the reply in the body, its typename in `Content-Type` |
//! | `GET /v1/state/{ns}/{type}/{id}` | JSON of the address's states |
//! | `PUT`/`DELETE /v1/state/{ns}/{type}/{id}?name=N` | sets (body: the value) or deletes one state through a committed epoch; JSON of the states after |
//! | `GET /v1/dead-letters` | the dead letters of every live member (`?local=true`: this node's) |
//! | `POST /v1/dead-letters/{id}/replay` | replays a dead letter on the member holding it |
//! | `GET /v1/egress/{topic}` | pops the next record of a topic (its id in `Statemesh-Record-Id`); 204 when there is none |
//! | `GET /v1/functions` | the registered function types |
//! | `GET /v1/checkpoints` | epochs, sizes, durations, the last commit and recovery |
//! | `GET /v1/cluster` | the control group: leader, term, placement version, members and their key groups |
//! | `GET /healthz`, `/readyz`, `/metrics` | liveness, readiness, Prometheus |
//! | `GET /ui` | the web console (`node/ui`, built into the binary) |
//!
//! Bodies use `Content-Type: application/vnd.<typename>` (`text/plain` = string). Built-in
//! types travel in their plain-text form (`5`, `true`, `hello`); others as raw bytes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use statemesh_sdk::{Address, TypedValue};

use super::{typename_from_content_type, value_from_text, value_to_text};
use crate::error::ServiceError;
use crate::node::Shared;

/// The target address of a `/{ns}/{type}/{id}` path, after checking the body's size.
fn target_of(
    shared: &Shared,
    path: &(String, String, String),
    body: &Bytes,
) -> Result<Address, ServiceError> {
    let target = Address::from_parts(&path.0, &path.1, &path.2)?;
    let max = shared.config.max_message_bytes;
    if body.len() > max {
        return Err(ServiceError::TooLarge {
            size: body.len(),
            max,
        });
    }
    Ok(target)
}

fn parse_request(
    shared: &Shared,
    req: &HttpRequest,
    path: &(String, String, String),
    body: Bytes,
) -> Result<(Address, TypedValue), ServiceError> {
    let target = target_of(shared, path, &body)?;
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    let typename = typename_from_content_type(ct)?;
    Ok((target, value_from_text(&typename, body)?))
}

fn reply_response(v: &TypedValue) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(format!("application/vnd.{}", v.typename()))
        .body(value_to_text(v))
}

async fn send(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    body: Bytes,
) -> Result<HttpResponse, ServiceError> {
    let (target, message) = parse_request(&shared, &req, &path, body)?;
    let key = idempotency_key(&req)?;
    let span = ingress_span(&req, &target);
    super::traced(shared.router.send_with(target, message, key), span).await?;
    Ok(HttpResponse::Accepted().finish())
}

/// The `ingress` span of a request (continuing its `traceparent` header), if it is traced.
fn ingress_span(req: &HttpRequest, target: &Address) -> Option<tracing::Span> {
    if !crate::telemetry::enabled() {
        return None;
    }
    let header = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    crate::telemetry::ingress(&target.to_string(), header)
}

/// The `Idempotency-Key` header, if any.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ServiceError> {
    match req.headers().get("idempotency-key") {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim().to_string())).map_err(|_| {
            ServiceError::InvalidArgument("Idempotency-Key: expected visible ASCII".into())
        }),
    }
}

fn call_timeout(shared: &Shared, req: &HttpRequest) -> Result<u64, ServiceError> {
    let from_query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("timeout_ms").cloned());
    let from_header = req
        .headers()
        .get("statemesh-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    match from_query.or(from_header) {
        None => Ok(shared.config.call_timeout_ms),
        Some(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| {
                ServiceError::InvalidArgument(format!(
                    "timeout_ms: expected a positive number of milliseconds, found {s:?}"
                ))
            }),
    }
}

async fn call(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    body: Bytes,
) -> Result<HttpResponse, ServiceError> {
    let (target, message) = parse_request(&shared, &req, &path, body)?;
    let timeout = call_timeout(&shared, &req)?;
    let key = idempotency_key(&req)?;
    let span = ingress_span(&req, &target);
    let reply = super::traced(
        shared
            .router
            .call_with(target, message, Duration::from_millis(timeout), key),
        span,
    )
    .await?;
    Ok(reply_response(&reply))
}

async fn state(
    shared: web::Data<Shared>,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ServiceError> {
    let address = Address::from_parts(&path.0, &path.1, &path.2)?;
    let values = shared.router.get_state(address.clone()).await?;
    Ok(HttpResponse::Ok().json(super::states_to_json(&address, values)))
}

#[derive(serde::Deserialize)]
struct StateQuery {
    name: Option<String>,
}

/// `PUT /v1/state/{ns}/{type}/{id}?name=NAME`: sets one state through a committed epoch. The
/// body is the value: text converted with the state's declared typename when it comes as
/// `text/plain` (or without a content type), else encoded as `Content-Type:
/// application/vnd.<typename>` says, which must be the declared one. `DELETE` deletes it.
/// Both answer with the address's states after the change.
async fn set_state(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    query: web::Query<StateQuery>,
    body: Bytes,
) -> Result<HttpResponse, ServiceError> {
    use crate::admin::NewValue;
    let address = target_of(&shared, &path, &body)?;
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    let value = if req.method() == actix_web::http::Method::DELETE {
        NewValue::Delete
    } else {
        match ct.map(|c| c.split(';').next().unwrap_or("").trim()) {
            None | Some("text/plain") => {
                NewValue::Text(String::from_utf8(body.to_vec()).map_err(|_| {
                    ServiceError::InvalidArgument("a text/plain value must be UTF-8".into())
                })?)
            }
            Some(_) => {
                let typename = typename_from_content_type(ct)?;
                let v = value_from_text(&typename, body)?;
                NewValue::Typed {
                    typename,
                    value_base64: base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        v.value(),
                    ),
                }
            }
        }
    };
    let name = query.into_inner().name.unwrap_or_default();
    let key = idempotency_key(&req)?;
    let values = shared
        .router
        .set_state(
            address.clone(),
            crate::admin::StateEdit { name, value },
            Duration::from_millis(shared.config.call_timeout_ms),
            key,
        )
        .await?;
    Ok(HttpResponse::Ok().json(super::states_to_json(&address, values)))
}

#[derive(serde::Deserialize)]
struct LocalQuery {
    /// Only this node's.
    #[serde(default)]
    local: bool,
}

#[derive(serde::Deserialize)]
struct DeadLetterQuery {
    /// Only this node's.
    #[serde(default)]
    local: bool,
    limit: Option<usize>,
}

/// Asks every other live member at once (`ask` on a client to it; 5 s each): the answers by
/// node, and the members that did not answer, as JSON for the response.
async fn ask_members<T, F, Fut>(shared: &Shared, ask: F) -> (Vec<(u64, T)>, Vec<serde_json::Value>)
where
    F: Fn(statemesh_sdk::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, statemesh_sdk::ClientError>>,
{
    let options = member_options(shared);
    let asks = other_members(shared).into_iter().map(|(node, grpc)| {
        let (options, ask) = (options.clone(), &ask);
        async move {
            let r =
                async { ask(statemesh_sdk::Client::connect_with(&grpc, &options).await?).await };
            (node, tokio::time::timeout(Duration::from_secs(5), r).await)
        }
    });
    let (mut answers, mut unreachable) = (Vec::new(), Vec::new());
    for (node, r) in futures::future::join_all(asks).await {
        match r {
            Ok(Ok(t)) => answers.push((node, t)),
            Ok(Err(e)) => {
                unreachable.push(serde_json::json!({"node": node, "error": e.to_string()}))
            }
            Err(_) => {
                unreachable.push(serde_json::json!({"node": node, "error": "no answer within 5 s"}))
            }
        }
    }
    (answers, unreachable)
}

/// A dead letter as JSON, with the node holding it.
fn dead_letter_json(node: u64, l: crate::admin::DeadLetter) -> serde_json::Value {
    let mut j = l.record;
    if !j.is_object() {
        j = serde_json::json!({});
    }
    j["id"] = l.id.into();
    j["node"] = node.into();
    j
}

/// How this node reaches another member's admin API: its admin token, the cluster's CA.
fn member_options(shared: &Shared) -> statemesh_sdk::ConnectOptions {
    statemesh_sdk::ConnectOptions {
        token: shared.auth.admin_token().map(String::from),
        ca_pem: shared.tls.as_ref().map(|t| t.ca_pem.clone()),
    }
}

/// The other live members' gRPC URLs, by id.
fn other_members(shared: &Shared) -> Vec<(u64, String)> {
    let view = shared.cluster.lock().clone();
    view.members
        .into_iter()
        .filter(|m| m.member.id != view.node_id && m.member.alive && !m.member.grpc_addr.is_empty())
        .map(|m| {
            let scheme = if shared.tls.is_some() {
                "https"
            } else {
                "http"
            };
            (m.member.id, format!("{scheme}://{}", m.member.grpc_addr))
        })
        .collect()
}

/// `GET /v1/dead-letters[?local=true][&limit=N]`: the dead letters of every live member (or
/// only this node's), oldest first per node, each with its `id` and `node`; members that do
/// not answer are listed under `unreachable`.
async fn dead_letters(
    shared: web::Data<Shared>,
    query: web::Query<DeadLetterQuery>,
) -> HttpResponse {
    let limit = query.limit.unwrap_or(1000);
    let me = shared.cluster.lock().node_id;
    let mut letters: Vec<serde_json::Value> = shared
        .router
        .dead_letters(limit)
        .into_iter()
        .map(|l| dead_letter_json(me, l))
        .collect();
    let mut unreachable = Vec::new();
    if !query.local {
        let (answers, missing) =
            ask_members(
                &shared,
                |c| async move { c.dead_letters(limit as u32).await },
            )
            .await;
        unreachable = missing;
        for (node, list) in answers {
            letters.extend(list.letters.into_iter().map(|l| {
                let mut j: serde_json::Value =
                    serde_json::from_str(&l.json).unwrap_or_else(|_| serde_json::json!({}));
                j["id"] = l.id.into();
                j["node"] = node.into();
                j
            }));
        }
    }
    HttpResponse::Ok().json(serde_json::json!({
        "letters": letters,
        "unreachable": unreachable,
    }))
}

/// `POST /v1/dead-letters/{id}/replay`: replays the letter on whichever member holds it.
async fn replay_dead_letter(
    shared: web::Data<Shared>,
    path: web::Path<String>,
) -> Result<HttpResponse, ServiceError> {
    let id = path.into_inner();
    let me = shared.cluster.lock().node_id;
    if shared.router.dead_letter(&id).is_some() {
        let done = shared.router.replay_dead_letter(&id).await?;
        return Ok(HttpResponse::Ok().json(serde_json::json!({"id": id, "node": me, "done": done})));
    }
    // The member that holds it replays it (NotFound: not that one).
    let mut unreachable = Vec::new();
    for (node, grpc) in other_members(&shared) {
        let r = async {
            statemesh_sdk::Client::connect_with(&grpc, &member_options(&shared))
                .await?
                .replay_dead_letter(&id)
                .await
        };
        match tokio::time::timeout(Duration::from_secs(10), r).await {
            Ok(Ok(done)) => {
                return Ok(HttpResponse::Ok()
                    .json(serde_json::json!({"id": id, "node": node, "done": done})))
            }
            Ok(Err(e)) => match e.code() {
                Some(tonic::Code::NotFound) => {}
                Some(tonic::Code::InvalidArgument) => {
                    return Err(ServiceError::InvalidArgument(e.to_string()))
                }
                Some(tonic::Code::Unavailable) => {
                    return Err(ServiceError::Unavailable(format!("node {node}: {e}")))
                }
                _ => unreachable.push(format!("node {node}: {e}")),
            },
            Err(_) => unreachable.push(format!("node {node}: no answer within 10 s")),
        }
    }
    if !unreachable.is_empty() {
        return Err(ServiceError::Unavailable(format!(
            "dead letter {id} is not on node {me} nor on the members that answered; not answering: {}",
            unreachable.join("; ")
        )));
    }
    Err(ServiceError::NotFound(format!(
        "no member holds dead letter {id} (replayed or read already? list again)"
    )))
}

/// `%XX`-decodes what the router left encoded in a path segment (`%2F`, `%25`, `%2B`).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The function type (`ns/type`) of a path `ns/type/id…`.
fn function_type(rest: &str) -> String {
    let mut it = rest.splitn(3, '/');
    let ns = decode(it.next().unwrap_or(""));
    let typ = decode(it.next().unwrap_or(""));
    format!("{ns}/{typ}")
}

/// What an HTTP request needs (`crate::auth`), classified by its method and the path the
/// router matches (decoded as the router decodes it).
#[derive(Debug, PartialEq)]
enum Access {
    /// `/healthz`, `/readyz`, the console's login and logout.
    Open,
    /// An ingress token covering this target (a function type `ns/type`, or a topic).
    Ingress(String),
    /// The admin token.
    Admin,
}

fn access(routes: Routes, method: &actix_web::http::Method, path: &str) -> Access {
    use actix_web::http::Method;
    let rest = path.trim_start_matches('/');
    if routes.api {
        match (method, path) {
            (&Method::GET, "/healthz" | "/readyz")
            | (&Method::POST, "/ui/login" | "/ui/logout") => return Access::Open,
            _ => {}
        }
        if method == Method::POST {
            if let Some(r) = path
                .strip_prefix("/v1/send/")
                .or_else(|| path.strip_prefix("/v1/call/"))
            {
                return Access::Ingress(function_type(r));
            }
        }
        if method == Method::GET {
            if let Some(topic) = path.strip_prefix("/v1/egress/") {
                return Access::Ingress(decode(topic));
            }
        }
        if rest.starts_with("v1/")
            || rest.starts_with("debug/")
            || rest == "metrics"
            || rest == "ui"
            || rest.starts_with("ui/")
            || rest == "healthz"
            || rest == "readyz"
        {
            return Access::Admin;
        }
    }
    // The playground's routes: `PUT /ns/type/id` and `GET /topic`.
    if method == Method::PUT && routes.playground_ingress {
        return Access::Ingress(function_type(rest));
    }
    if method == Method::GET && routes.playground_egress {
        return Access::Ingress(decode(rest));
    }
    Access::Admin
}

/// The console's cookie, if the request carries it.
fn admin_cookie(req: &actix_web::dev::ServiceRequest) -> Option<String> {
    let h = req.headers().get("cookie")?.to_str().ok()?;
    h.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == crate::auth::COOKIE).then(|| v.to_string())
    })
}

/// Access control of an HTTP request (`crate::auth`): the ingress routes need an ingress
/// token that covers their target, every other route but `/healthz`, `/readyz` and the
/// console's login and logout the admin token (a change made with the console's cookie also
/// its origin, [`same_origin`]). A refusal is the response to send.
fn check_access(
    auth: &crate::auth::Auth,
    routes: Routes,
    req: &actix_web::dev::ServiceRequest,
) -> Result<(), Box<HttpResponse>> {
    use crate::auth::Denied;
    if !auth.enabled() {
        return Ok(());
    }
    // The path as the router matches it (percent-decoded), not the raw one: a request is
    // checked for the route that serves it.
    let path = req.match_info().as_str();
    let access = access(routes, req.method(), path);
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let r = match &access {
        Access::Open => return Ok(()),
        Access::Ingress(t) => auth.ingress("http", authorization, [t.as_str()]),
        Access::Admin => auth
            .admin("http", authorization, admin_cookie(req).as_deref())
            .and_then(|()| same_origin(auth, req, crate::auth::bearer(authorization).is_some())),
    };
    r.map_err(|d| {
        if access == Access::Admin && (path == "/ui" || path == "/ui/") {
            return Box::new(
                HttpResponse::Unauthorized()
                    .content_type("text/html; charset=utf-8")
                    .body(LOGIN_PAGE),
            );
        }
        Box::new(match d {
            Denied::Unauthenticated(m) => HttpResponse::Unauthorized()
                .insert_header(("www-authenticate", "Bearer"))
                .body(m),
            Denied::Forbidden(m) => HttpResponse::Forbidden().body(m),
        })
    })
}

/// A change made with the console's cookie (not a bearer token) must come from the console
/// itself: its `Origin` names this host. The cookie is `SameSite=Strict` already; this refuses
/// what a browser without SameSite, or a page on a sibling port of the same host, could send.
fn same_origin(
    auth: &crate::auth::Auth,
    req: &actix_web::dev::ServiceRequest,
    bearer: bool,
) -> Result<(), crate::auth::Denied> {
    use actix_web::http::Method;
    if bearer || matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let origin = header("origin");
    // HTTP/2 (offered under `[tls]`) carries the host as the URI's authority, not `Host`.
    let host = header("host").or_else(|| req.uri().authority().map(|a| a.as_str()));
    let authority = origin.map(|o| o.split_once("://").map_or(o, |(_, a)| a));
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(auth.forbidden(
            "http",
            format!(
                "a change with the console's cookie must come from the console (Origin {:?}, Host {:?}); send the admin token as a bearer token instead",
                origin.unwrap_or("none"),
                host.unwrap_or("none")
            ),
        )),
    }
}

/// To `/ui`, setting the console's cookie to `value` (`HttpOnly`, `SameSite=Strict`, `Secure`
/// under TLS; `attributes` adds more).
fn to_console_with_cookie(shared: &Shared, value: &str, attributes: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header(("location", "/ui"))
        .insert_header((
            "set-cookie",
            format!(
                "{}={value}; Path=/;{attributes} HttpOnly; SameSite=Strict{}",
                crate::auth::COOKIE,
                if shared.tls.is_some() { "; Secure" } else { "" }
            ),
        ))
        .finish()
}

/// `POST /ui/logout`: clears the console's cookie and goes back to `/ui`.
async fn ui_logout(shared: web::Data<Shared>) -> HttpResponse {
    to_console_with_cookie(&shared, "", " Max-Age=0;")
}

/// The console's login form (when `[auth]` is on and the admin cookie is missing or wrong).
const LOGIN_PAGE: &str = r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>statemesh console: sign in</title><link rel="icon" href="data:,"></head>
<body style="font-family: system-ui, sans-serif; margin: 3rem">
<h1>statemesh console</h1>
<form method="post" action="/ui/login"><label>Admin token <input type="password" name="token" autofocus required size="40"></label> <button type="submit">Sign in</button></form>
</body></html>"#;

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// `POST /ui/login` (form `token=…`): with the admin token, sets the console's cookie
/// (`HttpOnly`, `SameSite=Strict`) and goes to `/ui`; else the form again (401).
async fn ui_login(shared: web::Data<Shared>, form: web::Form<Login>) -> HttpResponse {
    let token = form.into_inner().token;
    match shared.auth.admin("http", None, Some(token.trim())) {
        Ok(()) => to_console_with_cookie(&shared, token.trim(), ""),
        Err(_) => HttpResponse::Unauthorized()
            .content_type("text/html; charset=utf-8")
            .body(LOGIN_PAGE),
    }
}

/// The web console's files, built into the binary (`node/ui`): (path, content type, body).
const UI_FILES: [(&str, &str, &[u8]); 3] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/style.css"),
    ),
];

/// `GET /ui`, `/ui/{file}`: the web console (it reads the admin endpoints above).
async fn ui(shared: web::Data<Shared>, req: HttpRequest) -> HttpResponse {
    let file = req.match_info().get("file").unwrap_or("");
    let file = if file.is_empty() { "index.html" } else { file };
    match UI_FILES.iter().find(|(name, _, _)| *name == file) {
        // Signed in (with `[auth]`): the page offers to sign out.
        Some((name, ct, body)) if *name == "index.html" && shared.auth.enabled() => {
            HttpResponse::Ok()
                .content_type(*ct)
                .insert_header(("cache-control", "no-cache"))
                .body(
                    String::from_utf8_lossy(body)
                        .replace(r#"action="/ui/logout" hidden>"#, r#"action="/ui/logout">"#),
                )
        }
        Some((_, ct, body)) => HttpResponse::Ok()
            .content_type(*ct)
            .insert_header(("cache-control", "no-cache"))
            .body(*body),
        None => HttpResponse::NotFound().body(format!("no console file {file:?}")),
    }
}

/// The header naming a durable egress record's id ([`crate::egress::Read::id`]).
pub const RECORD_ID_HEADER: &str = "statemesh-record-id";

/// An egress record's response, with its id if it has one.
fn with_record_id(mut resp: HttpResponse, id: Option<String>) -> HttpResponse {
    if let Some(id) = id.and_then(|id| actix_web::http::header::HeaderValue::try_from(id).ok()) {
        resp.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static(RECORD_ID_HEADER),
            id,
        );
    }
    resp
}

async fn egress(shared: web::Data<Shared>, path: web::Path<String>) -> HttpResponse {
    match shared.router.pop_egress(&path).await {
        Some(r) => with_record_id(reply_response(&r.value), r.id),
        None => HttpResponse::NoContent().finish(),
    }
}

/// The `q` quantile of a histogram, interpolated linearly within its bucket; `None` when it
/// is empty.
/// `GET /v1/functions`: the registered types and endpoint patterns (`functions`), every type
/// invoked so far with its invocation count, time (mean, p50, p99; embedded: per message,
/// remote: per batch call) and dead letters since each node started, summed over the live
/// members (`nodes` answered, `unreachable` did not; `?local=true`: this node's alone), and
/// the module's endpoints.
async fn functions(shared: web::Data<Shared>, query: web::Query<LocalQuery>) -> HttpResponse {
    let registry = shared.router.registry();
    let me = shared.cluster.lock().node_id;
    let mut stats = crate::admin::function_stats(registry);
    let (mut nodes, mut unreachable) = (vec![me], Vec::new());
    if !query.local {
        let (answers, missing) =
            ask_members(&shared, |c| async move { c.function_stats().await }).await;
        unreachable = missing;
        for (node, theirs) in answers {
            nodes.push(node);
            for t in theirs.types {
                match stats.iter_mut().find(|s| s.r#type == t.r#type) {
                    Some(s) => crate::admin::merge_function_stats(s, &t),
                    None => stats.push(t),
                }
            }
        }
    }
    stats.sort_by(|a, b| a.r#type.cmp(&b.r#type));
    // Declared states, as this node knows them (a type it never invoked has none here).
    let entries: std::collections::HashMap<String, _> = registry.entries().into_iter().collect();
    let types: Vec<serde_json::Value> = stats
        .iter()
        .map(|t| {
            let q = |q| {
                crate::admin::quantile(t.invocations, &t.bucket_bounds, &t.bucket_cumulative, q)
                    .map(|s| s * 1e3)
            };
            let states = entries
                .get(&t.r#type)
                .map(|e| {
                    e.specs()
                        .iter()
                        .map(|s| serde_json::json!({"name": &*s.name, "typename": &*s.typename}))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            serde_json::json!({
                "type": t.r#type,
                "kind": t.kind,
                "url": (!t.url.is_empty()).then_some(&t.url),
                "invocations": t.invocations,
                "mean_ms": (t.invocations > 0).then(|| t.sum_seconds * 1e3 / t.invocations as f64),
                "p50_ms": q(0.5),
                "p99_ms": q(0.99),
                "dead_letters": t.dead_letters,
                "states": states,
            })
        })
        .collect();
    let endpoints: Vec<serde_json::Value> = registry
        .module()
        .endpoints
        .iter()
        .map(|e| {
            serde_json::json!({
                "functions": match &e.functions {
                    crate::module::FunctionPattern::Exact(t) => t.clone(),
                    crate::module::FunctionPattern::Namespace(ns) => format!("{ns}/*"),
                },
                "url": e.url_template,
                "max_batch": e.max_batch,
                "call_timeout_ms": e.call_timeout.as_millis() as u64,
            })
        })
        .collect();
    HttpResponse::Ok().json(serde_json::json!({
        "functions": registry.types(),
        "types": types,
        "endpoints": endpoints,
        "nodes": nodes,
        "unreachable": unreachable,
    }))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().body("ok\n")
}

async fn readyz(shared: web::Data<Shared>) -> HttpResponse {
    // The cluster's epoch log full is the cause of the back-pressure it leads to: named first.
    let full = shared.cluster.lock().epoch_log.full();
    if let Some(full) = full {
        let and = shared
            .router
            .backpressure()
            .map(|b| format!("; {b}"))
            .unwrap_or_default();
        HttpResponse::ServiceUnavailable().body(format!("not ready: {full}{and}\n"))
    } else if let Some(reason) = shared.router.backpressure() {
        HttpResponse::ServiceUnavailable().body(format!("not ready: {reason}\n"))
    } else if !shared.router.placement().ready() {
        HttpResponse::ServiceUnavailable().body("not ready: joining the cluster\n")
    } else if shared.ready.load(Ordering::SeqCst) {
        // A Kafka client that cannot reach its broker is named but does not make the node
        // unready: it serves everything else, and the client retries.
        let mut body = String::from("ready\n");
        for (client, problem) in shared.router.metrics().kafka_problems.lock().iter() {
            body.push_str(&format!("degraded: {client}: {problem}\n"));
        }
        HttpResponse::Ok().body(body)
    } else {
        HttpResponse::ServiceUnavailable().body("not ready: starting or shutting down\n")
    }
}

/// `GET /v1/cluster`: the control group as this node sees it (leader, term, members, key
/// groups).
/// `PUT /debug/failpoints`: configures fault points while the node runs (builds with fault
/// points only; the body uses the `FAILPOINTS` syntax). For tests that partition nodes.
async fn set_failpoints(body: web::Bytes) -> HttpResponse {
    let spec = String::from_utf8_lossy(&body);
    match crate::failpoint::configure(&spec) {
        Ok(()) => HttpResponse::Ok().body("ok\n"),
        Err(e) => HttpResponse::BadRequest().body(format!("{e}\n")),
    }
}

/// `POST /v1/cluster/leave`: this node leaves its cluster (see `Admin.LeaveCluster`).
async fn cluster_leave(shared: web::Data<Shared>) -> HttpResponse {
    match crate::cluster::leave(&shared.mesh).await {
        Ok(()) => HttpResponse::Accepted().json(serde_json::json!({
            "node_id": shared.cluster.lock().node_id,
            "leaving": true,
        })),
        Err(s) => {
            let code = match s.code() {
                tonic::Code::FailedPrecondition => 409,
                _ => 503,
            };
            HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap_or_default())
                .json(serde_json::json!({ "error": s.message() }))
        }
    }
}

async fn cluster(shared: web::Data<Shared>) -> HttpResponse {
    let view = shared.cluster.lock().clone();
    HttpResponse::Ok().json(view)
}

/// `GET /v1/cluster/key-groups`: the key-group table as this node applied it (`owners[kg]`
/// is the owning node's id, `null` if unassigned; a node alone serves unassigned ones).
async fn cluster_key_groups(shared: web::Data<Shared>) -> HttpResponse {
    let (version, owners) = shared.router.placement().owners();
    HttpResponse::Ok().json(serde_json::json!({
        "placement_version": version,
        "owners": owners,
    }))
}

/// `GET /v1/checkpoints`: epochs, sizes, durations, the last commit and recovery.
async fn checkpoints(shared: web::Data<Shared>) -> HttpResponse {
    let status = shared.checkpoints.lock().clone();
    HttpResponse::Ok().json(status)
}

async fn metrics(shared: web::Data<Shared>) -> HttpResponse {
    shared.update_gauges().await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(shared.router.metrics().render())
}

/// `PUT /<namespace>/<type>/<id>`: the StateFun playground's ingress. The body is the
/// message value as it is, typed by `Content-Type: application/vnd.<typename>`; without a
/// content type (or with `text/plain`) it is a string.
async fn playground_put(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    body: Bytes,
) -> Result<HttpResponse, ServiceError> {
    let target = target_of(&shared, &path, &body)?;
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    let message = match ct {
        None => value_from_text(statemesh_sdk::typenames::STRING, body)?,
        Some(_) => {
            let typename = typename_from_content_type(ct)?;
            if typename == statemesh_sdk::typenames::STRING && !ct.unwrap_or("").contains("vnd.") {
                value_from_text(&typename, body)?
            } else {
                TypedValue::new(typename, body)
            }
        }
    };
    let span = ingress_span(&req, &target);
    super::traced(shared.router.send_with(target, message, None), span).await?;
    Ok(HttpResponse::Ok().finish())
}

/// `GET /<topic>`: the StateFun playground's egress; pops the next record of the topic and
/// answers its `payload` (204 when the topic is empty).
async fn playground_get(shared: web::Data<Shared>, path: web::Path<String>) -> HttpResponse {
    let Some(r) = shared.router.pop_egress(&path).await else {
        return HttpResponse::NoContent().finish();
    };
    with_record_id(playground_record(&r.value), r.id)
}

/// A playground egress record's `payload` (any other record as `/v1/egress` answers it).
fn playground_record(v: &TypedValue) -> HttpResponse {
    if v.typename() == "io.statefun.playground/EgressRecord" {
        if let Ok(rec) = serde_json::from_slice::<serde_json::Value>(v.value()) {
            return match rec.get("payload") {
                Some(serde_json::Value::String(s)) => HttpResponse::Ok()
                    .content_type("text/plain; charset=utf-8")
                    .body(s.clone()),
                Some(other) => HttpResponse::Ok().json(other),
                None => HttpResponse::Ok().json(rec),
            };
        }
    }
    reply_response(v)
}

/// Which routes a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Routes {
    /// `/v1/...` and the admin endpoints.
    pub api: bool,
    /// The playground ingress (`PUT /<ns>/<type>/<id>`).
    pub playground_ingress: bool,
    /// The playground egress (`GET /<topic>`), registered last so that it never shadows
    /// the API's own GET routes on a shared port.
    pub playground_egress: bool,
}

/// Builds the HTTP server on a bound listener; returns it (not yet spawned) and its address.
pub(crate) fn server(
    shared: Shared,
    listener: std::net::TcpListener,
    routes: Routes,
) -> Result<(actix_web::dev::Server, SocketAddr), String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Accept a little more than the limit so oversized bodies get our 413 naming the limit.
    let limit = shared.config.max_message_bytes.saturating_add(1 << 20);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let tls = shared.tls.clone();
    let data = web::Data::new(shared);
    let server = HttpServer::new(move || {
        let mut app = App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(limit));
        if routes.api {
            app = app
                .route("/v1/send/{ns}/{type}/{id:.+}", web::post().to(send))
                .route("/v1/call/{ns}/{type}/{id:.+}", web::post().to(call))
                .route("/v1/state/{ns}/{type}/{id:.+}", web::get().to(state))
                .route("/v1/state/{ns}/{type}/{id:.+}", web::put().to(set_state))
                .route("/v1/state/{ns}/{type}/{id:.+}", web::delete().to(set_state))
                .route("/v1/dead-letters", web::get().to(dead_letters))
                .route("/ui", web::get().to(ui))
                .route("/ui/login", web::post().to(ui_login))
                .route("/ui/logout", web::post().to(ui_logout))
                .route("/ui/{file:.*}", web::get().to(ui))
                .route(
                    "/v1/dead-letters/{id}/replay",
                    web::post().to(replay_dead_letter),
                )
                .route("/v1/egress/{topic:.+}", web::get().to(egress))
                .route("/v1/functions", web::get().to(functions))
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/v1/checkpoints", web::get().to(checkpoints))
                .route("/v1/cluster", web::get().to(cluster))
                .route("/debug/failpoints", web::put().to(set_failpoints))
                .route("/v1/cluster/leave", web::post().to(cluster_leave))
                .route("/v1/cluster/key-groups", web::get().to(cluster_key_groups))
                .route("/metrics", web::get().to(metrics));
        }
        if routes.playground_ingress {
            app = app.route("/{ns}/{type}/{id:.+}", web::put().to(playground_put));
        }
        if routes.playground_egress {
            app = app.route("/{topic:.+}", web::get().to(playground_get));
        }
        let auth = data.auth.clone();
        app.wrap_fn(move |req, srv| {
            use actix_web::dev::Service as _;
            use futures::FutureExt as _;
            match check_access(&auth, routes, &req) {
                Ok(()) => srv
                    .call(req)
                    .map(|r| r.map(|r| r.map_into_boxed_body()))
                    .boxed_local(),
                Err(resp) => {
                    futures::future::ready(Ok(req.into_response(*resp).map_into_boxed_body()))
                        .boxed_local()
                }
            }
        })
    })
    .workers(workers)
    .disable_signals();
    let server = match tls {
        // HTTPS with the node's certificate.
        Some(t) => server.listen_rustls_0_23(listener, (*t.http).clone()),
        None => server.listen(listener),
    }
    .map_err(|e| format!("cannot listen on {addr} (http): {e}"))?
    .run();
    Ok((server, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_of(h: &prometheus::Histogram) -> statemesh_proto::v1::FunctionStats {
        crate::admin::histogram_stats(h)
    }

    fn quantile(h: &prometheus::Histogram, q: f64) -> Option<f64> {
        let s = stats_of(h);
        crate::admin::quantile(s.invocations, &s.bucket_bounds, &s.bucket_cumulative, q)
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("t", "t").buckets(vec![1.0, 2.0, 4.0]),
        )
        .unwrap();
        assert_eq!(quantile(&h, 0.5), None);
        for v in [0.5, 1.5, 1.5, 3.0] {
            h.observe(v);
        }
        // Ranks: 2 of 4 fall in (1, 2] with one below: the median is half way into it.
        assert_eq!(quantile(&h, 0.5), Some(1.5));
        assert_eq!(quantile(&h, 0.25), Some(1.0));
        assert!((quantile(&h, 0.99).unwrap() - 3.92).abs() < 1e-9);
        h.observe(100.0);
        // Beyond the last bucket: its bound.
        assert_eq!(quantile(&h, 1.0), Some(4.0));
    }

    #[test]
    fn a_cookie_change_must_name_this_host_as_its_origin_also_over_http2() {
        use actix_web::test::TestRequest;
        let cfg = crate::config::AuthConfig {
            admin_token: Some("admin-token-0123456789".into()),
            ..Default::default()
        };
        let auth = crate::auth::Auth::new(&cfg, crate::metrics::Metrics::new()).unwrap();
        let post = |uri: &str| TestRequest::post().uri(uri);
        let ok = |r: TestRequest| same_origin(&auth, &r.to_srv_request(), false).is_ok();
        // HTTP/1.1: Host.
        assert!(ok(post("/v1/x")
            .insert_header(("host", "node:8090"))
            .insert_header(("origin", "https://NODE:8090"))));
        assert!(!ok(post("/v1/x")
            .insert_header(("host", "node:8090"))
            .insert_header(("origin", "https://node:8091"))));
        assert!(!ok(post("/v1/x").insert_header(("host", "node:8090"))));
        assert!(!ok(post("/v1/x")
            .insert_header(("host", "node:8090"))
            .insert_header(("origin", "null"))));
        // HTTP/2: no Host, the authority in the URI.
        assert!(ok(
            post("https://node:8090/v1/x").insert_header(("origin", "https://node:8090"))
        ));
        assert!(!ok(
            post("https://node:8090/v1/x").insert_header(("origin", "https://evil:8090"))
        ));
        // Reads and bearer tokens need no origin.
        assert!(same_origin(
            &auth,
            &TestRequest::get().uri("/v1/x").to_srv_request(),
            false
        )
        .is_ok());
        assert!(same_origin(&auth, &post("/v1/x").to_srv_request(), true).is_ok());
    }

    #[test]
    fn the_members_histograms_add_up() {
        let opts = || prometheus::HistogramOpts::new("t", "t").buckets(vec![1.0, 2.0, 4.0]);
        let (a, b, both) = (
            prometheus::Histogram::with_opts(opts()).unwrap(),
            prometheus::Histogram::with_opts(opts()).unwrap(),
            prometheus::Histogram::with_opts(opts()).unwrap(),
        );
        for v in [0.5, 1.5, 3.0] {
            a.observe(v);
            both.observe(v);
        }
        for v in [1.2, 1.8, 3.5, 9.0] {
            b.observe(v);
            both.observe(v);
        }
        let mut merged = statemesh_proto::v1::FunctionStats::default();
        crate::admin::merge_function_stats(&mut merged, &stats_of(&a));
        crate::admin::merge_function_stats(&mut merged, &stats_of(&b));
        let want = stats_of(&both);
        assert_eq!(
            (
                merged.invocations,
                &merged.bucket_bounds,
                &merged.bucket_cumulative
            ),
            (
                want.invocations,
                &want.bucket_bounds,
                &want.bucket_cumulative
            )
        );
        assert!((merged.sum_seconds - want.sum_seconds).abs() < 1e-9);
        // A member with other bounds (another version): counted, but no quantiles.
        let other = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("t", "t").buckets(vec![1.0, 8.0]),
        )
        .unwrap();
        other.observe(0.5);
        crate::admin::merge_function_stats(&mut merged, &stats_of(&other));
        assert_eq!(merged.invocations, 8);
        let q = crate::admin::quantile(
            merged.invocations,
            &merged.bucket_bounds,
            &merged.bucket_cumulative,
            0.5,
        );
        assert_eq!(q, None);
    }

    #[test]
    fn the_console_files_are_built_in() {
        for (name, _, body) in UI_FILES {
            assert!(!body.is_empty(), "{name}");
        }
        let index = std::str::from_utf8(UI_FILES[0].2).unwrap();
        assert!(index.contains("/ui/app.js") && index.contains("/ui/style.css"));
    }
}
