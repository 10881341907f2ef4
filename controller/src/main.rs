//! The `trellis` CLI: one subcommand per module under `cli/`; the logic lives in the libraries.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cli;

/// Trellis: a service mesh that implements the whole SMI on every platform.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check SMI YAML files and directories: print every error, or one line per resource.
    Validate(cli::validate::Args),
    /// Write the SMI CustomResourceDefinitions (every version served, conversion webhook).
    Crds(cli::crds::Args),
    /// Run the local demo mesh.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => cli::validate::run(&args),
        Command::Crds(args) => cli::crds::run(&args),
        Command::Demo => Ok(cli::demo::run()),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("trellis: {error:#}");
            ExitCode::FAILURE
        }
    }
}
