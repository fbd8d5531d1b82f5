//! Loads into (simulated) device memory: records are read into bounded
//! staging buffers, verified, and copied to the device on copy lanes while
//! the next records are read. Same-sharding and resharded loads with 1, 2
//! and 4 lanes fill device memory byte for byte as the independent
//! reference says, within `thread_count x per_thread_copy_ahead` staged
//! bytes; a failed copy or a damaged record fails the load naming the item.

use dcp_core::local::run_ranks;
use dcp_core::metadata::ItemMeta;
use dcp_core::stage::sim::{SimDevice, SimSink};
use dcp_core::{
    load_to_device, ChunkBox, ChunkSink, DType, DeviceDest, DeviceLoadOptions, DeviceLoadResult,
    ErrorKind, FileSystem, FileSystemReader, ReaderOptions,
};
use dcp_tests::*;
use std::sync::Arc;
use std::time::Duration;

const SAVED: usize = 4;

/// About 1.2 MB over four ranks: rows, columns, a grid, uneven rows, a
/// scalar.
fn model() -> Model {
    Model {
        seed: 7,
        ..Default::default()
    }
    .tensor("emb", DType::BF16, &[300, 256], Sharding::Rows)
    .tensor("w", DType::F32, &[256, 128], Sharding::Cols)
    .tensor("g", DType::F16, &[96, 96], Sharding::Grid)
    .tensor("u", DType::F32, &[77, 33], Sharding::Uneven)
    .tensor("step", DType::I64, &[], Sharding::Full)
}

/// Simulated device memory by item name and box.
type Sinks = Vec<(String, ChunkBox, Arc<SimSink>)>;

/// Each rank's device destination under `sharding_of` for a `world`-rank
/// load: every box in its own simulated device memory.
fn device_dests(
    m: &Model,
    dev: &Arc<SimDevice>,
    world: usize,
    sharding_of: &dyn Fn(&TensorSpec) -> Sharding,
) -> Vec<(DeviceDest, Sinks)> {
    (0..world)
        .map(|rank| {
            let mut d = DeviceDest::new();
            let mut sinks = Vec::new();
            for (spec, _) in &m.tensors {
                let mut boxes = load_boxes(&spec.shape, sharding_of(spec), world).swap_remove(rank);
                boxes.dedup();
                let chunks: Vec<(ChunkBox, Arc<dyn ChunkSink>)> = boxes
                    .into_iter()
                    .map(|b| {
                        let sink = dev.sink(b.numel() * spec.dtype.size() as u64);
                        sinks.push((spec.name.clone(), b.clone(), sink.clone()));
                        (b, sink as Arc<dyn ChunkSink>)
                    })
                    .collect();
                d.insert_tensor(&spec.name, spec.dtype, spec.shape.clone(), chunks)
                    .unwrap();
            }
            (d, sinks)
        })
        .collect()
}

async fn load_device_ranks(
    fs: Arc<dyn FileSystem>,
    ro: ReaderOptions,
    dests: Vec<DeviceDest>,
    o: DeviceLoadOptions,
) -> Vec<dcp_core::Result<DeviceLoadResult>> {
    let n = dests.len();
    let dests = Arc::new(dests);
    let reader = Arc::new(FileSystemReader::new(fs, ro));
    run_ranks(n, TIMEOUT, move |g| {
        let (dests, reader, o) = (dests.clone(), reader.clone(), o.clone());
        async move {
            let rank = dcp_core::Collective::rank(&g);
            load_to_device(&dests[rank], reader.as_ref(), &g, &o).await
        }
    })
    .await
}

/// Assert every sink holds exactly the reference bytes of its box.
fn check_sinks(m: &Model, sinks: &Sinks, what: &str) {
    for (name, region, sink) in sinks {
        let spec = m.spec(name);
        let want = slice_box(&spec.global(), &spec.shape, spec.dtype.size(), region);
        let got = sink.to_vec();
        assert!(
            got == want,
            "{what}: {name} ({region}): device memory differs from the reference (first at byte {:?})",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
}

/// Same-sharding (4 ranks) and resharded (3 ranks, other shardings) loads
/// into simulated device memory with 1, 2 and 4 copy lanes, with checksums
/// verified (parts staged whole) and not (parts cut to the budget): every
/// byte matches the reference, the load ran in several batches, and no rank
/// held more than `thread_count x per_thread_copy_ahead` staged bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_loads_match_the_reference_within_the_staging_budget() {
    let m = model();
    let store = Backend::Fs.make_fs("device-load");
    all_ok(
        save_ranks(store.fs(), fast_writer(), m.state_dicts(SAVED)).await,
        "save",
    );
    // The largest part one load needs whole (a saved chunk): the budget
    // must hold it while checksums are verified.
    let md = store.metadata();
    let largest: u64 = md
        .items
        .iter()
        .filter_map(|(_, i)| match i {
            ItemMeta::Tensor { chunks, dtype, .. } => chunks
                .iter()
                .map(|c| c.region.numel() * dtype.size() as u64)
                .max(),
            ItemMeta::Bytes { .. } => None,
        })
        .max()
        .unwrap();
    let other = other_sharding(&m, 1);
    let same = |spec: &TensorSpec| {
        m.tensors
            .iter()
            .find(|(t, _)| t.name == spec.name)
            .unwrap()
            .1
    };
    for threads in [1usize, 2, 4] {
        for verify in [true, false] {
            for (world, reshard) in [(SAVED, false), (3, true)] {
                let copy_ahead = if verify {
                    (largest as usize).div_ceil(threads).max(8 << 10)
                } else {
                    16 << 10
                };
                let what = format!(
                    "{threads} lanes, verify {verify}, {world} ranks{}",
                    if reshard { " resharded" } else { "" }
                );
                // 2 GB/s and 20 us per copy, with real copies.
                let dev = SimDevice::new(Duration::from_micros(20), 2e9).unwrap();
                let sharding: &dyn Fn(&TensorSpec) -> Sharding =
                    if reshard { &other } else { &same };
                let (dests, sinks): (Vec<_>, Vec<_>) =
                    device_dests(&m, &dev, world, sharding).into_iter().unzip();
                let o = DeviceLoadOptions::default()
                    .thread_count(threads)
                    .per_thread_copy_ahead(copy_ahead);
                let ro = ReaderOptions::default()
                    .thread_count(threads)
                    .verify_checksums(verify);
                let out = all_ok(
                    load_device_ranks(store.fresh_fs(), ro, dests, o).await,
                    &what,
                );
                for (rank, r) in out.iter().enumerate() {
                    let bound = (threads * copy_ahead) as u64;
                    let need: u64 = sinks[rank].iter().map(|(_, _, s)| s.len()).sum();
                    assert_eq!(r.uploaded_bytes, need, "{what}: rank {rank} copied");
                    assert!(
                        r.staged_peak_bytes > 0 && r.staged_peak_bytes <= bound,
                        "{what}: rank {rank} held {} staged bytes, budget {bound}",
                        r.staged_peak_bytes
                    );
                    assert!(
                        need <= bound / 2 || r.batches > 1,
                        "{what}: rank {rank} read {need} bytes in one batch"
                    );
                }
                for (rank, s) in sinks.iter().enumerate() {
                    check_sinks(&m, s, &format!("{what}, rank {rank}"));
                }
            }
        }
    }
}

/// A DMA-like device (copies keep the staging buffer as device memory)
/// loads the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dma_like_device_loads_the_same_bytes() {
    let m = model();
    let store = Backend::Memory.make_fs("device-load-dma");
    all_ok(
        save_ranks(store.fs(), fast_writer(), m.state_dicts(SAVED)).await,
        "save",
    );
    let dev = SimDevice::dma(Duration::from_micros(5), 10e9).unwrap();
    let other = other_sharding(&m, 2);
    let (dests, sinks): (Vec<_>, Vec<_>) = device_dests(&m, &dev, 3, &other).into_iter().unzip();
    let o = DeviceLoadOptions::default()
        .thread_count(2)
        .per_thread_copy_ahead(1 << 20);
    all_ok(
        load_device_ranks(store.fresh_fs(), ReaderOptions::default(), dests, o).await,
        "dma load",
    );
    for (rank, s) in sinks.iter().enumerate() {
        check_sinks(&m, s, &format!("dma, rank {rank}"));
    }
}

/// A copy to the device that fails fails the load on every rank, naming
/// the item and the chunk; nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_copy_fails_the_load_naming_the_item() {
    let m = model();
    let store = Backend::Fs.make_fs("device-load-fail");
    all_ok(
        save_ranks(store.fs(), fast_writer(), m.state_dicts(SAVED)).await,
        "save",
    );
    for threads in [1usize, 4] {
        let dev = SimDevice::new(Duration::from_micros(20), 2e9).unwrap();
        let other = other_sharding(&m, 1);
        let (dests, sinks): (Vec<_>, Vec<_>) =
            device_dests(&m, &dev, 3, &other).into_iter().unzip();
        let (name, region, bad) = sinks[1]
            .iter()
            .find(|(n, _, _)| n == "w")
            .expect("rank 1 loads part of w");
        bad.set_failing(true);
        let o = DeviceLoadOptions::default()
            .thread_count(threads)
            .per_thread_copy_ahead(16 << 10);
        let errs = all_err(
            load_device_ranks(
                store.fresh_fs(),
                ReaderOptions::default().verify_checksums(false),
                dests,
                o,
            )
            .await,
            "failing copy",
        );
        for e in &errs {
            assert_error(
                e,
                ErrorKind::Io,
                &[
                    "copy to the device failed",
                    &format!("{name}: copy of"),
                    &format!("to device chunk ({region})"),
                ],
            );
        }
    }
}

/// A damaged record is caught by its checksum before any of it reaches
/// the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_record_never_reaches_the_device() {
    let m = model();
    let store = Backend::Fs.make_fs("device-load-flip");
    all_ok(
        save_ranks(store.fs(), fast_writer(), m.state_dicts(1)).await,
        "save",
    );
    let md = store.metadata();
    let ItemMeta::Tensor { chunks, .. } = md.item("w").unwrap() else {
        panic!("w is a tensor")
    };
    let st = &chunks[0].storage;
    let file = md.files[st.file as usize].name.clone();
    let mut raw = store.read_raw(&file).unwrap();
    raw[(st.offset + st.length / 2) as usize] ^= 0x10;
    store.write_raw(&file, raw);

    let dev = SimDevice::new(Duration::from_micros(20), 2e9).unwrap();
    let spec = m.spec("w");
    let sink = dev.sink(spec.global().len() as u64);
    let mut d = DeviceDest::new();
    d.insert_tensor(
        "w",
        spec.dtype,
        spec.shape.clone(),
        vec![(
            ChunkBox::full(&spec.shape),
            sink.clone() as Arc<dyn ChunkSink>,
        )],
    )
    .unwrap();
    let errs = all_err(
        load_device_ranks(
            store.fresh_fs(),
            ReaderOptions::default(),
            vec![d],
            DeviceLoadOptions::default(),
        )
        .await,
        "damaged record",
    );
    assert_error(
        &errs[0],
        ErrorKind::ChecksumMismatch,
        &["w", "checksum mismatch", &file],
    );
    assert_eq!(sink.uploaded_bytes(), 0, "a damaged record was copied");
}

/// What a load refuses, a device load refuses too: another dtype, a name
/// the checkpoint lacks, a sink of the wrong length, zero lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_loads_refuse_bad_destinations() {
    let m = model();
    let store = Backend::Memory.make_fs("device-load-bad");
    all_ok(
        save_ranks(store.fs(), fast_writer(), m.state_dicts(1)).await,
        "save",
    );
    let dev = SimDevice::new(Duration::ZERO, 1e9).unwrap();
    let spec = m.spec("w");
    let full = ChunkBox::full(&spec.shape);
    let n = full.numel();
    let one = |name: &str, dtype: DType, len: u64| {
        let mut d = DeviceDest::new();
        d.insert_tensor(
            name,
            dtype,
            spec.shape.clone(),
            vec![(full.clone(), dev.sink(len) as Arc<dyn ChunkSink>)],
        )
        .map(|()| d)
    };
    let e = one("w", DType::F32, n).unwrap_err();
    assert_error(&e, ErrorKind::InvalidInput, &["w", "expected"]);
    let cases = [
        (
            one("w", DType::I32, n * 4).unwrap(),
            ErrorKind::InvalidInput,
            "saved as",
        ),
        (
            one("nope", DType::F32, n * 4).unwrap(),
            ErrorKind::NotFound,
            "not in the checkpoint",
        ),
    ];
    for (d, kind, msg) in cases {
        let errs = all_err(
            load_device_ranks(
                store.fresh_fs(),
                ReaderOptions::default(),
                vec![d],
                DeviceLoadOptions::default(),
            )
            .await,
            msg,
        );
        assert_error(&errs[0], kind, &[msg]);
    }
    let errs = all_err(
        load_device_ranks(
            store.fresh_fs(),
            ReaderOptions::default(),
            vec![one("w", DType::F32, n * 4).unwrap()],
            DeviceLoadOptions::default().thread_count(0),
        )
        .await,
        "zero lanes",
    );
    assert_error(&errs[0], ErrorKind::InvalidInput, &["thread_count"]);
}
