//! Opaque TCP: split per connection (weights), balance, connect (mTLS towards endpoints with an
//! identity), copy bytes both ways. Inbound connections are re-authorized whenever the policy
//! changes and closed at once when it no longer allows them.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::authz::{Caller, Verdict};
use crate::metrics::{Label, TcpLabels};
use crate::observe::{Counted, Direction, TcpPending};
use crate::state::Shared;
use crate::table::Lookup;
use crate::tls::Alpn;

/// Forward an outbound connection to `destination` (an authority).
/// `first_byte`: the client has sent nothing yet and must within this long.
pub async fn forward_outbound<IO>(
    shared: Arc<Shared>,
    destination: &str,
    client: IO,
    first_byte: Option<Duration>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // Access log / tap: None (and a plain pass-through wrapper) when nobody listens; the
    // record is emitted when `rec` drops, at the connection's end.
    let mut rec = shared
        .observe
        .begin_tcp(Direction::Outbound, destination, None);
    let mut client = Counted::new(client, rec.as_ref().map(|r| r.tally()));
    let dest = {
        let table = shared.routes.table.load();
        match table.lookup(destination) {
            Lookup::Found(d) => Some(d),
            _ => None,
        }
    };
    let dest = match dest {
        Some(d) => d,
        None => {
            if let Some(resolver) = &shared.routes.resolver
                && let Ok(a) = trellis_proxy_api::authority::normalize(destination)
            {
                resolver.resolve(&a.key()).await;
            }
            let table = shared.routes.table.load();
            match table.lookup(destination) {
                Lookup::Found(d) => d,
                _ => {
                    tracing::info!(destination, "closing TCP connection: unknown destination");
                    count(
                        &mut rec,
                        &shared,
                        Label::from(destination),
                        Label::from(""),
                        "unknown-destination",
                    );
                    return;
                }
            }
        }
    };
    // Outside the mesh: this proxy must be allowed and the port declared ([`crate::external`]).
    let outside = match &dest.external {
        Some(external) => {
            let own = shared.identity.current();
            let port = trellis_proxy_api::authority::normalize(destination)
                .ok()
                .and_then(|a| a.port)
                .unwrap_or(0);
            match external.check(own.as_ref().map(|g| &*g.identity_label), port) {
                Ok(port) => Some((external, port)),
                Err(why) => {
                    tracing::info!(destination, "closing TCP connection: {why}");
                    count(
                        &mut rec,
                        &shared,
                        dest.label.clone(),
                        Label::from(""),
                        "egress-forbidden",
                    );
                    return;
                }
            }
        }
        None => None,
    };
    let Some(backend) = dest.route_connection() else {
        count(
            &mut rec,
            &shared,
            dest.label.clone(),
            Label::from(""),
            "no-backends",
        );
        return;
    };
    let Some(endpoint) = backend.pick() else {
        count(
            &mut rec,
            &shared,
            dest.label.clone(),
            backend.name.clone(),
            "no-endpoints",
        );
        return;
    };
    if let Some(r) = &rec {
        r.tally().choose(
            endpoint.authority.as_str(),
            endpoint.identity.as_deref(),
            Some((
                backend.workload.namespace.as_str(),
                backend.workload.name.as_str(),
            )),
        );
    }
    let in_flight = endpoint.stats.start();
    let address = match outside {
        Some((_, port)) => crate::external::endpoint_authority(&endpoint.authority, port),
        None => Some(endpoint.authority.clone()),
    };
    let Some(address) = address else {
        count(
            &mut rec,
            &shared,
            dest.label.clone(),
            backend.name.clone(),
            "connect-failed",
        );
        return;
    };
    let connect = TcpStream::connect(address.as_str());
    let upstream = match tokio::time::timeout(shared.limits.connect_timeout(), connect).await {
        Ok(Ok(s)) => s,
        _ => {
            in_flight.record_failure(
                crate::balance::Outcome::ConnectFailure,
                dest.ejection_counts,
            );
            count(
                &mut rec,
                &shared,
                dest.label.clone(),
                backend.name.clone(),
                "connect-failed",
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let idle = shared.limits.tcp_idle_timeout();
    // TLS this proxy originates to an outside server (the application speaks plaintext), mTLS
    // to a mesh endpoint with an identity, or the bytes as they are.
    let origin = match outside {
        Some((
            external,
            crate::config::ExternalPort {
                originate_tls_port: Some(_),
                ..
            },
        )) => Some(external.origin(Alpn::None)),
        _ => None,
    };
    let expected = endpoint
        .identity
        .as_deref()
        .filter(|_| shared.identity.is_configured() && outside.is_none());
    let timeout = shared.limits.tls_handshake_timeout();
    let upstream = match (origin, expected) {
        (Some(Some((config, server_name))), _) => {
            crate::tls::originate(&config, server_name, &shared.metrics, upstream, timeout)
                .await
                .map(|tls| Upstream::Tls(Box::new(tls)))
        }
        (Some(None), _) => Err(crate::tls::TlsError::Handshake(std::io::Error::other(
            "no TLS configuration for the outside server",
        ))),
        (None, Some(expected)) => crate::tls::connect(
            &shared.identity,
            &shared.metrics,
            expected,
            endpoint.authority.as_str(),
            upstream,
            Alpn::None,
            timeout,
        )
        .await
        .map(|tls| Upstream::Tls(Box::new(tls))),
        (None, None) => Ok(Upstream::Plain(upstream)),
    };
    let ended = match upstream {
        Ok(upstream) => {
            count(
                &mut rec,
                &shared,
                dest.label.clone(),
                backend.name.clone(),
                "",
            );
            match upstream {
                Upstream::Plain(mut tcp) => {
                    copy_with_idle_timeout(&mut client, &mut tcp, idle, first_byte).await
                }
                Upstream::Tls(mut tls) => {
                    copy_with_idle_timeout(&mut client, &mut *tls, idle, first_byte).await
                }
            }
        }
        Err(e) => {
            tracing::info!(destination = %dest.key, endpoint = %address, error = %e, "closing TCP connection: TLS to the endpoint failed");
            count(
                &mut rec,
                &shared,
                dest.label.clone(),
                backend.name.clone(),
                e.reason(),
            );
            return;
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "TCP connection ended with an error");
    }
}

/// An upstream connection as made: plain TCP, or TLS over it (mTLS to a mesh endpoint, or TLS
/// originated to an outside server).
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Forward an (authorized) inbound connection to the local application, for as long as the
/// policy keeps allowing `caller`. `first_byte`: the client has sent nothing yet and must
/// within this long.
pub async fn forward_inbound<IO>(
    shared: Arc<Shared>,
    app: std::net::SocketAddr,
    caller: &Caller,
    client: IO,
    first_byte: Option<Duration>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut rec = shared
        .observe
        .begin_tcp(Direction::Inbound, &app.to_string(), Some(caller));
    let mut client = Counted::new(client, rec.as_ref().map(|r| r.tally()));
    let connect = TcpStream::connect(app);
    let mut upstream = match tokio::time::timeout(shared.limits.connect_timeout(), connect).await {
        Ok(Ok(s)) => s,
        _ => {
            if let Some(r) = &mut rec {
                r.error("connect-failed");
            }
            shared.metrics.tcp(&TcpLabels {
                direction: Label::from("inbound"),
                destination: Label::from(""),
                backend: Label::from(""),
                error: Label::from("connect-failed"),
            });
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    shared.metrics.tcp(&TcpLabels {
        direction: Label::from("inbound"),
        destination: Label::from(""),
        backend: Label::from(""),
        error: Label::from(""),
    });
    let mut changes = shared.routes.table_changes.subscribe();
    tokio::select! {
        _ = copy_with_idle_timeout(&mut client, &mut upstream, shared.limits.tcp_idle_timeout(), first_byte) => {}
        () = revoked(&shared, caller, &mut changes) => {
            tracing::info!(peer = %caller.peer, identity = ?caller.identity, "closing inbound TCP connection: the policy no longer allows it");
            if let Some(r) = &mut rec {
                r.error("forbidden");
            }
        }
    }
}

/// Resolves when a policy change no longer allows `caller`'s connection.
async fn revoked(
    shared: &Shared,
    caller: &Caller,
    changes: &mut tokio::sync::watch::Receiver<u64>,
) {
    // Checked once at once too: a change between the first authorization and the subscription
    // must not be missed.
    loop {
        let allowed = {
            let table = shared.routes.table.load();
            caller.policy_in(&table).is_some_and(|policy| {
                shared.authorizer.authorize_connection(policy, caller) == Verdict::Allow
            })
        };
        if !allowed {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

fn count(
    rec: &mut Option<TcpPending>,
    shared: &Shared,
    destination: Label,
    backend: Label,
    error: &str,
) {
    if let Some(r) = rec {
        r.error(error);
    }
    shared.metrics.tcp(&TcpLabels {
        direction: Label::from("outbound"),
        destination,
        backend,
        error: Label::from(error),
    });
}

/// Copy both ways until either side closes or nothing moves for `idle` (then both are closed).
/// With `first_from_a`, `a` must also send its first byte within that long (a silent client
/// kept alive only by the other side's bytes, e.g. a server greeting, is closed), and until it
/// does no copy buffers are allocated.
/// Used for opaque TCP and for upgraded (101) HTTP connections.
pub async fn copy_with_idle_timeout<A, B>(
    a: A,
    b: B,
    idle: Duration,
    first_from_a: Option<Duration>,
) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Arc::new(activity::Clock::new());
    let mut a = activity::Tracked::new(a, Arc::clone(&clock));
    let mut b = activity::Tracked::new(b, Arc::clone(&clock));
    if let Some(bound) = first_from_a {
        let deadline = tokio::time::Instant::now() + bound;
        match tokio::time::timeout_at(deadline, until_first_byte(&mut a, &mut b)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::debug!(
                    ?bound,
                    "closing opaque TCP connection: the client never sent a byte"
                );
                return Ok(());
            }
        }
    }
    tokio::select! {
        done = tokio::io::copy_bidirectional(&mut a, &mut b) => done.map(|_| ()),
        () = clock.idle_for(idle) => {
            tracing::debug!(?idle, "closing idle TCP connection");
            Ok(())
        }
    }
}

/// While the client `a` has said nothing: relay what `b` sends (a server-first greeting) through
/// a small buffer, and forward the client's first bytes. Returns true once the client spoke,
/// false when either side closed. Silent clients thus hold 1 KiB here instead of the two 8 KiB
/// buffers of `copy_bidirectional` (a flood of them cost ~15 KB each).
async fn until_first_byte<A, B>(a: &mut A, b: &mut B) -> std::io::Result<bool>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut from_client = [0u8; 512];
    let mut from_server = [0u8; 512];
    loop {
        // Both reads are cancel safe: the one not chosen has read nothing.
        tokio::select! {
            n = a.read(&mut from_client) => {
                let n = n?;
                if n == 0 {
                    return Ok(false);
                }
                b.write_all(&from_client[..n]).await?;
                return Ok(true);
            }
            n = b.read(&mut from_server) => {
                let n = n?;
                if n == 0 {
                    return Ok(false);
                }
                a.write_all(&from_server[..n]).await?;
            }
        }
    }
}

mod activity {
    //! Last-activity tracking for idle timeouts (one atomic store per successful read/write).
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::time::Instant;

    #[derive(Debug)]
    pub struct Clock {
        epoch: Instant,
        last_millis: AtomicU64,
    }

    impl Clock {
        pub fn new() -> Self {
            Clock {
                epoch: Instant::now(),
                last_millis: AtomicU64::new(0),
            }
        }

        fn touch(&self) {
            self.last_millis
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }

        /// Resolves once nothing was touched for `idle`.
        pub async fn idle_for(&self, idle: Duration) {
            loop {
                let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
                let deadline = self.epoch + last + idle;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        }
    }

    #[derive(Debug)]
    pub struct Tracked<T> {
        inner: T,
        clock: Arc<Clock>,
    }

    impl<T> Tracked<T> {
        pub fn new(inner: T, clock: Arc<Clock>) -> Self {
            Tracked { inner, clock }
        }
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                this.clock.touch();
            }
            polled
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
            if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
                this.clock.touch();
            }
            polled
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }
}
