//! The gRPC codec of the gateway's API: prost's encoding, and a decoder whose failures are the client's
//! (INVALID_ARGUMENT / MALFORMED_REQUEST with prost's field path, not tonic's INTERNAL) and which turns the
//! request guard's refusals (`guard.rs`) into their statuses.

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use super::GatewayError;
use super::guard::{REFUSAL_MARK, Refusal};

/// The codec the generated client and server use (`build.rs` names it).
#[derive(Debug, Clone, Copy)]
pub struct GatewayCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for GatewayCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for GatewayCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = GatewayDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        GatewayDecoder(PhantomData)
    }
}

/// Decodes `U`, or answers the refusal the guard put in its place.
#[derive(Debug, Clone, Copy)]
pub struct GatewayDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for GatewayDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if buf.has_remaining() && buf.chunk()[0] == REFUSAL_MARK {
            let mut payload = vec![0; buf.remaining()];
            buf.copy_to_slice(&mut payload);
            return Err(refused(Refusal::parse(&payload[1..])));
        }
        U::decode(buf).map(Some).map_err(|error| {
            refused(Refusal::Malformed {
                field: None,
                detail: error.to_string(),
            })
        })
    }
}

/// The status of a refused message; the refusal rides along as its source, so a stream can end with it
/// after its acks (`stream.rs`).
fn refused(refusal: Refusal) -> Status {
    let mut status = GatewayError::from(refusal.clone()).to_status();
    status.set_source(Arc::new(refusal));
    status
}

impl From<Refusal> for GatewayError {
    fn from(refusal: Refusal) -> Self {
        refusal.into_error()
    }
}
