//! `[tls]` end to end, with certificates generated here (rcgen): two nodes form a cluster over
//! mutual TLS and serve gRPC and HTTPS; a node with a certificate of another CA, and one
//! without TLS, cannot join (the seed logs and counts the refused handshakes); a client without
//! a member certificate cannot reach the node-to-node service; an `https://` remote function
//! is called when `remote_ca` names its CA, and dead-lettered naming the certificate otherwise.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, free_port, Launch, Node};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use statemesh_sdk::{Address, ConnectOptions, TypedValue};

/// A CA that signs certificates for 127.0.0.1.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).
    fn issue(&self, name: &str) -> (String, String) {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes a node's certificate, key and CA under `dir`; the `[tls]` section naming them.
fn tls_section(dir: &Path, name: &str, ca: &Ca, signer: &Ca, extra: &str) -> String {
    let (cert, key) = signer.issue(name);
    let path = |f: &str| dir.join(format!("{name}-{f}"));
    std::fs::write(path("cert.pem"), cert).unwrap();
    std::fs::write(path("key.pem"), key).unwrap();
    std::fs::write(path("ca.pem"), &ca.pem).unwrap();
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n{extra}",
        path("cert.pem").display(),
        path("key.pem").display(),
        path("ca.pem").display()
    )
}

fn launch(config: String, id: u64, join: Option<&str>, module: Option<String>) -> Launch {
    let mut args = vec![
        "--node-id".to_string(),
        id.to_string(),
        "--shards".into(),
        "1".into(),
    ];
    if let Some(j) = join {
        args.extend(["--join".to_string(), j.to_string()]);
    }
    Launch {
        config: Some(format!("[checkpoint]\ninterval_ms = 20\n{config}")),
        module,
        grpc_port: free_port(),
        http_port: free_port(),
        args,
        ..Default::default()
    }
}

fn https(u: &str) -> String {
    u.replacen("http://", "https://", 1)
}

/// An HTTPS request trusting `ca`: (status, body).
async fn https_request(
    ca: &str,
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String), String> {
    let (status, _, b) =
        common::https_headers(ca, url, method, headers, Bytes::from(body.to_string())).await?;
    Ok((status, String::from_utf8_lossy(&b).to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_mutual_tls_and_refuse_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("statemesh test CA");
    let rogue = Ca::new("another CA");
    let t1 = tls_section(root, "n1", &ca, &ca, "");
    let t2 = tls_section(root, "n2", &ca, &ca, "");
    let n1 = Node::start_launch(&root.join("n1"), &launch(t1, 1, None, None));
    let seed = n1.grpc.trim_start_matches("http://").to_string();
    let n2 = Node::start_launch(&root.join("n2"), &launch(t2, 2, Some(&seed), None));
    let (g1, g2, h1) = (https(&n1.grpc), https(&n2.grpc), https(&n1.http));
    let opts = ConnectOptions {
        token: None,
        ca_pem: Some(ca.pem.clone().into_bytes()),
    };
    // Both members, key groups spread: calls through node 2 reach node 1's addresses.
    let c2 = statemesh_sdk::Client::connect_with(&g2, &opts)
        .await
        .unwrap();
    eventually(
        "two members owning key groups",
        Duration::from_secs(60),
        || async {
            let v = c2.cluster().await.ok()?;
            (v.members.len() == 2 && v.members.iter().all(|m| m.key_groups > 300)).then_some(())
        },
    )
    .await;
    for i in 0..20 {
        // With an idempotency key: the client retries what the cluster refuses for now.
        let r = c2
            .call_with(
                &Address::parse(&format!("example/counter/k{i}")).unwrap(),
                TypedValue::of(&(i as i64)),
                Some(&format!("k{i}")),
                None,
            )
            .await
            .unwrap();
        assert_eq!(r.get::<i64>().unwrap(), i as i64);
    }
    // HTTPS ingress; plain HTTP on the TLS port gets nothing.
    // With an idempotency key, retried while the cluster refuses for now (503).
    let mut answer = (0, String::new());
    for _ in 0..20 {
        answer = https_request(
            &ca.pem,
            &format!("{h1}/v1/call/example/counter/k1"),
            "POST",
            &[
                ("content-type", "application/vnd.io.statefun.types/long"),
                ("idempotency-key", "https-k1"),
            ],
            "10",
        )
        .await
        .unwrap();
        if answer.0 != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!((answer.0, answer.1.as_str()), (200, "11"), "{}", answer.1);
    assert!(
        common::try_http(&format!("{}/healthz", n1.http), "GET", None, Bytes::new())
            .await
            .map(|r| r.0 != 200)
            .unwrap_or(true)
    );
    // `statemesh health` (the image's HEALTHCHECK, probes) over HTTPS; over plain HTTP to
    // the TLS port it fails, naming why.
    let health = |url: &str, ready: bool| {
        let mut args = vec!["health", "--http", url];
        if ready {
            args.push("--ready");
        }
        std::process::Command::new(common::BIN)
            .args(&args)
            .output()
            .unwrap()
    };
    for ready in [false, true] {
        let out = health(&h1, ready);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = health(&n1.http, false);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GET /healthz"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI over TLS.
    let ca_file = root.join("n1-ca.pem");
    let out = std::process::Command::new(common::BIN)
        .args([
            "call",
            "example/counter/k2",
            "1",
            "--type",
            "long",
            "--node",
            &g1,
            "--ca",
        ])
        .arg(&ca_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");

    // A client without a member certificate cannot use the node-to-node service.
    let ch = tonic::transport::Endpoint::from_shared(g1.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = statemesh_proto::mesh_v1::mesh_client::MeshClient::new(ch)
        .join(statemesh_proto::mesh_v1::JoinRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // A node whose certificate another CA signed, and a node without TLS, cannot join.
    let t3 = tls_section(root, "n3", &ca, &rogue, "");
    let mut n3 = Node::launch(&root.join("n3"), &launch(t3, 3, Some(&seed), None));
    let log = n3.wait_listening().unwrap_err();
    assert!(log.contains("cannot join"), "{log}");
    let mut n4 = Node::launch(
        &root.join("n4"),
        &launch(String::new(), 4, Some(&seed), None),
    );
    let log = n4.wait_listening().unwrap_err();
    assert!(log.contains("cannot join"), "{log}");
    let seed_log = n1.log_since_launch();
    assert!(
        seed_log.contains("TLS handshake refused") && seed_log.contains("UnknownIssuer"),
        "{seed_log}"
    );
    let (s, metrics) = https_request(&ca.pem, &format!("{h1}/metrics"), "GET", &[], "")
        .await
        .unwrap();
    assert_eq!(s, 200);
    let refused = common::parse_metric(metrics.as_bytes(), "statemesh_tls_refused_total").unwrap();
    assert!(refused >= 2.0, "{refused}");
    Node::stop_all([n1, n2]).await;
}

/// A TLS-terminating proxy on a loopback port in front of `backend` (a plain HTTP port),
/// presenting `cert`/`key`.
async fn tls_proxy(cert: &str, key: &str, backend: u16) -> u16 {
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_remote_functions_are_verified_against_remote_ca() {
    let dir = tempfile::tempdir().unwrap();
    let functions_ca = Ca::new("functions CA");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap().port();
    common::serve_rust_examples(listener, statemesh_sdk::server::FunctionServer::new());
    let (cert, key) = functions_ca.issue("functions");
    let port = tls_proxy(&cert, &key, backend).await;
    let module = format!("kind: io.statefun.endpoints.v2/http\nspec:\n  functions: rs/*\n  urlPathTemplate: https://127.0.0.1:{port}/statefun\n  transport:\n    call: 1s\n");
    let ca_file = dir.path().join("functions-ca.pem");
    std::fs::write(&ca_file, &functions_ca.pem).unwrap();
    for (name, config) in [
        (
            "trusted",
            format!("[tls]\nremote_ca = \"{}\"\n", ca_file.display()),
        ),
        ("untrusted", String::new()),
    ] {
        let node = Node::start_with_module(&dir.path().join(name), Some(&config), Some(&module));
        let (s, _, body) = common::post(
            &node,
            "call",
            "rs/counter/c",
            statemesh_sdk::typenames::LONG,
            "4",
        )
        .await;
        if name == "trusted" {
            assert_eq!((s, body.as_str()), (200, "4"));
        } else {
            assert_eq!(s, 502, "{body}");
            assert!(body.contains("certificate"), "{body}");
        }
        node.stop().await;
    }
}
