//! Signed remote-function requests. A node with `[auth] function_signing_key` adds
//!
//! ```text
//! statemesh-signature: t=<unix time in ms>,v1=<hex HMAC-SHA256(key, "<t>." ‖ body)>
//! ```
//!
//! to every request it sends to a remote function; a function server verifies it
//! ([`verify`]; the SDK's `FunctionServer::verify_signatures` does) and refuses a request
//! whose signature is missing, wrong, or older than its window (a replayed request).

use std::time::Duration;

/// The header carrying the signature.
pub const HEADER: &str = "statemesh-signature";

fn key(secret: &[u8]) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)
}

fn message(t: u64, body: &[u8]) -> Vec<u8> {
    let mut m = format!("{t}.").into_bytes();
    m.extend_from_slice(body);
    m
}

/// The header value signing `body` at `now_ms`.
pub fn sign(secret: &[u8], now_ms: u64, body: &[u8]) -> String {
    let tag = ring::hmac::sign(&key(secret), &message(now_ms, body));
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={now_ms},v1={hex}")
}

/// Checks a request's signature header: signed with `secret`, over this `body`, at most
/// `window` away from `now_ms`. The error says what was wrong.
pub fn verify(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now_ms: u64,
    window: Duration,
) -> Result<(), String> {
    let h = header.ok_or_else(|| format!("missing {HEADER} header"))?;
    let (mut t, mut v1) = (None, None);
    for part in h.split(',') {
        match part.trim().split_once('=') {
            Some(("t", x)) => t = x.parse::<u64>().ok(),
            Some(("v1", x)) => v1 = Some(x),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err(format!(
            "malformed {HEADER} header: expected t=<ms>,v1=<hex>"
        ));
    };
    if now_ms.abs_diff(t) > window.as_millis() as u64 {
        return Err(format!(
            "{HEADER}: signed at {t}, more than {} ms from now ({now_ms})",
            window.as_millis()
        ));
    }
    let tag: Option<Vec<u8>> = (v1.len() == 64)
        .then(|| {
            (0..64)
                .step_by(2)
                .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).ok())
                .collect()
        })
        .flatten();
    let tag = tag.ok_or_else(|| format!("malformed {HEADER} header: v1 is not 64 hex digits"))?;
    ring::hmac::verify(&key(secret), &message(t, body), &tag)
        .map_err(|_| format!("{HEADER}: wrong signature"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let key = b"a-signing-key-of-32-bytes-or-more!!";
        let h = sign(key, 1_000_000, b"body");
        let w = Duration::from_secs(300);
        assert_eq!(verify(key, Some(&h), b"body", 1_000_000, w), Ok(()));
        assert_eq!(verify(key, Some(&h), b"body", 1_100_000, w), Ok(()));
        assert!(verify(key, Some(&h), b"bodz", 1_000_000, w)
            .unwrap_err()
            .contains("wrong signature"));
        assert!(verify(
            b"another-key-of-32-bytes-or-more!!!",
            Some(&h),
            b"body",
            1_000_000,
            w
        )
        .unwrap_err()
        .contains("wrong signature"));
        assert!(verify(key, Some(&h), b"body", 1_400_001, w)
            .unwrap_err()
            .contains("more than"));
        assert!(verify(key, None, b"body", 1_000_000, w)
            .unwrap_err()
            .contains("missing"));
        assert!(verify(key, Some("t=1,v1=zz"), b"body", 1, w)
            .unwrap_err()
            .contains("64 hex"));
        assert!(verify(key, Some("v1=00"), b"body", 1, w)
            .unwrap_err()
            .contains("malformed"));
        // Another timestamp with the same tag does not verify.
        let forged = h.replacen("t=1000000", "t=1000001", 1);
        assert!(verify(key, Some(&forged), b"body", 1_000_000, w).is_err());
    }
}
