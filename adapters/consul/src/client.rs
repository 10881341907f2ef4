//! A small typed client for the two Consul endpoints the adapter reads, over hyper's pooled
//! client. Blocking queries get a timeout longer than Consul may hold them (`wait` plus Consul's
//! up-to-wait/16 jitter plus a margin), so the client never gives up on a query Consul is still
//! legitimately holding.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use trellis_discovery::{DiscoveryError, ErrorKind, SourceId};

use crate::config::AclToken;
use crate::wire::{CatalogServices, HealthEntry};

/// A decoded response with Consul's blocking-query metadata.
#[derive(Debug)]
pub(crate) struct Reply<T> {
    pub value: T,
    pub index: u64,
    pub known_leader: bool,
    pub last_contact: Duration,
    pub filtered_by_acls: bool,
}

/// Why a request failed; every message names the URL (which never contains the token).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot reach {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url}: reading the response failed: {source}")]
    Body {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}: no answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{url}: the response is not what Consul sends: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{url}: the response has no valid X-Consul-Index header")]
    NoIndex { url: String },
}

impl ClientError {
    pub(crate) fn into_discovery(self, source: &SourceId) -> DiscoveryError {
        let (kind, temporary) = match &self {
            Self::Transport { .. } | Self::Body { .. } | Self::Timeout { .. } => {
                (ErrorKind::Unavailable, true)
            }
            // 403: "ACL not found" (unknown token) or "Permission denied" (missing policy).
            Self::Status { status, .. } if *status == StatusCode::FORBIDDEN => {
                (ErrorKind::Unauthorized, false)
            }
            // The configured `dc` does not exist: fix the configuration.
            Self::Status { body, .. } if body.contains("No path to datacenter") => {
                (ErrorKind::Config, false)
            }
            // 5xx includes 500 "No cluster leader"; 429 is Consul's rate limiter.
            Self::Status { status, .. }
                if status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS =>
            {
                (ErrorKind::Unavailable, true)
            }
            Self::Status { .. } => (ErrorKind::Other, false),
            Self::Decode { .. } | Self::NoIndex { .. } => (ErrorKind::InvalidData, true),
        };
        let message = self.to_string();
        DiscoveryError::new(kind, temporary, source.clone(), message).with_cause(self)
    }
}

/// Percent-encodes one path segment (service names are DNS-like, but a name is data, not syntax).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug)]
pub(crate) struct ConsulClient {
    http: Client<HttpConnector, Empty<Bytes>>,
    base: Uri,
    token: Option<AclToken>,
    datacenter: Option<String>,
    stale: bool,
    request_timeout: Duration,
}

/// Blocking parameters: wait for the index to pass `index`, at most `wait`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub index: u64,
    pub wait: Duration,
}

impl ConsulClient {
    pub(crate) fn new(
        base: Uri,
        token: Option<AclToken>,
        datacenter: Option<String>,
        stale: bool,
        request_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            http,
            base,
            token,
            datacenter,
            stale,
            request_timeout,
        }
    }

    /// `GET /v1/health/service/:name`: every instance, whatever its checks say (no `passing`).
    pub(crate) async fn health_service(
        &self,
        name: &str,
        ns: Option<&str>,
        block: Option<Block>,
    ) -> Result<Reply<Vec<HealthEntry>>, ClientError> {
        let path = format!("/v1/health/service/{}", encode_segment(name));
        self.get(&path, ns, block).await
    }

    /// `GET /v1/catalog/services`.
    pub(crate) async fn catalog_services(
        &self,
        ns: Option<&str>,
        block: Option<Block>,
    ) -> Result<Reply<CatalogServices>, ClientError> {
        self.get("/v1/catalog/services", ns, block).await
    }

    fn url(&self, path: &str, ns: Option<&str>, block: Option<Block>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(dc) = &self.datacenter {
            query.append_pair("dc", dc);
        }
        if let Some(ns) = ns {
            query.append_pair("ns", ns);
        }
        if self.stale {
            query.append_key_only("stale");
        }
        if let Some(b) = block {
            query.append_pair("index", &b.index.to_string());
            query.append_pair("wait", &format!("{}ms", b.wait.as_millis()));
        }
        let query = query.finish();
        let authority = self.base.authority().map_or("", |a| a.as_str());
        if query.is_empty() {
            format!("http://{authority}{path}")
        } else {
            format!("http://{authority}{path}?{query}")
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        ns: Option<&str>,
        block: Option<Block>,
    ) -> Result<Reply<T>, ClientError> {
        let url = self.url(path, ns, block);
        // Consul may hold a blocking query for wait + wait/16; give it that and a margin.
        let timeout = match block {
            Some(b) => b.wait + b.wait / 16 + self.request_timeout,
            None => self.request_timeout,
        };
        match tokio::time::timeout(timeout, self.fetch(&url)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                url,
                after: timeout,
            }),
        }
    }

    async fn fetch<T: DeserializeOwned>(&self, url: &str) -> Result<Reply<T>, ClientError> {
        let mut request = Request::get(url)
            .body(Empty::new())
            .expect("a URL built from a validated base and encoded parts");
        if let Some(token) = &self.token
            && let Ok(mut value) = HeaderValue::from_str(token.expose())
        {
            value.set_sensitive(true);
            request.headers_mut().insert("x-consul-token", value);
        }
        let response =
            self.http
                .request(request)
                .await
                .map_err(|source| ClientError::Transport {
                    url: url.to_owned(),
                    source,
                })?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|source| ClientError::Body {
                url: url.to_owned(),
                source,
            })?
            .to_bytes();
        if !parts.status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(ClientError::Status {
                url: url.to_owned(),
                status: parts.status,
                body: text.trim().chars().take(300).collect(),
            });
        }
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let index = header("x-consul-index")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ClientError::NoIndex {
                url: url.to_owned(),
            })?;
        let value = serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
            url: url.to_owned(),
            source,
        })?;
        Ok(Reply {
            value,
            index,
            known_leader: header("x-consul-knownleader") != Some("false"),
            last_contact: Duration::from_millis(
                header("x-consul-lastcontact")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
            filtered_by_acls: header("x-consul-results-filtered-by-acls") == Some("true"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_names_and_parameters() {
        let c = ConsulClient::new(
            "http://127.0.0.1:8500".parse().unwrap(),
            Some(AclToken::new("secret")),
            Some("dc 2".into()),
            true,
            Duration::from_secs(1),
        );
        let block = Some(Block {
            index: 42,
            wait: Duration::from_secs(60),
        });
        let url = c.url(
            &format!("/v1/health/service/{}", encode_segment("web/../x y")),
            Some("team-a"),
            block,
        );
        assert_eq!(
            url,
            "http://127.0.0.1:8500/v1/health/service/web%2F..%2Fx%20y?dc=dc+2&ns=team-a&stale&index=42&wait=60000ms"
        );
        assert!(!url.contains("secret"));
    }
}
