//! The process-wide stop signal every long-running task watches: a `watch` of a bool that turns
//! true once, when the proxy drains and stops.

use tokio::sync::watch;

/// Resolves when `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
