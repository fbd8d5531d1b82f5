//! Fault injection: a [`FileSystem`] wrapper that fails chosen operations.
//!
//! Used by the conformance and reliability suites to prove that a failure
//! anywhere (the n-th write, fsync, rename, list or remove; a short write; a
//! full disk; a failed read) gives an error on every rank, no `.metadata`,
//! and an intact previous checkpoint.
//!
//! [`FaultFs`] is a [`FileSystemLayer`]: every operation it does not fail is
//! the inner file system's own, including its scattered read (`preadv` on
//! `dcp_fs::LocalFs`) and its page-cache probe.

use bytes::Bytes;
use dcp_core::layer::FileSystemLayer;
use dcp_core::{Error, ErrorKind, FileEntry, FileSink, FileSystem, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// An operation that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `create`.
    Create,
    /// One `FileSink::write` call.
    Write,
    /// `FileSink::finish` (the fsync of a data file when syncing).
    Finish,
    /// `write_atomic` (the metadata commit: temp file, fsync, rename).
    WriteAtomic,
    /// `read_into`.
    Read,
    /// `read_scattered` (one call, whatever the number of buffers).
    ReadScattered,
    /// `read_if_cached` (the page-cache probe before a scattered read).
    ReadIfCached,
    /// `read_small` (the metadata read).
    ReadSmall,
    /// `list`.
    List,
    /// `remove`.
    Remove,
    /// `sync_dir`.
    SyncDir,
    /// `file_len`.
    Stat,
}

/// How a fault behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fail the `nth` (0-based) call of `op` with an I/O error.
    FailNth {
        /// Which operation.
        op: Op,
        /// Which call, counting from 0.
        nth: u64,
    },
    /// Write only half of the `nth` write's bytes, then fail.
    ShortWrite {
        /// Which write call, counting from 0.
        nth: u64,
    },
    /// Fail every write once `bytes` bytes have been written in total, as a
    /// full disk does (`StorageFull`).
    DiskFull {
        /// Capacity in bytes.
        bytes: u64,
    },
    /// Answer every `read_if_cached` with `Ok(false)` ("not in memory")
    /// without asking the inner file system, as with a cold page cache: a
    /// load then scatters every strided part with one `read_scattered` (one
    /// `preadv` on local disk) instead of copying blocks out of memory. The
    /// calls are still counted as [`Op::ReadIfCached`].
    Uncached,
}

#[derive(Debug, Default)]
struct Counters {
    counts: std::collections::HashMap<Op, u64>,
}

/// Wraps a [`FileSystem`] and injects [`Fault`]s. Counters are shared by all
/// clones and all threads, so "the n-th write" is counted across ranks.
///
/// An injected failure is an error of kind [`ErrorKind::Io`] whose message
/// starts `injected fault: {op:?} #{n} ({file name})` (short writes and a
/// full disk have their own messages, below).
#[derive(Clone, Debug)]
pub struct FaultFs {
    inner: Arc<dyn FileSystem>,
    faults: Arc<Mutex<Vec<Fault>>>,
    counters: Arc<Mutex<Counters>>,
    written: Arc<AtomicU64>,
}

impl FaultFs {
    /// Wrap `inner` with no faults armed.
    pub fn new(inner: Arc<dyn FileSystem>) -> Self {
        FaultFs {
            inner,
            faults: Arc::default(),
            counters: Arc::default(),
            written: Arc::default(),
        }
    }

    /// Arm a fault (counters keep counting from where they are).
    pub fn arm(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    /// Disarm every fault and reset the counters.
    pub fn reset(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()) = Counters::default();
        self.written.store(0, Ordering::SeqCst);
    }

    /// How many calls of `op` happened since the last reset.
    pub fn count(&self, op: Op) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    /// Whether `fault` is armed.
    fn armed(&self, fault: &Fault) -> bool {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(fault)
    }

    /// Count a call of `op`; fail it if a `FailNth` fault matches.
    fn tick(&self, op: Op, what: &str) -> Result<u64> {
        let n = {
            let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            let e = c.counts.entry(op).or_insert(0);
            let n = *e;
            *e += 1;
            n
        };
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if faults.contains(&Fault::FailNth { op, nth: n }) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("injected fault: {op:?} #{n} ({what})"),
            ));
        }
        Ok(n)
    }
}

struct FaultSink {
    fs: FaultFs,
    name: String,
    inner: Box<dyn FileSink>,
}

impl FileSink for FaultSink {
    fn write(&mut self, buf: Bytes) -> Result<()> {
        let n = self.fs.tick(Op::Write, &self.name)?;
        let short = {
            let faults = self.fs.faults.lock().unwrap_or_else(|p| p.into_inner());
            let short = faults.contains(&Fault::ShortWrite { nth: n });
            let cap = faults.iter().find_map(|f| match f {
                Fault::DiskFull { bytes } => Some(*bytes),
                _ => None,
            });
            drop(faults);
            if let Some(cap) = cap {
                let before = self
                    .fs
                    .written
                    .fetch_add(buf.len() as u64, Ordering::SeqCst);
                if before + buf.len() as u64 > cap {
                    let fit = cap.saturating_sub(before) as usize;
                    if fit > 0 {
                        self.inner.write(buf.slice(..fit.min(buf.len())))?;
                    }
                    return Err(Error::io(
                        "write",
                        &self.name,
                        std::io::Error::new(
                            std::io::ErrorKind::StorageFull,
                            "no space left on device (injected)",
                        ),
                    ));
                }
            }
            short
        };
        if short {
            self.inner.write(buf.slice(..buf.len() / 2))?;
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "injected short write to {} ({} of {} bytes)",
                    self.name,
                    buf.len() / 2,
                    buf.len()
                ),
            ));
        }
        self.inner.write(buf)
    }

    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        if let Err(e) = self.fs.tick(Op::Finish, &self.name) {
            self.inner.abort();
            return Err(e);
        }
        self.inner.finish(sync)
    }

    fn abort(self: Box<Self>) {
        self.inner.abort()
    }
}

/// Overrides what it counts or fails; `location`, `capabilities` and
/// `prepare` are forwarded by the layer.
impl FileSystemLayer for FaultFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        self.tick(Op::Create, name)?;
        Ok(Box::new(FaultSink {
            fs: self.clone(),
            name: name.to_string(),
            inner: self.inner.create(name)?,
        }))
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.tick(Op::Read, name)?;
        self.inner.read_into(name, offset, buf)
    }
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        self.tick(Op::ReadScattered, name)?;
        self.inner.read_scattered(name, offset, bufs)
    }
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.tick(Op::ReadIfCached, name)?;
        if self.armed(&Fault::Uncached) {
            return Ok(false);
        }
        self.inner.read_if_cached(name, offset, buf)
    }
    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        self.tick(Op::Stat, name)?;
        self.inner.file_len(name)
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        self.tick(Op::WriteAtomic, name)?;
        self.inner.write_atomic(name, data, sync)
    }
    fn list(&self) -> Result<Vec<FileEntry>> {
        self.tick(Op::List, "")?;
        self.inner.list()
    }
    fn remove(&self, name: &str) -> Result<()> {
        self.tick(Op::Remove, name)?;
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> Result<()> {
        self.tick(Op::SyncDir, "")?;
        self.inner.sync_dir()
    }
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        self.tick(Op::ReadSmall, name)?;
        self.inner.read_small(name, max_len)
    }
}
