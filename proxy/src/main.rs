//! trellis-proxy binary.
fn main() {}
