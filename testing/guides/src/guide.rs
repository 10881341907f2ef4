//! The shell blocks of a guide that a test runs as written: a fenced `sh` block right after a
//! `<!-- guide-test: NAME -->` line. Only `/etc/trellis` is moved (to the test's directory), so
//! the commands a reader copies are the commands the test runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Where the guides put Trellis's files on a host.
pub const ETC_TRELLIS: &str = "/etc/trellis";

/// Every marked block of `markdown`, by name.
pub fn blocks(markdown: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- guide-test:")
            .and_then(|rest| rest.strip_suffix("-->"))
            .map(str::trim)
        else {
            continue;
        };
        match lines.next() {
            Some((_, fence)) if fence.trim() == "```sh" => {}
            _ => bail!(
                "line {}: the marker guide-test: {name} must be followed by a ```sh block",
                n + 1
            ),
        }
        let mut script = String::new();
        loop {
            match lines.next() {
                Some((_, l)) if l.trim() == "```" => break,
                Some((_, l)) => {
                    script.push_str(l);
                    script.push('\n');
                }
                None => bail!("line {}: the block guide-test: {name} is not closed", n + 1),
            }
        }
        if found.insert(name.to_owned(), script).is_some() {
            bail!("line {}: two blocks named guide-test: {name}", n + 1);
        }
    }
    Ok(found)
}

/// The block `name` of the guide at `guide` (relative to the workspace root).
pub fn block(guide: &str, name: &str) -> anyhow::Result<String> {
    let markdown = crate::read(guide)?;
    blocks(&markdown)
        .with_context(|| guide.to_owned())?
        .remove(name)
        .with_context(|| format!("{guide} has no block marked guide-test: {name}"))
}

/// Runs `script` with `sh -eu` in `cwd`, `/etc/trellis` moved to `etc`, the workspace binaries
/// first on `PATH`. Returns its stdout; fails with both streams when it fails.
pub fn run(script: &str, etc: &Path, cwd: &Path, bin_dir: &Path) -> anyhow::Result<String> {
    let script = script.replace(ETC_TRELLIS, &etc.display().to_string());
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-eu", "-c", &script])
        .current_dir(cwd)
        .env("PATH", path)
        .output()
        .context("running sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "the guide's block failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Fails with what to install when `tool` is not on `PATH` (the guides' blocks use it).
pub fn require_tool(tool: &str, why: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("`{tool}` is not installed ({why}): install it (Debian: apt-get install {tool})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_blocks_are_found_and_bad_markers_are_refused() {
        let md = "text\n<!-- guide-test: one -->\n```sh\necho 1\necho 2\n```\n```sh\nnot marked\n```\n<!-- guide-test: two -->\n```sh\n```\n";
        let found = blocks(md).unwrap();
        assert_eq!(found["one"], "echo 1\necho 2\n");
        assert_eq!(found["two"], "");
        assert_eq!(found.len(), 2);
        assert!(
            blocks("<!-- guide-test: x -->\n```text\n```\n")
                .unwrap_err()
                .to_string()
                .contains("must be followed by a ```sh block")
        );
        assert!(
            blocks("<!-- guide-test: x -->\n```sh\necho\n")
                .unwrap_err()
                .to_string()
                .contains("not closed")
        );
    }

    #[test]
    fn a_block_runs_with_etc_trellis_moved_and_failures_show_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            "mkdir -p /etc/trellis/x && echo hi > /etc/trellis/x/f && cat /etc/trellis/x/f",
            dir.path(),
            dir.path(),
            dir.path(),
        )
        .unwrap();
        assert_eq!(out, "hi\n");
        assert!(dir.path().join("x/f").is_file());
        let err = run("echo visible; false", dir.path(), dir.path(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("visible"), "{err}");
    }
}
