//! The `trellis` CLI: one subcommand per module; each exposes `Args` (clap) and `run`, which
//! returns the process exit code; `anyhow` errors stop here. The logic lives in the libraries:
//! this crate parses arguments, prints, and (for `demo`) starts the parts the way a user would.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod check;
mod controller;
mod crds;
mod demo;
mod edges;
mod get;
mod install;
mod stat;
mod state;
mod tap;
mod top;
mod validate;

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
    Validate(validate::Args),
    /// Write the SMI CustomResourceDefinitions (every version served, conversion webhook).
    Crds(crds::Args),
    /// Run the local demo mesh (controller, proxy, two versions of an app, a client) on loopback.
    Demo(demo::Args),
    /// Run the controller: SMI policy + discovery -> live proxy configuration.
    Controller(Box<controller::Args>),
    /// Is the controller up, how fresh is each source, any problems? (exit 1 if down or problems)
    Check(check::Args),
    /// The controller's resolved view: splits, targets, routes or services.
    Get(get::Args),
    /// Per workload (or TrafficSplit backend): requests per second, success rate, p50/p95/p99,
    /// from the Prometheus that scrapes the proxies.
    Stat(stat::Args),
    /// A live table of workloads by requests per second, with success rate and p99 (`--once`:
    /// one frame), from the Prometheus that scrapes the proxies.
    Top(top::Args),
    /// Who calls whom: source -> destination workload (and identity), requests per second,
    /// success rate, mTLS, from the Prometheus that scrapes the proxies.
    Edges(edges::Args),
    /// A live, filtered stream of the requests a proxy finishes, from its admin port's /tap
    /// (loopback only: run it beside the proxy).
    Tap(tap::Args),
    /// Print (or --apply) the Kubernetes install: Namespace, SMI CRDs, RBAC, CA Secret,
    /// controller Deployment, Service, PodDisruptionBudget and the sidecar injector.
    Install(Box<install::Args>),
    /// Print (or --apply) the removal of an install, in reverse order, the SMI CRDs last.
    Uninstall(install::UninstallArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => validate::run(&args),
        Command::Crds(args) => crds::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Controller(args) => controller::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Get(args) => get::run(&args),
        Command::Stat(args) => stat::run(&args),
        Command::Top(args) => top::run(&args),
        Command::Edges(args) => edges::run(&args),
        Command::Tap(args) => tap::run(&args),
        Command::Install(args) => install::run(&args),
        Command::Uninstall(args) => install::run_uninstall(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("trellis: {error:#}");
            ExitCode::FAILURE
        }
    }
}
