//! `trellis-init` for real: in a network namespace made for the test, run it twice as the init
//! container would be run (and restarted), read the nat table back with `iptables-save` and check
//! the chains, the rules and that the second run changed nothing. Then what the rules do to real
//! connections: two namespaces joined by a veth pair (a "pod" with the rules, a "peer"), sockets
//! from `tests/netns_helper.py` in both: the pod's outbound call reaches the proxy's outbound
//! port (with its original destination readable), the proxy's UID, a skipped port and loopback
//! are left alone, the peer's call to the pod reaches the inbound port and the admin port is
//! left alone. Addresses: 127.0.0.0/8 and 10.254.0.0/24, held by the namespaces the test made.
//!
//! Needs root, `ip` (iproute2) and `iptables-restore` (Debian's `iptables`, which `scripts/test`
//! installs), and /usr/bin/python3 for the second test; skips with the reason otherwise.

use std::process::{Command, Output};

use trellis_intercept::{Family, InterceptRules};

const INIT: &str = env!("CARGO_BIN_EXE_trellis-init");

/// Deletes the namespace when the test ends, also when it fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"))
}

/// Whether `program` is in PATH (it runs at all; `ip` has no `--version`).
fn have(program: &str) -> bool {
    Command::new(program).arg("--help").output().is_ok()
}

fn skip_reason() -> Option<String> {
    let uid = run("id", &["-u"]);
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root: network namespaces and iptables need root".into());
    }
    for tool in ["ip", "iptables-restore", "iptables-save"] {
        if !have(tool) {
            return Some(format!(
                "{tool} not found (scripts/test installs iproute2 and iptables)"
            ));
        }
    }
    None
}

/// The nat table's chains and rules, without the comments and packet counters that change
/// between reads.
fn nat_table(ns: &str, family: Family) -> Vec<String> {
    let out = run(
        "ip",
        &["netns", "exec", ns, family.save_command(), "-t", "nat"],
    );
    assert!(
        out.status.success(),
        "{} in {ns}: {}",
        family.save_command(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.split_once(" [") {
            Some((chain, _counters)) if l.starts_with(':') => chain.to_owned(),
            _ => l.to_owned(),
        })
        .collect()
}

#[test]
fn init_installs_the_rules_in_a_namespace_and_a_second_run_changes_nothing() {
    if let Some(reason) = skip_reason() {
        println!("SKIP: {reason}");
        return;
    }
    let ns = Netns(format!("trellis-intercept-test-{}", std::process::id()));
    let added = run("ip", &["netns", "add", &ns.0]);
    if !added.status.success() {
        println!(
            "SKIP: the kernel refuses a network namespace: {}",
            String::from_utf8_lossy(&added.stderr)
        );
        return;
    }
    let rules = InterceptRules {
        skip_inbound_ports: vec![15020, 22],
        skip_outbound_ports: vec![5432],
        skip_outbound_cidrs: vec![
            "169.254.169.254/32".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ],
        ..InterceptRules::default()
    };
    let mut init = vec!["netns", "exec", &ns.0, INIT];
    let args = rules.args();
    init.extend(args.iter().map(String::as_str));

    let first = run("ip", &init);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "first run: {stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    println!("first run of trellis-init:\n{stdout}");
    assert!(stdout.contains("IPv4 rules installed"), "{stdout}");
    let v4 = nat_table(&ns.0, Family::V4);
    let v6 = nat_table(&ns.0, Family::V6);
    println!(
        "iptables-save -t nat (counters removed):\n{}",
        v4.join("\n")
    );

    for chain in [
        ":TRELLIS_INBOUND -",
        ":TRELLIS_IN_REDIRECT -",
        ":TRELLIS_OUTPUT -",
        ":TRELLIS_REDIRECT -",
    ] {
        assert!(v4.iter().any(|l| l == chain), "{chain} missing: {v4:#?}");
    }
    // Exactly our rules, in iptables-save's words (it adds `-m tcp` to port matches).
    let installed: Vec<&str> = v4
        .iter()
        .filter(|l| l.starts_with("-A"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        installed,
        [
            "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
            "-A TRELLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
            "-A TRELLIS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
            "-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
            "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A TRELLIS_OUTPUT -o lo -j RETURN",
            "-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A TRELLIS_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN",
            "-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT",
            "-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ]
    );
    if stdout.contains("IPv6 rules installed") {
        assert!(
            v6.iter()
                .any(|l| l == "-A TRELLIS_OUTPUT -d ::1/128 -j RETURN"),
            "{v6:#?}"
        );
        assert!(
            v6.iter()
                .any(|l| l == "-A TRELLIS_OUTPUT -d fd00::/8 -j RETURN"),
            "{v6:#?}"
        );
    } else {
        println!("IPv6 not applied here; trellis-init said why (above)");
    }

    // Restarted by the kubelet: the same table, not the jumps twice.
    let second = run("ip", &init);
    assert!(
        second.status.success(),
        "second run: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        nat_table(&ns.0, Family::V4),
        v4,
        "the second run changed the IPv4 nat table"
    );
    assert_eq!(
        nat_table(&ns.0, Family::V6),
        v6,
        "the second run changed the IPv6 nat table"
    );
}

#[test]
fn dry_run_prints_both_scripts_and_bad_args_fail_with_the_flag() {
    let out = run(INIT, &["--dry-run", "--skip-outbound-cidrs=10.0.0.0/8"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let rules = InterceptRules {
        skip_outbound_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        ..InterceptRules::default()
    };
    assert_eq!(
        stdout,
        format!(
            "# iptables-restore input:\n{}# ip6tables-restore input:\n{}",
            rules.restore_script(Family::V4),
            rules.restore_script(Family::V6)
        )
    );
    let bad = run(INIT, &["--dry-run", "--skip-outbound-ports=80,http"]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("--skip-outbound-ports") && stderr.contains("http"),
        "{stderr}"
    );
}

#[test]
fn a_missing_iptables_is_a_clear_failure() {
    // An empty PATH: no iptables-restore to find.
    let out = Command::new(INIT)
        .env("PATH", "/nonexistent")
        .output()
        .expect("running trellis-init");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("iptables-restore not found in PATH"),
        "{stderr}"
    );
}

/// A process started in a namespace, killed (by its own pid) when the test ends.
struct Helper(std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns_helper.py");

/// The system's Python: the helper runs as UID 1337 too, which cannot use a per-user install
/// (pyenv shims under /root).
const PYTHON: &str = "/usr/bin/python3";

/// Starts `netns_helper.py serve NAME ADDRS...` in `ns` and waits for it to be listening.
fn serve(ns: &str, name: &str, addresses: &[&str]) -> Helper {
    use std::io::BufRead as _;
    let mut args = vec!["netns", "exec", ns, PYTHON, HELPER, "serve", name];
    args.extend_from_slice(addresses);
    let mut child = Command::new("ip")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the helper server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "helper {name} in {ns} did not start");
    Helper(child)
}

/// What a connection from `ns` (as `uid`, default root) to host:port reaches.
fn reach(ns: &str, host: &str, port: u16, uid: Option<u32>) -> String {
    let port = port.to_string();
    let uid = uid.map(|u| u.to_string());
    let mut args = vec!["netns", "exec", ns, PYTHON, HELPER, "connect", host, &port];
    if let Some(uid) = &uid {
        args.push(uid);
    }
    let out = run("ip", &args);
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if said.is_empty() {
        format!("(nothing: {})", String::from_utf8_lossy(&out.stderr).trim())
    } else {
        said
    }
}

#[test]
fn the_rules_redirect_what_they_should_and_nothing_else() {
    if let Some(reason) = skip_reason() {
        println!("SKIP: {reason}");
        return;
    }
    if !have(PYTHON) {
        println!("SKIP: {PYTHON} not found (the sockets inside the namespaces are its)");
        return;
    }
    let pid = std::process::id();
    // Two "pods" joined by a veth pair: `pod` gets the rules, `peer` is anyone else.
    let pod = Netns(format!("trellis-intercept-pod-{pid}"));
    let peer = Netns(format!("trellis-intercept-peer-{pid}"));
    for ns in [&pod, &peer] {
        let added = run("ip", &["netns", "add", &ns.0]);
        if !added.status.success() {
            println!(
                "SKIP: the kernel refuses a network namespace: {}",
                String::from_utf8_lossy(&added.stderr)
            );
            return;
        }
    }
    let (pod_if, peer_if) = (format!("tip{pid}"), format!("tiq{pid}"));
    for step in [
        vec![
            "link", "add", &pod_if, "netns", &pod.0, "type", "veth", "peer", "name", &peer_if,
            "netns", &peer.0,
        ],
        vec!["-n", &pod.0, "addr", "add", "10.254.0.2/24", "dev", &pod_if],
        vec![
            "-n",
            &peer.0,
            "addr",
            "add",
            "10.254.0.1/24",
            "dev",
            &peer_if,
        ],
        vec!["-n", &pod.0, "link", "set", &pod_if, "up"],
        vec!["-n", &peer.0, "link", "set", &peer_if, "up"],
        vec!["-n", &pod.0, "link", "set", "lo", "up"],
        vec!["-n", &peer.0, "link", "set", "lo", "up"],
    ] {
        let out = run("ip", &step);
        assert!(
            out.status.success(),
            "ip {step:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = InterceptRules {
        skip_outbound_ports: vec![5432],
        ..InterceptRules::default()
    };
    let mut init = vec!["netns", "exec", &pod.0, INIT];
    let args = rules.args();
    init.extend(args.iter().map(String::as_str));
    let out = run("ip", &init);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The "proxy" (its listeners) and the "app" in the pod; a server in the peer.
    let _proxy = serve(&pod.0, "proxy-outbound", &["127.0.0.1:15001"]);
    let _inbound = serve(&pod.0, "proxy-inbound", &["0.0.0.0:15006"]);
    let _admin = serve(&pod.0, "proxy-admin", &["0.0.0.0:15020"]);
    let _peer = serve(&peer.0, "peer", &["10.254.0.1:9000", "10.254.0.1:5432"]);

    let checks = [
        // The app's outbound call: to the proxy, which can still read where it was going.
        (
            reach(&pod.0, "10.254.0.1", 9000, None),
            "proxy-outbound 10.254.0.1:9000",
        ),
        // The proxy's own call (UID 1337): not re-intercepted.
        (
            reach(&pod.0, "10.254.0.1", 9000, Some(1337)),
            "peer 10.254.0.1:9000",
        ),
        // A skipped outbound port.
        (
            reach(&pod.0, "10.254.0.1", 5432, None),
            "peer 10.254.0.1:5432",
        ),
        // Loopback inside the pod is left alone.
        (
            reach(&pod.0, "127.0.0.1", 15020, None),
            "proxy-admin 127.0.0.1:15020",
        ),
        // Inbound from another pod: to the inbound proxy, original port kept.
        (
            reach(&peer.0, "10.254.0.2", 8080, None),
            "proxy-inbound 10.254.0.2:8080",
        ),
        // The admin port (kubelet probes) is not redirected.
        (
            reach(&peer.0, "10.254.0.2", 15020, None),
            "proxy-admin 10.254.0.2:15020",
        ),
    ];
    for (got, expected) in checks {
        println!("{expected:<32} <- {got}");
        assert_eq!(got, expected);
    }
}
