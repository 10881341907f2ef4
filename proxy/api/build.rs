//! Compiles `proto/trellis/proxy/v1/proxy.proto` with protox (pure Rust, no system `protoc`)
//! and generates prost messages plus tonic clients and servers from the descriptor set.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/trellis/proxy/v1/proxy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // The proof is a secret: `CertifyRequest` gets a hand-written Debug that hides it.
        .skip_debug(["trellis.proxy.v1.CertifyRequest"])
        // The policy is most of a profile's size: boxed, a profile (and every enum holding one)
        // stays small when it has none.
        .boxed("trellis.proxy.v1.DestinationProfile.policy")
        .compile_fds(fds)?;
    Ok(())
}
