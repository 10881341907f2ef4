//! Fault injection, compiled: which requests a fault applies to (caller identity, a header) and
//! the dice for its delay and abort.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{per_million, roll};

/// An injected error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// This HTTP status.
    Http(StatusCode),
    /// A trailers-only gRPC answer with this `grpc-status`.
    Grpc(u32),
}

/// Faults, compiled.
#[derive(Debug)]
pub struct Fault {
    delay: Option<(Duration, u32)>,
    abort: Option<(Abort, u32)>,
    /// SPIFFE ids, or `namespace/serviceaccount` (matched against the id's `/ns/../sa/..`).
    sources: Vec<String>,
    header: Option<(HeaderName, HeaderValue)>,
}

impl Fault {
    /// Compile checked settings.
    pub fn compile(f: &trellis_policy::Fault) -> Self {
        Fault {
            delay: f
                .delay
                .as_ref()
                .map(|d| (d.fixed.get(), per_million(d.percent))),
            abort: f.abort.as_ref().and_then(|a| {
                let abort = match (a.http_status, a.grpc_status) {
                    (Some(s), _) => Abort::Http(StatusCode::from_u16(s).ok()?),
                    (None, Some(g)) => Abort::Grpc(g),
                    (None, None) => return None,
                };
                Some((abort, per_million(a.percent)))
            }),
            sources: f
                .sources
                .iter()
                .map(|s| match s.split_once('/') {
                    Some((ns, sa)) if !s.starts_with("spiffe://") => format!("/ns/{ns}/sa/{sa}"),
                    _ => s.clone(),
                })
                .collect(),
            header: f.header.as_ref().and_then(|h| {
                Some((
                    HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).ok()?,
                    HeaderValue::from_str(&h.value).ok()?,
                ))
            }),
        }
    }

    /// Whether the fault applies to a request from `caller` (its SPIFFE id, if it has one) with
    /// these headers.
    pub fn applies(&self, caller: Option<&str>, headers: &HeaderMap) -> bool {
        if !self.sources.is_empty() {
            let Some(id) = caller else { return false };
            if !self
                .sources
                .iter()
                .any(|s| id == s || (s.starts_with("/ns/") && id.ends_with(s.as_str())))
            {
                return false;
            }
        }
        match &self.header {
            Some((name, value)) => headers.get_all(name).iter().any(|v| v == value),
            None => true,
        }
    }

    /// The delay for this request, if the dice say so.
    pub fn delay(&self) -> Option<Duration> {
        self.delay.and_then(|(d, share)| roll(share).then_some(d))
    }

    /// The error answer for this request, if the dice say so.
    pub fn abort(&self) -> Option<Abort> {
        self.abort.and_then(|(a, share)| roll(share).then_some(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(json: &str) -> Fault {
        Fault::compile(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn conditions_select_callers_and_requests() {
        let f = fault(
            r#"{"abort": {"httpStatus": 503, "percent": 100},
                "sources": ["shop/frontend"], "header": {"name": "X-Chaos", "value": "on"}}"#,
        );
        let mut h = HeaderMap::new();
        let frontend = Some("spiffe://cluster.local/ns/shop/sa/frontend");
        assert!(!f.applies(frontend, &h), "no header");
        h.insert("x-chaos", HeaderValue::from_static("on"));
        assert!(f.applies(frontend, &h));
        assert!(!f.applies(Some("spiffe://cluster.local/ns/shop/sa/other"), &h));
        assert!(
            !f.applies(None, &h),
            "an unauthenticated caller is not a listed source"
        );
        assert_eq!(
            f.abort(),
            Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE))
        );
        assert_eq!(f.delay(), None);
    }

    #[test]
    fn percent_zero_never_fires_and_grpc_aborts_compile() {
        let f = fault(
            r#"{"abort": {"grpcStatus": 14, "percent": 0}, "delay": {"fixed": "5ms", "percent": 100}}"#,
        );
        assert!(f.applies(None, &HeaderMap::new()));
        assert_eq!(f.abort(), None);
        assert_eq!(f.delay(), Some(Duration::from_millis(5)));
        let f = fault(r#"{"abort": {"grpcStatus": 14, "percent": 100}}"#);
        assert_eq!(f.abort(), Some(Abort::Grpc(14)));
    }
}
