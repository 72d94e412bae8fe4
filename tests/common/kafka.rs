//! A Kafka-protocol test broker: tansu (from crates.io, its in-memory engine), built once into
//! `target/tools/tansu` when missing (`scripts/tansu.sh install`, about 4 minutes), started on
//! a loopback port and killed on drop. Records are produced and read with rdkafka.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

static INSTALL: Mutex<()> = Mutex::new(());

/// The tansu binary, built under `target/tools/tansu` if missing (`scripts/tansu.sh install`).
pub fn tansu() -> PathBuf {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tansu.sh");
    let out = Command::new(&script)
        .arg("install")
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/tansu.sh install");
    assert!(out.status.success(), "scripts/tansu.sh install failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A running broker.
pub struct Broker {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub bootstrap: String,
}

impl Broker {
    /// Starts tansu on a free loopback port and waits until it accepts connections.
    pub fn start() -> Broker {
        Self::start_on(super::free_port())
    }

    /// Starts tansu on `port`.
    pub fn start_on(port: u16) -> Broker {
        let bin = tansu();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the broker's process: a stalled broker.
    pub fn pause(&self, on: bool) {
        let ok = Command::new("kill")
            .arg(if on { "-STOP" } else { "-CONT" })
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -STOP/-CONT tansu");
    }

    /// Creates a topic.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(tansu())
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
                "--broker",
            ])
            .arg(format!("tcp://{}", self.bootstrap))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "creating topic {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A producer that waits for every record to be acknowledged by the broker.
    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .expect("producer")
    }
}

/// Produces one record and waits for the broker's acknowledgement.
pub async fn produce(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: Option<&str>,
    value: &[u8],
) {
    let mut r = FutureRecord::<str, [u8]>::to(topic).payload(value);
    if let Some(k) = key {
        r = r.key(k);
    }
    if let Some(p) = partition {
        r = r.partition(p);
    }
    p.send(r, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

/// A record read back: key, value and its `statemesh-record-id` header.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub id: Option<String>,
}

/// Reads `topic`'s `partitions` from the beginning until `want` records arrived or nothing
/// came for `quiet` (then returns what it has).
pub async fn read_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    quiet: Duration,
) -> Vec<Read> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "statemesh-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut l = TopicPartitionList::new();
    for p in 0..partitions {
        l.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    c.assign(&l).unwrap();
    let mut out = Vec::new();
    while out.len() < want {
        match tokio::time::timeout(quiet, c.recv()).await {
            Err(_) => break,
            Ok(m) => {
                let m = m.expect("read");
                let id = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "statemesh-record-id")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                out.push(Read {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    id,
                });
            }
        }
    }
    out
}

/// Waits until `topic` holds `want` records, none twice (by `statemesh-record-id`: a record
/// produced again), and checks that it still holds exactly those 10 s later (a record looked
/// up and produced again would come late); `per_key` gives the count each key must have.
/// `context` goes into every failure (a seed). Returns the records.
pub async fn exactly_once_in(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    per_key: &[(String, usize)],
    context: &str,
) -> Vec<Read> {
    let check = |got: &[Read], at_most: bool| {
        let mut seen = std::collections::HashMap::new();
        for r in got {
            *seen.entry(r.id.clone()).or_insert(0) += 1;
        }
        seen.retain(|_, n| *n > 1);
        assert!(
            seen.is_empty() && (!at_most || got.len() <= want),
            "{} records in {topic} for {want}, twice: {seen:?} ({context})",
            got.len()
        );
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = read_topic(
            bootstrap,
            topic,
            partitions,
            want + 1,
            Duration::from_secs(2),
        )
        .await;
        check(&got, true);
        if got.len() == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} records in {topic}, not {want} ({context})",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let got = read_topic(
        bootstrap,
        topic,
        partitions,
        want + 1,
        Duration::from_secs(3),
    )
    .await;
    check(&got, true);
    assert_eq!(got.len(), want, "records in {topic} ({context})");
    for (key, n) in per_key {
        let have = got
            .iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .count();
        assert_eq!(have, *n, "records of key {key} in {topic} ({context})");
    }
    got
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
