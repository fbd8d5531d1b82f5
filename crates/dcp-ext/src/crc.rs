//! CRC-32 (`crc32/1`): a checksum over a record's bytes as stored, recorded
//! as 4 bytes little-endian. CRC-32C (`crc32c/1`), the default checksum,
//! lives in dcp-core (every registry resolves it); this crate re-exports it.

use dcp_core::transform::{check_checksum32, Descriptor};
use dcp_core::{ExtensionFactory, Result, StreamEncoder, StreamTransformExtension, TransformKind};
use std::sync::Arc;

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
        check_checksum32(
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
        d.check_version(1)?;
        d.check_params(&[])?;
        Ok(Arc::new(Crc32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcp_core::Crc32c;

    #[test]
    fn known_values() {
        // Standard check values of both polynomials over "123456789".
        assert_eq!(Crc32c::checksum(b"123456789"), 0xe306_9283);
        assert_eq!(Crc32::checksum(b"123456789"), 0xcbf4_3926);
    }
}
