//! Compiles `proto/` with protox (a pure-Rust protobuf compiler: no system `protoc`) and tonic-prost-build.
//!
//! Besides the gateway's API this compiles the vendored `google.rpc` protos that the API's error model
//! uses (`Status`, `Code`, and the error details), so they land in `OUT_DIR/google.rpc.rs`, and (as an import
//! of the API) the vendored CloudEvents protobuf format, in `OUT_DIR/io.cloudevents.v1.rs`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/eventhub/gateway/v1/gateway.proto",
        "proto/google/rpc/code.proto",
        "proto/google/rpc/error_details.proto",
    ];
    let file_descriptors = protox::compile(protos, ["proto"])?;
    // Served by gRPC reflection, so grpcurl and Postman see the documented API.
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("file_descriptor_set.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    tonic_prost_build::configure()
        // Binary bodies decode as `Bytes` slices of the received buffer: no copy before the AMQP encoding.
        .bytes(".eventhub.gateway.v1.Event.binary")
        .bytes(".io.cloudevents.v1.CloudEvent.binary_data")
        // A CloudEvent is far larger than the other bodies: boxed, so every `Event` does not grow by its size.
        .boxed(".eventhub.gateway.v1.Event.body.cloud_event")
        // Decode failures are the client's (INVALID_ARGUMENT), and the request guard's refusals become statuses.
        .codec_path("crate::gateway::codec::GatewayCodec")
        .compile_fds(file_descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
