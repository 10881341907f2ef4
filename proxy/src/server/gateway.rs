//! The gateway's listeners ([`crate::gateway`] holds its compiled configuration): the HTTPS
//! listener terminates TLS (certificate by SNI, bounded like inbound handshakes: the handshake
//! limit and timeout) and serves HTTP/1.1 or h2 by ALPN with the proxy's limits, each request
//! routed by its host through the outbound path; the redirect listener answers every request on
//! plain HTTP with `308 Permanent Redirect` to the same host and path over HTTPS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, LOCATION};
use http::{Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{serve_http1, serve_http2};
use crate::config::Limits;
use crate::gateway::Gateway;
use crate::http::ERROR_HEADER;
use crate::side::Side;
use crate::state::Shared;

/// Terminate TLS on `stream` and serve its requests into the mesh.
pub(crate) async fn serve_https(
    stream: TcpStream,
    peer: SocketAddr,
    gateway: Arc<Gateway>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let limits = shared.limits.clone();
    let deadline = tokio::time::Instant::now() + limits.tls_handshake_timeout();
    let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, shared.handshakes.acquire()).await
    else {
        shared.metrics.refused("handshake-limit");
        return;
    };
    let started = std::time::Instant::now();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&gateway.tls));
    let accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)).await;
    drop(permit);
    let tls = match accepted {
        Ok(Ok(tls)) => {
            shared.metrics.tls_handshake("gateway", started.elapsed());
            tls
        }
        Ok(Err(e)) => {
            // An unknown SNI name ends here too (`unrecognized_name`).
            tracing::debug!(%peer, error = %e, "gateway TLS handshake failed");
            shared
                .metrics
                .tls_error("gateway", crate::tls::io_reason(&e));
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "gateway TLS handshake timed out");
            shared.metrics.tls_error("gateway", "timeout");
            return;
        }
    };
    let side = Side::Outbound {
        fixed: None,
        gateway: Some(gateway),
    };
    if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
        Box::pin(serve_http2(tls, side, shared, &limits, shutdown)).await
    } else {
        Box::pin(serve_http1(tls, side, shared, &limits, shutdown)).await
    }
}

/// Answer every request on `stream` with a redirect to HTTPS on `https_port`.
pub(crate) async fn serve_redirect(
    stream: TcpStream,
    https_port: u16,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        std::future::ready(Ok::<_, std::convert::Infallible>(redirect(
            req.headers().get(HOST).and_then(|h| h.to_str().ok()),
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
            https_port,
        )))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = crate::shutdown::stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// The redirect of a request for `host` and `path` (400 without a usable host).
fn redirect(host: Option<&str>, path: &str, https_port: u16) -> Response<String> {
    // The host without its port (the HTTP listener's), then the HTTPS port unless 443.
    let name = host.map(crate::gateway::without_port);
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        let mut resp = Response::new("no Host header to redirect to\n".to_string());
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut()
            .insert(ERROR_HEADER, http::HeaderValue::from_static("no-authority"));
        return resp;
    };
    let location = if https_port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{https_port}{path}")
    };
    let mut resp = Response::new(String::new());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match http::HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_keep_host_and_path_and_name_the_https_port() {
        let r = redirect(Some("shop.example.com:8080"), "/cart?id=1", 8443);
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            r.headers()[LOCATION],
            "https://shop.example.com:8443/cart?id=1"
        );
        let r = redirect(Some("shop.example.com"), "/", 443);
        assert_eq!(r.headers()[LOCATION], "https://shop.example.com/");
        assert_eq!(redirect(None, "/", 443).status(), StatusCode::BAD_REQUEST);
    }
}
