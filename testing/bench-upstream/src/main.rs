//! `trellis-bench-upstream`: runs [`trellis_bench_upstream::serve`] on a loopback port for the
//! proxy benchmark and prints `listening on ADDR` once it accepts connections, so the script
//! can bind port 0 and read the port back. With `--udp`, the UDP benchmark's echo instead
//! ([`trellis_bench_upstream::udp::echo`]), on a UDP socket bound to the same address.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;

/// A tiny HTTP/1.1 + h2c server that answers every request with the same small body.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Tokio worker threads (the benchmark pins this so every target sees the same upstream).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Size in bytes of the response body; 0 keeps the built-in short greeting.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Serve UDP echo on `--listen` (with `--threads` threads) instead of HTTP.
    #[arg(long)]
    udp: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.udp {
        let socket = std::net::UdpSocket::bind(args.listen)
            .with_context(|| format!("binding UDP {}", args.listen))?;
        let local = socket.local_addr().context("reading the bound address")?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {local}")?;
        stdout.flush()?;
        return trellis_bench_upstream::udp::echo(socket, args.threads)
            .context("receiving datagrams");
    }
    let body = if args.body_bytes == 0 {
        Bytes::from_static(trellis_bench_upstream::DEFAULT_BODY)
    } else {
        Bytes::from(vec![b'x'; args.body_bytes])
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let local = listener.local_addr().context("reading the bound address")?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {local}")?;
        stdout.flush()?;
        trellis_bench_upstream::serve(listener, body)
            .await
            .context("accepting connections")
    })
}
