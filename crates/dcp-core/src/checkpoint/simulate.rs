//! The save and load protocols at scale, without storage or threads: a
//! driver plays every rank in turn and the coordinator does exactly the
//! work it does in a real save (decode every rank's plan, global planning,
//! encode the assignments, decode every write result, build and encode the
//! metadata), timing each phase. `dcp bench --workload scale` reports it.

use crate::checkpoint::save::assemble_metadata;
use crate::checkpoint::wire::{decode, encode, first_error, wire};
use crate::checkpoint::RankWrite;
use crate::error::{Result, WireError};
use crate::metadata::{DataFile, FormatKind, Metadata, StorageInfo};
use crate::model::{DestStateDict, StateDict};
use crate::plan::{
    DefaultLoadPlanner, DefaultSavePlanner, LoadPlanner, SavePlan, SavePlanner, WriteIndex,
};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the protocols cost, phase by phase.
#[derive(Clone, Debug, Default)]
pub struct ProtocolCost {
    /// Ranks simulated.
    pub ranks: usize,
    /// Saved records (chunks and bytes items) in the metadata.
    pub chunks: u64,
    /// The slowest rank's own work before the gather (local plan, encode).
    pub rank_plan: Duration,
    /// The coordinator: decode every plan, plan globally, encode the
    /// assignments.
    pub coordinator_plan: Duration,
    /// The slowest rank's work between the scatter and the second gather
    /// (decode its assignment, encode its write result).
    pub rank_results: Duration,
    /// The coordinator: decode every write result, build and encode the
    /// metadata.
    pub coordinator_metadata: Duration,
    /// Bytes the coordinator receives in the plan gather.
    pub plan_gather_bytes: u64,
    /// Bytes the coordinator sends in the scatter of assignments.
    pub scatter_bytes: u64,
    /// Bytes the coordinator receives in the write-result gather.
    pub result_gather_bytes: u64,
    /// Bytes of the encoded `.metadata`.
    pub metadata_bytes: u64,
    /// Bytes of metadata each loading rank receives (the broadcast).
    pub metadata_bytes_per_rank: u64,
    /// One rank's load: decode the metadata and plan its reads.
    pub load_plan: Duration,
    /// The metadata built.
    pub metadata: Option<Metadata>,
}

impl ProtocolCost {
    /// The save protocol through the encoded metadata, as a job sees it:
    /// the slowest rank's work in each rank phase plus the coordinator's.
    pub fn save_plan(&self) -> Duration {
        self.rank_plan + self.coordinator_plan + self.rank_results + self.coordinator_metadata
    }
}

/// Run the save protocol's planning and metadata phases for `ranks` ranks
/// whose state dicts `state_dict_of(rank)` builds (each is dropped once
/// its plan is made), then one load's planning: decode the metadata and
/// plan `load_dest` against it. Every rank writes its assignment into one
/// data file of consecutive records. Refuses what a real save refuses (the
/// planners' errors).
pub fn simulate_protocol(
    ranks: usize,
    state_dict_of: impl Fn(usize) -> Result<StateDict>,
    load_dest: impl FnOnce(&Metadata) -> Result<DestStateDict>,
) -> Result<ProtocolCost> {
    let planner = DefaultSavePlanner::default();
    let mut cost = ProtocolCost {
        ranks,
        ..ProtocolCost::default()
    };

    // 1. Every rank's plan, encoded as the gather carries it.
    let mut gathered: Vec<Bytes> = Vec::with_capacity(ranks);
    for rank in 0..ranks {
        let sd = state_dict_of(rank)?;
        let t = Instant::now();
        let msg = encode(&wire(planner.local_plan(&sd, rank), rank))?;
        cost.rank_plan = cost.rank_plan.max(t.elapsed());
        drop(sd);
        cost.plan_gather_bytes += msg.len() as u64;
        gathered.push(msg);
    }

    // 2. The coordinator plans and encodes the assignments.
    let save_id = "5ca1e5ca1e5ca1e5".to_string();
    let t = Instant::now();
    let plans: Vec<SavePlan> = first_error(
        gathered
            .iter()
            .map(|b| decode::<std::result::Result<SavePlan, WireError>>(b).map_err(|e| e.to_wire()))
            .map(|r| r.and_then(|x| x))
            .collect(),
    )
    .map_err(crate::Error::from_wire)?;
    drop(gathered);
    let global = planner.global_plan(&plans)?;
    drop(plans);
    let assignments: Vec<Bytes> = global
        .iter()
        .map(|p| encode(&Ok::<_, WireError>((save_id.clone(), p.clone()))))
        .collect::<Result<_>>()?;
    cost.coordinator_plan = t.elapsed();
    cost.scatter_bytes = assignments.iter().map(|b| b.len() as u64).sum();

    // 3. Each rank decodes its assignment and reports what it wrote.
    let mut results: Vec<Bytes> = Vec::with_capacity(ranks);
    for (rank, msg) in assignments.iter().enumerate() {
        let t = Instant::now();
        let (_id, plan) = decode::<std::result::Result<(String, SavePlan), WireError>>(msg)?
            .map_err(crate::Error::from_wire)?;
        let mut offset = 0u64;
        let records = plan
            .items
            .into_iter()
            .map(|it| {
                let storage = StorageInfo {
                    file: 0,
                    offset,
                    length: it.nbytes,
                    transforms: Vec::new(),
                };
                offset += it.nbytes;
                (it.name, it.index, storage)
            })
            .collect::<Vec<(String, WriteIndex, StorageInfo)>>();
        let rw = RankWrite {
            files: vec![DataFile {
                name: format!("__{rank}_0-{save_id}.dcp"),
                length: offset,
            }],
            transforms: Vec::new(),
            records,
            staged_peak_bytes: 0,
        };
        let msg = encode(&Ok::<_, WireError>(rw))?;
        cost.rank_results = cost.rank_results.max(t.elapsed());
        cost.result_gather_bytes += msg.len() as u64;
        results.push(msg);
    }
    drop(assignments);

    // 4. The coordinator builds and encodes the metadata.
    let t = Instant::now();
    let writes: Vec<RankWrite> = first_error(
        results
            .iter()
            .map(|b| {
                decode::<std::result::Result<RankWrite, WireError>>(b).map_err(|e| e.to_wire())
            })
            .map(|r| r.and_then(|x| x))
            .collect(),
    )
    .map_err(crate::Error::from_wire)?;
    drop(results);
    let md = assemble_metadata(
        &save_id,
        1,
        &global,
        writes,
        FormatKind::Raw,
        &BTreeMap::new(),
    )?;
    let encoded = md.encode()?;
    cost.coordinator_metadata = t.elapsed();
    drop(global);
    cost.metadata_bytes = encoded.len() as u64;
    cost.metadata_bytes_per_rank = encoded.len() as u64;
    cost.chunks = md
        .items
        .iter()
        .map(|(_, i)| match i {
            crate::metadata::ItemMeta::Tensor { chunks, .. } => chunks.len() as u64,
            crate::metadata::ItemMeta::Bytes { .. } => 1,
        })
        .sum();

    // 5. One rank's load: the broadcast metadata decoded, its reads planned.
    let dest = load_dest(&md)?;
    let t = Instant::now();
    let received = Metadata::decode(&encoded)?;
    DefaultLoadPlanner::default().plan(&received, &dest)?;
    cost.load_plan = t.elapsed();
    cost.metadata = Some(md);
    Ok(cost)
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
}
