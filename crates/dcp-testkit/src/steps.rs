//! A [`FileSystem`] wrapper that numbers the storage operations of a save
//! and calls a hook before and after each: the crash harness prints them
//! and pauses its child at a chosen step, so the parent's SIGKILL lands
//! exactly there (before or after the rename of `.metadata`, during each
//! removal of the cleanup).

use crate::Op;
use bytes::Bytes;
use dcp_core::layer::FileSystemLayer;
use dcp_core::{FileEntry, FileSink, FileSystem, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Whether a [`Step`] is reported before the operation reaches the inner
/// file system or after it returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum When {
    /// Before the call is passed on.
    Before,
    /// After the inner call returned (successfully or not).
    After,
}

/// One numbered step: the `nth` (0-based) call of `op`, `seq` counting
/// every call of every counted operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Position among all counted calls (each call has one `seq`, shared by
    /// its `Before` and `After` reports).
    pub seq: u64,
    /// The operation.
    pub op: Op,
    /// Which call of `op`, counting from 0.
    pub nth: u64,
    /// Before or after the call.
    pub when: When,
    /// The file (empty for `list` and `sync_dir`).
    pub name: String,
}

impl Step {
    /// The step's key as the crash harness writes it: `{op:?}:{nth}:before`
    /// or `...:after` (e.g. `WriteAtomic:0:after`).
    pub fn key(&self) -> String {
        step_key(self.op, self.nth, self.when)
    }
}

/// The key of the `nth` call of `op`, `when` (see [`Step::key`]).
pub fn step_key(op: Op, nth: u64, when: When) -> String {
    let w = match when {
        When::Before => "before",
        When::After => "after",
    };
    format!("{op:?}:{nth}:{w}")
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {} {} {}", self.seq, self.key(), self.name)
    }
}

type Hook = dyn Fn(&Step) + Send + Sync;

/// Wraps a [`FileSystem`] and reports every `create`, sink `write` and
/// `finish`, `sync_dir`, `write_atomic`, `list` and `remove` to a hook,
/// before and after the inner call. Counting is shared by all threads, so
/// steps of operations that run concurrently (the data files of several
/// ranks) are numbered in the order they started; the commit and cleanup run
/// on one thread and are numbered deterministically. Reads and `file_len`
/// are passed on uncounted. Refuses nothing: errors are the inner file
/// system's.
pub struct StepFs {
    inner: Arc<dyn FileSystem>,
    counts: Arc<Mutex<(u64, HashMap<Op, u64>)>>,
    hook: Arc<Hook>,
}

impl fmt::Debug for StepFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepFs")
            .field("inner", &self.inner)
            .finish()
    }
}

impl StepFs {
    /// Wrap `inner`, calling `hook` before and after every counted call.
    pub fn new(inner: Arc<dyn FileSystem>, hook: impl Fn(&Step) + Send + Sync + 'static) -> Self {
        StepFs {
            inner,
            counts: Arc::default(),
            hook: Arc::new(hook),
        }
    }

    fn step<T>(&self, op: Op, name: &str, f: impl FnOnce() -> T) -> T {
        let (seq, nth) = {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let seq = c.0;
            c.0 += 1;
            let e = c.1.entry(op).or_insert(0);
            let nth = *e;
            *e += 1;
            (seq, nth)
        };
        let mut step = Step {
            seq,
            op,
            nth,
            when: When::Before,
            name: name.to_string(),
        };
        (self.hook)(&step);
        let out = f();
        step.when = When::After;
        (self.hook)(&step);
        out
    }
}

struct StepSink {
    fs: StepFs,
    name: String,
    inner: Box<dyn FileSink>,
}

impl FileSink for StepSink {
    fn expect_len(&mut self, len: u64) {
        self.inner.expect_len(len)
    }
    fn keeps_bytes(&self) -> bool {
        self.inner.keeps_bytes()
    }
    fn write(&mut self, buf: Bytes) -> Result<()> {
        let inner = &mut self.inner;
        self.fs.step(Op::Write, &self.name, || inner.write(buf))
    }
    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        let StepSink { fs, name, inner } = *self;
        fs.step(Op::Finish, &name, || inner.finish(sync))
    }
    fn abort(self: Box<Self>) {
        self.inner.abort()
    }
}

impl Clone for StepFs {
    fn clone(&self) -> Self {
        StepFs {
            inner: self.inner.clone(),
            counts: self.counts.clone(),
            hook: self.hook.clone(),
        }
    }
}

impl FileSystemLayer for StepFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        let inner = self.step(Op::Create, name, || self.inner.create(name))?;
        Ok(Box::new(StepSink {
            fs: self.clone(),
            name: name.to_string(),
            inner,
        }))
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        self.step(Op::WriteAtomic, name, || {
            self.inner.write_atomic(name, data, sync)
        })
    }
    /// Stepped as a [`Op::WriteAtomic`].
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        self.step(Op::WriteAtomic, name, || {
            self.inner.replace_if(name, data, sync, expected)
        })
    }
    fn list(&self) -> Result<Vec<FileEntry>> {
        self.step(Op::List, "", || self.inner.list())
    }
    fn remove(&self, name: &str) -> Result<()> {
        self.step(Op::Remove, name, || self.inner.remove(name))
    }
    fn sync_dir(&self) -> Result<()> {
        self.step(Op::SyncDir, "", || self.inner.sync_dir())
    }
}

#[cfg(test)]
mod tests {
    use super::{step_key, Step, StepFs, When};
    use crate::Op;
    use bytes::Bytes;
    use dcp_core::mem::MemoryFs;
    use dcp_core::FileSystem;
    use std::sync::{Arc, Mutex};

    #[test]
    fn steps_are_numbered_before_and_after_each_call() {
        let seen: Arc<Mutex<Vec<Step>>> = Arc::default();
        let s2 = seen.clone();
        let fs = StepFs::new(Arc::new(MemoryFs::new("memory://steps")), move |s| {
            s2.lock().unwrap().push(s.clone())
        });
        let mut sink = fs.create("a").unwrap();
        sink.write(Bytes::from_static(b"x")).unwrap();
        sink.finish(true).unwrap();
        fs.sync_dir().unwrap();
        fs.write_atomic(".metadata", b"m", true).unwrap();
        fs.list().unwrap();
        fs.remove("a").unwrap();
        fs.remove("b").unwrap();
        fs.file_len("a").unwrap();
        let keys: Vec<String> = seen.lock().unwrap().iter().map(|s| s.to_string()).collect();
        assert_eq!(
            keys,
            [
                "step 0 Create:0:before a",
                "step 0 Create:0:after a",
                "step 1 Write:0:before a",
                "step 1 Write:0:after a",
                "step 2 Finish:0:before a",
                "step 2 Finish:0:after a",
                "step 3 SyncDir:0:before ",
                "step 3 SyncDir:0:after ",
                "step 4 WriteAtomic:0:before .metadata",
                "step 4 WriteAtomic:0:after .metadata",
                "step 5 List:0:before ",
                "step 5 List:0:after ",
                "step 6 Remove:0:before a",
                "step 6 Remove:0:after a",
                "step 7 Remove:1:before b",
                "step 7 Remove:1:after b",
            ]
        );
        assert_eq!(step_key(Op::Remove, 1, When::After), "Remove:1:after");
    }
}
