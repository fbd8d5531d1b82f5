//! The copy-ahead budget of a writer thread: torch's
//! `per_thread_copy_ahead`, the bytes a writer thread may have staged (copied
//! out of a [`ChunkSource`](super::ChunkSource)) but not yet written.
//!
//! A staged piece holds a [`Permit`] for its length until the last clone of
//! its bytes is dropped, which is when the file sink is done with it (a
//! local sink at once; an object-store sink when the part is uploaded). A
//! writer thread that would go over its budget waits for earlier pieces to
//! be written.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Staged bytes of all the writer threads of one rank: now and at most.
#[derive(Debug, Default)]
pub struct StagedGauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl StagedGauge {
    /// The most bytes that were staged and not yet written at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// Bytes staged and not yet written now.
    pub fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn add(&self, n: u64) {
        let now = self.now.fetch_add(n, Ordering::SeqCst) + n;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn sub(&self, n: u64) {
        self.now.fetch_sub(n, Ordering::SeqCst);
    }
}

/// One writer thread's budget.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
    gauge: Arc<StagedGauge>,
}

impl Budget {
    /// A budget of `limit` bytes, counted into `gauge` as well.
    pub(crate) fn new(limit: u64, gauge: Arc<StagedGauge>) -> Arc<Budget> {
        Arc::new(Budget {
            limit: limit.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
            gauge,
        })
    }

    /// The piece size that keeps two pieces in flight within the budget.
    pub(crate) fn piece(&self) -> u64 {
        (self.limit / 2).max(1)
    }

    /// Take `n` bytes of the budget, waiting for staged pieces to be written
    /// while it would go over (a piece larger than the whole budget waits
    /// for all others).
    pub(crate) fn acquire(self: &Arc<Self>, n: u64) -> Permit {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + n > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
        self.gauge.add(n);
        Permit {
            budget: self.clone(),
            n,
        }
    }

    /// Take `n` bytes if that stays within the budget now.
    pub(crate) fn try_acquire(self: &Arc<Self>, n: u64) -> Option<Permit> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if *used > 0 && *used + n > self.limit {
            return None;
        }
        *used += n;
        self.gauge.add(n);
        Some(Permit {
            budget: self.clone(),
            n,
        })
    }
}

/// Bytes of a budget held by a staged piece; given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    budget: Arc<Budget>,
    n: u64,
}

impl Permit {
    /// `bytes` holding this permit until its last clone is dropped.
    pub(crate) fn attach(self, bytes: Bytes) -> Bytes {
        Bytes::from_owner(Held {
            bytes,
            _permit: self,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= self.n;
        self.budget.gauge.sub(self.n);
        self.budget.freed.notify_all();
    }
}

struct Held {
    bytes: Bytes,
    _permit: Permit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_bound_the_staged_bytes_until_the_bytes_are_dropped() {
        let gauge = Arc::new(StagedGauge::default());
        let b = Budget::new(100, gauge.clone());
        let p1 = b.acquire(60);
        assert!(b.try_acquire(50).is_none(), "over the budget");
        let held = p1.attach(Bytes::from(vec![7u8; 60]));
        let clone = held.clone();
        drop(held);
        assert!(b.try_acquire(50).is_none(), "a clone still holds it");
        assert_eq!(&clone[..3], &[7, 7, 7]);
        drop(clone);
        let p2 = b.try_acquire(50).expect("released with the last clone");
        // A piece larger than the budget waits only for the others.
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(500))
        };
        drop(p2);
        let big = waiter.join().unwrap();
        assert_eq!(gauge.now(), 500);
        drop(big);
        assert_eq!(gauge.now(), 0);
        assert_eq!(gauge.peak(), 500);
    }
}
