//! The generated protobuf types and gRPC service stubs of `proto/`.
//!
//! The modules nest as the protobuf packages do: prost names a type of another package by a relative
//! path, so `eventhub.gateway.v1` reaches `google.rpc.Status` as `super::super::super::google::rpc::Status`.
//! `google.protobuf` types map to `prost_types`.

/// The gateway's own packages.
pub mod eventhub {
    /// `eventhub.gateway`.
    pub mod gateway {
        /// `eventhub.gateway.v1`: the gateway's public API.
        #[allow(clippy::all, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("eventhub.gateway.v1");
        }
    }
}

/// Google's packages that the API uses.
pub mod google {
    /// `google.rpc`: `Status`, `Code` and the error details (`ErrorInfo`, `BadRequest`, `RetryInfo`,
    /// `QuotaFailure`, ...), vendored under `proto/google/rpc/`.
    // Google's comments hold `<ip>` and `<owner>` placeholders rustdoc would read as HTML.
    #[allow(clippy::all, missing_docs, rustdoc::invalid_html_tags)]
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// The CloudEvents project's packages.
pub mod io {
    /// `io.cloudevents`.
    pub mod cloudevents {
        /// `io.cloudevents.v1`: the CloudEvents protobuf format (`CloudEvent`), vendored under
        /// `proto/io_cloudevents/v1/`; the API's `Event.cloud_event`.
        #[allow(clippy::all, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("io.cloudevents.v1");
        }
    }
}

pub use eventhub::gateway::v1;

/// The encoded `FileDescriptorSet` of `proto/` (with its imports), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));
