//! The UDP side of the benchmark (`scripts/bench/udp`): an echo application and a load
//! generator, both on plain blocking sockets so that they cost as little as possible per
//! datagram and the same for every target (the direct path and the two proxies).
//!
//! - [`echo`]: answers every datagram with itself, to its source, from N threads sharing one
//!   socket (two system calls per datagram, no event loop).
//! - [`closed_loop`]: packets per second. Each session is a socket of its own (a source the
//!   proxy sees as one session, hence one tunnel) connected to the target, keeping `window`
//!   datagrams in flight: every echo received sends the next datagram. A session that hears
//!   nothing for `silence` counts its window as lost and sends a new one, so a dropped
//!   datagram costs a pause, not the session.
//! - [`fixed_rate`]: round-trip latency at a fixed rate spread over the sessions. One thread
//!   paces the sends against absolute deadlines (a late send does not push the later ones
//!   back); each datagram carries its send time, so a receiving thread per session reads the
//!   round trip off the echo itself. Sending does not wait for replies (open loop), so a slow
//!   target cannot slow the load down and hide its own delay.
//!
//! Both first open every session with one datagram answered (up to 10 s): through the proxies
//! that is the session's tunnel and TLS handshake, kept out of the measured window.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Answers every datagram on `socket` with the same bytes, to its source, from `threads`
/// threads sharing the socket. Returns only on a receive error.
pub fn echo(socket: UdpSocket, threads: usize) -> io::Result<()> {
    let mut workers = Vec::new();
    for _ in 1..threads.max(1) {
        let socket = socket.try_clone()?;
        workers.push(thread::spawn(move || echo_on(&socket)));
    }
    let result = echo_on(&socket);
    for worker in workers {
        // A worker's error is the same socket's: the first one is reported.
        let _ = worker.join();
    }
    result
}

fn echo_on(socket: &UdpSocket) -> io::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        // A failed send (the source's buffer full, the source gone) loses this echo only: UDP.
        let _ = socket.send_to(&buf[..n], from);
    }
}

/// What the closed loop sends.
#[derive(Clone, Debug)]
pub struct ClosedLoop {
    /// Where the datagrams go (the echo, or the calling proxy's `outbound.udp` listener).
    pub target: SocketAddr,
    /// Client sockets, each its own session.
    pub sessions: usize,
    /// Datagrams in flight per session.
    pub window: usize,
    /// Payload bytes per datagram.
    pub size: usize,
    /// How long to measure, after the sessions are open.
    pub duration: Duration,
    /// A session hearing nothing this long counts its window as lost and sends a new one.
    pub silence: Duration,
}

/// What the closed loop measured, summed over its sessions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClosedReport {
    /// Datagrams sent in the measured window.
    pub sent: u64,
    /// Echoes received in the measured window, with the size sent.
    pub received: u64,
    /// Echoes of another size than sent (a target that mangles datagrams).
    pub wrong_size: u64,
    /// Windows given up after `silence` (each lost at least one datagram).
    pub stalls: u64,
    /// The measured window's length in seconds.
    pub seconds: f64,
}

impl ClosedReport {
    /// Echoes received per second.
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.received as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Packets per second in a closed loop (see the module docs). Fails when a session cannot be
/// opened (no echo to its first datagram within 10 s).
pub fn closed_loop(config: &ClosedLoop) -> io::Result<ClosedReport> {
    let sockets = open_sessions(config.target, config.sessions.max(1), config.size)?;
    let start = Instant::now();
    let end = start + config.duration;
    let workers: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            let config = config.clone();
            thread::spawn(move || closed_session(&socket, &config, end))
        })
        .collect();
    let mut total = ClosedReport::default();
    for worker in workers {
        let one = worker
            .join()
            .map_err(|_| io::Error::other("a session thread panicked"))??;
        total.sent += one.sent;
        total.received += one.received;
        total.wrong_size += one.wrong_size;
        total.stalls += one.stalls;
    }
    total.seconds = start.elapsed().as_secs_f64();
    Ok(total)
}

fn closed_session(
    socket: &UdpSocket,
    config: &ClosedLoop,
    end: Instant,
) -> io::Result<ClosedReport> {
    socket.set_read_timeout(Some(config.silence))?;
    let payload = vec![0xA5u8; config.size];
    let mut buf = vec![0u8; 65_536];
    let mut report = ClosedReport::default();
    let mut in_flight = 0usize;
    while Instant::now() < end {
        while in_flight < config.window {
            send(socket, &payload)?;
            report.sent += 1;
            in_flight += 1;
        }
        match socket.recv(&mut buf) {
            Ok(n) => {
                // Late echoes of a window given up may come back: never below zero.
                in_flight = in_flight.saturating_sub(1);
                if n == config.size {
                    report.received += 1;
                } else {
                    report.wrong_size += 1;
                }
            }
            Err(e) if timed_out(&e) => {
                report.stalls += 1;
                in_flight = 0;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// What the fixed-rate load sends.
#[derive(Clone, Debug)]
pub struct FixedRate {
    /// Where the datagrams go.
    pub target: SocketAddr,
    /// Client sockets, each its own session; the sends take them in turn.
    pub sessions: usize,
    /// Datagrams per second, over all sessions.
    pub rate: u64,
    /// Payload bytes per datagram (at least 8: the send time travels in the first 8).
    pub size: usize,
    /// How long to send, after the sessions are open.
    pub duration: Duration,
    /// How long to wait for the last echoes after the last send.
    pub drain: Duration,
}

/// What the fixed-rate load measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Echoes received, of the size sent.
    pub received: u64,
    /// Echoes of another size than sent.
    pub wrong_size: u64,
    /// The largest delay of a send behind its schedule, in microseconds (the generator's own
    /// lateness: large values mean this machine could not keep the rate).
    pub max_send_lag_us: f64,
    /// Round-trip percentiles of the echoes received, in microseconds: p50, p90, p99, p99.9, max.
    pub p50_us: f64,
    /// p90.
    pub p90_us: f64,
    /// p99.
    pub p99_us: f64,
    /// p99.9.
    pub p999_us: f64,
    /// The slowest echo.
    pub max_us: f64,
}

/// Round trips at a fixed rate (see the module docs). Fails when a session cannot be opened.
pub fn fixed_rate(config: &FixedRate) -> io::Result<RateReport> {
    if config.size < 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the fixed-rate load needs datagrams of at least 8 bytes (the send time)",
        ));
    }
    let sockets = open_sessions(config.target, config.sessions.max(1), config.size)?;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    for socket in &sockets {
        let socket = socket.try_clone()?;
        // Short, so that the receivers notice `stop` soon after the drain.
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::clone(&stop);
        let size = config.size;
        receivers.push(thread::spawn(move || {
            receive_stamped(&socket, size, epoch, &stop)
        }));
    }
    let mut report = RateReport::default();
    let sent = pace(&sockets, config, epoch, &mut report);
    thread::sleep(config.drain);
    stop.store(true, Ordering::SeqCst);
    let mut samples = Vec::new();
    for receiver in receivers {
        let (mut one, wrong) = receiver
            .join()
            .map_err(|_| io::Error::other("a receiving thread panicked"))??;
        report.wrong_size += wrong;
        samples.append(&mut one);
    }
    report.sent = sent?;
    report.received = samples.len() as u64;
    samples.sort_unstable();
    report.p50_us = percentile_us(&samples, 0.50);
    report.p90_us = percentile_us(&samples, 0.90);
    report.p99_us = percentile_us(&samples, 0.99);
    report.p999_us = percentile_us(&samples, 0.999);
    report.max_us = samples.last().map_or(0.0, |&ns| ns as f64 / 1e3);
    Ok(report)
}

/// Sends `rate` datagrams a second for `duration`, taking the sockets in turn; returns how many.
fn pace(
    sockets: &[UdpSocket],
    config: &FixedRate,
    epoch: Instant,
    report: &mut RateReport,
) -> io::Result<u64> {
    let mut payload = vec![0x5Au8; config.size];
    let interval = Duration::from_secs_f64(1.0 / config.rate.max(1) as f64);
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        // Absolute deadlines: a late send is followed at once by the ones now due.
        let due = start + interval.mul_f64(sent as f64);
        if due.duration_since(start) >= config.duration {
            return Ok(sent);
        }
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        } else {
            let lag = (now - due).as_secs_f64() * 1e6;
            report.max_send_lag_us = report.max_send_lag_us.max(lag);
        }
        // The time of the send itself (not the schedule): the open loop never waits on the
        // target, so what delays a send is this generator's own scheduling, not the target.
        let stamp = epoch.elapsed().as_nanos() as u64;
        payload[..8].copy_from_slice(&stamp.to_le_bytes());
        send(&sockets[sent as usize % sockets.len()], &payload)?;
        sent += 1;
    }
}

/// Round trips (nanoseconds) of the echoes on `socket` until `stop`, and the wrong-sized count.
fn receive_stamped(
    socket: &UdpSocket,
    size: usize,
    epoch: Instant,
    stop: &AtomicBool,
) -> io::Result<(Vec<u64>, u64)> {
    let mut buf = vec![0u8; 65_536];
    let (mut samples, mut wrong) = (Vec::new(), 0u64);
    while !stop.load(Ordering::SeqCst) {
        match socket.recv(&mut buf) {
            Ok(n) if n == size => {
                let now = epoch.elapsed().as_nanos() as u64;
                let sent = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                // A late echo of a session's opening datagram carries no send time (its bytes
                // read as a time far in the future): not a sample.
                if sent <= now {
                    samples.push(now - sent);
                }
            }
            Ok(_) => wrong += 1,
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((samples, wrong))
}

/// The `q` quantile (nearest rank) of sorted nanoseconds, in microseconds; 0 when empty.
pub fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted_ns.len() as f64).ceil() as usize;
    sorted_ns[rank.clamp(1, sorted_ns.len()) - 1] as f64 / 1e3
}

/// `sessions` sockets connected to `target`, each having had one datagram echoed (through the
/// proxies: its tunnel opened). Retries each for up to 10 s: a first datagram may be dropped
/// while a tunnel opens.
fn open_sessions(target: SocketAddr, sessions: usize, size: usize) -> io::Result<Vec<UdpSocket>> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([127, 0, 0, 1], 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let payload = vec![0x3Cu8; size];
    let mut buf = vec![0u8; 65_536];
    let mut sockets = Vec::with_capacity(sessions);
    for session in 0..sessions {
        let socket = UdpSocket::bind(bind)?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            send(&socket, &payload)?;
            match socket.recv(&mut buf) {
                Ok(_) => break,
                Err(e) if timed_out(&e) && Instant::now() < deadline => {}
                Err(e) if timed_out(&e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("session {session}: no echo from {target} within 10 s"),
                    ));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("session {session}: opening towards {target}: {e}"),
                    ));
                }
            }
        }
        // Echoes of the retries may still arrive: drop them before measuring.
        socket.set_nonblocking(true)?;
        while socket.recv(&mut buf).is_ok() {}
        socket.set_nonblocking(false)?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// One datagram. A refused port (`ECONNREFUSED`, reported by the next call after an ICMP
/// error) loses this datagram only, as UDP does; the receive side sees the silence.
fn send(socket: &UdpSocket, payload: &[u8]) -> io::Result<()> {
    match socket.send(payload) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e),
    }
}

/// A read timeout (`SO_RCVTIMEO`) shows as `WouldBlock` on Unix, `TimedOut` elsewhere.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
