//! `cargo xtask gpu-check`: what a machine with an NVIDIA GPU runs, in one
//! go and in a few minutes (most of it the release build):
//!
//! 1. build dcp-cuda's tests and benchmark (release);
//! 2. probe device 0: no driver library or no device stops here, saying so
//!    (exit status 2);
//! 3. dcp-cuda's GPU tests with `DCP_CUDA_REQUIRE_GPU=1`, so none may skip;
//! 4. the `gpu_bench` example: 1 GiB of device tensors in 64 MiB chunks,
//!    dcp's staging against a plain pinned `cuMemcpyDtoHAsync` of the same
//!    bytes, target at least 0.8 (and the load direction, informational:
//!    `upload` and a whole `load_to_device` through pinned staging buffers,
//!    each against a plain pinned `cuMemcpyHtoDAsync` of the same bytes).
//!
//! Every step prints its command and time; a summary says which failed.

use std::process::Command;
use std::time::Instant;

/// Run `cargo xtask gpu-check [--gib N]`.
pub fn gpu_check(args: &[String]) -> Result<bool, String> {
    let mut gib = "1".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--gib" => gib = it.next().ok_or("--gib needs a value")?.clone(),
            other => return Err(format!("gpu-check: unknown argument {other}")),
        }
    }
    let start = Instant::now();
    let build = step(
        "build dcp-cuda (release: tests and gpu_bench)",
        &[
            "build",
            "--release",
            "-p",
            "dcp-cuda",
            "--tests",
            "--examples",
        ],
    )?;
    if !build {
        return Ok(false);
    }
    let probe = cargo_cmd(&[
        "run",
        "--release",
        "-q",
        "-p",
        "dcp-cuda",
        "--example",
        "gpu_bench",
        "--",
        "--probe",
    ]);
    if !run("probe CUDA device 0", probe)? {
        eprintln!(
            "gpu-check: FAILED: no usable GPU here (see the reason above); it needs an NVIDIA \
             GPU and its driver (libcuda.so), no CUDA toolkit"
        );
        return Err("no GPU".into());
    }
    let mut tests = cargo_cmd(&[
        "test",
        "--release",
        "-p",
        "dcp-cuda",
        "--",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    tests.env("DCP_CUDA_REQUIRE_GPU", "1");
    let tests_ok = run("dcp-cuda GPU tests (none may skip)", tests)?;
    let bench_ok = step(
        "benchmark: dcp staging vs plain pinned D2H (and device loads vs plain H2D)",
        &[
            "run",
            "--release",
            "-q",
            "-p",
            "dcp-cuda",
            "--example",
            "gpu_bench",
            "--",
            "--gib",
            &gib,
            "--chunk-mib",
            "64",
            "--threads",
            "4",
        ],
    )?;
    eprintln!(
        "gpu-check: tests {}, benchmark {} ({:.0} s in all)",
        verdict(tests_ok),
        verdict(bench_ok),
        start.elapsed().as_secs_f64()
    );
    Ok(tests_ok && bench_ok)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASSED"
    } else {
        "FAILED"
    }
}

fn cargo_cmd(args: &[&str]) -> Command {
    let mut c = crate::cargo();
    c.args(args);
    c
}

fn step(what: &str, args: &[&str]) -> Result<bool, String> {
    run(what, cargo_cmd(args))
}

fn run(what: &str, mut c: Command) -> Result<bool, String> {
    let line = format!(
        "cargo {}",
        c.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!("==> {what}: {line}");
    let t = Instant::now();
    let status = c.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    eprintln!(
        "<== {what}: {} in {:.1} s",
        if status.success() { "ok" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    Ok(status.success())
}
