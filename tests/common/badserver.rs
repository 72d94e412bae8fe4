//! A deliberately broken StateFun function server on a loopback port: each path misbehaves
//! in one way (garbage, wrong content type, 500, 404, hang, reset, oversized body, protocol
//! violations), plus `/flaky` which fails twice and then answers properly, and `/traced`
//! which answers properly and records the request's `traceparent` header.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use prost::Message;
use statemesh_proto::statefun_v3 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct BadServer {
    pub port: u16,
    pub flaky_calls: Arc<AtomicU32>,
    /// The `traceparent` headers of the requests to `/traced` (empty: none).
    pub traceparents: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BadServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(s: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let header_end = loop {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let path = head.split_whitespace().nth(1)?.to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Some((path, head, body))
}

fn response(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn result(r: pb::from_function::InvocationResponse) -> Vec<u8> {
    pb::FromFunction {
        response: Some(pb::from_function::Response::InvocationResult(r)),
    }
    .encode_to_vec()
}

fn mutation(name: &str, typename: &str) -> pb::from_function::PersistedValueMutation {
    pb::from_function::PersistedValueMutation {
        mutation_type: 1,
        state_name: name.into(),
        state_value: Some(pb::TypedValue {
            typename: typename.into(),
            has_value: true,
            value: vec![0x0A, 1, b'x'].into(),
        }),
    }
}

async fn serve(
    mut s: TcpStream,
    flaky: Arc<AtomicU32>,
    traceparents: Arc<std::sync::Mutex<Vec<String>>>,
) {
    while let Some((path, head, body)) = read_request(&mut s).await {
        let ok = |b: Vec<u8>| response("200 OK", "application/octet-stream", &b);
        let reply = match path.as_str() {
            "/garbage" => ok(vec![0xff; 16]),
            "/html" => response(
                "200 OK",
                "text/html",
                b"<html><body>502 from a proxy</body></html>",
            ),
            "/status500" => response("500 Internal Server Error", "text/plain", b"boom"),
            "/status404" => response("404 Not Found", "text/plain", b"no such function"),
            "/hang" => {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                return;
            }
            // Close the connection without an answer.
            "/reset" => return,
            "/big" => ok(vec![0u8; 2 << 20]),
            "/unregistered" => ok(result(pb::from_function::InvocationResponse {
                state_mutations: vec![mutation("nope", "io.statefun.types/string")],
                ..Default::default()
            })),
            "/mismatch" => {
                let req = pb::ToFunction::decode(body.as_slice()).unwrap();
                let Some(pb::to_function::Request::Invocation(batch)) = req.request else {
                    return;
                };
                if batch.state.is_empty() {
                    let spec = pb::from_function::PersistedValueSpec {
                        state_name: "s".into(),
                        expiration_spec: None,
                        type_typename: "io.statefun.types/int".into(),
                    };
                    ok(pb::FromFunction {
                        response: Some(pb::from_function::Response::IncompleteInvocationContext(
                            pb::from_function::IncompleteInvocationContext {
                                missing_values: vec![spec],
                            },
                        )),
                    }
                    .encode_to_vec())
                } else {
                    ok(result(pb::from_function::InvocationResponse {
                        state_mutations: vec![mutation("s", "io.statefun.types/string")],
                        ..Default::default()
                    }))
                }
            }
            "/flaky" => {
                if flaky.fetch_add(1, Ordering::SeqCst) < 2 {
                    response("503 Service Unavailable", "text/plain", b"warming up")
                } else {
                    let req = pb::ToFunction::decode(body.as_slice()).unwrap();
                    let Some(pb::to_function::Request::Invocation(batch)) = req.request else {
                        return;
                    };
                    let outgoing = batch
                        .invocations
                        .iter()
                        .filter_map(|i| i.caller.clone())
                        .map(|c| pb::from_function::Invocation {
                            target: Some(c),
                            argument: Some(pb::TypedValue {
                                typename: "io.statefun.types/string".into(),
                                has_value: true,
                                value: vec![0x0A, 2, b'o', b'k'].into(),
                            }),
                        })
                        .collect();
                    ok(result(pb::from_function::InvocationResponse {
                        outgoing_messages: outgoing,
                        ..Default::default()
                    }))
                }
            }
            "/traced" => {
                let t = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("traceparent")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_default();
                traceparents.lock().unwrap().push(t);
                ok(result(pb::from_function::InvocationResponse::default()))
            }
            _ => response("400 Bad Request", "text/plain", b"unknown path"),
        };
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

pub async fn start() -> BadServer {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let traceparents: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (f2, t2) = (flaky_calls.clone(), traceparents.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(serve(s, f2.clone(), t2.clone()));
        }
    });
    BadServer {
        port,
        flaky_calls,
        traceparents,
        task,
    }
}
