//! The resilience policy through a real proxy to real upstreams that misbehave on command
//! (`common::flaky`): every field changes what a client sees as documented, and each test has
//! a control (the same traffic without the field) so it fails if the field were ignored.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

/// A proxy config with one destination `svc.default` over `endpoints`, with `policy` (YAML flow
/// map, or empty for none) and `extra` destination fields.
fn config(endpoints: &[std::net::SocketAddr], policy: &str, extra: &str) -> String {
    let mut eps = String::new();
    for a in endpoints {
        eps += &format!("          - address: \"{a}\"\n");
    }
    let policy = if policy.is_empty() {
        String::new()
    } else {
        format!("    policy: {policy}\n")
    };
    format!(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\ndestinations:\n  - authority: svc.default\n    balancer: round_robin\n{policy}{extra}    backends:\n      - name: svc\n        endpoints:\n{eps}"
    )
}

async fn get_n(proxy: &trellis_proxy::RunningProxy, n: usize) -> Vec<(StatusCode, String)> {
    let mut client = H1::connect(proxy.http.unwrap()).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, tag, _) = client.get("svc.default", "/").await;
        out.push((status, tag));
    }
    out
}

fn count(results: &[(StatusCode, String)], status: StatusCode) -> usize {
    results.iter().filter(|(s, _)| *s == status).count()
}

#[tokio::test]
async fn retries_turn_failing_first_tries_into_answers_and_only_when_configured() {
    let up = flaky("up", Mode::FailFirst(2, 503)).await;
    let running = start(&config(
        &[up.addr],
        "{retries: {attempts: 2, backoff: {base: 1ms, max: 2ms}}}",
        "",
    ))
    .await;
    let got = get_n(&running, 1).await;
    assert_eq!(got, [(StatusCode::OK, "up".to_string())]);
    assert_eq!(up.hits(), 3, "two failed tries and the good one");

    // Control: without retries the first failure reaches the client.
    let up = flaky("up", Mode::FailFirst(2, 503)).await;
    let running = proxy_without(&up).await;
    assert_eq!(
        get_n(&running, 1).await[0].0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(up.hits(), 1);
}

async fn proxy_without(up: &Flaky) -> trellis_proxy::RunningProxy {
    start(&config(&[up.addr], "", "")).await
}

async fn start(yaml: &str) -> trellis_proxy::RunningProxy {
    proxy(yaml).await
}

#[tokio::test]
async fn retries_never_exceed_the_budget_under_a_failing_upstream() {
    let up = flaky("up", Mode::FailPercent(100, 503)).await;
    // 20% of live traffic, a floor of 1 retry per second over a 1 s window.
    let running = start(&config(
        &[up.addr],
        "{retries: {attempts: 3, backoff: {base: 1ms, max: 1ms}, budget: {ratio: 0.2, minPerSecond: 1, ttl: 1s}}}",
        "",
    ))
    .await;
    let got = get_n(&running, 200).await;
    assert_eq!(count(&got, StatusCode::SERVICE_UNAVAILABLE), 200);
    let hits = up.hits();
    // Without a budget, attempts: 3 would make 800 requests. With it: 200 live + at most 20% of
    // them + the floor (1/s over the run, which lasts well under 5 s here).
    assert!(hits > 200, "retries happened: {hits}");
    assert!(hits <= 200 + 40 + 5, "the budget bounds retries: {hits}");
    let metrics = admin_text(&running, "/metrics").await;
    assert!(
        metrics.contains(
            "trellis_retries_total{destination=\"svc.default\",result=\"budget-exhausted\"}"
        ),
        "{metrics}"
    );
}

async fn admin_text(proxy: &trellis_proxy::RunningProxy, path: &str) -> String {
    let mut client = H1::connect(proxy.admin.unwrap()).await;
    client.get("admin", path).await.2
}

#[tokio::test]
async fn only_idempotent_methods_are_retried_unless_opted_in() {
    let up = flaky("up", Mode::FailFirst(1, 503)).await;
    let running = start(&config(
        &[up.addr],
        "{retries: {attempts: 2, backoff: {base: 1ms, max: 1ms}}}",
        "",
    ))
    .await;
    let mut client = H1::connect(running.http.unwrap()).await;
    let post = || {
        Request::post("/")
            .header("host", "svc.default")
            .body(full("order=1"))
            .unwrap()
    };
    assert_eq!(
        read(client.send(post()).await).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(up.hits(), 1, "a POST is not sent twice by default");

    let up = flaky("up", Mode::FailFirst(1, 503)).await;
    let running = start(&config(
        &[up.addr],
        "{retries: {attempts: 2, methods: [POST], allowNonIdempotent: true, backoff: {base: 1ms, max: 1ms}}}",
        "",
    ))
    .await;
    let mut client = H1::connect(running.http.unwrap()).await;
    let (status, _, body) = read(client.send(post()).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "up 200 7", "the retry carried the whole body");
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn a_body_larger_than_the_bound_is_sent_once() {
    let up = flaky("up", Mode::FailFirst(1, 503)).await;
    let running = start(&config(
        &[up.addr],
        "{retries: {attempts: 2, maxBodyBytes: 1024, methods: [PUT], backoff: {base: 1ms, max: 1ms}}}",
        "",
    ))
    .await;
    let mut client = H1::connect(running.http.unwrap()).await;
    let put = |n: usize| {
        Request::put("/")
            .header("host", "svc.default")
            .body(full(vec![b'x'; n]))
            .unwrap()
    };
    assert_eq!(
        read(client.send(put(4096)).await).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(up.hits(), 1);
    let (status, _, body) = read(client.send(put(512)).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "up 200 512"));
}

#[tokio::test]
async fn a_retry_avoids_the_endpoint_that_just_failed() {
    let bad = flaky("bad", Mode::Reset).await;
    let good = flaky("good", Mode::Ok).await;
    let running = start(&config(
        &[bad.addr, good.addr],
        "{retries: {attempts: 1, backoff: {base: 1ms, max: 1ms}}}",
        "",
    ))
    .await;
    let got = get_n(&running, 20).await;
    assert_eq!(count(&got, StatusCode::OK), 20, "{got:?}");
    assert!(bad.hits() >= 5, "round robin sent tries to the bad one too");
}

#[tokio::test]
async fn per_try_timeouts_give_up_on_a_slow_try_and_retry() {
    let slow = flaky("slow", Mode::Slow(Duration::from_secs(2))).await;
    let fast = flaky("fast", Mode::Ok).await;
    let running = start(&config(
        &[slow.addr, fast.addr],
        "{timeouts: {perTry: 100ms}, retries: {attempts: 1, backoff: {base: 1ms, max: 1ms}}}",
        "",
    ))
    .await;
    let started = Instant::now();
    let got = get_n(&running, 6).await;
    assert_eq!(count(&got, StatusCode::OK), 6, "{got:?}");
    assert!(got.iter().all(|(_, app)| app == "fast"));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(slow.hits() >= 2);
}

#[tokio::test]
async fn the_request_timeout_answers_504_in_time() {
    let slow = flaky("slow", Mode::Slow(Duration::from_secs(3))).await;
    let running = start(&config(&[slow.addr], "{timeouts: {request: 200ms}}", "")).await;
    let started = Instant::now();
    let mut client = H1::connect(running.http.unwrap()).await;
    let (status, reason, _) = client.get("svc.default", "/").await;
    let took = started.elapsed();
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[tokio::test]
async fn an_idle_body_is_cut_after_the_idle_timeout() {
    let up = flaky("up", Mode::StallBody).await;
    let running = start(&config(&[up.addr], "{timeouts: {idle: 300ms}}", "")).await;
    let mut client = H1::connect(running.http.unwrap()).await;
    let started = Instant::now();
    let resp = client
        .send(
            Request::get("/")
                .header("host", "svc.default")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect()).await;
    assert!(
        matches!(body, Ok(Err(_))),
        "the body ends in an error, not silently: {body:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn the_breaker_answers_overloaded_at_once_and_the_stalled_upstream_holds_only_its_share() {
    let stalled = flaky("stalled", Mode::Stall).await;
    let running = start(&config(
        &[stalled.addr],
        "{circuitBreaker: {maxRequests: 2}}",
        "",
    ))
    .await;
    let addr = running.http.unwrap();
    // Two requests take the places and hang.
    let mut hanging = Vec::new();
    for _ in 0..2 {
        hanging.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await;
            c.get("svc.default", "/").await
        }));
    }
    while stalled.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Everything else is refused fast, and never reaches (or queues for) the upstream.
    let started = Instant::now();
    let mut refused = 0;
    for _ in 0..50 {
        let mut c = H1::connect(addr).await;
        let (status, reason, _) = c.get("svc.default", "/").await;
        if (status, reason.as_str()) == (StatusCode::SERVICE_UNAVAILABLE, "overloaded") {
            refused += 1;
        }
    }
    assert_eq!(refused, 50);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        stalled.hits(),
        2,
        "nothing more reached the stalled upstream"
    );
    for h in hanging {
        h.abort();
    }

    // Control: without the breaker every request waits on the stalled upstream.
    let stalled = flaky("stalled", Mode::Stall).await;
    let running = proxy_without(&stalled).await;
    let addr = running.http.unwrap();
    for _ in 0..5 {
        tokio::spawn(async move {
            let mut c = H1::connect(addr).await;
            c.get("svc.default", "/").await
        });
    }
    let waited = tokio::time::timeout(Duration::from_secs(3), async {
        while stalled.hits() < 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "without a breaker all 5 reach it");
}

#[tokio::test]
async fn connections_are_capped_and_waiting_requests_bounded() {
    let stalled = flaky("stalled", Mode::Stall).await;
    let running = start(&config(
        &[stalled.addr],
        "{circuitBreaker: {maxConnections: 1, maxPendingRequests: 1}}",
        "",
    ))
    .await;
    let addr = running.http.unwrap();
    let spawn = || {
        tokio::spawn(async move {
            let mut c = H1::connect(addr).await;
            c.get("svc.default", "/").await
        })
    };
    let first = spawn();
    while stalled.hits() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = spawn(); // waits for the one connection
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = H1::connect(addr).await;
    let (status, reason, _) = c.get("svc.default", "/").await;
    assert_eq!(
        (status, reason.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
    );
    assert_eq!(stalled.connections.load(Ordering::SeqCst), 1);
    assert_eq!(stalled.hits(), 1);
    first.abort();
    second.abort();
}

#[tokio::test]
async fn a_full_endpoint_is_skipped_for_one_with_room() {
    let stalled = flaky("stalled", Mode::Stall).await;
    let good = flaky("good", Mode::Ok).await;
    let running = start(&config(
        &[stalled.addr, good.addr],
        "{circuitBreaker: {maxRequestsPerEndpoint: 1}}",
        "",
    ))
    .await;
    let addr = running.http.unwrap();
    // Round robin: of two requests one lands on each endpoint; the stalled one keeps its.
    let hanging: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = H1::connect(addr).await;
                c.get("svc.default", "/").await
            })
        })
        .collect();
    while stalled.hits() < 1 || good.hits() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = get_n(&running, 10).await;
    assert_eq!(count(&got, StatusCode::OK), 10, "{got:?}");
    assert_eq!(stalled.hits(), 1, "the full endpoint got nothing more");
    for h in hanging {
        h.abort();
    }
}

#[tokio::test]
async fn faults_abort_and_delay_only_the_requests_they_select() {
    let up = flaky("up", Mode::Ok).await;
    let running = start(&config(
        &[up.addr],
        "{fault: {abort: {httpStatus: 418, percent: 100}, header: {name: x-chaos, value: on}}}",
        "",
    ))
    .await;
    let mut client = H1::connect(running.http.unwrap()).await;
    let chaos = Request::get("/")
        .header("host", "svc.default")
        .header("x-chaos", "on")
        .body(full(""))
        .unwrap();
    let (status, reason, _) = read(client.send(chaos).await).await;
    assert_eq!((status.as_u16(), reason.as_str()), (418, "fault-injected"));
    assert_eq!(up.hits(), 0, "an aborted request is never sent");
    let (status, app, _) = client.get("svc.default", "/").await;
    assert_eq!(
        (status, app.as_str()),
        (StatusCode::OK, "up"),
        "no header, no fault"
    );

    // Half the requests, at random.
    let up = flaky("up", Mode::Ok).await;
    let running = start(&config(
        &[up.addr],
        "{fault: {abort: {httpStatus: 503, percent: 50}}}",
        "",
    ))
    .await;
    let got = get_n(&running, 400).await;
    let aborted = count(&got, StatusCode::SERVICE_UNAVAILABLE);
    assert!((140..260).contains(&aborted), "{aborted} of 400");
    assert_eq!(up.hits(), 400 - aborted);

    // A delay on every request.
    let up = flaky("up", Mode::Ok).await;
    let running = start(&config(
        &[up.addr],
        "{fault: {delay: {fixed: 150ms, percent: 100}}}",
        "",
    ))
    .await;
    let started = Instant::now();
    let got = get_n(&running, 3).await;
    assert_eq!(count(&got, StatusCode::OK), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_grpc_abort_is_a_trailers_only_answer() {
    let up = flaky("up", Mode::Ok).await;
    let running = start(&config(
        &[up.addr],
        "{fault: {abort: {grpcStatus: 14, percent: 100}}}",
        "",
    ))
    .await;
    let mut client = H1::connect(running.http.unwrap()).await;
    let resp = client
        .send(
            Request::post("/echo.Echo/Say")
                .header("host", "svc.default")
                .header("content-type", "application/grpc")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()["x-trellis-error"], "fault-injected");
}

#[tokio::test]
async fn mirrors_get_copies_and_never_slow_or_fail_the_original() {
    let main = flaky("main", Mode::Ok).await;
    let shadow = flaky("shadow", Mode::Ok).await;
    let mirror_config = |main: &Flaky, shadow: &Flaky, percent: u32| {
        format!(
            "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\ndestinations:\n  - authority: svc.default\n    policy: {{mirror: {{backend: shadow, percent: {percent}}}}}\n    backends:\n      - name: main\n        endpoints: [{{address: \"{}\"}}]\n      - name: shadow\n        weight: 0\n        endpoints: [{{address: \"{}\"}}]\n",
            main.addr, shadow.addr
        )
    };
    let running = start(&mirror_config(&main, &shadow, 100)).await;
    let got = get_n(&running, 20).await;
    assert!(
        got.iter()
            .all(|(s, app)| *s == StatusCode::OK && app == "main"),
        "{got:?}"
    );
    let copied = tokio::time::timeout(Duration::from_secs(5), async {
        while shadow.hits() < 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        copied.is_ok(),
        "the mirror got every copy: {}",
        shadow.hits()
    );
    assert_eq!(main.hits(), 20);

    // A stalled mirror, then a failing one: the client sees nothing of either.
    for mode in [Mode::Stall, Mode::Reset] {
        let main = flaky("main", Mode::Ok).await;
        let shadow = flaky("shadow", mode).await;
        let running = start(&mirror_config(&main, &shadow, 100)).await;
        let started = Instant::now();
        let got = get_n(&running, 20).await;
        assert_eq!(count(&got, StatusCode::OK), 20, "{mode:?}: {got:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{mode:?}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn the_inbound_rate_limit_answers_429_with_retry_after() {
    let app = flaky("app", Mode::Ok).await;
    let yaml = format!(
        "admin: 127.0.0.1:0\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{}\"\n  protocol: http\n  policy:\n    default_action: allow\n    rate_limits:\n      - name: api\n        matches: [{{path_regex: \"/api/.*\"}}]\n        limit: {{requestsPerSecond: 1, burst: 2}}\n",
        app.addr
    );
    let running = start(&yaml).await;
    let mut client = H1::connect(running.inbound.unwrap()).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = client
            .send(
                Request::get("/api/x")
                    .header("host", "app")
                    .body(full(""))
                    .unwrap(),
            )
            .await;
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let (status, tag, _) = read(resp).await;
        statuses.push((status.as_u16(), tag, retry_after));
    }
    assert_eq!(statuses[0].0, 200);
    assert_eq!(statuses[1].0, 200);
    assert_eq!(
        statuses[2],
        (429, "rate-limited".to_string(), Some("1".to_string()))
    );
    assert_eq!(app.hits(), 2, "refused requests never reach the app");
    // Other paths are not limited.
    let (status, _, _) = client.get("app", "/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn ejection_counts_only_the_configured_failures() {
    // An endpoint answering 500 is an application error: with `failures: gateway-error` it
    // stays in; with the default (`5xx`) it is ejected after 2 in a row.
    for (failures, ejected) in [("gateway-error", false), ("5xx", true)] {
        let bad = flaky("bad", Mode::FailPercent(100, 500)).await;
        let good = flaky("good", Mode::Ok).await;
        let running = start(&config(
            &[bad.addr, good.addr],
            &format!(
                "{{outlierDetection: {{consecutiveFailures: 2, failures: {failures}, baseEjectionTime: 30s}}}}"
            ),
            "",
        ))
        .await;
        get_n(&running, 20).await;
        let bad_hits = bad.hits();
        if ejected {
            assert_eq!(bad_hits, 2, "{failures}: ejected after 2");
        } else {
            assert_eq!(bad_hits, 10, "{failures}: round robin keeps it");
        }
    }
}

/// The value of one series (`name{labels}` exactly as rendered) on the admin port's `/metrics`.
async fn series(proxy: &trellis_proxy::RunningProxy, name: &str) -> Option<f64> {
    let text = admin_text(proxy, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (at most 5 s) until `series(name)` is `value`.
async fn wait_for_series(proxy: &trellis_proxy::RunningProxy, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = series(proxy, name).await;
        if now == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {now:?}, not {value}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const UNHEALTHY: &str = "trellis_unhealthy_endpoints{destination=\"svc.default\"}";
const PROBES_FAILED: &str =
    "trellis_endpoint_health_checks_total{destination=\"svc.default\",result=\"fail\"}";

/// How many answers came from each app (by `x-app`).
fn by_app(got: &[(StatusCode, String)], app: &str) -> usize {
    got.iter().filter(|(_, a)| a == app).count()
}

#[tokio::test]
async fn health_checks_take_a_failing_endpoint_out_and_bring_it_back_once_it_passes() {
    let one = flaky("one", Mode::Ok).await;
    let bad = flaky("bad", Mode::FailPercent(100, 503)).await;
    let two = flaky("two", Mode::Ok).await;
    let running = start(&config(
        &[one.addr, bad.addr, two.addr],
        "{healthCheck: {httpPath: /healthz, interval: 100ms, timeout: 100ms, unhealthyThreshold: 2, healthyThreshold: 2}}",
        "",
    ))
    .await;
    wait_for_series(&running, UNHEALTHY, 1.0).await;
    let failed = series(&running, PROBES_FAILED).await.unwrap_or_default();
    assert!(failed >= 2.0, "out after 2 failed probes: {failed}");
    let got = get_n(&running, 60).await;
    assert_eq!(count(&got, StatusCode::OK), 60, "{got:?}");
    assert_eq!(by_app(&got, "bad"), 0);
    assert!(
        by_app(&got, "one") >= 20 && by_app(&got, "two") >= 20,
        "the others share its turns: {got:?}"
    );

    // It recovers: after 2 passed probes it is back in the rotation.
    bad.set(Mode::Ok);
    wait_for_series(&running, UNHEALTHY, 0.0).await;
    let got = get_n(&running, 60).await;
    assert_eq!(count(&got, StatusCode::OK), 60, "{got:?}");
    assert!(by_app(&got, "bad") >= 15, "back with its share: {got:?}");
}

#[tokio::test]
async fn without_health_checks_a_failing_endpoint_keeps_its_share() {
    // The control of the test above: the same endpoints, no `healthCheck`.
    let one = flaky("one", Mode::Ok).await;
    let bad = flaky("bad", Mode::FailPercent(100, 503)).await;
    let two = flaky("two", Mode::Ok).await;
    let running = start(&config(&[one.addr, bad.addr, two.addr], "", "")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(bad.hits(), 0, "nothing probes it");
    let got = get_n(&running, 60).await;
    assert_eq!(count(&got, StatusCode::SERVICE_UNAVAILABLE), 20, "{got:?}");
    assert_eq!(series(&running, UNHEALTHY).await, None);
}

#[tokio::test]
async fn a_tcp_health_check_takes_out_an_endpoint_whose_listener_is_gone() {
    let one = flaky("one", Mode::Ok).await;
    let two = flaky("two", Mode::Ok).await;
    let gone = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let running = start(&config(
        &[one.addr, gone, two.addr],
        "{healthCheck: {interval: 100ms, timeout: 100ms, unhealthyThreshold: 2}}",
        "",
    ))
    .await;
    wait_for_series(&running, UNHEALTHY, 1.0).await;
    let got = get_n(&running, 60).await;
    assert_eq!(
        count(&got, StatusCode::OK),
        60,
        "no connect-failed: {got:?}"
    );
    // A TCP probe sends no request: the live endpoints only saw the 60.
    assert_eq!(one.hits() + two.hits(), 60);
    assert!(
        one.connections.load(Ordering::SeqCst) >= 2,
        "probed by connects"
    );
}

#[tokio::test]
async fn a_destination_replaced_without_its_health_check_stops_probing() {
    let up = flaky("up", Mode::Ok).await;
    let checked = config(
        &[up.addr],
        "{healthCheck: {httpPath: /healthz, interval: 100ms, timeout: 100ms}}",
        "",
    );
    let running = start(&checked).await;
    let parse = |yaml: &str| {
        trellis_proxy::config::Config::parse(yaml, std::path::Path::new("t.yaml")).unwrap()
    };
    let probes_within = |window: Duration| {
        let up = up.clone();
        async move {
            let before = up.hits();
            tokio::time::sleep(window).await;
            up.hits() - before
        }
    };
    // No client traffic: every hit is a probe.
    let first = probes_within(Duration::from_millis(1000)).await;
    assert!((5..=12).contains(&first), "about one per 100 ms: {first}");
    // Each replaced entry is held, as a long request would hold it: its prober must stop all
    // the same.
    let entry = || {
        running
            .shared
            .routes
            .table
            .load()
            .get("svc.default")
            .unwrap()
    };
    let held = vec![entry()];
    // A whole new configuration with the same check: the new entry's prober takes over, at the
    // same rhythm (the old one stopped).
    running.shared.routes.apply(parse(&checked)).unwrap();
    let held = [held, vec![entry()]].concat();
    let after_reload = probes_within(Duration::from_millis(1000)).await;
    assert!(
        (5..=12).contains(&after_reload),
        "still one per 100 ms: {after_reload}"
    );
    // The destination alone replaced without a health check: no more probes.
    let unchecked = parse(&config(&[up.addr], "", "")).destinations.remove(0);
    running
        .shared
        .routes
        .apply_destination(unchecked, "destinations[svc.default]")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(probes_within(Duration::from_millis(1000)).await, 0);
    assert_eq!(series(&running, UNHEALTHY).await, None, "its gauge is gone");
    // Requests still flow.
    assert_eq!(get_n(&running, 3).await.len(), 3);
    drop(held);
}
