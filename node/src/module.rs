//! `module.yaml`: remote function endpoints and the playground's ingress/egress, in the
//! StateFun formats (PROTOCOL.md, "module.yaml").
//!
//! Two shapes are read:
//! - **v3 components**: a multi-document file, each document `kind:` + `spec:`
//!   (`io.statefun.endpoints.v2/http`, `io.statefun.endpoints.v1/http`,
//!   `io.statefun.playground.v1/ingress`, `io.statefun.playground.v1/egress`,
//!   `io.statefun.kafka.v1/ingress`, `io.statefun.kafka.v1/egress`; Kinesis kinds are refused
//!   by name as not supported);
//! - **legacy single root** (`version: "1.0" | "2.0" | "3.0"`, `module: {meta, spec}`), where
//!   versions 1.0 and 2.0 select the v2 wire protocol and 3.0 selects v3; its `ingresses` and
//!   `egresses` may be Kafka's legacy kinds ([`kafka`]).
//!
//! Errors name the file, the line and what was expected; unknown keys are warnings naming
//! them (StateFun ignores them silently).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_yaml_ng::Value;
use statemesh_sdk::{Expiration, ValueSpecDescriptor};

pub mod kafka;

pub use kafka::{
    AutoOffsetReset, DeliverySemantic, KafkaEgress, KafkaIngress, KafkaTopic, StartupPosition,
};

/// A module file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct ModuleError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What was expected and found.
    pub message: String,
}

/// The wire generation of a remote function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireProtocol {
    /// StateFun 2.x: `google.protobuf.Any` values, states from module.yaml.
    V2,
    /// StateFun 3.x: `TypedValue`, states negotiated.
    V3,
}

/// Which function types an endpoint serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionPattern {
    /// Exactly `namespace/name`.
    Exact(String),
    /// Every type of a namespace (`namespace/*`).
    Namespace(String),
}

impl FunctionPattern {
    /// Whether a function type matches.
    pub fn matches(&self, typ: &str) -> bool {
        match self {
            FunctionPattern::Exact(t) => t == typ,
            FunctionPattern::Namespace(ns) => typ.rsplit_once('/').is_some_and(|(n, _)| n == ns),
        }
    }
}

/// A remote function endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// The functions it serves.
    pub functions: FunctionPattern,
    /// The URL; `{function.name}` is replaced by the function's name.
    pub url_template: String,
    /// Wire generation.
    pub protocol: WireProtocol,
    /// Most messages per batch (`maxNumBatchRequests`; 0 = unlimited). Default 1000.
    pub max_batch: usize,
    /// Total budget of one batch call, retries included. Default 1 minute.
    pub call_timeout: Duration,
    /// Connect timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// Largest accepted response body. Default 32 MiB.
    pub payload_max_bytes: usize,
    /// How long an idle pooled connection is kept (`pool_ttl`). Default 15 s.
    pub pool_ttl: Duration,
    /// Most idle pooled connections per shard thread (`pool_size`). Default 1024.
    pub pool_size: usize,
    /// Declared states (v2; v3 negotiates them).
    pub states: Vec<ValueSpecDescriptor>,
}

impl Endpoint {
    fn new(functions: FunctionPattern, url: String, protocol: WireProtocol) -> Self {
        Endpoint {
            functions,
            url_template: url,
            protocol,
            max_batch: 1000,
            call_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            payload_max_bytes: 32 << 20,
            pool_ttl: Duration::from_secs(15),
            pool_size: 1024,
            states: Vec::new(),
        }
    }

    /// The URL for a function name.
    pub fn url_for(&self, name: &str) -> String {
        self.url_template.replace("{function.name}", name)
    }
}

/// A loaded module.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Module {
    /// Remote function endpoints, in file order (the first match wins).
    pub endpoints: Vec<Endpoint>,
    /// The playground ingress port, if declared.
    pub playground_ingress: Option<u16>,
    /// The playground egress port, if declared.
    pub playground_egress: Option<u16>,
    /// Kafka ingresses, in file order.
    pub kafka_ingresses: Vec<KafkaIngress>,
    /// Kafka egresses, in file order.
    pub kafka_egresses: Vec<KafkaEgress>,
    /// Unknown keys and other things worth a warning.
    pub warnings: Vec<String>,
}

impl Module {
    /// The endpoint serving a function type.
    pub fn endpoint_for(&self, typ: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.functions.matches(typ))
    }
}

/// Parses a StateFun duration: `1 min`, `2m`, `10sec`, `1minute`, `60000ms`, `500 millis`,
/// `3h`, `1d`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(n.checked_mul(ms)?))
}

struct Doc<'a> {
    path: &'a Path,
    text: &'a str,
    first_line: usize,
    warnings: &'a mut Vec<String>,
}

impl Doc<'_> {
    fn err(&self, key: &str, message: String) -> ModuleError {
        ModuleError {
            path: self.path.to_path_buf(),
            line: self.line_of(key),
            message,
        }
    }

    /// The line of the first occurrence of `key:` in this document (or its first line).
    fn line_of(&self, key: &str) -> usize {
        let needle = format!("{key}:");
        self.text
            .lines()
            .position(|l| l.trim_start().trim_start_matches("- ").starts_with(&needle))
            .map(|i| self.first_line + i)
            .unwrap_or(self.first_line)
    }

    fn warn_unknown(&mut self, ctx: &str, map: &serde_yaml_ng::Mapping, known: &[&str]) {
        for k in map.keys() {
            let name = k.as_str().unwrap_or("?");
            if !known.contains(&name) {
                let line = self.line_of(name);
                self.warnings.push(format!(
                    "{}:{line}: unknown key {name:?} in {ctx} (ignored)",
                    self.path.display()
                ));
            }
        }
    }

    fn map<'v>(&self, v: &'v Value, key: &str) -> Result<&'v serde_yaml_ng::Mapping, ModuleError> {
        v.as_mapping().ok_or_else(|| {
            self.err(
                key,
                format!("{key}: expected a mapping, found {}", kind_of(v)),
            )
        })
    }

    fn str<'v>(
        &self,
        m: &'v serde_yaml_ng::Mapping,
        key: &str,
        ctx: &str,
    ) -> Result<&'v str, ModuleError> {
        match m.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(
                key,
                format!("{ctx}.{key}: expected a string, found {}", kind_of(v)),
            )),
            None => Err(self.err(
                ctx.rsplit('.').next().unwrap_or(ctx),
                format!("{ctx}: missing required key {key:?}"),
            )),
        }
    }

    fn duration(
        &self,
        m: &serde_yaml_ng::Mapping,
        key: &str,
        ctx: &str,
    ) -> Result<Option<Duration>, ModuleError> {
        match m.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().map(Duration::from_millis)),
            Some(Value::String(s)) => parse_duration(s).map(Some).ok_or_else(|| {
                self.err(key, format!("{ctx}.{key}: expected a duration like \"1 min\", \"10sec\" or \"500ms\", found {s:?}"))
            }),
            Some(v) => Err(self.err(key, format!("{ctx}.{key}: expected a duration, found {}", kind_of(v)))),
        }
    }

    fn int(
        &self,
        m: &serde_yaml_ng::Mapping,
        key: &str,
        ctx: &str,
    ) -> Result<Option<i64>, ModuleError> {
        match m.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(Value::String(s)) if s.trim().parse::<i64>().is_ok() => Ok(s.trim().parse().ok()),
            Some(v) => Err(self.err(
                key,
                format!("{ctx}.{key}: expected an integer, found {}", kind_of(v)),
            )),
        }
    }

    fn function_pattern(&self, s: &str, key: &str) -> Result<FunctionPattern, ModuleError> {
        let bad = || {
            self.err(
                key,
                format!("{key}: expected \"namespace/name\" or \"namespace/*\", found {s:?}"),
            )
        };
        let (ns, name) = s.rsplit_once('/').ok_or_else(bad)?;
        if ns.is_empty() || name.is_empty() || s.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(if name == "*" {
            FunctionPattern::Namespace(ns.to_string())
        } else {
            FunctionPattern::Exact(s.to_string())
        })
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

const UNSUPPORTED_KINDS: &[&str] = &[
    "io.statefun.kinesis.v1/ingress",
    "io.statefun.kinesis.v1/egress",
];

/// The spec of an HTTP endpoint (`kind` `io.statefun.endpoints.v2/http` with `transport`, or
/// `io.statefun.endpoints.v1/http` and the 3.0 module's `endpoint` with `timeouts`).
fn endpoint_spec(
    d: &mut Doc<'_>,
    kind: &str,
    spec: &serde_yaml_ng::Mapping,
) -> Result<Endpoint, ModuleError> {
    let functions = d.str(spec, "functions", "spec")?;
    let pattern = d.function_pattern(functions, "functions")?;
    let url = d.str(spec, "urlPathTemplate", "spec")?;
    let mut e = Endpoint::new(pattern, url.to_string(), WireProtocol::V3);
    if let Some(n) = d.int(spec, "maxNumBatchRequests", "spec")? {
        e.max_batch = if n <= 0 { 0 } else { n as usize };
    }
    let v2 = kind == "io.statefun.endpoints.v2/http";
    let (tkey, known): (&str, &[&str]) = if v2 {
        (
            "transport",
            &[
                "type",
                "call",
                "connect",
                "pool_ttl",
                "pool_size",
                "payload_max_bytes",
                "timeouts",
            ],
        )
    } else {
        ("timeouts", &["call", "connect", "read", "write"])
    };
    d.warn_unknown(
        &format!("{kind} spec"),
        spec,
        &["functions", "urlPathTemplate", "maxNumBatchRequests", tkey],
    );
    if let Some(t) = spec.get(tkey) {
        let t = d.map(t, tkey)?;
        d.warn_unknown(tkey, t, known);
        if let Some(c) = d.duration(t, "call", tkey)? {
            e.call_timeout = c;
        }
        if let Some(c) = d.duration(t, "connect", tkey)? {
            e.connect_timeout = c;
        }
        if let Some(ttl) = d.duration(t, "pool_ttl", tkey)? {
            e.pool_ttl = ttl;
        }
        if let Some(n) = d.int(t, "pool_size", tkey)? {
            if n > 0 {
                e.pool_size = n as usize;
            }
        }
        if let Some(p) = d.int(t, "payload_max_bytes", tkey)? {
            if p > 0 {
                e.payload_max_bytes = p as usize;
            }
        }
    }
    Ok(e)
}

fn v3_component(
    d: &mut Doc<'_>,
    root: &serde_yaml_ng::Mapping,
    module: &mut Module,
) -> Result<(), ModuleError> {
    d.warn_unknown("component", root, &["kind", "spec"]);
    let kind = d.str(root, "kind", "component")?;
    let spec_v = root
        .get("spec")
        .ok_or_else(|| d.err("kind", format!("{kind}: missing required key \"spec\"")))?;
    let spec = d.map(spec_v, "spec")?;
    match kind {
        "io.statefun.endpoints.v2/http" | "io.statefun.endpoints.v1/http" => {
            let e = endpoint_spec(d, kind, spec)?;
            module.endpoints.push(e);
        }
        "io.statefun.playground.v1/ingress" | "io.statefun.playground.v1/egress" => {
            d.warn_unknown(&format!("{kind} spec"), spec, &["port", "topics"]);
            let port = d.int(spec, "port", "spec")?.ok_or_else(|| d.err("spec", format!("{kind}: missing required key \"port\"")))?;
            let port = u16::try_from(port).map_err(|_| d.err("port", format!("port: expected 0..=65535, found {port}")))?;
            if kind.ends_with("ingress") {
                module.playground_ingress = Some(port);
            } else {
                module.playground_egress = Some(port);
            }
        }
        "io.statefun.kafka.v1/ingress" => {
            let i = d.kafka_ingress(spec, kafka::Form::V1, None, kind)?;
            module.add_kafka_ingress(d, i)?;
        }
        "io.statefun.kafka.v1/egress" => {
            let e = d.kafka_egress(spec, kafka::Form::V1, None, kind)?;
            module.add_kafka_egress(d, e)?;
        }
        k if UNSUPPORTED_KINDS.contains(&k) => {
            return Err(d.err("kind", format!("kind {k:?} is not supported (Kinesis I/O)")));
        }
        other => {
            return Err(d.err(
                "kind",
                format!("unknown kind {other:?}: expected io.statefun.endpoints.v2/http, io.statefun.endpoints.v1/http, io.statefun.playground.v1/ingress, io.statefun.playground.v1/egress, io.statefun.kafka.v1/ingress or io.statefun.kafka.v1/egress"),
            ))
        }
    }
    Ok(())
}

fn legacy_states(d: &Doc<'_>, v: &Value) -> Result<Vec<ValueSpecDescriptor>, ModuleError> {
    let seq = v.as_sequence().ok_or_else(|| {
        d.err(
            "states",
            format!("states: expected a list, found {}", kind_of(v)),
        )
    })?;
    let mut out = Vec::new();
    for s in seq {
        let (name, ttl) = match s {
            Value::String(n) => (n.clone(), None),
            Value::Mapping(m) => {
                let name = d.str(m, "name", "states[]")?.to_string();
                let ttl = d.duration(m, "expireAfter", "states[]")?;
                (name, ttl)
            }
            other => {
                return Err(d.err(
                    "states",
                    format!(
                        "states[]: expected a name or {{name, expireAfter}}, found {}",
                        kind_of(other)
                    ),
                ))
            }
        };
        out.push(ValueSpecDescriptor {
            name: Arc::from(name.as_str()),
            // v2 state values are plain bytes; the typename only labels them here.
            typename: Arc::from("statemesh/bytes"),
            expiration: ttl.map(Expiration::AfterWrite).unwrap_or_default(),
        });
    }
    Ok(out)
}

fn legacy_root(
    d: &mut Doc<'_>,
    root: &serde_yaml_ng::Mapping,
    module: &mut Module,
) -> Result<(), ModuleError> {
    d.warn_unknown("module file", root, &["version", "module"]);
    let version = match root.get("version") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(d.err(
                "version",
                "version: expected \"1.0\", \"2.0\" or \"3.0\"".into(),
            ))
        }
    };
    let protocol = match version.as_str() {
        "1.0" | "1" | "2.0" | "2" => WireProtocol::V2,
        "3.0" | "3" => WireProtocol::V3,
        v => {
            return Err(d.err(
                "version",
                format!("version: expected \"1.0\", \"2.0\" or \"3.0\", found {v:?}"),
            ))
        }
    };
    let m = d.map(
        root.get("module")
            .ok_or_else(|| d.err("version", "missing required key \"module\"".into()))?,
        "module",
    )?;
    d.warn_unknown("module", m, &["meta", "spec"]);
    let Some(spec) = m.get("spec") else {
        return Ok(());
    };
    let spec = d.map(spec, "spec")?;
    d.warn_unknown(
        "module.spec",
        spec,
        &["functions", "endpoints", "ingresses", "egresses", "routers"],
    );
    // StateFun 3.0's form: `endpoints: - endpoint: {meta: {kind: http}, spec: {functions,
    // urlPathTemplate, maxNumBatchRequests, timeouts}}`.
    if let Some(list) = spec.get("endpoints") {
        let list = list.as_sequence().ok_or_else(|| {
            d.err(
                "endpoints",
                format!("endpoints: expected a list, found {}", kind_of(list)),
            )
        })?;
        for entry in list {
            let entry = d.map(entry, "endpoints")?;
            let ep = d.map(
                entry.get("endpoint").ok_or_else(|| {
                    d.err(
                        "endpoints",
                        "endpoints[]: expected an \"endpoint:\" entry".into(),
                    )
                })?,
                "endpoint",
            )?;
            d.warn_unknown("endpoint", ep, &["meta", "spec"]);
            if let Some(meta) = ep.get("meta") {
                let meta = d.map(meta, "meta")?;
                if let Some(k) = meta.get("kind") {
                    if k.as_str() != Some("http") {
                        return Err(d.err(
                            "kind",
                            format!(
                                "endpoint.meta.kind: expected \"http\", found {}",
                                kind_of(k)
                            ),
                        ));
                    }
                }
            }
            let espec = d.map(
                ep.get("spec").ok_or_else(|| {
                    d.err("endpoint", "endpoint: missing required key \"spec\"".into())
                })?,
                "spec",
            )?;
            let mut e = endpoint_spec(d, "io.statefun.endpoints.v1/http", espec)?;
            e.protocol = protocol;
            module.endpoints.push(e);
        }
    }
    if spec
        .get("routers")
        .and_then(|v| v.as_sequence())
        .is_some_and(|s| !s.is_empty())
    {
        return Err(d.err("routers", "module.spec.routers is not supported (StateFun 2.x routers; Kafka ingresses route by record key)".into()));
    }
    for (key, item) in [("ingresses", "ingress"), ("egresses", "egress")] {
        if let Some(list) = spec.get(key) {
            let list = list.as_sequence().ok_or_else(|| {
                d.err(
                    key,
                    format!("{key}: expected a list, found {}", kind_of(list)),
                )
            })?;
            for entry in list {
                legacy_io(d, entry, item, &version, module)?;
            }
        }
    }
    let Some(functions) = spec.get("functions") else {
        return Ok(());
    };
    let functions = functions
        .as_sequence()
        .ok_or_else(|| d.err("functions", "functions: expected a list".into()))?;
    for f in functions {
        let f = d.map(f, "functions")?;
        let f = d.map(
            f.get("function").ok_or_else(|| {
                d.err(
                    "functions",
                    "functions[]: expected a \"function:\" entry".into(),
                )
            })?,
            "function",
        )?;
        d.warn_unknown("function", f, &["meta", "spec"]);
        let meta = d.map(
            f.get("meta").ok_or_else(|| {
                d.err("function", "function: missing required key \"meta\"".into())
            })?,
            "meta",
        )?;
        d.warn_unknown("function.meta", meta, &["kind", "type"]);
        let kind = d.str(meta, "kind", "meta")?;
        if kind != "http" {
            return Err(d.err(
                "kind",
                format!("meta.kind: expected \"http\", found {kind:?}"),
            ));
        }
        let typ = d.str(meta, "type", "meta")?;
        let pattern = d.function_pattern(typ, "type")?;
        let fspec = d.map(
            f.get("spec").ok_or_else(|| {
                d.err("function", "function: missing required key \"spec\"".into())
            })?,
            "spec",
        )?;
        d.warn_unknown(
            "function.spec",
            fspec,
            &["endpoint", "states", "maxNumBatchRequests", "timeout"],
        );
        let endpoint = d.str(fspec, "endpoint", "spec")?;
        let mut e = Endpoint::new(pattern, endpoint.to_string(), protocol);
        if let Some(states) = fspec.get("states") {
            e.states = legacy_states(d, states)?;
        }
        if let Some(n) = d.int(fspec, "maxNumBatchRequests", "spec")? {
            e.max_batch = if n <= 0 { 0 } else { n as usize };
        }
        if let Some(t) = d.duration(fspec, "timeout", "spec")? {
            e.call_timeout = t;
        }
        module.endpoints.push(e);
    }
    Ok(())
}

/// One entry of a legacy module's `ingresses` (`item` = `ingress`) or `egresses` list:
/// `- ingress: {meta: {type, id}, spec}`.
fn legacy_io(
    d: &mut Doc<'_>,
    entry: &Value,
    item: &str,
    version: &str,
    module: &mut Module,
) -> Result<(), ModuleError> {
    let entry = d.map(entry, item)?;
    let io = d.map(
        entry
            .get(item)
            .ok_or_else(|| d.err(item, format!("expected an \"{item}:\" entry")))?,
        item,
    )?;
    d.deny_unknown(item, io, &["meta", "spec"])?;
    let meta = d.map(
        io.get("meta")
            .ok_or_else(|| d.err(item, format!("{item}: missing required key \"meta\"")))?,
        "meta",
    )?;
    d.deny_unknown(&format!("{item}.meta"), meta, &["type", "id"])?;
    let typ = d.str(meta, "type", "meta")?;
    let id = d.str(meta, "id", "meta")?;
    let spec = d.map(
        io.get("spec")
            .ok_or_else(|| d.err(item, format!("{item}: missing required key \"spec\"")))?,
        "spec",
    )?;
    let v3 = matches!(version, "3.0" | "3");
    let (form, ingress_kind, egress_kind) = if v3 {
        (
            kafka::Form::Legacy3,
            "io.statefun.kafka/ingress",
            "io.statefun.kafka/egress",
        )
    } else {
        (
            kafka::Form::Legacy2,
            "statefun.kafka.io/routable-protobuf-ingress",
            "statefun.kafka.io/generic-egress",
        )
    };
    match (item, typ) {
        ("ingress", t) if t == ingress_kind => {
            let i = d.kafka_ingress(spec, form, Some(id), t)?;
            module.add_kafka_ingress(d, i)
        }
        ("egress", t) if t == egress_kind => {
            let e = d.kafka_egress(spec, form, Some(id), t)?;
            module.add_kafka_egress(d, e)
        }
        (_, t) => {
            let wanted = if item == "ingress" {
                ingress_kind
            } else {
                egress_kind
            };
            Err(d.err(
                "type",
                format!("{item}.meta.type: {t:?} is not supported in a version {version:?} module; expected {wanted:?}"),
            ))
        }
    }
}

impl Module {
    fn add_kafka_ingress(&mut self, d: &Doc<'_>, i: KafkaIngress) -> Result<(), ModuleError> {
        if self.kafka_ingresses.iter().any(|x| x.id == i.id) {
            return Err(d.err("id", format!("Kafka ingress {:?} is declared twice", i.id)));
        }
        self.kafka_ingresses.push(i);
        Ok(())
    }

    fn add_kafka_egress(&mut self, d: &Doc<'_>, e: KafkaEgress) -> Result<(), ModuleError> {
        if self.kafka_egresses.iter().any(|x| x.id == e.id) {
            return Err(d.err("id", format!("Kafka egress {:?} is declared twice", e.id)));
        }
        self.kafka_egresses.push(e);
        Ok(())
    }

    /// Parses module text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Module, ModuleError> {
        let mut module = Module::default();
        let mut warnings = Vec::new();
        // Split into documents by hand to know where each starts.
        let mut docs: Vec<(usize, String)> = vec![(1, String::new())];
        for (i, line) in text.lines().enumerate() {
            if line.trim_end() == "---" || line.starts_with("--- ") {
                docs.push((i + 2, String::new()));
            } else {
                let cur = &mut docs.last_mut().expect("non-empty").1;
                cur.push_str(line);
                cur.push('\n');
            }
        }
        for (first_line, doc_text) in &docs {
            let value: Value = match serde_yaml_ng::from_str(doc_text) {
                Ok(v) => v,
                Err(e) => {
                    let line = e.location().map(|l| l.line()).unwrap_or(1) + first_line - 1;
                    return Err(ModuleError {
                        path: path.to_path_buf(),
                        line,
                        message: format!("invalid YAML: {e}"),
                    });
                }
            };
            let mut d = Doc {
                path,
                text: doc_text,
                first_line: *first_line,
                warnings: &mut warnings,
            };
            match &value {
                Value::Null => continue,
                Value::Mapping(root) if root.contains_key("kind") => v3_component(&mut d, root, &mut module)?,
                Value::Mapping(root) if root.contains_key("version") => legacy_root(&mut d, root, &mut module)?,
                other => {
                    return Err(d.err(
                        "",
                        format!("expected a component (kind: …, spec: …) or a legacy module (version: …, module: …), found {}", kind_of(other)),
                    ))
                }
            }
        }
        module.warnings = warnings;
        Ok(module)
    }

    /// Loads a module file.
    pub fn load(path: &Path) -> Result<Module, ModuleError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModuleError {
            path: path.to_path_buf(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Module, ModuleError> {
        Module::parse(s, Path::new("module.yaml"))
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("1 min", 60_000),
            ("2m", 120_000),
            ("10sec", 10_000),
            ("1minute", 60_000),
            ("60000ms", 60_000),
            ("2min", 120_000),
            ("500", 500),
        ] {
            assert_eq!(parse_duration(s), Some(Duration::from_millis(ms)), "{s}");
        }
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn v3_components() {
        let m = parse(
            "kind: io.statefun.endpoints.v2/http\nspec:\n  functions: example/*\n  urlPathTemplate: http://localhost:8000/{function.name}\n  maxNumBatchRequests: 10\n  transport:\n    type: io.statefun.transports.v1/async\n    call: 2m\n    connect: 20s\n    colour: blue\n---\nkind: io.statefun.playground.v1/ingress\nspec:\n  port: 8090\n---\nkind: io.statefun.playground.v1/egress\nspec:\n  port: 8091\n  topics: [greetings]\n",
        )
        .unwrap();
        let e = m.endpoint_for("example/greeter").unwrap();
        assert_eq!(e.url_for("greeter"), "http://localhost:8000/greeter");
        assert_eq!(
            (e.max_batch, e.call_timeout, e.connect_timeout),
            (10, Duration::from_secs(120), Duration::from_secs(20))
        );
        assert_eq!(e.protocol, WireProtocol::V3);
        assert!(m.endpoint_for("other/greeter").is_none());
        assert_eq!(
            (m.playground_ingress, m.playground_egress),
            (Some(8090), Some(8091))
        );
        assert_eq!(m.warnings.len(), 1);
        assert!(
            m.warnings[0].contains("module.yaml:10") && m.warnings[0].contains("colour"),
            "{:?}",
            m.warnings
        );
    }

    #[test]
    fn transport_pool_settings() {
        let m = parse("kind: io.statefun.endpoints.v2/http\nspec:\n  functions: a/b\n  urlPathTemplate: http://x\n  transport:\n    pool_ttl: 30s\n    pool_size: 8\n").unwrap();
        let e = m.endpoint_for("a/b").unwrap();
        assert_eq!((e.pool_ttl, e.pool_size), (Duration::from_secs(30), 8));
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    }

    #[test]
    fn legacy_talk_form() {
        let m = parse(
            "version: \"2.0\"\nmodule:\n  meta:\n    type: remote\n  spec:\n    functions:\n      - function:\n          meta:\n            kind: http\n            type: demo/model\n          spec:\n            endpoint: http://localhost:8000/statefun\n            states:\n              - arms\n            maxNumBatchRequests: 500\n            timeout: 2min\n",
        )
        .unwrap();
        let e = m.endpoint_for("demo/model").unwrap();
        assert_eq!(e.protocol, WireProtocol::V2);
        assert_eq!(e.states.len(), 1);
        assert_eq!(&*e.states[0].name, "arms");
        assert_eq!(
            (e.max_batch, e.call_timeout),
            (500, Duration::from_secs(120))
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    }

    #[test]
    fn errors_name_line_and_expectation() {
        let e = parse("kind: io.statefun.endpoints.v2/http\nspec:\n  functions: greeter\n  urlPathTemplate: http://x\n").unwrap_err().to_string();
        assert!(
            e.starts_with("module.yaml:3:") && e.contains("expected \"namespace/name\""),
            "{e}"
        );
        let e = parse("kind: io.statefun.kinesis.v1/ingress\nspec: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported") && e.contains("kinesis"), "{e}");
        let e = parse("a: [\n").unwrap_err().to_string();
        assert!(
            e.starts_with("module.yaml:") && e.contains("invalid YAML"),
            "{e}"
        );
        let e = parse("x\n---\nkind: io.statefun.endpoints.v2/http\nspec:\n  functions: a/b\n  urlPathTemplate: http://x\n  transport:\n    call: forever\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("module.yaml:1:"), "{e}");
        let e = parse("kind: io.statefun.endpoints.v2/http\nspec:\n  functions: a/b\n  urlPathTemplate: http://x\n  transport:\n    call: forever\n").unwrap_err().to_string();
        assert!(
            e.starts_with("module.yaml:6:") && e.contains("expected a duration"),
            "{e}"
        );
    }
}
