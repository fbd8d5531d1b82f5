//! Reading records into destination chunks.
//!
//! Records are grouped by file and sorted by offset; neighbouring needed
//! ranges are coalesced (a small gap read is cheaper than another request).
//! Only the bytes a destination needs are read, except where a record must be
//! read whole: a codec was applied, or a checksum is verified. A needed range
//! that is contiguous both in the saved chunk and in the destination chunk is
//! read straight into the destination buffer; everything else is read once
//! into a buffer and scattered.

use crate::error::{Error, Result};
use crate::metadata::{AppliedTransform, ItemMeta, Metadata};
use crate::model::{ChunkBox, DestItem, DestStateDict};
use crate::pipeline::copy::{contiguous_range, copy_region_from, spanning_range};
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
    /// Read `[start, start+len)` of a file once and serve several pieces.
    Span {
        file: u32,
        start: u64,
        len: u64,
        pieces: Vec<Piece>,
    },
}

impl Task {
    fn cost(&self) -> u64 {
        match self {
            Task::Direct { len, .. } => *len as u64,
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
            Task::Span { file, start, .. } => (*file, *start),
        }
    }
}

enum Slot {
    Tensor(Vec<(ChunkBox, Mutex<Vec<u8>>)>),
    Bytes(Mutex<Option<Vec<u8>>>),
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
    let _span = tracing::debug_span!("read", reads = plan.tensor_reads.len()).entered();
    // Destination slots, by destination item index.
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

    // Balance tasks over workers, largest first; each worker then reads in
    // file and offset order.
    let workers = cfg.thread_count.max(1).min(tasks.len().max(1));
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tasks[i].cost()));
    let mut loads = vec![0u64; workers];
    let mut assigned: Vec<Vec<usize>> = vec![Vec::new(); workers];
    for i in order {
        let w = (0..workers).min_by_key(|&w| loads[w]).expect("a worker");
        loads[w] += tasks[i].cost();
        assigned[w].push(i);
    }
    for a in &mut assigned {
        a.sort_by_key(|&i| tasks[i].key(&records));
    }

    let stats_bytes = AtomicU64::new(0);
    let stats_requests = AtomicU64::new(0);
    let cancel = AtomicBool::new(false);
    let ctx = Ctx {
        fs,
        md,
        records: &records,
        slots: &slots,
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
                    for &i in list {
                        if cancel.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if let Err(e) = ctx.run(&tasks[i]) {
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

    let mut out = BTreeMap::new();
    for ((name, slot), m) in names.into_iter().zip(slots).zip(meta) {
        let item = match slot {
            Slot::Tensor(chunks) => {
                let (dtype, shape) = m.expect("tensor meta");
                DestItem::Tensor(crate::model::DestTensor {
                    dtype,
                    shape,
                    chunks: chunks
                        .into_iter()
                        .map(|(region, data)| crate::model::DestChunk {
                            region,
                            data: data.into_inner().unwrap_or_else(|p| p.into_inner()),
                        })
                        .collect(),
                })
            }
            Slot::Bytes(b) => DestItem::Bytes(b.into_inner().unwrap_or_else(|p| p.into_inner())),
        };
        out.insert(name, item);
    }
    Ok((
        DestStateDict::from_items(out),
        ReadStats {
            bytes_read: stats_bytes.into_inner(),
            requests: stats_requests.into_inner(),
            records: records.len() as u64,
        },
    ))
}

struct Ctx<'a> {
    fs: &'a dyn FileSystem,
    md: &'a Metadata,
    records: &'a [Record<'a>],
    slots: &'a [Slot],
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

    fn run(&self, task: &Task) -> Result<()> {
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
            Task::Span {
                file,
                start,
                len,
                pieces,
            } => {
                let n = usize::try_from(*len)
                    .map_err(|_| Error::corrupt("read too large for memory"))?;
                let mut buf = vec![0u8; n];
                self.read(*file, *start, &mut buf).map_err(|e| {
                    let first = &self.records[pieces[0].record];
                    e.context(first.name)
                })?;
                for p in pieces {
                    let rec = &self.records[p.record];
                    let at = (rec.offset + p.rel_start - start) as usize;
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
        }
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
