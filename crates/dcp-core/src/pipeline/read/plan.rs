//! Planning a rank's reads, without touching storage: which records the
//! load plan touches, how each is read (straight into its destination,
//! scattered with one copy, or through a coalesced span), and which worker
//! runs which task. Pure: file lengths come in through a function, so every
//! step is unit-tested on its own.

use super::reads::Reads;
use super::{ReadConfig, Slot};
use crate::error::{Error, Result};
use crate::metadata::{AppliedTransform, ItemMeta, Metadata};
use crate::model::ChunkBox;
use crate::pipeline::copy::{contiguous_range, spanning_range};
use crate::plan::ReadItem;
use crate::transform::TransformKind;
use smallvec::{smallvec, SmallVec};
use std::collections::BTreeMap;

/// What one read of a record fills: a tensor read of a load plan (its
/// destination chunk and the overlap it copies), borrowed rather than
/// copied (a resharded load of small items has a few of them per record,
/// and copying each overlap cost an allocation per record), with the
/// destination item it fills among the slots ([`Reads::tensor`]); or a
/// bytes item, whole.
#[derive(Clone, Copy, Debug)]
pub(super) enum Target<'a> {
    Tensor(&'a ReadItem, usize),
    Bytes { dest_item: usize },
}

pub(super) struct Record<'a> {
    pub(super) name: &'a str,
    pub(super) file: u32,
    pub(super) offset: u64,
    pub(super) length: u64,
    pub(super) logical: u64,
    pub(super) transforms: &'a [AppliedTransform],
    pub(super) saved_box: Option<&'a ChunkBox>,
    pub(super) elem: usize,
    pub(super) targets: Targets<'a>,
}

/// A record's targets: inline for up to four (one, unless the record is
/// resharded; one per rank when the ranks of a process that reshard it
/// share its read), so building a schedule allocates nothing per record.
pub(super) type Targets<'a> = SmallVec<[Target<'a>; 4]>;

/// The targets a piece feeds, as indices into its record's [`Targets`]:
/// inline for up to four (a record lent to the ranks of a node that
/// reshard it feeds one target per rank).
pub(super) type PieceTargets = SmallVec<[usize; 4]>;

/// A piece of a record inside a span: record index, byte range relative to
/// the record's start, and the targets it feeds.
pub(super) struct Piece {
    pub(super) record: usize,
    pub(super) rel_start: u64,
    pub(super) len: u64,
    pub(super) whole: bool,
    pub(super) targets: PieceTargets,
}

pub(super) enum Task {
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
    /// Read neighbouring parts of records of one file with one request,
    /// scattered straight into their destination runs (as several
    /// [`Task::Scatter`]s; the few bytes between them go to scratch), then
    /// check the checksums of the members marked `verify` (whole records).
    /// Only on a file system with a request size of its own
    /// ([`ReadConfig::request_size`]), where a request costs a round trip.
    Group { file: u32, members: Vec<Member> },
    /// Read `[start, start+len)` of a file once and serve several pieces
    /// (from memory or a device, in groups of whole pieces into the
    /// worker's reused buffer; from an object store, with one request).
    Span {
        file: u32,
        start: u64,
        len: u64,
        pieces: Vec<Piece>,
    },
}

/// One record's part in a [`Task::Group`]: the record, its runs (in
/// record order, tiling the part), and whether the part is the whole record
/// and its checksums are checked.
pub(super) type Member = (usize, Vec<Run>, bool);

/// One contiguous run of a scattered read: `len` bytes at `rel` in the
/// record go to byte `dest` of target `target`'s destination chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) rel: u64,
    pub(super) target: usize,
    pub(super) dest: usize,
    pub(super) len: usize,
}

/// Block size of scattered reads on backends where small reads are cheap:
/// large enough for few requests, small enough to stay in a core's cache
/// while it is copied out.
pub(super) const SCATTER_BLOCK: usize = 1 << 20;

/// Largest part of a record one scatter task reads when it need not verify
/// the whole record: big records are split so several workers share them.
pub(super) const SCATTER_PART: u64 = 8 << 20;

impl Task {
    fn cost(&self) -> u64 {
        match self {
            Task::Direct { len, .. } => *len as u64,
            Task::Scatter { runs, .. } => runs.iter().map(|r| r.len as u64).sum(),
            Task::Group { members, .. } => members
                .iter()
                .flat_map(|(_, runs, _)| runs)
                .map(|r| r.len as u64)
                .sum(),
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
            Task::Group { file, members } => (
                *file,
                members.first().map_or(0, |(r, runs, _)| {
                    records[*r].offset + runs.first().map_or(0, |x| x.rel)
                }),
            ),
            Task::Span { file, start, .. } => (*file, *start),
        }
    }
}

/// The runs that read record `rec` whole into its targets with one copy, or
/// `None` when it cannot be: the targets' overlaps must be disjoint and
/// cover the saved chunk exactly (every stored byte has exactly one
/// destination), and the record must be stored as it is (no codec).
fn scatter_runs(rec: &Record<'_>, slots: &[Slot<'_>]) -> Option<Vec<Run>> {
    const MAX_TARGETS: usize = 256;
    let saved_box = rec.saved_box?;
    if rec.targets.is_empty() || rec.targets.len() > MAX_TARGETS || rec.length != rec.logical {
        return None;
    }
    let mut boxes: Vec<(&ChunkBox, &ChunkBox)> = Vec::with_capacity(rec.targets.len());
    for t in &rec.targets {
        let Target::Tensor(r, dest_item) = *t else {
            return None;
        };
        let Slot::Tensor(chunks) = slots.get(dest_item)? else {
            return None;
        };
        boxes.push((&r.overlap, &chunks.get(r.dest_chunk)?.0));
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

/// How one rank's reads run: the records the plan touches, the tasks that
/// read them, and the tasks of each worker (in file and offset order).
pub(super) struct Schedule<'a> {
    pub records: Vec<Record<'a>>,
    pub tasks: Vec<Task>,
    pub workers: Vec<Vec<usize>>,
}

/// Plan the reads of `plan` into `slots`. `kinds` gives the kind of each
/// transform of the metadata's table that the plan uses (`None`: not
/// resolved); `file_len` the real length of a data file, or `None` when it
/// is missing.
pub(super) fn schedule<'a>(
    md: &'a Metadata,
    reads: &Reads<'a>,
    slots: &[Slot<'_>],
    kinds: &[Option<TransformKind>],
    cfg: &ReadConfig,
    file_len: impl FnMut(&str) -> Result<Option<u64>>,
) -> Result<Schedule<'a>> {
    check_destinations(reads, slots)?;
    let records = collect_records(md, reads)?;
    check_lengths(md, &records, file_len)?;
    let (mut tasks, spans) = choose_tasks(md, &records, slots, kinds, cfg)?;
    coalesce(spans, cfg, &mut tasks);
    if let Some(size) = cfg.request_size {
        tasks = group_records(tasks, &records, size, cfg.coalesce_gap);
    }
    let workers = assign_workers(&tasks, &records, cfg.thread_count);
    Ok(Schedule {
        records,
        tasks,
        workers,
    })
}

/// Refuse a plan that names destinations `slots` does not have.
fn check_destinations(reads: &Reads<'_>, slots: &[Slot<'_>]) -> Result<()> {
    for (r, dest_item) in reads.tensors() {
        match slots.get(dest_item) {
            Some(Slot::Tensor(chunks)) if r.dest_chunk < chunks.len() => {}
            _ => {
                return Err(Error::invalid(
                    "load plan names a destination chunk that does not exist",
                ))
            }
        }
    }
    for b in reads.bytes() {
        if !matches!(slots.get(b.dest_item), Some(Slot::Bytes(_))) {
            return Err(Error::invalid(
                "load plan names a destination bytes item that does not exist",
            ));
        }
    }
    Ok(())
}

/// The records `plan` touches, each with the destinations it feeds.
fn collect_records<'a>(md: &'a Metadata, reads: &Reads<'a>) -> Result<Vec<Record<'a>>> {
    // Records touched by the plan.
    let mut records: Vec<Record<'_>> = Vec::with_capacity(reads.tensor_len() + reads.bytes().len());
    // Each record's key, while the plan's keys only grow (plans come saved
    // chunk by saved chunk, in order): a new key is a new record, with no
    // map. The first key out of order builds the map from the records so
    // far and every later key goes through it.
    let mut keys: Vec<(usize, usize)> = Vec::with_capacity(reads.tensor_len());
    let mut by_key: Option<BTreeMap<(usize, usize), usize>> = None;
    for (at, (r, dest_item)) in reads.tensors().enumerate() {
        let (name, item) = &md.items[r.md_item];
        let ItemMeta::Tensor { dtype, chunks, .. } = item else {
            return Err(Error::invalid(format!(
                "{name}: plan reads a bytes item as a tensor"
            )));
        };
        let c = &chunks[r.saved_chunk];
        let key = (r.md_item, r.saved_chunk);
        let found = match (&by_key, keys.last()) {
            (None, Some(&last)) if last == key => Some(keys.len() - 1),
            (None, Some(&last)) if last > key => {
                let map: BTreeMap<_, _> = keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
                let found = map.get(&key).copied();
                by_key = Some(map);
                found
            }
            (None, _) => None,
            (Some(map), _) => map.get(&key).copied(),
        };
        let idx = found.unwrap_or_else(|| {
            if let Some(map) = &mut by_key {
                map.insert(key, records.len());
            }
            keys.push(key);
            // The reads of one saved chunk come together (a plan in key
            // order): its targets are reserved at once, not grown.
            let feeds = (at..reads.tensor_len())
                .map(|i| reads.tensor(i).0)
                .take_while(|n| (n.md_item, n.saved_chunk) == key)
                .count();
            records.push(Record {
                name,
                file: c.storage.file,
                offset: c.storage.offset,
                length: c.storage.length,
                logical: c.region.numel() * dtype.size() as u64,
                transforms: &c.storage.transforms,
                saved_box: Some(&c.region),
                elem: dtype.size(),
                targets: Targets::with_capacity(feeds),
            });
            records.len() - 1
        });
        records[idx].targets.push(Target::Tensor(r, dest_item));
    }
    for b in reads.bytes() {
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
            targets: smallvec![Target::Bytes {
                dest_item: b.dest_item,
            }],
        });
    }
    Ok(records)
}

/// Check every record against the real length of its file before reading
/// or allocating anything: hostile or damaged metadata can claim any
/// length, but real files bound what a load may allocate.
fn check_lengths(
    md: &Metadata,
    records: &[Record<'_>],
    mut file_len: impl FnMut(&str) -> Result<Option<u64>>,
) -> Result<()> {
    let mut actual: BTreeMap<u32, u64> = BTreeMap::new();
    for rec in records {
        let len = match actual.get(&rec.file) {
            Some(l) => *l,
            None => {
                let name = &md.files[rec.file as usize].name;
                let l = file_len(name)
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
    Ok(())
}

/// A piece of a record to read through a span, before coalescing: file,
/// start, length and the piece.
type SpanPiece = (u32, u64, u64, Piece);

/// Decide how each record is read: tasks that read straight into
/// destinations (direct or scattered), and pieces left for coalesced spans.
fn choose_tasks(
    md: &Metadata,
    records: &[Record<'_>],
    slots: &[Slot<'_>],
    kinds: &[Option<TransformKind>],
    cfg: &ReadConfig,
) -> Result<(Vec<Task>, Vec<SpanPiece>)> {
    let kind_of = |t: &AppliedTransform| -> Result<TransformKind> {
        kinds
            .get(t.descriptor as usize)
            .copied()
            .flatten()
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "transform {} not resolved",
                    md.transforms[t.descriptor as usize]
                ))
            })
    };
    // Decide how each record is read. About one task or piece a record:
    // sized up front rather than grown (a grown vector copies itself).
    let mut tasks: Vec<Task> = Vec::new();
    let mut spans: Vec<(u32, u64, u64, Piece)> = Vec::with_capacity(records.len());
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
                    targets: smallvec![0],
                },
            ));
            continue;
        };
        // A record that is stored as it is and whose targets tile it exactly
        // is read with one copy, straight into every target, unless plain
        // direct reads already do that (every target contiguous, nothing
        // to verify) or it is small enough to ride in a coalesced span.
        if !has_codec && rec.length >= cfg.small_record.max(1) {
            let all_direct = rec.targets.iter().all(|t| match *t {
                Target::Tensor(r, dest_item) => match slots[dest_item] {
                    Slot::Tensor(chunks) => {
                        contiguous_range(rec.elem, saved_box, &r.overlap).is_some()
                            && contiguous_range(rec.elem, &chunks[r.dest_chunk].0, &r.overlap)
                                .is_some()
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
        let mut rest = PieceTargets::new();
        for (ti, t) in rec.targets.iter().enumerate() {
            let Target::Tensor(r, dest_item) = *t else {
                unreachable!("tensor record")
            };
            let overlap = &r.overlap;
            let Slot::Tensor(chunks) = &slots[dest_item] else {
                unreachable!("planned as tensor")
            };
            let dest_box = &chunks[r.dest_chunk].0;
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
                let Target::Tensor(r, _) = rec.targets[ti] else {
                    unreachable!()
                };
                let (s, l) = spanning_range(rec.elem, saved_box, &r.overlap);
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
    Ok((tasks, spans))
}

/// Merge span pieces of one file that lie at most `coalesce_gap` apart into
/// span tasks of at most `max_request` bytes.
fn coalesce(spans: Vec<SpanPiece>, cfg: &ReadConfig, tasks: &mut Vec<Task>) {
    // Coalesce spans per file.
    let mut cur: Option<Task> = None;
    for (file, start, len, piece) in by_file_and_offset(spans) {
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
}

/// `spans` ordered by file, then by offset. Pieces come in plan order,
/// which within one file is usually already offset order (a save writes a
/// rank's items in name order): they are dealt into one list per file and
/// only a list out of order is sorted, so the usual case is linear, with
/// no sort of the whole (large) list.
fn by_file_and_offset(spans: Vec<SpanPiece>) -> Vec<SpanPiece> {
    if spans.is_sorted_by_key(|(f, s, _, _)| (*f, *s)) {
        return spans;
    }
    let n = spans.len();
    let files = spans
        .iter()
        .map(|(f, ..)| *f as usize + 1)
        .max()
        .unwrap_or(0);
    let mut counts = vec![0usize; files];
    for (f, ..) in &spans {
        counts[*f as usize] += 1;
    }
    let mut per_file: Vec<Vec<SpanPiece>> = counts.into_iter().map(Vec::with_capacity).collect();
    for sp in spans {
        per_file[sp.0 as usize].push(sp);
    }
    let mut out = Vec::with_capacity(n);
    for mut list in per_file {
        if !list.is_sorted_by_key(|(_, s, _, _)| *s) {
            list.sort_by_key(|(_, s, _, _)| *s);
        }
        out.append(&mut list);
    }
    out
}

/// Merge scatter and direct reads of neighbouring parts of records of one
/// file (whole records, verified, or parts read unverified), at most `gap` bytes
/// apart, into [`Task::Group`]s of at most `size` bytes: one request each
/// instead of one per part.
fn group_records(tasks: Vec<Task>, records: &[Record<'_>], size: u64, gap: u64) -> Vec<Task> {
    // A direct read is a scatter of one run.
    let (mut scatters, mut out): (Vec<Task>, Vec<Task>) = tasks
        .into_iter()
        .map(|t| match t {
            Task::Direct {
                record,
                target,
                rel_start,
                dest_start,
                len,
                verify,
            } => Task::Scatter {
                record,
                runs: vec![Run {
                    rel: rel_start,
                    target,
                    dest: dest_start,
                    len,
                }],
                verify,
            },
            t => t,
        })
        .partition(|t| matches!(t, Task::Scatter { runs, .. } if !runs.is_empty()));
    scatters.sort_by_key(|t| t.key(records));
    // The group being built: file, byte range, members.
    type Building = (u32, u64, u64, Vec<Member>);
    let mut cur: Option<Building> = None;
    let flush = |cur: Option<Building>, out: &mut Vec<Task>| {
        if let Some((file, _, _, mut members)) = cur {
            if members.len() == 1 {
                let (record, runs, verify) = members.pop().expect("one member");
                out.push(Task::Scatter {
                    record,
                    runs,
                    verify,
                });
            } else {
                out.push(Task::Group { file, members });
            }
        }
    };
    for t in scatters {
        let Task::Scatter {
            record,
            runs,
            verify,
        } = t
        else {
            unreachable!("partitioned")
        };
        let rec = &records[record];
        let start = rec.offset + runs[0].rel;
        let end = start + runs.iter().map(|r| r.len as u64).sum::<u64>();
        if let Some((file, s, e, members)) = &mut cur {
            if *file == rec.file && start >= *e && start - *e <= gap && end - *s <= size {
                *e = end;
                members.push((record, runs, verify));
                continue;
            }
        }
        flush(cur.take(), &mut out);
        cur = Some((rec.file, start, end, vec![(record, runs, verify)]));
    }
    flush(cur, &mut out);
    out
}

/// Give each worker a contiguous run of the tasks in file and offset
/// order, of about equal bytes: every worker then reads forward through
/// its own stretch of the files, which keeps the kernel's readahead
/// sequential (workers interleaving one file's parts defeat it).
fn assign_workers(tasks: &[Task], records: &[Record<'_>], thread_count: usize) -> Vec<Vec<usize>> {
    let workers = thread_count.max(1).min(tasks.len().max(1));
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| tasks[i].key(records));
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
    assigned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::read::SlotChunk;
    use crate::plan::LoadPlan;
    use std::sync::Mutex;

    fn b(o: [u64; 2], s: [u64; 2]) -> ChunkBox {
        ChunkBox::new(o.to_vec(), s.to_vec()).unwrap()
    }

    fn chunk(region: &ChunkBox) -> SlotChunk {
        (
            region.clone(),
            Mutex::new(vec![0u8; region.numel() as usize * 2].into()),
        )
    }

    fn slot(c: &SlotChunk) -> Slot<'_> {
        Slot::Tensor(std::slice::from_ref(c))
    }

    /// A read of each overlap, into chunk 0 of destination item `i`.
    fn reads(overlaps: &[ChunkBox]) -> Vec<ReadItem> {
        overlaps
            .iter()
            .enumerate()
            .map(|(i, o)| ReadItem {
                dest_item: i,
                dest_chunk: 0,
                md_item: 0,
                saved_chunk: 0,
                overlap: o.clone(),
            })
            .collect()
    }

    fn record<'a>(saved: &'a ChunkBox, reads: &'a [ReadItem]) -> Record<'a> {
        Record {
            name: "t",
            file: 0,
            offset: 100,
            length: saved.numel() * 2,
            logical: saved.numel() * 2,
            transforms: &[],
            saved_box: Some(saved),
            elem: 2,
            targets: reads
                .iter()
                .map(|r| Target::Tensor(r, r.dest_item))
                .collect(),
        }
    }

    #[test]
    fn scatter_runs_tile_exact_covers_only() {
        // Rows 4..8 of a [8, 6] bf16 tensor, loaded as three column shards.
        let saved = b([4, 0], [4, 6]);
        let dests = [b([0, 0], [8, 2]), b([0, 2], [8, 2]), b([0, 4], [8, 2])];
        let chunks: Vec<SlotChunk> = dests.iter().map(chunk).collect();
        let refs: Vec<Slot<'_>> = chunks.iter().map(slot).collect();
        let overlaps: Vec<ChunkBox> = dests.iter().map(|d| d.intersect(&saved).unwrap()).collect();
        let runs = scatter_runs(&record(&saved, &reads(&overlaps)), &refs).expect("exact cover");
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
        let chunks: Vec<SlotChunk> = rows.iter().map(chunk).collect();
        let refs: Vec<Slot<'_>> = chunks.iter().map(slot).collect();
        let runs = scatter_runs(&record(&saved, &reads(&rows)), &refs).expect("exact cover");
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
        let refs3: Vec<Slot<'_>> = refs.iter().copied().chain([refs[0]]).collect();
        assert!(scatter_runs(&record(&saved, &reads(&rows[..1])), &refs).is_none());
        let twice = [rows[0].clone(), rows[1].clone(), rows[0].clone()];
        assert!(scatter_runs(&record(&saved, &reads(&twice)), &refs3).is_none());
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

    /// Metadata of one f32 tensor `w` of shape [n] saved as `n / per` chunks
    /// of `per` elements, back to back in one file (each 4 * per bytes).
    fn row_md(n: u64, per: u64) -> Metadata {
        use crate::metadata::{ChunkMeta, DataFile, StorageInfo};
        let chunks = (0..n / per)
            .map(|i| ChunkMeta {
                region: ChunkBox::new(vec![i * per], vec![per]).unwrap(),
                storage: StorageInfo {
                    file: 0,
                    offset: i * per * 4,
                    length: per * 4,
                    transforms: Default::default(),
                },
            })
            .collect();
        Metadata {
            save_id: "0".repeat(16),
            world_size: 1,
            format: crate::metadata::FormatKind::Raw,
            files: vec![DataFile {
                name: "__0_0-x.dcp".into(),
                length: n * 4,
            }],
            transforms: Default::default(),
            items: vec![(
                "w".into(),
                ItemMeta::Tensor {
                    dtype: crate::DType::F32,
                    shape: vec![n].into(),
                    chunks,
                },
            )],
            user: Default::default(),
            generation: 1,
        }
    }

    fn cfg(threads: usize, small: u64) -> ReadConfig {
        ReadConfig {
            thread_count: threads,
            requests_in_flight: 1,
            request_size: None,
            verify_checksums: true,
            coalesce_gap: 4096,
            max_request: 64 << 20,
            small_record: small,
        }
    }

    /// Whole-chunk reads of every saved chunk into one destination.
    fn whole_plan(md: &Metadata) -> LoadPlan {
        let ItemMeta::Tensor { chunks, .. } = &md.items[0].1 else {
            unreachable!()
        };
        LoadPlan {
            tensor_reads: chunks
                .iter()
                .enumerate()
                .map(|(i, c)| crate::plan::ReadItem {
                    dest_item: 0,
                    dest_chunk: 0,
                    md_item: 0,
                    saved_chunk: i,
                    overlap: c.region.clone(),
                })
                .collect(),
            bytes_reads: Vec::new(),
        }
    }

    /// Reads of one saved chunk group into one record whatever their order:
    /// in order without a map, and after the first key out of order
    /// through one (reads of records seen before it, and after it).
    #[test]
    fn records_group_reads_in_and_out_of_order() {
        let md = row_md(1024, 256); // 4 records of 1 KiB
        let ItemMeta::Tensor { chunks, .. } = &md.items[0].1 else {
            unreachable!()
        };
        let read = |c: usize, lo: u64, n: u64| crate::plan::ReadItem {
            dest_item: 0,
            dest_chunk: 0,
            md_item: 0,
            saved_chunk: c,
            overlap: ChunkBox::new(vec![chunks[c].region.offsets[0] + lo], vec![n]).unwrap(),
        };
        let targets = |r: &Record<'_>| -> Vec<u64> {
            r.targets
                .iter()
                .map(|t| match t {
                    Target::Tensor(r, _) => r.overlap.offsets[0],
                    Target::Bytes { .. } => u64::MAX,
                })
                .collect()
        };
        // In order: 0, 0, 1, 2.
        let plan = LoadPlan {
            tensor_reads: vec![read(0, 0, 8), read(0, 8, 8), read(1, 0, 8), read(2, 0, 8)],
            bytes_reads: Vec::new(),
        };
        let recs = collect_records(&md, &Reads::Plan(&plan)).unwrap();
        let got: Vec<(u64, Vec<u64>)> = recs.iter().map(|r| (r.offset, targets(r))).collect();
        assert_eq!(
            got,
            vec![(0, vec![0, 8]), (1024, vec![256]), (2048, vec![512])]
        );
        // Out of order: 1, 3, 1, 0, 3, 0, 2.
        let plan = LoadPlan {
            tensor_reads: vec![
                read(1, 0, 4),
                read(3, 0, 4),
                read(1, 4, 4),
                read(0, 0, 4),
                read(3, 4, 4),
                read(0, 4, 4),
                read(2, 0, 4),
            ],
            bytes_reads: Vec::new(),
        };
        let recs = collect_records(&md, &Reads::Plan(&plan)).unwrap();
        let got: Vec<(u64, Vec<u64>)> = recs.iter().map(|r| (r.offset, targets(r))).collect();
        assert_eq!(
            got,
            vec![
                (1024, vec![256, 260]),
                (3072, vec![768, 772]),
                (0, vec![0, 4]),
                (2048, vec![512]),
            ]
        );
    }

    #[test]
    fn small_records_coalesce_into_one_span() {
        let md = row_md(1024, 64); // 16 records of 256 bytes
        let dest = chunk(&ChunkBox::full(&[1024]));
        let slots = [slot(&dest)];
        let plan = whole_plan(&md);
        let s = schedule(
            &md,
            &Reads::Plan(&plan),
            &slots,
            &[],
            &cfg(4, 1 << 20),
            |_| Ok(Some(4096)),
        )
        .unwrap();
        assert_eq!(s.records.len(), 16);
        assert_eq!(s.tasks.len(), 1, "one coalesced request");
        let Task::Span {
            start, len, pieces, ..
        } = &s.tasks[0]
        else {
            panic!("expected a span")
        };
        assert_eq!((*start, *len, pieces.len()), (0, 4096, 16));
        assert_eq!(s.workers.len(), 1, "one task, one worker");
    }

    #[test]
    fn large_contiguous_records_read_directly_and_split_across_workers() {
        let md = row_md(1 << 20, 1 << 18); // 4 records of 1 MiB
        let dest = chunk(&ChunkBox::full(&[1 << 20]));
        let slots = [slot(&dest)];
        let plan = whole_plan(&md);
        let s = schedule(&md, &Reads::Plan(&plan), &slots, &[], &cfg(2, 4096), |_| {
            Ok(Some(4 << 20))
        })
        .unwrap();
        assert_eq!(s.tasks.len(), 4);
        assert!(s.tasks.iter().all(|t| matches!(t, Task::Direct { .. })));
        // Two workers, each a contiguous stretch in file order.
        let starts: Vec<Vec<u64>> = s
            .workers
            .iter()
            .map(|w| w.iter().map(|&i| s.tasks[i].key(&s.records).1).collect())
            .collect();
        assert_eq!(starts, vec![vec![0, 1 << 20], vec![2 << 20, 3 << 20]]);
    }

    #[test]
    fn missing_and_short_files_are_refused_before_reading() {
        let md = row_md(1024, 64);
        let dest = chunk(&ChunkBox::full(&[1024]));
        let slots = [slot(&dest)];
        let plan = whole_plan(&md);
        let e = schedule(&md, &Reads::Plan(&plan), &slots, &[], &cfg(1, 0), |_| {
            Ok(None)
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
        assert!(e.message().contains("__0_0-x.dcp is missing"), "{e}");
        let e = schedule(&md, &Reads::Plan(&plan), &slots, &[], &cfg(1, 0), |_| {
            Ok(Some(4000))
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
        assert!(
            e.message()
                .contains("past the end of the file (4000 bytes)"),
            "{e}"
        );
        let mut bad = plan.clone();
        bad.tensor_reads[0].dest_chunk = 7;
        let e = schedule(&md, &Reads::Plan(&bad), &slots, &[], &cfg(1, 0), |_| {
            Ok(Some(4096))
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
    }
}
