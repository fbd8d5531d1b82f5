//! Ranks that panic or stall: every other rank errors within the collective
//! deadline, and nothing is committed (the previous checkpoint stays).

use dcp_core::local::run_ranks;
use dcp_core::{
    save, Collective, DType, ErrorKind, FileSink, FileSystem, FileSystemLayer, FileSystemWriter,
    ReaderOptions, Result, StateDict,
};
use dcp_tests::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORLD: usize = 4;

fn model() -> Model {
    Model {
        seed: 1,
        ..Default::default()
    }
    .tensor("w", DType::F32, &[32, 8], Sharding::Rows)
    .tensor("r", DType::U8, &[9], Sharding::Replicated)
    .bytes("rng", 16, true)
}

/// What a storage wrapper does when a given rank creates a data file.
#[derive(Clone, Copy, Debug)]
enum Misbehave {
    Panic,
    Sleep(Duration),
}

/// Delegates to `inner`, but panics or sleeps when rank `rank` creates a
/// data file.
#[derive(Debug)]
struct BadRankFs {
    inner: Arc<dyn FileSystem>,
    rank: usize,
    how: Misbehave,
}

impl FileSystemLayer for BadRankFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        if name.starts_with(&format!("__{}_", self.rank)) {
            match self.how {
                Misbehave::Panic => panic!("storage of rank {} exploded", self.rank),
                Misbehave::Sleep(d) => std::thread::sleep(d),
            }
        }
        self.inner.create(name)
    }
}

/// Run a save of `b` on every rank; rank `bad` first runs `before` (which
/// may panic or sleep). Returns each rank's result and how long it took.
async fn save_with_bad_rank(
    fs: Arc<dyn FileSystem>,
    b: &Model,
    bad: usize,
    timeout: Duration,
    before: fn(),
) -> Vec<(Result<()>, Duration)> {
    let sds: Arc<Vec<StateDict>> = Arc::new(b.state_dicts(WORLD));
    let writer = Arc::new(FileSystemWriter::new(fs, fast_writer()).unwrap());
    let start = Instant::now();
    let res = run_ranks(WORLD, timeout, move |g| {
        let sds = sds.clone();
        let writer = writer.clone();
        async move {
            let rank = g.rank();
            if rank == bad {
                before();
            }
            let r = save(&sds[rank], writer.as_ref(), &g).await.map(|_| ());
            Ok((r, start.elapsed()))
        }
    })
    .await;
    res.into_iter()
        .map(|r| r.unwrap_or_else(|e| (Err(e), start.elapsed())))
        .collect()
}

async fn previous(store: &Store, a: &Model) -> (Vec<u8>, Vec<String>) {
    save_model(store.fs(), a, WORLD, fast_writer()).await;
    (store.read_raw(".metadata").unwrap(), store.names())
}

async fn assert_nothing_committed(store: &Store, a: &Model, md: &[u8]) {
    assert_eq!(store.read_raw(".metadata").as_deref(), Some(md));
    load_and_check(
        store.fresh_fs(),
        a,
        WORLD,
        2,
        ReaderOptions::default(),
        &|_| Sharding::Cols,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_that_panics_fails_everyone_fast() {
    let a = model();
    let b = a.reseeded(2);
    for backend in backends() {
        let store = backend.make_fs("panic");
        let (md, names) = previous(&store, &a).await;
        // A long deadline: the others must notice the panic, not time out.
        let res = save_with_bad_rank(store.fs(), &b, 2, Duration::from_secs(60), || {
            panic!("rank 2 exploded before saving")
        })
        .await;
        for (rank, (r, took)) in res.iter().enumerate() {
            let e = r.as_ref().expect_err("no rank may succeed");
            assert!(*took < Duration::from_secs(20), "rank {rank} took {took:?}");
            if rank == 2 {
                assert_error(e, ErrorKind::RankFailed, &["rank 2 panicked"]);
            } else {
                assert_error(e, ErrorKind::Collective, &["rank 2 left the group"]);
            }
        }
        assert_nothing_committed(&store, &a, &md).await;
        assert_eq!(store.names(), names);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_storage_is_an_error_naming_the_rank() {
    let a = model();
    let b = a.reseeded(2);
    for backend in backends() {
        let store = backend.make_fs("storage-panic");
        let (md, names) = previous(&store, &a).await;
        let fs: Arc<dyn FileSystem> = Arc::new(BadRankFs {
            inner: store.fs(),
            rank: 1,
            how: Misbehave::Panic,
        });
        let res = save_with_bad_rank(fs, &b, 1, Duration::from_secs(60), || {}).await;
        let errs: Vec<_> = res
            .into_iter()
            .map(|(r, _)| r.expect_err("no rank may succeed"))
            .collect();
        for e in &errs {
            assert_eq!(e.rank(), Some(1), "{e:?}");
            assert!(e.to_string().starts_with("rank 1: "), "{e}");
            assert!(e.message().contains("storage worker failed"), "{e}");
            assert_eq!(e.message(), errs[0].message());
        }
        assert_nothing_committed(&store, &a, &md).await;
        assert_eq!(store.names(), names, "failed save left files behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_rank_fails_everyone_within_the_deadline() {
    let a = model();
    let b = a.reseeded(2);
    let deadline = Duration::from_millis(400);
    for backend in backends() {
        let store = backend.make_fs("stall");
        let (md, _) = previous(&store, &a).await;
        // Rank 3 stalls (blocking its thread, as a hung rank would) for
        // much longer than the deadline before it joins the save.
        let res = save_with_bad_rank(store.fs(), &b, 3, deadline, || {
            // Blocking, as a hung rank would; block_in_place keeps the other
            // ranks' tasks running on this runtime.
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(2500)))
        })
        .await;
        for (rank, (r, took)) in res.iter().enumerate() {
            let e = r.as_ref().expect_err("no rank may succeed");
            assert_eq!(e.kind(), ErrorKind::Collective, "rank {rank}: {e:?}");
            if rank != 3 {
                assert!(
                    *took < deadline + Duration::from_millis(1500),
                    "rank {rank} took {took:?}"
                );
                assert!(e.message().contains("deadline"), "{e}");
                assert!(e.message().contains("[3]"), "names the stalled rank: {e}");
            }
        }
        assert_nothing_committed(&store, &a, &md).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_stalled_in_storage_fails_everyone_within_the_deadline() {
    let a = model();
    let b = a.reseeded(2);
    let deadline = Duration::from_millis(400);
    for backend in backends() {
        let store = backend.make_fs("storage-stall");
        let (md, _) = previous(&store, &a).await;
        let fs: Arc<dyn FileSystem> = Arc::new(BadRankFs {
            inner: store.fs(),
            rank: 2,
            how: Misbehave::Sleep(Duration::from_millis(2000)),
        });
        let res = save_with_bad_rank(fs, &b, 2, deadline, || {}).await;
        for (rank, (r, took)) in res.iter().enumerate() {
            let e = r.as_ref().expect_err("no rank may succeed");
            assert_eq!(e.kind(), ErrorKind::Collective, "rank {rank}: {e:?}");
            if rank != 2 {
                assert!(
                    *took < deadline + Duration::from_millis(1500),
                    "rank {rank} took {took:?}"
                );
                assert!(e.message().contains("[2]"), "names the stalled rank: {e}");
            }
        }
        assert_nothing_committed(&store, &a, &md).await;
        // The next good save removes whatever the failed one left, and keeps
        // the files of the checkpoint it replaced.
        let c = a.reseeded(3);
        let replaced = store.metadata();
        let saved = save_model(store.fs(), &c, WORLD, fast_writer()).await;
        let mut want: Vec<String> = saved[0]
            .metadata
            .files
            .iter()
            .chain(&replaced.files)
            .map(|f| f.name.clone())
            .collect();
        want.sort();
        assert_eq!(store.data_files(), want);
    }
}

/// After a save that failed in a collective (a rank stalled past the
/// deadline), no rank leaves its data files behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_collective_leaves_no_data_files() {
    let a = model();
    let b = a.reseeded(2);
    for backend in backends() {
        let store = backend.make_fs("stall-leftovers");
        let (_, names) = previous(&store, &a).await;
        let fs: Arc<dyn FileSystem> = Arc::new(BadRankFs {
            inner: store.fs(),
            rank: 2,
            how: Misbehave::Sleep(Duration::from_millis(1500)),
        });
        let res = save_with_bad_rank(fs, &b, 2, Duration::from_millis(300), || {}).await;
        assert!(res.iter().all(|(r, _)| r.is_err()));
        assert_eq!(store.names(), names, "files of the failed save remain");
    }
}
