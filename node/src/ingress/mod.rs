//! Ingress: gRPC (`statemesh.v1.Ingress`/`Admin`) and HTTP (`/v1/...`, admin endpoints).
//!
//! Both validate input the same way and map errors through [`crate::error::ServiceError`].
//! This module holds the conversions shared by HTTP ingress and the CLI: the plain-text form
//! of StateFun's built-in types, and content types (`application/vnd.<typename>`).

pub(crate) mod grpc;
pub(crate) mod http;

use base64::Engine;
use bytes::Bytes;
use statemesh_sdk::{typenames, TypeName, TypedValue};

use crate::error::ServiceError;

/// The typename named by an HTTP `Content-Type`: `application/vnd.<typename>`, or
/// `text/plain` for `io.statefun.types/string`.
pub fn typename_from_content_type(ct: Option<&str>) -> Result<String, ServiceError> {
    let expected = "expected Content-Type application/vnd.<namespace>/<name> (e.g. application/vnd.io.statefun.types/long) or text/plain";
    let Some(ct) = ct else {
        return Err(ServiceError::InvalidArgument(format!(
            "missing Content-Type: {expected}"
        )));
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("text/plain") {
        return Ok(typenames::STRING.to_string());
    }
    match essence.strip_prefix("application/vnd.") {
        Some(tn) => {
            TypeName::parse_as(tn, "typename")
                .map_err(|e| ServiceError::InvalidArgument(format!("Content-Type {ct:?}: {e}")))?;
            Ok(tn.to_string())
        }
        None => Err(ServiceError::InvalidArgument(format!(
            "unsupported Content-Type {ct:?}: {expected}"
        ))),
    }
}

fn parse_text<T: std::str::FromStr>(
    typename: &str,
    body: &[u8],
    what: &str,
) -> Result<T, ServiceError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| {
            ServiceError::InvalidArgument(format!(
                "{typename}: expected {what} as UTF-8 text, found non-UTF-8 bytes"
            ))
        })?
        .trim();
    text.parse::<T>().map_err(|_| {
        ServiceError::InvalidArgument(format!("{typename}: expected {what}, found {text:?}"))
    })
}

/// Builds a message from a typename and its plain-text (built-in types) or raw form.
pub fn value_from_text(typename: &str, body: Bytes) -> Result<TypedValue, ServiceError> {
    Ok(match typename {
        typenames::LONG => TypedValue::of(&parse_text::<i64>(typename, &body, "a 64-bit integer")?),
        typenames::INT => TypedValue::of(&parse_text::<i32>(typename, &body, "a 32-bit integer")?),
        typenames::DOUBLE => TypedValue::of(&parse_text::<f64>(typename, &body, "a number")?),
        typenames::FLOAT => TypedValue::of(&parse_text::<f32>(typename, &body, "a number")?),
        typenames::BOOL => {
            let s: String = parse_text(typename, &body, "true or false")?;
            match s.to_ascii_lowercase().as_str() {
                "true" => TypedValue::of(&true),
                "false" => TypedValue::of(&false),
                _ => {
                    return Err(ServiceError::InvalidArgument(format!(
                        "{typename}: expected true or false, found {s:?}"
                    )))
                }
            }
        }
        typenames::STRING => {
            let s = std::str::from_utf8(&body).map_err(|_| {
                ServiceError::InvalidArgument(format!(
                    "{typename}: expected UTF-8 text, found non-UTF-8 bytes"
                ))
            })?;
            TypedValue::of(&s.to_string())
        }
        _ => TypedValue::new(typename.to_string(), body),
    })
}

/// The plain-text form of built-in values, or the raw bytes of others.
pub fn value_to_text(v: &TypedValue) -> Bytes {
    let text = match v.typename() {
        typenames::LONG => v.get::<i64>().map(|x| x.to_string()),
        typenames::INT => v.get::<i32>().map(|x| x.to_string()),
        typenames::DOUBLE => v.get::<f64>().map(|x| x.to_string()),
        typenames::FLOAT => v.get::<f32>().map(|x| x.to_string()),
        typenames::BOOL => v.get::<bool>().map(|x| x.to_string()),
        typenames::STRING => v.get::<String>(),
        _ => return v.value().clone(),
    };
    match text {
        Ok(t) => Bytes::from(t),
        Err(_) => v.value().clone(),
    }
}

/// A JSON view of a value: built-in types decoded, others base64.
pub fn value_to_json(v: &TypedValue) -> serde_json::Value {
    use serde_json::json;
    let decoded = match v.typename() {
        typenames::LONG => v.get::<i64>().ok().map(|x| json!(x)),
        typenames::INT => v.get::<i32>().ok().map(|x| json!(x)),
        typenames::DOUBLE => v.get::<f64>().ok().map(|x| json!(x)),
        typenames::FLOAT => v.get::<f32>().ok().map(|x| json!(x)),
        typenames::BOOL => v.get::<bool>().ok().map(|x| json!(x)),
        typenames::STRING => v.get::<String>().ok().map(|x| json!(x)),
        _ => None,
    };
    match decoded {
        Some(value) => json!({ "typename": v.typename(), "value": value }),
        None => json!({
            "typename": v.typename(),
            "value": base64::engine::general_purpose::STANDARD.encode(v.value()),
            "encoding": "base64",
        }),
    }
}

/// The JSON view of an address's states (`GET /v1/state/...` and `statemesh state get`):
/// `{"address", "states": {name: {typename, value[, encoding][, expires_at_ms]}}}`.
pub fn states_to_json(
    address: &statemesh_sdk::Address,
    values: Vec<(String, TypedValue, u64)>,
) -> serde_json::Value {
    let mut states = serde_json::Map::new();
    for (name, v, exp) in values {
        let mut j = value_to_json(&v);
        if exp != 0 {
            j["expires_at_ms"] = serde_json::json!(exp);
        }
        states.insert(name, j);
    }
    serde_json::json!({ "address": address.to_string(), "states": states })
}

/// Runs `f` inside `span` if there is one (a traced request's `ingress` span, which ends when
/// `f` does).
pub(crate) async fn traced<F: std::future::Future>(f: F, span: Option<tracing::Span>) -> F::Output {
    match span {
        Some(s) => tracing::Instrument::instrument(f, s).await,
        None => f.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(
            typename_from_content_type(Some("text/plain; charset=utf-8")).unwrap(),
            typenames::STRING
        );
        assert_eq!(
            typename_from_content_type(Some("application/vnd.io.statefun.types/long")).unwrap(),
            typenames::LONG
        );
        assert_eq!(
            typename_from_content_type(Some("application/vnd.example/Cart")).unwrap(),
            "example/Cart"
        );
        for bad in [
            None,
            Some("application/json"),
            Some("application/vnd.nope"),
            Some("application/vnd.a/"),
        ] {
            let e = typename_from_content_type(bad).unwrap_err().to_string();
            assert!(e.contains("expected"), "{e}");
        }
    }

    #[test]
    fn text_values() {
        assert_eq!(
            value_from_text(typenames::LONG, Bytes::from("5\n"))
                .unwrap()
                .get::<i64>()
                .unwrap(),
            5
        );
        assert!(value_from_text(typenames::BOOL, Bytes::from("TRUE"))
            .unwrap()
            .get::<bool>()
            .unwrap());
        let e = value_from_text(typenames::LONG, Bytes::from("five"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected a 64-bit integer, found \"five\""),
            "{e}"
        );
        let v = value_from_text("example/X", Bytes::from_static(b"\x00raw")).unwrap();
        assert_eq!(&value_to_text(&v)[..], b"\x00raw");
        assert_eq!(&value_to_text(&TypedValue::of(&42i64))[..], b"42");
        assert_eq!(
            value_to_json(&TypedValue::of(&"hi".to_string()))["value"],
            "hi"
        );
        assert_eq!(value_to_json(&v)["encoding"], "base64");
    }
}
