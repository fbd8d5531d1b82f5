//! Shared reads across ranks: when several ranks need parts of the same saved
//! chunk (a resharded load, or a replicated tensor loaded everywhere), one
//! rank reads it once and sends every other rank the slices it needs.
//!
//! Every rank all-gathers what it needs; every rank then computes the same
//! schedule: which rank reads each shared chunk (the one needing most of it),
//! and rounds that keep each rank's in-flight bytes under a budget. Each round
//! is one `all_to_all`. Slices travel compacted (only the overlap's
//! elements), so the scheme works for any transport, not only shared memory.

use crate::metadata::{ItemMeta, Metadata};
use crate::model::ChunkBox;
use crate::plan::{LoadPlan, ReadItem};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What one rank needs of one saved chunk: the overlaps, in the order of its
/// plan's read items.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Need {
    pub item: u32,
    pub chunk: u32,
    pub overlaps: Vec<ChunkBox>,
    /// The destination (item index, chunk index) of each overlap, for ranks
    /// that fill each other's buffers in one process.
    pub dests: Vec<(u32, u32)>,
}

/// A saved chunk needed by several ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SharedChunk {
    pub item: usize,
    pub chunk: usize,
    pub elem: usize,
    pub reader: usize,
    /// For every rank needing it: (rank, index into that rank's needs).
    pub users: Vec<(usize, usize)>,
}

/// The schedule every rank computes identically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub shared: Vec<SharedChunk>,
    /// Indices into `shared`, one list per round.
    pub rounds: Vec<Vec<usize>>,
}

/// The saved chunks `plan` reads, as sorted, distinct `(item, chunk)`.
pub(crate) fn chunk_keys(plan: &LoadPlan) -> Vec<(u32, u32)> {
    let mut k: Vec<(u32, u32)> = plan
        .tensor_reads
        .iter()
        .map(|r| (r.md_item as u32, r.saved_chunk as u32))
        .collect();
    k.sort_unstable();
    k.dedup();
    k
}

/// The keys that two or more of `lists` hold, sorted and distinct. Each
/// list should be sorted and distinct (a rank's [`chunk_keys`]): then, for
/// a few lists (the ranks of a node, of a small job), a merge, linear where
/// sorting every rank's keys together would cost n log n on every rank; for
/// many lists, or any list out of order, that sort.
pub(crate) fn repeated_keys<L: AsRef<[(u32, u32)]>>(lists: &[L]) -> Vec<(u32, u32)> {
    const MERGE_MAX_LISTS: usize = 16;
    let lists: Vec<&[(u32, u32)]> = lists.iter().map(AsRef::as_ref).collect();
    let ordered = || lists.iter().all(|l| l.windows(2).all(|w| w[0] < w[1]));
    if lists.len() > MERGE_MAX_LISTS || !ordered() {
        let mut every: Vec<(u32, u32)> = lists.concat();
        every.sort_unstable();
        let mut shared: Vec<(u32, u32)> = every
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        shared.dedup();
        return shared;
    }
    let mut heads = vec![0usize; lists.len()];
    let mut shared = Vec::new();
    loop {
        let Some(min) = lists
            .iter()
            .zip(&heads)
            .filter_map(|(l, &h)| l.get(h))
            .min()
            .copied()
        else {
            return shared;
        };
        let mut holders = 0;
        for (l, h) in lists.iter().zip(heads.iter_mut()) {
            if l.get(*h) == Some(&min) {
                *h += 1;
                holders += 1;
            }
        }
        if holders > 1 {
            shared.push(min);
        }
    }
}

/// This rank's needs, grouped by saved chunk in plan order.
pub(crate) fn needs_of(plan: &LoadPlan) -> Vec<Need> {
    needs_in_item_order(plan).unwrap_or_else(|| needs_by_map(plan))
}

/// [`needs_of`] for a plan whose reads come item by item (the default
/// planner's: destination and metadata are both sorted by name), each
/// item reading few saved chunks: grouped within each item's run, without
/// a map. `None` for any other plan.
fn needs_in_item_order(plan: &LoadPlan) -> Option<Vec<Need>> {
    const MAX_RUN: usize = 32;
    let mut out: Vec<Need> = Vec::new();
    let mut run = 0usize;
    for r in &plan.tensor_reads {
        let (item, chunk) = (r.md_item as u32, r.saved_chunk as u32);
        match out.last() {
            Some(n) if n.item > item => return None,
            Some(n) if n.item == item => {}
            _ => run = out.len(),
        }
        let dest = (r.dest_item as u32, r.dest_chunk as u32);
        let len = out.len();
        match out[run..].iter_mut().find(|n| n.chunk == chunk) {
            Some(n) => {
                n.overlaps.push(r.overlap.clone());
                n.dests.push(dest);
            }
            None if len - run >= MAX_RUN => return None,
            None => out.push(Need {
                item,
                chunk,
                overlaps: vec![r.overlap.clone()],
                dests: vec![dest],
            }),
        }
    }
    Some(out)
}

/// [`needs_of`] for any plan.
fn needs_by_map(plan: &LoadPlan) -> Vec<Need> {
    type Overlaps = (Vec<ChunkBox>, Vec<(u32, u32)>);
    let mut order: Vec<(u32, u32)> = Vec::new();
    let mut map: BTreeMap<(u32, u32), Overlaps> = BTreeMap::new();
    for r in &plan.tensor_reads {
        let key = (r.md_item as u32, r.saved_chunk as u32);
        let e = map.entry(key).or_default();
        if e.0.is_empty() {
            order.push(key);
        }
        e.0.push(r.overlap.clone());
        e.1.push((r.dest_item as u32, r.dest_chunk as u32));
    }
    order
        .into_iter()
        .map(|k| {
            let (overlaps, dests) = map.remove(&k).unwrap_or_default();
            Need {
                item: k.0,
                chunk: k.1,
                overlaps,
                dests,
            }
        })
        .collect()
}

/// Compute the schedule from every rank's needs. `budget` bounds, per rank
/// and round, the decoded chunks it reads plus the slices it receives.
/// Each shared chunk's reader is the user needing most of it (so little is
/// sent), the least loaded on ties. (Ranks of one process, which lend each
/// other their buffers, need no schedule: see `shared::split`.)
pub(crate) fn schedule<N: AsRef<[Need]>>(md: &Metadata, needs: &[N], budget: u64) -> Schedule {
    schedule_by_need(md, needs, budget)
}

/// Give the shared chunks of `out` to `world` readers in file order, as
/// contiguous runs of about equal bytes, all in one round: balanced, and
/// each rank reads neighbouring records (a device's readahead then serves
/// it, where readers taking every other record would defeat it).
fn spread(md: &Metadata, world: usize, out: &mut Schedule) {
    let place = |c: &SharedChunk| match &md.items[c.item].1 {
        ItemMeta::Tensor { chunks, .. } => {
            let st = &chunks[c.chunk].storage;
            (st.file, st.offset, st.length)
        }
        ItemMeta::Bytes { .. } => (0, 0, 0),
    };
    // Each chunk's place, looked up once (each lookup is a cache miss
    // into the metadata), then ordered.
    let mut order: Vec<((u32, u64, u64), usize)> = out
        .shared
        .iter()
        .enumerate()
        .map(|(i, c)| (place(c), i))
        .collect();
    order.sort_unstable();
    let total: u64 = order.iter().map(|&((_, _, len), _)| len).sum();
    let mut before = 0u64;
    for ((_, _, len), i) in order {
        // The rank whose equal share holds this record's middle byte.
        let mid = before + len / 2;
        let reader = (u128::from(mid) * world as u128 / u128::from(total.max(1))) as usize;
        out.shared[i].reader = reader.min(world - 1);
        before += len;
    }
    // Nothing is staged: one round holds every shared chunk.
    out.rounds = vec![(0..out.shared.len()).collect()];
}

/// The schedule of [`schedule`] (by need, in budgeted rounds) for ranks
/// exchanging through a node window: when it has one round, the readers
/// are [`spread`] in file order instead, if every rank's bytes (chunks
/// read plus slices served and received) still fit `budget`.
pub(crate) fn schedule_windowed(md: &Metadata, needs: &[Vec<Need>], budget: u64) -> Schedule {
    let by_need = schedule_by_need(md, needs, budget);
    if by_need.rounds.len() != 1 {
        return by_need;
    }
    let mut spread_out = by_need.clone();
    spread(md, needs.len(), &mut spread_out);
    let mut cost = vec![0u64; needs.len()];
    for c in &spread_out.shared {
        if let ItemMeta::Tensor { chunks, .. } = &md.items[c.item].1 {
            cost[c.reader] += chunks[c.chunk].region.numel() * c.elem as u64;
        }
        for &(r, i) in &c.users {
            if r != c.reader {
                let b: u64 = needs[r][i]
                    .overlaps
                    .iter()
                    .map(|o| o.numel() * c.elem as u64)
                    .sum();
                cost[r] += b;
                cost[c.reader] += b;
            }
        }
    }
    if cost.iter().all(|&c| c <= budget) {
        spread_out
    } else {
        by_need
    }
}

fn schedule_by_need<N: AsRef<[Need]>>(md: &Metadata, needs: &[N], budget: u64) -> Schedule {
    // (saved chunk, rank, index into its needs, bytes needed), sorted by
    // saved chunk then rank: one flat list, not a map of lists.
    let mut flat: Vec<((u32, u32), usize, usize, u64)> =
        Vec::with_capacity(needs.iter().map(|l| l.as_ref().len()).sum());
    for (rank, list) in needs.iter().enumerate() {
        for (i, n) in list.as_ref().iter().enumerate() {
            let elem = elem_size(md, n.item as usize) as u64;
            let bytes: u64 = n.overlaps.iter().map(|o| o.numel() * elem).sum();
            flat.push(((n.item, n.chunk), rank, i, bytes));
        }
    }
    flat.sort_unstable_by_key(|u| (u.0, u.1, u.2));
    let users = flat.chunk_by(|a, b| a.0 == b.0).map(|g| (g[0].0, g));
    let world = needs.len();
    let mut load = vec![0u64; world];
    let mut out = Schedule::default();
    let mut round_cost = vec![0u64; world];
    let mut round: Vec<usize> = Vec::new();
    let mut cost = vec![0u64; world];
    for ((item, chunk), us) in users {
        if us.len() < 2 {
            continue;
        }
        let (item, chunk) = (item as usize, chunk as usize);
        let elem = elem_size(md, item);
        let logical = match &md.items[item].1 {
            ItemMeta::Tensor { chunks, .. } => chunks[chunk].region.numel() * elem as u64,
            ItemMeta::Bytes { .. } => continue,
        };
        // The rank needing most of it reads it; ranks needing nearly as
        // much (within 1/8: an uneven split of columns) count as tied, and
        // the least loaded of them reads, so that ranks in separate
        // processes share the reading instead of the first taking it all.
        let most = us.iter().map(|u| u.3).max().unwrap_or(0);
        let reader = us
            .iter()
            .filter(|u| u.3 >= most - most / 8)
            .min_by(|a, b| load[a.1].cmp(&load[b.1]).then(a.1.cmp(&b.1)))
            .map(|u| u.1)
            .expect("at least two users");
        load[reader] += logical;
        cost.iter_mut().for_each(|c| *c = 0);
        cost[reader] += logical;
        for &(_, r, _, b) in us {
            if r != reader {
                cost[r] += b;
                cost[reader] += b;
            }
        }
        let over = (0..world).any(|r| round_cost[r] + cost[r] > budget);
        if over && !round.is_empty() {
            out.rounds.push(std::mem::take(&mut round));
            round_cost.iter_mut().for_each(|c| *c = 0);
        }
        for r in 0..world {
            round_cost[r] += cost[r];
        }
        round.push(out.shared.len());
        out.shared.push(SharedChunk {
            item,
            chunk,
            elem,
            reader,
            users: us.iter().map(|&(_, r, i, _)| (r, i)).collect(),
        });
    }
    if !round.is_empty() {
        out.rounds.push(round);
    }
    out
}

fn elem_size(md: &Metadata, item: usize) -> usize {
    match &md.items[item].1 {
        ItemMeta::Tensor { dtype, .. } => dtype.size(),
        ItemMeta::Bytes { .. } => 1,
    }
}

/// Where the slices each rank of a node serves to the other ranks of its
/// node lie in its shared-memory segment, for one round (see
/// [`Collective::node_window`](crate::Collective::node_window)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowLayout {
    /// Per shared chunk (index into [`Schedule::shared`]) read by a rank of
    /// the node: each distinct overlap another rank of the node needs, and
    /// its offset in the reader's segment. A reader's pieces follow each
    /// other from offset 0, in round order.
    pub pieces: BTreeMap<usize, Vec<(ChunkBox, usize)>>,
    /// Bytes of its segment each reader of the node uses.
    pub used: BTreeMap<usize, usize>,
}

impl WindowLayout {
    /// The offset of `overlap` of shared chunk `s` in its reader's segment.
    pub(crate) fn offset(&self, s: usize, overlap: &ChunkBox) -> Option<usize> {
        self.pieces
            .get(&s)?
            .iter()
            .find(|(o, _)| o == overlap)
            .map(|p| p.1)
    }
}

/// The [`WindowLayout`] of `round` for the ranks of `node` (ascending).
/// Every rank of the node computes the same from the same schedule; ranks
/// needing the same slice (a replicated tensor) share one piece.
pub(crate) fn window_layout(
    sched: &Schedule,
    needs: &[Vec<Need>],
    round: &[usize],
    node: &[usize],
) -> WindowLayout {
    let on = |r: usize| node.binary_search(&r).is_ok();
    let mut out = WindowLayout::default();
    for &s in round {
        let c = &sched.shared[s];
        if !on(c.reader) {
            continue;
        }
        let used = out.used.entry(c.reader).or_default();
        let mut pieces: Vec<(ChunkBox, usize)> = Vec::new();
        for &(r, i) in &c.users {
            if r == c.reader || !on(r) {
                continue;
            }
            for o in &needs[r][i].overlaps {
                if pieces.iter().any(|(b, _)| b == o) {
                    continue;
                }
                pieces.push((o.clone(), *used));
                *used += o.numel() as usize * c.elem;
            }
        }
        if !pieces.is_empty() {
            out.pieces.insert(s, pieces);
        }
    }
    out
}

/// Split `plan` into what this rank reads itself and the read items served by
/// the exchange (by shared chunk index), keeping plan order.
pub(crate) fn split_plan(
    plan: LoadPlan,
    sched: &Schedule,
) -> (LoadPlan, BTreeMap<usize, Vec<ReadItem>>) {
    // The shared chunks are sorted by (item, chunk) (see `schedule_by_need`).
    let index = |key: (usize, usize)| {
        sched
            .shared
            .binary_search_by_key(&key, |s| (s.item, s.chunk))
            .ok()
    };
    let mut local = LoadPlan {
        tensor_reads: Vec::new(),
        bytes_reads: plan.bytes_reads,
    };
    let mut shared: BTreeMap<usize, Vec<ReadItem>> = BTreeMap::new();
    for r in plan.tensor_reads {
        match index((r.md_item, r.saved_chunk)) {
            Some(s) => shared.entry(s).or_default().push(r),
            None => local.tensor_reads.push(r),
        }
    }
    (local, shared)
}

/// Destination items by index, for in-place filling.
type DestVec = Vec<(String, crate::model::DestItem)>;

/// Copy every overlap of `reads` from a decoded saved chunk into `dest`.
pub(crate) fn fill_from_chunk(
    dest: &mut DestVec,
    saved_box: &ChunkBox,
    elem: usize,
    data: &[u8],
    reads: &[ReadItem],
) {
    for r in reads {
        if let crate::model::DestItem::Tensor(t) = &mut dest[r.dest_item].1 {
            let c = &mut t.chunks[r.dest_chunk];
            crate::pipeline::copy::copy_region(
                elem,
                data,
                saved_box,
                &mut c.data,
                &c.region,
                &r.overlap,
            );
        }
    }
}

/// Append the compacted elements of each overlap (in order) to `out`: one
/// `memcpy` per contiguous run, no zero-fill.
pub(crate) fn compact(
    out: &mut Vec<u8>,
    saved_box: &ChunkBox,
    elem: usize,
    data: &[u8],
    overlaps: &[ChunkBox],
) {
    for o in overlaps {
        crate::pipeline::copy::for_each_run(elem, saved_box, o, |off, len| {
            out.extend_from_slice(&data[off..off + len])
        });
    }
}

/// Copy compacted overlaps from `msg` (starting at `*pos`) into `dest`.
/// Returns an error if the message is too short.
pub(crate) fn fill_from_compact(
    dest: &mut DestVec,
    elem: usize,
    msg: &[u8],
    pos: &mut usize,
    reads: &[ReadItem],
) -> crate::Result<()> {
    for r in reads {
        let len = r.overlap.numel() as usize * elem;
        let piece = msg.get(*pos..*pos + len).ok_or_else(|| {
            crate::Error::new(
                crate::ErrorKind::Collective,
                "shared-read message shorter than planned",
            )
        })?;
        *pos += len;
        if let crate::model::DestItem::Tensor(t) = &mut dest[r.dest_item].1 {
            let c = &mut t.chunks[r.dest_chunk];
            crate::pipeline::copy::copy_region(
                elem,
                piece,
                &r.overlap,
                &mut c.data,
                &c.region,
                &r.overlap,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{ChunkMeta, DataFile, FormatKind, StorageInfo};
    use crate::DType;

    /// The merge (up to 16 lists) and the sort (more) find the keys held
    /// more than once, and only those.
    #[test]
    fn repeated_keys_by_merge_and_by_sort_agree() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        for ranks in [0usize, 1, 2, 3, 4, 16, 17, 40] {
            let lists: Vec<Vec<(u32, u32)>> = (0..ranks)
                .map(|_| {
                    let mut l: Vec<(u32, u32)> = (0..next() % 300)
                        .map(|_| (next() % 200, next() % 3))
                        .collect();
                    l.sort_unstable();
                    l.dedup();
                    l
                })
                .collect();
            // Counted independently: keys held by two lists or more.
            let mut holders: BTreeMap<(u32, u32), usize> = BTreeMap::new();
            for k in lists.iter().flatten() {
                *holders.entry(*k).or_default() += 1;
            }
            let expect: Vec<(u32, u32)> = holders
                .into_iter()
                .filter(|&(_, n)| n > 1)
                .map(|(k, _)| k)
                .collect();
            assert_eq!(repeated_keys(&lists), expect, "{ranks} ranks");
            // Lists out of order (not what a rank sends) are sorted, not
            // merged.
            let reversed: Vec<Vec<(u32, u32)>> = lists
                .iter()
                .map(|l| l.iter().rev().copied().collect())
                .collect();
            assert_eq!(repeated_keys(&reversed), expect, "{ranks} ranks reversed");
        }
    }

    fn md(chunks: Vec<ChunkBox>) -> Metadata {
        let mut off = 0;
        let chunks = chunks
            .into_iter()
            .map(|region| {
                let length = region.numel() * 2;
                let c = ChunkMeta {
                    region,
                    storage: StorageInfo {
                        file: 0,
                        offset: off,
                        length,
                        transforms: Default::default(),
                    },
                };
                off += length;
                c
            })
            .collect();
        Metadata {
            save_id: "x".into(),
            world_size: 2,
            format: FormatKind::Raw,
            files: vec![DataFile {
                name: "f".into(),
                length: off,
            }],
            transforms: Default::default(),
            items: vec![(
                "t".into(),
                ItemMeta::Tensor {
                    dtype: DType::BF16,
                    shape: vec![4, 6].into(),
                    chunks,
                },
            )],
            user: Default::default(),
            generation: 1,
        }
    }

    fn b(o: [u64; 2], s: [u64; 2]) -> ChunkBox {
        ChunkBox::new(o.to_vec(), s.to_vec()).unwrap()
    }

    proptest::proptest! {
        /// Grouping a plan item by item gives exactly the needs the map
        /// gives (same groups, same order), whether the plan comes item by
        /// item or not, and whatever the number of chunks per item.
        #[test]
        fn needs_without_a_map_match_the_map(
            reads in proptest::collection::vec((0usize..6, 0usize..40, 0usize..3), 0..200),
            in_item_order in proptest::bool::ANY,
        ) {
            let mut reads = reads;
            if in_item_order {
                reads.sort_by_key(|r| r.0);
            }
            let plan = LoadPlan {
                tensor_reads: reads
                    .iter()
                    .enumerate()
                    .map(|(k, &(item, chunk, dc))| ReadItem {
                        dest_item: item,
                        dest_chunk: dc,
                        md_item: item,
                        saved_chunk: chunk,
                        overlap: b([k as u64, 0], [1, 1]),
                    })
                    .collect(),
                bytes_reads: Vec::new(),
            };
            proptest::prop_assert_eq!(needs_of(&plan), needs_by_map(&plan));
        }
    }

    /// Rows saved, columns loaded by 3 ranks split unevenly (9, 8, 8 of
    /// 25): every rank needs nearly as much of every chunk, so the reading
    /// is spread (one chunk each) instead of falling to rank 0, which
    /// needs a column more of each.
    #[test]
    fn nearly_equal_needs_spread_the_reading() {
        let mut m = md(vec![
            b([0, 0], [2, 25]),
            b([2, 0], [2, 25]),
            b([4, 0], [2, 25]),
        ]);
        if let ItemMeta::Tensor { shape, .. } = &mut m.items[0].1 {
            *shape = vec![6, 25].into();
        }
        let cols = [(0, 9), (9, 8), (17, 8)];
        let needs: Vec<Vec<Need>> = cols
            .iter()
            .map(|&(c0, w)| {
                (0..3)
                    .map(|k| Need {
                        item: 0,
                        chunk: k,
                        overlaps: vec![b([2 * k as u64, c0], [2, w])],
                        dests: vec![(0, 0)],
                    })
                    .collect()
            })
            .collect();
        let s = schedule(&m, &needs, 1 << 20);
        let mut readers: Vec<usize> = s.shared.iter().map(|c| c.reader).collect();
        readers.sort_unstable();
        assert_eq!(readers, vec![0, 1, 2]);
    }

    /// Splitting a plan keeps for the rank only the chunks no other rank
    /// reads, and hands the shared one's reads to the exchange.
    #[test]
    fn split_plan_keeps_what_no_other_rank_reads() {
        let m = md(vec![
            b([0, 0], [1, 6]),
            b([1, 0], [1, 6]),
            b([2, 0], [2, 6]),
        ]);
        let need = |chunk: u32, o: ChunkBox| Need {
            item: 0,
            chunk,
            overlaps: vec![o],
            dests: vec![(0, 0)],
        };
        let needs = vec![
            vec![need(0, b([0, 0], [1, 6])), need(1, b([1, 0], [1, 3]))],
            vec![need(1, b([1, 3], [1, 3])), need(2, b([2, 0], [2, 6]))],
        ];
        let s = schedule(&m, &needs, 1 << 20);
        assert_eq!(s.shared.len(), 1);
        let read = |chunk: usize, o: ChunkBox| ReadItem {
            dest_item: 0,
            dest_chunk: 0,
            md_item: 0,
            saved_chunk: chunk,
            overlap: o,
        };
        let plan = LoadPlan {
            tensor_reads: vec![read(0, b([0, 0], [1, 6])), read(1, b([1, 0], [1, 3]))],
            bytes_reads: Vec::new(),
        };
        let (local, shared) = split_plan(plan, &s);
        assert_eq!(local.tensor_reads, vec![read(0, b([0, 0], [1, 6]))]);
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[&0], vec![read(1, b([1, 0], [1, 3]))]);
    }

    #[test]
    fn shared_chunks_get_one_reader_and_budgeted_rounds() {
        let m = md(vec![b([0, 0], [2, 6]), b([2, 0], [2, 6])]);
        // Rank 0 needs columns 0..4 of both chunks, rank 1 columns 4..6.
        let needs = vec![
            vec![
                Need {
                    item: 0,
                    chunk: 0,
                    overlaps: vec![b([0, 0], [2, 4])],
                    dests: vec![(0, 0)],
                },
                Need {
                    item: 0,
                    chunk: 1,
                    overlaps: vec![b([2, 0], [2, 4])],
                    dests: vec![(0, 0)],
                },
            ],
            vec![
                Need {
                    item: 0,
                    chunk: 0,
                    overlaps: vec![b([0, 4], [2, 2])],
                    dests: vec![(0, 0)],
                },
                Need {
                    item: 0,
                    chunk: 1,
                    overlaps: vec![b([2, 4], [2, 2])],
                    dests: vec![(0, 0)],
                },
            ],
        ];
        let s = schedule(&m, &needs, 1 << 20);
        assert_eq!(s.shared.len(), 2);
        assert!(
            s.shared.iter().all(|c| c.reader == 0),
            "rank 0 needs more of each"
        );
        assert_eq!(s.rounds, vec![vec![0, 1]]);
        // A tiny budget puts each chunk in its own round.
        let s = schedule(&m, &needs, 1);
        assert_eq!(s.rounds, vec![vec![0], vec![1]]);
        // Through a node window: spread in file order when one round fits
        // the budget (each rank then reads 24 bytes and moves 8 + 16: 48,
        // where by need rank 0 would handle 64), by need in rounds
        // otherwise.
        let s = schedule_windowed(&m, &needs, 64);
        let readers: Vec<usize> = s.shared.iter().map(|c| c.reader).collect();
        assert_eq!(readers, vec![0, 1]);
        assert_eq!(s.rounds, vec![vec![0, 1]]);
        assert_eq!(schedule_windowed(&m, &needs, 48), schedule(&m, &needs, 48));
        assert_eq!(schedule_windowed(&m, &needs, 1), schedule(&m, &needs, 1));
        // A chunk needed by one rank is not shared.
        let s = schedule(&m, &[needs[0].clone(), vec![]], 1 << 20);
        assert!(s.shared.is_empty() && s.rounds.is_empty());
    }
}
