//! Save planning: each rank lists what it holds; the coordinator removes
//! duplicates of replicated items, balancing bytes, and refuses conflicts.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{ChunkBox, Item, StateDict};
use rustc_hash::FxHashMap as HashMap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Which record of an item a write item is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WriteIndex {
    /// A tensor chunk, by its box.
    Chunk(ChunkBox),
    /// The bytes item itself.
    Bytes,
}

/// One record a rank offers to write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WriteItem {
    /// Item name (shared with every other record of the item decoded by
    /// the coordinator).
    #[serde(with = "super::intern::name")]
    pub name: Arc<str>,
    /// Which record.
    pub index: WriteIndex,
    /// Element type (`None` for bytes items).
    pub dtype: Option<DType>,
    /// Global shape (empty for bytes items; shared like the name).
    #[serde(with = "super::intern::shape")]
    pub shape: Arc<[u64]>,
    /// Logical bytes.
    pub nbytes: u64,
    /// Declared replicated: may be offered by several ranks.
    pub replicated: bool,
    /// CRC-32C of the data of replicated items, when replicas are checked.
    pub digest: Option<u32>,
}

/// A tensor that exists but holds no element on this rank (a zero-size
/// tensor, or one whose chunks are all elsewhere): recorded so the checkpoint
/// still knows its dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDecl {
    /// Item name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
}

/// A list of write items: a rank's offer, or its assignment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavePlan {
    /// The items, in state-dict order.
    pub items: Vec<WriteItem>,
    /// Tensors offered without any non-empty chunk (see [`TensorDecl`]).
    pub declared: Vec<TensorDecl>,
}

impl SavePlan {
    /// Logical bytes of every item.
    pub fn bytes(&self) -> u64 {
        self.items.iter().map(|i| i.nbytes).sum()
    }
}

/// Decides who writes what.
pub trait SavePlanner: Send + Sync {
    /// This rank's offer.
    fn local_plan(&self, state_dict: &StateDict, rank: usize) -> Result<SavePlan>;

    /// On the coordinator: from every rank's offer, each rank's assignment.
    /// Every offered record must be assigned to exactly one rank that
    /// offered it.
    fn global_plan(&self, plans: &[SavePlan]) -> Result<Vec<SavePlan>>;

    /// [`global_plan`](SavePlanner::global_plan), taking the offers: a
    /// planner may move records into the assignments instead of copying
    /// them (the coordinator of a save calls this). The default calls
    /// `global_plan`.
    fn global_plan_owned(&self, plans: Vec<SavePlan>) -> Result<Vec<SavePlan>> {
        self.global_plan(&plans)
    }

    /// True when [`global_plan`](SavePlanner::global_plan) assigns each
    /// rank a subsequence of the records it offered, in the order offered
    /// (so an assignment as long as the offer *is* the offer). The
    /// coordinator then tells such a rank "write what you offered" instead
    /// of sending its assignment back. The default is false: every
    /// assignment is sent.
    fn assigns_offered_order(&self) -> bool {
        false
    }
}

/// The default planner: dedups records declared replicated (to the holder
/// with the fewest assigned bytes, largest records first), refuses the same
/// record offered by several ranks without being declared replicated,
/// refuses inconsistent dtypes or shapes, and refuses overlapping chunks.
#[derive(Clone, Debug)]
pub struct DefaultSavePlanner {
    /// Compare a CRC-32C of every replicated record across its holders and
    /// refuse differing copies (costs one checksum pass over replicated data).
    pub check_replicas: bool,
}

impl Default for DefaultSavePlanner {
    fn default() -> Self {
        DefaultSavePlanner {
            check_replicas: true,
        }
    }
}

impl SavePlanner for DefaultSavePlanner {
    fn local_plan(&self, sd: &StateDict, _rank: usize) -> Result<SavePlan> {
        let mut items = Vec::new();
        let mut declared = Vec::new();
        for (name, item) in sd.iter() {
            match item {
                Item::Tensor(t) => {
                    let mut seen = std::collections::HashSet::new();
                    // One allocation of the name and shape per item, shared
                    // by its chunks.
                    let shared_name: Arc<str> = Arc::from(name.as_str());
                    let shared_shape: Arc<[u64]> = Arc::from(t.shape.as_slice());
                    // Empty chunks hold no data and are not written.
                    if t.chunks.iter().all(|c| c.region.is_empty()) {
                        declared.push(TensorDecl {
                            name: name.clone(),
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                        });
                    }
                    for c in t.chunks.iter().filter(|c| !c.region.is_empty()) {
                        if !seen.insert(&c.region) {
                            return Err(Error::plan(format!(
                                "{name}: chunk ({}) appears twice on one rank",
                                c.region
                            )));
                        }
                        items.push(WriteItem {
                            name: shared_name.clone(),
                            index: WriteIndex::Chunk(c.region.clone()),
                            dtype: Some(t.dtype),
                            shape: shared_shape.clone(),
                            nbytes: c.data.len(),
                            replicated: t.replicated,
                            // Sources (device memory) are compared only
                            // once staged: no digest at planning.
                            digest: (t.replicated && self.check_replicas)
                                .then(|| c.data.host().map(|b| crc32c::crc32c(b)))
                                .flatten(),
                        });
                    }
                }
                Item::Bytes { data, replicated } => items.push(WriteItem {
                    name: Arc::from(name.as_str()),
                    index: WriteIndex::Bytes,
                    dtype: None,
                    shape: Arc::from([]),
                    nbytes: data.len() as u64,
                    replicated: *replicated,
                    digest: (*replicated && self.check_replicas).then(|| crc32c::crc32c(data)),
                }),
            }
        }
        Ok(SavePlan { items, declared })
    }

    fn global_plan(&self, plans: &[SavePlan]) -> Result<Vec<SavePlan>> {
        let (assigned, mut declared) = self.assign(plans)?;
        Ok(assigned
            .into_iter()
            .enumerate()
            .map(|(rank, idx)| SavePlan {
                items: idx
                    .into_iter()
                    .map(|i| plans[rank].items[i].clone())
                    .collect(),
                // The coordinator records declarations; nothing is written for them.
                declared: if rank == 0 {
                    std::mem::take(&mut declared)
                } else {
                    Vec::new()
                },
            })
            .collect())
    }

    /// Assignments keep the offered order (indices ascending).
    fn assigns_offered_order(&self) -> bool {
        true
    }

    fn global_plan_owned(&self, plans: Vec<SavePlan>) -> Result<Vec<SavePlan>> {
        let (assigned, mut declared) = self.assign(&plans)?;
        Ok(plans
            .into_iter()
            .zip(assigned)
            .enumerate()
            .map(|(rank, (p, idx))| {
                // Every record kept (the common case): the offer as it is.
                let items = if idx.len() == p.items.len() {
                    p.items
                } else {
                    let mut keep = idx.into_iter().peekable();
                    p.items
                        .into_iter()
                        .enumerate()
                        .filter_map(|(i, it)| (keep.next_if_eq(&i).is_some()).then_some(it))
                        .collect()
                };
                SavePlan {
                    items,
                    declared: if rank == 0 {
                        std::mem::take(&mut declared)
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect())
    }
}

impl DefaultSavePlanner {
    /// Which of its offered records each rank writes (indices into its
    /// plan, ascending), and the tensors declared without data.
    fn assign(&self, plans: &[SavePlan]) -> Result<(Vec<Vec<usize>>, Vec<TensorDecl>)> {
        // One pass over every offered record: consistency of each name
        // across ranks; records not declared replicated go to the rank that
        // offers them (a duplicate among them shows as overlapping chunks,
        // diagnosed below); replicated ones are collected by record. No
        // per-record allocation or hashing of chunk boxes on the common
        // path: at scale this is the coordinator's whole planning cost.
        struct NameInfo<'a> {
            dtype: Option<DType>,
            shape: &'a [u64],
            rank: usize,
            boxes: Vec<(&'a ChunkBox, usize)>,
            bytes_owner: Option<usize>,
        }
        let mismatch = |name: &str,
                        r0: usize,
                        rank: usize,
                        a: (&Option<DType>, &[u64]),
                        b: (&Option<DType>, &[u64])| {
            let show = |d: &Option<DType>, s: &[u64]| match d {
                Some(d) => format!("{d} tensor of shape {s:?}"),
                None => "bytes item".to_string(),
            };
            Error::plan(format!(
                "{name}: rank {r0} offers a {} but rank {rank} a {}",
                show(a.0, a.1),
                show(b.0, b.1)
            ))
        };
        let mut names: HashMap<&str, usize> = HashMap::default();
        let mut infos: Vec<NameInfo<'_>> = Vec::new();
        // Ranks usually offer the same items in the same order, and the
        // coordinator's decoding shares their names: the name at the same
        // position of the previous rank is tried before the map.
        let mut hint: Vec<(&Arc<str>, usize)> = Vec::new();
        let mut replicated: HashMap<(&str, &WriteIndex), Vec<(usize, usize)>> = HashMap::default();
        let mut load = vec![0u64; plans.len()];
        let mut assigned: Vec<Vec<usize>> = plans
            .iter()
            .map(|p| Vec::with_capacity(p.items.len()))
            .collect();
        for (rank, plan) in plans.iter().enumerate() {
            for (i, it) in plan.items.iter().enumerate() {
                let at = match hint.get(i) {
                    Some(&(h, at)) if Arc::ptr_eq(h, &it.name) => at,
                    _ => *names.entry(&it.name).or_insert_with(|| {
                        infos.push(NameInfo {
                            dtype: it.dtype,
                            shape: &it.shape,
                            rank,
                            boxes: Vec::new(),
                            bytes_owner: None,
                        });
                        infos.len() - 1
                    }),
                };
                if i < hint.len() {
                    hint[i] = (&it.name, at);
                } else {
                    hint.push((&it.name, at));
                }
                let info = &mut infos[at];
                if info.dtype != it.dtype || info.shape != &*it.shape {
                    return Err(mismatch(
                        &it.name,
                        info.rank,
                        rank,
                        (&info.dtype, info.shape),
                        (&it.dtype, &it.shape),
                    ));
                }
                if it.replicated {
                    replicated
                        .entry((&it.name, &it.index))
                        .or_default()
                        .push((rank, i));
                    continue;
                }
                match &it.index {
                    WriteIndex::Chunk(b) => info.boxes.push((b, rank)),
                    WriteIndex::Bytes => {
                        if let Some(r0) = info.bytes_owner.replace(rank) {
                            return Err(undeclared(
                                &it.name,
                                "bytes item".into(),
                                &[r0, rank],
                                rank,
                            ));
                        }
                    }
                }
                load[rank] += it.nbytes;
                assigned[rank].push(i);
            }
        }
        let mut declared: Vec<TensorDecl> = Vec::new();
        for (rank, plan) in plans.iter().enumerate() {
            for d in &plan.declared {
                match names.get(d.name.as_str()).map(|&at| &infos[at]) {
                    Some(info)
                        if info.dtype != Some(d.dtype) || info.shape != d.shape.as_slice() =>
                    {
                        return Err(Error::plan(format!(
                            "{}: rank {} and rank {rank} offer different dtypes or shapes",
                            d.name, info.rank
                        )));
                    }
                    Some(_) => {}
                    None => {
                        names.insert(&d.name, infos.len());
                        infos.push(NameInfo {
                            dtype: Some(d.dtype),
                            shape: &d.shape,
                            rank,
                            boxes: Vec::new(),
                            bytes_owner: None,
                        });
                        declared.push(d.clone());
                    }
                }
            }
        }
        type Holders = Vec<(usize, usize)>;
        let mut shared: Vec<(&(&str, &WriteIndex), &Holders)> = Vec::new();
        for (key, hs) in &replicated {
            if let Some(info) = names.get(key.0).map(|&at| &infos[at]) {
                if matches!(key.1, WriteIndex::Bytes) {
                    if let Some(r0) = info.bytes_owner {
                        let r = hs[0].0;
                        return Err(undeclared(key.0, "bytes item".into(), &[r0, r], r0));
                    }
                }
            }
            let first = &plans[hs[0].0].items[hs[0].1];
            for &(r, i) in hs {
                let it = &plans[r].items[i];
                if it.nbytes != first.nbytes
                    || (it.digest.is_some() && first.digest.is_some() && it.digest != first.digest)
                {
                    return Err(Error::plan(format!(
                        "{}: replicated copies differ between rank {} and rank {r}",
                        it.name, hs[0].0
                    )));
                }
            }
            shared.push((key, hs));
        }
        // Largest replicated records first, each to its least-loaded holder;
        // ties broken by rank so the plan is deterministic.
        shared.sort_by(|a, b| {
            let na = plans[a.1[0].0].items[a.1[0].1].nbytes;
            let nb = plans[b.1[0].0].items[b.1[0].1].nbytes;
            nb.cmp(&na).then_with(|| a.0.cmp(b.0))
        });
        for (key, hs) in shared {
            let &(r, i) = hs
                .iter()
                .min_by_key(|(r, _)| (load[*r], *r))
                .expect("at least one holder");
            load[r] += plans[r].items[i].nbytes;
            assigned[r].push(i);
            if let (WriteIndex::Chunk(b), Some(&at)) = (key.1, names.get(key.0)) {
                infos[at].boxes.push((b, r));
            }
        }
        // Chunks of one tensor must not overlap; two ranks offering the
        // same chunk without declaring it replicated is named as such.
        let mut by_index: Vec<&str> = vec![""; infos.len()];
        for (name, at) in names {
            by_index[at] = name;
        }
        for (name, info) in by_index.into_iter().zip(infos) {
            let boxes: Vec<&ChunkBox> = info.boxes.iter().map(|(b, _)| *b).collect();
            if let Err(e) = crate::metadata::check_disjoint(name, boxes) {
                let mut by_box: HashMap<&ChunkBox, Vec<usize>> = HashMap::default();
                for (b, r) in &info.boxes {
                    by_box.entry(b).or_default().push(*r);
                }
                if let Some((b, ranks)) = by_box.into_iter().find(|(_, rs)| rs.len() > 1) {
                    let not_declared = ranks
                        .iter()
                        .copied()
                        .find(|&r| {
                            plans[r].items.iter().any(|it| {
                                &*it.name == name
                                    && !it.replicated
                                    && it.index == WriteIndex::Chunk(b.clone())
                            })
                        })
                        .unwrap_or(ranks[0]);
                    let mut ranks = ranks;
                    ranks.sort_unstable();
                    return Err(undeclared(
                        name,
                        format!("chunk ({b})"),
                        &ranks,
                        not_declared,
                    ));
                }
                return Err(Error::plan(e.message().replace(
                    "invalid metadata: ",
                    "chunks offered by the ranks overlap: ",
                )));
            }
        }
        for idx in &mut assigned {
            idx.sort_unstable();
        }
        Ok((assigned, declared))
    }
}

/// The error for a record offered by several ranks without being declared
/// replicated by rank `r`.
fn undeclared(name: &str, what: String, ranks: &[usize], r: usize) -> Error {
    Error::plan(format!(
        "{name}: {what} is offered by ranks {ranks:?} but rank {r} does not declare it replicated; \
         give per-rank items distinct names or mark them replicated"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorChunk;
    use bytes::Bytes;

    fn sd_with(chunks: &[(u64, u64)], replicated: bool, fill: u8) -> StateDict {
        let mut sd = StateDict::new();
        let chunks = chunks
            .iter()
            .map(|&(o, s)| TensorChunk {
                region: ChunkBox::new(vec![o], vec![s]).unwrap(),
                data: Bytes::from(vec![fill; s as usize * 4]).into(),
            })
            .collect();
        sd.insert_tensor("w", DType::F32, vec![8], chunks, replicated)
            .unwrap();
        sd
    }

    #[test]
    fn dedups_replicated_and_balances() {
        let p = DefaultSavePlanner::default();
        let plans: Vec<SavePlan> = (0..3)
            .map(|r| {
                let mut sd = sd_with(&[(0, 8)], true, 1);
                sd.insert_bytes(format!("rng.{r}"), vec![r as u8; 100], false)
                    .unwrap();
                sd.insert_bytes("step", b"7".to_vec(), true).unwrap();
                p.local_plan(&sd, r).unwrap()
            })
            .collect();
        let g = p.global_plan(&plans).unwrap();
        let count = |name: &str| {
            g.iter()
                .flat_map(|p| &p.items)
                .filter(|i| &*i.name == name)
                .count()
        };
        assert_eq!(count("w"), 1);
        assert_eq!(count("step"), 1);
        assert_eq!(count("rng.1"), 1);
        // The two replicated records land on different ranks.
        let owner = |name: &str| {
            g.iter()
                .position(|p| p.items.iter().any(|i| &*i.name == name))
                .unwrap()
        };
        assert_ne!(owner("w"), owner("step"));
    }

    #[test]
    fn refuses_undeclared_duplicates_and_conflicts() {
        let p = DefaultSavePlanner::default();
        let a = p.local_plan(&sd_with(&[(0, 4)], false, 1), 0).unwrap();
        let b = p.local_plan(&sd_with(&[(0, 4)], false, 1), 1).unwrap();
        let e = p.global_plan(&[a, b]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Plan);
        assert!(e.message().contains("offered by ranks [0, 1]"), "{e}");

        let a = p.local_plan(&sd_with(&[(0, 4)], true, 1), 0).unwrap();
        let b = p.local_plan(&sd_with(&[(0, 4)], true, 2), 1).unwrap();
        assert!(p
            .global_plan(&[a, b])
            .unwrap_err()
            .message()
            .contains("differ"));

        let a = p.local_plan(&sd_with(&[(0, 4)], false, 1), 0).unwrap();
        let b = p.local_plan(&sd_with(&[(2, 4)], false, 1), 1).unwrap();
        assert!(p
            .global_plan(&[a, b])
            .unwrap_err()
            .message()
            .contains("overlap"));

        let a = p.local_plan(&sd_with(&[(0, 4)], false, 1), 0).unwrap();
        let mut sd = StateDict::new();
        sd.insert_full_tensor("w", DType::F16, vec![8], Bytes::from(vec![0u8; 16]))
            .unwrap();
        let b = p.local_plan(&sd, 1).unwrap();
        assert!(p
            .global_plan(&[a, b])
            .unwrap_err()
            .message()
            .contains("rank 0 offers a f32"));
    }
}
