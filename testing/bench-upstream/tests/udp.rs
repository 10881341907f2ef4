//! The UDP benchmark's echo and load generator on real loopback sockets: what the loads count
//! and time is what an echo did (and a wrong or slow echo shows in the figures).

use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

use trellis_bench_upstream::udp::{
    ClosedLoop, FixedRate, closed_loop, echo, fixed_rate, percentile_us,
};

fn start_echo(threads: usize) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    thread::spawn(move || echo(socket, threads));
    addr
}

/// An application answering every datagram after `delay`, with `extra` bytes appended.
fn odd_echo(delay: Duration, extra: usize) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            thread::sleep(delay);
            let _ = socket.send_to(&buf[..n + extra], from);
        }
    });
    addr
}

fn closed(target: SocketAddr, size: usize) -> ClosedLoop {
    ClosedLoop {
        target,
        sessions: 3,
        window: 4,
        size,
        duration: Duration::from_millis(300),
        silence: Duration::from_secs(1),
    }
}

#[test]
fn the_echo_answers_each_datagram_with_itself_from_every_thread() {
    let addr = start_echo(2);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..20u8 {
        let payload = vec![i; 1 + i as usize * 50];
        client.send_to(&payload, addr).unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&payload[..], addr));
    }
}

#[test]
fn the_closed_loop_counts_the_echoes_of_every_session() {
    let report = closed_loop(&closed(start_echo(1), 1200)).unwrap();
    assert!(report.received > 100, "{report:?}");
    assert_eq!((report.wrong_size, report.stalls), (0, 0), "{report:?}");
    // Every echo answers a datagram sent; at most the windows are still in flight at the end.
    assert!(report.sent >= report.received, "{report:?}");
    assert!(report.sent <= report.received + 3 * 4, "{report:?}");
    let rate = report.per_second();
    assert!((rate - report.received as f64 / report.seconds).abs() < 1e-6);
}

#[test]
fn echoes_of_another_size_are_not_counted_as_received() {
    let report = closed_loop(&closed(odd_echo(Duration::ZERO, 1), 64)).unwrap();
    assert_eq!(report.received, 0, "{report:?}");
    assert!(report.wrong_size > 100, "{report:?}");
}

#[test]
fn the_fixed_rate_sends_at_the_rate_and_times_each_echo() {
    let report = fixed_rate(&FixedRate {
        target: start_echo(1),
        sessions: 2,
        rate: 2_000,
        size: 64,
        duration: Duration::from_millis(500),
        drain: Duration::from_millis(200),
    })
    .unwrap();
    assert_eq!(report.sent, 1_000, "{report:?}");
    assert_eq!(
        report.received, report.sent,
        "loopback loses nothing at this rate"
    );
    assert!(report.p50_us > 0.0, "{report:?}");
    assert!(report.p50_us <= report.p99_us && report.p99_us <= report.max_us);
}

#[test]
fn the_round_trip_includes_the_time_the_application_takes() {
    let report = fixed_rate(&FixedRate {
        target: odd_echo(Duration::from_millis(3), 0),
        sessions: 1,
        rate: 100,
        size: 64,
        duration: Duration::from_millis(300),
        drain: Duration::from_millis(200),
    })
    .unwrap();
    assert_eq!(report.received, report.sent, "{report:?}");
    assert!(report.p50_us >= 3_000.0, "{report:?}");
}

#[test]
fn fixed_rate_needs_room_for_the_send_time() {
    let err = fixed_rate(&FixedRate {
        target: start_echo(1),
        sessions: 1,
        rate: 10,
        size: 7,
        duration: Duration::from_millis(10),
        drain: Duration::ZERO,
    })
    .unwrap_err();
    assert!(err.to_string().contains("at least 8 bytes"), "{err}");
}

#[test]
fn percentiles_are_nearest_rank() {
    let ns: Vec<u64> = (1..=1000).map(|i| i * 1_000).collect();
    assert_eq!(percentile_us(&ns, 0.5), 500.0);
    assert_eq!(percentile_us(&ns, 0.99), 990.0);
    assert_eq!(percentile_us(&ns, 0.999), 999.0);
    assert_eq!(percentile_us(&ns, 1.0), 1000.0);
    assert_eq!(percentile_us(&[], 0.5), 0.0);
}
