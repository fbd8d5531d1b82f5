//! A property test over interleavings: two saves and one load share a
//! location, and a scheduler lets exactly one storage operation run at a
//! time, choosing which actor goes next from a seeded schedule (first one
//! actor alone for its first `k` operations, for every `k`; then random).
//! After every operation it checks the location as a reader would find it:
//!
//! * a committed `.metadata` never names a missing file, a file of another
//!   length, or a file of another save (no missing or foreign file);
//! * the load returns exactly one committed checkpoint's bytes, never a mix,
//!   or fails with "checkpoint replaced during load";
//! * at the end, the location holds the checkpoint of the last save that
//!   succeeded, loads byte for byte, has no lease left, and no file of a
//!   save that failed.
//!
//! On three stores: memory and local disk (each with a conditional replace:
//! the store compares), and memory without one (dcp compares under its
//! lease).

use dcp_core::layer::FileSystemLayer;
use dcp_core::mem::MemoryFs;
use dcp_core::{
    is_data_file_name, DType, Error, ErrorKind, FileSink, FileSystem, LoadResult, Metadata,
    ReaderOptions, SaveResult, LEASE_FILE,
};
use dcp_tests::*;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Ranks of each save.
const WORLD: usize = 2;
/// The longest an operation waits for its turn; reaching it fails the test.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long the scheduler waits for a running actor to reach its next
/// operation before it grants one of the waiting ones.
const SETTLE: Duration = Duration::from_millis(3);

fn model(seed: u64) -> Model {
    Model {
        seed,
        ..Default::default()
    }
    .tensor("w", DType::F32, &[16, 6], Sharding::Rows)
    .tensor("r", DType::I16, &[5], Sharding::Replicated)
    .bytes("step", 8, false)
}

/// The actors: two saves and a load.
const SAVE_A: usize = 0;
const SAVE_B: usize = 1;
const LOAD: usize = 2;
const ACTORS: usize = 3;

/// How the scheduler picks the next operation.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    /// This actor runs alone for its first `alone` operations (while live).
    first: usize,
    alone: usize,
    /// Seed of the random choices after that.
    seed: u64,
    /// The load is held after this many operations until both saves have
    /// ended (so that it reads files that two commits replaced).
    hold_load: Option<usize>,
}

#[derive(Debug, Default)]
struct State {
    /// Waiting operations: (actor, ticket).
    pending: Vec<(usize, u64)>,
    next_ticket: u64,
    /// The operation allowed to run, and whether one is running.
    granted: Option<u64>,
    running: bool,
    live: [bool; ACTORS],
    /// Operations run per actor.
    ran: [usize; ACTORS],
    /// When `pending` or `running` last changed.
    changed: Option<Instant>,
    /// The first invariant violation seen, with the operation after which.
    violation: Option<String>,
    log: Vec<String>,
    rng: u64,
}

/// One operation at a time, in the schedule's order; checks the location
/// after each.
#[derive(Debug)]
struct Scheduler {
    state: Mutex<State>,
    cv: Condvar,
    schedule: Schedule,
    /// The store itself, for the checks (not through the scheduler).
    raw: Arc<dyn FileSystem>,
}

impl Scheduler {
    fn new(schedule: Schedule, raw: Arc<dyn FileSystem>) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            state: Mutex::new(State {
                live: [true; ACTORS],
                rng: schedule.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                ..Default::default()
            }),
            cv: Condvar::new(),
            schedule,
            raw,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` as one operation of `actor`, when its turn comes.
    fn op<T>(&self, actor: usize, what: &str, f: impl FnOnce() -> T) -> T {
        let ticket = {
            let mut s = self.lock();
            let t = s.next_ticket;
            s.next_ticket += 1;
            s.pending.push((actor, t));
            s.changed = Some(Instant::now());
            self.cv.notify_all();
            let start = Instant::now();
            while s.granted != Some(t) {
                let left = DEADLINE.saturating_sub(start.elapsed());
                assert!(
                    !left.is_zero(),
                    "actor {actor} waited {DEADLINE:?} for its turn at {what}; schedule {:?}; log:\n{}",
                    self.schedule,
                    s.log.join("\n")
                );
                s = self
                    .cv
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            s.pending.retain(|p| p.1 != t);
            t
        };
        let out = f();
        let mut s = self.lock();
        s.ran[actor] += 1;
        s.log.push(format!("{ticket}: actor {actor} {what}"));
        if s.violation.is_none() {
            if let Err(v) = check_location(self.raw.as_ref()) {
                s.violation = Some(format!("after {what} by actor {actor}: {v}"));
            }
        }
        s.granted = None;
        s.running = false;
        s.changed = Some(Instant::now());
        self.cv.notify_all();
        out
    }

    fn finish(&self, actor: usize) {
        let mut s = self.lock();
        s.live[actor] = false;
        s.changed = Some(Instant::now());
        self.cv.notify_all();
    }

    /// Grant operations until every actor has finished.
    fn drive(&self) {
        let mut s = self.lock();
        loop {
            if !s.live.iter().any(|l| *l) {
                return;
            }
            if s.running || s.pending.is_empty() {
                s = self
                    .cv
                    .wait_timeout(s, SETTLE)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let held = match self.schedule.hold_load {
                Some(n) => s.ran[LOAD] >= n && (s.live[SAVE_A] || s.live[SAVE_B]),
                None => false,
            };
            let grantable: Vec<(usize, u64)> = s
                .pending
                .iter()
                .copied()
                .filter(|p| !(held && p.0 == LOAD))
                .collect();
            if grantable.is_empty() {
                s = self
                    .cv
                    .wait_timeout(s, SETTLE)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            let waiting: HashSet<usize> = grantable.iter().map(|p| p.0).collect();
            let live = s.live.iter().filter(|l| **l).count() - usize::from(held);
            let settled = s.changed.is_none_or(|c| c.elapsed() >= SETTLE);
            let Schedule { first, alone, .. } = self.schedule;
            let pick = if s.live[first] && s.ran[first] < alone && !(held && first == LOAD) {
                // The first actor alone: wait for it (it is running
                // between two of its operations).
                grantable.iter().find(|p| p.0 == first).copied()
            } else if waiting.len() == live || settled {
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                let i = (s.rng % grantable.len() as u64) as usize;
                Some(grantable[i])
            } else {
                None
            };
            match pick {
                Some((_, t)) => {
                    s.granted = Some(t);
                    s.running = true;
                    self.cv.notify_all();
                }
                None => s = self.cv.wait_timeout(s, SETTLE).unwrap().0,
            }
        }
    }
}

/// What a reader would find: a `.metadata` that names only present files of
/// its own save, each of the length it records.
fn check_location(fs: &dyn FileSystem) -> Result<(), String> {
    let md = match fs.read_small(".metadata", 1 << 30) {
        Ok(b) => Metadata::decode(&b).map_err(|e| format!(".metadata does not decode: {e}"))?,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("read .metadata: {e}")),
    };
    for f in &md.files {
        match fs.file_len(&f.name) {
            Ok(Some(n)) if n == f.length => {}
            Ok(Some(n)) => {
                return Err(format!(
                    "{} is {n} bytes, .metadata of save {} says {}",
                    f.name, md.save_id, f.length
                ))
            }
            Ok(None) => {
                return Err(format!(
                    "{} named by .metadata of save {} is missing",
                    f.name, md.save_id
                ))
            }
            Err(e) => return Err(format!("stat {}: {e}", f.name)),
        }
        if save_id_of(&f.name) != Some(md.save_id.as_str()) {
            return Err(format!(
                "{} named by .metadata of save {} belongs to another save",
                f.name, md.save_id
            ));
        }
    }
    Ok(())
}

/// The save id in a data file's name (`__{rank}_{n}-{save_id}.{ext}`).
fn save_id_of(name: &str) -> Option<&str> {
    if !is_data_file_name(name) {
        return None;
    }
    Some(name.rsplit_once('.')?.0.split_once('-')?.1)
}

/// A store seen by one actor: every operation (and every write and finish
/// of a file being written) waits for its turn.
#[derive(Debug)]
struct Turns {
    inner: Arc<dyn FileSystem>,
    sched: Arc<Scheduler>,
    actor: usize,
}

impl Turns {
    fn op<T>(&self, what: String, f: impl FnOnce() -> T) -> T {
        self.sched.op(self.actor, &what, f)
    }
}

struct TurnSink {
    inner: Box<dyn FileSink>,
    sched: Arc<Scheduler>,
    actor: usize,
    name: String,
}

impl FileSink for TurnSink {
    fn write(&mut self, buf: bytes::Bytes) -> dcp_core::Result<()> {
        let (sched, actor) = (self.sched.clone(), self.actor);
        let what = format!("write {}", self.name);
        sched.op(actor, &what, || self.inner.write(buf))
    }
    fn finish(self: Box<Self>, sync: bool) -> dcp_core::Result<u64> {
        let TurnSink {
            inner,
            sched,
            actor,
            name,
        } = *self;
        sched.op(actor, &format!("finish {name}"), || inner.finish(sync))
    }
    fn abort(self: Box<Self>) {
        let TurnSink {
            inner,
            sched,
            actor,
            name,
        } = *self;
        sched.op(actor, &format!("abort {name}"), || inner.abort())
    }
}

impl FileSystemLayer for Turns {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn prepare(&self) -> dcp_core::Result<()> {
        self.op("prepare".into(), || self.inner.prepare())
    }
    fn create(&self, name: &str) -> dcp_core::Result<Box<dyn FileSink>> {
        let inner = self.op(format!("create {name}"), || self.inner.create(name))?;
        Ok(Box::new(TurnSink {
            inner,
            sched: self.sched.clone(),
            actor: self.actor,
            name: name.to_string(),
        }))
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> dcp_core::Result<()> {
        self.op(format!("read {name}"), || {
            self.inner.read_into(name, offset, buf)
        })
    }
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> dcp_core::Result<()> {
        self.op(format!("read {name}"), || {
            self.inner.read_scattered(name, offset, bufs)
        })
    }
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> dcp_core::Result<bool> {
        self.op(format!("read {name}"), || {
            self.inner.read_if_cached(name, offset, buf)
        })
    }
    fn file_len(&self, name: &str) -> dcp_core::Result<Option<u64>> {
        self.op(format!("stat {name}"), || self.inner.file_len(name))
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> dcp_core::Result<()> {
        self.op(format!("write_atomic {name}"), || {
            self.inner.write_atomic(name, data, sync)
        })
    }
    fn create_new(&self, name: &str, data: &[u8], sync: bool) -> dcp_core::Result<bool> {
        self.op(format!("create_new {name}"), || {
            self.inner.create_new(name, data, sync)
        })
    }
    fn version(&self, name: &str) -> dcp_core::Result<Option<String>> {
        self.op(format!("version {name}"), || self.inner.version(name))
    }
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        sync: bool,
        expected: Option<&str>,
    ) -> dcp_core::Result<bool> {
        self.op(format!("replace_if {name}"), || {
            self.inner.replace_if(name, data, sync, expected)
        })
    }
    fn list(&self) -> dcp_core::Result<Vec<dcp_core::FileEntry>> {
        self.op("list".into(), || self.inner.list())
    }
    fn remove(&self, name: &str) -> dcp_core::Result<()> {
        self.op(format!("remove {name}"), || self.inner.remove(name))
    }
    fn sync_dir(&self) -> dcp_core::Result<()> {
        self.op("sync_dir".into(), || self.inner.sync_dir())
    }
    fn read_small(&self, name: &str, max_len: u64) -> dcp_core::Result<Vec<u8>> {
        self.op(format!("read_small {name}"), || {
            self.inner.read_small(name, max_len)
        })
    }
}

/// A store without a conditional replace: dcp compares under its lease.
#[derive(Debug)]
struct NoConditional(Arc<dyn FileSystem>);

impl FileSystemLayer for NoConditional {
    fn inner(&self) -> &dyn FileSystem {
        &*self.0
    }
    fn version(&self, _name: &str) -> dcp_core::Result<Option<String>> {
        Err(Error::unsupported("no conditional replace here"))
    }
    fn replace_if(&self, _: &str, _: &[u8], _: bool, _: Option<&str>) -> dcp_core::Result<bool> {
        Err(Error::unsupported("no conditional replace here"))
    }
}

/// A fresh store, with the temporary directory it lives in (if any).
type MakeStore = Box<dyn Fn() -> (Arc<dyn FileSystem>, Option<tempfile::TempDir>)>;

/// The stores the property runs on, fresh each time, with how many
/// schedules each gets.
fn stores() -> Vec<(&'static str, u64, MakeStore)> {
    vec![
        (
            "memory",
            180,
            Box::new(|| {
                let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://interleave"));
                (fs, None)
            }),
        ),
        (
            "memory without conditional replace",
            120,
            Box::new(|| {
                let fs: Arc<dyn FileSystem> = Arc::new(NoConditional(Arc::new(MemoryFs::new(
                    "memory://interleave-nocas",
                ))));
                (fs, None)
            }),
        ),
        (
            "local disk",
            60,
            Box::new(|| {
                let dir = tempfile::tempdir().unwrap();
                let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path().join("c")));
                (fs, Some(dir))
            }),
        ),
    ]
}

/// One schedule: save M0 alone, then saves A and B and a load of the
/// location run under the scheduler; check everything.
async fn run_one(store: &str, raw: Arc<dyn FileSystem>, schedule: Schedule) -> String {
    let (m0, ma, mb) = (model(1), model(2), model(3));
    let models: [&Model; 3] = [&m0, &ma, &mb];
    let opts = || {
        fast_writer()
            .thread_count(2)
            .lease_expiry(Duration::from_secs(60))
    };
    let first = save_model(raw.clone(), &m0, WORLD, opts()).await;
    let id0 = first[0].metadata.save_id.clone();

    let sched = Scheduler::new(schedule, raw.clone());
    let turns = |actor| -> Arc<dyn FileSystem> {
        Arc::new(Turns {
            inner: raw.clone(),
            sched: sched.clone(),
            actor,
        })
    };
    // B waits for the lease in half of the schedules and in those that
    // hold the load (so that both saves commit), is refused at once in the
    // others.
    let b_opts = if schedule.seed.is_multiple_of(2) || schedule.hold_load.is_some() {
        opts().lease_wait(Some(Duration::from_secs(30)))
    } else {
        opts()
    };
    let driver = {
        let sched = sched.clone();
        std::thread::spawn(move || sched.drive())
    };
    let save = |actor: usize, m: &Model, o| {
        let (fs, sds, sched) = (turns(actor), m.state_dicts(WORLD), sched.clone());
        tokio::spawn(async move {
            let r = save_ranks(fs, o, sds).await;
            sched.finish(actor);
            r
        })
    };
    let a = save(SAVE_A, &ma, opts());
    let b = save(SAVE_B, &mb, b_opts);
    let l = {
        let (fs, sched) = (turns(LOAD), sched.clone());
        let dests = vec![m0.dest(0, 1, WORLD, &|_| Sharding::Rows)];
        tokio::spawn(async move {
            let r = load_ranks(fs, ReaderOptions::default(), dests).await;
            sched.finish(LOAD);
            r
        })
    };
    let (ra, rb, rl) = (a.await.unwrap(), b.await.unwrap(), l.await.unwrap());
    driver.join().unwrap();
    let (ctx, ran) = {
        let s = sched.lock();
        let ctx = format!("{store}, schedule {schedule:?}; log:\n{}", s.log.join("\n"));
        if let Some(v) = &s.violation {
            panic!("{v}\n{ctx}");
        }
        (ctx, s.ran)
    };

    // Every rank of a save agrees; an Ok save committed its checkpoint.
    let outcome = |r: Vec<dcp_core::Result<SaveResult>>, who: &str| -> Option<Metadata> {
        let oks = r.iter().filter(|x| x.is_ok()).count();
        assert!(
            oks == 0 || oks == r.len(),
            "{who}: ranks disagree: {r:?}\n{ctx}"
        );
        match r.into_iter().next().unwrap() {
            Ok(s) => Some((*s.metadata).clone()),
            Err(e) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Busy),
                    "{who} failed with an unexpected error: {e:?}\n{ctx}"
                );
                None
            }
        }
    };
    let (mda, mdb) = (outcome(ra, "save A"), outcome(rb, "save B"));
    let mut by_id: HashMap<String, (usize, u64)> = HashMap::from([(id0.clone(), (0, 1))]);
    for (i, md) in [(1, &mda), (2, &mdb)] {
        if let Some(md) = md {
            by_id.insert(md.save_id.clone(), (i, md.generation));
        }
    }
    assert!(
        mda.is_some() || mdb.is_some(),
        "neither save committed\n{ctx}"
    );

    // The load: one committed checkpoint's bytes, or a clear error.
    let load_outcome = match rl.into_iter().next().unwrap() {
        Ok(LoadResult {
            state_dict,
            metadata,
            ..
        }) => {
            let (i, _) = by_id.get(&metadata.save_id).copied().unwrap_or_else(|| {
                panic!(
                    "the load read save {}, which no save committed\n{ctx}",
                    metadata.save_id
                )
            });
            // Same shapes in all three models: the check compares bytes.
            models[i].check(&state_dict, WORLD);
            ["initial", "A", "B"][i]
        }
        Err(e) => {
            assert!(
                e.to_string().contains("checkpoint replaced during load"),
                "the load failed with {e:?}\n{ctx}"
            );
            "replaced"
        }
    };

    // The end state: the newest committed checkpoint, whole; no lease; no
    // file of a save that failed.
    let final_md = Metadata::decode(&raw.read_small(".metadata", 1 << 30).unwrap()).unwrap();
    let newest = by_id.iter().max_by_key(|(_, (_, g))| *g).unwrap();
    assert_eq!(&final_md.save_id, newest.0, "not the newest commit\n{ctx}");
    assert_eq!(
        raw.file_len(LEASE_FILE).unwrap(),
        None,
        "a lease left\n{ctx}"
    );
    for f in raw.list().unwrap() {
        if let Some(id) = save_id_of(&f.name) {
            assert!(
                by_id.contains_key(id),
                "{} of a failed save left\n{ctx}",
                f.name
            );
        }
    }
    let (i, _) = by_id[&final_md.save_id];
    load_and_check(raw, models[i], WORLD, 1, ReaderOptions::default(), &|_| {
        Sharding::Rows
    })
    .await;
    format!(
        "A {} B {} load {load_outcome} {}",
        if mda.is_some() { "ok" } else { "busy" },
        if mdb.is_some() { "ok" } else { "busy" },
        ran.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/")
    )
}

/// Every schedule of every store keeps the properties above. Each actor is
/// run alone for its first k operations for k = 0, 1, 2, ... (so the
/// others start at every one of its operations), then the order is random;
/// every fourth schedule also holds the load after its k-th operation until
/// both saves have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_saves_and_a_load_under_every_interleaving() {
    for (store, schedules, make) in stores() {
        let mut outcomes: HashMap<String, usize> = HashMap::new();
        let mut max_ops = [0usize; ACTORS];
        for seed in 0..schedules {
            let (raw, _dir) = make();
            // Every fourth schedule holds the load after its k-th
            // operation; the others run one actor alone for k operations.
            let schedule = Schedule {
                first: (seed % ACTORS as u64) as usize,
                alone: (seed / ACTORS as u64) as usize,
                seed,
                hold_load: (seed % 4 == 3).then_some((seed / 4 % 10) as usize),
            };
            let out = run_one(store, raw, schedule).await;
            let ops: Vec<usize> = out
                .rsplit(' ')
                .next()
                .unwrap()
                .split('/')
                .map(|n| n.parse().unwrap())
                .collect();
            for (m, n) in max_ops.iter_mut().zip(ops) {
                *m = (*m).max(n);
            }
            let kind = out.rsplit_once(' ').unwrap().0.to_string();
            *outcomes.entry(kind).or_default() += 1;
        }
        eprintln!("{store}: {schedules} schedules; outcomes {outcomes:?}; most operations per actor {max_ops:?}");
        // The schedules reach every outcome of the race: A first, B first,
        // both committing; loads of each checkpoint, and loads whose files
        // two commits replaced.
        for want in [
            "A ok B busy",
            "A busy B ok",
            "A ok B ok",
            "load initial",
            "load A",
            "load B",
            "load replaced",
        ] {
            assert!(
                outcomes.keys().any(|k| k.contains(want)),
                "{store}: no schedule reached {want:?}: {outcomes:?}"
            );
        }
    }
}
