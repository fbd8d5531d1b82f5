//! Reading records into destination chunks.
//!
//! Records are grouped by file and sorted by offset; neighbouring needed
//! ranges are coalesced (a small gap read is cheaper than another request).
//! Only the bytes a destination needs are read, except where a record must be
//! read whole: a codec was applied, or a checksum is verified. A needed range
//! that is contiguous both in the saved chunk and in the destination chunk is
//! read straight into the destination buffer. A record stored as it is whose
//! destinations tile it exactly (column shards of saved rows; several ranks'
//! buffers when ranks of one process lend them) is scattered with one copy:
//! from the page cache in 1 MiB blocks copied out by [`LineStreamer`], from a
//! device or object store with one [`FileSystem::read_scattered`] per part.
//! Everything else is read once into a buffer and scattered.
//!
//! Destinations are [`Slot`]s: each chunk's buffer behind its own lock, so
//! workers, and other ranks of the process, write disjoint parts of it.

mod exec;
mod plan;
mod reads;

use crate::error::Result;
use crate::metadata::Metadata;
use crate::model::{ChunkBox, DestData, DestItem, DestStateDict};
use crate::pipeline::prefetch::prefetch;
use crate::plan::LoadPlan;
use crate::storage::FileSystem;
use crate::transform::StreamTransformExtension;
use std::sync::{Arc, Mutex};

pub(crate) use exec::decode_record;
pub(crate) use reads::Reads;

/// What one rank's load read from storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Bytes requested from storage.
    pub bytes_read: u64,
    /// Read requests issued.
    pub requests: u64,
    /// Records touched.
    pub records: u64,
}

/// Settings of one load.
#[derive(Clone, Debug)]
pub(crate) struct ReadConfig {
    pub thread_count: usize,
    /// Reads each worker keeps in flight (the file system's
    /// [`FileSystem::read_requests_in_flight`]).
    pub requests_in_flight: usize,
    /// The file system's request size
    /// ([`FileSystem::read_request_size`]): neighbouring whole records are
    /// read together in requests of at most this many bytes.
    pub request_size: Option<u64>,
    pub verify_checksums: bool,
    pub coalesce_gap: u64,
    pub max_request: u64,
    /// Records shorter than this are read through coalesced spans rather
    /// than straight into their destination.
    pub small_record: u64,
}

/// A destination chunk while reads fill it: its box, and its buffer behind
/// its own lock, so workers (and, in one process, other ranks) write
/// disjoint parts of it.
pub(crate) type SlotChunk = (ChunkBox, Mutex<DestData>);

/// One destination item while reads fill it: a view of its chunks (in a
/// [`DestSlots`]' flat column, or a lone chunk) or of its bytes.
#[derive(Clone, Copy)]
pub(crate) enum Slot<'a> {
    Tensor(&'a [SlotChunk]),
    Bytes(&'a Mutex<Option<Vec<u8>>>),
}

/// Where one destination item's slot lies in a [`DestSlots`]' columns.
#[derive(Clone, Copy)]
enum SlotAt {
    /// `chunks[start..end]`.
    Tensor(usize, usize),
    /// `bytes[i]`.
    Bytes(usize),
}

/// A rank's destination state dict while reads fill it: every chunk's
/// buffer moved out into one flat column (one allocation per rank, not one
/// per item), the state dict itself kept as it is, without its buffers, to
/// put them back into ([`DestSlots::take`]). Items are addressed by index
/// (name order, as plans address them) through [`DestSlots::slots`].
pub(crate) struct DestSlots {
    /// The destination, its buffers moved out (behind a lock, as `take`
    /// works on a shared `DestSlots`).
    dest: Mutex<DestStateDict>,
    chunks: Vec<SlotChunk>,
    bytes: Vec<Mutex<Option<Vec<u8>>>>,
    at: Vec<SlotAt>,
}

impl DestSlots {
    pub(crate) fn new(mut dest: DestStateDict) -> DestSlots {
        let items = dest.items_mut();
        let (mut n_chunks, mut n_bytes) = (0usize, 0usize);
        for (_, item) in items.iter() {
            match item {
                DestItem::Tensor(t) => n_chunks += t.chunks.len(),
                DestItem::Bytes(_) => n_bytes += 1,
            }
        }
        let mut chunks = Vec::with_capacity(n_chunks);
        let mut bytes = Vec::with_capacity(n_bytes);
        let mut at = Vec::with_capacity(items.len());
        for i in 0..items.len() {
            prefetch_chunks(items, i + PREFETCH_AHEAD);
            match &mut items[i].1 {
                DestItem::Tensor(t) => {
                    let start = chunks.len();
                    chunks.extend(
                        t.chunks
                            .iter_mut()
                            .map(|c| (c.region.clone(), Mutex::new(std::mem::take(&mut c.data)))),
                    );
                    at.push(SlotAt::Tensor(start, chunks.len()));
                }
                DestItem::Bytes(b) => {
                    at.push(SlotAt::Bytes(bytes.len()));
                    bytes.push(Mutex::new(b.take()));
                }
            }
        }
        DestSlots {
            dest: Mutex::new(dest),
            chunks,
            bytes,
            at,
        }
    }

    /// Number of destination items.
    pub(crate) fn len(&self) -> usize {
        self.at.len()
    }

    /// Every item's slot, by destination item index.
    pub(crate) fn slots(&self) -> impl Iterator<Item = Slot<'_>> + '_ {
        self.at.iter().map(|a| match *a {
            SlotAt::Tensor(s, e) => Slot::Tensor(&self.chunks[s..e]),
            SlotAt::Bytes(i) => Slot::Bytes(&self.bytes[i]),
        })
    }

    /// Move the buffers back into the state dict and return it (through
    /// the locks, so it works on a shared `DestSlots`; what is left behind
    /// is empty).
    pub(crate) fn take(&self) -> DestStateDict {
        let mut dest = std::mem::take(&mut *lock(&self.dest));
        let items = dest.items_mut();
        for (i, a) in self.at.iter().enumerate() {
            prefetch_chunks(items, i + PREFETCH_AHEAD);
            match (&mut items[i].1, *a) {
                (DestItem::Tensor(t), SlotAt::Tensor(s, e)) => {
                    for (c, (_, m)) in t.chunks.iter_mut().zip(&self.chunks[s..e]) {
                        c.data = std::mem::take(&mut *lock(m));
                    }
                }
                (DestItem::Bytes(b), SlotAt::Bytes(i)) => *b = lock(&self.bytes[i]).take(),
                _ => unreachable!("slots follow the state dict they were made of"),
            }
        }
        dest
    }
}

/// A rank's destination on its way through a load: whole, or already moved
/// into read slots (ranks of one process that lend each other their
/// buffers move them while rank 0 reads the metadata, when the other
/// ranks would otherwise wait idle).
pub(crate) enum Dest {
    Whole(DestStateDict),
    Slots(DestSlots),
}

impl Dest {
    /// Plan this destination's reads with `planner`; of slots, against the
    /// state dict whose buffers they hold (see [`LoadPlanner`]: planners
    /// plan from names, dtypes, shapes and regions only).
    ///
    /// [`LoadPlanner`]: crate::plan::LoadPlanner
    pub(crate) fn plan(
        &self,
        planner: &dyn crate::plan::LoadPlanner,
        md: &Metadata,
    ) -> Result<LoadPlan> {
        match self {
            Dest::Whole(d) => planner.plan(md, d),
            Dest::Slots(s) => planner.plan(md, &lock(&s.dest)),
        }
    }

    /// The destination as slots (moving its buffers now if it is whole).
    pub(crate) fn into_slots(self) -> DestSlots {
        match self {
            Dest::Whole(d) => DestSlots::new(d),
            Dest::Slots(s) => s,
        }
    }

    /// The destination whole (its buffers moved back if it is in slots).
    pub(crate) fn into_whole(self) -> DestStateDict {
        match self {
            Dest::Whole(d) => d,
            Dest::Slots(s) => s.take(),
        }
    }
}

/// How many items ahead [`DestSlots`] hints the cache about the chunk
/// records it moves buffers in and out of (the items themselves lie in one
/// vector, which the hardware prefetcher follows).
const PREFETCH_AHEAD: usize = 8;

/// Hint the cache about the chunk records of `items[i]`, if there is one: a
/// state dict's chunk records lie scattered among its buffers, about one
/// miss per record, which the CPU then waits for while it moves the
/// buffers of the items before it instead of one after another.
fn prefetch_chunks(items: &[(String, DestItem)], i: usize) {
    if let Some((_, DestItem::Tensor(t))) = items.get(i) {
        prefetch(&t.chunks[..]);
    }
}

/// Execute `reads` against `fs`, filling `slots` (indexed by the reads'
/// destination items, [`Reads::tensor`]; they may belong to several ranks
/// of one process). Blocking: runs up to `thread_count` scoped worker
/// threads.
pub(crate) fn read_slots(
    fs: &dyn FileSystem,
    md: &Metadata,
    reads: &Reads<'_>,
    slots: &[Slot<'_>],
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    cfg: &ReadConfig,
) -> Result<ReadStats> {
    let _span = tracing::debug_span!("read", reads = reads.tensor_len()).entered();
    let kinds: Vec<_> = resolved
        .iter()
        .map(|r| r.as_ref().map(|t| t.kind()))
        .collect();
    let schedule = plan::schedule(md, reads, slots, &kinds, cfg, |name| fs.file_len(name))?;
    exec::execute(fs, md, &schedule, slots, resolved, cfg)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
