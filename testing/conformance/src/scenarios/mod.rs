//! The SMI conformance scenarios (and Trellis's TrafficPolicy rows), written once and run on
//! every platform's mesh with the same YAML. Each change is applied, then verified within [`APPLY_WITHIN`]: small probe batches
//! run until the new state shows (or the time is up), then one counted batch on one keep-alive
//! connection must match exactly.
//!
//! - [`split`]: TrafficSplit (weights, HTTPRouteGroup matches, no split).
//! - [`access`]: TrafficTarget under default deny (TCPRoute, HTTPRouteGroup paths and methods,
//!   sources, ports, revocation on an open connection, plaintext callers).
//! - [`hosts`]: on meshes on hosts only: steady load across a split move, TrafficSplit
//!   propagation p50/p99, the controller's and the registry's host unplugged.
//! - [`policy`]: Trellis's TrafficPolicy (not SMI), one row per resilience capability (timeouts,
//!   retries, faults, rate limits, circuit breaker, mirroring, outlier ejection, an invalid
//!   policy), each checked applied and then removed.

pub mod access;
pub mod hosts;
pub mod policy;
pub mod split;

pub use access::{ACCESS_SCENARIOS, access_scenarios};
pub use hosts::{HOSTS_SCENARIOS, hosts_scenarios};
pub use policy::{POLICY_SCENARIOS, policy_scenarios};
pub use split::{SPLIT_SCENARIOS, split_scenarios};

use std::fmt;
use std::time::Duration;

use anyhow::bail;

use crate::harness::mesh::{APPLY_WITHIN, Call, Mesh};
use trellis_echo::client::CallReport;

/// The result of one scenario on one platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Passed; what was seen.
    Pass(String),
    /// Failed; why.
    Fail(String),
    /// Not run; why.
    Skip(String),
}

impl Outcome {
    pub fn is_fail(&self) -> bool {
        matches!(self, Outcome::Fail(_))
    }

    pub(crate) fn of(result: anyhow::Result<String>) -> Self {
        match result {
            Ok(seen) => Outcome::Pass(seen),
            Err(e) => Outcome::Fail(format!("{e:#}")),
        }
    }
}

/// The caller of the scenarios.
pub(crate) const CALLER: &str = "app-a";
/// Responders as the echo apps name themselves (`service/version`).
pub(crate) const B: &str = "app-b/b";
pub(crate) const C: &str = "app-c/c";

/// Sends `probe` from `caller` until `ok` holds (at most [`APPLY_WITHIN`]); how long it took.
pub(crate) async fn until(
    mesh: &Mesh,
    caller: &str,
    probe: &Call,
    what: &str,
    ok: impl Fn(&CallReport) -> bool,
) -> anyhow::Result<Duration> {
    let start = tokio::time::Instant::now();
    loop {
        let r = mesh.call(caller, probe).await?;
        if ok(&r) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > APPLY_WITHIN {
            bail!(
                "not applied within {APPLY_WITHIN:?} ({what}); last probe: {}",
                seen(&r)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn count(r: &CallReport, responder: &str) -> u32 {
    r.by_responder.get(responder).copied().unwrap_or(0)
}

/// Every one of `n` requests answered 200 by an app, none failed.
pub(crate) fn all_ok(r: &CallReport, n: u32) -> bool {
    r.failed == 0 && r.statuses.get(&200).copied().unwrap_or(0) == n && r.mesh_errors.is_empty()
}

/// Every one of `n` requests refused by the mesh with 403 `forbidden`, none reaching an app.
pub(crate) fn all_denied(r: &CallReport, n: u32) -> bool {
    r.failed == 0
        && r.statuses.get(&403).copied().unwrap_or(0) == n
        && r.mesh_errors.get("forbidden").copied().unwrap_or(0) == n
        && r.by_responder.is_empty()
}

/// What a batch saw, compactly.
pub fn seen(r: &CallReport) -> String {
    let mut parts = vec![format!("b={} c={}", count(r, B), count(r, C))];
    let others: Vec<String> = r
        .by_responder
        .iter()
        .filter(|(k, _)| *k != B && *k != C)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.extend(others);
    let statuses: Vec<String> = r.statuses.iter().map(|(s, n)| format!("{s}x{n}")).collect();
    parts.push(format!("status {}", statuses.join(",")));
    if !r.mesh_errors.is_empty() {
        parts.push(format!("mesh errors {:?}", r.mesh_errors));
    }
    if r.failed > 0 {
        parts.push(format!("failed {}", r.failed));
    }
    if r.reconnects > 0 {
        parts.push(format!("reconnects {}", r.reconnects));
    }
    parts.join(" ")
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Pass(_) => f.write_str("pass"),
            Outcome::Fail(_) => f.write_str("FAIL"),
            Outcome::Skip(_) => f.write_str("skip"),
        }
    }
}
