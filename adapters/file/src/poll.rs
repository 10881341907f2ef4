//! The one background task per [`crate::FileDiscovery`] that watches the file and publishes what it
//! holds: the last good content, and the current error if the last read failed.
//!
//! Polling, not inotify: every `interval` (250 ms by default) the task stats the file; when its
//! modification time, size, inode or change time moved (or every fourth poll, for editors and
//! filesystems with coarse timestamps) it reads the file, and parses it when the bytes differ from
//! the last parse. Why polling: it needs no extra dependency tree, and it behaves the same for
//! in-place writes, atomic renames (editors, Kubernetes ConfigMap symlink swaps), bind mounts and
//! network filesystems, where inotify misses events; the cost is a stat per interval and up to
//! one interval of latency, which local mode does not notice.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use trellis_discovery::{ErrorKind, SourceId};

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

    /// Starts the polling task (once). Called from a stream's first poll, so always in a runtime.
    pub(crate) fn ensure_started(self: &Arc<Self>) {
        self.started.call_once(|| {
            tokio::spawn(poll_loop(Arc::downgrade(self)));
        });
    }
}

/// What the file looked like at the last stat.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stat {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    ctime: i64,
    ctime_nsec: i64,
}

fn stat_of(meta: &std::fs::Metadata) -> Stat {
    use std::os::unix::fs::MetadataExt;
    Stat {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
        ctime: meta.ctime(),
        ctime_nsec: meta.ctime_nsec(),
    }
}

/// Re-read at least every this many polls, even when the stat looks unchanged.
const REREAD_EVERY: u32 = 4;

struct Poller {
    last_stat: Option<Stat>,
    /// Hash of the bytes last parsed successfully.
    good_hash: Option<u64>,
    polls_since_read: u32,
    seq: u64,
}

async fn poll_loop(shared: Weak<Shared>) {
    let mut poller = Poller {
        last_stat: None,
        good_hash: None,
        polls_since_read: 0,
        seq: 0,
    };
    loop {
        let interval = {
            let Some(shared) = shared.upgrade() else {
                return; // the adapter and every stream are gone
            };
            poller.poll(&shared).await;
            shared.interval
        };
        tokio::time::sleep(interval).await;
    }
}

impl Poller {
    async fn poll(&mut self, shared: &Shared) {
        let path = &shared.path;
        let stat = match tokio::fs::metadata(path).await {
            Ok(meta) => stat_of(&meta),
            Err(e) => {
                self.last_stat = None;
                return self.fail(
                    shared,
                    ErrorKind::Unavailable,
                    format!("{}: cannot read: {e}", path.display()),
                );
            }
        };
        self.polls_since_read += 1;
        if self.last_stat == Some(stat) && self.polls_since_read < REREAD_EVERY {
            return;
        }
        self.polls_since_read = 0;
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.last_stat = None;
                return self.fail(
                    shared,
                    ErrorKind::Unavailable,
                    format!("{}: cannot read: {e}", path.display()),
                );
            }
        };
        self.last_stat = Some(stat);
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
