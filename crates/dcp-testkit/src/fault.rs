//! Fault injection: a [`FileSystem`] wrapper that fails chosen operations.
//!
//! Used by the conformance and reliability suites to prove that a failure
//! anywhere (the n-th write, fsync, rename, list or remove; a short write; a
//! full disk; a failed read) gives an error on every rank, no `.metadata`,
//! and an intact previous checkpoint.
//!
//! Three kinds of failure:
//!
//! * **fail before** ([`Fault::FailNth`]): the operation is refused and never
//!   reaches the inner file system;
//! * **fail after** ([`Fault::FailAfterNth`]): the operation is passed on and
//!   takes effect, then the caller gets an error (a lost reply, an fsync of
//!   the directory that fails after the rename);
//! * **power cut** ([`Fault::PowerCutAfterNth`] and [`FaultFs::power_cut`],
//!   over a [`MemoryFs`] built with [`FaultFs::with_durability`]): the file
//!   system tracks what was made durable and rolls back to it; see
//!   [`FaultFs::power_cut`] for exactly what is simulated.
//!
//! [`FaultFs`] is a [`FileSystemLayer`]: every operation it does not fail is
//! the inner file system's own, including its scattered read (`preadv` on
//! `dcp_fs::LocalFs`) and its page-cache probe.

use bytes::Bytes;
use dcp_core::layer::FileSystemLayer;
use dcp_core::mem::MemoryFs;
use dcp_core::{Error, ErrorKind, FileEntry, FileSink, FileSystem, Result};
use std::collections::HashMap;
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
    /// `write_atomic` or `replace_if` (the metadata commit: temp file,
    /// fsync, rename; or one PUT).
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
    /// `file_len` or `version`.
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
    /// Pass the `nth` (0-based) call of `op` on to the inner file system
    /// (it takes effect: the bytes are written, the file renamed, created,
    /// finished or removed) and then return an I/O error to the caller, as
    /// when the reply is lost or a later step of the same call fails. The
    /// message starts `injected fault after: {op:?} #{n}`.
    ///
    /// For [`Op::Create`] the inner sink is created and then dropped (what
    /// the inner file system does with a dropped sink, e.g. `LocalFs`
    /// removing the partial file, happens).
    FailAfterNth {
        /// Which operation.
        op: Op,
        /// Which call, counting from 0.
        nth: u64,
    },
    /// Pass the `nth` (0-based) call of `op` on, then cut the power: every
    /// later operation of any kind fails with an I/O error whose message
    /// starts `injected power cut after {op:?} #{n}` and has no effect (the
    /// machine is off), until [`FaultFs::power_cut`] rolls the file system
    /// back to its durable state and switches it on again. Only meaningful
    /// for a [`FaultFs::with_durability`]; on any other, the cut still
    /// refuses every later operation.
    PowerCutAfterNth {
        /// Which operation.
        op: Op,
        /// Which call, counting from 0.
        nth: u64,
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
    counts: HashMap<Op, u64>,
}

/// What a [`FaultFs::with_durability`] knows about durability. Files are
/// modelled as inodes: a name points at an inode (`names`, the directory as
/// the running system sees it), an inode's bytes are durable once it was
/// fsynced (`synced`), and a name is durable once the directory was synced
/// while it pointed there (`durable_dir`).
#[derive(Debug, Default)]
struct Durability {
    next_inode: u64,
    /// The directory as the running system sees it: name -> inode.
    names: HashMap<String, u64>,
    /// The directory as it was at the last directory sync.
    durable_dir: HashMap<String, u64>,
    /// Inode -> the bytes its last fsync made durable.
    synced: HashMap<u64, Arc<Vec<u8>>>,
}

impl Durability {
    fn link_new(&mut self, name: &str, synced: Option<Vec<u8>>) -> u64 {
        let ino = self.next_inode;
        self.next_inode += 1;
        self.names.insert(name.to_string(), ino);
        if let Some(bytes) = synced {
            self.synced.insert(ino, Arc::new(bytes));
        }
        ino
    }
    fn sync_dir(&mut self) {
        self.durable_dir = self.names.clone();
    }
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
    /// Set by a [`Fault::PowerCutAfterNth`]: the message every later call
    /// fails with, until [`FaultFs::power_cut`].
    dead: Arc<Mutex<Option<String>>>,
    /// With [`FaultFs::with_durability`]: the memory file system and what of
    /// it is durable.
    durable: Option<(MemoryFs, Arc<Mutex<Durability>>)>,
}

impl FaultFs {
    /// Wrap `inner` with no faults armed.
    pub fn new(inner: Arc<dyn FileSystem>) -> Self {
        FaultFs {
            inner,
            faults: Arc::default(),
            counters: Arc::default(),
            written: Arc::default(),
            dead: Arc::default(),
            durable: None,
        }
    }

    /// Wrap `mem` and track what of it is durable, so that
    /// [`FaultFs::power_cut`] can roll it back. Every file already in `mem`
    /// counts as durable. Every operation must go through this wrapper (or
    /// its clones) from now on: changes made to `mem` directly are not seen.
    pub fn with_durability(mem: MemoryFs) -> Self {
        let mut d = Durability::default();
        for f in mem.list().expect("MemoryFs lists") {
            let bytes = mem.get(&f.name).expect("listed file exists");
            d.link_new(&f.name, Some(bytes));
        }
        d.sync_dir();
        FaultFs {
            durable: Some((mem.clone(), Arc::new(Mutex::new(d)))),
            ..FaultFs::new(Arc::new(mem))
        }
    }

    /// Simulate a power loss and switch the power on again: roll the file
    /// system back to its durable state and clear the "power is off" state
    /// of a [`Fault::PowerCutAfterNth`] (armed faults and counters stay).
    ///
    /// What is simulated, as POSIX promises it (stricter than ext4's
    /// `data=ordered`, which often keeps more):
    ///
    /// * a file's bytes survive only as of its last `finish(sync = true)` or
    ///   `write_atomic(.., sync = true)`; a file never synced comes back empty
    ///   if its name survives;
    /// * a name (a created file, a removal, the rename of `write_atomic`)
    ///   survives only if `sync_dir` ran after it, or a `write_atomic` with
    ///   `sync` (which, as `dcp_fs::LocalFs`'s does, fsyncs the directory
    ///   after the rename) did; otherwise the directory entry reverts (a new
    ///   file vanishes, a removed file comes back with its durable bytes, a
    ///   replaced file has its older inode again);
    /// * a file still being written (a sink not finished) was never visible
    ///   in `MemoryFs` and vanishes.
    ///
    /// Each operation is recorded when the inner call returned, so one that
    /// races with a `sync_dir` on another thread may count as after it: the
    /// model then keeps less than a real disk would, never more.
    ///
    /// Not simulated: torn writes inside a synced file (a sector half
    /// written), reordering by a device that lies about flushes, a zero-length
    /// entry durable for a created but unfinished file (`MemoryFs` shows a
    /// file only at `finish`), and metadata journaling that makes more
    /// durable than POSIX promises.
    ///
    /// Refuses (`Unsupported`) a `FaultFs` not made by
    /// [`FaultFs::with_durability`].
    pub fn power_cut(&self) -> Result<()> {
        let Some((mem, d)) = &self.durable else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "power_cut needs a FaultFs made by FaultFs::with_durability",
            ));
        };
        let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
        for f in mem.list()? {
            mem.remove(&f.name)?;
        }
        let dir = d.durable_dir.clone();
        for (name, ino) in &dir {
            let bytes = d.synced.get(ino).map(|b| b.as_ref().clone());
            mem.put(name, bytes.unwrap_or_default());
        }
        // After the reboot the durable state is the whole state.
        let mut synced = HashMap::new();
        for (name, ino) in &dir {
            synced.insert(*ino, Arc::new(mem.get(name).expect("just written")));
        }
        d.synced = synced;
        d.names = dir;
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Whether a [`Fault::PowerCutAfterNth`] cut the power (since the last
    /// [`FaultFs::power_cut`] or [`FaultFs::reset`]): the file system now
    /// refuses every operation.
    pub fn power_is_off(&self) -> bool {
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn track(&self, f: impl FnOnce(&mut Durability, &MemoryFs)) {
        if let Some((mem, d)) = &self.durable {
            f(&mut d.lock().unwrap_or_else(|p| p.into_inner()), mem);
        }
    }

    /// Arm a fault (counters keep counting from where they are).
    pub fn arm(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    /// Disarm every fault, reset the counters and switch the power on again
    /// (without rolling anything back: see [`FaultFs::power_cut`]).
    pub fn reset(&self) {
        *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = None;
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

    /// Count a call of `op`; fail it if a `FailNth` fault matches or the
    /// power is off.
    fn tick(&self, op: Op, what: &str) -> Result<u64> {
        if let Some(msg) = self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(Error::new(ErrorKind::Io, format!("{msg} ({op:?} {what})")));
        }
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

    /// After call `n` of `op` took effect: fail it if a `FailAfterNth`
    /// fault matches, or cut the power if a `PowerCutAfterNth` does.
    fn after(&self, op: Op, n: u64, what: &str) -> Result<()> {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if faults.contains(&Fault::PowerCutAfterNth { op, nth: n }) {
            let msg = format!("injected power cut after {op:?} #{n} ({what})");
            *self.dead.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
            return Err(Error::new(ErrorKind::Io, msg));
        }
        if faults.contains(&Fault::FailAfterNth { op, nth: n }) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("injected fault after: {op:?} #{n} ({what})"),
            ));
        }
        Ok(())
    }

    /// Run `f` as call `n` of `op` ("before" faults already checked), then
    /// apply the "after" faults.
    fn pass<T>(&self, op: Op, n: u64, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let out = f()?;
        self.after(op, n, what)?;
        Ok(out)
    }
}

struct FaultSink {
    fs: FaultFs,
    name: String,
    inner: Box<dyn FileSink>,
}

impl FileSink for FaultSink {
    fn expect_len(&mut self, len: u64) {
        self.inner.expect_len(len)
    }
    fn keeps_bytes(&self) -> bool {
        self.inner.keeps_bytes()
    }
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
        self.inner.write(buf)?;
        self.fs.after(Op::Write, n, &self.name)
    }

    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        let n = match self.fs.tick(Op::Finish, &self.name) {
            Ok(n) => n,
            Err(e) => {
                self.inner.abort();
                return Err(e);
            }
        };
        let len = self.inner.finish(sync)?;
        let name = self.name.clone();
        self.fs.track(|d, mem| {
            let bytes = if sync { mem.get(&name) } else { None };
            d.link_new(&name, bytes);
        });
        self.fs.after(Op::Finish, n, &self.name)?;
        Ok(len)
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
        let n = self.tick(Op::Create, name)?;
        let inner = self.inner.create(name)?;
        self.after(Op::Create, n, name)?;
        Ok(Box::new(FaultSink {
            fs: self.clone(),
            name: name.to_string(),
            inner,
        }))
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = self.tick(Op::Read, name)?;
        self.pass(Op::Read, n, name, || {
            self.inner.read_into(name, offset, buf)
        })
    }
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        let n = self.tick(Op::ReadScattered, name)?;
        self.pass(Op::ReadScattered, n, name, || {
            self.inner.read_scattered(name, offset, bufs)
        })
    }
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let n = self.tick(Op::ReadIfCached, name)?;
        if self.armed(&Fault::Uncached) {
            // Answered "not in memory"; a fail-after still fails it.
            self.after(Op::ReadIfCached, n, name)?;
            return Ok(false);
        }
        self.pass(Op::ReadIfCached, n, name, || {
            self.inner.read_if_cached(name, offset, buf)
        })
    }
    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        let n = self.tick(Op::Stat, name)?;
        self.pass(Op::Stat, n, name, || self.inner.file_len(name))
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        let n = self.tick(Op::WriteAtomic, name)?;
        self.inner.write_atomic(name, data, sync)?;
        self.track(|d, _| {
            d.link_new(name, sync.then(|| data.to_vec()));
            if sync {
                // Temp file fsynced, renamed, directory fsynced.
                d.sync_dir();
            }
        });
        self.after(Op::WriteAtomic, n, name)
    }
    /// Counted as a [`Op::Stat`].
    fn version(&self, name: &str) -> Result<Option<String>> {
        let n = self.tick(Op::Stat, name)?;
        self.pass(Op::Stat, n, name, || self.inner.version(name))
    }
    /// Counted as a [`Op::WriteAtomic`]: the same atomic replace, with a
    /// compare first.
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        let n = self.tick(Op::WriteAtomic, name)?;
        let replaced = self.inner.replace_if(name, data, sync, expected)?;
        if replaced {
            self.track(|d, _| {
                d.link_new(name, sync.then(|| data.to_vec()));
                if sync {
                    d.sync_dir();
                }
            });
        }
        self.after(Op::WriteAtomic, n, name)?;
        Ok(replaced)
    }
    fn list(&self) -> Result<Vec<FileEntry>> {
        let n = self.tick(Op::List, "")?;
        self.pass(Op::List, n, "", || self.inner.list())
    }
    fn remove(&self, name: &str) -> Result<()> {
        let n = self.tick(Op::Remove, name)?;
        self.inner.remove(name)?;
        self.track(|d, _| {
            d.names.remove(name);
        });
        self.after(Op::Remove, n, name)
    }
    fn sync_dir(&self) -> Result<()> {
        let n = self.tick(Op::SyncDir, "")?;
        self.inner.sync_dir()?;
        self.track(|d, _| d.sync_dir());
        self.after(Op::SyncDir, n, "")
    }
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        let n = self.tick(Op::ReadSmall, name)?;
        self.pass(Op::ReadSmall, n, name, || {
            self.inner.read_small(name, max_len)
        })
    }
}

#[cfg(test)]
mod tests {
    // Not `super::*`: `FileSystemLayer` in scope would make every call
    // ambiguous with `FileSystem`'s.
    use super::{Fault, FaultFs, Op};
    use bytes::Bytes;
    use dcp_core::mem::MemoryFs;
    use dcp_core::{ErrorKind, FileSystem, Result};
    use std::sync::Arc;

    fn mem_with(files: &[(&str, &[u8])]) -> MemoryFs {
        let mem = MemoryFs::new("memory://fault-unit");
        for (n, b) in files {
            mem.put(n, b.to_vec());
        }
        mem
    }

    fn write_file(fs: &dyn FileSystem, name: &str, data: &[u8], sync: bool) -> Result<u64> {
        let mut s = fs.create(name)?;
        s.write(Bytes::copy_from_slice(data))?;
        s.finish(sync)
    }

    fn names(mem: &MemoryFs) -> Vec<String> {
        mem.list().unwrap().into_iter().map(|f| f.name).collect()
    }

    /// A fail-after fault lets every mutating operation take effect and still
    /// reports the error, with its own message.
    #[test]
    fn fail_after_takes_effect_then_errors() {
        let mem = mem_with(&[("old", b"old bytes")]);
        let fs = FaultFs::new(Arc::new(mem.clone()));
        for op in [
            Op::WriteAtomic,
            Op::Remove,
            Op::SyncDir,
            Op::Finish,
            Op::Write,
        ] {
            fs.arm(Fault::FailAfterNth { op, nth: 0 });
        }
        let e = fs.write_atomic("meta", b"new", true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(
            e.to_string()
                .contains("injected fault after: WriteAtomic #0 (meta)"),
            "{e}"
        );
        assert_eq!(mem.get("meta").as_deref(), Some(&b"new"[..]));
        // The second call is not failed.
        fs.write_atomic("meta", b"newer", true).unwrap();
        assert_eq!(mem.get("meta").as_deref(), Some(&b"newer"[..]));

        let e = fs.remove("old").unwrap_err();
        assert!(
            e.to_string()
                .contains("injected fault after: Remove #0 (old)"),
            "{e}"
        );
        assert_eq!(mem.get("old"), None);
        let e = fs.sync_dir().unwrap_err();
        assert!(e.to_string().contains("after: SyncDir #0"), "{e}");

        // A write that reports failure reached the sink: finishing the file
        // anyway shows its bytes.
        let mut s = fs.create("data").unwrap();
        let e = s.write(Bytes::from_static(b"abc")).unwrap_err();
        assert!(
            e.to_string()
                .contains("injected fault after: Write #0 (data)"),
            "{e}"
        );
        s.write(Bytes::from_static(b"def")).unwrap();
        let e = s.finish(true).unwrap_err();
        assert!(
            e.to_string()
                .contains("injected fault after: Finish #0 (data)"),
            "{e}"
        );
        assert_eq!(mem.get("data").as_deref(), Some(&b"abcdef"[..]));
        assert_eq!(fs.count(Op::Write), 2);
        assert_eq!(fs.count(Op::Finish), 1);

        // Reads and stats: the call is made, the caller sees an error.
        fs.arm(Fault::FailAfterNth {
            op: Op::Stat,
            nth: 0,
        });
        fs.arm(Fault::FailAfterNth {
            op: Op::Read,
            nth: 0,
        });
        let e = fs.file_len("data").unwrap_err();
        assert!(e.to_string().contains("after: Stat #0"), "{e}");
        let mut buf = [0u8; 3];
        let e = fs.read_into("data", 3, &mut buf).unwrap_err();
        assert!(e.to_string().contains("after: Read #0"), "{e}");
        assert_eq!(&buf, b"def");
        assert_eq!(fs.file_len("data").unwrap(), Some(6));
    }

    /// Fail-after over the local disk: the rename of `write_atomic` is done
    /// when the error comes back.
    #[test]
    fn fail_after_on_local_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = FaultFs::new(Arc::new(dcp_fs::LocalFs::new(tmp.path())));
        fs.arm(Fault::FailAfterNth {
            op: Op::WriteAtomic,
            nth: 0,
        });
        fs.write_atomic(".metadata", b"committed", true)
            .unwrap_err();
        assert_eq!(
            std::fs::read(tmp.path().join(".metadata")).unwrap(),
            b"committed"
        );
        assert!(!tmp.path().join(".metadata.tmp").exists());
    }

    /// The power cut keeps exactly what was synced: file bytes after a
    /// synced finish, names after a directory sync or a synced
    /// `write_atomic`.
    #[test]
    fn power_cut_rolls_back_to_the_durable_state() {
        let mem = mem_with(&[("old", b"old bytes"), ("kept", b"kept")]);
        let fs = FaultFs::with_durability(mem.clone());
        write_file(&fs, "a", b"synced a", true).unwrap();
        write_file(&fs, "b", b"unsynced b", false).unwrap();
        fs.sync_dir().unwrap();
        // After the directory sync: a synced file, a name replaced, a
        // removal and an unsynced atomic write, none made durable.
        write_file(&fs, "c", b"synced c, name not", true).unwrap();
        write_file(&fs, "kept", b"replaced", true).unwrap();
        fs.remove("old").unwrap();
        fs.write_atomic("m", b"meta", false).unwrap();
        assert_eq!(mem.get("kept").as_deref(), Some(&b"replaced"[..]));

        fs.power_cut().unwrap();
        assert_eq!(names(&mem), ["a", "b", "kept", "old"]);
        assert_eq!(mem.get("a").as_deref(), Some(&b"synced a"[..]));
        assert_eq!(mem.get("b").as_deref(), Some(&b""[..]), "never synced");
        assert_eq!(
            mem.get("kept").as_deref(),
            Some(&b"kept"[..]),
            "older inode"
        );
        assert_eq!(mem.get("old").as_deref(), Some(&b"old bytes"[..]));

        // A synced write_atomic makes itself and every earlier name change
        // durable (the directory fsync after the rename).
        fs.remove("old").unwrap();
        fs.write_atomic("m", b"meta", true).unwrap();
        fs.power_cut().unwrap();
        assert_eq!(names(&mem), ["a", "b", "kept", "m"]);
        assert_eq!(mem.get("m").as_deref(), Some(&b"meta"[..]));
        // Nothing changed since: a second cut keeps everything.
        fs.power_cut().unwrap();
        assert_eq!(names(&mem), ["a", "b", "kept", "m"]);
    }

    /// A power cut after an operation lets that operation take effect, then
    /// refuses everything until the power comes back.
    #[test]
    fn power_cut_after_nth_stops_the_machine() {
        let mem = mem_with(&[]);
        let fs = FaultFs::with_durability(mem.clone());
        fs.arm(Fault::PowerCutAfterNth {
            op: Op::Finish,
            nth: 1,
        });
        write_file(&fs, "a", b"a", true).unwrap();
        let e = write_file(&fs, "b", b"b", true).unwrap_err();
        assert!(
            e.to_string()
                .contains("injected power cut after Finish #1 (b)"),
            "{e}"
        );
        assert!(fs.power_is_off());
        let e = fs.sync_dir().unwrap_err();
        assert!(
            e.to_string().contains("injected power cut after Finish #1"),
            "{e}"
        );
        assert!(fs.list().is_err() && fs.remove("a").is_err());
        assert_eq!(names(&mem), ["a", "b"], "refused calls changed nothing");
        fs.power_cut().unwrap();
        assert!(!fs.power_is_off());
        assert!(names(&mem).is_empty(), "no directory sync: both vanish");
        fs.list().unwrap();
    }

    #[test]
    fn power_cut_needs_the_durability_model() {
        let fs = FaultFs::new(Arc::new(mem_with(&[])));
        let e = fs.power_cut().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("with_durability"), "{e}");
    }
}
