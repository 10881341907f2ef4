//! `trellis-bench-udp-load`: the UDP benchmark's load generator (`scripts/bench/udp`). Runs one
//! load against a target and prints its figures as one JSON object on stdout:
//!
//! ```text
//! trellis-bench-udp-load --target ADDR --size 64 --sessions 4 --window 16 --duration 5
//!     closed loop: {"mode":"closed","sent":..,"received":..,"per_second":..,"stalls":..,...}
//! trellis-bench-udp-load --target ADDR --size 64 --sessions 4 --rate 5000 --duration 5
//!     fixed rate:  {"mode":"rate","sent":..,"received":..,"p50_us":..,"p99_us":..,...}
//! ```
//!
//! What each load does: [`trellis_bench_upstream::udp`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use trellis_bench_upstream::udp::{ClosedLoop, FixedRate, closed_loop, fixed_rate};

/// UDP load against an echo (directly or through proxies): closed loop, or a fixed rate.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to send (the echo, or a proxy's UDP listener).
    #[arg(long)]
    target: SocketAddr,
    /// Payload bytes per datagram (at least 8 with --rate).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Client sockets, each its own session (source address).
    #[arg(long, default_value_t = 4)]
    sessions: usize,
    /// Closed loop: datagrams in flight per session.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Fixed rate in datagrams per second over all sessions (instead of the closed loop).
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds to measure (after the sessions are open).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Closed loop: milliseconds of silence after which a session's window counts as lost.
    #[arg(long, default_value_t = 50)]
    silence_ms: u64,
    /// Fixed rate: milliseconds to wait for the last echoes.
    #[arg(long, default_value_t = 300)]
    drain_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let duration = Duration::try_from_secs_f64(args.duration).context("--duration")?;
    let report = match args.rate {
        None => {
            let r = closed_loop(&ClosedLoop {
                target: args.target,
                sessions: args.sessions,
                window: args.window,
                size: args.size,
                duration,
                silence: Duration::from_millis(args.silence_ms),
            })
            .with_context(|| format!("closed loop towards {}", args.target))?;
            json!({
                "mode": "closed", "size": args.size, "sessions": args.sessions,
                "window": args.window, "sent": r.sent, "received": r.received,
                "wrong_size": r.wrong_size, "stalls": r.stalls, "seconds": r.seconds,
                "per_second": r.per_second(),
            })
        }
        Some(rate) => {
            let r = fixed_rate(&FixedRate {
                target: args.target,
                sessions: args.sessions,
                rate,
                size: args.size,
                duration,
                drain: Duration::from_millis(args.drain_ms),
            })
            .with_context(|| format!("fixed rate towards {}", args.target))?;
            json!({
                "mode": "rate", "size": args.size, "sessions": args.sessions, "rate": rate,
                "sent": r.sent, "received": r.received, "wrong_size": r.wrong_size,
                "max_send_lag_us": r.max_send_lag_us, "p50_us": r.p50_us, "p90_us": r.p90_us,
                "p99_us": r.p99_us, "p999_us": r.p999_us, "max_us": r.max_us,
            })
        }
    };
    println!("{report}");
    Ok(())
}
