//! Opaque TCP: split per connection (weights), balance, connect, copy bytes both ways.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::metrics::{Label, TcpLabels};
use crate::state::Shared;
use crate::table::Lookup;

/// Forward an outbound connection to `destination` (an authority).
pub async fn forward_outbound<IO>(shared: Arc<Shared>, destination: &str, mut client: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let dest = {
        let table = shared.table.load();
        match table.lookup(destination) {
            Lookup::Found(d) => Some(Arc::clone(d)),
            _ => None,
        }
    };
    let dest = match dest {
        Some(d) => d,
        None => {
            if let Some(resolver) = &shared.resolver
                && let Ok(a) = trellis_proxy_api::authority::normalize(destination)
            {
                resolver.resolve(&a.key()).await;
            }
            let table = shared.table.load();
            match table.lookup(destination) {
                Lookup::Found(d) => Arc::clone(d),
                _ => {
                    tracing::info!(destination, "closing TCP connection: unknown destination");
                    count(
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
    let Some(backend) = dest.route_connection() else {
        count(&shared, dest.label.clone(), Label::from(""), "no-backends");
        return;
    };
    let Some(endpoint) = backend.pick() else {
        count(
            &shared,
            dest.label.clone(),
            backend.name.clone(),
            "no-endpoints",
        );
        return;
    };
    let _in_flight = endpoint.stats.start();
    let connect = TcpStream::connect(endpoint.authority.as_str());
    let mut upstream = match tokio::time::timeout(shared.limits.connect_timeout(), connect).await {
        Ok(Ok(s)) => s,
        _ => {
            count(
                &shared,
                dest.label.clone(),
                backend.name.clone(),
                "connect-failed",
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    count(&shared, dest.label.clone(), backend.name.clone(), "");
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "TCP connection ended with an error");
    }
}

/// Forward an (authorized) inbound connection to the local application.
pub async fn forward_inbound<IO>(shared: Arc<Shared>, app: std::net::SocketAddr, mut client: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connect = TcpStream::connect(app);
    let mut upstream = match tokio::time::timeout(shared.limits.connect_timeout(), connect).await {
        Ok(Ok(s)) => s,
        _ => {
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
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

fn count(shared: &Shared, destination: Label, backend: Label, error: &str) {
    shared.metrics.tcp(&TcpLabels {
        direction: Label::from("outbound"),
        destination,
        backend,
        error: Label::from(error),
    });
}
