//! The resilience policy ([`trellis_policy`]) to and from its typed messages in the contract:
//! [`v1::DestinationPolicy`], [`v1::RoutePolicy`] and [`v1::InboundRateLimit`]. The one place
//! both directions live, so the controller (which sends) and the proxy (which receives) cannot
//! drift apart; the tests round-trip every field.
//!
//! What leaves out what (see the proto's header): a destination's `rateLimit` travels in the
//! inbound policy of the destination's own workloads, its `loadBalancer` as
//! `DestinationProfile.balancer`; both are `None` after [`destination_from_proto`].
//!
//! Receiving is strict: what a Rust type cannot hold (a negative or huge duration, an unknown
//! enum value, a status above 65535) is an error naming the field, never a guess.

use std::time::Duration as StdDuration;

use prost_types::Duration as ProtoDuration;
use trellis_policy as p;

use crate::v1;

/// A message the Rust types cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The field at fault, e.g. `retries.backoff.base`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn error(field: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.to_owned(),
        message: message.into(),
    }
}

pub(crate) fn duration(d: p::Duration) -> ProtoDuration {
    // A std duration beyond proto's range (~10_000 years) saturates; no policy says that.
    ProtoDuration::try_from(d.get()).unwrap_or(ProtoDuration {
        seconds: 315_576_000_000,
        nanos: 0,
    })
}

pub(crate) fn from_duration(d: ProtoDuration, field: &str) -> Result<p::Duration, PolicyError> {
    StdDuration::try_from(d)
        .map(p::Duration)
        .map_err(|e| error(field, format!("not a duration: {e}")))
}

fn opt_from_duration(
    d: Option<ProtoDuration>,
    field: &str,
) -> Result<Option<p::Duration>, PolicyError> {
    d.map(|d| from_duration(d, field)).transpose()
}

/// A setting the Rust type always has: its default when absent.
fn or_default(
    d: Option<ProtoDuration>,
    field: &str,
    default: p::Duration,
) -> Result<p::Duration, PolicyError> {
    Ok(opt_from_duration(d, field)?.unwrap_or(default))
}

fn narrow<T: TryFrom<u32>>(value: u32, field: &str) -> Result<T, PolicyError> {
    T::try_from(value).map_err(|_| error(field, format!("{value} is out of range")))
}

// --- to the contract -------------------------------------------------------------------------

/// The destination's policy as sent in `DestinationProfile.policy` (without `rateLimit` and
/// `loadBalancer`, see the module docs).
pub fn destination_to_proto(d: &p::DestinationPolicy) -> v1::DestinationPolicy {
    v1::DestinationPolicy {
        timeouts: d.timeouts.as_ref().map(timeouts_to_proto),
        retries: d.retries.as_ref().map(retries_to_proto),
        fault: d.fault.as_ref().map(fault_to_proto),
        mirror: d.mirror.as_ref().map(mirror_to_proto),
        circuit_breaker: d.circuit_breaker.as_ref().map(|b| v1::CircuitBreaker {
            max_connections: b.max_connections,
            max_pending_requests: b.max_pending_requests,
            max_requests: b.max_requests,
            max_requests_per_endpoint: b.max_requests_per_endpoint,
        }),
        outlier_detection: d.outlier_detection.as_ref().map(|o| v1::OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            failures: match o.failures {
                p::FailureKind::ServerError => v1::FailureKind::ServerError,
                p::FailureKind::GatewayError => v1::FailureKind::GatewayError,
                p::FailureKind::ConnectFailure => v1::FailureKind::ConnectFailure,
            } as i32,
            base_ejection_time: Some(duration(o.base_ejection_time)),
            max_ejection_time: Some(duration(o.max_ejection_time)),
            max_ejected_percent: u32::from(o.max_ejected_percent),
        }),
        health_check: d.health_check.as_ref().map(|h| v1::HealthCheck {
            http_path: h.http_path.clone().unwrap_or_default(),
            interval: Some(duration(h.interval)),
            timeout: Some(duration(h.timeout)),
            unhealthy_threshold: h.unhealthy_threshold,
            healthy_threshold: h.healthy_threshold,
        }),
    }
}

/// A route's policy as sent in `HttpRoute.policy` (without `rateLimit`).
pub fn route_to_proto(r: &p::RoutePolicy) -> v1::RoutePolicy {
    v1::RoutePolicy {
        timeouts: r.timeouts.as_ref().map(timeouts_to_proto),
        retries: r.retries.as_ref().map(retries_to_proto),
        fault: r.fault.as_ref().map(fault_to_proto),
        mirror: r.mirror.as_ref().map(mirror_to_proto),
    }
}

/// A rate limit of the inbound side, for the requests `matches` matches (empty = all).
pub fn rate_limit_to_proto(
    name: String,
    matches: Vec<v1::HttpMatch>,
    limit: &p::RateLimit,
) -> v1::InboundRateLimit {
    v1::InboundRateLimit {
        name,
        matches,
        requests_per_second: limit.requests_per_second,
        burst: limit.burst.unwrap_or(0),
        per_source: limit.per_source,
    }
}

/// The profile's balancer for a policy's `loadBalancer` (absent: unspecified, the default).
pub fn balancer_to_proto(b: Option<p::LoadBalancer>) -> v1::Balancer {
    match b {
        None => v1::Balancer::Unspecified,
        Some(p::LoadBalancer::Ewma) => v1::Balancer::Ewma,
        Some(p::LoadBalancer::RoundRobin) => v1::Balancer::RoundRobin,
        Some(p::LoadBalancer::LeastRequest) => v1::Balancer::LeastRequest,
    }
}

fn timeouts_to_proto(t: &p::Timeouts) -> v1::Timeouts {
    v1::Timeouts {
        request: t.request.map(duration),
        per_try: t.per_try.map(duration),
        idle: t.idle.map(duration),
    }
}

fn retries_to_proto(r: &p::Retries) -> v1::Retries {
    v1::Retries {
        attempts: r.attempts,
        on: r
            .on
            .iter()
            .map(|on| match on {
                p::RetryOn::ConnectFailure => v1::RetryOn::ConnectFailure,
                p::RetryOn::Reset => v1::RetryOn::Reset,
                p::RetryOn::GatewayError => v1::RetryOn::GatewayError,
                p::RetryOn::ServerError => v1::RetryOn::ServerError,
                p::RetryOn::Timeout => v1::RetryOn::Timeout,
            } as i32)
            .collect(),
        status_codes: r.status_codes.iter().map(|c| u32::from(*c)).collect(),
        grpc_codes: r.grpc_codes.clone(),
        methods: r.methods.clone(),
        allow_non_idempotent: r.allow_non_idempotent,
        backoff: Some(v1::Backoff {
            base: Some(duration(r.backoff.base)),
            max: Some(duration(r.backoff.max)),
        }),
        budget: Some(v1::RetryBudget {
            ratio: r.budget.ratio,
            min_per_second: r.budget.min_per_second,
            ttl: Some(duration(r.budget.ttl)),
        }),
        max_body_bytes: r.max_body_bytes,
    }
}

fn fault_to_proto(f: &p::Fault) -> v1::Fault {
    v1::Fault {
        delay: f.delay.as_ref().map(|d| v1::FaultDelay {
            fixed: Some(duration(d.fixed)),
            percent: d.percent,
        }),
        abort: f.abort.as_ref().map(|a| v1::FaultAbort {
            http_status: a.http_status.map(u32::from),
            grpc_status: a.grpc_status,
            percent: a.percent,
        }),
        sources: f.sources.clone(),
        header: f.header.as_ref().map(|h| v1::HeaderCondition {
            name: h.name.clone(),
            value: h.value.clone(),
        }),
    }
}

fn mirror_to_proto(m: &p::Mirror) -> v1::Mirror {
    v1::Mirror {
        backend: m.backend.clone(),
        percent: m.percent,
    }
}

// --- from the contract -----------------------------------------------------------------------

/// A `DestinationProfile.policy` as the Rust type (`rate_limit` and `load_balancer` are `None`).
pub fn destination_from_proto(
    d: v1::DestinationPolicy,
) -> Result<p::DestinationPolicy, PolicyError> {
    Ok(p::DestinationPolicy {
        timeouts: d.timeouts.map(timeouts_from_proto).transpose()?,
        retries: d.retries.map(retries_from_proto).transpose()?,
        fault: d.fault.map(fault_from_proto).transpose()?,
        rate_limit: None,
        mirror: d.mirror.map(mirror_from_proto),
        circuit_breaker: d.circuit_breaker.map(|b| p::CircuitBreaker {
            max_connections: b.max_connections,
            max_pending_requests: b.max_pending_requests,
            max_requests: b.max_requests,
            max_requests_per_endpoint: b.max_requests_per_endpoint,
        }),
        outlier_detection: d
            .outlier_detection
            .map(|o| -> Result<_, PolicyError> {
                Ok(p::OutlierDetection {
                    consecutive_failures: o.consecutive_failures,
                    failures: match v1::FailureKind::try_from(o.failures) {
                        Ok(v1::FailureKind::Unspecified | v1::FailureKind::ServerError) => {
                            p::FailureKind::ServerError
                        }
                        Ok(v1::FailureKind::GatewayError) => p::FailureKind::GatewayError,
                        Ok(v1::FailureKind::ConnectFailure) => p::FailureKind::ConnectFailure,
                        Err(_) => {
                            return Err(error(
                                "outlierDetection.failures",
                                format!("unknown value {}", o.failures),
                            ));
                        }
                    },
                    base_ejection_time: or_default(
                        o.base_ejection_time,
                        "outlierDetection.baseEjectionTime",
                        p::Duration::from_millis(30_000),
                    )?,
                    max_ejection_time: or_default(
                        o.max_ejection_time,
                        "outlierDetection.maxEjectionTime",
                        p::Duration::from_millis(300_000),
                    )?,
                    max_ejected_percent: narrow(
                        o.max_ejected_percent,
                        "outlierDetection.maxEjectedPercent",
                    )?,
                })
            })
            .transpose()?,
        health_check: d
            .health_check
            .map(|h| -> Result<_, PolicyError> {
                Ok(p::HealthCheck {
                    http_path: Some(h.http_path).filter(|p| !p.is_empty()),
                    interval: or_default(
                        h.interval,
                        "healthCheck.interval",
                        p::Duration::from_millis(10_000),
                    )?,
                    timeout: or_default(
                        h.timeout,
                        "healthCheck.timeout",
                        p::Duration::from_millis(1_000),
                    )?,
                    unhealthy_threshold: h.unhealthy_threshold,
                    healthy_threshold: h.healthy_threshold,
                })
            })
            .transpose()?,
        load_balancer: None,
    })
}

/// An `HttpRoute.policy` as the Rust type (`rate_limit` is `None`).
pub fn route_from_proto(r: v1::RoutePolicy) -> Result<p::RoutePolicy, PolicyError> {
    Ok(p::RoutePolicy {
        timeouts: r.timeouts.map(timeouts_from_proto).transpose()?,
        retries: r.retries.map(retries_from_proto).transpose()?,
        fault: r.fault.map(fault_from_proto).transpose()?,
        rate_limit: None,
        mirror: r.mirror.map(mirror_from_proto),
    })
}

/// The limit of an `InboundRateLimit` (its name and matches are the caller's to map).
pub fn rate_limit_from_proto(l: &v1::InboundRateLimit) -> p::RateLimit {
    p::RateLimit {
        requests_per_second: l.requests_per_second,
        burst: Some(l.burst).filter(|b| *b > 0),
        per_source: l.per_source,
    }
}

/// A policy's `loadBalancer` for the profile's balancer (unspecified or unknown: absent).
pub fn balancer_from_proto(b: i32) -> Option<p::LoadBalancer> {
    match v1::Balancer::try_from(b).ok()? {
        v1::Balancer::Unspecified => None,
        v1::Balancer::Ewma => Some(p::LoadBalancer::Ewma),
        v1::Balancer::RoundRobin => Some(p::LoadBalancer::RoundRobin),
        v1::Balancer::LeastRequest => Some(p::LoadBalancer::LeastRequest),
    }
}

fn timeouts_from_proto(t: v1::Timeouts) -> Result<p::Timeouts, PolicyError> {
    Ok(p::Timeouts {
        request: opt_from_duration(t.request, "timeouts.request")?,
        per_try: opt_from_duration(t.per_try, "timeouts.perTry")?,
        idle: opt_from_duration(t.idle, "timeouts.idle")?,
    })
}

fn retries_from_proto(r: v1::Retries) -> Result<p::Retries, PolicyError> {
    let defaults = p::Backoff::default();
    let budget_defaults = p::RetryBudget::default();
    let on =
        r.on.iter()
            .map(|on| match v1::RetryOn::try_from(*on) {
                Ok(v1::RetryOn::ConnectFailure) => Ok(p::RetryOn::ConnectFailure),
                Ok(v1::RetryOn::Reset) => Ok(p::RetryOn::Reset),
                Ok(v1::RetryOn::GatewayError) => Ok(p::RetryOn::GatewayError),
                Ok(v1::RetryOn::ServerError) => Ok(p::RetryOn::ServerError),
                Ok(v1::RetryOn::Timeout) => Ok(p::RetryOn::Timeout),
                Ok(v1::RetryOn::Unspecified) | Err(_) => {
                    Err(error("retries.on", format!("unknown value {on}")))
                }
            })
            .collect::<Result<_, _>>()?;
    let backoff = r.backoff.unwrap_or_default();
    let budget = r.budget;
    Ok(p::Retries {
        attempts: r.attempts,
        on,
        status_codes: r
            .status_codes
            .iter()
            .map(|c| narrow(*c, "retries.statusCodes"))
            .collect::<Result<_, _>>()?,
        grpc_codes: r.grpc_codes,
        methods: r.methods,
        allow_non_idempotent: r.allow_non_idempotent,
        backoff: p::Backoff {
            base: or_default(backoff.base, "retries.backoff.base", defaults.base)?,
            max: or_default(backoff.max, "retries.backoff.max", defaults.max)?,
        },
        budget: match budget {
            None => budget_defaults,
            Some(b) => p::RetryBudget {
                ratio: b.ratio,
                min_per_second: b.min_per_second,
                ttl: or_default(b.ttl, "retries.budget.ttl", budget_defaults.ttl)?,
            },
        },
        max_body_bytes: r.max_body_bytes,
    })
}

fn fault_from_proto(f: v1::Fault) -> Result<p::Fault, PolicyError> {
    Ok(p::Fault {
        delay: f
            .delay
            .map(|d| -> Result<_, PolicyError> {
                Ok(p::FaultDelay {
                    fixed: from_duration(
                        d.fixed
                            .ok_or_else(|| error("fault.delay.fixed", "is required"))?,
                        "fault.delay.fixed",
                    )?,
                    percent: d.percent,
                })
            })
            .transpose()?,
        abort: f
            .abort
            .map(|a| -> Result<_, PolicyError> {
                Ok(p::FaultAbort {
                    http_status: a
                        .http_status
                        .map(|s| narrow(s, "fault.abort.httpStatus"))
                        .transpose()?,
                    grpc_status: a.grpc_status,
                    percent: a.percent,
                })
            })
            .transpose()?,
        sources: f.sources,
        header: f.header.map(|h| p::HeaderCondition {
            name: h.name,
            value: h.value,
        }),
    })
}

fn mirror_from_proto(m: v1::Mirror) -> p::Mirror {
    p::Mirror {
        backend: m.backend,
        percent: m.percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section and every field set (most to values other than their defaults).
    fn full() -> p::DestinationPolicy {
        let json = r#"{
            "timeouts": {"request": "2s", "perTry": "500ms", "idle": "1m"},
            "retries": {"attempts": 3, "on": ["reset", "server-error", "timeout"],
                "statusCodes": [409, 429], "grpcCodes": [14], "methods": ["GET", "POST"],
                "allowNonIdempotent": true, "backoff": {"base": "10ms", "max": "1s"},
                "budget": {"ratio": 0.5, "minPerSecond": 3, "ttl": "5s"}, "maxBodyBytes": 0},
            "fault": {"delay": {"fixed": "150us", "percent": 12.5},
                "abort": {"grpcStatus": 14, "percent": 1},
                "sources": ["spiffe://cluster.local/ns/a/sa/b"],
                "header": {"name": "x-chaos", "value": "on"}},
            "mirror": {"backend": "web-shadow", "percent": 5},
            "circuitBreaker": {"maxConnections": 10, "maxPendingRequests": 0,
                "maxRequestsPerEndpoint": 4},
            "outlierDetection": {"consecutiveFailures": 7, "failures": "connect-failure",
                "baseEjectionTime": "1s", "maxEjectionTime": "9s", "maxEjectedPercent": 100},
            "healthCheck": {"httpPath": "/healthz", "interval": "3s", "timeout": "250ms",
                "unhealthyThreshold": 4, "healthyThreshold": 1}
        }"#;
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_destination_policy_round_trips_every_field() {
        let policy = full();
        let back = destination_from_proto(destination_to_proto(&policy)).unwrap();
        assert_eq!(back, policy);
        // Sub-millisecond durations are exact.
        let delay = back.fault.unwrap().delay.unwrap().fixed;
        assert_eq!(delay.get(), StdDuration::from_micros(150));
    }

    #[test]
    fn rate_limit_and_load_balancer_travel_elsewhere() {
        let mut policy = full();
        policy.rate_limit = Some(p::RateLimit {
            requests_per_second: 2.5,
            burst: None,
            per_source: true,
        });
        policy.load_balancer = Some(p::LoadBalancer::RoundRobin);
        let back = destination_from_proto(destination_to_proto(&policy)).unwrap();
        assert_eq!((back.rate_limit, back.load_balancer), (None, None));

        let limit = policy.rate_limit.as_ref().unwrap();
        let sent = rate_limit_to_proto("demo/web".into(), vec![], limit);
        assert_eq!(sent.burst, 0, "absent burst: 0");
        assert_eq!(&rate_limit_from_proto(&sent), limit);
        let with_burst = p::RateLimit {
            burst: Some(9),
            ..limit.clone()
        };
        let sent = rate_limit_to_proto("x".into(), vec![], &with_burst);
        assert_eq!(rate_limit_from_proto(&sent), with_burst);

        for b in [
            None,
            Some(p::LoadBalancer::Ewma),
            Some(p::LoadBalancer::RoundRobin),
            Some(p::LoadBalancer::LeastRequest),
        ] {
            assert_eq!(balancer_from_proto(balancer_to_proto(b) as i32), b);
        }
    }

    #[test]
    fn a_route_policy_round_trips_and_defaults_survive() {
        let full = full();
        let route = p::RoutePolicy {
            timeouts: full.timeouts.clone(),
            retries: full.retries.clone(),
            fault: full.fault.clone(),
            rate_limit: None,
            mirror: full.mirror.clone(),
        };
        assert_eq!(route_from_proto(route_to_proto(&route)).unwrap(), route);
        // Defaults written out by serde come back as they were.
        let minimal: p::RoutePolicy =
            serde_json::from_str(r#"{"retries": {"attempts": 1}}"#).unwrap();
        assert_eq!(route_from_proto(route_to_proto(&minimal)).unwrap(), minimal);
        assert_eq!(
            route_from_proto(v1::RoutePolicy::default()).unwrap(),
            p::RoutePolicy::default()
        );
    }

    #[test]
    fn what_the_rust_types_cannot_hold_is_refused_with_its_field() {
        let negative = v1::RoutePolicy {
            timeouts: Some(v1::Timeouts {
                request: Some(ProtoDuration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            route_from_proto(negative).unwrap_err().field,
            "timeouts.request"
        );
        let mut retries = retries_to_proto(&full().retries.unwrap());
        retries.on.push(99);
        let err = route_from_proto(v1::RoutePolicy {
            retries: Some(retries),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "retries.on: unknown value 99");
        let mut sent = destination_to_proto(&full());
        sent.outlier_detection.as_mut().unwrap().max_ejected_percent = 300;
        assert_eq!(
            destination_from_proto(sent).unwrap_err().field,
            "outlierDetection.maxEjectedPercent"
        );
    }
}
