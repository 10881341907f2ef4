//! `trellis-consul-double --listen 127.0.0.1:0 [--token TOKEN] [--datacenter dc1]`: runs the
//! Consul API double as a process and prints `listening on http://ADDR` once it accepts connections.

use std::net::SocketAddr;

use trellis_consul_double::{ConsulDouble, DoubleConfig};

fn usage() -> ! {
    eprintln!("usage: trellis-consul-double [--listen ADDR] [--token ACL_TOKEN] [--datacenter DC]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut config = DoubleConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--listen" => {
                let v = value();
                config.listen = v.parse::<SocketAddr>().unwrap_or_else(|e| {
                    eprintln!("--listen {v:?}: not an IP:port address: {e}");
                    std::process::exit(2)
                });
            }
            "--token" => config.acl_token = Some(value()),
            "--datacenter" => config.datacenter = value(),
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage()
            }
        }
    }
    let double = match ConsulDouble::start_with(config).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot listen: {e}");
            std::process::exit(1)
        }
    };
    println!("listening on {}", double.http_addr());
    let _ = tokio::signal::ctrl_c().await;
}
