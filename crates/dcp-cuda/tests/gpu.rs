//! GPU tests: device tensors saved through `FileSystemWriter` with 1, 2 and
//! 4 writer threads load bit-exact and are staged within the copy-ahead
//! budget; pinned buffers are reused across saves; a staged copy dropped
//! unwaited gives its buffer back only once the copy is done; loaded bytes
//! go back to the device bit-exact, and `load_to_device` fills device
//! memory through pinned staging buffers bit-exact within its budget.
//!
//! They need an NVIDIA GPU and its driver. Without them each test says, on
//! stderr and past the test harness's capture, that it was SKIPPED, and
//! passes; with `DCP_CUDA_REQUIRE_GPU=1` (set by `cargo xtask gpu-check`) a
//! missing GPU fails them instead.

use bytes::Bytes;
use dcp_core::{
    load, save, ChunkBox, DType, DestStateDict, FileSystem, FileSystemReader, FileSystemWriter,
    ReaderOptions, Single, StateDict, WriterOptions,
};
use dcp_cuda::CudaStager;
use std::io::Write;
use std::sync::Arc;

/// The stager of device 0, or `None` after saying plainly why the test is
/// skipped (panics instead when a GPU is required).
fn stager_or_skip(test: &str) -> Option<Arc<CudaStager>> {
    match CudaStager::new(0) {
        Ok(s) => Some(s),
        Err(e) => {
            if std::env::var_os("DCP_CUDA_REQUIRE_GPU").is_some_and(|v| v == "1") {
                panic!("{test}: DCP_CUDA_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            // Straight to stderr: the harness does not capture it.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no usable CUDA device ({e})"
            );
            None
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// (name, dtype, shape) of the test model: about 7 MB, odd sizes included.
fn layout() -> Vec<(&'static str, DType, Vec<u64>)> {
    vec![
        ("emb", DType::BF16, vec![1000, 1024]),
        ("w", DType::F32, vec![777, 1024]),
        ("b", DType::F32, vec![4099]),
        ("step", DType::I64, vec![]),
    ]
}

fn host_model() -> Vec<Vec<u8>> {
    layout()
        .iter()
        .enumerate()
        .map(|(i, (_, dt, shape))| {
            let n: u64 = shape.iter().product();
            pattern(i as u64 + 1, (n * dt.size() as u64) as usize)
        })
        .collect()
}

fn device_state_dict(stager: &Arc<CudaStager>, host: &[Vec<u8>]) -> StateDict {
    let mut sd = StateDict::new();
    for (i, (name, dt, shape)) in layout().into_iter().enumerate() {
        let dev = Arc::new(stager.upload_pieces(i % 3, &host[i], 1 << 20).unwrap());
        sd.insert_full_tensor(name, dt, shape, stager.chunk(dev).unwrap())
            .unwrap();
    }
    sd
}

async fn load_all(fs: Arc<dyn FileSystem>) -> Vec<Vec<u8>> {
    let mut dest = DestStateDict::new();
    for (name, dt, shape) in layout() {
        let full = ChunkBox::full(&shape);
        dest.want_tensor(name, dt, shape, vec![full]).unwrap();
    }
    let reader = FileSystemReader::new(fs, ReaderOptions::default());
    let loaded = load(dest, &reader, &Single).await.unwrap();
    layout()
        .iter()
        .map(|(name, _, _)| {
            loaded.state_dict.tensor(name).unwrap().chunks[0]
                .data
                .to_vec()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_tensors_round_trip_within_the_copy_ahead_budget() {
    let Some(stager) = stager_or_skip("device_tensors_round_trip_within_the_copy_ahead_budget")
    else {
        return;
    };
    let host = host_model();
    let sd = device_state_dict(&stager, &host);
    let copy_ahead = 1 << 20;
    for threads in [1usize, 2, 4] {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path()));
        let o = WriterOptions::default()
            .thread_count(threads)
            .per_thread_copy_ahead(copy_ahead)
            .sync_files(false);
        let before = stager.copied_bytes();
        let writer = FileSystemWriter::new(fs.clone(), o).unwrap();
        let r = save(&sd, &writer, &Single).await.unwrap();
        let total: usize = host.iter().map(Vec::len).sum();
        assert_eq!(
            stager.copied_bytes() - before,
            total as u64,
            "{threads} threads"
        );
        let bound = (threads * copy_ahead) as u64;
        assert!(
            r.staged_peak_bytes > 0 && r.staged_peak_bytes <= bound,
            "{threads} threads: {} staged bytes at most, budget {bound}",
            r.staged_peak_bytes
        );
        let loaded = load_all(fs).await;
        assert!(loaded == host, "{threads} threads: not bit-exact");

        // Host to device: the loaded bytes back on the device, bit-exact.
        let up = stager.upload_pieces(threads, &loaded[1], 300_000).unwrap();
        let back = stager.lane(0).unwrap().clone_dtoh(&up).unwrap();
        assert!(back == host[1], "{threads} threads: upload not bit-exact");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_buffers_are_reused_across_saves_of_the_same_layout() {
    let Some(stager) = stager_or_skip("pinned_buffers_are_reused_across_saves_of_the_same_layout")
    else {
        return;
    };
    let host = host_model();
    let sd = device_state_dict(&stager, &host);
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path()));
    let o = WriterOptions::default()
        .thread_count(2)
        .per_thread_copy_ahead(1 << 20)
        .sync_files(false);
    let writer = FileSystemWriter::new(fs.clone(), o).unwrap();
    save(&sd, &writer, &Single).await.unwrap();
    let (allocs, pinned) = (stager.pinned_allocations(), stager.pinned_bytes());
    assert!(allocs > 0);
    for _ in 0..2 {
        save(&sd, &writer, &Single).await.unwrap();
        assert_eq!(stager.pinned_allocations(), allocs, "a new pinned buffer");
        assert_eq!(stager.pinned_bytes(), pinned);
    }
    assert_eq!(stager.free_pinned_bytes(), pinned, "every buffer back");
    assert!(load_all(fs).await == host);
}

#[test]
fn an_unwaited_copy_returns_its_buffer_only_when_done() {
    let Some(stager) = stager_or_skip("an_unwaited_copy_returns_its_buffer_only_when_done") else {
        return;
    };
    let host = pattern(9, 8 << 20);
    let dev = Arc::new(stager.upload(0, &host).unwrap());
    let src = stager.source(dev).unwrap();
    // Dropped without `wait`: the drop synchronizes, then pools the buffer.
    drop(src.stage(0, 0, 4 << 20).unwrap());
    assert_eq!(stager.free_pinned_bytes(), 4 << 20);
    let allocs = stager.pinned_allocations();
    // The same buffer serves the next copy, which sees its own bytes.
    let b: Bytes = src.stage(1, 4 << 20, 4 << 20).unwrap().wait().unwrap();
    assert_eq!(stager.pinned_allocations(), allocs, "reused");
    assert!(b[..] == host[4 << 20..]);
    assert_eq!(stager.free_pinned_bytes(), 0, "held by the bytes");
    let clone = b.clone();
    drop(b);
    assert_eq!(stager.free_pinned_bytes(), 0, "a clone still holds it");
    drop(clone);
    assert_eq!(stager.free_pinned_bytes(), 4 << 20);
    // Empty and out-of-range pieces.
    assert!(src.stage(0, 100, 0).unwrap().wait().unwrap().is_empty());
    let Err(e) = src.stage(0, (8 << 20) - 1, 2) else {
        panic!("a range past the end was staged");
    };
    assert!(e.message().contains("device tensor"), "{e}");
}

/// Loads into device memory through pinned staging buffers: the checkpoint
/// of the host model loaded whole and in row shards (one saved chunk filling
/// parts of several device tensors), with 1, 2 and 4 copy lanes, with and
/// without checksum verification, lands bit-exact on the device, within
/// `thread_count x per_thread_copy_ahead` staged bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn device_loads_land_bit_exact_within_the_budget() {
    let Some(stager) = stager_or_skip("device_loads_land_bit_exact_within_the_budget") else {
        return;
    };
    let host = host_model();
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path()));
    let mut sd = StateDict::new();
    for (i, (name, dt, shape)) in layout().into_iter().enumerate() {
        sd.insert_full_tensor(name, dt, shape, Bytes::from(host[i].clone()))
            .unwrap();
    }
    let w = FileSystemWriter::new(fs.clone(), WriterOptions::default().sync_files(false)).unwrap();
    save(&sd, &w, &Single).await.unwrap();
    let copy_ahead = 1 << 20;
    for threads in [1usize, 2, 4] {
        for verify in [false, true] {
            for parts in [1u64, 3] {
                let what = format!("{threads} lanes, verify {verify}, {parts} parts");
                let mut dest = dcp_core::DeviceDest::new();
                let mut sinks = Vec::new();
                for (i, (name, dt, shape)) in layout().into_iter().enumerate() {
                    let rows = shape.first().copied().unwrap_or(1);
                    let mut chunks: Vec<(ChunkBox, Arc<dyn dcp_core::ChunkSink>)> = Vec::new();
                    for k in 0..parts.min(rows) {
                        let region = if shape.is_empty() {
                            ChunkBox::full(&shape)
                        } else {
                            let (lo, hi) = (rows * k / parts, rows * (k + 1) / parts);
                            let mut sizes = shape.clone();
                            sizes[0] = hi - lo;
                            let mut offsets = vec![0; shape.len()];
                            offsets[0] = lo;
                            ChunkBox::new(offsets, sizes).unwrap()
                        };
                        let len = (region.numel() * dt.size() as u64) as usize;
                        let start = if shape.is_empty() {
                            0
                        } else {
                            len / region.sizes[0] as usize * region.offsets[0] as usize
                        };
                        let mem = stager.lane(0).unwrap().alloc_zeros::<u8>(len).unwrap();
                        let sink = stager.sink(mem).unwrap();
                        sinks.push((i, start, sink.clone()));
                        chunks.push((region, sink));
                    }
                    dest.insert_tensor(name, dt, shape, chunks).unwrap();
                }
                let reader = FileSystemReader::new(
                    fs.clone(),
                    ReaderOptions::default()
                        .thread_count(threads)
                        .verify_checksums(verify),
                );
                let o = dcp_core::DeviceLoadOptions::default()
                    .thread_count(threads)
                    .per_thread_copy_ahead(copy_ahead);
                let r = dcp_core::load_to_device(&dest, &reader, &Single, &o)
                    .await
                    .unwrap();
                let total: usize = host.iter().map(Vec::len).sum();
                assert_eq!(r.uploaded_bytes, total as u64, "{what}");
                let largest = host.iter().map(Vec::len).max().unwrap() as u64;
                let bound = (threads * copy_ahead) as u64;
                let bound = if verify { bound.max(largest) } else { bound };
                assert!(
                    r.staged_peak_bytes > 0 && r.staged_peak_bytes <= bound,
                    "{what}: {} staged bytes, bound {bound}",
                    r.staged_peak_bytes
                );
                drop(dest);
                for (i, start, sink) in sinks {
                    let sink = Arc::try_unwrap(sink).expect("the load let go of the sink");
                    let mem = sink.into_slice();
                    let back = stager.lane(0).unwrap().clone_dtoh(&mem).unwrap();
                    assert!(
                        back[..] == host[i][start..start + back.len()],
                        "{what}: tensor {i} at {start}: not bit-exact on the device"
                    );
                }
            }
        }
    }
}
