//! Reloading the config file: on SIGHUP and when the file changes (polled every 500 ms; cheap,
//! and works on every filesystem, including ConfigMap symlink swaps). A bad edit is logged with
//! its file and line and the running configuration stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::config::Config;
use crate::server::stopped;
use crate::state::Shared;

/// How often the file's metadata is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Try to load and apply the file now. Returns whether the new config is in force.
pub fn reload_now(shared: &Shared, path: &Path) -> bool {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "config reload rejected; keeping the running configuration");
            shared.metrics.update("file", false);
            return false;
        }
    };
    let running = shared.table.load().config.clone();
    if config.admin != running.admin
        || config.outbound != running.outbound
        || listeners_differ(&config, &running)
    {
        tracing::warn!("listener addresses changed in the file; they take effect on restart");
    }
    match shared.apply(config) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "configuration reloaded");
            shared.metrics.update("file", true);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload rejected; keeping the running configuration");
            shared.metrics.update("file", false);
            false
        }
    }
}

fn listeners_differ(a: &Config, b: &Config) -> bool {
    a.inbound.as_ref().map(|i| (i.listen, i.app)) != b.inbound.as_ref().map(|i| (i.listen, i.app))
}

/// Watch `path` until `shutdown`; apply changes as they come.
pub async fn watch_file(shared: Arc<Shared>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let mut last = stamp(&path);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stopped(&mut shutdown) => return,
        };
        let now = stamp(&path);
        if forced || now != last {
            last = now;
            reload_now(&shared, &path);
        }
    }
}
