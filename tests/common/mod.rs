//! Test harness: starts the real `statemesh` binary on loopback ports chosen by the OS,
//! talks to it over gRPC, HTTP and the CLI, and stops it by PID (SIGTERM or SIGKILL).

#![allow(dead_code)]

pub mod badserver;
pub mod kafka;
pub mod otlp;
pub mod python;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use statemesh_sdk::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_statemesh");

/// A running node process.
pub struct Node {
    child: Option<Child>,
    /// The first line the node prints on stdout (`statemesh listening grpc=… http=…`), once
    /// it arrives.
    ready: Option<std::sync::Mutex<std::sync::mpsc::Receiver<String>>>,
    log_offset: u64,
    pub grpc: String,
    pub http: String,
    pub data_dir: PathBuf,
}

/// How to launch a node.
#[derive(Default, Clone)]
pub struct Launch {
    /// TOML config text.
    pub config: Option<String>,
    /// module.yaml text.
    pub module: Option<String>,
    /// Loopback ports (0 = any free port).
    pub grpc_port: u16,
    pub http_port: u16,
    /// Extra environment variables (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// Extra arguments of `statemesh node` (e.g. `--node-id 7`).
    pub args: Vec<String>,
}

impl Node {
    /// Starts a node on `data_dir` with an optional TOML config; waits until it listens.
    pub fn start(data_dir: &Path, config: Option<&str>) -> Node {
        Self::start_with_module(data_dir, config, None)
    }

    /// Like [`Node::start`], with a module.yaml text.
    pub fn start_with_module(data_dir: &Path, config: Option<&str>, module: Option<&str>) -> Node {
        Self::start_at(data_dir, config, module, 0, 0)
    }

    /// Like [`Node::start_with_module`], on given loopback ports (0 = any free port). A port
    /// chosen in advance may meanwhile be taken as the local port of some other connection:
    /// then the start is retried (for up to 30 s) until the bind succeeds.
    pub fn start_at(
        data_dir: &Path,
        config: Option<&str>,
        module: Option<&str>,
        grpc_port: u16,
        http_port: u16,
    ) -> Node {
        Self::start_launch(
            data_dir,
            &Launch {
                config: config.map(String::from),
                module: module.map(String::from),
                grpc_port,
                http_port,
                env: Vec::new(),
                args: Vec::new(),
            },
        )
    }

    /// Starts a node as `l` says and waits until it listens, retrying a bind that failed
    /// because the port was in use; panics with the node's log if it does not start.
    pub fn start_launch(data_dir: &Path, l: &Launch) -> Node {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut n = Node::launch(data_dir, l);
            match n.wait_listening() {
                Ok(()) => return n,
                Err(log) if log.contains("Address already in use") && Instant::now() < deadline => {
                    eprintln!("a port was in use; starting the node again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(log) => panic!("node did not start; log:\n{log}"),
            }
        }
    }

    /// Spawns a node without waiting for it to listen (see [`Node::wait_listening`]).
    pub fn launch(data_dir: &Path, l: &Launch) -> Node {
        let mut cmd = Command::new(BIN);
        cmd.arg("node");
        if let Some(m) = &l.module {
            let path = data_dir.with_extension("module.yaml");
            std::fs::write(&path, m).unwrap();
            cmd.arg("--module").arg(&path);
        }
        cmd.arg("--data-dir").arg(data_dir).args([
            "--grpc-addr",
            &format!("127.0.0.1:{}", l.grpc_port),
            "--http-addr",
            &format!("127.0.0.1:{}", l.http_port),
        ]);
        if let Some(c) = &l.config {
            let path = data_dir.with_extension("toml");
            std::fs::write(&path, c).unwrap();
            cmd.arg("--config").arg(&path);
        }
        cmd.args(&l.args);
        cmd.env_remove("FAILPOINTS");
        for (k, v) in &l.env {
            cmd.env(k, v);
        }
        std::fs::create_dir_all(data_dir).unwrap();
        let log_path = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn statemesh");
        let rx = first_line_later(&mut child).expect("the child's stdout is piped");
        let port_url = |p: u16| {
            if p == 0 {
                String::new()
            } else {
                format!("http://127.0.0.1:{p}")
            }
        };
        Node {
            child: Some(child),
            ready: Some(std::sync::Mutex::new(rx)),
            log_offset,
            grpc: port_url(l.grpc_port),
            http: port_url(l.http_port),
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Waits (up to a minute) until the node prints that it listens; `Err` with what it
    /// logged since its launch if it exits or stays silent (it is then killed).
    pub fn wait_listening(&mut self) -> Result<(), String> {
        let line = self.ready.take().and_then(|rx| {
            rx.into_inner()
                .unwrap()
                .recv_timeout(Duration::from_secs(60))
                .ok()
        });
        let Some(line) = line else {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            return Err(self.log_since_launch());
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .to_string()
        };
        self.grpc = format!("http://{}", field("grpc="));
        self.http = format!("http://{}", field("http="));
        Ok(())
    }

    /// Whether the node has printed that it listens (without waiting).
    pub fn is_listening(&mut self) -> bool {
        match self.ready.as_ref().map(|rx| rx.lock().unwrap().try_recv()) {
            None => true,
            Some(Ok(line)) => {
                self.ready = None;
                if let Some(a) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("grpc="))
                {
                    self.grpc = format!("http://{a}");
                }
                if let Some(a) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("http="))
                {
                    self.http = format!("http://{a}");
                }
                true
            }
            Some(Err(_)) => false,
        }
    }

    /// What the node wrote to its log since it was launched.
    pub fn log_since_launch(&self) -> String {
        let all = std::fs::read(self.data_dir.with_extension("log")).unwrap_or_default();
        String::from_utf8_lossy(all.get(self.log_offset as usize..).unwrap_or_default()).to_string()
    }

    /// The exit status if the process has exited (by itself, e.g. at a fault point).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// SIGTERM and wait for a clean exit. The wait yields: a test's runtime is single-threaded,
    /// and the clients on it must go on answering the node (a client that cannot answer the
    /// stopping server's GOAWAY ping holds its connection open, and the node waits 5 s for its
    /// gRPC server).
    /// The process stays owned by `self` until it has exited, so a test that panics or is
    /// dropped meanwhile kills it (`Drop`).
    pub async fn stop(mut self) {
        self.sigterm();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                assert!(status.success(), "node exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node did not stop within 30 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Node::stop`], and what the node logged since its launch (its stop included).
    pub async fn stop_logged(self) -> String {
        let (log, from) = (
            self.data_dir.with_extension("log"),
            self.log_offset as usize,
        );
        self.stop().await;
        let all = std::fs::read(&log).unwrap_or_default();
        String::from_utf8_lossy(all.get(from..).unwrap_or_default()).to_string()
    }

    /// SIGTERM to every node at once, then waits for each to exit cleanly (as [`Node::stop`]).
    /// Stopped together, the members commit their last epoch while the leader still runs (a
    /// member stopped after its leader, without a majority of the voters left to take the
    /// leader's stop, cannot commit its last epoch, and gives up after 5 s:
    /// `FINISH_IN_CLUSTER`).
    pub async fn stop_all(nodes: impl IntoIterator<Item = Node>) {
        let mut nodes: Vec<Node> = nodes.into_iter().collect();
        for n in &mut nodes {
            n.sigterm();
        }
        for n in nodes {
            n.stop().await;
        }
    }

    /// SIGTERM (a second one is harmless: the node keeps its handler).
    fn sigterm(&mut self) {
        let child = self.child.as_mut().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }

    /// A handle on an already running node's HTTP address (for requests from other tasks;
    /// it does not own the process).
    pub fn attach(http: &str) -> Node {
        Node {
            child: None,
            ready: None,
            log_offset: 0,
            grpc: String::new(),
            http: http.to_string(),
            data_dir: PathBuf::new(),
        }
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The loopback port of its gRPC address (to restart it on).
    pub fn grpc_port(&self) -> u16 {
        self.grpc.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// The loopback port of its HTTP address.
    pub fn http_port(&self) -> u16 {
        self.http.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.grpc).await.unwrap()
    }

    /// Runs the CLI against this node; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("STATEMESH_NODE", &self.grpc)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// A metric's value. One without labels is always exported (a name not found is a test's
    /// mistake, say a renamed metric, and fails it rather than reading 0); a labelled series
    /// appears once it counted something, and reads 0 until then.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, _, body) = http(&format!("{}/metrics", self.http), "GET", None, Bytes::new()).await;
        match parse_metric(&body, name) {
            Some(v) => v,
            None if name.contains('{') => 0.0,
            None => panic!("{}: no metric {name} in GET /metrics", self.http),
        }
    }

    /// `GET <path>` on the node's HTTP address, expecting 200 and a JSON body.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let (s, _, body) = http(&format!("{}{path}", self.http), "GET", None, Bytes::new()).await;
        assert_eq!(s, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

/// The value of a metric without labels in a Prometheus text body.
pub fn parse_metric(body: &[u8], name: &str) -> Option<f64> {
    String::from_utf8_lossy(body)
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback port that is free now, from below the kernel's ephemeral range (32768 and up
/// by default), so that a node restarted on it later does not race with the local ports of
/// outgoing connections; a port taken meanwhile makes [`Node::start_at`] retry.
///
/// A port is handed out once per test process: a node killed for a while leaves its port
/// free, and a test running alongside must not take it for a node of its own (the restart
/// then found it in use for as long as that node ran; a chaos run's CI failure, seed
/// 1796408044140921449).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ (u64::from(std::process::id()) << 20);
    for _ in 0..1000 {
        let mut x = seed.wrapping_add(NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let port = 20_000 + (x % 12_000) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    given.push(port);
    port
}

/// One HTTP request; returns (status, content type, body). Panics on a transport error.
pub async fn http(
    url: &str,
    method: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> (u16, String, Bytes) {
    request(url, method, content_type, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

async fn request(
    url: &str,
    method: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<(u16, String, Bytes), String> {
    let (status, headers, b) = request_with_headers(url, method, content_type, body).await?;
    let ct = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    Ok((status, ct, b))
}

/// One HTTP request: (status, response headers, body).
async fn request_with_headers(
    url: &str,
    method: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let headers: Vec<(&str, &str)> = content_type
        .map(|c| ("content-type", c))
        .into_iter()
        .collect();
    http_headers(url, method, &headers, body).await
}

/// One HTTP request with the given request headers: (status, response headers, body).
pub async fn http_headers(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    send(&client, url, method, headers, body).await
}

/// [`http_headers`] over HTTPS, trusting only the CA `ca_pem`.
pub async fn https_headers(
    ca_pem: &str,
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(connector);
    send(&client, url, method, headers, body).await
}

async fn send<C>(
    client: &hyper_util::client::legacy::Client<C, Full<Bytes>>,
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, hyper::HeaderMap, Bytes), String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body)).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let b = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, headers, b))
}

/// One HTTP request that may fail (a node being killed): `Err` on a transport error or
/// after 2 s.
pub async fn try_http(
    url: &str,
    method: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<(u16, String, Bytes), String> {
    tokio::time::timeout(
        Duration::from_secs(2),
        request(url, method, content_type, body),
    )
    .await
    .map_err(|_| "timed out".to_string())?
}

/// POSTs a plain-text value of `typename` to `/v1/{verb}/{address}`.
pub async fn post(
    node: &Node,
    verb: &str,
    address: &str,
    typename: &str,
    body: &str,
) -> (u16, String, String) {
    let (s, ct, b) = http(
        &format!("{}/v1/{verb}/{address}", node.http),
        "POST",
        Some(&format!("application/vnd.{typename}")),
        Bytes::from(body.to_string()),
    )
    .await;
    (s, ct, String::from_utf8_lossy(&b).to_string())
}

/// Polls `f` until it returns Some, or panics at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for and pops the next record of an egress topic over HTTP.
/// Pops the next record of an egress topic over HTTP: (status, its `Statemesh-Record-Id`,
/// body).
pub async fn pop_egress(node: &Node, topic: &str) -> (u16, Option<String>, Bytes) {
    pop_egress_at(&format!("{}/v1/egress/{topic}", node.http)).await
}

/// Like [`pop_egress`], at the URL of a topic.
pub async fn pop_egress_at(url: &str) -> (u16, Option<String>, Bytes) {
    let (status, headers, body) = request_with_headers(url, "GET", None, Bytes::new())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let id = headers
        .get("statemesh-record-id")
        .map(|v| v.to_str().unwrap().to_string());
    (status, id, body)
}

pub async fn next_egress(node: &Node, topic: &str, timeout: Duration) -> Bytes {
    eventually(&format!("a record on {topic}"), timeout, || async {
        let r = http(
            &format!("{}/v1/egress/{topic}", node.http),
            "GET",
            None,
            Bytes::new(),
        )
        .await;
        (r.0 == 200).then_some(r.2)
    })
    .await
}

/// The first line a child prints on stdout (e.g. "serving on PORT"), within a minute; the
/// rest of its stdout is drained in the background.
pub fn first_line(child: &mut Child) -> Option<String> {
    first_line_later(child)?
        .recv_timeout(Duration::from_secs(60))
        .ok()
}

/// A channel that receives the first line a child prints on stdout; the rest of its stdout
/// is drained in the background.
fn first_line_later(child: &mut Child) -> Option<std::sync::mpsc::Receiver<String>> {
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    Some(rx)
}

/// The JSON value of one state of an address (`GET /v1/state/...`), if present.
pub async fn state_value(node: &Node, address: &str, name: &str) -> Option<serde_json::Value> {
    let (s, _, body) = http(
        &format!("{}/v1/state/{address}", node.http),
        "GET",
        None,
        Bytes::new(),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    j["states"].get(name).map(|v| v["value"].clone())
}

/// The bundled examples as remote functions of namespace `rs` (`rs/counter`, `rs/greeter`,
/// …), served by the SDK's `FunctionServer` (as `server` leaves it: e.g. with more functions or
/// signature checks) on `listener`, in a thread of this process.
pub fn serve_rust_examples(
    listener: std::net::TcpListener,
    server: statemesh_sdk::server::FunctionServer,
) {
    let mut server = server;
    for (typ, f) in statemesh_examples::all() {
        server = server.function_arc(statemesh_sdk::TypeName::new("rs", typ.name()).unwrap(), f);
    }
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(server.serve_listener(listener))
    });
}

/// Voluntary context switches of each thread of a process: (name, thread id, count) (Linux).
#[cfg(target_os = "linux")]
pub fn wakes_by_thread(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // a thread that ended meanwhile
        };
        let wakes = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let tid = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        out.push((name.trim().to_string(), tid, wakes));
    }
    out
}
