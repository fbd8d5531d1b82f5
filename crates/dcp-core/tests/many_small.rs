//! Many small tensors through one rank's load, from a store that cannot say
//! what is in memory (as a device read cold): the records coalesce into
//! spans larger than a worker's reused buffer, which are read in groups of
//! whole records of at most 4 MiB, and every byte lands where it belongs.

use bytes::Bytes;
use dcp_core::layer::FileSystemLayer;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Tensor `i`: `[rows(i), 64]` u8.
fn rows(i: u64) -> u64 {
    16 << (i % 3)
}

/// Tensor `i`'s bytes, every byte a function of `(i, offset)`.
fn bytes_of(i: u64) -> Vec<u8> {
    (0..rows(i) * 64)
        .map(|k| (i.wrapping_mul(31) ^ k.wrapping_mul(7)) as u8)
        .collect()
}

const ITEMS: u64 = 6_000;

/// A memory store that cannot say what is in memory (every read is a
/// request, as from a device read cold), counting its reads and the
/// largest.
#[derive(Debug)]
struct Uncached {
    inner: MemoryFs,
    reads: AtomicU64,
    largest: AtomicU64,
}

impl FileSystemLayer for Uncached {
    fn inner(&self) -> &dyn FileSystem {
        &self.inner
    }
    fn read_if_cached(&self, _name: &str, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.largest.fetch_max(buf.len() as u64, Ordering::SeqCst);
        self.inner.read_into(name, offset, buf)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_records_load_in_groups_of_whole_records() {
    let store = Arc::new(Uncached {
        inner: MemoryFs::new("memory://many-small"),
        reads: AtomicU64::new(0),
        largest: AtomicU64::new(0),
    });
    let fs: Arc<dyn FileSystem> = store.clone();
    let total: u64 = (0..ITEMS).map(|i| rows(i) * 64).sum();
    assert!(total > 8 << 20, "more than two reused buffers' worth");
    let wfs = fs.clone();
    let saved = run_ranks(1, Duration::from_secs(60), move |g| {
        let fs = wfs.clone();
        async move {
            let mut sd = StateDict::new();
            for i in 0..ITEMS {
                sd.insert_tensor(
                    format!("t.{i:05}"),
                    DType::U8,
                    vec![rows(i), 64],
                    vec![TensorChunk {
                        region: ChunkBox::full(&[rows(i), 64]),
                        data: Bytes::from(bytes_of(i)).into(),
                    }],
                    false,
                )?;
            }
            let w = FileSystemWriter::new(fs, WriterOptions::default())?;
            save(&sd, &w, &g).await
        }
    })
    .await;
    for r in saved {
        r.unwrap();
    }
    for threads in [1, 3] {
        store.reads.store(0, Ordering::SeqCst);
        store.largest.store(0, Ordering::SeqCst);
        let rfs = fs.clone();
        let loaded = run_ranks(1, Duration::from_secs(60), move |g| {
            let fs = rfs.clone();
            async move {
                let mut dest = DestStateDict::new();
                for i in 0..ITEMS {
                    dest.want_tensor(
                        format!("t.{i:05}"),
                        DType::U8,
                        vec![rows(i), 64],
                        vec![ChunkBox::full(&[rows(i), 64])],
                    )?;
                }
                let r = FileSystemReader::new(fs, ReaderOptions::default().thread_count(threads));
                load(dest, &r, &g).await
            }
        })
        .await;
        let out = loaded.into_iter().next().unwrap().unwrap();
        for i in 0..ITEMS {
            let t = out.state_dict.tensor(&format!("t.{i:05}")).unwrap();
            assert_eq!(
                &t.chunks[0].data[..],
                &bytes_of(i)[..],
                "t.{i:05} with {threads} threads"
            );
        }
        // Every record read once, in requests of at most 4 MiB of whole
        // records (one request per span of up to 64 MiB before); the
        // requests counted are the store's reads.
        let (reads, largest) = (
            store.reads.load(Ordering::SeqCst),
            store.largest.load(Ordering::SeqCst),
        );
        assert_eq!(out.stats.records, ITEMS, "{threads} threads");
        assert!(out.stats.bytes_read >= total, "{threads} threads");
        assert_eq!(out.stats.requests, reads, "{threads} threads");
        assert!(
            largest <= 4 << 20,
            "{threads} threads: a read of {largest} bytes"
        );
        assert!(
            reads >= out.stats.bytes_read.div_ceil(4 << 20),
            "{threads} threads: {:?}",
            out.stats
        );
    }
}
