//! `dcp bench` at tiny sizes: every scenario line is present, well formed and
//! sane. Nothing here asserts a time or a ratio bound; that is what the
//! benchmark itself reports.

use serde_json::Value;
use std::process::Command;

fn bench(dir: &std::path::Path, extra: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .arg("bench")
        .arg("--dir")
        .arg(dir)
        .args(["--reps", "1", "--json"])
        .args(extra)
        .output()
        .expect("run dcp");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dcp bench {extra:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn check(lines: &[Value], workload: &str, items: u64, save_ranks: u64, load_ranks: u64) {
    let scenarios: Vec<&str> = lines
        .iter()
        .map(|l| l["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        scenarios,
        [
            "save",
            "save_nosync",
            "load_warm",
            "load_cold",
            "reshard_warm",
            "reshard_cold",
            "reshard_fsspec_warm",
            "reshard_fsspec_cold"
        ],
        "{workload}"
    );
    let line = |s: &str| lines.iter().find(|l| l["scenario"] == s).unwrap();
    if cfg!(feature = "object-store") {
        // Through dcp-fsspec's reader on file:// the resharded load reads
        // exactly what dcp-fs's reader reads: buffer lending is kept.
        assert_eq!(
            line("reshard_warm")["bytes_read"],
            line("reshard_fsspec_warm")["bytes_read"],
            "{workload}"
        );
    } else {
        // Without dcp-fsspec the scenario says so instead of measuring.
        for s in ["reshard_fsspec_warm", "reshard_fsspec_cold"] {
            assert_eq!(line(s)["cold_method"], "not available", "{workload}");
        }
    }
    // Checksums are on by default, as for every save (in every scenario
    // that was measured).
    assert!(
        lines
            .iter()
            .filter(|l| !l["cold_method"]
                .as_str()
                .is_some_and(|m| m.ends_with("not available")))
            .all(|l| l["checksum"] == "crc32c"),
        "{workload}"
    );
    for l in lines {
        let s = l["scenario"].as_str().unwrap();
        let what = format!("{workload} {s}: {l}");
        assert_eq!(l["workload"], workload, "{what}");
        if l["cold_method"] == "cold not available" {
            // The kernel refused to drop the cache: said so, not measured.
            assert!(s.ends_with("_cold"), "{what}");
            continue;
        }
        if l["cold_method"] == "not available" {
            // A reader this build lacks (dcp-fsspec): said so, not measured.
            assert!(s.starts_with("reshard_fsspec"), "{what}");
            continue;
        }
        for key in [
            "items",
            "bytes",
            "seconds",
            "raw_seconds",
            "ratio",
            "bytes_read",
            "peak_rss",
            "reps",
            "checkpoint_bytes",
            "metadata_bytes_per_chunk",
        ] {
            assert!(l.get(key).is_some_and(|v| v.is_number()), "{key} in {what}");
        }
        assert_eq!(l["items"].as_u64(), Some(items), "{what}");
        assert_eq!(l["reps"].as_u64(), Some(1), "{what}");
        let bytes = l["bytes"].as_u64().unwrap();
        assert!(bytes > 0, "{what}");
        assert!(l["checkpoint_bytes"].as_u64().unwrap() >= bytes, "{what}");
        let (secs, raw) = (
            l["seconds"].as_f64().unwrap(),
            l["raw_seconds"].as_f64().unwrap(),
        );
        assert!(secs > 0.0 && raw > 0.0, "{what}");
        let ratio = l["ratio"].as_f64().unwrap();
        assert!(
            (ratio - raw / secs).abs() <= 1e-9 * ratio.max(1.0),
            "{what}"
        );
        assert!(l["peak_rss"].as_u64().unwrap() > 0, "{what}");
        let per_chunk = l["metadata_bytes_per_chunk"].as_f64().unwrap();
        assert!(per_chunk > 0.0 && per_chunk < 1000.0, "{what}");
        let read = l["bytes_read"].as_u64().unwrap();
        if s.starts_with("save") {
            assert_eq!(read, 0, "{what}");
            assert_eq!(l["ranks"].as_u64(), Some(save_ranks), "{what}");
            assert_eq!(l["sync"].as_bool(), Some(s == "save"), "{what}");
        } else {
            // Every byte loaded was read at least once, and a resharded load
            // reads each saved byte about once (shared reads), not per rank.
            assert!(read >= bytes, "{what}");
            assert!(
                read <= 2 * l["checkpoint_bytes"].as_u64().unwrap(),
                "{what}"
            );
            assert_eq!(l["verified"], true, "{what}");
            let ranks = if s.starts_with("load") {
                save_ranks
            } else {
                load_ranks
            };
            assert_eq!(l["ranks"].as_u64(), Some(ranks), "{what}");
            let cache = if s.ends_with("_cold") { "cold" } else { "warm" };
            assert_eq!(l["cache"], cache, "{what}");
        }
    }
}

#[test]
fn bench_reports_every_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let llm = bench(
        dir.path(),
        &[
            "--layers",
            "2",
            "--hidden",
            "32",
            "--vocab",
            "64",
            "--ranks",
            "2",
            "--load-ranks",
            "3",
        ],
    );
    check(&llm, "llm", 2 * 8 + 3, 2, 3);

    let small = bench(dir.path(), &["--workload", "many-small", "--items", "300"]);
    check(&small, "many-small", 300, 4, 3);

    let opt = bench(
        dir.path(),
        &[
            "--workload",
            "optimizer",
            "--layers",
            "1",
            "--hidden",
            "16",
            "--vocab",
            "40",
            "--threads",
            "1",
        ],
    );
    check(&opt, "optimizer", 3 * 9 + 2, 8, 6);
    // The bench cleans up after itself.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn bench_table_and_selection() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .arg("bench")
        .arg("--dir")
        .arg(dir.path())
        .args([
            "--layers",
            "1",
            "--hidden",
            "16",
            "--vocab",
            "32",
            "--reps",
            "2",
            "--sync",
            "0",
            "--scenarios",
            "save,reshard",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("save_nosync"), "{text}");
    assert!(text.contains("reshard_warm"), "{text}");
    assert!(!text.contains("load_warm"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("save ")), "{text}");
    assert!(text.contains("ratio"), "{text}");

    let out = Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(["bench", "--dir", "s3://bucket/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("local directory"));
}

/// The staging scenarios: `async_save` (blocking time against a plain copy,
/// peak RSS) and `device_save` (simulated device memory), each one line.
#[test]
fn bench_staging_scenarios() {
    let dir = tempfile::tempdir().unwrap();
    let lines = bench(
        dir.path(),
        &[
            "--layers",
            "1",
            "--hidden",
            "32",
            "--vocab",
            "64",
            "--sync",
            "0",
            "--scenarios",
            "async,device",
        ],
    );
    let scenarios: Vec<&str> = lines
        .iter()
        .map(|l| l["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(scenarios, ["async_save", "device_save"]);
    for l in &lines {
        for k in ["seconds", "raw_seconds", "ratio"] {
            assert!(l[k].as_f64().unwrap() > 0.0, "{k}: {l}");
        }
        assert_eq!(l["files"], 4 * 2, "4 ranks, 2 threads: {l}");
    }
    assert!(lines[0]["peak_rss"].as_u64().unwrap() >= lines[0]["bytes"].as_u64().unwrap());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
