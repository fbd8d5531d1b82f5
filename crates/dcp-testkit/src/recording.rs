//! A [`FileSystem`] wrapper that records every read, to check what a load
//! touched, and every call that changes the location or makes it durable, in
//! order, to check a save's durability order.

use bytes::Bytes;
use dcp_core::layer::FileSystemLayer;
use dcp_core::{FileEntry, FileSink, FileSystem, Result};
use std::sync::{Arc, Mutex};

/// One call that changes the location or makes it durable, as
/// [`RecordingFs::calls`] lists them. Each is recorded when the inner file
/// system returned from it, successfully or not (`ok`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageCall {
    /// `create(name)`.
    Create {
        /// File name.
        name: String,
    },
    /// `FileSink::finish(sync)` of the file created as `name`.
    Finish {
        /// File name.
        name: String,
        /// Whether the file was to be made durable.
        sync: bool,
        /// Whether the inner call succeeded.
        ok: bool,
    },
    /// `write_atomic(name, data, sync)`, or a `replace_if` (conditional).
    WriteAtomic {
        /// File name.
        name: String,
        /// Length of the data.
        len: usize,
        /// Whether the write was to be made durable.
        sync: bool,
        /// Whether the inner call succeeded.
        ok: bool,
    },
    /// `sync_dir()`.
    SyncDir {
        /// Whether the inner call succeeded.
        ok: bool,
    },
    /// `list()`.
    List,
    /// `remove(name)`.
    Remove {
        /// File name.
        name: String,
    },
}

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
/// length read), and, in a second list, every `create`, `finish`,
/// `write_atomic`, `sync_dir`, `list` and `remove` in the order they
/// returned ([`RecordingFs::calls`]). It never claims data is cached (`read_if_cached` answers
/// `Ok(false)` without asking the inner file system), so loads through it
/// scatter with `read_scattered`, which reaches the inner file system's own
/// (`preadv` on local disk). Everything else is forwarded untouched.
#[derive(Debug)]
pub struct RecordingFs {
    inner: Arc<dyn FileSystem>,
    reads: Mutex<Vec<ReadCall>>,
    calls: Arc<Mutex<Vec<StorageCall>>>,
}

impl RecordingFs {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn FileSystem>) -> Self {
        RecordingFs {
            inner,
            reads: Mutex::new(Vec::new()),
            calls: Arc::default(),
        }
    }

    fn call(&self, c: StorageCall) {
        push(&self.calls, c);
    }

    /// The calls that changed the location or made it durable so far, in
    /// the order they returned.
    pub fn calls(&self) -> Vec<StorageCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

fn push(calls: &Mutex<Vec<StorageCall>>, c: StorageCall) {
    calls.lock().unwrap_or_else(|p| p.into_inner()).push(c);
}

struct RecordingSink {
    name: String,
    calls: Arc<Mutex<Vec<StorageCall>>>,
    inner: Box<dyn FileSink>,
}

impl FileSink for RecordingSink {
    fn expect_len(&mut self, len: u64) {
        self.inner.expect_len(len)
    }
    fn keeps_bytes(&self) -> bool {
        self.inner.keeps_bytes()
    }
    fn write(&mut self, buf: Bytes) -> Result<()> {
        self.inner.write(buf)
    }
    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        let r = self.inner.finish(sync);
        push(
            &self.calls,
            StorageCall::Finish {
                name: self.name,
                sync,
                ok: r.is_ok(),
            },
        );
        r
    }
    fn abort(self: Box<Self>) {
        self.inner.abort()
    }
}

impl FileSystemLayer for RecordingFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        let inner = self.inner.create(name)?;
        self.call(StorageCall::Create {
            name: name.to_string(),
        });
        Ok(Box::new(RecordingSink {
            name: name.to_string(),
            calls: self.calls.clone(),
            inner,
        }))
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        let r = self.inner.write_atomic(name, data, sync);
        self.call(StorageCall::WriteAtomic {
            name: name.to_string(),
            len: data.len(),
            sync,
            ok: r.is_ok(),
        });
        r
    }
    /// Recorded as a [`StorageCall::WriteAtomic`], `ok` when it replaced.
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        let r = self.inner.replace_if(name, data, sync, expected);
        self.call(StorageCall::WriteAtomic {
            name: name.to_string(),
            len: data.len(),
            sync,
            ok: matches!(r, Ok(true)),
        });
        r
    }
    fn sync_dir(&self) -> Result<()> {
        let r = self.inner.sync_dir();
        self.call(StorageCall::SyncDir { ok: r.is_ok() });
        r
    }
    fn list(&self) -> Result<Vec<FileEntry>> {
        let r = self.inner.list();
        self.call(StorageCall::List);
        r
    }
    fn remove(&self, name: &str) -> Result<()> {
        let r = self.inner.remove(name);
        self.call(StorageCall::Remove {
            name: name.to_string(),
        });
        r
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
