//! The processes a guide starts: the workspace binaries (found next to the test executable, as
//! the conformance harness finds them) and `sh` running a task definition's entry point. Output
//! goes to a log file per process; a test waits for a line in it. Each process leads its own
//! process group, and the whole group is killed when it is dropped (also when a test panics), so
//! a shell's children (the registrar's `sleep`) go with it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long a process may take to say it is up on a busy machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The directory of the workspace binaries (`target/<profile>/`), from the test executable's
/// path (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe
        .parent()
        .context("the test executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// A workspace binary, or an error that says how to build it.
pub fn binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary {name} (package {package}) not found at {}: build the guides' binaries with \
             `cargo build -p trellis-cli -p trellis-proxy -p trellis-echo -p trellis-consul-double` \
             (`cargo nextest run --workspace` builds every binary)",
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
    /// Its process group (its pid at start): children may outlive the leader.
    group: Option<u32>,
}

impl Process {
    /// Starts `program args` with exactly `env` (as systemd and ECS start a service: no
    /// inherited environment) plus `NO_COLOR`, its output to `<log_dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        cwd: &Path,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("creating the log file {}", log.display()))?;
        let file = Arc::new(Mutex::new(file));
        if let Ok(mut f) = file.lock() {
            let _ = writeln!(f, "$ {} {}", program.display(), args.join(" "));
        }
        let mut child = Command::new(program)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().context("child stdout")?;
        let stderr = child.stderr.take().context("child stderr")?;
        tokio::spawn(copy_lines(stdout, file.clone(), tx.clone()));
        tokio::spawn(copy_lines(stderr, file, tx));
        Ok(Self {
            name: name.to_owned(),
            group: child.id(),
            child,
            log,
            lines,
        })
    }

    /// Reads its output until `parse` accepts a line. Fails with the end of its log when it
    /// exits first or `timeout` passes.
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
                        self.tail(30)
                    );
                }
                Err(_) => bail!(
                    "{} did not print {what} within {timeout:?}; its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.tail(30)
                ),
            }
        }
    }

    /// Waits for a line containing `needle`.
    pub async fn wait_for(&mut self, needle: &str) -> anyhow::Result<String> {
        self.wait_line(&format!("{needle:?}"), START_TIMEOUT, |l| {
            l.contains(needle).then(|| l.to_owned())
        })
        .await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for it to exit on its own (after a signal), at most `timeout`.
    pub async fn exit_status(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {timeout:?}", self.name))?
            .context("waiting for the process")
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The group outlives its leader when a shell leaves children behind; kill_on_drop then
        // reaps the leader itself.
        if let Some(pgid) = self.group {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sends SIGTERM to `process` (what systemd and ECS send to stop a service).
pub fn terminate(process: &Process) -> anyhow::Result<()> {
    let pid = process.pid().context("the process already exited")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -TERM {pid}: {status}");
    Ok(())
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
        // Nobody may be reading any more; the log file keeps everything.
        let _ = tx.send(line);
    }
}
