//! Running a [`Schedule`]: each worker runs its tasks in order (with up to
//! [`ReadConfig::requests_in_flight`] of them at once),
//! reading through the [`FileSystem`] into the destination slots, undoing
//! transforms and verifying checksums.

use super::plan::{Member, Piece, Record, Run, Schedule, Target, Task, SCATTER_BLOCK};
use super::{lock, ReadConfig, ReadStats, Slot, SlotChunk};
use crate::error::{Error, Result};
use crate::metadata::{AppliedTransform, Metadata};
use crate::model::{ChunkBox, DestData};
use crate::pipeline::copy::{spanning_range, stream_region_from, streams, LineStreamer};
use crate::pipeline::prefetch::prefetch;
use crate::storage::FileSystem;
use crate::transform::{StreamTransformExtension, TransformKind};
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Cut each locked destination chunk into the disjoint slices its runs
/// fill: `lists[c]` holds the indices of chunk `c`'s runs in destination
/// order, `run(i)` run `i`'s `(dest, len)`. The slices come back by run
/// index (`n` runs in all); `None` when a run overlaps the one before it or
/// reaches past its chunk.
fn cut_runs<'g>(
    guards: &'g mut [std::sync::MutexGuard<'_, DestData>],
    lists: &[Vec<usize>],
    n: usize,
    run: impl Fn(usize) -> (usize, usize),
) -> Option<Vec<&'g mut [u8]>> {
    let mut slices: Vec<Option<&mut [u8]>> = (0..n).map(|_| None).collect();
    for (guard, list) in guards.iter_mut().zip(lists) {
        let mut rest: &mut [u8] = &mut guard[..];
        let mut pos = 0usize;
        for &i in list {
            let (dest, len) = run(i);
            let skip = dest.checked_sub(pos)?;
            if skip.checked_add(len)? > rest.len() {
                return None;
            }
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
            let (piece, tail) = tail.split_at_mut(len);
            slices[i] = Some(piece);
            rest = tail;
            pos = dest + len;
        }
    }
    slices.into_iter().collect()
}

/// Run `sched` on `cfg.thread_count` workers of
/// `cfg.requests_in_flight` scoped threads each, at most.
pub(super) fn execute(
    fs: &dyn FileSystem,
    md: &Metadata,
    sched: &Schedule<'_>,
    slots: &[Slot<'_>],
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    cfg: &ReadConfig,
) -> Result<ReadStats> {
    let (records, tasks, assigned) = (&sched.records, &sched.tasks, &sched.workers);
    let stats_bytes = AtomicU64::new(0);
    let stats_requests = AtomicU64::new(0);
    let cancel = AtomicBool::new(false);
    let ctx = Ctx {
        fs,
        md,
        records,
        slots,
        resolved,
        bytes: &stats_bytes,
        requests: &stats_requests,
        verify: cfg.verify_checksums,
    };
    // Each worker's tasks are taken in order by `in_flight` threads, so a
    // worker keeps that many requests outstanding (one on a local disk,
    // several on an object store, where each request is a round trip).
    let in_flight = cfg.requests_in_flight.max(1);
    let cursors: Vec<AtomicUsize> = assigned.iter().map(|_| AtomicUsize::new(0)).collect();
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = assigned
            .iter()
            .zip(&cursors)
            .flat_map(|(list, cursor)| {
                (0..in_flight.min(list.len()).max(1)).map(move |_| (list, cursor))
            })
            .map(|(list, cursor)| {
                let (ctx, tasks, cancel) = (&ctx, tasks, &cancel);
                scope.spawn(move || -> Result<()> {
                    let mut scratch = Vec::new();
                    loop {
                        let k = cursor.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = list.get(k) else {
                            return Ok(());
                        };
                        if cancel.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if let Err(e) = ctx.run(&tasks[i], &mut scratch) {
                            cancel.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
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

/// At most this many bytes of a copy's destination are hinted to the cache
/// ([`Ctx::hint_destination`]).
const DEST_HINT: usize = 16 << 10;

/// Spans up to this size are read into the worker's reused buffer (which
/// then stays this large for the rest of the load); larger ones get a buffer
/// of their own, freed when served.
const SPAN_REUSE: usize = 4 * SCATTER_BLOCK;

/// A record's name, file and offset, as errors name it ("NAME: record in
/// FILE at offset N"); a value, so the hot path formats nothing.
struct Where<'r> {
    name: &'r str,
    file: &'r str,
    offset: u64,
}

impl std::fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: record in {} at offset {}",
            self.name, self.file, self.offset
        )
    }
}

struct Ctx<'a, 'p> {
    fs: &'a dyn FileSystem,
    md: &'a Metadata,
    records: &'a [Record<'p>],
    slots: &'a [Slot<'a>],
    resolved: &'a [Option<Arc<dyn StreamTransformExtension>>],
    bytes: &'a AtomicU64,
    requests: &'a AtomicU64,
    verify: bool,
}

impl<'a, 'p> Ctx<'a, 'p> {
    fn file_name(&self, file: u32) -> &str {
        &self.md.files[file as usize].name
    }

    /// Where `rec` is, for error messages: formatted only when an error is.
    fn where_<'r>(&'r self, rec: &'r Record<'_>) -> Where<'r> {
        Where {
            name: rec.name,
            file: self.file_name(rec.file),
            offset: rec.offset,
        }
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
                let Target::Tensor(r, dest_item) = rec.targets[*target] else {
                    unreachable!()
                };
                let Slot::Tensor(chunks) = &self.slots[dest_item] else {
                    unreachable!()
                };
                let mut buf = lock(&chunks[r.dest_chunk].1);
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
            Task::Group { file, members } => self.group_read(*file, members),
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
                    let groups = self.piece_groups(pieces, SCATTER_BLOCK);
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
                // Small spans reuse the worker's buffer: a fresh one would be
                // faulted in page by page by the read itself.
                if n <= SPAN_REUSE {
                    if scratch.len() < n {
                        scratch.resize(n, 0);
                    }
                    self.read(*file, *start, &mut scratch[..n])
                        .map_err(context)?;
                    return self.serve_pieces(*start, &scratch[..n], pieces);
                }
                // A larger span from a device where requests are cheap: read
                // in groups of whole pieces of up to `SPAN_REUSE` bytes into
                // the reused buffer, for the same reason (a group of one
                // larger piece gets a buffer of its own). Where a request
                // costs a round trip (an object store), one request.
                if self.fs.read_request_size().is_none() {
                    let mut from = 0;
                    for (g_start, g_len, g_end) in self.piece_groups(pieces, SPAN_REUSE) {
                        let group = &pieces[from..g_end];
                        from = g_end;
                        if g_len > SPAN_REUSE {
                            let mut buf = vec![0u8; g_len];
                            self.read(*file, g_start, &mut buf).map_err(context)?;
                            self.serve_pieces(g_start, &buf, group)?;
                            continue;
                        }
                        if scratch.len() < g_len {
                            scratch.resize(g_len, 0);
                        }
                        self.read(*file, g_start, &mut scratch[..g_len])
                            .map_err(context)?;
                        self.serve_pieces(g_start, &scratch[..g_len], group)?;
                    }
                    return Ok(());
                }
                let mut buf = vec![0u8; n];
                self.read(*file, *start, &mut buf).map_err(context)?;
                self.serve_pieces(*start, &buf, pieces)
            }
        }
    }

    /// Cut a span's pieces (in offset order) into consecutive groups whose
    /// extent is at most `limit` bytes (or one piece, if larger):
    /// `(file offset, length, end index into pieces)` each.
    fn piece_groups(&self, pieces: &[Piece], limit: usize) -> Vec<(u64, usize, usize)> {
        let extent = |p: &Piece| {
            let s = self.records[p.record].offset + p.rel_start;
            (s, s + p.len)
        };
        let mut out = Vec::new();
        let mut cur: Option<(u64, u64)> = None;
        for (i, p) in pieces.iter().enumerate() {
            let (s, e) = extent(p);
            cur = match cur {
                Some((gs, ge)) if e.max(ge) - gs <= limit as u64 => Some((gs, e.max(ge))),
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
    ///
    /// Every destination chunk the pieces feed is locked once, in address
    /// order (as [`Ctx::scatter_read`] does, so overlapping lock sets
    /// cannot deadlock), before the first copy, and released after the
    /// last. A lock or unlock is a locked instruction, which waits for
    /// every store before it to complete: taken around each piece's
    /// copies, it stalled the copies of many small pieces on the memory
    /// they write, once per piece. The pieces' destinations are looked up
    /// once, before the copies (which evict them from the cache), and
    /// hinted to the cache a few pieces ahead of their copy.
    fn serve_pieces(&self, buf_start: u64, buf: &[u8], pieces: &[Piece]) -> Result<()> {
        /// How many copies ahead the destinations are hinted.
        const AHEAD: usize = 4;
        let addr = |c: &Mutex<DestData>| std::ptr::from_ref(c) as usize;
        // Each tensor target of the pieces, in order: its piece, its
        // destination chunk and its overlap; each bytes target likewise.
        let mut tensors: Vec<(usize, &SlotChunk, &ChunkBox)> = Vec::with_capacity(pieces.len());
        let mut bytes: Vec<(usize, &Mutex<Option<Vec<u8>>>)> = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            if let Some(ahead) = pieces.get(i + AHEAD) {
                prefetch(&self.records[ahead.record].targets[..]);
            }
            let rec = &self.records[p.record];
            for &ti in &p.targets {
                match &rec.targets[ti] {
                    Target::Bytes { dest_item } => {
                        let Slot::Bytes(b) = &self.slots[*dest_item] else {
                            unreachable!("planned as bytes")
                        };
                        bytes.push((i, b));
                    }
                    Target::Tensor(r, dest_item) => {
                        let Slot::Tensor(slot) = &self.slots[*dest_item] else {
                            unreachable!("planned as tensor")
                        };
                        tensors.push((i, &slot[r.dest_chunk], &r.overlap));
                    }
                }
            }
        }
        let mut chunks: Vec<&Mutex<DestData>> = tensors.iter().map(|t| &t.1 .1).collect();
        chunks.sort_unstable_by_key(|c| addr(c));
        chunks.dedup_by_key(|c| addr(c));
        let guard_of: Vec<usize> = tensors
            .iter()
            .map(|t| {
                chunks
                    .binary_search_by_key(&addr(&t.1 .1), |c| addr(c))
                    .expect("every piece's chunk is listed")
            })
            .collect();
        let mut guards: Vec<_> = chunks.iter().map(|m| lock(m)).collect();
        let (mut t, mut b) = (0usize, 0usize);
        for (i, p) in pieces.iter().enumerate() {
            let rec = &self.records[p.record];
            let at = (rec.offset + p.rel_start - buf_start) as usize;
            let raw = &buf[at..at + p.len as usize];
            let data = if p.whole {
                self.decode(rec, raw)?
            } else {
                Cow::Borrowed(raw)
            };
            while let Some(&(_, (dest_box, _), overlap)) = tensors.get(t).filter(|x| x.0 == i) {
                if let Some(&(_, ahead, ahead_overlap)) = tensors.get(t + AHEAD) {
                    prefetch(ahead);
                    prefetch(ahead_overlap);
                }
                if let Some(&(pi, (next_box, _), next_overlap)) = tensors.get(t + 1) {
                    self.hint_destination(
                        &pieces[pi],
                        next_box,
                        next_overlap,
                        &guards[guard_of[t + 1]],
                    );
                }
                let saved_box = rec.saved_box.expect("tensor record");
                // A load's destinations are larger than the cache and read
                // later, if at all: long runs go past the cache (measured:
                // the many-small load 4 to 10% faster).
                stream_region_from(
                    rec.elem,
                    &data,
                    p.rel_start as usize,
                    saved_box,
                    &mut guards[guard_of[t]],
                    dest_box,
                    overlap,
                );
                t += 1;
            }
            while let Some(&(_, m)) = bytes.get(b).filter(|x| x.0 == i) {
                *lock(m) = Some(data.to_vec());
                b += 1;
            }
        }
        Ok(())
    }

    /// Hint the cache about the destination bytes of the next copy (of
    /// `overlap` of `piece` into `dest`, the buffer of `dest_box`), at
    /// most [`DEST_HINT`] of them, when that copy writes through the cache
    /// (short runs: a column piece of saved rows): its stores then find
    /// their lines in the cache instead of each waiting for memory. A copy
    /// that streams past the cache is not hinted (that would read lines
    /// it overwrites whole).
    fn hint_destination(
        &self,
        piece: &Piece,
        dest_box: &ChunkBox,
        overlap: &ChunkBox,
        dest: &[u8],
    ) {
        let rec = &self.records[piece.record];
        let Some(saved_box) = rec.saved_box else {
            return;
        };
        if streams(rec.elem, saved_box, dest_box, overlap) {
            return;
        }
        let (start, len) = spanning_range(rec.elem, dest_box, overlap);
        if let Some(r) = dest.get(start..start + len.min(DEST_HINT)) {
            prefetch(r);
        }
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
        let chunk_of = |target: usize| self.dest_chunk(rec, target);
        // Distinct chunks, by address; each run's index into them.
        let mut chunks: Vec<&Mutex<DestData>> = runs.iter().map(|r| chunk_of(r.target)).collect();
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
        let mut slices = cut_runs(&mut guards, &by_chunk, runs.len(), |i| {
            (runs[i].dest, runs[i].len)
        })
        .expect("runs checked disjoint and inside their chunks above");
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

    /// The destination chunk a tensor target of `rec` fills.
    fn dest_chunk(&self, rec: &Record<'_>, target: usize) -> &'a Mutex<DestData> {
        let Target::Tensor(r, dest_item) = rec.targets[target] else {
            unreachable!("scatter targets are tensors")
        };
        let Slot::Tensor(chunks) = self.slots[dest_item] else {
            unreachable!("planned as tensor")
        };
        &chunks[r.dest_chunk].1
    }

    /// Read the neighbouring record parts `members` of `file` with one
    /// scattered request straight into their runs (the bytes between parts
    /// into scratch), then check the checksums of each member marked
    /// `verify` over its runs. Every destination chunk is locked first, in
    /// address order (as [`Ctx::scatter_read`] does, so overlapping lock
    /// sets cannot deadlock).
    fn group_read(&self, file: u32, members: &[Member]) -> Result<()> {
        // Each member's byte range in the file.
        let range = |(r, runs, _): &Member| {
            let start = self.records[*r].offset + runs.first().map_or(0, |x| x.rel);
            (
                start,
                start + runs.iter().map(|x| x.len as u64).sum::<u64>(),
            )
        };
        let (Some(first), Some(last)) = (members.first(), members.last()) else {
            return Ok(());
        };
        let first_rec = &self.records[first.0];
        let (start, end) = (range(first).0, range(last).1);
        let context = |e: Error| e.context(first_rec.name);
        // Every run of every member, in file order: (member, run).
        let all: Vec<(usize, &Run)> = members
            .iter()
            .enumerate()
            .flat_map(|(m, (_, runs, _))| runs.iter().map(move |r| (m, r)))
            .collect();
        let chunk_of =
            |(m, r): &(usize, &Run)| self.dest_chunk(&self.records[members[*m].0], r.target);
        let addr = |c: &&Mutex<DestData>| std::ptr::from_ref(*c) as usize;
        let mut chunks: Vec<&Mutex<DestData>> = all.iter().map(chunk_of).collect();
        chunks.sort_by_key(addr);
        chunks.dedup_by_key(|c| addr(c));
        let mut guards: Vec<_> = chunks.iter().map(|m| lock(m)).collect();
        // Each chunk's runs, by destination offset, checked disjoint.
        let mut by_chunk: Vec<Vec<usize>> = vec![Vec::new(); chunks.len()];
        for (i, x) in all.iter().enumerate() {
            let c = chunks
                .binary_search_by_key(&addr(&chunk_of(x)), addr)
                .expect("every run's chunk is locked");
            by_chunk[c].push(i);
        }
        for list in &mut by_chunk {
            list.sort_unstable_by_key(|&i| all[i].1.dest);
        }
        let Some(mut slices) = cut_runs(&mut guards, &by_chunk, all.len(), |i| {
            (all[i].1.dest, all[i].1.len)
        }) else {
            return Err(Error::invalid(format!(
                "{}: planned destination runs overlap or overflow their chunk",
                self.where_(first_rec)
            )));
        };
        // The bytes between records (at most the coalescing gap each).
        let gaps: Vec<usize> = members
            .windows(2)
            .map(|w| (range(&w[1]).0 - range(&w[0]).1) as usize)
            .collect();
        let mut gap_buf = vec![0u8; gaps.iter().sum()];
        {
            let mut gap_rest: &mut [u8] = &mut gap_buf;
            let mut iov: Vec<std::io::IoSliceMut<'_>> = Vec::with_capacity(all.len() + gaps.len());
            let mut run_slices = slices.iter_mut();
            for (m, (_, runs, _)) in members.iter().enumerate() {
                for s in run_slices.by_ref().take(runs.len()) {
                    iov.push(std::io::IoSliceMut::new(s));
                }
                if let Some(&g) = gaps.get(m) {
                    let (g, tail) = std::mem::take(&mut gap_rest).split_at_mut(g);
                    iov.push(std::io::IoSliceMut::new(g));
                    gap_rest = tail;
                }
            }
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(end - start, Ordering::Relaxed);
            self.fs
                .read_scattered(self.file_name(file), start, &mut iov)
                .map_err(context)?;
        }
        let mut at = 0usize;
        for (record, runs, verify) in members {
            if *verify {
                let rec = &self.records[*record];
                let mut enc = self.checksum_encoders(rec)?;
                for p in &slices[at..at + runs.len()] {
                    for (e, _) in &mut enc {
                        e.update(p, &mut Vec::new())?;
                    }
                }
                self.check_checksums(rec, enc)?;
            }
            at += runs.len();
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
        guards: &mut [std::sync::MutexGuard<'_, DestData>],
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
            .map(|g| LineStreamer::new(&mut g[..]))
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
            if actual[..] != t.value[..] {
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
    what: &dyn std::fmt::Display,
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
