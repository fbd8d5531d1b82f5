//! CRC-32C (`crc32c/1`) and CRC-32 (`crc32/1`): checksums over a record's
//! bytes as stored, recorded as 4 bytes little-endian.

use crate::common::{check_params, check_version};
use dcp_core::transform::Descriptor;
use dcp_core::{
    Error, ErrorKind, ExtensionFactory, Result, StreamEncoder, StreamTransformExtension,
    TransformKind,
};
use std::sync::Arc;

/// Compare a recorded 4-byte little-endian checksum with the computed one.
fn check(name: &str, value: &[u8], input: &[u8], expected_len: usize, actual: u32) -> Result<()> {
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
/// ARMv8 CRC). Descriptor `crc32c/1`; kind [`TransformKind::Checksum`].
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
        check(
            Self::DESCRIPTOR,
            value,
            input,
            expected_len,
            crc32c::crc32c(input),
        )?;
        Ok(None)
    }
}

/// Rebuilds [`Crc32c`] from `crc32c/1` (no parameters).
#[derive(Clone, Copy, Debug, Default)]
pub struct Crc32cFactory;

impl ExtensionFactory for Crc32cFactory {
    fn name(&self) -> &str {
        Crc32c::NAME
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        check_version(d, 1)?;
        check_params(d, &[])?;
        Ok(Arc::new(Crc32c))
    }
}

/// CRC-32 (IEEE, as in zip and gzip), SIMD accelerated by `crc32fast`.
/// Descriptor `crc32/1`; kind [`TransformKind::Checksum`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crc32;

impl Crc32 {
    /// The descriptor name.
    pub const NAME: &'static str = "crc32";
    /// The descriptor this transform records.
    pub const DESCRIPTOR: &'static str = "crc32/1";

    /// A CRC-32 checksum transform.
    pub fn new() -> Self {
        Crc32
    }

    /// The CRC-32 of `data`, as this transform records it (before the
    /// little-endian encoding).
    pub fn checksum(data: &[u8]) -> u32 {
        crc32fast::hash(data)
    }
}

struct Crc32Encoder(crc32fast::Hasher);

impl StreamEncoder for Crc32Encoder {
    fn update(&mut self, input: &[u8], _out: &mut Vec<u8>) -> Result<()> {
        self.0.update(input);
        Ok(())
    }
    fn finish(self: Box<Self>, _out: &mut Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.0.finalize().to_le_bytes().to_vec())
    }
}

impl StreamTransformExtension for Crc32 {
    fn descriptor(&self) -> String {
        Self::DESCRIPTOR.to_string()
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Checksum
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(Crc32Encoder(crc32fast::Hasher::new())))
    }
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        check(
            Self::DESCRIPTOR,
            value,
            input,
            expected_len,
            crc32fast::hash(input),
        )?;
        Ok(None)
    }
}

/// Rebuilds [`Crc32`] from `crc32/1` (no parameters).
#[derive(Clone, Copy, Debug, Default)]
pub struct Crc32Factory;

impl ExtensionFactory for Crc32Factory {
    fn name(&self) -> &str {
        Crc32::NAME
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        check_version(d, 1)?;
        check_params(d, &[])?;
        Ok(Arc::new(Crc32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Standard check values of both polynomials over "123456789".
        assert_eq!(Crc32c::checksum(b"123456789"), 0xe306_9283);
        assert_eq!(Crc32::checksum(b"123456789"), 0xcbf4_3926);
    }
}
