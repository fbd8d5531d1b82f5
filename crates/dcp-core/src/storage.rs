//! The `FileSystem` plug point: where a checkpoint's bytes go.
//!
//! A `FileSystem` is rooted at one checkpoint location (a directory, or a
//! prefix in a bucket) and addresses files by plain names inside it. Its
//! methods are blocking: dcp calls them from its own bounded pool of worker
//! threads, never from an async executor thread, so a local implementation can
//! use positional I/O directly and an object-store implementation can drive
//! its async client with `Handle::block_on`.

use crate::error::{Error, Result};
use bytes::Bytes;
use std::fmt;

/// Name of the metadata file whose presence marks a complete checkpoint.
pub const METADATA_FILE: &str = ".metadata";

/// A file in a checkpoint location, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Plain name inside the checkpoint location.
    pub name: String,
    /// Length in bytes.
    pub length: u64,
}

/// What a backend can do; the pipeline and tests adapt to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `finish(sync = true)` makes data durable (fsync or a completed upload).
    pub durable_sync: bool,
    /// `write_atomic` replaces a file atomically (rename, or a single PUT).
    pub atomic_replace: bool,
    /// `list` is supported.
    pub list: bool,
}

/// A checkpoint location. Every method is blocking and may be called from
/// several threads at once. Names are plain file names (see
/// [`check_file_name`]); implementations refuse anything else.
///
/// Wrappers of another file system implement
/// [`FileSystemLayer`](crate::layer::FileSystemLayer) instead, which forwards
/// every method they do not override. **A method added to this trait must be
/// added to `FileSystemLayer` too** (a forwarding default, and a line in its
/// blanket impl and in its unit test's list), or every wrapper would run this
/// trait's default in place of the wrapped backend's method.
pub trait FileSystem: Send + Sync + fmt::Debug + 'static {
    /// The location as a URL or path, for messages (`/ckpt/step100`, `s3://b/p`).
    fn location(&self) -> String;

    /// What this backend guarantees.
    fn capabilities(&self) -> Capabilities;

    /// Make sure the location exists (create the directory).
    fn prepare(&self) -> Result<()>;

    /// Create (or truncate) `name` and return a sink that streams ordered
    /// buffers into it. Nothing is visible under `name` as complete until
    /// [`FileSink::finish`] returns.
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>>;

    /// Fill `buf` from `name` starting at `offset`. Reading past the end is an
    /// error of kind `Corrupt` naming the file, offset and length.
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Fill `bufs`, in order, from one contiguous range of `name` starting
    /// at `offset`: the first buffer gets the first bytes, and so on. This is
    /// a scattered read (`preadv`): it lets a load put a saved region's bytes
    /// straight into many destination rows, or into several ranks' buffers,
    /// with one copy. Reading past the end is an error of kind `Corrupt`, as
    /// for [`FileSystem::read_into`]; on error the buffers' contents are
    /// unspecified.
    ///
    /// The default reads the range into one temporary buffer with
    /// [`FileSystem::read_into`] (a single request: right for object stores)
    /// and copies it out.
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut tmp = vec![0u8; total];
        self.read_into(name, offset, &mut tmp)?;
        let mut at = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&tmp[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Fill `buf` from `name` at `offset` only if every byte is already in
    /// memory (the page cache), without waiting for a device: `Ok(true)`
    /// when `buf` was filled, `Ok(false)` when filling it would have to wait
    /// (then `buf`'s contents are unspecified). Errors as
    /// [`FileSystem::read_into`].
    ///
    /// A load uses it to pick how to scatter a strided read: from memory it
    /// copies cache-sized blocks out itself (cheapest per byte); otherwise it
    /// hands the kernel one large scattered read ([`FileSystem::read_scattered`]),
    /// which keeps the device busy. The default, `Ok(false)`, suits object
    /// stores, where every request is a round trip.
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let _ = (name, offset, buf);
        Ok(false)
    }

    /// Length of `name`, or `None` if it does not exist.
    fn file_len(&self, name: &str) -> Result<Option<u64>>;

    /// Write a small file so that readers see either the old or the new
    /// content, never a mix or nothing (temp file, fsync, rename, directory
    /// fsync; or one PUT). This is the commit point of a save.
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()>;

    /// Create `name` holding `data` only if no file of that name exists, as
    /// one atomic step: `Ok(true)` when this call created it, `Ok(false)`
    /// when a file of that name already existed (then nothing was written).
    /// Two concurrent calls never both return `Ok(true)`. With `sync`, the
    /// file and its directory entry are durable before it returns. This is
    /// how a save takes the location's lease.
    ///
    /// Local disk: `O_CREAT | O_EXCL`, then fsync of the file and the
    /// directory (on NFS, `O_EXCL` is atomic from NFSv3 on). Object stores: a
    /// conditional PUT (`If-None-Match: *`) where the service supports it;
    /// see the backend's documentation for services that do not.
    fn create_new(&self, name: &str, data: &[u8], sync: bool) -> Result<bool>;

    /// A version tag of `name` that [`FileSystem::replace_if`] can compare
    /// against: `Ok(None)` when `name` does not exist. Two reads of an
    /// unchanged file give the same tag; any replacement changes it (an
    /// ETag on object stores; on local disk the inode, size and times).
    ///
    /// The default refuses with [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported):
    /// the store has no conditional replace, and dcp falls back to comparing
    /// under its lease (see RELIABILITY.md for what that leaves open).
    fn version(&self, name: &str) -> Result<Option<String>> {
        let _ = name;
        Err(Error::unsupported(format!(
            "{} has no conditional replace",
            self.location()
        )))
    }

    /// Replace `name` with `data`, as [`FileSystem::write_atomic`] does, only
    /// if its [`version`](FileSystem::version) is still `expected` (`None`:
    /// only if `name` does not exist), as one atomic step against every
    /// other conditional write: `Ok(true)` when replaced, `Ok(false)` when the
    /// file had changed (then nothing was written). This is the commit's
    /// compare-and-swap and how a lease is renewed or broken without a
    /// read-then-write race.
    ///
    /// Object stores: `If-Match: <etag>` (or `If-None-Match: *`) on the PUT.
    /// A retried PUT whose first reply was lost answers `Ok(false)` for this
    /// call's own write: callers that can tell their content apart check it.
    /// Local disk: the compare and the rename run under an exclusive
    /// `flock` of the directory, which every dcp process honours. The
    /// default refuses with `Unsupported`, as [`FileSystem::version`] does.
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        let _ = (name, data, sync, expected);
        Err(Error::unsupported(format!(
            "{} has no conditional replace",
            self.location()
        )))
    }

    /// Every file directly in the location.
    fn list(&self) -> Result<Vec<FileEntry>>;

    /// Remove `name`; removing a missing file is not an error.
    fn remove(&self, name: &str) -> Result<()>;

    /// Make the location's directory entries durable (no-op where meaningless).
    fn sync_dir(&self) -> Result<()>;

    /// How many read requests one reader thread of a load keeps in flight
    /// on this file system. A load runs this many reads at once per reader
    /// thread (each one record, or one coalesced span), so a store where
    /// every request is a network round trip is not read one request at a
    /// time. The default, 1, suits a local disk, whose kernel queue and
    /// read-ahead already overlap requests; object stores answer more (see
    /// dcp-fsspec's `read_concurrency`). Never 0 (0 is taken as 1).
    fn read_requests_in_flight(&self) -> usize {
        1
    }

    /// The request size this file system reads best, if it has one: a load
    /// then reads neighbouring whole records together, scattered straight
    /// into their destinations, in requests of at most this many bytes, and
    /// lowers the reader's `max_request` to it. The default, `None`, leaves
    /// the reader's settings as they are (right for a local disk, where a
    /// request is cheap). Object stores answer their part size: each
    /// request costs a round trip, and some servers pay per request in
    /// proportion to the object's size.
    fn read_request_size(&self) -> Option<u64> {
        None
    }

    /// Read a whole small file, refusing files longer than `max_len`.
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        let len = self.file_len(name)?.ok_or_else(|| {
            Error::new(
                crate::ErrorKind::NotFound,
                format!("{} not found in {}", name, self.location()),
            )
        })?;
        if len > max_len {
            return Err(Error::corrupt(format!(
                "{name} in {} is {len} bytes, more than the limit of {max_len}",
                self.location()
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_into(name, 0, &mut buf)?;
        Ok(buf)
    }
}

/// A file being written: ordered buffers in, then `finish` or `abort`.
pub trait FileSink: Send {
    /// Append `buf`. Implementations may keep the `Bytes` (no copy) until
    /// written.
    fn write(&mut self, buf: Bytes) -> Result<()>;

    /// Told before the first [`FileSink::write`]: the file will be about
    /// `len` bytes (the records' stored lengths plus header and padding; a
    /// codec's output may differ a little). A sink may size its requests by
    /// it (an object-store upload picks a part size that keeps the object
    /// within the store's part limit); it is a hint, never a limit, and the
    /// default ignores it. Wrapping sinks should forward it.
    fn expect_len(&mut self, len: u64) {
        let _ = len;
    }

    /// Whether the sink may keep the `Bytes` given to [`FileSink::write`]
    /// after it returns and release them only when more bytes arrive or the
    /// file finishes (a multipart upload's part buffer, a store that uploads
    /// on close). Pieces staged from a [`ChunkSource`](crate::stage::ChunkSource)
    /// (device memory, within the writer thread's `per_thread_copy_ahead`
    /// budget) go to such a sink as heap copies: otherwise the budget could
    /// wait for bytes that only its own next piece would release. Host
    /// memory goes as it is either way. Default false (the sink writes or
    /// copies before `write` returns); wrapping sinks should forward it.
    fn keeps_bytes(&self) -> bool {
        false
    }

    /// Complete the file; with `sync`, make it durable first. Returns the
    /// file's length.
    fn finish(self: Box<Self>, sync: bool) -> Result<u64>;

    /// Give up: remove what was written (best effort, errors are logged).
    fn abort(self: Box<Self>);
}

/// Check that `name` is a plain file name inside a checkpoint: 1 to 255
/// bytes of `[A-Za-z0-9._-]`, not `.` or `..`, not containing `..`.
/// Refuses separators, absolute paths and anything that could leave the
/// checkpoint location.
pub fn check_file_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.contains("..")
        && name != "."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "file name {name:?} is not a plain name inside the checkpoint"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for good in ["__0_0-abc.dcp", ".metadata", ".metadata.tmp", "a-b_c.d"] {
            check_file_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            "a\\b",
            "x..y",
            "a\0b",
            "é",
        ] {
            let e = check_file_name(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "{bad:?}");
        }
        check_file_name(&"a".repeat(256)).unwrap_err();
    }
}
