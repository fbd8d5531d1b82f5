//! dcp-fs: the local filesystem backend of dcp.
//!
//! [`LocalFs`] implements [`dcp_core::FileSystem`] for one directory holding
//! one checkpoint: data files are streamed through a [`FileSink`] that
//! coalesces small records and writes large ones straight from the caller's
//! memory, read back with positional reads (`pread`) through a small cache of
//! open handles, and `.metadata` is committed with a temp file, `fsync`, one
//! atomic `rename` over the old file (never a delete first) and an `fsync` of
//! the directory.
//!
//! What it refuses:
//! * any name that is not a plain file name inside the checkpoint
//!   ([`dcp_core::storage::check_file_name`]): no `..`, no separators, no
//!   absolute paths;
//! * symbolic links planted in a checkpoint: files are opened with
//!   `O_NOFOLLOW`, so a link cannot make dcp read or overwrite a file
//!   outside the checkpoint;
//! * anything that is not a regular file where a data file should be (a
//!   directory, a FIFO): a clear error of kind `Corrupt`, never a panic or a
//!   hang;
//! * reads past the end of a file: a `Corrupt` error naming the file, the
//!   offset, the length and the file's actual size.
//!
//! I/O errors carry the operation and the path, and keep the system's text;
//! a full disk or an exhausted quota is
//! [`ErrorKind::StorageFull`].
//!
//! ```
//! use dcp_core::{save, load, ChunkBox, DType, DestStateDict, ReaderOptions, Single, StateDict,
//!                WriterOptions};
//! # fn main() -> dcp_core::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("step100");
//!
//! let mut sd = StateDict::new();
//! sd.insert_full_tensor("w", DType::U8, vec![4], bytes::Bytes::from_static(&[1, 2, 3, 4]))?;
//! let writer = dcp_fs::writer(&path, WriterOptions::default())?;
//! dcp_core::local::block_on(save(&sd, &writer, &Single))??;
//! assert!(path.join(".metadata").is_file());
//!
//! let mut dest = DestStateDict::new();
//! dest.want_tensor("w", DType::U8, vec![4], vec![ChunkBox::new(vec![1], vec![2])?])?;
//! let reader = dcp_fs::reader(&path, ReaderOptions::default());
//! let loaded = dcp_core::local::block_on(load(dest, &reader, &Single))??;
//! assert_eq!(loaded.state_dict.tensor("w").unwrap().chunks[0].data, vec![2, 3]);
//! # Ok(())
//! # }
//! ```

mod dir_lock;

use bytes::Bytes;
use dcp_core::storage::check_file_name;
use dcp_core::{
    Capabilities, Error, ErrorKind, FileEntry, FileSink, FileSystem, FileSystemReader,
    FileSystemWriter, ReaderOptions, Result, WriterOptions,
};
pub use dir_lock::DIR_LOCK_WAIT;
use dir_lock::{version_tag, DirLock};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Writes smaller than this are copied into the sink's buffer; larger ones
/// are written straight from the caller's memory.
pub const COALESCE_BELOW: usize = 256 * 1024;

/// Capacity of a sink's coalescing buffer: it is flushed when the next small
/// write would not fit.
const BUFFER_CAP: usize = 1024 * 1024;

/// At most this many read handles are kept open per [`LocalFs`].
const MAX_CACHED_HANDLES: usize = 256;

/// A cached read handle and the identity of the file it was opened on.
#[derive(Debug)]
struct Cached {
    file: Arc<File>,
    dev: u64,
    ino: u64,
}

/// A checkpoint location in a local directory.
///
/// Cheap to share behind an `Arc`; every method may be called from several
/// threads at once. Read handles are cached per name and dropped whenever
/// this `LocalFs` creates, replaces or removes that name, or sees (through
/// [`FileSystem::file_len`]) that another writer replaced it. The metadata
/// file (`.metadata*`) is never cached: it is read once per load and is the
/// one name a later save replaces in place.
#[derive(Debug)]
pub struct LocalFs {
    root: PathBuf,
    handles: Mutex<HashMap<String, Cached>>,
}

impl LocalFs {
    /// A location rooted at the directory `root` (created by
    /// [`FileSystem::prepare`] when a save starts).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalFs {
            root: root.into(),
            handles: Mutex::new(HashMap::new()),
        }
    }

    /// The directory this location is rooted at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `name`, after checking it is a plain name.
    fn path(&self, name: &str) -> Result<PathBuf> {
        check_file_name(name)?;
        Ok(self.root.join(name))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remove the temporary files `{name}.{pid}-{n}.new` that
    /// [`FileSystem::create_new`] of a process killed between writing and
    /// linking one left behind: those whose pid no longer exists on this
    /// host. Best effort; a failure is logged. (On a directory shared by
    /// several hosts, a live process of another host whose pid is free here
    /// would see its `create_new` fail with an I/O error, never a wrong
    /// answer.)
    fn remove_dead_temps(&self, name: &str) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        let prefix = format!("{name}.");
        for entry in rd.flatten() {
            let file = entry.file_name();
            let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
                continue;
            };
            let Some((pid, n)) = rest.strip_suffix(".new").and_then(|r| r.split_once('-')) else {
                continue;
            };
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let Some(pid) = pid.parse::<i32>().ok().filter(|_| digits(n)) else {
                continue;
            };
            let alive = rustix::process::Pid::from_raw(pid).is_some_and(|p| {
                rustix::process::test_kill_process(p).err() != Some(rustix::io::Errno::SRCH)
            });
            if !alive {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!("could not remove {}: {e}", entry.path().display());
                }
            }
        }
    }

    /// Forget the cached read handle of `name`, if any.
    fn invalidate(&self, name: &str) {
        self.cache().remove(name);
    }

    /// A read handle for `name`: from the cache, or freshly opened (and
    /// cached unless it is the metadata file). Returns whether it came from
    /// the cache.
    fn handle(&self, name: &str, path: &Path) -> Result<(Arc<File>, bool)> {
        // `.metadata` and `.lease` are replaced under the same name (by
        // other processes too): never read them through a cached handle.
        let cacheable = !name.starts_with('.');
        if !cacheable {
            return Ok((Arc::new(open_read(path)?.0), false));
        }
        // Open under the lock, so an invalidation racing with the open
        // cannot be overtaken by the insertion of a stale handle.
        let mut cache = self.cache();
        if let Some(c) = cache.get(name) {
            return Ok((c.file.clone(), true));
        }
        let (file, md) = open_read(path)?;
        let file = Arc::new(file);
        if cache.len() >= MAX_CACHED_HANDLES {
            cache.clear();
        }
        cache.insert(
            name.to_string(),
            Cached {
                file: file.clone(),
                dev: md.dev(),
                ino: md.ino(),
            },
        );
        Ok((file, false))
    }

    fn read_with(&self, file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
        let show = path.display().to_string();
        let len = buf.len();
        let past_end = |size: u64| {
            Error::corrupt(format!(
                "read {show} at offset {offset} length {len}: the file has only {size} bytes"
            ))
        };
        if buf.is_empty() {
            let size = file
                .metadata()
                .map_err(|e| Error::io("stat", &show, e))?
                .len();
            return if offset <= size {
                Ok(())
            } else {
                Err(past_end(size))
            };
        }
        match file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let size = file
                    .metadata()
                    .map_err(|e| Error::io("stat", &show, e))?
                    .len();
                Err(past_end(size))
            }
            Err(e) => Err(Error::io("read", &show, e)),
        }
    }
}

impl LocalFs {
    /// `preadv` into `bufs` from `offset`, resuming after short reads. The
    /// `IoSliceMut`s themselves are never advanced (a partly filled buffer is
    /// finished with a plain positional read), so a caller can retry the
    /// whole call with another handle.
    fn scatter_with(
        &self,
        file: &File,
        path: &Path,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        let show = path.display().to_string();
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let past_end = || -> Error {
            match file.metadata() {
                Ok(md) => Error::corrupt(format!(
                    "read {show} at offset {offset} length {total}: the file has only {} bytes",
                    md.len()
                )),
                Err(e) => Error::io("stat", &show, e),
            }
        };
        let mut i = 0;
        let mut pos = offset;
        loop {
            while i < bufs.len() && bufs[i].is_empty() {
                i += 1;
            }
            if i == bufs.len() {
                return Ok(());
            }
            let n = match rustix::io::preadv(file, &mut bufs[i..], pos) {
                Ok(0) => return Err(past_end()),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::io("read", &show, e.into())),
            };
            pos += n as u64;
            let mut left = n;
            while i < bufs.len() && left >= bufs[i].len() {
                left -= bufs[i].len();
                i += 1;
            }
            if left > 0 {
                let rest = &mut bufs[i][left..];
                match file.read_exact_at(rest, pos) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(past_end())
                    }
                    Err(e) => return Err(Error::io("read", &show, e)),
                }
                pos += rest.len() as u64;
                i += 1;
            }
        }
    }
}

/// Open `path` for reading without following a symlink and without blocking
/// on a FIFO; refuse anything but a regular file.
fn open_read(path: &Path) -> Result<(File, std::fs::Metadata)> {
    let show = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| open_error("open", &show, e))?;
    let md = file.metadata().map_err(|e| Error::io("stat", &show, e))?;
    if !md.is_file() {
        return Err(not_regular(&show, &md));
    }
    Ok((file, md))
}

/// Map an error of `open(2)`: `ELOOP` under `O_NOFOLLOW` means a symlink.
fn open_error(op: &str, show: &str, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return Error::corrupt(format!(
            "{op} {show}: it is a symbolic link; dcp does not follow links inside a checkpoint"
        ))
        .with_source(e);
    }
    Error::io(op, show, e)
}

fn not_regular(show: &str, md: &std::fs::Metadata) -> Error {
    let what = if md.is_dir() {
        "a directory"
    } else if md.file_type().is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    };
    Error::corrupt(format!(
        "{show} is {what}; a checkpoint file must be a regular file"
    ))
}

/// A data file being written by [`LocalFs::create`].
struct LocalSink {
    /// `None` once finished or aborted.
    file: Option<File>,
    path: PathBuf,
    buf: Vec<u8>,
    len: u64,
}

impl LocalSink {
    fn show(&self) -> String {
        self.path.display().to_string()
    }

    fn write_out(&mut self, data: &[u8]) -> Result<()> {
        let show = self.show();
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| Error::invalid(format!("write to {show} after it was closed")))?;
        file.write_all(data)
            .map_err(|e| Error::io("write", &show, e))
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_out(&buf);
        // Keep the allocation for the next small writes.
        self.buf = buf;
        self.buf.clear();
        r
    }
}

impl FileSink for LocalSink {
    fn write(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if data.len() >= COALESCE_BELOW {
            self.flush_buf()?;
            self.write_out(&data)?;
        } else {
            if self.buf.len() + data.len() > BUFFER_CAP {
                self.flush_buf()?;
            }
            if self.buf.capacity() == 0 {
                self.buf.reserve(BUFFER_CAP);
            }
            self.buf.extend_from_slice(&data);
        }
        self.len += data.len() as u64;
        Ok(())
    }

    fn finish(mut self: Box<Self>, sync: bool) -> Result<u64> {
        let show = self.show();
        let flushed = self.flush_buf();
        let result = flushed.and_then(|()| {
            if sync {
                if let Some(f) = &self.file {
                    f.sync_all().map_err(|e| Error::io("fsync", &show, e))?;
                }
            }
            Ok(self.len)
        });
        match result {
            Ok(len) => {
                // Finished: the file stays.
                self.file = None;
                Ok(len)
            }
            // Dropping self removes the partial file.
            Err(e) => Err(e),
        }
    }

    fn abort(self: Box<Self>) {
        // Drop removes the partial file.
    }
}

impl Drop for LocalSink {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            drop(f);
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("could not remove partial file {}: {e}", self.show());
                }
            }
        }
    }
}

impl FileSystem for LocalFs {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_sync: true,
            atomic_replace: true,
            list: true,
        }
    }

    fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| Error::io("create directory", &self.location(), e))
    }

    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        let path = self.path(name)?;
        self.invalidate(name);
        let show = path.display().to_string();
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| open_error("create", &show, e))?;
        let md = file.metadata().map_err(|e| Error::io("stat", &show, e))?;
        if !md.is_file() {
            return Err(not_regular(&show, &md));
        }
        Ok(Box::new(LocalSink {
            file: Some(file),
            path,
            buf: Vec::new(),
            len: 0,
        }))
    }

    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let path = self.path(name)?;
        if offset.checked_add(buf.len() as u64).is_none() {
            return Err(Error::corrupt(format!(
                "read {} at offset {offset} length {}: the range overflows",
                path.display(),
                buf.len()
            )));
        }
        let (file, cached) = self.handle(name, &path)?;
        match self.read_with(&file, &path, offset, buf) {
            Ok(()) => Ok(()),
            Err(_) if cached => {
                // The cached handle may be stale (the file was replaced by
                // someone else): retry once with a fresh one.
                self.invalidate(name);
                let (file, _) = self.handle(name, &path)?;
                self.read_with(&file, &path, offset, buf)
            }
            Err(e) => Err(e),
        }
    }

    /// One `preadv` per 1024 buffers (the kernel's limit), straight from the
    /// page cache into the buffers.
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        let path = self.path(name)?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if offset.checked_add(total).is_none() {
            return Err(Error::corrupt(format!(
                "read {} at offset {offset} length {total}: the range overflows",
                path.display()
            )));
        }
        let (file, cached) = self.handle(name, &path)?;
        match self.scatter_with(&file, &path, offset, bufs) {
            Ok(()) => Ok(()),
            Err(_) if cached => {
                self.invalidate(name);
                let (file, _) = self.handle(name, &path)?;
                self.scatter_with(&file, &path, offset, bufs)
            }
            Err(e) => Err(e),
        }
    }

    /// `preadv2(RWF_NOWAIT)`: reads only what the page cache holds.
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let path = self.path(name)?;
        let (file, _) = self.handle(name, &path)?;
        let mut at = 0usize;
        while at < buf.len() {
            let mut iov = [std::io::IoSliceMut::new(&mut buf[at..])];
            match rustix::io::preadv2(
                &*file,
                &mut iov,
                offset + at as u64,
                rustix::io::ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => return Ok(false),
                Ok(n) => at += n,
                Err(rustix::io::Errno::INTR) => {}
                // AGAIN: not cached; OPNOTSUPP/INVAL: no NOWAIT here.
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path(name)?;
        let show = path.display().to_string();
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() => {
                let mut cache = self.cache();
                if let Some(c) = cache.get(name) {
                    if c.dev != md.dev() || c.ino != md.ino() {
                        cache.remove(name);
                    }
                }
                Ok(Some(md.len()))
            }
            Ok(md) => Err(not_regular(&show, &md)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &show, e)),
        }
    }

    /// Opens the file once and reads it through that descriptor: the file
    /// as it was when opened, whole, even if a rename replaces it meanwhile
    /// (`.metadata` during a commit, `.lease` during a renewal).
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        use std::io::Read;
        let path = self.path(name)?;
        let show = path.display().to_string();
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{name} not found in {}", self.location()),
                ))
            }
            Err(e) => return Err(open_error("open", &show, e)),
        };
        let md = f.metadata().map_err(|e| Error::io("stat", &show, e))?;
        if !md.is_file() {
            return Err(not_regular(&show, &md));
        }
        if md.len() > max_len {
            return Err(Error::corrupt(format!(
                "{name} in {} is {} bytes, more than the limit of {max_len}",
                self.location(),
                md.len()
            )));
        }
        let mut out = Vec::with_capacity(md.len() as usize);
        f.take(max_len.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|e| Error::io("read", &show, e))?;
        if out.len() as u64 > max_len {
            return Err(Error::corrupt(format!(
                "{name} in {} grew past the limit of {max_len} bytes while read",
                self.location()
            )));
        }
        Ok(out)
    }

    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        let path = self.path(name)?;
        let tmp_name = format!("{name}.tmp");
        let tmp = self.path(&tmp_name)?;
        let show_tmp = tmp.display().to_string();
        let write_tmp = || -> Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&tmp)
                .map_err(|e| open_error("create", &show_tmp, e))?;
            let md = f.metadata().map_err(|e| Error::io("stat", &show_tmp, e))?;
            if !md.is_file() {
                return Err(not_regular(&show_tmp, &md));
            }
            f.write_all(data)
                .map_err(|e| Error::io("write", &show_tmp, e))?;
            if sync {
                f.sync_all().map_err(|e| Error::io("fsync", &show_tmp, e))?;
            }
            Ok(())
        };
        if let Err(e) = write_tmp() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // One atomic replace: readers see the old file or the new one.
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(
                &format!("rename {show_tmp} to"),
                &path.display().to_string(),
                e,
            ));
        }
        self.invalidate(name);
        self.invalidate(&tmp_name);
        if sync {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Writes `data` to a fresh temporary file (fsynced with `sync`) and
    /// links it to `name` with `link(2)`, which fails with `EEXIST` if
    /// `name` exists: the file appears whole or not at all, atomically
    /// also on NFS (the classic NFS-safe lock). Where links are refused
    /// (`EPERM`, `ENOTSUP`: some FUSE and FAT file systems) it falls back to
    /// `O_CREAT | O_EXCL`, where a reader may briefly see the file empty.
    fn create_new(&self, name: &str, data: &[u8], sync: bool) -> Result<bool> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = self.path(name)?;
        let show = path.display().to_string();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp_name = format!("{name}.{}-{n}.new", std::process::id());
        let tmp = self.path(&tmp_name)?;
        let show_tmp = tmp.display().to_string();
        let write_new = |p: &Path, show: &str| -> Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(p)
                .map_err(|e| open_error("create", show, e))?;
            f.write_all(data).map_err(|e| Error::io("write", show, e))?;
            if sync {
                f.sync_all().map_err(|e| Error::io("fsync", show, e))?;
            }
            Ok(())
        };
        if let Err(e) = write_new(&tmp, &show_tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        let created = match linked {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EOPNOTSUPP)) => {
                match write_new(&path, &show) {
                    Ok(()) => true,
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
                    // Not removed: it may not be this call's file.
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(Error::io(&format!("link {show_tmp} to"), &show, e)),
        };
        self.invalidate(name);
        if created {
            self.remove_dead_temps(name);
            if sync {
                self.sync_dir()?;
            }
        }
        Ok(created)
    }

    fn version(&self, name: &str) -> Result<Option<String>> {
        let path = self.path(name)?;
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() => Ok(Some(version_tag(&md))),
            Ok(md) => Err(not_regular(&path.display().to_string(), &md)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &path.display().to_string(), e)),
        }
    }

    /// Compares and renames under an exclusive `flock` of the directory
    /// (see [`DIR_LOCK_WAIT`]); the replace itself is
    /// [`write_atomic`](FileSystem::write_atomic)'s.
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        let _lock = DirLock::acquire(&self.root, &self.location())?;
        if self.version(name)?.as_deref() != expected {
            return Ok(false);
        }
        self.write_atomic(name, data, sync)?;
        Ok(true)
    }

    fn list(&self) -> Result<Vec<FileEntry>> {
        let show = self.location();
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", &show, e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("list", &show, e))?;
            // `file_type` does not follow symlinks: links, directories and
            // other special files are not checkpoint files.
            let ft = entry.file_type().map_err(|e| Error::io("list", &show, e))?;
            if !ft.is_file() {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if check_file_name(&name).is_err() {
                continue;
            }
            let md = match entry.metadata() {
                Ok(md) => md,
                // Removed between the listing and the stat.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &entry.path().display().to_string(), e)),
            };
            out.push(FileEntry {
                name,
                length: md.len(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        self.invalidate(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &path.display().to_string(), e)),
        }
    }

    fn sync_dir(&self) -> Result<()> {
        let show = self.location();
        let dir = File::open(&self.root).map_err(|e| Error::io("open directory", &show, e))?;
        dir.sync_all()
            .map_err(|e| Error::io("fsync directory", &show, e))
    }
}

/// A [`FileSystemWriter`] saving into the directory `path` (created when the
/// save starts).
pub fn writer(path: impl Into<PathBuf>, options: WriterOptions) -> Result<FileSystemWriter> {
    FileSystemWriter::new(Arc::new(LocalFs::new(path)), options)
}

/// A [`FileSystemReader`] loading from the checkpoint in the directory `path`.
pub fn reader(path: impl Into<PathBuf>, options: ReaderOptions) -> FileSystemReader {
    FileSystemReader::new(Arc::new(LocalFs::new(path)), options)
}

/// Is `e` the error a full disk or an exhausted quota gives? The same as
/// `e.kind() == ErrorKind::StorageFull`.
pub fn is_disk_full(e: &Error) -> bool {
    e.kind() == ErrorKind::StorageFull
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, LocalFs) {
        let dir = tempfile::tempdir().unwrap();
        let fs = LocalFs::new(dir.path().join("ckpt"));
        fs.prepare().unwrap();
        (dir, fs)
    }

    /// A small file read while renames replace it is always one whole
    /// version: never a length of one and the bytes of another.
    #[test]
    fn read_small_sees_one_version_while_it_is_replaced() {
        let (_d, fs) = setup();
        let (a, b) = (vec![1u8; 100], vec![2u8; 250]);
        fs.write_atomic(".lease", &a, false).unwrap();
        let fs = Arc::new(fs);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (fs, stop, a, b) = (fs.clone(), stop.clone(), a.clone(), b.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let v = if n % 2 == 0 { &b } else { &a };
                    fs.write_atomic(".lease", v, false).unwrap();
                    n += 1;
                }
                n
            })
        };
        for _ in 0..5000 {
            let got = fs.read_small(".lease", 1000).unwrap();
            assert!(
                got == a || got == b,
                "a mix of versions: {} bytes",
                got.len()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(writer.join().unwrap() > 0);
        assert_eq!(
            fs.read_small(".lease", 99).unwrap_err().kind(),
            ErrorKind::Corrupt,
            "over the limit"
        );
    }

    /// Conditional replace: a swap based on a stale version is refused and
    /// writes nothing; of many concurrent swaps from one version, exactly
    /// one wins (the compare and the rename run under the directory lock).
    #[test]
    fn replace_if_compares_and_swaps_once() {
        let (_d, fs) = setup();
        assert_eq!(fs.version(".metadata").unwrap(), None);
        assert!(fs.replace_if(".metadata", b"one", true, None).unwrap());
        assert!(!fs.replace_if(".metadata", b"two", true, None).unwrap());
        let v1 = fs.version(".metadata").unwrap().unwrap();
        assert_eq!(fs.version(".metadata").unwrap().unwrap(), v1, "stable");
        fs.write_atomic(".metadata", b"one", true).unwrap();
        let v2 = fs.version(".metadata").unwrap().unwrap();
        assert_ne!(v1, v2, "a rewrite with the same bytes is a new version");
        assert!(!fs.replace_if(".metadata", b"two", true, Some(&v1)).unwrap());
        assert_eq!(fs.read_small(".metadata", 10).unwrap(), b"one");

        let fs = Arc::new(fs);
        let winners: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (fs, v2) = (fs.clone(), v2.clone());
                    s.spawn(move || {
                        fs.replace_if(".metadata", format!("w{i}").as_bytes(), false, Some(&v2))
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1, "{winners:?}");
        let won = winners.iter().position(|w| *w).unwrap();
        assert_eq!(
            fs.read_small(".metadata", 10).unwrap(),
            format!("w{won}").as_bytes()
        );
    }

    fn write(fs: &LocalFs, name: &str, parts: &[&[u8]]) -> u64 {
        let mut s = fs.create(name).unwrap();
        for p in parts {
            s.write(Bytes::copy_from_slice(p)).unwrap();
        }
        s.finish(true).unwrap()
    }

    /// Scattered reads fill buffers in order across the kernel's 1024-buffer
    /// limit (several `preadv` calls), skip empty buffers, agree with the
    /// default (read then copy) implementation, and refuse reading past the
    /// end with `Corrupt`, naming the file.
    #[test]
    fn read_scattered_matches_read_into() {
        let (_d, fs) = setup();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
        write(&fs, "__0_0-s.dcp", &[&data]);
        // 3000 buffers of 0 to 40 bytes (some empty) from offset 5.
        let lens: Vec<usize> = (0..3000).map(|i| (i * 13) % 41).collect();
        let total: usize = lens.iter().sum();
        let mut store: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l]).collect();
        let mut iov: Vec<std::io::IoSliceMut<'_>> = store
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        fs.read_scattered("__0_0-s.dcp", 5, &mut iov).unwrap();
        drop(iov);
        assert_eq!(store.concat(), data[5..5 + total]);

        // The trait's default path gives the same bytes.
        let mem = dcp_core::mem::MemoryFs::new("memory://s");
        let mut s = mem.create("__0_0-s.dcp").unwrap();
        s.write(Bytes::from(data.clone())).unwrap();
        s.finish(false).unwrap();
        let mut other: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l]).collect();
        let mut iov: Vec<std::io::IoSliceMut<'_>> = other
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        mem.read_scattered("__0_0-s.dcp", 5, &mut iov).unwrap();
        drop(iov);
        assert_eq!(other, store);

        // Past the end: an error naming the file, whichever buffer it hits.
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 100];
        let mut iov = [
            std::io::IoSliceMut::new(&mut a),
            std::io::IoSliceMut::new(&mut b),
        ];
        let e = fs
            .read_scattered("__0_0-s.dcp", data.len() as u64 - 150, &mut iov)
            .unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("__0_0-s.dcp"), "{e}");
        assert!(e.to_string().contains("has only 200000 bytes"), "{e}");
        let e = fs
            .read_scattered("__0_0-s.dcp", u64::MAX - 10, &mut iov)
            .unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::Corrupt, "{e}");
    }

    #[test]
    fn create_new_creates_once_whole_and_sweeps_dead_temps() {
        let (_d, fs) = setup();
        fs.prepare().unwrap();
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        // Left by a process killed between writing its temp file and linking it.
        let stale = format!(".lease.{dead}-0.new");
        let live = format!(".lease.{}-999.new", std::process::id());
        std::fs::write(fs.root().join(&stale), b"x").unwrap();
        std::fs::write(fs.root().join(&live), b"y").unwrap();
        assert!(fs.create_new(".lease", b"first", true).unwrap());
        assert!(!fs.create_new(".lease", b"second", true).unwrap());
        assert_eq!(fs.read_small(".lease", 100).unwrap(), b"first");
        let names: Vec<String> = fs.list().unwrap().into_iter().map(|f| f.name).collect();
        assert!(!names.contains(&stale), "{names:?}");
        assert!(
            names.contains(&live),
            "a live process's temp file is kept: {names:?}"
        );
        fs.remove(".lease").unwrap();
        assert!(fs.create_new(".lease", b"third", false).unwrap());
        assert_eq!(fs.read_small(".lease", 100).unwrap(), b"third");
        fs.create_new("../x", b"", false).unwrap_err();
    }

    #[test]
    fn write_read_small_and_large() {
        let (_d, fs) = setup();
        let big: Vec<u8> = (0..(COALESCE_BELOW + 77))
            .map(|i| (i % 251) as u8)
            .collect();
        let len = write(&fs, "__0_0-x.dcp", &[b"abc", &big, b"", b"de"]);
        assert_eq!(len, 3 + big.len() as u64 + 2);
        assert_eq!(fs.file_len("__0_0-x.dcp").unwrap(), Some(len));
        let mut b = vec![0u8; 5];
        fs.read_into("__0_0-x.dcp", 1, &mut b).unwrap();
        assert_eq!(&b[..2], b"bc");
        assert_eq!(&b[2..], &big[..3]);
        let mut tail = [0u8; 2];
        fs.read_into("__0_0-x.dcp", len - 2, &mut tail).unwrap();
        assert_eq!(&tail, b"de");
        let on_disk = std::fs::read(fs.root().join("__0_0-x.dcp")).unwrap();
        assert_eq!(on_disk.len() as u64, len);
        assert_eq!(&on_disk[3..3 + big.len()], &big[..]);
    }

    #[test]
    fn short_file_is_corrupt_with_details() {
        let (_d, fs) = setup();
        write(&fs, "f.dcp", &[b"0123456789"]);
        let mut b = vec![0u8; 8];
        let e = fs.read_into("f.dcp", 5, &mut b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let m = e.message();
        for part in ["f.dcp", "offset 5", "length 8", "only 10 bytes"] {
            assert!(m.contains(part), "{m}");
        }
        let e = fs.read_into("f.dcp", 11, &mut []).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        fs.read_into("f.dcp", 10, &mut []).unwrap();
        let e = fs.read_into("f.dcp", u64::MAX, &mut b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let e = fs.read_into("missing.dcp", 0, &mut b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().contains("missing.dcp"), "{e}");
    }

    #[test]
    fn refuses_bad_names() {
        let (_d, fs) = setup();
        for bad in ["../x", "a/b", "/etc/passwd", "..", "", "x..y"] {
            let e = fs.create(bad).err().expect("refused");
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{bad}");
            let e = fs.read_into(bad, 0, &mut [0u8; 1]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{bad}");
            assert!(fs.file_len(bad).is_err());
            assert!(fs.remove(bad).is_err());
            assert!(fs.write_atomic(bad, b"x", false).is_err());
        }
        // The temp name of a 255-byte name would be too long: refused, not
        // silently truncated.
        assert!(fs.write_atomic(&"a".repeat(255), b"x", false).is_err());
    }

    #[test]
    fn symlink_is_refused() {
        let (d, fs) = setup();
        let secret = d.path().join("secret");
        std::fs::write(&secret, b"outside the checkpoint").unwrap();
        symlink(&secret, fs.root().join("__0_0-x.dcp")).unwrap();
        let mut b = vec![0u8; 7];
        let e = fs.read_into("__0_0-x.dcp", 0, &mut b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("symbolic link"), "{e}");
        assert_eq!(b, vec![0u8; 7]);
        assert!(fs.file_len("__0_0-x.dcp").is_err());
        // Writing through a planted link must not clobber its target.
        assert!(fs.create("__0_0-x.dcp").is_err());
        symlink(&secret, fs.root().join(".metadata.tmp")).unwrap();
        assert!(fs.write_atomic(".metadata", b"new", false).is_err());
        assert_eq!(std::fs::read(&secret).unwrap(), b"outside the checkpoint");
        // Links are not listed as checkpoint files.
        assert!(fs.list().unwrap().is_empty());
    }

    #[test]
    fn directory_as_data_file_is_a_clear_error() {
        let (_d, fs) = setup();
        std::fs::create_dir(fs.root().join("__0_0-x.dcp")).unwrap();
        let e = fs.read_into("__0_0-x.dcp", 0, &mut [0u8; 4]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("is a directory"), "{e}");
        let e = fs.file_len("__0_0-x.dcp").unwrap_err();
        assert!(e.message().contains("is a directory"), "{e}");
        assert!(fs.create("__0_0-x.dcp").is_err());
        assert!(fs.list().unwrap().is_empty());
        // A FIFO must not block the reader forever.
        let fifo = fs.root().join("__1_0-x.dcp");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success());
        if made {
            let e = fs.read_into("__1_0-x.dcp", 0, &mut [0u8; 4]).unwrap_err();
            assert!(e.message().contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn atomic_replace_and_cache_invalidation() {
        let (_d, fs) = setup();
        fs.write_atomic(".metadata", b"first", true).unwrap();
        assert_eq!(fs.read_small(".metadata", 100).unwrap(), b"first");
        fs.write_atomic(".metadata", b"second!", true).unwrap();
        assert_eq!(fs.read_small(".metadata", 100).unwrap(), b"second!");
        assert!(!fs.root().join(".metadata.tmp").exists());
        assert!(fs.read_small(".metadata", 3).is_err());

        // A cached data-file handle is dropped when the name is rewritten,
        // whether by this LocalFs or (seen through file_len) by another.
        write(&fs, "d.dcp", &[b"old-data"]);
        let mut b = [0u8; 3];
        fs.read_into("d.dcp", 0, &mut b).unwrap();
        assert_eq!(&b, b"old");
        write(&fs, "d.dcp", &[b"new-data"]);
        fs.read_into("d.dcp", 0, &mut b).unwrap();
        assert_eq!(&b, b"new");
        fs.write_atomic("d.dcp", b"atomic", false).unwrap();
        fs.read_into("d.dcp", 0, &mut b).unwrap();
        assert_eq!(&b, b"ato");
        let other = LocalFs::new(fs.root());
        other.write_atomic("d.dcp", b"replaced", false).unwrap();
        assert_eq!(fs.read_small("d.dcp", 100).unwrap(), b"replaced");
        fs.remove("d.dcp").unwrap();
        assert_eq!(fs.file_len("d.dcp").unwrap(), None);
        assert_eq!(
            fs.read_into("d.dcp", 0, &mut b).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[test]
    fn list_and_remove() {
        let (_d, fs) = setup();
        write(&fs, "b.dcp", &[b"12"]);
        write(&fs, "a.dcp", &[b"1"]);
        std::fs::create_dir(fs.root().join("sub")).unwrap();
        let names: Vec<(String, u64)> = fs
            .list()
            .unwrap()
            .into_iter()
            .map(|f| (f.name, f.length))
            .collect();
        assert_eq!(names, vec![("a.dcp".into(), 1), ("b.dcp".into(), 2)]);
        fs.remove("a.dcp").unwrap();
        fs.remove("a.dcp").unwrap();
        assert_eq!(fs.list().unwrap().len(), 1);
        fs.sync_dir().unwrap();
        // A location that does not exist yet lists as empty.
        let none = LocalFs::new(fs.root().join("not-yet"));
        assert!(none.list().unwrap().is_empty());
        assert_eq!(none.file_len(".metadata").unwrap(), None);
    }

    #[test]
    fn abort_and_drop_remove_the_partial_file() {
        let (_d, fs) = setup();
        let mut s = fs.create("p.dcp").unwrap();
        s.write(Bytes::from(vec![7u8; COALESCE_BELOW * 2])).unwrap();
        assert!(fs.root().join("p.dcp").exists());
        s.abort();
        assert!(!fs.root().join("p.dcp").exists());
        let mut s = fs.create("q.dcp").unwrap();
        s.write(Bytes::from_static(b"x")).unwrap();
        drop(s);
        assert!(!fs.root().join("q.dcp").exists());
        assert!(fs.capabilities().atomic_replace);
        assert!(fs.location().ends_with("ckpt"));
    }

    #[test]
    fn full_disk_says_so() {
        // /dev/full fails every write with ENOSPC. The sink's path points at
        // a file that does not exist, so its cleanup touches nothing real.
        let Ok(file) = OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let mut sink: Box<dyn FileSink> = Box::new(LocalSink {
            file: Some(file),
            path: d.path().join("full.dcp"),
            buf: Vec::new(),
            len: 0,
        });
        sink.write(Bytes::from_static(b"small, buffered")).unwrap();
        let e = sink
            .write(Bytes::from(vec![0u8; COALESCE_BELOW]))
            .unwrap_err();
        assert!(is_disk_full(&e), "{e:?}");
        assert!(e.message().contains("full.dcp"), "{e}");
        sink.abort();
    }
}
