//! The guides' hosts on one loopback. The example files give addresses as a deployment has them
//! (`0.0.0.0:15001` and `127.0.0.1:15000` on the web host, `10.0.0.10:8090` for the controller);
//! a test moves each (host, port) to a free port on 127.0.0.1, the same one in every file that
//! names it, so the files still agree with each other after the move. Nothing else in them
//! changes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// Ports moved per host, and which non-local addresses are which host.
#[derive(Debug, Default)]
pub struct Hosts {
    /// (host, port as written) -> where it is on this machine.
    moved: BTreeMap<(String, u16), SocketAddr>,
    /// An address or DNS name the files give for a host (the controller's `10.0.0.10`, or
    /// `trellis-controller.internal`) -> that host.
    named: BTreeMap<String, String>,
}

/// A free port on 127.0.0.1 (the OS picks it; it is free when this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

impl Hosts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Says that `address` (an IP address or a DNS name) in the files is `host`; loopback and
    /// `0.0.0.0` are always the file's own host.
    pub fn name(&mut self, address: &str, host: &str) {
        self.named
            .insert(address.to_ascii_lowercase(), host.to_owned());
    }

    /// Puts (`host`, `port`) at `to` (a process that is already listening, e.g. the registry).
    pub fn place(&mut self, host: &str, port: u16, to: SocketAddr) {
        self.moved.insert((host.to_owned(), port), to);
    }

    /// Where (`host`, `port`) is on this machine: a free port the first time it is asked for.
    pub fn at(&mut self, host: &str, port: u16) -> SocketAddr {
        if let Some(addr) = self.moved.get(&(host.to_owned(), port)) {
            return *addr;
        }
        // The OS may hand a port it just handed out again (nothing listens on it yet).
        let addr = loop {
            let candidate = SocketAddr::from(([127, 0, 0, 1], free_port()));
            if !self.moved.values().any(|a| *a == candidate) {
                break candidate;
            }
        };
        self.moved.insert((host.to_owned(), port), addr);
        addr
    }

    /// `text` with every `HOST:PORT` moved (HOST an IPv4 address or a DNS name): loopback and
    /// `0.0.0.0` are `host`'s own, a named address is its host's; any other IPv4 address or a
    /// name with a dot is an error (the test would send there).
    pub fn rewrite(&mut self, host: &str, text: &str) -> anyhow::Result<String> {
        let re = regex::Regex::new(r"\b([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})\b")
            .expect("valid regex");
        let mut out = String::new();
        let mut last = 0;
        for c in re.captures_iter(text) {
            let whole = c.get(0).expect("group 0");
            let address = c[1].to_ascii_lowercase();
            let port: u16 = c[2].parse()?;
            let local = address
                .parse::<Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
            let owner = if local {
                host.to_owned()
            } else if let Some(named) = self.named.get(&address) {
                named.clone()
            } else if address.parse::<Ipv4Addr>().is_ok() || address.contains('.') {
                anyhow::bail!(
                    "{address}:{port} in {host}'s file is no host this test knows: it would send there"
                );
            } else {
                // Not an address (e.g. `sa:web` in a word): left alone.
                continue;
            };
            out.push_str(&text[last..whole.start()]);
            out.push_str(&self.at(&owner, port).to_string());
            last = whole.end();
        }
        out.push_str(&text[last..]);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_host_and_port_move_to_the_same_place_everywhere() {
        let mut hosts = Hosts::new();
        hosts.name("10.0.0.10", "controller");
        hosts.name("ctl.internal", "controller");
        let env = hosts
            .rewrite(
                "web",
                "C=http://10.0.0.10:8090\nA=--inbound 0.0.0.0:15001=127.0.0.1:8080 --admin 127.0.0.1:15000",
            )
            .unwrap();
        let inbound = hosts.at("web", 15001);
        let app = hosts.at("web", 8080);
        let grpc = hosts.at("controller", 8090);
        assert_eq!(
            env,
            format!(
                "C=http://{grpc}\nA=--inbound {inbound}={app} --admin {}",
                hosts.at("web", 15000)
            )
        );
        // Another host's 15000 is another place.
        assert_ne!(hosts.at("client", 15000), hosts.at("web", 15000));
        assert!(hosts.rewrite("web", "x 192.0.2.1:80").is_err());
        assert!(
            hosts
                .rewrite("web", "http://elsewhere.example:80/")
                .is_err()
        );
        assert_eq!(
            hosts.rewrite("web", "http://CTL.internal:8090").unwrap(),
            format!("http://{grpc}")
        );
        let to = SocketAddr::from(([127, 0, 0, 1], 1));
        hosts.place("controller", 8500, to);
        assert_eq!(
            hosts.rewrite("controller", "127.0.0.1:8500").unwrap(),
            "127.0.0.1:1"
        );
    }
}
