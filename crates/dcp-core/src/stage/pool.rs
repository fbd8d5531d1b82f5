//! Host buffers reused across saves.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Host buffers taken by exact length and given back when the bytes made
/// of them are dropped, so a save of the same layout reuses the previous
/// save's buffers instead of allocating. Clones share the pool.
#[derive(Clone, Debug, Default)]
pub struct HostPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug, Default)]
struct PoolInner {
    free: Mutex<HashMap<usize, Vec<Vec<u8>>>>,
    allocations: AtomicU64,
    allocated_bytes: AtomicU64,
}

impl HostPool {
    /// An empty pool.
    pub fn new() -> HostPool {
        HostPool::default()
    }

    /// A buffer of exactly `len` bytes (contents unspecified): a free one of
    /// that length, or a new one.
    pub fn take(&self, len: usize) -> PooledBuf {
        let reused = self
            .inner
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&len)
            .and_then(Vec::pop);
        let buf = reused.unwrap_or_else(|| {
            self.inner.allocations.fetch_add(1, Ordering::Relaxed);
            self.inner
                .allocated_bytes
                .fetch_add(len as u64, Ordering::Relaxed);
            vec![0u8; len]
        });
        PooledBuf {
            buf,
            pool: self.inner.clone(),
        }
    }

    /// Buffers allocated so far (every `take` that found no free buffer of
    /// its length).
    pub fn allocations(&self) -> u64 {
        self.inner.allocations.load(Ordering::Relaxed)
    }

    /// Bytes allocated so far.
    pub fn allocated_bytes(&self) -> u64 {
        self.inner.allocated_bytes.load(Ordering::Relaxed)
    }

    /// Bytes in free buffers now.
    pub fn free_bytes(&self) -> u64 {
        let free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
        free.iter().map(|(len, v)| (*len * v.len()) as u64).sum()
    }

    /// Keep free buffers only for the lengths in `lens` (a multiset: as
    /// many of each length as it lists), freeing the rest: called before
    /// staging a save whose layout may have changed, so the pool never holds
    /// more than one save's buffers.
    pub fn retain_lengths(&self, lens: &[usize]) {
        let mut want: HashMap<usize, usize> = HashMap::new();
        for l in lens {
            *want.entry(*l).or_default() += 1;
        }
        let mut free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
        free.retain(|len, bufs| {
            bufs.truncate(want.get(len).copied().unwrap_or(0));
            !bufs.is_empty()
        });
    }
}

/// A buffer of a [`HostPool`]; back to the pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Arc<PoolInner>,
}

impl PooledBuf {
    /// The buffer, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Shared bytes over this buffer (no copy); the buffer returns to its
    /// pool when the last clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// A pooled buffer is load staging memory too (see
/// [`ChunkSink::staging`](super::ChunkSink::staging)).
impl crate::model::TensorBuffer for PooledBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
    fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(buf.len())
            .or_default()
            .push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_are_reused_by_length() {
        let pool = HostPool::new();
        let mut a = pool.take(10);
        a.as_mut_slice().copy_from_slice(&[1; 10]);
        let bytes = a.into_bytes();
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(pool.free_bytes(), 0, "a clone still holds it");
        assert_eq!(&clone[..], &[1; 10]);
        drop(clone);
        assert_eq!(pool.free_bytes(), 10);
        let _b = pool.take(10);
        assert_eq!(pool.allocations(), 1, "reused");
        let _c = pool.take(7);
        assert_eq!(pool.allocations(), 2);
        drop(_c);
        pool.retain_lengths(&[10]);
        assert_eq!(pool.free_bytes(), 0, "the 7-byte buffer was freed");
    }
}
