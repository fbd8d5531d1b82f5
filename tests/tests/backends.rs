//! The backends themselves: `DCP_TEST_BACKEND` parsing, raw access on every
//! selected backend (S3, GCS and Azure Blob included), the moto server's
//! lifetime, and a known problem of
//! `OpendalFs` when called on an async executor thread.

use dcp_core::FileSystem;
use dcp_tests::*;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[test]
fn backend_names_round_trip() {
    for b in Backend::ALL {
        assert_eq!(Backend::from_name(b.name()), Some(b));
        assert_eq!(Backend::from_name(&format!(" {} ", b.name())), Some(b));
    }
    assert_eq!(Backend::from_name("opendal"), None);
    assert!(Backend::Fs.has_os_files());
    assert!(Backend::ALL
        .iter()
        .filter(|b| **b != Backend::Fs)
        .all(|b| !b.has_os_files()));
    let selected = backends();
    assert!(!selected.is_empty());
    if std::env::var_os("DCP_TEST_BACKEND").is_none() {
        for b in [
            Backend::Fs,
            Backend::Memory,
            Backend::OpendalMemory,
            Backend::OpendalFs,
        ] {
            assert!(selected.contains(&b), "{b:?} is a default backend");
        }
        for b in [Backend::S3, Backend::Gcs, Backend::Azblob] {
            assert_eq!(
                selected.contains(&b),
                b.installed(),
                "{} runs by default exactly when its server is installed",
                b.name()
            );
        }
    }
}

/// The raw accessors see exactly what dcp wrote, and what they write is
/// what dcp reads, on every selected backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_access_matches_the_file_system() {
    for backend in backends() {
        let what = backend.name();
        let store = backend.make_fs("raw");
        assert_eq!(store.backend(), backend);
        assert!(store.names().is_empty(), "{what}: a fresh store is empty");
        assert_eq!(store.read_raw("missing"), None, "{what}");
        let m = Model {
            seed: 8,
            ..Default::default()
        }
        .tensor("t", dcp_core::DType::U16, &[6, 5], Sharding::Rows)
        .bytes("b", 100, false);
        let saved = save_model(store.fs(), &m, 2, fast_writer()).await;
        let md = &saved[0].metadata;
        assert_eq!(store.metadata(), **md, "{what}");
        let mut want: Vec<String> = md.files.iter().map(|f| f.name.clone()).collect();
        want.sort();
        assert_eq!(store.data_files(), want, "{what}");
        let mut all = want.clone();
        all.push(".metadata".to_string());
        all.sort();
        assert_eq!(store.names(), all, "{what}");
        for f in &md.files {
            let raw = store.read_raw(&f.name).expect("data file");
            assert_eq!(raw.len() as u64, f.length, "{what} {}", f.name);
        }
        // A file written raw is read back by dcp's side, and removed.
        let (fs, payload) = (store.fresh_fs(), b"raw bytes".to_vec());
        store.write_raw("extra.bin", payload.clone());
        let got = std::thread::spawn(move || {
            let mut buf = vec![0u8; 9];
            fs.read_into("extra.bin", 0, &mut buf).map(|_| buf)
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, payload, "{what}");
        store.remove_raw("extra.bin");
        assert_eq!(store.read_raw("extra.bin"), None, "{what}");
        assert_eq!(store.names(), all, "{what}");
        // An empty file.
        store.write_raw("empty.bin", Vec::new());
        assert_eq!(store.read_raw("empty.bin"), Some(Vec::new()), "{what}");
        assert_eq!(
            store.os_path().is_some(),
            backend.has_os_files(),
            "{what}: os_path"
        );
    }
}

/// Environment variable that turns [`moto_child`] on.
const CHILD: &str = "DCP_TESTS_MOTO_CHILD";

/// Child side of [`moto_stops_when_the_test_process_dies`]: start the
/// shared server, print its PID, then wait to be killed.
#[test]
fn moto_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let moto = moto_server();
    println!("MOTO_PID={}", moto.pid);
    std::thread::sleep(Duration::from_secs(120));
}

/// The moto server of a test binary goes away with the binary, even when
/// it is killed with `SIGKILL` (nothing of it runs at exit).
#[test]
fn moto_stops_when_the_test_process_dies() {
    if !backends().contains(&Backend::S3) {
        eprintln!("SKIPPED: the s3 backend is not selected");
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "moto_child", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            // The harness prints "test moto_child ... " first, on the same line.
            if let Some((_, pid)) = line.split_once("MOTO_PID=") {
                let _ = tx.send(pid.trim().parse::<u32>().unwrap());
            }
        }
    });
    let pid = rx.recv_timeout(Duration::from_secs(90));
    child.kill().unwrap();
    child.wait().unwrap();
    let pid = pid.expect("the child started moto and printed its PID");
    let proc_dir = format!("/proc/{pid}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&proc_dir).exists() {
        assert!(
            Instant::now() < deadline,
            "moto (PID {pid}) still runs 20 s after its test process was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private server ([`moto::Moto::start`], as `dcp-fsspec`'s tests use to
/// kill one mid-save) is gone once `kill` returns, and `kill` twice is
/// harmless.
#[test]
fn a_private_moto_is_gone_when_killed() {
    if !backends().contains(&Backend::S3) {
        eprintln!("SKIPPED: the s3 backend is not selected");
        return;
    }
    let m = moto::Moto::start().expect("moto is installed");
    m.create_bucket("private");
    assert!(std::path::Path::new(&format!("/proc/{}", m.pid)).exists());
    m.kill();
    assert!(
        !std::path::Path::new(&format!("/proc/{}", m.pid)).exists(),
        "moto (PID {}) still runs after kill",
        m.pid
    );
    assert!(moto::http(m.port, "GET", "/", &[]).is_err());
    m.kill();
}

/// `OpendalFs` methods called on an async executor thread (here a tokio
/// task, as a `#[tokio::test]` body would) should block until done, as
/// `dcp_fsspec::runtime::block_on`'s documentation promises ("does not
/// panic when the calling thread is itself inside an async context; it only
/// blocks it"). Instead, once the task's tokio coop budget is spent (about
/// 128 operations on tokio resources without yielding), every tokio future
/// returns `Pending` and wakes itself at once, and `futures::executor::
/// block_on` polls it again on the same thread, with the same spent budget,
/// forever: the thread spins at 100% CPU. Wrapping the future in
/// `tokio::task::coop::unconstrained` in `block_on` would fix it.
#[test]
fn opendal_fs_called_in_a_tokio_task_does_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/ckpt", dir.path().display());
    let (tx, rx) = mpsc::channel();
    // The spinning thread is left behind when the check fails; the process
    // ends with the test binary.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let fs = dcp_fsspec::OpendalFs::from_url(&url, &HashMap::new()).unwrap();
            fs.write_atomic("x", b"hello", false).unwrap();
            for _ in 0..1000 {
                let mut b = [0u8; 5];
                fs.read_into("x", 0, &mut b).unwrap();
                assert_eq!(&b, b"hello");
            }
        });
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        "1000 reads of a 5-byte file from a tokio task did not finish in 30 s"
    );
}
