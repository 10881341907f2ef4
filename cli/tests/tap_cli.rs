//! `trellis tap` as a real process against a proxy's admin port: human lines, `-o json`, the
//! filters and limit passed through, and a refused tap reported with the proxy's reason.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// A proxy in this process: outbound HTTP to `gone.shop`, whose only endpoint refuses
/// connections (every request is a 502 `connect-failed` record).
async fn proxy() -> trellis_proxy::RunningProxy {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\ndestinations:\n  - authority: gone.shop\n    backends: [{{name: gone, endpoints: [{{address: \"{dead}\"}}]}}]\n"
    );
    let config =
        trellis_proxy::config::Config::parse(&yaml, std::path::Path::new("tap.yaml")).unwrap();
    trellis_proxy::start(trellis_proxy::ProxyOptions::new(config))
        .await
        .unwrap()
}

async fn get(addr: SocketAddr, path: &str) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: gone.shop\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

/// Runs `trellis tap ARGS` while sending requests (the tap subscribes when it connects, so
/// requests go on until it has its `--limit` and exits). Returns stdout.
async fn tap(proxy: &trellis_proxy::RunningProxy, args: &[&str]) -> String {
    let admin = proxy.admin.unwrap().to_string();
    let mut child = Command::new(TRELLIS)
        .args(["tap", "--admin", &admin, "--duration", "20s"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "trellis tap did not finish");
        i += 1;
        get(proxy.http.unwrap(), &format!("/other/{i}")).await;
        get(proxy.http.unwrap(), &format!("/seen/{i}")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_prints_filtered_records_human_and_json() {
    let proxy = proxy().await;

    let human = tap(&proxy, &["--path", "/seen", "--limit", "2"]).await;
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 2, "{human}");
    for line in &lines {
        assert!(line.contains(" out GET gone.shop/seen/"), "{line}");
        assert!(line.contains("-> 502 (connect-failed)"), "{line}");
    }

    let json = tap(
        &proxy,
        &[
            "--status", "5xx", "--method", "GET", "--limit", "3", "-o", "json",
        ],
    )
    .await;
    let records: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{json}");
    for r in &records {
        assert_eq!(r["status"], 502);
        assert_eq!(r["error"], "connect-failed");
        assert_eq!(r["authority"], "gone.shop");
    }

    // A filter the proxy refuses: exit 1 with its reason.
    let out = Command::new(TRELLIS)
        .args([
            "tap",
            "--admin",
            &proxy.admin.unwrap().to_string(),
            "--status",
            "9xx",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("400") && err.contains("status=9xx"), "{err}");
}
