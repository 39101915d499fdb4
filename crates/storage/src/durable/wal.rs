//! The write-ahead log's record format: what one record is, how it is framed on disk, and how a segment
//! file is scanned back, stopping at a torn or corrupt tail.
//!
//! **Format.** A segment is a sequence of records. A record is `[len: u32 LE][crc32(payload): u32 LE]
//! [payload]`, where the payload is one [`LogRecord`] encoded with `protocol::frame::bincode_options()`.
//! **What this is not:** file management (segments, rotation, checkpoints, fsync): that is
//! [`crate::durable::DataDir`].
//!
//! **Invariant.** [`scan`] returns exactly the records whose header, checksum and payload are intact, in
//! order, up to the first one that is not; a record is never half-returned. The byte offset it stops at is
//! where the writer truncates the segment before appending again.
//!
//! **Tests.** Unit tests at the bottom; `tests/it/durability.rs` truncates and corrupts a log at every byte
//! offset of its last record.

use std::io::{self, Read};

use bincode::Options;
use frontiers::{Antichain, ReadPolicy};
use protocol::{GlobalId, RelationDesc};
use serde::{Deserialize, Serialize};

use crate::api::AppendRequest;

/// The bytes before a record's payload: its length and checksum.
pub const RECORD_HEADER_BYTES: usize = 8;

/// One logged operation, as read back. Each is applied atomically at recovery.
///
/// [`LogRecordRef`] is the borrowed twin the writer encodes; both have the same encoding.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum LogRecord {
    /// A collection was created.
    Create {
        /// The collection.
        id: GlobalId,
        /// Its schema.
        desc: RelationDesc,
    },
    /// A collection was dropped.
    Drop {
        /// The collection.
        id: GlobalId,
    },
    /// One atomic, validated append (possibly to several collections).
    Append(Vec<AppendRequest>),
    /// A collection's since advanced (durable with the next commit; recovery moves the since at least
    /// this far).
    Since {
        /// The collection.
        id: GlobalId,
        /// Its new since.
        since: Antichain<u64>,
    },
    /// A collection's read policy was replaced.
    Policy {
        /// The collection.
        id: GlobalId,
        /// The new policy.
        policy: ReadPolicy<u64>,
    },
}

/// The borrowed form of [`LogRecord`] that the writer encodes without copying the appended rows.
/// Variants, order and fields match [`LogRecord`] exactly, so both encode alike.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum LogRecordRef<'a> {
    /// See [`LogRecord::Create`].
    Create {
        /// The collection.
        id: GlobalId,
        /// Its schema.
        desc: &'a RelationDesc,
    },
    /// See [`LogRecord::Drop`].
    Drop {
        /// The collection.
        id: GlobalId,
    },
    /// See [`LogRecord::Append`].
    Append(&'a [AppendRequest]),
    /// See [`LogRecord::Since`].
    Since {
        /// The collection.
        id: GlobalId,
        /// Its new since.
        since: &'a Antichain<u64>,
    },
    /// See [`LogRecord::Policy`].
    Policy {
        /// The collection.
        id: GlobalId,
        /// The new policy.
        policy: &'a ReadPolicy<u64>,
    },
}

/// Appends one framed record to `out`. Fails only if the record does not fit the `u32` length field.
pub fn encode_record(record: &LogRecordRef<'_>, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    if let Err(error) = protocol::frame::bincode_options().serialize_into(&mut *out, record) {
        out.truncate(start);
        return Err(io::Error::other(format!("cannot encode a log record: {error}")));
    }
    let payload = &out[start + RECORD_HEADER_BYTES..];
    let Ok(len) = u32::try_from(payload.len()) else {
        out.truncate(start);
        return Err(io::Error::other("a log record exceeds 4 GiB"));
    };
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Why [`scan`] stopped before the end of the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailProblem {
    /// The segment ends inside a record's header or payload (a torn write).
    Torn,
    /// A record's checksum does not match its payload.
    Checksum,
    /// A record's payload is not a valid [`LogRecord`].
    Decode(String),
}

/// The result of scanning one segment.
#[derive(Debug)]
pub struct Scan {
    /// The intact records, in order.
    pub records: Vec<LogRecord>,
    /// The byte offset just past the last intact record.
    pub valid_len: u64,
    /// Why the scan stopped before the end of the data, if it did.
    pub problem: Option<TailProblem>,
}

/// Reads records from `reader` (a segment of `total_len` bytes) until the end or the first record that is
/// torn or corrupt, calling `each` on every intact record as it is decoded. Never allocates more than the
/// segment's remaining length for one record.
pub fn scan_with<R: Read>(
    reader: &mut R,
    total_len: u64,
    mut each: impl FnMut(LogRecord),
) -> io::Result<(u64, Option<TailProblem>)> {
    let mut offset: u64 = 0;
    let mut payload = Vec::new();
    loop {
        if offset == total_len {
            return Ok((offset, None));
        }
        let mut header = [0u8; RECORD_HEADER_BYTES];
        if total_len - offset < RECORD_HEADER_BYTES as u64 {
            return Ok((offset, Some(TailProblem::Torn)));
        }
        reader.read_exact(&mut header)?;
        let len = u64::from(u32::from_le_bytes(header[..4].try_into().expect("four bytes")));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("four bytes"));
        if total_len - offset - (RECORD_HEADER_BYTES as u64) < len {
            return Ok((offset, Some(TailProblem::Torn)));
        }
        payload.clear();
        payload.resize(usize::try_from(len).expect("a u32 length fits usize"), 0);
        reader.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != crc {
            return Ok((offset, Some(TailProblem::Checksum)));
        }
        match protocol::frame::bincode_options().with_limit(len).deserialize::<LogRecord>(&payload) {
            Ok(record) => each(record),
            Err(error) => return Ok((offset, Some(TailProblem::Decode(error.to_string())))),
        }
        offset += RECORD_HEADER_BYTES as u64 + len;
    }
}

/// [`scan_with`] into a vector.
pub fn scan(bytes: &[u8]) -> Scan {
    let mut records = Vec::new();
    let mut reader = bytes;
    let (valid_len, problem) = scan_with(&mut reader, bytes.len() as u64, |r| records.push(r))
        .unwrap_or_else(|e| panic!("reading from a byte slice within its length cannot fail: {e}"));
    Scan { records, valid_len, problem }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ColumnType, Datum, Row, ScalarType};

    fn records() -> Vec<u8> {
        let desc = RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]);
        let append = vec![AppendRequest {
            id: GlobalId::User(1),
            updates: vec![(Row::pack([Datum::Int64(7)]), 3, 1)],
            expected_upper: Antichain::from_elem(0),
            new_upper: Antichain::from_elem(5),
        }];
        let mut out = Vec::new();
        encode_record(&LogRecordRef::Create { id: GlobalId::User(1), desc: &desc }, &mut out).unwrap();
        encode_record(&LogRecordRef::Append(&append), &mut out).unwrap();
        let since = Antichain::from_elem(2);
        encode_record(&LogRecordRef::Since { id: GlobalId::User(1), since: &since }, &mut out).unwrap();
        let policy = ReadPolicy::NoPolicy;
        encode_record(&LogRecordRef::Policy { id: GlobalId::User(1), policy: &policy }, &mut out).unwrap();
        encode_record(&LogRecordRef::Drop { id: GlobalId::User(1) }, &mut out).unwrap();
        out
    }

    #[test]
    fn borrowed_records_decode_as_owned_records() {
        let bytes = records();
        let scan = scan(&bytes);
        assert_eq!(scan.problem, None);
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert_eq!(scan.records.len(), 5);
        assert!(matches!(&scan.records[1], LogRecord::Append(requests) if requests[0].updates.len() == 1));
        assert_eq!(scan.records[4], LogRecord::Drop { id: GlobalId::User(1) });
    }

    #[test]
    fn a_scan_stops_at_the_first_damaged_record() {
        let bytes = records();
        let whole = scan(&bytes);
        let first_len = {
            let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as u64;
            RECORD_HEADER_BYTES as u64 + len
        };
        let cases: Vec<(Vec<u8>, u64, Option<TailProblem>)> = vec![
            (bytes[..3].to_vec(), 0, Some(TailProblem::Torn)),
            (bytes[..first_len as usize + 9].to_vec(), first_len, Some(TailProblem::Torn)),
            (
                {
                    let mut b = bytes.clone();
                    b[first_len as usize + RECORD_HEADER_BYTES] ^= 0xff;
                    b
                },
                first_len,
                Some(TailProblem::Checksum),
            ),
            (bytes.clone(), whole.valid_len, None),
        ];
        for (input, valid_len, problem) in cases {
            let scan = scan(&input);
            assert_eq!((scan.valid_len, scan.problem), (valid_len, problem));
        }
    }
}
