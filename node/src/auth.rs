//! Access control (`[auth]`): bearer tokens.
//!
//! - **Ingress tokens** (`tokens`, `tokens_file`) are scoped: each names what it may address —
//!   `ns/*` (the function types and egress topics of namespace `ns`), `ns/type` (one function
//!   type), or `*`. They admit gRPC `Ingress` (`Send`, `Call`, `SendStream`, `Subscribe`) and
//!   HTTP `/v1/send`, `/v1/call`, `/v1/egress` and the playground routes, for targets in scope.
//! - **The admin token** (`admin_token`) admits the admin API: gRPC `Admin`, every other HTTP
//!   route but `/healthz` and `/readyz`, and the console at `/ui` (which keeps it in a
//!   `SameSite=Strict`, `HttpOnly` cookie after its login form). It admits the ingress too.
//!
//! Credentials travel as `authorization: Bearer <token>` (gRPC metadata or HTTP header). No
//! or an unknown token: UNAUTHENTICATED / 401; a token not allowed there: PERMISSION_DENIED /
//! 403; both counted in `statemesh_auth_refused_total{surface, reason}`. The tokens file (a
//! TOML list of `[[tokens]]`) is read again whenever its content changes (checked every
//! second); one that does not parse keeps the tokens read before, logged.
//! Without `[auth]` everything is open, as before. Node-to-node traffic (the `Mesh` service)
//! is not token-based.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::config::{AuthConfig, TokenConfig};
use crate::metrics::Metrics;

/// The name of the console's cookie.
pub const COOKIE: &str = "statemesh_admin";

#[derive(Clone, Debug, PartialEq)]
enum Scope {
    All,
    Namespace(String),
    Type(String),
}

impl Scope {
    fn parse(s: &str) -> Result<Scope, String> {
        if s == "*" {
            return Ok(Scope::All);
        }
        match s.split_once('/') {
            Some((ns, "*")) if !ns.is_empty() && !ns.contains('*') => {
                Ok(Scope::Namespace(ns.into()))
            }
            Some((ns, t))
                if !ns.is_empty() && !t.is_empty() && !s.contains('*') && !t.contains('/') =>
            {
                Ok(Scope::Type(s.into()))
            }
            _ => Err(format!(
                "{s:?}: expected \"namespace/*\", \"namespace/type\" or \"*\""
            )),
        }
    }

    /// Whether it covers `target` (a function type `ns/type`, or an egress topic).
    fn covers(&self, target: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Namespace(ns) => {
                target == ns
                    || (target.len() > ns.len()
                        && target.starts_with(ns.as_str())
                        && target.as_bytes()[ns.len()] == b'/')
            }
            Scope::Type(t) => target == t,
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    token: String,
    scopes: Vec<Scope>,
}

/// Checks a configured token.
pub fn check_token(t: &TokenConfig) -> Result<(), String> {
    if t.token.len() < 16 {
        return Err("token: expected at least 16 characters".into());
    }
    if !t
        .token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
    {
        return Err("token: expected letters, digits and - . _ ~ + / =".into());
    }
    if t.namespaces.is_empty() {
        return Err("namespaces: expected at least one".into());
    }
    for n in &t.namespaces {
        Scope::parse(n).map_err(|e| format!("namespaces: {e}"))?;
    }
    Ok(())
}

fn tokens_of(list: &[TokenConfig]) -> Result<Vec<Token>, String> {
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            check_token(t).map_err(|e| format!("tokens[{i}]: {e}"))?;
            Ok(Token {
                token: t.token.clone(),
                scopes: t
                    .namespaces
                    .iter()
                    .map(|n| Scope::parse(n))
                    .collect::<Result<_, _>>()?,
            })
        })
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

fn read_file(path: &Path) -> Result<Vec<Token>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: TokensFile =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    tokens_of(&f.tokens).map_err(|e| format!("{}: {e}", path.display()))
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Denied {
    /// No token, or one this node does not know (401 / UNAUTHENTICATED).
    Unauthenticated(String),
    /// A token not allowed there (403 / PERMISSION_DENIED).
    Forbidden(String),
}

impl Denied {
    fn reason(&self) -> &'static str {
        match self {
            Denied::Unauthenticated(_) => "unauthenticated",
            Denied::Forbidden(_) => "forbidden",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Denied::Unauthenticated(m) | Denied::Forbidden(m) => m,
        }
    }
}

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Denied::Forbidden(m) => tonic::Status::permission_denied(m),
        }
    }
}

/// Constant-time equality (a token's bytes do not leak through timing).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `authorization: Bearer <token>` value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, token) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A node's access control. Cheap to share.
pub struct Auth {
    enabled: bool,
    fixed: Vec<Token>,
    from_file: RwLock<Vec<Token>>,
    file: Option<PathBuf>,
    admin: Option<String>,
    metrics: Metrics,
}

impl Auth {
    /// From `[auth]`; reads the tokens file (which must exist and parse at start).
    pub fn new(cfg: &AuthConfig, metrics: Metrics) -> Result<Arc<Auth>, String> {
        let from_file = match &cfg.tokens_file {
            Some(p) => read_file(p).map_err(|e| format!("auth.tokens_file: {e}"))?,
            None => Vec::new(),
        };
        Ok(Arc::new(Auth {
            enabled: cfg.enabled(),
            fixed: tokens_of(&cfg.tokens).map_err(|e| format!("auth.{e}"))?,
            from_file: RwLock::new(from_file),
            file: cfg.tokens_file.clone(),
            admin: cfg.admin_token.clone(),
            metrics,
        }))
    }

    /// Whether any access control is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The admin token, for this node's own admin requests to other members.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin.as_deref()
    }

    fn refuse(&self, surface: &str, d: Denied) -> Denied {
        self.metrics
            .auth_refused
            .with_label_values(&[surface, d.reason()])
            .inc();
        tracing::info!(
            surface,
            reason = d.reason(),
            "request refused: {}",
            d.message()
        );
        d
    }

    /// A refusal (403) decided by the caller, counted like the others.
    pub fn forbidden(&self, surface: &str, why: String) -> Denied {
        self.refuse(surface, Denied::Forbidden(why))
    }

    fn is_admin(&self, token: &str) -> bool {
        self.admin
            .as_deref()
            .is_some_and(|a| same(a.as_bytes(), token.as_bytes()))
    }

    /// Admits an ingress request for `targets` (function types `ns/type`, or egress topics)
    /// carrying `authorization`; `surface` names it in the metric.
    pub fn ingress<'a>(
        &self,
        surface: &str,
        authorization: Option<&str>,
        targets: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        let Some(token) = bearer(authorization) else {
            return Err(self.refuse(
                surface,
                Denied::Unauthenticated(
                    "missing credentials: send authorization: Bearer <token>".into(),
                ),
            ));
        };
        if self.is_admin(token) {
            return Ok(());
        }
        let file = self.from_file.read();
        let Some(t) = self
            .fixed
            .iter()
            .chain(file.iter())
            .find(|t| same(t.token.as_bytes(), token.as_bytes()))
        else {
            return Err(self.refuse(surface, Denied::Unauthenticated("unknown token".into())));
        };
        for target in targets {
            if !t.scopes.iter().any(|s| s.covers(target)) {
                return Err(self.refuse(
                    surface,
                    Denied::Forbidden(format!("this token may not address {target}")),
                ));
            }
        }
        Ok(())
    }

    /// Admits an admin request carrying `authorization` (or the console's `cookie` value).
    pub fn admin(
        &self,
        surface: &str,
        authorization: Option<&str>,
        cookie: Option<&str>,
    ) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        let Some(token) = bearer(authorization).or(cookie) else {
            return Err(self.refuse(
                surface,
                Denied::Unauthenticated(
                    "missing credentials: the admin API needs authorization: Bearer <admin token>"
                        .into(),
                ),
            ));
        };
        if self.is_admin(token) {
            return Ok(());
        }
        let file = self.from_file.read();
        let known = self
            .fixed
            .iter()
            .chain(file.iter())
            .any(|t| same(t.token.as_bytes(), token.as_bytes()));
        Err(self.refuse(
            surface,
            if known {
                Denied::Forbidden("an ingress token does not admit the admin API".into())
            } else if self.admin.is_none() {
                Denied::Forbidden("the admin API is closed: [auth] sets no admin_token".into())
            } else {
                Denied::Unauthenticated("unknown token".into())
            },
        ))
    }

    /// Reads the tokens file again whenever it changes (every second), until the runtime
    /// stops.
    pub fn watch(self: &Arc<Self>) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let me = Arc::downgrade(self);
        // The content itself: a rotation within one modification-time tick, to a token of the
        // same length, is seen too.
        let stamp = |p: &Path| std::fs::read(p).ok();
        let mut last = stamp(&path);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let Some(auth) = me.upgrade() else { return };
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                match read_file(&path) {
                    Ok(tokens) => {
                        tracing::info!(file = %path.display(), tokens = tokens.len(), "tokens file read again");
                        *auth.from_file.write() = tokens;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "tokens file not read again: the tokens read before stay");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tokens: &[(&str, &[&str])], admin: Option<&str>) -> AuthConfig {
        AuthConfig {
            tokens: tokens
                .iter()
                .map(|(t, n)| TokenConfig {
                    token: t.to_string(),
                    namespaces: n.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            tokens_file: None,
            admin_token: admin.map(String::from),
            function_signing_key: None,
        }
    }

    #[test]
    fn tokens_are_scoped_and_refusals_are_counted() {
        let shop = "shop-token-0123456789";
        let one = "one-type-0123456789";
        let admin = "admin-token-0123456789";
        let a = Auth::new(
            &cfg(
                &[(shop, &["shop/*"]), (one, &["example/counter"])],
                Some(admin),
            ),
            Metrics::new(),
        )
        .unwrap();
        let b = |t: &str| format!("Bearer {t}");
        assert_eq!(a.ingress("grpc", Some(&b(shop)), ["shop/cart"]), Ok(()));
        assert_eq!(a.ingress("grpc", Some(&b(shop)), ["shop"]), Ok(()));
        assert!(matches!(
            a.ingress("grpc", Some(&b(shop)), ["admin/x"]),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            a.ingress("grpc", Some(&b(shop)), ["shopping/x"]),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            a.ingress("grpc", Some(&b(shop)), ["shop/a", "other/b"]),
            Err(Denied::Forbidden(_))
        ));
        assert_eq!(
            a.ingress("http", Some(&b(one)), ["example/counter"]),
            Ok(())
        );
        assert!(a
            .ingress("http", Some(&b(one)), ["example/greeter"])
            .is_err());
        assert!(matches!(
            a.ingress("http", None, ["shop/a"]),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            a.ingress("http", Some("Bearer nope-nope-nope-nope"), ["shop/a"]),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            a.ingress("http", Some(shop), ["shop/a"]),
            Err(Denied::Unauthenticated(_))
        ));
        // The admin token admits everything; an ingress token not the admin API.
        assert_eq!(
            a.ingress("grpc", Some(&format!("bearer {admin}")), ["any/thing"]),
            Ok(())
        );
        assert_eq!(a.admin("http", Some(&b(admin)), None), Ok(()));
        assert_eq!(a.admin("http", None, Some(admin)), Ok(()));
        assert!(matches!(
            a.admin("http", Some(&b(shop)), None),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            a.admin("http", None, None),
            Err(Denied::Unauthenticated(_))
        ));
        let m = &a.metrics.auth_refused;
        assert_eq!(m.with_label_values(&["grpc", "forbidden"]).get(), 3);
        assert_eq!(m.with_label_values(&["http", "unauthenticated"]).get(), 4);
        // Off: open.
        let open = Auth::new(&AuthConfig::default(), Metrics::new()).unwrap();
        assert_eq!(open.ingress("grpc", None, ["a/b"]), Ok(()));
        assert_eq!(open.admin("grpc", None, None), Ok(()));
        // No admin token: the admin API is closed.
        let closed = Auth::new(&cfg(&[(shop, &["*"])], None), Metrics::new()).unwrap();
        assert!(closed
            .admin("http", Some(&b("x-0123456789abcdefgh")), None)
            .unwrap_err()
            .message()
            .contains("sets no admin_token"));
    }

    #[test]
    fn bad_tokens_and_scopes_are_refused_by_name() {
        let e = |t: &str, n: &[&str]| {
            check_token(&TokenConfig {
                token: t.into(),
                namespaces: n.iter().map(|s| s.to_string()).collect(),
            })
            .unwrap_err()
        };
        assert!(e("short", &["*"]).contains("at least 16"));
        assert!(e("0123456789abcdef", &[]).contains("at least one"));
        assert!(e("0123456789abcdef", &["shop"]).contains("\"shop\": expected"));
        assert!(e("0123456789abcdef", &["s*/x"]).contains("expected"));
        assert!(e("0123456789abcde f", &["*"]).contains("expected letters"));
        assert!(e("0123456789abcde;f", &["*"]).contains("expected letters"));
    }

    #[tokio::test]
    async fn the_tokens_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens.toml");
        let write = |t: &str| {
            std::fs::write(
                &f,
                format!("[[tokens]]\ntoken = \"{t}\"\nnamespaces = [\"shop/*\"]\n"),
            )
            .unwrap()
        };
        write("first-token-0123456789");
        let a = Auth::new(
            &AuthConfig {
                tokens_file: Some(f.clone()),
                ..Default::default()
            },
            Metrics::new(),
        )
        .unwrap();
        a.watch();
        let ok = |t: &str| {
            a.ingress("http", Some(&format!("Bearer {t}")), ["shop/a"])
                .is_ok()
        };
        assert!(ok("first-token-0123456789"));
        write("second-token-0123456789-longer");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ok("second-token-0123456789-longer") {
            assert!(
                std::time::Instant::now() < deadline,
                "the file was not read again"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(!ok("first-token-0123456789"));
        // A broken file keeps the tokens read before.
        std::fs::write(&f, "[[tokens]]\ntoken = 3\n").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        assert!(ok("second-token-0123456789-longer"));
    }
}
