//! [`Crc32c`]: the checksum every save records by default (`crc32c/1`).
//!
//! It lives in dcp-core so that every writer writes it and every registry
//! resolves it, with no other crate: a checkpoint is verifiable wherever it
//! is read.

use super::{Descriptor, ExtensionFactory, StreamEncoder, StreamTransformExtension, TransformKind};
use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

/// Compare a checksum recorded as 4 bytes little-endian (`value`) with
/// `actual`, computed over `input`, which must be `expected_len` bytes long.
/// A different length is [`ErrorKind::Corrupt`]; a different checksum
/// [`ErrorKind::ChecksumMismatch`], naming `name` and both values.
pub fn check_checksum32(
    name: &str,
    value: &[u8],
    input: &[u8],
    expected_len: usize,
    actual: u32,
) -> Result<()> {
    if input.len() != expected_len {
        return Err(Error::corrupt(format!(
            "{name}: record has {} bytes, expected {expected_len}",
            input.len()
        )));
    }
    let expected: [u8; 4] = value.try_into().map_err(|_| {
        Error::corrupt(format!(
            "{name}: recorded checksum has {} bytes, expected 4",
            value.len()
        ))
    })?;
    let expected = u32::from_le_bytes(expected);
    if expected != actual {
        return Err(Error::new(
            ErrorKind::ChecksumMismatch,
            format!(
                "{name} checksum mismatch over {} bytes: expected {expected:#010x}, actual {actual:#010x}",
                input.len()
            ),
        ));
    }
    Ok(())
}

/// CRC-32C (Castagnoli), hardware accelerated where the CPU has it (SSE 4.2,
/// ARMv8 CRC). Descriptor `crc32c/1`; kind [`TransformKind::Checksum`]:
/// records 4 bytes little-endian and leaves the stored bytes as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crc32c;

impl Crc32c {
    /// The descriptor name.
    pub const NAME: &'static str = "crc32c";
    /// The descriptor this transform records.
    pub const DESCRIPTOR: &'static str = "crc32c/1";

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

struct Crc32cEncoder(u32);

impl StreamEncoder for Crc32cEncoder {
    fn update(&mut self, input: &[u8], _out: &mut Vec<u8>) -> Result<()> {
        self.0 = crc32c::crc32c_append(self.0, input);
        Ok(())
    }
    fn finish(self: Box<Self>, _out: &mut Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.0.to_le_bytes().to_vec())
    }
}

impl StreamTransformExtension for Crc32c {
    fn descriptor(&self) -> String {
        Self::DESCRIPTOR.to_string()
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Checksum
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(Crc32cEncoder(0)))
    }
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        check_checksum32(
            Self::DESCRIPTOR,
            value,
            input,
            expected_len,
            crc32c::crc32c(input),
        )?;
        Ok(None)
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
        d.check_version(1)?;
        d.check_params(&[])?;
        Ok(Arc::new(Crc32c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
