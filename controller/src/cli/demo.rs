//! `trellis demo`: the local mesh. It arrives with the controller; until then it says so and
//! exits with status 2, so scripts can tell "not yet" from success.

use std::process::ExitCode;

pub fn run() -> ExitCode {
    println!(
        "trellis demo: the local mesh arrives with the controller work (issue: controller and local mesh)"
    );
    ExitCode::from(2)
}
