//! `--apply` in a build without the `kubernetes` feature: no Kubernetes client is linked, so it
//! fails saying so (printing the install still works: it needs only the types).

use std::process::ExitCode;

use super::document::Document;

fn not_built() -> anyhow::Result<ExitCode> {
    anyhow::bail!("--apply: {}", trellis_controller::kubernetes::NOT_BUILT)
}

pub fn apply(_documents: &[Document], _dry_run: bool) -> anyhow::Result<ExitCode> {
    not_built()
}

pub fn delete(_documents: &[Document], _dry_run: bool) -> anyhow::Result<ExitCode> {
    not_built()
}
