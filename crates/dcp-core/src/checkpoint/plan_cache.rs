//! Plan caching for steady-state saves: a job that saves the same layout
//! every N steps plans once. After a save commits, every rank keeps its
//! assignment and a digest of the plan it offered; the coordinator keeps
//! every rank's digest, where each assigned record sits in the metadata,
//! and the metadata itself as a skeleton. A later save whose ranks all
//! offer an unchanged digest exchanges only that digest (and the checksums
//! of replicated records, still compared across holders), reuses every
//! assignment, and fills the skeleton with the new write results (files,
//! offsets, lengths, checksum values). Anything else (a changed shape,
//! dtype, name, chunk, record size or world size; a rank or coordinator
//! without an entry) re-plans from full plans, as the first save did.

use crate::checkpoint::assemble::Slots;
use crate::checkpoint::wire::decode;
use crate::checkpoint::RankWrite;
use crate::error::{Error, Result, WireError};
use crate::metadata::{DataFile, FormatKind, ItemMeta, Metadata, StorageInfo};
use crate::plan::{SavePlan, SavePlanner, WriteIndex};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

/// A digest of a rank's plan layout: everything the coordinator's planning
/// reads (names, records, dtypes, shapes, sizes, replication) except the
/// checksum values of replicated records, which are sent with it.
pub(crate) type Digest = [u64; 2];

/// The cache of one job's save plans, across saves: pass the same cache
/// (one per rank, or one shared by the ranks of one process; entries are
/// kept per rank) to every save of the job with
/// [`SaveOptions::plan_cache`](crate::SaveOptions::plan_cache).
/// [`AsyncSaver`](crate::AsyncSaver) holds one for its saves.
///
/// It assumes the same [`SavePlanner`] for every save that uses it, and
/// that the planner decides from the plans alone (the default planner
/// does); [`clear`](SavePlanCache::clear) it after changing planners. A
/// save whose layout changed re-plans and replaces the entry; a save that
/// fails leaves the coordinator without one, so the next save re-plans.
/// Cloning gives another handle to the same cache.
#[derive(Clone, Default)]
pub struct SavePlanCache {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for SavePlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.stats();
        f.debug_struct("SavePlanCache")
            .field("planned", &s.planned)
            .field("cached", &s.cached)
            .finish()
    }
}

/// How the saves that used a [`SavePlanCache`] were coordinated, as the
/// coordinator saw them (rank 0's entries; zero where the coordinator never
/// used this cache).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanCacheStats {
    /// Saves planned from full plans (the first, and any whose layout changed).
    pub planned: u64,
    /// Saves that reused the cached plan and metadata skeleton.
    pub cached: u64,
}

#[derive(Default)]
struct Inner {
    ranks: HashMap<usize, RankEntry>,
    coord: Option<CoordEntry>,
    stats: PlanCacheStats,
}

/// What a rank keeps: its assignment from the save that planned it.
#[derive(Clone)]
pub(crate) struct RankEntry {
    pub world: usize,
    pub layout: Digest,
    pub plan_id: u64,
    pub assignment: Arc<SavePlan>,
}

/// Holders of one replicated record whose checksum is compared: (rank,
/// index into that rank's list of replica checksums).
pub(crate) struct ReplicaGroup {
    name: String,
    holders: Vec<(u32, u32)>,
}

/// What the coordinator keeps.
pub(crate) struct CoordEntry {
    world: usize,
    plan_id: u64,
    layouts: Vec<Digest>,
    replica_groups: Vec<ReplicaGroup>,
    /// `slots[slot_start[r]..slot_start[r + 1]]`: where rank r's assigned
    /// records sit in the metadata, in assignment order: (item index, chunk
    /// index; `u32::MAX` for a bytes item).
    slot_start: Vec<usize>,
    slots: Vec<(u32, u32)>,
    pub(crate) skeleton: Arc<Metadata>,
}

impl SavePlanCache {
    /// An empty cache.
    pub fn new() -> SavePlanCache {
        SavePlanCache::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves at worst a stale entry,
        // which the digests and plan ids still check.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget every entry: the next save re-plans.
    pub fn clear(&self) {
        let mut g = self.lock();
        g.ranks.clear();
        g.coord = None;
    }

    /// How many saves the coordinator planned and how many reused the cache.
    pub fn stats(&self) -> PlanCacheStats {
        self.lock().stats
    }

    pub(crate) fn rank_entry(&self, rank: usize, world: usize) -> Option<RankEntry> {
        self.lock()
            .ranks
            .get(&rank)
            .filter(|e| e.world == world)
            .cloned()
    }

    pub(crate) fn set_rank_entry(&self, rank: usize, e: RankEntry) {
        self.lock().ranks.insert(rank, e);
    }

    pub(crate) fn take_coord(&self) -> Option<CoordEntry> {
        self.lock().coord.take()
    }

    pub(crate) fn set_coord(&self, e: CoordEntry, cached: bool) {
        let mut g = self.lock();
        g.coord = Some(e);
        if cached {
            g.stats.cached += 1;
        } else {
            g.stats.planned += 1;
        }
    }
}

/// The layout digest of `plan` (see [`Digest`]).
pub(crate) fn layout_digest(plan: &SavePlan) -> Digest {
    let mut out = [0u64; 2];
    for (k, o) in out.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (k as u64 ^ 0x9e37_79b9_7f4a_7c15).hash(&mut h);
        plan.items.len().hash(&mut h);
        for it in &plan.items {
            it.name.hash(&mut h);
            it.index.hash(&mut h);
            it.dtype.hash(&mut h);
            it.shape.hash(&mut h);
            it.nbytes.hash(&mut h);
            it.replicated.hash(&mut h);
            it.digest.is_some().hash(&mut h);
        }
        plan.declared.len().hash(&mut h);
        for d in &plan.declared {
            d.name.hash(&mut h);
            d.dtype.hash(&mut h);
            d.shape.hash(&mut h);
        }
        *o = h.finish();
    }
    out
}

/// The checksums of `plan`'s replicated records, in plan order.
pub(crate) fn replica_digests(plan: &SavePlan) -> Vec<u32> {
    plan.items.iter().filter_map(|i| i.digest).collect()
}

/// A rank's offer in the plan gather: its whole plan, or only the digest of
/// an unchanged one.
#[derive(Serialize, Deserialize)]
pub(crate) enum Offer<P> {
    /// The plan, and its digest.
    Full { plan: P, layout: Digest },
    /// Unchanged since the save that planned `plan_id`.
    Same {
        layout: Digest,
        plan_id: u64,
        replicas: Vec<u32>,
    },
}

/// The coordinator's answer in the scatter.
#[derive(Serialize, Deserialize)]
pub(crate) enum Assign<P> {
    /// This rank's assignment, from the planning `plan_id`.
    Plan { plan: P, plan_id: u64 },
    /// Write every record this rank offered: the assignment is the offer
    /// (see [`SavePlanner::assigns_offered_order`]), from the planning
    /// `plan_id`.
    Offered { plan_id: u64 },
    /// Write the cached assignment.
    Cached,
    /// Some rank's digest did not match: offer the whole plan again.
    Resend,
}

/// What a rank reports in the write-result gather: its files, and its
/// records' storage in assignment order (no names).
#[derive(Serialize, Deserialize)]
pub(crate) struct CompactWrite {
    pub files: Vec<DataFile>,
    pub transforms: Vec<String>,
    pub storage: Vec<StorageInfo>,
    pub staged_peak_bytes: u64,
}

impl CompactWrite {
    /// `w`'s records ordered as `plan` assigns them; refuses a record not
    /// assigned, or an assigned record missing.
    pub(crate) fn from_write(w: RankWrite, plan: &SavePlan) -> Result<CompactWrite> {
        let n = plan.items.len();
        if w.records.len() != n {
            return Err(Error::plan(format!(
                "the writer reported {} records for {n} assigned",
                w.records.len()
            )));
        }
        let in_order = w
            .records
            .iter()
            .zip(&plan.items)
            .all(|(r, it)| *r.0 == *it.name && r.1 == it.index);
        let storage = if in_order {
            w.records.into_iter().map(|r| r.2).collect()
        } else {
            let pos: HashMap<(&str, &WriteIndex), usize> = plan
                .items
                .iter()
                .enumerate()
                .map(|(i, it)| ((&*it.name, &it.index), i))
                .collect();
            let mut out: Vec<Option<StorageInfo>> = vec![None; n];
            for (name, index, st) in w.records {
                let i = *pos.get(&(name.as_str(), &index)).ok_or_else(|| {
                    Error::plan(format!("{name}: written but not assigned to this rank"))
                })?;
                out[i] = Some(st);
            }
            out.into_iter()
                .zip(&plan.items)
                .map(|(s, it)| {
                    s.ok_or_else(|| Error::plan(format!("{}: assigned but not written", it.name)))
                })
                .collect::<Result<_>>()?
        };
        Ok(CompactWrite {
            files: w.files,
            transforms: w.transforms,
            storage,
            staged_peak_bytes: w.staged_peak_bytes,
        })
    }
}

/// Every rank's offer (`gathered[r]`, from the plan gather), decoded on up
/// to as many threads as the machine has cores (at most 8), each message
/// freed once decoded, names and shapes shared within each thread
/// (`plan::intern`). The first failing rank's error, in rank order.
pub(crate) fn decode_offers(
    gathered: Vec<bytes::Bytes>,
) -> std::result::Result<Vec<Offer<SavePlan>>, WireError> {
    let one = |r: usize, b: bytes::Bytes| {
        decode::<std::result::Result<Offer<SavePlan>, WireError>>(&b)
            .map_err(|e| e.with_rank(r).to_wire())
            .and_then(|x| x)
    };
    let n = gathered.len();
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(8)
        .min(n / 64)
        .max(1);
    if threads == 1 {
        return crate::plan::intern::sharing(|| {
            gathered
                .into_iter()
                .enumerate()
                .map(|(r, b)| one(r, b))
                .collect()
        });
    }
    let per = n.div_ceil(threads);
    let mut parts: Vec<Vec<bytes::Bytes>> = Vec::with_capacity(threads);
    let mut it = gathered.into_iter();
    for _ in 0..threads {
        parts.push(it.by_ref().take(per).collect());
    }
    let decoded: Vec<std::result::Result<Vec<Offer<SavePlan>>, WireError>> =
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .enumerate()
                .map(|(k, part)| {
                    s.spawn(move || {
                        crate::plan::intern::sharing(|| {
                            part.into_iter()
                                .enumerate()
                                .map(|(i, b)| one(k * per + i, b))
                                .collect()
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::plan("decoding a plan panicked").to_wire()))
                })
                .collect()
        });
    let mut out = Vec::with_capacity(n);
    for d in decoded {
        out.extend(d?);
    }
    Ok(out)
}

/// What the coordinator decided from the offers.
pub(crate) enum Decision {
    /// Every rank's plan is unchanged: reuse `entry`.
    Cached(CoordEntry),
    /// Some rank offered a digest the coordinator cannot confirm.
    Resend,
    /// Planned from full plans; `offered[r]`: rank r's assignment is its
    /// offer.
    Planned {
        global: Vec<SavePlan>,
        offered: Vec<bool>,
        pending: PendingCoord,
    },
}

/// The parts of a coordinator entry known at planning time.
pub(crate) struct PendingCoord {
    plan_id: u64,
    layouts: Vec<Digest>,
    replica_groups: Vec<ReplicaGroup>,
}

/// The coordinator's planning step, from every rank's offer: reuse the
/// cached plan when every digest matches (comparing replicated records'
/// checksums across holders), ask for full plans when some rank sent only
/// a digest that does not match, or plan with `planner`.
pub(crate) fn coordinate(
    cache: Option<&SavePlanCache>,
    planner: &dyn SavePlanner,
    offers: Vec<Offer<SavePlan>>,
) -> Result<Decision> {
    let n = offers.len();
    if offers.iter().any(|o| matches!(o, Offer::Same { .. })) {
        let entry = cache.and_then(|c| c.take_coord());
        let Some(entry) = entry else {
            return Ok(Decision::Resend);
        };
        let all_match = entry.world == n
            && offers.iter().enumerate().all(|(r, o)| match o {
                Offer::Same {
                    layout, plan_id, ..
                } => *plan_id == entry.plan_id && *layout == entry.layouts[r],
                Offer::Full { .. } => false,
            });
        if !all_match {
            return Ok(Decision::Resend);
        }
        let replicas = |r: u32| match &offers[r as usize] {
            Offer::Same { replicas, .. } => replicas.as_slice(),
            Offer::Full { .. } => &[],
        };
        for g in &entry.replica_groups {
            let (r0, k0) = g.holders[0];
            let first = replicas(r0).get(k0 as usize);
            for &(r, k) in &g.holders[1..] {
                let v = replicas(r).get(k as usize);
                if first.is_none() || v.is_none() {
                    return Ok(Decision::Resend);
                }
                if v != first {
                    return Err(Error::plan(format!(
                        "{}: replicated copies differ between rank {r0} and rank {r}",
                        g.name
                    )));
                }
            }
        }
        return Ok(Decision::Cached(entry));
    }
    let mut plans = Vec::with_capacity(n);
    let mut layouts = Vec::with_capacity(n);
    for o in offers {
        match o {
            Offer::Full { plan, layout } => {
                plans.push(plan);
                layouts.push(layout);
            }
            Offer::Same { .. } => unreachable!("checked above"),
        }
    }
    let replica_groups = match cache {
        Some(_) => replica_groups(&plans),
        None => Vec::new(),
    };
    let counts: Vec<usize> = plans.iter().map(|p| p.items.len()).collect();
    let global = planner.global_plan_owned(plans)?;
    if global.len() != n {
        return Err(Error::plan(
            "planner returned a plan per rank of the wrong count",
        ));
    }
    let in_order = planner.assigns_offered_order();
    let offered = global
        .iter()
        .zip(&counts)
        .map(|(g, &c)| in_order && g.items.len() == c)
        .collect();
    let pending = match cache {
        Some(_) => PendingCoord {
            plan_id: rand::random::<u64>(),
            layouts,
            replica_groups,
        },
        None => PendingCoord::unplanned(),
    };
    Ok(Decision::Planned {
        global,
        offered,
        pending,
    })
}

/// Holders of every record with a replica checksum offered by two ranks or more.
fn replica_groups(plans: &[SavePlan]) -> Vec<ReplicaGroup> {
    let mut groups: BTreeMap<(&str, &WriteIndex), Vec<(u32, u32)>> = BTreeMap::new();
    for (r, p) in plans.iter().enumerate() {
        let mut k = 0u32;
        for it in &p.items {
            if it.digest.is_some() {
                groups
                    .entry((&it.name, &it.index))
                    .or_default()
                    .push((r as u32, k));
                k += 1;
            }
        }
    }
    groups
        .into_iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|((name, _), holders)| ReplicaGroup {
            name: name.to_string(),
            holders,
        })
        .collect()
}

impl PendingCoord {
    /// The state of a save planned without a cache: nothing to confirm later.
    pub(crate) fn unplanned() -> PendingCoord {
        PendingCoord {
            plan_id: 0,
            layouts: Vec::new(),
            replica_groups: Vec::new(),
        }
    }

    /// The plan id ranks cache with their assignment.
    pub(crate) fn plan_id(&self) -> u64 {
        self.plan_id
    }

    /// The full entry, once the metadata of the planned save is built,
    /// with where every assigned record sits in it.
    pub(crate) fn complete(self, slots: Slots, md: Arc<Metadata>) -> CoordEntry {
        CoordEntry {
            world: slots.start.len() - 1,
            plan_id: self.plan_id,
            layouts: self.layouts,
            replica_groups: self.replica_groups,
            slot_start: slots.start,
            slots: slots.slots,
            skeleton: md,
        }
    }
}

impl CoordEntry {
    /// The skeleton, taken out of the entry (left empty): moved when
    /// nothing else holds it, else copied.
    pub(crate) fn take_skeleton(&mut self) -> Metadata {
        Arc::unwrap_or_clone(std::mem::replace(
            &mut self.skeleton,
            Arc::new(empty_metadata()),
        ))
    }

    /// The metadata of a cached save: the skeleton (reused in place when
    /// nothing else holds it) with every record's storage from `writes`
    /// (in rank order), files and transforms as
    /// [`assemble_metadata`](crate::assemble_metadata) orders them.
    pub(crate) fn fill(
        &mut self,
        save_id: &str,
        generation: u64,
        writes: impl ExactSizeIterator<Item = Result<CompactWrite>>,
        format: FormatKind,
        user: &BTreeMap<String, String>,
    ) -> Result<Arc<Metadata>> {
        if writes.len() != self.world {
            return Err(Error::plan(format!(
                "{} write results for {} ranks",
                writes.len(),
                self.world
            )));
        }
        let mut md = self.take_skeleton();
        md.files.clear();
        md.transforms.clear();
        // Each write result decoded (by `writes`) and added in turn: never
        // every decoded result at once.
        for (r, w) in writes.enumerate() {
            let want = self.slot_start[r + 1] - self.slot_start[r];
            let storage = place_write(&mut md.files, &mut md.transforms, r, w?, want)?;
            let slots = &self.slots[self.slot_start[r]..self.slot_start[r + 1]];
            for (&(i, j), st) in slots.iter().zip(storage) {
                let place = match md.items.get_mut(i as usize).map(|x| &mut x.1) {
                    Some(ItemMeta::Tensor { chunks, .. }) => {
                        chunks.get_mut(j as usize).map(|c| &mut c.storage)
                    }
                    Some(ItemMeta::Bytes { storage, .. }) if j == u32::MAX => Some(storage),
                    _ => None,
                };
                *place.ok_or_else(|| {
                    Error::plan("a record was assigned as a chunk and as a bytes item").with_rank(r)
                })? = st;
            }
        }
        md.save_id = save_id.to_string();
        md.generation = generation;
        md.format = format;
        md.user = user.clone();
        let md = Arc::new(md);
        self.skeleton = md.clone();
        Ok(md)
    }
}

/// Rank `r`'s write result `w` (of `want` assigned records) added to a
/// checkpoint's `files` and `transforms`: its records' storage, in
/// assignment order, with file and transform numbers of the whole
/// checkpoint. Refuses another count of records, and a file or transform
/// the result does not list.
pub(crate) fn place_write(
    files: &mut Vec<DataFile>,
    transforms: &mut Vec<String>,
    r: usize,
    w: CompactWrite,
    want: usize,
) -> Result<Vec<StorageInfo>> {
    if w.storage.len() != want {
        return Err(Error::plan(format!(
            "rank {r} reported {} records for {want} assigned",
            w.storage.len()
        ))
        .with_rank(r));
    }
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
    let nfiles = w.files.len() as u32;
    files.extend(w.files);
    let mut storage = w.storage;
    for st in &mut storage {
        if st.file >= nfiles {
            return Err(Error::corrupt("write result names an unknown file").with_rank(r));
        }
        st.file += base;
        for t in &mut st.transforms {
            t.descriptor = *remap.get(t.descriptor as usize).ok_or_else(|| {
                Error::corrupt("write result names an unknown transform").with_rank(r)
            })?;
        }
    }
    Ok(storage)
}

fn empty_metadata() -> Metadata {
    Metadata {
        save_id: String::new(),
        world_size: 0,
        format: FormatKind::Raw,
        files: Vec::new(),
        transforms: Default::default(),
        items: Vec::new(),
        user: BTreeMap::new(),
        generation: 0,
    }
}
