//! Reloading the config file: on SIGHUP and when the file or the identity files it names change
//! (polled every 500 ms; cheap, and works on every filesystem, including ConfigMap symlink
//! swaps). A bad edit is logged with its file and line and the running configuration stays.

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
    if let Err(e) = reload_identity(shared, &config) {
        tracing::error!(error = %e, "config reload rejected (identity files); keeping the running configuration");
        shared.metrics.update("file", false);
        return false;
    }
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

/// Re-read the static identity files named by `config` (or drop the identity when the config
/// no longer names any).
fn reload_identity(shared: &Shared, config: &Config) -> Result<(), crate::identity::IdentityError> {
    let running = shared.table.load().config.identity.clone();
    match &config.identity {
        Some(files) => {
            let credentials = crate::identity::load_static(files)?;
            let unchanged = shared.identity.latest().is_some_and(|g| {
                g.credentials.chain == credentials.chain
                    && g.credentials.anchors == credentials.anchors
            });
            if !unchanged {
                tracing::info!(id = %credentials.id, not_after = ?credentials.not_after, "static identity reloaded");
                shared.identity.publish(credentials)?;
            }
        }
        None if running.is_some() => {
            tracing::warn!(
                "the config no longer names identity files: mTLS is off, plaintext from now on"
            );
            shared.identity.clear(false);
        }
        None => {}
    }
    Ok(())
}

/// Modification stamps of the config file and the identity files it names.
fn stamps(path: &Path, shared: &Shared) -> Vec<Option<(SystemTime, u64)>> {
    let mut all = vec![stamp(path)];
    if let Some(files) = &shared.table.load().config.identity {
        all.push(stamp(&files.cert));
        all.push(stamp(&files.key));
        all.extend(files.trust_anchors.iter().map(|p| stamp(p)));
    }
    all
}

fn listeners_differ(a: &Config, b: &Config) -> bool {
    a.inbound.as_ref().map(|i| (i.listen, i.app)) != b.inbound.as_ref().map(|i| (i.listen, i.app))
}

/// Watch `path` until `shutdown`; apply changes as they come.
pub async fn watch_file(shared: Arc<Shared>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let mut last = stamps(&path, &shared);
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stopped(&mut shutdown) => return,
        };
        let now = stamps(&path, &shared);
        if forced || now != last {
            reload_now(&shared, &path);
            last = stamps(&path, &shared);
        }
    }
}
