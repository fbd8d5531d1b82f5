//! The state dicts `dcp bench` saves and loads, and how they are split.
//!
//! Every byte is a pure function of `(seed, item name, global element
//! index)` (the demo model's [`model::fill_bf16`], applied to wider dtypes
//! as bf16 pairs), so any chunk of any split can be generated or checked
//! alone.

use crate::model::{self, ItemKind, ModelSpec, Sharding};
use bytes::Bytes;
use clap::ValueEnum;
use dcp_core::{ChunkBox, DType, DestChunk, DestStateDict, StateDict, TensorChunk};
use std::collections::BTreeMap;

/// Which state dict to benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// The demo's LLM-shaped bf16 model (few large tensors).
    Llm,
    /// Many small tensors (planning and metadata overhead).
    ManySmall,
    /// fp32 weights plus two fp32 moments per weight, more ranks.
    Optimizer,
    /// The save and load protocols at many simulated ranks (no storage):
    /// `--ranks R --chunks-per-rank C`.
    Scale,
}

impl WorkloadKind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Llm => "llm",
            WorkloadKind::ManySmall => "many-small",
            WorkloadKind::Optimizer => "optimizer",
            WorkloadKind::Scale => "scale",
        }
    }
}

/// How an item is split across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Like the demo model: a band of rows or columns per rank, or whole on
    /// every rank.
    Split(Sharding),
    /// Whole on one rank: the given ordinal modulo the number of ranks.
    Owned(usize),
}

impl Layout {
    /// The layout of a resharded load: rows become columns and columns rows;
    /// items owned whole by one rank are split by columns.
    pub fn resharded(self) -> Layout {
        match self {
            Layout::Split(s) => Layout::Split(s.transposed()),
            Layout::Owned(_) => Layout::Split(Sharding::Columns),
        }
    }

    /// The box rank `rank` of `n` holds, if any.
    pub fn region(self, shape: &[u64], rank: usize, n: usize) -> Option<ChunkBox> {
        match self {
            Layout::Split(s) => model::shard(shape, s, rank, n),
            Layout::Owned(i) => (i % n == rank).then(|| ChunkBox::full(shape)),
        }
    }

    /// Whether a rank without a chunk still lists the item (with no chunks),
    /// as a sharded training job does; an owned item is known to its owner
    /// only.
    fn listed_everywhere(self) -> bool {
        matches!(self, Layout::Split(_))
    }
}

/// What an item holds.
#[derive(Clone, Debug)]
pub enum Content {
    /// A tensor.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Global shape.
        shape: Vec<u64>,
    },
    /// Opaque bytes, replicated on every rank.
    Bytes(Bytes),
}

/// One item of a workload.
#[derive(Clone, Debug)]
pub struct ItemDef {
    /// Fully qualified name.
    pub name: String,
    /// Tensor or bytes.
    pub content: Content,
    /// Split at save time (loads use it or [`Layout::resharded`]).
    pub layout: Layout,
}

/// A state dict to benchmark.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Which one.
    pub kind: WorkloadKind,
    /// Every item.
    pub items: Vec<ItemDef>,
    /// Seed of every value.
    pub seed: u64,
}

/// Tensors of the many-small workload by default.
pub const DEFAULT_SMALL_ITEMS: u64 = 100_000;

impl Workload {
    /// The LLM workload: the demo model's items and sharding.
    pub fn llm(spec: &ModelSpec) -> Workload {
        let items = spec
            .items()
            .into_iter()
            .map(|it| ItemDef {
                content: match it.kind {
                    ItemKind::Tensor { dtype, shape } => Content::Tensor { dtype, shape },
                    ItemKind::Bytes => Content::Bytes(Bytes::from(spec.dataloader_state())),
                },
                name: it.name,
                layout: Layout::Split(it.save),
            })
            .collect();
        Workload {
            kind: WorkloadKind::Llm,
            items,
            seed: spec.seed,
        }
    }

    /// The optimizer workload: every bf16 weight of the model becomes an
    /// fp32 weight plus two fp32 moments (`exp_avg`, `exp_avg_sq`) split the
    /// same way: three times the bytes of the fp32 weights.
    pub fn optimizer(spec: &ModelSpec) -> Workload {
        let mut items = Vec::new();
        for it in Workload::llm(spec).items {
            match &it.content {
                Content::Tensor { dtype, shape } if *dtype == DType::BF16 => {
                    for name in [
                        it.name.clone(),
                        format!("optim.exp_avg.{}", it.name),
                        format!("optim.exp_avg_sq.{}", it.name),
                    ] {
                        items.push(ItemDef {
                            name,
                            content: Content::Tensor {
                                dtype: DType::F32,
                                shape: shape.clone(),
                            },
                            layout: it.layout,
                        });
                    }
                }
                _ => items.push(it),
            }
        }
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Workload {
            kind: WorkloadKind::Optimizer,
            items,
            seed: spec.seed,
        }
    }

    /// The many-small workload: `count` fp32 tensors `[rows, 64]` of 1, 2,
    /// 4, 8 and 16 KiB in turn, each held whole by one rank (round robin).
    pub fn many_small(count: u64, seed: u64) -> Workload {
        let items = (0..count as usize)
            .map(|i| ItemDef {
                name: format!("small.{i:07}"),
                content: Content::Tensor {
                    dtype: DType::F32,
                    shape: vec![4u64 << (i % 5), 64],
                },
                layout: Layout::Owned(i),
            })
            .collect();
        Workload {
            kind: WorkloadKind::ManySmall,
            items,
            seed,
        }
    }

    /// Logical bytes of the whole state dict (each saved byte once).
    pub fn total_bytes(&self) -> u64 {
        self.items
            .iter()
            .map(|it| match &it.content {
                Content::Tensor { dtype, shape } => {
                    shape.iter().product::<u64>() * dtype.size() as u64
                }
                Content::Bytes(b) => b.len() as u64,
            })
            .sum()
    }

    /// The bytes of `region` of tensor `name`.
    pub fn chunk_bytes(
        &self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        region: &ChunkBox,
    ) -> Vec<u8> {
        let size = dtype.size();
        let mut out = vec![0u8; region.numel() as usize * size];
        let key = model::item_key(self.seed, name);
        if size % 2 == 0 {
            // An element of 2k bytes is k bf16 values along a last dimension
            // k times as long: the same bytes, row-major.
            let k = (size / 2) as u64;
            let (wide_shape, wide_region) = widen(shape, region, k);
            model::fill_bf16(key, &wide_shape, &wide_region, &mut out);
        } else {
            // One-byte elements: the low byte of each bf16 value.
            let n = region.numel() as usize;
            let mut tmp = vec![0u8; 2 * n];
            model::fill_bf16(key, shape, region, &mut tmp);
            for (o, p) in out.iter_mut().zip(tmp.chunks_exact(2)) {
                *o = p[0];
            }
        }
        out
    }

    /// Every rank's state dict for a save by `n` ranks, generated on all
    /// cores.
    pub fn state_dicts(&self, n: usize) -> dcp_core::Result<Vec<StateDict>> {
        self.rank_state_dicts(0..n, n)
    }

    /// The state dicts of ranks `ranks` (of `n`) only, in order: what the
    /// processes of an MPI job generate, each its own. Refuses nothing
    /// (ranks at or past `n` hold only the items listed everywhere).
    pub fn rank_state_dicts(
        &self,
        ranks: std::ops::Range<usize>,
        n: usize,
    ) -> dcp_core::Result<Vec<StateDict>> {
        let first = ranks.start;
        let count = ranks.len();
        let mut units = Vec::new();
        for rank in ranks {
            for (i, it) in self.items.iter().enumerate() {
                if let Content::Tensor { shape, .. } = &it.content {
                    if let Some(region) = it.layout.region(shape, rank, n) {
                        units.push((rank, i, region));
                    }
                }
            }
        }
        let data = model::par_map(units.len(), |u| {
            let (_, i, region) = &units[u];
            let it = &self.items[*i];
            let Content::Tensor { dtype, shape } = &it.content else {
                unreachable!("units hold tensors only")
            };
            Bytes::from(self.chunk_bytes(&it.name, *dtype, shape, region))
        });
        let mut held: Vec<BTreeMap<usize, Vec<TensorChunk>>> = vec![BTreeMap::new(); count];
        for ((rank, i, region), data) in units.into_iter().zip(data) {
            held[rank - first]
                .entry(i)
                .or_default()
                .push(TensorChunk::new(region, data));
        }
        held.into_iter()
            .map(|mut chunks| {
                let mut sd = StateDict::new();
                for (i, it) in self.items.iter().enumerate() {
                    match &it.content {
                        Content::Bytes(b) => sd.insert_bytes(&it.name, b.clone(), true)?,
                        Content::Tensor { dtype, shape } => {
                            let mine = chunks.remove(&i).unwrap_or_default();
                            if mine.is_empty() && !it.layout.listed_everywhere() {
                                continue;
                            }
                            sd.insert_tensor(
                                &it.name,
                                *dtype,
                                shape.clone(),
                                mine,
                                it.layout == Layout::Split(Sharding::Replicated),
                            )?;
                        }
                    }
                }
                Ok(sd)
            })
            .collect()
    }

    /// What rank `rank` of `n` loads, into buffers filled with
    /// [`model::POISON`] (resident before the timer starts, and a byte the
    /// load fails to fill cannot pass for data). `reshard` selects
    /// [`Layout::resharded`].
    pub fn dest(&self, rank: usize, n: usize, reshard: bool) -> dcp_core::Result<DestStateDict> {
        let mut dest = DestStateDict::new();
        for it in &self.items {
            let layout = if reshard {
                it.layout.resharded()
            } else {
                it.layout
            };
            match &it.content {
                Content::Bytes(_) => dest.want_bytes(&it.name)?,
                Content::Tensor { dtype, shape } => {
                    let region = layout.region(shape, rank, n);
                    if region.is_none() && !layout.listed_everywhere() {
                        continue;
                    }
                    let chunks = region
                        .into_iter()
                        .map(|region| {
                            let len = region.numel() as usize * dtype.size();
                            DestChunk::new(region, vec![model::POISON; len])
                        })
                        .collect();
                    dest.insert_tensor(&it.name, *dtype, shape.clone(), chunks)?;
                }
            }
        }
        Ok(dest)
    }

    /// Check everything the ranks loaded against the workload, on all
    /// cores; one line per differing chunk or missing item.
    pub fn check(&self, loaded: &[DestStateDict]) -> Vec<String> {
        let units: Vec<(usize, usize)> = (0..loaded.len())
            .flat_map(|r| (0..self.items.len()).map(move |i| (r, i)))
            .collect();
        model::par_map(units.len(), |u| {
            let (rank, i) = units[u];
            let it = &self.items[i];
            let dest = &loaded[rank];
            match &it.content {
                Content::Bytes(want) => match dest.bytes(&it.name) {
                    Some(b) if b == want.as_ref() => vec![],
                    Some(_) => vec![format!("rank {rank}: {}: bytes differ", it.name)],
                    None if dest.get(&it.name).is_none() => vec![],
                    None => vec![format!("rank {rank}: {}: not loaded", it.name)],
                },
                Content::Tensor { dtype, shape } => match dest.tensor(&it.name) {
                    None => vec![],
                    Some(t) => t
                        .chunks
                        .iter()
                        .filter(|c| c.data != self.chunk_bytes(&it.name, *dtype, shape, &c.region))
                        .map(|c| format!("rank {rank}: {} chunk ({}) differs", it.name, c.region))
                        .collect(),
                },
            }
        })
        .into_iter()
        .flatten()
        .collect()
    }
}

/// `shape` and `region` with the last dimension `k` times as long (a scalar
/// becomes a vector of `k`).
fn widen(shape: &[u64], region: &ChunkBox, k: u64) -> (Vec<u64>, ChunkBox) {
    if shape.is_empty() {
        return (vec![k], ChunkBox::full(&[k]));
    }
    let mut s = shape.to_vec();
    let mut r = region.clone();
    let last = s.len() - 1;
    s[last] *= k;
    r.offsets[last] *= k;
    r.sizes[last] *= k;
    (s, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            layers: 1,
            hidden: 8,
            vocab: 12,
            seed: 3,
        }
    }

    #[test]
    fn wide_values_do_not_depend_on_the_split() {
        let w = Workload::optimizer(&spec());
        let shape = [12u64, 8];
        let full = w.chunk_bytes("x", DType::F32, &shape, &ChunkBox::full(&shape));
        let part = ChunkBox::new(vec![2, 3], vec![4, 2]).unwrap();
        let got = w.chunk_bytes("x", DType::F32, &shape, &part);
        let mut k = 0;
        for i in 2..6 {
            for j in 3..5 {
                let g = 4 * (i * 8 + j);
                assert_eq!(got[k..k + 4], full[g..g + 4]);
                k += 4;
            }
        }
        let step = w.chunk_bytes(model::STEP, DType::I64, &[], &ChunkBox::full(&[]));
        assert_eq!(step.len(), 8);
    }

    /// What one MPI process generates for itself is what the all-ranks
    /// generator gives that rank, chunk for chunk and byte for byte.
    #[test]
    fn one_rank_state_dict_equals_its_share_of_all() {
        for w in [Workload::llm(&spec()), Workload::many_small(11, 0)] {
            let all = w.state_dicts(3).unwrap();
            for (rank, want) in all.iter().enumerate() {
                let got = w.rank_state_dicts(rank..rank + 1, 3).unwrap();
                assert_eq!(got.len(), 1);
                type Flat = Vec<(String, Vec<(ChunkBox, Vec<u8>)>)>;
                let flat = |sd: &StateDict| -> Flat {
                    sd.iter()
                        .map(|(name, item)| {
                            let chunks = match item {
                                dcp_core::Item::Tensor(t) => t
                                    .chunks
                                    .iter()
                                    .map(|c| (c.region.clone(), c.data.host().unwrap().to_vec()))
                                    .collect(),
                                dcp_core::Item::Bytes { data, .. } => {
                                    vec![(ChunkBox::full(&[]), data.to_vec())]
                                }
                            };
                            (name.clone(), chunks)
                        })
                        .collect()
                };
                assert_eq!(flat(&got[0]), flat(want), "{:?} rank {rank}", w.kind);
            }
        }
    }

    #[test]
    fn every_workload_round_trips_through_its_layouts() {
        for w in [
            Workload::llm(&spec()),
            Workload::optimizer(&spec()),
            Workload::many_small(11, 0),
        ] {
            let sds = w.state_dicts(3).unwrap();
            let held: u64 = sds.iter().map(|s| s.local_bytes()).sum();
            assert!(held >= w.total_bytes(), "{:?}", w.kind);
            for reshard in [false, true] {
                let dests: Vec<_> = (0..2).map(|r| w.dest(r, 2, reshard).unwrap()).collect();
                // Unfilled destinations hold POISON: every tensor chunk differs.
                assert!(!w.check(&dests).is_empty(), "{:?}", w.kind);
            }
        }
        assert!(
            Workload::optimizer(&spec()).total_bytes() > 5 * Workload::llm(&spec()).total_bytes()
        );
        assert_eq!(
            Workload::many_small(5, 0).total_bytes(),
            (1 + 2 + 4 + 8 + 16) * 1024
        );
    }
}
