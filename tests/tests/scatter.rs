//! Scattered shared reads: ranks of one process (`LocalGroup`) loading a
//! resharded checkpoint read each saved record once, straight into the
//! buffers of every rank that needs part of it (one `preadv` per part on
//! local disk). Checked here on a local checkpoint large enough that every
//! record takes that path: the bytes against an independent reference, the
//! bytes read against the checkpoint's size, and CRC-32C verification over
//! the scattered pieces (a flipped byte fails every rank, naming the item
//! and the file; with verification off the load succeeds and exactly that
//! element differs).

use dcp_core::metadata::ItemMeta;
use dcp_core::{DType, ErrorKind, FileSystem, ReaderOptions, WriterOptions};
use dcp_tests::*;
use std::sync::Arc;

/// Rows by 4 ranks, columns (and a grid) by 3: every saved record is 768 KiB
/// or more, above the 256 KiB `small_record` default.
fn model() -> Model {
    Model {
        seed: 77,
        ..Model::default()
    }
    .tensor("w", DType::BF16, &[1024, 1536], Sharding::Rows)
    .tensor("v", DType::F32, &[768, 1024], Sharding::Rows)
}

fn sharding(spec: &TensorSpec) -> Sharding {
    if spec.name == "w" {
        Sharding::Cols
    } else {
        Sharding::Grid
    }
}

fn writer() -> WriterOptions {
    fast_writer().extensions(vec![Arc::new(dcp_ext::Crc32c::new())])
}

fn reader(verify: bool) -> ReaderOptions {
    ReaderOptions::default()
        .registry(dcp_ext::registry())
        .verify_checksums(verify)
        .thread_count(2)
}

fn dests(m: &Model, world: usize) -> Vec<dcp_core::DestStateDict> {
    (0..world).map(|r| m.dest(r, world, 4, &sharding)).collect()
}

/// `m` saved by `world` ranks with `opts` into a fresh local directory.
async fn saved(
    m: &Model,
    world: usize,
    opts: WriterOptions,
) -> (tempfile::TempDir, Arc<dyn FileSystem>, dcp_core::Metadata) {
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path()));
    let out = save_model(fs.clone(), m, world, opts).await;
    let md = out[0].metadata.as_ref().clone();
    (dir, fs, md)
}

/// Bytes of every record of the checkpoint (files less padding).
fn record_bytes(md: &dcp_core::Metadata) -> u64 {
    md.items
        .iter()
        .map(|(_, it)| match it {
            ItemMeta::Tensor { chunks, .. } => chunks.iter().map(|c| c.storage.length).sum::<u64>(),
            ItemMeta::Bytes { storage, .. } => storage.length,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharded_load_reads_every_byte_once_and_verifies() {
    let m = model();
    let (_dir, fs, md) = saved(&m, 4, writer()).await;
    let size: u64 = md.files.iter().map(|f| f.length).sum();
    // From the page cache (blocks copied out), and through a file system
    // that never reports data cached (one `preadv` per part, as from disk).
    let recording = Arc::new(RecordingFs::new(fs.clone()));
    for (verify, via) in [
        (true, fs.clone()),
        (false, fs.clone()),
        (true, recording.clone() as Arc<dyn FileSystem>),
        (false, recording.clone() as Arc<dyn FileSystem>),
    ] {
        let out = load_and_check(via, &m, 4, 3, reader(verify), &sharding).await;
        let read: u64 = out.iter().map(|o| o.stats.bytes_read).sum();
        // Each record once across the three ranks, and nothing else (the
        // raw format pads records to 64 bytes; padding is never read).
        let records = record_bytes(&md);
        assert_eq!(read, records, "verify={verify}");
        assert!(records <= size);
        // One request per record part (8 MiB parts): far fewer than rows.
        let requests: u64 = out.iter().map(|o| o.stats.requests).sum();
        assert!(requests <= 16, "verify={verify}: {requests} requests");
    }
    // Through the recording file system, each load read every record once.
    let calls = recording.reads();
    let scattered: u64 = calls
        .iter()
        .filter(|c| c.name != ".metadata")
        .map(|c| c.len)
        .sum();
    assert!(
        scattered >= 2 * (size - 4096) && scattered <= 2 * size,
        "{calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_fails_every_rank_or_lands_in_one_element() {
    let m = model();
    let (dir, fs, md) = saved(&m, 4, writer()).await;
    let (name, ItemMeta::Tensor { chunks, .. }) = &md.items[md
        .items
        .iter()
        .position(|(n, _)| n == "w")
        .expect("w saved")]
    else {
        panic!("w is a tensor")
    };
    // A byte in the middle of the third saved chunk of `w`.
    let st = &chunks[2].storage;
    let file = md.files[st.file as usize].name.clone();
    let at = st.offset + st.length / 2 + 1;
    let path = dir.path().join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let recording: Arc<dyn FileSystem> = Arc::new(RecordingFs::new(fs.clone()));
    for via in [fs.clone(), recording] {
        let errs = all_err(
            load_ranks(via, reader(true), dests(&m, 3)).await,
            "load of a damaged checkpoint",
        );
        for e in &errs {
            assert_error(e, ErrorKind::ChecksumMismatch, &[name, &file]);
        }
    }

    // Without verification the load succeeds; exactly one element differs.
    let out = all_ok(
        load_ranks(fs.clone(), reader(false), dests(&m, 3)).await,
        "unverified load",
    );
    let spec = m.spec("w");
    let global = spec.global();
    let mut differing = 0usize;
    for o in &out {
        let t = o.state_dict.tensor("w").expect("w loaded");
        for c in &t.chunks {
            let want = slice_box(&global, &spec.shape, 2, &c.region);
            differing += c
                .data
                .chunks(2)
                .zip(want.chunks(2))
                .filter(|(a, b)| a != b)
                .count();
        }
    }
    assert_eq!(differing, 1);
}

/// Many small records (4 KiB each, 2.4 MiB per file): each rank's reads
/// coalesce into spans larger than the 1 MiB block. From the page cache a
/// span is read in block-sized groups of whole records into a reused buffer;
/// through a file system that never reports data cached it is one request.
/// Both load the same bytes, with the same sharding and resharded, and read
/// each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_small_records_read_in_blocks_or_whole() {
    let mut m = Model {
        seed: 5,
        ..Model::default()
    };
    for i in 0..1200 {
        let s = if i % 3 == 0 {
            Sharding::Rows
        } else {
            Sharding::Full
        };
        m = m.tensor(&format!("t{i:04}"), DType::F32, &[16, 64], s);
    }
    let (_dir, fs, md) = saved(&m, 2, fast_writer()).await;
    let records = record_bytes(&md);
    let recording = Arc::new(RecordingFs::new(fs.clone()));
    for via in [fs.clone(), recording.clone() as Arc<dyn FileSystem>] {
        for world in [2usize, 3] {
            let opts = ReaderOptions::default().thread_count(2);
            let out = load_and_check(via.clone(), &m, 2, world, opts, &|s| {
                if s.name.ends_with('0') {
                    Sharding::Cols
                } else {
                    Sharding::Rows
                }
            })
            .await;
            let read: u64 = out.iter().map(|o| o.stats.bytes_read).sum();
            // Each record at most once; coalescing also reads padding and
            // the small gaps (under 4 KiB) between the halves of records two
            // ranks split, so a little more than the records in all.
            assert!(
                read >= records / 2 && read <= records * 5 / 4,
                "world {world}: read {read} for {records}"
            );
        }
    }
    // Through the recording file system no span was cut into blocks.
    assert!(recording.reads().iter().any(|c| c.len > 1 << 20));
}
