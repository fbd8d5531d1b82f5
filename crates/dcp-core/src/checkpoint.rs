//! Save and load orchestration: the commit protocol across ranks, and the
//! writer and reader that run the pipeline over any [`FileSystem`].
//!
//! Save: every rank offers a plan; the coordinator (rank 0) checks the
//! location, dedups and assigns records, and scatters assignments; every rank
//! writes its data files under names unique to this save; the coordinator
//! gathers the results and, only if every rank succeeded, writes `.metadata`
//! atomically, removes files of earlier saves that it no longer references,
//! and broadcasts the outcome. Every rank returns the same `Ok` or the same
//! error, naming the failing rank.
//!
//! Load: the coordinator reads and validates `.metadata` once and broadcasts
//! it; every rank plans and reads only what its destination needs; the
//! outcome is agreed by an all-gather.

use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::{
    ChunkMeta, DataFile, FormatKind, ItemMeta, Metadata, StorageInfo, MAX_METADATA_LEN,
};
use crate::model::{ChunkBox, DestStateDict, Item, StateDict};
use crate::pipeline::read::{read_plan, ReadConfig, ReadStats};
use crate::pipeline::write::{write_file, FileJob, RecordJob, RecordResult, WriteConfig};
use crate::plan::{
    DefaultLoadPlanner, DefaultSavePlanner, LoadPlan, LoadPlanner, SavePlan, SavePlanner,
    WriteIndex,
};
use crate::storage::{FileSystem, METADATA_FILE};
use crate::transform::{ExtensionRegistry, StreamTransformExtension, TransformKind};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::Instrument;

const ROOT: usize = 0;

/// Options of a [`FileSystemWriter`], with the meaning torch DCP gives them.
/// Build it with `..Default::default()`: fields may be added.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// One data file per bucket per rank (`true`), or one per record.
    pub single_file_per_rank: bool,
    /// Make data files and the metadata durable before the save returns.
    pub sync_files: bool,
    /// Buckets (data files) per rank and writer threads.
    pub thread_count: usize,
    /// Bytes of staged output a worker may hold at once (transform pieces).
    pub per_thread_copy_ahead: usize,
    /// Replace an existing checkpoint (crash-safely). When `false`, a save
    /// into a location holding `.metadata` fails with `AlreadyExists`.
    pub overwrite: bool,
    /// Transforms applied to every record, in order.
    pub extensions: Vec<Arc<dyn StreamTransformExtension>>,
    /// Record layout.
    pub serialization_format: FormatKind,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            single_file_per_rank: true,
            sync_files: true,
            thread_count: 1,
            per_thread_copy_ahead: 10_000_000,
            overwrite: true,
            extensions: Vec::new(),
            serialization_format: FormatKind::Raw,
        }
    }
}

/// Options of a [`FileSystemReader`]. Build it with `..Default::default()`:
/// fields may be added.
#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// Reader threads per rank.
    pub thread_count: usize,
    /// Verify recorded checksums (reads each checksummed record whole).
    pub verify_checksums: bool,
    /// Resolves transform descriptors found in the metadata.
    pub registry: ExtensionRegistry,
    /// Merge two needed ranges of a file when at most this many bytes apart.
    pub coalesce_gap: u64,
    /// Largest single read request, except a single record read whole.
    pub max_request: u64,
    /// Records shorter than this are read in coalesced requests with their
    /// neighbours (then copied) instead of one request each.
    pub small_record: u64,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            thread_count: 4,
            verify_checksums: true,
            registry: ExtensionRegistry::new(),
            coalesce_gap: 4096,
            max_request: 64 << 20,
            small_record: 256 * 1024,
        }
    }
}

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

/// Where a save's bytes go. [`FileSystemWriter`] implements it over any
/// [`FileSystem`]; implement it directly for a wholly different store.
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

    /// The [`FileSystemReader`] this reader is, if it is one. Ranks of one
    /// process whose readers all are then read each shared saved chunk once,
    /// straight into the buffers of every rank that needs it (see
    /// [`LoadOptions::share_reads`]). The default, `None`, exchanges bytes.
    fn file_system_reader(&self) -> Option<&FileSystemReader> {
        None
    }
}

/// The writer of the design (torch's `FileSystemWriter`), generic over the
/// [`FileSystem`]: local disk, or an object store through OpenDAL.
#[derive(Clone, Debug)]
pub struct FileSystemWriter {
    fs: Arc<dyn FileSystem>,
    options: WriterOptions,
}

impl FileSystemWriter {
    /// A writer over `fs` with `options`. Refuses `thread_count == 0`.
    pub fn new(fs: Arc<dyn FileSystem>, options: WriterOptions) -> Result<Self> {
        if options.thread_count == 0 {
            return Err(Error::invalid("thread_count must be at least 1"));
        }
        Ok(FileSystemWriter { fs, options })
    }

    /// The options.
    pub fn options(&self) -> &WriterOptions {
        &self.options
    }

    /// The file system.
    pub fn fs(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }
}

/// Is `name` a data file dcp writes (and may therefore remove)?
pub fn is_data_file_name(name: &str) -> bool {
    name.starts_with("__") && (name.ends_with(".dcp") || name.ends_with(".safetensors"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("a storage worker failed: {e}")))?
}

#[async_trait]
impl StorageWriter for FileSystemWriter {
    fn location(&self) -> String {
        self.fs.location()
    }

    fn format(&self) -> FormatKind {
        self.options.serialization_format
    }

    fn check_plan(&self, _plan: &SavePlan) -> Result<()> {
        if self.options.serialization_format == FormatKind::Safetensors {
            if let Some(t) = self
                .options
                .extensions
                .iter()
                .find(|t| t.kind() == TransformKind::Codec)
            {
                return Err(Error::invalid(format!(
                    "the safetensors format cannot hold records transformed by {}: its files must stay valid safetensors; \
                     use the raw format, or only checksum extensions",
                    t.descriptor()
                )));
            }
        }
        Ok(())
    }

    async fn prepare(&self) -> Result<()> {
        let fs = self.fs.clone();
        let overwrite = self.options.overwrite;
        blocking(move || {
            fs.prepare()?;
            if !overwrite && fs.file_len(METADATA_FILE)?.is_some() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "a checkpoint already exists at {}; pass overwrite = true to replace it",
                        fs.location()
                    ),
                ));
            }
            Ok(())
        })
        .await
    }

    async fn write_rank(
        &self,
        rank: usize,
        save_id: &str,
        records: Vec<WriteRecord>,
    ) -> Result<RankWrite> {
        let opts = &self.options;
        let ext = crate::format::extension(opts.serialization_format);
        // Bucket: largest records first into the least-loaded bucket, then
        // each bucket in state-dict order.
        let mut buckets: Vec<Vec<usize>> = if opts.single_file_per_rank {
            let n = opts.thread_count.min(records.len());
            let mut order: Vec<usize> = (0..records.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(records[i].data.len()));
            let mut loads = vec![0usize; n];
            let mut b: Vec<Vec<usize>> = vec![Vec::new(); n];
            for i in order {
                let k = (0..n)
                    .min_by_key(|&k| (loads[k], k))
                    .expect("n > 0 when records exist");
                loads[k] += records[i].data.len();
                b[k].push(i);
            }
            b
        } else {
            (0..records.len()).map(|i| vec![i]).collect()
        };
        for b in &mut buckets {
            b.sort_unstable();
        }
        let jobs: Vec<FileJob> = buckets
            .into_iter()
            .enumerate()
            .map(|(k, idx)| FileJob {
                file_name: format!("__{rank}_{k}-{save_id}.{ext}"),
                records: idx
                    .into_iter()
                    .map(|i| {
                        let r = &records[i];
                        RecordJob {
                            name: r.name.clone(),
                            index: r.index.clone(),
                            dtype: r.dtype,
                            whole: r.whole,
                            data: r.data.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        drop(records);
        let transforms: Vec<String> = opts.extensions.iter().map(|t| t.descriptor()).collect();
        let cfg = WriteConfig {
            format: opts.serialization_format,
            sync: opts.sync_files,
            piece: opts.per_thread_copy_ahead,
            save_id: save_id.to_string(),
            transforms: opts
                .extensions
                .iter()
                .enumerate()
                .map(|(i, t)| (i as u32, t.clone()))
                .collect(),
        };
        let fs = self.fs.clone();
        let threads = opts.thread_count;
        let started = Instant::now();
        let out = blocking(move || {
            let next = AtomicUsize::new(0);
            let done: Mutex<Vec<Option<Result<(DataFile, Vec<RecordResult>)>>>> =
                Mutex::new((0..jobs.len()).map(|_| None).collect());
            let failed = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                for _ in 0..threads.min(jobs.len()) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= jobs.len() || failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let r = write_file(fs.as_ref(), &jobs[i], i as u32, &cfg);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        done.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                    });
                }
            });
            let done = done.into_inner().unwrap_or_else(|p| p.into_inner());
            let mut rw = RankWrite {
                transforms,
                ..Default::default()
            };
            let mut first_err = None;
            for r in done.into_iter().flatten() {
                match r {
                    Ok((file, recs)) => {
                        rw.files.push(file);
                        for rec in recs {
                            let mut st = rec.storage;
                            st.file = (rw.files.len() - 1) as u32;
                            rw.records.push((rec.name, rec.index, st));
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err {
                for f in &rw.files {
                    let _ = fs.remove(&f.name);
                }
                return Err(e);
            }
            Ok(rw)
        })
        .await?;
        tracing::debug!(
            rank,
            bytes = out.bytes(),
            seconds = started.elapsed().as_secs_f64(),
            "wrote rank"
        );
        Ok(out)
    }

    async fn commit(&self, _metadata: &Metadata, encoded: &[u8]) -> Result<()> {
        let fs = self.fs.clone();
        let sync = self.options.sync_files;
        let data = encoded.to_vec();
        blocking(move || {
            if sync {
                fs.sync_dir()?;
            }
            fs.write_atomic(METADATA_FILE, &data, sync)
        })
        .await
    }

    async fn cleanup(&self, metadata: &Metadata) -> Result<Vec<String>> {
        let fs = self.fs.clone();
        let keep: std::collections::HashSet<String> =
            metadata.files.iter().map(|f| f.name.clone()).collect();
        blocking(move || {
            let mut removed = Vec::new();
            for f in fs.list()? {
                if is_data_file_name(&f.name) && !keep.contains(&f.name) {
                    fs.remove(&f.name)?;
                    removed.push(f.name);
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn discard(&self, files: &[DataFile]) {
        let fs = self.fs.clone();
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        let _ = blocking(move || {
            for n in names {
                if let Err(e) = fs.remove(&n) {
                    tracing::warn!("could not remove {n} after a failed save: {e}");
                }
            }
            Ok(())
        })
        .await;
    }
}

/// The reader of the design (torch's `FileSystemReader`), generic over the
/// [`FileSystem`].
#[derive(Clone, Debug)]
pub struct FileSystemReader {
    fs: Arc<dyn FileSystem>,
    options: ReaderOptions,
}

impl FileSystemReader {
    /// A reader over `fs` with `options`.
    pub fn new(fs: Arc<dyn FileSystem>, options: ReaderOptions) -> Self {
        FileSystemReader { fs, options }
    }

    /// The options.
    pub fn options(&self) -> &ReaderOptions {
        &self.options
    }

    /// The file system.
    pub fn fs(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }
}

#[async_trait]
impl StorageReader for FileSystemReader {
    fn location(&self) -> String {
        self.fs.location()
    }

    async fn read_metadata(&self) -> Result<Vec<u8>> {
        let fs = self.fs.clone();
        blocking(move || {
            fs.read_small(METADATA_FILE, MAX_METADATA_LEN).map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "no checkpoint at {}: {METADATA_FILE} is missing",
                            fs.location()
                        ),
                    )
                } else {
                    e
                }
            })
        })
        .await
    }

    async fn read(
        &self,
        md: Arc<Metadata>,
        plan: LoadPlan,
        dest: DestStateDict,
    ) -> Result<(DestStateDict, ReadStats)> {
        let (resolved, cfg) = self.prepare_read(&md, &plan)?;
        let fs = self.fs.clone();
        blocking(move || read_plan(fs.as_ref(), &md, &plan, dest, &resolved, &cfg)).await
    }

    fn file_system_reader(&self) -> Option<&FileSystemReader> {
        Some(self)
    }
}

/// Transforms resolved for the records a plan reads, by descriptor index.
type Resolved = Vec<Option<Arc<dyn crate::transform::StreamTransformExtension>>>;

impl FileSystemReader {
    /// Resolve the transforms `plan` needs and the settings of its read.
    fn prepare_read(&self, md: &Metadata, plan: &LoadPlan) -> Result<(Resolved, ReadConfig)> {
        // Resolve only the transforms the planned records use.
        let mut used = vec![false; md.transforms.len()];
        let mut mark = |s: &StorageInfo| {
            for t in &s.transforms {
                used[t.descriptor as usize] = true;
            }
        };
        for r in &plan.tensor_reads {
            if let ItemMeta::Tensor { chunks, .. } = &md.items[r.md_item].1 {
                mark(&chunks[r.saved_chunk].storage);
            }
        }
        for b in &plan.bytes_reads {
            if let ItemMeta::Bytes { storage, .. } = &md.items[b.md_item].1 {
                mark(storage);
            }
        }
        let mut resolved = Vec::with_capacity(md.transforms.len());
        for (i, d) in md.transforms.iter().enumerate() {
            resolved.push(if used[i] {
                Some(self.options.registry.resolve(d)?)
            } else {
                None
            });
        }
        let cfg = ReadConfig {
            thread_count: self.options.thread_count.max(1),
            verify_checksums: self.options.verify_checksums,
            coalesce_gap: self.options.coalesce_gap,
            max_request: self.options.max_request.max(1),
            small_record: self.options.small_record,
        };
        Ok((resolved, cfg))
    }
}

/// Options of [`save_with`].
#[derive(Clone)]
pub struct SaveOptions {
    /// Decides who writes what.
    pub planner: Arc<dyn SavePlanner>,
    /// User key/value metadata stored in `.metadata` (taken from rank 0).
    pub user_metadata: BTreeMap<String, String>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            planner: Arc::new(DefaultSavePlanner::default()),
            user_metadata: BTreeMap::new(),
        }
    }
}

/// Options of [`load_with`].
#[derive(Clone)]
pub struct LoadOptions {
    /// Decides which stored bytes fill which destination.
    pub planner: Arc<dyn LoadPlanner>,
    /// When several ranks need parts of one saved chunk, read it once on one
    /// rank instead of on every rank (a resharded load then reads the
    /// checkpoint about once in total, not once per rank). Ranks of one
    /// process ([`Collective::shares_memory`]) with [`FileSystemReader`]s
    /// lend each other their destination buffers, and the reading rank
    /// writes every rank's part straight into them; other ranks receive
    /// their slices through the collective.
    pub share_reads: bool,
    /// Bytes a rank may hold per exchange round (decoded chunks it read plus
    /// slices in flight) when slices travel through the collective. Lent
    /// buffers need no staging, so this does not apply to them.
    pub exchange_budget: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            planner: Arc::new(DefaultLoadPlanner::default()),
            share_reads: true,
            exchange_budget: 512 << 20,
        }
    }
}

/// What a save returns on every rank.
#[derive(Clone, Debug)]
pub struct SaveResult {
    /// The committed metadata.
    pub metadata: Arc<Metadata>,
    /// Bytes this rank wrote into data files.
    pub bytes_written: u64,
    /// Data files of earlier saves removed after the commit (rank 0 only).
    pub removed: Vec<String>,
}

/// What a load returns on every rank.
#[derive(Debug)]
pub struct LoadResult {
    /// The filled destination.
    pub state_dict: DestStateDict,
    /// What this rank read.
    pub stats: ReadStats,
    /// The checkpoint's metadata.
    pub metadata: Arc<Metadata>,
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes> {
    postcard::to_allocvec(v)
        .map(Bytes::from)
        .map_err(|e| Error::invalid(format!("encode message: {e}")))
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| {
        Error::new(
            ErrorKind::Collective,
            format!("malformed message between ranks: {e}"),
        )
    })
}

/// `e` as seen from `rank` (keeping the rank it already names, if any).
fn on_rank(e: &Error, rank: usize) -> Error {
    Error::new(e.kind(), e.message()).with_rank(e.rank().unwrap_or(rank))
}

fn wire<T>(r: Result<T>, rank: usize) -> std::result::Result<T, WireError> {
    r.map_err(|e| {
        let e = if e.rank().is_none() {
            e.with_rank(rank)
        } else {
            e
        };
        e.to_wire()
    })
}

/// First error among per-rank results, in rank order.
fn first_error<T>(
    results: Vec<std::result::Result<T, WireError>>,
) -> std::result::Result<Vec<T>, WireError> {
    results.into_iter().collect()
}

fn new_save_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Save `state_dict` with the default planner. See [`save_with`].
pub async fn save(
    state_dict: &StateDict,
    writer: &dyn StorageWriter,
    collective: &dyn Collective,
) -> Result<SaveResult> {
    save_with(state_dict, writer, collective, &SaveOptions::default()).await
}

/// Save this rank's `state_dict` as part of a checkpoint written by every
/// rank of `collective`. Returns the same outcome on every rank: the
/// committed metadata, or the error of the first failing rank (named in it).
/// Nothing is committed unless every rank succeeded.
pub async fn save_with(
    state_dict: &StateDict,
    writer: &dyn StorageWriter,
    collective: &dyn Collective,
    options: &SaveOptions,
) -> Result<SaveResult> {
    let span = tracing::info_span!("save", rank = collective.rank(), location = %writer.location());
    save_inner(state_dict, writer, collective, options)
        .instrument(span)
        .await
}

async fn save_inner(
    state_dict: &StateDict,
    writer: &dyn StorageWriter,
    collective: &dyn Collective,
    options: &SaveOptions,
) -> Result<SaveResult> {
    let rank = collective.rank();
    let n = collective.world_size();
    let started = Instant::now();

    // 1. Plan.
    let local = options
        .planner
        .local_plan(state_dict, rank)
        .and_then(|p| writer.check_plan(&p).map(|_| p));
    let prep = if rank == ROOT {
        writer.prepare().await
    } else {
        Ok(())
    };
    let gathered = collective.gather(encode(&wire(local, rank))?, ROOT).await?;
    let mut global_plans: Vec<SavePlan> = Vec::new();
    let assignment = if rank == ROOT {
        let gathered = gathered.expect("root receives");
        let outcome: std::result::Result<(String, Vec<SavePlan>), WireError> = (|| {
            wire(prep, ROOT)?;
            let plans = first_error(
                gathered
                    .iter()
                    .enumerate()
                    .map(|(r, b)| {
                        decode::<std::result::Result<SavePlan, WireError>>(b)
                            .map_err(|e| e.with_rank(r).to_wire())
                            .and_then(|x| x)
                    })
                    .collect(),
            )?;
            let global = wire(options.planner.global_plan(&plans), ROOT)?;
            if global.len() != n {
                return Err(
                    Error::plan("planner returned a plan per rank of the wrong count")
                        .with_rank(ROOT)
                        .to_wire(),
                );
            }
            Ok((new_save_id(), global))
        })();
        let msgs = match &outcome {
            Ok((id, g)) => {
                global_plans = g.clone();
                g.iter()
                    .map(|p| encode(&Ok::<_, WireError>((id.clone(), p.clone()))))
                    .collect::<Result<Vec<_>>>()?
            }
            Err(w) => vec![encode(&Err::<(String, SavePlan), _>(w.clone()))?; n],
        };
        collective.scatter(Some(msgs), ROOT).await?
    } else {
        collective.scatter(None, ROOT).await?
    };
    let (save_id, my_plan) =
        decode::<std::result::Result<(String, SavePlan), WireError>>(&assignment)?
            .map_err(Error::from_wire)?;
    tracing::debug!(
        rank,
        records = my_plan.items.len(),
        bytes = my_plan.bytes(),
        "planned"
    );

    // 2. Write.
    let written = match records_for(state_dict, &my_plan) {
        Ok(records) => writer.write_rank(rank, &save_id, records).await,
        Err(e) => Err(e),
    };
    let my_files = written
        .as_ref()
        .map(|w| w.files.clone())
        .unwrap_or_default();
    let bytes_written = written.as_ref().map(|w| w.bytes()).unwrap_or(0);
    let gathered = match collective.gather(encode(&wire(written, rank))?, ROOT).await {
        Ok(g) => g,
        Err(e) => {
            // The coordinator commits only after this gather completes, and a
            // collective that fails on one rank completes on none (the
            // `Collective` contract), so nothing references these files.
            writer.discard(&my_files).await;
            return Err(e);
        }
    };

    // 3. Commit on the coordinator, then agree on the outcome.
    let mut removed = Vec::new();
    let mut committed: Option<Metadata> = None;
    let outcome = if rank == ROOT {
        let gathered = gathered.expect("root receives");
        let result: std::result::Result<Vec<u8>, WireError> = async {
            let writes = first_error(
                gathered
                    .iter()
                    .enumerate()
                    .map(|(r, b)| {
                        decode::<std::result::Result<RankWrite, WireError>>(b)
                            .map_err(|e| e.with_rank(r).to_wire())
                            .and_then(|x| x)
                    })
                    .collect(),
            )?;
            let md = wire(
                assemble(
                    &save_id,
                    &global_plans,
                    writes,
                    writer.format(),
                    &options.user_metadata,
                ),
                ROOT,
            )?;
            let encoded = wire(md.encode(), ROOT)?;
            wire(
                writer
                    .commit(&md, &encoded)
                    .await
                    .map_err(|e| e.context("commit")),
                ROOT,
            )?;
            match writer.cleanup(&md).await {
                Ok(r) => removed = r,
                Err(e) => tracing::warn!(
                    "checkpoint committed, but removing files of earlier saves failed: {e}"
                ),
            }
            committed = Some(md);
            Ok(encoded)
        }
        .await;
        let msg = encode(&result)?;
        collective.broadcast(Some(msg), ROOT).await?
    } else {
        collective.broadcast(None, ROOT).await?
    };
    match decode::<std::result::Result<Vec<u8>, WireError>>(&outcome)? {
        Ok(md_bytes) => {
            // The coordinator keeps what it built; the others check what
            // they received.
            let metadata = Arc::new(match committed {
                Some(md) => md,
                None => Metadata::decode(&md_bytes)?,
            });
            tracing::info!(
                rank,
                bytes_written,
                seconds = started.elapsed().as_secs_f64(),
                "saved"
            );
            Ok(SaveResult {
                metadata,
                bytes_written,
                removed,
            })
        }
        Err(w) => {
            writer.discard(&my_files).await;
            Err(Error::from_wire(w))
        }
    }
}

/// The records of `state_dict` that `plan` assigns to this rank.
fn records_for(sd: &StateDict, plan: &SavePlan) -> Result<Vec<crate::checkpoint::WriteRecord>> {
    let mut out = Vec::with_capacity(plan.items.len());
    for it in &plan.items {
        let item = sd.get(&it.name).ok_or_else(|| {
            Error::plan(format!("{}: assigned but not in the state dict", it.name))
        })?;
        match (item, &it.index) {
            (Item::Tensor(t), WriteIndex::Chunk(b)) => {
                let c = t.chunks.iter().find(|c| &c.region == b).ok_or_else(|| {
                    Error::plan(format!("{}: assigned chunk ({b}) not held", it.name))
                })?;
                out.push(WriteRecord {
                    name: it.name.clone(),
                    index: it.index.clone(),
                    dtype: Some(t.dtype),
                    whole: b.offsets.iter().all(|&o| o == 0) && b.sizes == t.shape,
                    data: c.data.clone(),
                });
            }
            (Item::Bytes { data, .. }, WriteIndex::Bytes) => out.push(WriteRecord {
                name: it.name.clone(),
                index: WriteIndex::Bytes,
                dtype: None,
                whole: true,
                data: data.clone(),
            }),
            _ => {
                return Err(Error::plan(format!(
                    "{}: assigned record of the wrong kind",
                    it.name
                )))
            }
        }
    }
    Ok(out)
}

/// Build the checkpoint's metadata from every rank's write results.
fn assemble(
    save_id: &str,
    plans: &[SavePlan],
    writes: Vec<RankWrite>,
    format: FormatKind,
    user: &BTreeMap<String, String>,
) -> Result<Metadata> {
    let mut kinds: HashMap<&str, (Option<crate::DType>, &[u64], u64)> = HashMap::new();
    for p in plans {
        for it in &p.items {
            kinds.insert(&it.name, (it.dtype, &it.shape, it.nbytes));
        }
    }
    let mut files = Vec::new();
    let mut transforms: Vec<String> = Vec::new();
    let mut items: BTreeMap<String, ItemMeta> = BTreeMap::new();
    for w in writes {
        let base = files.len() as u32;
        let remap: Vec<u32> = w
            .transforms
            .iter()
            .map(|t| match transforms.iter().position(|x| x == t) {
                Some(i) => i as u32,
                None => {
                    transforms.push(t.clone());
                    (transforms.len() - 1) as u32
                }
            })
            .collect();
        files.extend(w.files);
        for (name, index, mut storage) in w.records {
            storage.file += base;
            for t in &mut storage.transforms {
                t.descriptor = *remap
                    .get(t.descriptor as usize)
                    .ok_or_else(|| Error::corrupt("write result names an unknown transform"))?;
            }
            let (dtype, shape, nbytes) = kinds
                .get(name.as_str())
                .copied()
                .ok_or_else(|| Error::plan(format!("{name}: written but never planned")))?;
            match index {
                WriteIndex::Chunk(region) => {
                    let entry = items
                        .entry(name.clone())
                        .or_insert_with(|| ItemMeta::Tensor {
                            dtype: dtype.unwrap_or(crate::DType::U8),
                            shape: shape.to_vec(),
                            chunks: Vec::new(),
                        });
                    if let ItemMeta::Tensor { chunks, .. } = entry {
                        chunks.push(ChunkMeta { region, storage });
                    }
                }
                WriteIndex::Bytes => {
                    items.insert(
                        name.clone(),
                        ItemMeta::Bytes {
                            length: nbytes,
                            storage,
                        },
                    );
                }
            }
        }
    }
    for d in plans.iter().flat_map(|p| &p.declared) {
        items
            .entry(d.name.clone())
            .or_insert_with(|| ItemMeta::Tensor {
                dtype: d.dtype,
                shape: d.shape.clone(),
                chunks: Vec::new(),
            });
    }
    for item in items.values_mut() {
        if let ItemMeta::Tensor { chunks, .. } = item {
            chunks.sort_by(|a, b| a.region.offsets.cmp(&b.region.offsets));
        }
    }
    Ok(Metadata {
        save_id: save_id.to_string(),
        world_size: plans.len() as u32,
        format,
        files,
        transforms,
        items: items.into_iter().collect(),
        user: user.clone(),
    })
}

/// Load with the default planner. See [`load_with`].
pub async fn load(
    dest: DestStateDict,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
) -> Result<LoadResult> {
    load_with(dest, reader, collective, &LoadOptions::default()).await
}

/// Fill this rank's `dest` from the checkpoint. The coordinator reads the
/// metadata once; every rank reads only what `dest` needs. Returns the same
/// outcome on every rank: all succeed, or all fail with the first failing
/// rank's error.
pub async fn load_with(
    dest: DestStateDict,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<LoadResult> {
    let span = tracing::info_span!("load", rank = collective.rank(), location = %reader.location());
    load_inner(dest, reader, collective, options)
        .instrument(span)
        .await
}

async fn load_inner(
    dest: DestStateDict,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<LoadResult> {
    let rank = collective.rank();
    // Rank 0 reads and validates the metadata once; the others validate what
    // they receive (a rank never trusts bytes it did not check).
    let mut root_md = None;
    let md_msg = if rank == ROOT {
        let r = reader.read_metadata().await.and_then(|b| {
            root_md = Some(Metadata::decode(&b)?);
            Ok(b)
        });
        let msg = encode(&wire(r, ROOT))?;
        collective.broadcast(Some(msg), ROOT).await?
    } else {
        collective.broadcast(None, ROOT).await?
    };
    let md_bytes =
        decode::<std::result::Result<Vec<u8>, WireError>>(&md_msg)?.map_err(Error::from_wire)?;
    let metadata = Arc::new(match root_md {
        Some(md) => md,
        None => Metadata::decode(&md_bytes)?,
    });
    let planned = options.planner.plan(&metadata, &dest);
    let result = if options.share_reads && collective.world_size() > 1 {
        read_shared(
            planned,
            dest,
            &metadata,
            reader,
            collective,
            options.exchange_budget,
        )
        .await?
    } else {
        match planned {
            Ok(plan) => reader.read(metadata.clone(), plan, dest).await,
            Err(e) => Err(e),
        }
    };
    let status: std::result::Result<(), WireError> = match &result {
        Ok(_) => Ok(()),
        Err(e) => Err(on_rank(e, rank).to_wire()),
    };
    let all = collective.all_gather(encode(&status)?).await?;
    for b in &all {
        decode::<std::result::Result<(), WireError>>(b)?.map_err(Error::from_wire)?;
    }
    let (state_dict, stats) = result?;
    Ok(LoadResult {
        state_dict,
        stats,
        metadata,
    })
}

/// A rank's destination items by index, for filling in place.
type DestVec = Vec<(String, crate::model::DestItem)>;

/// Load with shared reads (see [`LoadOptions::share_reads`]). The outer
/// `Result` is a collective failure; the inner one this rank's outcome, which
/// every rank then agrees on.
async fn read_shared(
    planned: Result<LoadPlan>,
    dest: DestStateDict,
    md: &Arc<Metadata>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    budget: u64,
) -> Result<Result<(DestStateDict, ReadStats)>> {
    use crate::pipeline::exchange::{
        chunk_keys, compact, fill_from_chunk, fill_from_compact, needs_of, schedule, split_plan,
        Need,
    };
    let rank = collective.rank();
    let n = collective.world_size();
    // Ranks of one process whose readers are all file-system readers lend
    // each other their buffers instead of exchanging bytes.
    let can_lend = collective.shares_memory() && reader.file_system_reader().is_some();
    // Round 1: the saved chunks each rank reads, as sorted (item, chunk)
    // pairs (a few bytes each), so that ranks sharing nothing (a load into
    // the sharding that was saved) stop here without exchanging overlaps.
    let keys_msg = wire(
        planned
            .as_ref()
            .map(|p| (chunk_keys(p), can_lend))
            .map_err(|e| Error::new(e.kind(), e.message())),
        rank,
    );
    let all = collective.all_gather(encode(&keys_msg)?).await?;
    let mut every: Vec<(u32, u32)> = Vec::new();
    let mut lend = true;
    for b in &all {
        match decode::<std::result::Result<(Vec<(u32, u32)>, bool), WireError>>(b)? {
            Ok((keys, l)) => {
                every.extend(keys);
                lend &= l;
            }
            // Every rank sees the same failure and stops here together.
            Err(w) => return Ok(Err(Error::from_wire(w))),
        }
    }
    let plan = planned.expect("errors returned above");
    // Each rank's keys are distinct, so a repeated key is a chunk two or
    // more ranks read.
    every.sort_unstable();
    let shared: std::collections::BTreeSet<(u32, u32)> = every
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    drop(every);
    if shared.is_empty() {
        return Ok(reader.read(md.clone(), plan, dest).await);
    }
    // Round 2: what each rank needs of the chunks it shares.
    let mine: Vec<Need> = needs_of(&plan)
        .into_iter()
        .filter(|n| shared.contains(&(n.item, n.chunk)))
        .collect();
    let all = collective.all_gather(encode(&mine)?).await?;
    drop(mine);
    let mut needs: Vec<Vec<Need>> = all
        .iter()
        .map(|b| decode::<Vec<Need>>(b))
        .collect::<Result<_>>()?;
    let sched = schedule(md, &needs, budget, lend);
    let (local_plan, mut shared_reads) = split_plan(plan, &sched);
    let mut state = reader.read(md.clone(), local_plan, dest).await;
    if lend && !sched.shared.is_empty() {
        let fsr = reader
            .file_system_reader()
            .expect("every rank said it has a file-system reader");
        return read_lent(state, md, fsr, collective, &sched, &needs).await;
    }
    for round in &sched.rounds {
        // Read the shared chunks this rank serves in this round, whole.
        let mine: Vec<usize> = round
            .iter()
            .copied()
            .filter(|&s| sched.shared[s].reader == rank)
            .collect();
        let mut decoded: Result<Vec<Vec<u8>>> = Ok(Vec::new());
        if state.is_ok() && !mine.is_empty() {
            let want = mine
                .iter()
                .map(|&s| (sched.shared[s].item, sched.shared[s].chunk))
                .collect();
            decoded = read_saved_chunks(reader, md, want).await.map(|(v, st)| {
                if let Ok((_, stats)) = &mut state {
                    stats.bytes_read += st.bytes_read;
                    stats.requests += st.requests;
                    stats.records += st.records;
                }
                v
            });
        }
        let err = match (&state, &decoded) {
            (Err(e), _) | (_, Err(e)) => Some(on_rank(e, rank)),
            _ => None,
        };
        // Each message: a status buffer ([0], or [1] and the error), then
        // either the decoded chunks themselves (ranks sharing memory: no
        // copy) or one buffer of compacted slices (any other transport).
        let zero_copy = collective.shares_memory();
        let msgs: Vec<Vec<Bytes>> = if let Some(e) = err {
            let mut m = vec![1u8];
            m.extend_from_slice(&encode(&e.to_wire())?);
            state = Err(e);
            vec![vec![Bytes::from(m)]; n]
        } else {
            let (dest_state, stats) = state.expect("checked ok");
            let decoded = decoded.expect("checked ok");
            let mut dest_vec: DestVec = dest_state.into_items().into_iter().collect();
            // Per served chunk: its box and element size, the decoded bytes,
            // this rank's own read items, and each other user's overlaps
            // (receivers in rank order; each receiver's chunks in round
            // order, which is the order it unpacks them in).
            type Job = (
                ChunkBox,
                usize,
                Vec<u8>,
                Vec<crate::plan::ReadItem>,
                Vec<(usize, Vec<ChunkBox>)>,
            );
            let mut sizes = vec![0usize; n];
            let mut jobs: Vec<Job> = Vec::with_capacity(mine.len());
            for (&s, data) in mine.iter().zip(decoded) {
                let c = &sched.shared[s];
                let ItemMeta::Tensor { chunks, .. } = &md.items[c.item].1 else {
                    return Err(Error::invalid("shared chunk is not a tensor"));
                };
                let mut to: Vec<(usize, Vec<ChunkBox>)> = Vec::new();
                for &(r, i) in &c.users {
                    if r != rank {
                        let overlaps = std::mem::take(&mut needs[r][i].overlaps);
                        sizes[r] += overlaps
                            .iter()
                            .map(|o| o.numel() as usize * c.elem)
                            .sum::<usize>();
                        to.push((r, overlaps));
                    }
                }
                let own = shared_reads.remove(&s).unwrap_or_default();
                jobs.push((chunks[c.chunk].region.clone(), c.elem, data, own, to));
            }
            // Fill this rank's own needs (and compact the others' slices) off
            // the executor.
            let (dv, built) = blocking(move || {
                let mut out: Vec<Vec<Bytes>> = vec![vec![Bytes::from_static(&[0])]; n];
                let mut compacted: Vec<Vec<u8>> = if zero_copy {
                    Vec::new()
                } else {
                    sizes.iter().map(|&len| Vec::with_capacity(len)).collect()
                };
                for (saved_box, elem, data, own, to) in jobs {
                    fill_from_chunk(&mut dest_vec, &saved_box, elem, &data, &own);
                    if zero_copy {
                        let shared = Bytes::from(data);
                        for (r, _) in &to {
                            out[*r].push(shared.clone());
                        }
                    } else {
                        for (r, overlaps) in &to {
                            compact(&mut compacted[*r], &saved_box, elem, &data, overlaps);
                        }
                    }
                }
                if !zero_copy {
                    for (r, c) in compacted.into_iter().enumerate() {
                        out[r].push(Bytes::from(c));
                    }
                }
                Ok((dest_vec, out))
            })
            .await?;
            state = Ok((DestStateDict::from_items(dv.into_iter().collect()), stats));
            built
        };
        let recv = collective.all_to_all_v(msgs).await?;
        // Any rank's failure ends the exchange for everyone after this round.
        for (from, m) in recv.iter().enumerate() {
            let status = m.first().cloned().unwrap_or_default();
            if status.first() != Some(&0) {
                let e = status
                    .get(1..)
                    .ok_or_else(|| Error::new(ErrorKind::Collective, "empty shared-read message"))
                    .and_then(decode::<WireError>)
                    .map(Error::from_wire)
                    .unwrap_or_else(|e| e.with_rank(from));
                return Ok(Err(e));
            }
        }
        // Fill this rank's needs from what it received.
        let (dest_state, stats) = state.expect("no failure in this round");
        let mut dest_vec: DestVec = dest_state.into_items().into_iter().collect();
        let mut jobs: Vec<(usize, usize, ChunkBox, Vec<crate::plan::ReadItem>)> = Vec::new();
        for &s in round {
            let c = &sched.shared[s];
            if c.reader != rank && c.users.iter().any(|u| u.0 == rank) {
                let ItemMeta::Tensor { chunks, .. } = &md.items[c.item].1 else {
                    return Err(Error::invalid("shared chunk is not a tensor"));
                };
                jobs.push((
                    c.reader,
                    c.elem,
                    chunks[c.chunk].region.clone(),
                    shared_reads.remove(&s).unwrap_or_default(),
                ));
            }
        }
        let (dv, r) = blocking(move || {
            let mut next = vec![1usize; recv.len()];
            let mut pos = vec![0usize; recv.len()];
            let mut res = Ok(());
            for (from, elem, saved_box, reads) in &jobs {
                let r = if zero_copy {
                    let i = next[*from];
                    next[*from] += 1;
                    match recv[*from].get(i) {
                        Some(chunk) if chunk.len() as u64 == saved_box.numel() * *elem as u64 => {
                            fill_from_chunk(&mut dest_vec, saved_box, *elem, chunk, reads);
                            Ok(())
                        }
                        _ => Err(Error::new(
                            ErrorKind::Collective,
                            "shared-read message does not match the plan",
                        )),
                    }
                } else {
                    let buf = recv[*from].get(1).cloned().unwrap_or_default();
                    fill_from_compact(&mut dest_vec, *elem, &buf, &mut pos[*from], reads)
                };
                if let Err(e) = r {
                    res = Err(e);
                    break;
                }
            }
            Ok((dest_vec, res))
        })
        .await?;
        state = r.map(|_| (DestStateDict::from_items(dv.into_iter().collect()), stats));
    }
    Ok(state)
}

/// A rank's destination, lent to the other ranks of its process while they
/// read shared chunks into it (`None`: the rank already failed).
struct Lent(Option<crate::pipeline::read::DestSlots>);

/// Shared reads for ranks in one process (see [`read_shared`]): every rank
/// lends its destination buffers to the others (`all_gather_local`), then
/// reads the shared chunks it was scheduled to serve straight into the
/// buffers of every rank that needs them, with one scattered read each. No
/// chunk is staged in memory or copied between ranks, so no rounds or
/// budget are needed. An all-gather of the outcome then ends the lending:
/// after it no rank writes into another's buffers, and each takes its own
/// back.
async fn read_lent(
    state: Result<(DestStateDict, ReadStats)>,
    md: &Arc<Metadata>,
    reader: &FileSystemReader,
    collective: &dyn Collective,
    sched: &crate::pipeline::exchange::Schedule,
    needs: &[Vec<crate::pipeline::exchange::Need>],
) -> Result<Result<(DestStateDict, ReadStats)>> {
    use crate::pipeline::read::{read_slots, DestSlots, Slot};
    let rank = collective.rank();
    let (mine, mut stats, mut outcome) = match state {
        Ok((dest, stats)) => (Arc::new(Lent(Some(DestSlots::new(dest)))), stats, Ok(())),
        Err(e) => (Arc::new(Lent(None)), ReadStats::default(), Err(e)),
    };
    let values = collective
        .all_gather_local(mine.clone() as crate::collective::LocalValue)
        .await?;
    let mut lent: Vec<Arc<Lent>> = Vec::with_capacity(values.len());
    for v in values {
        lent.push(v.downcast::<Lent>().map_err(|_| {
            Error::new(
                ErrorKind::Collective,
                "a rank lent something other than its destination buffers",
            )
        })?);
    }
    // Serve only when every rank lent its buffers (a failed rank has none;
    // the outcome exchange below then fails the load everywhere).
    if outcome.is_ok() && lent.iter().all(|l| l.0.is_some()) {
        // Every rank's destination items, one flat index space.
        let mut base = Vec::with_capacity(lent.len());
        let mut count = 0usize;
        for l in &lent {
            base.push(count);
            count += l.0.as_ref().map_or(0, |d| d.slots.len());
        }
        let mut plan = LoadPlan::default();
        for c in sched.shared.iter().filter(|c| c.reader == rank) {
            for &(r, i) in &c.users {
                let need = &needs[r][i];
                for (o, &(di, dc)) in need.overlaps.iter().zip(&need.dests) {
                    plan.tensor_reads.push(crate::plan::ReadItem {
                        dest_item: base[r] + di as usize,
                        dest_chunk: dc as usize,
                        md_item: c.item,
                        saved_chunk: c.chunk,
                        overlap: o.clone(),
                    });
                }
            }
        }
        if !plan.tensor_reads.is_empty() {
            let served = reader.prepare_read(md, &plan).map(|(resolved, cfg)| {
                let (fs, md, lent) = (reader.fs.clone(), md.clone(), lent.clone());
                blocking(move || {
                    let slots: Vec<&Slot> = lent
                        .iter()
                        .flat_map(|l| l.0.as_ref().map(|d| d.slots.iter()).into_iter().flatten())
                        .collect();
                    read_slots(fs.as_ref(), &md, &plan, &slots, &resolved, &cfg)
                })
            });
            match served {
                Ok(task) => match task.await {
                    Ok(s) => {
                        stats.bytes_read += s.bytes_read;
                        stats.requests += s.requests;
                        stats.records += s.records;
                    }
                    Err(e) => outcome = Err(e),
                },
                Err(e) => outcome = Err(e),
            }
        }
    }
    drop(lent);
    // The end of the lending: once every rank is past this, nobody writes
    // into another rank's buffers.
    let status: std::result::Result<(), WireError> = match &outcome {
        Ok(()) => Ok(()),
        Err(e) => Err(on_rank(e, rank).to_wire()),
    };
    let all = collective.all_gather(encode(&status)?).await?;
    if let Err(e) = outcome {
        return Ok(Err(e));
    }
    for b in &all {
        if let Err(w) = decode::<std::result::Result<(), WireError>>(b)? {
            return Ok(Err(Error::from_wire(w)));
        }
    }
    let dest = mine
        .0
        .as_ref()
        .map(DestSlots::take)
        .expect("a rank that did not fail lent its buffers");
    Ok(Ok((dest, stats)))
}

/// Read whole saved chunks `(md_item, saved_chunk)`, decoded and verified,
/// through the reader's ordinary path (the saved box as the destination).
async fn read_saved_chunks(
    reader: &dyn StorageReader,
    md: &Arc<Metadata>,
    chunks: Vec<(usize, usize)>,
) -> Result<(Vec<Vec<u8>>, ReadStats)> {
    let mut by_item: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(i, c) in &chunks {
        by_item.entry(i).or_default().push(c);
    }
    let mut dest = DestStateDict::new();
    let mut plan = LoadPlan::default();
    for (di, (&i, cs)) in by_item.iter().enumerate() {
        let (
            name,
            ItemMeta::Tensor {
                dtype,
                shape,
                chunks: saved,
            },
        ) = &md.items[i]
        else {
            return Err(Error::invalid("shared chunk is not a tensor"));
        };
        dest.want_tensor(
            name.clone(),
            *dtype,
            shape.clone(),
            cs.iter().map(|&c| saved[c].region.clone()).collect(),
        )?;
        for (dc, &c) in cs.iter().enumerate() {
            plan.tensor_reads.push(crate::plan::ReadItem {
                dest_item: di,
                dest_chunk: dc,
                md_item: i,
                saved_chunk: c,
                overlap: saved[c].region.clone(),
            });
        }
    }
    // Item names are unique and sorted in the metadata, so the destination's
    // name order is the metadata's index order, as the plan assumes.
    let (filled, stats) = reader.read(md.clone(), plan, dest).await?;
    let mut out_map: BTreeMap<(usize, usize), Vec<u8>> = BTreeMap::new();
    for ((&i, cs), (_, item)) in by_item.iter().zip(filled.into_items()) {
        if let crate::model::DestItem::Tensor(t) = item {
            for (&c, ch) in cs.iter().zip(t.chunks) {
                out_map.insert((i, c), ch.data);
            }
        }
    }
    let out = chunks
        .iter()
        .map(|k| out_map.remove(k).unwrap_or_default())
        .collect();
    Ok((out, stats))
}

/// Read and validate the metadata of a checkpoint (no collective).
pub async fn read_metadata(reader: &dyn StorageReader) -> Result<Metadata> {
    let b = reader.read_metadata().await?;
    Metadata::decode(&b)
}
