//! One plain HTTP/1.1 request on its own connection, as an app sends it: to a server, or to its
//! HTTP proxy with an absolute URL (what `curl -x` and `http_proxy` do).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// An answer: status, headers (names lower-cased), body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `method target` with `Host: host` and `body` to `to` (`Connection: close`), within 10 s.
pub async fn request(
    to: SocketAddr,
    method: &str,
    target: &str,
    host: &str,
    body: &str,
) -> anyhow::Result<Response> {
    let exchange = async {
        let mut stream = TcpStream::connect(to)
            .await
            .with_context(|| format!("connecting to {to}"))?;
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse(&String::from_utf8_lossy(&raw))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{method} {target} to {to}: no answer within 10 s"))?
}

/// `GET url` through the HTTP proxy at `proxy` (absolute-form request, as `curl -x` sends).
pub async fn get_via_proxy(proxy: SocketAddr, url: &str) -> anyhow::Result<Response> {
    let host = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("{url} is not an http:// URL"))?;
    request(proxy, "GET", url, host, "").await
}

/// `GET path` from `to` directly.
pub async fn get(to: SocketAddr, path: &str) -> anyhow::Result<Response> {
    request(to, "GET", path, &to.to_string(), "").await
}

/// Calls until the answer is not a "not there yet" one (no answer, or the proxy's
/// `unknown-destination`, `no-endpoints`, `no-identity`, `connect-failed` while endpoints and
/// certificates arrive), at most 20 s; returns the last answer.
pub async fn settled(
    mut call: impl AsyncFnMut() -> anyhow::Result<Response>,
) -> anyhow::Result<Response> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let last = call().await;
        let waiting = match &last {
            Ok(r) => matches!(
                r.header("x-trellis-error"),
                Some("unknown-destination" | "no-endpoints" | "no-identity" | "connect-failed")
            ),
            Err(_) => true,
        };
        if !waiting || tokio::time::Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse(raw: &str) -> anyhow::Result<Response> {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {raw:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let Some(status) = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    else {
        bail!("bad status line {status_line:?}");
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // Chunked bodies are not decoded: the answers the tests read carry a Content-Length.
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}
