//! Crash safety of the commit protocol.
//!
//! * `sigkill_during_save_leaves_old_or_new`: a child process
//!   (`dcp-crash-child`) saves generation `g + 1` over generation `g` in a
//!   local directory with 2 to 4 ranks and `sync_files` on, and is killed with
//!   SIGKILL after a random delay spread over the whole save. The directory
//!   must then load as exactly generation `g` or exactly `g + 1`, bit for bit
//!   and with every record's checksum verified, and every later successful
//!   save must leave only the files its `.metadata` references. Trials:
//!   `DCP_CRASH_TRIALS` (default 50); seed: `DCP_CRASH_SEED`.
//! * `aimed_sigkill_at_every_commit_and_cleanup_step`: the child numbers its
//!   storage operations (`dcp_testkit::StepFs`) and pauses at a chosen step;
//!   the parent SIGKILLs it there: before and after the data files' first
//!   create and finish, the directory sync, the `.metadata` rename, the
//!   cleanup's listing and each of its removals. A kill before the rename
//!   must leave exactly the old generation, any later one exactly the new.
//!   Rounds: `DCP_CRASH_AIMED_TRIALS` (default one round).
//! * `fault_at_every_operation_leaves_old_or_new`: in process, over
//!   [`FaultFs`], fail each operation of a save's sequence in turn (every
//!   create, write, finish, directory sync, atomic write, list and remove a
//!   clean save performs), plus short writes and a full disk, and check the
//!   same promise, and that every rank returns the same error naming the
//!   failing rank.

#[path = "../src/bin/crash_common/mod.rs"]
mod crash_common;

use crash_common::{model, registry, save_gen, world_of, GEN_KEY};
use dcp_core::mem::MemoryFs;
use dcp_core::metadata::Metadata;
use dcp_core::{load, Error, FileSystem, FileSystemReader, ReaderOptions, Single, StateDict};
use dcp_testkit::{Fault, FaultFs, Op};
use dcp_tests::Sharding;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD: &str = env!("CARGO_BIN_EXE_dcp-crash-child");

fn spawn_child(dir: &Path, g: u64) -> Child {
    Command::new(CHILD)
        .arg(dir)
        .arg(g.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dcp-crash-child")
}

/// The whole stderr of an exited child.
fn stderr_of(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut err);
    }
    err
}

/// Wait for `child` to exit, at most 120 s (then kill it and panic).
fn wait_bounded(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: a save hung for 120 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Run the child to completion (bounded); panics unless it exits 0.
fn run_child(dir: &Path, g: u64) -> Duration {
    let start = Instant::now();
    let mut child = spawn_child(dir, g);
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                use std::io::Read;
                let _ = s.read_to_string(&mut err);
            }
            assert!(
                status.success(),
                "save of generation {g} failed: {status}: {err}"
            );
            return start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("save of generation {g} hung for 120 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Load everything in the checkpoint of `fs` on one rank, verify every
/// checksum and every byte against the generation its metadata names, and
/// check every data file with `verify`. Returns the generation.
fn check_checkpoint(fs: Arc<dyn FileSystem>, allowed: &[u64], what: &str) -> u64 {
    let raw = fs
        .read_small(".metadata", 1 << 30)
        .unwrap_or_else(|e| panic!("{what}: no loadable .metadata: {e}"));
    let md = Metadata::decode(&raw).unwrap_or_else(|e| panic!("{what}: bad .metadata: {e}"));
    let g: u64 = md
        .user
        .get(GEN_KEY)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: .metadata has no generation"));
    assert!(
        allowed.contains(&g),
        "{what}: checkpoint holds generation {g}, expected one of {allowed:?}"
    );
    // Every record carries the checksum.
    assert_eq!(md.transforms, vec!["crc32c/1".to_string()], "{what}");
    assert!(md.records().all(|(_, _, s)| s.transforms.len() == 1));
    // Files present with their recorded lengths, every checksum good.
    let report = dcp_core::verify::verify(fs.as_ref(), &md, &registry(), true, 2)
        .unwrap_or_else(|e| panic!("{what}: verify failed: {e}"));
    assert!(
        report.is_sound(),
        "{what}: generation {g}: {:?}",
        report.problems
    );
    assert_eq!(report.checksummed_records as usize, md.record_count());
    // Bit-exact load of every item against the generator.
    let m = model(g);
    let saved_world = md.world_size as usize;
    let dest = m.dest(0, 1, saved_world, &|_| Sharding::Full);
    let reader = FileSystemReader::new(
        fs,
        ReaderOptions::default()
            .registry(registry())
            .verify_checksums(true),
    );
    let loaded = dcp_core::local::block_on(load(dest, &reader, &Single))
        .expect("no runtime here")
        .unwrap_or_else(|e| panic!("{what}: load of generation {g} failed: {e}"));
    assert_eq!(loaded.state_dict.len(), m.tensors.len() + 1 + saved_world);
    m.check(&loaded.state_dict, saved_world);
    g
}

/// Assert the location holds `.metadata`, exactly the data files it
/// references, and those of `previous` (the checkpoint the save replaced,
/// kept until the next commit so a load that began before it completes):
/// nothing left by killed or failed saves, nor by older generations.
fn assert_no_stale(names: Vec<String>, md: &Metadata, previous: Option<&Metadata>, what: &str) {
    let got: BTreeSet<String> = names.into_iter().collect();
    let mut want: BTreeSet<String> = md.files.iter().map(|f| f.name.clone()).collect();
    want.extend(
        previous
            .iter()
            .flat_map(|p| p.files.iter().map(|f| f.name.clone())),
    );
    want.insert(".metadata".into());
    assert_eq!(
        got, want,
        "{what}: files other than the checkpoint's remain"
    );
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list checkpoint dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn local(dir: &Path) -> Arc<dyn FileSystem> {
    Arc::new(dcp_fs::LocalFs::new(dir))
}

fn decode_md(dir: &Path) -> Metadata {
    Metadata::decode(&std::fs::read(dir.join(".metadata")).expect(".metadata")).expect("decodes")
}

#[test]
fn sigkill_during_save_leaves_old_or_new() {
    let trials: usize = std::env::var("DCP_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("DCP_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xdc9_c4a5);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().join("ckpt");
    let started = Instant::now();

    // Generation 0, then an uninterrupted save of 1 to measure the span
    // over which kills are spread.
    run_child(&dir, 0);
    assert_eq!(check_checkpoint(local(&dir), &[0], "generation 0"), 0);
    assert_no_stale(dir_names(&dir), &decode_md(&dir), None, "generation 0");
    let mut span = Duration::ZERO;
    for g in 1..=2 {
        let before = decode_md(&dir);
        span = span.max(run_child(&dir, g));
        assert_eq!(check_checkpoint(local(&dir), &[g], "clean save"), g);
        assert_no_stale(
            dir_names(&dir),
            &decode_md(&dir),
            Some(&before),
            "clean save",
        );
    }
    let max_delay = span.mul_f64(1.2);
    eprintln!("crash: an uninterrupted save takes {span:?}; kills spread over 0..{max_delay:?}");

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut g = 2u64;
    let (mut kept_old, mut got_new, mut completed) = (0usize, 0usize, 0usize);
    let mut max_stale = 0usize;
    let (mut rival_won, mut rival_refused) = (0usize, 0usize);
    for t in 0..trials {
        let delay = Duration::from_micros(rng.random_range(0..=max_delay.as_micros() as u64));
        // Every other trial, a rival save of generation g + 2, started
        // with the first and ready to save, is let go at a random moment
        // before the kill, and the kill waits for it to end. It is refused
        // while the first holds the lease; it commits when it comes before
        // (the first is then refused) or after the first.
        let rival_at = (t % 2 == 1)
            .then(|| Duration::from_micros(rng.random_range(0..=delay.as_micros() as u64)));
        let before = decode_md(&dir);
        let mut ready = rival_at.map(|_| {
            Command::new(CHILD)
                .arg(&dir)
                .arg((g + 2).to_string())
                .env("DCP_CRASH_WAIT_STDIN", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn the rival save")
        });
        let started_at = Instant::now();
        let mut child = spawn_child(&dir, g + 1);
        let mut rival = None;
        if let (Some(at), Some(mut r)) = (rival_at, ready.take()) {
            std::thread::sleep(at);
            use std::io::Write;
            r.stdin
                .take()
                .expect("piped stdin")
                .write_all(b"go\n")
                .expect("start the rival save");
            let status = wait_bounded(&mut r, "the rival save");
            rival = Some((r, status));
        }
        std::thread::sleep(delay.saturating_sub(started_at.elapsed()));
        let what =
            format!("trial {t} (seed {seed:#x}, kill after {delay:?}, rival at {rival_at:?})");
        let finished = match child.try_wait().expect("poll child") {
            Some(status) => {
                let err = stderr_of(&mut child);
                assert!(
                    status.success()
                        || (rival.is_some() && err.contains("another save is writing")),
                    "{what}: child failed: {status}: {err}"
                );
                status.success()
            }
            None => {
                child.kill().expect("SIGKILL the child");
                let status = child.wait().expect("reap child");
                // It may have exited just before the kill landed.
                status.success()
            }
        };
        let rival_ok = rival.map(|(mut r, status)| {
            let err = stderr_of(&mut r);
            assert!(
                status.success() || err.contains("another save is writing"),
                "{what}: the rival failed, but not refused: {status}: {err}"
            );
            if status.success() {
                rival_won += 1;
            } else {
                rival_refused += 1;
            }
            status.success()
        });
        let allowed: &[u64] = match rival_ok {
            Some(true) => &[g + 1, g + 2],
            Some(false) | None => &[g, g + 1],
        };
        let now = check_checkpoint(local(&dir), allowed, &what);
        let md = decode_md(&dir);
        assert_eq!(md.world_size as usize, world_of(now), "{what}");
        let extra = dir_names(&dir).len() - md.files.len() - 1;
        max_stale = max_stale.max(extra);
        if finished && rival_ok != Some(true) {
            assert_eq!(now, g + 1, "{what}: a completed save must be visible");
            // A successful save leaves nothing of the killed ones before it.
            assert_no_stale(dir_names(&dir), &md, Some(&before), &what);
            completed += 1;
        } else if now == g {
            kept_old += 1;
        } else if now == g + 1 {
            got_new += 1;
        }
        g = now;
    }
    // The next successful save removes whatever the last killed one left.
    let before = decode_md(&dir);
    run_child(&dir, g + 1);
    let md = decode_md(&dir);
    assert_eq!(check_checkpoint(local(&dir), &[g + 1], "final save"), g + 1);
    assert_no_stale(dir_names(&dir), &md, Some(&before), "final save");
    eprintln!(
        "crash: {trials} SIGKILL trials in {:?}: {kept_old} killed before the commit (old kept), \
         {got_new} killed after the commit (new), {completed} completed; rival saves in half of \
         them: {rival_refused} refused, {rival_won} committed; at most {max_stale} stale files \
         between saves, none after a successful save; 0 lost checkpoints",
        started.elapsed()
    );
    if trials >= 20 {
        assert!(
            kept_old > 0,
            "no kill landed before the commit: the delays do not cover the save"
        );
        assert!(
            got_new + completed > 0,
            "no save ever committed: the delays are too short"
        );
    }
}

// ---------------------------------------------------------------------------
// Aimed kills: SIGKILL at a chosen step of the save
// ---------------------------------------------------------------------------

/// How an aimed trial ended.
enum Aimed {
    /// The child paused at the step and was killed there: the step line,
    /// whether `.metadata` had been written by then (the rename done), and
    /// whether the rival save committed while it was paused.
    Killed(String, bool, bool),
    /// The child exited without reaching the step.
    Exited(std::process::ExitStatus),
}

/// A second save of generation `g` into `dir`, run to its end (bounded)
/// while another save of `holder_pid` is paused: refused naming the holder
/// and changing nothing, when that save holds the location's lease; or,
/// when it has not taken it yet (paused before breaking a dead save's
/// lease), committed. Returns whether it committed.
fn rival_save(dir: &Path, g: u64, holder_pid: u32, what: &str) -> bool {
    let names = dir_names(dir);
    let out = Command::new(CHILD)
        .arg(dir)
        .arg(g.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run the rival save");
    if out.status.success() {
        return true;
    }
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("another save is writing to") && err.contains(&format!("pid {holder_pid}")),
        "{what}: the rival save failed, but not refused naming pid {holder_pid}: {}: {err}",
        out.status
    );
    // The paused save's other ranks and threads may still create files;
    // the refused save itself writes nothing.
    let holder = err
        .split("another save is writing to ")
        .nth(1)
        .and_then(|rest| rest.split(": save ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{what}: no holder in {err}"));
    for n in dir_names(dir) {
        assert!(
            names.contains(&n) || n.contains(&format!("-{holder}.")),
            "{what}: {n} appeared, and is not the holder's (save {holder}): {err}"
        );
    }
    false
}

/// Run the child saving `g` into `dir`, paused at `key`
/// (`{op}:{nth}:{before|after}`), and SIGKILL it there. While it is paused
/// there, a rival save of `rival` runs ([`rival_save`]). Bounded: panics if neither a pause nor an exit comes
/// within 120 s.
fn run_aimed(dir: &Path, g: u64, key: &str, rival: u64) -> Aimed {
    use std::io::BufRead;
    let mut child = Command::new(CHILD)
        .arg(dir)
        .arg(g.to_string())
        .env("DCP_CRASH_PAUSE", key)
        .env("DCP_CRASH_STEPS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dcp-crash-child");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut said = Vec::new();
    let out = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("paused at") => {
                let rival_committed = rival_save(dir, rival, child.id(), key);
                child.kill().expect("SIGKILL the child");
                let status = child.wait().expect("reap child");
                assert!(!status.success(), "{key}: a paused child exited 0");
                let renamed = |l: &String| {
                    l.contains(" WriteAtomic:") && l.contains(":after ") && l.ends_with(".metadata")
                };
                let committed = said.iter().any(renamed) || renamed(&line);
                break Aimed::Killed(line, committed, rival_committed);
            }
            Ok(line) => said.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("reap child");
                assert!(status.success(), "{key}: child failed: {status}: {said:?}");
                break Aimed::Exited(status);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{key}: the child neither paused nor exited within 120 s: {said:?}");
            }
        }
    };
    let _ = reader.join();
    out
}

fn data_files_in(dir: &Path) -> usize {
    dir_names(dir)
        .iter()
        .filter(|n| dcp_core::checkpoint::is_data_file_name(n))
        .count()
}

#[test]
fn aimed_sigkill_at_every_commit_and_cleanup_step() {
    let want_trials: usize = std::env::var("DCP_CRASH_AIMED_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = tmp.path().join("ckpt");
    let started = Instant::now();
    run_child(&dir, 0);
    run_child(&dir, 1);
    let mut g = check_checkpoint(local(&dir), &[1], "generation 1");
    // Kills before the commit's rename keep the old generation; the rest
    // show the new one (decided from the steps the child reported). After
    // the first kill, every save first breaks the killed save's lease, with
    // a conditional replace of it (`WriteAtomic:0`); its commit is then
    // `WriteAtomic:1`. The first trial (no lease to break) aims at a data
    // file.
    let before_commit = [
        "Create:0:before",
        "WriteAtomic:0:before",
        "WriteAtomic:0:after",
        "Finish:0:after",
        "SyncDir:0:before",
        "SyncDir:0:after",
        "WriteAtomic:1:before",
    ];
    let after_commit = ["WriteAtomic:1:after", "List:0:before", "List:0:after"];
    // Removals: the files of the generation before the one replaced (4 to
    // 8), the lease's release.
    let removals = data_files_in(&dir) + 1;
    let mut hits: std::collections::BTreeMap<String, usize> = Default::default();
    let (mut trials, mut kept_old, mut got_new, mut planted) = (0usize, 0usize, 0usize, 0usize);
    let mut rivals = 0usize;
    loop {
        let mut targets: Vec<String> = Vec::new();
        targets.extend(before_commit.iter().map(|k| k.to_string()));
        targets.extend(after_commit.iter().map(|k| k.to_string()));
        for i in 0..removals {
            targets.push(format!("Remove:{i}:before"));
            targets.push(format!("Remove:{i}:after"));
        }
        for key in targets {
            if let Some(i) = key
                .strip_prefix("Remove:")
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse::<usize>().ok())
            {
                // Make sure the cleanup has an (i + 1)-th file to remove:
                // orphans as a killed save leaves them.
                while data_files_in(&dir) <= i {
                    std::fs::write(
                        dir.join(format!("__9_{planted}-{:016x}.dcp", 0xdead_0000 + planted)),
                        b"orphan of a killed save",
                    )
                    .expect("plant an orphan");
                    planted += 1;
                }
            }
            let what = format!("aimed kill at {key} while saving generation {}", g + 1);
            let (commits, rival) = match run_aimed(&dir, g + 1, &key, g + 2) {
                Aimed::Killed(line, committed, rival) => {
                    assert!(line.contains(&key), "{what}: paused elsewhere: {line}");
                    *hits.entry(key.clone()).or_default() += 1;
                    (committed, rival)
                }
                Aimed::Exited(status) => panic!("{what}: the step was never reached ({status})"),
            };
            assert!(!(commits && rival), "{what}: both saves committed");
            let expect = match (commits, rival) {
                (_, true) => {
                    rivals += 1;
                    g + 2
                }
                (true, false) => g + 1,
                (false, false) => g,
            };
            let now = check_checkpoint(local(&dir), &[expect], &what);
            let md = decode_md(&dir);
            assert_eq!(md.world_size as usize, world_of(now), "{what}");
            if commits {
                got_new += 1;
            } else if !rival {
                kept_old += 1;
            }
            g = now;
            trials += 1;
        }
        if trials >= want_trials {
            break;
        }
    }
    // The next successful save removes whatever the kills left (it keeps the
    // checkpoint it replaces until the commit after it).
    let before = decode_md(&dir);
    run_child(&dir, g + 1);
    let md = decode_md(&dir);
    assert_eq!(check_checkpoint(local(&dir), &[g + 1], "final save"), g + 1);
    assert_no_stale(dir_names(&dir), &md, Some(&before), "final save");
    let every = before_commit.len() + after_commit.len() + 2 * removals;
    assert_eq!(hits.len(), every, "every step aimed at: {hits:?}");
    eprintln!(
        "crash (aimed): {trials} SIGKILLs at {every} distinct steps in {:?}, a rival save run at \
         each: {kept_old} before the .metadata rename (old kept), {got_new} after it (new), \
         {rivals} where the rival committed (the killed save had not taken the lease); \
         {planted} orphans planted for the later removals; 0 mixes; hits {hits:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// In process: a fault at every operation index
// ---------------------------------------------------------------------------

const FAULT_WORLD: usize = 3;

struct Gens {
    cache: HashMap<u64, Arc<Vec<StateDict>>>,
}

impl Gens {
    fn get(&mut self, g: u64) -> Arc<Vec<StateDict>> {
        self.cache
            .entry(g)
            .or_insert_with(|| Arc::new(model(g).state_dicts(FAULT_WORLD)))
            .clone()
    }
}

/// The generation in a location (no full check: see `check_checkpoint`).
fn gen_of(fs: &dyn FileSystem) -> u64 {
    let md = Metadata::decode(&fs.read_small(".metadata", 1 << 30).expect(".metadata"))
        .expect("decodes");
    md.user[GEN_KEY].parse().expect("generation")
}

/// The committed metadata of `fs`; panics if there is none.
fn metadata_in(fs: &dyn FileSystem) -> Metadata {
    Metadata::decode(&fs.read_small(".metadata", 1 << 30).expect(".metadata")).expect("decodes")
}

/// The in-process sweeps' backends: `fs` (a local directory under `tmp`)
/// or `memory` (a `MemoryFs` named after `label`).
fn backend_fs(backend: &str, tmp: &Path, label: &str) -> Arc<dyn FileSystem> {
    match backend {
        "fs" => local(&tmp.join("ckpt")),
        _ => Arc::new(MemoryFs::new(format!("memory://{label}"))),
    }
}

fn names_of(fs: &dyn FileSystem) -> Vec<String> {
    fs.list()
        .expect("list")
        .into_iter()
        .map(|f| f.name)
        .collect()
}

#[test]
fn fault_at_every_operation_leaves_old_or_new() {
    let started = Instant::now();
    let mut gens = Gens {
        cache: HashMap::new(),
    };
    let mut summary = Vec::new();
    for backend in ["fs", "memory"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let inner = backend_fs(backend, tmp.path(), "faults");
        let faulty = FaultFs::new(inner.clone());
        let ffs: Arc<dyn FileSystem> = Arc::new(faulty.clone());

        // Generation 0, then a clean save of 1 counted operation by operation.
        for r in save_gen(ffs.clone(), gens.get(0), 0) {
            r.expect("clean save of generation 0");
        }
        faulty.reset();
        let gen0 = metadata_in(inner.as_ref());
        for r in save_gen(ffs.clone(), gens.get(1), 1) {
            r.expect("clean save of generation 1");
        }
        let ops = [
            Op::Create,
            Op::Write,
            Op::Finish,
            Op::SyncDir,
            Op::WriteAtomic,
            Op::List,
            Op::Remove,
        ];
        let counts: Vec<(Op, u64)> = ops.iter().map(|&op| (op, faulty.count(op))).collect();
        faulty.reset();
        assert_eq!(check_checkpoint(inner.clone(), &[1], "clean save"), 1);
        assert_no_stale(
            names_of(inner.as_ref()),
            &metadata_in(inner.as_ref()),
            Some(&gen0),
            "clean save",
        );

        let mut faults: Vec<Fault> = Vec::new();
        for &(op, n) in &counts {
            assert!(n > 0, "a clean save performs no {op:?}");
            faults.extend((0..n).map(|nth| Fault::FailNth { op, nth }));
        }
        let writes = counts[1].1;
        faults.extend((0..writes).step_by(3).map(|nth| Fault::ShortWrite { nth }));
        let total_bytes: u64 = 1_400_000;
        faults.extend(
            [0u64, 1, 4096, 100_000, 500_000, total_bytes / 2]
                .into_iter()
                .map(|bytes| Fault::DiskFull { bytes }),
        );

        let mut g = 1u64;
        let (mut failed, mut committed, mut cleanup_only) = (0, 0, 0);
        for fault in &faults {
            faulty.reset();
            let before = metadata_in(inner.as_ref());
            faulty.arm(fault.clone());
            let results = save_gen(ffs.clone(), gens.get(g + 1), g + 1);
            faulty.reset();
            let what = format!("{backend}: {fault:?} while saving generation {}", g + 1);
            let oks = results.iter().filter(|r| r.is_ok()).count();
            if oks == results.len() {
                // Only a failure after the commit (cleanup) may let the save
                // succeed; the new generation is then complete.
                let now = check_checkpoint(inner.clone(), &[g + 1], &what);
                let md = metadata_in(inner.as_ref());
                match fault {
                    Fault::FailNth {
                        op: Op::List | Op::Remove,
                        ..
                    } => cleanup_only += 1,
                    _ => {
                        assert_no_stale(names_of(inner.as_ref()), &md, Some(&before), &what);
                        committed += 1;
                    }
                }
                g = now;
            } else {
                assert_eq!(oks, 0, "{what}: some ranks succeeded, others failed");
                let errs: Vec<Error> = results.into_iter().map(|r| r.unwrap_err()).collect();
                let first = &errs[0];
                let rank = first
                    .rank()
                    .unwrap_or_else(|| panic!("{what}: error names no rank: {first:?}"));
                assert!(rank < FAULT_WORLD, "{what}");
                let text = first.to_string();
                assert!(
                    text.contains(&format!("rank {rank}")),
                    "{what}: message does not name rank {rank}: {text}"
                );
                assert!(
                    text.contains("injected") || text.contains("no space left"),
                    "{what}: the cause is lost: {text}"
                );
                for e in &errs[1..] {
                    assert_eq!(
                        (e.kind(), e.message(), e.rank()),
                        (first.kind(), first.message(), first.rank()),
                        "{what}: ranks disagree on the error"
                    );
                }
                // The old checkpoint is intact and nothing committed.
                let now = check_checkpoint(inner.clone(), &[g], &what);
                assert_eq!(now, g);
                failed += 1;
            }
        }
        // After all that, one clean save leaves exactly its own files and
        // those of the checkpoint it replaced.
        let before = metadata_in(inner.as_ref());
        for r in save_gen(ffs.clone(), gens.get(g + 1), g + 1) {
            r.expect("final clean save");
        }
        assert_eq!(gen_of(inner.as_ref()), g + 1);
        let md = metadata_in(inner.as_ref());
        check_checkpoint(inner.clone(), &[g + 1], "final clean save");
        assert_no_stale(
            names_of(inner.as_ref()),
            &md,
            Some(&before),
            "final clean save",
        );
        summary.push(format!(
            "{backend}: {} faults ({}): {failed} failed saves kept the old checkpoint, \
             {committed} committed despite the fault, {cleanup_only} committed with a failed cleanup",
            faults.len(),
            counts
                .iter()
                .map(|(op, n)| format!("{op:?} x{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        assert!(failed > 0);
    }
    eprintln!(
        "faults in {:?}:\n  {}",
        started.elapsed(),
        summary.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// In process: fail before, fail after, and cut the power after every operation
// ---------------------------------------------------------------------------

/// How a case of the before/after/power-cut sweep ended.
#[derive(Default, Debug)]
struct SweepCounts {
    cases: usize,
    kept_old: usize,
    committed_new: usize,
    /// Failed on every rank with the new generation committed and loadable
    /// (the ambiguous outcome resolved correctly).
    ambiguous_resolved: usize,
}

/// Does `fs` hold a checkpoint of one of `allowed` that loads bit-exact and
/// verifies? `Err` with the reason when not (the checks of
/// `check_checkpoint`, without unwinding out of the sweep).
fn loads_as(
    fs: Arc<dyn FileSystem>,
    allowed: &[u64],
    what: &str,
) -> std::result::Result<u64, String> {
    let allowed = allowed.to_vec();
    let what = what.to_string();
    // The checks panic with a message naming what failed; run them on a
    // thread so a failure is a value here.
    std::thread::spawn(move || check_checkpoint(fs, &allowed, &what))
        .join()
        .map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "check panicked".into())
        })
}

/// The generation `.metadata` names, if it decodes.
fn metadata_gen(fs: &dyn FileSystem) -> Option<u64> {
    let md = Metadata::decode(&fs.read_small(".metadata", 1 << 30).ok()?).ok()?;
    md.user.get(GEN_KEY)?.parse().ok()
}

/// The operations a save performs, in the order the sweeps visit them.
const SAVE_OPS: [Op; 7] = [
    Op::Create,
    Op::Write,
    Op::Finish,
    Op::SyncDir,
    Op::WriteAtomic,
    Op::List,
    Op::Remove,
];

/// Every operation index of a clean 3-rank save, failed before it is passed
/// on, failed after it took effect, and (over `MemoryFs` with the durability
/// model) with the power cut right after it: after each, the location loads
/// as exactly the old or exactly the new checkpoint, bytes compared with the
/// generator and checksums verified.
///
/// A save whose `.metadata` took effect while it reported failure (a
/// fail-after of the commit's `write_atomic`) must leave a `.metadata` that
/// loads: the commit protocol reads it back and decides; a `.metadata`
/// naming deleted files fails the sweep.
#[test]
fn fail_before_after_and_power_cut_at_every_operation() {
    let started = Instant::now();
    let mut gens = Gens {
        cache: HashMap::new(),
    };
    let mut lines = Vec::new();
    let mut total = SweepCounts::default();
    for backend in ["fs", "memory"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (inner, faulty): (Arc<dyn FileSystem>, FaultFs) = match backend {
            "fs" => {
                let inner = local(&tmp.path().join("ckpt"));
                (inner.clone(), FaultFs::new(inner))
            }
            _ => {
                let mem = MemoryFs::new("memory://sweep");
                (Arc::new(mem.clone()), FaultFs::with_durability(mem))
            }
        };
        let ffs: Arc<dyn FileSystem> = Arc::new(faulty.clone());
        for r in save_gen(ffs.clone(), gens.get(0), 0) {
            r.expect("clean save of generation 0");
        }
        faulty.reset();
        for r in save_gen(ffs.clone(), gens.get(1), 1) {
            r.expect("clean save of generation 1");
        }
        let counts: Vec<(Op, u64)> = SAVE_OPS.iter().map(|&op| (op, faulty.count(op))).collect();
        faulty.reset();
        let mut faults = Vec::new();
        for &(op, n) in &counts {
            assert!(n > 0, "a clean save performs no {op:?}");
            for nth in 0..n {
                faults.push(Fault::FailNth { op, nth });
                faults.push(Fault::FailAfterNth { op, nth });
                if backend == "memory" {
                    faults.push(Fault::PowerCutAfterNth { op, nth });
                }
            }
        }
        let mut c = SweepCounts::default();
        let mut by_mode: HashMap<&str, usize> = HashMap::new();
        let mut g = 1u64;
        for fault in &faults {
            faulty.reset();
            faulty.arm(fault.clone());
            let results = save_gen(ffs.clone(), gens.get(g + 1), g + 1);
            let cut = matches!(fault, Fault::PowerCutAfterNth { .. });
            if cut {
                // The power may not have been cut if the save performed fewer
                // operations of that kind this time; cut it anyway.
                faulty.power_cut().expect("power cut");
            }
            faulty.reset();
            let what = format!("{backend}: {fault:?} while saving generation {}", g + 1);
            *by_mode
                .entry(match fault {
                    Fault::FailNth { .. } => "before",
                    Fault::FailAfterNth { .. } => "after",
                    _ => "power cut",
                })
                .or_default() += 1;
            c.cases += 1;
            let oks = results.iter().filter(|r| r.is_ok()).count();
            if oks == results.len() {
                // Succeeded: the new generation is there (after a power cut
                // too: the commit was durable before the save returned).
                let now = check_checkpoint(inner.clone(), &[g + 1], &what);
                c.committed_new += 1;
                g = now;
                continue;
            }
            assert_eq!(oks, 0, "{what}: some ranks succeeded, others failed");
            let errs: Vec<Error> = results.into_iter().map(|r| r.unwrap_err()).collect();
            let first = &errs[0];
            let rank = first
                .rank()
                .unwrap_or_else(|| panic!("{what}: error names no rank: {first:?}"));
            let text = first.to_string();
            assert!(
                text.contains(&format!("rank {rank}")) && text.contains("injected"),
                "{what}: the message names no rank or lost its cause: {text}"
            );
            for e in &errs[1..] {
                assert_eq!(
                    (e.kind(), e.message(), e.rank()),
                    (first.kind(), first.message(), first.rank()),
                    "{what}: ranks disagree on the error"
                );
            }
            if cut {
                // The machine died: the save could not know whether its
                // commit was durable; either generation is correct.
                let now = check_checkpoint(inner.clone(), &[g, g + 1], &what);
                if now == g {
                    c.kept_old += 1;
                } else {
                    c.committed_new += 1;
                }
                g = now;
            } else if metadata_gen(inner.as_ref()) == Some(g + 1) {
                // The commit took effect, the save reported failure.
                match loads_as(inner.clone(), &[g + 1], &what) {
                    Ok(now) => {
                        c.ambiguous_resolved += 1;
                        g = now;
                    }
                    Err(why) => panic!("{why}"),
                }
            } else {
                assert_eq!(check_checkpoint(inner.clone(), &[g], &what), g);
                c.kept_old += 1;
            }
        }
        // A clean save after all that leaves exactly its own files and those
        // of the checkpoint it replaced.
        let before = metadata_in(inner.as_ref());
        for r in save_gen(ffs.clone(), gens.get(g + 1), g + 1) {
            r.expect("final clean save");
        }
        let md = metadata_in(inner.as_ref());
        check_checkpoint(inner.clone(), &[g + 1], "final clean save");
        assert_no_stale(
            names_of(inner.as_ref()),
            &md,
            Some(&before),
            "final clean save",
        );
        let mut modes: Vec<_> = by_mode.into_iter().collect();
        modes.sort();
        lines.push(format!(
            "{backend}: {} cases ({}; ops {}): {} kept old, {} committed new, \
             {} ambiguous commits resolved",
            c.cases,
            modes
                .iter()
                .map(|(m, n)| format!("{m} x{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            counts
                .iter()
                .map(|(op, n)| format!("{op:?} x{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            c.kept_old,
            c.committed_new,
            c.ambiguous_resolved,
        ));
        total.cases += c.cases;
        total.kept_old += c.kept_old;
        total.committed_new += c.committed_new;
        total.ambiguous_resolved += c.ambiguous_resolved;
        assert!(c.kept_old > 0 && c.committed_new > 0, "{backend}: {c:?}");
    }
    eprintln!(
        "sweep in {:?}: {} cases, {} kept old, {} committed new, {} ambiguous resolved\n  {}",
        started.elapsed(),
        total.cases,
        total.kept_old,
        total.committed_new,
        total.ambiguous_resolved,
        lines.join("\n  ")
    );
    assert_eq!(
        total.cases,
        total.kept_old + total.committed_new + total.ambiguous_resolved
    );
}

/// The commit's `write_atomic` takes effect and then reports an error (on
/// local disk: the directory fsync after the rename fails; on an object
/// store: the PUT's reply is lost). The location must still hold a
/// checkpoint that loads: the new one (the outcome read back and found
/// committed) or the old one, never a `.metadata` naming deleted files.
#[test]
fn ambiguous_commit_leaves_a_loadable_checkpoint() {
    let mut gens = Gens {
        cache: HashMap::new(),
    };
    for backend in ["fs", "memory"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let inner = backend_fs(backend, tmp.path(), "ambiguous");
        let faulty = FaultFs::new(inner.clone());
        let ffs: Arc<dyn FileSystem> = Arc::new(faulty.clone());
        for r in save_gen(ffs.clone(), gens.get(0), 0) {
            r.expect("clean save of generation 0");
        }
        faulty.reset();
        faulty.arm(Fault::FailAfterNth {
            op: Op::WriteAtomic,
            nth: 0,
        });
        let results = save_gen(ffs.clone(), gens.get(1), 1);
        assert_eq!(faulty.count(Op::WriteAtomic), 1, "{backend}: one commit");
        faulty.reset();
        let what = format!("{backend}: the commit took effect and reported an error");
        let now = check_checkpoint(inner.clone(), &[0, 1], &what);
        if results.iter().all(|r| r.is_ok()) {
            assert_eq!(now, 1, "{what}: a save that succeeded must be visible");
        }
    }
}
