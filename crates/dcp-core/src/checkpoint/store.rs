//! The storage plug points of a save and a load: [`StorageWriter`] and
//! [`StorageReader`], with what flows through them.

use crate::checkpoint::FileSystemReader;
use crate::error::Result;
use crate::metadata::{DataFile, FormatKind, Metadata, StorageInfo};
use crate::model::DestStateDict;
use crate::pipeline::ReadStats;
use crate::plan::{LoadPlan, SavePlan, WriteIndex};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What one rank wrote.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RankWrite {
    /// Data files written by this rank.
    pub files: Vec<DataFile>,
    /// Transform descriptor table the records refer to.
    pub transforms: Vec<String>,
    /// Each record: item name, which record, and where (file index into `files`).
    pub records: Vec<(String, WriteIndex, StorageInfo)>,
}

impl RankWrite {
    /// Bytes in this rank's data files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.length).sum()
    }
}

/// A record handed to a [`StorageWriter`]: the item name, which record, its
/// dtype (`None` for bytes), whether it is the whole tensor, and its bytes.
#[derive(Clone, Debug)]
pub struct WriteRecord {
    /// Item name.
    pub name: String,
    /// Which record.
    pub index: WriteIndex,
    /// Element type of a tensor chunk.
    pub dtype: Option<crate::DType>,
    /// True when the chunk covers its whole tensor.
    pub whole: bool,
    /// The bytes, shared with the caller's state dict.
    pub data: Bytes,
}

/// Where a save's bytes go. [`FileSystemWriter`](crate::FileSystemWriter) implements it over any
/// [`FileSystem`](crate::FileSystem); implement it directly for a wholly different store.
#[async_trait]
pub trait StorageWriter: Send + Sync {
    /// The location, for messages.
    fn location(&self) -> String;

    /// The record layout this writer produces, recorded in the metadata.
    fn format(&self) -> FormatKind;

    /// Refuse a plan this writer cannot store (for example compression with
    /// the safetensors format). Runs on every rank before anything is written.
    fn check_plan(&self, plan: &SavePlan) -> Result<()>;

    /// On the coordinator, before any rank writes: create the location, and
    /// refuse an existing checkpoint unless overwriting.
    async fn prepare(&self) -> Result<()>;

    /// Write this rank's records under names unique to `save_id`.
    async fn write_rank(
        &self,
        rank: usize,
        save_id: &str,
        records: Vec<WriteRecord>,
    ) -> Result<RankWrite>;

    /// On the coordinator, after every rank succeeded: make `metadata` the
    /// checkpoint, atomically.
    async fn commit(&self, metadata: &Metadata, encoded: &[u8]) -> Result<()>;

    /// After the commit: remove data files that `metadata` does not reference
    /// (earlier saves, killed saves). Returns the names removed.
    async fn cleanup(&self, metadata: &Metadata) -> Result<Vec<String>>;

    /// After a failed save: remove this rank's files (best effort).
    async fn discard(&self, files: &[DataFile]);
}

/// Where a load's bytes come from.
#[async_trait]
pub trait StorageReader: Send + Sync {
    /// The location, for messages.
    fn location(&self) -> String;

    /// The raw bytes of `.metadata`.
    async fn read_metadata(&self) -> Result<Vec<u8>>;

    /// Execute `plan`, filling `dest`.
    async fn read(
        &self,
        metadata: Arc<Metadata>,
        plan: LoadPlan,
        dest: DestStateDict,
    ) -> Result<(DestStateDict, ReadStats)>;

    /// The [`FileSystemReader`](crate::FileSystemReader) this reader is, if it is one. Ranks of one
    /// process whose readers all are then read each shared saved chunk once,
    /// straight into the buffers of every rank that needs it (see
    /// [`LoadOptions::share_reads`](crate::LoadOptions::share_reads)). The default, `None`, exchanges bytes.
    fn file_system_reader(&self) -> Option<&FileSystemReader> {
        None
    }
}
