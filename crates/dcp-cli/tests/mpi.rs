//! `dcp demo --mpi`: with the `mpi` feature, under `mpirun`, checkpoints
//! cross modes and rank counts; without it, `--mpi` is a usage error that
//! says how to build it.
//!
//! The `mpirun` tests skip, printing why, when `mpirun` is not on the
//! `PATH`, unless `CI=true`, where they fail.

#[cfg(feature = "mpi")]
use serde_json::Value;
use std::process::{Command, Output};

#[cfg(feature = "mpi")]
const SMALL: &[&str] = &["--layers", "2", "--hidden", "64", "--vocab", "96"];

fn dcp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dcp"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run dcp")
}

#[cfg(feature = "mpi")]
fn one_json(o: &Output, what: &str) -> Value {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{what} failed: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{what}: not one JSON object ({e}): {out}"))
}

#[cfg(not(feature = "mpi"))]
#[test]
fn mpi_flag_needs_the_feature() {
    for cmd in ["demo", "bench"] {
        let o = dcp(&[cmd, "--mpi"]);
        assert_eq!(o.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("built without MPI") && err.contains("--features mpi"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn mpi_flag_conflicts_with_rank_counts() {
    for (cmd, flag) in [
        ("demo", "--ranks"),
        ("demo", "--load-ranks"),
        ("bench", "--ranks"),
    ] {
        let o = dcp(&[cmd, "--mpi", flag, "3"]);
        assert_eq!(o.status.code(), Some(2), "{cmd} {flag}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("cannot be used with"), "{cmd} {flag}: {err}");
    }
}

/// `mpirun` with Open MPI's flags for root and small machines, or `None`
/// (after printing why) when it is missing and this is not CI.
#[cfg(feature = "mpi")]
fn mpirun(n: usize, args: &[&str]) -> Option<Output> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mpirun"))
            .find(|p| p.is_file())
    });
    let Some(mpirun) = found else {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "CI=true and mpirun is missing: the MPI tests must run");
        println!("skipped: mpirun not found on PATH (install openmpi-bin)");
        return None;
    };
    Some(
        Command::new(mpirun)
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .args(["-n", &n.to_string(), env!("CARGO_BIN_EXE_dcp")])
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run mpirun"),
    )
}

#[cfg(feature = "mpi")]
fn demo<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["demo", "--dir", dir, "--json"];
    v.extend_from_slice(SMALL);
    v.extend_from_slice(extra);
    v
}

/// Saved by 4 processes, loaded by 5 `LocalGroup` ranks; saved by 5
/// ranks, loaded by 3 processes; saved and loaded by 4 processes. Rank 0
/// alone prints, with the same JSON fields as without `--mpi`.
#[cfg(feature = "mpi")]
#[test]
fn checkpoints_cross_modes_and_rank_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a").to_string_lossy().into_owned();
    let Some(o) = mpirun(4, &demo(&a, &["--mpi", "--save-only"])) else {
        return;
    };
    let saved = one_json(&o, "mpirun -n 4 dcp demo --mpi --save-only");
    assert_eq!(saved["ranks"], 4);
    assert_eq!(saved["load_ranks"], Value::Null);
    let loaded = one_json(
        &dcp(&[
            "demo",
            "--dir",
            &a,
            "--json",
            "--load-only",
            "--load-ranks",
            "5",
        ]),
        "dcp demo --load-only --load-ranks 5",
    );
    assert_eq!(loaded["ranks"], 4);
    assert_eq!(loaded["load_ranks"], 5);
    assert_eq!(loaded["verified"], true);

    let b = tmp.path().join("b").to_string_lossy().into_owned();
    let local = one_json(
        &dcp(&demo(&b, &["--save-only", "--ranks", "5"])),
        "dcp demo --save-only --ranks 5",
    );
    let o = mpirun(3, &["demo", "--dir", &b, "--json", "--mpi", "--load-only"]).unwrap();
    let loaded = one_json(&o, "mpirun -n 3 dcp demo --mpi --load-only");
    assert_eq!(loaded["ranks"], 5);
    assert_eq!(loaded["load_ranks"], 3);
    assert_eq!(loaded["verified"], true);
    assert_eq!(loaded["bytes"], local["bytes"]);

    let c = tmp.path().join("c").to_string_lossy().into_owned();
    let o = mpirun(4, &demo(&c, &["--mpi", "--compress", "zstd"])).unwrap();
    let both = one_json(&o, "mpirun -n 4 dcp demo --mpi");
    assert_eq!(both["ranks"], 4);
    assert_eq!(both["load_ranks"], 4);
    assert_eq!(both["verified"], true);
    assert_eq!(both["transforms"].as_array().map(Vec::len), Some(2));
    // The same fields as a run without --mpi.
    let plain = one_json(
        &dcp(&demo(&tmp.path().join("d").to_string_lossy(), &[])),
        "dcp demo",
    );
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&both), keys(&plain));
}

/// A location no process can open: every process fails at once with the
/// error, nobody waits for a deadline.
#[cfg(feature = "mpi")]
#[test]
fn a_failure_before_the_save_ends_every_process() {
    let started = std::time::Instant::now();
    let Some(o) = mpirun(3, &["demo", "--mpi", "--dir", "ftp://nowhere/x"]) else {
        return;
    };
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    // mpirun aborts the job when the first process exits non-zero, so the
    // others may be killed before they print, and it interleaves the
    // processes' stderr with its own banner: at least one process reports
    // the location, at most all three.
    let reports = err
        .matches("ftp://nowhere/x: unknown location scheme")
        .count();
    assert!((1..=3).contains(&reports), "{err}");
    // Nobody waited for a collective deadline.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

/// `mpirun -n 4 dcp bench --mpi --json`: rank 0 alone prints one record per
/// scenario, with the same fields as `dcp bench` without `--mpi`; the
/// loads are verified, the 4 -> 3 reshard runs on 3 of the 4 processes and
/// reads the checkpoint once. Scenarios that cannot cross processes and a
/// resharded load larger than the job are usage errors on every process.
#[cfg(feature = "mpi")]
#[test]
fn bench_under_mpirun_reports_like_local_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_string_lossy().into_owned();
    let args = [
        "bench",
        "--json",
        "--reps",
        "1",
        "--sync",
        "0",
        "--layers",
        "1",
        "--hidden",
        "128",
        "--vocab",
        "500",
        "--load-ranks",
        "3",
        "--scenarios",
        "save,load,reshard",
        "--dir",
        &dir,
    ];
    let mut with_mpi = args.to_vec();
    with_mpi.push("--mpi");
    let Some(o) = mpirun(4, &with_mpi) else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let names: Vec<&str> = records
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "save_nosync",
            "load_warm",
            "load_cold",
            "reshard_warm",
            "reshard_cold"
        ],
        "one record per scenario, from rank 0 alone: {out}"
    );
    for r in &records {
        assert_eq!(r["collective"], "mpi", "{r}");
        assert_eq!(r["save_ranks"], 4, "{r}");
        if r["reps"] == 0 {
            // Cold loads are skipped where the page cache cannot be dropped.
            assert_eq!(r["cold_method"], "cold not available", "{r}");
            continue;
        }
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["raw_seconds"].as_f64().unwrap() > 0.0, "{r}");
        let scenario = r["scenario"].as_str().unwrap();
        if scenario == "save_nosync" {
            assert_eq!(r["ranks"], 4);
            continue;
        }
        assert_eq!(r["verified"], true, "{r}");
        let amp = r["read_amplification"].as_f64().unwrap();
        assert!((1.0..=1.1).contains(&amp), "{r}");
        let ranks = if scenario.starts_with("reshard") {
            3
        } else {
            4
        };
        assert_eq!(r["ranks"], ranks, "{r}");
    }
    // The same fields as without --mpi.
    let local = dcp(&[&args[..], &["--ranks", "4"]].concat());
    let local_out = String::from_utf8_lossy(&local.stdout);
    assert!(local.status.success(), "{local_out}");
    let first: Value = serde_json::from_str(local_out.lines().next().unwrap()).unwrap();
    assert_eq!(first["collective"], "local");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&records[0]), keys(&first));

    for (extra, want) in [
        (
            &["--scenarios", "async"][..],
            "not measured across processes",
        ),
        (&["--load-ranks", "5"][..], "the job has 4 processes"),
    ] {
        let mut a = vec!["bench", "--mpi", "--dir", &dir];
        a.extend_from_slice(extra);
        let o = mpirun(4, &a).unwrap();
        assert!(!o.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
