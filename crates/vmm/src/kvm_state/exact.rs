//! serde for KVM's fixed-size structs that refuses input of the wrong size: kvm-bindings' own
//! `Deserialize` zero-pads short input and drops the excess of long input without a word, which
//! would turn a truncated or padded state file into a silently different vCPU.
//!
//! Use as `#[serde(with = "exact")]` on a field of a kvm-bindings type with the `serde` feature.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Serialize, Serializer};

pub fn serialize<T: Serialize, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    value.serialize(serializer)
}

pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
    let bytes = deserializer.deserialize_bytes(ExactBytes(std::mem::size_of::<T>()))?;
    T::deserialize(de::value::BytesDeserializer::<D::Error>::new(&bytes))
}

/// Accepts exactly this many bytes, as a byte string or a sequence of numbers.
struct ExactBytes(usize);

impl<'de> Visitor<'de> for ExactBytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exactly {} bytes", self.0)
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        if bytes.len() != self.0 {
            return Err(E::invalid_length(bytes.len(), &self));
        }
        Ok(bytes.to_vec())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut bytes = Vec::with_capacity(self.0);
        while let Some(byte) = seq.next_element::<u8>()? {
            if bytes.len() == self.0 {
                // Stop reading at once: an oversized array is not worth buffering.
                return Err(de::Error::invalid_length(self.0 + 1, &self));
            }
            bytes.push(byte);
        }
        if bytes.len() != self.0 {
            return Err(de::Error::invalid_length(bytes.len(), &self));
        }
        Ok(bytes)
    }
}
