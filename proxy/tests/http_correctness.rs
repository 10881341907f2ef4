//! HTTP correctness at the proxy, each case the exact bytes of a defect found by probing the
//! proxy with raw sockets: what the client gets back and what a raw upstream socket receives.
//!
//! - an absolute-form target and a different Host: routed by the target, and the upstream's
//!   Host is the target's authority (RFC 9112 3.2.2);
//! - two Host fields: 400, nothing upstream (RFC 9112 3.2), on the HTTP listener and a port;
//! - malformed chunked bodies: 400 `bad-request`, counted as such, never a complete request
//!   upstream;
//! - `Upgrade: h2c`: not tunnelled (the request goes up as a plain request);
//! - a request head that does not arrive in time: 408;
//! - HTTP/2: no `host` beside `:authority` upstream, a mismatching client `host` refused, and a
//!   header block that never ends closed within the header timeout.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that records every byte it receives per connection. It answers `200 ok` once a
/// request is complete: after the head, or after the body's declared length, or after the last
/// chunk of a chunked body; an incomplete request is never answered.
#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<Received>>>,
}

/// The bytes one upstream connection received so far.
type Received = Arc<Mutex<Vec<u8>>>;

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<Received>>> = Arc::default();
        let all = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = Arc::new(Mutex::new(Vec::new()));
                all.lock().unwrap().push(Arc::clone(&seen));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut answered = 0;
                    loop {
                        let n = match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let complete = {
                            let mut seen = seen.lock().unwrap();
                            seen.extend_from_slice(&buf[..n]);
                            complete_requests(&seen)
                        };
                        while answered < complete {
                            answered += 1;
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, connections }
    }

    /// Everything received, per connection, as text.
    fn received(&self) -> Vec<String> {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .map(|c| String::from_utf8_lossy(&c.lock().unwrap()).into_owned())
            .collect()
    }

    /// How many complete requests arrived over all connections.
    fn complete(&self) -> usize {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .map(|c| complete_requests(&c.lock().unwrap()))
            .sum()
    }
}

/// How many complete HTTP/1.1 requests `data` holds (heads with their bodies).
fn complete_requests(mut data: &[u8]) -> usize {
    let mut count = 0;
    loop {
        let Some(end) = find(data, b"\r\n\r\n") else {
            return count;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let mut rest = &data[end + 4..];
        if head.contains("transfer-encoding: chunked") {
            let Some(last) = find(rest, b"0\r\n\r\n") else {
                return count;
            };
            // A last chunk: at the start of the body or after a chunk's CRLF.
            if last != 0 && !rest[..last].ends_with(b"\r\n") {
                return count;
            }
            rest = &rest[last + 5..];
        } else if let Some(len) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            if rest.len() < len {
                return count;
            }
            rest = &rest[len..];
        }
        count += 1;
        data = rest;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends `raw` on a new connection to `addr` and reads what comes back until the peer closes
/// or 5 s pass.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        // One answer is enough; keep-alive connections would otherwise wait for the deadline.
        if complete_responses(&out) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn complete_responses(data: &[u8]) -> bool {
    let Some(end) = find(data, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    data.len() >= end + 4 + len
}

async fn metrics(admin: SocketAddr) -> String {
    exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// A proxy whose `raw.default` is a [`RawUpstream`] and `echo.default` an echo app.
async fn mesh() -> (RawUpstream, App, trellis_proxy::RunningProxy) {
    let raw = RawUpstream::start().await;
    let echo = app("echo").await;
    let proxy = proxy(&config(raw.addr, echo.addr)).await;
    (raw, echo, proxy)
}

/// Appends what `s` receives to `out` until the peer closes (or 5 s pass without a byte).
async fn read_until_closed(s: &mut TcpStream, out: &mut Vec<u8>) {
    let mut buf = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn config(raw: SocketAddr, echo: SocketAddr) -> String {
    format!(
        "admin: 127.0.0.1:0\noutbound:\n  http: 127.0.0.1:0\n  ports:\n    - listen: 127.0.0.1:0\n      destination: raw.default\nlimits:\n  header_read_timeout_ms: 300\ndestinations:\n{}{}",
        destination("raw.default", &[("v1", 1, &[raw])]),
        destination("echo.default", &[("v1", 1, &[echo])]),
    )
}

#[tokio::test]
async fn an_absolute_form_target_is_routed_and_becomes_the_upstreams_host() {
    let (raw, echo, proxy) = mesh().await;
    let answer = exchange(
        proxy.http.unwrap(),
        b"GET http://raw.default/abs2 HTTP/1.1\r\nHost: echo.default\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let received = raw.received().concat().to_ascii_lowercase();
    assert!(received.starts_with("get /abs2 http/1.1\r\n"), "{received}");
    assert!(received.contains("host: raw.default\r\n"), "{received}");
    assert!(!received.contains("echo.default"), "{received}");
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn two_host_fields_are_a_bad_request_on_every_listener() {
    let (raw, echo, proxy) = mesh().await;
    for listener in [proxy.http.unwrap(), proxy.ports[0]] {
        let answer = exchange(
            listener,
            b"GET / HTTP/1.1\r\nHost: raw.default\r\nHost: echo.default\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("x-trellis-error: bad-request"), "{answer}");
    }
    assert_eq!(raw.received(), Vec::<String>::new());
    assert_eq!(echo.hits(), 0);
    let metrics = metrics(proxy.admin.unwrap()).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("trellis_request_total{")
                && l.contains("response_code=\"400\"")
                && l.contains("error=\"bad-request\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );
}

#[tokio::test]
async fn malformed_chunked_bodies_are_the_clients_fault_and_never_reach_the_upstream_whole() {
    let (raw, _echo, proxy) = mesh().await;
    let bodies: [&[u8]; 5] = [
        b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n",
        b"-1\r\nabc\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\n0\n\n",
        b"5\r\nhelloEXTRA\r\n0\r\n\r\n",
    ];
    for body in bodies {
        let mut request =
            b"POST /upload HTTP/1.1\r\nHost: raw.default\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        request.extend_from_slice(body);
        let answer = exchange(proxy.http.unwrap(), &request).await;
        let shown = String::from_utf8_lossy(body);
        assert!(answer.starts_with("HTTP/1.1 400"), "{shown:?}: {answer}");
        assert!(
            answer.contains("x-trellis-error: bad-request"),
            "{shown:?}: {answer}"
        );
    }
    assert_eq!(
        raw.complete(),
        0,
        "a complete request reached the upstream: {:?}",
        raw.received()
    );
    let metrics = metrics(proxy.admin.unwrap()).await;
    let total = |needle: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("trellis_request_total{") && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(total("error=\"bad-request\""), 5.0, "{metrics}");
    assert_eq!(total("error=\"upstream-failed\""), 0.0, "{metrics}");
    assert_eq!(total("response_code=\"502\""), 0.0, "{metrics}");
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_tunnelled() {
    let (raw, _echo, proxy) = mesh().await;
    let answer = exchange(
        proxy.http.unwrap(),
        b"GET /denied HTTP/1.1\r\nHost: raw.default\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let received = raw.received().concat().to_ascii_lowercase();
    assert!(
        received.starts_with("get /denied http/1.1\r\n"),
        "{received}"
    );
    for hop in ["upgrade", "http2-settings", "connection: upgrade"] {
        assert!(!received.contains(hop), "{hop} went upstream: {received}");
    }
}

#[tokio::test]
async fn a_request_head_that_does_not_arrive_in_time_gets_408() {
    let (_raw, _echo, proxy) = mesh().await;
    // A head that starts and stops.
    let started = Instant::now();
    let answer = exchange(
        proxy.http.unwrap(),
        b"GET / HTTP/1.1\r\nHost: raw.default\r\nX-Never-Ends: 1\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4), "{started:?}");
    // The second head on a keep-alive connection, the same. (A partial head pipelined in the
    // same packet as a whole request is read ahead by hyper before the wait for it begins; that
    // connection is closed at the limit too, without the 408.)
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: raw.default\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let mut out = buf[..n].to_vec();
    s.write_all(b"GET / HTT").await.unwrap();
    read_until_closed(&mut s, &mut out).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 408"), "{text}");
    // An idle keep-alive connection is closed with no answer at all.
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: raw.default\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    read_until_closed(&mut s, &mut out).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("408"), "{text}");
}

/// An h2c upstream that answers with what it saw: whether a `host` field came, and the
/// `:authority`.
async fn strict_h2_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let host = req
                            .headers()
                            .get_all("host")
                            .iter()
                            .map(|v| v.to_str().unwrap_or("?").to_owned())
                            .collect::<Vec<_>>();
                        let authority = req.uri().authority().map(|a| a.to_string());
                        // nginx's rule (RFC 9113 8.3.1): a host that differs from :authority is 400.
                        let status = match (host.first(), &authority) {
                            (Some(h), Some(a)) if h != a => 400,
                            _ => 200,
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(full(format!("host={host:?} authority={authority:?}")))
                                .unwrap(),
                        )
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn http2_requests_carry_one_authority() {
    let upstream = strict_h2_upstream().await;
    let yaml = format!(
        "outbound:\n  http: 127.0.0.1:0\nlimits:\n  header_read_timeout_ms: 300\ndestinations:\n  - authority: grpc.default\n    backends:\n      - name: v1\n        endpoints:\n          - address: \"{upstream}\"\n            protocol: http2\n"
    );
    let proxy = proxy(&yaml).await;
    let mut client = h2(proxy.http.unwrap()).await;
    // An h2 client naming the service in :authority, as gRPC clients do.
    let req = Request::get("http://grpc.default/svc/Method")
        .body(full(""))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("host=[]"), "{body}");
    // A client host that names another authority than :authority is malformed.
    let req = Request::get("http://grpc.default/svc/Method")
        .header("host", "other.default")
        .body(full(""))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-trellis-error"], "bad-request");
}

#[tokio::test]
async fn an_http2_header_block_that_never_ends_is_closed_within_the_header_timeout() {
    let (raw, _echo, proxy) = mesh().await;
    let mut s = TcpStream::connect(proxy.http.unwrap()).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS, empty.
    bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // HEADERS on stream 1, one byte of HPACK (`:method: GET`), flags 0: no END_HEADERS, so a
    // CONTINUATION is owed and never comes.
    bytes.extend_from_slice(&[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82]);
    let started = Instant::now();
    s.write_all(&bytes).await.unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open after 10 s"),
        }
    }
    // The limit is 300 ms: idle between one and two limits, then a bounded GOAWAY wait.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(raw.received(), Vec::<String>::new());
}
