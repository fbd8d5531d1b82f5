//! The coordinator's metadata of a planned save, from the assignments
//! (every item, dtype, shape and chunk box) and the ranks' write results,
//! which carry no names: a rank reports its records' storage in assignment
//! order ([`CompactWrite`]). It also notes where each assigned record sits
//! ([`Slots`]), so a later save of the same layout fills this metadata in
//! place (`plan_cache.rs`).
//!
//! The plans are consumed one rank at a time (the freed memory returned to
//! the system every [`TRIM_EVERY`] ranks of a save of at least
//! [`TRIM_MIN_RECORDS`] records), so the coordinator does not hold
//! every decoded plan and the whole metadata at once, and every tensor's
//! chunk list is sized up front (no vector doubling over 16,384 ranks).

use crate::checkpoint::plan_cache::{place_write, CompactWrite};
use crate::checkpoint::RankWrite;
use crate::error::{Error, Result};
use crate::metadata::{ChunkMeta, FormatKind, ItemMeta, Metadata, StorageInfo, Transforms};
use crate::plan::{SavePlan, WriteIndex};
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where each rank's assigned records sit in the metadata, in assignment
/// order: `slots[start[r]..start[r + 1]]` for rank r, each (item index,
/// chunk index; `u32::MAX` for a bytes item).
pub(crate) struct Slots {
    pub start: Vec<usize>,
    pub slots: Vec<(u32, u32)>,
}

/// The metadata of a save whose ranks were assigned `plans` (`plans[r]`:
/// the records rank r writes, and the tensors it declared without data)
/// and wrote `writes` (rank r's files and its records' storage in
/// assignment order, decoded one at a time), and where each assigned
/// record sits in it. Items are sorted by name, each tensor's chunks by
/// offsets; `world_size` is `plans.len()`. Refuses another count of write
/// results or of records in one, a file or transform a result does not
/// list, and more than `u32::MAX` items or chunks of one item.
pub(crate) fn build(
    plans: Vec<SavePlan>,
    writes: impl ExactSizeIterator<Item = Result<CompactWrite>>,
    save_id: &str,
    generation: u64,
    format: FormatKind,
    user: &BTreeMap<String, String>,
) -> Result<(Metadata, Slots)> {
    let world = plans.len();
    if writes.len() != world {
        return Err(Error::plan(format!(
            "{} write results for {world} ranks",
            writes.len()
        )));
    }
    let mut start = Vec::with_capacity(world + 1);
    let mut total = 0usize;
    for p in &plans {
        start.push(total);
        total += p.items.len();
    }
    start.push(total);
    let mut slots: Vec<(u32, u32)> = Vec::with_capacity(total);

    // Pass 1: every record's item, and how many chunks each item has. Ranks
    // usually list the same items in the same order (and the coordinator's
    // decoding shares their names), so the item at the same position of
    // the previous rank is tried before the map.
    let mut index: FxHashMap<Arc<str>, u32> = FxHashMap::default();
    let mut names: Vec<Arc<str>> = Vec::new();
    let mut kinds: Vec<(Option<crate::DType>, Arc<[u64]>, u64)> = Vec::new();
    let mut counts: Vec<u32> = Vec::new();
    let mut hint: Vec<u32> = Vec::new();
    for p in &plans {
        for (j, it) in p.items.iter().enumerate() {
            let cached = hint
                .get(j)
                .filter(|&&i| Arc::ptr_eq(&names[i as usize], &it.name))
                .copied();
            let i = match cached {
                Some(i) => i,
                None => match index.get(&it.name) {
                    Some(&i) => i,
                    None => {
                        let i = u32::try_from(names.len())
                            .map_err(|_| Error::plan("more than 2^32 items in one checkpoint"))?;
                        index.insert(it.name.clone(), i);
                        names.push(it.name.clone());
                        kinds.push((it.dtype, it.shape.clone(), it.nbytes));
                        counts.push(0);
                        i
                    }
                },
            };
            if j < hint.len() {
                hint[j] = i;
            } else {
                hint.push(i);
            }
            let c = &mut counts[i as usize];
            let chunk = match it.index {
                WriteIndex::Chunk(_) => {
                    *c = c.checked_add(1).ok_or_else(|| {
                        Error::plan(format!("{}: more than 2^32 chunks", it.name))
                    })?;
                    *c - 1
                }
                WriteIndex::Bytes => u32::MAX,
            };
            slots.push((i, chunk));
        }
    }
    drop(hint);
    let mut items: Vec<(Arc<str>, ItemMeta)> = names
        .into_iter()
        .zip(kinds)
        .zip(&counts)
        .map(|((name, (dtype, shape, nbytes)), &count)| {
            let meta = if count == 0 && dtype.is_none() {
                ItemMeta::Bytes {
                    length: nbytes,
                    storage: empty_storage(),
                }
            } else {
                ItemMeta::Tensor {
                    dtype: dtype.unwrap_or(crate::DType::U8),
                    shape: crate::model::Dims::from_slice(&shape),
                    chunks: Vec::with_capacity(count as usize),
                }
            };
            (name, meta)
        })
        .collect();
    drop(counts);

    // Pass 2: the boxes, moved out of each rank's plan (which is then
    // freed), with the storage from its write result.
    let trim = total >= TRIM_MIN_RECORDS;
    let mut files = Vec::new();
    let mut transforms = Vec::new();
    let mut declared = Vec::new();
    let mut k = 0usize;
    for (r, (p, w)) in plans.into_iter().zip(writes).enumerate() {
        // The plans freed so far go back to the system, so the metadata
        // does not add to them (see `heap.rs`).
        if trim && r % TRIM_EVERY == TRIM_EVERY - 1 {
            crate::heap::release_free_memory();
        }
        let storage = place_write(&mut files, &mut transforms, r, w?, p.items.len())?;
        for (it, st) in p.items.into_iter().zip(storage) {
            let (i, _) = slots[k];
            k += 1;
            match (it.index, &mut items[i as usize].1) {
                (WriteIndex::Chunk(region), ItemMeta::Tensor { chunks, .. }) => {
                    chunks.push(ChunkMeta {
                        region,
                        storage: st,
                    })
                }
                (WriteIndex::Bytes, ItemMeta::Bytes { storage, .. }) => *storage = st,
                _ => {
                    return Err(Error::plan(format!(
                        "{}: assigned as a chunk and as a bytes item",
                        it.name
                    ))
                    .with_rank(r))
                }
            }
        }
        declared.extend(p.declared);
    }
    if trim {
        crate::heap::release_free_memory();
    }
    for d in declared {
        if !index.contains_key(d.name.as_str()) {
            let name: Arc<str> = Arc::from(d.name.as_str());
            index.insert(name.clone(), items.len() as u32);
            items.push((
                name,
                ItemMeta::Tensor {
                    dtype: d.dtype,
                    shape: d.shape.into(),
                    chunks: Vec::new(),
                },
            ));
        }
    }
    drop(index);

    // Items by name, each tensor's chunks by offsets, the slots following.
    let mut order: Vec<u32> = (0..items.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| items[a as usize].0.cmp(&items[b as usize].0));
    let mut new_item = vec![0u32; order.len()];
    for (new, &old) in order.iter().enumerate() {
        new_item[old as usize] = new as u32;
    }
    // Per item, the new place of each chunk (empty: unchanged).
    let mut new_chunk: Vec<Vec<u32>> = Vec::with_capacity(items.len());
    for (_, item) in &mut items {
        let moved = match item {
            ItemMeta::Tensor { chunks, .. }
                if !chunks.is_sorted_by(|a, b| a.region.offsets <= b.region.offsets) =>
            {
                let mut perm: Vec<u32> = (0..chunks.len() as u32).collect();
                perm.sort_by(|&a, &b| {
                    chunks[a as usize]
                        .region
                        .offsets
                        .cmp(&chunks[b as usize].region.offsets)
                });
                let mut old: Vec<Option<ChunkMeta>> =
                    std::mem::take(chunks).into_iter().map(Some).collect();
                *chunks = perm
                    .iter()
                    .map(|&p| old[p as usize].take().expect("a permutation"))
                    .collect();
                let mut inv = vec![0u32; perm.len()];
                for (new, &p) in perm.iter().enumerate() {
                    inv[p as usize] = new as u32;
                }
                inv
            }
            _ => Vec::new(),
        };
        new_chunk.push(moved);
    }
    for s in &mut slots {
        let moved = &new_chunk[s.0 as usize];
        if s.1 != u32::MAX && !moved.is_empty() {
            s.1 = moved[s.1 as usize];
        }
        s.0 = new_item[s.0 as usize];
    }
    let mut old: Vec<Option<(Arc<str>, ItemMeta)>> = items.into_iter().map(Some).collect();
    let items = order
        .iter()
        .map(|&o| {
            let (name, meta) = old[o as usize].take().expect("a permutation");
            (name.to_string(), meta)
        })
        .collect();
    let md = Metadata {
        save_id: save_id.to_string(),
        world_size: world as u32,
        format,
        files,
        transforms,
        items,
        user: user.clone(),
        generation,
    };
    Ok((md, Slots { start, slots }))
}

/// Ranks between two returns of freed plans to the system.
const TRIM_EVERY: usize = 1024;

/// Records below which a save's plans are too small to be worth returning
/// to the system (the walk of the allocator's free lists would cost more
/// than it gives back).
const TRIM_MIN_RECORDS: usize = 1 << 20;

fn empty_storage() -> StorageInfo {
    StorageInfo {
        file: 0,
        offset: 0,
        length: 0,
        transforms: Transforms::new(),
    }
}

/// Build the checkpoint's metadata from every rank's plan (`plans[r]`: the
/// records rank `r` was assigned, and the tensors it declared without data)
/// and write results (`writes`, in rank order), as the coordinator of a save
/// does before its commit. Public for drivers whose ranks are coordinated by
/// another framework (the Python bindings under torch's planners), which
/// call [`StorageWriter::write_rank`](crate::StorageWriter::write_rank) on
/// each rank and [`StorageWriter::commit`](crate::StorageWriter::commit)
/// with the result on the coordinator. Refuses a write result that misses
/// an assigned record or names one not assigned to its rank, and a count of
/// write results other than the count of plans.
pub fn assemble_metadata(
    save_id: &str,
    generation: u64,
    plans: &[SavePlan],
    writes: Vec<RankWrite>,
    format: FormatKind,
    user: &BTreeMap<String, String>,
) -> Result<Metadata> {
    if writes.len() != plans.len() {
        return Err(Error::plan(format!(
            "{} write results for {} plans",
            writes.len(),
            plans.len()
        )));
    }
    let compact = writes
        .into_iter()
        .zip(plans)
        .enumerate()
        .map(|(r, (w, p))| CompactWrite::from_write(w, p).map_err(|e| e.with_rank(r)));
    let (md, _) = build(plans.to_vec(), compact, save_id, generation, format, user)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::DataFile;
    use crate::model::ChunkBox;
    use crate::plan::{TensorDecl, WriteItem};
    use crate::DType;

    fn chunk(name: &str, offset: u64, rows: u64) -> WriteItem {
        WriteItem {
            name: name.into(),
            index: WriteIndex::Chunk(ChunkBox::new(vec![offset, 0], vec![rows, 2]).unwrap()),
            dtype: Some(DType::F32),
            shape: vec![4, 2].into(),
            nbytes: rows * 8,
            replicated: false,
            digest: None,
        }
    }

    fn bytes(name: &str, n: u64) -> WriteItem {
        WriteItem {
            name: name.into(),
            index: WriteIndex::Bytes,
            dtype: None,
            shape: Vec::new().into(),
            nbytes: n,
            replicated: false,
            digest: None,
        }
    }

    /// What a rank that wrote `plan` into one file, records back to back,
    /// reports (in `order`, which need not be the plan's).
    fn wrote(rank: usize, plan: &SavePlan, order: &[usize]) -> RankWrite {
        let mut offset = 0;
        let mut records = Vec::new();
        for &i in order {
            let it = &plan.items[i];
            records.push((
                it.name.to_string(),
                it.index.clone(),
                StorageInfo {
                    file: 0,
                    offset,
                    length: it.nbytes,
                    transforms: Default::default(),
                },
            ));
            offset += it.nbytes;
        }
        RankWrite {
            files: vec![DataFile {
                name: format!("__{rank}_0.dcp"),
                length: offset,
            }],
            transforms: Default::default(),
            records,
            staged_peak_bytes: 0,
        }
    }

    #[test]
    fn metadata_is_sorted_and_every_record_gets_its_own_storage() {
        // Rank 0 holds the second half of "w" and a bytes item; rank 1 the
        // first half, in the other order, and declares "empty"; rank 1
        // reports its records out of plan order.
        let plans = vec![
            SavePlan {
                items: vec![chunk("w", 2, 2), bytes("step", 3)],
                declared: vec![],
            },
            SavePlan {
                items: vec![bytes("a.rng", 5), chunk("w", 0, 2)],
                declared: vec![TensorDecl {
                    name: "empty".into(),
                    dtype: DType::F16,
                    shape: vec![0],
                }],
            },
        ];
        let writes = vec![wrote(0, &plans[0], &[0, 1]), wrote(1, &plans[1], &[1, 0])];
        let md =
            assemble_metadata("id", 7, &plans, writes, FormatKind::Raw, &BTreeMap::new()).unwrap();
        let names: Vec<&str> = md.items.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.rng", "empty", "step", "w"]);
        assert_eq!(
            (md.world_size, md.generation, md.save_id.as_str()),
            (2, 7, "id")
        );
        assert_eq!(md.files.len(), 2);
        let ItemMeta::Tensor { chunks, shape, .. } = &md.items[3].1 else {
            panic!("w is a tensor")
        };
        assert_eq!(&shape[..], &[4, 2]);
        // Chunks by offsets: rank 1's (file 1, written first) first.
        assert_eq!(chunks[0].region.offsets[..], [0, 0]);
        assert_eq!((chunks[0].storage.file, chunks[0].storage.offset), (1, 0));
        assert_eq!(chunks[1].region.offsets[..], [2, 0]);
        assert_eq!((chunks[1].storage.file, chunks[1].storage.offset), (0, 0));
        match &md.items[0].1 {
            ItemMeta::Bytes { length, storage } => {
                assert_eq!((*length, storage.file, storage.offset), (5, 1, 16))
            }
            other => panic!("a.rng: {other:?}"),
        }
        match &md.items[2].1 {
            ItemMeta::Bytes { storage, .. } => assert_eq!((storage.file, storage.offset), (0, 16)),
            other => panic!("step: {other:?}"),
        }
        match &md.items[1].1 {
            ItemMeta::Tensor { chunks, dtype, .. } => {
                assert!(chunks.is_empty());
                assert_eq!(*dtype, DType::F16);
            }
            other => panic!("empty: {other:?}"),
        }
        md.validate().unwrap();
    }

    #[test]
    fn write_results_that_miss_or_add_records_are_refused() {
        let plans = vec![SavePlan {
            items: vec![chunk("w", 0, 2), chunk("w", 2, 2)],
            declared: vec![],
        }];
        let mut w = wrote(0, &plans[0], &[0, 1]);
        w.records.pop();
        let e = assemble_metadata("id", 1, &plans, vec![w], FormatKind::Raw, &BTreeMap::new())
            .unwrap_err();
        assert!(
            e.message().contains("reported 1 records for 2 assigned"),
            "{e}"
        );

        let mut w = wrote(0, &plans[0], &[0, 1]);
        w.records[1].0 = "other".into();
        let e = assemble_metadata("id", 1, &plans, vec![w], FormatKind::Raw, &BTreeMap::new())
            .unwrap_err();
        assert!(
            e.message().contains("other: written but not assigned"),
            "{e}"
        );

        let e = assemble_metadata("id", 1, &plans, vec![], FormatKind::Raw, &BTreeMap::new())
            .unwrap_err();
        assert!(e.message().contains("0 write results for 1 plans"), "{e}");
    }
}
