//! Runs the built `dcp` binary on temporary directories.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Small dimensions: every test stays well under a second of work.
const SMALL: &[&str] = &["--layers", "2", "--hidden", "64", "--vocab", "96"];

fn dcp(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run dcp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "dcp panicked: {stderr}");
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("utf-8 stderr")
}

/// Run and expect success and exactly one JSON object on stdout.
fn json(args: &[&str]) -> Value {
    let o = dcp(args);
    assert!(o.status.success(), "dcp {args:?} failed: {}", stderr(&o));
    let s = stdout(&o);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("not one JSON object ({e}): {s}"))
}

fn demo_args<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["demo", "--dir", dir, "--json"];
    v.extend_from_slice(SMALL);
    v.extend_from_slice(extra);
    v
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// `dcp demo --async`: the save blocks only while the state dicts are
/// copied; the report adds the blocking time, a plain copy's time and the
/// peak RSS, and the checkpoint loads and verifies as usual.
#[test]
fn demo_async_reports_blocking_and_memcpy_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let r = json(&demo_args(path_str(&dir), &["--async"]));
    assert_eq!(r["verified"], true, "{r}");
    let (b, m, s) = (
        r["blocking_seconds"].as_f64().unwrap(),
        r["memcpy_seconds"].as_f64().unwrap(),
        r["save_seconds"].as_f64().unwrap(),
    );
    assert!(b > 0.0 && m > 0.0 && b <= s, "{r}");
    assert!(
        r["peak_rss"].as_u64().unwrap() > r["bytes"].as_u64().unwrap(),
        "{r}"
    );
    // Without --async the fields are absent.
    let r = json(&demo_args(path_str(&dir), &[]));
    assert!(r.get("blocking_seconds").is_none(), "{r}");
    // --async saves: it cannot go with --load-only.
    let o = dcp(&["demo", "--dir", path_str(&dir), "--async", "--load-only"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn demo_saves_loads_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let r = json(&demo_args(path_str(&dir), &["--threads", "2"]));
    assert_eq!(r["verified"], true);
    assert_eq!(r["ranks"], 4);
    assert_eq!(r["load_ranks"], 3);
    assert_eq!(r["format"], "raw");
    assert_eq!(r["dir"], path_str(&dir));
    // 2 layers of 24 H^2 + 4 H bytes, the embedding, the step, the JSON state.
    let tensors = 2 * (24 * 64 * 64 + 4 * 64) + 96 * 64 * 2 + 8;
    let bytes = r["bytes"].as_u64().unwrap();
    assert!(bytes > tensors && bytes < tensors + 200, "{bytes}");
    assert_eq!(r["items"], 19);
    // 4 ranks, 2 threads: 2 files each.
    assert_eq!(r["files"], 8);
    for k in ["save_seconds", "load_seconds", "save_gbps", "load_gbps"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    assert!(r["bytes_read"].as_u64().unwrap() >= bytes);
    assert!(dir.join(".metadata").is_file());

    // The human summary names the throughput and the verification.
    let o = dcp(&[
        "demo",
        "--dir",
        path_str(&dir),
        "--layers",
        "1",
        "--hidden",
        "32",
        "--vocab",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains(" MB/s") || s.contains(" GB/s"), "{s}");
    assert!(s.contains("verified"), "{s}");
    assert!(
        stderr(&o).is_empty(),
        "stderr is not a terminal, so quiet: {}",
        stderr(&o)
    );
}

#[test]
fn save_with_4_ranks_load_with_3_and_5() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let dir = path_str(&dir);
    let saved = json(&demo_args(dir, &["--save-only", "--seed", "42"]));
    assert_eq!(saved["verified"], Value::Null);
    assert_eq!(saved["load_seconds"], Value::Null);
    assert!(saved["save_seconds"].as_f64().unwrap() > 0.0);
    for m in ["3", "5"] {
        // Dimensions and seed come from the checkpoint's user metadata.
        let r = json(&[
            "demo",
            "--dir",
            dir,
            "--json",
            "--load-only",
            "--load-ranks",
            m,
        ]);
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["ranks"], 4);
        assert_eq!(r["load_ranks"], m.parse::<u64>().unwrap());
        assert_eq!(r["seed"], 42);
        assert_eq!(r["hidden"], 64);
        assert_eq!(r["save_seconds"], Value::Null);
        assert_eq!(r["bytes"], saved["bytes"]);
    }
    // A dimension that contradicts the checkpoint is a usage error.
    let o = dcp(&["demo", "--dir", dir, "--load-only", "--hidden", "128"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("saved with --hidden 64, not 128"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn more_ranks_than_rows() {
    // Hidden 3 split over 5 savers and 7 loaders: some ranks hold nothing.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let r = json(&[
        "demo",
        "--dir",
        path_str(&dir),
        "--json",
        "--layers",
        "1",
        "--hidden",
        "3",
        "--vocab",
        "2",
        "--ranks",
        "5",
        "--load-ranks",
        "7",
    ]);
    assert_eq!(r["verified"], true, "{r}");
}

#[test]
fn safetensors_format() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let r = json(&demo_args(
        path_str(&dir),
        &["--format", "safetensors", "--load-ranks", "2"],
    ));
    assert_eq!(r["verified"], true);
    assert_eq!(r["format"], "safetensors");
    let info = json(&["inspect", path_str(&dir), "--json"]);
    assert_eq!(info["format"], "safetensors");
    for f in info["files"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        assert!(name.ends_with(".safetensors"), "{name}");
        // Each data file opens with a safetensors header.
        let data = std::fs::read(dir.join(name)).unwrap();
        let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
        assert_eq!(header["__metadata__"]["format"], "dcp");
    }
}

#[test]
fn inspect_json_describes_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    json(&demo_args(path_str(&dir), &["--save-only", "--seed", "7"]));
    let info = json(&["inspect", path_str(&dir), "--json"]);
    assert_eq!(info["world_size"], 4);
    assert_eq!(info["format"], "raw");
    assert_eq!(info["save_id"].as_str().unwrap().len(), 16);
    // Checksums are on by default.
    assert_eq!(info["transforms"], serde_json::json!(["crc32c/1"]));
    assert_eq!(info["compression_ratio"], 1.0);
    assert_eq!(info["user"]["dcp.demo.seed"], "7");
    assert_eq!(info["user"]["dcp.demo.hidden"], "64");

    let files = info["files"].as_array().unwrap();
    assert_eq!(files.len(), 16, "4 ranks, 4 threads each");
    for f in files {
        let len = std::fs::metadata(dir.join(f["name"].as_str().unwrap()))
            .unwrap()
            .len();
        assert_eq!(f["length"], len);
    }
    let file_names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();

    let items = info["items"].as_array().unwrap();
    assert_eq!(items.len(), 19);
    let item = |name: &str| items.iter().find(|i| i["name"] == name).unwrap().clone();
    let q = item("layers.0.attn.q.weight");
    assert_eq!(q["kind"], "tensor");
    assert_eq!(q["dtype"], "bf16");
    assert_eq!(q["shape"], serde_json::json!([64, 64]));
    assert_eq!(q["bytes"], 64 * 64 * 2);
    let chunks = q["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 4, "row-sharded by 4 ranks");
    assert_eq!(chunks[1]["offsets"], serde_json::json!([16, 0]));
    assert_eq!(chunks[1]["sizes"], serde_json::json!([16, 64]));
    for c in chunks {
        assert!(file_names.contains(&c["file"].as_str().unwrap()));
        assert_eq!(c["length"], 16 * 64 * 2);
        assert!(c["offset"].is_u64());
        let t = c["transforms"].as_array().unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0]["name"], "crc32c/1");
        assert_eq!(t[0]["value"].as_str().unwrap().len(), 8, "4 bytes, hex");
    }
    // Replicated items are saved once.
    assert_eq!(
        item("layers.1.mlp_norm.weight")["chunks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let step = item("optim.step");
    assert_eq!(step["dtype"], "i64");
    assert_eq!(step["shape"], serde_json::json!([]));
    let dl = item("dataloader.state");
    assert_eq!(dl["kind"], "bytes");
    assert_eq!(dl["dtype"], Value::Null);
    assert_eq!(dl["chunks"].as_array().unwrap().len(), 1);

    // The tables, and a file:// URL for the same location.
    let url = format!("file://{}", path_str(&dir));
    let o = dcp(&["inspect", &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("world size  4"), "{s}");
    assert!(s.contains("layers.0.attn.q.weight"), "{s}");
    assert!(s.contains("dcp.demo.seed = 7"), "{s}");
    assert!(s.contains(file_names[0]), "{s}");
}

#[test]
fn verify_sound_and_damaged_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = path_str(&dir);
    json(&demo_args(d, &["--save-only"]));
    for extra in [&[][..], &["--no-checksums"], &["--threads", "1"]] {
        let mut args = vec!["verify", d];
        args.extend_from_slice(extra);
        let o = dcp(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = stdout(&o);
        assert_eq!(s.lines().count(), 1, "{s}");
        assert!(s.starts_with("ok: "), "{s}");
    }

    let info = json(&["inspect", d, "--json"]);
    let files: Vec<String> = info["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();

    // Truncate one data file: its length and the records past the end.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(&files[1]))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    drop(f);
    let o = dcp(&["verify", d]);
    assert_eq!(o.status.code(), Some(1));
    let s = stdout(&o);
    assert!(s.lines().count() >= 2, "{s}");
    for line in s.lines() {
        assert!(line.starts_with("problem: "), "{line}");
        assert!(line.contains(&files[1]), "{line}");
    }
    assert!(
        s.contains(&format!("{} bytes, metadata records {len}", len / 2)),
        "{s}"
    );

    // Delete another: one line saying it is missing.
    std::fs::remove_file(dir.join(&files[2])).unwrap();
    let o = dcp(&["verify", d, "--no-checksums"]);
    assert_eq!(o.status.code(), Some(1));
    let s = stdout(&o);
    assert!(
        s.lines()
            .any(|l| l == format!("problem: {}: missing", files[2])),
        "{s}"
    );
    assert!(
        s.lines()
            .all(|l| l.contains(&files[1]) || l.contains(&files[2])),
        "{s}"
    );
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
}

/// Flip one byte of `layers.1.mlp.down.weight`'s third chunk; returns the
/// data file's name.
fn damage_a_chunk(dir: &std::path::Path) -> String {
    let info = json(&["inspect", path_str(dir), "--json"]);
    let item = info["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "layers.1.mlp.down.weight")
        .unwrap();
    let chunk = &item["chunks"][2];
    let path = dir.join(chunk["file"].as_str().unwrap());
    let mut data = std::fs::read(&path).unwrap();
    data[chunk["offset"].as_u64().unwrap() as usize + 3] ^= 0x40;
    std::fs::write(&path, data).unwrap();
    chunk["file"].as_str().unwrap().to_string()
}

#[test]
fn a_damaged_chunk_is_refused_by_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = path_str(&dir);
    json(&demo_args(d, &["--save-only"]));
    let file = damage_a_chunk(&dir);
    let o = dcp(&["demo", "--dir", d, "--load-only", "--load-ranks", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("layers.1.mlp.down.weight") && err.contains(&file),
        "{err}"
    );
    assert!(err.to_lowercase().contains("checksum"), "{err}");
    // `dcp verify` names the same record.
    let o = dcp(&["verify", d]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("problem")).count(),
        1,
        "{out}"
    );
    assert!(
        out.contains("layers.1.mlp.down.weight") && out.contains(&file),
        "{out}"
    );
}

#[test]
fn demo_reports_a_damaged_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = path_str(&dir);
    // Without checksums the damage reaches the demo's own comparison.
    json(&demo_args(d, &["--save-only", "--checksum", "none"]));
    damage_a_chunk(&dir);

    let o = dcp(&[
        "demo",
        "--dir",
        d,
        "--load-only",
        "--json",
        "--load-ranks",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let r: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["verified"], false);
    let mismatches = r["mismatches"].as_array().unwrap();
    assert_eq!(mismatches.len(), 1, "{r}");
    let m = mismatches[0].as_str().unwrap();
    assert!(m.contains("layers.1.mlp.down.weight chunk"), "{m}");
    let err = stderr(&o);
    assert!(err.contains(&format!("mismatch: {m}")), "{err}");
    assert!(err.contains("error: verification failed"), "{err}");
}

#[test]
fn errors_are_one_line_with_an_exit_status() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing-here");
    let o = dcp(&["inspect", path_str(&missing)]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with("error: "), "{e}");
    assert!(e.contains(".metadata is missing"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(stdout(&o).is_empty());

    let o = dcp(&["verify", path_str(&missing)]);
    assert_eq!(o.status.code(), Some(1));

    #[cfg(feature = "object-store")]
    object_store_errors(tmp.path());
    #[cfg(not(feature = "object-store"))]
    {
        let o = dcp(&["inspect", "s3://bucket/ckpt"]);
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(e.contains("\"s3\" feature of the dcp crate"), "{e}");
        assert!(e.contains("\"object-store\" feature"), "{e}");
    }

    for args in [
        &["demo", "--ranks", "0"][..],
        &["frobnicate"],
        &["demo", "--save-only", "--load-only"],
        &["demo", "--format", "pickle"],
    ] {
        let o = dcp(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }
    let o = dcp(&["inspect", "ftp://host/x"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("unknown location scheme ftp://"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn a_closed_pipe_is_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = path_str(&dir);
    // About 1600 chunks: far more JSON than a pipe buffers.
    json(&[
        "demo",
        "--dir",
        d,
        "--json",
        "--save-only",
        "--ranks",
        "64",
        "--threads",
        "1",
        "--layers",
        "4",
        "--hidden",
        "64",
        "--vocab",
        "64",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(["inspect", d, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
}

#[test]
fn compressed_demo_round_trips_and_reports_its_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = path_str(&dir);
    for (compress, name) in [("zstd", "zstd/1:level=3"), ("lz4", "lz4/1")] {
        let r = json(&demo_args(
            d,
            &[
                "--compress",
                compress,
                "--zstd-level",
                "3",
                "--load-ranks",
                "2",
            ],
        ));
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["transforms"], serde_json::json!([name, "crc32c/1"]));
        let info = json(&["inspect", d, "--json"]);
        assert_eq!(info["transforms"], serde_json::json!([name, "crc32c/1"]));
        assert!(info["compression_ratio"].as_f64().unwrap() > 0.0);
        assert_eq!(info["stored_bytes"], r["stored_bytes"]);
        let o = dcp(&["verify", d]);
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    }
}

#[test]
fn safetensors_refuses_compression_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let o = dcp(&demo_args(
        path_str(&dir),
        &["--format", "safetensors", "--compress", "zstd"],
    ));
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("safetensors") && e.contains("zstd"), "{e}");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "nothing written: {leftovers:?}");
}

/// Object-store locations that cannot work give one clear line, quickly.
#[cfg(feature = "object-store")]
fn object_store_errors(home: &Path) {
    // An object store that cannot be reached: one clear line, quickly.
    let started = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(["inspect", "s3://bucket/ckpt"])
        .env_remove("RUST_LOG")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("error: ") && e.contains("s3://bucket/ckpt"),
        "{e}"
    );
    assert!(
        e.lines().next().unwrap().contains("127.0.0.1:9"),
        "the error names the endpoint: {e}"
    );
    // Then the causes, one line each, down to the refused connection.
    assert!(
        e.lines().skip(1).all(|l| l.starts_with("  caused by: ")),
        "{e}"
    );
    assert!(e.contains("Connection refused"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));

    // No credentials at all: an error that says so, not a retry loop.
    let o = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(["inspect", "s3://bucket/ckpt"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("no usable credentials") && e.contains("AWS_ACCESS_KEY_ID"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

fn torch_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/torch-dcp-2.15")
        .join(name)
        .join("ckpt")
}

/// Every item of a checkpoint loaded whole on one rank: tensors' bytes and
/// bytes items, by name.
fn load_whole(location: &str) -> std::collections::BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    use dcp::metadata::ItemMeta;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reader = dcp::reader(location, dcp::ReaderOptions::default()).unwrap();
    let md = rt.block_on(dcp::read_metadata(&reader)).unwrap();
    let mut dest = dcp::DestStateDict::new();
    for (name, item) in &md.items {
        match item {
            ItemMeta::Tensor { dtype, shape, .. } => dest
                .want_tensor(
                    name.clone(),
                    *dtype,
                    shape.to_vec(),
                    vec![dcp::ChunkBox::full(shape)],
                )
                .unwrap(),
            ItemMeta::Bytes { .. } => dest.want_bytes(name.clone()).unwrap(),
        }
    }
    let l = rt.block_on(dcp::load(dest, &reader, &dcp::Single)).unwrap();
    l.state_dict
        .iter()
        .map(|(name, item)| {
            let v = match item {
                dcp::DestItem::Tensor(t) => (
                    t.dtype.name().to_string(),
                    t.shape.clone(),
                    t.chunks[0].data.as_slice().to_vec(),
                ),
                dcp::DestItem::Bytes(b) => ("bytes".into(), vec![], b.clone().unwrap()),
            };
            (name.clone(), v)
        })
        .collect()
}

#[test]
fn inspect_verify_and_convert_torch_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, ranks) in [
        ("torch_save", "1"),
        ("torch_save_zstd", "3"),
        ("sharded4", "5"),
    ] {
        let ck = torch_fixture(name);
        let ck = path_str(&ck);
        let r = json(&["inspect", ck, "--json"]);
        assert_eq!(r["format"], "torch-save", "{name}");
        let items = r["items"].as_array().unwrap();
        let item = |n: &str| items.iter().find(|i| i["name"] == n).cloned().unwrap();
        if name == "sharded4" {
            assert_eq!(r["world_size"], 4);
            assert_eq!(item("cols")["dtype"], "bf16");
            assert_eq!(item("cols")["shape"], serde_json::json!([5, 9]));
            assert_eq!(item("step")["kind"], "bytes");
        } else {
            assert_eq!(item("model.embed.weight")["dtype"], "bf16");
            assert_eq!(
                item("model.embed.weight")["shape"],
                serde_json::json!([64, 32])
            );
            assert_eq!(item("optim.hist.1")["shape"], serde_json::json!([2, 3]));
            assert_eq!(item("optim.betas")["kind"], "bytes");
        }
        let o = dcp(&["verify", ck]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(stdout(&o).starts_with("ok: "), "{name}: {}", stdout(&o));

        let out = tmp.path().join(name);
        let out = path_str(&out);
        let o = dcp(&["convert", ck, "--to-dcp", out, "--ranks", ranks]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));
        let c = json(&["inspect", out, "--json"]);
        assert_eq!(c["format"], "raw");
        assert_eq!(
            c["world_size"].as_u64().unwrap(),
            ranks.parse::<u64>().unwrap()
        );
        let o = dcp(&["verify", out]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        // The same items, dtypes, shapes and bytes.
        let (a, b) = (load_whole(ck), load_whole(out));
        assert_eq!(a.len(), b.len(), "{name}");
        assert!(
            a == b,
            "{name}: the converted checkpoint differs from torch's"
        );
        // Converting onto an existing checkpoint is refused.
        let o = dcp(&["convert", ck, "--to-dcp", out]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(stderr(&o).contains("error:"), "{}", stderr(&o));
    }
}

#[test]
fn verify_names_the_item_of_a_damaged_torch_record() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ckpt");
    std::fs::create_dir(&ck).unwrap();
    for e in std::fs::read_dir(torch_fixture("torch_save")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    // model.embed.weight's record starts at 5044; its tensor bytes at 704
    // into it (data/0's local header is at 598, its data 64-byte aligned
    // after data.pkl and three small entries): flip one of them.
    let f = ck.join("__0_0.distcp");
    let mut d = std::fs::read(&f).unwrap();
    d[5044 + 704 + 64] ^= 0x10;
    std::fs::write(&f, d).unwrap();
    let o = dcp(&["verify", path_str(&ck)]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let s = stdout(&o);
    assert!(
        s.contains("problem: model.embed.weight: __0_0.distcp at offset 5044")
            && s.contains("CRC-32"),
        "{s}"
    );
    assert_eq!(s.lines().count(), 1, "{s}");
}

/// `dcp convert --to-safetensors`: a demo checkpoint as Hugging Face
/// shards with an index (the demo's JSON bytes item noted, not written);
/// every shard opens with the `safetensors` format's layout; one of
/// `--to-dcp` and `--to-safetensors` is required.
#[test]
fn convert_to_safetensors_writes_shards_and_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let r = json(&demo_args(path_str(&ck), &["--save-only"]));
    assert_eq!(r["ranks"], 4);
    let out = tmp.path().join("hf");
    let o = dcp(&[
        "convert",
        path_str(&ck),
        "--to-safetensors",
        path_str(&out),
        "--max-shard-size",
        "40KB",
        "--rename",
        "model.=",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("bytes items not written"),
        "{}",
        stderr(&o)
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.keys().all(|k| !k.starts_with("model.")), "{map:?}");
    let mut total = 0u64;
    for file in map
        .values()
        .map(|v| v.as_str().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let bytes = std::fs::read(out.join(file)).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let head: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        for (k, v) in head.as_object().unwrap() {
            if k != "__metadata__" {
                let off = v["data_offsets"].as_array().unwrap();
                total += off[1].as_u64().unwrap() - off[0].as_u64().unwrap();
            }
        }
    }
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    let o = dcp(&["convert", path_str(&ck)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // And back: the shards into a dcp checkpoint of 3 ranks split by
    // columns, which verifies and exports again to the same files.
    let back = tmp.path().join("back");
    let o = dcp(&[
        "convert",
        path_str(&out),
        "--to-dcp",
        path_str(&back),
        "--ranks",
        "3",
        "--shard",
        "col",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("3 ranks split by cols"),
        "{}",
        stdout(&o)
    );
    let o = dcp(&["verify", path_str(&back)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = tmp.path().join("again");
    let o = dcp(&[
        "convert",
        path_str(&back),
        "--to-safetensors",
        path_str(&again),
        "--max-shard-size",
        "40KB",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in map.values().map(|v| v.as_str().unwrap()) {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// `dcp inspect --keys` filters the items (and the totals count only them);
/// `dcp completions SHELL` prints a completion script naming the commands.
#[test]
fn inspect_keys_and_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    json(&demo_args(path_str(&ck), &["--save-only"]));
    let all = json(&["inspect", path_str(&ck), "--json"]);
    let some = json(&["inspect", path_str(&ck), "--json", "--keys", "layers.0.*"]);
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (all, some) = (names(&all), names(&some));
    assert!(
        !some.is_empty() && some.len() < all.len(),
        "{some:?} of {all:?}"
    );
    assert!(some.iter().all(|n| n.starts_with("layers.0.")), "{some:?}");
    let o = dcp(&["inspect", path_str(&ck), "--keys", "[oops"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    for shell in ["bash", "zsh", "fish"] {
        let o = dcp(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let s = stdout(&o);
        assert!(
            s.contains("inspect") && s.contains("convert"),
            "{shell}: {s}"
        );
    }
}
