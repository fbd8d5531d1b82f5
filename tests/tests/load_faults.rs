//! Faults during a multi-rank resharded load with shared reads: 4 ranks save
//! by rows, 3 ranks of a `LocalGroup` load by columns and a grid (every
//! saved record is needed by several ranks, so each is read once by one rank
//! straight into the others' buffers), each rank through its own file
//! system wrapper:
//!
//! * a rank whose data reads stall past the collective deadline: the other
//!   ranks end at the deadline with an error naming the stalled rank, and
//!   the stalled rank ends with an error as soon as its read returns;
//! * a rank that panics inside a read: every rank ends with an error naming
//!   it;
//! * a rank that gets an I/O error from a read (`read_into`,
//!   `read_scattered`, `read_if_cached`, `read_small`) or a stat
//!   (`file_len`), failed before or after the call is made: every rank
//!   returns the same error, naming the failing rank and keeping the cause.

use dcp_core::layer::FileSystemLayer;
use dcp_core::local::run_ranks;
use dcp_core::{
    load, DType, DestStateDict, Error, FileSystem, FileSystemReader, LoadResult, ReaderOptions,
    Result,
};
use dcp_testkit::{Fault, FaultFs, Op};
use dcp_tests::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const WORLD: usize = 3;
const SAVED: usize = 4;

fn model() -> Model {
    Model {
        seed: 91,
        ..Model::default()
    }
    // Records of 768 KiB, above the 256 KiB `small_record`: scattered
    // reads; the small ones go through coalesced spans (`read_into`).
    .tensor("w", DType::BF16, &[1024, 1536], Sharding::Rows)
    .tensor("v", DType::F32, &[768, 1024], Sharding::Rows)
    .tensor("b", DType::F32, &[300], Sharding::Replicated)
    .bytes("cfg", 700, false)
}

fn sharding(spec: &TensorSpec) -> Sharding {
    match spec.name.as_str() {
        "w" => Sharding::Cols,
        "v" => Sharding::Grid,
        _ => Sharding::Full,
    }
}

fn reader_opts() -> ReaderOptions {
    ReaderOptions::default()
        .registry(dcp_ext::registry())
        .verify_checksums(true)
        .thread_count(2)
}

async fn saved(m: &Model) -> (tempfile::TempDir, Arc<dyn FileSystem>) {
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path()));
    save_model(
        fs.clone(),
        m,
        SAVED,
        fast_writer().extensions(vec![Arc::new(dcp_ext::Crc32c::new())]),
    )
    .await;
    (dir, fs)
}

/// One rank's end: its result and when it came back.
struct End {
    result: Result<LoadResult>,
    took: Duration,
}

/// Load on `WORLD` ranks, rank `r` through `fss[r]`, with collective
/// deadline `deadline`; `done(rank)` runs when a rank's load returned. The
/// whole run is bounded (120 s).
async fn load_each(
    fss: Vec<Arc<dyn FileSystem>>,
    m: &Model,
    deadline: Duration,
    done: Arc<dyn Fn(usize) + Send + Sync>,
) -> Vec<End> {
    let dests: Arc<Mutex<Vec<Option<DestStateDict>>>> = Arc::new(Mutex::new(
        (0..WORLD)
            .map(|r| Some(m.dest(r, WORLD, SAVED, &sharding)))
            .collect(),
    ));
    let fss = Arc::new(fss);
    let ends: Arc<Mutex<Vec<Option<Duration>>>> = Arc::new(Mutex::new(vec![None; WORLD]));
    let started = Instant::now();
    let e2 = ends.clone();
    let run = run_ranks(WORLD, deadline, move |g| {
        let (dests, fss, ends, done) = (dests.clone(), fss.clone(), e2.clone(), done.clone());
        async move {
            let rank = dcp_core::Collective::rank(&g);
            let dest = dests.lock().unwrap()[rank]
                .take()
                .expect("one dest per rank");
            let reader = FileSystemReader::new(fss[rank].clone(), reader_opts());
            let r = load(dest, &reader, &g).await;
            ends.lock().unwrap()[rank] = Some(started.elapsed());
            done(rank);
            r
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the load ended within 120 s");
    let total = started.elapsed();
    let ends = ends.lock().unwrap().clone();
    results
        .into_iter()
        .zip(ends)
        .map(|(result, took)| End {
            result,
            took: took.unwrap_or(total),
        })
        .collect()
}

fn is_data(name: &str) -> bool {
    name != ".metadata"
}

/// A gate that reads wait at until the test opens it (bounded: 120 s).
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
    waiting: AtomicUsize,
}

impl Gate {
    fn wait(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let g = self.open.lock().unwrap();
        let _ = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(120), |open| !*open)
            .unwrap();
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// Every data read waits at the gate, then goes on.
#[derive(Debug)]
struct StallFs {
    inner: Arc<dyn FileSystem>,
    gate: Arc<Gate>,
}

impl FileSystemLayer for StallFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if is_data(name) {
            self.gate.wait();
        }
        self.inner.read_into(name, offset, buf)
    }
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        if is_data(name) {
            self.gate.wait();
        }
        self.inner.read_scattered(name, offset, bufs)
    }
    fn read_if_cached(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<bool> {
        if is_data(name) {
            self.gate.wait();
        }
        self.inner.read_if_cached(name, offset, buf)
    }
}

/// Every data read panics.
#[derive(Debug)]
struct PanicFs {
    inner: Arc<dyn FileSystem>,
}

impl FileSystemLayer for PanicFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn read_into(&self, name: &str, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        panic!("injected panic reading {name}")
    }
    fn read_scattered(
        &self,
        name: &str,
        _offset: u64,
        _bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        panic!("injected panic reading {name}")
    }
    fn read_if_cached(&self, name: &str, _offset: u64, _buf: &mut [u8]) -> Result<bool> {
        panic!("injected panic probing {name}")
    }
}

fn errors<'a>(ends: &'a [End], what: &str) -> Vec<&'a Error> {
    ends.iter()
        .enumerate()
        .map(|(r, e)| match &e.result {
            Ok(_) => panic!("{what}: rank {r} succeeded"),
            Err(e) => e,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_rank_is_named_by_every_rank_within_the_deadline() {
    let m = model();
    let (_dir, fs) = saved(&m).await;
    let deadline = Duration::from_secs(3);
    let stalled = 1;
    let gate = Arc::new(Gate::default());
    let fss: Vec<Arc<dyn FileSystem>> = (0..WORLD)
        .map(|r| {
            if r == stalled {
                Arc::new(StallFs {
                    inner: fs.clone(),
                    gate: gate.clone(),
                }) as Arc<dyn FileSystem>
            } else {
                fs.clone()
            }
        })
        .collect();
    // Release the stalled reads once every other rank has returned.
    let others_done = Arc::new(AtomicUsize::new(0));
    let g2 = gate.clone();
    let released_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let r2 = released_at.clone();
    let done: Arc<dyn Fn(usize) + Send + Sync> = Arc::new(move |rank| {
        if rank != stalled && others_done.fetch_add(1, Ordering::SeqCst) + 1 == WORLD - 1 {
            *r2.lock().unwrap() = Some(Instant::now());
            g2.open();
        }
    });
    let started = Instant::now();
    let ends = load_each(fss, &m, deadline, done).await;
    let errs = errors(&ends, "stalled rank");
    assert!(gate.waiting.load(Ordering::SeqCst) > 0, "no read stalled");
    for (r, (end, e)) in ends.iter().zip(&errs).enumerate() {
        let text = e.to_string();
        assert!(
            text.contains(&format!("[{stalled}]")) || text.contains(&format!("rank {stalled}")),
            "rank {r}: the error does not name rank {stalled}: {text}"
        );
        if r != stalled {
            assert!(
                end.took >= deadline && end.took < deadline + Duration::from_secs(10),
                "rank {r} ended after {:?} (deadline {deadline:?})",
                end.took
            );
        }
    }
    let released = released_at.lock().unwrap().expect("released") - started;
    assert!(
        ends[stalled].took < released + Duration::from_secs(10),
        "the stalled rank took {:?} after its reads returned at {released:?}",
        ends[stalled].took
    );
    eprintln!(
        "stalled rank {stalled}: ranks ended after {:?}; errors: {:?}",
        ends.iter().map(|e| e.took).collect::<Vec<_>>(),
        errs.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rank_that_panics_in_a_read_is_named_by_every_rank() {
    let m = model();
    let (_dir, fs) = saved(&m).await;
    let deadline = Duration::from_secs(3);
    let bad = 2;
    let fss: Vec<Arc<dyn FileSystem>> = (0..WORLD)
        .map(|r| {
            if r == bad {
                Arc::new(PanicFs { inner: fs.clone() }) as Arc<dyn FileSystem>
            } else {
                fs.clone()
            }
        })
        .collect();
    let ends = load_each(fss, &m, deadline, Arc::new(|_| {})).await;
    let errs = errors(&ends, "panicking rank");
    for (r, (end, e)) in ends.iter().zip(&errs).enumerate() {
        let text = e.to_string();
        assert!(
            text.contains(&format!("[{bad}]")) || text.contains(&format!("rank {bad}")),
            "rank {r}: the error does not name rank {bad}: {text}"
        );
        assert!(
            end.took < deadline + Duration::from_secs(10),
            "rank {r} ended after {:?}",
            end.took
        );
    }
    eprintln!(
        "panicking rank {bad}: ranks ended after {:?}; errors: {:?}",
        ends.iter().map(|e| e.took).collect::<Vec<_>>(),
        errs.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_or_stat_error_on_one_rank_fails_every_rank_naming_it() {
    let m = model();
    let (_dir, fs) = saved(&m).await;
    let deadline = Duration::from_secs(20);
    let mut exercised = Vec::new();
    for uncached in [false, true] {
        for bad in 0..WORLD {
            // A clean load first, counting what each rank's file system saw.
            let faulty: Vec<FaultFs> = (0..WORLD).map(|_| FaultFs::new(fs.clone())).collect();
            let arm_uncached = |f: &FaultFs| {
                if uncached {
                    f.arm(Fault::Uncached);
                }
            };
            faulty.iter().for_each(arm_uncached);
            let fss: Vec<Arc<dyn FileSystem>> = faulty
                .iter()
                .map(|f| Arc::new(f.clone()) as Arc<dyn FileSystem>)
                .collect();
            let ends = load_each(fss.clone(), &m, deadline, Arc::new(|_| {})).await;
            for (r, e) in ends.into_iter().enumerate() {
                let out = e
                    .result
                    .unwrap_or_else(|e| panic!("clean load, rank {r}: {e}"));
                m.check(&out.state_dict, SAVED);
            }
            let ops = [
                Op::Read,
                Op::ReadScattered,
                Op::ReadIfCached,
                Op::ReadSmall,
                Op::Stat,
            ];
            let counts: Vec<(Op, u64)> =
                ops.iter().map(|&op| (op, faulty[bad].count(op))).collect();
            for &(op, n) in &counts {
                if n == 0 {
                    continue;
                }
                for fault in [
                    Fault::FailNth { op, nth: 0 },
                    Fault::FailAfterNth { op, nth: 0 },
                ] {
                    for f in &faulty {
                        f.reset();
                        arm_uncached(f);
                    }
                    faulty[bad].arm(fault.clone());
                    let what = format!("rank {bad}, {fault:?}, uncached {uncached}");
                    let ends = load_each(fss.clone(), &m, deadline, Arc::new(|_| {})).await;
                    let errs = errors(&ends, &what);
                    let first = errs[0];
                    assert_eq!(first.rank(), Some(bad), "{what}: {first}");
                    let text = first.to_string();
                    assert!(
                        text.contains(&format!("rank {bad}")) && text.contains("injected fault"),
                        "{what}: {text}"
                    );
                    for (r, (e, end)) in errs.iter().zip(&ends).enumerate() {
                        assert_eq!(
                            (e.kind(), e.message(), e.rank()),
                            (first.kind(), first.message(), first.rank()),
                            "{what}: rank {r} disagrees"
                        );
                        assert!(end.took < deadline, "{what}: rank {r} took {:?}", end.took);
                    }
                    exercised.push(format!("{what}: {}", first.kind()));
                }
            }
        }
    }
    for op in ["Read", "ReadScattered", "ReadIfCached", "ReadSmall", "Stat"] {
        assert!(
            exercised.iter().any(|e| e.contains(&format!("op: {op},"))),
            "{op} never failed: {exercised:#?}"
        );
    }
    eprintln!(
        "load faults: {} cases, every rank returned the failing rank's error:\n  {}",
        exercised.len(),
        exercised.join("\n  ")
    );
}
