//! Project automation, run as `cargo xtask <command>`.
//!
//! * `cargo xtask test-matrix [--dry-run] [-p CRATE]...`: for every workspace
//!   crate with features, `cargo test` with `--no-default-features`, with
//!   each feature alone and with `--all-features`, plus the combinations of
//!   [`EXTRA_COMBINATIONS`] (the `dcp` facade's default features, and its
//!   defaults with S3); crates without features once. One PASS/FAIL line per
//!   combination, a summary naming every failure, and a non-zero exit status
//!   on any.
//! * `cargo xtask ci`: the part of CI that needs nothing installed:
//!   `cargo fmt --all --check`, `cargo clippy --all-targets -- -D warnings`,
//!   `cargo test` (every crate but dcp-mpi), stopping at the first failure.
//!   `.ci/run` adds MPI, moto, docs and fuzzing. `test-matrix` covers
//!   dcp-mpi and the `mpi` features too, so it needs Open MPI.
//! * `cargo xtask bench [--quick] [--reps N] [--dir DIR] [--micro]`: the
//!   standard `dcp bench` set and its targets (see `bench.rs`).
//! * `cargo xtask crash [--trials N] [--seed S] [--aimed]`: the SIGKILL crash
//!   harness (`tests/tests/crash.rs`) with N trials, in release mode; with
//!   `--aimed`, N kills aimed at each step of the commit and cleanup in turn
//!   instead of at random moments.
//! * `cargo xtask fuzz [--seconds N]`: every cargo-fuzz target for N seconds
//!   each (`fuzz/run.sh`; installs cargo-fuzz when missing).
//! * `cargo xtask gpu-check [--gib N]`: on a machine with an NVIDIA GPU,
//!   dcp-cuda's GPU tests (none may skip) and its staging benchmark against
//!   a plain pinned device-to-host copy (see `gpu.rs`); fails without a GPU.

mod bench;
mod gpu;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  test-matrix [--dry-run] [-p CRATE]...
                  cargo test every crate with no default features, each feature
                  alone and all features (crates without features once), and
                  the dcp facade with its defaults and with s3
  ci              cargo fmt --all --check; cargo clippy --all-targets
                  -- -D warnings; cargo test (every crate but dcp-mpi)
  crash [--trials N] [--seed S] [--aimed]
                  SIGKILL a saving process N times (default 500) and check the
                  directory holds exactly the old or the new checkpoint;
                  --aimed: kill it at each numbered step of the commit and
                  cleanup in turn (before and after the .metadata rename,
                  during each removal) instead of at random moments
  fuzz [--seconds N]
                  run every fuzz target for N seconds (default 60)
  bench [--quick] [--reps N] [--dir DIR] [--out FILE] [--micro] [--dry-run]
                  the standard dcp bench set (release, --json), a summary table
                  and the issue's targets; --micro adds cargo bench -p dcp-core
  gpu-check [--gib N]
                  on an NVIDIA GPU: dcp-cuda's GPU tests, then dcp staging of
                  N GiB (default 1) of device tensors against a plain pinned
                  device-to-host copy (target >= 0.8), and device loads against a
                  plain pinned host-to-device copy; fails without a GPU";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test-matrix") => test_matrix(&args[1..]),
        Some("ci") if args.len() == 1 => ci(),
        Some("bench") => bench::bench(&args[1..]),
        Some("crash") => crash(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("gpu-check") => gpu::gpu_check(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The value of `--flag N` in `args`, or `default`. Every argument must be
/// one of `--trials`, `--seed`, `--seconds` followed by its value.
fn flag_u64(args: &[String], flag: &str, default: u64) -> Result<u64, String> {
    let mut value = default;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if !["--trials", "--seed", "--seconds"].contains(&a.as_str()) {
            return Err(format!("unknown argument {a}"));
        }
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        let n = v.parse().map_err(|_| format!("{a}: not a number: {v}"))?;
        if a == flag {
            value = n;
        }
    }
    Ok(value)
}

#[cfg(test)]
mod flag_tests {
    use super::flag_u64;

    #[test]
    fn flags() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let args = a(&["--trials", "100", "--seed", "11"]);
        assert_eq!(flag_u64(&args, "--trials", 5), Ok(100));
        assert_eq!(flag_u64(&args, "--seed", 1), Ok(11));
        assert_eq!(flag_u64(&a(&[]), "--seconds", 60), Ok(60));
        assert!(flag_u64(&a(&["--trials"]), "--trials", 5).is_err());
        assert!(flag_u64(&a(&["--bogus", "1"]), "--trials", 5).is_err());
        assert!(flag_u64(&a(&["--seed", "x"]), "--seed", 5).is_err());
    }
}

/// `cargo xtask crash`: the crash harness with many trials.
fn crash(args: &[String]) -> Result<bool, String> {
    let aimed = args.iter().any(|a| a == "--aimed");
    let args: Vec<String> = args.iter().filter(|a| *a != "--aimed").cloned().collect();
    let trials = flag_u64(&args, "--trials", 500)?;
    let seed = flag_u64(&args, "--seed", 1)?;
    let mut cmd = cargo();
    cmd.args(["test", "--release", "-p", "dcp-tests", "--test", "crash"]);
    if aimed {
        cmd.arg("aimed_sigkill");
    }
    let status = cmd
        .args(["--", "--nocapture"])
        .env("DCP_CRASH_TRIALS", trials.to_string())
        .env("DCP_CRASH_AIMED_TRIALS", trials.to_string())
        .env("DCP_CRASH_SEED", seed.to_string())
        .status()
        .map_err(|e| format!("run cargo: {e}"))?;
    Ok(status.success())
}

/// `cargo xtask fuzz`: every fuzz target for a while.
fn fuzz(args: &[String]) -> Result<bool, String> {
    let seconds = flag_u64(args, "--seconds", 60)?;
    let status = Command::new("bash")
        .arg(root().join("fuzz/run.sh"))
        .arg(seconds.to_string())
        .current_dir(root().join("fuzz"))
        .status()
        .map_err(|e| format!("run fuzz/run.sh: {e}"))?;
    Ok(status.success())
}

/// The workspace root (the directory above `xtask/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us (cargo sets `CARGO`), or `cargo` from `PATH`.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Combinations tested besides every feature alone, none and all: the
/// feature sets users of the crate ask for most (package, flags).
const EXTRA_COMBINATIONS: &[(&str, &[&str])] = &[
    // The facade as `dcp = "0.1"`: local paths, compression, checksums.
    ("dcp", &[]),
    // ... and S3, as the `dcp` command builds it.
    ("dcp", &["--features", "s3"]),
];

/// One `cargo test` invocation of the matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Combination {
    package: String,
    /// Feature flags; empty for the plain run (default features).
    flags: Vec<String>,
    /// Whether the package has features (for the label of a plain run).
    has_features: bool,
}

impl Combination {
    fn args(&self) -> Vec<String> {
        let mut a = vec!["test".to_string(), "-p".to_string(), self.package.clone()];
        a.extend(self.flags.iter().cloned());
        a
    }

    fn label(&self) -> String {
        if self.flags.is_empty() && self.has_features {
            format!("{} (default features)", self.package)
        } else if self.flags.is_empty() {
            format!("{} (no features)", self.package)
        } else {
            format!("{} {}", self.package, self.flags.join(" "))
        }
    }
}

/// The matrix for the workspace members described by `cargo metadata
/// --format-version 1 --no-deps`, in the order cargo lists them.
fn combinations(metadata: &Value) -> Result<Vec<Combination>, String> {
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .ok_or("cargo metadata has no workspace_members")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata has no packages")?;
    let mut out = Vec::new();
    for p in packages {
        let id = p["id"].as_str().unwrap_or_default();
        if !members.contains(&id) {
            continue;
        }
        let name = p["name"].as_str().ok_or("a package without a name")?;
        let mut features: Vec<&str> = p["features"]
            .as_object()
            .map(|f| f.keys().map(String::as_str).collect())
            .unwrap_or_default();
        features.retain(|f| *f != "default");
        features.sort_unstable();
        let combo = |flags: &[&str]| Combination {
            package: name.to_string(),
            flags: flags.iter().map(|s| s.to_string()).collect(),
            has_features: !features.is_empty(),
        };
        if features.is_empty() {
            out.push(combo(&[]));
            continue;
        }
        out.push(combo(&["--no-default-features"]));
        for f in &features {
            out.push(combo(&["--no-default-features", "--features", f]));
        }
        out.push(combo(&["--all-features"]));
        for (_, flags) in EXTRA_COMBINATIONS.iter().filter(|(p, _)| *p == name) {
            out.push(combo(flags));
        }
    }
    Ok(out)
}

fn cargo_metadata() -> Result<Value, String> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo metadata failed ({})", out.status));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))
}

fn test_matrix(args: &[String]) -> Result<bool, String> {
    let mut dry_run = false;
    let mut only: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dry-run" => dry_run = true,
            "-p" | "--package" => only.push(
                it.next()
                    .ok_or_else(|| format!("{a} needs a crate name"))?
                    .clone(),
            ),
            other => return Err(format!("test-matrix: unknown argument {other:?}\n{USAGE}")),
        }
    }
    let mut combos = combinations(&cargo_metadata()?)?;
    if !only.is_empty() {
        for name in &only {
            if !combos.iter().any(|c| &c.package == name) {
                return Err(format!("no workspace crate named {name}"));
            }
        }
        combos.retain(|c| only.contains(&c.package));
    }
    if dry_run {
        for c in &combos {
            println!("cargo {}", c.args().join(" "));
        }
        return Ok(true);
    }
    let mut failed = Vec::new();
    for c in &combos {
        let started = Instant::now();
        let out = cargo()
            .args(c.args())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        let secs = started.elapsed().as_secs_f64();
        if out.status.success() {
            println!("PASS  {:<60} {secs:>7.1}s", c.label());
        } else {
            println!("FAIL  {:<60} {secs:>7.1}s", c.label());
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                println!("      | {l}");
            }
            failed.push(c);
        }
    }
    println!();
    if failed.is_empty() {
        println!("test-matrix: all {} combinations passed", combos.len());
        Ok(true)
    } else {
        println!(
            "test-matrix: {} of {} combinations failed:",
            failed.len(),
            combos.len()
        );
        for c in failed {
            println!("  cargo {}", c.args().join(" "));
        }
        Ok(false)
    }
}

/// The commands CI runs, in order.
const CI_STEPS: &[&[&str]] = &[
    &["fmt", "--all", "--check"],
    &["clippy", "--all-targets", "--", "-D", "warnings"],
    &["test"],
];

fn ci() -> Result<bool, String> {
    for step in CI_STEPS {
        let line = format!("cargo {}", step.join(" "));
        eprintln!("==> {line}");
        let status = cargo()
            .args(*step)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            eprintln!("ci: FAILED: {line} ({status})");
            return Ok(false);
        }
    }
    eprintln!("ci: all steps passed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(metadata: Value, expected: &[&str]) {
        let got: Vec<String> = combinations(&metadata)
            .unwrap()
            .iter()
            .map(|c| c.args().join(" "))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn matrix_of_crates_with_and_without_features() {
        check(
            json!({
                "workspace_members": ["path+file:///w/a#0.1.0", "path+file:///w/b#0.1.0"],
                "packages": [
                    {"id": "path+file:///w/a#0.1.0", "name": "a", "features": {}},
                    {"id": "path+file:///w/b#0.1.0", "name": "b",
                     "features": {"default": ["zstd"], "zstd": [], "crc": ["dep:crc32c"]}},
                    {"id": "registry+x#c@1.0.0", "name": "not-a-member", "features": {"x": []}}
                ]
            }),
            &[
                "test -p a",
                "test -p b --no-default-features",
                "test -p b --no-default-features --features crc",
                "test -p b --no-default-features --features zstd",
                "test -p b --all-features",
            ],
        );
    }

    #[test]
    fn the_facade_gets_its_extra_combinations() {
        check(
            json!({
                "workspace_members": ["path+file:///w/dcp#0.1.0"],
                "packages": [
                    {"id": "path+file:///w/dcp#0.1.0", "name": "dcp",
                     "features": {"default": ["fs"], "fs": [], "s3": []}}
                ]
            }),
            &[
                "test -p dcp --no-default-features",
                "test -p dcp --no-default-features --features fs",
                "test -p dcp --no-default-features --features s3",
                "test -p dcp --all-features",
                "test -p dcp",
                "test -p dcp --features s3",
            ],
        );
        let plain = combinations(&json!({
            "workspace_members": ["path+file:///w/dcp#0.1.0"],
            "packages": [{"id": "path+file:///w/dcp#0.1.0", "name": "dcp",
                          "features": {"default": ["fs"], "fs": []}}]
        }))
        .unwrap();
        assert_eq!(plain[3].label(), "dcp (default features)");
    }

    #[test]
    fn malformed_metadata_is_an_error() {
        assert!(combinations(&json!({})).is_err());
    }
}
