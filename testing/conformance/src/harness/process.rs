//! Child processes of a conformance mesh: the workspace binaries found next to the test
//! executable, started with their output captured to a log file, their listening addresses read
//! back from what they print, and killed when dropped (also when a test panics).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The workspace binaries the harness starts, with the package that builds each.
pub const TRELLIS: (&str, &str) = ("trellis", "trellis-cli");
pub const PROXY: (&str, &str) = ("trellis-proxy", "trellis-proxy");
pub const ECHO: (&str, &str) = ("trellis-echo", "trellis-echo");
pub const CONSUL_DOUBLE: (&str, &str) = ("trellis-consul-double", "trellis-consul-double");

/// The path of a workspace binary, found from the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`). A missing binary is an error
/// that says how to build it: `cargo nextest run --workspace` builds every binary, but
/// `-p trellis-conformance` alone builds only this package's.
pub fn binary((name, package): (&str, &str)) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe
        .parent()
        .context("the test executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "binary {name} (package {package}) not found at {}: build it with `cargo build --workspace` \
             (or `cargo build -p {package}`); `cargo nextest run --workspace` builds every binary",
            path.display()
        );
    }
    Ok(path)
}

/// A running child process; killed when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Process {
    /// Starts `program args` with `env` added, its stdout and stderr appended to
    /// `<log_dir>/<name>.log`. `NO_COLOR` is set so log lines carry no escape codes.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_in(None, name, program, args, env, log_dir)
    }

    /// Like [`Process::spawn`], in the network namespace `netns` when one is given (a host of
    /// [`super::hosts::Hosts`]).
    pub fn spawn_in(
        netns: Option<&str>,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let (program, args) = match netns {
            Some(netns) => {
                let (ip, args) = super::hosts::in_netns(netns, &program.to_string_lossy(), args);
                (PathBuf::from(ip), args)
            }
            None => (program.to_path_buf(), args.to_vec()),
        };
        let (program, args) = (program.as_path(), args.as_slice());
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the log file {}", log.display()))?;
        let file = Arc::new(Mutex::new(file));
        {
            let mut f = file.lock().expect("log lock");
            let _ = writeln!(f, "$ {} {}", program.display(), args.join(" "));
        }
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().context("child stdout")?;
        let stderr = child.stderr.take().context("child stderr")?;
        tokio::spawn(copy_lines(stdout, file.clone(), tx.clone()));
        tokio::spawn(copy_lines(stderr, file, tx));
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            lines,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file its output goes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Reads its output until `parse` accepts a line (e.g. `listening on ADDR`). Fails with the
    /// end of its log when it exits first or `timeout` passes.
    pub async fn wait_line<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut parse: impl FnMut(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(found) = parse(&line) {
                        return Ok(found);
                    }
                }
                Ok(None) => {
                    let status = self.child.wait().await.ok();
                    bail!(
                        "{} exited ({}) before printing {what}; its log {}:\n{}",
                        self.name,
                        status.map(|s| s.to_string()).unwrap_or_default(),
                        self.log.display(),
                        self.tail(20)
                    );
                }
                Err(_) => bail!(
                    "{} did not print {what} within {timeout:?}; its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.tail(20)
                ),
            }
        }
    }

    /// Waits for a `listening on ADDR` line (what `trellis-echo` and the consul double print).
    pub async fn listening_on(&mut self) -> anyhow::Result<SocketAddr> {
        self.wait_line("`listening on ADDR`", START_TIMEOUT, |line| {
            let addr = line.trim().strip_prefix("listening on ")?;
            addr.trim_start_matches("http://").parse().ok()
        })
        .await
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// How long a process may take to print its address on a busy machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn copy_lines(
    from: impl AsyncRead + Unpin,
    log: Arc<Mutex<std::fs::File>>,
    tx: mpsc::UnboundedSender<String>,
) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(mut f) = log.lock() {
            let _ = writeln!(f, "{line}");
        }
        // Nobody reads once the address is known; the log file keeps everything.
        let _ = tx.send(line);
    }
}

/// The value of `key=Some(ADDR)` in a tracing log line (the proxy's `trellis-proxy started`).
pub fn traced_addr(line: &str, key: &str) -> Option<SocketAddr> {
    let needle = format!(" {key}=Some(");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    rest[..rest.find(')')?].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_start_line_gives_its_addresses() {
        let line = "2026-11-22T02:59:56.551686Z  INFO trellis_proxy: trellis-proxy started \
                    admin=Some(127.0.0.1:40355) http=Some(127.0.0.1:33561) ports=[] inbound=Some(127.0.0.2:42679)";
        assert_eq!(
            traced_addr(line, "http"),
            Some("127.0.0.1:33561".parse().unwrap())
        );
        assert_eq!(
            traced_addr(line, "inbound"),
            Some("127.0.0.2:42679".parse().unwrap())
        );
        assert_eq!(traced_addr(line, "ports"), None);
        let none = "trellis-proxy started admin=Some(127.0.0.1:1) http=None inbound=None";
        assert_eq!(traced_addr(none, "http"), None);
    }
}
