//! The transparent interception rules of a meshed pod: which TCP connections the kernel sends to
//! the proxy instead of where they were going, as `iptables-restore` input for the `nat` table.
//!
//! One [`InterceptRules`] value is the single source of truth for three things, so they cannot
//! drift apart:
//! - the command line of the `trellis-init` init container ([`InterceptRules::args`], which the
//!   sidecar injector writes into the pod, and [`InterceptRules::parse_args`], which
//!   `trellis-init` reads back);
//! - the rules themselves ([`InterceptRules::restore_script`], IPv4 and IPv6);
//! - the golden tests of both.
//!
//! What the rules do (chains named `TRELLIS_*` so that `iptables-save` shows whose they are):
//! - inbound: every TCP connection arriving at the pod (`PREROUTING`) goes to the proxy's
//!   inbound port, except connections to `skip_inbound_ports` (the proxy's admin port, where the
//!   kubelet's probes arrive, is always one of them by default);
//! - outbound: every TCP connection the pod opens (`OUTPUT`) goes to the proxy's outbound port,
//!   except the proxy's own connections (matched by its UID: without this exception they would
//!   loop back into the proxy), connections leaving through the loopback interface or to loopback
//!   addresses (calls inside the pod, including to its own pod IP), and connections to
//!   `skip_outbound_ports` or `skip_outbound_cidrs`.
//!
//! - UDP, only to the ports `--udp-ports` lists (none by default): TPROXY in the `mangle` table
//!   and a policy route ([`InterceptRules::udp_script`], [`InterceptRules::udp_routing`]; why
//!   not `REDIRECT` is said there), to the proxy's transparent UDP listener. IPv4.
//!
//! [`app_probe`] is the other half of the pod's contract: the application probes the injector
//! moved behind the proxy's admin port, as the proxy reads them.
//!
//! Decision: the script is applied WITHOUT `--noflush`, so `iptables-restore` replaces the whole
//! `nat` table of the pod's network namespace. A pod's network namespace is created empty for it
//! and nothing else in the pod writes nat rules, so the table is ours; replacing it makes a second
//! run (an init container restarted by the kubelet) give exactly the same table instead of
//! appending the jumps twice. Tables other than `nat` are not touched.

pub mod app_probe;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clap::Parser;
use ipnet::IpNet;

/// Default UID the proxy runs as; its own connections are never redirected.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Default port of the proxy's outbound (transparent) listener.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default port of the proxy's inbound (transparent) listener.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default port of the proxy's admin listener (`/ready`, `/live`, `/metrics`, `/app-probe/...`);
/// never redirected inbound, so the kubelet's probes reach it.
pub const DEFAULT_ADMIN_PORT: u16 = 15020;

/// Default port of the proxy's transparent UDP listener (TPROXY), when UDP is intercepted.
pub const DEFAULT_UDP_PORT: u16 = 15009;
/// Default firewall mark of intercepted UDP datagrams (and of the TPROXY rule's match).
pub const DEFAULT_UDP_MARK: u32 = 0x1337;
/// Default routing table that sends marked datagrams to the loopback interface.
pub const DEFAULT_UDP_TABLE: u32 = 133;
/// Chain that the `mangle` table's `OUTPUT` jumps to for outbound UDP.
pub const CHAIN_UDP_OUTPUT: &str = "TRELLIS_UDP_OUTPUT";

/// Chain that `PREROUTING` jumps to for inbound TCP.
pub const CHAIN_INBOUND: &str = "TRELLIS_INBOUND";
/// Chain that redirects inbound TCP to the proxy's inbound port.
pub const CHAIN_IN_REDIRECT: &str = "TRELLIS_IN_REDIRECT";
/// Chain that `OUTPUT` jumps to for outbound TCP.
pub const CHAIN_OUTPUT: &str = "TRELLIS_OUTPUT";
/// Chain that redirects outbound TCP to the proxy's outbound port.
pub const CHAIN_REDIRECT: &str = "TRELLIS_REDIRECT";

/// IP family of a rule set: `iptables-restore` or `ip6tables-restore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The `*-restore` command that takes this family's script.
    pub fn restore_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The `*-save` command that reads this family's tables back.
    pub fn save_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    /// The loopback range of this family.
    fn loopback(self) -> IpNet {
        match self {
            Family::V4 => IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
            Family::V6 => IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
        }
        .expect("a valid prefix length")
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// The interception rules of one pod. Build it with [`Default`] and change fields, or parse it
/// from `trellis-init`'s command line with [`InterceptRules::parse_args`].
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "trellis-init",
    version,
    about = "Installs the transparent interception rules (iptables nat) of a meshed pod."
)]
pub struct InterceptRules {
    /// UID the proxy runs as: its own connections are never redirected.
    #[arg(long, default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Port of the proxy's outbound listener: where the pod's outbound TCP is redirected.
    #[arg(long, default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Port of the proxy's inbound listener: where TCP arriving at the pod is redirected.
    #[arg(long, default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,
    /// Inbound destination ports left alone (comma-separated; given with no value: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = [DEFAULT_ADMIN_PORT])]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destination networks left alone (comma-separated CIDRs, IPv4 or IPv6).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub skip_outbound_cidrs: Vec<IpNet>,
    /// Outbound UDP destination ports sent to the proxy's transparent UDP listener (the ports
    /// UDPRoutes name; comma-separated; none by default: UDP is not intercepted). IPv4 only.
    /// Needs TPROXY, policy routing and the proxy's `CAP_NET_ADMIN` (see [`Self::udp_script`]).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub udp_ports: Vec<u16>,
    /// Port of the proxy's transparent UDP listener.
    #[arg(long, default_value_t = DEFAULT_UDP_PORT)]
    pub udp_port: u16,
    /// Firewall mark of intercepted UDP datagrams.
    #[arg(long, default_value_t = DEFAULT_UDP_MARK)]
    pub udp_mark: u32,
    /// Routing table delivering marked datagrams locally.
    #[arg(long, default_value_t = DEFAULT_UDP_TABLE)]
    pub udp_table: u32,
}

impl Default for InterceptRules {
    fn default() -> Self {
        InterceptRules {
            proxy_uid: DEFAULT_PROXY_UID,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            skip_inbound_ports: vec![DEFAULT_ADMIN_PORT],
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
            udp_ports: Vec::new(),
            udp_port: DEFAULT_UDP_PORT,
            udp_mark: DEFAULT_UDP_MARK,
            udp_table: DEFAULT_UDP_TABLE,
        }
    }
}

/// Why a command line is not a set of interception rules (clap's message: the flag and value).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArgs(String);

impl InterceptRules {
    /// The arguments of `trellis-init` that give exactly these rules (without the program
    /// name): every field, one `--flag=value` token each, so that the pod spec reads plainly
    /// and [`InterceptRules::parse_args`] gives back an equal value.
    pub fn args(&self) -> Vec<String> {
        fn list<T: ToString>(flag: &str, items: &[T]) -> String {
            if items.is_empty() {
                // `num_args = 0..`: the flag alone means "none", overriding any default.
                format!("--{flag}")
            } else {
                let items: Vec<String> = items.iter().map(ToString::to_string).collect();
                format!("--{flag}={}", items.join(","))
            }
        }
        let mut args = vec![
            format!("--proxy-uid={}", self.proxy_uid),
            format!("--outbound-port={}", self.outbound_port),
            format!("--inbound-port={}", self.inbound_port),
            list("skip-inbound-ports", &self.skip_inbound_ports),
            list("skip-outbound-ports", &self.skip_outbound_ports),
            list("skip-outbound-cidrs", &self.skip_outbound_cidrs),
        ];
        // Only when UDP is intercepted: pods without it keep exactly the command line they had.
        if !self.udp_ports.is_empty() {
            args.extend([
                list("udp-ports", &self.udp_ports),
                format!("--udp-port={}", self.udp_port),
                format!("--udp-mark={}", self.udp_mark),
                format!("--udp-table={}", self.udp_table),
            ]);
        }
        args
    }

    /// The `iptables-restore` input for intercepted UDP (IPv4), replacing the `mangle` table,
    /// or None when no UDP port is intercepted (the table is then not touched).
    ///
    /// `REDIRECT` cannot serve UDP: a datagram socket has no `SO_ORIGINAL_DST`, so the proxy
    /// would not know where a datagram was going. TPROXY keeps the original destination in the
    /// packet, but works in `PREROUTING` only, and the pod's own datagrams never pass it: so
    /// `OUTPUT` marks them, the policy route of [`Self::udp_routing`] delivers marked packets to
    /// the loopback interface, where they come in again through `PREROUTING` and TPROXY hands
    /// them to the proxy's transparent socket, which reads their original destination
    /// (`IP_RECVORIGDSTADDR`) and answers from it (`IP_TRANSPARENT`: the proxy needs
    /// `CAP_NET_ADMIN`). The proxy's own datagrams (its UID) and loopback ones are never marked.
    pub fn udp_script(&self) -> Option<String> {
        if self.udp_ports.is_empty() {
            return None;
        }
        let ports: Vec<String> = sorted(&self.udp_ports)
            .iter()
            .map(ToString::to_string)
            .collect();
        let mark = format!("{:#x}", self.udp_mark);
        let mut s = String::new();
        let mut line = |text: String| {
            s.push_str(&text);
            s.push('\n');
        };
        line("# trellis-init: transparent interception of this pod's UDP (mangle table, replaced as a whole)".into());
        line("*mangle".into());
        for builtin in ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"] {
            line(format!(":{builtin} ACCEPT [0:0]"));
        }
        line(format!(":{CHAIN_UDP_OUTPUT} - [0:0]"));
        line(format!("-A OUTPUT -p udp -j {CHAIN_UDP_OUTPUT}"));
        line(format!(
            "-A {CHAIN_UDP_OUTPUT} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        line(format!("-A {CHAIN_UDP_OUTPUT} -d 127.0.0.0/8 -j RETURN"));
        // multiport takes at most 15 ports per rule.
        for chunk in ports.chunks(15) {
            line(format!(
                "-A {CHAIN_UDP_OUTPUT} -p udp -m multiport --dports {} -j MARK --set-mark {mark}",
                chunk.join(",")
            ));
        }
        line(format!(
            "-A PREROUTING -i lo -p udp -m mark --mark {mark} -j TPROXY --on-ip 127.0.0.1 --on-port {} --tproxy-mark {mark}",
            self.udp_port
        ));
        line("COMMIT".into());
        Some(s)
    }

    /// The `ip` commands (arguments after `ip`) that deliver marked UDP datagrams locally, in
    /// order; empty when no UDP port is intercepted. Re-running them changes nothing (`replace`,
    /// and the rule is deleted before it is added; that delete may fail the first time).
    pub fn udp_routing(&self) -> Vec<Vec<String>> {
        if self.udp_ports.is_empty() {
            return Vec::new();
        }
        let mark = format!("{:#x}", self.udp_mark);
        let table = self.udp_table.to_string();
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        vec![
            words(&["-4", "rule", "del", "fwmark", &mark, "lookup", &table]),
            words(&["-4", "rule", "add", "fwmark", &mark, "lookup", &table]),
            words(&[
                "-4",
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &table,
            ]),
        ]
    }

    /// Parses `trellis-init`'s arguments (without the program name).
    pub fn parse_args<I, S>(args: I) -> Result<Self, BadArgs>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("trellis-init"))
            .chain(args.into_iter().map(Into::into));
        InterceptRules::try_parse_from(argv).map_err(|error| BadArgs(error.to_string()))
    }

    /// The `iptables-restore` (V4) or `ip6tables-restore` (V6) input that replaces the `nat`
    /// table with these rules. Port lists are sorted and deduplicated, and only the CIDRs of
    /// `family` appear, so the text depends only on the rules' meaning.
    pub fn restore_script(&self, family: Family) -> String {
        let mut cidrs: Vec<IpNet> = self
            .skip_outbound_cidrs
            .iter()
            .filter(|net| family.holds(net))
            .map(IpNet::trunc)
            .collect();
        cidrs.sort();
        cidrs.dedup();

        let mut s = String::new();
        let mut line = |text: String| {
            s.push_str(&text);
            s.push('\n');
        };
        line("# trellis-init: transparent interception of this pod's TCP (nat table, replaced as a whole)".into());
        line("*nat".into());
        for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
            line(format!(":{builtin} ACCEPT [0:0]"));
        }
        for chain in [
            CHAIN_INBOUND,
            CHAIN_IN_REDIRECT,
            CHAIN_OUTPUT,
            CHAIN_REDIRECT,
        ] {
            line(format!(":{chain} - [0:0]"));
        }
        line(format!("-A PREROUTING -p tcp -j {CHAIN_INBOUND}"));
        line(format!("-A OUTPUT -p tcp -j {CHAIN_OUTPUT}"));

        // Inbound: skipped ports, then everything else to the proxy's inbound listener.
        for port in sorted(&self.skip_inbound_ports) {
            line(format!(
                "-A {CHAIN_INBOUND} -p tcp --dport {port} -j RETURN"
            ));
        }
        line(format!("-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}"));
        line(format!(
            "-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));

        // Outbound: the proxy's own connections first (else they would loop into the proxy),
        // then calls inside the pod, then the skipped ports and networks.
        line(format!(
            "-A {CHAIN_OUTPUT} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        line(format!("-A {CHAIN_OUTPUT} -o lo -j RETURN"));
        line(format!(
            "-A {CHAIN_OUTPUT} -d {} -j RETURN",
            family.loopback()
        ));
        for port in sorted(&self.skip_outbound_ports) {
            line(format!("-A {CHAIN_OUTPUT} -p tcp --dport {port} -j RETURN"));
        }
        for net in cidrs {
            line(format!("-A {CHAIN_OUTPUT} -d {net} -j RETURN"));
        }
        line(format!("-A {CHAIN_OUTPUT} -p tcp -j {CHAIN_REDIRECT}"));
        line(format!(
            "-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        line("COMMIT".into());
        s
    }

    /// One line per rule, for people: what `trellis-init` says it installed.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let join = |items: Vec<String>| {
            if items.is_empty() {
                "none".to_owned()
            } else {
                items.join(",")
            }
        };
        let ports = |p: &[u16]| join(p.iter().map(ToString::to_string).collect());
        let _ = writeln!(
            s,
            "inbound TCP -> :{} except ports {}",
            self.inbound_port,
            ports(&self.skip_inbound_ports)
        );
        let _ = writeln!(
            s,
            "outbound TCP -> :{} except uid {}, loopback, ports {}, networks {}",
            self.outbound_port,
            self.proxy_uid,
            ports(&self.skip_outbound_ports),
            join(
                self.skip_outbound_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            )
        );
        if !self.udp_ports.is_empty() {
            let _ = writeln!(
                s,
                "outbound UDP to ports {} -> :{} (TPROXY, mark {:#x}, table {}) except uid {}, loopback",
                ports(&self.udp_ports),
                self.udp_port,
                self.udp_mark,
                self.udp_table,
                self.proxy_uid
            );
        }
        s
    }
}

/// Ports sorted and deduplicated: the scripts depend only on the rules' meaning.
fn sorted(ports: &[u16]) -> Vec<u16> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_script_v4_is_golden() {
        let expected = "\
# trellis-init: transparent interception of this pod's TCP (nat table, replaced as a whole)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TRELLIS_INBOUND - [0:0]
:TRELLIS_IN_REDIRECT - [0:0]
:TRELLIS_OUTPUT - [0:0]
:TRELLIS_REDIRECT - [0:0]
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
-A TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN
-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT
-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A TRELLIS_OUTPUT -o lo -j RETURN
-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN
-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT
-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
        assert_eq!(
            InterceptRules::default().restore_script(Family::V4),
            expected
        );
    }

    fn custom() -> InterceptRules {
        InterceptRules {
            proxy_uid: 2102,
            outbound_port: 4140,
            inbound_port: 4143,
            skip_inbound_ports: vec![15020, 22, 15020],
            skip_outbound_ports: vec![5432, 443],
            skip_outbound_cidrs: vec![
                "10.96.0.1/12".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
                "169.254.169.254/32".parse().unwrap(),
            ],
            ..InterceptRules::default()
        }
    }

    #[test]
    fn udp_is_intercepted_only_when_ports_are_named_and_its_rules_are_golden() {
        let none = InterceptRules::default();
        assert_eq!(none.udp_script(), None);
        assert!(none.udp_routing().is_empty());
        assert!(!none.args().iter().any(|a| a.starts_with("--udp")));
        let udp = InterceptRules {
            udp_ports: vec![5353, 53, 5353],
            ..InterceptRules::default()
        };
        let expected = "\
# trellis-init: transparent interception of this pod's UDP (mangle table, replaced as a whole)
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TRELLIS_UDP_OUTPUT - [0:0]
-A OUTPUT -p udp -j TRELLIS_UDP_OUTPUT
-A TRELLIS_UDP_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A TRELLIS_UDP_OUTPUT -d 127.0.0.0/8 -j RETURN
-A TRELLIS_UDP_OUTPUT -p udp -m multiport --dports 53,5353 -j MARK --set-mark 0x1337
-A PREROUTING -i lo -p udp -m mark --mark 0x1337 -j TPROXY --on-ip 127.0.0.1 --on-port 15009 --tproxy-mark 0x1337
COMMIT
";
        assert_eq!(udp.udp_script().as_deref(), Some(expected));
        assert_eq!(
            udp.udp_routing()
                .iter()
                .map(|w| w.join(" "))
                .collect::<Vec<_>>(),
            [
                "-4 rule del fwmark 0x1337 lookup 133",
                "-4 rule add fwmark 0x1337 lookup 133",
                "-4 route replace local 0.0.0.0/0 dev lo table 133",
            ]
        );
        assert_eq!(InterceptRules::parse_args(udp.args()).unwrap(), udp);
        // The TCP rules are the same with or without UDP.
        assert_eq!(
            udp.restore_script(Family::V4),
            none.restore_script(Family::V4)
        );
    }

    #[test]
    fn skips_are_sorted_deduplicated_and_split_by_family() {
        let v4 = custom().restore_script(Family::V4);
        let rules: Vec<&str> = v4.lines().filter(|l| l.starts_with("-A TRELLIS")).collect();
        assert_eq!(
            rules,
            [
                "-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN",
                "-A TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
                "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
                "-A TRELLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A TRELLIS_OUTPUT -o lo -j RETURN",
                "-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A TRELLIS_OUTPUT -p tcp --dport 443 -j RETURN",
                "-A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN",
                // Host bits cleared: iptables would print the network anyway.
                "-A TRELLIS_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN",
                "-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT",
                "-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 4140",
            ]
        );
        let v6 = custom().restore_script(Family::V6);
        assert!(v6.contains("-A TRELLIS_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(v6.contains("-A TRELLIS_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(!v6.contains("10.96.0.0"), "{v6}");
        assert!(!v6.contains("127.0.0.0"), "{v6}");
    }

    #[test]
    fn args_are_golden_and_round_trip() {
        assert_eq!(
            InterceptRules::default().args(),
            [
                "--proxy-uid=1337",
                "--outbound-port=15001",
                "--inbound-port=15006",
                "--skip-inbound-ports=15020",
                "--skip-outbound-ports",
                "--skip-outbound-cidrs",
            ]
        );
        for rules in [InterceptRules::default(), custom()] {
            assert_eq!(InterceptRules::parse_args(rules.args()).unwrap(), rules);
        }
        // Empty lists survive too, also where the flag has a default.
        let none = InterceptRules {
            skip_inbound_ports: Vec::new(),
            ..InterceptRules::default()
        };
        assert_eq!(InterceptRules::parse_args(none.args()).unwrap(), none);
        // No arguments at all: the defaults.
        assert_eq!(
            InterceptRules::parse_args(Vec::<String>::new()).unwrap(),
            InterceptRules::default()
        );
    }

    #[test]
    fn bad_args_name_the_flag_and_value() {
        let error = InterceptRules::parse_args(["--skip-outbound-cidrs=10.0.0.0/8,nonsense"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("nonsense"), "{error}");
        assert!(error.contains("--skip-outbound-cidrs"), "{error}");
        let error = InterceptRules::parse_args(["--inbound-port=70000"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("70000"), "{error}");
    }
}
