//! Command-line interface of `statemesh`.

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use statemesh_node::ingress::{states_to_json, value_from_text, value_to_text};
use statemesh_node::{NodeBuilder, NodeConfig};
use statemesh_sdk::{typenames, Address, Client};

/// statemesh: a runtime for stateful functions.
#[derive(Parser)]
#[command(name = "statemesh", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct NodeTarget {
    /// gRPC URL of the node to talk to.
    #[arg(
        long = "node",
        env = "STATEMESH_NODE",
        default_value = "http://127.0.0.1:5090"
    )]
    node: String,
    /// Bearer token for a node with `[auth]` (an ingress token, or the admin token for
    /// `state`, `cluster` and `dead-letters`).
    #[arg(long = "token", env = "STATEMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA (PEM file) of the nodes' certificates, for `https://` node URLs (`[tls]`).
    #[arg(long = "ca", env = "STATEMESH_CA")]
    ca: Option<PathBuf>,
}

impl NodeTarget {
    fn options(&self) -> anyhow::Result<statemesh_sdk::ConnectOptions> {
        let ca_pem = match &self.ca {
            Some(p) => Some(std::fs::read(p).with_context(|| format!("--ca {}", p.display()))?),
            None => None,
        };
        Ok(statemesh_sdk::ConnectOptions {
            token: self.token.clone(),
            ca_pem,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (with the bundled example functions).
    Node {
        /// Node configuration file (TOML); see docs/configuration.md.
        #[arg(long)]
        config: Option<PathBuf>,
        /// StateFun module file (module.yaml): remote function endpoints.
        #[arg(long)]
        module: Option<PathBuf>,
        /// Data directory (overrides the file); default ./data.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// gRPC listen address (overrides the file); default 127.0.0.1:5090.
        #[arg(long)]
        grpc_addr: Option<std::net::SocketAddr>,
        /// HTTP listen address (overrides the file); default 127.0.0.1:8090.
        #[arg(long)]
        http_addr: Option<std::net::SocketAddr>,
        /// Shards (overrides the file); default one per core.
        #[arg(long)]
        shards: Option<usize>,
        /// This node's id in the cluster, a positive integer (kept in the data directory;
        /// generated on the first start if not given).
        #[arg(long)]
        node_id: Option<u64>,
        /// Join the cluster of these members (gRPC addresses `HOST:PORT[,HOST:PORT…]`);
        /// without it a new data directory starts a new cluster of one.
        #[arg(long, value_delimiter = ',')]
        join: Vec<String>,
        /// The gRPC address other nodes reach this one at (default: --grpc-addr).
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Blob storage of checkpoints (overrides `[checkpoint] url`); every member of a
        /// cluster uses the same location.
        #[arg(long)]
        checkpoint_url: Option<String>,
    },
    /// Send a one-way message: `statemesh send example/counter/a 5 --type long`.
    Send {
        /// Target address `namespace/type/id`.
        address: String,
        /// The value: plain text for built-in types, raw text otherwise.
        value: String,
        /// Typename, or a built-in short name: string (default), long, int, bool, float, double.
        #[arg(long = "type", default_value = "string")]
        typ: String,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        target: NodeTarget,
    },
    /// Call an address and print its reply: `statemesh call example/greeter/alice hi`.
    Call {
        /// Target address `namespace/type/id`.
        address: String,
        /// The value: plain text for built-in types, raw text otherwise.
        value: String,
        /// Typename, or a built-in short name: string (default), long, int, bool, float, double.
        #[arg(long = "type", default_value = "string")]
        typ: String,
        /// Reply timeout in milliseconds (default: the node's).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        target: NodeTarget,
    },
    /// Inspect state.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Dead letters: messages that could not be delivered (`statemesh/dead-letters`).
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// The cluster: `statemesh cluster status` prints its members as a table.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Checks a node's health over HTTP (for container health checks): exits 0 when
    /// `/healthz` (or, with `--ready`, `/readyz`) answers 200, 1 otherwise, printing why.
    /// Under `[tls]`, give an `https://` URL: like the kubelet's HTTPS probes, it does not
    /// verify the node's certificate (it sends no credentials and reads only the status).
    Health {
        /// HTTP base URL of the node (`http://` or `https://`).
        #[arg(long = "http", default_value = "http://127.0.0.1:8090")]
        http: String,
        /// Check readiness (`/readyz`: serving, placement known, no back-pressure) instead.
        #[arg(long)]
        ready: bool,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Load generators and benchmarks (print JSON).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The leader, term, placement version and committed epoch, and a row per member (id,
    /// generation, role, alive, key groups, addresses).
    Status {
        #[command(flatten)]
        target: NodeTarget,
    },
    /// The node at `--node` leaves its cluster: its key groups are handed over to the others,
    /// it leaves the Raft group (a voter's seat goes to a learner) and the members, and its
    /// process exits 0. Waits (printing progress) until it has left.
    Leave {
        #[command(flatten)]
        target: NodeTarget,
        /// Give up waiting after this long (the leave goes on).
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
}

#[derive(clap::Subcommand)]
enum StateCommand {
    /// Print the states of an address as JSON.
    Get {
        /// Address `namespace/type/id`.
        address: String,
        #[command(flatten)]
        target: NodeTarget,
    },
    /// Set one state of an address through a committed epoch (applied between two
    /// invocations of the address); prints its states after the change:
    /// `statemesh state set example/counter/a count 42`.
    Set {
        /// Address `namespace/type/id`.
        address: String,
        /// The state's name (one the function declares).
        name: String,
        /// The value as text: converted with the state's declared typename (`42` for a long);
        /// the raw bytes for a typename that is not built in.
        value: String,
        /// Convert the text with this typename (or short name: long, int, …) here instead;
        /// the node refuses it unless it is the state's declared typename.
        #[arg(long = "type")]
        typ: Option<String>,
        /// Idempotency key: a retry with the same key is applied once.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        target: NodeTarget,
    },
    /// Delete one state of an address through a committed epoch; prints its states after.
    Delete {
        /// Address `namespace/type/id`.
        address: String,
        /// The state's name.
        name: String,
        /// Idempotency key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        target: NodeTarget,
    },
}

#[derive(clap::Subcommand)]
enum DeadLetterCommand {
    /// List the dead letters of every member of the cluster (oldest first per node).
    List {
        /// At most this many per node.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: NodeTarget,
    },
    /// Replay a dead letter by id (on whichever member holds it): a message goes to its
    /// address again, an egress record to its egress; then the letter is removed.
    Replay {
        /// The letter's id, as `list` shows it.
        id: String,
        #[command(flatten)]
        target: NodeTarget,
    },
}

/// Resolves `--type` short names to typenames.
fn typename(t: &str) -> String {
    match t {
        "string" => typenames::STRING.into(),
        "long" => typenames::LONG.into(),
        "int" => typenames::INT.into(),
        "bool" => typenames::BOOL.into(),
        "float" => typenames::FLOAT.into(),
        "double" => typenames::DOUBLE.into(),
        other => other.into(),
    }
}

/// Logs to stderr (`RUST_LOG`, default `info`), and spans of the message path to an OTLP
/// collector if `[telemetry]` names one. The guard flushes the spans when dropped.
fn init_tracing(
    telemetry: &statemesh_node::config::TelemetryConfig,
) -> Result<statemesh_node::telemetry::Guard, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let (otel, guard) = statemesh_node::telemetry::layer(telemetry)?;
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(guard)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A node's `[telemetry]` (the node reports any other problem of its file itself).
    let telemetry = match &cli.command {
        Command::Node {
            config: Some(p), ..
        } => NodeConfig::load_unchecked(p)
            .map(|c| c.telemetry)
            .unwrap_or_default(),
        _ => Default::default(),
    };
    // Dropped before the runtime: the last spans are flushed through it.
    let _telemetry = {
        let _in = rt.enter();
        match init_tracing(&telemetry) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `statemesh state set|delete`: the edit, then the address's states as JSON.
async fn edit_state(
    target: &NodeTarget,
    address: &Address,
    name: &str,
    change: statemesh_sdk::StateChange,
    key: Option<&str>,
) -> anyhow::Result<()> {
    let values = connect(target)
        .await?
        .set_state(address, name, change, key)
        .await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&states_to_json(address, values))?
    );
    Ok(())
}

async fn connect(t: &NodeTarget) -> anyhow::Result<Client> {
    Ok(Client::connect_with(&t.node, &t.options()?).await?)
}

/// How long a command that asks every member waits for each (as the HTTP API does): a
/// member that is paused, or whose host is gone without a reset, accepts the connection and
/// never answers.
const MEMBER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// `f` for node `node` at `grpc`, within [`MEMBER_DEADLINE`]; errors name the node.
async fn ask_member<T, F>(node: u64, grpc: &str, f: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    within_deadline(&format!("node {node} at {grpc}"), f).await
}

/// `f` within [`MEMBER_DEADLINE`]; errors begin with `who`.
async fn within_deadline<T, F>(who: &str, f: F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    match tokio::time::timeout(MEMBER_DEADLINE, f).await {
        Ok(r) => r.with_context(|| who.to_string()),
        Err(_) => anyhow::bail!("{who}: no answer within {} s", MEMBER_DEADLINE.as_secs()),
    }
}

/// The members of the cluster of the node at `t` that are alive: (id, gRPC URL); the node
/// itself first.
async fn members(t: &NodeTarget) -> anyhow::Result<Vec<(u64, String)>> {
    let c = within_deadline(&format!("node at {}", t.node), async {
        Ok(connect(t).await?.cluster().await?)
    })
    .await?;
    let mut out = vec![(c.node_id, t.node.clone())];
    for m in c.members {
        if m.id != c.node_id && m.alive && !m.grpc_addr.is_empty() {
            let url = if m.grpc_addr.contains("://") {
                m.grpc_addr
            } else if t.node.starts_with("https://") {
                format!("https://{}", m.grpc_addr)
            } else {
                format!("http://{}", m.grpc_addr)
            };
            out.push((m.id, url));
        }
    }
    Ok(out)
}

/// The dead letters of every member that answers, by node id; and the members that do not
/// (each error names its node).
type MemberLetters = Vec<(u64, Vec<statemesh_proto::v1::DeadLetter>)>;
async fn dead_letters_of_members(
    t: &NodeTarget,
    limit: u32,
) -> anyhow::Result<(MemberLetters, Vec<anyhow::Error>)> {
    let options = t.options()?;
    let mut out = Vec::new();
    let mut unreachable = Vec::new();
    for (node, grpc) in members(t).await? {
        let letters = ask_member(node, &grpc, async {
            Ok(Client::connect_with(&grpc, &options)
                .await?
                .dead_letters(limit)
                .await?)
        })
        .await;
        match letters {
            Ok(l) => out.push((node, l.letters)),
            Err(e) => unreachable.push(e),
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok((out, unreachable))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node {
            config,
            module,
            data_dir,
            grpc_addr,
            http_addr,
            shards,
            node_id,
            join,
            advertise_addr,
            checkpoint_url,
        } => {
            statemesh_node::failpoint::setup_from_env().map_err(anyhow::Error::msg)?;
            let mut cfg = match &config {
                // Checked once the command line's options are in (a file may leave
                // `advertise_addr` to `--advertise-addr`, as the container image's does).
                Some(p) => NodeConfig::load_unchecked(p)?,
                None => NodeConfig::default(),
            };
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(a) = grpc_addr {
                cfg.grpc_addr = a;
            }
            if let Some(a) = http_addr {
                cfg.http_addr = a;
            }
            if let Some(s) = shards {
                cfg.shards = s;
            }
            if node_id.is_some() {
                cfg.node_id = node_id;
            }
            if !join.is_empty() {
                cfg.join = join;
            }
            if advertise_addr.is_some() {
                cfg.advertise_addr = advertise_addr;
            }
            if checkpoint_url.is_some() {
                cfg.checkpoint.url = checkpoint_url;
            }
            cfg.validate().map_err(|e| match &config {
                Some(p) => anyhow::anyhow!("{}: {e}", p.display()),
                None => e.into(),
            })?;
            let module = match &module {
                Some(p) => Some(statemesh_node::module::Module::load(p)?),
                None => None,
            };
            run_node(cfg, module).await
        }
        Command::Send {
            address,
            value,
            typ,
            key,
            target,
        } => {
            let address = Address::parse(&address)?;
            let v = value_from_text(&typename(&typ), value.into_bytes().into())?;
            connect(&target)
                .await?
                .send_with_key(&address, v, key.as_deref())
                .await?;
            Ok(())
        }
        Command::Call {
            address,
            value,
            typ,
            timeout_ms,
            key,
            target,
        } => {
            let address = Address::parse(&address)?;
            let v = value_from_text(&typename(&typ), value.into_bytes().into())?;
            let timeout = timeout_ms.map(std::time::Duration::from_millis);
            let reply = connect(&target)
                .await?
                .call_with(&address, v, key.as_deref(), timeout)
                .await?;
            let text = value_to_text(&reply);
            use std::io::Write;
            let mut out = std::io::stdout();
            out.write_all(&text)?;
            out.write_all(b"\n")?;
            Ok(())
        }
        Command::State {
            command: StateCommand::Get { address, target },
        } => {
            let address = Address::parse(&address)?;
            let values = connect(&target).await?.get_state(&address).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&states_to_json(&address, values))?
            );
            Ok(())
        }
        Command::State {
            command:
                StateCommand::Set {
                    address,
                    name,
                    value,
                    typ,
                    key,
                    target,
                },
        } => {
            let address = Address::parse(&address)?;
            let change = match typ {
                Some(t) => statemesh_sdk::StateChange::Typed(value_from_text(
                    &typename(&t),
                    value.into_bytes().into(),
                )?),
                None => statemesh_sdk::StateChange::Text(value),
            };
            edit_state(&target, &address, &name, change, key.as_deref()).await
        }
        Command::State {
            command:
                StateCommand::Delete {
                    address,
                    name,
                    key,
                    target,
                },
        } => {
            let address = Address::parse(&address)?;
            let change = statemesh_sdk::StateChange::Delete;
            edit_state(&target, &address, &name, change, key.as_deref()).await
        }
        Command::DeadLetters {
            command:
                DeadLetterCommand::List {
                    limit,
                    json,
                    target,
                },
        } => {
            let (lists, unreachable) = dead_letters_of_members(&target, limit).await?;
            if !json {
                println!(
                    "{:<5} {:<22} {:<36} {:<28} {:>8}  ERROR",
                    "NODE", "ID", "TO", "TYPENAME", "ATTEMPTS"
                );
            }
            for (node, letters) in lists {
                for l in letters {
                    if json {
                        let mut record: serde_json::Value =
                            serde_json::from_str(&l.json).unwrap_or_default();
                        record["id"] = l.id.clone().into();
                        record["node"] = node.into();
                        println!("{record}");
                    } else {
                        let to = if !l.address.is_empty() {
                            l.address
                        } else if !l.egress.is_empty() {
                            format!("egress {}", l.egress)
                        } else {
                            "-".into()
                        };
                        println!(
                            "{:<5} {:<22} {:<36} {:<28} {:>8}  {}",
                            node, l.id, to, l.typename, l.attempts, l.error
                        );
                    }
                }
            }
            // What the members that answered hold is listed; the list is incomplete, and the
            // command says so and fails.
            if !unreachable.is_empty() {
                let named: Vec<String> = unreachable.iter().map(|e| format!("{e:#}")).collect();
                anyhow::bail!(
                    "the list above is incomplete: members whose letters could not be listed: {}",
                    named.join("; ")
                )
            }
            Ok(())
        }
        Command::DeadLetters {
            command: DeadLetterCommand::Replay { id, target },
        } => {
            // Each member replays it if it holds it (NotFound: the next one). A member that
            // does not answer may hold it: then the letter is neither replayed nor known to be
            // gone, and the command fails naming that member.
            let options = target.options()?;
            let mut unreachable = Vec::new();
            for (node, grpc) in members(&target).await? {
                let replayed = ask_member(node, &grpc, async {
                    let c = Client::connect_with(&grpc, &options).await?;
                    Ok(c.replay_dead_letter(&id).await)
                })
                .await;
                match replayed {
                    Ok(Ok(done)) => {
                        println!("dead letter {id} (node {node}): {done}");
                        return Ok(());
                    }
                    Ok(Err(e)) if e.code() == Some(tonic::Code::NotFound) => {}
                    // The member answered (UNAVAILABLE included: it may have sent the letter
                    // and not removed it yet, which its message says): its answer stands.
                    Ok(Err(e)) => {
                        return Err(anyhow::Error::from(e).context(format!("node {node} at {grpc}")))
                    }
                    // Not connected, or no answer in time (a replay it started may still
                    // complete there).
                    Err(e) => unreachable.push(format!("{e:#}")),
                }
            }
            if !unreachable.is_empty() {
                anyhow::bail!(
                    "dead letter {id} is on none of the members that answered; it may be on one that did not (where a replay may still complete: list again): {}",
                    unreachable.join("; ")
                )
            }
            anyhow::bail!("no member holds dead letter {id} (replayed or read already? list again)")
        }
        Command::Health {
            http,
            ready,
            timeout_ms,
        } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            let timeout = std::time::Duration::from_millis(timeout_ms.max(1));
            let (status, body) =
                tokio::task::spawn_blocking(move || http_get(&http, path, timeout))
                    .await?
                    .with_context(|| format!("GET {path}"))?;
            let body = body.trim();
            if status == 200 {
                println!("{body}");
                Ok(())
            } else {
                anyhow::bail!("GET {path} answered {status}: {body}")
            }
        }
        Command::Cluster {
            command: ClusterCommand::Status { target },
        } => {
            let c = connect(&target).await?.cluster().await?;
            println!(
                "node {}  leader {}  term {}  placement_version {}  committed_epoch {}  unassigned_key_groups {}",
                c.node_id,
                if c.leader == 0 { "none".to_string() } else { c.leader.to_string() },
                c.term,
                c.placement_version,
                c.committed_epoch,
                c.unassigned_key_groups
            );
            if let Some(l) = &c.epoch_log {
                println!(
                    "epoch log: {} epochs, {} of {} bytes, uploaded through epoch {}{}",
                    l.epochs,
                    l.bytes,
                    l.max_bytes,
                    l.uploaded,
                    if l.bytes >= l.max_bytes {
                        "  FULL: epochs wait for an upload to blob storage"
                    } else {
                        ""
                    }
                );
            }
            println!(
                "{:<20} {:>4} {:<8} {:<8} {:>10}  {:<22} {:<22}",
                "ID", "GEN", "ROLE", "STATE", "KEY_GROUPS", "GRPC", "HTTP"
            );
            for m in c.members {
                let state = match (m.alive, m.leaving) {
                    (false, _) => "dead",
                    (true, true) => "leaving",
                    (true, false) => "alive",
                };
                println!(
                    "{:<20} {:>4} {:<8} {:<8} {:>10}  {:<22} {:<22}",
                    m.id, m.generation, m.role, state, m.key_groups, m.grpc_addr, m.http_addr
                );
            }
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::Leave { target, timeout_s },
        } => {
            let c = connect(&target).await?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
            // A node that knows no leader (an election, a majority down) cannot propose its
            // leave yet: it says so (`LEAVE_NOT_PROPOSED`), and the leave is asked again until
            // the deadline. Anything else (a node that is stopping, or cannot be reached)
            // fails at once.
            let mut told = false;
            let id = loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let wait = left.clamp(std::time::Duration::from_secs(1), MEMBER_DEADLINE);
                let Ok(asked) = tokio::time::timeout(wait, c.leave_cluster()).await else {
                    anyhow::bail!(
                        "{}: no answer within {} s (the leave may have been taken)",
                        target.node,
                        wait.as_secs()
                    );
                };
                match asked {
                    Ok(id) => break id,
                    Err(e)
                        if e.code() == Some(tonic::Code::Unavailable)
                            && e.to_string()
                                .contains(statemesh_node::cluster::LEAVE_NOT_PROPOSED) =>
                    {
                        if std::time::Instant::now() >= deadline {
                            anyhow::bail!(
                                "{}: did not take the leave within {timeout_s} s: {e}",
                                target.node
                            );
                        }
                        if !told {
                            println!("the node cannot take the leave yet ({e}); asking again");
                            told = true;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    Err(e) => anyhow::bail!("{}: {e}", target.node),
                }
            };
            println!("node {id} is leaving the cluster");
            let mut last = None;
            loop {
                match c.cluster().await {
                    Ok(v) => {
                        let owned = v.members.iter().find(|m| m.id == id).map(|m| m.key_groups);
                        if owned != last {
                            match owned {
                                Some(k) => println!("node {id} owns {k} key groups"),
                                None => println!("node {id} is no longer a member"),
                            }
                            last = owned;
                        }
                    }
                    // The node has stopped: it left.
                    Err(_) => {
                        println!("node {id} has left the cluster and stopped");
                        return Ok(());
                    }
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "node {id} has not left within {timeout_s} s (the leave goes on)"
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Command::Bench { command } => bench::run(command).await,
    }
}

async fn run_node(
    cfg: NodeConfig,
    module: Option<statemesh_node::module::Module>,
) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM right after the node says it listens must stop it cleanly.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut builder = NodeBuilder::new(cfg).with_examples();
    if let Some(m) = module {
        builder = builder.module(m);
    }
    let node = builder.start().await.context("the node refused to start")?;
    // One machine-readable line, for scripts and tests that pick port 0.
    println!(
        "statemesh listening grpc={} http={}",
        node.grpc_addr(),
        node.http_addr()
    );
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = node.left() => {}
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// A plain HTTP/1.0 GET of `path` on `base` (`http://HOST:PORT`, or `https://HOST:PORT`
/// without certificate verification): status and body. Enough for a health check, with no
/// HTTP client in the image.
fn http_get(base: &str, path: &str, timeout: std::time::Duration) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs as _;
    let (tls, authority) = match (base.strip_prefix("http://"), base.strip_prefix("https://")) {
        (Some(a), _) => (false, a),
        (_, Some(a)) => (true, a),
        _ => anyhow::bail!("{base:?}: expected http://HOST:PORT or https://HOST:PORT"),
    };
    let authority = authority.trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("{authority:?}: not HOST:PORT"))?
        .next()
        .with_context(|| format!("{authority:?}: no address"))?;
    let deadline = std::time::Instant::now() + timeout;
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connect to {addr}"))?;
    let left = || {
        deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(std::time::Duration::from_millis(1))
    };
    tcp.set_write_timeout(Some(left()))?;
    // The same socket, to shorten the read timeout to what is left before every read.
    let timeouts = tcp.try_clone()?;
    let mut s: Box<dyn ReadWrite> = if tls {
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .trim_matches(|c| c == '[' || c == ']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .with_context(|| format!("{host:?}: not a host name or address"))?;
        let conn = rustls::ClientConnection::new(any_certificate(), name)?;
        Box::new(rustls::StreamOwned::new(conn, tcp))
    } else {
        Box::new(tcp)
    };
    write!(s, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").context("send the request")?;
    s.flush()?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        timeouts.set_read_timeout(Some(left()))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if response.len() < 1 << 20 => response.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            // A TLS server may close without close_notify after an HTTP/1.0 response.
            Err(e) if tls && e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).context("read the response"),
        }
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {:?}", head.lines().next()))?;
    Ok((status, body.to_string()))
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// A TLS client configuration that accepts any server certificate: for `statemesh health`
/// only, which sends no credentials and reads only the status, as the kubelet's HTTPS probes
/// do. Never send credentials through it.
fn any_certificate() -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct Any(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(Any(provider)))
        .with_no_client_auth();
    std::sync::Arc::new(config)
}
