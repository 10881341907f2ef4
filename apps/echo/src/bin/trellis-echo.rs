//! `trellis-echo`: the conformance suite's and the demo's test app. Prints `listening on ADDR`
//! once it serves, so a harness can start it on port 0 and read the port back.

use std::net::SocketAddr;

use clap::Parser;
use trellis_echo::echo::{EchoServer, Identity};

#[derive(Parser, Debug)]
#[command(
    about = "Echo app: answers who it is, counts requests per caller, calls others on request"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Service name it answers as.
    #[arg(long)]
    service: String,
    /// Version it answers as.
    #[arg(long, default_value = "v1")]
    version: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = EchoServer::start(
        args.listen,
        Identity {
            service: args.service,
            version: args.version,
        },
    )
    .await?;
    println!("listening on {}", server.addr());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
