//! Failures during a save (through `dcp_testkit::FaultFs`) and damaged
//! checkpoints: every rank errors, nothing new is committed, the previous
//! checkpoint stays byte for byte and loads bit-exact; damage is a clear
//! error of the right kind, never a panic.

use dcp_core::metadata::{DataFile, NEWEST_FORMAT_VERSION};
use dcp_core::{DType, Error, ErrorKind, FileSystem, ReaderOptions, WriterOptions};
use dcp_testkit::{Fault, FaultFs, Op};
use dcp_tests::*;
use std::collections::HashMap;
use std::sync::Arc;

const WORLD: usize = 4;

fn model() -> Model {
    Model {
        seed: 1,
        ..Default::default()
    }
    .tensor("w", DType::F32, &[40, 16], Sharding::Rows)
    .tensor("g", DType::BF16, &[12, 12], Sharding::Grid)
    .tensor("r", DType::I32, &[7], Sharding::Replicated)
    .tensor("u", DType::U8, &[33, 5], Sharding::Uneven)
    .bytes("step", 8, false)
    .bytes("rng", 32, true)
}

fn opts() -> WriterOptions {
    fast_writer().thread_count(2)
}

fn faulty(f: &FaultFs) -> Arc<dyn FileSystem> {
    Arc::new(f.clone())
}

/// The previous checkpoint `a` is untouched: same `.metadata` bytes, same
/// files, and it loads bit-exact.
async fn assert_previous_intact(store: &Store, a: &Model, md: &[u8], names: &[String], what: &str) {
    assert_eq!(
        store.read_raw(".metadata").as_deref(),
        Some(md),
        "{what}: .metadata changed"
    );
    assert_eq!(store.names(), names, "{what}: files changed");
    load_and_check(
        store.fresh_fs(),
        a,
        WORLD,
        3,
        ReaderOptions::default(),
        &|_| Sharding::Cols,
    )
    .await;
}

/// Every rank returns the same error; it names a rank, and when a rank's own
/// write failed, the data file of that rank.
fn assert_agreed_error(errs: &[Error], what: &str) -> usize {
    let first = &errs[0];
    for e in errs {
        assert_eq!(e.kind(), first.kind(), "{what}");
        assert_eq!(e.message(), first.message(), "{what}");
        assert_eq!(e.rank(), first.rank(), "{what}");
    }
    let rank = first
        .rank()
        .unwrap_or_else(|| panic!("{what}: error names no rank: {first:?}"));
    assert!(rank < WORLD, "{what}");
    assert!(
        first.to_string().starts_with(&format!("rank {rank}: ")),
        "{what}: {first}"
    );
    rank
}

/// How many calls of each op a clean overwrite save makes.
async fn clean_counts(backend: Backend, a: &Model, b: &Model) -> HashMap<Op, u64> {
    let store = backend.make_fs("count");
    save_model(store.fs(), a, WORLD, opts()).await;
    let f = store.faulty();
    save_model(faulty(&f), b, WORLD, opts()).await;
    [
        Op::Create,
        Op::Write,
        Op::Finish,
        Op::WriteAtomic,
        Op::Remove,
        Op::List,
    ]
    .into_iter()
    .map(|op| (op, f.count(op)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_any_write_step_commits_nothing() {
    let a = model();
    let b = a.reseeded(2);
    for backend in backends() {
        let counts = clean_counts(backend, &a, &b).await;
        assert!(counts[&Op::Create] >= WORLD as u64, "{counts:?}");
        assert_eq!(counts[&Op::WriteAtomic], 1, "{counts:?}");

        let store = backend.make_fs("fail");
        save_model(store.fs(), &a, WORLD, opts()).await;
        let md = store.read_raw(".metadata").unwrap();
        let names = store.names();

        let mut faults: Vec<(Fault, &str)> = Vec::new();
        for op in [Op::Create, Op::Write, Op::Finish, Op::WriteAtomic] {
            // Each fault is a save and a load, tens of requests: on S3 (moto
            // is slow per request) only the first, middle and last call of
            // each op fail.
            for nth in backend.sample(counts[&op]) {
                faults.push((Fault::FailNth { op, nth }, "injected fault"));
            }
        }
        let writes = counts[&Op::Write];
        for nth in [0, writes / 2, writes - 1] {
            faults.push((Fault::ShortWrite { nth }, "injected short write"));
        }
        let total: u64 = b.state_dicts(WORLD).iter().map(|s| s.local_bytes()).sum();
        for bytes in [0, total / 3] {
            faults.push((Fault::DiskFull { bytes }, "no space left on device"));
        }

        for (fault, text) in faults {
            let what = format!("{} {fault:?}", backend.name());
            let f = store.faulty();
            f.arm(fault.clone());
            let errs = all_err(
                save_ranks(faulty(&f), opts(), b.state_dicts(WORLD)).await,
                &what,
            );
            let rank = assert_agreed_error(&errs, &what);
            let e = &errs[0];
            assert!(e.message().contains(text), "{what}: {e}");
            match fault {
                Fault::FailNth {
                    op: Op::WriteAtomic,
                    ..
                } => {
                    assert_eq!(rank, 0, "{what}: the coordinator commits");
                    assert!(e.message().contains("commit"), "{what}: {e}");
                    assert!(e.message().contains(".metadata"), "{what}: {e}");
                }
                Fault::DiskFull { .. } => {
                    // The kind survives crossing ranks.
                    assert_eq!(e.kind(), ErrorKind::StorageFull, "{what}");
                    assert!(!e.is_temporary(), "{what}");
                    assert!(
                        e.message().contains(&format!("__{rank}_")),
                        "{what}: the error names rank {rank}'s data file: {e}"
                    );
                }
                _ => {
                    assert_eq!(e.kind(), ErrorKind::Io, "{what}");
                    assert!(
                        e.message().contains(&format!("__{rank}_")),
                        "{what}: the error names rank {rank}'s data file: {e}"
                    );
                }
            }
            assert_previous_intact(&store, &a, &md, &names, &what).await;
        }
    }
}

/// Removing files of earlier saves happens after the commit: a failing
/// `list` or `remove` cannot un-commit the new checkpoint. The save succeeds,
/// the new checkpoint loads bit-exact, and the next save removes what was
/// left behind. A save replacing `b` (which replaced `a`) removes `a`'s
/// files and keeps `b`'s; the last `remove` is the lease's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_cleanup_keeps_the_new_checkpoint() {
    let a = model();
    let b = a.reseeded(2);
    let c = a.reseeded(3);
    let d = a.reseeded(4);
    for backend in backends() {
        let counts = {
            let store = backend.make_fs("count-cleanup");
            save_model(store.fs(), &a, WORLD, opts()).await;
            save_model(store.fs(), &b, WORLD, opts()).await;
            let f = store.faulty();
            save_model(faulty(&f), &c, WORLD, opts()).await;
            [Op::List, Op::Remove].map(|op| (op, f.count(op)))
        };
        assert_eq!(counts[0].1, 1, "{counts:?}");
        assert!(
            counts[1].1 > WORLD as u64,
            "a's files and the lease: {counts:?}"
        );
        for (op, n) in counts {
            // Four saves and a load per fault: on S3 (slow per request)
            // only the first, middle and last call fail.
            for nth in backend.sample(n) {
                let what = format!("{} fail {op:?} #{nth}", backend.name());
                let lease_removal = op == Op::Remove && nth == n - 1;
                let store = backend.make_fs("cleanup");
                save_model(store.fs(), &a, WORLD, opts()).await;
                let old = store.data_files();
                let replaced = save_model(store.fs(), &b, WORLD, opts()).await[0]
                    .metadata
                    .clone();
                let f = store.faulty();
                f.arm(Fault::FailNth { op, nth });
                let saved = save_model(faulty(&f), &c, WORLD, opts()).await;
                let md = saved[0].metadata.clone();
                assert_eq!(md.generation, replaced.generation + 1, "{what}");
                assert_eq!(store.metadata(), *md, "{what}");
                let named =
                    |n: &String| md.files.iter().chain(&replaced.files).any(|f| &f.name == n);
                let stale: Vec<String> = store
                    .data_files()
                    .into_iter()
                    .filter(|n| !named(n))
                    .collect();
                if lease_removal {
                    assert!(stale.is_empty(), "{what}: {stale:?}");
                    assert!(store.names().contains(&".lease".to_string()), "{what}");
                } else {
                    assert!(!stale.is_empty(), "{what}: the failed cleanup left nothing");
                    assert!(stale.iter().all(|n| old.contains(n)), "{what}");
                }
                load_and_check(
                    store.fresh_fs(),
                    &c,
                    WORLD,
                    2,
                    ReaderOptions::default(),
                    &|_| Sharding::Grid,
                )
                .await;
                // The next save breaks a lease left by an ended save, and
                // removes everything but its own files and `c`'s.
                let saved = save_model(store.fs(), &d, WORLD, opts()).await;
                let mut want: Vec<String> = saved[0]
                    .metadata
                    .files
                    .iter()
                    .chain(&md.files)
                    .map(|f| f.name.clone())
                    .collect();
                want.sort();
                assert_eq!(store.data_files(), want, "{what}: stale files remain");
                for s in stale.iter().chain(
                    &replaced
                        .files
                        .iter()
                        .map(|f| f.name.clone())
                        .collect::<Vec<_>>(),
                ) {
                    assert!(saved[0].removed.contains(s), "{what}: {s} not reported");
                }
                assert!(!store.names().contains(&".lease".to_string()), "{what}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_files_leave_no_stale_data() {
    let a = model();
    for backend in backends() {
        let store = backend.make_fs("fewer");
        // The files of the last two checkpoints.
        let (mut last, mut before_last): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        for (i, (threads, single)) in [(3, true), (1, true), (2, false), (1, true)]
            .into_iter()
            .enumerate()
        {
            let m = a.reseeded(10 + i as u64);
            let o = fast_writer()
                .thread_count(threads)
                .single_file_per_rank(single);
            let saved = save_model(store.fs(), &m, WORLD, o).await;
            let md = &saved[0].metadata;
            assert_eq!(md.generation, i as u64 + 1);
            let mine: Vec<String> = md.files.iter().map(|f| f.name.clone()).collect();
            let mut want: Vec<String> = mine.iter().chain(&last).cloned().collect();
            want.sort();
            assert_eq!(
                store.data_files(),
                want,
                "save {i}: its files and the replaced one's"
            );
            let mut removed = saved[0].removed.clone();
            removed.sort();
            before_last.sort();
            assert_eq!(
                removed, before_last,
                "save {i}: rank 0 reports what it removed"
            );
            for s in &saved[1..] {
                assert!(s.removed.is_empty());
            }
            if single {
                assert!(md.files.len() <= WORLD * threads);
            }
            load_and_check(
                store.fresh_fs(),
                &m,
                WORLD,
                2,
                ReaderOptions::default(),
                &|_| Sharding::Rows,
            )
            .await;
            before_last = std::mem::replace(&mut last, mine);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_false_refuses_before_writing() {
    let a = model();
    for backend in backends() {
        let store = backend.make_fs("nooverwrite");
        let no = opts().overwrite(false);
        // An empty location is fine.
        save_model(store.fs(), &a, WORLD, no.clone()).await;
        let md = store.read_raw(".metadata").unwrap();
        let names = store.names();
        let f = store.faulty();
        let errs = all_err(
            save_ranks(faulty(&f), no, a.reseeded(5).state_dicts(WORLD)).await,
            "save over an existing checkpoint",
        );
        for e in &errs {
            assert_error(
                e,
                ErrorKind::AlreadyExists,
                &["rank 0: ", "already exists", "overwrite"],
            );
        }
        for op in [Op::Create, Op::Write, Op::WriteAtomic, Op::Remove] {
            assert_eq!(f.count(op), 0, "{op:?} happened");
        }
        assert_previous_intact(&store, &a, &md, &names, "overwrite=false").await;
    }
}

async fn load_err(store: &Store, a: &Model, world: usize) -> Vec<Error> {
    let dests = (0..world)
        .map(|r| a.dest(r, world, WORLD, &|_| Sharding::Rows))
        .collect();
    all_err(
        load_ranks(store.fresh_fs(), ReaderOptions::default(), dests).await,
        "load",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_checkpoints_are_clear_errors() {
    let a = model();
    for backend in backends() {
        let store = backend.make_fs("damage");
        save_model(store.fs(), &a, WORLD, opts()).await;
        let good = store.read_raw(".metadata").unwrap();
        let md = store.metadata();

        // A truncated data file.
        let victim: &DataFile = md.files.iter().max_by_key(|f| f.length).unwrap();
        let data = store.read_raw(&victim.name).unwrap();
        store.write_raw(&victim.name, data[..data.len() / 2].to_vec());
        for e in load_err(&store, &a, 2).await {
            assert_error(
                &e,
                ErrorKind::Corrupt,
                &[
                    &victim.name,
                    "offset",
                    &format!("({} bytes)", data.len() / 2),
                    "truncated",
                ],
            );
        }
        store.write_raw(&victim.name, data);
        load_and_check(
            store.fresh_fs(),
            &a,
            WORLD,
            2,
            ReaderOptions::default(),
            &|_| Sharding::Rows,
        )
        .await;

        // Damaged metadata: a flipped body byte, a flipped magic byte, a
        // truncated file, an unknown version.
        let future = format!("format version {}", NEWEST_FORMAT_VERSION + 1);
        let cases: Vec<(Vec<u8>, ErrorKind, &str)> = vec![
            (
                {
                    let mut b = good.clone();
                    let i = b.len() - 3;
                    b[i] ^= 0x01;
                    b
                },
                ErrorKind::ChecksumMismatch,
                "CRC-32C",
            ),
            (
                {
                    let mut b = good.clone();
                    b[0] ^= 0x20;
                    b
                },
                ErrorKind::Corrupt,
                "magic",
            ),
            (
                good[..good.len() - 5].to_vec(),
                ErrorKind::Corrupt,
                "truncated",
            ),
            (good[..10].to_vec(), ErrorKind::Corrupt, "header"),
            (
                {
                    let mut b = good.clone();
                    b[8..12].copy_from_slice(&(NEWEST_FORMAT_VERSION + 1).to_le_bytes());
                    b
                },
                ErrorKind::Unsupported,
                &future,
            ),
        ];
        for (bytes, kind, text) in cases {
            store.write_raw(".metadata", bytes);
            for e in load_err(&store, &a, 3).await {
                assert_error(&e, kind, &[".metadata", text]);
            }
        }

        // Hostile file names in otherwise valid metadata.
        for bad in [
            "../evil.dcp",
            "sub/x.dcp",
            "/etc/passwd",
            "..",
            ".metadata.tmp",
        ] {
            let mut m = md.clone();
            m.files[0].name = bad.to_string();
            store.write_raw(".metadata", encode_metadata_current(&m));
            for e in load_err(&store, &a, 2).await {
                assert_error(&e, ErrorKind::Corrupt, &["invalid metadata", bad]);
            }
        }
        // A record past the end of its file.
        let mut m = md.clone();
        m.files[0].length = 1;
        store.write_raw(".metadata", encode_metadata_current(&m));
        for e in load_err(&store, &a, 1).await {
            assert_error(&e, ErrorKind::Corrupt, &["past the end", &md.files[0].name]);
        }

        store.write_raw(".metadata", good.clone());
        load_and_check(
            store.fresh_fs(),
            &a,
            WORLD,
            1,
            ReaderOptions::default(),
            &|_| Sharding::Full,
        )
        .await;
    }
}

/// Local-disk specific damage: a data file replaced by a directory or by a
/// symlink pointing outside the checkpoint. Only on backends whose files are
/// files of the OS that the case can reach (`fs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_refuses_directories_and_symlinks() {
    let a = model();
    for backend in backends().into_iter().filter(|b| b.has_os_files()) {
        os_damage(backend, &a).await;
    }
}

async fn os_damage(backend: Backend, a: &Model) {
    let store = backend.make_fs("fs-damage");
    save_model(store.fs(), a, WORLD, opts()).await;
    let md = store.metadata();
    let root = store
        .os_path()
        .expect("a directory of the OS")
        .to_path_buf();
    let victim = root.join(&md.files[0].name);
    let saved = std::fs::read(&victim).unwrap();

    std::fs::remove_file(&victim).unwrap();
    std::fs::create_dir(&victim).unwrap();
    for e in load_err(&store, a, 2).await {
        assert_error(
            &e,
            ErrorKind::Corrupt,
            &[&md.files[0].name, "is a directory"],
        );
    }
    std::fs::remove_dir(&victim).unwrap();

    let outside = root.parent().unwrap().join("outside.bin");
    std::fs::write(&outside, &saved).unwrap();
    std::os::unix::fs::symlink(&outside, &victim).unwrap();
    for e in load_err(&store, a, 2).await {
        assert_error(
            &e,
            ErrorKind::Corrupt,
            &[&md.files[0].name, "symbolic link"],
        );
    }
    std::fs::remove_file(&victim).unwrap();
    std::fs::write(&victim, &saved).unwrap();
    load_and_check(
        store.fresh_fs(),
        a,
        WORLD,
        2,
        ReaderOptions::default(),
        &|_| Sharding::Rows,
    )
    .await;
}

/// A fault in a scattered read, over local disk. `FaultFs` is a
/// `FileSystemLayer`, so its `read_scattered` is `dcp_fs::LocalFs`'s own
/// (`preadv`), not the trait's read-and-copy default (which would show up as
/// `Op::Read` calls). With the page cache hidden (`Fault::Uncached`), a load
/// resharded from rows to columns scatters every saved record with one
/// `read_scattered`: clean, it is correct byte for byte; with the second
/// scattered read failed, every rank fails with the injected error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_read_fault_on_local_disk() {
    // Rows by 4 ranks, loaded as columns by 3: each saved record is 768 KiB
    // (above the 256 KiB `small_record`), one part, tiled exactly by the
    // three ranks' column pieces of its rows: the scatter path.
    let m = Model {
        seed: 9,
        ..Default::default()
    }
    .tensor("w", DType::BF16, &[1024, 1536], Sharding::Rows);
    let dir = tempfile::tempdir().unwrap();
    let local: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path().join("ckpt")));
    let saved = save_model(local.clone(), &m, WORLD, opts()).await;
    let md = saved[0].metadata.clone();
    let records = md
        .items
        .iter()
        .map(|(_, it)| match it {
            dcp_core::metadata::ItemMeta::Tensor { chunks, .. } => chunks.len() as u64,
            dcp_core::metadata::ItemMeta::Bytes { .. } => 1,
        })
        .sum::<u64>();
    assert_eq!(records, WORLD as u64, "one record per saving rank");
    let fault = FaultFs::new(local.clone());
    let cols = |_: &TensorSpec| Sharding::Cols;

    // No fault armed (the cache hidden): every byte right, every record
    // scattered once by the inner LocalFs, nothing read and copied.
    fault.arm(Fault::Uncached);
    load_and_check(
        faulty(&fault),
        &m,
        WORLD,
        3,
        ReaderOptions::default(),
        &cols,
    )
    .await;
    assert_eq!(
        fault.count(Op::ReadScattered),
        records,
        "one scattered read per saved record, reaching LocalFs"
    );
    assert_eq!(
        fault.count(Op::ReadIfCached),
        records,
        "each part was probed once (and declined) first"
    );
    assert_eq!(fault.count(Op::Read), 0, "no read fell back to read_into");
    assert_eq!(fault.count(Op::ReadSmall), 1, ".metadata read once");

    // The second scattered read fails: every rank fails with the injected
    // error, naming the item and a data file of the checkpoint.
    fault.reset();
    fault.arm(Fault::Uncached);
    fault.arm(Fault::FailNth {
        op: Op::ReadScattered,
        nth: 1,
    });
    let dests = (0..3).map(|r| m.dest(r, 3, WORLD, &cols)).collect();
    let errs = all_err(
        load_ranks(faulty(&fault), ReaderOptions::default(), dests).await,
        "load with a failed scattered read",
    );
    for e in &errs {
        assert_error(e, ErrorKind::Io, &["injected fault: ReadScattered #1", "w"]);
        assert!(
            md.files.iter().any(|f| e.message().contains(&f.name)),
            "{e}: names no data file of {:?}",
            md.files
        );
        assert_eq!(e.message(), errs[0].message(), "the ranks agree");
    }
    assert!(fault.count(Op::ReadScattered) >= 2);
}
