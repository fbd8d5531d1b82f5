//! Round trips: 4 ranks save a model with every sharding, every dtype, zero
//! size dimensions and bytes items; 1, 2, 3 and 5 ranks load it back with
//! other shardings. Both formats, 1 and 3 threads, one file per rank or one
//! per record. Every byte is compared with the reference.

use dcp_core::format::safetensors_key;
use dcp_core::metadata::{FormatKind, ItemMeta};
use dcp_core::{ChunkBox, DType, ReaderOptions, WriterOptions};
use dcp_tests::*;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet};

const SAVE_WORLD: usize = 4;

fn model() -> Model {
    let mut m = Model {
        seed: 1,
        ..Default::default()
    }
    .tensor("rows", DType::F32, &[13, 7], Sharding::Rows)
    .tensor("cols", DType::BF16, &[6, 11], Sharding::Cols)
    .tensor("grid", DType::I64, &[9, 10], Sharding::Grid)
    .tensor("repl", DType::F16, &[5, 3], Sharding::Replicated)
    .tensor("uneven", DType::U8, &[17, 4], Sharding::Uneven)
    .tensor("blocks", DType::I32, &[20, 3], Sharding::Blocks(2))
    .tensor("cube", DType::U16, &[4, 5, 6], Sharding::Grid)
    .tensor("vec", DType::F64, &[29], Sharding::Rows)
    .tensor("scalar", DType::F64, &[], Sharding::Full)
    .tensor("scalar_repl", DType::I32, &[], Sharding::Replicated)
    .tensor("only_rank0", DType::I8, &[3, 3], Sharding::Full)
    .tensor("empty_rows", DType::F32, &[0, 5], Sharding::Rows)
    .tensor("empty_cols", DType::F32, &[4, 0], Sharding::Cols)
    .tensor("empty_grid", DType::U8, &[3, 0, 2], Sharding::Grid)
    .bytes("step", 8, false)
    .bytes("rng", 16, true)
    .bytes("empty_bytes", 0, false);
    for (i, d) in DType::ALL.into_iter().enumerate() {
        m = m.tensor(
            &format!("dtype.{}", d.name()),
            d,
            &[7, 3],
            Sharding::ALL[i % Sharding::ALL.len()],
        );
    }
    m
}

/// Every data file of a safetensors checkpoint opens with the `safetensors`
/// crate, holds exactly the records the metadata places in it, at the
/// recorded offsets, with the reference bytes.
fn check_safetensors_files(store: &Store, m: &Model) {
    let md = store.metadata();
    assert_eq!(md.format, FormatKind::Safetensors);
    assert!(!md.files.is_empty());
    for (fi, f) in md.files.iter().enumerate() {
        assert!(f.name.ends_with(".safetensors"), "{}", f.name);
        let raw = store.read_raw(&f.name).expect("data file exists");
        assert_eq!(raw.len() as u64, f.length, "{}", f.name);
        let st = SafeTensors::deserialize(&raw)
            .unwrap_or_else(|e| panic!("{} is not a valid safetensors file: {e}", f.name));
        // key -> (dtype, shape, bytes, offset in file)
        let mut want: BTreeMap<String, (String, Vec<usize>, Vec<u8>, u64)> = BTreeMap::new();
        for (name, item) in &md.items {
            match item {
                ItemMeta::Tensor {
                    dtype,
                    shape,
                    chunks,
                } => {
                    for c in chunks.iter().filter(|c| c.storage.file as usize == fi) {
                        let whole = c.region == ChunkBox::full(shape);
                        let key = safetensors_key(name, Some(&c.region.offsets), whole);
                        let prev = want.insert(
                            key.clone(),
                            (
                                dtype.safetensors_name().to_string(),
                                c.region.sizes.iter().map(|&s| s as usize).collect(),
                                m.spec(name).slice(&c.region),
                                c.storage.offset,
                            ),
                        );
                        assert!(prev.is_none(), "duplicate key {key} in {}", f.name);
                    }
                }
                ItemMeta::Bytes { length, storage } if storage.file as usize == fi => {
                    want.insert(
                        name.clone(),
                        (
                            "U8".to_string(),
                            vec![*length as usize],
                            m.bytes_expected(name, SAVE_WORLD).expect("model bytes"),
                            storage.offset,
                        ),
                    );
                }
                ItemMeta::Bytes { .. } => {}
            }
        }
        let keys: BTreeSet<String> = st.names().into_iter().map(str::to_string).collect();
        assert_eq!(
            keys,
            want.keys().cloned().collect::<BTreeSet<_>>(),
            "{}",
            f.name
        );
        for (key, (dtype, shape, bytes, offset)) in want {
            let v = st.tensor(&key).expect("listed tensor");
            assert_eq!(v.dtype().to_string(), dtype, "{key}");
            assert_eq!(v.shape(), &shape[..], "{key}");
            assert_eq!(v.data(), &bytes[..], "{key} in {}", f.name);
            let at = v.data().as_ptr() as usize - raw.as_ptr() as usize;
            assert_eq!(at as u64, offset, "{key}: metadata offset");
        }
    }
}

async fn round_trips(format: FormatKind) {
    let m = model();
    for backend in backends() {
        for threads in [1usize, 3] {
            for single_file_per_rank in [true, false] {
                let what = format!(
                    "{} {format:?} threads={threads} single_file_per_rank={single_file_per_rank}",
                    backend.name()
                );
                let store = backend.make_fs("roundtrip");
                let opts = WriterOptions::default()
                    .thread_count(threads)
                    .single_file_per_rank(single_file_per_rank)
                    .serialization_format(dcp_core::format::builtin(&format).unwrap())
                    // The synced path once per format and backend.
                    .sync_files(threads == 1 && single_file_per_rank);
                let saved = save_model(store.fs(), &m, SAVE_WORLD, opts).await;
                let md = saved[0].metadata.clone();
                for s in &saved {
                    assert_eq!(
                        s.metadata, md,
                        "{what}: every rank returns the same metadata"
                    );
                }
                assert_eq!(md.world_size as usize, SAVE_WORLD);
                assert_eq!(md.format, format);
                // Exactly the referenced data files exist.
                let files: Vec<String> = md.files.iter().map(|f| f.name.clone()).collect();
                let mut sorted = files.clone();
                sorted.sort();
                assert_eq!(store.data_files(), sorted, "{what}");
                // Replicated data is written once; every record is counted.
                let ItemMeta::Tensor { chunks, .. } = md.item("repl").expect("repl") else {
                    panic!("repl is a tensor")
                };
                assert_eq!(chunks.len(), 1, "{what}: replicated tensor written once");
                let written: u64 = saved.iter().map(|s| s.bytes_written).sum();
                assert_eq!(
                    written,
                    md.files.iter().map(|f| f.length).sum::<u64>(),
                    "{what}"
                );
                if single_file_per_rank {
                    assert!(files.len() <= SAVE_WORLD * threads, "{what}: {files:?}");
                } else {
                    assert_eq!(files.len(), md.record_count(), "{what}");
                }
                if format == FormatKind::Safetensors {
                    check_safetensors_files(&store, &m);
                }
                for (k, world) in [1usize, 2, 3, 5].into_iter().enumerate() {
                    // With 3 threads every record, however small, takes
                    // the direct and scattered paths (one copy).
                    let ropts = ReaderOptions::default().thread_count(threads).small_record(
                        if threads == 3 {
                            0
                        } else {
                            ReaderOptions::default().small_record
                        },
                    );
                    // A fresh handle: nothing cached from the save.
                    load_and_check(
                        store.fresh_fs(),
                        &m,
                        SAVE_WORLD,
                        world,
                        ropts,
                        &other_sharding(&m, k + 1),
                    )
                    .await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_round_trips() {
    round_trips(FormatKind::Raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safetensors_round_trips() {
    round_trips(FormatKind::Safetensors).await;
}

/// Every dtype, saved whole by one rank and loaded whole: the bytes survive
/// untouched (no conversion, no normalisation), in both formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dtype_whole() {
    for backend in backends() {
        for format in [FormatKind::Raw, FormatKind::Safetensors] {
            let mut m = Model {
                seed: 9,
                ..Default::default()
            };
            for d in DType::ALL {
                m = m.tensor(d.name(), d, &[5, 2, 3], Sharding::Full);
            }
            let store = backend.make_fs("dtypes");
            let opts =
                fast_writer().serialization_format(dcp_core::format::builtin(&format).unwrap());
            save_model(store.fs(), &m, 1, opts).await;
            if format == FormatKind::Safetensors {
                check_safetensors_files(&store, &m);
            }
            load_and_check(store.fs(), &m, 1, 2, ReaderOptions::default(), &|_| {
                Sharding::Cols
            })
            .await;
        }
    }
}

/// Bytes items: replicated ones are written once, per-rank ones once per
/// rank, and an item replicated on some ranks only is still one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_items() {
    for backend in backends() {
        let m = Model {
            seed: 3,
            ..Default::default()
        }
        .bytes("config", 1000, false)
        .bytes("loader", 300, true)
        .bytes("nothing", 0, true);
        let store = backend.make_fs("bytes");
        let saved = save_model(store.fs(), &m, 3, fast_writer()).await;
        let md = &saved[0].metadata;
        let names: Vec<&str> = md.items.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "config",
                "loader.0",
                "loader.1",
                "loader.2",
                "nothing.0",
                "nothing.1",
                "nothing.2"
            ]
        );
        assert_eq!(md.record_count(), 7);
        for world in [1, 4] {
            load_and_check(store.fs(), &m, 3, world, ReaderOptions::default(), &|_| {
                Sharding::Full
            })
            .await;
        }
    }
}

/// Item names may contain `@` (only NUL is refused); the record keys of a
/// safetensors data file must still be unique, or the file is not valid
/// safetensors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safetensors_keys_are_unique_with_at_in_names() {
    let m = Model {
        seed: 4,
        ..Default::default()
    }
    .tensor("x@0", DType::U8, &[3], Sharding::Full)
    .tensor("x", DType::U8, &[6], Sharding::Blocks(2));
    for backend in backends() {
        let store = backend.make_fs("at-names");
        let opts = fast_writer()
            .serialization_format(dcp_core::format::builtin(&FormatKind::Safetensors).unwrap());
        save_model(store.fs(), &m, 1, opts).await;
        load_and_check(store.fs(), &m, 1, 1, ReaderOptions::default(), &|_| {
            Sharding::Full
        })
        .await;
        check_safetensors_files(&store, &m);
    }
}

/// A tensor that no rank holds a chunk of (a zero-size tensor, or one whose
/// shards are all elsewhere) is still part of the checkpoint: its dtype and
/// shape are saved, and loading it with no chunks succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_without_chunks_is_kept() {
    for backend in backends() {
        let store = backend.make_fs("no-chunks");
        let sds = (0..2)
            .map(|_| {
                let mut sd = dcp_core::StateDict::new();
                sd.insert_tensor("e", DType::F32, vec![0, 5], vec![], false)
                    .unwrap();
                sd.insert_bytes("b", vec![1u8], true).unwrap();
                sd
            })
            .collect();
        all_ok(save_ranks(store.fs(), fast_writer(), sds).await, "save");
        let md = store.metadata();
        assert!(md.item("e").is_some(), "e is missing from the metadata");
        let mut d = dcp_core::DestStateDict::new();
        d.want_tensor("e", DType::F32, vec![0, 5], vec![ChunkBox::full(&[0, 5])])
            .unwrap();
        all_ok(
            load_ranks(store.fs(), ReaderOptions::default(), vec![d]).await,
            "load",
        );
    }
}

/// Records larger than the local backend's coalescing threshold (written
/// straight from the caller's memory) next to tiny ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_tiny_records() {
    let m = Model {
        seed: 21,
        ..Default::default()
    }
    .tensor("big", DType::F32, &[512, 512], Sharding::Rows)
    .tensor("tiny", DType::U8, &[3], Sharding::Full)
    .tensor("mid", DType::BF16, &[300, 300], Sharding::Grid);
    for backend in backends() {
        for format in [FormatKind::Raw, FormatKind::Safetensors] {
            let store = backend.make_fs("large");
            let opts = WriterOptions::default()
                .serialization_format(dcp_core::format::builtin(&format).unwrap())
                .thread_count(2);
            save_model(store.fs(), &m, 4, opts).await;
            load_and_check(
                store.fresh_fs(),
                &m,
                4,
                3,
                ReaderOptions::default(),
                &|_| Sharding::Cols,
            )
            .await;
        }
    }
}
