//! Partial loads read only the requested keys' bytes; a missing key, a
//! region nobody saved, and shape, dtype or kind mismatches are clear errors
//! on every rank.

use dcp_core::metadata::{ItemMeta, Metadata};
use dcp_core::{ChunkBox, DType, DestStateDict, ErrorKind, FileSystem, ReaderOptions};
use dcp_tests::*;
use std::sync::Arc;

fn model() -> Model {
    Model {
        seed: 5,
        ..Default::default()
    }
    .tensor("a", DType::F32, &[64, 32], Sharding::Rows)
    .tensor("b", DType::F32, &[64, 32], Sharding::Cols)
    .tensor("c", DType::BF16, &[10, 10], Sharding::Grid)
    .bytes("extra", 4096, false)
}

/// Byte ranges `[start, end)` of every record of `names`, per file name.
fn record_ranges(md: &Metadata, names: &[&str]) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (name, item) in &md.items {
        if !names.contains(&name.as_str()) {
            continue;
        }
        let storages: Vec<_> = match item {
            ItemMeta::Tensor { chunks, .. } => chunks.iter().map(|c| &c.storage).collect(),
            ItemMeta::Bytes { storage, .. } => vec![storage],
        };
        for s in storages {
            out.push((
                md.files[s.file as usize].name.clone(),
                s.offset,
                s.offset + s.length,
            ));
        }
    }
    out
}

/// Assert that every byte every read touched lies in a record of `names`.
fn assert_reads_within(reads: &[ReadCall], md: &Metadata, names: &[&str]) {
    let allowed = record_ranges(md, names);
    for r in reads {
        if r.name.starts_with(".metadata") {
            continue;
        }
        for pos in r.offset..r.offset + r.len {
            assert!(
                allowed
                    .iter()
                    .any(|(f, s, e)| *f == r.name && *s <= pos && pos < *e),
                "read {r:?} touches byte {pos}, outside the records of {names:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_loads_read_only_requested_keys() {
    for backend in backends() {
        let m = model();
        let store = backend.make_fs("partial");
        save_model(store.fs(), &m, 4, fast_writer()).await;
        let md = store.metadata();
        let a = m.spec("a").clone();

        // Only "a", whole, on 2 ranks by rows: exactly its bytes are read.
        let rec = Arc::new(RecordingFs::new(store.fresh_fs()));
        let fs: Arc<dyn FileSystem> = rec.clone();
        let dests: Vec<DestStateDict> = (0..2)
            .map(|r| {
                let mut d = DestStateDict::new();
                let boxes = load_boxes(&a.shape, Sharding::Rows, 2).swap_remove(r);
                d.want_tensor("a", a.dtype, a.shape.clone(), boxes).unwrap();
                d
            })
            .collect();
        let out = all_ok(
            load_ranks(fs, ReaderOptions::default(), dests).await,
            "load a",
        );
        for (r, o) in out.iter().enumerate() {
            check_tensor(&a, o.state_dict.tensor("a").unwrap());
            assert_eq!(o.stats.bytes_read, a.nbytes() / 2, "rank {r}");
            assert_eq!(o.state_dict.len(), 1);
        }
        assert_reads_within(&rec.reads(), &md, &["a"]);

        // "a" by columns (a resharded, strided load) and "extra": still
        // nothing of "b" or "c" is read.
        let rec = Arc::new(RecordingFs::new(store.fresh_fs()));
        let fs: Arc<dyn FileSystem> = rec.clone();
        let dests: Vec<DestStateDict> = (0..3)
            .map(|r| {
                let mut d = DestStateDict::new();
                let boxes = load_boxes(&a.shape, Sharding::Cols, 3).swap_remove(r);
                d.want_tensor("a", a.dtype, a.shape.clone(), boxes).unwrap();
                d.want_bytes("extra").unwrap();
                d
            })
            .collect();
        let opts = ReaderOptions::default().coalesce_gap(0);
        let out = all_ok(load_ranks(fs, opts, dests).await, "load a by columns");
        let mut total = 0;
        for o in &out {
            m.check(&o.state_dict, 4);
            total += o.stats.bytes_read;
        }
        assert!(total >= a.nbytes() + 3 * 4096, "{total}");
        assert_reads_within(&rec.reads(), &md, &["a", "extra"]);

        // Only a bytes item: its 4096 bytes, once per rank.
        let dests = (0..2)
            .map(|_| {
                let mut d = DestStateDict::new();
                d.want_bytes("extra").unwrap();
                d
            })
            .collect();
        let out = all_ok(
            load_ranks(store.fs(), ReaderOptions::default(), dests).await,
            "load extra",
        );
        for o in &out {
            assert_eq!(o.stats.bytes_read, 4096);
            m.check(&o.state_dict, 4);
        }
    }
}

/// Rank 0 asks for valid items, rank 1 for `bad`: every rank fails with
/// rank 1's error.
async fn expect_load_error(
    store: &Store,
    bad: DestStateDict,
    kind: ErrorKind,
    parts: &[&str],
) -> Vec<dcp_core::Error> {
    let a = model().spec("a").clone();
    let mut good = DestStateDict::new();
    good.want_tensor(
        "a",
        a.dtype,
        a.shape.clone(),
        vec![ChunkBox::full(&a.shape)],
    )
    .unwrap();
    let errs = all_err(
        load_ranks(store.fs(), ReaderOptions::default(), vec![good, bad]).await,
        "bad load",
    );
    for e in &errs {
        assert_error(e, kind, parts);
        assert_eq!(e.rank(), Some(1), "{e:?}");
        assert!(e.to_string().starts_with("rank 1: "), "{e}");
    }
    errs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_errors_are_clear_and_agreed() {
    for backend in backends() {
        let m = model();
        let store = backend.make_fs("errors");
        save_model(store.fs(), &m, 2, fast_writer()).await;

        let mut d = DestStateDict::new();
        d.want_tensor("nope", DType::F32, vec![2], vec![ChunkBox::full(&[2])])
            .unwrap();
        expect_load_error(
            &store,
            d,
            ErrorKind::NotFound,
            &["nope", "not in the checkpoint"],
        )
        .await;

        let mut d = DestStateDict::new();
        d.want_tensor(
            "a",
            DType::F32,
            vec![64, 31],
            vec![ChunkBox::full(&[64, 31])],
        )
        .unwrap();
        expect_load_error(
            &store,
            d,
            ErrorKind::InvalidInput,
            &["a: saved as f32 [64, 32]", "asks for f32 [64, 31]"],
        )
        .await;

        let mut d = DestStateDict::new();
        d.want_tensor("a", DType::F16, vec![64, 32], vec![])
            .unwrap();
        expect_load_error(
            &store,
            d,
            ErrorKind::InvalidInput,
            &["saved as f32", "asks for f16"],
        )
        .await;

        let mut d = DestStateDict::new();
        d.want_bytes("a").unwrap();
        expect_load_error(
            &store,
            d,
            ErrorKind::InvalidInput,
            &["a: saved as a tensor"],
        )
        .await;

        let mut d = DestStateDict::new();
        d.want_tensor("extra", DType::U8, vec![4096], vec![])
            .unwrap();
        expect_load_error(
            &store,
            d,
            ErrorKind::InvalidInput,
            &["extra: saved as bytes"],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_nobody_saved_and_missing_checkpoint() {
    for backend in backends() {
        // Rank 0 saves rows 0..5 of a 10-row tensor; nobody saves the rest.
        let spec = TensorSpec::new("half", DType::I16, &[10, 4], 2);
        let store = backend.make_fs("uncovered");
        let region = ChunkBox::new(vec![0, 0], vec![5, 4]).unwrap();
        let mut sd0 = dcp_core::StateDict::new();
        sd0.insert_tensor(
            "half",
            spec.dtype,
            spec.shape.clone(),
            vec![dcp_core::TensorChunk {
                data: spec.slice(&region).into(),
                region: region.clone(),
            }],
            false,
        )
        .unwrap();
        let sd1 = dcp_core::StateDict::new();
        all_ok(
            save_ranks(store.fs(), fast_writer(), vec![sd0, sd1]).await,
            "save half",
        );
        // The saved half loads.
        let mut d = DestStateDict::new();
        d.want_tensor("half", spec.dtype, spec.shape.clone(), vec![region])
            .unwrap();
        let out = all_ok(
            load_ranks(store.fs(), ReaderOptions::default(), vec![d]).await,
            "load saved half",
        );
        check_tensor(&spec, out[0].state_dict.tensor("half").unwrap());
        // The other half does not.
        let mut d = DestStateDict::new();
        d.want_tensor(
            "half",
            spec.dtype,
            spec.shape.clone(),
            vec![ChunkBox::new(vec![4, 0], vec![2, 4]).unwrap()],
        )
        .unwrap();
        let errs = all_err(
            load_ranks(store.fs(), ReaderOptions::default(), vec![d]).await,
            "load unsaved half",
        );
        assert_error(
            &errs[0],
            ErrorKind::NotFound,
            &["half", "not covered", "4 of 8"],
        );

        // No checkpoint at all.
        let empty = backend.make_fs("empty");
        let dests = (0..3).map(|_| DestStateDict::new()).collect();
        let errs = all_err(
            load_ranks(empty.fs(), ReaderOptions::default(), dests).await,
            "load from nowhere",
        );
        for e in &errs {
            assert_error(
                e,
                ErrorKind::NotFound,
                &["no checkpoint", ".metadata is missing"],
            );
        }
    }
}
