//! Compiles `proto/` with protox (a pure-Rust protobuf compiler: no system `protoc`) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/eventhub/gateway/v1/gateway.proto"];
    let file_descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(file_descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
