//! The real binary as a process: `--config FILE`, SIGHUP reload, SIGTERM drain, bad CLI input.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -s {sig} {pid}");
}

async fn wait_ready(admin: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            let mut c = H1::connect(admin).await;
            if c.get("admin", "/ready").await.0 == StatusCode::OK {
                return;
            }
        }
        assert!(Instant::now() < deadline, "proxy did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_reloads_on_sighup_and_drains_on_sigterm() {
    let v1 = app("v1").await;
    let v2 = app("v2").await;
    let (admin, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    let config = |backend: &str, addr: std::net::SocketAddr| {
        format!(
            "admin: 127.0.0.1:{admin}\noutbound:\n  http: 127.0.0.1:{http}\nlimits:\n  drain_timeout_ms: 5000\ndestinations:\n  - authority: echo.default\n    backends: [{{name: {backend}, endpoints: [{{address: \"{addr}\"}}]}}]\n"
        )
    };
    std::fs::write(&path, config("v1", v1.addr)).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--config",
            path.to_str().unwrap(),
            "--threads",
            "1",
            "--log",
            "warn",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    let http_addr = format!("127.0.0.1:{http}").parse().unwrap();
    wait_ready(admin_addr).await;
    let mut client = H1::connect(http_addr).await;
    assert_eq!(client.get("echo.default", "/").await.1, "v1");

    std::fs::write(&path, config("v2", v2.addr)).unwrap();
    signal(child.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.get("echo.default", "/").await.1 != "v2" {
        assert!(Instant::now() < deadline, "SIGHUP reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM while a slow request is in flight: it completes, then the process exits 0.
    let slow = tokio::spawn(async move {
        H1::connect(http_addr)
            .await
            .get("echo.default", "/slow")
            .await
            .0
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    signal(child.id(), "TERM");
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
}

#[test]
fn bad_config_files_fail_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "outbound:\n  http: 127.0.0.1:0\ndestinations:\n  - authority: echo.default\n    protocl: http\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:5:"), "{err}");
    assert!(err.contains("protocl"), "{err}");

    let out = Command::new(BIN)
        .args([
            "--controller",
            "http://127.0.0.1:1",
            "--workload",
            "noslash",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAMESPACE/NAME"));
}

/// `--gateway FILE` at start: a bad document stops the start with its file, line and field; a
/// `--config` file with its own `gateway:` section as well is refused (one source).
#[test]
fn a_bad_gateway_document_or_two_gateways_fail_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = dir.path().join("gateway.yaml");
    std::fs::write(
        &gateway,
        "apiVersion: policy.trellis.io/v1alpha1\nkind: Gateway\nmetadata: {name: public}\nspec:\n  https: {port: 8443}\n  certificates: []\n  routes:\n    - host: shop.example.com\n      service: {name: web, prot: 80}\n",
    )
    .unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, "outbound:\n  http: 127.0.0.1:0\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .args(["--gateway", gateway.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.yaml:9: spec.routes[0].service.prot: unknown field `prot`"),
        "{err}"
    );

    std::fs::write(
        &gateway,
        "apiVersion: policy.trellis.io/v1alpha1\nkind: Gateway\nmetadata: {name: public}\nspec:\n  https: {port: 8443}\n  certificates: []\n  routes: []\n",
    )
    .unwrap();
    std::fs::write(
        &config,
        "gateway:\n  https: 127.0.0.1:0\n  certificates: []\n  routes: []\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .args(["--gateway", gateway.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has a `gateway:` section and --gateway"),
        "{err}"
    );
}
