//! `trellis check`: is the controller up, which platforms and how fresh, how many proxies are
//! connected, which policies are in force, and any problems. Exit 1 when the controller cannot
//! be reached, reports problems, or a platform is stale (its latest word was an error: the mesh
//! keeps serving its last good endpoints, which may be out of date).

use std::net::SocketAddr;
use std::process::ExitCode;

use serde_json::Value;

use super::state::{fetch_state, list, text};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The controller's admin address.
    #[arg(long, default_value = "127.0.0.1:9990")]
    pub admin: SocketAddr,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let state = match fetch_state(args.admin) {
        Ok(state) => state,
        Err(e) => {
            println!("controller: DOWN ({e:#})");
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", render(&state));
    let stale = list(&state, "platforms")
        .iter()
        .any(|p| p["stale"].as_bool() == Some(true));
    Ok(if list(&state, "problems").is_empty() && !stale {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The check report for `state`.
pub fn render(state: &Value) -> String {
    let mut out = String::from("controller: up\n");
    let ready = state["policy_ready"].as_bool().unwrap_or(false);
    out.push_str(&format!(
        "policy: {}{}\n",
        if ready {
            "ready"
        } else {
            "waiting for sources"
        },
        if state["permissive"].as_bool() == Some(true) {
            " (PERMISSIVE: default allow)"
        } else {
            ""
        }
    ));
    out.push_str(&access_lines(&state["access"]));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let age = |v: &Value| match v.as_u64() {
        Some(t) => format!("{}s ago", now.saturating_sub(t)),
        None => "never".into(),
    };
    for p in list(state, "platforms") {
        let stale = if p["stale"].as_bool() == Some(true) {
            format!(" STALE: {}", text(&p["last_error"]))
        } else {
            String::new()
        };
        out.push_str(&format!(
            "platform {}: last answer {}{stale}\n",
            text(&p["source"]),
            age(&p["last_good_unix"])
        ));
    }
    for s in list(state, "policy_sources") {
        out.push_str(&format!(
            "policy source {}: {} resources, updated {}\n",
            text(&s["name"]),
            s["resources"],
            age(&s["last_update_unix"])
        ));
    }
    out.push_str(&leader_line(&state["leader"]));
    out.push_str(&webhooks_line(&state["webhooks"]));
    out.push_str(&format!(
        "proxy streams: {} destination, {} inbound\n",
        state["streams"]["destinations"], state["streams"]["inbound"]
    ));
    out.push_str(&format!(
        "policies in force: {}\n",
        list(state, "policies").len()
    ));
    for p in list(state, "policies") {
        out.push_str(&format!(
            "  {} {}/{}: {}\n",
            text(&p["kind"]),
            text(&p["namespace"]),
            text(&p["name"]),
            text(&p["summary"])
        ));
    }
    let problems = list(state, "problems");
    out.push_str(&format!("problems: {}\n", problems.len()));
    for p in problems {
        out.push_str(&format!(
            "  {}: {}: {}\n",
            text(&p["location"]),
            text(&p["resource"]),
            text(&p["message"])
        ));
    }
    out
}

/// `webhooks: ...` from the state's `webhooks` object (nothing when not served).
fn webhooks_line(webhooks: &Value) -> String {
    if !webhooks.is_object() {
        return String::new();
    }
    let served = if webhooks["injection"].as_bool() == Some(true) {
        "conversion, injection"
    } else {
        "conversion"
    };
    let bundle = if webhooks["ca_bundle_written"].as_bool() == Some(true) {
        "caBundle written"
    } else {
        "caBundle NOT written yet (see problems; only the leader writes it)"
    };
    format!(
        "webhooks: {served} on {}, called at {}; {bundle}\n",
        text(&webhooks["listen"]),
        text(&webhooks["endpoint"])
    )
}

/// `leader: ...` from the state's `leader` object (nothing for controllers without it).
fn leader_line(leader: &Value) -> String {
    if !leader.is_object() {
        return String::new();
    }
    let me = text(&leader["identity"]);
    if leader["elect"].as_bool() != Some(true) {
        return format!("leader: this replica ({me}; no leader election)\n");
    }
    let lease = text(&leader["lease"]);
    let error = match leader["last_error"].as_str() {
        Some(e) => format!("; last attempt failed: {e}"),
        None => String::new(),
    };
    if leader["leader"].as_bool() == Some(true) {
        format!("leader: this replica ({me}, Lease {lease}){error}\n")
    } else {
        let holder = leader["holder"].as_str().unwrap_or("nobody");
        format!("leader: {holder} (this replica {me} follows, Lease {lease}){error}\n")
    }
}

/// The access switches beyond `--permissive` (nothing when none is on).
fn access_lines(access: &Value) -> String {
    let names = |key: &str| -> Vec<String> { list(access, key).into_iter().map(text).collect() };
    let mut out = String::new();
    for ns in names("permissive_namespaces") {
        out.push_str(&format!(
            "access: PERMISSIVE in namespace {ns} (default allow)\n"
        ));
    }
    let networks = names("plaintext_from");
    if !networks.is_empty() {
        out.push_str(&format!(
            "access: plaintext allowed from {} (to every workload)\n",
            networks.join(", ")
        ));
    }
    for ns in names("plaintext_namespaces") {
        out.push_str(&format!(
            "access: plaintext allowed into namespace {ns} from anywhere\n"
        ));
    }
    out
}
