//! The TCP connector under every upstream client, plaintext and mTLS: hyper's `HttpConnector`,
//! plus the circuit breaker's connection limit when the destination has one (a connection
//! holds its permit until it closes, so `maxConnections` counts what is really open, pooled
//! idle connections included).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::resilience::Breaker;
use crate::resilience::breaker::ConnectionPermit;

/// Opens TCP connections, within the breaker's connection limit when there is one.
#[derive(Debug, Clone)]
pub struct PlainConnector {
    http: HttpConnector,
    breaker: Option<Breaker>,
}

impl PlainConnector {
    /// `breaker`: limit connections with its `maxConnections` (and `maxPendingRequests`).
    pub fn new(http: HttpConnector, breaker: Option<Breaker>) -> Self {
        PlainConnector { http, breaker }
    }
}

/// Why a connection was not made.
pub type ConnectError = Box<dyn std::error::Error + Send + Sync>;

/// A connection that may have agreed on its protocol (TLS ALPN), for the upstream pools.
pub trait Negotiated {
    /// Whether the server chose HTTP/2 (`h2` in ALPN).
    fn negotiated_h2(&self) -> bool;
}

impl tower::Service<Uri> for PlainConnector {
    type Response = PlainStream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<PlainStream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let breaker = self.breaker.clone();
        Box::pin(async move {
            let permit = match &breaker {
                // Boxed as itself (not as a `Box<Overloaded>` inside the box), so
                // `find_cause` finds it in the client error's source chain.
                Some(b) => b
                    .connection()
                    .await
                    .map_err(|e| -> ConnectError { Box::new(e) })?,
                None => None,
            };
            let io = tower::Service::call(&mut http, uri).await?;
            Ok(PlainStream { io, permit })
        })
    }
}

/// A TCP connection, with its place under the breaker's connection limit.
#[derive(Debug)]
pub struct PlainStream {
    io: TokioIo<TcpStream>,
    permit: Option<ConnectionPermit>,
}

impl PlainStream {
    /// The socket and the permit (for a TLS layer on top, which must keep the permit).
    pub fn into_parts(self) -> (TcpStream, Option<ConnectionPermit>) {
        (self.io.into_inner(), self.permit)
    }
}

impl Negotiated for PlainStream {
    fn negotiated_h2(&self) -> bool {
        false
    }
}

impl hyper::rt::Read for PlainStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PlainStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
