//! [`writer`] and [`reader`]: what torch calls `FsspecWriter` and
//! `FsspecReader`, dcp-core's own [`FileSystemWriter`] and
//! [`FileSystemReader`] over an [`OpendalFs`] opened from a URL.
//!
//! They return dcp-core's types themselves, not wrappers: a wrapper would
//! have to forward every [`StorageReader`](dcp_core::StorageReader) method,
//! and one it missed (`file_system_reader`, which lets ranks of one process
//! lend each other their buffers) would silently lose a fast path.

use crate::{OpendalFs, OpendalOptions};
use dcp_core::{FileSystemReader, FileSystemWriter, ReaderOptions, Result, WriterOptions};
use std::collections::HashMap;
use std::sync::Arc;

/// torch's `FsspecWriter`: a [`FileSystemWriter`] (same options, same commit
/// protocol) over the [`OpendalFs`] that [`OpendalFs::from_url`] opens for
/// `url` and `storage_options`. Refuses what `from_url` refuses (unknown
/// schemes and storage options, missing features) and what
/// [`FileSystemWriter::new`] refuses (`thread_count == 0`).
pub fn writer(
    url: &str,
    storage_options: &HashMap<String, String>,
    options: WriterOptions,
) -> Result<FileSystemWriter> {
    writer_with(url, storage_options, options, OpendalOptions::default())
}

/// Like [`writer`], starting from explicit object-store tuning (`dcp_*`
/// keys of `storage_options` still override it).
pub fn writer_with(
    url: &str,
    storage_options: &HashMap<String, String>,
    options: WriterOptions,
    opendal: OpendalOptions,
) -> Result<FileSystemWriter> {
    let fs = OpendalFs::from_url_with(url, storage_options, opendal)?;
    FileSystemWriter::new(Arc::new(fs), options)
}

/// torch's `FsspecReader`: a [`FileSystemReader`] over the [`OpendalFs`] that
/// [`OpendalFs::from_url`] opens for `url` and `storage_options`. Refuses
/// what `from_url` refuses. Being a `FileSystemReader`, it keeps every fast
/// path of one: ranks of one process lend each other their buffers.
pub fn reader(
    url: &str,
    storage_options: &HashMap<String, String>,
    options: ReaderOptions,
) -> Result<FileSystemReader> {
    reader_with(url, storage_options, options, OpendalOptions::default())
}

/// Like [`reader`], starting from explicit object-store tuning (`dcp_*`
/// keys of `storage_options` still override it).
pub fn reader_with(
    url: &str,
    storage_options: &HashMap<String, String>,
    options: ReaderOptions,
    opendal: OpendalOptions,
) -> Result<FileSystemReader> {
    let fs = OpendalFs::from_url_with(url, storage_options, opendal)?;
    Ok(FileSystemReader::new(Arc::new(fs), options))
}
