//! A real full disk: a small tmpfs mounted for the test (root only; skipped
//! with a message elsewhere, but required when `CI` is set, since CI runs as
//! root). A save that does not fit fails on every rank with an error that
//! says the disk is full, leaves no file of its own behind, and the
//! checkpoint saved before it still loads bit-exact.

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let parent = tempfile::tempdir().ok()?;
        let dir = parent.path().join("mnt");
        std::fs::create_dir(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Tmpfs {
            dir,
            _parent: parent,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn tensor(rank: u64, rows: u64, fill: u8) -> Vec<u8> {
    (0..rows * 1024)
        .map(|i| (i as u8).wrapping_mul(31) ^ fill ^ rank as u8)
        .collect()
}

/// Every rank saves `rows` rows of a [4 * rows, 1024] u8 tensor.
async fn save_all(dir: &Path, rows: u64, fill: u8) -> Vec<Result<SaveResult>> {
    let dir = dir.to_path_buf();
    run_ranks(4, Duration::from_secs(30), move |g| {
        let dir = dir.clone();
        async move {
            let r = g.rank() as u64;
            let mut sd = StateDict::new();
            sd.insert_tensor(
                "w",
                DType::U8,
                vec![4 * rows, 1024],
                vec![TensorChunk {
                    region: ChunkBox::new(vec![r * rows, 0], vec![rows, 1024])?,
                    data: Bytes::from(tensor(r, rows, fill)).into(),
                }],
                false,
            )?;
            let w = dcp_fs::writer(&dir, WriterOptions::default().thread_count(2))?;
            save(&sd, &w, &g).await
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_that_does_not_fit_fails_everywhere_and_keeps_the_old_checkpoint() {
    let Some(fs) = Tmpfs::mount("2m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    // 4 ranks x 128 KiB fits; 4 ranks x 1 MiB does not.
    for r in save_all(&fs.dir, 128, 1).await {
        r.unwrap();
    }
    let before: Vec<String> = names(&fs.dir);
    let metadata_before = std::fs::read(fs.dir.join(".metadata")).unwrap();

    let results = save_all(&fs.dir, 1024, 2).await;
    for r in &results {
        let e = r.as_ref().unwrap_err();
        // The kind survives crossing ranks: every rank sees StorageFull.
        assert_eq!(e.kind(), ErrorKind::StorageFull, "{e}");
        assert!(!e.is_temporary(), "{e}");
        assert!(e.to_string().contains("No space left on device"), "{e}");
        assert!(e.rank().is_some(), "the error names the failing rank: {e}");
    }
    assert_eq!(
        std::fs::read(fs.dir.join(".metadata")).unwrap(),
        metadata_before
    );
    assert_eq!(names(&fs.dir), before, "the failed save left files behind");

    // The old checkpoint loads bit-exact.
    let mut dest = DestStateDict::new();
    dest.want_tensor(
        "w",
        DType::U8,
        vec![512, 1024],
        vec![ChunkBox::full(&[512, 1024])],
    )
    .unwrap();
    let r = dcp_fs::reader(&fs.dir, ReaderOptions::default());
    let out = load(dest, &r, &Single).await.unwrap();
    let mut expect = Vec::new();
    for rank in 0..4 {
        expect.extend(tensor(rank, 128, 1));
    }
    assert_eq!(out.state_dict.tensor("w").unwrap().chunks[0].data, expect);
    // And a save that fits succeeds again.
    for r in save_all(&fs.dir, 64, 3).await {
        r.unwrap();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
