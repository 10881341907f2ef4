//! Trellis's resilience policy: what a destination's callers do when it is slow, failing or
//! overloaded, and the faults, limits and mirrors an operator adds on purpose.
//!
//! One set of settings serves everywhere, so the same YAML means the same thing on every
//! platform and in every file:
//! - the `spec` of the `policy.trellis.io/v1alpha1` `TrafficPolicy` kind (a CRD on Kubernetes,
//!   a document in the policy directory elsewhere) is a [`DestinationPolicy`] plus a `targetRef`
//!   and per-route sections ([`RoutePolicy`]);
//! - the controller compiles it into the destination profile it streams to proxies;
//! - the proxy's static file takes the same fields under `policy:` on a destination and its routes.
//!
//! Every field is optional. An absent section keeps the behaviour a mesh without the policy has:
//! no timeout but the proxy's limits, one try, no breaker, no ejection, no health checks, no
//! faults, no rate limit, no mirror. Durations are written as `250ms`, `2s`, `1m30s`.
//!
//! Where each part is enforced (and why):
//! - timeouts, retries, the circuit breaker, outlier ejection, health checks, fault injection and
//!   mirroring: in the **caller's** proxy (outbound), which chooses the endpoint and sees the
//!   failure first, as Linkerd and Envoy do;
//! - rate limits: in the **destination's** proxy (inbound), because a local rate limit protects an
//!   instance, and only there is the caller's identity proven (`perSource`).
//!
//! The [`jwt`] module holds the end-user authentication settings (JWT providers and claim
//! conditions) that a TrafficPolicy carries as `jwt` and route sections' `claims`; they are
//! enforced by the destination's proxy too (inbound), which `trellis-jwt` verifies tokens for.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod jwt;
mod validate;
pub use validate::{Problem, validate_destination, validate_route};

/// A duration written the human way (`250ms`, `2s`, `1m30s`; `humantime`'s syntax).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// From milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    /// The std duration.
    pub fn get(self) -> std::time::Duration {
        self.0
    }

    /// Whole milliseconds (saturating).
    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Why a duration did not parse.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    /// A leading minus sign: no duration of this policy may be negative.
    #[error("{0:?} is negative: durations are lengths of time, e.g. 250ms or 2s")]
    Negative(String),
    /// Anything else.
    #[error("{text:?} is not a duration ({reason}): write e.g. 250ms, 2s or 1m30s")]
    Syntax {
        /// What was written.
        text: String,
        /// What humantime said.
        reason: String,
    },
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(DurationError::Negative(text.to_string()));
        }
        humantime::parse_duration(trimmed)
            .map(Duration)
            .map_err(|e| DurationError::Syntax {
                text: text.to_string(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// In schemas (the TrafficPolicy CRD): a string; the controller parses it and refuses negatives.
#[cfg(feature = "schema")]
impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A length of time: 250ms, 2s, 1m30s.",
        })
    }
}

/// A share of requests in percent, `0` to `100` (fractions allowed: `0.5`).
pub type Percent = f64;

/// How a backend's endpoints are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// Power of two choices over a latency EWMA that counts failures as slow (the default).
    #[default]
    Ewma,
    /// Round robin, weighted by endpoint weights.
    RoundRobin,
    /// Fewest requests in flight (ties broken at random).
    LeastRequest,
}

/// The policy of a destination: defaults for all its requests, and what only makes sense per
/// destination (breaker, ejection, health checks, balancer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationPolicy {
    /// Request timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries (absent: one try).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Injected faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Local rate limit (enforced by each destination instance's proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Request mirroring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Limits on connections and requests towards the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Taking failing endpoints out for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Probing endpoints actively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// How endpoints are chosen (absent: `ewma`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
}

/// The policy of one route: each section present replaces the destination's section of the same
/// name for requests that match the route (sections are not merged field by field, so what a
/// route says is all that applies to it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePolicy {
    /// Request timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Injected faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Local rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Request mirroring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

impl RoutePolicy {
    /// The sections that apply to a request of this route: the route's own, else the
    /// destination's.
    pub fn over(&self, destination: &DestinationPolicy) -> RoutePolicy {
        RoutePolicy {
            timeouts: self.timeouts.clone().or(destination.timeouts.clone()),
            retries: self.retries.clone().or(destination.retries.clone()),
            fault: self.fault.clone().or(destination.fault.clone()),
            rate_limit: self.rate_limit.clone().or(destination.rate_limit.clone()),
            mirror: self.mirror.clone().or(destination.mirror.clone()),
        }
    }
}

impl From<&DestinationPolicy> for RoutePolicy {
    /// The destination's request sections, for requests that match no route.
    fn from(d: &DestinationPolicy) -> Self {
        RoutePolicy::default().over(d)
    }
}

/// Timeouts. Absent fields: no timeout of that kind (the proxy's connect and handshake timeouts
/// still apply).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// From the request's arrival until the response's headers, over every try and backoff:
    /// `504 x-trellis-error: timeout` when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// One try, until the response's headers. A try that times out is a failure retries may
    /// retry (`on: [timeout]`, in the default list); without retries it answers 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<Duration>,
    /// A request or response body with no bytes moving for this long is cut (the stream is
    /// reset, or the HTTP/1.1 connection closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
}

/// A failure retries may retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// No connection could be made (refused, unreachable, connect timeout, TLS handshake).
    ConnectFailure,
    /// The connection failed or was reset before a response arrived.
    Reset,
    /// 502, 503 or 504 from the endpoint.
    GatewayError,
    /// Any 5xx from the endpoint.
    ServerError,
    /// The per-try timeout passed.
    Timeout,
}

/// Retries: further tries of a failed request on another pick of the balancer, bounded by a
/// budget so they can never multiply a failing service's load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Most retries of one request (tries = 1 + attempts), 1 to 10.
    pub attempts: u32,
    /// Failures that are retried. Default: `connect-failure`, `reset`, `gateway-error`,
    /// `timeout`.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Response statuses retried besides `on` (e.g. `409`, `429`), 100 to 599.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// gRPC statuses retried (numbers, `14` = UNAVAILABLE), read from a trailers-only response's
    /// `grpc-status`, 1 to 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_codes: Vec<u32>,
    /// Methods retried. Default: the idempotent ones (`GET`, `HEAD`, `OPTIONS`, `PUT`,
    /// `DELETE`, `TRACE`). Others need `allowNonIdempotent: true`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The explicit opt-in that lets `methods` name `POST`, `PATCH` or `CONNECT`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_non_idempotent: bool,
    /// The wait before each retry.
    #[serde(default)]
    pub backoff: Backoff,
    /// How many retries the live traffic pays for.
    #[serde(default)]
    pub budget: RetryBudget,
    /// Request bodies up to this size are kept for a retry; a request with a larger body is sent
    /// once (0 to 1 MiB, default 64 KiB).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u32,
}

/// The methods retried when `methods` is empty.
pub const IDEMPOTENT_METHODS: [&str; 6] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"];

/// Methods retries refuse without `allowNonIdempotent`.
pub const NON_IDEMPOTENT_METHODS: [&str; 3] = ["POST", "PATCH", "CONNECT"];

impl Retries {
    /// Whether a request with this method may be retried.
    pub fn retries_method(&self, method: &str) -> bool {
        if self.methods.is_empty() {
            IDEMPOTENT_METHODS.contains(&method)
        } else {
            self.methods.iter().any(|m| m == method || m == "*")
        }
    }
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::GatewayError,
        RetryOn::Timeout,
    ]
}

fn default_max_body_bytes() -> u32 {
    64 * 1024
}

/// Exponential backoff with full jitter: before retry n the proxy waits a random time between 0
/// and `min(max, base * 2^(n-1))`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// The first retry's ceiling (default 25ms).
    #[serde(default = "default_backoff_base")]
    pub base: Duration,
    /// The largest ceiling (default 250ms).
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}

fn default_backoff_max() -> Duration {
    Duration::from_millis(250)
}

/// A retry budget (Finagle's and Linkerd's): retries may add at most `ratio` of the requests
/// sent in the last `ttl`, plus `minPerSecond` so a quiet service can still retry. Under a 100%
/// failing destination, the destination sees at most `(1 + ratio)` times the live requests plus
/// the floor, whatever `attempts` says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries per request, 0 to 1 (default 0.2).
    #[serde(default = "default_budget_ratio")]
    pub ratio: f64,
    /// Retries per second allowed whatever the traffic (default 10).
    #[serde(default = "default_budget_min")]
    pub min_per_second: u32,
    /// How long a request counts towards the budget, 1s to 60s (default 10s).
    #[serde(default = "default_budget_ttl")]
    pub ttl: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: default_budget_ratio(),
            min_per_second: default_budget_min(),
            ttl: default_budget_ttl(),
        }
    }
}

fn default_budget_ratio() -> f64 {
    0.2
}

fn default_budget_min() -> u32 {
    10
}

fn default_budget_ttl() -> Duration {
    Duration::from_millis(10_000)
}

/// Limits that answer fast instead of queueing without bound: when one is reached, the request
/// gets `503 x-trellis-error: overloaded` at once. Absent fields: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Connections open to the destination's endpoints, all together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection when `maxConnections` are all busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the destination (all endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests in flight to one endpoint; a full endpoint is skipped by the balancer, and the
    /// request is refused only when every endpoint of the backend is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_endpoint: Option<u32>,
}

/// Which failures count towards an ejection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Any failed exchange: no connection, a reset, a timeout, a 5xx (the default).
    #[default]
    #[serde(rename = "5xx")]
    ServerError,
    /// No connection, a reset, a timeout, 502, 503 or 504 (an application's own 500 does not
    /// count).
    GatewayError,
    /// Only failures to connect.
    ConnectFailure,
}

/// Takes failing endpoints out of their backend for a while: after `consecutiveFailures`
/// failures in a row, an endpoint gets no requests for `baseEjectionTime` times the number of
/// times it has been ejected (at most `maxEjectionTime`), then comes back on its own. At most
/// `maxEjectedPercent` of a backend's endpoints are out at once (one may always be, never the
/// last one). The decision is taken when the balancer next lands on the endpoint (there is no
/// periodic sweep, so no `interval`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint, 1 to 1000.
    pub consecutive_failures: u32,
    /// Which failures count (default `5xx`).
    #[serde(default)]
    pub failures: FailureKind,
    /// The first ejection's length (default 30s).
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time: Duration,
    /// The longest ejection (default 300s).
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time: Duration,
    /// Most of a backend's endpoints out at once, 0 to 100 (default 50).
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u8,
}

fn default_base_ejection() -> Duration {
    Duration::from_millis(30_000)
}

fn default_max_ejection() -> Duration {
    Duration::from_millis(300_000)
}

fn default_max_ejected_percent() -> u8 {
    50
}

/// Active health checks: each proxy probes the endpoints of the destinations it talks to;
/// an endpoint that failed `unhealthyThreshold` probes in a row gets no requests until it passed
/// `healthyThreshold` in a row. New endpoints start healthy (the registries' readiness already
/// vouched for them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// `GET` this path (an answer 200..399 passes); absent: a TCP connect passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    /// Between probes of one endpoint (default 10s).
    #[serde(default = "default_health_interval")]
    pub interval: Duration,
    /// One probe's limit (default 1s).
    #[serde(default = "default_health_timeout")]
    pub timeout: Duration,
    /// Failed probes in a row that take an endpoint out (default 3).
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Passed probes in a row that bring it back (default 2).
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
}

fn default_health_interval() -> Duration {
    Duration::from_millis(10_000)
}

fn default_health_timeout() -> Duration {
    Duration::from_millis(1_000)
}

fn default_unhealthy_threshold() -> u32 {
    3
}

fn default_healthy_threshold() -> u32 {
    2
}

/// Faults injected on purpose, to test how callers cope. Applied by the caller's proxy before
/// the request leaves it; only to requests that pass every condition given.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// Hold requests for a while before sending them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer requests with an error instead of sending them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
    /// Only for callers with one of these identities (SPIFFE ids, or `namespace/serviceaccount`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Only for requests carrying this header with exactly this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderCondition>,
}

/// An injected delay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// How long.
    pub fixed: Duration,
    /// Share of requests delayed, 0 to 100.
    pub percent: Percent,
}

/// An injected error answer: an HTTP status, or a gRPC status (sent as a trailers-only gRPC
/// response, HTTP 200 with `grpc-status`). The answer carries `x-trellis-error: fault-injected`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// HTTP status, 200 to 599.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// gRPC status, 1 to 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// Share of requests aborted, 0 to 100.
    pub percent: Percent,
}

/// A header that must be present with exactly this value (names are case-insensitive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderCondition {
    /// Header name.
    pub name: String,
    /// The whole value.
    pub value: String,
}

/// A local rate limit: a token bucket in each instance of the destination, refilled at
/// `requestsPerSecond` up to `burst`. A request finding it empty gets `429` with `retry-after`
/// (whole seconds until a token is back) and `x-trellis-error: rate-limited`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, more than 0.
    pub requests_per_second: f64,
    /// Bucket size (default: one second's worth, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per caller identity instead of one for all (unauthenticated callers share
    /// one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_source: bool,
}

impl RateLimit {
    /// The bucket size in force.
    pub fn effective_burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| self.requests_per_second.ceil().clamp(1.0, u32::MAX as f64) as u32)
            .max(1)
    }
}

/// Mirroring: a share of requests is also sent to another service; its answers are discarded,
/// and its failures or slowness never reach the caller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    /// The service that gets the copies (a name in the destination's namespace, or
    /// `namespace/name`; in the proxy's static file, one of the destination's backends, which
    /// may have weight 0).
    pub backend: String,
    /// Share of requests copied, 0 to 100.
    pub percent: Percent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_print_and_refuse_negatives() {
        let d: Duration = "250ms".parse().unwrap();
        assert_eq!(d.as_millis(), 250);
        assert_eq!(d.to_string(), "250ms");
        assert_eq!("1m30s".parse::<Duration>().unwrap().as_millis(), 90_000);
        let e = "-1s".parse::<Duration>().unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
        let e = "soon".parse::<Duration>().unwrap_err().to_string();
        assert!(e.contains("not a duration"), "{e}");
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let r: Retries = serde_json::from_str(r#"{"attempts": 2}"#).unwrap();
        assert_eq!(r.on, default_retry_on());
        assert_eq!(r.backoff.base.as_millis(), 25);
        assert_eq!(r.budget.ratio, 0.2);
        assert_eq!(r.max_body_bytes, 65536);
        assert!(r.retries_method("GET") && !r.retries_method("POST"));
        let o: OutlierDetection =
            serde_json::from_str(r#"{"consecutiveFailures": 5, "failures": "gateway-error"}"#)
                .unwrap();
        assert_eq!(o.failures, FailureKind::GatewayError);
        assert_eq!(o.base_ejection_time.as_millis(), 30_000);
        let l: RateLimit = serde_json::from_str(r#"{"requestsPerSecond": 2.5}"#).unwrap();
        assert_eq!(l.effective_burst(), 3);
    }

    #[test]
    fn a_route_section_replaces_the_destination_section() {
        let dest = DestinationPolicy {
            timeouts: Some(Timeouts {
                request: Some(Duration::from_millis(1000)),
                ..Timeouts::default()
            }),
            mirror: Some(Mirror {
                backend: "shadow".into(),
                percent: 5.0,
            }),
            ..DestinationPolicy::default()
        };
        let route = RoutePolicy {
            timeouts: Some(Timeouts {
                per_try: Some(Duration::from_millis(100)),
                ..Timeouts::default()
            }),
            ..RoutePolicy::default()
        };
        let applied = route.over(&dest);
        assert_eq!(applied.timeouts.as_ref().unwrap().request, None);
        assert_eq!(applied.mirror, dest.mirror);
    }
}
