//! StateFun's Kafka ingress and egress specs, in all their forms (PROTOCOL.md, "Kafka I/O"):
//!
//! - `io.statefun.kafka.v1/ingress|egress` components (StateFun 3.1+);
//! - `io.statefun.kafka/ingress|egress` under a `version: "3.0"` module's `ingresses:` /
//!   `egresses:` (`meta: {type, id}` + `spec`);
//! - StateFun 2.x's `statefun.kafka.io/routable-protobuf-ingress` and
//!   `statefun.kafka.io/generic-egress` under `version: "1.0"` and `"2.0"` modules.
//!
//! All of them become one [`KafkaIngress`] or [`KafkaEgress`]. Unlike the other kinds, an
//! unknown key in a Kafka spec is an error naming its line: a misspelt `startupPosition`
//! would otherwise silently start reading from the wrong place.

use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use super::{kind_of, Doc, ModuleError, WireProtocol};

/// Where an ingress starts reading a partition it has no committed offset for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPosition {
    /// The consumer group's committed offset (else `autoOffsetResetPosition`).
    GroupOffsets,
    /// The partition's first record.
    Earliest,
    /// After the partition's last record (StateFun's default).
    Latest,
    /// Given offsets per `(topic, partition)`; other partitions use `autoOffsetResetPosition`.
    SpecificOffsets(Vec<(String, i32, i64)>),
    /// The first record at or after this time (ms since the Unix epoch).
    Date(i64),
}

/// Where to start when the startup position finds no offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoOffsetReset {
    /// The partition's first record.
    Earliest,
    /// After its last record (StateFun's default).
    Latest,
}

/// One topic of an ingress and where its records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTopic {
    /// The topic.
    pub topic: String,
    /// The typename of its records' values (`valueType`; a 2.x `typeUrl`).
    pub value_type: String,
    /// Function types (`namespace/name`); each record goes to every one of them, at the id
    /// given by the record's key.
    pub targets: Vec<String>,
}

/// A Kafka ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaIngress {
    /// `namespace/name`.
    pub id: String,
    /// Bootstrap servers (`address`, else the `bootstrap.servers` property).
    pub address: String,
    /// `consumerGroupId` (default: `statemesh-` and the id).
    pub group_id: String,
    /// The topics read.
    pub topics: Vec<KafkaTopic>,
    /// Where to start without a committed offset.
    pub startup: StartupPosition,
    /// Where to start when the startup position has none.
    pub auto_offset_reset: AutoOffsetReset,
    /// Client properties, passed to the client as they are (named fields win).
    pub properties: Vec<(String, String)>,
    /// The wire generation of the module that declared it (2.x ingresses feed v2 functions).
    pub protocol: WireProtocol,
}

/// An egress's delivery guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverySemantic {
    /// Every record at least once (StateFun's default).
    AtLeastOnce,
    /// Every record exactly once; upstream uses a Kafka transaction of this timeout.
    ExactlyOnce {
        /// `transactionTimeout` (or the deprecated `transactionTimeoutMillis`).
        transaction_timeout: Duration,
    },
    /// Fire and forget.
    None,
}

/// A Kafka egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaEgress {
    /// `namespace/name`: functions send to this egress.
    pub id: String,
    /// Bootstrap servers.
    pub address: String,
    /// Delivery guarantee.
    pub semantic: DeliverySemantic,
    /// Client properties.
    pub properties: Vec<(String, String)>,
}

/// Which form a spec came in (the keys differ a little).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Form {
    /// `io.statefun.kafka.v1/*`: `id` inside the spec.
    V1,
    /// `version: "3.0"`: `meta.id`, keys as v1.
    Legacy3,
    /// `version: "1.0"/"2.0"`: `meta.id`, topics carry `typeUrl`.
    Legacy2,
}

/// What ingress and egress specs share: id, properties and bootstrap address.
type Common = (String, Vec<(String, String)>, String);

const INGRESS_KEYS: &[&str] = &[
    "id",
    "address",
    "consumerGroupId",
    "topics",
    "startupPosition",
    "autoOffsetResetPosition",
    "properties",
];
const EGRESS_KEYS: &[&str] = &["id", "address", "deliverySemantic", "properties"];

impl Doc<'_> {
    /// An unknown key is an error naming it and its line.
    pub(super) fn deny_unknown(
        &self,
        ctx: &str,
        map: &Mapping,
        known: &[&str],
    ) -> Result<(), ModuleError> {
        for k in map.keys() {
            let name = k.as_str().unwrap_or("?");
            if !known.contains(&name) {
                return Err(self.err(
                    name,
                    format!(
                        "{ctx}: unknown key {name:?}; expected one of {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn list<'v>(&self, v: &'v Value, key: &str, ctx: &str) -> Result<&'v Vec<Value>, ModuleError> {
        v.as_sequence().ok_or_else(|| {
            self.err(
                key,
                format!("{ctx}.{key}: expected a list, found {}", kind_of(v)),
            )
        })
    }

    fn scalar(&self, v: &Value, key: &str, ctx: &str) -> Result<String, ModuleError> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(self.err(
                key,
                format!(
                    "{ctx}.{key}: expected a string or number, found {}",
                    kind_of(other)
                ),
            )),
        }
    }

    fn type_name(&self, s: &str, key: &str, ctx: &str) -> Result<String, ModuleError> {
        match s.rsplit_once('/') {
            Some((ns, n))
                if !ns.is_empty() && !n.is_empty() && !s.contains(char::is_whitespace) =>
            {
                Ok(s.to_string())
            }
            _ => Err(self.err(
                key,
                format!("{ctx}.{key}: expected \"namespace/name\", found {s:?}"),
            )),
        }
    }

    /// `properties`: a list of single-key maps (StateFun's form), or one mapping.
    fn properties(&self, spec: &Mapping, ctx: &str) -> Result<Vec<(String, String)>, ModuleError> {
        let Some(v) = spec.get("properties") else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut add = |m: &Mapping| -> Result<(), ModuleError> {
            for (k, v) in m {
                let k = self.scalar(k, "properties", ctx)?;
                out.push((k.clone(), self.scalar(v, &k, &format!("{ctx}.properties"))?));
            }
            Ok(())
        };
        match v {
            Value::Mapping(m) => add(m)?,
            Value::Sequence(items) => {
                for item in items {
                    match item {
                        Value::Mapping(m) if m.len() == 1 => add(m)?,
                        other => {
                            return Err(self.err(
                                "properties",
                                format!("{ctx}.properties: expected a list of single-key maps like \"- max.poll.records: 500\", found {} in it", kind_of(other)),
                            ))
                        }
                    }
                }
            }
            other => {
                return Err(self.err(
                    "properties",
                    format!(
                        "{ctx}.properties: expected a list of single-key maps, found {}",
                        kind_of(other)
                    ),
                ))
            }
        }
        Ok(out)
    }

    /// `address`, else the `bootstrap.servers` property.
    fn bootstrap(
        &self,
        spec: &Mapping,
        properties: &[(String, String)],
        ctx: &str,
        kind: &str,
    ) -> Result<String, ModuleError> {
        if spec.contains_key("address") {
            return Ok(self.str(spec, "address", ctx)?.to_string());
        }
        properties
            .iter()
            .rev()
            .find(|(k, _)| k == "bootstrap.servers")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                self.err(
                    "spec",
                    format!("{kind}: missing required key \"address\" (the Kafka bootstrap servers, e.g. \"localhost:9092\")"),
                )
            })
    }

    fn startup_position(&self, v: &Value) -> Result<StartupPosition, ModuleError> {
        let ctx = "startupPosition";
        let m = self.map(v, ctx)?;
        let typ = self.str(m, "type", ctx)?;
        let known: &[&str] = match typ {
            "specific-offsets" => &["type", "offsets"],
            "date" => &["type", "date"],
            _ => &["type"],
        };
        self.deny_unknown(ctx, m, known)?;
        Ok(match typ {
            "group-offsets" => StartupPosition::GroupOffsets,
            "earliest" => StartupPosition::Earliest,
            "latest" => StartupPosition::Latest,
            "specific-offsets" => {
                let offsets = m.get("offsets").ok_or_else(|| {
                    self.err(ctx, "startupPosition: type specific-offsets needs \"offsets\" (a list of \"topic/partition\": offset)".into())
                })?;
                let mut out = Vec::new();
                for item in self.list(offsets, "offsets", ctx)? {
                    let Some(m) = item.as_mapping().filter(|m| m.len() == 1) else {
                        return Err(self.err("offsets", format!("startupPosition.offsets: expected single-key maps like \"- my-topic/0: 42\", found {}", kind_of(item))));
                    };
                    let (k, v) = m.iter().next().expect("one entry");
                    let k = self.scalar(k, "offsets", ctx)?;
                    let bad = || self.err("offsets", format!("startupPosition.offsets: expected \"topic/partition\": offset (≥ 0), found {k:?}"));
                    let (topic, part) = k.rsplit_once('/').ok_or_else(bad)?;
                    let part: i32 = part.parse().map_err(|_| bad())?;
                    let off = match v {
                        Value::Number(n) => n.as_i64(),
                        Value::String(s) => s.trim().parse().ok(),
                        _ => None,
                    }
                    .filter(|o| *o >= 0 && part >= 0 && !topic.is_empty())
                    .ok_or_else(bad)?;
                    out.push((topic.to_string(), part, off));
                }
                StartupPosition::SpecificOffsets(out)
            }
            "date" => {
                let s = self.str(m, "date", ctx)?;
                StartupPosition::Date(parse_startup_date(s).ok_or_else(|| {
                    self.err("date", format!("startupPosition.date: expected \"yyyy-MM-dd HH:mm:ss.SSS Z\" (e.g. \"2020-02-01 04:15:00.000 -0700\"), found {s:?}"))
                })?)
            }
            other => {
                return Err(self.err(
                    "type",
                    format!("startupPosition.type: expected group-offsets, earliest, latest, specific-offsets or date, found {other:?}"),
                ))
            }
        })
    }

    /// What ingress and egress specs share: only `keys` (less `id` in the legacy forms, whose
    /// id is `meta_id`), the id, the properties and the bootstrap address.
    fn kafka_common(
        &self,
        spec: &Mapping,
        form: Form,
        meta_id: Option<&str>,
        kind: &str,
        keys: &[&str],
    ) -> Result<Common, ModuleError> {
        let ctx = "spec";
        let known: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| form == Form::V1 || *k != "id")
            .collect();
        self.deny_unknown(&format!("{kind} spec"), spec, &known)?;
        let id = match meta_id {
            Some(id) => id.to_string(),
            None => self.str(spec, "id", ctx)?.to_string(),
        };
        let id = self.type_name(&id, "id", ctx)?;
        let properties = self.properties(spec, ctx)?;
        let address = self.bootstrap(spec, &properties, ctx, kind)?;
        Ok((id, properties, address))
    }

    /// A Kafka ingress spec. `meta_id` is the id of the legacy forms (`meta.id`).
    pub(super) fn kafka_ingress(
        &self,
        spec: &Mapping,
        form: Form,
        meta_id: Option<&str>,
        kind: &str,
    ) -> Result<KafkaIngress, ModuleError> {
        let ctx = "spec";
        let (id, properties, address) =
            self.kafka_common(spec, form, meta_id, kind, INGRESS_KEYS)?;
        let group_id = match spec.get("consumerGroupId") {
            Some(_) => self.str(spec, "consumerGroupId", ctx)?.to_string(),
            None => properties
                .iter()
                .rev()
                .find(|(k, _)| k == "group.id")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| format!("statemesh-{id}")),
        };
        let topics_v = spec
            .get("topics")
            .ok_or_else(|| self.err("spec", format!("{kind}: missing required key \"topics\"")))?;
        let value_key = if form == Form::Legacy2 {
            "typeUrl"
        } else {
            "valueType"
        };
        let mut topics = Vec::new();
        for t in self.list(topics_v, "topics", ctx)? {
            let tm = self.map(t, "topics")?;
            self.deny_unknown("topics[]", tm, &["topic", value_key, "targets"])?;
            let topic = self.str(tm, "topic", "topics[]")?.to_string();
            let value_type = self.str(tm, value_key, "topics[]")?.to_string();
            if value_type.is_empty() {
                return Err(self.err(
                    value_key,
                    format!("topics[].{value_key}: must not be empty"),
                ));
            }
            let tv = tm.get("targets").ok_or_else(|| {
                self.err(
                    "topic",
                    format!("topics[] ({topic}): missing required key \"targets\""),
                )
            })?;
            let mut targets = Vec::new();
            for target in self.list(tv, "targets", "topics[]")? {
                let s = self.scalar(target, "targets", "topics[]")?;
                targets.push(self.type_name(&s, "targets", "topics[]")?);
            }
            if targets.is_empty() {
                return Err(self.err(
                    "targets",
                    format!("topics[] ({topic}): targets must name at least one function type"),
                ));
            }
            if topics.iter().any(|x: &KafkaTopic| x.topic == topic) {
                return Err(self.err(
                    "topic",
                    format!("topics[]: topic {topic:?} is listed twice"),
                ));
            }
            topics.push(KafkaTopic {
                topic,
                value_type,
                targets,
            });
        }
        if topics.is_empty() {
            return Err(self.err(
                "topics",
                format!("{kind}: topics must list at least one topic"),
            ));
        }
        let startup = match spec.get("startupPosition") {
            Some(v) => self.startup_position(v)?,
            None => StartupPosition::Latest,
        };
        let auto_offset_reset = match spec.get("autoOffsetResetPosition") {
            None => AutoOffsetReset::Latest,
            Some(_) => match self
                .str(spec, "autoOffsetResetPosition", ctx)?
                .to_ascii_lowercase()
                .as_str()
            {
                "earliest" => AutoOffsetReset::Earliest,
                "latest" => AutoOffsetReset::Latest,
                other => {
                    return Err(self.err(
                        "autoOffsetResetPosition",
                        format!(
                            "autoOffsetResetPosition: expected earliest or latest, found {other:?}"
                        ),
                    ))
                }
            },
        };
        Ok(KafkaIngress {
            id,
            address,
            group_id,
            topics,
            startup,
            auto_offset_reset,
            properties,
            protocol: if form == Form::Legacy2 {
                WireProtocol::V2
            } else {
                WireProtocol::V3
            },
        })
    }

    /// A Kafka egress spec.
    pub(super) fn kafka_egress(
        &self,
        spec: &Mapping,
        form: Form,
        meta_id: Option<&str>,
        kind: &str,
    ) -> Result<KafkaEgress, ModuleError> {
        let (id, properties, address) =
            self.kafka_common(spec, form, meta_id, kind, EGRESS_KEYS)?;
        let semantic = match spec.get("deliverySemantic") {
            None => DeliverySemantic::AtLeastOnce,
            Some(v) => {
                let dctx = "deliverySemantic";
                let m = self.map(v, dctx)?;
                let typ = self.str(m, "type", dctx)?;
                let known: &[&str] = if typ == "exactly-once" {
                    &["type", "transactionTimeout", "transactionTimeoutMillis"]
                } else {
                    &["type"]
                };
                self.deny_unknown(dctx, m, known)?;
                match typ {
                    "at-least-once" => DeliverySemantic::AtLeastOnce,
                    "none" => DeliverySemantic::None,
                    "exactly-once" => {
                        // Upstream prefers the deprecated millisecond form when both are given.
                        let t = match self.int(m, "transactionTimeoutMillis", dctx)? {
                            Some(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
                            Some(ms) => {
                                return Err(self.err("transactionTimeoutMillis", format!("deliverySemantic.transactionTimeoutMillis: expected a positive number, found {ms}")))
                            }
                            None => self.duration(m, "transactionTimeout", dctx)?,
                        };
                        let transaction_timeout = t.ok_or_else(|| {
                            self.err("deliverySemantic", "deliverySemantic: exactly-once needs \"transactionTimeout\" (e.g. \"15min\")".into())
                        })?;
                        DeliverySemantic::ExactlyOnce { transaction_timeout }
                    }
                    other => {
                        return Err(self.err(
                            "type",
                            format!("deliverySemantic.type: expected at-least-once, exactly-once or none, found {other:?}"),
                        ))
                    }
                }
            }
        };
        Ok(KafkaEgress {
            id,
            address,
            semantic,
            properties,
        })
    }
}

/// Parses StateFun's startup date, `yyyy-MM-dd HH:mm:ss.SSS Z` (`Z`: `+hhmm` / `-hhmm`), to
/// ms since the Unix epoch.
pub fn parse_startup_date(s: &str) -> Option<i64> {
    let mut parts = s.split_whitespace();
    let (date, time, zone) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let num = |t: &str, len: usize| -> Option<i64> {
        (t.len() == len && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
    };
    let mut d = date.split('-');
    let (y, mo, da) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let (hms, frac) = time.split_once('.')?;
    let mut t = hms.split(':');
    let (h, mi, se) = (num(t.next()?, 2)?, num(t.next()?, 2)?, num(t.next()?, 2)?);
    if t.next().is_some() || h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let ms = num(frac, 3)?;
    let (sign, z) = match zone.as_bytes().first()? {
        b'+' => (1, &zone[1..]),
        b'-' => (-1, &zone[1..]),
        _ => return None,
    };
    let zone_min = num(z.get(..2)?, 2)? * 60 + num(z.get(2..)?, 2)?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let local_ms = ((days * 24 + h) * 60 + mi) * 60_000 + se * 1000 + ms;
    Some(local_ms - sign * zone_min * 60_000)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Module;
    use super::*;

    fn parse(s: &str) -> Result<Module, ModuleError> {
        Module::parse(s, Path::new("module.yaml"))
    }

    #[test]
    fn startup_dates() {
        assert_eq!(parse_startup_date("1970-01-01 00:00:00.000 +0000"), Some(0));
        // 2020-02-01 11:15:00 UTC = 1580555700 s.
        assert_eq!(
            parse_startup_date("2020-02-01 04:15:00.000 -0700"),
            Some(1_580_555_700_000)
        );
        assert_eq!(
            parse_startup_date("2020-02-01 12:15:00.250 +0100"),
            Some(1_580_555_700_250)
        );
        for bad in [
            "2020-02-01",
            "2020-13-01 00:00:00.000 +0000",
            "2020-02-01 04:15:00 -0700",
            "2020-02-01 04:15:00.000 UTC",
            "2020-02-01 04:15:00.000 +€00",
        ] {
            assert_eq!(parse_startup_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn v1_ingress_and_egress() {
        let m = parse(
            "kind: io.statefun.kafka.v1/ingress
spec:
  id: com.example/users
  address: kafka-broker:9092
  consumerGroupId: my-consumer-group
  startupPosition:
    type: specific-offsets
    offsets:
      - user-topic/0: 91
      - user-topic/1: 11
  autoOffsetResetPosition: earliest
  topics:
    - topic: user-topic
      valueType: com.example/User
      targets:
        - com.example/greeter
        - com.example/counter
  properties:
    - max.poll.records: 500
---
kind: io.statefun.kafka.v1/egress
spec:
  id: com.example/my-egress
  address: kafka-broker:9092
  deliverySemantic:
    type: exactly-once
    transactionTimeout: 15min
",
        )
        .unwrap();
        assert_eq!(
            m.kafka_ingresses,
            vec![KafkaIngress {
                id: "com.example/users".into(),
                address: "kafka-broker:9092".into(),
                group_id: "my-consumer-group".into(),
                topics: vec![KafkaTopic {
                    topic: "user-topic".into(),
                    value_type: "com.example/User".into(),
                    targets: vec!["com.example/greeter".into(), "com.example/counter".into()],
                }],
                startup: StartupPosition::SpecificOffsets(vec![
                    ("user-topic".into(), 0, 91),
                    ("user-topic".into(), 1, 11)
                ]),
                auto_offset_reset: AutoOffsetReset::Earliest,
                properties: vec![("max.poll.records".into(), "500".into())],
                protocol: WireProtocol::V3,
            }]
        );
        assert_eq!(
            m.kafka_egresses,
            vec![KafkaEgress {
                id: "com.example/my-egress".into(),
                address: "kafka-broker:9092".into(),
                semantic: DeliverySemantic::ExactlyOnce {
                    transaction_timeout: Duration::from_secs(900)
                },
                properties: vec![],
            }]
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    }

    #[test]
    fn defaults_follow_statefuns_code() {
        let m = parse("kind: io.statefun.kafka.v1/ingress\nspec:\n  id: a/b\n  address: k:9092\n  topics:\n    - topic: t\n      valueType: io.statefun.types/string\n      targets: [a/f]\n---\nkind: io.statefun.kafka.v1/egress\nspec:\n  id: a/out\n  properties:\n    - bootstrap.servers: k:9093\n").unwrap();
        let i = &m.kafka_ingresses[0];
        assert_eq!(
            (&i.startup, i.auto_offset_reset, i.group_id.as_str()),
            (
                &StartupPosition::Latest,
                AutoOffsetReset::Latest,
                "statemesh-a/b"
            )
        );
        let e = &m.kafka_egresses[0];
        assert_eq!(
            (e.semantic, e.address.as_str()),
            (DeliverySemantic::AtLeastOnce, "k:9093")
        );
    }

    #[test]
    fn legacy_3_0_module() {
        let text = "version: \"3.0\"
module:
  meta:
    type: remote
  spec:
    endpoints:
      - endpoint:
          meta:
            kind: http
          spec:
            functions: example/*
            urlPathTemplate: http://functions:8000/statefun
            maxNumBatchRequests: 50
            timeouts:
              call: 2 min
    ingresses:
      - ingress:
          meta:
            type: io.statefun.kafka/ingress
            id: example/names
          spec:
            address: kafka:9092
            consumerGroupId: my-group-id
            startupPosition:
              type: date
              date: 2020-02-01 04:15:00.000 -0700
            topics:
              - topic: names
                valueType: io.statefun.types/string
                targets:
                  - example/greeter
    egresses:
      - egress:
          meta:
            type: io.statefun.kafka/egress
            id: example/greets
          spec:
            address: kafka:9092
            deliverySemantic:
              type: at-least-once
";
        let m = parse(text).unwrap();
        let i = &m.kafka_ingresses[0];
        assert_eq!(
            (i.id.as_str(), i.group_id.as_str(), i.protocol),
            ("example/names", "my-group-id", WireProtocol::V3)
        );
        assert_eq!(i.startup, StartupPosition::Date(1_580_555_700_000));
        assert_eq!(m.kafka_egresses[0].id, "example/greets");
        let e = m.endpoint_for("example/greeter").unwrap();
        assert_eq!(
            (
                e.url_for("greeter").as_str(),
                e.max_batch,
                e.call_timeout,
                e.protocol
            ),
            (
                "http://functions:8000/statefun",
                50,
                Duration::from_secs(120),
                WireProtocol::V3
            )
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        // The pattern's fraction has three digits (upstream's parser refuses two as well).
        let e = parse(&text.replace(":00.000 -0700", ":00.00 -0700"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("module.yaml:26:") && e.contains("startupPosition.date"),
            "{e}"
        );
        let e = parse(&text.replace("io.statefun.kafka/egress", "io.statefun.kafka/egres"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("module.yaml:") && e.contains("io.statefun.kafka/egres"),
            "{e}"
        );
    }

    #[test]
    fn legacy_2_0_talk_form() {
        let m = parse(
            "version: \"2.0\"
module:
  meta:
    type: remote
  spec:
    functions:
      - function:
          meta:
            kind: http
            type: demo/model
          spec:
            endpoint: http://model:8000/statefun
            states: [arms]
    ingresses:
      - ingress:
          meta:
            type: statefun.kafka.io/routable-protobuf-ingress
            id: demo/features
          spec:
            address: kafka-broker:9092
            consumerGroupId: demo
            startupPosition:
              type: earliest
            topics:
              - topic: features
                typeUrl: com.googleapis/demo.FeatureVector
                targets:
                  - demo/model
    egresses:
      - egress:
          meta:
            type: statefun.kafka.io/generic-egress
            id: demo/kafka
          spec:
            address: kafka-broker:9092
            deliverySemantic:
              type: exactly-once
              transactionTimeoutMillis: 100000
",
        )
        .unwrap();
        let i = &m.kafka_ingresses[0];
        assert_eq!(
            (i.id.as_str(), i.protocol, &i.startup),
            (
                "demo/features",
                WireProtocol::V2,
                &StartupPosition::Earliest
            )
        );
        assert_eq!(i.topics[0].value_type, "com.googleapis/demo.FeatureVector");
        assert_eq!(
            m.kafka_egresses[0].semantic,
            DeliverySemantic::ExactlyOnce {
                transaction_timeout: Duration::from_secs(100)
            }
        );
        assert_eq!(
            m.endpoint_for("demo/model").unwrap().protocol,
            WireProtocol::V2
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let base = "kind: io.statefun.kafka.v1/ingress\nspec:\n  id: a/b\n  address: k:9092\n";
        let topics = "  topics:\n    - topic: t\n      valueType: x/y\n      targets: [a/f]\n";
        for (extra, line, needle) in [
            (
                "  startupPositon:\n    type: earliest\n",
                9,
                "unknown key \"startupPositon\"",
            ),
            (
                "  startupPosition:\n    type: beginning\n",
                10,
                "expected group-offsets, earliest",
            ),
            (
                "  startupPosition:\n    type: specific-offsets\n    offsets:\n      - t-0: 5\n",
                11,
                "\"topic/partition\"",
            ),
            (
                "  autoOffsetResetPosition: middle\n",
                9,
                "expected earliest or latest",
            ),
            ("  properties: 3\n", 9, "single-key maps"),
        ] {
            let e = parse(&format!("{base}{topics}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("module.yaml:{line}:")) && e.contains(needle),
                "{extra}: {e}"
            );
        }
        let e = parse(&format!(
            "{base}  topics:\n    - topic: t\n      valueType: x/y\n      target: [a/f]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("module.yaml:8:") && e.contains("unknown key \"target\""),
            "{e}"
        );
        let e = parse(&format!(
            "{base}  topics:\n    - topic: t\n      valueType: x/y\n      targets: [greeter]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("module.yaml:8:") && e.contains("namespace/name"),
            "{e}"
        );
        let e = parse("kind: io.statefun.kafka.v1/ingress\nspec:\n  id: a/b\n  topics: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing required key \"address\""), "{e}");
        let e = parse("kind: io.statefun.kafka.v1/egress\nspec:\n  id: a/b\n  address: k\n  deliverySemantic:\n    type: exactly-once\n").unwrap_err().to_string();
        assert!(
            e.starts_with("module.yaml:5:") && e.contains("transactionTimeout"),
            "{e}"
        );
        let e = parse("kind: io.statefun.kafka.v1/egress\nspec:\n  id: a/b\n  address: k\n  deliverySemantic:\n    type: twice\n").unwrap_err().to_string();
        assert!(
            e.starts_with("module.yaml:6:") && e.contains("at-least-once, exactly-once or none"),
            "{e}"
        );
    }
}
