//! `cargo xtask bench`: the standard benchmark set of `dcp bench`, run in a
//! release build with `--json`, every line kept in a JSONL file, then one
//! summary table and the targets, each marked met or missed.
//!
//! The set, with `dcp bench`'s defaults (CRC-32C on every record, verified
//! on load): the LLM model saved by 1 and by 4 ranks (sync on and off),
//! loaded into the same sharding (warm and cold) and resharded into 3 ranks
//! by columns, through dcp-fs's reader and through dcp-fsspec's on
//! `file://`; the 4-rank runs again with `--checksum none`; many small
//! tensors; an optimizer state; the save and load protocols at 16,384
//! simulated ranks (`--workload scale`, 1,024 with `--quick`). Targets are
//! judged on the default runs. `--quick` shrinks every size; `--workloads
//! many-small,optimizer` runs only those workloads' sets; `--micro` also runs
//! dcp-core's criterion micro-benchmarks (metadata codec, read planning,
//! copy kernels).

use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;

/// Options of `cargo xtask bench`.
#[derive(Debug, Default, PartialEq)]
pub struct BenchOptions {
    quick: bool,
    micro: bool,
    reps: Option<u32>,
    dir: Option<String>,
    out: Option<PathBuf>,
    dry_run: bool,
    /// Only the sets of these workloads (all when empty).
    workloads: Vec<String>,
}

/// The workloads of the standard set.
const WORKLOADS: [&str; 4] = ["llm", "many-small", "optimizer", "scale"];

/// Parse the arguments after `bench`.
pub fn parse(args: &[String]) -> Result<BenchOptions, String> {
    let mut o = BenchOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--micro" => o.micro = true,
            "--dry-run" => o.dry_run = true,
            "--reps" => {
                let v = value()?;
                o.reps = Some(
                    v.parse()
                        .ok()
                        .filter(|&r| r > 0)
                        .ok_or_else(|| format!("--reps {v}: not a positive number"))?,
                )
            }
            "--dir" => o.dir = Some(value()?),
            "--workloads" => {
                for w in value()?.split(',') {
                    if !WORKLOADS.contains(&w) {
                        return Err(format!(
                            "--workloads: unknown workload {w:?} (one of {})",
                            WORKLOADS.join(", ")
                        ));
                    }
                    o.workloads.push(w.to_string());
                }
            }
            "--out" => o.out = Some(PathBuf::from(value()?)),
            other => return Err(format!("bench: unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// The `dcp bench` argument lists of the standard set.
pub fn runs(o: &BenchOptions) -> Vec<Vec<String>> {
    let reps = o.reps.unwrap_or(3).to_string();
    let (llm, small, opt, ranks): (&[&str], &[&str], &[&str], &str) = if o.quick {
        (
            &["--layers", "2", "--hidden", "1024", "--vocab", "8192"],
            &["--items", "10000"],
            &["--layers", "2", "--hidden", "512", "--vocab", "8192"],
            "1024",
        )
    } else {
        (&[], &[], &[], "16384")
    };
    let sets: Vec<Vec<&str>> = vec![
        [
            &["--workload", "llm", "--ranks", "1", "--load-ranks", "3"],
            llm,
        ]
        .concat(),
        [
            &["--workload", "llm", "--ranks", "4", "--load-ranks", "3"],
            llm,
        ]
        .concat(),
        // The variant without checksums, for the cost of verification.
        [
            &[
                "--workload",
                "llm",
                "--ranks",
                "4",
                "--load-ranks",
                "3",
                "--checksum",
                "none",
                "--scenarios",
                "save,load,reshard",
            ],
            llm,
        ]
        .concat(),
        [&["--workload", "many-small"], small].concat(),
        [&["--workload", "optimizer"], opt].concat(),
        // Staging: an asynchronous save, a save from simulated device
        // memory and a load into it (no fsync: the copies and the overlap
        // are measured).
        [
            &[
                "--workload",
                "llm",
                "--ranks",
                "4",
                "--sync",
                "0",
                "--scenarios",
                "async,device,device-load",
            ],
            llm,
        ]
        .concat(),
        // The protocols at scale (one run: no storage, the reps do not apply).
        vec![
            "--workload",
            "scale",
            "--ranks",
            ranks,
            "--chunks-per-rank",
            "1000",
        ],
    ];
    sets.into_iter()
        .filter(|s| {
            let w = s[1 + s
                .iter()
                .position(|&a| a == "--workload")
                .expect("a workload")];
            o.workloads.is_empty() || o.workloads.iter().any(|x| x == w)
        })
        .map(|s| {
            let mut a: Vec<String> = ["bench", "--json", "--reps", &reps]
                .iter()
                .chain(s.iter())
                .map(|x| x.to_string())
                .collect();
            if let Some(d) = &o.dir {
                a.extend(["--dir".to_string(), d.clone()]);
            }
            a
        })
        .collect()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"))
}

/// Run the standard set; `Ok(true)` when every run succeeded (targets
/// missed are reported, not failures).
pub fn bench(args: &[String]) -> Result<bool, String> {
    let o = parse(args)?;
    let runs = runs(&o);
    let cargo_args = |a: &[String]| {
        let mut v: Vec<String> = [
            "run",
            "--release",
            "-q",
            "-p",
            "dcp-cli",
            "--bin",
            "dcp",
            "--",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(a.iter().cloned());
        v
    };
    if o.dry_run {
        for a in &runs {
            println!("cargo {}", cargo_args(a).join(" "));
        }
        if o.micro {
            println!("cargo bench -p dcp-core --bench core");
        }
        return Ok(true);
    }
    let status = crate::cargo()
        .args(["build", "--release", "-q", "-p", "dcp-cli", "--bin", "dcp"])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building dcp (release) failed".into());
    }
    let mut lines: Vec<Value> = Vec::new();
    let mut raw = String::new();
    let mut ok = true;
    for a in &runs {
        eprintln!("==> dcp {}", a.join(" "));
        let out = crate::cargo()
            .args(cargo_args(a))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            eprintln!("bench: dcp {} failed ({})", a.join(" "), out.status);
            ok = false;
        }
        for l in text.lines().filter(|l| l.starts_with('{')) {
            match serde_json::from_str::<Value>(l) {
                Ok(v) => {
                    raw.push_str(l);
                    raw.push('\n');
                    lines.push(v);
                }
                Err(e) => eprintln!("bench: not JSON ({e}): {l}"),
            }
        }
    }
    let out = o
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("dcp-bench.jsonl"));
    if let Some(p) = out.parent() {
        let _ = std::fs::create_dir_all(p);
    }
    std::fs::write(&out, &raw).map_err(|e| format!("write {}: {e}", out.display()))?;
    println!("{}", summary(&lines));
    println!("{}", targets(&lines));
    println!("every line: {}", out.display());
    if o.micro {
        eprintln!("==> cargo bench -p dcp-core --bench core");
        let out = crate::cargo()
            .args(["bench", "-p", "dcp-core", "--bench", "core"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        ok &= out.status.success();
        println!("{}", micro_target(&text));
    }
    Ok(ok)
}

/// Seconds of the middle estimate criterion prints for `id`
/// (`time:   [1.2 ms 1.3 ms 1.4 ms]` on the line after the id, or the same
/// line when the id is short).
pub fn criterion_seconds(text: &str, id: &str) -> Option<f64> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(id));
    let first = lines.next()?;
    let line = if first.contains("time:") {
        first
    } else {
        lines.next()?
    };
    let inside = line.split('[').nth(1)?.split(']').next()?;
    let parts: Vec<&str> = inside.split_whitespace().collect();
    let (v, unit) = (parts.get(2)?.parse::<f64>().ok()?, *parts.get(3)?);
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        "ps" => 1e-12,
        _ => return None,
    };
    Some(v * scale)
}

/// The 1M-chunk metadata target from criterion's output.
pub fn micro_target(text: &str) -> String {
    match (
        criterion_seconds(text, "metadata/encode/1000000"),
        criterion_seconds(text, "metadata/decode/1000000"),
    ) {
        (Some(e), Some(d)) => format!(
            "  {} 1M-chunk metadata encode+decode < 1 s     encode {e:.3} s + decode {d:.3} s = {:.3} s",
            if e + d < 1.0 { "MET   " } else { "MISSED" },
            e + d
        ),
        _ => "  NOT RUN 1M-chunk metadata encode+decode < 1 s (no criterion result found)".into(),
    }
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

/// One table of every scenario line.
pub fn summary(lines: &[Value]) -> String {
    let mut out = format!(
        "{:<11} {:<13} {:>5} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>10}\n",
        "workload",
        "scenario",
        "ranks",
        "size",
        "dcp s",
        "raw s",
        "ratio",
        "read/size",
        "peak RSS",
        "B/chunk"
    );
    for l in lines {
        if l["workload"] == "scale" {
            out.push_str(&format!(
                "scale       {} ranks x {} chunks: save protocol {:.2} s, cached {:.1} ms, one rank's load plan {:.3} s, peak RSS {}, {:.1} B/chunk\n",
                num(l, "ranks"),
                num(l, "chunks") / num(l, "ranks").max(1.0),
                num(l, "save_plan_seconds"),
                num(l, "cached_save_plan_seconds") * 1e3,
                num(l, "load_plan_seconds"),
                bytes(num(l, "peak_rss")),
                num(l, "metadata_bytes_per_chunk"),
            ));
            continue;
        }
        if num(l, "reps") == 0.0 {
            out.push_str(&format!(
                "{:<11} {:<13} cold not available\n",
                l["workload"].as_str().unwrap_or("?"),
                l["scenario"].as_str().unwrap_or("?")
            ));
            continue;
        }
        out.push_str(&format!(
            "{:<11} {:<13} {:>5} {:>9} {:>9.3} {:>9.3} {:>6.2} {:>9.2} {:>9} {:>10.1}\n",
            l["workload"].as_str().unwrap_or("?"),
            l["scenario"].as_str().unwrap_or("?"),
            format!("{}", l["ranks"].as_u64().unwrap_or(0)),
            bytes(num(l, "bytes")),
            num(l, "seconds"),
            num(l, "raw_seconds"),
            num(l, "ratio"),
            num(l, "read_amplification"),
            bytes(num(l, "peak_rss")),
            num(l, "metadata_bytes_per_chunk"),
        ));
    }
    out
}

fn find<'a>(
    lines: &'a [Value],
    workload: &str,
    scenario: &str,
    save_ranks: Option<u64>,
) -> Option<&'a Value> {
    // Targets are judged on what users get by default: checksums on.
    lines.iter().find(|l| {
        l["workload"] == workload
            && l["checksum"] != "none"
            && l["scenario"] == scenario
            && num(l, "reps") > 0.0
            && save_ranks.is_none_or(|n| l["save_ranks"].as_u64() == Some(n))
    })
}

/// The targets, each `MET`, `MISSED` or `NOT RUN`.
pub fn targets(lines: &[Value]) -> String {
    let mut out = String::from("targets:\n");
    let mut line = |name: String, got: Option<(bool, String)>| {
        let (mark, what) = match got {
            Some((true, w)) => ("MET   ", w),
            Some((false, w)) => ("MISSED", w),
            None => ("NOT RUN", String::new()),
        };
        out.push_str(&format!("  {mark} {name:<44} {what}\n"));
    };
    for n in [1u64, 4] {
        for s in ["save", "save_nosync", "load_warm", "load_cold"] {
            let got = find(lines, "llm", s, Some(n)).map(|l| {
                let r = num(l, "ratio");
                (r >= 0.9, format!("ratio {r:.2}"))
            });
            line(format!("llm {s} {n} rank(s): ratio >= 0.9"), got);
        }
    }
    for s in ["reshard_warm", "reshard_cold"] {
        let got = find(lines, "llm", s, Some(4)).map(|l| {
            let (r, a) = (num(l, "ratio"), num(l, "read_amplification"));
            (
                r >= 0.8 && a <= 1.1,
                format!(
                    "ratio {r:.2}, read {a:.2}x the checkpoint ({} -> {} ranks)",
                    4, l["ranks"]
                ),
            )
        });
        line(format!("llm {s} 4 -> 3: ratio >= 0.8, read <= 1.1x"), got);
    }
    // Through dcp-fsspec on file:// the point is that each byte is read
    // once and buffers are lent; its speed is OpenDAL's local backend's.
    for s in ["reshard_fsspec_warm", "reshard_fsspec_cold"] {
        let got = find(lines, "llm", s, Some(4)).map(|l| {
            let (r, a) = (num(l, "ratio"), num(l, "read_amplification"));
            (
                a <= 1.1,
                format!("read {a:.2}x the checkpoint (ratio {r:.2})"),
            )
        });
        line(format!("llm {s} 4 -> 3: read <= 1.1x"), got);
    }
    for save in ["save", "save_nosync"] {
        let got = find(lines, "many-small", save, None)
            .zip(find(lines, "many-small", "load_warm", None))
            .map(|(s, l)| {
                let per =
                    (num(s, "seconds") + num(l, "seconds")) * 100_000.0 / num(s, "items").max(1.0);
                (per < 3.0, format!("{per:.2} s per 100k items"))
            });
        line(format!("many-small {save} + load_warm < 3 s / 100k"), got);
    }
    // Small items at the speed of the disk: per-item work against the raw
    // read of the same bytes (the many-small loads and reshards, the
    // optimizer's 8 -> 6 reshard from the page cache).
    for (workload, scenario, min) in [
        ("many-small", "load_warm", 0.5),
        ("many-small", "load_cold", 0.7),
        ("many-small", "reshard_warm", 0.3),
        ("many-small", "reshard_cold", 0.3),
        ("optimizer", "reshard_warm", 0.8),
    ] {
        let got = find(lines, workload, scenario, None).map(|l| {
            let r = num(l, "ratio");
            (r >= min, format!("ratio {r:.2}"))
        });
        line(format!("{workload} {scenario}: ratio >= {min}"), got);
    }
    // Per chunk at scale: the 100k-chunk checkpoint (small ones are
    // dominated by item names and the file table).
    let got = find(lines, "many-small", "save", None)
        .or_else(|| find(lines, "many-small", "save_nosync", None))
        .map(|l| {
            let b = num(l, "metadata_bytes_per_chunk");
            (
                b < 40.0,
                format!("{b:.1} B/chunk ({} chunks, many-small)", l["chunks"]),
            )
        });
    line("metadata < 40 B/chunk".to_string(), got);
    let got = find(lines, "llm", "async_save", Some(4)).map(|l| {
        let blocking = num(l, "seconds") / num(l, "raw_seconds").max(1e-9);
        let rss = num(l, "peak_rss") / num(l, "bytes").max(1.0);
        (
            blocking <= 1.2 && rss <= 2.1,
            format!("blocking {blocking:.2}x a plain copy, peak RSS {rss:.2}x the state dict"),
        )
    });
    line(
        "async_save: blocking <= 1.2x memcpy, RSS <= 2.1x".to_string(),
        got,
    );
    let got = find(lines, "llm", "device_save", Some(4)).map(|l| {
        let over = num(l, "seconds") / num(l, "raw_seconds").max(1e-9);
        (
            over <= 1.15,
            format!("{over:.2}x max(copy time, raw write)"),
        )
    });
    line(
        "device_save (simulated): <= 1.15x max(copy, write)".to_string(),
        got,
    );
    let got = find(lines, "llm", "device_load", Some(4)).map(|l| {
        let over = num(l, "seconds") / num(l, "raw_seconds").max(1e-9);
        (over <= 1.15, format!("{over:.2}x max(copy time, raw read)"))
    });
    line(
        "device_load (simulated): <= 1.15x max(copy, read)".to_string(),
        got,
    );
    // The protocols at 16,384 ranks x 1,000 chunks (judged only there).
    let at_scale = lines
        .iter()
        .find(|l| l["workload"] == "scale" && num(l, "ranks") >= 16384.0);
    let scale_target =
        |name: &str, f: &dyn Fn(&Value) -> (bool, String)| (name.to_string(), at_scale.map(f));
    for (name, got) in [
        scale_target("scale 16,384 ranks: save protocol < 10 s", &|l| {
            let s = num(l, "save_plan_seconds");
            (s < 10.0, format!("{s:.2} s"))
        }),
        scale_target("scale 16,384 ranks: peak RSS < 4 GB", &|l| {
            let b = num(l, "peak_rss");
            (b < 4e9, bytes(b))
        }),
        scale_target("scale 16,384 ranks: metadata <= 25 B/chunk", &|l| {
            let b = num(l, "metadata_bytes_per_chunk");
            (b <= 25.0, format!("{b:.1} B/chunk"))
        }),
        scale_target("scale 16,384 ranks: one rank's load plan < 1 s", &|l| {
            let s = num(l, "load_plan_seconds");
            (s < 1.0, format!("{s:.3} s"))
        }),
        scale_target("scale 16,384 ranks: cached save plan < 100 ms", &|l| {
            let s = num(l, "cached_save_plan_seconds");
            (s < 0.1, format!("{:.1} ms", s * 1e3))
        }),
    ] {
        line(name, got);
    }
    out.push_str("  (1M-chunk metadata encode+decode < 1 s: cargo xtask bench --micro)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_options_and_builds_the_set() {
        assert!(parse(&s(&["--bogus"])).is_err());
        assert!(parse(&s(&["--reps", "0"])).is_err());
        let o = parse(&s(&["--quick", "--reps", "5", "--dir", "/d"])).unwrap();
        let r = runs(&o);
        assert_eq!(r.len(), 7);
        assert!(r[6]
            .join(" ")
            .contains("--workload scale --ranks 1024 --chunks-per-rank 1000"));
        assert!(runs(&BenchOptions::default())[6]
            .join(" ")
            .contains("--ranks 16384"));
        // Only the named workloads' sets.
        let o = parse(&s(&["--workloads", "many-small,scale"])).unwrap();
        let w: Vec<String> = runs(&o).iter().map(|a| a.join(" ")).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("--workload many-small") && w[1].contains("--workload scale"));
        assert!(parse(&s(&["--workloads", "llm,bogus"]))
            .unwrap_err()
            .contains("bogus"));
        let o = parse(&s(&["--quick", "--reps", "5", "--dir", "/d"])).unwrap();
        let r = runs(&o);
        assert!(r[5]
            .join(" ")
            .contains("--scenarios async,device,device-load"));
        assert!(r.iter().all(|a| a.join(" ").contains("--json --reps 5")));
        assert!(r[1]
            .join(" ")
            .contains("--ranks 4 --load-ranks 3 --layers 2"));
        assert!(r[0].ends_with(&s(&["--dir", "/d"])));
        assert!(r[2].join(" ").contains("--checksum none"));
        assert!(runs(&BenchOptions::default())[3]
            .join(" ")
            .ends_with("many-small"));
    }

    #[test]
    fn targets_are_judged() {
        let lines = vec![
            json!({"workload": "llm", "scenario": "save", "save_ranks": 4, "ranks": 4, "reps": 3,
                   "ratio": 0.95, "bytes": 1e9, "seconds": 1.0, "raw_seconds": 0.95,
                   "metadata_bytes_per_chunk": 30.0}),
            json!({"workload": "llm", "scenario": "reshard_warm", "save_ranks": 4, "ranks": 3,
                   "reps": 3, "ratio": 0.5, "read_amplification": 1.0,
                   "metadata_bytes_per_chunk": 30.0}),
            json!({"workload": "many-small", "scenario": "save", "items": 100000, "reps": 3,
                   "seconds": 1.0, "metadata_bytes_per_chunk": 35.0}),
            json!({"workload": "many-small", "scenario": "load_warm", "items": 100000, "reps": 3,
                   "seconds": 1.5, "metadata_bytes_per_chunk": 35.0}),
            json!({"workload": "llm", "scenario": "load_cold", "save_ranks": 1, "reps": 0}),
        ];
        let mut lines = lines;
        // A run without checksums does not count towards the targets.
        lines.push(
            json!({"workload": "llm", "scenario": "reshard_cold", "save_ranks": 4,
                          "ranks": 3, "reps": 3, "ratio": 2.0, "read_amplification": 1.0,
                          "checksum": "none", "metadata_bytes_per_chunk": 30.0}),
        );
        lines.push(
            json!({"workload": "many-small", "scenario": "reshard_warm", "reps": 3,
                          "ratio": 0.31}),
        );
        lines.push(
            json!({"workload": "many-small", "scenario": "load_cold", "reps": 3,
                          "ratio": 0.69}),
        );
        let t = targets(&lines);
        assert!(
            t.contains("MET    many-small reshard_warm: ratio >= 0.3"),
            "{t}"
        );
        assert!(
            t.contains("MISSED many-small load_cold: ratio >= 0.7"),
            "{t}"
        );
        assert!(
            t.contains("NOT RUN optimizer reshard_warm: ratio >= 0.8"),
            "{t}"
        );
        assert!(t.contains("NOT RUN llm reshard_cold 4 -> 3"), "{t}");
        assert!(t.contains("MET    llm save 4 rank(s)"), "{t}");
        assert!(t.contains("MISSED llm reshard_warm 4 -> 3"), "{t}");
        assert!(t.contains("NOT RUN llm load_cold 1 rank(s)"), "{t}");
        assert!(t.contains("MET    many-small save + load_warm"), "{t}");
        assert!(t.contains("2.50 s per 100k"), "{t}");
        assert!(t.contains("MET    metadata < 40 B/chunk"), "{t}");
        assert!(t.contains("35.0 B/chunk"), "{t}");
        let crit = "metadata/encode/1000000\n                        time:   [240.1 ms 250.5 ms 260.2 ms]\n\
                    metadata/decode/1000000\n                        time:   [0.4012 s 0.4100 s 0.4200 s]\n";
        assert_eq!(
            criterion_seconds(crit, "metadata/encode/1000000"),
            Some(0.2505)
        );
        assert!(micro_target(crit).contains("MET"), "{}", micro_target(crit));
        assert!(micro_target("").contains("NOT RUN"));
        // Long ids put the estimate on the same line.
        let same = "metadata/decode/1000000 time:   [333.02 ms 352.80 ms 372.00 ms]\n";
        assert_eq!(
            criterion_seconds(same, "metadata/decode/1000000"),
            Some(0.3528)
        );
        let table = summary(&lines);
        assert!(table.contains("cold not available"), "{table}");
        assert_eq!(table.lines().count(), 1 + lines.len());

        // Scale: judged at 16,384 ranks only.
        assert!(
            t.contains("NOT RUN scale 16,384 ranks: save protocol"),
            "{t}"
        );
        lines.push(
            json!({"workload": "scale", "ranks": 16384, "chunks": 16384000,
                          "save_plan_seconds": 12.5, "cached_save_plan_seconds": 0.004,
                          "load_plan_seconds": 0.05, "peak_rss": 3.2e9,
                          "metadata_bytes_per_chunk": 13.1}),
        );
        let t = targets(&lines);
        assert!(
            t.contains("MISSED scale 16,384 ranks: save protocol < 10 s     12.50 s"),
            "{t}"
        );
        assert!(
            t.contains("MET    scale 16,384 ranks: peak RSS < 4 GB"),
            "{t}"
        );
        assert!(
            t.contains("MET    scale 16,384 ranks: cached save plan < 100 ms 4.0 ms"),
            "{t}"
        );
        let table = summary(&lines);
        assert!(
            table.contains("16384 ranks x 1000 chunks: save protocol 12.50 s"),
            "{table}"
        );
    }
}
