//! dcp-ext: stream extensions for dcp checkpoints: compression (zstd, lz4)
//! for smaller checkpoints on slow or metered storage, and checksums
//! (CRC-32C, CRC-32) so that what a load returns is what was saved.
//!
//! Each transform implements [`dcp_core::StreamTransformExtension`] and
//! records a stable descriptor per record in the checkpoint's metadata; a
//! reader rebuilds it from the descriptor through an
//! [`ExtensionRegistry`] (use [`registry`], or [`register_all`] on your own).
//!
//! | transform   | descriptor       | kind     | recorded value            |
//! |-------------|------------------|----------|---------------------------|
//! | [`Zstd`]    | `zstd/1:level=N` | codec    | none                      |
//! | [`Lz4`]     | `lz4/1`          | codec    | none                      |
//! | [`Crc32c`]  | `crc32c/1`       | checksum | CRC-32C, 4 bytes LE       |
//! | [`Crc32`]   | `crc32/1`        | checksum | CRC-32 (IEEE), 4 bytes LE |
//!
//! Put compression first and the checksum last ([`chain`] does): the
//! checksum then covers the bytes as stored, so `dcp verify` checks it
//! without decompressing, and a load checks it before decoding anything.
//! Codecs also embed their format's own content checksum (XXH64 for zstd,
//! XXH32 for lz4), so damage to a compressed record is caught on load even
//! without a checksum extension.
//!
//! What it refuses:
//! * descriptors with an unknown version or parameter, or an invalid level:
//!   [`ErrorKind::Unsupported`](dcp_core::ErrorKind::Unsupported), naming the
//!   descriptor;
//! * a checksum that does not match:
//!   [`ErrorKind::ChecksumMismatch`](dcp_core::ErrorKind::ChecksumMismatch),
//!   giving the expected and actual values;
//! * a compressed record that is corrupt, or decodes to fewer or more bytes
//!   than recorded: [`ErrorKind::Corrupt`](dcp_core::ErrorKind::Corrupt).
//!   Decoding never allocates more than the recorded length (plus, for lz4,
//!   the frame decoder's block buffers, which it bounds by the larger of
//!   64 KiB and the recorded length), even for a decompression bomb;
//! * compression with the safetensors format (dcp-core refuses it at plan
//!   time, on every rank, before any file is written); checksums work with
//!   both formats.
//!
//! ```
//! use dcp_core::{mem::MemoryFs, *};
//! use std::sync::Arc;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://ext"));
//! let mut sd = StateDict::new();
//! let data: Vec<u8> = (0..4096u32).flat_map(|i| ((i % 7) as f32).to_le_bytes()).collect();
//! sd.insert_full_tensor("w", DType::F32, vec![4096], bytes::Bytes::from(data.clone())).unwrap();
//!
//! // zstd level 3, then CRC-32C over the compressed bytes.
//! let extensions = dcp_ext::chain(
//!     dcp_ext::compression_from_name("zstd", 3).unwrap(),
//!     dcp_ext::checksum_from_name("crc32c").unwrap(),
//! );
//! let opts = WriterOptions::default().extensions(extensions);
//! let saved = save(&sd, &FileSystemWriter::new(fs.clone(), opts).unwrap(), &Single).await.unwrap();
//! assert_eq!(saved.metadata.transforms, ["zstd/1:level=3", "crc32c/1"]);
//! assert!(saved.metadata.stored_bytes() < data.len() as u64);
//!
//! let mut dest = DestStateDict::new();
//! dest.want_tensor("w", DType::F32, vec![4096], vec![ChunkBox::full(&[4096])]).unwrap();
//! let reader = FileSystemReader::new(
//!     fs,
//!     ReaderOptions::default().registry(dcp_ext::registry()),
//! );
//! let loaded = load(dest, &reader, &Single).await.unwrap();
//! assert_eq!(loaded.state_dict.tensor("w").unwrap().chunks[0].data, data);
//! # });
//! ```

mod common;
mod crc;
mod lz4_codec;
mod zstd_codec;

pub use crc::{Crc32, Crc32Factory};
pub use dcp_core::transform::{Crc32c, Crc32cFactory};
pub use lz4_codec::{Lz4, Lz4Factory};
pub use zstd_codec::{decompress_at_most, Zstd, ZstdFactory};

use dcp_core::{Error, ExtensionFactory, ExtensionRegistry, Result, StreamTransformExtension};
use std::sync::Arc;

/// Names [`compression_from_name`] accepts.
pub const COMPRESSION_NAMES: &[&str] = &["none", "zstd", "lz4"];

/// Names [`checksum_from_name`] accepts.
pub const CHECKSUM_NAMES: &[&str] = &["none", "crc32c", "crc32"];

/// The factories of every transform of this crate: `zstd`, `lz4`, `crc32c`,
/// `crc32`.
pub fn factories() -> Vec<Arc<dyn ExtensionFactory>> {
    vec![
        Arc::new(ZstdFactory),
        Arc::new(Lz4Factory),
        Arc::new(Crc32cFactory),
        Arc::new(Crc32Factory),
    ]
}

/// Register the factories of every transform of this crate ([`factories`])
/// into `registry`, replacing any of the same names.
pub fn register_all(registry: &mut ExtensionRegistry) {
    for f in factories() {
        registry.register(f);
    }
}

/// A registry holding every transform of this crate: pass it as
/// [`ReaderOptions::registry`](dcp_core::ReaderOptions::registry).
pub fn registry() -> ExtensionRegistry {
    let mut r = ExtensionRegistry::new();
    register_all(&mut r);
    r
}

/// The compression transform called `name` (`"zstd"`, `"lz4"` or `"none"`,
/// case-insensitive); `zstd_level` is used for zstd only. Refuses other
/// names and invalid zstd levels with
/// [`ErrorKind::InvalidInput`](dcp_core::ErrorKind::InvalidInput).
pub fn compression_from_name(
    name: &str,
    zstd_level: i32,
) -> Result<Option<Arc<dyn StreamTransformExtension>>> {
    match name.to_ascii_lowercase().as_str() {
        "none" => Ok(None),
        "zstd" => Ok(Some(Arc::new(Zstd::new(zstd_level)?))),
        "lz4" => Ok(Some(Arc::new(Lz4::new()))),
        _ => Err(Error::invalid(format!(
            "unknown compression {name:?}: expected one of {}",
            COMPRESSION_NAMES.join(", ")
        ))),
    }
}

/// The checksum transform called `name` (`"crc32c"`, `"crc32"` or `"none"`,
/// case-insensitive). Refuses other names with
/// [`ErrorKind::InvalidInput`](dcp_core::ErrorKind::InvalidInput).
pub fn checksum_from_name(name: &str) -> Result<Option<Arc<dyn StreamTransformExtension>>> {
    match name.to_ascii_lowercase().as_str() {
        "none" => Ok(None),
        "crc32c" => Ok(Some(Arc::new(Crc32c::new()))),
        "crc32" => Ok(Some(Arc::new(Crc32::new()))),
        _ => Err(Error::invalid(format!(
            "unknown checksum {name:?}: expected one of {}",
            CHECKSUM_NAMES.join(", ")
        ))),
    }
}

/// The extension chain for
/// [`WriterOptions::extensions`](dcp_core::WriterOptions::extensions):
/// compression first, checksum last, so the checksum covers the stored bytes.
pub fn chain(
    compression: Option<Arc<dyn StreamTransformExtension>>,
    checksum: Option<Arc<dyn StreamTransformExtension>>,
) -> Vec<Arc<dyn StreamTransformExtension>> {
    compression.into_iter().chain(checksum).collect()
}
