//! How the `dcp` command looks to people and to scripts: progress bars on a
//! terminal (run under a pseudo-terminal with util-linux `script`) and
//! nothing extra when stderr is piped or with `--quiet`; the inspect table;
//! `--help` of every subcommand with an example; errors with their causes
//! and exit statuses; `--log` / `RUST_LOG` tracing.

use std::path::Path;
use std::process::{Command, Output};

const DCP: &str = env!("CARGO_BIN_EXE_dcp");
const SMALL: &[&str] = &["--layers", "2", "--hidden", "64", "--vocab", "96"];

fn dcp(args: &[&str]) -> Output {
    let out = Command::new(DCP)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run dcp");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "dcp panicked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Whether a CI run (`CI` set to anything but empty, 0, false).
fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// A small demo checkpoint at `dir`.
fn demo_checkpoint(dir: &Path) {
    let mut args = vec!["demo", "--dir", path_str(dir), "--save-only", "--quiet"];
    args.extend_from_slice(SMALL);
    let o = dcp(&args);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// Whether util-linux `script` runs; otherwise a SKIPPED notice, or a
/// panic under CI.
fn script_available() -> bool {
    let ok = Command::new("script")
        .args(["-qefc", "true", "/dev/null"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !under_ci(),
            "util-linux `script` is missing and CI is set: the terminal tests cannot run"
        );
        eprintln!("SKIPPED: util-linux `script` is not available; the terminal tests did not run");
    }
    ok
}

/// Run `cmd` (a shell command line) under a pseudo-terminal: stdin, stdout
/// and stderr are the terminal. Returns the exit status and everything the
/// terminal received.
fn on_terminal(cmd: &str) -> (Option<i32>, String) {
    let o = Command::new("script")
        .args(["-qefc", cmd, "/dev/null"])
        .env_remove("RUST_LOG")
        .env("TERM", "xterm-256color")
        .env("COLUMNS", "120")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script");
    (o.status.code(), text(&o.stdout))
}

/// An indicatif bar as drawn: the label, the bar's brackets with its `=`
/// and `>` fill, the byte counts; redrawn in place with `ESC[2K`.
fn has_bar(transcript: &str, label: &str) -> bool {
    transcript.contains(label)
        && transcript.contains("\x1b[2K")
        && transcript
            .lines()
            .chain(transcript.split('\r'))
            .any(|l| l.contains(label) && l.contains(" [") && l.contains("B/"))
}

/// Under a terminal every command that moves bytes draws its bar on
/// stderr; with stderr piped (or `--quiet`) nothing but the result is
/// written, and stdout never carries a bar.
#[test]
fn bars_render_on_a_terminal_and_stay_out_of_pipes() {
    if !script_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let d = path_str(tmp.path());

    // demo: save and load bars.
    let (code, t) = on_terminal(&format!(
        "{DCP} demo --dir {d}/ck --ranks 2 --load-ranks 3 {}",
        SMALL.join(" ")
    ));
    assert_eq!(code, Some(0), "{t}");
    assert!(has_bar(&t, "saving"), "a save bar: {t:?}");
    assert!(has_bar(&t, "loading"), "a load bar: {t:?}");
    assert!(t.contains("verified"), "{t:?}");

    // verify, export, import, dcp-to-dcp.
    for (cmd, label) in [
        (format!("{DCP} verify {d}/ck"), "verifying"),
        (
            format!("{DCP} convert {d}/ck --to-safetensors {d}/hf"),
            "exporting",
        ),
        (
            format!("{DCP} convert {d}/hf --to-dcp {d}/imported --ranks 2"),
            "importing",
        ),
        (
            format!("{DCP} convert {d}/ck --to-dcp {d}/resharded --ranks 3"),
            "converting",
        ),
    ] {
        let (code, t) = on_terminal(&cmd);
        assert_eq!(code, Some(0), "{cmd}: {t}");
        assert!(has_bar(&t, label), "{cmd}: a {label} bar: {t:?}");
        assert!(t.contains("ok: "), "{cmd}: {t:?}");
    }

    // --quiet on a terminal: the result line only, no bar, no escape.
    let (code, t) = on_terminal(&format!("{DCP} verify --quiet {d}/ck"));
    assert_eq!(code, Some(0), "{t}");
    assert!(t.starts_with("ok: "), "{t:?}");
    assert!(!t.contains("verifying") && !t.contains('\x1b'), "{t:?}");

    // stderr to a file, stdout on the terminal: no bar anywhere.
    let (code, t) = on_terminal(&format!("{DCP} verify {d}/ck 2>{d}/err.txt"));
    assert_eq!(code, Some(0), "{t}");
    assert!(!t.contains("verifying") && !t.contains('\x1b'), "{t:?}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("err.txt")).unwrap(),
        ""
    );

    // Both piped (a plain child process): stderr empty, stdout the result.
    for args in [
        vec!["verify", path_str(&ck)],
        vec!["convert", path_str(&ck), "--to-dcp", &format!("{d}/piped")],
    ] {
        let o = dcp(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        assert_eq!(text(&o.stderr), "", "{args:?}");
        let out = text(&o.stdout);
        assert!(out.starts_with("ok: ") && !out.contains('\x1b'), "{out:?}");
    }
}

/// `dcp inspect` on a terminal prints the table (header row, one row per
/// item, totals); piped, the same text.
#[test]
fn the_inspect_table_renders_on_a_terminal() {
    if !script_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    demo_checkpoint(&ck);
    let (code, t) = on_terminal(&format!("{DCP} inspect {}", path_str(&ck)));
    assert_eq!(code, Some(0), "{t}");
    let header = t
        .lines()
        .find(|l| l.starts_with("ITEM "))
        .unwrap_or_else(|| panic!("no table header: {t}"));
    for col in [
        "KIND",
        "DTYPE",
        "SHAPE",
        "CHUNKS",
        "BYTES",
        "STORED",
        "TRANSFORMS",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(t.contains("compression ratio"), "{t}");
    assert!(t.contains("layers.0.attn.q.weight"), "{t}");
    let piped = text(&dcp(&["inspect", path_str(&ck)]).stdout);
    assert_eq!(
        t.replace("\r\n", "\n"),
        piped,
        "the same text on a terminal and piped"
    );
}

/// `dcp --help` and every subcommand's `--help` end with examples that run
/// that subcommand.
#[test]
fn every_help_has_an_example() {
    use clap::CommandFactory;
    let top = dcp(&["--help"]);
    assert!(top.status.success());
    let t = text(&top.stdout);
    assert!(t.contains("Examples:\n  dcp "), "{t}");
    let mut seen = 0;
    for sub in dcp_cli::Cli::command().get_subcommands() {
        let name = sub.get_name();
        let o = dcp(&[name, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{name}");
        let h = text(&o.stdout);
        assert!(
            h.contains(&format!("Examples:\n  dcp {name}")),
            "dcp {name} --help has no example:\n{h}"
        );
        // The global flags are offered everywhere.
        assert!(h.contains("--quiet") && h.contains("--log <LEVEL>"), "{h}");
        seen += 1;
    }
    assert!(seen >= 6, "{seen} subcommands");
}

/// A failure: `error: WHAT` then one `  caused by:` line per cause, exit
/// 1, nothing on stdout, nothing left at OUT. A usage error: exit 2.
#[test]
fn errors_give_their_causes_and_exit_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let d = path_str(tmp.path());

    // A safetensors header that lies: the file and the problem, as a cause.
    let bad = tmp.path().join("bad.safetensors");
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&bad, &b).unwrap();
    let out = format!("{d}/out");
    let o = dcp(&["convert", path_str(&bad), "--to-dcp", &out]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(lines.len(), 2, "{e}");
    assert_eq!(
        lines[0],
        format!(
            "error: cannot convert {} to a dcp checkpoint at {out}",
            bad.display()
        )
    );
    assert!(lines[1].starts_with("  caused by: "), "{e}");
    assert!(
        lines[1].contains("bad.safetensors") && lines[1].contains("does not fit"),
        "{e}"
    );
    assert!(text(&o.stdout).is_empty());
    assert!(!Path::new(&out).exists(), "nothing written at OUT");

    // No checkpoint at the source.
    let o = dcp(&[
        "convert",
        &format!("{d}/none"),
        "--to-safetensors",
        &format!("{d}/hf"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(e.starts_with("error: cannot convert "), "{e}");
    assert!(
        e.contains("\n  caused by: ") && e.contains(".metadata is missing"),
        "{e}"
    );

    // A plain failure without causes stays one line.
    let o = dcp(&["verify", &format!("{d}/none")]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(text(&o.stderr).lines().count(), 1, "{}", text(&o.stderr));

    // Usage errors: exit 2, clap's message naming the argument.
    for (args, says) in [
        (vec!["convert", d], "--to-dcp"),
        (
            vec!["--log", "dcp=loud", "inspect", d],
            "is not a log level",
        ),
        (
            vec![
                "convert",
                d,
                "--to-safetensors",
                "x",
                "--max-shard-size",
                "5XB",
            ],
            "unknown unit",
        ),
        (vec!["inspect"], "<PATH>"),
    ] {
        let o = dcp(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            text(&o.stderr).contains(says),
            "{args:?}: {}",
            text(&o.stderr)
        );
    }
}

/// `--log LEVEL` and `RUST_LOG` turn tracing on (on stderr; stdout keeps
/// the result only); `--log` wins over `RUST_LOG`; by default nothing.
#[test]
fn log_and_rust_log_trace_to_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    demo_checkpoint(&ck);
    let run = |args: &[&str], rust_log: Option<&str>| {
        let mut c = Command::new(DCP);
        c.args(args).env_remove("RUST_LOG");
        if let Some(v) = rust_log {
            c.env("RUST_LOG", v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(text(&o.stdout).starts_with("ok: "), "{}", text(&o.stdout));
        text(&o.stderr)
    };
    let p = path_str(&ck);
    let quiet = run(&["verify", p], None);
    assert_eq!(quiet, "");
    let debug = run(&["--log", "debug", "verify", p], None);
    assert!(
        debug.contains("DEBUG") && debug.contains("opened location"),
        "{debug}"
    );
    assert!(
        debug.contains("INFO") && debug.contains("verifying"),
        "{debug}"
    );
    let info = run(&["verify", p, "--log", "info"], None);
    assert!(
        info.contains("verifying") && !info.contains("DEBUG"),
        "{info}"
    );
    let env = run(&["verify", p], Some("dcp_cli=debug"));
    assert!(env.contains("opened location"), "{env}");
    let overridden = run(&["--log", "error", "verify", p], Some("debug"));
    assert_eq!(overridden, "", "--log wins over RUST_LOG");
}

/// Tracing output while a bar is drawn (`--log debug` during a save and a
/// load) is written around the bar: every log line starts on a line of its
/// own (the bar cleared first), never after a bar's text.
#[test]
fn log_lines_do_not_tear_a_bar() {
    if !script_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    let (code, t) = on_terminal(&format!(
        "{DCP} --log debug demo --dir {} --ranks 2 --load-ranks 2",
        path_str(&ck)
    ));
    assert_eq!(code, Some(0), "{t}");
    let segs: Vec<&str> = t.split(['\r', '\n']).collect();
    let is_bar = |l: &str| l.contains(" [") && l.contains("B/");
    let first = segs.iter().position(|l| is_bar(l)).expect("a bar drawn");
    let last = segs.iter().rposition(|l| is_bar(l)).expect("a bar drawn");
    let during: Vec<&str> = segs[first..last]
        .iter()
        .copied()
        .filter(|l| l.contains("DEBUG") || l.contains("INFO"))
        .collect();
    assert!(!during.is_empty(), "log lines while the bar was drawn: {t}");
    for l in during {
        let level = l.find("DEBUG").or_else(|| l.find("INFO")).unwrap();
        assert!(!is_bar(&l[..level]), "a log line after a bar's text: {l:?}");
    }
}
