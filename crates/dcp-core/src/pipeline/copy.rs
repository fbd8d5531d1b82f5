//! Moving boxes of elements between row-major chunk buffers.

use crate::model::ChunkBox;

/// Row-major element strides of a box.
fn strides(b: &ChunkBox) -> Vec<u64> {
    let n = b.ndim();
    let mut s = vec![1u64; n];
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
    let mut idx = vec![0u64; k];
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
    assert_eq!(dst.len() as u64, dst_box.numel() * elem as u64);
    for_each_common_run(elem, src_box, dst_box, region, |so, doff, len| {
        let so = so - src_start;
        dst[doff..doff + len].copy_from_slice(&src[so..so + len]);
    });
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
    let ss = strides(src_box);
    let ds = strides(dst_box);
    let mut k = n;
    let mut run: u64 = 1;
    loop {
        k -= 1;
        run *= region.sizes[k];
        if k == 0 || region.sizes[k] != src_box.sizes[k] || region.sizes[k] != dst_box.sizes[k] {
            break;
        }
    }
    let run_bytes = run as usize * elem;
    let src_base = first_offset(src_box, region, &ss) as usize * elem;
    let dst_base = first_offset(dst_box, region, &ds) as usize * elem;
    odometer(&region.sizes[..k], |idx| {
        let so = src_base + idx.iter().zip(&ss).map(|(i, s)| i * s).sum::<u64>() as usize * elem;
        let doff = dst_base + idx.iter().zip(&ds).map(|(i, s)| i * s).sum::<u64>() as usize * elem;
        f(so, doff, run_bytes);
    });
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
}
