//! Administrative edits of function state (`statemesh state set|delete`, the console).
//!
//! An edit travels as a message of the reserved typename [`SET_STATE`] to the address whose
//! state it changes: routed, forwarded, queued, checkpointed and deduplicated like any
//! message, and applied by the owning shard between two invocations of the address (never
//! while a batch holds its state), as a change of the shard's current epoch. Its reply (the
//! address's states after the edit) is held until that epoch commits, like any reply: an
//! acknowledged edit is durable and applied exactly once. Only the node's admin API builds
//! such messages; the public ingress refuses the reserved typenames, and one sent by a
//! function (or arriving from Kafka) is dead-lettered, not applied.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use statemesh_sdk::TypedValue;

/// Typename of an edit of a state value.
pub const SET_STATE: &str = "statemesh/admin.SetState";
/// Typename of the reply to an edit: the address's states after it (JSON, [`StatesReply`]).
pub const STATES: &str = "statemesh/admin.States";
/// Prefix of the typenames reserved to the node's admin API.
pub const RESERVED_PREFIX: &str = "statemesh/admin.";

/// Refuses a message of a reserved typename at the public ingress.
pub fn check_not_reserved(typename: &str) -> Result<(), crate::error::ServiceError> {
    if typename.starts_with(RESERVED_PREFIX) {
        return Err(crate::error::ServiceError::InvalidArgument(format!(
            "typename {typename:?} is reserved to the node's admin API (statemesh state set|delete)"
        )));
    }
    Ok(())
}

/// The new value of an edited state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum NewValue {
    /// Deleted (absent).
    Delete,
    /// Text converted with the state's declared typename (`42` for a long, raw bytes for a
    /// typename that is not built in).
    Text(String),
    /// Encoded bytes of the given typename, which must be the state's declared one.
    Typed {
        typename: String,
        value_base64: String,
    },
}

/// An edit of one state of an address.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StateEdit {
    pub name: String,
    pub value: NewValue,
}

impl StateEdit {
    pub fn to_message(&self) -> TypedValue {
        TypedValue::new(SET_STATE, serde_json::to_vec(self).expect("serializable"))
    }

    pub fn from_message(m: &TypedValue) -> Result<StateEdit, String> {
        serde_json::from_slice(m.value()).map_err(|e| format!("malformed state edit: {e}"))
    }
}

/// One state value in a reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StateEntry {
    pub name: String,
    pub typename: String,
    pub value_base64: String,
    pub expires_at_ms: u64,
}

/// Encodes an address's states as the reply to an edit.
pub fn states_reply(states: &[(String, TypedValue, u64)]) -> TypedValue {
    let b64 = base64::engine::general_purpose::STANDARD;
    let entries: Vec<StateEntry> = states
        .iter()
        .map(|(name, v, exp)| StateEntry {
            name: name.clone(),
            typename: v.typename().to_string(),
            value_base64: b64.encode(v.value()),
            expires_at_ms: *exp,
        })
        .collect();
    TypedValue::new(STATES, serde_json::to_vec(&entries).expect("serializable"))
}

/// Decodes the reply to an edit.
pub fn parse_states_reply(
    v: &TypedValue,
) -> Result<Vec<(String, TypedValue, u64)>, crate::error::ServiceError> {
    let bad =
        |why: String| crate::error::ServiceError::Internal(format!("state edit reply: {why}"));
    if v.typename() != STATES {
        return Err(bad(format!("unexpected typename {:?}", v.typename())));
    }
    let entries: Vec<StateEntry> =
        serde_json::from_slice(v.value()).map_err(|e| bad(e.to_string()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    entries
        .into_iter()
        .map(|e| {
            let value = b64
                .decode(&e.value_base64)
                .map_err(|e| bad(e.to_string()))?;
            Ok((e.name, TypedValue::new(e.typename, value), e.expires_at_ms))
        })
        .collect()
}

/// A dead letter as the admin API shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DeadLetter {
    /// The record's id (empty when checkpoints are off: such letters cannot be replayed).
    pub id: String,
    /// Where it was going, if to a function.
    pub address: Option<String>,
    /// The Kafka egress it was going to, if it was an egress record.
    pub egress: Option<String>,
    pub typename: String,
    #[serde(skip)]
    pub value: Vec<u8>,
    pub error: String,
    pub attempts: u32,
    /// The whole record as stored.
    pub record: serde_json::Value,
}

impl DeadLetter {
    /// Reads a record of `statemesh/dead-letters`.
    pub(crate) fn parse(r: &crate::egress::Read) -> DeadLetter {
        let record: serde_json::Value = serde_json::from_slice(r.value.value()).unwrap_or_else(
            |e| serde_json::json!({ "error": format!("unreadable dead letter: {e}") }),
        );
        let text = |k: &str| record[k].as_str().map(str::to_string);
        let value = text("value_base64")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default();
        DeadLetter {
            id: r.id.clone().unwrap_or_default(),
            address: text("address"),
            egress: text("egress"),
            typename: text("typename").unwrap_or_default(),
            value,
            error: text("error").unwrap_or_default(),
            attempts: record["attempts"].as_u64().unwrap_or(0) as u32,
            record,
        }
    }
}

/// This node's statistics of every function type it invoked (the admin API's
/// `GetFunctionStats`, and `/v1/functions`).
pub fn function_stats(
    registry: &crate::registry::Registry,
) -> Vec<statemesh_proto::v1::FunctionStats> {
    use crate::registry::FunctionKind;
    registry
        .entries()
        .into_iter()
        .map(|(name, e)| {
            let (kind, url) = match &e.kind {
                FunctionKind::Embedded(_) => ("embedded", String::new()),
                FunctionKind::Remote(r) => ("remote", r.url().to_string()),
            };
            statemesh_proto::v1::FunctionStats {
                r#type: name,
                kind: kind.into(),
                url,
                dead_letters: e.dead_letters.load(std::sync::atomic::Ordering::Relaxed),
                ..histogram_stats(&e.latency)
            }
        })
        .collect()
}

/// A latency histogram as the admin API sends it: count, sum, bounds and cumulative counts.
pub fn histogram_stats(h: &prometheus::Histogram) -> statemesh_proto::v1::FunctionStats {
    use prometheus::core::Metric as _;
    let m = h.metric();
    let h = m.get_histogram();
    statemesh_proto::v1::FunctionStats {
        invocations: h.get_sample_count(),
        sum_seconds: h.get_sample_sum(),
        bucket_bounds: h.get_bucket().iter().map(|b| b.upper_bound()).collect(),
        bucket_cumulative: h
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect(),
        ..Default::default()
    }
}

/// Adds `other` (the same type on another node) to `into`: counts, sums and buckets (the
/// nodes' histograms have the same bounds; when they differ, as between versions, the buckets
/// are dropped and the merged type has no quantiles rather than wrong ones).
pub fn merge_function_stats(
    into: &mut statemesh_proto::v1::FunctionStats,
    other: &statemesh_proto::v1::FunctionStats,
) {
    if into.bucket_bounds == other.bucket_bounds
        && into.bucket_cumulative.len() == other.bucket_cumulative.len()
    {
        for (a, b) in into
            .bucket_cumulative
            .iter_mut()
            .zip(&other.bucket_cumulative)
        {
            *a += b;
        }
    } else if into.invocations == 0 {
        into.bucket_bounds = other.bucket_bounds.clone();
        into.bucket_cumulative = other.bucket_cumulative.clone();
    } else if other.invocations > 0 {
        // Histograms that cannot be added: no quantiles rather than wrong ones.
        into.bucket_bounds.clear();
        into.bucket_cumulative.clear();
    }
    into.invocations += other.invocations;
    into.sum_seconds += other.sum_seconds;
    into.dead_letters += other.dead_letters;
    if into.kind.is_empty() {
        into.kind = other.kind.clone();
        into.url = other.url.clone();
    }
}

/// The `q` quantile (0..=1) of a histogram's observations, interpolated within its bucket;
/// `None` without observations. Beyond the last bound: that bound.
pub fn quantile(count: u64, bounds: &[f64], cumulative: &[u64], q: f64) -> Option<f64> {
    if count == 0 || bounds.is_empty() {
        return None;
    }
    let rank = q * count as f64;
    let (mut below, mut lower) = (0u64, 0.0f64);
    for (&upper, &c) in bounds.iter().zip(cumulative) {
        if c as f64 >= rank {
            let inside = (c - below).max(1) as f64;
            return Some(
                lower + (upper - lower) * ((rank - below as f64) / inside).clamp(0.0, 1.0),
            );
        }
        below = c;
        lower = upper;
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_and_replies_round_trip() {
        for value in [
            NewValue::Delete,
            NewValue::Text("42".into()),
            NewValue::Typed {
                typename: "a/b".into(),
                value_base64: "AAE=".into(),
            },
        ] {
            let e = StateEdit {
                name: "n".into(),
                value,
            };
            assert_eq!(StateEdit::from_message(&e.to_message()).unwrap(), e);
        }
        let states = vec![("count".to_string(), TypedValue::of(&5i64), 7)];
        assert_eq!(parse_states_reply(&states_reply(&states)).unwrap(), states);
        assert!(
            StateEdit::from_message(&TypedValue::new(SET_STATE, b"{".to_vec()))
                .unwrap_err()
                .contains("malformed state edit")
        );
        assert!(check_not_reserved(SET_STATE).is_err());
        assert!(check_not_reserved("statemesh/DeadLetter").is_ok());
    }
}
