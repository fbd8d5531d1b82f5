//! Reading records into destination chunks.
//!
//! Records are grouped by file and sorted by offset; neighbouring needed
//! ranges are coalesced (a small gap read is cheaper than another request).
//! Only the bytes a destination needs are read, except where a record must be
//! read whole: a codec was applied, or a checksum is verified. A needed range
//! that is contiguous both in the saved chunk and in the destination chunk is
//! read straight into the destination buffer. A record stored as it is whose
//! destinations tile it exactly (column shards of saved rows; several ranks'
//! buffers when ranks of one process lend them) is scattered with one copy:
//! from the page cache in 1 MiB blocks copied out by [`LineStreamer`], from a
//! device or object store with one [`FileSystem::read_scattered`] per part.
//! Everything else is read once into a buffer and scattered.
//!
//! Destinations are [`Slot`]s: each chunk's buffer behind its own lock, so
//! workers, and other ranks of the process, write disjoint parts of it.

use crate::error::{Error, Result};
use crate::metadata::{AppliedTransform, ItemMeta, Metadata};
use crate::model::{ChunkBox, DestItem, DestStateDict};
use crate::pipeline::copy::{contiguous_range, copy_region_from, spanning_range, LineStreamer};
use crate::plan::LoadPlan;
use crate::storage::FileSystem;
use crate::transform::{StreamTransformExtension, TransformKind};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What one rank's load read from storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Bytes requested from storage.
    pub bytes_read: u64,
    /// Read requests issued.
    pub requests: u64,
    /// Records touched.
    pub records: u64,
}

/// Settings of one load.
#[derive(Clone, Debug)]
pub(crate) struct ReadConfig {
    pub thread_count: usize,
    pub verify_checksums: bool,
    pub coalesce_gap: u64,
    pub max_request: u64,
    /// Records shorter than this are read through coalesced spans rather
    /// than straight into their destination.
    pub small_record: u64,
}

#[derive(Clone, Debug)]
enum Target {
    Tensor {
        dest_item: usize,
        dest_chunk: usize,
        overlap: ChunkBox,
    },
    Bytes {
        dest_item: usize,
    },
}

struct Record<'a> {
    name: &'a str,
    file: u32,
    offset: u64,
    length: u64,
    logical: u64,
    transforms: &'a [AppliedTransform],
    saved_box: Option<&'a ChunkBox>,
    elem: usize,
    targets: Vec<Target>,
}

/// A piece of a record inside a span: record index, byte range relative to
/// the record's start, and the targets it feeds.
struct Piece {
    record: usize,
    rel_start: u64,
    len: u64,
    whole: bool,
    targets: Vec<usize>,
}

enum Task {
    /// Read straight into a destination buffer.
    Direct {
        record: usize,
        target: usize,
        rel_start: u64,
        dest_start: usize,
        len: usize,
        verify: bool,
    },
    /// Read a contiguous part of a record once, scattered straight into the
    /// destination runs it feeds (one `preadv`: a single copy, however the
    /// destinations are strided). `runs` are in record order and tile the
    /// part without gaps; with `verify`, the part is the whole record and its
    /// checksums are checked over the runs afterwards.
    Scatter {
        record: usize,
        runs: Vec<Run>,
        verify: bool,
    },
    /// Read `[start, start+len)` of a file once and serve several pieces.
    Span {
        file: u32,
        start: u64,
        len: u64,
        pieces: Vec<Piece>,
    },
}

/// One contiguous run of a scattered read: `len` bytes at `rel` in the
/// record go to byte `dest` of target `target`'s destination chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    rel: u64,
    target: usize,
    dest: usize,
    len: usize,
}

/// Block size of scattered reads on backends where small reads are cheap:
/// large enough for few requests, small enough to stay in a core's cache
/// while it is copied out.
const SCATTER_BLOCK: usize = 1 << 20;

/// Largest part of a record one scatter task reads when it need not verify
/// the whole record: big records are split so several workers share them.
const SCATTER_PART: u64 = 8 << 20;

impl Task {
    fn cost(&self) -> u64 {
        match self {
            Task::Direct { len, .. } => *len as u64,
            Task::Scatter { runs, .. } => runs.iter().map(|r| r.len as u64).sum(),
            Task::Span { len, .. } => *len,
        }
    }
    fn key(&self, records: &[Record<'_>]) -> (u32, u64) {
        match self {
            Task::Direct {
                record, rel_start, ..
            } => {
                let r = &records[*record];
                (r.file, r.offset + rel_start)
            }
            Task::Scatter { record, runs, .. } => {
                let r = &records[*record];
                (r.file, r.offset + runs.first().map_or(0, |x| x.rel))
            }
            Task::Span { file, start, .. } => (*file, *start),
        }
    }
}

/// The runs that read record `rec` whole into its targets with one copy, or
/// `None` when it cannot be: the targets' overlaps must be disjoint and
/// cover the saved chunk exactly (every stored byte has exactly one
/// destination), and the record must be stored as it is (no codec).
fn scatter_runs(rec: &Record<'_>, slots: &[&Slot]) -> Option<Vec<Run>> {
    const MAX_TARGETS: usize = 256;
    let saved_box = rec.saved_box?;
    if rec.targets.is_empty() || rec.targets.len() > MAX_TARGETS || rec.length != rec.logical {
        return None;
    }
    let mut boxes: Vec<(&ChunkBox, &ChunkBox)> = Vec::with_capacity(rec.targets.len());
    for t in &rec.targets {
        let Target::Tensor {
            dest_item,
            dest_chunk,
            overlap,
        } = t
        else {
            return None;
        };
        let Slot::Tensor(chunks) = slots.get(*dest_item)? else {
            return None;
        };
        boxes.push((overlap, &chunks.get(*dest_chunk)?.0));
    }
    let covered: u64 = boxes.iter().map(|(o, _)| o.numel()).sum();
    if covered != saved_box.numel() {
        return None;
    }
    for (i, (a, _)) in boxes.iter().enumerate() {
        if boxes[i + 1..].iter().any(|(b, _)| a.overlaps(b)) {
            return None;
        }
    }
    // Each target's runs come in record order (row-major order of its
    // overlap inside the saved chunk): merge the lists rather than sort.
    let lists: Vec<Vec<Run>> = boxes
        .iter()
        .enumerate()
        .map(|(ti, (overlap, dest_box))| {
            let mut l = Vec::new();
            crate::pipeline::copy::for_each_common_run(
                rec.elem,
                saved_box,
                dest_box,
                overlap,
                |src, dest, len| {
                    l.push(Run {
                        rel: src as u64,
                        target: ti,
                        dest,
                        len,
                    })
                },
            );
            l
        })
        .collect();
    // Neighbours that continue each other in the file and in the
    // destination (full rows) merge into one run.
    let mut merged: Vec<Run> = Vec::with_capacity(lists.iter().map(Vec::len).sum());
    let mut push = |r: Run| {
        if let Some(last) = merged.last_mut() {
            if last.target == r.target
                && last.rel + last.len as u64 == r.rel
                && last.dest + last.len == r.dest
            {
                last.len += r.len;
                return;
            }
        }
        merged.push(r);
    };
    let mut heads: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = lists
        .iter()
        .enumerate()
        .filter_map(|(t, l)| l.first().map(|r| std::cmp::Reverse((r.rel, t))))
        .collect();
    let mut next = vec![0usize; lists.len()];
    while let Some(std::cmp::Reverse((_, t))) = heads.pop() {
        push(lists[t][next[t]]);
        next[t] += 1;
        if let Some(r) = lists[t].get(next[t]) {
            heads.push(std::cmp::Reverse((r.rel, t)));
        }
    }
    // The runs must tile the record.
    let mut at = 0u64;
    for r in &merged {
        if r.rel != at {
            return None;
        }
        at += r.len as u64;
    }
    (at == rec.length).then_some(merged)
}

/// Cut `runs` (tiling a record) into consecutive parts of at most `part`
/// bytes, splitting runs at the cuts.
fn split_runs(runs: Vec<Run>, part: u64) -> Vec<Vec<Run>> {
    let part = part.max(1) as usize;
    let mut out: Vec<Vec<Run>> = Vec::new();
    let mut cur: Vec<Run> = Vec::new();
    let mut size = 0usize;
    for mut r in runs {
        while r.len > 0 {
            let take = r.len.min(part - size);
            cur.push(Run { len: take, ..r });
            size += take;
            r.rel += take as u64;
            r.dest += take;
            r.len -= take;
            if size == part {
                out.push(std::mem::take(&mut cur));
                size = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// One destination item while reads fill it: each chunk's buffer behind its
/// own lock, so workers (and, in one process, other ranks) write disjoint
/// parts of it.
pub(crate) enum Slot {
    Tensor(Vec<(ChunkBox, Mutex<Vec<u8>>)>),
    Bytes(Mutex<Option<Vec<u8>>>),
}

/// A rank's destination state dict as [`Slot`]s, by destination item index
/// (name order, as plans address it).
pub(crate) struct DestSlots {
    names: Vec<String>,
    meta: Vec<Option<(crate::DType, Vec<u64>)>>,
    pub(crate) slots: Vec<Slot>,
}

impl DestSlots {
    pub(crate) fn new(dest: DestStateDict) -> DestSlots {
        let items = dest.into_items();
        let names: Vec<String> = items.keys().cloned().collect();
        let mut meta: Vec<Option<(crate::DType, Vec<u64>)>> = Vec::with_capacity(items.len());
        let slots: Vec<Slot> = items
            .into_values()
            .map(|item| match item {
                DestItem::Tensor(t) => {
                    meta.push(Some((t.dtype, t.shape)));
                    Slot::Tensor(
                        t.chunks
                            .into_iter()
                            .map(|c| (c.region, Mutex::new(c.data)))
                            .collect(),
                    )
                }
                DestItem::Bytes(b) => {
                    meta.push(None);
                    Slot::Bytes(Mutex::new(b))
                }
            })
            .collect();
        DestSlots { names, meta, slots }
    }

    /// Move the buffers back out into a state dict (through the locks, so it
    /// works on a shared `DestSlots`; what is left behind is empty).
    pub(crate) fn take(&self) -> DestStateDict {
        let mut out = BTreeMap::new();
        for ((name, slot), m) in self.names.iter().zip(&self.slots).zip(&self.meta) {
            let item = match (slot, m) {
                (Slot::Tensor(chunks), Some((dtype, shape))) => {
                    DestItem::Tensor(crate::model::DestTensor {
                        dtype: *dtype,
                        shape: shape.clone(),
                        chunks: chunks
                            .iter()
                            .map(|(region, data)| crate::model::DestChunk {
                                region: region.clone(),
                                data: std::mem::take(&mut *lock(data)),
                            })
                            .collect(),
                    })
                }
                (Slot::Bytes(b), _) => DestItem::Bytes(lock(b).take()),
                (Slot::Tensor(_), None) => unreachable!("tensor slots carry their meta"),
            };
            out.insert(name.clone(), item);
        }
        DestStateDict::from_items(out)
    }
}

/// Execute `plan` against `fs`, filling `dest`. Blocking: runs up to
/// `thread_count` scoped worker threads.
pub(crate) fn read_plan(
    fs: &dyn FileSystem,
    md: &Metadata,
    plan: &LoadPlan,
    dest: DestStateDict,
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    cfg: &ReadConfig,
) -> Result<(DestStateDict, ReadStats)> {
    let dest = DestSlots::new(dest);
    let slots: Vec<&Slot> = dest.slots.iter().collect();
    let stats = read_slots(fs, md, plan, &slots, resolved, cfg)?;
    Ok((dest.take(), stats))
}

/// Execute `plan` against `fs`, filling `slots` (indexed by the plan's
/// `dest_item`; they may belong to several ranks of one process). Blocking:
/// runs up to `thread_count` scoped worker threads.
pub(crate) fn read_slots(
    fs: &dyn FileSystem,
    md: &Metadata,
    plan: &LoadPlan,
    slots: &[&Slot],
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    cfg: &ReadConfig,
) -> Result<ReadStats> {
    let _span = tracing::debug_span!("read", reads = plan.tensor_reads.len()).entered();
    for r in &plan.tensor_reads {
        match slots.get(r.dest_item) {
            Some(Slot::Tensor(chunks)) if r.dest_chunk < chunks.len() => {}
            _ => {
                return Err(Error::invalid(
                    "load plan names a destination chunk that does not exist",
                ))
            }
        }
    }
    for b in &plan.bytes_reads {
        if !matches!(slots.get(b.dest_item), Some(Slot::Bytes(_))) {
            return Err(Error::invalid(
                "load plan names a destination bytes item that does not exist",
            ));
        }
    }

    let kind_of = |t: &AppliedTransform| -> Result<TransformKind> {
        resolved
            .get(t.descriptor as usize)
            .and_then(|r| r.as_ref())
            .map(|r| r.kind())
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "transform {} not resolved",
                    md.transforms[t.descriptor as usize]
                ))
            })
    };

    // Records touched by the plan.
    let mut records: Vec<Record<'_>> = Vec::new();
    let mut by_key: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for r in &plan.tensor_reads {
        let (name, item) = &md.items[r.md_item];
        let ItemMeta::Tensor { dtype, chunks, .. } = item else {
            return Err(Error::invalid(format!(
                "{name}: plan reads a bytes item as a tensor"
            )));
        };
        let c = &chunks[r.saved_chunk];
        let idx = *by_key.entry((r.md_item, r.saved_chunk)).or_insert_with(|| {
            records.push(Record {
                name,
                file: c.storage.file,
                offset: c.storage.offset,
                length: c.storage.length,
                logical: c.region.numel() * dtype.size() as u64,
                transforms: &c.storage.transforms,
                saved_box: Some(&c.region),
                elem: dtype.size(),
                targets: Vec::new(),
            });
            records.len() - 1
        });
        records[idx].targets.push(Target::Tensor {
            dest_item: r.dest_item,
            dest_chunk: r.dest_chunk,
            overlap: r.overlap.clone(),
        });
    }
    for b in &plan.bytes_reads {
        let (name, item) = &md.items[b.md_item];
        let ItemMeta::Bytes { length, storage } = item else {
            return Err(Error::invalid(format!(
                "{name}: plan reads a tensor as bytes"
            )));
        };
        records.push(Record {
            name,
            file: storage.file,
            offset: storage.offset,
            length: storage.length,
            logical: *length,
            transforms: &storage.transforms,
            saved_box: None,
            elem: 1,
            targets: vec![Target::Bytes {
                dest_item: b.dest_item,
            }],
        });
    }

    // Check every record against the real length of its file before reading
    // or allocating anything: hostile or damaged metadata can claim any
    // length, but real files bound what a load may allocate.
    let mut actual: BTreeMap<u32, u64> = BTreeMap::new();
    for rec in &records {
        let len = match actual.get(&rec.file) {
            Some(l) => *l,
            None => {
                let name = &md.files[rec.file as usize].name;
                let l = fs
                    .file_len(name)
                    .map_err(|e| e.context(rec.name))?
                    .ok_or_else(|| {
                        Error::new(
                            crate::ErrorKind::NotFound,
                            format!("{}: data file {name} is missing", rec.name),
                        )
                    })?;
                actual.insert(rec.file, l);
                l
            }
        };
        if rec
            .offset
            .checked_add(rec.length)
            .is_none_or(|end| end > len)
        {
            return Err(Error::corrupt(format!(
                "{}: record in {} at offset {} of {} bytes lies past the end of the file ({len} bytes): \
                 the file is truncated or the metadata is damaged",
                rec.name, md.files[rec.file as usize].name, rec.offset, rec.length
            )));
        }
    }

    // Decide how each record is read.
    let mut tasks: Vec<Task> = Vec::new();
    let mut spans: Vec<(u32, u64, u64, Piece)> = Vec::new();
    for (ri, rec) in records.iter().enumerate() {
        let mut has_codec = false;
        let mut has_checksum = false;
        for t in rec.transforms {
            match kind_of(t)? {
                TransformKind::Codec => has_codec = true,
                TransformKind::Checksum => has_checksum = true,
            }
        }
        let whole = has_codec || (cfg.verify_checksums && has_checksum);
        let Some(saved_box) = rec.saved_box else {
            spans.push((
                rec.file,
                rec.offset,
                rec.length,
                Piece {
                    record: ri,
                    rel_start: 0,
                    len: rec.length,
                    whole: true,
                    targets: vec![0],
                },
            ));
            continue;
        };
        // A record that is stored as it is and whose targets tile it exactly
        // is read with one copy, straight into every target, unless plain
        // direct reads already do that (every target contiguous, nothing
        // to verify) or it is small enough to ride in a coalesced span.
        if !has_codec && rec.length >= cfg.small_record.max(1) {
            let all_direct = rec.targets.iter().all(|t| match t {
                Target::Tensor {
                    dest_item,
                    dest_chunk,
                    overlap,
                } => match slots[*dest_item] {
                    Slot::Tensor(chunks) => {
                        contiguous_range(rec.elem, saved_box, overlap).is_some()
                            && contiguous_range(rec.elem, &chunks[*dest_chunk].0, overlap).is_some()
                    }
                    Slot::Bytes(_) => false,
                },
                Target::Bytes { .. } => false,
            });
            if whole || !all_direct {
                if let Some(runs) = scatter_runs(rec, slots) {
                    if whole {
                        tasks.push(Task::Scatter {
                            record: ri,
                            runs,
                            verify: true,
                        });
                    } else {
                        let part = SCATTER_PART.min(cfg.max_request);
                        for runs in split_runs(runs, part) {
                            tasks.push(Task::Scatter {
                                record: ri,
                                runs,
                                verify: false,
                            });
                        }
                    }
                    continue;
                }
            }
        }
        let mut rest: Vec<usize> = Vec::new();
        for (ti, t) in rec.targets.iter().enumerate() {
            let Target::Tensor {
                dest_item,
                dest_chunk,
                overlap,
            } = t
            else {
                unreachable!("tensor record")
            };
            let Slot::Tensor(chunks) = &slots[*dest_item] else {
                unreachable!("planned as tensor")
            };
            let dest_box = &chunks[*dest_chunk].0;
            // Small records go through coalesced span reads: one request for
            // many neighbours beats a request each, and the extra copy of a
            // few KiB is cheaper than a system call or an HTTP round trip.
            let direct = if has_codec || rec.length < cfg.small_record {
                None
            } else {
                match (
                    contiguous_range(rec.elem, saved_box, overlap),
                    contiguous_range(rec.elem, dest_box, overlap),
                ) {
                    (Some((s, l)), Some((d, _)))
                        if !whole
                            || (s == 0 && l as u64 == rec.logical && rec.targets.len() == 1) =>
                    {
                        Some((s, d, l))
                    }
                    _ => None,
                }
            };
            match direct {
                Some((s, d, l)) => tasks.push(Task::Direct {
                    record: ri,
                    target: ti,
                    rel_start: s as u64,
                    dest_start: d,
                    len: l,
                    verify: whole,
                }),
                None => rest.push(ti),
            }
        }
        if rest.is_empty() {
            continue;
        }
        let (rel_start, len) = if whole {
            (0, rec.length)
        } else {
            let mut lo = u64::MAX;
            let mut hi = 0u64;
            for &ti in &rest {
                let Target::Tensor { overlap, .. } = &rec.targets[ti] else {
                    unreachable!()
                };
                let (s, l) = spanning_range(rec.elem, saved_box, overlap);
                lo = lo.min(s as u64);
                hi = hi.max((s + l) as u64);
            }
            (lo, hi - lo)
        };
        spans.push((
            rec.file,
            rec.offset + rel_start,
            len,
            Piece {
                record: ri,
                rel_start,
                len,
                whole,
                targets: rest,
            },
        ));
    }

    // Coalesce spans per file.
    spans.sort_by_key(|(f, s, _, _)| (*f, *s));
    let mut cur: Option<Task> = None;
    for (file, start, len, piece) in spans {
        if let Some(Task::Span {
            file: cf,
            start: cs,
            len: cl,
            pieces,
        }) = &mut cur
        {
            let end = start + len;
            if *cf == file
                && start <= *cs + *cl + cfg.coalesce_gap
                && end.max(*cs + *cl) - *cs <= cfg.max_request
            {
                *cl = end.max(*cs + *cl) - *cs;
                pieces.push(piece);
                continue;
            }
        }
        if let Some(t) = cur.take() {
            tasks.push(t);
        }
        cur = Some(Task::Span {
            file,
            start,
            len,
            pieces: vec![piece],
        });
    }
    if let Some(t) = cur.take() {
        tasks.push(t);
    }

    // Give each worker a contiguous run of the tasks in file and offset
    // order, of about equal bytes: every worker then reads forward through
    // its own stretch of the files, which keeps the kernel's readahead
    // sequential (workers interleaving one file's parts defeat it).
    let workers = cfg.thread_count.max(1).min(tasks.len().max(1));
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| tasks[i].key(&records));
    let total_cost: u64 = tasks.iter().map(Task::cost).sum();
    let mut assigned: Vec<Vec<usize>> = vec![Vec::new(); workers];
    let mut before = 0u64;
    for i in order {
        let cost = tasks[i].cost();
        let mid = before + cost / 2;
        let w = (u128::from(mid) * workers as u128 / u128::from(total_cost.max(1))) as usize;
        assigned[w.min(workers - 1)].push(i);
        before += cost;
    }

    let stats_bytes = AtomicU64::new(0);
    let stats_requests = AtomicU64::new(0);
    let cancel = AtomicBool::new(false);
    let ctx = Ctx {
        fs,
        md,
        records: &records,
        slots,
        resolved,
        bytes: &stats_bytes,
        requests: &stats_requests,
        verify: cfg.verify_checksums,
    };
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = assigned
            .iter()
            .map(|list| {
                let (ctx, tasks, cancel) = (&ctx, &tasks, &cancel);
                scope.spawn(move || -> Result<()> {
                    let mut scratch = Vec::new();
                    for &i in list {
                        if cancel.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if let Err(e) = ctx.run(&tasks[i], &mut scratch) {
                            cancel.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::new(crate::ErrorKind::Io, "a read worker panicked"))
                })
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(ReadStats {
        bytes_read: stats_bytes.into_inner(),
        requests: stats_requests.into_inner(),
        records: records.len() as u64,
    })
}

struct Ctx<'a> {
    fs: &'a dyn FileSystem,
    md: &'a Metadata,
    records: &'a [Record<'a>],
    slots: &'a [&'a Slot],
    resolved: &'a [Option<Arc<dyn StreamTransformExtension>>],
    bytes: &'a AtomicU64,
    requests: &'a AtomicU64,
    verify: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ctx<'_> {
    fn file_name(&self, file: u32) -> &str {
        &self.md.files[file as usize].name
    }

    fn where_(&self, rec: &Record<'_>) -> String {
        format!(
            "{}: record in {} at offset {}",
            rec.name,
            self.file_name(rec.file),
            rec.offset
        )
    }

    fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.fs.read_into(self.file_name(file), offset, buf)
    }

    /// Run one task; `scratch` is the worker's reusable block buffer.
    fn run(&self, task: &Task, scratch: &mut Vec<u8>) -> Result<()> {
        match task {
            Task::Direct {
                record,
                target,
                rel_start,
                dest_start,
                len,
                verify,
            } => {
                let rec = &self.records[*record];
                let Target::Tensor {
                    dest_item,
                    dest_chunk,
                    ..
                } = &rec.targets[*target]
                else {
                    unreachable!()
                };
                let Slot::Tensor(chunks) = &self.slots[*dest_item] else {
                    unreachable!()
                };
                let mut buf = lock(&chunks[*dest_chunk].1);
                let dst = &mut buf[*dest_start..*dest_start + *len];
                self.read(rec.file, rec.offset + rel_start, dst)
                    .map_err(|e| e.context(rec.name))?;
                if *verify {
                    self.decode(rec, dst)?;
                }
                Ok(())
            }
            Task::Scatter {
                record,
                runs,
                verify,
            } => self.scatter_read(&self.records[*record], runs, *verify, scratch),
            Task::Span {
                file,
                start,
                len,
                pieces,
            } => {
                let n = usize::try_from(*len)
                    .map_err(|_| Error::corrupt("read too large for memory"))?;
                let context = |e: Error| e.context(self.records[pieces[0].record].name);
                // From memory, read the span in cache-sized groups of whole
                // pieces into the reused `scratch` (no fresh buffer to fault
                // in and zero, and the copies out come from cache); from a
                // device or an object store, read it with one request.
                if n > SCATTER_BLOCK {
                    let groups = self.piece_groups(pieces);
                    let (g_start, g_len, g_end) = groups[0];
                    if scratch.len() < g_len {
                        scratch.resize(g_len.max(SCATTER_BLOCK), 0);
                    }
                    if self
                        .fs
                        .read_if_cached(self.file_name(*file), g_start, &mut scratch[..g_len])
                        .map_err(context)?
                    {
                        self.requests.fetch_add(1, Ordering::Relaxed);
                        self.bytes.fetch_add(g_len as u64, Ordering::Relaxed);
                        self.serve_pieces(g_start, &scratch[..g_len], &pieces[..g_end])?;
                        let mut from = g_end;
                        for &(g_start, g_len, g_end) in &groups[1..] {
                            if scratch.len() < g_len {
                                scratch.resize(g_len, 0);
                            }
                            self.read(*file, g_start, &mut scratch[..g_len])
                                .map_err(context)?;
                            self.serve_pieces(g_start, &scratch[..g_len], &pieces[from..g_end])?;
                            from = g_end;
                        }
                        return Ok(());
                    }
                }
                let mut buf = vec![0u8; n];
                self.read(*file, *start, &mut buf).map_err(context)?;
                self.serve_pieces(*start, &buf, pieces)
            }
        }
    }

    /// Cut a span's pieces (in offset order) into consecutive groups whose
    /// extent is at most [`SCATTER_BLOCK`] bytes (or one piece, if larger):
    /// `(file offset, length, end index into pieces)` each.
    fn piece_groups(&self, pieces: &[Piece]) -> Vec<(u64, usize, usize)> {
        let extent = |p: &Piece| {
            let s = self.records[p.record].offset + p.rel_start;
            (s, s + p.len)
        };
        let mut out = Vec::new();
        let mut cur: Option<(u64, u64)> = None;
        for (i, p) in pieces.iter().enumerate() {
            let (s, e) = extent(p);
            cur = match cur {
                Some((gs, ge)) if e.max(ge) - gs <= SCATTER_BLOCK as u64 => Some((gs, e.max(ge))),
                Some((gs, ge)) => {
                    out.push((gs, (ge - gs) as usize, i));
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((gs, ge)) = cur {
            out.push((gs, (ge - gs) as usize, pieces.len()));
        }
        out
    }

    /// Decode (if whole) and scatter each of `pieces` out of `buf`, which
    /// holds the file's bytes from offset `buf_start`.
    fn serve_pieces(&self, buf_start: u64, buf: &[u8], pieces: &[Piece]) -> Result<()> {
        for p in pieces {
            let rec = &self.records[p.record];
            let at = (rec.offset + p.rel_start - buf_start) as usize;
            let raw = &buf[at..at + p.len as usize];
            let data = if p.whole {
                self.decode(rec, raw)?
            } else {
                Cow::Borrowed(raw)
            };
            self.scatter(rec, p, &data)?;
        }
        Ok(())
    }

    /// Lock every destination chunk `runs` feed (in address order, so
    /// workers and ranks locking overlapping sets cannot deadlock), cut their
    /// buffers into the runs' disjoint slices, and read the part of the
    /// record with one scattered read.
    fn scatter_read(
        &self,
        rec: &Record<'_>,
        runs: &[Run],
        verify: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let Some(first) = runs.first() else {
            return Ok(());
        };
        let chunk_of = |target: usize| -> &Mutex<Vec<u8>> {
            let Target::Tensor {
                dest_item,
                dest_chunk,
                ..
            } = &rec.targets[target]
            else {
                unreachable!("scatter targets are tensors")
            };
            let Slot::Tensor(chunks) = self.slots[*dest_item] else {
                unreachable!("planned as tensor")
            };
            &chunks[*dest_chunk].1
        };
        // Distinct chunks, by address; each run's index into them.
        let mut chunks: Vec<&Mutex<Vec<u8>>> = runs.iter().map(|r| chunk_of(r.target)).collect();
        chunks.sort_by_key(|m| std::ptr::from_ref(*m) as usize);
        chunks.dedup_by_key(|m| std::ptr::from_ref(*m) as usize);
        let mut guards: Vec<_> = chunks.iter().map(|m| lock(m)).collect();
        let mut by_chunk: Vec<Vec<usize>> = vec![Vec::new(); chunks.len()];
        for (i, r) in runs.iter().enumerate() {
            let m = std::ptr::from_ref(chunk_of(r.target)) as usize;
            let c = chunks
                .binary_search_by_key(&m, |x| std::ptr::from_ref(*x) as usize)
                .expect("every run's chunk is locked");
            by_chunk[c].push(i);
        }
        let mut run_chunk = vec![0usize; runs.len()];
        for (c, list) in by_chunk.iter_mut().enumerate() {
            list.sort_unstable_by_key(|&i| runs[i].dest);
            let len = guards[c].len();
            let mut pos = 0usize;
            for &i in list.iter() {
                let r = &runs[i];
                if r.dest < pos || r.dest.checked_add(r.len).is_none_or(|e| e > len) {
                    return Err(Error::invalid(format!(
                        "{}: planned destination runs overlap or overflow their chunk",
                        self.where_(rec)
                    )));
                }
                run_chunk[i] = c;
                pos = r.dest + r.len;
            }
        }
        let total: u64 = runs.iter().map(|r| r.len as u64).sum();
        let start = rec.offset + first.rel;
        // From memory, copy cache-sized blocks out ourselves; from a device
        // (or an object store), one large scattered read keeps it busy.
        let first_block = total.min(SCATTER_BLOCK as u64) as usize;
        if scratch.len() < first_block {
            scratch.resize(SCATTER_BLOCK, 0);
        }
        if self
            .fs
            .read_if_cached(self.file_name(rec.file), start, &mut scratch[..first_block])
            .map_err(|e| e.context(rec.name))?
        {
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(first_block as u64, Ordering::Relaxed);
            return self.block_scatter(rec, runs, &run_chunk, &mut guards, start, verify, scratch);
        }
        let mut slices: Vec<Option<&mut [u8]>> = (0..runs.len()).map(|_| None).collect();
        for (guard, list) in guards.iter_mut().zip(&by_chunk) {
            let mut rest: &mut [u8] = guard.as_mut_slice();
            let mut pos = 0usize;
            for &i in list {
                let r = &runs[i];
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.dest - pos);
                let (piece, tail) = tail.split_at_mut(r.len);
                slices[i] = Some(piece);
                rest = tail;
                pos = r.dest + r.len;
            }
        }
        let mut slices: Vec<&mut [u8]> = slices
            .into_iter()
            .map(|s| s.expect("every run has a slice"))
            .collect();
        let mut iov: Vec<std::io::IoSliceMut<'_>> = slices
            .iter_mut()
            .map(|s| std::io::IoSliceMut::new(s))
            .collect();
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(total, Ordering::Relaxed);
        self.fs
            .read_scattered(self.file_name(rec.file), start, &mut iov)
            .map_err(|e| e.context(rec.name))?;
        drop(iov);
        if verify {
            let mut enc = self.checksum_encoders(rec)?;
            for p in &slices {
                for (e, _) in &mut enc {
                    e.update(p, &mut Vec::new())?;
                }
            }
            self.check_checksums(rec, enc)?;
        }
        Ok(())
    }

    /// The scattered read of a part found in memory: read it in cache-sized
    /// blocks into the worker's `scratch` (which already holds the first
    /// block) and copy each block out to its runs, one [`LineStreamer`] per
    /// destination chunk (whole lines bypass the cache). Checksums, if
    /// verified, are computed over the blocks as they arrive.
    #[allow(clippy::too_many_arguments)]
    fn block_scatter(
        &self,
        rec: &Record<'_>,
        runs: &[Run],
        run_chunk: &[usize],
        guards: &mut [std::sync::MutexGuard<'_, Vec<u8>>],
        start: u64,
        verify: bool,
        scratch: &mut [u8],
    ) -> Result<()> {
        let total: u64 = runs.iter().map(|r| r.len as u64).sum();
        let mut enc = if verify {
            self.checksum_encoders(rec)?
        } else {
            Vec::new()
        };
        let mut writers: Vec<LineStreamer<'_>> = guards
            .iter_mut()
            .map(|g| LineStreamer::new(g.as_mut_slice()))
            .collect();
        let (mut ri, mut r_at) = (0usize, 0usize);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(SCATTER_BLOCK as u64) as usize;
            let block = &mut scratch[..n];
            if done > 0 {
                self.read(rec.file, start + done, block)
                    .map_err(|e| e.context(rec.name))?;
            }
            for (e, _) in &mut enc {
                e.update(block, &mut Vec::new())?;
            }
            let mut at = 0;
            while at < n {
                let r = &runs[ri];
                let k = (r.len - r_at).min(n - at);
                writers[run_chunk[ri]].write(r.dest + r_at, &block[at..at + k]);
                at += k;
                r_at += k;
                if r_at == r.len {
                    ri += 1;
                    r_at = 0;
                }
            }
            done += n as u64;
        }
        for w in writers {
            w.finish();
        }
        if verify {
            self.check_checksums(rec, enc)?;
        }
        Ok(())
    }

    /// A fresh encoder for each of a record's transforms, all checksums
    /// (scattered records have no codec), with the transform's index.
    fn checksum_encoders(
        &self,
        rec: &Record<'_>,
    ) -> Result<Vec<(Box<dyn crate::transform::StreamEncoder>, usize)>> {
        let mut out = Vec::with_capacity(rec.transforms.len());
        for (i, t) in rec.transforms.iter().enumerate() {
            let ext = self.ext(rec, t)?;
            if ext.kind() != TransformKind::Checksum {
                return Err(Error::invalid(format!(
                    "{}: {} is not a checksum",
                    self.where_(rec),
                    ext.descriptor()
                )));
            }
            out.push((ext.encoder().map_err(|e| e.context(rec.name))?, i));
        }
        Ok(out)
    }

    fn ext(
        &self,
        rec: &Record<'_>,
        t: &AppliedTransform,
    ) -> Result<&Arc<dyn StreamTransformExtension>> {
        self.resolved
            .get(t.descriptor as usize)
            .and_then(|r| r.as_ref())
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "{}: transform {} not resolved",
                    self.where_(rec),
                    t.descriptor
                ))
            })
    }

    /// Compare what `encoders` computed over the record with what was
    /// recorded: a difference is a `ChecksumMismatch` naming the record.
    fn check_checksums(
        &self,
        rec: &Record<'_>,
        encoders: Vec<(Box<dyn crate::transform::StreamEncoder>, usize)>,
    ) -> Result<()> {
        for (enc, i) in encoders {
            let t = &rec.transforms[i];
            let actual = enc.finish(&mut Vec::new())?;
            if actual != t.value {
                return Err(Error::new(
                    crate::ErrorKind::ChecksumMismatch,
                    format!(
                        "{}: {} checksum mismatch over {} bytes: expected {}, actual {}",
                        self.where_(rec),
                        self.ext(rec, t)?.descriptor(),
                        rec.length,
                        hex(&t.value),
                        hex(&actual)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn decode<'b>(&self, rec: &Record<'_>, stored: &'b [u8]) -> Result<Cow<'b, [u8]>> {
        decode_record(
            self.resolved,
            &self.where_(rec),
            rec.transforms,
            rec.logical,
            stored,
            self.verify,
        )
    }

    fn scatter(&self, rec: &Record<'_>, p: &Piece, data: &[u8]) -> Result<()> {
        for &ti in &p.targets {
            match &rec.targets[ti] {
                Target::Bytes { dest_item } => {
                    let Slot::Bytes(b) = &self.slots[*dest_item] else {
                        unreachable!()
                    };
                    *lock(b) = Some(data.to_vec());
                }
                Target::Tensor {
                    dest_item,
                    dest_chunk,
                    overlap,
                } => {
                    let Slot::Tensor(chunks) = &self.slots[*dest_item] else {
                        unreachable!()
                    };
                    let (dest_box, m) = &chunks[*dest_chunk];
                    let saved_box = rec.saved_box.expect("tensor record");
                    let mut dst = lock(m);
                    copy_region_from(
                        rec.elem,
                        data,
                        p.rel_start as usize,
                        saved_box,
                        &mut dst,
                        dest_box,
                        overlap,
                    );
                }
            }
        }
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// No codec expands data more than this (zstd's densest block, RLE, is
/// about 32,768 to 1): a larger claim is refused before any allocation.
const MAX_CODEC_RATIO: u64 = 1 << 16;

/// Undo a whole record's transforms (verifying checksums unless `verify` is
/// off); the result has exactly `logical` bytes. `what` names the record in
/// errors.
pub(crate) fn decode_record<'b>(
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    what: &str,
    transforms: &[AppliedTransform],
    logical: u64,
    stored: &'b [u8],
    verify: bool,
) -> Result<Cow<'b, [u8]>> {
    let mut cur: Cow<'b, [u8]> = Cow::Borrowed(stored);
    // A codec's recorded input length bounds what its decoder may produce;
    // cap it so hostile metadata cannot ask for huge allocations.
    let cap = logical.saturating_add(logical / 4).saturating_add(1 << 20);
    for t in transforms.iter().rev() {
        let ext = resolved
            .get(t.descriptor as usize)
            .and_then(|r| r.as_ref())
            .ok_or_else(|| {
                Error::unsupported(format!("{what}: transform {} not resolved", t.descriptor))
            })?;
        if !verify && ext.kind() == TransformKind::Checksum {
            continue;
        }
        let expected = match t.input_len {
            Some(l) if l > cap || l > (cur.len() as u64).saturating_mul(MAX_CODEC_RATIO).saturating_add(1 << 20) => {
                return Err(Error::corrupt(format!(
                    "{what}: transform input length {l} is implausible for a {logical}-byte record stored in {} bytes",
                    cur.len()
                )))
            }
            Some(l) => l as usize,
            None => cur.len(),
        };
        if let Some(v) = ext
            .decode(&cur, &t.value, expected)
            .map_err(|e| e.context(what))?
        {
            if v.len() != expected {
                return Err(Error::corrupt(format!(
                    "{what}: {} decoded to {} bytes, expected {expected}",
                    ext.descriptor(),
                    v.len()
                )));
            }
            cur = Cow::Owned(v);
        }
    }
    if cur.len() as u64 != logical {
        return Err(Error::corrupt(format!(
            "{what}: decoded to {} bytes, expected {logical}",
            cur.len()
        )));
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(o: [u64; 2], s: [u64; 2]) -> ChunkBox {
        ChunkBox::new(o.to_vec(), s.to_vec()).unwrap()
    }

    fn slot(region: &ChunkBox) -> Slot {
        Slot::Tensor(vec![(
            region.clone(),
            Mutex::new(vec![0u8; region.numel() as usize * 2]),
        )])
    }

    fn record<'a>(saved: &'a ChunkBox, overlaps: &[ChunkBox]) -> Record<'a> {
        Record {
            name: "t",
            file: 0,
            offset: 100,
            length: saved.numel() * 2,
            logical: saved.numel() * 2,
            transforms: &[],
            saved_box: Some(saved),
            elem: 2,
            targets: overlaps
                .iter()
                .enumerate()
                .map(|(i, o)| Target::Tensor {
                    dest_item: i,
                    dest_chunk: 0,
                    overlap: o.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn scatter_runs_tile_exact_covers_only() {
        // Rows 4..8 of a [8, 6] bf16 tensor, loaded as three column shards.
        let saved = b([4, 0], [4, 6]);
        let dests = [b([0, 0], [8, 2]), b([0, 2], [8, 2]), b([0, 4], [8, 2])];
        let slots: Vec<Slot> = dests.iter().map(slot).collect();
        let refs: Vec<&Slot> = slots.iter().collect();
        let overlaps: Vec<ChunkBox> = dests.iter().map(|d| d.intersect(&saved).unwrap()).collect();
        let runs = scatter_runs(&record(&saved, &overlaps), &refs).expect("exact cover");
        assert_eq!(runs.len(), 12, "4 rows x 3 shards");
        for (i, r) in runs.iter().enumerate() {
            let (row, shard) = (i / 3, i % 3);
            assert_eq!(
                *r,
                Run {
                    rel: i as u64 * 4,
                    target: shard,
                    dest: (4 + row) * 4,
                    len: 4
                }
            );
        }
        // Row shards: each target's rows are contiguous in file and
        // destination, so runs merge into one per target.
        let rows = [b([4, 0], [1, 6]), b([5, 0], [3, 6])];
        let slots: Vec<Slot> = rows.iter().map(slot).collect();
        let refs: Vec<&Slot> = slots.iter().collect();
        let runs = scatter_runs(&record(&saved, &rows), &refs).expect("exact cover");
        assert_eq!(
            runs,
            vec![
                Run {
                    rel: 0,
                    target: 0,
                    dest: 0,
                    len: 12
                },
                Run {
                    rel: 12,
                    target: 1,
                    dest: 0,
                    len: 36
                },
            ]
        );
        // A gap (a shard nobody loads) or a byte wanted twice: not scattered.
        let refs3: Vec<&Slot> = refs.iter().copied().chain([refs[0]]).collect();
        assert!(scatter_runs(&record(&saved, &rows[..1]), &refs).is_none());
        let twice = [rows[0].clone(), rows[1].clone(), rows[0].clone()];
        assert!(scatter_runs(&record(&saved, &twice), &refs3).is_none());
    }

    #[test]
    fn split_runs_cut_parts_at_the_size() {
        let runs = vec![
            Run {
                rel: 0,
                target: 0,
                dest: 10,
                len: 5,
            },
            Run {
                rel: 5,
                target: 1,
                dest: 0,
                len: 12,
            },
        ];
        let parts = split_runs(runs, 8);
        assert_eq!(
            parts,
            vec![
                vec![
                    Run {
                        rel: 0,
                        target: 0,
                        dest: 10,
                        len: 5
                    },
                    Run {
                        rel: 5,
                        target: 1,
                        dest: 0,
                        len: 3
                    }
                ],
                vec![Run {
                    rel: 8,
                    target: 1,
                    dest: 3,
                    len: 8
                }],
                vec![Run {
                    rel: 16,
                    target: 1,
                    dest: 11,
                    len: 1
                }],
            ]
        );
    }
}
