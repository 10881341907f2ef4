//! `trellis validate <path>...`: load policy YAML files and directories (the SMI kinds and
//! Trellis's TrafficPolicy and Gateway, through `trellis_smi::load`) and report.
//!
//! Errors go to stderr, one per line (`file:line: Kind ns/name: field: message`), and the exit
//! status is 1. Without errors, one summary line per resource goes to stdout, status 0.

use std::path::PathBuf;
use std::process::ExitCode;
use trellis_smi::load::load_paths;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// SMI, TrafficPolicy or Gateway YAML files or directories (searched recursively for *.yaml and *.yml).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let report = load_paths(&args.paths);
    if !report.errors.is_empty() {
        for error in &report.errors {
            eprintln!("{error}");
        }
        let files: std::collections::BTreeSet<_> = report.errors.iter().map(|e| &e.file).collect();
        eprintln!(
            "{} error(s) in {} file(s)",
            report.errors.len(),
            files.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    for resource in &report.resources {
        println!(
            "{}: {} ({}): {}",
            resource.source,
            resource.policy.id(),
            resource.object.api_version(),
            resource.policy.summary()
        );
    }
    for gateway in &report.gateways {
        let document = &gateway.document;
        println!(
            "{}: Gateway {}/{} ({}): https :{}, {} certificate(s), {} route(s)",
            gateway.source,
            document.namespace(),
            document.metadata.name,
            document.api_version,
            document.spec.https.port,
            document.spec.certificates.len(),
            document.spec.routes.len()
        );
    }
    println!(
        "{} resource(s) valid",
        report.resources.len() + report.gateways.len()
    );
    Ok(ExitCode::SUCCESS)
}
