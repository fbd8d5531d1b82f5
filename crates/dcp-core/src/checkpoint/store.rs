//! The storage plug points of a save and a load: [`StorageWriter`] and
//! [`StorageReader`], with what flows through them.

use crate::checkpoint::FileSystemReader;
use crate::error::Result;
use crate::metadata::{DataFile, FormatKind, Metadata, StorageInfo};
use crate::model::DestStateDict;
use crate::pipeline::ReadStats;
use crate::plan::{LoadPlan, SavePlan, WriteIndex};
use crate::stage::ChunkData;
use async_trait::async_trait;
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
    /// The most bytes this rank's writer threads held staged (copied out of
    /// [`ChunkData::Source`] chunks) and not yet written at once; 0 when
    /// everything was host memory.
    pub staged_peak_bytes: u64,
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
    /// The bytes, shared with the caller's state dict: host memory, or a
    /// source the writer stages them from ([`ChunkData`]).
    pub data: ChunkData,
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

    /// On the coordinator, after [`prepare`](StorageWriter::prepare) and
    /// before any rank writes: take the location for the save `save_id` (one
    /// writer at a time), note the checkpoint it starts from, and return the
    /// generation it will commit (one more than that checkpoint's, 1 for an
    /// empty location). Refuses with [`ErrorKind::Busy`](crate::ErrorKind::Busy)
    /// naming the holder while another save holds the location. Every save
    /// that called it calls [`end`](StorageWriter::end). The default takes
    /// nothing and returns 1: no lease, and no compare in the commit.
    async fn begin(&self, save_id: &str) -> Result<u64> {
        let _ = save_id;
        Ok(1)
    }

    /// On the coordinator, after every rank succeeded: make `metadata` the
    /// checkpoint, atomically, only if the location still holds the
    /// checkpoint the save began from (compare-and-swap).
    ///
    /// `Ok` when `.metadata` now holds `metadata`, including when the write
    /// took effect but reported an error (a failed directory fsync after the
    /// rename, a lost reply to the PUT; logged as a warning). An error of
    /// kind [`ErrorKind::OutcomeUnknown`](crate::ErrorKind::OutcomeUnknown)
    /// when it cannot tell: no rank may then remove a file. Any other error
    /// means `.metadata` was not replaced, and the ranks remove this save's
    /// files.
    async fn commit(&self, metadata: &Metadata, encoded: &[u8]) -> Result<()>;

    /// After the commit, still holding the location: remove data files that
    /// are provably dead: files of saves other than this one and the one
    /// whose checkpoint it replaced (older generations, saves that died).
    /// The replaced checkpoint's files stay until the next commit, so a load
    /// that began before this one completes. Never removes a file dcp did
    /// not name ([`is_data_file_name`](crate::is_data_file_name)). Returns
    /// the names removed.
    async fn cleanup(&self, metadata: &Metadata) -> Result<Vec<String>>;

    /// On the coordinator, at the end of a save that called
    /// [`begin`](StorageWriter::begin), whatever its outcome: release the
    /// location (best effort; failures are logged). The default does
    /// nothing.
    async fn end(&self, save_id: &str) {
        let _ = save_id;
    }

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

    /// Byte ranges `(offset, length)` of `.metadata`, each up to `length`
    /// bytes (fewer only where the file ends, none past its end). A load
    /// reads the header and index of sectioned metadata, and then only the
    /// sections its destination overlaps, this way. The default reads the
    /// whole file once with [`StorageReader::read_metadata`] and slices it
    /// (correct, but then every loading rank of a sectioned checkpoint reads
    /// all of it); readers that can read a range of it override this, as
    /// [`FileSystemReader`] does.
    async fn read_metadata_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        let all = self.read_metadata().await?;
        Ok(ranges
            .iter()
            .map(|&(o, l)| {
                let from = o.min(all.len() as u64) as usize;
                let to = o.saturating_add(l).min(all.len() as u64) as usize;
                all[from..to].to_vec()
            })
            .collect())
    }

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
