//! `trellis-consul-double --listen 127.0.0.1:0 [--token TOKEN] [--datacenter dc1]
//! [--node-name NAME] [--node-address IP]`: runs the Consul API double as a process and prints
//! `listening on http://ADDR` once it accepts connections. The node flags name the node its agent
//! API registers services on (Consul's `-node` and `-advertise`).

use std::net::SocketAddr;

use trellis_consul_double::{ConsulDouble, DoubleConfig};

fn usage() -> ! {
    eprintln!(
        "usage: trellis-consul-double [--listen ADDR] [--token ACL_TOKEN] [--datacenter DC] [--node-name NAME] [--node-address IP]"
    );
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
            "--node-name" => config.agent.node_name = value(),
            "--node-address" => {
                let v = value();
                if v.parse::<std::net::IpAddr>().is_err() {
                    eprintln!("--node-address {v:?}: not an IP address");
                    std::process::exit(2)
                }
                config.agent.node_address = v;
            }
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
