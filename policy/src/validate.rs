//! Checks of a policy's values that its types cannot express (ranges, combinations), each
//! reported with the path of the field at fault (`retries.budget.ratio`) so callers can locate
//! it in a file or an object. Parsing already refused wrong types, unknown fields and negative
//! or malformed durations.

use crate::{
    CircuitBreaker, DestinationPolicy, Fault, HealthCheck, Mirror, NON_IDEMPOTENT_METHODS,
    OutlierDetection, RateLimit, Retries, RoutePolicy, Timeouts,
};

/// One thing wrong with a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field below the policy, e.g. `retries.attempts`.
    pub field: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

struct Checker<'a> {
    prefix: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        let field = if self.prefix.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.prefix)
        };
        self.problems.push(Problem {
            field,
            message: message.into(),
        });
    }

    fn percent(&mut self, field: &str, value: f64) {
        if !(0.0..=100.0).contains(&value) || value.is_nan() {
            self.fail(field, format!("{value} is not a percent (0 to 100)"));
        }
    }

    fn timeouts(&mut self, t: &Timeouts) {
        for (field, value) in [
            ("timeouts.request", t.request),
            ("timeouts.perTry", t.per_try),
            ("timeouts.idle", t.idle),
        ] {
            if value.is_some_and(|d| d.get().is_zero()) {
                self.fail(
                    field,
                    "0 would fail every request: leave it out for no timeout",
                );
            }
        }
        if let (Some(request), Some(per_try)) = (t.request, t.per_try)
            && per_try > request
        {
            self.fail(
                "timeouts.perTry",
                format!(
                    "{per_try} is longer than timeouts.request ({request}): no try could use it"
                ),
            );
        }
    }

    fn retries(&mut self, r: &Retries) {
        if !(1..=10).contains(&r.attempts) {
            self.fail(
                "retries.attempts",
                format!("{} is out of range (1 to 10)", r.attempts),
            );
        }
        for (i, code) in r.status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                self.fail(
                    &format!("retries.statusCodes[{i}]"),
                    format!("{code} is not an HTTP status (100 to 599)"),
                );
            }
        }
        for (i, code) in r.grpc_codes.iter().enumerate() {
            if !(1..=16).contains(code) {
                self.fail(
                    &format!("retries.grpcCodes[{i}]"),
                    format!("{code} is not a gRPC error status (1 to 16)"),
                );
            }
        }
        for (i, method) in r.methods.iter().enumerate() {
            let field = format!("retries.methods[{i}]");
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase() || b == b'*') {
                self.fail(
                    &field,
                    format!("{method:?} is not an upper-case HTTP method"),
                );
            } else if (method == "*" || NON_IDEMPOTENT_METHODS.contains(&method.as_str()))
                && !r.allow_non_idempotent
            {
                self.fail(
                    &field,
                    format!(
                        "{method} is not idempotent: a retry may apply it twice; set retries.allowNonIdempotent: true if the service tolerates that"
                    ),
                );
            }
        }
        if r.backoff.base > r.backoff.max {
            self.fail(
                "retries.backoff.base",
                format!(
                    "{} is longer than backoff.max ({})",
                    r.backoff.base, r.backoff.max
                ),
            );
        }
        if !(0.0..=1.0).contains(&r.budget.ratio) || r.budget.ratio.is_nan() {
            self.fail(
                "retries.budget.ratio",
                format!(
                    "{} is out of range (0 to 1 retries per request)",
                    r.budget.ratio
                ),
            );
        }
        let ttl = r.budget.ttl.as_millis();
        if !(1_000..=60_000).contains(&ttl) {
            self.fail(
                "retries.budget.ttl",
                format!("{} is out of range (1s to 60s)", r.budget.ttl),
            );
        }
        if r.max_body_bytes > 1024 * 1024 {
            self.fail(
                "retries.maxBodyBytes",
                format!("{} is more than 1 MiB", r.max_body_bytes),
            );
        }
    }

    fn fault(&mut self, f: &Fault) {
        if f.delay.is_none() && f.abort.is_none() {
            self.fail(
                "fault",
                "neither delay nor abort: the fault would do nothing",
            );
        }
        if let Some(delay) = &f.delay {
            self.percent("fault.delay.percent", delay.percent);
        }
        if let Some(abort) = &f.abort {
            self.percent("fault.abort.percent", abort.percent);
            match (abort.http_status, abort.grpc_status) {
                (Some(_), Some(_)) | (None, None) => self.fail(
                    "fault.abort",
                    "give exactly one of httpStatus and grpcStatus",
                ),
                (Some(s), None) if !(200..=599).contains(&s) => self.fail(
                    "fault.abort.httpStatus",
                    format!("{s} is out of range (200 to 599)"),
                ),
                (None, Some(s)) if !(1..=16).contains(&s) => self.fail(
                    "fault.abort.grpcStatus",
                    format!("{s} is not a gRPC error status (1 to 16)"),
                ),
                _ => {}
            }
        }
        if let Some(h) = &f.header
            && http_header_name_invalid(&h.name)
        {
            self.fail(
                "fault.header.name",
                format!("{:?} is not a header name", h.name),
            );
        }
    }

    fn rate_limit(&mut self, l: &RateLimit) {
        // is_finite() is false for NaN too.
        if !l.requests_per_second.is_finite() || l.requests_per_second <= 0.0 {
            self.fail(
                "rateLimit.requestsPerSecond",
                format!("{} must be more than 0", l.requests_per_second),
            );
        }
        if l.burst == Some(0) {
            self.fail("rateLimit.burst", "0 would refuse every request");
        }
    }

    fn mirror(&mut self, m: &Mirror) {
        self.percent("mirror.percent", m.percent);
        if m.backend.trim().is_empty() {
            self.fail(
                "mirror.backend",
                "empty: name the service that gets the copies",
            );
        }
    }

    fn circuit_breaker(&mut self, b: &CircuitBreaker) {
        for (field, value) in [
            ("circuitBreaker.maxConnections", b.max_connections),
            ("circuitBreaker.maxRequests", b.max_requests),
            (
                "circuitBreaker.maxRequestsPerEndpoint",
                b.max_requests_per_endpoint,
            ),
        ] {
            if value == Some(0) {
                self.fail(field, "0 would refuse every request");
            }
        }
        if b.max_pending_requests.is_some() && b.max_connections.is_none() {
            self.fail(
                "circuitBreaker.maxPendingRequests",
                "requests only wait for a connection when maxConnections is set",
            );
        }
    }

    fn outlier_detection(&mut self, o: &OutlierDetection) {
        if !(1..=1000).contains(&o.consecutive_failures) {
            self.fail(
                "outlierDetection.consecutiveFailures",
                format!("{} is out of range (1 to 1000)", o.consecutive_failures),
            );
        }
        if o.base_ejection_time.get().is_zero() {
            self.fail("outlierDetection.baseEjectionTime", "0 would eject nothing");
        }
        if o.max_ejection_time < o.base_ejection_time {
            self.fail(
                "outlierDetection.maxEjectionTime",
                format!(
                    "{} is shorter than baseEjectionTime ({})",
                    o.max_ejection_time, o.base_ejection_time
                ),
            );
        }
        if o.max_ejected_percent > 100 {
            self.fail(
                "outlierDetection.maxEjectedPercent",
                format!("{} is not a percent (0 to 100)", o.max_ejected_percent),
            );
        }
    }

    fn health_check(&mut self, h: &HealthCheck) {
        if let Some(path) = &h.http_path
            && (!path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            self.fail(
                "healthCheck.httpPath",
                format!("{path:?} is not a path (starts with /, no spaces)"),
            );
        }
        if h.interval.as_millis() < 100 {
            self.fail(
                "healthCheck.interval",
                format!("{} is shorter than 100ms", h.interval),
            );
        }
        if h.timeout.get().is_zero() || h.timeout > h.interval {
            self.fail(
                "healthCheck.timeout",
                format!(
                    "{} must be more than 0 and at most the interval ({})",
                    h.timeout, h.interval
                ),
            );
        }
        for (field, value) in [
            ("healthCheck.unhealthyThreshold", h.unhealthy_threshold),
            ("healthCheck.healthyThreshold", h.healthy_threshold),
        ] {
            if !(1..=100).contains(&value) {
                self.fail(field, format!("{value} is out of range (1 to 100)"));
            }
        }
    }
}

fn http_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Every problem of a destination policy; field paths are prefixed with `prefix` and a dot
/// (empty: none).
pub fn validate_destination(policy: &DestinationPolicy, prefix: &str) -> Vec<Problem> {
    let mut c = Checker {
        prefix,
        problems: Vec::new(),
    };
    c.requests(&RoutePolicy {
        timeouts: policy.timeouts.clone(),
        retries: policy.retries.clone(),
        fault: policy.fault.clone(),
        rate_limit: policy.rate_limit.clone(),
        mirror: policy.mirror.clone(),
    });
    if let Some(b) = &policy.circuit_breaker {
        c.circuit_breaker(b);
    }
    if let Some(o) = &policy.outlier_detection {
        c.outlier_detection(o);
    }
    if let Some(h) = &policy.health_check {
        c.health_check(h);
    }
    c.problems
}

/// Every problem of a route's policy, prefixed like [`validate_destination`].
pub fn validate_route(policy: &RoutePolicy, prefix: &str) -> Vec<Problem> {
    let mut c = Checker {
        prefix,
        problems: Vec::new(),
    };
    c.requests(policy);
    c.problems
}

impl Checker<'_> {
    fn requests(&mut self, p: &RoutePolicy) {
        if let Some(t) = &p.timeouts {
            self.timeouts(t);
        }
        if let Some(r) = &p.retries {
            self.retries(r);
        }
        if let Some(f) = &p.fault {
            self.fault(f);
        }
        if let Some(l) = &p.rate_limit {
            self.rate_limit(l);
        }
        if let Some(m) = &p.mirror {
            self.mirror(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(json: &str) -> Vec<String> {
        let policy: DestinationPolicy = serde_json::from_str(json).unwrap();
        validate_destination(&policy, "spec")
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn a_sound_policy_has_no_problems() {
        assert_eq!(
            problems(
                r#"{"timeouts": {"request": "2s", "perTry": "500ms"},
                    "retries": {"attempts": 2, "statusCodes": [429]},
                    "circuitBreaker": {"maxConnections": 10, "maxPendingRequests": 5},
                    "outlierDetection": {"consecutiveFailures": 5},
                    "healthCheck": {"httpPath": "/healthz"},
                    "fault": {"abort": {"httpStatus": 503, "percent": 10}},
                    "rateLimit": {"requestsPerSecond": 100},
                    "mirror": {"backend": "web-shadow", "percent": 1.5}}"#
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_bad_value_is_named_by_its_path() {
        let found = problems(
            r#"{"timeouts": {"request": "1s", "perTry": "2s"},
                "retries": {"attempts": 0, "methods": ["POST"], "budget": {"ratio": 3}},
                "fault": {"abort": {"httpStatus": 700, "percent": 150}},
                "mirror": {"backend": "x", "percent": -1},
                "circuitBreaker": {"maxPendingRequests": 3}}"#,
        );
        for expected in [
            "spec.timeouts.perTry: 2s is longer than timeouts.request (1s)",
            "spec.retries.attempts: 0 is out of range",
            "spec.retries.methods[0]: POST is not idempotent",
            "spec.retries.budget.ratio: 3 is out of range",
            "spec.fault.abort.percent: 150 is not a percent",
            "spec.fault.abort.httpStatus: 700 is out of range",
            "spec.mirror.percent: -1 is not a percent",
            "spec.circuitBreaker.maxPendingRequests: requests only wait",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "missing {expected:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), 8, "{found:#?}");
    }

    #[test]
    fn non_idempotent_methods_need_the_opt_in() {
        let ok = problems(
            r#"{"retries": {"attempts": 1, "methods": ["POST"], "allowNonIdempotent": true}}"#,
        );
        assert!(ok.is_empty(), "{ok:?}");
    }
}
