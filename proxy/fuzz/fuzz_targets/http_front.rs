//! Fuzz the HTTP front: arbitrary bytes go through detection into the proxy's HTTP/1 or
//! HTTP/2 server (with the production limits) over an in-memory pipe. The destination points at
//! a closed port, so nothing leaves the process. Must never panic or hang.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use trellis_proxy::authz::PolicyAuthorizer;
use trellis_proxy::config::Config;
use trellis_proxy::detect::{Detected, PrefixedIo, read_prefix};
use trellis_proxy::http::Side;
use trellis_proxy::server::{serve_http1, serve_http2};
use trellis_proxy::state::Shared;

const CONFIG: &str = "destinations:\n  - authority: echo.default\n    routes:\n      - path_regex: \"/api/.*\"\n        headers: {x-user: \"beta.*\"}\n    backends:\n      - name: v1\n        endpoints: [{address: \"127.0.0.1:9\"}]\nlimits:\n  header_read_timeout_ms: 50\n  detect_timeout_ms: 50\n  connect_timeout_ms: 10\n";

fn shared() -> Arc<Shared> {
    static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let config = Config::parse(CONFIG, std::path::Path::new("fuzz.yaml")).unwrap();
            let mut registry = prometheus_client::registry::Registry::default();
            Arc::new(Shared::new(&config, &mut registry, Arc::new(PolicyAuthorizer), None).unwrap())
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let shared = shared();
    // A runtime per input: dropping it cancels every task the input started, so nothing
    // outlives the run (LeakSanitizer stays quiet) and inputs cannot affect each other.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let writer = async move {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Keep reading so the server never blocks on a full pipe.
            let _ = tokio::io::copy(&mut client, &mut tokio::io::sink()).await;
        };
        let limits = shared.limits.clone();
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let serve = async move {
            let Ok((detected, prefix)) = read_prefix(&mut server, limits.detect_timeout()).await
            else {
                return;
            };
            let io = PrefixedIo::new(prefix, server);
            let side = Side::Outbound { fixed: None };
            match detected {
                Detected::Http2 => serve_http2(io, side, shared, &limits, stop).await,
                _ => serve_http1(io, side, shared, &limits, stop).await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(writer, serve)
        })
        .await;
    });
});
