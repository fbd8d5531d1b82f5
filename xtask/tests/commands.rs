//! Runs the built `xtask` binary on this workspace (only commands that do
//! not recurse into cargo builds).

use std::process::Command;

fn xtask(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

#[test]
fn dry_run_lists_the_combinations() {
    let out = xtask(&["test-matrix", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = s.lines().collect();
    for line in &lines {
        assert!(line.starts_with("cargo test -p "), "{line}");
    }
    // Every workspace member appears, each with its own combinations.
    for krate in ["dcp-core", "dcp-fs", "dcp-cli", "xtask"] {
        let prefix = format!("cargo test -p {krate}");
        assert!(
            lines
                .iter()
                .any(|l| *l == prefix || l.starts_with(&format!("{prefix} "))),
            "{krate} missing from:\n{s}"
        );
    }
    // A crate with features gets --no-default-features and --all-features.
    for l in lines.iter().filter(|l| l.ends_with(" --all-features")) {
        let krate = l.split_whitespace().nth(3).unwrap();
        let none = format!("cargo test -p {krate} --no-default-features");
        assert!(lines.contains(&none.as_str()), "{none} missing:\n{s}");
    }

    let out = xtask(&["test-matrix", "--dry-run", "-p", "dcp-core"]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.lines().all(|l| l.starts_with("cargo test -p dcp-core")),
        "{s}"
    );

    let out = xtask(&["test-matrix", "--dry-run", "-p", "no-such-crate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workspace crate named no-such-crate"));
}

#[test]
fn bench_dry_run_and_unknown_commands_are_usage_errors() {
    let out = xtask(&["bench", "--dry-run", "--quick", "--micro"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    assert_eq!(s.matches(" -- bench --json --reps 3 ").count(), 7, "{s}");
    assert!(s.contains("--scenarios async,device"), "{s}");
    assert!(s.contains("--workload scale --ranks 1024"), "{s}");
    assert!(s.contains("--checksum none"), "{s}");
    assert!(s.contains("cargo bench -p dcp-core --bench core"), "{s}");
    let out = xtask(&["bench", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument"));
    let out = xtask(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: cargo xtask"));
}
