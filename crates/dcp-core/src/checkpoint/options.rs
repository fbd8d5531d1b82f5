//! Options of the writer, the reader, a save and a load, with the meaning
//! torch DCP gives them where torch has the option.

use crate::metadata::FormatKind;
use crate::plan::{DefaultLoadPlanner, DefaultSavePlanner, LoadPlanner, SavePlanner};
use crate::transform::{ExtensionRegistry, StreamTransformExtension};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Options of a [`FileSystemWriter`](crate::FileSystemWriter), with the meaning torch DCP gives them.
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

/// Options of a [`FileSystemReader`](crate::FileSystemReader). Build it with `..Default::default()`:
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

/// Options of [`save_with`](crate::save_with).
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

/// Options of [`load_with`](crate::load_with).
#[derive(Clone)]
pub struct LoadOptions {
    /// Decides which stored bytes fill which destination.
    pub planner: Arc<dyn LoadPlanner>,
    /// When several ranks need parts of one saved chunk, read it once on one
    /// rank instead of on every rank (a resharded load then reads the
    /// checkpoint about once in total, not once per rank). Ranks of one
    /// process ([`Collective::shares_memory`](crate::Collective::shares_memory)) with [`FileSystemReader`](crate::FileSystemReader)s
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
