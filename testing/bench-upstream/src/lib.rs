//! The small upstream of the proxy benchmark (`scripts/bench/proxy`).
//!
//! [`serve`] answers every request on a listener with `200 OK` and the same small body, over
//! HTTP/1.1 (keep-alive) or HTTP/2 with prior knowledge (h2c), detected per connection by
//! hyper-util's `auto` builder. The request body is read to the end before answering so that
//! uploads through a proxy are paced like a real application would pace them. There is no
//! routing, no logging and no allocation per request beyond what hyper needs: the benchmark
//! measures the proxy in front of this server, so the server should cost as little as possible
//! and the same for every target.
//!
//! [`udp`] is the UDP benchmark's (`scripts/bench/udp`) echo application and load generator.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub mod udp;

/// The body every response carries: small, like a health check or a tiny JSON answer.
pub const DEFAULT_BODY: &[u8] = b"hello from trellis-bench-upstream\n";

/// Accepts connections on `listener` forever, answering every request with `body`.
///
/// Each connection runs on its own task; a connection that fails (client reset, garbage) ends
/// that connection only.
pub async fn serve(listener: TcpListener, body: Bytes) -> std::io::Result<()> {
    loop {
        let (stream, _peer) = listener.accept().await?;
        // Small responses must leave at once, not wait for Nagle's timer.
        stream.set_nodelay(true)?;
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(answer(request, body).await) }
            });
            // Errors here are a peer going away mid-connection: nothing to report in a benchmark.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Drains the request body, then answers `200 OK` with the fixed body.
async fn answer(request: Request<Incoming>, body: Bytes) -> Response<Full<Bytes>> {
    // A body that fails mid-read still gets an answer: the proxy under test decides what to do.
    let _ = request.into_body().collect().await;
    Response::builder()
        .header("content-type", "text/plain")
        .body(Full::new(body))
        .expect("a static status and header always build a response")
}
