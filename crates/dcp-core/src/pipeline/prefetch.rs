//! Cache hints for per-item loops over data scattered in memory (the
//! metadata's names, a state dict's items): asking for what the next
//! iteration reads lets the CPU wait for that miss while it works on this
//! one, without stalling on it as a real load would.

/// Ask the CPU to bring every cache line of `*value` into the cache. A
/// hint: it never faults and changes nothing observable, so it is safe on
/// any reference. A no-op off x86_64.
#[inline(always)]
pub(crate) fn prefetch<T: ?Sized>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = std::ptr::from_ref(value).cast::<i8>();
        let len = std::mem::size_of_val(value).max(1) as isize;
        // Every line the value touches: from its first byte's line to its
        // last byte's.
        let mut at = -((start as usize % 64) as isize);
        while at < len {
            // SAFETY: `prefetch` only hints the cache: it reads nothing into
            // the program, never faults (not even on an unmapped address),
            // and has no other precondition; `wrapping_offset` makes no claim
            // that the address is in bounds. SSE is part of the x86_64
            // baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_offset(at)) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_changes_nothing() {
        // Values of several sizes, unsized ones, a zero-sized one and the
        // last element of a vector: each is hinted and reads back unchanged.
        let big = [7u8; 300];
        let v: Vec<u64> = (0..1000).collect();
        let s = String::from("small.0000001");
        prefetch(&big);
        prefetch(&());
        prefetch(&v[999]);
        prefetch(&v);
        prefetch(&v[..]);
        prefetch(s.as_str());
        prefetch(&v[..0]);
        assert!(big.iter().all(|&b| b == 7));
        assert_eq!(v.iter().sum::<u64>(), 999 * 1000 / 2);
        assert_eq!(s, "small.0000001");
    }
}
