//! `trellis controller` as a child process, for the CLI's tests and benchmarks: started on
//! ephemeral ports, its gRPC and admin addresses read from the lines it prints first, killed and
//! reaped on drop (also when a test panics, so no controller outlives its test); and
//! [`http_get`] for its admin port.
//!
//! The binary is a parameter because only the package that builds it knows its path
//! (`env!("CARGO_BIN_EXE_trellis")` in trellis-cli's tests and benches).

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};

/// `BINARY controller --grpc 127.0.0.1:0 --admin 127.0.0.1:0`: add arguments and environment,
/// then [`ControllerProcess::spawn`] it, or run it with `output()` to see it fail at start.
/// No stdio is set, so `output()` captures both streams.
pub fn controller_command(binary: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("controller")
        .args(["--grpc", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    command
}

/// A running controller process, killed and reaped on drop.
#[derive(Debug)]
pub struct ControllerProcess {
    child: Child,
    /// Where it serves proxies (`grpc listening on ADDR`).
    pub grpc: SocketAddr,
    /// Its admin port (`admin listening on ADDR`): `trellis check`, `/metrics`, `/api/v1/state`.
    pub admin: SocketAddr,
}

impl ControllerProcess {
    /// `BINARY controller` on ephemeral ports with `args`; stderr goes to the test's.
    pub fn start(binary: impl AsRef<OsStr>, args: &[&str]) -> Self {
        Self::spawn(controller_command(binary).args(args))
    }

    /// Spawns `command` (from [`controller_command`]) with stdout piped and waits for its two
    /// address lines. Stderr is left as the command sets it (inherited by default).
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting trellis controller");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        // The two address lines come first, in this order: anything else is a failure to show.
        let mut addr = |prefix: &str| -> SocketAddr {
            let line = lines
                .next()
                .expect("the controller printed its addresses")
                .expect("reading the controller's stdout");
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
                .parse()
                .unwrap_or_else(|e| panic!("{line:?}: {e}"))
        };
        let grpc = addr("grpc listening on ");
        let admin = addr("admin listening on ");
        // Keep draining stdout so the child never blocks on a full pipe; ends with the child.
        std::thread::spawn(move || for _ in lines {});
        Self { child, grpc, admin }
    }

    /// Its process id (for signals, `/proc` figures, the `hostname-pid` leader identity).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to exit (after a signal sent to [`Self::pid`]).
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }

    /// Kills it and returns what it wrote on stderr (empty unless the command piped stderr).
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut stderr)
                .expect("reading the controller's stderr");
        }
        stderr
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET of `path` from `addr` (a controller's admin port): its status line and
/// body. HTTP/1.0 so the server closes the connection and reading to the end is the response,
/// with no HTTP client to set up in a synchronous test.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    ))
}

/// The path of a workspace binary `name` (built by `package`), found next to the running test
/// executable (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`). Tests of one
/// package get only their own binaries from cargo (`CARGO_BIN_EXE_*`); another package's is
/// built by `cargo nextest run --workspace` (scripts/test). Panics saying how to build it when
/// it is missing.
pub fn workspace_binary(name: &str, package: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary {name} (package {package}) not found at {}: build it with `cargo build -p {package}` \
         (`cargo nextest run --workspace` builds every binary)",
        path.display()
    );
    path
}
