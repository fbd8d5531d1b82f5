//! Where a chunk's bytes live before they are written: [`ChunkData`], and
//! the [`ChunkSource`] plug point for memory dcp cannot read directly
//! (device memory, a framework's own buffers).

use crate::error::Result;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

/// A chunk's bytes: host memory, written as it is (no copy), or a source
/// they are copied out of, piece by piece, while the save writes.
#[derive(Clone)]
pub enum ChunkData {
    /// Bytes in host memory, shared without copying.
    Host(Bytes),
    /// Bytes behind a [`ChunkSource`] (device memory): a save stages them
    /// into host buffers of at most `per_thread_copy_ahead` bytes per writer
    /// thread, overlapping the copies with the writes.
    Source(Arc<dyn ChunkSource>),
}

impl ChunkData {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            ChunkData::Host(b) => b.len() as u64,
            ChunkData::Source(s) => s.len(),
        }
    }

    /// True when the chunk holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, when they are in host memory.
    pub fn host(&self) -> Option<&Bytes> {
        match self {
            ChunkData::Host(b) => Some(b),
            ChunkData::Source(_) => None,
        }
    }
}

impl From<Bytes> for ChunkData {
    fn from(b: Bytes) -> Self {
        ChunkData::Host(b)
    }
}

impl From<Vec<u8>> for ChunkData {
    fn from(v: Vec<u8>) -> Self {
        ChunkData::Host(Bytes::from(v))
    }
}

impl fmt::Debug for ChunkData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkData::Host(b) => write!(f, "Host({} bytes)", b.len()),
            ChunkData::Source(s) => write!(f, "Source({s:?}, {} bytes)", s.len()),
        }
    }
}

/// Memory a save must copy out of before writing: device memory, or any
/// buffer a framework lends. A save asks for pieces with
/// [`ChunkSource::stage`] on the copy lane of the writer thread that will
/// write them (one lane per writer thread: a CUDA stream each), a few
/// pieces ahead, and writes each as soon as its copy completes, so copies
/// overlap writes.
pub trait ChunkSource: Send + Sync + fmt::Debug + 'static {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// True when the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Start copying `len` bytes at `offset` into a host buffer, on copy
    /// lane `lane` (copies on one lane complete in the order they were
    /// started). Returns at once; [`StagedCopy::wait`] yields the bytes.
    /// The buffer returns to the source's pool when the last clone of those
    /// bytes is dropped. Refuses a range past [`ChunkSource::len`].
    fn stage(&self, lane: usize, offset: u64, len: usize) -> Result<Box<dyn StagedCopy>>;
}

/// A copy started by [`ChunkSource::stage`].
pub trait StagedCopy: Send {
    /// Wait until the copy is complete and return the bytes.
    fn wait(self: Box<Self>) -> Result<Bytes>;
}
