//! Load planning: intersect every destination chunk with the saved chunks
//! (a sorted sweep, not all pairs) to get read items.

use crate::error::{Error, ErrorKind, Result};
use crate::metadata::{ItemMeta, Metadata};
use crate::model::{ChunkBox, DestItem, DestStateDict};
use crate::pipeline::prefetch::prefetch;

/// Stored bytes of one saved chunk that fill part of one destination chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadItem {
    /// Index of the destination item (in name order).
    pub dest_item: usize,
    /// Index of the chunk within the destination item.
    pub dest_chunk: usize,
    /// Index of the item in [`Metadata::items`].
    pub md_item: usize,
    /// Index of the saved chunk within the metadata item.
    pub saved_chunk: usize,
    /// The shared box, in global coordinates.
    pub overlap: ChunkBox,
}

/// A bytes item to read whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BytesRead {
    /// Index of the destination item (in name order).
    pub dest_item: usize,
    /// Index of the item in [`Metadata::items`].
    pub md_item: usize,
}

/// Everything one rank reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadPlan {
    /// Tensor reads.
    pub tensor_reads: Vec<ReadItem>,
    /// Bytes-item reads.
    pub bytes_reads: Vec<BytesRead>,
}

/// Decides which stored bytes fill which destination.
pub trait LoadPlanner: Send + Sync {
    /// Plan one rank's reads. A planner plans from `dest`'s names, dtypes,
    /// shapes and regions, never from its buffers: the buffers may already
    /// be moved out for reading (ranks of one process that lend each other
    /// their buffers move them while rank 0 reads the metadata, rank 0
    /// included), each then empty.
    fn plan(&self, metadata: &Metadata, dest: &DestStateDict) -> Result<LoadPlan>;
}

/// How many destination entries ahead the default planner hints the
/// cache about what each entry points to (its name, shape and chunk list).
const FAR_AHEAD: usize = 8;

/// The default planner. Refuses a destination whose dtype or shape differs
/// from the saved item, a region that no saved chunk covers, and (unless
/// `allow_missing`) a name the checkpoint lacks. A destination naming a
/// subset of the checkpoint's items loads only those.
#[derive(Clone, Debug, Default)]
pub struct DefaultLoadPlanner {
    /// Skip destination items the checkpoint does not have instead of failing.
    pub allow_missing: bool,
}

impl LoadPlanner for DefaultLoadPlanner {
    fn plan(&self, md: &Metadata, dest: &DestStateDict) -> Result<LoadPlan> {
        // About one read per destination item (many small items): sized up
        // front rather than grown.
        let mut plan = LoadPlan {
            tensor_reads: Vec::with_capacity(dest.len()),
            bytes_reads: Vec::new(),
        };
        // Both the destination and the metadata are sorted by name: each
        // name is looked for after the previous one's place.
        let mut from = 0usize;
        // How far past `from` the previous name was: a destination that
        // takes every k-th item of the checkpoint (a rank's share of
        // round-robin items) finds each next name there with one
        // comparison.
        let mut stride = 0usize;
        let mut items = dest.iter().enumerate().peekable();
        // What the entry [`FAR_AHEAD`] on points to, hinted to the cache:
        // its name, shape and chunk list (allocations of their own, each a
        // miss that the CPU now waits for during the entries before it;
        // the shape's, compared with the saved shape, was most of the
        // planner's time).
        let mut far = dest.iter().skip(FAR_AHEAD);
        while let Some((di, (name, item))) = items.next() {
            if let Some((n, it)) = far.next() {
                prefetch(n.as_str());
                if let DestItem::Tensor(t) = it {
                    prefetch(&t.shape[..]);
                    prefetch(&t.chunks[..]);
                }
            }
            let found = find_from(&md.items, from, stride, name);
            from = match found {
                Ok(i) => {
                    stride = i - from.min(i);
                    i + 1
                }
                Err(i) => i,
            };
            // What the next name's lookup and match read first in the
            // checkpoint: the saved item where it is likely to be, a cache
            // miss (names and chunk lists are allocations of their own)
            // that the CPU now waits for during this item's work.
            if items.peek().is_some() {
                if let Some((n, saved)) = md.items.get(from.saturating_add(stride)) {
                    prefetch(n.as_str());
                    if let ItemMeta::Tensor { chunks, .. } = saved {
                        prefetch(&chunks[..]);
                    }
                }
            }
            let Ok(mi) = found else {
                if self.allow_missing {
                    continue;
                }
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{name}: not in the checkpoint"),
                ));
            };
            match (item, &md.items[mi].1) {
                (DestItem::Bytes(_), ItemMeta::Bytes { .. }) => plan.bytes_reads.push(BytesRead {
                    dest_item: di,
                    md_item: mi,
                }),
                (
                    DestItem::Tensor(t),
                    ItemMeta::Tensor {
                        dtype,
                        shape,
                        chunks,
                    },
                ) => {
                    if t.dtype != *dtype || t.shape[..] != shape[..] {
                        return Err(Error::invalid(format!(
                            "{name}: saved as {dtype} {shape:?}, destination asks for {} {:?}",
                            t.dtype, t.shape
                        )));
                    }
                    // One saved chunk (an item saved whole, or by one
                    // rank): no index to build.
                    let saved: Vec<&ChunkBox> = if chunks.len() > 1 {
                        chunks.iter().map(|c| &c.region).collect()
                    } else {
                        Vec::new()
                    };
                    let index = (chunks.len() > 1).then(|| SweepIndex::new(&saved));
                    for (dc, d) in t.chunks.iter().enumerate() {
                        if d.region.is_empty() {
                            continue;
                        }
                        let mut covered: u64 = 0;
                        let mut push = |sc: usize, overlap: ChunkBox| {
                            covered += overlap.numel();
                            plan.tensor_reads.push(ReadItem {
                                dest_item: di,
                                dest_chunk: dc,
                                md_item: mi,
                                saved_chunk: sc,
                                overlap,
                            });
                        };
                        match &index {
                            Some(index) => index.for_each_overlap(&saved, &d.region, push),
                            None => {
                                if let Some(o) =
                                    chunks.first().and_then(|c| c.region.intersect(&d.region))
                                {
                                    push(0, o);
                                }
                            }
                        }
                        if covered != d.region.numel() {
                            return Err(Error::new(
                                ErrorKind::NotFound,
                                format!(
                                    "{name}: destination chunk ({}) is not covered by the saved chunks ({} of {} elements saved)",
                                    d.region,
                                    covered,
                                    d.region.numel()
                                ),
                            ));
                        }
                    }
                }
                (DestItem::Bytes(_), ItemMeta::Tensor { .. }) => {
                    return Err(Error::invalid(format!(
                        "{name}: saved as a tensor, destination asks for bytes"
                    )))
                }
                (DestItem::Tensor(_), ItemMeta::Bytes { .. }) => {
                    return Err(Error::invalid(format!(
                        "{name}: saved as bytes, destination asks for a tensor"
                    )))
                }
            }
        }
        Ok(plan)
    }
}

/// Where `name` is in `items` (sorted by name, names unique), looked for
/// at or after `from` by galloping: the place as `binary_search_by` gives
/// it, in O(log distance) comparisons from `from` (a run of sorted names
/// costs a few comparisons each, not log of the whole checkpoint). The
/// item `stride` places past `from` is tried first (where the previous
/// search found its name, relative to its start). A name before `from` is
/// searched for in the whole list.
fn find_from<T>(
    items: &[(String, T)],
    from: usize,
    stride: usize,
    name: &str,
) -> std::result::Result<usize, usize> {
    let from = from.min(items.len());
    // The usual cases: the name is as far past `from` as the previous one
    // was, or it is the next item (one comparison each; names are unique,
    // so an equal name is the place).
    let guess = from.saturating_add(stride);
    if items.get(guess).is_some_and(|(n, _)| n == name) {
        return Ok(guess);
    }
    if stride > 0 && items.get(from).is_some_and(|(n, _)| n == name) {
        return Ok(from);
    }
    if from > 0 && items[from - 1].0.as_str() >= name {
        return items.binary_search_by(|(n, _)| n.as_str().cmp(name));
    }
    let mut step = 1usize;
    let mut hi = from;
    while hi < items.len() && items[hi].0.as_str() < name {
        hi = from + step;
        step *= 2;
    }
    // The last probe below `name` (or `from`): the place is in lo..=hi.
    let lo = from + step / 4;
    let hi = (hi + 1).min(items.len());
    items[lo..hi]
        .binary_search_by(|(n, _)| n.as_str().cmp(name))
        .map(|i| i + lo)
        .map_err(|i| i + lo)
}

/// Saved chunks sorted along the dimension with the most distinct offsets;
/// a query visits only chunks whose extent on that dimension can reach it.
struct SweepIndex {
    dim: usize,
    order: Vec<usize>,
    starts: Vec<u64>,
    max_extent: u64,
}

impl SweepIndex {
    fn new(saved: &[&ChunkBox]) -> SweepIndex {
        let ndim = saved.first().map_or(0, |b| b.ndim());
        let dim = (0..ndim)
            .max_by_key(|&d| {
                let mut v: Vec<u64> = saved.iter().map(|b| b.offsets[d]).collect();
                v.sort_unstable();
                v.dedup();
                v.len()
            })
            .unwrap_or(0);
        let mut order: Vec<usize> = (0..saved.len()).collect();
        if ndim > 0 {
            order.sort_by_key(|&i| saved[i].offsets[dim]);
        }
        let starts = if ndim > 0 {
            order.iter().map(|&i| saved[i].offsets[dim]).collect()
        } else {
            vec![0; order.len()]
        };
        let max_extent = if ndim > 0 {
            saved.iter().map(|b| b.sizes[dim]).max().unwrap_or(0)
        } else {
            1
        };
        SweepIndex {
            dim,
            order,
            starts,
            max_extent,
        }
    }

    fn for_each_overlap(
        &self,
        saved: &[&ChunkBox],
        q: &ChunkBox,
        mut f: impl FnMut(usize, ChunkBox),
    ) {
        if q.ndim() == 0 {
            for &i in &self.order {
                if let Some(o) = saved[i].intersect(q) {
                    f(i, o);
                }
            }
            return;
        }
        let lo = q.offsets[self.dim].saturating_sub(self.max_extent.saturating_sub(1));
        let hi = q.offsets[self.dim] + q.sizes[self.dim];
        let a = self.starts.partition_point(|&s| s < lo);
        let b = self.starts.partition_point(|&s| s < hi);
        for &i in &self.order[a..b] {
            if let Some(o) = saved[i].intersect(q) {
                f(i, o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{ChunkMeta, DataFile, FormatKind, StorageInfo};
    use crate::DType;
    use proptest::prelude::*;

    fn md_with(shape: Vec<u64>, boxes: Vec<ChunkBox>) -> Metadata {
        let mut chunks = Vec::new();
        let mut off = 0;
        for b in boxes {
            let len = b.numel() * 2;
            chunks.push(ChunkMeta {
                region: b,
                storage: StorageInfo {
                    file: 0,
                    offset: off,
                    length: len,
                    transforms: Default::default(),
                },
            });
            off += len;
        }
        Metadata {
            save_id: "x".into(),
            world_size: 1,
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
                    shape: shape.into(),
                    chunks,
                },
            )],
            user: Default::default(),
            generation: 1,
        }
    }

    /// Split `n` into `parts` nearly equal pieces.
    fn split(n: u64, parts: u64) -> Vec<(u64, u64)> {
        (0..parts)
            .map(|p| (n * p / parts, n * (p + 1) / parts - n * p / parts))
            .collect()
    }

    fn grid(shape: &[u64], parts: &[u64]) -> Vec<ChunkBox> {
        let mut out = vec![ChunkBox::full(&[])];
        for (d, &n) in shape.iter().enumerate() {
            let mut next = Vec::new();
            for b in &out {
                for (o, s) in split(n, parts[d]) {
                    let mut c = b.clone();
                    c.offsets.push(o);
                    c.sizes.push(s);
                    next.push(c);
                }
            }
            out = next;
        }
        out
    }

    proptest! {
        #[test]
        fn sweep_matches_all_pairs(
            rows in 1u64..40, cols in 1u64..40,
            sp in (1u64..5, 1u64..5), dp in (1u64..5, 1u64..5)
        ) {
            let shape = vec![rows, cols];
            let saved = grid(&shape, &[sp.0.min(rows), sp.1.min(cols)]);
            let dest_boxes = grid(&shape, &[dp.0.min(rows), dp.1.min(cols)]);
            let md = md_with(shape.clone(), saved.clone());
            let mut dest = DestStateDict::new();
            dest.want_tensor("t", DType::BF16, shape, dest_boxes.clone()).unwrap();
            let plan = DefaultLoadPlanner::default().plan(&md, &dest).unwrap();
            let mut expect = Vec::new();
            for (dc, d) in dest_boxes.iter().enumerate() {
                for (sc, s) in saved.iter().enumerate() {
                    if let Some(o) = s.intersect(d) {
                        expect.push((dc, sc, o));
                    }
                }
            }
            let mut got: Vec<_> = plan.tensor_reads.iter().map(|r| (r.dest_chunk, r.saved_chunk, r.overlap.clone())).collect();
            got.sort();
            expect.sort();
            prop_assert_eq!(got, expect);
        }
    }

    #[test]
    fn refuses_mismatch_and_gaps() {
        let md = md_with(
            vec![4, 4],
            vec![ChunkBox::new(vec![0, 0], vec![2, 4]).unwrap()],
        );
        let p = DefaultLoadPlanner::default();
        let mut d = DestStateDict::new();
        d.want_tensor("t", DType::F32, vec![4, 4], vec![ChunkBox::full(&[4, 4])])
            .unwrap();
        assert!(p
            .plan(&md, &d)
            .unwrap_err()
            .message()
            .contains("saved as bf16 [4, 4]"));
        let mut d = DestStateDict::new();
        d.want_tensor("t", DType::BF16, vec![4, 4], vec![ChunkBox::full(&[4, 4])])
            .unwrap();
        let e = p.plan(&md, &d).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.message().contains("8 of 16"), "{e}");
        let mut d = DestStateDict::new();
        d.want_bytes("nope").unwrap();
        assert_eq!(p.plan(&md, &d).unwrap_err().kind(), ErrorKind::NotFound);
        let lenient = DefaultLoadPlanner {
            allow_missing: true,
        };
        assert_eq!(lenient.plan(&md, &d).unwrap(), LoadPlan::default());
    }

    proptest! {
        /// Galloping from any place finds what a binary search of the
        /// whole list finds, present or not.
        #[test]
        fn find_from_agrees_with_binary_search(
            names in proptest::collection::btree_set(0u32..400, 0..120),
            probes in proptest::collection::vec((0u32..420, 0usize..130, 0usize..12), 1..40),
        ) {
            let items: Vec<(String, ())> =
                names.iter().map(|n| (format!("n.{n:05}"), ())).collect();
            for (p, from, stride) in probes {
                let name = format!("n.{p:05}");
                prop_assert_eq!(
                    find_from(&items, from, stride, &name),
                    items.binary_search_by(|(n, _)| n.as_str().cmp(&name)),
                    "{} from {} stride {}", name, from, stride
                );
            }
        }
    }
}
