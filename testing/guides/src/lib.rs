//! Test support for following the deployment guides (`docs/guides/*.md`) literally, the way a
//! new user would, on one machine's loopback:
//!
//! - [`guide`]: the shell blocks a guide marks with `<!-- guide-test: NAME -->`, run as written
//!   with `/etc/trellis` moved to a temporary directory;
//! - [`systemd`]: a unit's `ExecStart=`, `EnvironmentFile=` and `LoadCredential=`, expanded as
//!   systemd expands them (`%i`, `%d`, `${VAR}`, `$VAR`), so a test runs the command the unit
//!   would run;
//! - [`hosts`]: moving the addresses the example files give (each host's `0.0.0.0:15001`,
//!   `10.0.0.10:8090`) to free ports on 127.0.0.1, consistently across files;
//! - [`process`]: the workspace binaries as child processes, their output in log files, killed
//!   on drop;
//! - [`http`]: one plain HTTP/1.1 request, as an app sends it (directly, or to its HTTP proxy).
//!
//! Everything binds 127.0.0.1 only.

pub mod guide;
pub mod hosts;
pub mod http;
pub mod process;
pub mod systemd;

use std::path::{Path, PathBuf};

/// The workspace root (where `deploy/` and `docs/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file of the workspace, read whole; the error names it.
pub fn read(relative: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Where the guides install the binaries on a host.
pub const USR_LOCAL_BIN: &str = "/usr/local/bin/";

/// A word of a command as a host would run it, here: `/usr/local/bin/NAME` is the workspace's
/// build of NAME, and `/etc/trellis` is the test's directory `etc`.
pub fn relocate(word: &str, etc: &Path) -> anyhow::Result<String> {
    if let Some(name) = word.strip_prefix(USR_LOCAL_BIN) {
        let path = process::bin_dir()?.join(name);
        anyhow::ensure!(
            path.is_file(),
            "{word}: no binary {name} in {} (build the workspace binaries first)",
            path.display()
        );
        return Ok(path.display().to_string());
    }
    Ok(word.replace(guide::ETC_TRELLIS, &etc.display().to_string()))
}

/// The value of `key` in `vars` (an environment), or an error naming it.
pub fn var<'a>(vars: &'a [(String, String)], key: &str) -> anyhow::Result<&'a str> {
    vars.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| anyhow::anyhow!("{key} is not set"))
}

/// What both guides' examples must show once running: the client reaches web through its
/// outbound proxy and its fixed port, a caller no TrafficTarget names is refused with 403
/// `forbidden`, web's app saw exactly the client's two calls, and web's proxy took them over mTLS.
#[derive(Debug)]
pub struct ExampleMesh<'a> {
    /// The client's outbound HTTP proxy listener.
    pub client_http: std::net::SocketAddr,
    /// The client's fixed port for web.
    pub client_port: std::net::SocketAddr,
    /// web's URL as apps call it (`http://web.default/hello`).
    pub url: &'a str,
    /// The outbound proxy of a caller that must be refused, and why it must be.
    pub refused: (std::net::SocketAddr, &'a str),
    /// web's app itself (its counts).
    pub app: std::net::SocketAddr,
    /// web's proxy's admin listener (its metrics).
    pub web_admin: std::net::SocketAddr,
    /// The inbound mTLS handshakes web's proxy must have completed at least.
    pub min_handshakes: u64,
}

impl ExampleMesh<'_> {
    /// Makes the calls and checks what the mesh did with them.
    pub async fn check(&self) -> anyhow::Result<()> {
        use anyhow::{Context as _, ensure};
        let via_proxy =
            http::settled(async || http::get_via_proxy(self.client_http, self.url).await).await?;
        ensure!(via_proxy.status == 200, "client -> web: {via_proxy:?}");
        ensure!(
            via_proxy.body.contains(r#""service":"web""#)
                && via_proxy.body.contains(r#""path":"/hello""#),
            "{via_proxy:?}"
        );
        let via_port = http::get(self.client_port, "/port").await?;
        ensure!(
            via_port.status == 200,
            "client -> web on its fixed port: {via_port:?}"
        );
        let (proxy, why) = self.refused;
        let refused = http::get_via_proxy(proxy, self.url).await?;
        ensure!(
            refused.status == 403 && refused.header("x-trellis-error") == Some("forbidden"),
            "{why}: {refused:?}"
        );
        let counts = http::get(self.app, "/_echo/counts").await?;
        ensure!(
            counts.body.contains(r#""total":2"#),
            "web app counts: {counts:?}"
        );
        let metrics = http::get(self.web_admin, "/metrics").await?.body;
        let handshakes: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"trellis_tls_handshakes_total{direction="inbound"} "#))
            .context("web's proxy reports inbound handshakes")?
            .trim()
            .parse()?;
        ensure!(
            handshakes >= self.min_handshakes,
            "web's proxy completed {handshakes} mTLS handshakes (expected at least {})",
            self.min_handshakes
        );
        Ok(())
    }
}
