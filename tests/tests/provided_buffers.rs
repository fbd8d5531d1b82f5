//! Loading into memory the caller owns: destination chunks backed by
//! caller-provided buffers are filled in place, and the load allocates no
//! other buffer of a chunk's size (a counting allocator watches every
//! allocation of the process while the load runs).

use dcp_core::{ChunkBox, DType, DestChunk, DestStateDict, TensorBuffer};
use dcp_tests::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, recording the largest allocation made while
/// `WATCHING` is set.
struct Counting;

static WATCHING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees are ours; the bookkeeping touches only
// atomics and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded as received (see the impl's comment).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if WATCHING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCHING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SHAPE: [u64; 2] = [2048, 1024];

fn model() -> Model {
    Model {
        seed: 5,
        ..Model::default()
    }
    .tensor("w", DType::F32, &SHAPE, Sharding::Rows)
}

/// A tensor's memory as a framework would own it.
struct FrameworkStorage(Box<[u8]>);

impl TensorBuffer for FrameworkStorage {
    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// Load `w` into `world` ranks with `sharding`, into caller-provided
/// buffers; returns the largest allocation made during the load.
async fn load_into_provided(store: &Store, world: usize, sharding: Sharding) -> usize {
    let m = model();
    let spec = m.spec("w").clone();
    let boxes = load_boxes(&SHAPE, sharding, world);
    let mut dests = Vec::new();
    let mut addresses = Vec::new();
    for rank_boxes in &boxes {
        let mut d = DestStateDict::new();
        let chunks: Vec<DestChunk> = rank_boxes
            .iter()
            .map(|b| {
                let mem = vec![0xA5u8; b.numel() as usize * 4].into_boxed_slice();
                addresses.push(mem.as_ptr() as usize);
                DestChunk::provided(b.clone(), FrameworkStorage(mem))
            })
            .collect();
        d.insert_tensor("w", DType::F32, SHAPE.to_vec(), chunks)
            .unwrap();
        dests.push(d);
    }
    LARGEST.store(0, Ordering::SeqCst);
    WATCHING.store(true, Ordering::SeqCst);
    let results = load_ranks(
        store.fs(),
        dcp_core::ReaderOptions::default().thread_count(2),
        dests,
    )
    .await;
    WATCHING.store(false, Ordering::SeqCst);
    let largest = LARGEST.load(Ordering::SeqCst);
    eprintln!("largest allocation while loading {sharding:?} into {world} ranks: {largest} bytes");
    let mut seen = addresses.into_iter();
    for (r, out) in all_ok(results, "load").into_iter().enumerate() {
        let t = out.state_dict.tensor("w").unwrap();
        for (c, b) in t.chunks.iter().zip(&boxes[r]) {
            assert!(c.data.is_provided());
            assert_eq!(
                c.data.as_ptr() as usize,
                seen.next().unwrap(),
                "filled in place"
            );
            assert!(
                c.data[..] == spec.slice(b)[..],
                "rank {r} chunk {b} differs"
            );
        }
    }
    largest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_fill_caller_memory_in_place_without_another_buffer() {
    let store = Backend::Fs.make_fs("provided");
    // Saved by 2 ranks as rows of 4 MiB, with the default CRC-32C.
    save_model(store.fs(), &model(), 2, fast_writer()).await;
    let chunk_bytes = (SHAPE[0] * SHAPE[1] * 4 / 2) as usize;

    // Same sharding: every record read straight into its buffer and its
    // checksum checked there.
    let largest = load_into_provided(&store, 2, Sharding::Rows).await;
    assert!(
        largest < chunk_bytes / 2,
        "largest allocation during the load: {largest} bytes (a chunk is {chunk_bytes})"
    );
    // Resharded to columns: records scattered straight into the buffers of
    // both ranks (lent to each other), checksums over the scattered runs.
    let largest = load_into_provided(&store, 2, Sharding::Cols).await;
    assert!(
        largest < chunk_bytes / 2,
        "largest allocation during the resharded load: {largest} bytes (a chunk is {chunk_bytes})"
    );
}

#[test]
fn provided_buffers_of_the_wrong_size_are_refused() {
    let mut d = DestStateDict::new();
    let e = d
        .insert_tensor(
            "w",
            DType::F32,
            vec![4, 4],
            vec![DestChunk::provided(
                ChunkBox::new(vec![0, 0], vec![2, 4]).unwrap(),
                FrameworkStorage(vec![0u8; 31].into_boxed_slice()),
            )],
        )
        .unwrap_err();
    assert_error(
        &e,
        dcp_core::ErrorKind::InvalidInput,
        &["31 bytes", "expected 32"],
    );
}
