//! The access log: one JSON line per finished request or TCP connection, written by a
//! background thread (plain blocking writes, kept off the async runtime's workers). The request path only `try_send`s an `Arc` of the record into a bounded
//! channel (no formatting, no I/O, no waiting); when the channel is full the record is dropped
//! and counted (`trellis_access_log_dropped_total`). The thread never waits on the channel:
//! every [`TICK`] it drains what queued, formats into one reused buffer, writes through a
//! buffered writer and flushes. A sender thus never wakes it (a wake-up and a write per request
//! were most of the log's cost in the benchmark), lines appear within a tick, and the channel
//! must hold a tick's worth of records (4096 by default: 160k requests/s).

use std::io::{BufWriter, Write};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::Record;

/// Default channel size (records), a configuration default.
pub use crate::config::DEFAULT_ACCESS_LOG_BUFFER as DEFAULT_BUFFER;

/// How often the writer drains the channel.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(25);

/// A running access log writer.
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<Arc<Record>>,
}

impl AccessLog {
    /// Open `target` (`stderr`, `stdout`, or a file path opened for appending, created if
    /// missing) and start the writer thread with a channel of `buffer` records (at least 1).
    pub fn start(target: &str, buffer: usize, lines: Counter) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let out: Box<dyn Write + Send> = match target {
            "stderr" | "-" => Box::new(std::io::stderr()),
            "stdout" => Box::new(std::io::stdout()),
            path => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("opening the access log {path}: {e}"))
                    })?;
                Box::new(file)
            }
        };
        let target = target.to_string();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out, &lines, &target))?;
        Ok(AccessLog { tx })
    }

    /// Queue a record; false when the channel is full (the caller counts the drop).
    pub fn offer(&self, record: Arc<Record>) -> bool {
        self.tx.try_send(record).is_ok()
    }
}

/// One JSON line (with its newline) for `record`, appended to `out`.
pub fn line(record: &Record, out: &mut Vec<u8>) {
    if serde_json::to_writer(&mut *out, record).is_ok() {
        out.push(b'\n');
    }
}

/// Runs until every sender is gone (the proxy stopped) or a write fails.
fn write_lines(
    mut rx: mpsc::Receiver<Arc<Record>>,
    out: Box<dyn Write + Send>,
    lines: &Counter,
    target: &str,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(record) => {
                    buf.clear();
                    line(&record, &mut buf);
                    if let Err(e) = out.write_all(&buf) {
                        tracing::warn!(target, error = %e, "access log write failed; the log stops");
                        return;
                    }
                    lines.inc();
                    wrote = true;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote && let Err(e) = out.flush() {
            tracing::warn!(target, error = %e, "access log flush failed; the log stops");
            return;
        }
        std::thread::sleep(TICK);
    }
}
