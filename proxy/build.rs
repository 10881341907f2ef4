//! Compiles the small echo gRPC service used by the integration tests (tests/proto), with protox
//! so no system `protoc` is needed. The proxy itself does not use it.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "tests/proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["tests/proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
