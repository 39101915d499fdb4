//! Integration tests of the framed I/O helpers, over in-memory duplex streams and real sockets: round
//! trips under arbitrary chunking, garbage, oversize and truncated input, the frame limit on both sides
//! and its change mid-connection, batching and the retention bounds, and a cancelled read losing nothing.

use std::time::Duration;

use proptest::prelude::*;
use protocol::frame::{FrameError, RETAINED_DECODER_BYTES, encode_frame};
use tokio::io::{AsyncWriteExt, duplex};
use transport::{DEFAULT_BATCH_BYTES, Frame, FramedRead, FramedWrite, RETAINED_WRITE_BYTES};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Proptest cases from `PROPTEST_CASES` (256 by default, as in proptest).
fn config() -> proptest::test_runner::Config {
    proptest::test_runner::Config { failure_persistence: None, ..proptest::test_runner::Config::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn messages_written_in_batches_arrive_whole_and_in_order_however_the_bytes_are_chunked(
        messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
        chunk in 1usize..50,
        batch in 1usize..2000,
    ) {
        runtime().block_on(async {
            let (client, server) = duplex(chunk);
            let expected = messages.clone();
            let writer = tokio::spawn(async move {
                let mut out = FramedWrite::new(client, 1024).with_batch_bytes(batch);
                for message in &messages {
                    out.encode(message).expect("fits");
                    if out.batch_full() {
                        out.flush().await.expect("flush");
                    }
                }
                out.shutdown().await.expect("shutdown");
            });
            let mut input = FramedRead::new(server, 1024);
            let mut got = Vec::new();
            loop {
                match input.recv::<Vec<u8>>().await {
                    Ok(message) => got.push(message),
                    Err(FrameError::Closed) => break,
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            writer.await.expect("writer");
            prop_assert_eq!(got, expected);
            Ok(())
        })?;
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_reader_and_never_grow_its_buffer_past_a_frame_and_a_chunk(
        bytes in proptest::collection::vec(any::<u8>(), 0..5000),
    ) {
        runtime().block_on(async {
            let (mut client, server) = duplex(64);
            tokio::spawn(async move {
                let _ = client.write_all(&bytes).await;
                let _ = client.shutdown().await;
            });
            let mut input = FramedRead::new(server, 256);
            loop {
                prop_assert!(input.buffered_bytes() <= 256 + 4 + transport::READ_CHUNK_BYTES);
                match input.recv::<(u32, String)>().await {
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            Ok(())
        })?;
    }
}

#[test]
fn a_message_over_the_frame_limit_is_refused_with_its_size_and_nothing_is_written() {
    runtime().block_on(async {
        let (client, server) = duplex(1 << 16);
        let mut out = FramedWrite::new(client, 100);
        out.encode(&"small".to_string()).expect("fits");
        let before = out.buffered_bytes();
        match out.encode(&vec![7u8; 500]) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(max, 100);
                assert_eq!(len, 503, "the real payload size: a three-byte varint length and 500 bytes");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(out.buffered_bytes(), before, "a refused message leaves the batch as it was");
        out.shutdown().await.expect("shutdown");
        let mut input = FramedRead::new(server, 100);
        assert_eq!(input.recv::<String>().await.expect("the first message"), "small");
        assert!(matches!(input.recv::<String>().await, Err(FrameError::Closed)));
    });
}

#[test]
fn an_oversize_header_is_refused_before_its_payload_arrives() {
    runtime().block_on(async {
        let (mut client, server) = duplex(1 << 16);
        // A header declaring 1 GiB, and nothing more.
        client.write_all(&(1u32 << 30).to_le_bytes()).await.expect("write");
        let mut input = FramedRead::new(server, 1 << 20);
        let result = tokio::time::timeout(Duration::from_secs(10), input.recv::<Vec<u8>>()).await;
        match result {
            Ok(Err(FrameError::TooLarge { len, max })) => assert_eq!((len, max), (1 << 30, 1 << 20)),
            other => panic!("expected TooLarge at once, got {other:?}"),
        }
        assert!(input.buffer_capacity_bytes() <= transport::READ_CHUNK_BYTES);
    });
}

#[test]
fn a_stream_ending_inside_a_frame_is_truncated_and_garbage_is_a_decode_error() {
    runtime().block_on(async {
        let mut frame = Vec::new();
        encode_frame(&"complete".to_string(), 64, &mut frame).expect("encode");
        let (mut client, server) = duplex(1 << 16);
        client.write_all(&frame[..frame.len() - 2]).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut input = FramedRead::new(server, 64);
        assert!(matches!(input.recv::<String>().await, Err(FrameError::Truncated { .. })));

        let (mut client, server) = duplex(1 << 16);
        // A frame of three bytes that are not a string of the declared length.
        client.write_all(&[3, 0, 0, 0, 200, 1, 2]).await.expect("write");
        let mut input = FramedRead::new(server, 64);
        assert!(matches!(input.recv::<String>().await, Err(FrameError::Decode(_))));
    });
}

#[test]
fn a_lowered_frame_limit_applies_to_the_next_frame() {
    runtime().block_on(async {
        let (client, server) = duplex(1 << 16);
        let mut out = FramedWrite::new(client, 1 << 16);
        out.encode(&vec![1u8; 10]).expect("fits");
        out.encode(&vec![2u8; 5000]).expect("fits the writer's limit");
        out.flush().await.expect("flush");
        let mut input = FramedRead::new(server, 64);
        assert_eq!(input.recv::<Vec<u8>>().await.expect("small frame"), vec![1u8; 10]);
        input.set_max_frame_bytes(1 << 16);
        assert_eq!(input.recv::<Vec<u8>>().await.expect("raised limit"), vec![2u8; 5000]);
        input.set_max_frame_bytes(64);
        out.encode(&vec![3u8; 5000]).expect("fits the writer's limit");
        out.flush().await.expect("flush");
        assert!(matches!(input.recv::<Vec<u8>>().await, Err(FrameError::TooLarge { max: 64, .. })));
    });
}

#[test]
fn after_a_large_frame_both_sides_give_their_memory_back() {
    runtime().block_on(async {
        let large = vec![9u8; 16 << 20];
        let (client, server) = duplex(1 << 20);
        let expected = large.clone();
        let writer = tokio::spawn(async move {
            let mut out = FramedWrite::new(client, 64 << 20);
            out.encode(&large).expect("fits");
            out.flush().await.expect("flush");
            assert!(
                out.buffer_capacity_bytes() <= RETAINED_WRITE_BYTES.max(2 * DEFAULT_BATCH_BYTES),
                "the writer kept {} bytes",
                out.buffer_capacity_bytes()
            );
            out.send(&vec![1u8]).await.expect("send");
            out
        });
        let mut input = FramedRead::new(server, 64 << 20);
        assert_eq!(input.recv::<Vec<u8>>().await.expect("large"), expected);
        assert_eq!(input.recv::<Vec<u8>>().await.expect("small"), vec![1u8]);
        let _out = writer.await.expect("writer");
        // The next read starts over in a buffer of retained size.
        let recv = tokio::time::timeout(Duration::from_millis(50), input.recv::<Vec<u8>>()).await;
        assert!(recv.is_err(), "nothing more was sent");
        assert!(
            input.buffer_capacity_bytes() <= RETAINED_DECODER_BYTES,
            "the reader kept {} bytes",
            input.buffer_capacity_bytes()
        );
    });
}

#[test]
fn a_cancelled_receive_loses_no_bytes() {
    runtime().block_on(async {
        let (mut client, server) = duplex(1 << 16);
        let mut frame = Vec::new();
        encode_frame(&"split across a cancelled read".to_string(), 1024, &mut frame).expect("encode");
        let mut input = FramedRead::new(server, 1024);
        client.write_all(&frame[..7]).await.expect("first part");
        // The read takes the first part, then waits for more and is cancelled.
        let cancelled = tokio::time::timeout(Duration::from_millis(50), input.recv::<String>()).await;
        assert!(cancelled.is_err(), "the frame is not complete yet");
        client.write_all(&frame[7..]).await.expect("rest");
        assert_eq!(input.recv::<String>().await.expect("whole message"), "split across a cancelled read");
    });
}

#[test]
fn a_pre_encoded_frame_goes_to_several_connections_over_real_sockets() {
    runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let accept = tokio::spawn(async move {
            let mut received = Vec::new();
            for _ in 0..2 {
                let (stream, _) = listener.accept().await.expect("accept");
                let mut input = FramedRead::new(stream, 1024);
                received.push(input.recv::<(u64, String)>().await.expect("message"));
            }
            received
        });
        let frame = Frame::encode(&(7u64, "to all".to_string()), 1024).expect("encode");
        for _ in 0..2 {
            let stream = tokio::net::TcpStream::connect(address).await.expect("connect");
            let mut out = FramedWrite::new(stream, 1024);
            out.push(&frame);
            out.shutdown().await.expect("shutdown");
        }
        let received = accept.await.expect("accept task");
        assert_eq!(received, vec![(7, "to all".to_string()), (7, "to all".to_string())]);
    });
}
