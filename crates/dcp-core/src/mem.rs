//! An in-memory [`FileSystem`], for tests, examples and simulation.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{check_file_name, Capabilities, FileEntry, FileSink, FileSystem};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Files held in memory behind one lock. Clones share the same files.
#[derive(Clone, Debug)]
pub struct MemoryFs {
    name: String,
    files: Arc<Mutex<BTreeMap<String, Arc<Vec<u8>>>>>,
}

impl MemoryFs {
    /// An empty location called `name` in messages.
    pub fn new(name: impl Into<String>) -> Self {
        MemoryFs {
            name: name.into(),
            files: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Vec<u8>>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of a file's bytes (tests).
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.lock().get(name).map(|v| v.as_ref().clone())
    }

    /// Replace a file's bytes (tests that damage checkpoints).
    pub fn put(&self, name: &str, data: Vec<u8>) {
        self.lock().insert(name.to_string(), Arc::new(data));
    }
}

struct MemSink {
    fs: MemoryFs,
    name: String,
    buf: Vec<u8>,
}

impl FileSink for MemSink {
    fn write(&mut self, buf: Bytes) -> Result<()> {
        self.buf.extend_from_slice(&buf);
        Ok(())
    }
    fn finish(self: Box<Self>, _sync: bool) -> Result<u64> {
        let len = self.buf.len() as u64;
        self.fs.lock().insert(self.name, Arc::new(self.buf));
        Ok(len)
    }
    fn abort(self: Box<Self>) {}
}

impl FileSystem for MemoryFs {
    fn location(&self) -> String {
        self.name.clone()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_sync: false,
            atomic_replace: true,
            list: true,
        }
    }
    fn prepare(&self) -> Result<()> {
        Ok(())
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        check_file_name(name)?;
        Ok(Box::new(MemSink {
            fs: self.clone(),
            name: name.to_string(),
            buf: Vec::new(),
        }))
    }
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.read_into(name, offset, buf).map(|()| true)
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_file_name(name)?;
        let f = self.lock().get(name).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("{name} not found in {}", self.name),
            )
        })?;
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(e) if e <= f.len() as u64 => {
                buf.copy_from_slice(&f[offset as usize..e as usize]);
                Ok(())
            }
            _ => Err(Error::corrupt(format!(
                "read {name} at offset {offset} length {}: the file has only {} bytes",
                buf.len(),
                f.len()
            ))),
        }
    }
    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        check_file_name(name)?;
        Ok(self.lock().get(name).map(|f| f.len() as u64))
    }
    /// The file as it is at one moment (one lookup): a concurrent
    /// replacement is seen whole or not at all.
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        check_file_name(name)?;
        let f = self.lock().get(name).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("{name} not found in {}", self.name),
            )
        })?;
        if f.len() as u64 > max_len {
            return Err(Error::corrupt(format!(
                "{name} in {} is {} bytes, more than the limit of {max_len}",
                self.name,
                f.len()
            )));
        }
        Ok(f.to_vec())
    }
    fn write_atomic(&self, name: &str, data: &[u8], _sync: bool) -> Result<()> {
        check_file_name(name)?;
        self.lock()
            .insert(name.to_string(), Arc::new(data.to_vec()));
        Ok(())
    }
    fn create_new(&self, name: &str, data: &[u8], _sync: bool) -> Result<bool> {
        check_file_name(name)?;
        // Under the one lock: the check and the insert are one step.
        let mut files = self.lock();
        if files.contains_key(name) {
            return Ok(false);
        }
        files.insert(name.to_string(), Arc::new(data.to_vec()));
        Ok(true)
    }
    /// A hash of the content: an unchanged file keeps its tag, and a
    /// replacement by identical bytes (the only one that keeps it) changes
    /// nothing a reader could see.
    fn version(&self, name: &str) -> Result<Option<String>> {
        check_file_name(name)?;
        Ok(self.lock().get(name).map(|f| content_tag(f)))
    }
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        _sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        check_file_name(name)?;
        // Under the one lock: the compare and the swap are one step.
        let mut files = self.lock();
        if files.get(name).map(|f| content_tag(f)).as_deref() != expected {
            return Ok(false);
        }
        files.insert(name.to_string(), Arc::new(data.to_vec()));
        Ok(true)
    }
    fn list(&self) -> Result<Vec<FileEntry>> {
        Ok(self
            .lock()
            .iter()
            .map(|(n, f)| FileEntry {
                name: n.clone(),
                length: f.len() as u64,
            })
            .collect())
    }
    fn remove(&self, name: &str) -> Result<()> {
        check_file_name(name)?;
        self.lock().remove(name);
        Ok(())
    }
    fn sync_dir(&self) -> Result<()> {
        Ok(())
    }
}

/// The version tag of a file's content: its length and a 64-bit hash.
fn content_tag(data: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    format!("{}-{:016x}", data.len(), h.finish())
}
