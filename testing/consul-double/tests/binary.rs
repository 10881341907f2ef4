//! The `trellis-consul-double` binary: prints its address, serves the API and its controls.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

async fn get(addr: &str, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    raw
}

async fn put_json(addr: &str, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    raw
}

#[tokio::test]
async fn the_binary_prints_its_address_and_serves_the_api() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-consul-double"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--node-name", "host-7", "--node-address", "10.9.8.7"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the double");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("an address within 10 s")
        .unwrap()
        .expect("a line");
    let addr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let services = get(&addr, "GET", "/v1/catalog/services").await;
    assert!(services.starts_with("HTTP/1.1 200"), "{services}");
    assert!(services.contains("x-consul-index: 1"), "{services}");
    let control = get(&addr, "POST", "/_double/leader?known=false").await;
    assert!(control.starts_with("HTTP/1.1 200"), "{control}");
    let leaderless = get(&addr, "GET", "/v1/catalog/services").await;
    assert!(leaderless.starts_with("HTTP/1.1 500"), "{leaderless}");
    assert!(leaderless.ends_with("No cluster leader"), "{leaderless}");
    let registered = put_json(
        &addr,
        "/v1/agent/service/register",
        r#"{"Name": "web", "Port": 15001, "Meta": {"service-account": "web"}}"#,
    )
    .await;
    assert!(registered.starts_with("HTTP/1.1 200"), "{registered}");
    let health = get(&addr, "GET", "/v1/health/service/web?stale").await;
    assert!(
        health.contains(r#""Node":"host-7","Address":"10.9.8.7""#),
        "the agent registers on the node the flags name: {health}"
    );
    child.kill().await.unwrap();
}
