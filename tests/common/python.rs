//! Real StateFun SDK function servers from PyPI, in venvs the harness creates under
//! `target/` when missing (`python3 -m venv` + `pip install`), started on OS-chosen ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

static VENV_LOCK: Mutex<()> = Mutex::new(());

/// The python of a venv with `packages`, created under `target/py/<name>` if missing.
pub fn venv(name: &str, packages: &[&str]) -> PathBuf {
    let _guard = VENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/py")
        .join(name);
    let python = dir.join("bin/python");
    let marker = dir.join(".installed");
    let wanted = packages.join(" ");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .expect("python3 is needed for remote-function tests");
    assert!(ok.success(), "python3 -m venv {} failed", dir.display());
    let out = Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install {wanted} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&marker, &wanted).unwrap();
    python
}

/// The StateFun 3.3 Python SDK.
pub fn statefun3() -> PathBuf {
    venv(
        "statefun3",
        &["apache-flink-statefun==3.3.0", "aiohttp==3.14.5"],
    )
}

/// A running function server, killed on drop.
pub struct FunctionServer {
    child: Child,
    pub port: u16,
}

impl FunctionServer {
    /// Starts `script` (which prints "serving on PORT") with `python`.
    pub fn start(python: &Path, script: &str) -> FunctionServer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(script);
        let mut child = Command::new(python)
            .arg(&script)
            .arg("0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the function server");
        let line = super::first_line(&mut child).expect("function server did not start");
        let port = line
            .trim()
            .strip_prefix("serving on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        FunctionServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/statefun", self.port)
    }
}

impl Drop for FunctionServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's S3 server (from PyPI) on a loopback port, killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `moto_server` on a free loopback port and waits until it listens.
pub fn moto() -> Moto {
    let python = venv("moto", &["moto[server]==5.2.5"]);
    let bin = python.with_file_name("moto_server");
    let port = super::free_port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "moto_server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Moto { child, endpoint }
}

/// The `[checkpoint]` config text of a node writing to `s3://<location>` on the S3 server at
/// `endpoint` (moto's test credentials, plain HTTP).
pub fn s3_config(endpoint: &str, location: &str) -> String {
    format!(
        "[checkpoint]\nurl = \"s3://{location}\"\n[checkpoint.s3]\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n"
    )
}

/// Bucket `bucket` on a new moto server behind a latency proxy adding `delay_ms` to every
/// request (the proxy's endpoint is the one to use).
pub async fn s3_behind_proxy(bucket: &str, delay_ms: u32) -> (Moto, LatencyProxy) {
    let m = moto();
    let proxy = LatencyProxy::start(&m.endpoint, delay_ms);
    // moto listens before it serves: a first request may get the proxy's 502.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (s, _, body) = super::http(
            &format!("{}/{bucket}", proxy.endpoint),
            "PUT",
            None,
            bytes::Bytes::new(),
        )
        .await;
        if s == 200 {
            return (m, proxy);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bucket {bucket} not created: {s} {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `tests/py/s3_latency_proxy.py` in front of an S3-compatible server: adds `delay_ms` to
/// every request and counts them; killed on drop.
pub struct LatencyProxy {
    child: Child,
    pub endpoint: String,
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LatencyProxy {
    /// Starts the proxy on a free loopback port in front of `upstream`.
    pub fn start(upstream: &str, delay_ms: u32) -> LatencyProxy {
        use std::io::BufRead;
        let python = venv("moto", &["moto[server]==5.2.5"]);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/py/s3_latency_proxy.py");
        let mut child = Command::new(python)
            .arg(script)
            .args(["--upstream", upstream, "--port", "0", "--delay-ms"])
            .arg(delay_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the latency proxy did not start: {line:?}"));
        LatencyProxy {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Requests forwarded since the last reset, and the seconds since.
    pub async fn requests(&self) -> (u64, f64) {
        let (_, _, body) = super::http(
            &format!("{}/__proxy/stats", self.endpoint),
            "GET",
            None,
            bytes::Bytes::new(),
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (v["total"].as_u64().unwrap(), v["since_s"].as_f64().unwrap())
    }

    /// Zeroes the counts.
    pub async fn reset(&self) {
        super::http(
            &format!("{}/__proxy/reset", self.endpoint),
            "POST",
            None,
            bytes::Bytes::new(),
        )
        .await;
    }
}

/// Debian's Chromium for the console's browser test: `/usr/bin/chromium`, installed with
/// apt-get (as root, or through `sudo -n`) when it is missing.
pub fn chromium() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = PathBuf::from(std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    if path.exists() {
        return path;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut c = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        };
        c.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("apt-get")
    };
    let mut out = apt(&["install", "-y", "--no-install-recommends", "chromium"]);
    if !out.status.success() {
        apt(&["update"]);
        out = apt(&["install", "-y", "--no-install-recommends", "chromium"]);
    }
    assert!(
        out.status.success() && path.exists(),
        "the console test needs Debian's chromium (apt-get install chromium) at {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    path
}
