//! The calling side of the echo app: send N requests to a URL over ONE keep-alive connection (as
//! real clients do, which is why a mesh must split per request, not per connection), directly or
//! through a mesh proxy, and report what answered. With `concurrency` above 1, the requests are
//! shared among that many connections sending at once (a circuit breaker's limits on requests in
//! flight need callers that do not wait for each other).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::echo::{CALLER_HEADER, EchoReply};

/// The header trellis-proxy names its reason in when it answers an error itself.
pub const MESH_ERROR_HEADER: &str = "x-trellis-error";

/// What to call, how often and through what.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallPlan {
    /// Absolute URL, e.g. `http://web.demo/echo`. The host names the destination.
    pub url: String,
    /// Number of requests, sent one after another on one keep-alive connection.
    pub count: u32,
    #[serde(default = "default_method")]
    pub method: String,
    /// Sent as `x-echo-caller` so the callee can count per caller.
    #[serde(default)]
    pub caller: Option<String>,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Send through this HTTP proxy (absolute-form request target), else connect to the URL's
    /// host directly.
    #[serde(default)]
    pub proxy: Option<SocketAddr>,
    /// Per-request timeout in milliseconds (default 5000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Connections sending at once, each its share of `count` one after another (default 1:
    /// every request on one connection, in order).
    #[serde(default)]
    pub concurrency: Option<u32>,
}

fn default_method() -> String {
    "GET".to_owned()
}

/// What answered the calls.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CallReport {
    /// Responses per HTTP status code.
    pub statuses: BTreeMap<u16, u32>,
    /// Echo replies per `service/version` that produced them.
    pub by_responder: BTreeMap<String, u32>,
    /// Responses the mesh answered itself, per `x-trellis-error` reason.
    pub mesh_errors: BTreeMap<String, u32>,
    /// Requests that got no response at all (connection errors, timeouts).
    pub failed: u32,
    /// New connections opened after the first (a server or proxy closed the connection; with
    /// `concurrency`, the connections beyond one per lane).
    pub reconnects: u32,
    /// `retry-after` values of the responses that carried one, and how many carried each.
    #[serde(default)]
    pub retry_after: BTreeMap<String, u32>,
    /// The fastest and the slowest answer (request sent to response body read), in ms; None
    /// when nothing answered.
    #[serde(default)]
    pub fastest_ms: Option<u64>,
    #[serde(default)]
    pub slowest_ms: Option<u64>,
}

impl CallReport {
    /// Adds what another batch saw (a lane of a concurrent plan).
    pub fn merge(&mut self, other: CallReport) {
        fn add<K: Ord>(into: &mut BTreeMap<K, u32>, from: BTreeMap<K, u32>) {
            for (k, n) in from {
                *into.entry(k).or_default() += n;
            }
        }
        add(&mut self.statuses, other.statuses);
        add(&mut self.by_responder, other.by_responder);
        add(&mut self.mesh_errors, other.mesh_errors);
        add(&mut self.retry_after, other.retry_after);
        self.failed += other.failed;
        self.reconnects += other.reconnects;
        self.fastest_ms = match (self.fastest_ms, other.fastest_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.slowest_ms = self.slowest_ms.max(other.slowest_ms);
    }

    fn answered_in(&mut self, took: Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        self.fastest_ms = Some(self.fastest_ms.map_or(ms, |f| f.min(ms)));
        self.slowest_ms = Some(self.slowest_ms.map_or(ms, |s| s.max(ms)));
    }
}

/// Runs `plan` and reports what answered. Errors only for an unusable plan; call failures are
/// counted in the report.
pub async fn run(plan: &CallPlan) -> anyhow::Result<CallReport> {
    let lanes = plan.concurrency.unwrap_or(1).clamp(1, plan.count.max(1));
    if lanes == 1 {
        return lane(plan, plan.count).await;
    }
    // Every lane connects and sends at once; the first `count % lanes` take one more request.
    let tasks: Vec<_> = (0..lanes)
        .map(|i| {
            let plan = plan.clone();
            let count = plan.count / lanes + u32::from(i < plan.count % lanes);
            tokio::spawn(async move { lane(&plan, count).await })
        })
        .collect();
    let mut report = CallReport::default();
    for task in tasks {
        report.merge(task.await.context("a lane of the plan panicked")??);
    }
    Ok(report)
}

/// `count` requests of `plan`, one after another on one keep-alive connection.
async fn lane(plan: &CallPlan, count: u32) -> anyhow::Result<CallReport> {
    let uri: Uri = plan
        .url
        .parse()
        .with_context(|| format!("url {:?}", plan.url))?;
    let Some(host) = uri.host() else {
        bail!("url {:?} has no host", plan.url);
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.to_owned());
    let connect_to = match plan.proxy {
        Some(proxy) => proxy.to_string(),
        None => format!("{host}:{}", uri.port_u16().unwrap_or(80)),
    };
    let method: http::Method = plan.method.parse().context("method")?;
    let timeout = Duration::from_millis(plan.timeout_ms.unwrap_or(5000));

    let mut report = CallReport::default();
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    let mut connections = 0u32;
    for _ in 0..count {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match connect(&connect_to).await {
                Ok(s) => {
                    connections += 1;
                    sender = Some(s);
                }
                Err(_) => {
                    report.failed += 1;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected above");
        // Through a proxy: absolute-form target, as an HTTP proxy client sends it.
        let target = if plan.proxy.is_some() {
            uri.to_string()
        } else {
            uri.path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".to_owned())
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(target)
            .header(http::header::HOST, &authority);
        if let Some(caller) = &plan.caller {
            builder = builder.header(CALLER_HEADER, caller);
        }
        for (k, v) in &plan.headers {
            builder = builder.header(k, v);
        }
        let request = builder.body(Empty::new()).context("building request")?;
        let sent = std::time::Instant::now();
        let outcome = tokio::time::timeout(timeout, async {
            let _ = s.ready().await;
            let response = s.send_request(request).await?;
            let status = response.status().as_u16();
            let mesh_error = response
                .headers()
                .get(MESH_ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, mesh_error, retry_after, body))
        })
        .await;
        match outcome {
            Ok(Ok((status, mesh_error, retry_after, body))) => {
                report.answered_in(sent.elapsed());
                *report.statuses.entry(status).or_default() += 1;
                if let Some(value) = retry_after {
                    *report.retry_after.entry(value).or_default() += 1;
                }
                if let Some(reason) = mesh_error {
                    *report.mesh_errors.entry(reason).or_default() += 1;
                } else if let Ok(reply) = serde_json::from_slice::<EchoReply>(&body) {
                    let key = format!("{}/{}", reply.service, reply.version);
                    *report.by_responder.entry(key).or_default() += 1;
                }
            }
            Ok(Err(_)) | Err(_) => {
                report.failed += 1;
                sender = None;
            }
        }
    }
    report.reconnects = connections.saturating_sub(1);
    Ok(report)
}

/// One keep-alive connection to a proxy, for requests sent one at a time with pauses in
/// between (e.g. to see a revocation reach an open connection).
#[derive(Debug)]
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    caller: String,
}

/// What one request on a [`Connection`] got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The `x-trellis-error` reason when the mesh answered itself.
    pub mesh_error: Option<String>,
    /// `service/version` when an echo app answered.
    pub responder: Option<String>,
}

impl Connection {
    /// Connects to the proxy at `proxy`; requests name themselves as `caller`.
    pub async fn open(proxy: SocketAddr, caller: &str) -> anyhow::Result<Self> {
        Ok(Self {
            sender: connect(&proxy.to_string()).await?,
            caller: caller.to_owned(),
        })
    }

    /// Sends `method url` (absolute-form, through the proxy) on this connection. Fails when the
    /// connection was closed: it never reconnects.
    pub async fn send(&mut self, method: &str, url: &str) -> anyhow::Result<Answer> {
        if self.sender.is_closed() {
            bail!("the keep-alive connection was closed");
        }
        let uri: Uri = url.parse().with_context(|| format!("url {url:?}"))?;
        let authority = uri.authority().context("url without host")?.to_string();
        let request = Request::builder()
            .method(method.parse::<http::Method>().context("method")?)
            .uri(uri)
            .header(http::header::HOST, authority)
            .header(CALLER_HEADER, &self.caller)
            .body(Empty::new())
            .context("building request")?;
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let status = response.status().as_u16();
            let mesh_error = response
                .headers()
                .get(MESH_ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response.into_body().collect().await?.to_bytes();
            let responder = serde_json::from_slice::<EchoReply>(&body)
                .ok()
                .map(|r| format!("{}/{}", r.service, r.version));
            Ok::<_, hyper::Error>(Answer {
                status,
                mesh_error,
                responder,
            })
        })
        .await
        .context("no answer within 5 s")?
        .context("request on the keep-alive connection")?;
        Ok(answer)
    }
}

async fn connect(
    addr: &str,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
