//! Shared by the tests: a UDP echo application, an inbound listener over plain TCP, a Route
//! that opens plain TCP tunnels, UDP clients, and polling for counters.
#![allow(dead_code)] // each test file uses its part

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Notify;
use trellis_udp::{
    Counters, Ended, Header, InboundConfig, Opened, OutboundConfig, Refused, Route, Snapshot,
    UdpInbound, UdpOutbound,
};

/// A UDP echo application on 127.0.0.1: every datagram goes back to its sender unchanged.
pub async fn echo_app() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// How the test's inbound listener decides (the proxy's authorization, simplified): the port
/// in the header must be `allowed_port`; the app is then 127.0.0.1 on that port.
pub fn allow_port(allowed_port: u16) -> impl Fn(Header) -> Result<SocketAddr, Refused> + Clone {
    move |h: Header| {
        if h.port == allowed_port {
            Ok(SocketAddr::from(([127, 0, 0, 1], h.port)))
        } else {
            Err(Refused::new("forbidden"))
        }
    }
}

/// An inbound listener on 127.0.0.1 over plain TCP: each accepted stream is served by
/// `inbound` with `authorize`; `revoke` ends every stream served so far; each end is recorded.
pub struct InboundListener {
    pub addr: SocketAddr,
    pub inbound: Arc<UdpInbound>,
    pub revoke: Arc<Notify>,
    pub ended: Arc<Mutex<Vec<Ended>>>,
}

impl InboundListener {
    pub async fn start<F>(config: InboundConfig, authorize: F, trickle: bool) -> Self
    where
        F: Fn(Header) -> Result<SocketAddr, Refused> + Clone + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inbound = Arc::new(UdpInbound::new(config));
        let revoke = Arc::new(Notify::new());
        let ended = Arc::new(Mutex::new(Vec::new()));
        let (i, r, e) = (
            Arc::clone(&inbound),
            Arc::clone(&revoke),
            Arc::clone(&ended),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (i, r, e, authorize) = (
                    Arc::clone(&i),
                    Arc::clone(&r),
                    Arc::clone(&e),
                    authorize.clone(),
                );
                tokio::spawn(async move {
                    let revoked = r.notified();
                    let end = if trickle {
                        i.serve(Trickle(stream), authorize, revoked).await
                    } else {
                        i.serve(stream, authorize, revoked).await
                    };
                    e.lock().unwrap().push(end);
                });
            }
        });
        InboundListener {
            addr,
            inbound,
            revoke,
            ended,
        }
    }

    pub fn counters(&self) -> Snapshot {
        self.inbound.counters().snapshot()
    }
}

/// Opens plain TCP tunnels to an inbound listener for datagrams to `port`; refuses the sources
/// in `refuse`; counts the tunnels it opened.
#[derive(Debug)]
pub struct TcpRoute {
    pub to: SocketAddr,
    pub port: u16,
    pub refuse: Vec<SocketAddr>,
    pub opened: Arc<AtomicUsize>,
    /// Write the tunnel a byte at a time (frames then arrive split across many reads).
    pub trickle: bool,
}

impl TcpRoute {
    pub fn new(to: SocketAddr, port: u16) -> Self {
        TcpRoute {
            to,
            port,
            refuse: Vec::new(),
            opened: Arc::new(AtomicUsize::new(0)),
            trickle: false,
        }
    }
}

impl Route for TcpRoute {
    async fn open(&self, source: SocketAddr) -> Result<Opened, Refused> {
        if self.refuse.contains(&source) {
            return Err(Refused::new("forbidden"));
        }
        let stream = TcpStream::connect(self.to)
            .await
            .map_err(|_| Refused::new("connect-failed"))?;
        stream.set_nodelay(true).unwrap();
        self.opened.fetch_add(1, Ordering::SeqCst);
        Ok(if self.trickle {
            Opened::new(Trickle(stream), self.port)
        } else {
            Opened::new(stream, self.port)
        })
    }
}

/// Start an outbound forwarder on 127.0.0.1 with `route`; returns its address and counters
/// (it runs until the test's runtime ends).
pub async fn start_outbound<R: Route>(
    route: R,
    config: OutboundConfig,
) -> (SocketAddr, Arc<Counters>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let outbound = UdpOutbound::new(socket, route, config);
    let addr = outbound.local_addr().unwrap();
    let counters = outbound.counters();
    tokio::spawn(outbound.run(std::future::pending()));
    (addr, counters)
}

/// A UDP client on 127.0.0.1 connected to `to`.
pub async fn client(to: SocketAddr) -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(to).await.unwrap();
    c
}

/// The next datagram `c` receives within `wait`, if any.
pub async fn recv_within(c: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65_536];
    match tokio::time::timeout(wait, c.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        Ok(Err(e)) => panic!("client recv: {e}"),
        Err(_) => None,
    }
}

/// Send `payload` and wait for its echo (a few tries: loopback UDP may still drop).
pub async fn round_trip(c: &UdpSocket, payload: &[u8]) -> Vec<u8> {
    for _ in 0..5 {
        c.send(payload).await.unwrap();
        if let Some(reply) = recv_within(c, Duration::from_secs(2)).await {
            return reply;
        }
    }
    panic!("no reply to a {}-byte datagram", payload.len());
}

/// Wait until `f` holds of `counters()` (5 s at most), then return the snapshot.
pub async fn until(
    what: &str,
    counters: impl Fn() -> Snapshot,
    f: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = counters();
        if f(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{what}: not reached; counters: {s:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A stream whose writes go out one byte at a time (each its own TCP segment with nodelay), so
/// that the far side reads frames in pieces.
#[derive(Debug)]
pub struct Trickle<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Trickle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Trickle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(1);
        Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Boxed for tests that need a `'static` future to pass as `revoked`.
pub fn never() -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(std::future::pending())
}
