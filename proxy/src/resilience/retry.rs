//! Retries: which outcomes of a try are retried, for which methods, the backoff before each
//! retry, and the budget (tower's `TpsBudget`, Finagle's design) that bounds them.
//!
//! The budget is the guarantee: every request deposits, every retry withdraws, so under a 100%
//! failing destination the retries add at most `ratio` of the live requests (plus
//! `minPerSecond`) whatever `attempts` says.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use tower::retry::budget::{Budget, TpsBudget};
use trellis_policy::{Retries, RetryBudget, RetryOn};

/// How one try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection (refused, unreachable, connect or TLS handshake failure).
    ConnectFailure,
    /// The connection failed before a response arrived.
    Reset,
    /// The per-try timeout passed.
    Timeout,
    /// A response with this status (and, for gRPC trailers-only answers, `grpc-status`).
    Answer(StatusCode, Option<u32>),
}

/// Retries, compiled.
#[derive(Debug)]
pub struct Retry {
    /// Most retries of one request.
    pub attempts: u32,
    on_connect: bool,
    on_reset: bool,
    on_gateway: bool,
    on_server: bool,
    on_timeout: bool,
    status_codes: Vec<u16>,
    grpc_codes: Vec<u32>,
    methods: Vec<Method>,
    base: Duration,
    max: Duration,
    /// Largest request body kept for a retry.
    pub max_body_bytes: usize,
    budget: Arc<TpsBudget>,
}

/// A retry budget as settings make it (tower's `TpsBudget`); the table keeps one per
/// destination and route across recompiles (an endpoint change must not refill it).
pub fn new_budget(b: &RetryBudget) -> Arc<TpsBudget> {
    let ttl = b
        .ttl
        .get()
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    Arc::new(TpsBudget::new(
        ttl,
        b.min_per_second,
        b.ratio.clamp(0.0, 1.0) as f32,
    ))
}

impl Retry {
    /// Compile checked settings (ranges were validated with the configuration) with a budget
    /// of their own.
    pub fn compile(r: &Retries) -> Self {
        Self::with_budget(r, new_budget(&r.budget))
    }

    /// Compile checked settings spending `budget` (one kept across recompiles).
    pub fn with_budget(r: &Retries, budget: Arc<TpsBudget>) -> Self {
        let has = |o: RetryOn| r.on.contains(&o);
        let methods = if r.methods.is_empty() {
            trellis_policy::IDEMPOTENT_METHODS
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect()
        } else {
            r.methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect()
        };
        Retry {
            attempts: r.attempts,
            on_connect: has(RetryOn::ConnectFailure),
            on_reset: has(RetryOn::Reset),
            on_gateway: has(RetryOn::GatewayError),
            on_server: has(RetryOn::ServerError),
            on_timeout: has(RetryOn::Timeout),
            status_codes: r.status_codes.clone(),
            grpc_codes: r.grpc_codes.clone(),
            methods,
            base: r.backoff.base.get(),
            max: r.backoff.max.get(),
            max_body_bytes: r.max_body_bytes as usize,
            budget,
        }
    }

    /// Whether two compiled retries spend the same budget.
    pub fn shares_budget_with(&self, other: &Retry) -> bool {
        Arc::ptr_eq(&self.budget, &other.budget)
    }

    /// Whether requests with this method may be retried (`*` in `methods` allows all).
    pub fn retries_method(&self, method: &Method) -> bool {
        self.methods
            .iter()
            .any(|m| m == method || m.as_str() == "*")
    }

    /// Whether `outcome` is one this policy retries.
    pub fn retryable(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::ConnectFailure => self.on_connect,
            Outcome::Reset => self.on_reset,
            Outcome::Timeout => self.on_timeout,
            Outcome::Answer(status, grpc) => {
                let code = status.as_u16();
                (self.on_server && status.is_server_error())
                    || (self.on_gateway && matches!(code, 502..=504))
                    || self.status_codes.contains(&code)
                    || grpc.is_some_and(|g| self.grpc_codes.contains(&g))
            }
        }
    }

    /// A request was sent (its first try): it pays into the budget.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Take one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }

    /// The wait before retry `n` (1-based): uniform in `[0, min(max, base * 2^(n-1))]` (full
    /// jitter, so retries of many callers do not arrive together).
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(20))
            .min(self.max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 {
            0
        } else {
            fastrand::u64(..=nanos)
        })
    }
}

/// The `grpc-status` of a trailers-only gRPC answer (in the headers), if any.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(json: &str) -> Retry {
        Retry::compile(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn the_default_list_retries_gateway_errors_not_application_errors() {
        let r = retry(r#"{"attempts": 2}"#);
        assert!(r.retryable(Outcome::ConnectFailure));
        assert!(r.retryable(Outcome::Reset));
        assert!(r.retryable(Outcome::Timeout));
        assert!(r.retryable(Outcome::Answer(StatusCode::SERVICE_UNAVAILABLE, None)));
        assert!(!r.retryable(Outcome::Answer(StatusCode::INTERNAL_SERVER_ERROR, None)));
        assert!(!r.retryable(Outcome::Answer(StatusCode::OK, None)));
        assert!(r.retries_method(&Method::GET) && r.retries_method(&Method::PUT));
        assert!(!r.retries_method(&Method::POST));
    }

    #[test]
    fn status_and_grpc_lists_add_to_the_kinds() {
        let r = retry(
            r#"{"attempts": 1, "on": ["server-error"], "statusCodes": [429], "grpcCodes": [14],
                "methods": ["POST"], "allowNonIdempotent": true}"#,
        );
        assert!(r.retryable(Outcome::Answer(StatusCode::INTERNAL_SERVER_ERROR, None)));
        assert!(r.retryable(Outcome::Answer(StatusCode::TOO_MANY_REQUESTS, None)));
        assert!(r.retryable(Outcome::Answer(StatusCode::OK, Some(14))));
        assert!(!r.retryable(Outcome::Answer(StatusCode::OK, Some(5))));
        assert!(!r.retryable(Outcome::ConnectFailure));
        assert!(r.retries_method(&Method::POST) && !r.retries_method(&Method::GET));
    }

    #[test]
    fn the_budget_bounds_retries_by_the_live_traffic() {
        // ratio 0.2 and no floor: 100 requests pay for 20 retries.
        let r = retry(r#"{"attempts": 3, "budget": {"ratio": 0.2, "minPerSecond": 0}}"#);
        for _ in 0..100 {
            r.deposit();
        }
        let granted = (0..100).filter(|_| r.withdraw()).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn backoff_grows_and_stays_under_the_ceiling() {
        let r = retry(r#"{"attempts": 5, "backoff": {"base": "10ms", "max": "40ms"}}"#);
        for n in 1..=5 {
            let ceiling = Duration::from_millis((10u64 << (n - 1)).min(40));
            for _ in 0..200 {
                assert!(r.backoff(n) <= ceiling);
            }
        }
        let spread = (0..200)
            .map(|_| r.backoff(3))
            .collect::<std::collections::HashSet<_>>();
        assert!(spread.len() > 100, "jitter spreads the waits");
    }
}
