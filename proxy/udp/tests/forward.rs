//! UDP through UdpOutbound -> plain TCP over loopback -> UdpInbound -> a UDP echo application,
//! all real sockets on 127.0.0.1: replies reach the right client, refusals, bounds, idle
//! timeouts, tunnel failures, oversized datagrams, frames split across reads.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use trellis_udp::{Ended, Header, HeaderError, InboundConfig, OutboundConfig, UdpInbound};

async fn mesh(
    outbound: OutboundConfig,
    inbound: InboundConfig,
    trickle: bool,
) -> (
    SocketAddr,
    std::sync::Arc<trellis_udp::Counters>,
    InboundListener,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let app = echo_app().await;
    let listener = InboundListener::start(inbound, allow_port(app.port()), trickle).await;
    let mut route = TcpRoute::new(listener.addr, app.port());
    route.trickle = trickle;
    let opened = std::sync::Arc::clone(&route.opened);
    let (addr, counters) = start_outbound(route, outbound).await;
    (addr, counters, listener, opened)
}

#[tokio::test]
async fn two_clients_at_once_each_get_their_own_replies() {
    let (addr, out, inb, opened) =
        mesh(OutboundConfig::default(), InboundConfig::default(), false).await;
    let run = |name: &'static str| async move {
        let c = client(addr).await;
        for i in 0..50 {
            let payload = format!("{name}-{i}");
            assert_eq!(round_trip(&c, payload.as_bytes()).await, payload.as_bytes());
        }
        // An empty datagram is carried as one too.
        assert_eq!(round_trip(&c, b"").await, b"");
    };
    tokio::join!(run("alice"), run("bob"));
    let o = out.snapshot();
    assert_eq!(o.sessions_opened, 2, "{o:#?}");
    assert_eq!(o.sessions_open, 2);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
    assert!(
        o.received_datagrams >= 102 && o.sent_datagrams >= 102,
        "{o:#?}"
    );
    assert_eq!(
        o.dropped_refused + o.dropped_session_limit + o.dropped_oversized,
        0
    );
    let i = inb.counters();
    assert_eq!(i.sessions_opened, 2, "{i:#?}");
    assert_eq!(i.sent_datagrams, o.tunneled_datagrams, "{i:#?}");
}

#[tokio::test]
async fn a_refused_source_is_dropped_and_counted_and_opens_no_tunnel() {
    let app = echo_app().await;
    let listener =
        InboundListener::start(InboundConfig::default(), allow_port(app.port()), false).await;
    let refused = client_unconnected().await;
    let allowed = client_unconnected().await;
    let mut route = TcpRoute::new(listener.addr, app.port());
    route.refuse = vec![refused.local_addr().unwrap()];
    let opened = std::sync::Arc::clone(&route.opened);
    let config = OutboundConfig {
        retry_after: Duration::from_secs(30),
        ..OutboundConfig::default()
    };
    let (addr, out) = start_outbound(route, config).await;
    refused.connect(addr).await.unwrap();
    allowed.connect(addr).await.unwrap();
    for _ in 0..3 {
        refused.send(b"let me in").await.unwrap();
    }
    assert_eq!(round_trip(&allowed, b"hello").await, b"hello");
    let o = until(
        "3 datagrams dropped",
        || out.snapshot(),
        |s| s.dropped_refused == 3,
    )
    .await;
    assert_eq!(
        recv_within(&refused, Duration::from_millis(300)).await,
        None
    );
    // The route was asked once (the source is held for retry_after), and opened only the
    // allowed client's tunnel.
    assert_eq!(o.sessions_refused, 1, "{o:#?}");
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    assert_eq!(listener.counters().sessions_opened, 1);
}

async fn client_unconnected() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

#[tokio::test]
async fn an_idle_session_closes_its_tunnel_and_the_next_datagram_opens_a_new_one() {
    let config = OutboundConfig {
        idle_timeout: Duration::from_millis(500),
        ..OutboundConfig::default()
    };
    let (addr, out, inb, opened) = mesh(config, InboundConfig::default(), false).await;
    let c = client(addr).await;
    assert_eq!(round_trip(&c, b"one").await, b"one");
    assert_eq!(inb.counters().sessions_open, 1);
    let o = until("idle close", || out.snapshot(), |s| s.sessions_idle == 1).await;
    assert_eq!(o.sessions_open, 0, "{o:#?}");
    // The far side saw the stream end (the caller closed it) and let go of its socket.
    until(
        "inbound closed",
        || inb.counters(),
        |s| s.sessions_open == 0,
    )
    .await;
    assert!(matches!(
        inb.ended.lock().unwrap().as_slice(),
        [Ended::CallerClosed]
    ));
    assert_eq!(round_trip(&c, b"two").await, b"two");
    assert_eq!(out.snapshot().sessions_opened, 2);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_session_bound_holds_a_new_source_beyond_it_is_dropped_until_one_closes() {
    let config = OutboundConfig {
        max_sessions: 2,
        idle_timeout: Duration::from_secs(1),
        ..OutboundConfig::default()
    };
    let (addr, out, _inb, _) = mesh(config, InboundConfig::default(), false).await;
    let (a, b, c) = (client(addr).await, client(addr).await, client(addr).await);
    assert_eq!(round_trip(&a, b"a").await, b"a");
    assert_eq!(round_trip(&b, b"b").await, b"b");
    c.send(b"c").await.unwrap();
    assert_eq!(recv_within(&c, Duration::from_millis(200)).await, None);
    let o = out.snapshot();
    assert_eq!(o.dropped_session_limit, 1, "{o:#?}");
    assert_eq!(o.sessions_opened, 2);
    // The sessions in place keep working meanwhile.
    assert_eq!(round_trip(&a, b"a2").await, b"a2");
    // Once a and b idle out, c gets a session.
    until("both idle", || out.snapshot(), |s| s.sessions_idle == 2).await;
    assert_eq!(round_trip(&c, b"c2").await, b"c2");
    assert_eq!(out.snapshot().sessions_opened, 3);
}

#[tokio::test]
async fn a_failed_tunnel_closes_the_session_and_a_later_datagram_opens_another() {
    let config = OutboundConfig {
        retry_after: Duration::from_millis(200),
        ..OutboundConfig::default()
    };
    let (addr, out, inb, opened) = mesh(config, InboundConfig::default(), false).await;
    let c = client(addr).await;
    assert_eq!(round_trip(&c, b"before").await, b"before");
    // The far side ends the stream (as the proxy does when the policy stops allowing it).
    inb.revoke.notify_waiters();
    let o = until(
        "tunnel end seen",
        || out.snapshot(),
        |s| s.tunnel_failures == 1,
    )
    .await;
    assert_eq!(o.sessions_open, 0, "{o:#?}");
    assert!(matches!(
        inb.ended.lock().unwrap().as_slice(),
        [Ended::Revoked]
    ));
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(round_trip(&c, b"after").await, b"after");
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn oversized_datagrams_are_dropped_and_counted_never_truncated() {
    // The application answers "big" with 1,500 bytes, anything else with itself.
    let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = app.recv_from(&mut buf).await.unwrap();
            let reply = if &buf[..n] == b"big" {
                vec![b'x'; 1500]
            } else {
                buf[..n].to_vec()
            };
            app.send_to(&reply, from).await.unwrap();
        }
    });
    let max = 1000;
    let inbound = InboundConfig {
        max_datagram: max,
        ..InboundConfig::default()
    };
    let listener = InboundListener::start(inbound, allow_port(app_addr.port()), false).await;
    let outbound = OutboundConfig {
        max_datagram: max,
        ..OutboundConfig::default()
    };
    let (addr, out) = start_outbound(TcpRoute::new(listener.addr, app_addr.port()), outbound).await;
    let c = client(addr).await;
    assert_eq!(round_trip(&c, &[1; 1000]).await, vec![1; 1000]);
    c.send(&[2; 1001]).await.unwrap();
    assert_eq!(recv_within(&c, Duration::from_millis(200)).await, None);
    assert_eq!(out.snapshot().dropped_oversized, 1);
    // A reply over the maximum is dropped on the far side; the session goes on.
    c.send(b"big").await.unwrap();
    assert_eq!(recv_within(&c, Duration::from_millis(200)).await, None);
    let i = until(
        "reply dropped",
        || listener.counters(),
        |s| s.dropped_oversized == 1,
    )
    .await;
    assert_eq!(i.tunnel_failures, 0, "{i:#?}");
    assert_eq!(round_trip(&c, b"still here").await, b"still here");
    assert_eq!(out.snapshot().sessions_opened, 1);
}

#[tokio::test]
async fn a_frame_announcing_more_than_the_maximum_closes_the_stream() {
    let app = echo_app().await;
    let inbound = InboundConfig {
        max_datagram: 1000,
        ..InboundConfig::default()
    };
    let listener = InboundListener::start(inbound, allow_port(app.port()), false).await;
    let mut s = TcpStream::connect(listener.addr).await.unwrap();
    s.write_all(&Header::new(app.port()).encode())
        .await
        .unwrap();
    s.write_all(&[0x03, 0xE9]).await.unwrap(); // 1,001 bytes announced
    s.write_all(&[0; 64]).await.unwrap();
    let i = until(
        "stream closed",
        || listener.counters(),
        |s| s.tunnel_failures == 1,
    )
    .await;
    assert_eq!(i.dropped_oversized, 1, "{i:#?}");
    assert_eq!(i.sent_datagrams, 0);
    assert!(matches!(
        listener.ended.lock().unwrap().as_slice(),
        [Ended::Tunnel(_)]
    ));
}

#[tokio::test]
async fn frames_split_across_many_reads_reassemble_both_ways() {
    // Both ends write a byte at a time with TCP_NODELAY: every frame arrives in pieces.
    let (addr, out, inb, _) = mesh(OutboundConfig::default(), InboundConfig::default(), true).await;
    let c = client(addr).await;
    for size in [0, 1, 2, 3, 64, 1200] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(&c, &payload).await, payload, "{size} bytes");
    }
    assert_eq!(out.snapshot().tunnel_failures, 0);
    assert_eq!(inb.counters().tunnel_failures, 0);
}

#[tokio::test]
async fn the_inbound_side_refuses_strangers_and_ports_it_does_not_allow() {
    let app = echo_app().await;
    let inbound = UdpInbound::new(InboundConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Something else than a tunnel: an HTTP request.
    let mut http = TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (s, _) = listener.accept().await.unwrap();
    let end = inbound.serve(s, allow_port(app.port()), never()).await;
    assert!(
        matches!(end, Ended::BadHeader(HeaderError::BadMagic { .. })),
        "{end:?}"
    );
    // A tunnel to a port the caller may not reach.
    let mut other = TcpStream::connect(addr).await.unwrap();
    other
        .write_all(&Header::new(app.port() ^ 1).encode())
        .await
        .unwrap();
    other.write_all(&[0, 2, b'h', b'i']).await.unwrap();
    let (s, _) = listener.accept().await.unwrap();
    let end = inbound.serve(s, allow_port(app.port()), never()).await;
    assert!(
        matches!(&end, Ended::Refused(r) if r.reason == "forbidden"),
        "{end:?}"
    );
    // A header that never comes.
    let config = InboundConfig {
        header_timeout: Duration::from_millis(100),
        ..InboundConfig::default()
    };
    let slow = UdpInbound::new(config);
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (s, _) = listener.accept().await.unwrap();
    let end = slow.serve(s, allow_port(app.port()), never()).await;
    assert!(
        matches!(&end, Ended::BadHeader(HeaderError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut),
        "{end:?}"
    );
    let c = inbound.counters().snapshot();
    assert_eq!(c.sessions_refused, 2, "{c:#?}");
    assert_eq!(c.sessions_opened, 0);
    assert_eq!(c.sent_datagrams, 0);
}

/// A route that takes `delay` to answer (a slow connect or handshake).
struct Slow {
    inner: TcpRoute,
    delay: Duration,
}

impl trellis_udp::Route for Slow {
    async fn open(&self, source: SocketAddr) -> Result<trellis_udp::Opened, trellis_udp::Refused> {
        tokio::time::sleep(self.delay).await;
        self.inner.open(source).await
    }
}

#[tokio::test]
async fn datagrams_beyond_the_queue_wait_for_no_tunnel_and_a_late_route_counts_as_refused() {
    let app = echo_app().await;
    let listener =
        InboundListener::start(InboundConfig::default(), allow_port(app.port()), false).await;
    // The tunnel takes 300 ms to open; 2 datagrams may wait for it.
    let slow = Slow {
        inner: TcpRoute::new(listener.addr, app.port()),
        delay: Duration::from_millis(300),
    };
    let config = OutboundConfig {
        queue: 2,
        ..OutboundConfig::default()
    };
    let (addr, out) = start_outbound(slow, config).await;
    let c = client(addr).await;
    for i in 0..5u8 {
        c.send(&[i]).await.unwrap();
    }
    let mut replies = Vec::new();
    while let Some(r) = recv_within(&c, Duration::from_millis(600)).await {
        replies.push(r);
    }
    assert_eq!(
        replies,
        vec![vec![0], vec![1]],
        "the first two waited, in order"
    );
    let o = out.snapshot();
    assert_eq!(o.dropped_queue_full, 3, "{o:#?}");
    assert_eq!(o.tunneled_datagrams, 2);

    // A route slower than open_timeout: the session is refused, nothing is sent.
    let late = Slow {
        inner: TcpRoute::new(listener.addr, app.port()),
        delay: Duration::from_secs(5),
    };
    let config = OutboundConfig {
        open_timeout: Duration::from_millis(100),
        ..OutboundConfig::default()
    };
    let (addr, out) = start_outbound(late, config).await;
    let c = client(addr).await;
    c.send(b"anyone?").await.unwrap();
    let o = until(
        "open timed out",
        || out.snapshot(),
        |s| s.sessions_refused == 1,
    )
    .await;
    assert_eq!(o.dropped_refused, 1, "{o:#?}");
    assert_eq!(o.sessions_opened, 0);
    assert_eq!(recv_within(&c, Duration::from_millis(100)).await, None);
}
