//! Hosts rather than one loopback: every host of a conformance mesh is its own Linux network
//! namespace with its own address, and all of them hang off one bridge, as machines on a LAN do.
//!
//! ```text
//!   test process (root namespace) 198.18.S.1 ─┐
//!   host "controller"             198.18.S.2 ─┤
//!   host "registry"               198.18.S.3 ─┼─ br0 (in its own "switch" namespace)
//!   host "app-a"                  198.18.S.4 ─┤
//!   ...                                       ─┘
//! ```
//!
//! - Addresses come from 198.18.0.0/15, the range RFC 2544 reserves for benchmark networks, one
//!   /24 per topology; the harness checks that nothing on this machine already uses the /24 it
//!   picks, and only ever sends to addresses its own namespaces hold.
//! - The test process keeps one leg on the bridge (a veth with `.1`) so it can play the apps'
//!   part and read every proxy's admin port; the hosts have no route anywhere else.
//! - A process runs on a host through `ip netns exec`, which `setns`es and then `exec`s: the pid
//!   the harness holds is the process itself, so killing it needs nothing special.
//! - [`Hosts::unplug`] takes a host's switch port down, as a pulled cable does: its TCP
//!   connections see no reset, only silence. [`Hosts::plug`] puts it back.
//! - Dropping the topology deletes the namespaces and the test's veth. Namespaces left by a run
//!   that crashed (named after a pid that no longer runs) are deleted by the next run.
//!
//! Creating namespaces needs root (CI runs as root); elsewhere the columns that need hosts are
//! skipped with the reason.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context as _, bail};

/// The first two octets of every topology's /24 (RFC 2544's 198.18.0.0/15).
const PREFIX: [u8; 2] = [198, 18];
/// Serialises subnet choice and creation between topologies of one test process.
static CREATING: Mutex<()> = Mutex::new(());

/// One host: its namespace and address.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Its port on the switch (what [`Hosts::unplug`] takes down).
    port: String,
}

/// A running topology; deleted when dropped.
#[derive(Debug)]
pub struct Hosts {
    hosts: Vec<Host>,
    switch: String,
    /// The test process's leg on the bridge (in the root namespace).
    root_link: String,
    /// The test process's address on the bridge.
    pub root_addr: Ipv4Addr,
}

impl Hosts {
    /// Creates `names` as hosts on a fresh /24 near `198.18.<preferred>.0`. `Ok(Err(reason))`
    /// when namespaces cannot be made here (not root, no `ip`).
    pub fn create(preferred: u8, names: &[&str]) -> anyhow::Result<Result<Self, String>> {
        let _creating = CREATING.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(reason) = available() {
            return Ok(Err(reason));
        }
        remove_stale();
        let subnet = free_subnet(preferred)?;
        let pid = std::process::id();
        let base = format!("trellis-{pid}-{subnet}");
        let switch = format!("{base}-switch");
        let root_link = format!("trl{subnet}x{}", pid % 100_000);
        let addr = |n: u8| Ipv4Addr::new(PREFIX[0], PREFIX[1], subnet, n);
        let mut topology = Hosts {
            hosts: Vec::new(),
            switch: switch.clone(),
            root_link: root_link.clone(),
            root_addr: addr(1),
        };
        // From here on, a failure drops `topology`, which deletes what was made.
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        ip(&[
            "link", "add", &root_link, "type", "veth", "peer", "name", "up0", "netns", &switch,
        ])?;
        ip(&["-n", &switch, "link", "set", "up0", "master", "br0", "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", topology.root_addr),
            "dev",
            &root_link,
        ])?;
        ip(&["link", "set", &root_link, "up"])?;
        for (i, name) in names.iter().enumerate() {
            let n = u8::try_from(i + 2)
                .ok()
                .filter(|n| *n < 255)
                .context("too many hosts for one /24")?;
            let host = Host {
                name: (*name).to_owned(),
                netns: format!("{base}-{name}"),
                addr: addr(n),
                port: format!("p{n}"),
            };
            ip(&["netns", "add", &host.netns])?;
            topology.hosts.push(host.clone());
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                &host.netns,
                "type",
                "veth",
                "peer",
                "name",
                &host.port,
                "netns",
                &switch,
            ])?;
            ip(&[
                "-n", &switch, "link", "set", &host.port, "master", "br0", "up",
            ])?;
            ip(&[
                "-n",
                &host.netns,
                "addr",
                "add",
                &format!("{}/24", host.addr),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &host.netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
        }
        Ok(Ok(topology))
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name} in this topology"))
    }

    /// Takes `name`'s switch port down: its packets go nowhere until [`Hosts::plug`].
    pub fn unplug(&self, name: &str) -> anyhow::Result<()> {
        let host = self.host(name)?;
        ip(&["-n", &self.switch, "link", "set", &host.port, "down"])
    }

    /// Puts `name`'s switch port back up.
    pub fn plug(&self, name: &str) -> anyhow::Result<()> {
        let host = self.host(name)?;
        ip(&["-n", &self.switch, "link", "set", &host.port, "up"])
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.root_link]);
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.netns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

/// Why namespaces cannot be made here, if they cannot.
fn available() -> Result<(), String> {
    let probe = format!("trellis-{}-probe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => Err(format!(
            "`ip` (iproute2) cannot run: {e}; scripts/test installs it"
        )),
        Ok(out) if !out.status.success() => Err(format!(
            "network namespaces are refused here (`ip netns add`: {}); hosts need root",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => {
            let _ = ip(&["netns", "del", &probe]);
            Ok(())
        }
    }
}

/// Runs `ip args`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The first /24 from `198.18.<preferred>` on that no address or route of this machine's root
/// namespace touches (another run's topology, or a real network).
fn free_subnet(preferred: u8) -> anyhow::Result<u8> {
    let routes = ip_output(&["-4", "route", "show", "table", "all"]);
    let addresses = ip_output(&["-4", "-o", "addr", "show"]);
    for subnet in (preferred..=255).chain(1..preferred) {
        let prefix = format!("{}.{}.{subnet}.", PREFIX[0], PREFIX[1]);
        if !routes.contains(&prefix) && !addresses.contains(&prefix) {
            return Ok(subnet);
        }
    }
    bail!("every /24 of 198.18.0.0/16 is in use on this machine")
}

/// Deletes the namespaces (and so their links) of runs whose process is gone, and their veths.
fn remove_stale() {
    for line in ip_output(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("trellis-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
            if let Some(subnet) = name.split('-').nth(2) {
                let _ = ip(&["link", "del", &format!("trl{subnet}x{}", pid % 100_000)]);
            }
        }
    }
}

/// Where a mesh's processes run and which address each binds.
#[derive(Debug)]
pub enum Network {
    /// Everything on this machine's loopback: pods on `127.0.<subnet>.<n>`, the rest on 127.0.0.1.
    Loopback { subnet: u8 },
    /// Every role (controller, registry, each workload, an outsider) on its own host.
    Hosts(Hosts),
}

/// Where one role runs: its namespace (none on loopback) and the address it binds.
#[derive(Clone, Debug)]
pub struct Place {
    pub netns: Option<String>,
    pub ip: IpAddr,
}

impl Network {
    /// The place of `role` (a host name); on loopback, a pod's own address `127.0.<subnet>.<n>`
    /// for `pod: Some(n)`, else 127.0.0.1.
    pub fn place(&self, role: &str, pod: Option<u8>) -> anyhow::Result<Place> {
        Ok(match self {
            Network::Loopback { subnet } => Place {
                netns: None,
                ip: IpAddr::V4(
                    pod.map_or(Ipv4Addr::LOCALHOST, |n| Ipv4Addr::new(127, 0, *subnet, n)),
                ),
            },
            Network::Hosts(hosts) => {
                let host = hosts.host(role)?;
                Place {
                    netns: Some(host.netns.clone()),
                    ip: IpAddr::V4(host.addr),
                }
            }
        })
    }

    /// The test process's own place: its namespace (the root one) and the address the mesh's
    /// processes reach it at.
    pub fn test_place(&self) -> Place {
        Place {
            netns: None,
            ip: self.test_ip(),
        }
    }

    /// The address the test process itself is reachable at from the mesh's processes.
    pub fn test_ip(&self) -> IpAddr {
        match self {
            Network::Loopback { .. } => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Network::Hosts(hosts) => IpAddr::V4(hosts.root_addr),
        }
    }

    /// The hosts, when the mesh runs on hosts.
    pub fn hosts(&self) -> Option<&Hosts> {
        match self {
            Network::Hosts(hosts) => Some(hosts),
            Network::Loopback { .. } => None,
        }
    }
}

/// `ip netns exec NETNS program args...` as a program and its arguments.
pub fn in_netns(netns: &str, program: &str, args: &[String]) -> (String, Vec<String>) {
    let mut all = vec!["netns".into(), "exec".into(), netns.into(), program.into()];
    all.extend(args.iter().cloned());
    ("ip".into(), all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_on_a_host_is_started_through_ip_netns_exec() {
        let (program, args) = in_netns("trellis-1-20-app-a", "/bin/echo", &["hi".into()]);
        assert_eq!(program, "ip");
        assert_eq!(
            args,
            ["netns", "exec", "trellis-1-20-app-a", "/bin/echo", "hi"]
        );
    }
}
