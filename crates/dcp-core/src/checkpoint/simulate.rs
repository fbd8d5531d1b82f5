//! The save and load protocols at scale, without storage or threads: a
//! driver plays every rank in turn and the coordinator does exactly the
//! work it does in a real save (decode every rank's plan, global planning,
//! encode the assignments, decode every write result, build and encode the
//! metadata), timing each phase. `dcp bench --workload scale` reports it.

use crate::checkpoint::assemble::build;
use crate::checkpoint::plan_cache::{
    coordinate, decode_offers, layout_digest, replica_digests, Assign, CompactWrite, Decision,
    Digest, Offer, SavePlanCache,
};
use crate::checkpoint::wire::{decode, encode, first_error, wire};
use crate::checkpoint::RankWrite;
use crate::error::{Error, Result, WireError};
use crate::metadata::sections::{index_len, MetadataIndex};
use crate::metadata::{DataFile, FormatKind, Metadata, StorageInfo, Transforms};
use crate::model::{DestStateDict, StateDict};
use crate::plan::{DefaultLoadPlanner, DefaultSavePlanner, LoadPlanner, SavePlan, SavePlanner};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the protocols cost, phase by phase.
#[derive(Clone, Debug, Default)]
pub struct ProtocolCost {
    /// Ranks simulated.
    pub ranks: usize,
    /// Saved records (chunks and bytes items) in the metadata.
    pub chunks: u64,
    /// The slowest rank's own work before the gather (local plan, its
    /// digest, encode).
    pub rank_plan: Duration,
    /// The coordinator: decode every plan, plan globally, encode the
    /// assignments.
    pub coordinator_plan: Duration,
    /// The slowest rank's work between the scatter and the second gather
    /// (decode its assignment, encode its write result).
    pub rank_results: Duration,
    /// The coordinator: decode every write result, build and encode the
    /// metadata (noting where each record lands, for the plan cache).
    pub coordinator_metadata: Duration,
    /// Bytes the coordinator receives in the plan gather.
    pub plan_gather_bytes: u64,
    /// Bytes the coordinator sends in the scatter of assignments.
    pub scatter_bytes: u64,
    /// Bytes the coordinator receives in the write-result gather.
    pub result_gather_bytes: u64,
    /// Bytes of the encoded `.metadata`.
    pub metadata_bytes: u64,
    /// Bytes of metadata the simulated loading rank receives: the whole
    /// `.metadata` when it is one body; of sectioned metadata, the header
    /// and index (broadcast) and the ranges of the sections its destination
    /// overlaps (read from storage).
    pub metadata_bytes_per_rank: u64,
    /// One rank's load: decode the metadata and plan its reads.
    pub load_plan: Duration,
    /// A second save of the same layout (new data), with the plan cached:
    /// the slowest rank's local plan, digest and offer.
    pub cached_rank_plan: Duration,
    /// The cached save's coordinator planning: decode every rank's digest
    /// offer, confirm it, encode the assignments (reuse the plan).
    pub cached_coordinator_plan: Duration,
    /// The cached save's coordinator metadata: decode every compact write
    /// result, fill the metadata skeleton, encode it.
    pub cached_coordinator_metadata: Duration,
    /// Bytes the coordinator receives in the cached save's plan gather.
    pub cached_plan_gather_bytes: u64,
    /// Bytes the coordinator sends in the cached save's scatter.
    pub cached_scatter_bytes: u64,
    /// Bytes the coordinator receives in the cached save's result gather.
    pub cached_result_gather_bytes: u64,
    /// The metadata built (by the cached save, when it ran).
    pub metadata: Option<Metadata>,
}

impl ProtocolCost {
    /// The save protocol through the encoded metadata, as a job sees it:
    /// the slowest rank's work in each rank phase plus the coordinator's
    /// (noting where each record lands, for the plan cache, included).
    pub fn save_plan(&self) -> Duration {
        self.rank_plan + self.coordinator_plan + self.rank_results + self.coordinator_metadata
    }

    /// The cached save's coordination: the coordinator's planning alone
    /// (decode and confirm every digest, encode the assignments).
    pub fn cached_save_plan(&self) -> Duration {
        self.cached_coordinator_plan
    }
}

/// The save's id in the simulation.
const SAVE_ID: &str = "5ca1e5ca1e5ca1e5";

/// Run the save protocol's planning and metadata phases for `ranks` ranks
/// whose state dicts `state_dict_of(rank)` builds (each is dropped once
/// its plan is made), then one load's planning: decode the metadata and
/// plan `load_dest` against it. With `cached_save`, then a second save of
/// the same state dicts through a [`SavePlanCache`]: digests instead of
/// plans, the cached assignments, compact write results and the metadata
/// skeleton filled. Every rank writes its assignment into one data file of
/// consecutive records. Refuses what a real save refuses (the planners'
/// errors).
pub fn simulate_protocol(
    ranks: usize,
    state_dict_of: impl Fn(usize) -> Result<StateDict>,
    load_dest: impl FnOnce(&Metadata) -> Result<DestStateDict>,
) -> Result<ProtocolCost> {
    simulate_protocol_with(ranks, state_dict_of, load_dest, false)
}

/// [`simulate_protocol`], with the cached second save when `cached_save`.
pub fn simulate_protocol_with(
    ranks: usize,
    state_dict_of: impl Fn(usize) -> Result<StateDict>,
    load_dest: impl FnOnce(&Metadata) -> Result<DestStateDict>,
    cached_save: bool,
) -> Result<ProtocolCost> {
    let planner = DefaultSavePlanner::default();
    let cache = SavePlanCache::new();
    let mut cost = ProtocolCost {
        ranks,
        ..ProtocolCost::default()
    };

    // 1. Every rank's plan, encoded as the gather carries it.
    let mut gathered: Vec<Bytes> = Vec::with_capacity(ranks);
    let mut layouts: Vec<Digest> = Vec::with_capacity(ranks);
    for rank in 0..ranks {
        let sd = state_dict_of(rank)?;
        let t = Instant::now();
        let plan = planner.local_plan(&sd, rank);
        let layout = plan.as_ref().map(layout_digest).unwrap_or_default();
        let offer = plan.map(|p| Offer::Full { plan: p, layout });
        let msg = encode(&wire(offer, rank))?;
        cost.rank_plan = cost.rank_plan.max(t.elapsed());
        drop(sd);
        cost.plan_gather_bytes += msg.len() as u64;
        gathered.push(msg);
        layouts.push(layout);
    }

    // 2. The coordinator plans and encodes the assignments.
    let t = Instant::now();
    let offers = decode_offers(gathered).map_err(Error::from_wire)?;
    let Decision::Planned {
        global,
        offered,
        pending,
    } = coordinate(Some(&cache), &planner, offers)?
    else {
        return Err(Error::plan("full plans were not planned"));
    };
    let plan_id = pending.plan_id();
    let same = encode(&Ok::<_, WireError>((
        SAVE_ID,
        Assign::<SavePlan>::Offered { plan_id },
    )))?;
    let assignments: Vec<Bytes> = global
        .iter()
        .zip(offered)
        .map(|(p, offered)| match offered {
            true => Ok(same.clone()),
            false => encode(&Ok::<_, WireError>((
                SAVE_ID,
                Assign::Plan { plan: p, plan_id },
            ))),
        })
        .collect::<Result<_>>()?;
    cost.coordinator_plan = t.elapsed();
    cost.scatter_bytes = assignments.iter().map(|b| b.len() as u64).sum();

    // 3. Each rank decodes its assignment and reports what it wrote.
    let mut results: Vec<Bytes> = Vec::with_capacity(ranks);
    // Each rank's record lengths, in assignment order (what it keeps).
    let mut lengths: Vec<Vec<u64>> = Vec::with_capacity(ranks);
    for (rank, msg) in assignments.iter().enumerate() {
        let t = Instant::now();
        let (_id, assign) =
            decode::<std::result::Result<(String, Assign<SavePlan>), WireError>>(msg)?
                .map_err(Error::from_wire)?;
        let plan = match assign {
            Assign::Plan { plan, .. } => plan,
            // The rank's own offer, which it keeps.
            Assign::Offered { .. } => planner.local_plan(&state_dict_of(rank)?, rank)?,
            _ => return Err(Error::plan("no assignment")),
        };
        let cw = CompactWrite::from_write(rank_write(rank, &plan), &plan)?;
        let msg = encode(&Ok::<_, WireError>(cw))?;
        cost.rank_results = cost.rank_results.max(t.elapsed());
        cost.result_gather_bytes += msg.len() as u64;
        results.push(msg);
        lengths.push(plan.items.iter().map(|i| i.nbytes).collect());
    }
    drop(assignments);

    // 4. The coordinator builds and encodes the metadata.
    let t = Instant::now();
    // The metadata from the assignments (freed rank by rank) and the
    // write results, each decoded as it is added, as the coordinator of a
    // save does.
    let (md, slots) = build(
        global,
        results.into_iter().map(|b| decode_write(&b)),
        SAVE_ID,
        1,
        FormatKind::Raw,
        &BTreeMap::new(),
    )?;
    let md = Arc::new(md);
    let entry = pending.complete(slots, md.clone());
    let encoded = md.encode()?;
    cost.coordinator_metadata = t.elapsed();
    cache.set_coord(entry, false);
    cost.metadata_bytes = encoded.len() as u64;
    cost.chunks = md
        .items
        .iter()
        .map(|(_, i)| match i {
            crate::metadata::ItemMeta::Tensor { chunks, .. } => chunks.len() as u64,
            crate::metadata::ItemMeta::Bytes { .. } => 1,
        })
        .sum();

    // 5. One rank's load: the broadcast metadata (of sectioned metadata,
    // the index, then the sections its destination overlaps, read by
    // ranges) decoded, its reads planned.
    let dest = load_dest(&md)?;
    let t = Instant::now();
    let (received, received_bytes) = receive_metadata(&encoded, &dest)?;
    DefaultLoadPlanner::default().plan(&received, &dest)?;
    cost.load_plan = t.elapsed();
    cost.metadata_bytes_per_rank = received_bytes;
    drop((received, encoded, dest));
    drop(md);

    if cached_save {
        cached(
            &mut cost,
            &cache,
            &planner,
            state_dict_of,
            &layouts,
            plan_id,
            &lengths,
        )?;
    } else {
        let mut entry = cache.take_coord().expect("cached above");
        cost.metadata = Some(entry.take_skeleton());
    }
    Ok(cost)
}

/// A second save of the same layout: every rank offers its digest, the
/// coordinator confirms them and reuses the plan, every rank reports its
/// records' storage in assignment order, the coordinator fills the skeleton.
fn cached(
    cost: &mut ProtocolCost,
    cache: &SavePlanCache,
    planner: &DefaultSavePlanner,
    state_dict_of: impl Fn(usize) -> Result<StateDict>,
    layouts: &[Digest],
    plan_id: u64,
    lengths: &[Vec<u64>],
) -> Result<()> {
    let ranks = layouts.len();
    let mut gathered: Vec<Bytes> = Vec::with_capacity(ranks);
    for (rank, cached_layout) in layouts.iter().enumerate() {
        let sd = state_dict_of(rank)?;
        let t = Instant::now();
        let plan = planner.local_plan(&sd, rank)?;
        if layout_digest(&plan) != *cached_layout {
            return Err(Error::plan(format!("rank {rank}: the layout changed")));
        }
        let offer: Offer<SavePlan> = Offer::Same {
            layout: *cached_layout,
            plan_id,
            replicas: replica_digests(&plan),
        };
        let msg = encode(&Ok::<_, WireError>(offer))?;
        cost.cached_rank_plan = cost.cached_rank_plan.max(t.elapsed());
        cost.cached_plan_gather_bytes += msg.len() as u64;
        gathered.push(msg);
    }

    let t = Instant::now();
    let offers: Vec<Offer<SavePlan>> = first_error(
        gathered
            .iter()
            .map(|b| {
                decode::<std::result::Result<Offer<SavePlan>, WireError>>(b)
                    .map_err(|e| e.to_wire())
            })
            .map(|r| r.and_then(|x| x))
            .collect(),
    )
    .map_err(Error::from_wire)?;
    let Decision::Cached(mut entry) = coordinate(Some(cache), planner, offers)? else {
        return Err(Error::plan(
            "an unchanged layout was not served from the cache",
        ));
    };
    let assignments: Vec<Bytes> = (0..ranks)
        .map(|_| encode(&Ok::<_, WireError>((SAVE_ID, Assign::<SavePlan>::Cached))))
        .collect::<Result<_>>()?;
    cost.cached_coordinator_plan = t.elapsed();
    cost.cached_scatter_bytes = assignments.iter().map(|b| b.len() as u64).sum();

    let mut results: Vec<Bytes> = Vec::with_capacity(ranks);
    for (rank, msg) in assignments.iter().enumerate() {
        let (_id, assign) =
            decode::<std::result::Result<(String, Assign<SavePlan>), WireError>>(msg)?
                .map_err(Error::from_wire)?;
        if !matches!(assign, Assign::Cached) {
            return Err(Error::plan("not a cached assignment"));
        }
        let mut offset = 0u64;
        let storage = lengths[rank]
            .iter()
            .map(|&n| {
                let s = StorageInfo {
                    file: 0,
                    offset,
                    length: n,
                    transforms: Transforms::new(),
                };
                offset += n;
                s
            })
            .collect();
        let cw = CompactWrite {
            files: vec![DataFile {
                name: format!("__{rank}_0-{SAVE_ID}.dcp"),
                length: offset,
            }],
            transforms: Vec::new(),
            storage,
            staged_peak_bytes: 0,
        };
        let msg = encode(&Ok::<_, WireError>(cw))?;
        cost.cached_result_gather_bytes += msg.len() as u64;
        results.push(msg);
    }

    let t = Instant::now();
    let md = entry.fill(
        SAVE_ID,
        2,
        results.into_iter().map(|b| decode_write(&b)),
        FormatKind::Raw,
        &BTreeMap::new(),
    )?;
    md.encode()?;
    cost.cached_coordinator_metadata = t.elapsed();
    drop(md);
    cost.metadata = Some(entry.take_skeleton());
    Ok(())
}

/// What a loading rank whose destination is `dest` receives of `encoded`,
/// decoded, and how many bytes: the whole of one body; the header and
/// index of sectioned metadata and the byte ranges of the sections `dest`
/// overlaps, as a load reads them.
pub fn receive_metadata(encoded: &[u8], dest: &DestStateDict) -> Result<(Metadata, u64)> {
    let Some(n) = index_len(encoded)? else {
        return Ok((Metadata::decode(encoded)?, encoded.len() as u64));
    };
    let n = (n as usize).min(encoded.len());
    let idx = MetadataIndex::decode(&encoded[..n])?;
    let ids = idx.sections_for(dest);
    let ranges = idx.ranges(&ids);
    let mut bytes = n as u64;
    // Copied, as a read from storage would.
    let bufs: Vec<Vec<u8>> = ranges
        .iter()
        .map(|&(o, l)| {
            let from = (o as usize).min(encoded.len());
            let to = (o.saturating_add(l) as usize).min(encoded.len());
            bytes += (to - from) as u64;
            encoded[from..to].to_vec()
        })
        .collect();
    let fetched: Vec<(u64, &[u8])> = ranges
        .iter()
        .zip(&bufs)
        .map(|(&(o, _), b)| (o, b.as_slice()))
        .collect();
    Ok((idx.select(&ids, &fetched)?.metadata, bytes))
}

/// A write result as the coordinator decodes it.
fn decode_write(b: &[u8]) -> Result<CompactWrite> {
    decode::<std::result::Result<CompactWrite, WireError>>(b)?.map_err(Error::from_wire)
}

/// What `rank` reports after writing `plan` into one data file.
fn rank_write(rank: usize, plan: &SavePlan) -> RankWrite {
    let mut offset = 0u64;
    let records = plan
        .items
        .iter()
        .map(|it| {
            let storage = StorageInfo {
                file: 0,
                offset,
                length: it.nbytes,
                transforms: Transforms::new(),
            };
            offset += it.nbytes;
            (it.name.to_string(), it.index.clone(), storage)
        })
        .collect();
    RankWrite {
        files: vec![DataFile {
            name: format!("__{rank}_0-{SAVE_ID}.dcp"),
            length: offset,
        }],
        transforms: Vec::new(),
        records,
        staged_peak_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChunkBox, TensorChunk};
    use crate::DType;

    /// `tensors` tensors of shape [ranks, 4] u8; rank r holds row r of each.
    fn sd(rank: usize, ranks: usize, tensors: usize) -> Result<StateDict> {
        let mut sd = StateDict::new();
        for t in 0..tensors {
            let region = ChunkBox::new(vec![rank as u64, 0], vec![1, 4])?;
            sd.insert_tensor(
                format!("layers.{t}.w"),
                DType::U8,
                vec![ranks as u64, 4],
                vec![TensorChunk::new(region, vec![rank as u8; 4])],
                false,
            )?;
        }
        Ok(sd)
    }

    #[test]
    fn every_rank_chunk_lands_in_the_metadata_once() {
        let (ranks, tensors) = (16, 10);
        let cost = simulate_protocol(
            ranks,
            |r| sd(r, ranks, tensors),
            |md| {
                let mut d = DestStateDict::new();
                let (name, _) = &md.items[0];
                d.want_tensor(
                    name.clone(),
                    DType::U8,
                    vec![ranks as u64, 4],
                    vec![ChunkBox::new(vec![0, 0], vec![ranks as u64, 4])?],
                )?;
                Ok(d)
            },
        )
        .unwrap();
        assert_eq!(cost.chunks, (ranks * tensors) as u64);
        let md = cost.metadata.unwrap();
        assert_eq!(md.files.len(), ranks);
        assert_eq!(md.items.len(), tensors);
        assert!(cost.metadata_bytes > 0 && cost.plan_gather_bytes > 0);
    }

    #[test]
    fn a_cached_save_builds_the_metadata_of_a_planned_one() {
        let (ranks, tensors) = (16, 10);
        let dest = |_: &Metadata| Ok(DestStateDict::new());
        let planned = simulate_protocol(ranks, |r| sd(r, ranks, tensors), dest).unwrap();
        let cached = simulate_protocol_with(ranks, |r| sd(r, ranks, tensors), dest, true).unwrap();
        let (a, mut b) = (planned.metadata.unwrap(), cached.metadata.unwrap());
        assert_eq!(b.generation, 2);
        b.generation = 1;
        assert_eq!(a, b);
        // Digests instead of plans: far less than the plan gather.
        assert!(cached.cached_plan_gather_bytes * 5 < planned.plan_gather_bytes);
        // Both report storage without names, in assignment order; both
        // scatter a few bytes a rank (a cached plan, or "write what you
        // offered"), never the plans.
        assert_eq!(
            cached.cached_result_gather_bytes,
            planned.result_gather_bytes
        );
        assert!(planned.result_gather_bytes * 2 < planned.plan_gather_bytes);
        assert!(
            planned.scatter_bytes < 40 * ranks as u64,
            "{}",
            planned.scatter_bytes
        );
        assert!(cached.cached_scatter_bytes < 40 * ranks as u64);
    }
}
