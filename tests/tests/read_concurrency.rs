//! Requests in flight per reader thread: a load keeps
//! [`FileSystem::read_requests_in_flight`] reads outstanding on each reader
//! thread, whatever `thread_count` is, so an object store (where every
//! request is a round trip) is not read one request at a time.
//!
//! A layer over `MemoryFs` acts as a remote store: every read takes a few
//! milliseconds, nothing is "cached", and a gauge records how many reads
//! overlap. The load must reach the store's number exactly (not more), fill
//! every byte correctly, and turn a failing read into an error naming the
//! item.

use dcp_core::layer::FileSystemLayer;
use dcp_core::mem::MemoryFs;
use dcp_core::{DType, Error, ErrorKind, FileSystem, ReaderOptions, Result};
use dcp_tests::*;
use std::io::IoSliceMut;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A slow, never-cached store over `inner` that allows `in_flight` reads
/// per reader thread and records the most reads that ever overlapped.
#[derive(Debug)]
struct SlowStore {
    inner: Arc<dyn FileSystem>,
    in_flight: usize,
    active: AtomicUsize,
    peak: AtomicUsize,
    reads: AtomicUsize,
    /// Fail the read with this sequence number (1-based; 0: none).
    fail_at: usize,
}

impl SlowStore {
    fn new(inner: Arc<dyn FileSystem>, in_flight: usize, fail_at: usize) -> Self {
        SlowStore {
            inner,
            in_flight,
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            fail_at,
        }
    }

    /// Hold one read slot for a round trip's time around `f`.
    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(15));
        let out = if n == self.fail_at {
            Err(Error::new(ErrorKind::Io, "connection reset by the store"))
        } else {
            f()
        };
        self.active.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl FileSystemLayer for SlowStore {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.timed(|| self.inner.read_into(name, offset, buf))
    }
    fn read_scattered(&self, name: &str, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.timed(|| self.inner.read_scattered(name, offset, bufs))
    }
    fn read_if_cached(&self, _name: &str, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        Ok(false)
    }
    fn read_requests_in_flight(&self) -> usize {
        self.in_flight
    }
}

/// Sixteen tensors of 512 KiB (records above the 256 KiB `small_record`:
/// one read each), saved by one rank.
fn model() -> Model {
    (0..16).fold(
        Model {
            seed: 18,
            ..Model::default()
        },
        |m, i| {
            m.tensor(
                &format!("layer{i:02}.w"),
                DType::F32,
                &[128, 1024],
                Sharding::Full,
            )
        },
    )
}

async fn saved() -> Arc<dyn FileSystem> {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://concurrency"));
    save_model(fs.clone(), &model(), 1, fast_writer()).await;
    fs
}

fn opts(threads: usize) -> ReaderOptions {
    ReaderOptions::default()
        .registry(dcp_ext::registry())
        .thread_count(threads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reader_thread_keeps_the_stores_number_of_reads_in_flight() {
    let fs = saved().await;
    let m = model();
    for (threads, in_flight, expect) in [(1, 1, 1), (1, 4, 4), (2, 3, 6)] {
        let store = Arc::new(SlowStore::new(fs.clone(), in_flight, 0));
        load_and_check(store.clone(), &m, 1, 1, opts(threads), &|_| Sharding::Full).await;
        let peak = store.peak.load(Ordering::SeqCst);
        assert_eq!(
            peak, expect,
            "{threads} reader thread(s) x {in_flight} in flight: {peak} reads overlapped"
        );
        assert_eq!(
            store.reads.load(Ordering::SeqCst),
            16,
            "one read per record"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharded_loads_with_reads_in_flight_are_exact() {
    // Rows saved by 4 ranks, loaded by 3 ranks by columns: scattered reads
    // into several destinations, four at a time per reader thread.
    let m = Model {
        seed: 19,
        ..Model::default()
    }
    .tensor("w", DType::BF16, &[1024, 1536], Sharding::Rows)
    .tensor("v", DType::F32, &[768, 1024], Sharding::Rows)
    .tensor("b", DType::F32, &[300], Sharding::Replicated)
    .bytes("cfg", 700, false);
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://concurrency-reshard"));
    save_model(fs.clone(), &m, 4, fast_writer()).await;
    let store = Arc::new(SlowStore::new(fs, 4, 0));
    load_and_check(
        store.clone(),
        &m,
        4,
        3,
        opts(1),
        &|s| match s.name.as_str() {
            "w" => Sharding::Cols,
            "v" => Sharding::Grid,
            _ => Sharding::Full,
        },
    )
    .await;
    assert!(store.peak.load(Ordering::SeqCst) > 1, "reads overlapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_among_those_in_flight_fails_the_load_naming_the_item() {
    let fs = saved().await;
    let m = model();
    let store = Arc::new(SlowStore::new(fs, 4, 5));
    let dests = vec![m.dest(0, 1, 1, &|_| Sharding::Full)];
    let errs = all_err(load_ranks(store.clone(), opts(1), dests).await, "load");
    assert_error(
        &errs[0],
        ErrorKind::Io,
        &["layer", "connection reset by the store"],
    );
    // The other reads stop early instead of running to the end.
    assert!(store.reads.load(Ordering::SeqCst) < 16);
}

/// A store that reads best in requests of `size` bytes.
#[derive(Debug)]
struct Sized {
    store: SlowStore,
    size: u64,
}

impl FileSystemLayer for Sized {
    fn inner(&self) -> &dyn FileSystem {
        &self.store
    }
    fn read_request_size(&self) -> Option<u64> {
        Some(self.size)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_below_the_stores_request_size_are_read_together() {
    // Sixteen records of 512 KiB, read in requests of 2 MiB: four reads,
    // four at once, every byte checked.
    let fs = saved().await;
    let m = model();
    let store = Arc::new(Sized {
        store: SlowStore::new(fs, 4, 0),
        size: 2 << 20,
    });
    let out = load_and_check(store.clone(), &m, 1, 1, opts(1), &|_| Sharding::Full).await;
    assert_eq!(store.store.reads.load(Ordering::SeqCst), 4);
    assert_eq!(store.store.peak.load(Ordering::SeqCst), 4);
    assert_eq!(out[0].stats.requests, 4);
    // Without checksum checks (records read as unverified parts) too.
    let fs = store.store.inner.clone();
    let unverified = Arc::new(Sized {
        store: SlowStore::new(fs, 4, 0),
        size: 2 << 20,
    });
    let out = load_and_check(
        unverified.clone(),
        &m,
        1,
        1,
        opts(1).verify_checksums(false),
        &|_| Sharding::Full,
    )
    .await;
    assert_eq!(unverified.store.reads.load(Ordering::SeqCst), 4);
    assert_eq!(out[0].stats.requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_grouped_read_names_its_own_record() {
    // Records read four to a request: a flipped byte in the last bytes of
    // one record fails the load naming that record and its file, not a
    // neighbour in the same request.
    let m = model();
    let store = Backend::Memory.make_fs("grouped-flip");
    save_model(store.fs(), &m, 1, fast_writer()).await;
    let md = store.metadata();
    for (item, _, st) in md.records().skip(5).take(1) {
        let file = md.files[st.file as usize].name.clone();
        let good = store.read_raw(&file).unwrap();
        let mut bad = good.clone();
        bad[(st.offset + st.length - 1) as usize] ^= 0x40;
        store.write_raw(&file, bad);
        let sized = Arc::new(Sized {
            store: SlowStore::new(store.fs(), 4, 0),
            size: 2 << 20,
        });
        let dests = vec![m.dest(0, 1, 1, &|_| Sharding::Full)];
        let errs = all_err(load_ranks(sized.clone(), opts(1), dests).await, "load");
        assert_error(&errs[0], ErrorKind::ChecksumMismatch, &[item, &file]);
        assert!(
            sized.store.reads.load(Ordering::SeqCst) < 16,
            "records were read in groups"
        );
        store.write_raw(&file, good);
    }
    load_and_check(store.fs(), &m, 1, 1, opts(1), &|_| Sharding::Full).await;
}
