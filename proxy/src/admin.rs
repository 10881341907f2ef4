//! The admin listener: `/metrics` (Prometheus text), `/ready`, `/live`, `/config` (JSON of the
//! configuration currently in force), `/identity` (JSON: the workload identity and its validity;
//! never the key), `/connections` (JSON: open connections by listener kind, the global limit,
//! refusals by listener kind and reason), `/app-probe/<container>/<kind>` (the app's own probes,
//! run from inside the pod: [`crate::app_probe`]), `/tap?...` (a live stream of finished
//! requests as JSON lines, loopback callers only: [`crate::observe::tap`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app_probe::{self, AppProbes};
use crate::shutdown::stopped;
use crate::state::Shared;

/// Serve the admin endpoints until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    app_probes: Arc<AppProbes>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = stopped(&mut shutdown) => return,
        };
        let (stream, peer) = stream;
        let shared = Arc::clone(&shared);
        let registry = Arc::clone(&registry);
        let app_probes = Arc::clone(&app_probes);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                // App probes wait on the app; everything else answers at once.
                let is_probe = req.uri().path().starts_with(app_probe::PATH_PREFIX)
                    && (req.method() == Method::GET || req.method() == Method::HEAD);
                let work = if is_probe {
                    Err((Arc::clone(&app_probes), req.uri().path().to_owned()))
                } else if req.uri().path() == "/tap" && req.method() == Method::GET {
                    Ok(crate::observe::tap::answer(
                        &shared.observe,
                        peer,
                        req.uri().query().unwrap_or(""),
                    ))
                } else {
                    Ok(answer(&shared, &registry, &req).map(BodyExt::boxed))
                };
                async move {
                    Ok::<_, Infallible>(match work {
                        Ok(response) => response,
                        Err((probes, path)) => {
                            app_probe::answer(&probes, &path).await.map(BodyExt::boxed)
                        }
                    })
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(shared: &Shared, registry: &Registry, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => match shared.not_ready().as_slice() {
            [] => text(StatusCode::OK, "ready\n".into()),
            why => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", why.join(", ")),
            ),
        },
        "/metrics" => {
            let mut resp = text(StatusCode::OK, crate::metrics::render(registry));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/config" => {
            // Assembled now from the base and each destination's source: no whole copy is
            // kept per update.
            let config = shared.routes.table.load().config();
            match serde_json::to_string_pretty(&config) {
                Ok(json) => {
                    let mut resp = text(StatusCode::OK, json + "\n");
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "/connections" => {
            let mut resp = text(StatusCode::OK, connections_json(shared) + "\n");
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        "/identity" => {
            let mut resp = text(StatusCode::OK, identity_json(shared) + "\n");
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin endpoints: /metrics /ready /live /config /identity /connections /tap /app-probe/...\n".into(),
        ),
    }
}

/// `{"open", "max", "by_listener": {kind: n}, "inbound_sources", "refused": {kind: {reason: n}}}`:
/// client connections open now, the global limit, source IPs with open inbound connections,
/// and every connection refused since start by listener kind and reason.
fn connections_json(shared: &Shared) -> String {
    let c = &shared.connections;
    let by_listener: serde_json::Map<String, serde_json::Value> = c
        .by_listener()
        .map(|(kind, n)| (kind.to_string(), n.into()))
        .collect();
    let mut refused = serde_json::Map::new();
    for ((kind, reason), n) in c.refused() {
        let entry = refused
            .entry(kind.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[reason] = n.into();
    }
    serde_json::json!({
        "open": c.count(),
        "max": c.max(),
        "by_listener": by_listener,
        "inbound_sources": shared.sources.sources(),
        "refused": refused,
    })
    .to_string()
}

/// `{"configured", "id", "valid", "not_before", "not_after", "anchors"}` (times in Unix seconds).
fn identity_json(shared: &Shared) -> String {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let latest = shared.identity.latest();
    let value = match &latest {
        Some(g) => {
            let c = &g.credentials;
            serde_json::json!({
                "configured": shared.identity.is_configured(),
                "id": c.id.to_string(),
                "valid": c.valid_at(std::time::SystemTime::now()),
                "not_before": unix(c.not_before),
                "not_after": unix(c.not_after),
                "anchors": c.anchors.len(),
            })
        }
        None => serde_json::json!({
            "configured": shared.identity.is_configured(),
            "id": null,
            "valid": false,
        }),
    };
    value.to_string()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
