//! Test support shared by the workspace's tests and benchmarks (never a dependency of production
//! code, only a dev-dependency or a dependency of the crates under `testing/`):
//!
//! - [`kubernetes`]: the fake API server with every SMI kind registered from `trellis-smi`'s
//!   generated CRDs ([`smi_api_server`], [`register_smi`], [`smi_type`], [`split_type`]), a
//!   [`kube_client`] of it and a kubeconfig for a child process ([`write_kubeconfig`]);
//! - [`controller`]: `trellis controller` as a child process ([`ControllerProcess`]) and a GET
//!   of its admin port ([`http_get`]);
//! - percentiles, atomic file writes, the SMI YAML the benchmarks write, and process figures
//!   from `/proc`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

pub mod controller;
pub mod kubernetes;

pub use controller::{ControllerProcess, controller_command, http_get, workspace_binary};
pub use kubernetes::{
    kube_client, kube_config, kubeconfig_yaml, register_smi, smi_api_server, smi_type, smi_types,
    split_type, write_kubeconfig,
};
pub use trellis_discovery_suite::LatencyStats;
// Tests name SMI kinds by the model's enum, and get the fake's types from here.
pub use trellis_kube_fake::{FakeApiServer, ResourceType};
pub use trellis_smi::model::Kind;

/// Writes `text` to `path` atomically: a temp file in `scratch` (same filesystem, outside any
/// watched directory, so the watcher never sees it), then a rename.
pub fn write_atomically(scratch: &Path, path: &Path, text: &str) {
    let tmp = scratch.join(format!(
        "{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).expect("writing the temp file");
    std::fs::rename(&tmp, path).expect("renaming the temp file into place");
}

/// A port for a child process to listen on, chosen below Linux's ephemeral range
/// (32768-60999), where the kernel also picks the local ports of outgoing connections: a port
/// from `bind(0)` could be taken as some concurrent test's local port before the child binds it.
/// Random in 20000-32767 and checked bindable.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        // A random number without a dependency: std's randomly keyed hasher.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        let port = 20_000 + (h.finish() % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` every 100 ms until it gives `Some`; panics naming `what` after `secs` seconds.
/// For blocking tests that wait on a child process or a server they started.
pub fn poll_until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `i`th point of the golden-ratio sequence in [0, 1): changes land at every phase of a
/// poll cycle, as real ones do.
pub fn phase(i: usize) -> f64 {
    (i as f64 * 0.618_033_988_749_895).fract()
}

/// A TrafficSplit (v1alpha4 YAML) of `root` over `root-v1`/`root-v2`.
pub fn split_yaml(namespace: &str, root: &str, w1: u32, w2: u32) -> String {
    format!(
        "---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{ name: {root}, namespace: {namespace} }}\nspec:\n  service: {root}\n  backends:\n  - {{ service: {root}-v1, weight: {w1} }}\n  - {{ service: {root}-v2, weight: {w2} }}\n"
    )
}

/// The same split as a Kubernetes object.
pub fn split_object(namespace: &str, root: &str, w1: u32, w2: u32) -> Value {
    json!({
        "apiVersion": "split.smi-spec.io/v1alpha4",
        "kind": "TrafficSplit",
        "metadata": {"name": root, "namespace": namespace},
        "spec": {"service": root, "backends": [
            {"service": format!("{root}-v1"), "weight": w1},
            {"service": format!("{root}-v2"), "weight": w2},
        ]},
    })
}

/// Resident set and its peak of process `pid` (`/proc/<pid>/status`), in bytes.
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) process `pid` has used so far (`/proc/<pid>/stat`, clock ticks of
/// 10 ms: `CLK_TCK` is 100 on Linux).
pub fn cpu_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the command.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

pub const MIB: f64 = 1024.0 * 1024.0;

/// `a - b` as a signed number of milliseconds, for "the controller's share" columns.
pub fn minus_ms(a: Duration, b: Duration) -> f64 {
    (a.as_secs_f64() - b.as_secs_f64()) * 1000.0
}

/// A benchmark's numeric flag (`--name VALUE` among the process arguments), or `default`.
/// Panics on a value that is not a number: a benchmark run with a typo should not run at all.
pub fn numeric_flag(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.windows(2)
        .rev()
        .find(|pair| pair[0] == name)
        .map_or(default, |pair| {
            pair[1]
                .parse()
                .unwrap_or_else(|_| panic!("{name}: expected a number, got {:?}", pair[1]))
        })
}
