//! Round trips of every message type through the frame codec, and decoding of garbage, truncated and
//! oversize input.

use proptest::prelude::*;
use protocol::arbitrary;
use protocol::frame::{FrameDecoder, FrameError, decode_frame, encode_frame, read_frame, write_frame};
use protocol::{ComputeCommand, ComputeResponse, PROTOCOL_VERSION};

const MAX: usize = 1 << 20;

proptest! {
    #[test]
    fn every_command_round_trips_through_a_frame(command in arbitrary::command()) {
        let mut wire = Vec::new();
        encode_frame(&command, MAX, &mut wire).unwrap();
        let (decoded, used) = decode_frame::<ComputeCommand>(&wire, MAX).unwrap().unwrap();
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(decoded, command);
    }

    #[test]
    fn every_response_round_trips_through_a_frame(response in arbitrary::response()) {
        prop_assert!(response.check().is_ok());
        let mut wire = Vec::new();
        encode_frame(&response, MAX, &mut wire).unwrap();
        let (decoded, _) = decode_frame::<ComputeResponse>(&wire, MAX).unwrap().unwrap();
        prop_assert_eq!(decoded, response);
    }

    #[test]
    fn arbitrary_bytes_decode_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame::<ComputeCommand>(&bytes, MAX);
        let _ = decode_frame::<ComputeResponse>(&bytes, MAX);
        let mut decoder = FrameDecoder::new(MAX);
        decoder.push(&bytes);
        while let Ok(Some(_)) = decoder.next_message::<ComputeResponse>() {}
    }

    #[test]
    fn framed_garbage_payloads_are_decode_errors_or_messages(payload in prop::collection::vec(any::<u8>(), 0..256)) {
        // A well-formed header around arbitrary bytes: the payload is decoded for real.
        let mut wire = (payload.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&payload);
        match decode_frame::<ComputeResponse>(&wire, MAX) {
            Ok(Some((_, used))) => prop_assert_eq!(used, wire.len()),
            Ok(None) => prop_assert!(false, "a complete frame must decode or fail"),
            Err(FrameError::Decode(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }

    #[test]
    fn a_message_split_anywhere_decodes_once_complete(command in arbitrary::command(), split in any::<prop::sample::Index>()) {
        let mut wire = Vec::new();
        encode_frame(&command, MAX, &mut wire).unwrap();
        let at = split.index(wire.len());
        let mut decoder = FrameDecoder::new(MAX);
        decoder.push(&wire[..at]);
        prop_assert!(decoder.next_message::<ComputeCommand>().unwrap().is_none());
        decoder.push(&wire[at..]);
        prop_assert_eq!(decoder.next_message::<ComputeCommand>().unwrap(), Some(command));
        prop_assert!(decoder.finish().is_ok());
    }
}

#[test]
fn an_oversize_header_is_rejected_before_any_allocation() {
    // A header claiming 4 GiB must fail at once, without waiting for (or allocating) the payload.
    let wire = u32::MAX.to_le_bytes();
    match decode_frame::<ComputeCommand>(&wire, MAX) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as usize);
            assert_eq!(max, MAX);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let mut reader = &wire[..];
    assert!(matches!(read_frame::<_, ComputeCommand>(&mut reader, MAX), Err(FrameError::TooLarge { .. })));
}

#[test]
fn a_frame_claiming_a_huge_vector_inside_fails_within_the_frame() {
    // bincode varint for a length of 2^40 elements, inside a small frame: decoding must stop at the
    // frame's end rather than reserving memory for the claimed length.
    let payload = [4u8, 0xfd, 0, 0, 0, 0, 1, 0, 0, 0];
    let mut wire = (payload.len() as u32).to_le_bytes().to_vec();
    wire.extend_from_slice(&payload);
    assert!(matches!(decode_frame::<Vec<u64>>(&wire, MAX), Err(FrameError::Decode(_))));
}

#[test]
fn a_stream_cut_inside_a_frame_is_truncated_not_closed() {
    let mut wire = Vec::new();
    write_frame(&mut wire, &ComputeCommand::<u64>::InitializationComplete, MAX).unwrap();
    write_frame(&mut wire, &ComputeCommand::<u64>::AllowWrites, MAX).unwrap();
    let cut = wire.len() - 1;
    let mut reader = &wire[..cut];
    assert_eq!(
        read_frame::<_, ComputeCommand>(&mut reader, MAX).unwrap(),
        ComputeCommand::InitializationComplete
    );
    assert!(matches!(read_frame::<_, ComputeCommand>(&mut reader, MAX), Err(FrameError::Truncated { .. })));

    let mut decoder = FrameDecoder::new(MAX);
    decoder.push(&wire[..cut]);
    assert_eq!(
        decoder.next_message::<ComputeCommand>().unwrap(),
        Some(ComputeCommand::InitializationComplete)
    );
    assert_eq!(decoder.next_message::<ComputeCommand>().unwrap(), None);
    assert!(matches!(decoder.finish(), Err(FrameError::Truncated { expected: 5, got: 4 })));
}

#[test]
fn trailing_bytes_inside_a_frame_are_rejected() {
    let mut wire = Vec::new();
    encode_frame(&ComputeCommand::<u64>::AllowWrites, MAX, &mut wire).unwrap();
    // Grow the declared length by one and append a stray byte.
    let len = u32::from_le_bytes(wire[..4].try_into().unwrap()) + 1;
    wire[..4].copy_from_slice(&len.to_le_bytes());
    wire.push(0);
    assert!(matches!(decode_frame::<ComputeCommand>(&wire, MAX), Err(FrameError::Decode(_))));
}

#[test]
fn a_hello_from_another_version_is_refused_with_both_versions_named() {
    use protocol::frame::{HandshakeError, check_version};
    let error = check_version(PROTOCOL_VERSION + 41).unwrap_err();
    assert_eq!(
        error,
        HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: PROTOCOL_VERSION + 41 }
    );
    let message = error.to_string();
    assert!(message.contains(&PROTOCOL_VERSION.to_string()));
    assert!(message.contains(&(PROTOCOL_VERSION + 41).to_string()));
}

#[test]
fn an_encoded_message_over_the_maximum_is_refused_and_leaves_the_buffer_unchanged() {
    let big = ComputeResponse::<u64>::CommandRejected { command: "x".into(), reason: "y".repeat(2_000) };
    let mut wire = vec![7u8];
    assert!(matches!(encode_frame(&big, 1_000, &mut wire), Err(FrameError::TooLarge { .. })));
    assert_eq!(wire, vec![7u8]);
}
