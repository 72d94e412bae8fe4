//! OpenTelemetry traces (`[telemetry]`): one trace follows a message through the mesh.
//!
//! Spans (all of target `statemesh::trace`, exported over OTLP/gRPC through
//! `tracing-opentelemetry`; every span carries the attribute `statemesh.node`):
//!
//! | span | where | parent |
//! | --- | --- | --- |
//! | `ingress` | a gRPC or HTTP `Send`/`Call` (or a playground `PUT`) | the request's W3C `traceparent` (gRPC metadata or HTTP header), else a new trace |
//! | `forward` | the node that took the request sends it to the owner of its key group | `ingress` |
//! | `forwarded` | the owner receives it | `forward` (its `traceparent` travels in the forwarding frame) |
//! | `invoke` | an invocation of the target function (embedded, or a batch call to a remote one: the call carries the span as `traceparent`) | the span that sent the message |
//! | `invoke` | … of each function a traced invocation sent a message to, on whichever node owns it | the sending `invoke` |
//! | `reply` | the reply reaching the node that holds the call | the replying `invoke` |
//!
//! A message carries its trace (`TraceParent`, boxed: eight bytes in an envelope when it has
//! none) only if it is sampled: a request with a `traceparent` follows its sampled flag, one
//! without is sampled with probability `sampling_ratio`. Untraced messages create no span, so
//! with telemetry off (no `otlp_endpoint`) the message path does one relaxed atomic load per
//! request. What a batch of several messages sends is attributed to the first traced one.
//! Trace context is not checkpointed: messages replayed after a crash are not traced.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::TelemetryConfig;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// `sampling_ratio` as a threshold on a random u64.
static THRESHOLD: AtomicU64 = AtomicU64::new(0);
/// This node's cluster id, once known.
static NODE: AtomicU64 = AtomicU64::new(0);

/// The target of every span of the message path.
pub const TARGET: &str = "statemesh::trace";

/// Whether traces are on.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Records this node's id (an attribute of every span from now on).
pub fn set_node(id: u64) {
    NODE.store(id, Ordering::Relaxed);
}

fn node() -> u64 {
    NODE.load(Ordering::Relaxed)
}

/// A sampled span's identity, as a message carries it to its next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
}

/// A message's trace: none for most messages.
pub type Trace = Option<Box<TraceParent>>;

impl TraceParent {
    /// Parses a W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`): the parent and
    /// whether it is sampled; `None` if malformed.
    pub fn parse(h: &str) -> Option<(TraceParent, bool)> {
        let mut parts = h.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 {
            return None;
        }
        if flags.len() != 2 || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some((TraceParent { trace_id, span_id }, flags & 1 == 1))
    }

    /// The W3C `traceparent` header of this (sampled) span.
    pub fn header(&self) -> String {
        format!("00-{:032x}-{:016x}-01", self.trace_id, self.span_id)
    }

    fn context(&self) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    /// The identity of a span, if it is a sampled span of ours.
    pub fn of(span: &tracing::Span) -> Option<TraceParent> {
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.is_valid() && sc.is_sampled()).then(|| TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        })
    }

    /// The current span's identity (inside an instrumented request), if traced.
    pub fn current() -> Trace {
        if !enabled() {
            return None;
        }
        TraceParent::of(&tracing::Span::current()).map(Box::new)
    }
}

/// A span of the message path named `name`, child of `parent`.
fn span(name: &'static str, what: &str) -> tracing::Span {
    match name {
        "ingress" => {
            tracing::info_span!(target: TARGET, "ingress", statemesh.node = node(), statemesh.target = what)
        }
        "forward" => {
            tracing::info_span!(target: TARGET, "forward", statemesh.node = node(), statemesh.target = what)
        }
        "forwarded" => {
            tracing::info_span!(target: TARGET, "forwarded", statemesh.node = node(), statemesh.target = what)
        }
        "invoke" => {
            tracing::info_span!(target: TARGET, "invoke", statemesh.node = node(), statemesh.address = what)
        }
        _ => {
            tracing::info_span!(target: TARGET, "reply", statemesh.node = node(), statemesh.caller = what)
        }
    }
}

/// A span continuing `parent` (another node's, or a message's).
pub fn child(name: &'static str, what: &str, parent: &TraceParent) -> tracing::Span {
    let s = span(name, what);
    let _ = s.set_parent(parent.context());
    s
}

/// The span of a request entering the node (`ingress`), or none if it is not traced: a
/// request with a `traceparent` follows its sampled flag, one without is sampled at
/// `sampling_ratio`.
pub fn ingress(what: &str, traceparent: Option<&str>) -> Option<tracing::Span> {
    if !enabled() {
        return None;
    }
    match traceparent.and_then(TraceParent::parse) {
        Some((parent, true)) => Some(child("ingress", what, &parent)),
        Some((_, false)) => None,
        None => {
            let t = THRESHOLD.load(Ordering::Relaxed);
            (t == u64::MAX || random_u64() < t).then(|| {
                let s = span("ingress", what);
                // A root: not a child of whatever span the caller is in.
                let _ = s.set_parent(opentelemetry::Context::new());
                s
            })
        }
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct Guard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(e) = p.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: flushing traces at exit failed: {e}");
            }
        }
    }
}

/// The `tracing` layer exporting the message path's spans, if `[telemetry]` names a collector;
/// call inside the tokio runtime (the exporter's channel lives on it).
pub fn layer<S>(
    cfg: &TelemetryConfig,
) -> Result<(Option<impl tracing_subscriber::Layer<S>>, Guard), String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing_subscriber::Layer as _;
    let Some(endpoint) = &cfg.otlp_endpoint else {
        return Ok((None, Guard { provider: None }));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint {endpoint:?}: {e}"))?;
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(cfg.export_interval_ms))
                .build(),
        )
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("statemesh");
    let threshold = if cfg.sampling_ratio >= 1.0 {
        u64::MAX
    } else {
        (cfg.sampling_ratio * u64::MAX as f64) as u64
    };
    THRESHOLD.store(threshold, Ordering::Relaxed);
    ENABLED.store(true, Ordering::Relaxed);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
        );
    Ok((
        Some(layer),
        Guard {
            provider: Some(provider),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers_round_trip_and_bad_ones_are_refused() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (p, sampled) = TraceParent::parse(h).unwrap();
        assert!(sampled);
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert_eq!(p.header(), h);
        let (_, sampled) =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn off_means_no_spans() {
        assert!(!enabled());
        assert!(ingress("a/b/c", None).is_none());
        assert!(TraceParent::current().is_none());
    }
}
