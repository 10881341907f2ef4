//! A `moto_server` process on 127.0.0.1 for the tests: started on a free port, waited for, killed
//! on drop (also when a test panics), restartable at the same port for the outage scenario.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long moto may take to start (Python imports on a loaded 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `moto_server` executable: `TRELLIS_MOTO_SERVER`, else the venv `scripts/test` creates.
/// Panics with what to do when neither exists: moto is installed by the test command, so a
/// missing moto is a broken setup, not a reason to skip.
pub fn executable() -> PathBuf {
    if let Some(path) = std::env::var_os("TRELLIS_MOTO_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "TRELLIS_MOTO_SERVER={} does not exist; run scripts/test (it installs moto[server])",
            path.display()
        );
        return path;
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache"));
    let fallback = cache.join("trellis/venv/bin/moto_server");
    assert!(
        fallback.exists(),
        "moto_server not found: TRELLIS_MOTO_SERVER is unset and {} does not exist. \
         Run `scripts/test -p trellis-adapter-cloudmap` once: it installs moto[server] into that venv.",
        fallback.display()
    );
    fallback
}

/// A running moto_server.
#[derive(Debug)]
pub struct MotoServer {
    child: Option<Child>,
    port: u16,
}

impl MotoServer {
    /// Starts moto on a free port (retrying on a port collision).
    pub async fn start() -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::start_at(port).await {
                Ok(server) => return server,
                Err(e) => last = e,
            }
        }
        panic!("moto_server did not start on any of 5 free ports; last error: {last}");
    }

    /// Starts moto on `port` and waits until it accepts connections.
    pub async fn start_at(port: u16) -> Result<Self, String> {
        let exe = executable();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", exe.display()))?;
        let mut server = Self {
            child: Some(child),
            port,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "moto_server on port {} exited: {status}",
                    self.port
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "moto_server on port {} did not accept connections within {START_TIMEOUT:?}",
                    self.port
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the process and waits for it (its state is lost, as with a real moto restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts moto again at the same port (retrying while the old socket is released).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match Self::start_at(self.port).await {
                Ok(mut fresh) => {
                    self.child = fresh.child.take();
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago (bind :0, read it back, release it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}
