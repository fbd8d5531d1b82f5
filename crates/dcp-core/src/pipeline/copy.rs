//! Moving boxes of elements between row-major chunk buffers.

use crate::model::ChunkBox;

/// Row-major element strides of a box.
fn strides(b: &ChunkBox) -> crate::model::Dims {
    let n = b.ndim();
    let mut s: crate::model::Dims = smallvec::smallvec![1u64; n];
    for d in (0..n.saturating_sub(1)).rev() {
        s[d] = s[d + 1] * b.sizes[d + 1];
    }
    s
}

/// Element offset of `region`'s first element inside `outer` (row-major).
fn first_offset(outer: &ChunkBox, region: &ChunkBox, st: &[u64]) -> u64 {
    (0..outer.ndim())
        .map(|d| (region.offsets[d] - outer.offsets[d]) * st[d])
        .sum()
}

/// If `region` (inside `outer`) is one contiguous run of `outer`'s bytes,
/// return its byte range. Empty regions return `None`.
pub fn contiguous_range(
    elem: usize,
    outer: &ChunkBox,
    region: &ChunkBox,
) -> Option<(usize, usize)> {
    if region.is_empty() {
        return None;
    }
    let n = outer.ndim();
    // Contiguous iff after the first dimension with extent > 1, every
    // dimension is full.
    let first = (0..n).find(|&d| region.sizes[d] > 1);
    if let Some(f) = first {
        if (f + 1..n).any(|d| region.sizes[d] != outer.sizes[d]) {
            return None;
        }
    }
    let st = strides(outer);
    let start = first_offset(outer, region, &st) as usize * elem;
    Some((start, region.numel() as usize * elem))
}

/// The smallest byte range of `outer`'s buffer that holds every element of
/// `region` (from its first to its last element).
pub fn spanning_range(elem: usize, outer: &ChunkBox, region: &ChunkBox) -> (usize, usize) {
    if region.is_empty() {
        return (0, 0);
    }
    let st = strides(outer);
    let first = first_offset(outer, region, &st);
    let last: u64 = (0..outer.ndim())
        .map(|d| (region.offsets[d] + region.sizes[d] - 1 - outer.offsets[d]) * st[d])
        .sum();
    let start = first as usize * elem;
    (start, (last - first + 1) as usize * elem)
}

/// Call `f(offset, len)` for each contiguous run of `region`'s bytes inside
/// `outer`'s row-major buffer, in row-major order of `region`: appending the
/// runs in order gives `region`'s own row-major bytes (its compact form).
pub fn for_each_run(
    elem: usize,
    outer: &ChunkBox,
    region: &ChunkBox,
    mut f: impl FnMut(usize, usize),
) {
    assert!(outer.contains(region), "region outside chunk");
    if region.is_empty() {
        return;
    }
    let n = region.ndim();
    if n == 0 {
        f(0, elem);
        return;
    }
    let st = strides(outer);
    let mut k = n;
    let mut run: u64 = 1;
    loop {
        k -= 1;
        run *= region.sizes[k];
        if k == 0 || region.sizes[k] != outer.sizes[k] {
            break;
        }
    }
    let run_bytes = run as usize * elem;
    let base = first_offset(outer, region, &st) as usize * elem;
    odometer(&region.sizes[..k], |idx| {
        let off = base + idx.iter().zip(&st).map(|(i, s)| i * s).sum::<u64>() as usize * elem;
        f(off, run_bytes);
    });
}

/// Call `f` with every index vector of a box of `sizes`, in row-major order
/// (once, with an empty index, when `sizes` is empty).
fn odometer(sizes: &[u64], mut f: impl FnMut(&[u64])) {
    let k = sizes.len();
    let mut idx: crate::model::Dims = smallvec::smallvec![0u64; k];
    loop {
        f(&idx);
        let mut d = k;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Copy the elements of `region` from `src` (the bytes of box `src_box`) to
/// `dst` (the bytes of box `dst_box`). `region` must lie inside both boxes
/// and the buffers must hold their boxes exactly; violations panic (they are
/// planner bugs, checked before any copy is planned).
pub fn copy_region(
    elem: usize,
    src: &[u8],
    src_box: &ChunkBox,
    dst: &mut [u8],
    dst_box: &ChunkBox,
    region: &ChunkBox,
) {
    assert_eq!(src.len() as u64, src_box.numel() * elem as u64);
    copy_region_from(elem, src, 0, src_box, dst, dst_box, region)
}

/// Like [`copy_region`], but `src` holds only the bytes of `src_box`'s
/// buffer from byte `src_start` on (a partial read); it must cover
/// [`spanning_range`] of `region`.
pub fn copy_region_from(
    elem: usize,
    src: &[u8],
    src_start: usize,
    src_box: &ChunkBox,
    dst: &mut [u8],
    dst_box: &ChunkBox,
    region: &ChunkBox,
) {
    copy_runs(elem, src, src_start, src_box, dst, dst_box, region, false);
}

/// Runs shorter than this are copied with ordinary stores by
/// [`stream_region_from`]: gathering short runs into whole lines costs more
/// than the reads for ownership it saves (measured: the many-small
/// workload's 84-byte column pieces reshard about 5% slower streamed).
pub const STREAM_MIN_RUN: usize = 512;

/// Like [`copy_region_from`], but runs of at least [`STREAM_MIN_RUN`]
/// bytes are written through a [`LineStreamer`]: every whole cache line of
/// `dst` they cover is stored past the cache. For destinations larger than
/// a cache and not about to be read again (a load's tensors): the copy then
/// costs no read for ownership of each destination line, and leaves the
/// cache to the source. Panics where [`copy_region_from`] does.
pub fn stream_region_from(
    elem: usize,
    src: &[u8],
    src_start: usize,
    src_box: &ChunkBox,
    dst: &mut [u8],
    dst_box: &ChunkBox,
    region: &ChunkBox,
) {
    let stream = streams(elem, src_box, dst_box, region);
    copy_runs(elem, src, src_start, src_box, dst, dst_box, region, stream);
}

/// Whether [`stream_region_from`] writes `region` past the cache: when its
/// runs (every run of one region has the same length) are at least
/// [`STREAM_MIN_RUN`] bytes long. Otherwise it writes through the cache,
/// and a caller can usefully hint the destination to the cache first.
pub fn streams(elem: usize, src_box: &ChunkBox, dst_box: &ChunkBox, region: &ChunkBox) -> bool {
    !region.is_empty() && common_run(src_box, dst_box, region).1 as usize * elem >= STREAM_MIN_RUN
}

/// The copy of [`copy_region_from`], each run written with ordinary stores
/// or, with `stream`, through a [`LineStreamer`].
#[allow(clippy::too_many_arguments)]
fn copy_runs(
    elem: usize,
    src: &[u8],
    src_start: usize,
    src_box: &ChunkBox,
    dst: &mut [u8],
    dst_box: &ChunkBox,
    region: &ChunkBox,
    stream: bool,
) {
    assert_eq!(dst.len() as u64, dst_box.numel() * elem as u64);
    if !stream {
        for_each_common_run(elem, src_box, dst_box, region, |so, doff, len| {
            let so = so - src_start;
            dst[doff..doff + len].copy_from_slice(&src[so..so + len]);
        });
        return;
    }
    let mut w = LineStreamer::new(dst);
    for_each_common_run(elem, src_box, dst_box, region, |so, doff, len| {
        let so = so - src_start;
        w.write(doff, &src[so..so + len]);
    });
    w.finish();
}

/// Call `f(src_offset, dst_offset, len)` for each run of `region`'s bytes
/// that is contiguous both in `src_box`'s row-major buffer and in
/// `dst_box`'s, in row-major order of `region`. Trailing dimensions that are
/// full in both boxes merge into one run. Panics if `region` is not inside
/// both boxes (a planner bug, checked before any copy is planned).
pub fn for_each_common_run(
    elem: usize,
    src_box: &ChunkBox,
    dst_box: &ChunkBox,
    region: &ChunkBox,
    mut f: impl FnMut(usize, usize, usize),
) {
    assert!(
        src_box.contains(region) && dst_box.contains(region),
        "region outside chunk"
    );
    if region.is_empty() {
        return;
    }
    let n = region.ndim();
    if n == 0 {
        f(0, 0, elem);
        return;
    }
    if n == 2 {
        return matrix_runs(elem, src_box, dst_box, region, f);
    }
    let ss = strides(src_box);
    let ds = strides(dst_box);
    let (k, run) = common_run(src_box, dst_box, region);
    let run_bytes = run as usize * elem;
    let src_base = first_offset(src_box, region, &ss) as usize * elem;
    let dst_base = first_offset(dst_box, region, &ds) as usize * elem;
    // One run, or one dimension of runs (rows of a matrix): no odometer.
    if k == 0 {
        f(src_base, dst_base, run_bytes);
        return;
    }
    if k == 1 {
        let (s_step, d_step) = (ss[0] as usize * elem, ds[0] as usize * elem);
        for i in 0..region.sizes[0] as usize {
            f(src_base + i * s_step, dst_base + i * d_step, run_bytes);
        }
        return;
    }
    odometer(&region.sizes[..k], |idx| {
        let so = src_base + idx.iter().zip(&ss).map(|(i, s)| i * s).sum::<u64>() as usize * elem;
        let doff = dst_base + idx.iter().zip(&ds).map(|(i, s)| i * s).sum::<u64>() as usize * elem;
        f(so, doff, run_bytes);
    });
}

/// [`for_each_common_run`] for boxes of two dimensions (a matrix: its rows,
/// or one run when the region spans whole rows of both), without the
/// general strides: the many small pieces of a resharded load are mostly
/// of this shape, and their copies are short enough that working out the
/// strides weighed on them. The boxes are checked as the caller does.
fn matrix_runs(
    elem: usize,
    src_box: &ChunkBox,
    dst_box: &ChunkBox,
    region: &ChunkBox,
    mut f: impl FnMut(usize, usize, usize),
) {
    let (rows, cols) = (region.sizes[0], region.sizes[1]);
    let (src_cols, dst_cols) = (src_box.sizes[1], dst_box.sizes[1]);
    let at = |b: &ChunkBox, width: u64| {
        ((region.offsets[0] - b.offsets[0]) * width + region.offsets[1] - b.offsets[1]) as usize
            * elem
    };
    let (src_base, dst_base) = (at(src_box, src_cols), at(dst_box, dst_cols));
    if cols == src_cols && cols == dst_cols {
        f(src_base, dst_base, (rows * cols) as usize * elem);
        return;
    }
    let (s_step, d_step) = (src_cols as usize * elem, dst_cols as usize * elem);
    let run = cols as usize * elem;
    for i in 0..rows as usize {
        f(src_base + i * s_step, dst_base + i * d_step, run);
    }
}

/// How `region`'s elements split into runs contiguous in both boxes:
/// `(k, run)`, where the dimensions from `k` on merge into runs of `run`
/// elements each and the first `k` dimensions index the runs. A region of
/// no dimensions is one run of one element.
fn common_run(src_box: &ChunkBox, dst_box: &ChunkBox, region: &ChunkBox) -> (usize, u64) {
    let mut k = region.ndim();
    let mut run: u64 = 1;
    while k > 0 {
        k -= 1;
        run *= region.sizes[k];
        if k == 0 || region.sizes[k] != src_box.sizes[k] || region.sizes[k] != dst_box.sizes[k] {
            break;
        }
    }
    (k, run)
}

/// Writes a series of runs into one destination buffer, streaming every
/// whole, aligned 64-byte cache line past the cache (non-temporal stores on
/// x86_64) and buffering the bytes of a partly covered line until the line
/// is complete or the series jumps elsewhere.
///
/// Why: scattering a saved row into several column shards writes each shard
/// in pieces of a few KiB. With ordinary stores every destination line is
/// first read from memory (a read for ownership), and a store that covers
/// part of a line both ways costs more again; consecutive pieces of one
/// shard are contiguous in its buffer, so this writer sees them as one
/// stream and covers whole lines only, which the CPU writes without reading
/// them first. Measured on the project's machine: a 4-KiB-row, three-shard
/// scatter out of a cache-resident block runs at 0.85 of `memcpy` this way
/// and 0.6 with `copy_from_slice` per piece.
///
/// Nothing is written outside the runs given: a whole line is streamed only
/// when all 64 of its bytes belong to the runs; partial lines are written
/// with ordinary copies. Call [`LineStreamer::finish`] (or drop it) before
/// anything reads the buffer.
pub struct LineStreamer<'a> {
    buf: &'a mut [u8],
    /// Offset of the first pending (not yet written) byte.
    pos: usize,
    /// Pending bytes, at `line[lo..lo + fill]` where `lo` is `pos`'s offset
    /// within its cache line.
    line: [u8; 64],
    fill: usize,
    streamed: bool,
}

impl<'a> LineStreamer<'a> {
    /// A streamer over `buf`.
    pub fn new(buf: &'a mut [u8]) -> LineStreamer<'a> {
        LineStreamer {
            buf,
            pos: 0,
            line: [0; 64],
            fill: 0,
            streamed: false,
        }
    }

    /// Offset of `at` within its cache line.
    fn line_offset(&self, at: usize) -> usize {
        (self.buf.as_ptr() as usize).wrapping_add(at) & 63
    }

    /// Write `src` at byte `dest` of the buffer. Panics if the run does not
    /// fit in the buffer (a planner bug, checked before any read).
    pub fn write(&mut self, dest: usize, mut src: &[u8]) {
        assert!(
            dest.checked_add(src.len())
                .is_some_and(|e| e <= self.buf.len()),
            "run outside its destination buffer"
        );
        if dest != self.pos + self.fill {
            self.flush();
            self.pos = dest;
        }
        while !src.is_empty() {
            let lo = self.line_offset(self.pos);
            if lo != 0 || self.fill != 0 {
                // Complete the current line in the buffer.
                let k = (64 - lo - self.fill).min(src.len());
                self.line[lo + self.fill..lo + self.fill + k].copy_from_slice(&src[..k]);
                self.fill += k;
                src = &src[k..];
                if lo + self.fill < 64 {
                    return;
                }
                if lo == 0 {
                    let line = self.line;
                    self.stream_lines(&line);
                } else {
                    self.flush();
                }
                continue;
            }
            // Aligned with nothing pending: stream whole lines from `src`.
            let whole = src.len() / 64 * 64;
            if whole > 0 {
                self.stream_lines(&src[..whole]);
                src = &src[whole..];
            }
            self.line[..src.len()].copy_from_slice(src);
            self.fill = src.len();
            return;
        }
    }

    /// Write the pending bytes of a partial line with an ordinary copy.
    fn flush(&mut self) {
        if self.fill > 0 {
            let lo = self.line_offset(self.pos);
            self.buf[self.pos..self.pos + self.fill]
                .copy_from_slice(&self.line[lo..lo + self.fill]);
            self.pos += self.fill;
            self.fill = 0;
        }
    }

    /// Write `src` (whole lines) at `pos`, which is line-aligned, and move
    /// past it; clears the pending bytes (they are part of `src`).
    fn stream_lines(&mut self, src: &[u8]) {
        debug_assert_eq!(src.len() % 64, 0);
        debug_assert_eq!(self.line_offset(self.pos), 0);
        let dst = &mut self.buf[self.pos..self.pos + src.len()];
        stream_copy(dst, src);
        self.streamed = true;
        self.pos += src.len();
        self.fill = 0;
    }

    /// Write what is pending and order the streamed stores before any later
    /// store (another thread may read the buffer once this returns and a
    /// lock is released).
    pub fn finish(mut self) {
        self.flush();
        self.fence();
    }

    fn fence(&mut self) {
        if std::mem::take(&mut self.streamed) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `sfence` has no preconditions; SSE is part of the
            // x86_64 baseline.
            unsafe {
                std::arch::x86_64::_mm_sfence()
            };
        }
    }
}

impl Drop for LineStreamer<'_> {
    fn drop(&mut self) {
        self.flush();
        self.fence();
    }
}

/// Copy whole 64-byte lines from `src` to `dst`, a line-aligned slice of the
/// same length, bypassing the cache where the CPU can (x86_64); an ordinary
/// copy elsewhere. Panics on a length mismatch or a misaligned `dst`.
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    assert_eq!(dst.len() % 64, 0);
    assert_eq!(
        dst.as_ptr() as usize % 64,
        0,
        "destination not line-aligned"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let d = dst.as_mut_ptr().cast::<__m128i>();
        let s = src.as_ptr().cast::<__m128i>();
        for i in 0..dst.len() / 16 {
            // SAFETY: `i * 16 + 16 <= len` for both slices (their lengths are
            // equal and a multiple of 16), so each 16-byte access stays inside
            // its slice; `dst` is exclusively borrowed, so nothing else reads
            // or writes it meanwhile. `_mm_stream_si128` needs a 16-byte
            // aligned address: `dst` is 64-byte aligned (asserted above) and
            // `i * 16` keeps that. `_mm_loadu_si128` accepts any alignment.
            // SSE2 is part of the x86_64 baseline. The streamed stores are
            // weakly ordered; `LineStreamer::finish`/`drop` issue the `sfence`
            // that orders them before the buffer is handed on.
            unsafe { _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i))) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Naive reference: visit every element of the region by coordinates.
    fn reference(
        elem: usize,
        src: &[u8],
        sb: &ChunkBox,
        dst: &mut [u8],
        db: &ChunkBox,
        r: &ChunkBox,
    ) {
        let n = r.ndim();
        let total = r.numel();
        for lin in 0..total {
            let mut coord = vec![0u64; n];
            let mut rem = lin;
            for d in (0..n).rev() {
                coord[d] = r.offsets[d] + rem % r.sizes[d];
                rem /= r.sizes[d];
            }
            let off = |b: &ChunkBox| {
                let mut o = 0u64;
                for (d, c) in coord.iter().enumerate() {
                    o = o * b.sizes[d] + (c - b.offsets[d]);
                }
                o as usize * elem
            };
            let (so, dof) = (off(sb), off(db));
            dst[dof..dof + elem].copy_from_slice(&src[so..so + elem]);
        }
    }

    fn arb_case() -> impl Strategy<Value = (usize, ChunkBox, ChunkBox, ChunkBox)> {
        (1usize..4, prop::sample::select(vec![1usize, 2, 4])).prop_flat_map(|(n, elem)| {
            prop::collection::vec((0u64..3, 1u64..5, 0u64..3, 1u64..5), n).prop_map(move |dims| {
                let mut s = ChunkBox::full(&[]);
                let mut d = ChunkBox::full(&[]);
                for &(so, sz, dofs, dz) in &dims {
                    s.offsets.push(so);
                    s.sizes.push(sz);
                    d.offsets.push(dofs);
                    d.sizes.push(dz);
                }
                let r = s
                    .intersect(&d)
                    .unwrap_or_else(|| ChunkBox::new(vec![0; n], vec![0; n]).unwrap());
                (elem, s, d, r)
            })
        })
    }

    proptest! {
        #[test]
        fn copy_matches_reference((elem, sb, db, r) in arb_case()) {
            prop_assume!(!r.is_empty());
            let src: Vec<u8> = (0..sb.numel() as usize * elem).map(|i| (i * 7 + 3) as u8).collect();
            let mut a = vec![0u8; db.numel() as usize * elem];
            let mut b = a.clone();
            copy_region(elem, &src, &sb, &mut a, &db, &r);
            reference(elem, &src, &sb, &mut b, &db, &r);
            prop_assert_eq!(&a, &b);
            // The spanning range covers every element the region touches.
            let (start, len) = spanning_range(elem, &sb, &r);
            let mut masked = vec![0u8; src.len()];
            masked[start..start + len].copy_from_slice(&src[start..start + len]);
            let mut c = vec![0u8; a.len()];
            copy_region(elem, &masked, &sb, &mut c, &db, &r);
            prop_assert_eq!(&c, &a);
            let mut compact = Vec::new();
            for_each_run(elem, &sb, &r, |o, l| compact.extend_from_slice(&src[o..o + l]));
            let mut expect = vec![0u8; r.numel() as usize * elem];
            copy_region(elem, &src, &sb, &mut expect, &r, &r);
            prop_assert_eq!(compact, expect);
            if let Some((cs, cl)) = contiguous_range(elem, &sb, &r) {
                prop_assert_eq!((cs, cl), (start, len));
                prop_assert_eq!(cl as u64, r.numel() * elem as u64);
            }
        }
    }

    proptest! {
        /// The streamed copy writes what the plain one writes, and nothing
        /// else, from a partial source, for runs on both sides of
        /// `STREAM_MIN_RUN` and every alignment of the destination.
        #[test]
        fn streamed_copy_matches_the_plain_one(
            rows in 1u64..5,
            (s_col, s_cols, d_col, d_cols) in (0u64..200, 1u64..400, 0u64..200, 1u64..400),
            row_off in 0u64..3,
            whole_rows in any::<bool>(),
            shift in 0usize..64,
        ) {
            let sb = ChunkBox::new(vec![0, s_col], vec![rows + 2, s_cols]).unwrap();
            // Whole rows: the destination's columns equal the source's, so
            // runs merge across rows into one long run.
            let db = if whole_rows {
                ChunkBox::new(vec![row_off, s_col], vec![rows, s_cols]).unwrap()
            } else {
                ChunkBox::new(vec![row_off, d_col], vec![rows, d_cols]).unwrap()
            };
            let Some(r) = sb.intersect(&db) else { return Ok(()); };
            prop_assume!(!r.is_empty());
            let elem = 4;
            let src: Vec<u8> = (0..sb.numel() as usize * elem).map(|i| (i * 31 + 7) as u8).collect();
            let (start, len) = spanning_range(elem, &sb, &r);
            let part = &src[start..start + len];
            let n = db.numel() as usize * elem;
            // The destination at every offset within a cache line.
            let mut backing = vec![0xa5u8; n + 64];
            let mut plain = backing[shift..shift + n].to_vec();
            copy_region_from(elem, part, start, &sb, &mut plain, &db, &r);
            stream_region_from(elem, part, start, &sb, &mut backing[shift..shift + n], &db, &r);
            prop_assert_eq!(&backing[shift..shift + n], &plain[..]);
            prop_assert!(backing[..shift].iter().chain(&backing[shift + n..]).all(|&b| b == 0xa5));
        }
    }

    #[test]
    fn contiguity() {
        let outer = ChunkBox::new(vec![0, 0], vec![4, 6]).unwrap();
        let rows = ChunkBox::new(vec![1, 0], vec![2, 6]).unwrap();
        assert_eq!(contiguous_range(2, &outer, &rows), Some((12, 24)));
        let cols = ChunkBox::new(vec![0, 0], vec![4, 3]).unwrap();
        assert_eq!(contiguous_range(2, &outer, &cols), None);
        let one_row_part = ChunkBox::new(vec![2, 1], vec![1, 3]).unwrap();
        assert_eq!(contiguous_range(1, &outer, &one_row_part), Some((13, 3)));
    }

    proptest! {
        /// Any series of runs (jumps, overlapping line boundaries, every
        /// alignment) lands exactly where an ordinary copy puts it, and
        /// nothing outside the runs changes.
        #[test]
        fn line_streamer_matches_plain_copies(
            start in 0usize..64,
            runs in prop::collection::vec((0usize..200, 0usize..300, any::<bool>()), 1..40),
        ) {
            let len = 64 * 200;
            let mut base = vec![0xEEu8; len + 64];
            let mut want = base.clone();
            let mut dest = start;
            let mut plan = Vec::new();
            for (i, &(gap, n, jump)) in runs.iter().enumerate() {
                if jump {
                    dest += gap;
                }
                if dest + n > len {
                    break;
                }
                let src: Vec<u8> = (0..n).map(|k| (i * 31 + k) as u8).collect();
                plan.push((dest, src));
                dest += n;
            }
            {
                let buf = &mut base[..len];
                let mut w = LineStreamer::new(buf);
                for (d, src) in &plan {
                    w.write(*d, src);
                }
                w.finish();
            }
            for (d, src) in &plan {
                want[*d..*d + src.len()].copy_from_slice(src);
            }
            prop_assert_eq!(base, want);
        }
    }
}
