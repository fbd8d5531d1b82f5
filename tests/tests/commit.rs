//! The commit protocol under concurrency and ambiguity: one writer at a time
//! (the lease), compare-and-swap commits, commits whose outcome is reported
//! wrongly or not at all, and cleanup that keeps the replaced checkpoint's
//! files for loads that began before the commit.
//!
//! Every interleaving here is forced with channels inside `FileSystemLayer`s
//! (each wait has a deadline), never with sleeps.

use dcp_core::layer::FileSystemLayer;
use dcp_core::{
    DType, Error, ErrorKind, FileSystem, LeaseInfo, Metadata, ReaderOptions, SaveResult,
    WriterOptions, LEASE_FILE,
};
use dcp_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const WORLD: usize = 3;
/// The longest any test waits for another party; reaching it fails the test.
const DEADLINE: Duration = Duration::from_secs(60);

fn model(seed: u64) -> Model {
    Model {
        seed,
        ..Default::default()
    }
    .tensor("w", DType::F32, &[30, 8], Sharding::Rows)
    .tensor("g", DType::BF16, &[12, 12], Sharding::Grid)
    .tensor("r", DType::I32, &[7], Sharding::Replicated)
    .bytes("step", 8, false)
}

fn opts() -> WriterOptions {
    fast_writer().thread_count(2)
}

fn names(md: &Metadata) -> Vec<String> {
    md.files.iter().map(|f| f.name.clone()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Wait for a signal from a blocking storage call, off the async workers.
async fn wait_for(rx: Receiver<()>, what: &'static str) {
    tokio::task::spawn_blocking(move || {
        rx.recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"))
    })
    .await
    .unwrap();
}

/// A gate inside a storage call: the first call that matches signals
/// `reached`, then waits for `go` (at most [`DEADLINE`], then fails).
#[derive(Debug)]
struct Gate {
    passed: AtomicBool,
    reached: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
}

impl Gate {
    /// The gate, the receiver of `reached` and the sender of `go`.
    fn new() -> (Arc<Gate>, Receiver<()>, Sender<()>) {
        let (reached_tx, reached_rx) = channel();
        let (go_tx, go_rx) = channel();
        let gate = Arc::new(Gate {
            passed: AtomicBool::new(false),
            reached: Mutex::new(reached_tx),
            go: Mutex::new(go_rx),
        });
        (gate, reached_rx, go_tx)
    }

    fn hold(&self, what: &str) -> dcp_core::Result<()> {
        if self.passed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let _ = self.reached.lock().unwrap().send(());
        self.go
            .lock()
            .unwrap()
            .recv_timeout(DEADLINE)
            .map_err(|_| Error::new(ErrorKind::Io, format!("test gate at {what} never opened")))
    }
}

/// Holds the save at the write of `.metadata`: every data file is written
/// and the lease is held.
#[derive(Debug)]
struct HoldCommit {
    inner: Arc<dyn FileSystem>,
    gate: Arc<Gate>,
}

impl FileSystemLayer for HoldCommit {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> dcp_core::Result<()> {
        if name == ".metadata" {
            self.gate.hold("the commit")?;
        }
        self.inner.write_atomic(name, data, sync)
    }
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> dcp_core::Result<bool> {
        if name == ".metadata" {
            self.gate.hold("the commit")?;
        }
        self.inner.replace_if(name, data, sync, expected)
    }
}

/// Signals `busy` the first time a lease cannot be created (it is held).
#[derive(Debug)]
struct NoticeBusy {
    inner: Arc<dyn FileSystem>,
    busy: Mutex<Option<Sender<()>>>,
}

impl FileSystemLayer for NoticeBusy {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create_new(&self, name: &str, data: &[u8], sync: bool) -> dcp_core::Result<bool> {
        let created = self.inner.create_new(name, data, sync)?;
        if name == LEASE_FILE && !created {
            if let Some(tx) = self.busy.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
        Ok(created)
    }
}

/// Start saving `m` through `fs` on its own tasks.
fn spawn_save(
    fs: Arc<dyn FileSystem>,
    o: WriterOptions,
    m: &Model,
) -> tokio::task::JoinHandle<Vec<dcp_core::Result<SaveResult>>> {
    let sds = m.state_dicts(WORLD);
    tokio::spawn(async move { save_ranks(fs, o, sds).await })
}

/// Save A is held after writing its data files; save B, meanwhile, is
/// refused at once naming A, and has written nothing. A then commits, and
/// the location holds A's checkpoint, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_save_is_refused_while_the_first_holds_the_lease() {
    let (m0, ma, mb) = (model(1), model(2), model(3));
    for backend in backends() {
        if !backend.checks_conditions("a_second_save_is_refused_while_the_first_holds_the_lease") {
            continue;
        }
        let what = backend.name();
        let store = backend.make_fs("race-refused");
        let first = save_model(store.fs(), &m0, WORLD, opts()).await;
        let (gate, reached, go) = Gate::new();
        let held: Arc<dyn FileSystem> = Arc::new(HoldCommit {
            inner: store.fs(),
            gate,
        });
        let a = spawn_save(held, opts(), &ma);
        wait_for(reached, "save A reaching its commit").await;

        let lease = LeaseInfo::decode(&store.read_raw(LEASE_FILE).expect("A holds the lease"))
            .expect("a lease");
        assert_eq!(lease.pid, std::process::id(), "{what}");
        let files_before_b = store.names();
        let errs = all_err(
            save_ranks(store.fs(), opts(), mb.state_dicts(WORLD)).await,
            "save B while A holds the lease",
        );
        for e in &errs {
            assert_error(
                e,
                ErrorKind::Busy,
                &[
                    "rank 0: ",
                    "another save is writing to",
                    &format!("save {}", lease.save_id),
                    &format!("pid {}", lease.pid),
                    &format!("on host {}", lease.host),
                    &format!("started at {} ms", lease.started_ms),
                ],
            );
        }
        assert_eq!(
            store.names(),
            files_before_b,
            "{what}: B wrote or removed something"
        );

        go.send(()).unwrap();
        let a = all_ok(a.await.unwrap(), "save A");
        let md = a[0].metadata.clone();
        assert_eq!(md.save_id, lease.save_id, "{what}");
        assert_eq!(md.generation, first[0].metadata.generation + 1, "{what}");
        assert_eq!(store.metadata(), *md, "{what}");
        assert_eq!(
            store.data_files(),
            sorted([names(&md), names(&first[0].metadata)].concat()),
            "{what}: A's files and the replaced checkpoint's"
        );
        assert!(!store.names().contains(&LEASE_FILE.to_string()), "{what}");
        load_and_check(
            store.fresh_fs(),
            &ma,
            WORLD,
            2,
            ReaderOptions::default(),
            &|_| Sharding::Rows,
        )
        .await;
    }
}

/// With `lease_wait`, save B waits while A holds the lease, then commits
/// over A's checkpoint: the location ends with B's checkpoint, and A's
/// files (the replaced generation) are kept, the one before removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_save_with_lease_wait_waits_then_commits_after_the_first() {
    let (m0, ma, mb) = (model(1), model(2), model(3));
    for backend in backends() {
        if !backend
            .checks_conditions("a_second_save_with_lease_wait_waits_then_commits_after_the_first")
        {
            continue;
        }
        let what = backend.name();
        let store = backend.make_fs("race-wait");
        let first = save_model(store.fs(), &m0, WORLD, opts()).await;
        let (gate, reached, go) = Gate::new();
        let held: Arc<dyn FileSystem> = Arc::new(HoldCommit {
            inner: store.fs(),
            gate,
        });
        let a = spawn_save(held, opts(), &ma);
        wait_for(reached, "save A reaching its commit").await;

        let (busy_tx, busy_rx) = channel();
        let noticing: Arc<dyn FileSystem> = Arc::new(NoticeBusy {
            inner: store.fs(),
            busy: Mutex::new(Some(busy_tx)),
        });
        let b = spawn_save(noticing, opts().lease_wait(Some(DEADLINE)), &mb);
        wait_for(busy_rx, "save B finding the lease held").await;
        assert_eq!(
            store.metadata(),
            *first[0].metadata,
            "{what}: nothing committed yet"
        );
        go.send(()).unwrap();

        let a = all_ok(a.await.unwrap(), "save A");
        let b = all_ok(b.await.unwrap(), "save B");
        let (mda, mdb) = (a[0].metadata.clone(), b[0].metadata.clone());
        assert_eq!(mda.generation, first[0].metadata.generation + 1, "{what}");
        assert_eq!(
            mdb.generation,
            mda.generation + 1,
            "{what}: B started from A"
        );
        assert_eq!(store.metadata(), *mdb, "{what}");
        assert_eq!(
            sorted(b[0].removed.clone()),
            sorted(names(&first[0].metadata)),
            "{what}: B removed the generation before A"
        );
        assert_eq!(
            store.data_files(),
            sorted([names(&mda), names(&mdb)].concat()),
            "{what}"
        );
        load_and_check(
            store.fresh_fs(),
            &mb,
            WORLD,
            2,
            ReaderOptions::default(),
            &|_| Sharding::Rows,
        )
        .await;
    }
}

/// A lease whose holder is dead is broken and the save proceeds: expired,
/// or held by a process of this host that no longer exists, or by a save
/// of this process that ended. A live one (this host's parent process,
/// another host's unexpired lease) is not: the save fails, or waits and
/// then fails, naming the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_leases_are_broken_and_live_ones_are_not() {
    let m = model(4);
    let dead_pid = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let host = LeaseInfo::local_host();
    let lease = |save_id: &str, host: &str, pid: u32, expires_ms: u64| LeaseInfo {
        save_id: save_id.into(),
        host: host.into(),
        pid,
        started_ms: now_ms() - 5_000,
        expires_ms,
    };
    let far = now_ms() + 3_600_000;
    for backend in backends() {
        if !backend.checks_conditions("stale_leases_are_broken_and_live_ones_are_not") {
            continue;
        }
        let what = backend.name();
        let store = backend.make_fs("stale");
        save_model(store.fs(), &m, WORLD, opts()).await;
        for (dead, why) in [
            (
                lease("00000000000000e1", "another-host.invalid", 1, now_ms() - 1),
                "expired",
            ),
            (lease("00000000000000e2", &host, dead_pid, far), "dead pid"),
            (
                lease("00000000000000e3", &host, std::process::id(), far),
                "ended save",
            ),
        ] {
            store.write_raw(LEASE_FILE, dead.encode());
            let saved = save_model(store.fs(), &m, WORLD, opts()).await;
            assert_eq!(store.metadata(), *saved[0].metadata, "{what}: {why}");
            assert_eq!(store.read_raw(LEASE_FILE), None, "{what}: {why}: released");
        }
        let before = store.read_raw(".metadata").unwrap();
        let parent = std::os::unix::process::parent_id();
        for (live, wait) in [
            (lease("00000000000000a1", &host, parent, far), None),
            (
                lease("00000000000000a2", "another-host.invalid", 1, far),
                Some(Duration::from_millis(50)),
            ),
        ] {
            store.write_raw(LEASE_FILE, live.encode());
            let errs = all_err(
                save_ranks(
                    store.fs(),
                    opts().lease_wait(wait),
                    m.reseeded(9).state_dicts(WORLD),
                )
                .await,
                "save over a live lease",
            );
            let waited = if wait.is_some() {
                "waited"
            } else {
                "another save"
            };
            for e in &errs {
                assert_error(
                    e,
                    ErrorKind::Busy,
                    &[
                        &format!(
                            "save {} of pid {} on host {}",
                            live.save_id, live.pid, live.host
                        ),
                        waited,
                    ],
                );
            }
            assert_eq!(
                store.read_raw(LEASE_FILE),
                Some(live.encode()),
                "{what}: not broken"
            );
            assert_eq!(store.read_raw(".metadata").unwrap(), before, "{what}");
        }
        store.remove_raw(LEASE_FILE);
    }
}

/// How a layer makes the commit ambiguous.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ambiguity {
    /// Local disk's `write_atomic` with sync: the rename is done, then the
    /// directory fsync fails (`EIO`).
    DirSyncFailsAfterRename,
    /// The write took effect, then an error (an S3 PUT stored, its reply
    /// lost).
    WrittenThenError,
    /// As `WrittenThenError`, and `.metadata` cannot be read back.
    WrittenThenUnreadable,
    /// The write did not happen, and `.metadata` cannot be read back.
    NotWrittenThenUnreadable,
}

#[derive(Debug)]
struct Ambiguous {
    inner: Arc<dyn FileSystem>,
    how: Ambiguity,
    attempted: AtomicBool,
}

impl Ambiguous {
    /// The commit's write of `.metadata` (`write`, given whether to sync),
    /// made ambiguous as `self.how` says.
    fn commit(
        &self,
        sync: bool,
        write: impl FnOnce(bool) -> dcp_core::Result<bool>,
    ) -> dcp_core::Result<bool> {
        self.attempted.store(true, Ordering::SeqCst);
        match self.how {
            Ambiguity::DirSyncFailsAfterRename => {
                // LocalFs's own order: temp file, fsync, rename; then the
                // directory fsync, which fails here.
                if !write(false)? {
                    return Ok(false);
                }
                assert!(sync, "the test saves with sync_files on");
                Err(Error::io(
                    "fsync directory",
                    &self.inner.location(),
                    std::io::Error::from_raw_os_error(5),
                ))
            }
            Ambiguity::WrittenThenError | Ambiguity::WrittenThenUnreadable => {
                if !write(sync)? {
                    return Ok(false);
                }
                Err(Error::new(
                    ErrorKind::Io,
                    "put .metadata: injected: connection reset after the PUT was stored",
                )
                .with_temporary(true))
            }
            Ambiguity::NotWrittenThenUnreadable => Err(Error::new(
                ErrorKind::Io,
                "put .metadata: injected: connection reset",
            )),
        }
    }
}

impl FileSystemLayer for Ambiguous {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> dcp_core::Result<()> {
        if name != ".metadata" {
            return self.inner.write_atomic(name, data, sync);
        }
        self.commit(sync, |s| {
            self.inner.write_atomic(name, data, s).map(|()| true)
        })
        .map(|_| ())
    }
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> dcp_core::Result<bool> {
        if name != ".metadata" {
            return self.inner.replace_if(name, data, sync, expected);
        }
        self.commit(sync, |s| self.inner.replace_if(name, data, s, expected))
    }
    fn read_small(&self, name: &str, max_len: u64) -> dcp_core::Result<Vec<u8>> {
        let unreadable = matches!(
            self.how,
            Ambiguity::WrittenThenUnreadable | Ambiguity::NotWrittenThenUnreadable
        );
        if name == ".metadata" && unreadable && self.attempted.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Io,
                "read .metadata: injected: connection reset",
            ));
        }
        self.inner.read_small(name, max_len)
    }
}

/// A commit that took effect but reported an error is a success (the
/// error is logged); one that cannot be decided is `OutcomeUnknown`, keeps
/// every file, and whichever `.metadata` is present loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_commits_are_resolved_from_what_metadata_holds() {
    let (m0, m1, m2) = (model(5), model(6), model(7));
    for backend in backends() {
        for how in [
            Ambiguity::DirSyncFailsAfterRename,
            Ambiguity::WrittenThenError,
            Ambiguity::WrittenThenUnreadable,
            Ambiguity::NotWrittenThenUnreadable,
        ] {
            let what = format!("{} {how:?}", backend.name());
            let store = backend.make_fs("ambiguous");
            let first = save_model(store.fs(), &m0, WORLD, opts()).await;
            let old = first[0].metadata.clone();
            let fs: Arc<dyn FileSystem> = Arc::new(Ambiguous {
                inner: store.fs(),
                how,
                attempted: AtomicBool::new(false),
            });
            let o = opts().sync_files(how == Ambiguity::DirSyncFailsAfterRename);
            let results = save_ranks(fs, o, m1.state_dicts(WORLD)).await;
            match how {
                Ambiguity::DirSyncFailsAfterRename | Ambiguity::WrittenThenError => {
                    let saved = all_ok(results, &what);
                    let md = saved[0].metadata.clone();
                    assert_eq!(md.generation, old.generation + 1, "{what}");
                    assert_eq!(store.metadata(), *md, "{what}");
                    assert_eq!(
                        store.data_files(),
                        sorted([names(&md), names(&old)].concat()),
                        "{what}"
                    );
                    load_and_check(
                        store.fresh_fs(),
                        &m1,
                        WORLD,
                        2,
                        ReaderOptions::default(),
                        &|_| Sharding::Rows,
                    )
                    .await;
                }
                Ambiguity::WrittenThenUnreadable | Ambiguity::NotWrittenThenUnreadable => {
                    let errs = all_err(results, &what);
                    for e in &errs {
                        assert_error(
                            e,
                            ErrorKind::OutcomeUnknown,
                            &[
                                "rank 0: ",
                                "commit",
                                "outcome is unknown",
                                "every data file was kept",
                                "injected",
                            ],
                        );
                        assert_eq!(e.message(), errs[0].message(), "{what}: ranks agree");
                    }
                    // Every file of both saves is still there.
                    let now = store.metadata();
                    let written = (how == Ambiguity::WrittenThenUnreadable) as u64;
                    assert_eq!(now.generation, old.generation + written, "{what}");
                    let files = store.data_files();
                    for f in names(&old).iter().chain(&names(&now)) {
                        assert!(files.contains(f), "{what}: {f} was removed");
                    }
                    assert!(
                        files.len() > old.files.len(),
                        "{what}: the new save's files were removed"
                    );
                    assert!(!store.names().contains(&LEASE_FILE.to_string()), "{what}");
                    let present = if written == 1 { &m1 } else { &m0 };
                    load_and_check(
                        store.fresh_fs(),
                        present,
                        WORLD,
                        2,
                        ReaderOptions::default(),
                        &|_| Sharding::Rows,
                    )
                    .await;
                    // The next save commits over whichever it finds, and
                    // removes the undecided save's files only if they are
                    // neither its own nor the replaced checkpoint's.
                    let next = save_model(store.fs(), &m2, WORLD, opts()).await;
                    assert_eq!(next[0].metadata.generation, now.generation + 1, "{what}");
                    assert_eq!(
                        store.data_files(),
                        sorted([names(&next[0].metadata), names(&now)].concat()),
                        "{what}"
                    );
                }
            }
        }
    }
}

/// Holds a load at its first look at a data file (after it read
/// `.metadata`).
#[derive(Debug)]
struct HoldLoad {
    inner: Arc<dyn FileSystem>,
    gate: Arc<Gate>,
}

impl FileSystemLayer for HoldLoad {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn file_len(&self, name: &str) -> dcp_core::Result<Option<u64>> {
        if dcp_core::is_data_file_name(name) {
            self.gate.hold("the load")?;
        }
        self.inner.file_len(name)
    }
}

fn spawn_load(
    fs: Arc<dyn FileSystem>,
    m: &Model,
) -> tokio::task::JoinHandle<Vec<dcp_core::Result<dcp_core::LoadResult>>> {
    let dests = vec![m.dest(0, 1, WORLD, &|_| Sharding::Rows)];
    tokio::spawn(async move { load_ranks(fs, ReaderOptions::default(), dests).await })
}

/// A commit keeps the replaced checkpoint's files: a load that read the
/// old `.metadata` before the commit completes, byte for byte. The commit
/// after that removes them, and a load still reading them fails with a
/// clear "checkpoint replaced during load", never mixed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_keeps_the_previous_generation_for_loads_in_flight() {
    let gens: Vec<Model> = (10..14).map(model).collect();
    for backend in backends() {
        let what = backend.name();
        let store = backend.make_fs("inflight");
        let g1 = save_model(store.fs(), &gens[0], WORLD, opts()).await;

        // A load of generation 1 begins, then generation 2 commits.
        let (gate, reached, go) = Gate::new();
        let load = spawn_load(
            Arc::new(HoldLoad {
                inner: store.fs(),
                gate,
            }),
            &gens[0],
        );
        wait_for(reached, "the load reading generation 1").await;
        let g2 = save_model(store.fs(), &gens[1], WORLD, opts()).await;
        assert!(g2[0].removed.is_empty(), "{what}: {:?}", g2[0].removed);
        go.send(()).unwrap();
        let loaded = all_ok(load.await.unwrap(), "the load begun before the commit");
        gens[0].check(&loaded[0].state_dict, WORLD);
        assert_eq!(loaded[0].metadata.save_id, g1[0].metadata.save_id, "{what}");

        // A load of generation 2 begins; generations 3 and 4 commit, the
        // second removing generation 2's files.
        let (gate, reached, go) = Gate::new();
        let load = spawn_load(
            Arc::new(HoldLoad {
                inner: store.fs(),
                gate,
            }),
            &gens[1],
        );
        wait_for(reached, "the load reading generation 2").await;
        let g3 = save_model(store.fs(), &gens[2], WORLD, opts()).await;
        assert_eq!(
            sorted(g3[0].removed.clone()),
            sorted(names(&g1[0].metadata)),
            "{what}"
        );
        let g4 = save_model(store.fs(), &gens[3], WORLD, opts()).await;
        assert_eq!(
            sorted(g4[0].removed.clone()),
            sorted(names(&g2[0].metadata)),
            "{what}"
        );
        assert_eq!(
            store.data_files(),
            sorted([names(&g3[0].metadata), names(&g4[0].metadata)].concat()),
            "{what}"
        );
        go.send(()).unwrap();
        let errs = all_err(load.await.unwrap(), "the load whose files were removed");
        assert_error(
            &errs[0],
            ErrorKind::NotFound,
            &[
                "checkpoint replaced during load",
                &format!("began with save {} (generation 2)", g2[0].metadata.save_id),
                &format!("now holds save {} (generation 4)", g4[0].metadata.save_id),
            ],
        );
    }
}

/// A save whose starting checkpoint changed under it (here: replaced by
/// hand while it held the lease, as a writer that ignores leases would)
/// commits nothing and removes only its own files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_over_a_changed_checkpoint_is_refused() {
    let (m0, m1, m2) = (model(20), model(21), model(22));
    for backend in backends() {
        if !backend.checks_conditions("a_commit_over_a_changed_checkpoint_is_refused") {
            continue;
        }
        let what = backend.name();
        let store = backend.make_fs("cas");
        save_model(store.fs(), &m0, WORLD, opts()).await;
        save_model(store.fs(), &m1, WORLD, opts()).await;
        let committed = store.read_raw(".metadata").unwrap();

        // B begins (lease, base = A's), then .metadata changes under it.
        let (gate, reached, go) = Gate::new();
        let held: Arc<dyn FileSystem> = Arc::new(HoldBeforeCompare {
            inner: store.fs(),
            gate,
            seen: AtomicBool::new(false),
        });
        let files_before = store.data_files();
        let b = spawn_save(held, opts(), &m2);
        wait_for(reached, "save B reaching its commit").await;
        let mut other = Metadata::decode(&committed).unwrap();
        other.save_id = "00000000000000cc".into();
        other.generation += 5;
        store.write_raw(".metadata", other.encode().unwrap());
        go.send(()).unwrap();
        let errs = all_err(b.await.unwrap(), "save B over a changed checkpoint");
        for e in &errs {
            assert_error(
                e,
                ErrorKind::Busy,
                &[
                    "changed while save",
                    "now holds save 00000000000000cc",
                    "nothing was committed",
                ],
            );
        }
        assert_eq!(store.metadata(), other, "{what}");
        assert_eq!(
            store.data_files(),
            files_before,
            "{what}: B removed only its own files"
        );
    }
}

/// Holds the save at its commit's compare: the conditional write of
/// `.metadata` where the store has one, else the commit's read of it.
#[derive(Debug)]
struct HoldBeforeCompare {
    inner: Arc<dyn FileSystem>,
    gate: Arc<Gate>,
    seen: AtomicBool,
}

impl FileSystemLayer for HoldBeforeCompare {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn read_small(&self, name: &str, max_len: u64) -> dcp_core::Result<Vec<u8>> {
        // The first `.metadata` read is `begin`'s; the second is the
        // compare in the commit.
        if name == ".metadata" && self.seen.swap(true, Ordering::SeqCst) {
            self.gate.hold("the compare")?;
        }
        self.inner.read_small(name, max_len)
    }
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> dcp_core::Result<bool> {
        // Where the store compares (a conditional write), that is the
        // compare.
        if name == ".metadata" {
            self.gate.hold("the compare")?;
        }
        self.inner.replace_if(name, data, sync, expected)
    }
}

/// A save with `overwrite(false)` that waited for the lease is refused
/// when the holder committed a checkpoint meanwhile: the check is repeated
/// under the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_false_is_checked_again_under_the_lease() {
    let (ma, mb) = (model(30), model(31));
    for backend in backends() {
        if !backend.checks_conditions("overwrite_false_is_checked_again_under_the_lease") {
            continue;
        }
        let what = backend.name();
        let store = backend.make_fs("wait-no-overwrite");
        let (gate, reached, go) = Gate::new();
        let held: Arc<dyn FileSystem> = Arc::new(HoldCommit {
            inner: store.fs(),
            gate,
        });
        let a = spawn_save(held, opts(), &ma);
        wait_for(reached, "save A reaching its commit").await;
        let (busy_tx, busy_rx) = channel();
        let noticing: Arc<dyn FileSystem> = Arc::new(NoticeBusy {
            inner: store.fs(),
            busy: Mutex::new(Some(busy_tx)),
        });
        let b = spawn_save(
            noticing,
            opts().overwrite(false).lease_wait(Some(DEADLINE)),
            &mb,
        );
        wait_for(busy_rx, "save B finding the lease held").await;
        go.send(()).unwrap();
        let a = all_ok(a.await.unwrap(), "save A");
        for e in all_err(b.await.unwrap(), "save B") {
            assert_error(&e, ErrorKind::AlreadyExists, &["rank 0: ", "overwrite"]);
        }
        assert_eq!(store.metadata(), *a[0].metadata, "{what}");
        assert_eq!(store.data_files(), sorted(names(&a[0].metadata)), "{what}");
        assert!(!store.names().contains(&LEASE_FILE.to_string()), "{what}");
    }
}
