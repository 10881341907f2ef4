//! Reloading the config file: on SIGHUP and when the file or the identity files it names change
//! (watched with [`trellis_file_watch`]: OS change events on their directories, and a stat every
//! 500 ms as the fallback, which also sees ConfigMap symlink swaps on filesystems without
//! events). A bad edit is logged with its file and line and the running configuration stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use trellis_file_watch::{FileWatch, Options};

use crate::config::Config;
use crate::shutdown::stopped;
use crate::state::Shared;

/// How often the files' metadata is checked without an OS change event (the fallback poll).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Try to load and apply the file now. Returns whether the new config is in force.
pub fn reload_now(shared: &Shared, path: &Path) -> bool {
    let mut config = match Config::load(path) {
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
    let running = Arc::clone(&shared.routes.table.load().base);
    // The gateway is set up at start (from this file's `gateway:` or from `--gateway FILE`,
    // which reloads itself): the running one stays what `/config` shows.
    if config.gateway.is_some() && config.gateway != running.gateway {
        tracing::warn!(
            "the file's gateway section changed; it takes effect on restart (a Gateway document given with --gateway reloads itself)"
        );
    }
    config.gateway = running.gateway.clone();
    if config.admin != running.admin
        || config.outbound != running.outbound
        || listeners_differ(&config, &running)
    {
        tracing::warn!("listener addresses changed in the file; they take effect on restart");
    }
    match shared.routes.apply(config) {
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
    let running = shared.routes.table.load().base.identity.clone();
    match &config.identity {
        Some(files) => {
            let credentials = crate::identity::load_static(files)?;
            let unchanged = shared.identity.latest().is_some_and(|g| {
                g.credentials.chain == credentials.chain
                    && g.credentials.anchors == credentials.anchors
            });
            if !unchanged {
                tracing::info!(id = %credentials.id, not_after = %humantime::format_rfc3339_seconds(credentials.not_after), "static identity reloaded");
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

/// The config file and the identity files the running config names.
fn watched_paths(path: &Path, shared: &Shared) -> Vec<PathBuf> {
    let mut all = vec![path.to_owned()];
    if let Some(files) = &shared.routes.table.load().base.identity {
        all.push(files.cert.clone());
        all.push(files.key.clone());
        all.extend(files.trust_anchors.iter().cloned());
    }
    all
}

fn listeners_differ(a: &Config, b: &Config) -> bool {
    a.inbound.as_ref().map(|i| (i.listen, i.app)) != b.inbound.as_ref().map(|i| (i.listen, i.app))
}

/// Watch `path` until `shutdown`; apply changes as they come.
pub async fn watch_file(shared: Arc<Shared>, path: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let mut files = FileWatch::new(watched_paths(&path, &shared), Options::poll(POLL_INTERVAL));
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            () = files.changed() => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {}
            _ = stopped(&mut shutdown) => return,
        }
        reload_now(&shared, &path);
        // The reload may have named other identity files: watch those from now on.
        let now = watched_paths(&path, &shared);
        if now != files.paths() {
            files = FileWatch::new(now, Options::poll(POLL_INTERVAL));
        }
    }
}
