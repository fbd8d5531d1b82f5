//! [`Crc32c`]: the checksum every save records by default (`crc32c/1`).
//!
//! It lives in dcp-core so that every writer writes it and every registry
//! resolves it, with no other crate: a checkpoint is verifiable wherever it
//! is read.

use super::checksum32::{build_checksum32, Checksum32};
use super::{Descriptor, ExtensionFactory, StreamTransformExtension};
use crate::error::Result;
use std::sync::Arc;

/// CRC-32C (Castagnoli), hardware accelerated where the CPU has it (SSE 4.2,
/// ARMv8 CRC). Descriptor `crc32c/1`; kind [`TransformKind::Checksum`](super::TransformKind::Checksum):
/// records 4 bytes little-endian and leaves the stored bytes as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crc32c;

impl Crc32c {
    /// A CRC-32C checksum transform.
    pub fn new() -> Self {
        Crc32c
    }

    /// The CRC-32C of `data`, as this transform records it (before the
    /// little-endian encoding).
    pub fn checksum(data: &[u8]) -> u32 {
        crc32c::crc32c(data)
    }
}

impl Checksum32 for Crc32c {
    const NAME: &'static str = "crc32c";
    const DESCRIPTOR: &'static str = "crc32c/1";
    fn append(state: u32, data: &[u8]) -> u32 {
        crc32c::crc32c_append(state, data)
    }
}

/// Rebuilds [`Crc32c`] from `crc32c/1`; refuses other versions and any
/// parameter. Every [`ExtensionRegistry`](super::ExtensionRegistry) holds it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Crc32cFactory;

impl ExtensionFactory for Crc32cFactory {
    fn name(&self) -> &str {
        Crc32c::NAME
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        build_checksum32::<Crc32c>(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn crc32c_round_trips_and_detects_damage() {
        // RFC 3720's check value for "123456789".
        assert_eq!(Crc32c::checksum(b"123456789"), 0xe306_9283);
        let t = Crc32c;
        let mut enc = t.encoder().unwrap();
        let mut out = Vec::new();
        enc.update(b"1234", &mut out).unwrap();
        enc.update(b"56789", &mut out).unwrap();
        assert!(out.is_empty(), "a checksum emits no bytes");
        let value = enc.finish(&mut out).unwrap();
        assert_eq!(value, 0xe306_9283u32.to_le_bytes());
        assert_eq!(t.decode(b"123456789", &value, 9).unwrap(), None);
        let e = t.decode(b"123456780", &value, 9).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch);
        assert!(e.message().contains("crc32c/1 checksum mismatch"), "{e}");
        let e = t.decode(b"12345678", &value, 9).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let e = Crc32cFactory
            .build(&Descriptor::parse("crc32c/2").unwrap())
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let e = Crc32cFactory
            .build(&Descriptor::parse("crc32c/1:x=1").unwrap())
            .err()
            .unwrap();
        assert!(e.message().contains("unknown parameter \"x\""), "{e}");
    }
}
