//! Notice that a set of files or directories changed, so the caller can reload them: the one way
//! every Trellis component watches its files (the proxy's config, the file discovery platform,
//! the SMI policy directory, the controller's bootstrap tokens and CA files, the webhook's
//! serving certificate).
//!
//! ```no_run
//! # async fn demo() {
//! use std::time::Duration;
//! use trellis_file_watch::{FileWatch, Options};
//!
//! // Take the baseline first, then read: a change made while reading is still seen.
//! let mut watch = FileWatch::new(["mesh.yaml"], Options::poll(Duration::from_millis(250)));
//! let mut text = std::fs::read_to_string("mesh.yaml");
//! loop {
//!     watch.changed().await;
//!     text = std::fs::read_to_string("mesh.yaml");
//! }
//! # }
//! ```
//!
//! What "changed" means: the **fingerprint** of the paths moved. A file's fingerprint is its
//! modification time, size, inode and change time (following symlinks, so a Kubernetes
//! ConfigMap or Secret volume's symlink swap counts); a directory's is the set of everything in
//! it, recursively, with each file's fingerprint (its own mtime is left out, so an editor's swap
//! file that comes and goes leaves no trace); a missing path is "missing". The bytes are never
//! read here: the caller reads, and may compare contents itself.
//!
//! When the fingerprint is looked at:
//! - on an OS change event (inotify and friends, through `notify`) for the directory of each
//!   watched file and for each watched directory (recursively). Watching the directory, not the
//!   file, is what makes an atomic rename visible: it replaces the file's inode, which a watch on
//!   the file itself would lose. A burst of events (write + rename + chmod) is let settle for
//!   [`Options::debounce`] and then costs one look;
//! - every [`Options::poll`] regardless: the fallback for what events miss (bind mounts, network
//!   filesystems, a path whose directory does not exist yet, a system out of inotify watches).
//!   After a look that saw a change, watches are set up again for directories that appeared or
//!   were replaced, so events take over from the poll as soon as they can.
//!
//! A [`FileWatch`] owns one background task; dropping the watch stops the task and its OS
//! watches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How a [`FileWatch`] looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// How often the fingerprint is looked at without any event: the fallback poll.
    pub poll: Duration,
    /// Whether to ask the OS for change events (on by default). Off, the poll alone sees changes.
    pub events: bool,
    /// How long a burst of events is let settle before the look it causes.
    pub debounce: Duration,
}

/// Events of one editor save or rename come within a few milliseconds of each other.
const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(5);

impl Options {
    /// Events on, polling every `poll` as the fallback.
    pub fn poll(poll: Duration) -> Self {
        Self {
            poll,
            events: true,
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// The same, with OS change events off (the poll alone; also how the fallback is tested).
    pub fn without_events(self) -> Self {
        Self {
            events: false,
            ..self
        }
    }
}

/// Watches a set of paths (files or directories, which may not exist yet) for changes of their
/// fingerprint. Create it inside a Tokio runtime; drop it to stop watching.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    options: Options,
    /// Counts the changes the task saw; `changed` waits for it to move.
    changes: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl FileWatch {
    /// Starts watching `paths`. The fingerprint is taken before this returns: every change made
    /// after it (while the caller reads the files for the first time, say) is reported.
    pub fn new<P: Into<PathBuf>>(paths: impl IntoIterator<Item = P>, options: Options) -> Self {
        let paths: Vec<PathBuf> = paths.into_iter().map(Into::into).collect();
        // Watches before the baseline, both before returning: a change made right after `new`
        // has an event waiting in the channel by the time the task first runs.
        // Capacity 1: an event arriving while one is pending adds nothing, the look covers both.
        let (events_tx, events) = mpsc::channel::<()>(1);
        let mut os = options.events.then(|| OsWatches::new(events_tx)).flatten();
        if let Some(os) = &mut os {
            os.register(&paths);
        }
        let baseline = fingerprint(&paths);
        let (tx, changes) = watch::channel(0);
        let task = tokio::spawn(run(paths.clone(), options, baseline, tx, os, events));
        Self {
            paths,
            options,
            changes,
            task,
        }
    }

    /// The watched paths.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The options in force.
    pub fn options(&self) -> Options {
        self.options
    }

    /// Waits until the fingerprint differs from the one last reported (or, the first time, the
    /// one taken by [`FileWatch::new`]). Changes that came while nobody waited are reported at
    /// once, and several of them as one.
    pub async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            // The task only ends when this watch is dropped (or it panicked): nothing will change.
            std::future::pending::<()>().await;
        }
    }

    /// Waits for a change, or `at_most`, whichever comes first; `true` when it was a change. For
    /// callers that also want to look again now and then without one: after a failed reload (a
    /// rotation half-written at the first look), or to re-read on filesystems whose timestamps
    /// are too coarse to show every write.
    pub async fn changed_or_after(&mut self, at_most: Duration) -> bool {
        tokio::time::timeout(at_most, self.changed()).await.is_ok()
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        // The task owns the OS watches: ending it removes them.
        self.task.abort();
    }
}

/// The background task: look on events and on every poll tick, report when the fingerprint moved.
/// `os` is `None` (and `events` never yields) when events are off or unavailable.
async fn run(
    paths: Vec<PathBuf>,
    options: Options,
    mut seen: Fingerprint,
    tx: watch::Sender<u64>,
    mut os: Option<OsWatches>,
    mut events: mpsc::Receiver<()>,
) {
    loop {
        tokio::select! {
            Some(()) = events.recv() => {
                tokio::time::sleep(options.debounce).await;
                while events.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(options.poll) => {}
        }
        // A big directory tree is many stats: keep them off the runtime's worker threads.
        let look = paths.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&look)).await else {
            continue; // the blocking pool is shutting down with the runtime
        };
        if now != seen {
            seen = now;
            tx.send_modify(|n| *n += 1);
            if let Some(os) = &mut os {
                os.register(&paths);
            }
        }
    }
}

/// The OS change events: each event only says "look again".
struct OsWatches {
    watcher: notify::RecommendedWatcher,
    /// What is being watched now, with the inode it had: a directory deleted and created again
    /// is a new inode, and the old watch went with the old one.
    watched: HashMap<PathBuf, u64>,
}

impl OsWatches {
    /// `None` when the OS gives no events (polling still works).
    fn new(events: mpsc::Sender<()>) -> Option<Self> {
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // inotify also reports opens and reads, our caller's own among them: those change
            // nothing. A write shows as Modify or as Close(Write).
            if let Ok(event) = &event
                && let notify::EventKind::Access(access) = event.kind
                && access != notify::event::AccessKind::Close(notify::event::AccessMode::Write)
            {
                return;
            }
            // Full: a look is pending already.
            let _ = events.try_send(());
        })
        .map_err(|e| tracing::debug!(error = %e, "file watch: no change events, polling only"))
        .ok()?;
        Some(Self {
            watcher,
            watched: HashMap::new(),
        })
    }

    /// Watches each directory recursively, and for a file the directory that holds it; drops
    /// watches of directories that are gone or were replaced.
    fn register(&mut self, paths: &[PathBuf]) {
        use notify::Watcher as _;
        use std::os::unix::fs::MetadataExt as _;
        let mut wanted: HashMap<PathBuf, notify::RecursiveMode> = HashMap::new();
        for path in paths {
            if path.is_dir() {
                wanted.insert(path.clone(), notify::RecursiveMode::Recursive);
            } else {
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                let parent = parent.unwrap_or(Path::new(".")).to_owned();
                // A directory also named as a watched directory keeps its recursive watch.
                wanted
                    .entry(parent)
                    .or_insert(notify::RecursiveMode::NonRecursive);
            }
        }
        for (target, mode) in wanted {
            let inode = std::fs::metadata(&target).ok().map(|m| m.ino());
            let current = self.watched.get(&target).copied();
            if inode.is_some() && inode == current {
                continue;
            }
            if current.is_some() {
                self.watched.remove(&target);
                // The kernel may have dropped the watch with the directory already.
                let _ = self.watcher.unwatch(&target);
            }
            let Some(inode) = inode else {
                continue; // not there (yet): the poll looks for it
            };
            match self.watcher.watch(&target, mode) {
                Ok(()) => {
                    self.watched.insert(target, inode);
                }
                Err(e) => {
                    tracing::debug!(path = %target.display(), error = %e, "file watch: polling this path only");
                }
            }
        }
    }
}

/// One path's state: missing, a directory (its contents are entries of their own), or a file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stat {
    Missing,
    Dir,
    File {
        modified: Option<SystemTime>,
        len: u64,
        inode: u64,
        ctime: (i64, i64),
    },
}

/// Every watched path and everything under watched directories, sorted, with its state.
type Fingerprint = Vec<(PathBuf, Stat)>;

/// Directory symlinks can make loops; no real configuration tree is this deep.
const MAX_DEPTH: usize = 16;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    fn walk(path: &Path, depth: usize, out: &mut Fingerprint) {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                out.push((path.to_owned(), Stat::Dir));
                if depth < MAX_DEPTH
                    && let Ok(entries) = std::fs::read_dir(path)
                {
                    for entry in entries.flatten() {
                        walk(&entry.path(), depth + 1, out);
                    }
                }
            }
            Ok(meta) => out.push((
                path.to_owned(),
                Stat::File {
                    modified: meta.modified().ok(),
                    len: meta.len(),
                    inode: meta.ino(),
                    ctime: (meta.ctime(), meta.ctime_nsec()),
                },
            )),
            Err(_) => out.push((path.to_owned(), Stat::Missing)),
        }
    }
    let mut out = Vec::new();
    for path in paths {
        walk(path, 0, &mut out);
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough for any event or fast poll to be seen on a loaded CI machine.
    const SEEN: Duration = Duration::from_secs(5);
    /// A poll so slow that only an event can explain a change seen within [`SEEN`].
    const HOUR: Duration = Duration::from_secs(3600);
    const FAST_POLL: Duration = Duration::from_millis(20);

    /// A temporary directory holding `a.yaml`.
    fn a_file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "one").unwrap();
        (dir, file)
    }

    async fn seen(watch: &mut FileWatch, what: &str) {
        tokio::time::timeout(SEEN, watch.changed())
            .await
            .unwrap_or_else(|_| panic!("{what}: not seen within {SEEN:?}"));
    }

    async fn quiet(watch: &mut FileWatch, what: &str) {
        let changed = watch.changed_or_after(Duration::from_millis(300)).await;
        assert!(!changed, "{what}: reported a change");
    }

    #[tokio::test]
    async fn an_in_place_write_is_seen_by_events_alone() {
        let (_dir, file) = a_file();
        let mut watch = FileWatch::new([&file], Options::poll(HOUR));
        quiet(&mut watch, "nothing written yet").await;
        std::fs::write(&file, "two, longer").unwrap();
        seen(&mut watch, "in-place write").await;
        quiet(&mut watch, "one write is one change").await;
    }

    #[tokio::test]
    async fn an_atomic_rename_is_seen_by_events_alone() {
        let (dir, file) = a_file();
        let mut watch = FileWatch::new([&file], Options::poll(HOUR));
        let tmp = dir.path().join("a.tmp");
        // Same length: only the inode tells the new file from the old one.
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        seen(&mut watch, "atomic rename").await;
    }

    #[tokio::test]
    async fn a_file_created_after_the_start_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("later.yaml");
        let mut watch = FileWatch::new([&file], Options::poll(HOUR));
        quiet(&mut watch, "still missing").await;
        std::fs::write(&file, "here").unwrap();
        seen(&mut watch, "creation").await;
    }

    #[tokio::test]
    async fn a_deletion_is_seen() {
        let (_dir, file) = a_file();
        let mut watch = FileWatch::new([&file], Options::poll(HOUR));
        std::fs::remove_file(&file).unwrap();
        seen(&mut watch, "deletion").await;
    }

    #[tokio::test]
    async fn a_directory_gaining_a_file_in_a_subdirectory_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let mut watch = FileWatch::new([dir.path()], Options::poll(HOUR));
        std::fs::write(sub.join("new.yaml"), "x").unwrap();
        seen(&mut watch, "a new file in a subdirectory").await;
        // A directory created after the start is watched too (notify adds it recursively).
        let deeper = sub.join("deeper");
        std::fs::create_dir(&deeper).unwrap();
        seen(&mut watch, "a new subdirectory").await;
        std::fs::write(deeper.join("more.yaml"), "y").unwrap();
        seen(&mut watch, "a file in the new subdirectory").await;
    }

    #[tokio::test]
    async fn other_files_next_to_a_watched_file_and_reads_are_no_change() {
        let (dir, file) = a_file();
        let mut watch = FileWatch::new([&file], Options::poll(FAST_POLL));
        // The directory is watched, so this raises events; the fingerprint says "not ours".
        std::fs::write(dir.path().join("other.yaml"), "x").unwrap();
        let _ = std::fs::read(&file).unwrap();
        quiet(&mut watch, "a sibling file and a read").await;
    }

    #[tokio::test]
    async fn the_poll_alone_sees_changes_when_events_are_off() {
        let (dir, file) = a_file();
        let mut watch = FileWatch::new([&file], Options::poll(FAST_POLL).without_events());
        std::fs::write(&file, "two, longer").unwrap();
        seen(&mut watch, "write, polled").await;
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, "three").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        seen(&mut watch, "rename, polled").await;

        // And with events off, an hour-long poll sees nothing: the events above were not used.
        let mut blind = FileWatch::new([&file], Options::poll(HOUR).without_events());
        std::fs::write(&file, "four, longer still").unwrap();
        quiet(&mut blind, "no events, no poll yet").await;
    }

    #[tokio::test]
    async fn a_directory_created_after_the_start_is_found_by_the_poll_then_gets_events() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("policy");
        let file = dir.join("a.yaml");
        // Neither the file nor its directory exist: nothing to watch, only the poll sees them.
        let poll = Duration::from_secs(1);
        let mut watch = FileWatch::new([&file], Options::poll(poll));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(&file, "one").unwrap();
        seen(&mut watch, "created with its directory").await;
        // That look was a poll tick, so the next one is a whole `poll` away: a change seen well
        // before it came through the watch set up on the new directory.
        std::fs::write(&file, "two, longer").unwrap();
        tokio::time::timeout(poll / 2, watch.changed())
            .await
            .expect("the new directory is watched: a write is seen before the next poll");
    }

    #[tokio::test]
    async fn dropping_the_watch_stops_its_task() {
        let dir = tempfile::tempdir().unwrap();
        let watch = FileWatch::new([dir.path()], Options::poll(HOUR));
        // A second receiver of the task's channel: it errors once the task (the sender) is gone.
        let probe = watch.changes.clone();
        drop(watch);
        tokio::time::timeout(SEEN, async {
            while probe.has_changed().is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the task ended after the drop");
    }

    #[test]
    fn the_fingerprint_covers_contents_of_directories_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let paths = vec![dir.path().to_owned(), missing.clone()];
        let empty = fingerprint(&paths);
        assert_eq!(empty.len(), 2);
        assert!(empty.contains(&(missing, Stat::Missing)));
        std::fs::write(dir.path().join("a"), "x").unwrap();
        let one = fingerprint(&paths);
        assert_ne!(one, empty);
        assert_eq!(one, fingerprint(&paths), "no change, same fingerprint");
    }
}
