//! Trace context in request headers: W3C `traceparent`/`tracestate` (through OpenTelemetry's
//! [`TraceContextPropagator`]) and B3, multi-header (`X-B3-*`) and single (`b3`).
//!
//! B3 is parsed here rather than with `opentelemetry-zipkin`'s propagator: that crate brings
//! the Zipkin exporter and its HTTP client along, for ~60 lines of header parsing.
//! A B3 header that carries only a sampling state (`b3: 0`) has no ids to continue and is
//! treated as absent.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The trace an incoming request belongs to.
#[derive(Debug, Clone)]
pub struct Parent {
    /// The caller's span (remote).
    pub context: SpanContext,
    /// The caller's sampling decision: None when it deferred it (B3 without `X-B3-Sampled`).
    pub sampled: Option<bool>,
    /// Which formats it came in, so the same ones go on.
    pub formats: Formats,
}

/// Header formats present on a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    /// `traceparent` (and `tracestate`).
    pub w3c: bool,
    /// `X-B3-TraceId`, `X-B3-SpanId`, ...
    pub b3_multi: bool,
    /// `b3`.
    pub b3_single: bool,
}

const B3: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
const B3_SPAN_ID: &str = "x-b3-spanid";
const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            return;
        };
        // The propagator writes `tracestate: ` even when the state is empty; send none instead.
        match HeaderValue::from_str(&value) {
            Ok(v) if !value.is_empty() => {
                self.0.insert(name, v);
            }
            _ => {
                self.0.remove(name);
            }
        }
    }
}

/// The trace context of `headers`: W3C first, then B3 single, then B3 multi.
pub fn extract(headers: &HeaderMap) -> Option<Parent> {
    let formats = Formats {
        w3c: headers.contains_key("traceparent"),
        b3_multi: headers.contains_key(B3_TRACE_ID),
        b3_single: headers.contains_key(B3),
    };
    if formats.w3c {
        let cx = TraceContextPropagator::new().extract(&Headers(headers));
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some(Parent {
                sampled: Some(sc.is_sampled()),
                context: sc,
                formats,
            });
        }
    }
    let (context, sampled) = if formats.b3_single {
        b3_single(headers.get(B3)?.to_str().ok()?)?
    } else if formats.b3_multi {
        b3_multi(headers)?
    } else {
        return None;
    };
    Some(Parent {
        context,
        sampled,
        formats,
    })
}

fn b3_trace_id(s: &str) -> Option<TraceId> {
    // 64-bit ids are left-padded to 128 (B3 spec, "TraceId").
    match s.len() {
        16 | 32 => u128::from_str_radix(s, 16)
            .ok()
            .map(|n| TraceId::from_bytes(n.to_be_bytes())),
        _ => None,
    }
    .filter(|t| *t != TraceId::INVALID)
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    (s.len() == 16)
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
        .map(|n| SpanId::from_bytes(n.to_be_bytes()))
        .filter(|s| *s != SpanId::INVALID)
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn remote(trace: TraceId, span: SpanId, sampled: Option<bool>) -> SpanContext {
    let flags = if sampled == Some(true) {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(trace, span, flags, true, TraceState::default())
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`.
fn b3_single(value: &str) -> Option<(SpanContext, Option<bool>)> {
    let mut parts = value.trim().split('-');
    let trace = b3_trace_id(parts.next()?)?;
    let span = b3_span_id(parts.next()?)?;
    let sampled = parts.next().and_then(b3_sampled);
    Some((remote(trace, span, sampled), sampled))
}

fn b3_multi(headers: &HeaderMap) -> Option<(SpanContext, Option<bool>)> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace = b3_trace_id(get(B3_TRACE_ID)?)?;
    let span = b3_span_id(get(B3_SPAN_ID)?)?;
    let sampled = if get(B3_FLAGS) == Some("1") {
        Some(true) // debug implies sampled
    } else {
        get(B3_SAMPLED).and_then(b3_sampled)
    };
    Some((remote(trace, span, sampled), sampled))
}

/// Write `span` (this proxy's span, child of `parent_span`) into `headers` in `formats`;
/// W3C always, so that a trace this proxy started goes on in the standard format.
pub fn inject(
    headers: &mut HeaderMap,
    span: &SpanContext,
    parent_span: Option<SpanId>,
    formats: Formats,
) {
    let cx = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(headers));
    let sampled = if span.is_sampled() { "1" } else { "0" };
    if formats.b3_single {
        let mut v = format!("{}-{}-{sampled}", span.trace_id(), span.span_id());
        if let Some(p) = parent_span {
            v += &format!("-{p}");
        }
        HeadersMut(headers).set(B3, v);
    }
    if formats.b3_multi {
        let mut h = HeadersMut(headers);
        h.set(B3_TRACE_ID, span.trace_id().to_string());
        h.set(B3_SPAN_ID, span.span_id().to_string());
        h.set(
            B3_PARENT_SPAN_ID,
            parent_span.map(|p| p.to_string()).unwrap_or_default(),
        );
        h.set(B3_SAMPLED, sampled.to_string());
        h.set(B3_FLAGS, String::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn w3c_is_read_and_written_with_tracestate() {
        let h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=x"),
        ]);
        let p = extract(&h).unwrap();
        assert_eq!(
            p.context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(p.sampled, Some(true));
        let mut out = HeaderMap::new();
        let child = SpanContext::new(
            p.context.trace_id(),
            SpanId::from_bytes(7u64.to_be_bytes()),
            TraceFlags::SAMPLED,
            false,
            p.context.trace_state().clone(),
        );
        inject(&mut out, &child, Some(p.context.span_id()), p.formats);
        assert_eq!(
            out["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000007-01"
        );
        assert_eq!(out["tracestate"], "vendor=x");
    }

    #[test]
    fn b3_single_and_multi_are_read_and_64_bit_ids_padded() {
        let p = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-0")])).unwrap();
        assert_eq!(
            p.context.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert_eq!(p.sampled, Some(false));
        let p = extract(&headers(&[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]))
        .unwrap();
        assert_eq!(p.sampled, None, "deferred");
        assert!(p.formats.b3_multi && !p.formats.w3c);
        assert!(extract(&headers(&[("b3", "1")])).is_none());
        assert!(extract(&headers(&[("traceparent", "garbage")])).is_none());
    }
}
