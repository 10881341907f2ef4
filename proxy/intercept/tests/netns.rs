//! `trellis-init` for real: in a network namespace made for the test, run it twice as the init
//! container would be run (and restarted), read the nat table back with `iptables-save` and check
//! the chains, the rules and that the second run changed nothing.
//!
//! Needs root, `ip` (iproute2) and `iptables-restore` (Debian's `iptables`, which `scripts/test`
//! installs); skips with the reason otherwise.

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
