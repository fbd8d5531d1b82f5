//! Sectioned `.metadata` (format version 3): loads read the index and only
//! the sections their destination overlaps, whatever the sharding, and get
//! every byte right; a large sharded save writes it; metadata written by
//! the one-body format of earlier builds still loads.

use dcp_core::checkpoint::simulate::receive_metadata;
use dcp_core::local::run_ranks;
use dcp_core::metadata::sections::{MetadataIndex, SECTIONED_MIN_RECORDS};
use dcp_core::metadata::{ItemMeta, Metadata};
use dcp_core::{
    load_with, ChunkBox, DType, DestStateDict, ErrorKind, FileSystem, FileSystemReader,
    LoadOptions, LoadResult, ReaderOptions, Result, StateDict, TensorChunk,
};
use dcp_testkit::recording::RecordingFs;
use dcp_tests::*;
use std::sync::{Arc, Mutex};

/// 8 row-sharded tensors and a column-sharded one, saved by 8 ranks: 8
/// chunks a tensor, so sections of 2 chunks give 4 sections a tensor.
fn model() -> Model {
    let mut m = Model {
        seed: 17,
        ..Default::default()
    };
    for t in 0..8 {
        m = m.tensor(
            &format!("layers.{t}.w"),
            DType::F32,
            &[64, 8],
            Sharding::Rows,
        );
    }
    m.tensor("emb", DType::BF16, &[16, 32], Sharding::Cols)
        .tensor("norm", DType::F32, &[8], Sharding::Full)
        .bytes("extra", 100, false)
}

/// Each tensor's save sharding.
fn saved_sharding(m: &Model) -> impl Fn(&TensorSpec) -> Sharding + '_ {
    move |spec| {
        m.tensors
            .iter()
            .find(|(t, _)| t.name == spec.name)
            .expect("spec in model")
            .1
    }
}

fn version(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

/// Save `m` with 8 ranks, then replace `.metadata` with the same metadata
/// in sections of 2 chunks. Returns the store and the metadata.
async fn sectioned_checkpoint(backend: Backend, label: &str, m: &Model) -> (Store, Metadata) {
    let store = backend.make_fs(label);
    save_model(store.fs(), m, 8, fast_writer()).await;
    let md = store.metadata();
    let enc = md.encode_sectioned(2).unwrap();
    assert_eq!(version(&enc), 3);
    store.write_raw(".metadata", enc);
    (store, md)
}

async fn load_opts(
    fs: Arc<dyn FileSystem>,
    opts: LoadOptions,
    dests: Vec<DestStateDict>,
) -> Vec<Result<LoadResult>> {
    let n = dests.len();
    let dests = Arc::new(Mutex::new(dests.into_iter().map(Some).collect::<Vec<_>>()));
    let reader = Arc::new(FileSystemReader::new(fs, ReaderOptions::default()));
    let opts = Arc::new(opts);
    run_ranks(n, std::time::Duration::from_secs(120), move |g| {
        let (dests, reader, opts) = (dests.clone(), reader.clone(), opts.clone());
        async move {
            let rank = dcp_core::Collective::rank(&g);
            let dest = dests.lock().unwrap()[rank].take().unwrap();
            load_with(dest, reader.as_ref(), &g, &opts).await
        }
    })
    .await
}

fn chunk_count(md: &Metadata, name: &str) -> usize {
    match md.item(name).unwrap() {
        ItemMeta::Tensor { chunks, .. } => chunks.len(),
        ItemMeta::Bytes { .. } => 1,
    }
}

/// Bytes of `.metadata` read at an offset other than 0 (sections; rank 0's
/// first read at 0 takes the header and index).
fn section_bytes_read(rec: &RecordingFs) -> u64 {
    rec.reads()
        .iter()
        .filter(|r| r.name == ".metadata" && r.offset > 0)
        .map(|r| r.len)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_into_the_saved_sharding_reads_only_its_sections() {
    for backend in backends() {
        let m = model();
        let (store, full) = sectioned_checkpoint(backend, "sections-same", &m).await;
        let file_len = store.read_raw(".metadata").unwrap().len() as u64;
        for share in [true, false] {
            let rec = Arc::new(RecordingFs::new(store.fresh_fs()));
            let dests = (0..8)
                .map(|r| m.dest(r, 8, 8, &saved_sharding(&m)))
                .collect();
            let out = all_ok(
                load_opts(
                    rec.clone(),
                    LoadOptions::default().share_reads(share),
                    dests,
                )
                .await,
                "same-sharding load",
            );
            for (r, o) in out.iter().enumerate() {
                m.check(&o.state_dict, 8);
                // Only the section holding its rows of each tensor: 2 of 8
                // chunks; the one-chunk tensor and the bytes item whole.
                assert_eq!(chunk_count(&o.metadata, "layers.3.w"), 2, "rank {r}");
                assert_eq!(chunk_count(&o.metadata, "norm"), 1);
                assert_eq!(o.metadata.items.len(), full.items.len());
                assert_eq!(o.metadata.files, full.files);
            }
            // Seven ranks read their sections: together far less than
            // seven copies of the file.
            let read = section_bytes_read(&rec);
            assert!(read > 0 && read * 2 < 7 * file_len, "{read} of {file_len}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharded_loads_from_sections_get_every_byte() {
    for backend in backends() {
        let m = model();
        let (store, full) = sectioned_checkpoint(backend, "sections-reshard", &m).await;
        for (world, share) in [(3, true), (3, false), (2, true), (1, true)] {
            let dests = (0..world)
                .map(|r| m.dest(r, world, 8, &other_sharding(&m, 1)))
                .collect();
            let out = all_ok(
                load_opts(store.fs(), LoadOptions::default().share_reads(share), dests).await,
                "resharded load",
            );
            for o in &out {
                m.check(&o.state_dict, 8);
                assert_eq!(o.metadata.save_id, full.save_id);
                // Ranks sharing saved chunks read the same sections, so
                // the exchange sees the same metadata everywhere.
                if share {
                    assert_eq!(o.metadata, out[0].metadata);
                }
            }
        }
        // Whole-checkpoint reads (inspect, verify) see everything.
        let r = FileSystemReader::new(store.fs(), ReaderOptions::default());
        assert_eq!(dcp_core::read_metadata(&r).await.unwrap(), full);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_section_fails_the_load_on_every_rank() {
    for backend in backends() {
        let m = model();
        let (store, _) = sectioned_checkpoint(backend, "sections-damaged", &m).await;
        let mut b = store.read_raw(".metadata").unwrap();
        let last = b.len() - 2;
        b[last] ^= 0x40;
        store.write_raw(".metadata", b.clone());
        let dests = (0..8)
            .map(|r| m.dest(r, 8, 8, &saved_sharding(&m)))
            .collect();
        let errs = all_err(
            load_opts(store.fs(), LoadOptions::default(), dests).await,
            "load of damaged sections",
        );
        for e in &errs {
            assert_error(e, ErrorKind::ChecksumMismatch, &["section", "CRC-32C"]);
        }
        // Truncated inside the sections: refused, not guessed.
        store.write_raw(".metadata", b[..b.len() - 10].to_vec());
        let dests = (0..8)
            .map(|r| m.dest(r, 8, 8, &saved_sharding(&m)))
            .collect();
        let errs = all_err(
            load_opts(store.fs(), LoadOptions::default(), dests).await,
            "load of truncated sections",
        );
        for e in &errs {
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("not read in full"), "{e}");
        }
    }
}

/// A save of at least `SECTIONED_MIN_RECORDS` records writes sections at
/// its commit, and it loads back byte for byte, reading a fraction of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_sharded_save_writes_sections() {
    let ranks = 4usize;
    let rows = SECTIONED_MIN_RECORDS as u64; // one row a chunk
    let per_rank = rows / ranks as u64;
    let value = |row: u64| [(row % 251) as u8, (row / 251 % 251) as u8];
    let sds: Vec<StateDict> = (0..ranks as u64)
        .map(|r| {
            let chunks = (r * per_rank..(r + 1) * per_rank)
                .map(|row| {
                    TensorChunk::new(
                        ChunkBox::new(vec![row, 0], vec![1, 2]).unwrap(),
                        value(row).to_vec(),
                    )
                })
                .collect();
            let mut sd = StateDict::new();
            sd.insert_tensor("w", DType::U8, vec![rows, 2], chunks, false)
                .unwrap();
            sd
        })
        .collect();
    let store = Backend::Memory.make_fs("sections-save");
    all_ok(save_ranks(store.fs(), fast_writer(), sds).await, "save");
    let enc = store.read_raw(".metadata").unwrap();
    assert_eq!(version(&enc), 3, "a large sharded save writes sections");
    let md = store.metadata();
    assert_eq!(md.record_count(), rows as usize);
    // Rank 1 of 4 wants rows 100 to 300 of its quarter.
    let lo = per_rank + 100;
    let mut d = DestStateDict::new();
    d.want_tensor(
        "w",
        DType::U8,
        vec![rows, 2],
        vec![ChunkBox::new(vec![lo, 0], vec![200, 2]).unwrap()],
    )
    .unwrap();
    let (part, received) = receive_metadata(&enc, &d).unwrap();
    assert!(
        received * 20 < enc.len() as u64,
        "{received} of {}",
        enc.len()
    );
    assert!(chunk_count(&part, "w") < 1000);
    let idx_len = dcp_core::metadata::sections::index_len(&enc)
        .unwrap()
        .unwrap();
    assert!(
        MetadataIndex::decode(&enc[..idx_len as usize])
            .unwrap()
            .section_count()
            > 100
    );
    let out = all_ok(
        load_opts(store.fs(), LoadOptions::default(), vec![d]).await,
        "load",
    );
    let t = out[0].state_dict.tensor("w").unwrap();
    let want: Vec<u8> = (lo..lo + 200).flat_map(value).collect();
    assert_eq!(t.chunks[0].data.as_slice(), want.as_slice());
}

/// A checkpoint written by an earlier build (one-body metadata, format
/// version 2), committed under `tests/fixtures/dcp-v2`, loads on 2 ranks by
/// rows and on 1 rank whole, byte for byte (see the fixture's README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_the_one_body_format_still_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dcp-v2");
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(&dir));
    let raw = std::fs::read(dir.join(".metadata")).unwrap();
    assert_eq!(version(&raw), 2);
    let md = Metadata::decode(&raw).unwrap();
    assert_eq!(
        md.encode().unwrap(),
        raw,
        "this build writes it byte for byte"
    );
    let expect = |row: u64, col: u64| (row * 31 + col * 7) as f32;
    for world in [1u64, 2] {
        let dests = (0..world)
            .map(|r| {
                let mut d = DestStateDict::new();
                let rows = 12 / world;
                d.want_tensor(
                    "w",
                    DType::F32,
                    vec![12, 5],
                    vec![ChunkBox::new(vec![r * rows, 0], vec![rows, 5]).unwrap()],
                )
                .unwrap();
                d.want_bytes("step").unwrap();
                d
            })
            .collect();
        let out = all_ok(
            load_opts(fs.clone(), LoadOptions::default(), dests).await,
            "load fixture",
        );
        for (r, o) in out.iter().enumerate() {
            let rows = 12 / world;
            let want: Vec<u8> = (r as u64 * rows..(r as u64 + 1) * rows)
                .flat_map(|row| (0..5).flat_map(move |c| expect(row, c).to_le_bytes()))
                .collect();
            let t = o.state_dict.tensor("w").unwrap();
            assert_eq!(t.chunks[0].data.as_slice(), want.as_slice());
            assert_eq!(o.state_dict.bytes("step"), Some(&b"step 42"[..]));
        }
    }
}

/// An index longer than the first read (1 MiB): rank 0 reads the rest of
/// it, and each rank then reads only its sections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_longer_than_the_first_read_is_read_in_full() {
    use dcp_core::mem::MemoryFs;
    use dcp_core::metadata::{ChunkMeta, DataFile, FormatKind, StorageInfo};
    let rows = 60_000u64;
    let data: Vec<u8> = (0..rows * 4).map(|i| (i / 4 % 251) as u8).collect();
    let chunks = (0..rows)
        .map(|r| ChunkMeta {
            region: ChunkBox::new(vec![r, 0], vec![1, 4]).unwrap(),
            storage: StorageInfo {
                file: 0,
                offset: r * 4,
                length: 4,
                transforms: Default::default(),
            },
        })
        .collect();
    let md = Metadata {
        save_id: "0123456789abcdef".into(),
        world_size: 1,
        format: FormatKind::Raw,
        files: vec![DataFile {
            name: "__0_0-0123456789abcdef.dcp".into(),
            length: rows * 4,
        }],
        transforms: Default::default(),
        items: vec![(
            "w".into(),
            ItemMeta::Tensor {
                dtype: DType::U8,
                shape: vec![rows, 4].into(),
                chunks,
            },
        )],
        user: Default::default(),
        generation: 1,
    };
    let enc = md.encode_sectioned(1).unwrap();
    let idx_len = dcp_core::metadata::sections::index_len(&enc)
        .unwrap()
        .unwrap();
    assert!(idx_len > 1 << 20, "index of {idx_len} bytes");
    let mem = MemoryFs::new("memory://long-index");
    mem.put("__0_0-0123456789abcdef.dcp", data.clone());
    mem.put(".metadata", enc);
    let rec = Arc::new(RecordingFs::new(Arc::new(mem)));
    let dests = (0..2u64)
        .map(|r| {
            let mut d = DestStateDict::new();
            d.want_tensor(
                "w",
                DType::U8,
                vec![rows, 4],
                vec![ChunkBox::new(vec![r * 30_000 + 7, 0], vec![10, 4]).unwrap()],
            )
            .unwrap();
            d
        })
        .collect();
    let out = all_ok(
        load_opts(rec.clone(), LoadOptions::default(), dests).await,
        "load",
    );
    for (r, o) in out.iter().enumerate() {
        let from = (r as u64 * 30_000 + 7) as usize * 4;
        let t = o.state_dict.tensor("w").unwrap();
        assert_eq!(t.chunks[0].data.as_slice(), &data[from..from + 40]);
        assert_eq!(chunk_count(&o.metadata, "w"), 10, "rank {r}");
    }
    // Rank 0's first read, the rest of the index, and a few ranges.
    let md_reads: Vec<_> = rec
        .reads()
        .into_iter()
        .filter(|r| r.name == ".metadata")
        .collect();
    assert!(md_reads.iter().any(|r| r.offset == 1 << 20), "{md_reads:?}");
    assert!(md_reads.len() <= 6, "{md_reads:?}");
}
