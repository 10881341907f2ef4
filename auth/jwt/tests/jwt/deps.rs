//! What trellis-jwt links (normal dependencies, as cargo resolves them): ring stays the one
//! crypto provider (no aws-lc), and nothing of the control plane comes in, so the proxy can
//! depend on this crate.

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn links_no_aws_lc_and_no_control_plane_code() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "-p",
            "trellis-jwt",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let linked: BTreeSet<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    // The check follows real edges: these are what the crate is built on.
    for needed in ["jsonwebtoken", "ring", "rustls", "trellis-file-watch"] {
        assert!(linked.contains(needed), "{needed} missing from {linked:?}");
    }
    let banned = [
        "aws-lc-rs",
        "aws-lc-sys",
        "openssl",
        "openssl-sys",
        "trellis-smi",
        "trellis-discovery",
        "trellis-controller-core",
        "trellis-proxy",
        "kube",
        "kube-core",
    ];
    let found: Vec<&&str> = banned.iter().filter(|b| linked.contains(**b)).collect();
    assert!(found.is_empty(), "trellis-jwt links {found:?}");
}
