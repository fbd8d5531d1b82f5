//! Hugging Face safetensors export (`dcp::hf::export_safetensors`): a
//! checkpoint of every dtype saved by 3 ranks with row, column and 2-D
//! sharding, exported through a buffer smaller than one row (so tensors are
//! assembled from many slabs of many saved chunks), opens with the
//! `safetensors` crate and every tensor equals the generator's; sharded
//! output has a correct index; renames, key filters and refusals.

use dcp::hf::{export_safetensors, ExportOptions};
use dcp_core::{DType, ErrorKind, FileSystemReader, ReaderOptions};
use dcp_tests::*;
use std::collections::BTreeMap;
use std::path::Path;

const WORLD: usize = 3;

fn model() -> Model {
    let mut m = Model {
        seed: 42,
        ..Default::default()
    };
    let dtypes = DType::ALL;
    let shardings = [Sharding::Rows, Sharding::Cols, Sharding::Grid];
    for (i, dt) in dtypes.iter().enumerate() {
        m = m.tensor(
            &format!("model.layers.{i}.w"),
            *dt,
            &[7 + i as u64, 5],
            shardings[i % 3],
        );
    }
    m.tensor("model.scalar", DType::F32, &[], Sharding::Full)
        .tensor("model.empty", DType::F32, &[0, 3], Sharding::Rows)
        .bytes("rng", 16, true)
}

async fn saved(label: &str) -> (Store, Model) {
    let m = model();
    let store = Backend::Fs.make_fs(label);
    save_model(store.fs(), &m, WORLD, fast_writer()).await;
    (store, m)
}

/// Every tensor of every safetensors file under `files`, by name, checked
/// against the model (names mapped back with `unrename`).
fn check_files(
    files: &[std::path::PathBuf],
    m: &Model,
    unrename: &dyn Fn(&str) -> String,
) -> usize {
    let mut n = 0;
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
    {
        let bytes = std::fs::read(f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for (name, view) in st.tensors() {
            let spec = m.spec(&unrename(&name));
            assert_eq!(
                format!("{:?}", view.dtype())
                    .to_uppercase()
                    .replace('_', ""),
                spec.dtype.safetensors_name().replace('_', ""),
                "{name}"
            );
            let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            assert_eq!(shape, spec.shape, "{name}");
            assert_eq!(view.data(), &spec.global()[..], "{name}: bytes");
            n += 1;
        }
    }
    n
}

fn reader(store: &Store) -> FileSystemReader {
    FileSystemReader::new(store.fs(), ReaderOptions::default())
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_file_through_a_small_buffer_matches_the_generator() {
    let (store, m) = saved("hf-one").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    let r = reader(&store);
    let o = out.clone();
    let report = tokio::task::spawn_blocking(move || {
        // 16 bytes: smaller than a row of most tensors.
        export_safetensors(&r, &o, &ExportOptions::default().buffer_bytes(16))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.files, vec![out.clone()]);
    assert_eq!(report.tensors, m.tensors.len());
    assert_eq!(report.skipped_bytes_items, ["rng.0", "rng.1", "rng.2"]);
    assert_eq!(
        check_files(&report.files, &m, &|n| n.to_string()),
        m.tensors.len()
    );
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_have_an_index_and_renames_and_keys_apply() {
    let (store, m) = saved("hf-shards").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let r = reader(&store);
    let o = out.clone();
    let report = tokio::task::spawn_blocking(move || {
        export_safetensors(
            &r,
            &o,
            &ExportOptions::default()
                .max_shard_size(300)
                .keys(vec!["model.layers.*".into()])
                .renames(vec![("model.".into(), "".into())]),
        )
    })
    .await
    .unwrap()
    .unwrap();
    let shards: Vec<_> = report
        .files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert!(shards.len() > 1, "{:?}", report.files);
    let n = shards.len();
    for (i, f) in shards.iter().enumerate() {
        assert_eq!(
            f.file_name().unwrap().to_string_lossy(),
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map: BTreeMap<String, String> =
        serde_json::from_value(index["weight_map"].clone()).unwrap();
    let want: Vec<String> = m
        .tensors
        .iter()
        .filter(|(t, _)| t.name.starts_with("model.layers."))
        .map(|(t, _)| t.name.trim_start_matches("model.").to_string())
        .collect();
    assert_eq!(map.keys().cloned().collect::<Vec<_>>(), {
        let mut w = want.clone();
        w.sort();
        w
    });
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(report.bytes));
    let checked = check_files(&report.files, &m, &|n| format!("model.{n}"));
    assert_eq!(checked, want.len());
    // Each tensor is in the file the index names.
    for (name, file) in &map {
        let bytes = std::fs::read(out.join(file)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensor(name).is_ok(), "{name} not in {file}");
    }
    assert!(leftovers(&out).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_nothing_written() {
    let (store, _m) = saved("hf-refuse").await;
    let dir = tempfile::tempdir().unwrap();
    let run = |out: std::path::PathBuf, o: ExportOptions| {
        let r = reader(&store);
        move || export_safetensors(&r, &out, &o)
    };
    // One file asked for, several shards needed.
    let one = dir.path().join("x.safetensors");
    let e = tokio::task::spawn_blocking(run(
        one.clone(),
        ExportOptions::default().max_shard_size(100),
    ))
    .await
    .unwrap()
    .unwrap_err();
    assert_error(&e, ErrorKind::InvalidInput, &["shards", "give a directory"]);
    assert!(!one.exists());
    // Nothing matches.
    let e = tokio::task::spawn_blocking(run(
        one.clone(),
        ExportOptions::default().keys(vec!["nope.*".into()]),
    ))
    .await
    .unwrap()
    .unwrap_err();
    assert_error(&e, ErrorKind::NotFound, &["no tensor matches"]);
    // Two names renamed to one.
    let e = tokio::task::spawn_blocking(run(
        one.clone(),
        ExportOptions::default()
            .renames(vec![
                ("model.layers.0".into(), "x".into()),
                ("model.layers.1".into(), "x".into()),
            ])
            .keys(vec!["model.layers.[01].w".into()]),
    ))
    .await
    .unwrap()
    .unwrap_err();
    assert!(e.to_string().contains("both renamed to x.w"), "{e}");
    // An existing output is not overwritten.
    std::fs::write(&one, b"keep").unwrap();
    let e = tokio::task::spawn_blocking(run(one.clone(), ExportOptions::default()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(std::fs::read(&one).unwrap(), b"keep");
    assert!(leftovers(dir.path()).is_empty());
}

/// Import: the exported shards (and a single file) back into dcp
/// checkpoints of 4 ranks split by rows and by columns: every tensor loads
/// whole equal to the generator's, and exporting the import again gives
/// the same files, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_round_trips_tensor_for_tensor() {
    use dcp::hf_import::{import_safetensors, read_safetensors, ImportShard};
    let (store, m) = saved("hf-import").await;
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let r = reader(&store);
    let f = first.clone();
    let o = ExportOptions::default().max_shard_size(300);
    let exported = tokio::task::spawn_blocking(move || export_safetensors(&r, &f, &o))
        .await
        .unwrap()
        .unwrap();
    for shard in [ImportShard::Rows, ImportShard::Cols] {
        let back = Backend::Fs.make_fs("hf-import-back");
        let w: std::sync::Arc<dyn dcp_core::StorageWriter> = std::sync::Arc::new(
            dcp_core::FileSystemWriter::new(back.fs(), fast_writer().per_thread_copy_ahead(64))
                .unwrap(),
        );
        let md = import_safetensors(read_safetensors(&first).unwrap(), w, 4, shard)
            .await
            .unwrap();
        assert_eq!(md.world_size, 4);
        // Every tensor, loaded whole on one rank, equals the generator's.
        let mut dest = dcp_core::DestStateDict::new();
        for (spec, _) in &m.tensors {
            dest.want_tensor(
                &spec.name,
                spec.dtype,
                spec.shape.clone(),
                vec![dcp_core::ChunkBox::full(&spec.shape)],
            )
            .unwrap();
        }
        let loaded = load_ranks(back.fs(), ReaderOptions::default(), vec![dest]).await;
        let loaded = all_ok(loaded, "load the import");
        for (spec, _) in &m.tensors {
            check_tensor(spec, loaded[0].state_dict.tensor(&spec.name).unwrap());
        }
        // Exported again: the same files.
        let again = dir.path().join(format!("again-{shard:?}"));
        let r2 = reader(&back);
        let a = again.clone();
        let o = ExportOptions::default().max_shard_size(300);
        let second = tokio::task::spawn_blocking(move || export_safetensors(&r2, &a, &o))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.files.len(), exported.files.len());
        for (x, y) in exported.files.iter().zip(&second.files) {
            assert_eq!(x.file_name(), y.file_name());
            assert_eq!(
                std::fs::read(x).unwrap(),
                std::fs::read(y).unwrap(),
                "{x:?}"
            );
        }
    }
}

/// Safetensors that lie are refused naming the file and the tensor.
#[test]
fn lying_safetensors_are_refused() {
    use dcp::hf_import::{read_safetensors, read_safetensors_header};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, header: &str, data: usize| {
        let p = dir.path().join(name);
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(&p, b).unwrap();
        p
    };
    let cases = [
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#,
            16,
            "a gap before it",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
            "overlaps",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            4,
            "the file has",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
            "needs 12",
        ),
        (
            r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
            8,
            "unknown dtype \"Q4\"",
        ),
    ];
    for (i, (h, data, want)) in cases.iter().enumerate() {
        let p = write(&format!("bad{i}.safetensors"), h, *data);
        let e = read_safetensors_header(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        let text = e.to_string();
        assert!(
            text.contains(want) && text.contains(&format!("bad{i}.safetensors")),
            "{text}"
        );
    }
    // An index naming a missing shard, and a tensor in two shards.
    let sub = dir.path().join("idx");
    std::fs::create_dir(&sub).unwrap();
    let ok = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
    let mut b = (ok.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(ok.as_bytes());
    b.extend([1u8, 2]);
    std::fs::write(sub.join("s1.safetensors"), &b).unwrap();
    std::fs::write(sub.join("s2.safetensors"), &b).unwrap();
    std::fs::write(
        sub.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"s1.safetensors","b":"gone.safetensors"}}"#,
    )
    .unwrap();
    let e = read_safetensors(&sub).unwrap_err();
    assert!(e.to_string().contains("gone.safetensors"), "{e}");
    std::fs::write(
        sub.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"s1.safetensors","a2":"s2.safetensors"}}"#,
    )
    .unwrap();
    let e = read_safetensors(&sub).unwrap_err();
    assert!(
        e.to_string()
            .contains("a: in both s1.safetensors and s2.safetensors"),
        "{e}"
    );
}

/// Checkpoints written by torch DCP export to safetensors equal to the
/// values torch saved (`expected.safetensors` beside each fixture), under
/// torch's flattened names, from every fixture.
#[test]
fn torch_checkpoints_export_to_the_values_torch_saved() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/torch-dcp-2.15");
    for fixture in [
        "torch_save",
        "torch_save_zstd",
        "torch_save_per_item_files",
        "torch_save_2threads",
        "sharded4",
        "strided",
        "safetensors_format",
    ] {
        let dir = root.join(fixture);
        let reader =
            dcp::reader(dir.join("ckpt").to_str().unwrap(), ReaderOptions::default()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model.safetensors");
        let report = export_safetensors(&reader, &out, &ExportOptions::default().buffer_bytes(64))
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        let got_bytes = std::fs::read(&out).unwrap();
        let got = safetensors::SafeTensors::deserialize(&got_bytes).unwrap();
        let want_bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let want = safetensors::SafeTensors::deserialize(&want_bytes).unwrap();
        let mut n = 0;
        for (name, w) in want.tensors() {
            let g = got
                .tensor(&name)
                .unwrap_or_else(|e| panic!("{fixture}: {name}: {e}"));
            assert_eq!(g.dtype(), w.dtype(), "{fixture}: {name}");
            assert_eq!(g.shape(), w.shape(), "{fixture}: {name}");
            assert_eq!(g.data(), w.data(), "{fixture}: {name}");
            n += 1;
        }
        assert_eq!(
            n, report.tensors,
            "{fixture}: every exported tensor was expected"
        );
    }
}

/// `python3` with the `safetensors` and `numpy` packages, or `None` after a
/// `SKIPPED` notice (a panic under CI, where `.ci/run` installs them).
fn python_with_safetensors() -> Option<&'static str> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some("python3");
    }
    if dcp_testkit::moto::under_ci() {
        panic!("python3 with safetensors and numpy is missing and CI is set (pip install safetensors numpy; .ci/run does this)");
    }
    eprintln!("SKIPPED: python3 with the safetensors and numpy packages is not available (pip install safetensors numpy)");
    None
}

fn fixture_script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/hf")
        .join(name)
}

/// Every tensor of `files` as Python's `safetensors` package reads them
/// (tests/fixtures/hf/check_export.py): name -> (file, dtype, shape, hex).
fn python_reads(python: &str, files: &[std::path::PathBuf]) -> serde_json::Value {
    let mut args = vec![fixture_script("check_export.py")];
    args.extend(
        files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
            .cloned(),
    );
    let o = std::process::Command::new(python)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "check_export.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every exported file (shards of every dtype, integers, bool and fp8
/// included) opens with Python's `safetensors` package, and every tensor
/// there has the generator's dtype, shape and bytes. The export's progress
/// callback adds up to the bytes written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_safetensors_reads_every_exported_tensor() {
    let Some(python) = python_with_safetensors() else {
        return;
    };
    let (store, m) = saved("hf-python").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let r = reader(&store);
    let o = out.clone();
    let seen = std::sync::Arc::new(std::sync::Mutex::new((0u64, 0u64, 0usize)));
    let s = seen.clone();
    let options = ExportOptions::default()
        .max_shard_size(300)
        .buffer_bytes(24)
        .on_progress(move |n, total| {
            let mut s = s.lock().unwrap();
            s.0 += n;
            s.1 = total;
            s.2 += 1;
        });
    let report = tokio::task::spawn_blocking(move || export_safetensors(&r, &o, &options))
        .await
        .unwrap()
        .unwrap();
    assert!(report.files.len() > 3, "sharded: {:?}", report.files);
    let (sum, total, calls) = *seen.lock().unwrap();
    assert_eq!((sum, total), (report.bytes, report.bytes));
    assert!(calls > m.tensors.len(), "one call per slab: {calls}");

    let read = python_reads(python, &report.files);
    let read = read.as_object().unwrap();
    assert_eq!(read.len(), m.tensors.len());
    let mut by_numpy = 0;
    for (spec, _) in &m.tensors {
        let t = &read[&spec.name];
        assert_eq!(t["dtype"], spec.dtype.safetensors_name(), "{}", spec.name);
        assert_eq!(t["shape"], serde_json::json!(spec.shape), "{}", spec.name);
        assert_eq!(t["hex"], hex(&spec.global()), "{}: bytes", spec.name);
        by_numpy += usize::from(t["numpy"] == true);
    }
    // The numpy arrays were checked too, for every dtype numpy has.
    assert!(by_numpy >= 10, "{by_numpy} tensors read through numpy");
}

/// A sharded directory written the way transformers' `save_pretrained`
/// and huggingface_hub lay it out (tests/fixtures/hf/make_sharded.py:
/// Python's `safetensors`, shards greedily in name order, an index) imports
/// into a dcp checkpoint of 2 ranks, and exports again with the same shard
/// limit to the same `weight_map` and `total_size`, tensor for tensor
/// identical as Python reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_written_sharded_directory_round_trips() {
    use dcp::hf_import::{import_safetensors, read_safetensors, ImportShard};
    let Some(python) = python_with_safetensors() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("from-python");
    let o = std::process::Command::new(python)
        .arg(fixture_script("make_sharded.py"))
        .arg(&hf)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let made: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let max = made["max_shard_size"].as_u64().unwrap();
    assert!(made["shards"].as_u64().unwrap() >= 3, "{made}");

    for shard in [ImportShard::Rows, ImportShard::Cols] {
        let store = Backend::Fs.make_fs("hf-python-import");
        let w: std::sync::Arc<dyn dcp_core::StorageWriter> = std::sync::Arc::new(
            dcp_core::FileSystemWriter::new(store.fs(), fast_writer()).unwrap(),
        );
        let md = import_safetensors(read_safetensors(&hf).unwrap(), w, 2, shard)
            .await
            .unwrap();
        assert_eq!(md.world_size, 2);
        let again = dir.path().join(format!("again-{shard:?}"));
        let r = reader(&store);
        let a = again.clone();
        let report = tokio::task::spawn_blocking(move || {
            export_safetensors(&r, &a, &ExportOptions::default().max_shard_size(max))
        })
        .await
        .unwrap()
        .unwrap();
        let index = |d: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(d.join("model.safetensors.index.json")).unwrap())
                .unwrap()
        };
        let (theirs, ours) = (index(&hf), index(&again));
        assert_eq!(ours["weight_map"], theirs["weight_map"], "{shard:?}");
        assert_eq!(
            ours["metadata"]["total_size"], theirs["metadata"]["total_size"],
            "{shard:?}"
        );
        let mut files: Vec<_> = std::fs::read_dir(&hf)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let (a, b) = (
            python_reads(python, &files),
            python_reads(python, &report.files),
        );
        assert_eq!(a.as_object().unwrap().len(), 12);
        assert_eq!(a, b, "{shard:?}: every tensor identical, in the same file");
    }
}
