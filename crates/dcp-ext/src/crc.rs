//! CRC-32 (`crc32/1`): a checksum over a record's bytes as stored, recorded
//! as 4 bytes little-endian. CRC-32C (`crc32c/1`), the default checksum,
//! lives in dcp-core (every registry resolves it); this crate re-exports it.

use dcp_core::transform::{build_checksum32, Checksum32, Descriptor};
use dcp_core::{ExtensionFactory, Result, StreamTransformExtension};
use std::sync::Arc;

/// CRC-32 (IEEE, as in zip and gzip), SIMD accelerated by `crc32fast`.
/// Descriptor `crc32/1`; a [`Checksum32`], so a transform of kind
/// [`TransformKind::Checksum`](dcp_core::TransformKind::Checksum).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Crc32;

impl Crc32 {
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

impl Checksum32 for Crc32 {
    const NAME: &'static str = "crc32";
    const DESCRIPTOR: &'static str = "crc32/1";
    fn append(state: u32, data: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new_with_initial(state);
        h.update(data);
        h.finalize()
    }
}

/// Rebuilds [`Crc32`] from `crc32/1`; refuses other versions and any
/// parameter.
#[derive(Clone, Copy, Debug, Default)]
pub struct Crc32Factory;

impl ExtensionFactory for Crc32Factory {
    fn name(&self) -> &str {
        Crc32::NAME
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        build_checksum32::<Crc32>(d)
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
        // Extending a running checksum gives the checksum of the whole.
        assert_eq!(
            Crc32::append(Crc32::append(0, b"1234"), b"56789"),
            0xcbf4_3926
        );
    }
}
