//! The adapter's blocking-query loop against the Consul double: index resets, leader loss, ACL
//! tokens, the rate limit, timeouts longer than the wait, and change latency.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use trellis_adapter_consul::{AclToken, ConsulConfig, ConsulDiscovery, RateLimit};
use trellis_consul_double::wire::{CheckDefinition, RegisterRequest, ServiceDefinition, Weights};
use trellis_consul_double::{ConsulDouble, DoubleConfig};
use trellis_discovery::{Discovery, DiscoveryError, ErrorKind, Readiness, ServiceKey, Snapshot};

type Watch = BoxStream<'static, Result<Snapshot, DiscoveryError>>;

fn instance(i: u8, service: &str, status: &str) -> RegisterRequest {
    let id = format!("{service}-{i}");
    RegisterRequest {
        node: format!("node-{id}"),
        address: format!("10.1.0.{i}"),
        service: Some(ServiceDefinition {
            id: id.clone(),
            service: service.to_owned(),
            port: 8080,
            weights: Some(Weights {
                passing: 10,
                warning: 3,
            }),
            ..Default::default()
        }),
        checks: vec![CheckDefinition {
            check_id: "ready".into(),
            name: "ready".into(),
            status: status.into(),
            service_id: id,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn config(double: &ConsulDouble) -> ConsulConfig {
    let mut c = ConsulConfig::new(double.http_addr());
    c.wait = Duration::from_secs(30);
    c
}

fn watch(config: ConsulConfig, service: &str) -> Watch {
    ConsulDiscovery::new(config)
        .unwrap()
        .watch(ServiceKey::new("default", service))
}

async fn next(watch: &mut Watch) -> Result<Snapshot, DiscoveryError> {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an item within 10 s")
        .expect("watches never end")
}

/// Polls the stream for `how_long` (the adapter's loop runs only while its stream is polled).
async fn drive(watch: &mut Watch, how_long: Duration) {
    let _ = tokio::time::timeout(how_long, async {
        loop {
            let _ = watch.next().await;
        }
    })
    .await;
}

/// The next snapshot with `n` endpoints (errors and other snapshots skipped).
async fn endpoints(watch: &mut Watch, n: usize) -> Vec<trellis_discovery::Endpoint> {
    loop {
        if let Ok(Snapshot::Endpoints(set)) = next(watch).await
            && set.endpoints.len() == n
        {
            return set.endpoints;
        }
    }
}

#[tokio::test]
async fn a_change_shows_long_before_the_wait_runs_out() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    let mut w = watch(config(&double), "web");
    endpoints(&mut w, 1).await;
    // Let the adapter's next query block.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    double.register(&instance(2, "web", "passing")).unwrap();
    endpoints(&mut w, 2).await;
    let took = start.elapsed();
    println!("change -> snapshot: {took:?}");
    // A poller would take up to the 30 s wait; a blocking query takes milliseconds.
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn index_going_backwards_restarts_from_zero_and_keeps_following_changes() {
    let double = ConsulDouble::start().await.unwrap();
    for i in 1..=5 {
        double.register(&instance(i, "web", "passing")).unwrap();
    }
    let mut w = watch(config(&double), "web");
    endpoints(&mut w, 5).await;
    // Let the next query go out and block (at index 5), then restore an "older snapshot".
    drive(&mut w, Duration::from_millis(100)).await;
    double.clear_requests();
    double.reset_index(2);
    // The blocked query returns with index 2 (< the last one): the next query must be index=0.
    drive(&mut w, Duration::from_millis(300)).await;
    let indexes: Vec<String> = double
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/health/service/web")
        .map(|r| r.param("index").unwrap_or_else(|| "none".into()))
        .collect();
    assert!(
        indexes.first().is_some_and(|i| i == "none" || i == "0"),
        "after a backwards index the loop restarts without blocking: {indexes:?}"
    );
    // An adapter that kept its old index would block until the index passed it again.
    double.register(&instance(6, "web", "passing")).unwrap();
    endpoints(&mut w, 6).await;
}

#[tokio::test]
async fn an_index_of_zero_is_never_sent_back_and_the_loop_does_not_spin() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    let mut c = config(&double);
    c.wait = Duration::from_secs(1);
    let mut w = watch(c, "web");
    endpoints(&mut w, 1).await;
    double.report_zero_index(true);
    drive(&mut w, Duration::from_millis(1500)).await;
    let sent: Vec<String> = double
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/health/service/web")
        .filter_map(|r| r.param("index"))
        .collect();
    assert!(
        sent.iter().skip(2).all(|i| i != "0"),
        "index=0 sent again: {sent:?}"
    );
    assert!(
        sent.len() < 10,
        "the loop spun: {} queries: {sent:?}",
        sent.len()
    );
    double.report_zero_index(false);
    double.register(&instance(2, "web", "passing")).unwrap();
    endpoints(&mut w, 2).await;
}

#[tokio::test]
async fn a_server_answering_at_once_cannot_make_the_loop_spin() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    let mut c = config(&double);
    c.rate_limit = RateLimit {
        burst: 2,
        interval: Duration::from_millis(200),
    };
    let mut w = watch(c, "web");
    endpoints(&mut w, 1).await;
    double.set_ignore_blocking(true);
    double.clear_requests();
    drive(&mut w, Duration::from_secs(1)).await;
    let queries = double
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/health/service/web")
        .count();
    // Burst 2, then one per 200 ms: about 2 + 5 in one second (no limit: thousands).
    assert!((3..=9).contains(&queries), "{queries} queries in 1 s");
}

#[tokio::test]
async fn blocking_queries_are_not_cut_by_the_http_timeout() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    let mut c = config(&double);
    c.wait = Duration::from_millis(800);
    c.request_timeout = Duration::from_millis(400);
    let mut w = watch(c, "web");
    endpoints(&mut w, 1).await;
    // Three full waits (each up to 800 ms + 50 ms jitter) without any change: no error items.
    let items = tokio::time::timeout(Duration::from_millis(2700), async {
        let mut errors = Vec::new();
        loop {
            if let Err(e) = w.next().await.unwrap() {
                errors.push(e.to_string());
            }
            if !errors.is_empty() {
                return errors;
            }
        }
    })
    .await;
    if let Ok(errors) = items {
        panic!("a blocking query was cut short: {errors:?}");
    }
}

#[tokio::test]
async fn leader_loss_is_an_error_with_default_consistency_and_staleness_with_stale_reads() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();

    // Default consistency: the leader must answer; without one, 500 "No cluster leader".
    let mut consistent = watch(config(&double), "web");
    endpoints(&mut consistent, 1).await;
    let mut stale_config = config(&double);
    stale_config.stale = true;
    let mut stale = watch(stale_config, "web");
    endpoints(&mut stale, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    double.set_leader(false);
    // A write while leaderless (the test's hand) wakes both blocked queries.
    double.register(&instance(2, "web", "passing")).unwrap();

    // Stale reads: the new data arrives, then an Err item says it may be stale.
    endpoints(&mut stale, 2).await;
    let err = next(&mut stale)
        .await
        .expect_err("staleness reported after the snapshot");
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.temporary);
    assert!(err.message.contains("no known leader"), "{err}");

    // Consistent reads: the woken query carries KnownLeader false too; the next one fails.
    let mut saw_no_leader = false;
    for _ in 0..4 {
        if let Err(e) = next(&mut consistent).await
            && e.message.contains("No cluster leader")
        {
            assert_eq!(e.kind, ErrorKind::Unavailable);
            saw_no_leader = true;
            break;
        }
    }
    assert!(saw_no_leader, "500 No cluster leader was not reported");

    // The leader returns: the watch recovers on its own.
    double.set_leader(true);
    double.register(&instance(3, "web", "passing")).unwrap();
    endpoints(&mut consistent, 3).await;
}

#[tokio::test]
async fn the_acl_token_is_sent_in_a_header_and_never_shown() {
    let acl = DoubleConfig {
        acl_token: Some("tok-7f3a9c".into()),
        ..DoubleConfig::default()
    };
    let double = ConsulDouble::start_with(acl).await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();

    let mut c = config(&double);
    c.token = Some(AclToken::new("tok-7f3a9c"));
    let adapter = ConsulDiscovery::new(c).unwrap();
    let shown = format!("{adapter:?}");
    assert!(!shown.contains("tok-7f3a9c"), "{shown}");
    let mut w = adapter.watch(ServiceKey::new("default", "web"));
    endpoints(&mut w, 1).await;
    let requests = double.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.token.as_deref(), Some("tok-7f3a9c"), "{r:?}");
        assert!(
            !r.query.contains("tok-7f3a9c"),
            "token leaked into a URL: {r:?}"
        );
    }

    // A token Consul does not know: 403 "ACL not found", reported as Unauthorized, not temporary,
    // and the message does not repeat the token.
    let mut wrong = config(&double);
    wrong.token = Some(AclToken::new("tok-wrong"));
    let err = next(&mut watch(wrong, "web")).await.expect_err("403");
    assert_eq!(err.kind, ErrorKind::Unauthorized);
    assert!(!err.temporary);
    assert!(err.message.contains("ACL not found"), "{err}");
    assert!(!err.to_string().contains("tok-wrong"), "{err}");
}

#[tokio::test]
async fn check_status_changes_are_readiness_updates_not_disappearances() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    double.register(&instance(2, "web", "passing")).unwrap();
    let mut w = watch(config(&double), "web");
    endpoints(&mut w, 2).await;

    double
        .set_check_status("node-web-2", "ready", "warning")
        .unwrap();
    let e = endpoints(&mut w, 2).await;
    assert_eq!(
        (e[1].readiness, e[1].weight),
        (Readiness::Ready, Some(3)),
        "warning: Ready with Weights.Warning"
    );

    double
        .set_check_status("node-web-2", "ready", "critical")
        .unwrap();
    let e = endpoints(&mut w, 2).await;
    assert_eq!(e[1].readiness, Readiness::NotReady);

    // Maintenance mode: Consul registers a critical `_service_maintenance:<id>` check.
    let mut maint = instance(1, "web", "passing");
    maint.checks.push(CheckDefinition {
        check_id: "_service_maintenance:web-1".into(),
        name: "Service Maintenance Mode".into(),
        status: "critical".into(),
        service_id: "web-1".into(),
        ..Default::default()
    });
    double.register(&maint).unwrap();
    let e = endpoints(&mut w, 2).await;
    assert_eq!(e[0].readiness, Readiness::Terminating);
}

#[tokio::test]
async fn catalog_stream_follows_services_and_a_non_default_namespace_on_oss_is_not_found() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    let adapter = ConsulDiscovery::new(config(&double)).unwrap();
    let mut catalog = adapter.services();
    let first = catalog.next().await.unwrap().unwrap();
    assert_eq!(first.services, vec![ServiceKey::new("default", "web")]);
    double.register(&instance(1, "db", "passing")).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), catalog.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.services.len(), 2);

    let mut other_ns = adapter.watch(ServiceKey::new("team-a", "web"));
    assert_eq!(next(&mut other_ns).await.unwrap(), Snapshot::NotFound);
}

#[tokio::test]
async fn enterprise_namespaces_are_sent_as_ns() {
    let double = ConsulDouble::start().await.unwrap();
    let mut team = instance(1, "web", "passing");
    team.service.as_mut().unwrap().namespace = "team-a".into();
    double.register(&team).unwrap();
    double.register(&instance(2, "web", "passing")).unwrap(); // in `default`
    let mut c = config(&double);
    c.enterprise_namespace = Some("team-a".into());
    let adapter = ConsulDiscovery::new(c).unwrap();
    let mut w = adapter.watch(ServiceKey::new("team-a", "web"));
    let e = endpoints(&mut w, 1).await;
    assert_eq!(e[0].address.to_string(), "10.1.0.1");
    assert_eq!(e[0].identity.namespace, "team-a");
    let catalog = adapter.services().next().await.unwrap().unwrap();
    assert_eq!(catalog.services, vec![ServiceKey::new("team-a", "web")]);
    assert!(
        double
            .requests()
            .iter()
            .all(|r| r.param("ns").as_deref() == Some("team-a")),
        "every query names the namespace"
    );
}

#[tokio::test]
async fn failures_and_a_hung_server_are_reported_and_recovered_from() {
    let double = ConsulDouble::start().await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    let mut c = config(&double);
    c.wait = Duration::from_millis(300);
    c.request_timeout = Duration::from_millis(300);
    let mut w = watch(c, "web");
    endpoints(&mut w, 1).await;

    double.fail_next(2, 503);
    let err = next(&mut w).await.expect_err("an injected 503");
    assert_eq!((err.kind, err.temporary), (ErrorKind::Unavailable, true));
    assert!(err.message.contains("HTTP 503"), "{err}");
    double.register(&instance(2, "web", "passing")).unwrap();
    endpoints(&mut w, 2).await;

    double.set_hang(true);
    let err = loop {
        if let Err(e) = next(&mut w).await {
            break e;
        }
    };
    assert!(err.message.contains("no answer within"), "{err}");
    double.set_hang(false);
    double.register(&instance(3, "web", "passing")).unwrap();
    endpoints(&mut w, 3).await;
}

#[tokio::test]
async fn an_unknown_datacenter_is_a_configuration_error() {
    let double = ConsulDouble::start().await.unwrap();
    let mut c = config(&double);
    c.datacenter = Some("dc9".into());
    let err = next(&mut watch(c, "web"))
        .await
        .expect_err("no such datacenter");
    assert_eq!((err.kind, err.temporary), (ErrorKind::Config, false));
    assert!(
        err.message.contains("dc=dc9"),
        "the message names the request: {err}"
    );
}

#[tokio::test]
async fn without_a_token_acl_filtered_results_are_reported_not_silently_empty() {
    let acl = DoubleConfig {
        acl_token: Some("tok-1".into()),
        ..DoubleConfig::default()
    };
    let double = ConsulDouble::start_with(acl).await.unwrap();
    double.register(&instance(1, "web", "passing")).unwrap();
    let mut w = watch(config(&double), "web");
    // Consul's default-deny filters the anonymous caller's reads to nothing: the service looks
    // missing, and the adapter says why.
    assert_eq!(next(&mut w).await.unwrap(), Snapshot::NotFound);
    let err = next(&mut w).await.expect_err("ACL filtering reported");
    assert_eq!((err.kind, err.temporary), (ErrorKind::Unauthorized, false));
    assert!(err.message.contains("filtered"), "{err}");
}
