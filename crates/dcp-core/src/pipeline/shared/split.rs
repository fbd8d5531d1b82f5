//! Who reads what when the ranks of one process lend each other their
//! buffers: the saved chunks two or more ranks read (each rank reads the
//! others alone, before it lends anything), in (item, chunk) order, cut
//! into one run per rank of about equal stored bytes ([`cuts`]), and each
//! rank's part of every rank's plan of them ([`served_reads`]).
//!
//! A rank serves a chunk whether or not it needs any of it (it writes
//! straight into the buffers of the ranks that do), so the runs can be
//! balanced by bytes alone. Cutting in key order rather than file order
//! costs nothing in locality: a save writes each rank's items in name
//! order, so a run of keys is a run of records in each data file.

use crate::metadata::{ItemMeta, Metadata};
use crate::pipeline::prefetch::prefetch;
use crate::pipeline::read::Reads;
use crate::plan::{LoadPlan, ReadItem};

/// A saved chunk: (metadata item index, chunk index).
pub(super) type Key = (u32, u32);

/// How many keys ahead [`cuts`] hints the cache about the chunk whose
/// stored length it looks up (each lookup is a miss into the metadata).
const PREFETCH_AHEAD: usize = 8;

/// Lists of sorted keys merged by comparing their heads (one pass); more
/// lists than this are concatenated and sorted instead.
const MERGE_MAX_LISTS: usize = 16;

/// Cut the saved chunks of `lists` (sorted, distinct keys each; the lending
/// path passes one list, the shared chunks) into `world` runs in key order of about equal stored bytes: each chunk
/// goes to the rank whose equal share of the bytes holds the chunk's middle
/// byte. Returns the first key of each run after the first (at most
/// `world - 1`, ascending; fewer when the last ranks get nothing), which
/// [`reader_of`] and [`served_reads`] read. A key the metadata does not
/// have counts as empty (the planner that named it fails the read later).
pub(super) fn cuts(md: &Metadata, lists: &[&[Key]], world: usize) -> Vec<Key> {
    let union = union(lists);
    let len = |k: Key| match md.items.get(k.0 as usize).map(|i| &i.1) {
        Some(ItemMeta::Tensor { chunks, .. }) => {
            chunks.get(k.1 as usize).map_or(0, |c| c.storage.length)
        }
        _ => 0,
    };
    let hint = |k: Key| {
        if let Some((_, ItemMeta::Tensor { chunks, .. })) = md.items.get(k.0 as usize) {
            if let Some(c) = chunks.get(k.1 as usize) {
                prefetch(c);
            }
        }
    };
    let mut lens = Vec::with_capacity(union.len());
    for (i, &k) in union.iter().enumerate() {
        if let Some(&ahead) = union.get(i + PREFETCH_AHEAD) {
            hint(ahead);
        }
        lens.push(len(k));
    }
    let total: u128 = lens.iter().map(|&l| u128::from(l)).sum::<u128>().max(1);
    let mut out = Vec::with_capacity(world.saturating_sub(1));
    let mut before: u128 = 0;
    for (&k, &l) in union.iter().zip(&lens) {
        let mid = before + u128::from(l) / 2;
        let reader = ((mid * world as u128 / total) as usize).min(world.saturating_sub(1));
        // Readers only grow along the keys: a new reader's first key is a
        // cut (once for each reader it moves past).
        while out.len() < reader {
            out.push(k);
        }
        before += u128::from(l);
    }
    out
}

/// The rank that reads `key` under `cuts` (see [`cuts`]).
pub(super) fn reader_of(cuts: &[Key], key: Key) -> usize {
    cuts.partition_point(|c| *c <= key)
}

/// Every key of `lists` (each sorted and distinct), once, in order.
fn union(lists: &[&[Key]]) -> Vec<Key> {
    if lists.len() > MERGE_MAX_LISTS {
        let mut all = lists.concat();
        all.sort_unstable();
        all.dedup();
        return all;
    }
    let mut heads = vec![0usize; lists.len()];
    let mut out = Vec::with_capacity(lists.iter().map(|l| l.len()).max().unwrap_or(0));
    loop {
        let mut min: Option<Key> = None;
        for (l, &h) in lists.iter().zip(&heads) {
            if let Some(&k) = l.get(h) {
                if min.is_none_or(|m| k < m) {
                    min = Some(k);
                }
            }
        }
        let Some(m) = min else {
            return out;
        };
        out.push(m);
        for (l, h) in lists.iter().zip(heads.iter_mut()) {
            if l.get(*h) == Some(&m) {
                *h += 1;
            }
        }
    }
}

/// The reads rank `rank` serves, over one flat index of every rank's
/// destination items (rank `q`'s at `bases[q]` on): the tensor reads of
/// every rank's plan (`plans[q]`) whose saved chunk `rank` reads under
/// `cuts`, borrowed, grouped by saved chunk in key order (each chunk's
/// reads together, by rank), then `rank`'s own bytes reads. `ordered[q]` says
/// whether `plans[q]`'s tensor reads come in key order (the default
/// planner's do): then `rank`'s part of it is found by binary search
/// rather than a pass over every read.
pub(super) fn served_reads<'p>(
    plans: &[&'p LoadPlan],
    ordered: &[bool],
    bases: &[usize],
    cuts: &[Key],
    rank: usize,
) -> Reads<'p> {
    let key = |r: &ReadItem| (r.md_item as u32, r.saved_chunk as u32);
    // This rank's run of keys: [lo, hi), either end open (`None`); no run
    // at all for a rank past the last cut.
    let lo: Option<Option<Key>> = match rank.checked_sub(1) {
        None => Some(None),
        Some(i) => cuts.get(i).copied().map(Some),
    };
    let hi = cuts.get(rank).copied();
    let mut mine: Vec<(Key, usize, &'p ReadItem)> = Vec::new();
    if let Some(lo) = lo {
        for (q, &plan) in plans.iter().enumerate() {
            let reads = &plan.tensor_reads[..];
            let part: Box<dyn Iterator<Item = &'p ReadItem>> = if ordered[q] {
                let start = lo.map_or(0, |l| reads.partition_point(|r| key(r) < l));
                let end = hi.map_or(reads.len(), |h| reads.partition_point(|r| key(r) < h));
                Box::new(reads[start..end.max(start)].iter())
            } else {
                Box::new(reads.iter().filter(|r| reader_of(cuts, key(r)) == rank))
            };
            mine.extend(part.map(|r| (key(r), q, r)));
        }
    }
    // Stable: each chunk's reads stay in rank order, then plan order. The
    // parts of ordered plans are sorted runs, which the sort merges.
    mine.sort_by_key(|m| m.0);
    let own = plans.get(rank).map_or(&[][..], |p| &p.bytes_reads[..]);
    Reads::Served {
        tensor: mine
            .into_iter()
            .map(|(_, q, r)| (r, bases[q] + r.dest_item))
            .collect(),
        bytes: own
            .iter()
            .map(|b| crate::plan::BytesRead {
                dest_item: bases[rank] + b.dest_item,
                ..b.clone()
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{ChunkMeta, DataFile, StorageInfo};
    use crate::model::ChunkBox;
    use crate::DType;

    /// One 1-D tensor item per entry of `chunk_lens`, each chunk stored
    /// with the given length.
    fn md(chunk_lens: &[&[u64]]) -> Metadata {
        let mut off = 0;
        let items = chunk_lens
            .iter()
            .enumerate()
            .map(|(i, lens)| {
                let chunks = lens
                    .iter()
                    .enumerate()
                    .map(|(c, &l)| {
                        let storage = StorageInfo {
                            file: 0,
                            offset: off,
                            length: l,
                            transforms: Default::default(),
                        };
                        off += l;
                        ChunkMeta {
                            region: ChunkBox::new(vec![c as u64], vec![1]).unwrap(),
                            storage,
                        }
                    })
                    .collect();
                (
                    format!("t{i}"),
                    ItemMeta::Tensor {
                        dtype: DType::U8,
                        shape: vec![lens.len() as u64].into(),
                        chunks,
                    },
                )
            })
            .collect();
        Metadata {
            save_id: "x".into(),
            world_size: 2,
            format: crate::metadata::FormatKind::Raw,
            files: vec![DataFile {
                name: "f".into(),
                length: off,
            }],
            transforms: Default::default(),
            items,
            user: Default::default(),
            generation: 1,
        }
    }

    #[test]
    fn union_merges_sorted_lists_once_each() {
        let a: &[Key] = &[(0, 0), (1, 0), (3, 1)];
        let b: &[Key] = &[(0, 0), (2, 0), (3, 1), (4, 0)];
        let want = vec![(0, 0), (1, 0), (2, 0), (3, 1), (4, 0)];
        assert_eq!(union(&[a, b]), want);
        assert_eq!(union(&[a, &[], b]), want);
        // Past the merge's list count: the sorted concatenation.
        let many: Vec<&[Key]> = std::iter::repeat_n(a, MERGE_MAX_LISTS + 1)
            .chain([b])
            .collect();
        assert_eq!(union(&many), want);
    }

    #[test]
    fn cuts_balance_stored_bytes_in_key_order() {
        // Four chunks of 10 bytes and one of 40: two readers split 80
        // bytes at 40 (the big chunk's middle byte is in the second half).
        let m = md(&[&[10, 10], &[10, 10], &[40]]);
        let keys: &[Key] = &[(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)];
        let cuts2 = cuts(&m, &[keys, &keys[..2]], 2);
        assert_eq!(cuts2, vec![(2, 0)]);
        let readers: Vec<usize> = keys.iter().map(|&k| reader_of(&cuts2, k)).collect();
        assert_eq!(readers, vec![0, 0, 0, 0, 1]);
        // Four readers of the same bytes: the big chunk's middle byte
        // (60 of 80) lies in the fourth share, so the third reader gets
        // nothing (two cuts at the same key).
        let cuts4 = cuts(&m, &[keys], 4);
        assert_eq!(cuts4, vec![(1, 0), (2, 0), (2, 0)]);
        let readers: Vec<usize> = keys.iter().map(|&k| reader_of(&cuts4, k)).collect();
        assert_eq!(readers, vec![0, 0, 1, 1, 3]);
        // One reader: no cuts. Nothing to read: no cuts.
        assert!(cuts(&m, &[keys], 1).is_empty());
        assert!(cuts(&m, &[&[]], 3).is_empty());
        // Keys the metadata lacks count as empty rather than panic.
        assert_eq!(cuts(&m, &[&[(9, 0), (2, 7)]], 2), Vec::<Key>::new());
    }

    fn read(dest_item: usize, md_item: usize, chunk: usize, tag: u64) -> ReadItem {
        ReadItem {
            dest_item,
            dest_chunk: 0,
            md_item,
            saved_chunk: chunk,
            overlap: ChunkBox::new(vec![tag], vec![1]).unwrap(),
        }
    }

    /// Every rank's part, together, is every read of every plan exactly
    /// once, each at its rank's base, grouped by chunk in rank order;
    /// ordered and unordered plans give the same parts.
    #[test]
    fn served_plans_partition_every_read() {
        let p0 = LoadPlan {
            tensor_reads: vec![read(0, 0, 0, 0), read(0, 0, 1, 1), read(1, 2, 0, 2)],
            bytes_reads: vec![crate::plan::BytesRead {
                dest_item: 2,
                md_item: 3,
            }],
        };
        let p1 = LoadPlan {
            tensor_reads: vec![read(0, 0, 1, 10), read(1, 1, 0, 11), read(2, 2, 0, 12)],
            bytes_reads: vec![],
        };
        let bases = [0, 3];
        let cuts: Vec<Key> = vec![(1, 0)];
        let tags = |p: &Reads<'_>| -> Vec<(usize, u64)> {
            p.tensors()
                .map(|(r, dest_item)| (dest_item, r.overlap.offsets[0]))
                .collect()
        };
        let mut unordered = p1.clone();
        unordered.tensor_reads.reverse();
        for (plans, ordered) in [
            ([&p0, &p1], [true, true]),
            ([&p0, &unordered], [true, false]),
        ] {
            let s0 = served_reads(&plans, &ordered, &bases, &cuts, 0);
            let s1 = served_reads(&plans, &ordered, &bases, &cuts, 1);
            assert_eq!(tags(&s0), vec![(0, 0), (0, 1), (3, 10)]);
            assert_eq!(tags(&s1), vec![(4, 11), (1, 2), (5, 12)]);
            // Bytes reads stay with their own rank.
            assert_eq!(s0.bytes()[0].dest_item, 2);
            assert!(s1.bytes().is_empty());
        }
        // A rank past the cuts (nothing left for it) serves no tensor
        // reads, only its own bytes reads.
        let s = served_reads(&[&p0, &p1, &p0], &[true; 3], &[0, 3, 6], &cuts, 2);
        assert_eq!(s.tensor_len(), 0);
        assert_eq!(s.bytes()[0].dest_item, 8);
    }
}
