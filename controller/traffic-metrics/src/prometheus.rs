//! The Prometheus HTTP API client of Trellis: instant queries (`GET /api/v1/query`) over plain
//! HTTP/1.1, one connection per query. The controller's TrafficMetrics API and the CLI's `trellis
//! stat`, `top` and `edges` all query through it.
//!
//! Errors keep apart what an API answer needs to tell apart: Prometheus unreachable (the
//! TrafficMetrics API answers 503) and Prometheus refusing a query (500; a bug in the query).

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// How long one query may take, connection included.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The URL is not `http://HOST:PORT`, or its host does not resolve.
    #[error("--prometheus {url:?}: {why}")]
    Address { url: String, why: String },
    /// No HTTP answer (refused, reset, timed out).
    #[error("querying Prometheus at {addr}: {why}")]
    Unreachable { addr: SocketAddr, why: String },
    /// An answer that is not a successful query result.
    #[error("Prometheus at {addr} refused {promql:?}: {why}")]
    Refused {
        addr: SocketAddr,
        promql: String,
        why: String,
    },
}

impl QueryError {
    /// Whether the cause is reaching Prometheus (rather than the query).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Address { .. } | Self::Unreachable { .. })
    }
}

/// The Prometheus address of `url` (`http://HOST:PORT`, a trailing `/` allowed), resolved now.
pub fn address(url: &str) -> Result<SocketAddr, QueryError> {
    let bad = |why: String| QueryError::Address {
        url: url.to_owned(),
        why,
    };
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(bad("expected http://HOST:PORT".into()));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(bad("expected http://HOST:PORT (no path)".into()));
    }
    authority
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve {authority}: {e}")))?
        .next()
        .ok_or_else(|| bad(format!("no address for {authority}")))
}

/// An instant query's vector: each element's labels and value (NaN kept: `histogram_quantile`
/// of no requests is NaN, which callers show as "no value").
pub async fn query(prometheus: SocketAddr, promql: &str) -> Result<Vec<(Value, f64)>, QueryError> {
    let encoded: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
    let path = format!("/api/v1/query?query={encoded}");
    let unreachable = |why: String| QueryError::Unreachable {
        addr: prometheus,
        why,
    };
    let (status, body) = tokio::time::timeout(QUERY_TIMEOUT, get(prometheus, &path))
        .await
        .map_err(|_| unreachable(format!("no answer within {QUERY_TIMEOUT:?}")))?
        .map_err(unreachable)?;
    let refused = |why: String| QueryError::Refused {
        addr: prometheus,
        promql: promql.to_owned(),
        why,
    };
    let body: Value = serde_json::from_slice(&body).map_err(|_| {
        refused(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        ))
    })?;
    if body["status"] != "success" {
        return Err(refused(format!("HTTP {status}: {}", body["error"])));
    }
    Ok(vector(&body))
}

/// The elements of a `{"status":"success","data":{"resultType":"vector",...}}` answer.
pub fn vector(body: &Value) -> Vec<(Value, f64)> {
    body["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let value = r["value"][1].as_str()?.parse::<f64>().ok()?;
            Some((r["metric"].clone(), value))
        })
        .collect()
}

/// One GET on its own connection: status and body.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prometheus_address_must_be_http_host_port() {
        assert!(address("https://p:9090").is_err());
        assert!(address("http://127.0.0.1:9090/api").is_err());
        assert_eq!(
            address("http://127.0.0.1:9090/").unwrap(),
            "127.0.0.1:9090".parse().unwrap()
        );
        assert!(address("ftp://x").unwrap_err().is_unreachable());
    }

    #[test]
    fn a_vector_keeps_labels_and_nan() {
        let body = serde_json::json!({"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"a":"1"},"value":[1.0,"2.5"]},
            {"metric":{"a":"2"},"value":[1.0,"NaN"]},
            {"metric":{"a":"3"},"value":[1.0,"not a number"]}
        ]}});
        let v = vector(&body);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0["a"], "1");
        assert_eq!(v[0].1, 2.5);
        assert!(v[1].1.is_nan());
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = query(port, "up").await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }
}
