//! The one background task per [`crate::FileDiscovery`] that watches the file and publishes what it
//! holds: the last good content, and the current error if the last read failed.
//!
//! Watching is [`trellis_file_watch`]: OS change events (inotify) on the file's directory see
//! in-place writes and atomic renames (editors, Kubernetes ConfigMap symlink swaps) within
//! milliseconds, and a stat every `interval` (250 ms by default) is the fallback for bind mounts
//! and network filesystems, where events go missing. On a change of the file's mtime, size, inode
//! or ctime the task reads the file, and parses it when the bytes differ from the last parse. It
//! also re-reads every fourth interval without a change (for filesystems with coarse
//! timestamps), and every interval while the file cannot be read.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use trellis_discovery::{ErrorKind, SourceId};
use trellis_file_watch::{FileWatch, Options};

use crate::format::{self, Catalog};

/// What the task last learned. Streams map this to snapshots and error items.
#[derive(Clone, Debug, Default)]
pub(crate) struct Published {
    /// The last good content (stays through errors).
    pub(crate) good: Option<Arc<Catalog>>,
    /// The current failure, if the last read or parse failed.
    pub(crate) error: Option<Arc<Failure>>,
}

impl Published {
    /// The task has read the file at least once (successfully or not).
    pub(crate) fn loaded(&self) -> bool {
        self.good.is_some() || self.error.is_some()
    }
}

/// One failure, numbered so each stream reports it once.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) seq: u64,
    pub(crate) kind: ErrorKind,
    pub(crate) message: String,
}

/// What the streams and the task share; the task holds it weakly and stops when it is gone.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) path: PathBuf,
    pub(crate) source: SourceId,
    pub(crate) interval: Duration,
    pub(crate) tx: watch::Sender<Published>,
    started: std::sync::Once,
}

impl Shared {
    pub(crate) fn new(path: PathBuf, source: SourceId, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            path,
            source,
            interval,
            tx: watch::Sender::new(Published::default()),
            started: std::sync::Once::new(),
        })
    }

    /// Starts the watching task (once). Called from a stream's first poll, so always in a runtime.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        self.started.call_once(|| {
            tokio::spawn(poll_loop(Arc::downgrade(self)));
        });
    }
}

/// Re-read at least every this many intervals, even when no change was seen.
const REREAD_EVERY: u32 = 4;

struct Poller {
    /// Hash of the bytes last parsed successfully.
    good_hash: Option<u64>,
    /// The last read failed (missing, unreadable file): try again every interval.
    unreadable: bool,
    seq: u64,
}

async fn poll_loop(shared: Weak<Shared>) {
    let Some(mut file) = shared
        .upgrade()
        .map(|shared| FileWatch::new([shared.path.clone()], Options::poll(shared.interval)))
    else {
        return;
    };
    let mut poller = Poller {
        good_hash: None,
        unreadable: false,
        seq: 0,
    };
    loop {
        let wait = {
            let Some(shared) = shared.upgrade() else {
                return; // the adapter and every stream are gone
            };
            poller.poll(&shared).await;
            if poller.unreadable {
                shared.interval
            } else {
                shared.interval * REREAD_EVERY
            }
        };
        file.changed_or_after(wait).await;
    }
}

impl Poller {
    async fn poll(&mut self, shared: &Shared) {
        let path = &shared.path;
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.unreadable = true;
                return self.fail(
                    shared,
                    ErrorKind::Unavailable,
                    format!("{}: cannot read: {e}", path.display()),
                );
            }
        };
        self.unreadable = false;
        let hash = {
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        let failing = shared.tx.borrow().error.is_some();
        if self.good_hash == Some(hash) {
            if failing {
                // Back to the last good content: clear the error, keep the catalog.
                shared.tx.send_modify(|p| p.error = None);
            }
            return;
        }
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text,
            Err(e) => {
                return self.fail(
                    shared,
                    ErrorKind::InvalidData,
                    format!("{}: not UTF-8: {e}", path.display()),
                );
            }
        };
        match format::parse(text, path, &shared.source, SystemTime::now()) {
            Ok(catalog) => {
                self.good_hash = Some(hash);
                tracing::debug!(file = %path.display(), %catalog, "loaded");
                shared.tx.send_replace(Published {
                    good: Some(Arc::new(catalog)),
                    error: None,
                });
            }
            Err(e) => {
                self.fail(shared, ErrorKind::InvalidData, e.to_string());
            }
        }
    }

    /// Publishes a failure, unless it is the one already published (no flood of repeats).
    fn fail(&mut self, shared: &Shared, kind: ErrorKind, message: String) {
        let same = shared
            .tx
            .borrow()
            .error
            .as_ref()
            .is_some_and(|f| f.kind == kind && f.message == message);
        if same {
            return;
        }
        tracing::warn!(%message, "file discovery: keeping the last good content");
        self.seq += 1;
        let failure = Arc::new(Failure {
            seq: self.seq,
            kind,
            message,
        });
        shared.tx.send_modify(|p| p.error = Some(failure));
    }
}
