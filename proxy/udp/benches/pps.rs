//! UDP packets per second and round trips through the tunnel (issue #14: "UDP packets per
//! second through two proxies next to direct"), in one run on loopback:
//!
//! - **direct**: clients -> a UDP echo application;
//! - **tunnel**: clients -> `UdpOutbound` -> plain TCP over loopback -> `UdpInbound` -> the same
//!   echo application (the proxies' UDP part without TLS: the TLS cost is the proxy's, the same
//!   as for TCP).
//!
//! For 64-byte and 1,200-byte datagrams: the round trip (p50, p99) with one datagram in flight,
//! then packets per second (echoes received) with 4 clients keeping 16 datagrams in flight
//! each (a window lost to a 50 ms silence is counted and sent again). Each phase runs
//! `--millis` (default 500), so a run takes about 8 phases x that.
//!
//! ```sh
//! cargo bench -p trellis-udp --bench pps                       # [-- --millis 2000]
//! cargo test -p trellis-udp --bench pps -- --millis 50         # debug smoke run
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use trellis_udp::{
    Header, InboundConfig, Opened, OutboundConfig, Refused, Route, UdpInbound, UdpOutbound,
};

const CLIENTS: usize = 4;
const WINDOW: usize = 16;

fn millis_flag() -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--millis")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--millis takes a number"))
        .unwrap_or(500)
}

async fn echo_app() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

struct TcpRoute {
    to: SocketAddr,
    port: u16,
}

impl Route for TcpRoute {
    async fn open(&self, _source: SocketAddr) -> Result<Opened, Refused> {
        let s = TcpStream::connect(self.to)
            .await
            .map_err(|_| Refused::new("connect-failed"))?;
        s.set_nodelay(true).unwrap();
        Ok(Opened::new(s, self.port))
    }
}

/// Outbound and inbound over loopback TCP in front of `app`; returns the outbound's address.
async fn tunnel_to(app: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound_addr = listener.local_addr().unwrap();
    let inbound = Arc::new(UdpInbound::new(InboundConfig::default()));
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            s.set_nodelay(true).unwrap();
            let inbound = Arc::clone(&inbound);
            tokio::spawn(async move {
                let authorize = |h: Header| Ok(SocketAddr::from(([127, 0, 0, 1], h.port)));
                inbound.serve(s, authorize, std::future::pending()).await;
            });
        }
    });
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let route = TcpRoute {
        to: inbound_addr,
        port: app.port(),
    };
    let outbound = UdpOutbound::new(socket, route, OutboundConfig::default());
    let addr = outbound.local_addr().unwrap();
    tokio::spawn(outbound.run(std::future::pending()));
    addr
}

/// Round trips with one datagram in flight for `phase`: (p50, p99, count).
async fn round_trips(to: SocketAddr, size: usize, phase: Duration) -> (Duration, Duration, usize) {
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(to).await.unwrap();
    let payload = vec![0xA5u8; size];
    let mut buf = vec![0u8; 65_536];
    let mut samples = Vec::new();
    let end = Instant::now() + phase;
    while Instant::now() < end {
        let t = Instant::now();
        c.send(&payload).await.unwrap();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), c.recv(&mut buf)).await
        {
            samples.push(t.elapsed());
        }
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), samples.len())
}

/// Echoes per second with CLIENTS x WINDOW in flight for `phase`: (pps, windows lost).
async fn throughput(to: SocketAddr, size: usize, phase: Duration) -> (f64, u64) {
    let start = Instant::now();
    let end = start + phase;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        clients.spawn(async move {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.connect(to).await.unwrap();
            let payload = vec![0x5Au8; size];
            let mut buf = vec![0u8; 65_536];
            let (mut got, mut lost, mut in_flight) = (0u64, 0u64, 0usize);
            while Instant::now() < end {
                while in_flight < WINDOW {
                    c.send(&payload).await.unwrap();
                    in_flight += 1;
                }
                match tokio::time::timeout(Duration::from_millis(50), c.recv(&mut buf)).await {
                    Ok(Ok(_)) => {
                        got += 1;
                        in_flight = in_flight.saturating_sub(1);
                    }
                    _ => {
                        lost += 1;
                        in_flight = 0;
                    }
                }
            }
            (got, lost)
        });
    }
    let (mut got, mut lost) = (0, 0);
    while let Some(r) = clients.join_next().await {
        let (g, l) = r.unwrap();
        got += g;
        lost += l;
    }
    (got as f64 / start.elapsed().as_secs_f64(), lost)
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let phase = Duration::from_millis(millis_flag());
    let app = echo_app().await;
    let tunnel = tunnel_to(app).await;
    if cfg!(debug_assertions) {
        println!("(debug build: figures not representative)");
    }
    println!(
        "UDP echo on loopback, {} ms per phase; pps: {CLIENTS} clients x {WINDOW} in flight",
        phase.as_millis()
    );
    println!(
        "{:<10} {:<8} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "size", "path", "rtt p50", "rtt p99", "rtt n", "pps", "lost"
    );
    for size in [64usize, 1200] {
        for (name, to) in [("direct", app), ("tunnel", tunnel)] {
            let (p50, p99, n) = round_trips(to, size, phase).await;
            let (pps, lost) = throughput(to, size, phase).await;
            println!(
                "{:<10} {:<8} {:>10} {:>10} {:>10} {:>12.0} {:>8}",
                format!("{size} B"),
                name,
                micros(p50),
                micros(p99),
                n,
                pps,
                lost
            );
        }
    }
}
