//! `trellis-init`: the init container of a meshed pod. Pipes the interception rules
//! ([`trellis_intercept::InterceptRules::restore_script`]) into `iptables-restore` and, when the
//! kernel has IPv6 and `ip6tables-restore` exists, into `ip6tables-restore`; prints what it
//! installed and exits non-zero with the reason when iptables is missing or refuses (the pod then
//! does not start: never half-meshed). `--dry-run` prints the scripts and changes nothing.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use clap::Parser;
use trellis_intercept::{Family, InterceptRules};

/// Installs the transparent interception rules (iptables nat) of a meshed pod.
#[derive(Debug, Parser)]
#[command(name = "trellis-init", version)]
struct Cli {
    #[command(flatten)]
    rules: InterceptRules,
    /// Print the iptables-restore input for IPv4 and IPv6 and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The kernel has IPv6 when it lists IPv6 addresses (even with none configured, the file is
/// there); without it there is no IPv6 traffic to intercept.
const KERNEL_IPV6: &str = "/proc/net/if_inet6";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.dry_run {
        let mut text = String::new();
        for family in [Family::V4, Family::V6] {
            text += &format!("# {} input:\n", family.restore_command());
            text += &cli.rules.restore_script(family);
        }
        if let Some(udp) = cli.rules.udp_script() {
            text += "# iptables-restore input (UDP):\n";
            text += &udp;
            for args in cli.rules.udp_routing() {
                text += &format!("# ip {}\n", args.join(" "));
            }
        }
        // Written, not print!ed: a closed pipe (`| head`) ends the output without a panic.
        return match std::io::stdout().write_all(text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("trellis-init: writing the scripts: {error}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(message) = apply(&cli.rules, Family::V4) {
        eprintln!("trellis-init: {message}");
        return ExitCode::FAILURE;
    }
    println!("trellis-init: IPv4 rules installed (iptables-restore):");
    print!("{}", cli.rules.restore_script(Family::V4));
    if !Path::new(KERNEL_IPV6).exists() {
        println!(
            "trellis-init: IPv6: the kernel has no IPv6 ({KERNEL_IPV6} absent); no rules needed"
        );
    } else {
        match apply(&cli.rules, Family::V6) {
            Ok(()) => {
                println!("trellis-init: IPv6 rules installed (ip6tables-restore):");
                print!("{}", cli.rules.restore_script(Family::V6));
            }
            Err(Failure::Missing(message)) => {
                println!(
                    "trellis-init: IPv6: {message}; IPv6 connections of this pod are NOT intercepted"
                );
            }
            Err(failure) => {
                eprintln!("trellis-init: {failure}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(script) = cli.rules.udp_script() {
        if let Err(message) = apply_udp(&cli.rules, &script) {
            eprintln!("trellis-init: {message}");
            return ExitCode::FAILURE;
        }
        println!("trellis-init: UDP rules installed (iptables-restore, ip rule/route):");
        print!("{script}");
    }
    print!("trellis-init: summary: {}", cli.rules.summary());
    ExitCode::SUCCESS
}

/// Installs the UDP interception: the policy route first (so no marked datagram is ever routed
/// out unchanged), then the mangle table.
fn apply_udp(rules: &InterceptRules, script: &str) -> Result<(), Failure> {
    for (i, args) in rules.udp_routing().into_iter().enumerate() {
        let output = Command::new("ip").args(&args).output().map_err(|error| {
            Failure::Refused(format!(
                "running ip {}: {error} (this image needs Debian's `iproute2` package)",
                args.join(" ")
            ))
        })?;
        // The first command deletes a rule a previous run left: absent is fine.
        if !output.status.success() && i > 0 {
            return Err(Failure::Refused(format!(
                "ip {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    restore(Family::V4.restore_command(), script)
}

#[derive(Debug)]
enum Failure {
    /// The restore command is not installed.
    Missing(String),
    /// It ran and refused, or could not be run.
    Refused(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Missing(m) | Failure::Refused(m) => f.write_str(m),
        }
    }
}

/// Pipes the family's script into its restore command (no `--noflush`: the nat table is
/// replaced; see the crate docs).
fn apply(rules: &InterceptRules, family: Family) -> Result<(), Failure> {
    restore(family.restore_command(), &rules.restore_script(family))
}

/// Pipes `script` into `command` (`iptables-restore` or `ip6tables-restore`).
fn restore(command: &str, script: &str) -> Result<(), Failure> {
    let mut child = Command::new(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => Failure::Missing(format!(
                "{command} not found in PATH (this image needs Debian's `iptables` package)"
            )),
            _ => Failure::Refused(format!("running {command}: {error}")),
        })?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes());
    let output = child
        .wait_with_output()
        .map_err(|error| Failure::Refused(format!("waiting for {command}: {error}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("Permission denied") || stderr.contains("not permitted") {
            " (the container needs the NET_ADMIN and NET_RAW capabilities and to run as root)"
        } else {
            ""
        };
        return Err(Failure::Refused(format!(
            "{command} refused the rules ({}){hint}: {}\nthe input was:\n{script}",
            output.status,
            stderr.trim()
        )));
    }
    written.map_err(|error| Failure::Refused(format!("writing to {command}: {error}")))
}
