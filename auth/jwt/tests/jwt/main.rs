//! trellis-jwt's tests: one binary (one link) with a module per area.

mod claims;
mod config;
mod deps;
mod fuzz;
mod refresh;
mod support;
mod verify;
