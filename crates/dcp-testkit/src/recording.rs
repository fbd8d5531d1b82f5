//! A [`FileSystem`] wrapper that records every read, to check what a load
//! touched.

use dcp_core::layer::FileSystemLayer;
use dcp_core::{FileSystem, Result};
use std::sync::{Arc, Mutex};

/// One read: file, offset, length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadCall {
    /// File name.
    pub name: String,
    /// Offset of the read.
    pub offset: u64,
    /// Length of the read.
    pub len: u64,
}

/// Wraps a [`FileSystem`] and records every `read_into`, `read_scattered`
/// (one call each, with the total length) and `read_small` (offset 0, the
/// length read). It never claims data is cached (`read_if_cached` answers
/// `Ok(false)` without asking the inner file system), so loads through it
/// scatter with `read_scattered`, which reaches the inner file system's own
/// (`preadv` on local disk). Everything else is forwarded untouched.
#[derive(Debug)]
pub struct RecordingFs {
    inner: Arc<dyn FileSystem>,
    reads: Mutex<Vec<ReadCall>>,
}

impl RecordingFs {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn FileSystem>) -> Self {
        RecordingFs {
            inner,
            reads: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, name: &str, offset: u64, len: u64) {
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ReadCall {
                name: name.to_string(),
                offset,
                len,
            });
    }

    /// The reads so far, in the order they were made.
    pub fn reads(&self) -> Vec<ReadCall> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl FileSystemLayer for RecordingFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.record(name, offset, buf.len() as u64);
        self.inner.read_into(name, offset, buf)
    }
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        self.record(name, offset, bufs.iter().map(|b| b.len() as u64).sum());
        self.inner.read_scattered(name, offset, bufs)
    }
    fn read_if_cached(&self, _name: &str, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        let out = self.inner.read_small(name, max_len)?;
        self.record(name, 0, out.len() as u64);
        Ok(out)
    }
}
