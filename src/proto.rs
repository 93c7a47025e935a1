//! The generated protobuf types and gRPC service stubs of `proto/`.

/// `eventhub.gateway.v1`: the gateway's public API.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("eventhub.gateway.v1");
}
