//! Options of the writer, the reader, a save and a load, with the meaning
//! torch DCP gives them where torch has the option.
//!
//! Each options type is `#[non_exhaustive]` (fields will be added) and is
//! built from its `Default` with one method per field:
//! `WriterOptions::default().thread_count(4).sync_files(false)`. The fields
//! stay public to read, and to set on a value you already have.

use crate::checkpoint::{MetadataTranslator, SavePlanCache};
use crate::format::{FormatRegistry, Raw, SerializationFormat};
use crate::plan::{DefaultLoadPlanner, DefaultSavePlanner, LoadPlanner, SavePlanner};
use crate::transform::{Crc32c, ExtensionRegistry, StreamTransformExtension};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Generates one builder method per field: `fn field(mut self, v) -> Self`.
macro_rules! setters {
    ($ty:ident { $($(#[$doc:meta])* $field:ident : $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $field(mut self, value: $t) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}

/// Options of a [`FileSystemWriter`](crate::FileSystemWriter): the
/// arguments of torch's `FileSystemWriter`/`FsspecWriter`, with their
/// meaning. The default writes one raw data file per rank, fsyncs it, and
/// records a CRC-32C checksum of every record (verified on every load).
///
/// ```
/// use dcp_core::WriterOptions;
/// let o = WriterOptions::default().thread_count(4).sync_files(false);
/// assert_eq!((o.thread_count, o.sync_files, o.extensions.len()), (4, false, 1));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WriterOptions {
    /// torch's `single_file_per_rank`: each rank writes its records into
    /// `thread_count` data files (`true`, the default), or one data file per
    /// record (`false`).
    pub single_file_per_rank: bool,
    /// torch's `sync_files`: make every data file, the directory and the
    /// metadata durable (fsync; a completed upload on object stores) before
    /// the save returns. Default `true`.
    pub sync_files: bool,
    /// torch's `thread_count`: writer threads per rank, and data files per
    /// rank with `single_file_per_rank`. Default 1; 0 is refused.
    pub thread_count: usize,
    /// torch's `per_thread_copy_ahead` ("bytes to copy from the GPU ahead of
    /// saving them"): the bytes one writer thread may have staged (copied
    /// out of [`ChunkData::Source`](crate::ChunkData::Source) chunks, device
    /// memory) and not yet written, for every `thread_count`: sources are
    /// copied in pieces of half this, the next copying while the last is
    /// written, so a rank holds at most `thread_count x
    /// per_thread_copy_ahead` staged bytes (`SaveResult::staged_peak_bytes`).
    /// Codecs (compression) also run over pieces of at most this many bytes
    /// (at least 64 KiB). Host memory without a codec is written straight
    /// from the caller's buffers and stages nothing. Default 10,000,000.
    pub per_thread_copy_ahead: usize,
    /// torch's `overwrite`: replace an existing checkpoint (crash-safely:
    /// the old one stays loadable until the new `.metadata` is committed).
    /// When `false`, a save into a location holding `.metadata` fails with
    /// [`ErrorKind::AlreadyExists`](crate::ErrorKind::AlreadyExists).
    /// Default `true`.
    pub overwrite: bool,
    /// torch's `_extensions`: stream transforms applied to every record, in
    /// order (compression first, then a checksum that covers the stored
    /// bytes). Default: CRC-32C ([`Crc32c`]) alone; an empty chain writes
    /// no checksum.
    pub extensions: Vec<Arc<dyn StreamTransformExtension>>,
    /// torch's `serialization_format`: how records sit in data files.
    /// Default [`Raw`]; [`Safetensors`](crate::format::Safetensors) makes
    /// every data file a valid safetensors file.
    pub serialization_format: Arc<dyn SerializationFormat>,
    /// How long a save waits for the location's lease when another save
    /// holds it. `None` (the default): fail at once with
    /// [`ErrorKind::Busy`](crate::ErrorKind::Busy), naming the holder (save
    /// id, host, pid, start time). `Some(t)`: retry until the lease is free
    /// or `t` has passed, then fail the same way.
    pub lease_wait: Option<Duration>,
    /// How long the lease a save holds on its location stays valid without
    /// renewal. A running save renews it every third of this; a lease past
    /// its expiry (its holder stopped renewing) is broken by the next save,
    /// with a warning. Default 60 s; under 3 s is refused.
    pub lease_expiry: Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            single_file_per_rank: true,
            sync_files: true,
            thread_count: 1,
            per_thread_copy_ahead: 10_000_000,
            overwrite: true,
            extensions: vec![Arc::new(Crc32c)],
            serialization_format: Arc::new(Raw),
            lease_wait: None,
            lease_expiry: Duration::from_secs(60),
        }
    }
}

setters!(WriterOptions {
    /// Set [`WriterOptions::single_file_per_rank`].
    single_file_per_rank: bool,
    /// Set [`WriterOptions::sync_files`].
    sync_files: bool,
    /// Set [`WriterOptions::thread_count`].
    thread_count: usize,
    /// Set [`WriterOptions::per_thread_copy_ahead`].
    per_thread_copy_ahead: usize,
    /// Set [`WriterOptions::overwrite`].
    overwrite: bool,
    /// Set [`WriterOptions::extensions`] (an empty chain: no checksum).
    extensions: Vec<Arc<dyn StreamTransformExtension>>,
    /// Set [`WriterOptions::serialization_format`].
    serialization_format: Arc<dyn SerializationFormat>,
    /// Set [`WriterOptions::lease_wait`].
    lease_wait: Option<Duration>,
    /// Set [`WriterOptions::lease_expiry`].
    lease_expiry: Duration,
});

/// Options of a [`FileSystemReader`](crate::FileSystemReader). torch's
/// `FileSystemReader`/`FsspecReader` take only a path and storage options;
/// these tune how dcp reads.
///
/// ```
/// use dcp_core::ReaderOptions;
/// let o = ReaderOptions::default().thread_count(8);
/// assert_eq!(o.thread_count, 8);
/// assert!(o.registry.contains("crc32c"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReaderOptions {
    /// Reader threads per rank. Default 4.
    pub thread_count: usize,
    /// Verify recorded checksums. A checksummed record is then read whole
    /// (or scattered whole into its destinations) so its checksum can be
    /// checked. Default `true`.
    pub verify_checksums: bool,
    /// Resolves the transform descriptors found in the metadata. The
    /// default resolves CRC-32C; the `dcp` facade's readers add every
    /// transform of the enabled crates.
    pub registry: ExtensionRegistry,
    /// Resolves the serialization format recorded in the metadata. Default:
    /// dcp's raw and safetensors formats.
    pub formats: FormatRegistry,
    /// Merge two needed ranges of a file when at most this many bytes
    /// apart. Default 4 KiB.
    pub coalesce_gap: u64,
    /// Largest single read request, except a single record read whole.
    /// Default 64 MiB; a file system with a request size of its own
    /// ([`FileSystem::read_request_size`](crate::FileSystem::read_request_size),
    /// an object store's part size) lowers it to that.
    pub max_request: u64,
    /// Records shorter than this are read in coalesced requests with their
    /// neighbours (then copied) instead of one request each. Default
    /// 256 KiB.
    pub small_record: u64,
    /// Readers of checkpoints written by other tools, asked in order when
    /// `.metadata` is not dcp's (see [`MetadataTranslator`]). Default: none
    /// (such a checkpoint is refused); the `dcp` facade's readers add
    /// torch's with its `torch` feature.
    pub translators: Vec<Arc<dyn MetadataTranslator>>,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            thread_count: 4,
            verify_checksums: true,
            registry: ExtensionRegistry::new(),
            formats: FormatRegistry::new(),
            coalesce_gap: 4096,
            max_request: 64 << 20,
            small_record: 256 * 1024,
            translators: Vec::new(),
        }
    }
}

setters!(ReaderOptions {
    /// Set [`ReaderOptions::thread_count`].
    thread_count: usize,
    /// Set [`ReaderOptions::verify_checksums`].
    verify_checksums: bool,
    /// Set [`ReaderOptions::registry`].
    registry: ExtensionRegistry,
    /// Set [`ReaderOptions::formats`].
    formats: FormatRegistry,
    /// Set [`ReaderOptions::coalesce_gap`].
    coalesce_gap: u64,
    /// Set [`ReaderOptions::max_request`].
    max_request: u64,
    /// Set [`ReaderOptions::small_record`].
    small_record: u64,
    /// Set [`ReaderOptions::translators`].
    translators: Vec<Arc<dyn MetadataTranslator>>,
});

/// Options of [`save_with`](crate::save_with).
#[derive(Clone)]
#[non_exhaustive]
pub struct SaveOptions {
    /// torch's `planner`: decides who writes what. Default: deduplicate
    /// items declared replicated, balance bytes across ranks.
    pub planner: Arc<dyn SavePlanner>,
    /// User key/value metadata stored in `.metadata` (taken from rank 0).
    pub user_metadata: BTreeMap<String, String>,
    /// Reuse the plan of an earlier save with an unchanged layout (see
    /// [`SavePlanCache`]): pass the same cache to every save of the job.
    /// Default `None`: every save plans from full plans.
    /// [`AsyncSaver`](crate::AsyncSaver) sets its own when this is `None`.
    pub plan_cache: Option<SavePlanCache>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            planner: Arc::new(DefaultSavePlanner::default()),
            user_metadata: BTreeMap::new(),
            plan_cache: None,
        }
    }
}

setters!(SaveOptions {
    /// Set [`SaveOptions::planner`].
    planner: Arc<dyn SavePlanner>,
    /// Set [`SaveOptions::user_metadata`].
    user_metadata: BTreeMap<String, String>,
    /// Set [`SaveOptions::plan_cache`].
    plan_cache: Option<SavePlanCache>,
});

/// Options of [`load_with`](crate::load_with).
#[derive(Clone)]
#[non_exhaustive]
pub struct LoadOptions {
    /// torch's `planner`: decides which stored bytes fill which
    /// destination. Default: intersect every destination chunk with the
    /// saved chunks; dtype or shape differences are errors.
    pub planner: Arc<dyn LoadPlanner>,
    /// When several ranks need parts of one saved chunk, read it once on one
    /// rank instead of on every rank (a resharded load then reads the
    /// checkpoint about once in total, not once per rank). Ranks of one
    /// process ([`Collective::shares_memory`](crate::Collective::shares_memory))
    /// whose readers are all [`FileSystemReader`](crate::FileSystemReader)s
    /// lend each other their destination buffers, and the reading rank
    /// writes every rank's part straight into them. Ranks in separate
    /// processes whose collective shares memory within a node
    /// ([`Collective::node_window`](crate::Collective::node_window), MPI)
    /// pass the slices for their node through it, one copy each; other
    /// ranks receive their slices through the collective. Default `true`.
    pub share_reads: bool,
    /// Bytes a rank may hold per exchange round (decoded chunks it read plus
    /// slices in flight, in a node window or as messages) when slices
    /// travel through the collective. Lent buffers need no staging, so
    /// this does not apply to them. Default 512 MiB.
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

setters!(LoadOptions {
    /// Set [`LoadOptions::planner`].
    planner: Arc<dyn LoadPlanner>,
    /// Set [`LoadOptions::share_reads`].
    share_reads: bool,
    /// Set [`LoadOptions::exchange_budget`].
    exchange_budget: u64,
});
