//! Access logs and `/tap` with the real binary: records for HTTP (200, 403, 502) and opaque TCP
//! with the mTLS identities on both sides, a stalled log that drops (counted) without slowing
//! requests, tap filters and bounds, the loopback-only rule, and the controller's per-namespace
//! switch (`InboundPolicy.access_log`) turning the log on for a proxy started without the flag.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs::{identity_yaml, new_ca, valid_leaf};
use common::*;
use futures::StreamExt;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::WatchStream;
use tonic::{Response, Status};
use trellis_proxy_api::v1::{self, destinations_server, inbound_server};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");
const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/b";

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A proxy process, killed when dropped.
struct Proxy {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect(admin).await.is_ok()
            && H1::connect(admin).await.get("admin", "/ready").await.0 == StatusCode::OK
        {
            return;
        }
        assert!(Instant::now() < deadline, "proxy on {admin} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Start the binary with `yaml` (its admin on `admin`) and `args`.
async fn spawn(dir: &Path, name: &str, admin: u16, yaml: &str, args: &[&str]) -> Proxy {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, format!("admin: 127.0.0.1:{admin}\n{yaml}")).unwrap();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .args(["--threads", "1", "--log", "warn"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proxy = Proxy {
        child,
        admin: local(admin),
    };
    wait_ready(proxy.admin).await;
    proxy
}

async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = H1::connect(admin).await.get("admin", "/metrics").await.2;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The JSON lines of `path` once there are at least `n` (waits up to 10 s).
async fn lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let parsed: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        if parsed.len() >= n {
            return parsed;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, expected {n}:\n{text}",
            path.display(),
            parsed.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn find<'a>(records: &'a [Value], pred: impl Fn(&Value) -> bool, what: &str) -> &'a Value {
    records
        .iter()
        .find(|r| pred(r))
        .unwrap_or_else(|| panic!("no record {what} in {records:#?}"))
}

/// A TCP server echoing what it reads.
async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_records_http_and_tcp_with_identities_statuses_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("mesh");
    let app = app("b").await;
    let echo = tcp_echo().await;
    let dead = local(free_port());
    let (b_admin, b_inbound) = (free_port(), free_port());
    let (a_admin, a_http, a_tcp) = (free_port(), free_port(), free_port());
    let (a_log, b_log) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let _b = spawn(
        dir.path(),
        "b",
        b_admin,
        &format!(
            "workload: {{namespace: shop, name: b}}\ninbound:\n  listen: 127.0.0.1:{b_inbound}\n  app: \"{}\"\n  policy:\n    authorizations:\n      - identities: [\"{A_ID}\"]\n{}access_log: \"{}\"\n",
            app.addr,
            identity_yaml(dir.path(), "b", &valid_leaf(&ca, B_ID), &[&ca]),
            b_log.display()
        ),
        &[],
    )
    .await;
    let _a = spawn(
        dir.path(),
        "a",
        a_admin,
        &format!(
            "workload: {{namespace: shop, name: a}}\noutbound:\n  http: 127.0.0.1:{a_http}\n  ports: [{{listen: \"127.0.0.1:{a_tcp}\", destination: echo.shop, protocol: tcp}}]\ndestinations:\n  - authority: b.shop\n    workload: {{namespace: shop, name: b}}\n    backends: [{{name: b, endpoints: [{{address: \"127.0.0.1:{b_inbound}\", identity: \"{B_ID}\"}}]}}]\n  - authority: dead.shop\n    backends: [{{name: dead, endpoints: [{{address: \"{dead}\"}}]}}]\n  - authority: echo.shop\n    protocol: tcp\n    backends: [{{name: echo, endpoints: [{{address: \"{echo}\"}}]}}]\n{}",
            identity_yaml(dir.path(), "a", &valid_leaf(&ca, A_ID), &[&ca]),
        ),
        // The flag wins over the file (which has no access_log).
        &["--access-log", a_log.to_str().unwrap()],
    )
    .await;

    // 200 through A and B over mTLS, with a trace id and credentials that must not be logged.
    let mut h1 = H1::connect(local(a_http)).await;
    let resp = h1
        .send(
            Request::get("/hello?token=SECRET-QUERY")
                .header("host", "b.shop")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .header("authorization", "Bearer SECRET-TOKEN")
                .header("cookie", "session=SECRET-COOKIE")
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(read(resp).await.0, StatusCode::OK);
    // 502: the endpoint refuses connections.
    assert_eq!(h1.get("dead.shop", "/x").await.0, StatusCode::BAD_GATEWAY);
    // 403: a plaintext caller straight to B's inbound (only A may call).
    assert_eq!(
        H1::connect(local(b_inbound))
            .await
            .get("b.shop", "/denied")
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // Opaque TCP through A's per-upstream port.
    let mut tcp = TcpStream::connect(local(a_tcp)).await.unwrap();
    tcp.write_all(b"ping!").await.unwrap();
    let mut back = [0u8; 5];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping!");
    drop(tcp);

    let a = lines(&a_log, 3).await;
    let ok = find(&a, |r| r["path"] == "/hello", "/hello on A");
    assert_eq!(ok["direction"], "outbound");
    assert_eq!(ok["protocol"], "http/1.1");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["authority"], "b.shop");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(ok["source_identity"], A_ID);
    assert_eq!(ok["source_workload"], "shop/a");
    assert_eq!(ok["destination_identity"], B_ID);
    assert_eq!(ok["destination_workload"], "shop/b");
    assert_eq!(ok["endpoint"], format!("127.0.0.1:{b_inbound}"));
    assert_eq!(ok["bytes_out"], 1, "the app answers \"b\"");
    assert_eq!(ok["error"], "");
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let failed = find(&a, |r| r["authority"] == "dead.shop", "dead.shop on A");
    assert_eq!(failed["status"], 502);
    assert_eq!(failed["error"], "connect-failed");
    assert_eq!(failed["endpoint"], dead.to_string());
    let t = find(&a, |r| r["protocol"] == "tcp", "TCP on A");
    assert_eq!(t["authority"], "echo.shop");
    assert_eq!(t["endpoint"], echo.to_string());
    assert_eq!(
        (t["bytes_in"].as_u64(), t["bytes_out"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(t["status"], 0);
    assert_eq!(t["source_identity"], A_ID);

    let b = lines(&b_log, 2).await;
    let ok = find(&b, |r| r["path"] == "/hello", "/hello on B");
    assert_eq!(ok["direction"], "inbound");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["source_identity"], A_ID);
    assert_eq!(ok["destination_identity"], B_ID);
    assert_eq!(ok["destination_workload"], "shop/b");
    assert_eq!(ok["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(ok["endpoint"], app.addr.to_string());
    let denied = find(&b, |r| r["path"] == "/denied", "/denied on B");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["error"], "forbidden");
    assert_eq!(denied["source_identity"], "");

    for log in [&a_log, &b_log] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.contains("SECRET"),
            "a secret reached the log:\n{text}"
        );
    }
    assert!(metric(local(a_admin), "trellis_access_log_lines_total").await >= 3.0);
    assert_eq!(
        metric(local(a_admin), "trellis_access_log_dropped_total").await,
        0.0
    );

    // The request series name both ends' identities when the call went over mTLS (what
    // `trellis edges` shows), and only then.
    let series = |text: &str, needles: &[&str]| -> String {
        text.lines()
            .find(|l| {
                l.starts_with("trellis_request_total{") && needles.iter().all(|n| l.contains(n))
            })
            .unwrap_or_else(|| panic!("no trellis_request_total with {needles:?} in:\n{text}"))
            .to_owned()
    };
    let a_metrics = H1::connect(local(a_admin))
        .await
        .get("admin", "/metrics")
        .await
        .2;
    let out = series(
        &a_metrics,
        &["direction=\"outbound\"", "response_code=\"200\""],
    );
    for label in [
        format!("source_identity=\"{A_ID}\""),
        format!("destination_identity=\"{B_ID}\""),
        "tls=\"true\"".to_owned(),
    ] {
        assert!(out.contains(&label), "{label} missing: {out}");
    }
    let plain = series(&a_metrics, &["destination=\"dead.shop\""]);
    assert!(
        plain.contains("tls=\"false\"") && plain.contains("destination_identity=\"\""),
        "{plain}"
    );
    let b_metrics = H1::connect(local(b_admin))
        .await
        .get("admin", "/metrics")
        .await
        .2;
    let inb = series(
        &b_metrics,
        &["direction=\"inbound\"", "response_code=\"200\""],
    );
    for label in [
        format!("source_identity=\"{A_ID}\""),
        format!("destination_identity=\"{B_ID}\""),
        "tls=\"true\"".to_owned(),
    ] {
        assert!(inb.contains(&label), "{label} missing: {inb}");
    }
}

/// Latencies (ms) of `n` sequential GETs on one keep-alive connection.
async fn latencies(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut c = H1::connect(addr).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        assert_eq!(c.get("app.shop", "/").await.0, StatusCode::OK);
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_access_log_drops_counted_records_and_never_slows_requests() {
    let dir = tempfile::tempdir().unwrap();
    let app = app("app").await;
    // The log is a FIFO the test opens but never reads: once the pipe and the writer's buffer
    // are full, the writer thread is stuck for good and the 4-record channel stays full.
    let fifo = dir.path().join("stuck.log");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::File::open(fifo).unwrap())
    };
    let dest = format!(
        "destinations:\n{}",
        destination("app.shop", &[("app", 1, &[app.addr])])
    );
    let (logged_admin, logged_http) = (free_port(), free_port());
    let (plain_admin, plain_http) = (free_port(), free_port());
    let _logged = spawn(
        dir.path(),
        "logged",
        logged_admin,
        &format!(
            "outbound:\n  http: 127.0.0.1:{logged_http}\naccess_log: \"{}\"\naccess_log_buffer: 4\n{dest}",
            fifo.display()
        ),
        &[],
    )
    .await;
    let _pipe = reader.join().unwrap();
    let _plain = spawn(
        dir.path(),
        "plain",
        plain_admin,
        &format!("outbound:\n  http: 127.0.0.1:{plain_http}\n{dest}"),
        &[],
    )
    .await;
    // Fill the pipe first (~64 KiB pipe + 64 KiB buffer at ~400 bytes a line).
    let flood: u32 = 1500;
    latencies(local(logged_http), flood as usize).await;
    let dropped = metric(local(logged_admin), "trellis_access_log_dropped_total").await;
    let written = metric(local(logged_admin), "trellis_access_log_lines_total").await;
    println!("flood of {flood}: {written} lines written, {dropped} dropped");
    assert!(
        dropped >= 500.0,
        "only {dropped} dropped, {written} written"
    );
    // Every record is written, dropped or waiting (channel of 4, one line mid-write).
    let accounted = dropped + written;
    assert!(
        accounted <= f64::from(flood) && accounted >= f64::from(flood) - 6.0,
        "{written} written + {dropped} dropped of {flood}"
    );
    // Requests through the stalled proxy are as fast as through one without a log.
    let n = 300;
    let (with, without) = (
        latencies(local(logged_http), n).await,
        latencies(local(plain_http), n).await,
    );
    let (p50_with, p50_without) = (with[n / 2], without[n / 2]);
    let (p99_with, p99_without) = (with[n * 99 / 100], without[n * 99 / 100]);
    println!(
        "p50 {p50_with:.3} ms with the stalled log, {p50_without:.3} ms without; p99 {p99_with:.3} / {p99_without:.3} ms"
    );
    assert!(
        p50_with < p50_without * 2.0 + 0.5,
        "p50 {p50_with} ms with the stalled log vs {p50_without} ms without"
    );
    assert!(
        metric(local(logged_admin), "trellis_access_log_dropped_total").await
            >= dropped + f64::from(n as u32) - 1.0,
        "the later requests were dropped too"
    );
}

/// Opens `/tap?query` on `admin`; returns the status and, for 200, the streamed body.
async fn tap(admin: SocketAddr, query: &str) -> (StatusCode, hyper::body::Incoming) {
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get(format!("/tap?{query}"))
                .header("host", "admin")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.into_body())
}

async fn tap_lines(body: hyper::body::Incoming) -> Vec<Value> {
    let bytes = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the tap did not end")
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_filtered_bounded_records_to_loopback_callers_only() {
    let dir = tempfile::tempdir().unwrap();
    let app = app("app").await;
    let (admin, http) = (free_port(), free_port());
    let proxy = spawn(
        dir.path(),
        "tapped",
        admin,
        &format!(
            "outbound:\n  http: 127.0.0.1:{http}\ndestinations:\n{}{}",
            destination("app.shop", &[("app", 1, &[app.addr])]),
            destination("gone.shop", &[("gone", 1, &[local(free_port())])]),
        ),
        &[],
    )
    .await;
    // Nothing listens yet: no record is built (the log is off).
    let mut c = H1::connect(local(http)).await;
    c.get("app.shop", "/before").await;

    let (status, by_path) = tap(proxy.admin, "path=/tapme&method=GET&limit=2&duration=20s").await;
    assert_eq!(status, StatusCode::OK);
    let (_, errors) = tap(proxy.admin, "status=5xx&direction=outbound&limit=1").await;
    let (_, short) = tap(proxy.admin, "authority=nobody.shop&duration=300ms").await;
    // The subscriptions are registered before the response head is sent.
    for path in ["/other", "/tapme/1", "/tapme/2", "/tapme/3"] {
        assert_eq!(c.get("app.shop", path).await.0, StatusCode::OK);
    }
    assert_eq!(c.get("gone.shop", "/").await.0, StatusCode::BAD_GATEWAY);

    let got = tap_lines(by_path).await;
    let paths: Vec<&str> = got.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/tapme/1", "/tapme/2"], "limit and path filter");
    assert!(
        got.iter()
            .all(|r| r["direction"] == "outbound" && r["status"] == 200)
    );
    let got = tap_lines(errors).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["status"], 502);
    assert_eq!(got[0]["error"], "connect-failed");
    let started = Instant::now();
    assert!(
        tap_lines(short).await.is_empty(),
        "duration ends a quiet tap"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Bad queries say what is wrong.
    let (status, body) = tap(proxy.admin, "limit=1000000").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let text = body.collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("limit"));

    // At most a few taps at once.
    let mut open = Vec::new();
    for _ in 0..4 {
        let (status, body) = tap(proxy.admin, "duration=20s").await;
        assert_eq!(status, StatusCode::OK);
        open.push(body);
    }
    assert_eq!(
        tap(proxy.admin, "duration=20s").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A tap client that leaves frees its place.
    open.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Records let the hub notice closed taps; a new subscription also sweeps them.
        c.get("app.shop", "/sweep").await;
        let (status, body) = tap(proxy.admin, "duration=1s").await;
        if status == StatusCode::OK {
            drop(body);
            break;
        }
        assert!(Instant::now() < deadline, "a closed tap kept its place");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A non-loopback address of this host, if it has one (the tap must refuse callers from it).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_refuses_callers_that_are_not_on_loopback() {
    let Some(ip) = non_loopback_ip() else {
        println!(
            "SKIP: this host has no non-loopback address (the rule is unit-tested in observe::tap)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let path = dir.path().join("open.yaml");
    std::fs::write(&path, format!("admin: 0.0.0.0:{admin}\n")).unwrap();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .args(["--threads", "1", "--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proxy = Proxy {
        child,
        admin: local(admin),
    };
    wait_ready(local(admin)).await;
    let (status, body) = tap(SocketAddr::new(ip, admin), "limit=1").await;
    let text = body.collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::FORBIDDEN, "{text:?}");
    assert!(String::from_utf8_lossy(&text).contains("loopback"));
    // The same proxy taps for a loopback caller.
    let (status, _) = tap(local(admin), "duration=100ms").await;
    assert_eq!(status, StatusCode::OK);
}

// --- the controller's per-namespace switch ---

#[derive(Clone)]
struct Controller(watch_policy::Tx);

mod watch_policy {
    pub type Tx = tokio::sync::watch::Sender<trellis_proxy_api::v1::InboundPolicy>;
}

#[tonic::async_trait]
impl destinations_server::Destinations for Controller {
    type WatchStream = futures::stream::BoxStream<'static, Result<v1::DestinationUpdate, Status>>;
    async fn watch(
        &self,
        _req: tonic::Request<v1::DestinationRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(
            futures::stream::iter([Ok(v1::DestinationUpdate {
                version: "1".into(),
                kind: Some(v1::destination_update::Kind::NotFound(v1::NotFound {
                    egress_denied: false,
                    external_ports: Vec::new(),
                    reason: "none here".into(),
                })),
            })])
            .chain(futures::stream::pending())
            .boxed(),
        ))
    }
}

#[tonic::async_trait]
impl inbound_server::Inbound for Controller {
    type WatchStream = futures::stream::BoxStream<'static, Result<v1::InboundPolicy, Status>>;
    async fn watch(
        &self,
        _req: tonic::Request<v1::InboundRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(
            WatchStream::new(self.0.subscribe()).map(Ok).boxed(),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_namespace_switch_turns_the_log_on_without_the_flag() {
    let app = app("app").await;
    let policy = tokio::sync::watch::channel(v1::InboundPolicy {
        version: "1".into(),
        authorizations: vec![v1::Authorization {
            unauthenticated: true,
            ..Default::default()
        }],
        default_action: v1::DefaultAction::Deny as i32,
        access_log: false,
        ..Default::default()
    })
    .0;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let controller = listener.local_addr().unwrap();
    let svc = Controller(policy.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(destinations_server::DestinationsServer::new(svc.clone()))
            .add_service(inbound_server::InboundServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let (admin, inbound) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args([
            "--controller",
            &format!("http://{controller}"),
            "--workload",
            "shop/app",
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--inbound",
            &format!("127.0.0.1:{inbound}={}", app.addr),
            "--threads",
            "1",
            "--log",
            "warn",
        ])
        .env_remove("TRELLIS_PROXY_ACCESS_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Collect the proxy's stderr (the controller-enabled log goes there).
    let stderr: Arc<Mutex<String>> = Arc::default();
    {
        let stderr = Arc::clone(&stderr);
        let mut pipe = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            while pipe.read_line(&mut line).unwrap_or(0) > 0 {
                stderr.lock().unwrap().push_str(&line);
                line.clear();
            }
            let mut rest = String::new();
            let _ = pipe.read_to_string(&mut rest);
        });
    }
    let _proxy = Proxy {
        child,
        admin: local(admin),
    };
    wait_ready(local(admin)).await;
    let json_lines = |text: &str| -> Vec<Value> {
        text.lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let mut c = H1::connect(local(inbound)).await;
    assert_eq!(c.get("app.shop", "/quiet").await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        json_lines(&stderr.lock().unwrap()).is_empty(),
        "no access log before the controller asks"
    );

    // The controller puts the workload's namespace under `--access-log-namespace`.
    policy.send_modify(|p| {
        p.version = "2".into();
        p.access_log = true;
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(c.get("app.shop", "/logged").await.0, StatusCode::OK);
        let records = json_lines(&stderr.lock().unwrap());
        if let Some(r) = records.iter().find(|r| r["path"] == "/logged") {
            assert_eq!(r["direction"], "inbound");
            assert_eq!(r["destination_workload"], "shop/app");
            assert_eq!(r["status"], 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line after the controller's switch:\n{}",
            stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !json_lines(&stderr.lock().unwrap())
            .iter()
            .any(|r| r["path"] == "/quiet"),
        "requests before the switch are not logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_records_carry_the_grpc_status_from_trailers_and_trailers_only_answers() {
    use common::echo::EchoMessage;
    use common::echo::echo_client::EchoClient;
    let dir = tempfile::tempdir().unwrap();
    let grpc = grpc_app("g").await;
    let (admin, port, inbound) = (free_port(), free_port(), free_port());
    let log = dir.path().join("grpc.log");
    let _proxy = spawn(
        dir.path(),
        "grpc",
        admin,
        &format!(
            "outbound:\n  ports: [{{listen: \"127.0.0.1:{port}\", destination: grpc.shop}}]\ndestinations:\n  - authority: grpc.shop\n    protocol: http2\n    backends: [{{name: g, endpoints: [{{address: \"{grpc}\"}}]}}]\ninbound:\n  listen: 127.0.0.1:{inbound}\n  app: \"{grpc}\"\n  protocol: detect\n  policy:\n    authorizations:\n      - unauthenticated: true\n        routes: [{{path_regex: \"/trellis.test.echo.Echo/Bidi\"}}]\naccess_log: \"{}\"\n",
            log.display()
        ),
        &[],
    )
    .await;
    // Allowed, outbound: grpc-status 0 arrives in the trailers.
    let mut out = EchoClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let reply = out.unary(EchoMessage { text: "hi".into() }).await.unwrap();
    assert_eq!(reply.into_inner().text, "g:hi");
    // Denied, inbound: a trailers-only answer (grpc-status 7 in the headers, empty body).
    let mut inb = EchoClient::connect(format!("http://127.0.0.1:{inbound}"))
        .await
        .unwrap();
    let denied = inb
        .unary(EchoMessage { text: "no".into() })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let records = lines(&log, 2).await;
    let ok = find(&records, |r| r["direction"] == "outbound", "outbound gRPC");
    assert_eq!(ok["protocol"], "grpc");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/trellis.test.echo.Echo/Unary");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["grpc_status"], 0);
    assert_eq!(ok["error"], "");
    assert!(ok["bytes_in"].as_u64().unwrap() > 0 && ok["bytes_out"].as_u64().unwrap() > 0);
    let no = find(&records, |r| r["direction"] == "inbound", "inbound gRPC");
    assert_eq!(no["protocol"], "grpc");
    assert_eq!(no["status"], 200);
    assert_eq!(no["grpc_status"], 7);
    assert_eq!(
        no["error"], "forbidden",
        "a trailers-only answer is not a cancellation"
    );
}
