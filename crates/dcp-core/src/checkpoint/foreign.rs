//! Checkpoints written by other tools: a [`MetadataTranslator`] turns a
//! foreign `.metadata` into dcp's [`Metadata`], so the whole load path
//! (planning, resharding, partial and shared reads, every
//! [`FileSystem`]) works on it unchanged.

use crate::error::Result;
use crate::metadata::Metadata;
use crate::storage::FileSystem;
use std::fmt;

/// Reads the `.metadata` of a checkpoint written by another tool (torch's
/// `torch.distributed.checkpoint`, in the `dcp-torch` crate) as dcp
/// [`Metadata`]. A [`FileSystemReader`](crate::FileSystemReader) whose
/// `.metadata` does not open with dcp's magic bytes asks each translator of
/// [`ReaderOptions::translators`](crate::ReaderOptions::translators), in
/// order, and the first that recognizes the bytes translates them. The
/// records the translation describes are read through the
/// [`SerializationFormat`](crate::SerializationFormat) and transforms it
/// names, which the caller registers in the same reader options.
pub trait MetadataTranslator: Send + Sync + fmt::Debug {
    /// A short name for messages (`torch.distributed.checkpoint`).
    fn name(&self) -> &str;

    /// True when `metadata` (the whole `.metadata` file) is this tool's.
    /// Looks at a few leading bytes only; never fails.
    fn recognizes(&self, metadata: &[u8]) -> bool;

    /// Translate `metadata` into dcp's [`Metadata`], reading the data files
    /// through `fs` where the foreign format needs it (their lengths, small
    /// records). The result is validated by the caller
    /// ([`Metadata::validate`]) before anything uses it. Blocking.
    fn translate(&self, fs: &dyn FileSystem, metadata: &[u8]) -> Result<Metadata>;
}
