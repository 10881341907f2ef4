//! Reading the controller's `/api/v1/state` for `trellis check` and `trellis get`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

/// GETs `http://ADMIN/api/v1/state` (5 s timeout) and parses it.
pub fn fetch_state(admin: SocketAddr) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            let stream = tokio::net::TcpStream::connect(admin)
                .await
                .with_context(|| format!("connecting to {admin}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let request = hyper::Request::get("/api/v1/state")
                .header(hyper::header::HOST, admin.to_string())
                .body(Empty::<bytes::Bytes>::new())?;
            let response = sender.send_request(request).await?;
            anyhow::ensure!(
                response.status().is_success(),
                "{} answered {}",
                admin,
                response.status()
            );
            let body = response.into_body().collect().await?.to_bytes();
            serde_json::from_slice(&body).context("parsing the state JSON")
        })
        .await
        .with_context(|| format!("no answer from {admin} within 5 s"))?
    })
}

/// The array `state[key]` (empty when absent).
pub fn list<'a>(state: &'a Value, key: &str) -> Vec<&'a Value> {
    state[key]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

/// A JSON string without quotes (other values as JSON).
pub fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}
