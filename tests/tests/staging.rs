//! Staging and asynchronous saves: chunks in simulated device memory are
//! staged within the copy-ahead budget and written bit-exact; `async_save`
//! returns after one copy, writes in the background, reports background
//! failures to its handle, never interleaves two saves, and reuses its pool.

use dcp_core::layer::FileSystemLayer;
use dcp_core::stage::sim::SimDevice;
use dcp_core::{
    AsyncSave, AsyncSaver, ChunkData, Collective, DType, ErrorKind, FileSystem, FileSystemWriter,
    Item, ReaderOptions, SaveOptions, SaveResult, StateDict, StorageWriter, TensorChunk, WhenBusy,
    WriterOptions,
};
use dcp_testkit::{Fault, FaultFs, Op};
use dcp_tests::*;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WORLD: usize = 3;
const T: Duration = Duration::from_secs(60);

/// About 1.6 MB over three ranks, chunks of up to 190 KB.
fn model(seed: u64) -> Model {
    Model {
        seed,
        ..Default::default()
    }
    .tensor("emb", DType::BF16, &[300, 256], Sharding::Rows)
    .tensor("w", DType::F32, &[256, 128], Sharding::Cols)
    .tensor("g", DType::F16, &[96, 96], Sharding::Grid)
    .tensor("b", DType::F32, &[512], Sharding::Replicated)
    .tensor("step", DType::I64, &[], Sharding::Full)
    .bytes("rng", 100, true)
}

/// `sd` with every tensor chunk moved to `dev`'s (simulated) memory.
fn on_device(sd: &StateDict, dev: &Arc<SimDevice>) -> StateDict {
    let mut out = StateDict::new();
    for (name, item) in sd.iter() {
        match item {
            Item::Tensor(t) => {
                let chunks = t
                    .chunks
                    .iter()
                    .map(|c| {
                        let host = c.data.host().expect("generated in host memory").clone();
                        TensorChunk::new(c.region.clone(), ChunkData::Source(dev.source(host)))
                    })
                    .collect();
                out.insert_tensor(name.clone(), t.dtype, t.shape.clone(), chunks, t.replicated)
                    .unwrap();
            }
            Item::Bytes { data, replicated } => out
                .insert_bytes(name.clone(), data.clone(), *replicated)
                .unwrap(),
        }
    }
    out
}

/// The simulated-device pipeline with 1, 2 and 4 writer threads, with and
/// without compression: the checkpoint loads bit-exact, and a rank never
/// held more than `thread_count x per_thread_copy_ahead` staged bytes (and
/// did stage: the chunks were in device memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_chunks_are_staged_within_the_copy_ahead_budget() {
    let m = model(1);
    let copy_ahead = 48 << 10;
    for threads in [1usize, 2, 4] {
        for zstd in [false, true] {
            let what = format!("{threads} threads, zstd {zstd}");
            // 2 GB/s and 50 us per copy: PCIe-like, slow enough to overlap.
            let dev = SimDevice::new(Duration::from_micros(50), 2e9).unwrap();
            let store = Backend::Fs.make_fs("staging");
            let mut o = fast_writer()
                .thread_count(threads)
                .per_thread_copy_ahead(copy_ahead);
            if zstd {
                o = o.extensions(vec![
                    Arc::new(dcp_ext::Zstd::new(3).unwrap()),
                    Arc::new(dcp_ext::Crc32c),
                ]);
            }
            let sds = m
                .state_dicts(WORLD)
                .iter()
                .map(|sd| on_device(sd, &dev))
                .collect();
            let saved = all_ok(save_ranks(store.fs(), o, sds).await, &what);
            let device_bytes: u64 = m
                .state_dicts(WORLD)
                .iter()
                .flat_map(|sd| {
                    sd.iter()
                        .filter_map(|(_, i)| match i {
                            Item::Tensor(t) => {
                                Some(t.chunks.iter().map(|c| c.data.len()).sum::<u64>())
                            }
                            Item::Bytes { .. } => None,
                        })
                        .collect::<Vec<_>>()
                })
                .sum();
            assert!(dev.copied_bytes() > 0, "{what}: nothing staged");
            assert!(
                dev.copied_bytes() <= device_bytes,
                "{what}: {} staged of {device_bytes}",
                dev.copied_bytes()
            );
            for (rank, r) in saved.iter().enumerate() {
                let bound = (threads * copy_ahead) as u64;
                assert!(
                    r.staged_peak_bytes > 0 && r.staged_peak_bytes <= bound,
                    "{what}: rank {rank} held {} staged bytes, budget {bound}",
                    r.staged_peak_bytes
                );
            }
            let ro = ReaderOptions::default().registry(dcp_ext::registry());
            load_and_check(store.fs(), &m, WORLD, 2, ro, &|_| Sharding::Rows).await;
        }
    }
}

/// A sink that keeps what it is given (OpenDAL's writers: a multipart
/// upload's part buffer, `memory://` until the file closes) never leaves
/// the copy-ahead budget waiting on the pieces it holds: device-memory
/// chunks of several times the budget save on one writer thread to every
/// backend (the object stores where their servers are installed) and load
/// bit-exact, within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sinks_that_keep_bytes_never_stall_the_copy_ahead_budget() {
    // About 4.7 MB per rank against a budget of 1 MB: pieces of 0.5 MB,
    // far less than one 8 MiB upload part.
    let m = Model {
        seed: 7,
        ..Default::default()
    }
    .tensor("big", DType::BF16, &[3600, 2048], Sharding::Rows)
    .tensor("small", DType::F32, &[64], Sharding::Replicated);
    let copy_ahead = 1 << 20;
    for b in backends() {
        let what = b.name().to_string();
        let dev = SimDevice::new(Duration::from_micros(50), 2e9).unwrap();
        let store = b.make_fs("keeps-bytes");
        let o = fast_writer()
            .thread_count(1)
            .per_thread_copy_ahead(copy_ahead);
        let sds = m
            .state_dicts(WORLD)
            .iter()
            .map(|sd| on_device(sd, &dev))
            .collect();
        // On a thread and runtime of its own, so that a save stuck in a
        // blocking wait fails the test instead of hanging it.
        let (tx, rx) = channel();
        let fs = store.fs();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let _ = tx.send(rt.block_on(save_ranks(fs, o, sds)));
        });
        let saved = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("{what}: the save did not finish in 120 s"));
        let saved = all_ok(saved, &what);
        assert!(dev.copied_bytes() > 0, "{what}: nothing staged");
        for (rank, r) in saved.iter().enumerate() {
            assert!(
                r.staged_peak_bytes > 0 && r.staged_peak_bytes <= copy_ahead as u64,
                "{what}: rank {rank} held {} staged bytes, budget {copy_ahead}",
                r.staged_peak_bytes
            );
        }
        load_and_check(store.fs(), &m, WORLD, 2, ReaderOptions::default(), &|_| {
            Sharding::Cols
        })
        .await;
    }
}

/// Each rank's saver, and a writer over `fs`.
fn savers(fs: Arc<dyn FileSystem>, o: WriterOptions) -> (Vec<AsyncSaver>, Arc<dyn StorageWriter>) {
    let w: Arc<dyn StorageWriter> = Arc::new(FileSystemWriter::new(fs, o).unwrap());
    ((0..WORLD).map(|_| AsyncSaver::new()).collect(), w)
}

/// Start an asynchronous save of `sds` on every rank; returns each rank's
/// handle (or the error of `async_save` itself).
async fn async_save_ranks(
    savers: &[AsyncSaver],
    writer: Arc<dyn StorageWriter>,
    sds: Vec<StateDict>,
) -> Vec<dcp_core::Result<AsyncSave>> {
    let savers = Arc::new(savers.to_vec());
    let sds = Arc::new(sds);
    dcp_core::local::run_ranks(WORLD, T, move |g| {
        let (savers, sds, writer) = (savers.clone(), sds.clone(), writer.clone());
        async move {
            let rank = g.rank();
            let group: Arc<dyn Collective> = Arc::new(g);
            savers[rank]
                .async_save(&sds[rank], writer, group, SaveOptions::default())
                .await
        }
    })
    .await
}

async fn outcomes(handles: Vec<AsyncSave>) -> Vec<dcp_core::Result<SaveResult>> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await);
    }
    out
}

/// An asynchronous save from host memory and one from device memory both
/// load bit-exact; the handle reports the copy it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_saves_round_trip() {
    let m = model(2);
    let dev = SimDevice::new(Duration::ZERO, 1e10).unwrap();
    for device in [false, true] {
        let store = Backend::Fs.make_fs("async");
        let (savers, w) = savers(store.fs(), fast_writer());
        let mut sds = m.state_dicts(WORLD);
        if device {
            sds = sds.iter().map(|sd| on_device(sd, &dev)).collect();
        }
        let bytes: Vec<u64> = m
            .state_dicts(WORLD)
            .iter()
            .map(|s| s.local_bytes())
            .collect();
        let handles = all_ok(async_save_ranks(&savers, w, sds).await, "async_save");
        for (h, b) in handles.iter().zip(&bytes) {
            assert_eq!(h.staged_bytes(), *b, "one copy of the rank's state dict");
        }
        let saved = all_ok(outcomes(handles).await, "the background save");
        assert_eq!(saved[0].metadata.save_id, saved[2].metadata.save_id);
        load_and_check(store.fs(), &m, WORLD, 3, ReaderOptions::default(), &|_| {
            Sharding::Cols
        })
        .await;
    }
}

/// A write that fails in the background reaches every rank's handle, and
/// nothing is committed: the previous checkpoint still loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_background_failure_reaches_the_handle_and_commits_nothing() {
    let (m0, m1) = (model(3), model(4));
    let store = Backend::Memory.make_fs("async-fail");
    save_model(store.fs(), &m0, WORLD, fast_writer()).await;
    let faulty = Arc::new(FaultFs::new(store.fs()));
    faulty.arm(Fault::FailNth {
        op: Op::Write,
        nth: 2,
    });
    let (savers, w) = savers(faulty.clone(), fast_writer());
    let handles = all_ok(
        async_save_ranks(&savers, w, m1.state_dicts(WORLD)).await,
        "async_save returns before writing",
    );
    let errs = all_err(outcomes(handles).await, "the failed background save");
    for e in &errs {
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().contains("injected fault"), "{e}");
    }
    load_and_check(store.fs(), &m0, WORLD, 1, ReaderOptions::default(), &|_| {
        Sharding::Rows
    })
    .await;
}

/// Holds every rank's first data-file creation until released.
#[derive(Debug)]
struct HoldWrites {
    inner: Arc<dyn FileSystem>,
    go: Mutex<Option<Receiver<()>>>,
    reached: Mutex<Sender<()>>,
}

impl FileSystemLayer for HoldWrites {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create(&self, name: &str) -> dcp_core::Result<Box<dyn dcp_core::FileSink>> {
        if let Some(rx) = self.go.lock().unwrap().take() {
            let _ = self.reached.lock().unwrap().send(());
            rx.recv_timeout(T).expect("released");
        }
        self.inner.create(name)
    }
}

/// A second `async_save` while the first is still writing waits for it
/// (the saves commit one after the other), or with `WhenBusy::Fail` is
/// refused at once; the pool is reused by a save of the same layout, with
/// no new allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_async_saves_never_interleave_and_the_pool_is_reused() {
    let (ma, mb) = (model(5), model(6));
    for when_busy in [WhenBusy::Wait, WhenBusy::Fail] {
        let store = Backend::Memory.make_fs("async-busy");
        let (go_tx, go_rx) = channel();
        let (reached_tx, reached_rx) = channel();
        let held: Arc<dyn FileSystem> = Arc::new(HoldWrites {
            inner: store.fs(),
            go: Mutex::new(Some(go_rx)),
            reached: Mutex::new(reached_tx),
        });
        let w: Arc<dyn StorageWriter> =
            Arc::new(FileSystemWriter::new(held, fast_writer()).unwrap());
        let savers: Vec<AsyncSaver> = (0..WORLD)
            .map(|_| AsyncSaver::new().when_busy(when_busy))
            .collect();
        let first = all_ok(
            async_save_ranks(&savers, w.clone(), ma.state_dicts(WORLD)).await,
            "first async_save",
        );
        tokio::task::spawn_blocking(move || reached_rx.recv_timeout(T).unwrap())
            .await
            .unwrap();
        let allocations: Vec<u64> = savers.iter().map(|s| s.pool().allocations()).collect();
        match when_busy {
            WhenBusy::Fail => {
                let errs = all_err(
                    async_save_ranks(&savers, w.clone(), mb.state_dicts(WORLD)).await,
                    "a second async_save while the first writes",
                );
                for e in errs {
                    assert_error(&e, ErrorKind::Busy, &["still writing"]);
                }
                go_tx.send(()).unwrap();
                let a = all_ok(outcomes(first).await, "the first save");
                assert_eq!(store.metadata().save_id, a[0].metadata.save_id);
            }
            WhenBusy::Wait => {
                // The second waits for the first; release it meanwhile.
                let second = {
                    let (savers, w, sds) = (savers.clone(), w.clone(), mb.state_dicts(WORLD));
                    tokio::spawn(async move { async_save_ranks(&savers, w, sds).await })
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(!second.is_finished(), "the second did not wait");
                go_tx.send(()).unwrap();
                let second = all_ok(second.await.unwrap(), "the second async_save");
                let a = all_ok(outcomes(first).await, "the first save");
                let b = all_ok(outcomes(second).await, "the second save");
                assert_eq!(b[0].metadata.generation, a[0].metadata.generation + 1);
                load_and_check(store.fs(), &mb, WORLD, 2, ReaderOptions::default(), &|_| {
                    Sharding::Rows
                })
                .await;
                // Same layout: every buffer came from the pool.
                let now: Vec<u64> = savers.iter().map(|s| s.pool().allocations()).collect();
                assert_eq!(now, allocations, "the second save allocated");
            }
        }
    }
}

/// A changed layout frees the buffers it no longer needs: the pool never
/// holds more than one save's worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_layout_frees_what_it_no_longer_needs() {
    let big = model(7);
    let small = Model {
        seed: 8,
        ..Default::default()
    }
    .tensor("only", DType::F32, &[64, 64], Sharding::Rows);
    let store = Backend::Memory.make_fs("async-layout");
    let (savers, w) = savers(store.fs(), fast_writer());
    for m in [&big, &small] {
        let hs = all_ok(
            async_save_ranks(&savers, w.clone(), m.state_dicts(WORLD)).await,
            "async_save",
        );
        all_ok(outcomes(hs).await, "save");
    }
    for (rank, s) in savers.iter().enumerate() {
        let small_bytes = small.state_dict(rank, WORLD).local_bytes();
        assert_eq!(s.pool().free_bytes(), small_bytes, "rank {rank}");
    }
}
