//! [`FsspecWriter`] and [`FsspecReader`]: dcp's writer and reader over an
//! [`OpendalFs`], under the names torch gives them.

use crate::{OpendalFs, OpendalOptions};
use async_trait::async_trait;
use dcp_core::checkpoint::RankWrite;
use dcp_core::metadata::DataFile;
use dcp_core::plan::{LoadPlan, SavePlan};
use dcp_core::{
    DestStateDict, FileSystemReader, FileSystemWriter, FormatKind, Metadata, ReadStats,
    ReaderOptions, Result, StorageReader, StorageWriter, WriterOptions,
};
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

/// torch's `FsspecWriter`: a [`FileSystemWriter`] (same options, same commit
/// protocol) over an [`OpendalFs`] opened from a URL. Use it wherever a
/// [`StorageWriter`] is wanted; it dereferences to the inner writer.
#[derive(Clone, Debug)]
pub struct FsspecWriter {
    inner: FileSystemWriter,
}

impl FsspecWriter {
    /// A writer to `url` with `storage_options` (see [`OpendalFs::from_url`]).
    pub fn new(
        url: &str,
        storage_options: &HashMap<String, String>,
        options: WriterOptions,
    ) -> Result<Self> {
        Self::with_opendal_options(url, storage_options, options, OpendalOptions::default())
    }

    /// Like [`FsspecWriter::new`], with explicit object-store tuning.
    pub fn with_opendal_options(
        url: &str,
        storage_options: &HashMap<String, String>,
        options: WriterOptions,
        opendal: OpendalOptions,
    ) -> Result<Self> {
        let fs = OpendalFs::from_url_with(url, storage_options, opendal)?;
        Self::from_fs(fs, options)
    }

    /// A writer over an existing [`OpendalFs`].
    pub fn from_fs(fs: OpendalFs, options: WriterOptions) -> Result<Self> {
        Ok(FsspecWriter {
            inner: FileSystemWriter::new(Arc::new(fs), options)?,
        })
    }

    /// The inner [`FileSystemWriter`].
    pub fn into_inner(self) -> FileSystemWriter {
        self.inner
    }
}

impl Deref for FsspecWriter {
    type Target = FileSystemWriter;
    fn deref(&self) -> &FileSystemWriter {
        &self.inner
    }
}

#[async_trait]
impl StorageWriter for FsspecWriter {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn format(&self) -> FormatKind {
        self.inner.format()
    }
    fn check_plan(&self, plan: &SavePlan) -> Result<()> {
        self.inner.check_plan(plan)
    }
    async fn prepare(&self) -> Result<()> {
        self.inner.prepare().await
    }
    async fn write_rank(
        &self,
        rank: usize,
        save_id: &str,
        records: Vec<dcp_core::checkpoint::WriteRecord>,
    ) -> Result<RankWrite> {
        self.inner.write_rank(rank, save_id, records).await
    }
    async fn commit(&self, metadata: &Metadata, encoded: &[u8]) -> Result<()> {
        self.inner.commit(metadata, encoded).await
    }
    async fn cleanup(&self, metadata: &Metadata) -> Result<Vec<String>> {
        self.inner.cleanup(metadata).await
    }
    async fn discard(&self, files: &[DataFile]) {
        self.inner.discard(files).await
    }
}

/// torch's `FsspecReader`: a [`FileSystemReader`] over an [`OpendalFs`]
/// opened from a URL. It dereferences to the inner reader.
#[derive(Clone, Debug)]
pub struct FsspecReader {
    inner: FileSystemReader,
}

impl FsspecReader {
    /// A reader of `url` with `storage_options` (see [`OpendalFs::from_url`]).
    pub fn new(
        url: &str,
        storage_options: &HashMap<String, String>,
        options: ReaderOptions,
    ) -> Result<Self> {
        Self::with_opendal_options(url, storage_options, options, OpendalOptions::default())
    }

    /// Like [`FsspecReader::new`], with explicit object-store tuning.
    pub fn with_opendal_options(
        url: &str,
        storage_options: &HashMap<String, String>,
        options: ReaderOptions,
        opendal: OpendalOptions,
    ) -> Result<Self> {
        let fs = OpendalFs::from_url_with(url, storage_options, opendal)?;
        Ok(Self::from_fs(fs, options))
    }

    /// A reader over an existing [`OpendalFs`].
    pub fn from_fs(fs: OpendalFs, options: ReaderOptions) -> Self {
        FsspecReader {
            inner: FileSystemReader::new(Arc::new(fs), options),
        }
    }

    /// The inner [`FileSystemReader`].
    pub fn into_inner(self) -> FileSystemReader {
        self.inner
    }
}

impl Deref for FsspecReader {
    type Target = FileSystemReader;
    fn deref(&self) -> &FileSystemReader {
        &self.inner
    }
}

#[async_trait]
impl StorageReader for FsspecReader {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn read_metadata(&self) -> Result<Vec<u8>> {
        self.inner.read_metadata().await
    }
    async fn read(
        &self,
        metadata: Arc<Metadata>,
        plan: LoadPlan,
        dest: DestStateDict,
    ) -> Result<(DestStateDict, ReadStats)> {
        self.inner.read(metadata, plan, dest).await
    }
}
