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
    /// Run the local demo mesh (controller, proxy, two versions of an app, a client) on loopback.
    Demo(cli::demo::Args),
    /// Run the controller: SMI policy + discovery -> live proxy configuration.
    Controller(Box<cli::controller::Args>),
    /// Is the controller up, how fresh is each source, any problems? (exit 1 if down or problems)
    Check(cli::check::Args),
    /// The controller's resolved view: splits, targets, routes or services.
    Get(cli::get::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => cli::validate::run(&args),
        Command::Crds(args) => cli::crds::run(&args),
        Command::Demo(args) => cli::demo::run(&args),
        Command::Controller(args) => cli::controller::run(&args),
        Command::Check(args) => cli::check::run(&args),
        Command::Get(args) => cli::get::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("trellis: {error:#}");
            ExitCode::FAILURE
        }
    }
}
