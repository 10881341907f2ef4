//! The background tasks that keep each provider's keys current: one per provider, fetching a
//! URL on its interval (early on an unknown kid, with backoff after failures) or reloading a
//! file when it changes. Every result goes through [`KeyStore::apply`], so a bad document is
//! reported and the last good keys stay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use trellis_file_watch::FileWatch;

use crate::jwks::KeyStore;

/// How the key refresh tasks behave. The defaults suit production; tests shorten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshOptions {
    /// The first wait after a failed fetch; it doubles after each failure (with jitter).
    pub min_backoff: Duration,
    /// The longest wait after failures (also capped by the provider's refresh interval).
    pub max_backoff: Duration,
    /// The least time between two early refreshes caused by unknown kids (30 s).
    pub early_refresh_gap: Duration,
    /// One fetch's time limit, connection and body included.
    pub fetch_timeout: Duration,
    /// How often a JWKS file is looked at when no change event came (events are the usual way).
    pub file_poll: Duration,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            early_refresh_gap: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
            file_poll: Duration::from_secs(2),
        }
    }
}

/// The largest JWKS accepted: real ones are a few kilobytes.
const MAX_JWKS_BYTES: usize = 1 << 20;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

fn https_client() -> std::io::Result<HttpsClient> {
    // ring explicitly: the workspace's one crypto provider, whatever the process default is.
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

async fn fetch(client: &HttpsClient, url: &http::Uri, timeout: Duration) -> Result<Bytes, String> {
    let request = http::Request::get(url.clone())
        .header(
            http::header::ACCEPT,
            "application/json, application/jwk-set+json",
        )
        .header(http::header::USER_AGENT, "trellis-jwt")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let work = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// The error and its causes, for a message that says why a connection failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Fetches `url` now, then every `interval`, early when asked, with backoff after failures.
pub(crate) async fn run_url(
    store: Arc<KeyStore>,
    url: http::Uri,
    interval: Duration,
    options: RefreshOptions,
) {
    let client = match https_client() {
        Ok(client) => client,
        Err(e) => {
            // No root certificates: nothing can be fetched, ever. Fail closed and say why.
            store.fail(format!("no TLS root certificates for {url}: {e}"));
            return;
        }
    };
    let new_backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(options.min_backoff)
            .with_max_delay(options.max_backoff.min(interval))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = new_backoff();
    loop {
        let outcome = match fetch(&client, &url, options.fetch_timeout).await {
            Ok(bytes) => store.apply(&bytes).map_err(|_| ()),
            Err(e) => {
                store.fail(format!("JWKS from {url}: {e}"));
                Err(())
            }
        };
        let wait = match outcome {
            Ok(()) => {
                backoff = new_backoff();
                interval
            }
            Err(()) => backoff.next().unwrap_or(options.max_backoff),
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = store.refresh_now.notified() => {}
        }
    }
}

/// Loads `path` into the store (a failure keeps the set in force).
pub(crate) fn load_file(store: &KeyStore, path: &std::path::Path) {
    match std::fs::read(path) {
        Ok(bytes) => {
            let _ = store.apply(&bytes);
        }
        Err(e) => store.fail(format!("JWKS from {}: {e}", path.display())),
    }
}

/// Loads the file again whenever it changes.
pub(crate) async fn run_file(store: Arc<KeyStore>, path: PathBuf, mut watch: FileWatch) {
    loop {
        // A file written in two steps changes twice: the second change reads it complete.
        watch.changed().await;
        let load = path.clone();
        let store2 = Arc::clone(&store);
        // File reads are blocking: keep them off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || load_file(&store2, &load)).await;
    }
}
