//! The demo model: an LLM-shaped state dict whose every byte is a pure
//! function of `(seed, item name, global element index)`.
//!
//! Because no value depends on how the tensor is split, a chunk can be
//! generated (or checked) alone, by any rank of any world size: that is what
//! lets `dcp demo --load-only` verify a checkpoint saved by a different
//! number of ranks with a different sharding.

use bytes::Bytes;
use dcp_core::metadata::ItemMeta;
use dcp_core::placement::{DeviceMesh, Placement};
use dcp_core::{ChunkBox, DType, DestChunk, DestStateDict, Metadata, StateDict, TensorChunk};
use std::collections::BTreeMap;

/// Name of the optimizer step item (an `i64` scalar tensor, replicated).
pub const STEP: &str = "optim.step";
/// Name of the data-loader state item (JSON bytes, replicated).
pub const DATALOADER: &str = "dataloader.state";

/// User-metadata keys under which a demo save records how to regenerate it.
pub const KEY_SEED: &str = "dcp.demo.seed";
/// See [`KEY_SEED`].
pub const KEY_LAYERS: &str = "dcp.demo.layers";
/// See [`KEY_SEED`].
pub const KEY_HIDDEN: &str = "dcp.demo.hidden";
/// See [`KEY_SEED`].
pub const KEY_VOCAB: &str = "dcp.demo.vocab";

/// The dimensions and seed of a demo model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Transformer layers.
    pub layers: u64,
    /// Hidden size `H`.
    pub hidden: u64,
    /// Vocabulary size `V` (rows of `embed.weight`).
    pub vocab: u64,
    /// Seed of every value.
    pub seed: u64,
}

/// How an item is split across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Split along dimension 0: each rank holds a band of rows.
    Rows,
    /// Split along dimension 1: each rank holds a band of columns.
    Columns,
    /// Every rank holds the whole item.
    Replicated,
}

impl Sharding {
    /// The sharding used when loading an item saved with `self`: rows become
    /// columns and columns rows, so every load reshards.
    pub fn transposed(self) -> Sharding {
        match self {
            Sharding::Rows => Sharding::Columns,
            Sharding::Columns => Sharding::Rows,
            Sharding::Replicated => Sharding::Replicated,
        }
    }
}

/// What an item of the model is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// A tensor of `dtype` and global `shape`.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Global shape.
        shape: Vec<u64>,
    },
    /// Opaque bytes (replicated).
    Bytes,
}

/// One item of the model and how it is sharded when saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemSpec {
    /// Fully qualified name.
    pub name: String,
    /// Tensor or bytes.
    pub kind: ItemKind,
    /// Sharding at save time; loads use [`Sharding::transposed`].
    pub save: Sharding,
}

impl ModelSpec {
    /// The spec recorded in a checkpoint's user metadata by a demo save, if
    /// there is one. Fails on a malformed value.
    pub fn from_user_metadata(
        user: &BTreeMap<String, String>,
    ) -> Result<Option<ModelSpec>, String> {
        let get = |k: &str| -> Result<Option<u64>, String> {
            user.get(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("user metadata {k} = {v:?} is not an integer"))
                })
                .transpose()
        };
        match (
            get(KEY_SEED)?,
            get(KEY_LAYERS)?,
            get(KEY_HIDDEN)?,
            get(KEY_VOCAB)?,
        ) {
            (Some(seed), Some(layers), Some(hidden), Some(vocab)) => Ok(Some(ModelSpec {
                layers,
                hidden,
                vocab,
                seed,
            })),
            (None, None, None, None) => Ok(None),
            _ => Err("the checkpoint's demo user metadata is incomplete".into()),
        }
    }

    /// The user metadata a save records so that a load can regenerate it.
    pub fn user_metadata(&self) -> BTreeMap<String, String> {
        [
            (KEY_SEED, self.seed),
            (KEY_LAYERS, self.layers),
            (KEY_HIDDEN, self.hidden),
            (KEY_VOCAB, self.vocab),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Every item, in name order.
    pub fn items(&self) -> Vec<ItemSpec> {
        let (h, v) = (self.hidden, self.vocab);
        let bf16 = |shape: Vec<u64>| ItemKind::Tensor {
            dtype: DType::BF16,
            shape,
        };
        let mut out = vec![
            ItemSpec {
                name: DATALOADER.into(),
                kind: ItemKind::Bytes,
                save: Sharding::Replicated,
            },
            ItemSpec {
                name: "embed.weight".into(),
                kind: bf16(vec![v, h]),
                save: Sharding::Rows,
            },
            ItemSpec {
                name: STEP.into(),
                kind: ItemKind::Tensor {
                    dtype: DType::I64,
                    shape: vec![],
                },
                save: Sharding::Replicated,
            },
        ];
        for i in 0..self.layers {
            let p = format!("layers.{i}");
            for (suffix, shape, save) in [
                ("attn.q.weight", vec![h, h], Sharding::Rows),
                ("attn.k.weight", vec![h, h], Sharding::Rows),
                ("attn.v.weight", vec![h, h], Sharding::Rows),
                ("attn.o.weight", vec![h, h], Sharding::Columns),
                ("mlp.up.weight", vec![4 * h, h], Sharding::Rows),
                ("mlp.down.weight", vec![h, 4 * h], Sharding::Columns),
                ("attn_norm.weight", vec![h], Sharding::Replicated),
                ("mlp_norm.weight", vec![h], Sharding::Replicated),
            ] {
                out.push(ItemSpec {
                    name: format!("{p}.{suffix}"),
                    kind: bf16(shape),
                    save,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Logical bytes of the whole model.
    pub fn total_bytes(&self) -> u64 {
        self.items()
            .iter()
            .map(|it| match &it.kind {
                ItemKind::Tensor { dtype, shape } => {
                    shape.iter().product::<u64>() * dtype.size() as u64
                }
                ItemKind::Bytes => self.dataloader_state().len() as u64,
            })
            .sum()
    }

    /// The optimizer step: a function of the seed alone.
    pub fn step(&self) -> i64 {
        (splitmix64(self.seed ^ fnv1a(STEP)) % 1_000_000) as i64
    }

    /// The data-loader state: JSON bytes, a function of the seed alone.
    pub fn dataloader_state(&self) -> Vec<u8> {
        let h = splitmix64(self.seed ^ fnv1a(DATALOADER));
        serde_json::json!({
            "seed": self.seed,
            "epoch": h % 100,
            "sample": (h >> 8) % 10_000_000,
            "shuffle": true,
        })
        .to_string()
        .into_bytes()
    }

    /// Check that `md` holds exactly this model's items with their dtypes
    /// and shapes; the error names the first difference.
    pub fn check_matches(&self, md: &Metadata) -> Result<(), String> {
        let want = self.items();
        for it in &want {
            let Some(saved) = md.item(&it.name) else {
                return Err(format!("the checkpoint has no item {}", it.name));
            };
            match (&it.kind, saved) {
                (ItemKind::Bytes, ItemMeta::Bytes { .. }) => {}
                (
                    ItemKind::Tensor { dtype, shape },
                    ItemMeta::Tensor {
                        dtype: d, shape: s, ..
                    },
                ) => {
                    if dtype != d || shape[..] != s[..] {
                        return Err(format!(
                            "{}: the checkpoint holds {d} {s:?}, the model expects {dtype} {shape:?}",
                            it.name
                        ));
                    }
                }
                _ => return Err(format!("{}: saved as a different kind of item", it.name)),
            }
        }
        if let Some((extra, _)) = md
            .items
            .iter()
            .find(|(n, _)| want.binary_search_by(|w| w.name.as_str().cmp(n)).is_err())
        {
            return Err(format!(
                "the checkpoint has an item {extra} the model lacks"
            ));
        }
        Ok(())
    }
}

/// The box of a tensor of `shape` that rank `rank` of `n` holds under
/// `sharding` (torch DTensor's `Shard(dim)` or `Replicate` on a flat mesh of
/// `n` ranks, through [`dcp_core::placement`]), or `None` when the rank's
/// piece is empty. One-dimensional tensors sharded by columns are sharded by
/// rows; scalars are whole.
pub fn shard(shape: &[u64], sharding: Sharding, rank: usize, n: usize) -> Option<ChunkBox> {
    let placement = match sharding {
        Sharding::Replicated => Placement::Replicate,
        _ if shape.is_empty() => return Some(ChunkBox::full(shape)),
        Sharding::Rows => Placement::Shard(0),
        Sharding::Columns => Placement::Shard(usize::from(shape.len() > 1)),
    };
    DeviceMesh::flat(n)
        .and_then(|mesh| mesh.local_box(shape, &[placement], rank))
        .ok()
        .flatten()
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a name: the per-item part of every value's key.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The key of an item: all its values are `element(key, index)`.
pub fn item_key(seed: u64, name: &str) -> u64 {
    splitmix64(seed) ^ fnv1a(name)
}

/// The 64 random bits of the element at global (row-major) `index` of the
/// item with `key`: the one deterministic byte generator of dcp. The demo
/// shapes them into bf16 values ([`element`]); the test suites
/// (`dcp_testkit::data`) take their low bytes for any dtype. Stable: saved
/// checkpoints are verified against it, so it must never change.
#[inline]
pub fn element_bits(key: u64, index: u64) -> u64 {
    splitmix64(key ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// The bf16 bits of the element at global (row-major) `index` of the item
/// with `key`: a random sign and mantissa with an exponent between 2^-9 and
/// 2^-2, so every value is a finite, weight-like number.
#[inline]
pub fn element(key: u64, index: u64) -> u16 {
    let h = element_bits(key, index);
    let sign = (h >> 63) as u16;
    let exp = 118 + ((h >> 32) & 7) as u16;
    let mant = (h & 0x7F) as u16;
    (sign << 15) | (exp << 7) | mant
}

/// Fill `out` (bf16, little-endian) with the elements of `region` of a
/// tensor of `shape`, row by row. `out.len()` must be `2 * region.numel()`.
pub fn fill_bf16(key: u64, shape: &[u64], region: &ChunkBox, out: &mut [u8]) {
    for_each_row(shape, region, |row_start, byte_off, n| {
        let dst = &mut out[byte_off..byte_off + 2 * n];
        for (j, d) in dst.chunks_exact_mut(2).enumerate() {
            d.copy_from_slice(&element(key, row_start + j as u64).to_le_bytes());
        }
    });
}

/// Call `f(global index of the row's first element, byte offset in the
/// chunk, elements in the row)` for every innermost row of `region`, in
/// row-major order (2-byte elements).
fn for_each_row(shape: &[u64], region: &ChunkBox, mut f: impl FnMut(u64, usize, usize)) {
    if region.is_empty() {
        return;
    }
    let nd = shape.len();
    if nd == 0 {
        f(0, 0, 1);
        return;
    }
    let row = region.sizes[nd - 1] as usize;
    let mut strides = vec![1u64; nd];
    for d in (0..nd - 1).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let rows = region.numel() / row as u64;
    let mut idx = vec![0u64; nd - 1];
    for r in 0..rows {
        let start: u64 = (0..nd)
            .map(|d| {
                let i = if d < nd - 1 { idx[d] } else { 0 };
                (region.offsets[d] + i) * strides[d]
            })
            .sum();
        f(start, r as usize * row * 2, row);
        for d in (0..nd - 1).rev() {
            idx[d] += 1;
            if idx[d] < region.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Bytes of `region` of a tensor item of the model.
pub fn tensor_chunk(
    spec: &ModelSpec,
    name: &str,
    dtype: DType,
    shape: &[u64],
    region: &ChunkBox,
) -> Vec<u8> {
    if name == STEP {
        return spec.step().to_le_bytes().to_vec();
    }
    debug_assert_eq!(dtype, DType::BF16);
    let mut out = vec![0u8; region.numel() as usize * dtype.size()];
    fill_bf16(item_key(spec.seed, name), shape, region, &mut out);
    out
}

/// The destination rank `rank` of `n` loads: every item, resharded
/// ([`Sharding::transposed`]); replicated items whole on every rank.
///
/// Buffers are filled with [`POISON`] rather than left to the allocator's
/// lazily mapped zeros: like a training job's existing tensors they are
/// resident before the load starts (so the timed load measures I/O, not page
/// faults), and a byte the load fails to fill cannot pass for model data.
pub fn rank_dest(spec: &ModelSpec, rank: usize, n: usize) -> dcp_core::Result<DestStateDict> {
    let mut dest = DestStateDict::new();
    for it in spec.items() {
        match &it.kind {
            ItemKind::Bytes => dest.want_bytes(&it.name)?,
            ItemKind::Tensor { dtype, shape } => {
                let chunks = shard(shape, it.save.transposed(), rank, n)
                    .into_iter()
                    .map(|region| {
                        let len = region.numel() as usize * dtype.size();
                        DestChunk::new(region, vec![POISON; len])
                    })
                    .collect();
                dest.insert_tensor(&it.name, *dtype, shape.clone(), chunks)?;
            }
        }
    }
    Ok(dest)
}

/// The byte destination buffers hold before a load.
pub const POISON: u8 = 0xA5;

/// A loaded byte that differs from the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The loading rank.
    pub rank: usize,
    /// The item.
    pub item: String,
    /// The destination chunk, for tensors.
    pub region: Option<ChunkBox>,
    /// What differs: the first differing element and its values.
    pub detail: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.region {
            Some(r) => write!(
                f,
                "rank {}: {} chunk ({r}): {}",
                self.rank, self.item, self.detail
            ),
            None => write!(f, "rank {}: {}: {}", self.rank, self.item, self.detail),
        }
    }
}

/// Compare everything rank `rank` loaded with the model; one [`Mismatch`]
/// per differing chunk or missing item.
pub fn check_loaded(spec: &ModelSpec, rank: usize, loaded: &DestStateDict) -> Vec<Mismatch> {
    spec.items()
        .iter()
        .flat_map(|it| check_item(spec, it, rank, loaded))
        .collect()
}

/// [`check_loaded`] for every rank's destination, on all cores; mismatches
/// in rank and item order.
pub fn check_all(spec: &ModelSpec, loaded: &[DestStateDict]) -> Vec<Mismatch> {
    let items = spec.items();
    let units: Vec<(usize, &ItemSpec)> = (0..loaded.len())
        .flat_map(|r| items.iter().map(move |it| (r, it)))
        .collect();
    par_map(units.len(), |u| {
        let (rank, it) = units[u];
        check_item(spec, it, rank, &loaded[rank])
    })
    .into_iter()
    .flatten()
    .collect()
}

/// Compare one item of what rank `rank` loaded with the model.
fn check_item(
    spec: &ModelSpec,
    it: &ItemSpec,
    rank: usize,
    loaded: &DestStateDict,
) -> Vec<Mismatch> {
    let miss = |region: Option<ChunkBox>, detail: String| Mismatch {
        rank,
        item: it.name.clone(),
        region,
        detail,
    };
    match &it.kind {
        ItemKind::Bytes => {
            let want = spec.dataloader_state();
            match loaded.bytes(&it.name) {
                Some(b) if b == want.as_slice() => vec![],
                Some(b) => vec![miss(
                    None,
                    format!(
                        "loaded {} bytes differ from the expected {}",
                        b.len(),
                        want.len()
                    ),
                )],
                None => vec![miss(None, "not loaded".into())],
            }
        }
        ItemKind::Tensor { dtype, shape } => {
            let Some(t) = loaded.tensor(&it.name) else {
                return vec![miss(None, "not loaded".into())];
            };
            t.chunks
                .iter()
                .filter_map(|c| {
                    check_chunk(spec, &it.name, *dtype, shape, &c.region, &c.data)
                        .map(|detail| miss(Some(c.region.clone()), detail))
                })
                .collect()
        }
    }
}

/// Every rank's state dict for a save by `n` ranks, generated on all cores.
pub fn generate_state_dicts(spec: &ModelSpec, n: usize) -> dcp_core::Result<Vec<StateDict>> {
    generate_ranks(spec, 0..n, n)
}

/// The state dict of rank `rank` of `n` alone (a process of an MPI job
/// holds one rank), generated on all cores. Refuses `rank >= n`.
pub fn generate_state_dict(spec: &ModelSpec, rank: usize, n: usize) -> dcp_core::Result<StateDict> {
    if rank >= n {
        return Err(dcp_core::Error::invalid(format!(
            "rank {rank} is not one of {n} ranks"
        )));
    }
    let mut v = generate_ranks(spec, rank..rank + 1, n)?;
    Ok(v.remove(0))
}

/// The state dicts of `ranks` (of `n`), in order.
fn generate_ranks(
    spec: &ModelSpec,
    ranks: std::ops::Range<usize>,
    n: usize,
) -> dcp_core::Result<Vec<StateDict>> {
    let items = spec.items();
    let first = ranks.start;
    let mut units = Vec::new();
    for rank in ranks.clone() {
        for (i, it) in items.iter().enumerate() {
            if let ItemKind::Tensor { shape, .. } = &it.kind {
                if let Some(region) = shard(shape, it.save, rank, n) {
                    units.push((rank, i, region));
                }
            }
        }
    }
    let data = par_map(units.len(), |u| {
        let (_, i, region) = &units[u];
        let it = &items[*i];
        let ItemKind::Tensor { dtype, shape } = &it.kind else {
            unreachable!("units hold tensors only")
        };
        Bytes::from(tensor_chunk(spec, &it.name, *dtype, shape, region))
    });
    let mut held: Vec<BTreeMap<usize, TensorChunk>> = vec![BTreeMap::new(); ranks.len()];
    for ((rank, i, region), data) in units.into_iter().zip(data) {
        held[rank - first].insert(i, TensorChunk::new(region, data));
    }
    held.into_iter()
        .map(|mut chunks| {
            let mut sd = StateDict::new();
            for (i, it) in items.iter().enumerate() {
                match &it.kind {
                    ItemKind::Bytes => sd.insert_bytes(&it.name, spec.dataloader_state(), true)?,
                    ItemKind::Tensor { dtype, shape } => sd.insert_tensor(
                        &it.name,
                        *dtype,
                        shape.clone(),
                        chunks.remove(&i).into_iter().collect(),
                        it.save == Sharding::Replicated,
                    )?,
                }
            }
            Ok(sd)
        })
        .collect()
}

/// `f(i)` for every `i` in `0..n` on all cores (work shared through an
/// atomic counter); results in index order.
pub fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n.max(1));
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let v = f(i);
                out.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(v);
            });
        }
    });
    out.into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|v| v.expect("every index computed"))
        .collect()
}

/// `None` when `data` holds the model's bytes of `region`, else where the
/// first difference is.
fn check_chunk(
    spec: &ModelSpec,
    name: &str,
    dtype: DType,
    shape: &[u64],
    region: &ChunkBox,
    data: &[u8],
) -> Option<String> {
    if name == STEP {
        let want = spec.step().to_le_bytes();
        return (data != want).then(|| format!("step is {data:?}, expected {want:?}"));
    }
    let key = item_key(spec.seed, name);
    let mut first = None;
    let mut row_buf = Vec::new();
    for_each_row(shape, region, |start, off, n| {
        if first.is_some() {
            return;
        }
        row_buf.resize(2 * n, 0);
        for (j, d) in row_buf.chunks_exact_mut(2).enumerate() {
            d.copy_from_slice(&element(key, start + j as u64).to_le_bytes());
        }
        let got = &data[off..off + 2 * n];
        if got != row_buf.as_slice() {
            let j = (0..n)
                .find(|&j| got[2 * j..2 * j + 2] != row_buf[2 * j..2 * j + 2])
                .unwrap_or(0);
            let index = start + j as u64;
            first = Some(format!(
                "element {:?} is {:#06x}, expected {:#06x} ({dtype})",
                unravel(index, shape),
                u16::from_le_bytes([got[2 * j], got[2 * j + 1]]),
                element(key, index)
            ));
        }
    });
    first
}

/// Coordinates of the row-major `index` in `shape`.
fn unravel(mut index: u64, shape: &[u64]) -> Vec<u64> {
    let mut out = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        out[d] = index % shape[d].max(1);
        index /= shape[d].max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            layers: 2,
            hidden: 12,
            vocab: 20,
            seed: 7,
        }
    }

    /// One rank's state dict alone (a process of an MPI job) is that
    /// rank's of all of them, byte for byte; a rank outside the job is
    /// refused.
    #[test]
    fn one_rank_generates_its_share_of_all() {
        let s = spec();
        let n = 3;
        let all = generate_state_dicts(&s, n).unwrap();
        for (rank, want) in all.iter().enumerate() {
            let got = generate_state_dict(&s, rank, n).unwrap();
            // `Item` has no `PartialEq`; its Debug form shows every byte.
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "rank {rank}");
            assert_eq!(got.len(), want.len());
        }
        let e = generate_state_dict(&s, 3, 3).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::InvalidInput);
        assert!(e.message().contains("rank 3 is not one of 3 ranks"), "{e}");
    }

    #[test]
    fn shards_cover_every_element_once() {
        for n in 1..7 {
            for sharding in [Sharding::Rows, Sharding::Columns] {
                let shape = [10u64, 6];
                let mut seen = [0u8; 60];
                for r in 0..n {
                    if let Some(b) = shard(&shape, sharding, r, n) {
                        for i in b.offsets[0]..b.offsets[0] + b.sizes[0] {
                            for j in b.offsets[1]..b.offsets[1] + b.sizes[1] {
                                seen[(i * 6 + j) as usize] += 1;
                            }
                        }
                    }
                }
                assert!(seen.iter().all(|&s| s == 1), "n={n} {sharding:?}");
            }
        }
    }

    #[test]
    fn values_do_not_depend_on_the_split() {
        let s = spec();
        let shape = [20u64, 12];
        let full = tensor_chunk(
            &s,
            "embed.weight",
            DType::BF16,
            &shape,
            &ChunkBox::full(&shape),
        );
        for (sharding, n) in [(Sharding::Rows, 3), (Sharding::Columns, 5)] {
            for r in 0..n {
                // torch.chunk's split: 12 columns over 5 ranks leave the last empty.
                let Some(b) = shard(&shape, sharding, r, n) else {
                    assert_eq!((sharding, r), (Sharding::Columns, 4));
                    continue;
                };
                let part = tensor_chunk(&s, "embed.weight", DType::BF16, &shape, &b);
                let mut k = 0;
                for i in b.offsets[0]..b.offsets[0] + b.sizes[0] {
                    for j in b.offsets[1]..b.offsets[1] + b.sizes[1] {
                        let g = 2 * (i * 12 + j) as usize;
                        assert_eq!(part[k..k + 2], full[g..g + 2]);
                        k += 2;
                    }
                }
            }
        }
        // Different names and seeds give different values; values are finite bf16.
        let other = tensor_chunk(
            &s,
            "layers.0.attn.q.weight",
            DType::BF16,
            &shape,
            &ChunkBox::full(&shape),
        );
        assert_ne!(full, other);
        for p in full.chunks_exact(2) {
            let bits = u16::from_le_bytes([p[0], p[1]]);
            assert_ne!((bits >> 7) & 0xFF, 0xFF);
        }
    }

    /// Rank 1 of 3's destination, filled with the model's bytes, except one
    /// byte of `corrupt` flipped. (Bytes items cannot be filled by hand.)
    fn filled(s: &ModelSpec, corrupt: &str) -> DestStateDict {
        let mut out = DestStateDict::new();
        for (name, item) in rank_dest(s, 1, 3).unwrap().iter() {
            match item {
                dcp_core::DestItem::Bytes(_) => out.want_bytes(name).unwrap(),
                dcp_core::DestItem::Tensor(t) => {
                    let chunks = t
                        .chunks
                        .iter()
                        .map(|c| {
                            let mut data = tensor_chunk(s, name, t.dtype, &t.shape, &c.region);
                            if name == corrupt {
                                data[5] ^= 1;
                            }
                            dcp_core::DestChunk::new(c.region.clone(), data)
                        })
                        .collect();
                    out.insert_tensor(name, t.dtype, t.shape.clone(), chunks)
                        .unwrap();
                }
            }
        }
        out
    }

    #[test]
    fn check_finds_a_flipped_byte() {
        let s = spec();
        let problems = check_loaded(&s, 1, &filled(&s, ""));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].item, DATALOADER);
        assert_eq!(problems[0].detail, "not loaded");

        // up is [48, 12], loaded by columns: rank 1 of 3 holds columns 4..8;
        // byte 5 is element 2 of the first row, global (0, 6).
        let name = "layers.1.mlp.up.weight";
        let problems = check_loaded(&s, 1, &filled(&s, name));
        assert_eq!(problems.len(), 2, "{problems:?}");
        let p = problems.iter().find(|p| p.item == name).unwrap();
        assert_eq!(
            p.region,
            Some(ChunkBox::new(vec![0, 4], vec![48, 4]).unwrap())
        );
        assert!(p.detail.starts_with("element [0, 6] is "), "{}", p.detail);
        assert!(p.to_string().starts_with("rank 1: layers.1.mlp.up.weight chunk (offsets [0, 4] sizes [48, 4]): element [0, 6]"), "{p}");
    }

    #[test]
    fn user_metadata_round_trips() {
        let s = spec();
        assert_eq!(
            ModelSpec::from_user_metadata(&s.user_metadata()).unwrap(),
            Some(s)
        );
        assert_eq!(
            ModelSpec::from_user_metadata(&BTreeMap::new()).unwrap(),
            None
        );
        let mut partial = s.user_metadata();
        partial.remove(KEY_VOCAB);
        assert!(ModelSpec::from_user_metadata(&partial).is_err());
    }

    #[test]
    fn default_size_is_near_100_mb() {
        let s = ModelSpec {
            layers: 4,
            hidden: 1024,
            vocab: 4096,
            seed: 0,
        };
        let mb = s.total_bytes() as f64 / 1e6;
        assert!((90.0..120.0).contains(&mb), "{mb}");
    }
}
