//! drover-core: the coordinator's functional core. The domain types, the commands Raft carries,
//! the replicated state and its deterministic `apply`, the scheduler and the other pure choices
//! the leader makes (placement, what is stranded, what has expired), and the bounds they keep.
//!
//! No I/O, no clock, no randomness, no wire types: this crate depends on serde alone, so the
//! compiler keeps it that way. The coordinator (`drover-coordinator`) is the shell around it.

pub mod autoscale;
pub mod command;
pub mod dag;
pub mod lifecycle;
pub mod limits;
pub mod model;
pub mod params;
pub mod placement;
pub mod retention;
pub mod scheduler;
pub mod state;
pub mod stranded;
pub mod view;

/// `#[serde(with = "bytes")]` for a `Vec<u8>` field: serde writes a plain `Vec<u8>` one element at
/// a time, and postcard then spends a call per byte on a snapshot chunk's 3 MiB or an output
/// tail's 4 KiB. As bytes it is one copy. postcard writes both the same way (the length, then
/// the bytes), so nodes of either build read each other's entries and chunks, and no `FORMAT`
/// change is needed.
pub mod serde_bytes {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(Visitor)
    }

    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Formats without a bytes type (JSON) hand over a sequence of numbers.
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}
