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
