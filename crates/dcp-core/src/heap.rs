//! Giving freed heap memory back to the operating system between phases
//! that free many small blocks and then allocate large ones (the save
//! coordinator's plans, freed rank by rank while the metadata grows): the
//! C allocator keeps freed small blocks for reuse by later small
//! allocations, and large ones are mapped separately, so without this the
//! process's resident memory is the sum of both phases instead of the
//! larger of them.

/// Return the free pages of the C allocator's heap to the operating system
/// (glibc's `malloc_trim`; a no-op with other allocators and platforms).
/// Costs a walk of the allocator's free lists: call it between phases, not
/// per allocation.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and has no precondition; it
    // locks each arena it trims, so it is safe to call from any thread at
    // any time, concurrently with allocations on other threads (glibc
    // malloc(3), "MT-Safe"). It only releases pages of free chunks; no
    // live allocation is moved or unmapped. Exercised by the test below and
    // by every save's coordinator (`checkpoint/assemble.rs`).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[test]
    fn freed_small_blocks_leave_the_resident_set() {
        // 256 MiB in 2 KiB blocks (below the allocator's mapping
        // threshold: they live in the heap), then freed, with one block
        // allocated after them kept alive so the heap cannot shrink from
        // its top by itself.
        let blocks: Vec<Vec<u8>> = (0..128 * 1024).map(|i| vec![i as u8; 2048]).collect();
        let keep = vec![1u8; 2048];
        let before_free = rss_kib();
        drop(blocks);
        release_free_memory();
        let after = rss_kib();
        assert_eq!(keep[0], 1);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let (b, a) = (before_free.unwrap(), after.unwrap());
            // At least half of the 256 MiB left (other tests of this binary
            // allocate beside it).
            assert!(
                b.saturating_sub(a) > 128 * 1024,
                "resident {b} KiB before, {a} KiB after"
            );
        }
    }
}
