//! The bytes of everything Raft keeps or sends: log entries, votes, snapshots and the payloads
//! of Raft RPCs. postcard (compact, no field names, several times faster than JSON on this path),
//! behind a one-byte format version so a later build can tell old bytes from new.
//!
//! postcard has no field names, so a persisted type never changes shape under the same version:
//! commands gain new enum variants at the end (old bytes still decode), and any other change
//! bumps `FORMAT` with a decoder kept for the old one.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The format this build writes (and the only one it reads).
pub const FORMAT: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("no bytes to decode")]
    Empty,
    #[error(
        "encoded in format {0}, this build reads format {FORMAT} (written by another Drover version?)"
    )]
    UnknownFormat(u8),
    #[error("malformed encoding: {0}")]
    Malformed(#[from] postcard::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_extend(value, vec![FORMAT])?)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&FORMAT, rest)) => Ok(postcard::from_bytes(rest)?),
        Some((&other, _)) => Err(CodecError::UnknownFormat(other)),
    }
}

/// `#[serde(with = "bytes")]` for byte fields; it lives with the types in `drover_core`.
pub use drover_core::serde_bytes as bytes;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Request};

    #[test]
    fn bytes_fields_encode_as_a_plain_vec_did_and_read_from_json_too() {
        #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
        struct AsBytes {
            #[serde(with = "bytes")]
            data: Vec<u8>,
            after: u32,
        }
        #[derive(Serialize, serde::Deserialize)]
        struct AsVec {
            data: Vec<u8>,
            after: u32,
        }
        // Lengths either side of a varint byte boundary.
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let new = AsBytes {
                data: data.clone(),
                after: 9,
            };
            let old = AsVec { data, after: 9 };
            let bytes = encode(&new).unwrap();
            assert_eq!(bytes, encode(&old).unwrap(), "len {len}");
            assert_eq!(decode::<AsBytes>(&bytes).unwrap(), new);
            let json = serde_json::to_string(&old).unwrap();
            assert_eq!(serde_json::to_string(&new).unwrap(), json);
            assert_eq!(serde_json::from_str::<AsBytes>(&json).unwrap(), new);
        }
        assert!(matches!(
            decode::<AsBytes>(
                &encode(&AsVec {
                    data: vec![1; 10],
                    after: 1
                })
                .unwrap()[..8]
            ),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn round_trips_and_refuses_other_formats() {
        let req = Request {
            now_us: 7,
            commands: vec![Command::AgentLost {
                name: "a".into(),
                reason: "r".into(),
            }]
            .into(),
        };
        // Logs and snapshots written when the commands were a Vec read the same.
        #[derive(Serialize)]
        struct AsWritten<'a> {
            now_us: u64,
            commands: Vec<&'a Command>,
        }
        let as_written = AsWritten {
            now_us: 7,
            commands: req.commands.iter().collect(),
        };
        assert_eq!(encode(&req).unwrap(), encode(&as_written).unwrap());
        let bytes = encode(&req).unwrap();
        assert_eq!(bytes[0], FORMAT);
        assert_eq!(decode::<Request>(&bytes).unwrap(), req);
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(matches!(
            decode::<Request>(&other),
            Err(CodecError::UnknownFormat(9))
        ));
        assert!(matches!(decode::<Request>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<Request>(&bytes[..bytes.len() - 1]),
            Err(CodecError::Malformed(_))
        ));
    }
}

#[cfg(test)]
mod entry_tests {
    use super::*;
    use crate::raft::{Entry, LogId};
    use openraft::{BasicNode, EntryPayload, Membership};
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn entries_round_trip() {
        let log_id = crate::raft::log_id(1, 2, 3);
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Membership(
                Membership::new(
                    vec![BTreeSet::from([1u64, 2])],
                    BTreeMap::from([(1u64, BasicNode::new("a")), (2, BasicNode::new("b"))]),
                )
                .unwrap(),
            ),
        ] {
            let e = Entry { log_id, payload };
            let b = encode(&e).unwrap();
            let d: Entry = decode(&b).unwrap();
            assert_eq!(d.log_id, e.log_id);
        }
        let v: Option<LogId> = Some(log_id);
        let d: Option<LogId> = decode(&encode(&v).unwrap()).unwrap();
        assert_eq!(d, v);
    }
}
