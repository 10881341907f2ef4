//! The TrafficPolicy scenarios (issue #12): one row per resilience capability, the same
//! `policy.trellis.io/v1alpha1` TrafficPolicy YAML on every platform, applied the way the
//! platform takes SMI policy (a file in the watched directory, or an object through the
//! Kubernetes API). Each row proves both directions: the policy is applied, waited for
//! ([`until`]) and checked exactly, then removed and the behaviour checked gone.
//!
//! The caller is `app-a`. The policies target `app-b` (one endpoint: b), except outlier ejection,
//! which needs a service with a failing and a healthy endpoint: the root `app-svc` (b and c). The
//! upstream misbehaves on command through the echo app's query shaping (`delay_ms`, `fail_every`,
//! `fail_version`; see `trellis_echo::echo`), and the echo app's counts say what reached it.
//!
//! Under [`Security::Identity`] the calls are allowed by TrafficTargets from `service-a` to
//! `service-b` and `service-c` (the mirror's copies go to c as `service-a`), applied first and
//! removed at the end. The proxy's own tests (`proxy/tests/resilience.rs`) cover each capability
//! in depth against one local upstream; these rows show the controller, every platform's policy
//! source and the proxies agreeing on the same YAML.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{B, C, CALLER, Outcome, all_ok, count, ms, seen, until};
use crate::harness::mesh::{APPLY_WITHIN, Call, Mesh, ROOT, Security};
use crate::scenarios::split::allow_a_yaml;
use trellis_echo::client::CallReport;
use trellis_echo::plain as http;

/// The TrafficPolicy scenarios, in the order they run on one mesh.
pub const POLICY_SCENARIOS: [&str; 9] = [
    "policy-timeout: request timeout answers 504 timeout; removed, the slow answer",
    "policy-retries: every call answered despite a failing share; POST not retried",
    "policy-fault: abort 418 only with the header, delay measured; removed, none",
    "policy-rate-limit: 429 with retry-after beyond the burst; removed, none",
    "policy-circuit-breaker: maxRequests 1, concurrent calls refused 503 overloaded",
    "policy-mirror: mirror gets a copy of each call, caller sees only b",
    "policy-outlier: the failing endpoint of app-svc ejected; removed, back",
    "policy-health-check: b failing its probes gets no call, none failing; removed, back",
    "policy-invalid: percent over 100 reported, the last good policy keeps applying",
];

/// The harness name the TrafficPolicy documents are applied under (`<policy dir>/<name>.yaml`,
/// or the objects it holds on Kubernetes).
const POLICY: &str = "traffic-policy";
/// The harness name of the TrafficTargets that let `service-a` call b and c.
const ALLOW_POLICY: &str = "policy-allow-a";
/// The service most policies target (its one endpoint is b).
const DEST: &str = "app-b";

/// A TrafficPolicy named `name` for the Service `target`; `spec` holds its sections, each line
/// indented by two spaces (below `spec:`).
pub fn policy_yaml(name: &str, target: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.trellis.io/v1alpha1
kind: TrafficPolicy
metadata: {{ name: {name}, namespace: default }}
spec:
  targetRef: {{ kind: Service, name: {target} }}
{spec}"
    )
}

/// Each scenario's policy: (object name, target, spec).
const TIMEOUT: (&str, &str, &str) = (
    "conformance-timeout",
    DEST,
    "  timeouts: { request: 400ms }\n",
);
const RETRIES: (&str, &str, &str) = (
    "conformance-retries",
    DEST,
    "  retries: { attempts: 2, on: [gateway-error] }\n",
);
const FAULT_ABORT: (&str, &str, &str) = (
    "conformance-fault",
    DEST,
    "  fault:
    abort: { httpStatus: 418, percent: 100 }
    header: { name: x-conformance-fault, value: abort }
",
);
const FAULT_DELAY: (&str, &str, &str) = (
    "conformance-fault",
    DEST,
    "  fault:
    delay: { fixed: 500ms, percent: 100 }
    header: { name: x-conformance-fault, value: delay }
",
);
const RATE_LIMIT: (&str, &str, &str) = (
    "conformance-rate-limit",
    DEST,
    "  rateLimit: { requestsPerSecond: 5, burst: 3 }\n",
);
const BREAKER: (&str, &str, &str) = (
    "conformance-circuit-breaker",
    DEST,
    "  circuitBreaker: { maxRequests: 1 }\n",
);
const MIRROR: (&str, &str, &str) = (
    "conformance-mirror",
    DEST,
    "  mirror: { backend: app-c, percent: 100 }\n",
);
/// Round robin makes the healthy answers alternate, so only ejection keeps b out of a long
/// batch (the default balancer also avoids a failing endpoint, but only for some 100 requests).
const OUTLIER: (&str, &str, &str) = (
    "conformance-outlier",
    ROOT,
    "  loadBalancer: roundRobin
  outlierDetection: { consecutiveFailures: 1, baseEjectionTime: 30s }
",
);
/// Active health checks on app-svc whose probe path fails on b only (`fail_version=b`): b is out
/// after 2 probes (about 400 ms), before any request failed. Round robin, so b would otherwise
/// get every other call.
const HEALTH_CHECK: (&str, &str, &str) = (
    "conformance-health-check",
    ROOT,
    "  loadBalancer: roundRobin
  healthCheck: { httpPath: \"/health?fail_version=b\", interval: 200ms, timeout: 150ms, unhealthyThreshold: 2, healthyThreshold: 1 }
",
);
/// FAULT_ABORT's object made invalid; had it applied (clamped or not), the status would be 503.
const INVALID: (&str, &str, &str) = (
    "conformance-fault",
    DEST,
    "  fault:
    abort: { httpStatus: 503, percent: 150 }
    header: { name: x-conformance-fault, value: abort }
",
);

fn yaml(p: (&str, &str, &str)) -> String {
    policy_yaml(p.0, p.1, p.2)
}

/// Runs every TrafficPolicy scenario in order on `mesh`; the policy is removed at the end.
pub async fn policy_scenarios(mesh: &Mesh) -> Vec<(&'static str, Outcome)> {
    if mesh.security == Security::Identity
        && let Err(e) = mesh
            .platform
            .apply_policy(ALLOW_POLICY, &allow_a_yaml())
            .await
    {
        let why = format!("applying the TrafficTargets that allow service-a: {e:#}");
        return POLICY_SCENARIOS
            .iter()
            .map(|s| (*s, Outcome::Fail(why.clone())))
            .collect();
    }
    let mut results = Vec::new();
    for (i, name) in POLICY_SCENARIOS.iter().enumerate() {
        let result = match i {
            0 => timeout(mesh).await,
            1 => retries(mesh).await,
            2 => fault(mesh).await,
            3 => rate_limit(mesh).await,
            4 => circuit_breaker(mesh).await,
            5 => mirror(mesh).await,
            6 => outlier(mesh).await,
            7 => health_check(mesh).await,
            _ => invalid(mesh).await,
        };
        // A row that failed half-way must not leave its policy to the next one.
        let _ = mesh.platform.delete_policy(POLICY).await;
        results.push((*name, Outcome::of(result)));
    }
    let _ = mesh.platform.delete_policy(ALLOW_POLICY).await;
    results
}

fn status(r: &CallReport, code: u16) -> u32 {
    r.statuses.get(&code).copied().unwrap_or(0)
}

fn mesh_error(r: &CallReport, reason: &str) -> u32 {
    r.mesh_errors.get(reason).copied().unwrap_or(0)
}

/// Every one of `n` requests answered by the mesh itself with `code` and `reason`, none by an
/// app.
fn all_mesh(r: &CallReport, n: u32, code: u16, reason: &str) -> bool {
    r.failed == 0 && status(r, code) == n && mesh_error(r, reason) == n && r.by_responder.is_empty()
}

/// Every one of `n` requests answered 200 by b.
fn all_b(r: &CallReport, n: u32) -> bool {
    all_ok(r, n) && count(r, B) == n
}

fn to_b(path: &str, n: u32) -> Call {
    Call::get(DEST, path, n)
}

/// Runs `check` until it gives a value (every 100 ms, at most [`APPLY_WITHIN`]): the value and
/// how long it took. `check` answers `Err(why)` while the state is not there yet.
async fn poll<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<T, String>>>,
{
    let start = tokio::time::Instant::now();
    loop {
        match check().await? {
            Ok(value) => return Ok((value, start.elapsed())),
            Err(why) if start.elapsed() > APPLY_WITHIN => {
                bail!("not within {APPLY_WITHIN:?} ({what}); last: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The answer's latency bounds, for the pass lines.
fn took(r: &CallReport) -> String {
    match (r.fastest_ms, r.slowest_ms) {
        (Some(f), Some(s)) => format!("{f}-{s} ms"),
        _ => "no answer".into(),
    }
}

/// `timeouts.request: 400ms` against answers that take 1.2 s: 504 `timeout`, after the timeout
/// and before the answer, while fast calls are answered; removed, the slow answer arrives.
async fn timeout(mesh: &Mesh) -> anyhow::Result<String> {
    // Wide margins: a fast call on a loaded 2-core machine must not reach the timeout.
    const DELAY_MS: u64 = 1200;
    const TIMEOUT_MS: u64 = 400;
    let slow = to_b(&format!("/echo?delay_ms={DELAY_MS}"), 1);
    mesh.platform.apply_policy(POLICY, &yaml(TIMEOUT)).await?;
    let applied = until(mesh, CALLER, &slow, "504 timeout", |r| {
        all_mesh(r, 1, 504, "timeout")
    })
    .await?;
    let cut = mesh
        .call(CALLER, &slow.clone().count(3).concurrency(3))
        .await?;
    if !all_mesh(&cut, 3, 504, "timeout") {
        bail!(
            "expected 3 of 3 slow calls answered 504 timeout: {}",
            seen(&cut)
        );
    }
    // Not before the timeout (a refusal), and not after the app's answer.
    if cut.fastest_ms < Some(TIMEOUT_MS) || cut.slowest_ms >= Some(DELAY_MS) {
        bail!(
            "504 after {}: expected between {TIMEOUT_MS} and {DELAY_MS} ms",
            took(&cut)
        );
    }
    let fast = mesh.call(CALLER, &to_b("/echo", 5)).await?;
    if !all_b(&fast, 5) {
        bail!(
            "fast calls under the timeout: expected 5 of 5 from b: {}",
            seen(&fast)
        );
    }
    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &slow, "the slow answer", |r| all_b(r, 1)).await?;
    let answered = mesh
        .call(CALLER, &slow.clone().count(2).concurrency(2))
        .await?;
    if !all_b(&answered, 2) || answered.fastest_ms < Some(DELAY_MS) {
        bail!(
            "removed: expected 2 of 2 answered by b after {DELAY_MS} ms: {} in {}",
            seen(&answered),
            took(&answered)
        );
    }
    Ok(format!(
        "slow: {} in {}; fast: {}; removed: {} in {} (applied in {}, removed in {})",
        seen(&cut),
        took(&cut),
        seen(&fast),
        seen(&answered),
        took(&answered),
        ms(applied),
        ms(removed)
    ))
}

/// b fails every 2nd request it receives (`fail_every=2`): with retries every call is
/// answered, each failed first try retried once (b receives 2n - 1 requests for n calls from a
/// fresh count); a POST is not retried (half fail); removed, half the GETs fail.
async fn retries(mesh: &Mesh) -> anyhow::Result<String> {
    const N: u32 = 20;
    let flaky = to_b("/echo?fail_every=2", 4);
    mesh.platform.apply_policy(POLICY, &yaml(RETRIES)).await?;
    let applied = until(mesh, CALLER, &flaky, "every call answered", |r| all_b(r, 4)).await?;
    // A fresh count: request 1 answers, then every call's first try fails and its retry answers.
    mesh.reset_counts().await?;
    let retried = mesh.call(CALLER, &flaky.clone().count(N)).await?;
    if !all_b(&retried, N) {
        bail!(
            "with retries: expected {N} of {N} answered by b: {}",
            seen(&retried)
        );
    }
    let received = mesh.counts(DEST).await?.total;
    if received != u64::from(2 * N - 1) {
        bail!(
            "with retries: b received {received} requests for {N} calls, expected {} (each failed first try retried once)",
            2 * N - 1
        );
    }
    mesh.reset_counts().await?;
    let post = mesh
        .call(CALLER, &flaky.clone().method("POST").count(10))
        .await?;
    let post_received = mesh.counts(DEST).await?.total;
    if status(&post, 503) != 5 || status(&post, 200) != 5 || post_received != 10 {
        bail!(
            "POST (not idempotent): expected 5 failures seen and 10 requests at b, no retry: {}; b received {post_received}",
            seen(&post)
        );
    }
    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &flaky, "the failures show", |r| {
        status(r, 503) == 2
    })
    .await?;
    mesh.reset_counts().await?;
    let bare = mesh.call(CALLER, &flaky.clone().count(N)).await?;
    let bare_received = mesh.counts(DEST).await?.total;
    if status(&bare, 503) != N / 2 || status(&bare, 200) != N / 2 || bare_received != u64::from(N) {
        bail!(
            "removed: expected {} of {N} failing and {N} requests at b: {}; b received {bare_received}",
            N / 2,
            seen(&bare)
        );
    }
    Ok(format!(
        "GET {}, b received {received}; POST {}; removed: {} (applied in {}, removed in {})",
        seen(&retried),
        seen(&post),
        seen(&bare),
        ms(applied),
        ms(removed)
    ))
}

/// An abort fault (418, header `x-conformance-fault: abort`) answers exactly the matching
/// requests with 418 `fault-injected`, which never reach b; a delay fault (500 ms, header
/// `x-conformance-fault: delay`) holds exactly the matching requests; removed, neither.
async fn fault(mesh: &Mesh) -> anyhow::Result<String> {
    const DELAY_MS: u64 = 500;
    let header = "x-conformance-fault";
    let aborted = to_b("/echo", 2).header(header, "abort");
    let delayed = to_b("/echo", 1).header(header, "delay");
    let other = to_b("/echo", 10).header(header, "something-else");
    let plain = to_b("/echo", 10);

    mesh.platform
        .apply_policy(POLICY, &yaml(FAULT_ABORT))
        .await?;
    let applied = until(mesh, CALLER, &aborted, "418 fault-injected", |r| {
        all_mesh(r, 2, 418, "fault-injected")
    })
    .await?;
    mesh.reset_counts().await?;
    let hit = mesh.call(CALLER, &aborted.clone().count(10)).await?;
    let miss = mesh.call(CALLER, &other).await?;
    let bare = mesh.call(CALLER, &plain).await?;
    if !all_mesh(&hit, 10, 418, "fault-injected") {
        bail!(
            "matching: expected 10 of 10 answered 418 fault-injected: {}",
            seen(&hit)
        );
    }
    if !all_b(&miss, 10) || !all_b(&bare, 10) {
        bail!(
            "not matching: expected every call answered by b: other value {}; no header {}",
            seen(&miss),
            seen(&bare)
        );
    }
    let received = mesh.counts(DEST).await?.total;
    if received != 20 {
        bail!("b received {received} requests, expected only the 20 not matching");
    }

    mesh.platform
        .apply_policy(POLICY, &yaml(FAULT_DELAY))
        .await?;
    let delay_applied = until(mesh, CALLER, &delayed, "a delayed answer", |r| {
        all_b(r, 1) && r.fastest_ms >= Some(DELAY_MS)
    })
    .await?;
    let slow = mesh.call(CALLER, &delayed.clone().count(3)).await?;
    let fast = mesh.call(CALLER, &plain.clone().count(3)).await?;
    if !all_b(&slow, 3) || slow.fastest_ms < Some(DELAY_MS) {
        bail!(
            "delay: expected 3 of 3 answered by b after {DELAY_MS} ms: {} in {}",
            seen(&slow),
            took(&slow)
        );
    }
    if !all_b(&fast, 3) || fast.slowest_ms >= Some(DELAY_MS) {
        bail!(
            "delay: calls without the header held: {} in {}",
            seen(&fast),
            took(&fast)
        );
    }

    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &delayed, "no delay", |r| {
        all_b(r, 1) && r.slowest_ms < Some(DELAY_MS)
    })
    .await?;
    let gone = mesh.call(CALLER, &aborted.clone().count(5)).await?;
    if !all_b(&gone, 5) {
        bail!(
            "removed: expected 5 of 5 with the abort header answered by b: {}",
            seen(&gone)
        );
    }
    Ok(format!(
        "abort: matching {}, other value {}, no header {}, b received {received}; delay: matching {} in {}, no header in {}; removed: {} (applied in {}, delay in {}, removed in {})",
        seen(&hit),
        seen(&miss),
        seen(&bare),
        seen(&slow),
        took(&slow),
        took(&fast),
        seen(&gone),
        ms(applied),
        ms(delay_applied),
        ms(removed)
    ))
}

/// `rateLimit: 5/s, burst 3` in b's proxy: from a full bucket, a batch gets the burst (plus what
/// refills while it runs) and then 429 `rate-limited` with `retry-after`; removed, no limit.
async fn rate_limit(mesh: &Mesh) -> anyhow::Result<String> {
    const RPS: f64 = 5.0;
    const BURST: u32 = 3;
    const N: u32 = 10;
    let probe = to_b("/echo", BURST + 2);
    mesh.platform
        .apply_policy(POLICY, &yaml(RATE_LIMIT))
        .await?;
    let applied = until(mesh, CALLER, &probe, "429", |r| status(r, 429) > 0).await?;
    // The probes emptied the bucket: wait until it is full again.
    tokio::time::sleep(Duration::from_secs_f64(f64::from(BURST) / RPS + 0.3)).await;
    mesh.reset_counts().await?;
    let start = tokio::time::Instant::now();
    let r = mesh.call(CALLER, &to_b("/echo", N)).await?;
    let refilled = (start.elapsed().as_secs_f64() * RPS).ceil() as u32;
    let (ok, limited) = (status(&r, 200), status(&r, 429));
    if !(BURST..=BURST + refilled).contains(&ok) || ok + limited != N {
        bail!(
            "expected {BURST} (+{refilled} refilled during the batch) of {N} answered, the rest 429: {}",
            seen(&r)
        );
    }
    let with_retry_after: u32 = r
        .retry_after
        .iter()
        .filter(|(v, _)| v.parse::<u64>().is_ok_and(|s| s >= 1))
        .map(|(_, n)| n)
        .sum();
    if mesh_error(&r, "rate-limited") != limited || with_retry_after != limited {
        bail!(
            "expected each of the {limited} refusals with x-trellis-error rate-limited and retry-after >= 1 s: {}, retry-after {:?}",
            seen(&r),
            r.retry_after
        );
    }
    let received = mesh.counts(DEST).await?.total;
    if received != u64::from(ok) {
        bail!("b received {received} requests, expected the {ok} let through");
    }
    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &to_b("/echo", N), "no 429", |r| all_b(r, N)).await?;
    let free = mesh.call(CALLER, &to_b("/echo", 2 * N)).await?;
    if !all_b(&free, 2 * N) {
        bail!(
            "removed: expected {} of {} answered by b: {}",
            2 * N,
            2 * N,
            seen(&free)
        );
    }
    Ok(format!(
        "{}, retry-after {:?}; removed: {} (applied in {}, removed in {})",
        seen(&r),
        r.retry_after,
        seen(&free),
        ms(applied),
        ms(removed)
    ))
}

/// `circuitBreaker.maxRequests: 1`: four calls at once on their own connections, each held
/// 400 ms by b: the breaker lets some through and answers the others 503 `overloaded` at once,
/// without reaching b; removed, all four answered.
async fn circuit_breaker(mesh: &Mesh) -> anyhow::Result<String> {
    const LANES: u32 = 4;
    let slow = to_b("/echo?delay_ms=400", LANES).concurrency(LANES);
    mesh.platform.apply_policy(POLICY, &yaml(BREAKER)).await?;
    let applied = until(mesh, CALLER, &slow, "503 overloaded", |r| {
        mesh_error(r, "overloaded") > 0
    })
    .await?;
    mesh.reset_counts().await?;
    let r = mesh.call(CALLER, &slow).await?;
    let (ok, refused) = (status(&r, 200), mesh_error(&r, "overloaded"));
    if ok == 0 || refused == 0 || ok + refused != LANES || status(&r, 503) != refused {
        bail!(
            "expected some of {LANES} concurrent calls answered by b and the rest 503 overloaded: {}",
            seen(&r)
        );
    }
    let received = mesh.counts(DEST).await?.total;
    if received != u64::from(ok) {
        bail!("b received {received} requests, expected only the {ok} the breaker let through");
    }
    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &slow, "all answered", |r| all_b(r, LANES)).await?;
    let free = mesh.call(CALLER, &slow).await?;
    if !all_b(&free, LANES) {
        bail!(
            "removed: expected {LANES} of {LANES} answered by b: {}",
            seen(&free)
        );
    }
    Ok(format!(
        "{}; removed: {} (applied in {}, removed in {})",
        seen(&r),
        seen(&free),
        ms(applied),
        ms(removed)
    ))
}

/// What c's app has received in all.
async fn c_received(mesh: &Mesh) -> anyhow::Result<u64> {
    Ok(mesh.counts("app-c").await?.total)
}

/// `mirror: app-c, 100%` on app-b: the caller's answers all come from b, and c's app counts one
/// copy of each call (from app-a, same path); removed, c gets none.
async fn mirror(mesh: &Mesh) -> anyhow::Result<String> {
    const N: u32 = 20;
    // Copies are sent in the background: give them this long to arrive (or, removed, not).
    const SETTLE: Duration = Duration::from_millis(500);
    mesh.platform.apply_policy(POLICY, &yaml(MIRROR)).await?;
    let (_, applied) = poll("c receives copies", || async {
        mesh.reset_counts().await?;
        let r = mesh.call(CALLER, &to_b("/echo", 3)).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let copies = c_received(mesh).await?;
        Ok(if copies > 0 {
            Ok(())
        } else {
            Err(format!("{}; c received 0", seen(&r)))
        })
    })
    .await?;
    tokio::time::sleep(SETTLE).await;
    mesh.reset_counts().await?;
    let r = mesh.call(CALLER, &to_b("/mirrored", N)).await?;
    if !all_b(&r, N) {
        bail!("the caller should see only b: {}", seen(&r));
    }
    let (_, _) = poll("c counts every copy", || async {
        let copies = c_received(mesh).await?;
        Ok(if copies >= u64::from(N) {
            Ok(())
        } else {
            Err(format!("c received {copies} of {N}"))
        })
    })
    .await?;
    tokio::time::sleep(SETTLE).await;
    let c = mesh.counts("app-c").await?;
    let b = mesh.counts(DEST).await?;
    let n = u64::from(N);
    if c.total != n || c.by_caller.get(CALLER) != Some(&n) || c.by_path.get("/mirrored") != Some(&n)
    {
        bail!("expected c to receive exactly {N} copies of /mirrored from {CALLER}: {c:?}");
    }
    if b.total != n {
        bail!("b received {} requests, expected {N}", b.total);
    }
    mesh.platform.delete_policy(POLICY).await?;
    let (_, removed) = poll("c receives no copies", || async {
        mesh.reset_counts().await?;
        let r = mesh.call(CALLER, &to_b("/echo", 3)).await?;
        tokio::time::sleep(SETTLE).await;
        let copies = c_received(mesh).await?;
        Ok(if copies == 0 && all_b(&r, 3) {
            Ok(())
        } else {
            Err(format!("{}; c received {copies}", seen(&r)))
        })
    })
    .await?;
    mesh.reset_counts().await?;
    let gone = mesh.call(CALLER, &to_b("/mirrored", N)).await?;
    tokio::time::sleep(SETTLE).await;
    let after = c_received(mesh).await?;
    if !all_b(&gone, N) || after != 0 {
        bail!("removed: {}; c received {after}, expected 0", seen(&gone));
    }
    Ok(format!(
        "caller {}; c received {} copies from {CALLER}; removed: c received 0 (applied in {}, removed in {})",
        seen(&r),
        c.total,
        ms(applied),
        ms(removed)
    ))
}

/// `outlierDetection: 1 failure, 30 s` (round robin) on app-svc while b fails every request
/// (`fail_version=b`): after b's first failure every call goes to c, even calls b would answer;
/// removed, b answers again.
async fn outlier(mesh: &Mesh) -> anyhow::Result<String> {
    // More than the default balancer takes to try a failed endpoint again (about 100 lost
    // comparisons), so only an ejection keeps b out of the whole batch.
    const PLAIN: u32 = 250;
    let failing = Call::get(ROOT, "/echo?fail_version=b", 4);
    let plain = Call::get(ROOT, "/echo", PLAIN);
    // Both endpoints in the root first: all to c proves nothing while b is not there.
    let probe = Call::get(ROOT, "/echo", 50);
    until(
        mesh,
        CALLER,
        &probe,
        "before: b and c both answer app-svc",
        |r| all_ok(r, 50) && count(r, B) > 0 && count(r, C) > 0,
    )
    .await?;
    mesh.platform.apply_policy(POLICY, &yaml(OUTLIER)).await?;
    let (_, applied) = poll("b ejected", || async {
        let f = mesh.call(CALLER, &failing).await?;
        let p = mesh.call(CALLER, &plain).await?;
        Ok(if all_ok(&p, PLAIN) && count(&p, C) == PLAIN {
            Ok(())
        } else {
            Err(format!("failing {}; then {}", seen(&f), seen(&p)))
        })
    })
    .await?;
    mesh.reset_counts().await?;
    let f = mesh.call(CALLER, &failing.clone().count(20)).await?;
    let p = mesh.call(CALLER, &plain).await?;
    let b_received = mesh.counts("app-b").await?.total;
    let all_c = |r: &CallReport, n: u32| all_ok(r, n) && count(r, C) == n;
    if !all_c(&f, 20) || !all_c(&p, PLAIN) {
        bail!(
            "b ejected: expected every call answered by c: failing {}; plain {}",
            seen(&f),
            seen(&p)
        );
    }
    if b_received != 0 {
        bail!("b ejected, yet its app received {b_received} requests");
    }
    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &probe, "b answers again", |r| {
        all_ok(r, 50) && count(r, B) > 0
    })
    .await?;
    let back = mesh.call(CALLER, &probe.clone().count(100)).await?;
    if !all_ok(&back, 100) || count(&back, B) == 0 || count(&back, C) == 0 {
        bail!(
            "removed: expected b and c both answering 100 calls: {}",
            seen(&back)
        );
    }
    Ok(format!(
        "b ejected: failing {}, plain {}, b received 0; removed: {} (applied in {}, removed in {})",
        seen(&f),
        seen(&p),
        seen(&back),
        ms(applied),
        ms(removed)
    ))
}

/// `healthCheck` on app-svc whose probe path b fails: once b failed its probes, every call
/// (all of them ones b would answer) goes to c and b's app receives no call, only probes;
/// removed, b answers again at once (a destination without checks ignores the flags).
async fn health_check(mesh: &Mesh) -> anyhow::Result<String> {
    const N: u32 = 100;
    let probe = Call::get(ROOT, "/echo", 50);
    until(
        mesh,
        CALLER,
        &probe,
        "before: b and c both answer app-svc",
        |r| all_ok(r, 50) && count(r, B) > 0 && count(r, C) > 0,
    )
    .await?;
    mesh.platform
        .apply_policy(POLICY, &yaml(HEALTH_CHECK))
        .await?;
    let applied = until(mesh, CALLER, &probe, "b out after its failed probes", |r| {
        all_ok(r, 50) && count(r, C) == 50
    })
    .await?;
    mesh.reset_counts().await?;
    let r = mesh.call(CALLER, &probe.clone().count(N)).await?;
    let b = mesh.counts("app-b").await?;
    let b_calls = b.by_path.get("/echo").copied().unwrap_or(0);
    let b_probes = b.by_path.get("/health").copied().unwrap_or(0);
    if !all_ok(&r, N) || count(&r, C) != N || b_calls != 0 {
        bail!(
            "b unhealthy: expected {N} calls answered by c and none reaching b: {}; b received {b_calls} calls",
            seen(&r)
        );
    }
    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &probe, "b answers again", |r| {
        all_ok(r, 50) && count(r, B) > 0
    })
    .await?;
    Ok(format!(
        "b unhealthy: {} (b's app: 0 calls, {b_probes} probes); removed: b answers (applied in {}, removed in {})",
        seen(&r),
        ms(applied),
        ms(removed)
    ))
}

/// The problems the controller reports (`/api/v1/state`, what `trellis check` shows) that
/// concern the TrafficPolicy `name`, as `location: message`.
async fn problems_of(mesh: &Mesh, name: &str) -> anyhow::Result<Vec<String>> {
    let reply = http::request(mesh.admin, http::Method::GET, "/api/v1/state", None).await?;
    let state: Value = serde_json::from_slice(&reply.body)
        .with_context(|| format!("controller state: {}", reply.text()))?;
    let problems = state["problems"]
        .as_array()
        .with_context(|| format!("controller state without problems: {}", reply.text()))?;
    Ok(problems
        .iter()
        .map(|p| {
            format!(
                "{} {}: {}",
                p["resource"].as_str().unwrap_or_default(),
                p["location"].as_str().unwrap_or_default(),
                p["message"].as_str().unwrap_or_default()
            )
        })
        .filter(|line| line.contains(name))
        .collect())
}

/// A good abort fault, then the same object with `percent: 150` (and another status): the
/// controller reports it (the field and the object or file:line) and the proxies keep the good
/// version (418, not 503, not no fault); removed, both the fault and the problem go.
async fn invalid(mesh: &Mesh) -> anyhow::Result<String> {
    let name = INVALID.0;
    let aborted = to_b("/echo", 2).header("x-conformance-fault", "abort");
    mesh.platform
        .apply_policy(POLICY, &yaml(FAULT_ABORT))
        .await?;
    until(mesh, CALLER, &aborted, "the good policy", |r| {
        all_mesh(r, 2, 418, "fault-injected")
    })
    .await?;
    mesh.platform.apply_policy(POLICY, &yaml(INVALID)).await?;
    let (problems, reported) = poll("the invalid policy reported", || async {
        let problems = problems_of(mesh, name).await?;
        Ok(if problems.iter().any(|p| p.contains("percent")) {
            Ok(problems)
        } else {
            Err(format!("problems about {name}: {problems:?}"))
        })
    })
    .await?;
    // The controller has seen the bad version: what the proxies do now is what they keep.
    let kept = mesh.call(CALLER, &aborted.clone().count(10)).await?;
    if !all_mesh(&kept, 10, 418, "fault-injected") {
        bail!(
            "after the invalid version: expected the last good fault (10 of 10 answered 418): {}",
            seen(&kept)
        );
    }
    mesh.platform.delete_policy(POLICY).await?;
    let removed = until(mesh, CALLER, &aborted, "no fault", |r| all_b(r, 2)).await?;
    let (_, cleared) = poll("the problem cleared", || async {
        let left = problems_of(mesh, name).await?;
        Ok(if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        })
    })
    .await?;
    Ok(format!(
        "reported in {}: {}; kept: {}; removed in {}, problem cleared in {}",
        ms(reported),
        problems.join("; "),
        seen(&kept),
        ms(removed),
        ms(cleared)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_documents_load_and_only_the_invalid_one_is_refused() {
        for p in [
            TIMEOUT,
            RETRIES,
            FAULT_ABORT,
            FAULT_DELAY,
            RATE_LIMIT,
            BREAKER,
            MIRROR,
            OUTLIER,
        ] {
            let text = yaml(p);
            let report = trellis_smi::load::load_str("policy.yaml", &text);
            assert!(report.errors.is_empty(), "{:?}\n{text}", report.errors);
            assert_eq!(report.resources.len(), 1, "{text}");
        }
        let text = yaml(INVALID);
        let report = trellis_smi::load::load_str("policy.yaml", &text);
        let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        assert!(
            errors.len() == 1 && errors[0].contains("fault.abort.percent"),
            "{errors:?}\n{text}"
        );
    }
}
