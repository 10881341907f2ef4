//! The subcommands of the `trellis` binary, one module each. Each exposes `Args` (clap) and
//! `run`, which returns the process exit code; `anyhow` errors stop at `main`.

pub mod check;
pub mod controller;
pub mod crds;
pub mod demo;
pub mod get;
pub mod state;
pub mod validate;
