//! Where a load's bytes go when dcp cannot write them directly: the
//! [`ChunkSink`] plug point (device memory), the mirror of
//! [`ChunkSource`](super::ChunkSource) on the save side.

use crate::error::Result;
use crate::model::TensorBuffer;
use std::fmt;

/// Memory a load fills through copies: a destination chunk in device
/// memory. A device load ([`load_to_device`](crate::load_to_device)) reads
/// records into host staging buffers that [`ChunkSink::staging`] hands out
/// (pinned memory, for a real device), verifies their checksums, then hands
/// each filled buffer to [`ChunkSink::upload`] on a copy lane (one per
/// reader lane: a CUDA stream each) and goes on reading while the copy runs.
///
/// The sink's bytes are the chunk's elements in row-major order, exactly
/// `numel x dtype size` of them.
pub trait ChunkSink: Send + Sync + fmt::Debug + 'static {
    /// Length in bytes.
    fn len(&self) -> u64;

    /// True when the sink holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A host buffer of exactly `len` bytes (contents unspecified) to read
    /// into before [`ChunkSink::upload`]. The default allocates a zeroed
    /// `Vec`; a device hands out buffers of its own pool (page-locked
    /// memory, which its copy engine reads directly).
    fn staging(&self, len: usize) -> Result<Box<dyn TensorBuffer>> {
        Ok(Box::new(vec![0u8; len]))
    }

    /// Start copying `src` into this sink: its bytes, in order, fill the
    /// byte ranges `runs` (`(offset, len)` each, in the sink's bytes; their
    /// lengths add up to `src`'s), on copy lane `lane` (copies on one lane
    /// complete in the order they were started). Returns at once; the copy
    /// keeps `src` until it is done, and [`PendingUpload::wait`] says how
    /// it ended. Refuses runs past [`ChunkSink::len`] or whose lengths do
    /// not add up to `src`'s.
    fn upload(
        &self,
        lane: usize,
        runs: Vec<(u64, u64)>,
        src: Box<dyn TensorBuffer>,
    ) -> Result<Box<dyn PendingUpload>>;
}

/// A copy started by [`ChunkSink::upload`].
pub trait PendingUpload: Send {
    /// Wait until the copy is complete (its source buffer then released).
    fn wait(self: Box<Self>) -> Result<()>;
}

/// Check that `runs` lie within a sink of `sink_len` bytes and add up to
/// `src_len`: what [`ChunkSink::upload`] refuses otherwise.
pub fn check_runs(runs: &[(u64, u64)], sink_len: u64, src_len: usize) -> Result<()> {
    let mut total: u64 = 0;
    for &(off, len) in runs {
        if off.checked_add(len).is_none_or(|e| e > sink_len) {
            return Err(crate::Error::invalid(format!(
                "upload of {len} bytes at {off} into a {sink_len}-byte destination"
            )));
        }
        total = total.saturating_add(len);
    }
    if total != src_len as u64 {
        return Err(crate::Error::invalid(format!(
            "upload runs cover {total} bytes, the staged buffer holds {src_len}"
        )));
    }
    Ok(())
}
