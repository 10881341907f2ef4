//! UDP carried by the proxy (UDPRoute), on real sockets on loopback: client UDP sockets ->
//! proxy A's `outbound.udp` listener -> mutual TLS -> proxy B's inbound listener -> a UDP echo
//! app, with certificates from an rcgen test CA. The caller's identity is what B authorizes,
//! with rules that must cover `udp`; a TrafficSplit is applied per session; a policy change
//! closes an open tunnel.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::certs::*;
use common::*;
use tokio::net::UdpSocket;
use trellis_proxy::RunningProxy;

const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/b";
const C_ID: &str = "spiffe://cluster.local/ns/shop/sa/c";

/// A UDP app answering each datagram with `name:` and the datagram, counting what it gets.
struct Echo {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn udp_echo(name: &'static str, bind: &str) -> Echo {
    let socket = UdpSocket::bind(bind).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut reply = format!("{name}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    Echo { addr, hits }
}

/// Proxy B: inbound in front of the app's address `app_ip` (its UDP ports come from the
/// tunnels' headers), with these authorization rules (YAML list items, indented 6).
async fn server(dir: &std::path::Path, ca: &Ca, app_ip: &str, rules: &str) -> RunningProxy {
    proxy(&format!(
        "admin: 127.0.0.1:0\ninbound:\n  listen: 127.0.0.1:0\n  app: \"{app_ip}:9\"\n  policy:\n    authorizations:\n{rules}{}",
        identity_yaml(dir, "b", &valid_leaf(ca, B_ID), &[ca])
    ))
    .await
}

/// A calling proxy with identity `id`: one UDP listener towards `echo.shop:<port>`, whose
/// backends are `(name, weight, B's inbound)`.
async fn client(
    dir: &std::path::Path,
    ca: &Ca,
    id: &str,
    port: u16,
    backends: &[(&str, u32, SocketAddr)],
) -> RunningProxy {
    let mut yaml = format!(
        "admin: 127.0.0.1:0\noutbound:\n  udp:\n    - listen: 127.0.0.1:0\n      destination: \"echo.shop:{port}\"\ndestinations:\n  - authority: echo.shop\n    protocol: tcp\n    backends:\n"
    );
    for (name, weight, inbound) in backends {
        yaml += &format!(
            "      - name: {name}\n        weight: {weight}\n        endpoints: [{{address: \"{inbound}\", identity: \"{B_ID}\"}}]\n"
        );
    }
    let name = id.rsplit('/').next().unwrap();
    yaml += &identity_yaml(dir, name, &valid_leaf(ca, id), &[ca]);
    proxy(&yaml).await
}

/// A client socket of its own (its address is its session).
async fn socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Send `text` to `to` and wait up to `wait` for a reply.
async fn ask(s: &UdpSocket, to: SocketAddr, text: &str, wait: Duration) -> Option<String> {
    s.send_to(text.as_bytes(), to).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, to, "replies come from the address the client sent to");
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
        _ => None,
    }
}

const REPLY: Duration = Duration::from_secs(5);
const SILENCE: Duration = Duration::from_millis(700);

async fn metrics(proxy: &RunningProxy) -> String {
    H1::connect(proxy.admin.unwrap())
        .await
        .get("admin", "/metrics")
        .await
        .2
}

/// The value of the series written exactly as `series` (name and labels), if present.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Wait (up to 5 s) until `series` on `proxy` has `want`; returns the last value seen.
async fn settles(proxy: &RunningProxy, series: &str, want: f64) -> Option<f64> {
    let mut last = None;
    for _ in 0..50 {
        last = value(&metrics(proxy).await, series);
        if last == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[tokio::test]
async fn udp_echo_through_two_proxies_allows_one_caller_and_denies_another() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let echo = udp_echo("echo", "127.0.0.1:0").await;
    let port = echo.addr.port();
    let b = server(
        dir.path(),
        &ca,
        "127.0.0.1",
        &format!(
            "      - identities: [\"{A_ID}\"]\n        ports: [{port}]\n        protocols: [udp]\n"
        ),
    )
    .await;
    let inbound = b.inbound.unwrap();
    let a = client(dir.path(), &ca, A_ID, port, &[("b", 1, inbound)]).await;
    let c = client(dir.path(), &ca, C_ID, port, &[("b", 1, inbound)]).await;

    // Two client sockets of A's app: each its own session, each gets its own replies.
    let (one, two) = (socket().await, socket().await);
    let to = a.udp[0];
    for i in 0..3 {
        let r1 = ask(&one, to, &format!("one-{i}"), REPLY).await;
        let r2 = ask(&two, to, &format!("two-{i}"), REPLY).await;
        assert_eq!(r1.as_deref(), Some(format!("echo:one-{i}").as_str()));
        assert_eq!(r2.as_deref(), Some(format!("echo:two-{i}").as_str()));
    }
    assert_eq!(echo.hits.load(Ordering::SeqCst), 6);

    // C is a verified mesh identity too, but no rule allows it: its datagrams never reach
    // the app, and B counts the refusal.
    let other = socket().await;
    assert_eq!(ask(&other, c.udp[0], "from c", SILENCE).await, None);
    assert_eq!(echo.hits.load(Ordering::SeqCst), 6, "nothing from C");

    let mb = metrics(&b).await;
    assert_eq!(
        value(
            &mb,
            "trellis_udp_refused_total{direction=\"inbound\",destination=\"\",reason=\"forbidden\"}"
        ),
        Some(1.0),
        "{mb}"
    );
    assert_eq!(
        value(
            &mb,
            "trellis_udp_sessions{direction=\"inbound\",destination=\"\"}"
        ),
        Some(2.0),
        "{mb}"
    );
    assert_eq!(
        value(
            &mb,
            "trellis_udp_datagrams_total{direction=\"inbound\",destination=\"\",flow=\"sent\"}"
        ),
        Some(6.0),
        "{mb}"
    );
    let dest = format!("destination=\"echo.shop:{port}\"");
    let ma = metrics(&a).await;
    for (series, want) in [
        (
            format!("trellis_udp_sessions{{direction=\"outbound\",{dest}}}"),
            2.0,
        ),
        (
            format!(
                "trellis_udp_datagrams_total{{direction=\"outbound\",{dest},flow=\"received\"}}"
            ),
            6.0,
        ),
        (
            format!("trellis_udp_datagrams_total{{direction=\"outbound\",{dest},flow=\"sent\"}}"),
            6.0,
        ),
        (
            format!(
                "trellis_udp_session_events_total{{direction=\"outbound\",{dest},event=\"opened\"}}"
            ),
            2.0,
        ),
    ] {
        assert_eq!(value(&ma, &series), Some(want), "{series}: {ma}");
    }
    assert!(
        ma.contains("trellis_tls_handshakes_total{direction=\"outbound\"} 2"),
        "one mTLS connection per session: {ma}"
    );
    let mc = metrics(&c).await;
    assert_eq!(
        value(
            &mc,
            &format!("trellis_udp_datagrams_total{{direction=\"outbound\",{dest},flow=\"sent\"}}")
        ),
        Some(0.0),
        "{mc}"
    );
}

#[tokio::test]
async fn a_rule_without_udp_in_its_protocols_does_not_allow_a_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let echo = udp_echo("echo", "127.0.0.1:0").await;
    let port = echo.addr.port();
    // The same rule as the test above, without `protocols`: TCP only.
    let b = server(
        dir.path(),
        &ca,
        "127.0.0.1",
        &format!("      - identities: [\"{A_ID}\"]\n        ports: [{port}]\n"),
    )
    .await;
    let a = client(dir.path(), &ca, A_ID, port, &[("b", 1, b.inbound.unwrap())]).await;
    let s = socket().await;
    assert_eq!(ask(&s, a.udp[0], "hello", SILENCE).await, None);
    assert_eq!(echo.hits.load(Ordering::SeqCst), 0);
    let mb = metrics(&b).await;
    assert_eq!(
        value(
            &mb,
            "trellis_udp_refused_total{direction=\"inbound\",destination=\"\",reason=\"forbidden\"}"
        ),
        Some(1.0),
        "{mb}"
    );
    // The control: the same rule, now covering udp, lets the same source through (once its
    // retry hold of 1 s has passed).
    let mut config = b.shared.routes.table.load().config();
    config.inbound.as_mut().unwrap().policy.authorizations[0].protocols = vec![
        trellis_proxy::config::L4Protocol::Tcp,
        trellis_proxy::config::L4Protocol::Udp,
    ];
    b.shared.routes.apply(config).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        ask(&s, a.udp[0], "again", REPLY).await.as_deref(),
        Some("echo:again")
    );
}

#[tokio::test]
async fn a_traffic_split_spreads_sessions_over_both_backends_and_keeps_each_session_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    // Two backends' apps on one UDP port (the destination's), on two loopback addresses.
    let v1 = udp_echo("v1", "127.0.0.1:0").await;
    let port = v1.addr.port();
    let v2 = udp_echo("v2", &format!("127.0.0.2:{port}")).await;
    let rule = format!("      - identities: [\"{A_ID}\"]\n        protocols: [udp]\n");
    let b1 = server(dir.path(), &ca, "127.0.0.1", &rule).await;
    let b2 = server(dir.path(), &ca, "127.0.0.2", &rule).await;
    let a = client(
        dir.path(),
        &ca,
        A_ID,
        port,
        &[
            ("v1", 1, b1.inbound.unwrap()),
            ("v2", 1, b2.inbound.unwrap()),
        ],
    )
    .await;
    let mut seen = Vec::new();
    for s in 0..6 {
        let sock = socket().await;
        let mut answered_by = None;
        for i in 0..4 {
            let reply = ask(&sock, a.udp[0], &format!("{s}-{i}"), REPLY)
                .await
                .expect("a reply");
            let (by, echoed) = reply.split_once(':').unwrap();
            assert_eq!(echoed, format!("{s}-{i}"));
            match answered_by {
                None => answered_by = Some(by.to_string()),
                Some(ref first) => assert_eq!(first, by, "session {s} changed backend"),
            }
        }
        seen.push(answered_by.unwrap());
    }
    let on_v1 = seen.iter().filter(|b| *b == "v1").count();
    // The split's schedule is exact over each cycle of the weights (1:1).
    assert_eq!((on_v1, seen.len() - on_v1), (3, 3), "{seen:?}");
    assert_eq!(v1.hits.load(Ordering::SeqCst), 12);
    assert_eq!(v2.hits.load(Ordering::SeqCst), 12);
}

#[tokio::test]
async fn a_policy_change_to_deny_closes_an_open_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let echo = udp_echo("echo", "127.0.0.1:0").await;
    let port = echo.addr.port();
    let b = server(
        dir.path(),
        &ca,
        "127.0.0.1",
        &format!("      - identities: [\"{A_ID}\"]\n        protocols: [udp]\n"),
    )
    .await;
    let a = client(dir.path(), &ca, A_ID, port, &[("b", 1, b.inbound.unwrap())]).await;
    let s = socket().await;
    assert_eq!(
        ask(&s, a.udp[0], "before", REPLY).await.as_deref(),
        Some("echo:before")
    );
    let open = "trellis_udp_sessions{direction=\"inbound\",destination=\"\"}";
    assert_eq!(value(&metrics(&b).await, open), Some(1.0));

    let mut config = b.shared.routes.table.load().config();
    config.inbound.as_mut().unwrap().policy.authorizations[0].identities =
        vec!["spiffe://cluster.local/ns/shop/sa/someone-else".into()];
    b.shared.routes.apply(config).unwrap();
    // B closes the tunnel at once (not after its idle timeout), and A's session with it.
    assert_eq!(settles(&b, open, 0.0).await, Some(0.0));
    let outbound_open =
        format!("trellis_udp_sessions{{direction=\"outbound\",destination=\"echo.shop:{port}\"}}");
    assert_eq!(settles(&a, &outbound_open, 0.0).await, Some(0.0));
    // And the next tunnel of the same client is refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ask(&s, a.udp[0], "after", SILENCE).await, None);
    assert_eq!(echo.hits.load(Ordering::SeqCst), 1);
}
