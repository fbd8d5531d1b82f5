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

use crate::error::Result;
use crate::metadata::Metadata;
use crate::model::{ChunkBox, DestData, DestItem, DestStateDict};
use crate::plan::LoadPlan;
use crate::storage::FileSystem;
use crate::transform::StreamTransformExtension;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub(crate) use exec::decode_record;

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

/// One destination item while reads fill it: each chunk's buffer behind its
/// own lock, so workers (and, in one process, other ranks) write disjoint
/// parts of it.
pub(crate) enum Slot {
    Tensor(Vec<(ChunkBox, Mutex<DestData>)>),
    Bytes(Mutex<Option<Vec<u8>>>),
}

/// A destination item's dtype and shape (`None` for a bytes item).
type ItemShape = Option<(crate::DType, Vec<u64>)>;

/// A rank's destination state dict as [`Slot`]s, by destination item index
/// (name order, as plans address it).
pub(crate) struct DestSlots {
    /// Each item's name, and a tensor's dtype and shape; moved out by
    /// [`DestSlots::take`] (behind a lock, as `take` works on a shared
    /// `DestSlots`).
    names: Mutex<Vec<(String, ItemShape)>>,
    pub(crate) slots: Vec<Slot>,
}

impl DestSlots {
    pub(crate) fn new(dest: DestStateDict) -> DestSlots {
        let items = dest.into_items();
        let mut names = Vec::with_capacity(items.len());
        let slots: Vec<Slot> = items
            .into_iter()
            .map(|(name, item)| match item {
                DestItem::Tensor(t) => {
                    names.push((name, Some((t.dtype, t.shape))));
                    Slot::Tensor(
                        t.chunks
                            .into_iter()
                            .map(|c| (c.region, Mutex::new(c.data)))
                            .collect(),
                    )
                }
                DestItem::Bytes(b) => {
                    names.push((name, None));
                    Slot::Bytes(Mutex::new(b))
                }
            })
            .collect();
        DestSlots {
            names: Mutex::new(names),
            slots,
        }
    }

    /// Move the buffers back out into a state dict (through the locks, so it
    /// works on a shared `DestSlots`; what is left behind is empty).
    pub(crate) fn take(&self) -> DestStateDict {
        let names = std::mem::take(&mut *lock(&self.names));
        // In name order already: collecting builds the map in one pass.
        let out: BTreeMap<String, DestItem> = names
            .into_iter()
            .zip(&self.slots)
            .map(|((name, m), slot)| {
                let item = match (slot, m) {
                    (Slot::Tensor(chunks), Some((dtype, shape))) => {
                        DestItem::Tensor(crate::model::DestTensor {
                            dtype,
                            shape,
                            chunks: chunks
                                .iter()
                                .map(|(region, data)| crate::model::DestChunk {
                                    region: region.clone(),
                                    data: std::mem::take(&mut *lock(data)),
                                })
                                .collect(),
                        })
                    }
                    (Slot::Bytes(b), _) => DestItem::Bytes(lock(b).take()),
                    (Slot::Tensor(_), None) => unreachable!("tensor slots carry their meta"),
                };
                (name, item)
            })
            .collect();
        DestStateDict::from_items(out)
    }
}

/// Execute `plan` against `fs`, filling `dest`. Blocking: runs up to
/// `thread_count` scoped worker threads.
pub(crate) fn read_plan(
    fs: &dyn FileSystem,
    md: &Metadata,
    plan: &LoadPlan,
    dest: DestStateDict,
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    cfg: &ReadConfig,
) -> Result<(DestStateDict, ReadStats)> {
    let dest = DestSlots::new(dest);
    let slots: Vec<&Slot> = dest.slots.iter().collect();
    let stats = read_slots(fs, md, plan, &slots, resolved, cfg)?;
    Ok((dest.take(), stats))
}

/// Execute `plan` against `fs`, filling `slots` (indexed by the plan's
/// `dest_item`; they may belong to several ranks of one process). Blocking:
/// runs up to `thread_count` scoped worker threads.
pub(crate) fn read_slots(
    fs: &dyn FileSystem,
    md: &Metadata,
    plan: &LoadPlan,
    slots: &[&Slot],
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    cfg: &ReadConfig,
) -> Result<ReadStats> {
    let _span = tracing::debug_span!("read", reads = plan.tensor_reads.len()).entered();
    let kinds: Vec<_> = resolved
        .iter()
        .map(|r| r.as_ref().map(|t| t.kind()))
        .collect();
    let schedule = plan::schedule(md, plan, slots, &kinds, cfg, |name| fs.file_len(name))?;
    exec::execute(fs, md, &schedule, slots, resolved, cfg)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
