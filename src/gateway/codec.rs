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
        decode(buf).map(Some)
    }
}

/// One message from `buf` (a whole message: tonic hands the decoder exactly one).
fn decode<U: Message + Default>(buf: &mut impl Buf) -> Result<U, Status> {
    if buf.has_remaining() && buf.chunk()[0] == REFUSAL_MARK {
        let mut payload = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut payload);
        return Err(refused(Refusal::parse(&payload[1..])));
    }
    U::decode(buf).map_err(|error| {
        refused(Refusal::Malformed {
            field: None,
            detail: error.to_string(),
        })
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::google::rpc;
    use crate::proto::v1;
    use std::error::Error as _;
    use tonic::Code;

    fn decode(mut bytes: &[u8]) -> Result<Option<v1::SendEventRequest>, Status> {
        super::decode(&mut bytes).map(Some)
    }

    fn reason(status: &Status) -> String {
        let details = rpc::Status::decode(status.details()).unwrap();
        let info = details
            .details
            .iter()
            .find(|any| any.type_url.ends_with("ErrorInfo"))
            .unwrap();
        rpc::ErrorInfo::decode(info.value.as_slice())
            .unwrap()
            .reason
    }

    #[test]
    fn undecodable_bytes_are_the_clients_error() {
        let error = decode(&[0x0a, 0x02, 0xc3, 0x28]).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert_eq!(reason(&error), "MALFORMED_REQUEST");
        assert!(error.message().contains("UTF-8"), "{error:?}");
        let ok = v1::SendEventRequest {
            event_hub: "eh1".into(),
            event: None,
        };
        assert_eq!(decode(&ok.encode_to_vec()).unwrap(), Some(ok));
    }

    #[test]
    fn a_refusal_becomes_its_status_and_rides_along_as_the_source() {
        let refusal = Refusal::Invalid {
            field: "events".into(),
            reason: "at most 1 events".into(),
        };
        let mut payload = vec![REFUSAL_MARK];
        payload.extend(serde_json::to_vec(&refusal).unwrap());
        let error = decode(&payload).unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        assert_eq!(reason(&error), "INVALID_EVENT");
        let source = error
            .source()
            .and_then(|source| source.downcast_ref::<Refusal>());
        assert_eq!(source, Some(&refusal));
        let too_large = Refusal::TooLarge {
            limit: 10,
            detail: "the message is 11 bytes".into(),
        };
        let mut payload = vec![REFUSAL_MARK];
        payload.extend(serde_json::to_vec(&too_large).unwrap());
        let error = decode(&payload).unwrap_err();
        assert_eq!(error.code(), Code::OutOfRange);
        assert_eq!(reason(&error), "REQUEST_TOO_LARGE");
    }
}
