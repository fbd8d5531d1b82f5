//! Hostile checkpoints: hand-crafted `.metadata` and planted files must give
//! a clear error (kind, and a message naming the item or file), never a
//! panic, a hang, an allocation beyond what the real files justify, or a
//! read or write outside the checkpoint directory.
//!
//! Metadata is crafted by building a `Metadata` value and framing it with
//! `dcp_tests::encode_metadata_current`, which bypasses `encode`'s
//! validation. Cases that could allocate absurdly run in a child process
//! (this test binary re-executed on one test) under `ulimit -v`, so an
//! allocation failure or abort fails the test instead of the whole run.
//! Inputs found by fuzzing live in `fuzz/regressions/<target>/` and are
//! replayed here too.

#[path = "../src/bin/crash_common/mod.rs"]
mod crash_common;

use bytes::Bytes;
use crash_common::{registry, TestCrc};
use dcp_core::metadata::{AppliedTransform, ChunkMeta, ItemMeta, Metadata};
use dcp_core::{
    load, read_metadata, save, ChunkBox, DType, DestStateDict, Error, ErrorKind, FileSystem,
    LoadResult, ReaderOptions, Single, StateDict, TensorChunk, WriterOptions,
};
use dcp_tests::{assert_error, encode_metadata_current, frame_metadata};
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Virtual memory limit of the bounded child process (KiB): 4 GiB, far
/// below any absurd allocation and far above what a small load needs.
const VMEM_LIMIT_KB: u64 = 4 << 20;
/// Every hostile load must end within this.
const DEADLINE: Duration = Duration::from_secs(30);

/// A small valid checkpoint in `<tmp>/ckpt`, with a sibling `<tmp>/outside`
/// directory holding files that no load or save may read or change.
struct Ckpt {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    outside: PathBuf,
    md: Metadata,
}

const ROWS: u64 = 4;
const COLS: u64 = 8;

fn w_bytes() -> Vec<u8> {
    (0..ROWS * COLS * 4).map(|i| (i * 7 + 3) as u8).collect()
}

fn cfg_bytes() -> Vec<u8> {
    (0..100u32).map(|i| (i * 13) as u8).collect()
}

impl Ckpt {
    /// Tensor `w` (f32 [4, 8]) in two row chunks and bytes item `cfg`, one
    /// rank, one data file; with `checksums`, every record carries a CRC.
    fn new(checksums: bool) -> Ckpt {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ckpt");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"must not be read or changed").unwrap();
        let w = w_bytes();
        let half = (w.len() / 2) as u64;
        let mut sd = StateDict::new();
        sd.insert_tensor(
            "w",
            DType::F32,
            vec![ROWS, COLS],
            vec![
                TensorChunk {
                    region: ChunkBox::new(vec![0, 0], vec![2, COLS]).unwrap(),
                    data: Bytes::copy_from_slice(&w[..half as usize]).into(),
                },
                TensorChunk {
                    region: ChunkBox::new(vec![2, 0], vec![2, COLS]).unwrap(),
                    data: Bytes::copy_from_slice(&w[half as usize..]).into(),
                },
            ],
            false,
        )
        .unwrap();
        sd.insert_bytes("cfg", cfg_bytes(), false).unwrap();
        let writer = dcp_fs::writer(
            &dir,
            WriterOptions::default()
                .sync_files(false)
                .extensions(if checksums {
                    vec![Arc::new(TestCrc::new())]
                } else {
                    vec![]
                }),
        )
        .unwrap();
        let md = dcp_core::local::block_on(save(&sd, &writer, &Single))
            .unwrap()
            .expect("save the base checkpoint")
            .metadata
            .as_ref()
            .clone();
        assert_eq!(md.files.len(), 1);
        Ckpt {
            _tmp: tmp,
            dir,
            outside,
            md,
        }
    }

    fn data_file(&self) -> String {
        self.md.files[0].name.clone()
    }

    fn put_md(&self, md: &Metadata) {
        std::fs::write(self.dir.join(".metadata"), encode_metadata_current(md)).unwrap();
    }

    fn fs(&self) -> Arc<dyn FileSystem> {
        Arc::new(dcp_fs::LocalFs::new(&self.dir))
    }

    /// Load `dest` on one rank, bounded by `DEADLINE`.
    fn load(&self, dest: DestStateDict) -> Result<LoadResult, Error> {
        let reader = dcp_fs::reader(&self.dir, ReaderOptions::default().registry(registry()));
        bounded_time(move || {
            dcp_core::local::block_on(load(dest, &reader, &Single)).expect("no runtime here")
        })
    }

    /// Load everything the base checkpoint holds.
    fn load_all(&self) -> Result<LoadResult, Error> {
        self.load(dest_all())
    }

    /// Every file under the outside directory with its bytes.
    fn outside_snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        snapshot(&self.outside)
    }
}

fn dest_all() -> DestStateDict {
    let mut d = DestStateDict::new();
    d.want_tensor(
        "w",
        DType::F32,
        vec![ROWS, COLS],
        vec![ChunkBox::full(&[ROWS, COLS])],
    )
    .unwrap();
    d.want_bytes("cfg").unwrap();
    d
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
    }
    out
}

/// Run `f` on a thread; panic if it takes longer than `DEADLINE` (a hang).
fn bounded_time<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "hostile input hung: no answer after {:?}",
                started.elapsed()
            )
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the load panicked"),
    }
}

/// Run the body of test `name` in a child process (this test binary, that
/// test only) under `ulimit -v`, so an absurd allocation or an abort fails
/// this test with the child's output instead of taking the run down.
fn bounded_memory(name: &str, body: impl FnOnce()) {
    if std::env::var("DCP_HOSTILE_CHILD").as_deref() == Ok(name) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {VMEM_LIMIT_KB} && exec \"$0\" --exact {name} --include-ignored --test-threads 1 --nocapture"
        ))
        .arg(exe)
        .env("DCP_HOSTILE_CHILD", name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the bounded child");
    loop {
        if child.try_wait().expect("poll child").is_some() {
            break;
        }
        if started.elapsed() > DEADLINE * 2 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: hung under the memory bound");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("child output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} failed under a {} GiB address-space limit ({}):\n{text}",
        VMEM_LIMIT_KB >> 20,
        out.status
    );
}

fn load_err(c: &Ckpt, dest: DestStateDict) -> Error {
    match c.load(dest) {
        Ok(_) => panic!("a hostile checkpoint loaded"),
        Err(e) => e,
    }
}

fn w_chunks(md: &mut Metadata) -> &mut Vec<ChunkMeta> {
    for (name, item) in &mut md.items {
        if name == "w" {
            if let ItemMeta::Tensor { chunks, .. } = item {
                return chunks;
            }
        }
    }
    panic!("no tensor w")
}

// ---------------------------------------------------------------------------
// Paths: nothing outside the directory
// ---------------------------------------------------------------------------

#[test]
fn file_names_that_leave_the_directory_are_refused() {
    let c = Ckpt::new(false);
    let before = c.outside_snapshot();
    // A copy of the real data file outside, so following a bad name would
    // make the load succeed.
    std::fs::copy(c.dir.join(c.data_file()), c.outside.join("copy.dcp")).unwrap();
    let before_copy = c.outside_snapshot();
    assert_eq!(before.len() + 1, before_copy.len());
    let long = "a".repeat(256);
    let bad: Vec<String> = vec![
        "../outside/copy.dcp".into(),
        c.outside.join("copy.dcp").display().to_string(),
        "/etc/hostname".into(),
        "sub/x.dcp".into(),
        "..".into(),
        ".".into(),
        String::new(),
        "a\\b.dcp".into(),
        "x..y".into(),
        "a\0b".into(),
        "é.dcp".into(),
        long,
    ];
    for name in &bad {
        let mut md = c.md.clone();
        md.files[0].name = name.clone();
        c.put_md(&md);
        let e = load_err(&c, dest_all());
        assert_error(
            &e,
            ErrorKind::Corrupt,
            &["invalid metadata", "not a plain name"],
        );
        assert!(e.message().contains(&format!("{name:?}")), "{e}");
        // The same refusal without loading.
        let e = bounded_time({
            let r = dcp_fs::reader(&c.dir, ReaderOptions::default());
            move || dcp_core::local::block_on(read_metadata(&r)).unwrap()
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }
    // Names that would shadow the metadata file itself.
    for name in [".metadata", ".metadata.tmp"] {
        let mut md = c.md.clone();
        md.files[0].name = name.into();
        c.put_md(&md);
        let e = load_err(&c, dest_all());
        assert_error(&e, ErrorKind::Corrupt, &["shadows the metadata file", name]);
    }
    assert_eq!(c.outside_snapshot(), before_copy);
}

#[test]
fn symlinked_files_are_not_followed() {
    let c = Ckpt::new(false);
    let name = c.data_file();
    let real = c.dir.join(&name);
    // An identical copy outside: a load that followed the link would succeed.
    let copy = c.outside.join("copy.dcp");
    std::fs::rename(&real, &copy).unwrap();
    symlink(&copy, &real).unwrap();
    let before = c.outside_snapshot();
    let e = load_err(&c, dest_all());
    assert_error(&e, ErrorKind::Corrupt, &["symbolic link", &name]);
    // A link to a system file.
    if Path::new("/etc/hostname").exists() {
        std::fs::remove_file(&real).unwrap();
        symlink("/etc/hostname", &real).unwrap();
        let e = load_err(&c, dest_all());
        assert_error(&e, ErrorKind::Corrupt, &["symbolic link", &name]);
    }
    // `verify` reports it too, without reading through it.
    let report = dcp_core::verify::verify(c.fs().as_ref(), &c.md, &registry(), true, 1).unwrap();
    assert!(!report.is_sound());
    assert!(
        report.problems[0].message.contains("symbolic link"),
        "{:?}",
        report.problems
    );
    // `.metadata` itself as a link to valid metadata outside.
    std::fs::remove_file(&real).unwrap();
    std::fs::rename(&copy, &real).unwrap();
    assert!(c.load_all().is_ok(), "the restored checkpoint loads");
    let md_outside = c.outside.join("md");
    std::fs::rename(c.dir.join(".metadata"), &md_outside).unwrap();
    symlink(&md_outside, c.dir.join(".metadata")).unwrap();
    let e = load_err(&c, dest_all());
    assert_error(&e, ErrorKind::Corrupt, &[".metadata"]);
    assert!(e.message().contains("symbolic link"), "{e}");
    let mut after = c.outside_snapshot();
    after.remove(&md_outside);
    let mut before = before;
    before.remove(&copy);
    assert_eq!(after, before);
}

#[test]
fn saving_over_planted_links_changes_nothing_outside() {
    let c = Ckpt::new(false);
    let victim = c.outside.join("victim");
    symlink(&victim, c.dir.join("__0_0-0000000000000000.dcp")).unwrap();
    symlink(&victim, c.dir.join("__7_0-planted.dcp")).unwrap();
    symlink(&victim, c.dir.join(".metadata.tmp")).unwrap();
    let before = c.outside_snapshot();
    let mut sd = StateDict::new();
    sd.insert_bytes("cfg", b"new".to_vec(), false).unwrap();
    let writer = dcp_fs::writer(&c.dir, WriterOptions::default()).unwrap();
    let first = bounded_time({
        let (sd, writer) = (sd.clone(), writer.clone());
        move || dcp_core::local::block_on(save(&sd, &writer, &Single)).unwrap()
    });
    // The planted `.metadata.tmp` link may make the first commit fail (it is
    // refused, not written through); the old checkpoint is then intact.
    if let Err(e) = &first {
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(
            c.load_all()
                .expect("old checkpoint intact")
                .metadata
                .save_id,
            c.md.save_id
        );
        bounded_time(move || dcp_core::local::block_on(save(&sd, &writer, &Single)).unwrap())
            .expect("the second save commits");
    }
    assert_eq!(c.outside_snapshot(), before, "a file outside changed");
    assert!(victim.exists());
    // The new checkpoint loads; the planted links were neither followed nor
    // counted as data.
    let mut d = DestStateDict::new();
    d.want_bytes("cfg").unwrap();
    let out = c.load(d).unwrap();
    assert_eq!(out.state_dict.bytes("cfg"), Some(&b"new"[..]));
}

// ---------------------------------------------------------------------------
// Files that are not regular files
// ---------------------------------------------------------------------------

#[test]
fn data_file_replaced_by_a_directory() {
    let c = Ckpt::new(false);
    let name = c.data_file();
    std::fs::remove_file(c.dir.join(&name)).unwrap();
    std::fs::create_dir(c.dir.join(&name)).unwrap();
    let e = load_err(&c, dest_all());
    assert_error(&e, ErrorKind::Corrupt, &["is a directory", &name]);
}

#[test]
fn data_file_replaced_by_a_fifo_does_not_hang() {
    let c = Ckpt::new(false);
    let name = c.data_file();
    std::fs::remove_file(c.dir.join(&name)).unwrap();
    let made = Command::new("mkfifo").arg(c.dir.join(&name)).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("mkfifo unavailable: skipped");
        return;
    }
    let e = load_err(&c, dest_all());
    assert_error(&e, ErrorKind::Corrupt, &["not a regular file", &name]);
}

#[test]
fn metadata_replaced_by_a_directory() {
    let c = Ckpt::new(false);
    std::fs::remove_file(c.dir.join(".metadata")).unwrap();
    std::fs::create_dir(c.dir.join(".metadata")).unwrap();
    let e = load_err(&c, dest_all());
    assert_error(&e, ErrorKind::Corrupt, &[".metadata", "is a directory"]);
}

// ---------------------------------------------------------------------------
// Lengths, counts and offsets beyond the files
// ---------------------------------------------------------------------------

#[test]
fn metadata_header_claiming_10_gb() {
    let c = Ckpt::new(false);
    let mut raw = std::fs::read(c.dir.join(".metadata")).unwrap();
    raw[16..24].copy_from_slice(&(10u64 << 30).to_le_bytes());
    std::fs::write(c.dir.join(".metadata"), &raw).unwrap();
    let e = load_err(&c, dest_all());
    assert_error(&e, ErrorKind::Corrupt, &[".metadata", "truncated"]);
    assert!(e.message().contains(&(10u64 << 30).to_string()), "{e}");
}

#[test]
fn sparse_metadata_file_of_5_gib_is_not_read() {
    bounded_memory("sparse_metadata_file_of_5_gib_is_not_read", || {
        let c = Ckpt::new(false);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.dir.join(".metadata"))
            .unwrap();
        f.set_len(5 << 30).unwrap();
        let started = Instant::now();
        let e = load_err(&c, dest_all());
        assert_error(
            &e,
            ErrorKind::Corrupt,
            &[".metadata", "more than the limit"],
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "it read the file"
        );
    });
}

#[test]
fn body_claiming_2_pow_60_entries() {
    bounded_memory("body_claiming_2_pow_60_entries", || {
        let c = Ckpt::new(false);
        let good = postcard::to_allocvec(&c.md).unwrap();
        // save_id (len + 16 bytes), world size, format: then the file count.
        let at = 1 + c.md.save_id.len() + 1 + 1;
        let huge = [0x80u8, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]; // 2^60
        for (what, pos) in [("files", at), ("items (after files)", good.len() - 4)] {
            let mut body = good[..pos].to_vec();
            body.extend_from_slice(&huge);
            body.extend_from_slice(&good[pos + 1..]);
            let framed = frame_metadata(&body, dcp_core::metadata::FORMAT_VERSION);
            std::fs::write(c.dir.join(".metadata"), &framed).unwrap();
            let started = Instant::now();
            let e = load_err(&c, dest_all());
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
            assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        }
    });
}

#[test]
fn record_offsets_past_the_recorded_file_end() {
    let c = Ckpt::new(false);
    let name = c.data_file();
    let len = c.md.files[0].length;
    for (offset, length) in [(len, 64), (len - 8, 64), (u64::MAX - 10, 64), (0, len + 1)] {
        let mut md = c.md.clone();
        let ch = &mut w_chunks(&mut md)[1];
        ch.storage.offset = offset;
        ch.storage.length = length;
        c.put_md(&md);
        let e = load_err(&c, dest_all());
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(
            e.message().contains("w:") && e.message().contains(&name),
            "error names neither the item nor the file: {e}"
        );
    }
}

#[test]
fn truncated_data_file_is_detected_naming_item_file_and_offset() {
    let c = Ckpt::new(false);
    let name = c.data_file();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.dir.join(&name))
        .unwrap();
    // Cut into the last record (`cfg` or `w`'s second chunk).
    let last =
        c.md.records()
            .max_by_key(|(_, _, s)| s.offset)
            .map(|(n, _, s)| (n.to_string(), s.offset))
            .unwrap();
    f.set_len(last.1 + 3).unwrap();
    let e = load_err(&c, dest_all());
    assert_error(
        &e,
        ErrorKind::Corrupt,
        &[&last.0, &name, &last.1.to_string()],
    );
    // verify reports the length too.
    let report = dcp_core::verify::verify(c.fs().as_ref(), &c.md, &registry(), true, 1).unwrap();
    assert!(report.problems.iter().any(|p| p.file == name));
}

#[test]
fn overlapping_and_out_of_shape_chunks() {
    let c = Ckpt::new(false);
    let mut md = c.md.clone();
    w_chunks(&mut md)[1].region = ChunkBox::new(vec![1, 0], vec![2, COLS]).unwrap();
    c.put_md(&md);
    assert_error(
        &load_err(&c, dest_all()),
        ErrorKind::Corrupt,
        &["w", "overlap"],
    );

    let mut md = c.md.clone();
    w_chunks(&mut md)[1].region = ChunkBox::new(vec![3, 0], vec![2, COLS]).unwrap();
    c.put_md(&md);
    assert_error(
        &load_err(&c, dest_all()),
        ErrorKind::Corrupt,
        &["w", "extends past"],
    );

    let mut md = c.md.clone();
    w_chunks(&mut md)[1].region = ChunkBox::new(vec![2], vec![2]).unwrap();
    c.put_md(&md);
    assert_error(
        &load_err(&c, dest_all()),
        ErrorKind::Corrupt,
        &["w", "rank"],
    );

    let mut md = c.md.clone();
    if let ItemMeta::Tensor { shape, .. } = &mut md.items[1].1 {
        *shape = vec![u64::MAX, 3, 0, u64::MAX].into();
    }
    c.put_md(&md);
    assert_error(
        &load_err(&c, dest_all()),
        ErrorKind::Corrupt,
        &["w", "overflows"],
    );

    // Many empty chunks at one place, and a scalar with two chunks.
    let mut md = c.md.clone();
    let mut empty = w_chunks(&mut md)[0].clone();
    empty.region = ChunkBox::new(vec![0, 0], vec![0, COLS]).unwrap();
    empty.storage.length = 0;
    w_chunks(&mut md).extend(std::iter::repeat_n(empty, 1000));
    c.put_md(&md);
    let out = c.load_all().expect("empty chunks are harmless");
    assert_eq!(
        out.state_dict.tensor("w").unwrap().chunks[0].data,
        w_bytes()
    );
}

#[test]
fn transform_tables_out_of_range_or_unknown() {
    let c = Ckpt::new(false);
    let mut md = c.md.clone();
    w_chunks(&mut md)[0]
        .storage
        .transforms
        .push(AppliedTransform {
            descriptor: 7,
            value: vec![].into(),
            input_len: None,
        });
    c.put_md(&md);
    assert_error(
        &load_err(&c, dest_all()),
        ErrorKind::Corrupt,
        &["w", "transform index 7"],
    );

    let mut md = c.md.clone();
    // A descriptor no registered crate provides (a reader without dcp-ext
    // naming the crate it lacks is tested in dcp-core and transforms.rs).
    md.transforms = vec!["snappy/1".into()];
    w_chunks(&mut md)[0]
        .storage
        .transforms
        .push(AppliedTransform {
            descriptor: 0,
            value: vec![].into(),
            input_len: Some(64),
        });
    c.put_md(&md);
    assert_error(
        &load_err(&c, dest_all()),
        ErrorKind::Unsupported,
        &["snappy/1", "does not have"],
    );

    let mut md = c.md.clone();
    md.transforms = vec!["Bad Descriptor".into()];
    c.put_md(&md);
    assert_error(
        &load_err(&c, dest_all()),
        ErrorKind::Corrupt,
        &["Bad Descriptor"],
    );
}

#[test]
fn checksums_catch_every_flipped_byte() {
    let c = Ckpt::new(true);
    let name = c.data_file();
    let path = c.dir.join(&name);
    let good = std::fs::read(&path).unwrap();
    let out = c.load_all().expect("clean checkpoint loads");
    assert_eq!(
        out.state_dict.tensor("w").unwrap().chunks[0].data,
        w_bytes()
    );
    let mut flipped = 0;
    for (item, _, st) in c.md.records() {
        for at in [
            st.offset,
            st.offset + st.length / 2,
            st.offset + st.length - 1,
        ] {
            let mut bad = good.clone();
            bad[at as usize] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let e = load_err(&c, dest_all());
            assert_error(&e, ErrorKind::ChecksumMismatch, &[item, &name]);
            flipped += 1;
        }
    }
    assert_eq!(flipped, 9);
}

// Regressions of core bugs these tests found (fixed in dcp-core): the read
// pipeline allocated a record's (or a span's) claimed length before checking
// the real file, so a bytes item or a chunk claiming 2^40 bytes in a
// 300-byte file made the load allocate 1 TiB and abort; and `decode_record`
// overflowed on a bytes item claiming `u64::MAX` bytes.
#[test]
fn bytes_item_claiming_2_pow_40_bytes() {
    bounded_memory("bytes_item_claiming_2_pow_40_bytes", || {
        let c = Ckpt::new(false);
        let name = c.data_file();
        let mut md = c.md.clone();
        md.files[0].length = 1 << 41;
        for (n, item) in &mut md.items {
            if n == "cfg" {
                *item = ItemMeta::Bytes {
                    length: 1 << 40,
                    storage: dcp_core::metadata::StorageInfo {
                        file: 0,
                        offset: 0,
                        length: 1 << 40,
                        transforms: Default::default(),
                    },
                };
            }
        }
        c.put_md(&md);
        let mut d = DestStateDict::new();
        d.want_bytes("cfg").unwrap();
        let e = load_err(&c, d);
        assert_error(&e, ErrorKind::Corrupt, &["cfg", &name]);
    });
}

/// A 1 TiB chunk claimed in a checkpoint whose data file is tiny: loading
/// the 1 MiB destination `dest` out of it fails as `Corrupt`, naming the
/// item and the file, within the memory bound (nothing sized by the claim
/// is allocated).
fn huge_chunk_refused(label: &'static str, dest: ChunkBox) {
    bounded_memory(label, || {
        let c = Ckpt::new(false);
        let name = c.data_file();
        let mut md = c.md.clone();
        md.files[0].length = 1 << 41;
        md.items[1].1 = ItemMeta::Tensor {
            dtype: DType::U8,
            shape: vec![1 << 20, 1 << 20].into(),
            chunks: vec![ChunkMeta {
                region: ChunkBox::full(&[1 << 20, 1 << 20]),
                storage: dcp_core::metadata::StorageInfo {
                    file: 0,
                    offset: 0,
                    length: 1 << 40,
                    transforms: Default::default(),
                },
            }],
        };
        c.put_md(&md);
        let mut d = DestStateDict::new();
        d.want_tensor("w", DType::U8, vec![1 << 20, 1 << 20], vec![dest])
            .unwrap();
        let e = load_err(&c, d);
        assert_error(&e, ErrorKind::Corrupt, &["w", &name]);
    });
}

#[test]
fn chunk_claiming_2_pow_40_bytes_read_as_a_column() {
    // One column: 1 MiB of destination, spread over the whole chunk.
    huge_chunk_refused(
        "chunk_claiming_2_pow_40_bytes_read_as_a_column",
        ChunkBox::new(vec![0, 0], vec![1 << 20, 1]).unwrap(),
    );
}

#[test]
fn chunk_claiming_2_pow_40_bytes_read_as_a_row() {
    // The last row: 1 MiB of destination, read straight into it.
    huge_chunk_refused(
        "chunk_claiming_2_pow_40_bytes_read_as_a_row",
        ChunkBox::new(vec![(1 << 20) - 1, 0], vec![1, 1 << 20]).unwrap(),
    );
}

#[test]
fn bytes_item_with_checksum_claiming_u64_max_length() {
    let c = Ckpt::new(true);
    let mut md = c.md.clone();
    for (n, item) in &mut md.items {
        if n == "cfg" {
            if let ItemMeta::Bytes { length, .. } = item {
                *length = u64::MAX;
            }
        }
    }
    c.put_md(&md);
    let mut d = DestStateDict::new();
    d.want_bytes("cfg").unwrap();
    let e = load_err(&c, d);
    assert_error(&e, ErrorKind::Corrupt, &["cfg"]);
    assert!(!e.message().contains("panicked"), "{e}");
}

// ---------------------------------------------------------------------------
// Safetensors files stay valid whatever the item names
// ---------------------------------------------------------------------------

#[test]
fn safetensors_files_stay_valid_for_colliding_names() {
    use safetensors::SafeTensors;
    let mem = dcp_core::mem::MemoryFs::new("memory://names");
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    let mut sd = StateDict::new();
    // `w` in two chunks has keys `w@0` and `w@2`; the bytes items below
    // would collide with them, or with the header's own `__metadata__`,
    // without escaping.
    sd.insert_tensor(
        "w",
        DType::U8,
        vec![4],
        vec![
            TensorChunk {
                region: ChunkBox::new(vec![0], vec![2]).unwrap(),
                data: Bytes::from_static(&[1, 2]).into(),
            },
            TensorChunk {
                region: ChunkBox::new(vec![2], vec![2]).unwrap(),
                data: Bytes::from_static(&[3, 4]).into(),
            },
        ],
        false,
    )
    .unwrap();
    for name in ["w@0", "w@2", "w@@0", "@", "@__metadata__", "\"\\"] {
        sd.insert_bytes(name, name.as_bytes().to_vec(), false)
            .unwrap();
    }
    let writer = dcp_core::FileSystemWriter::new(
        fs,
        WriterOptions::default()
            .serialization_format(Arc::new(dcp_core::format::Safetensors))
            .sync_files(false),
    )
    .unwrap();
    let res = dcp_core::local::block_on(save(&sd, &writer, &Single))
        .unwrap()
        .expect("save");
    for f in &res.metadata.files {
        let bytes = mem.get(&f.name).unwrap();
        let st = SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{} is not a valid safetensors file: {e:?}", f.name));
        assert_eq!(st.len(), res.metadata.record_count());
    }
}

#[test]
fn safetensors_item_named_like_the_header_metadata() {
    use safetensors::SafeTensors;
    let mem = dcp_core::mem::MemoryFs::new("memory://names");
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    let mut sd = StateDict::new();
    sd.insert_bytes("__metadata__", b"x".to_vec(), false)
        .unwrap();
    let writer = dcp_core::FileSystemWriter::new(
        fs,
        WriterOptions::default()
            .serialization_format(Arc::new(dcp_core::format::Safetensors))
            .sync_files(false),
    )
    .unwrap();
    // Refusing the name with a clear error is as good as a valid file.
    match dcp_core::local::block_on(save(&sd, &writer, &Single)).unwrap() {
        Ok(res) => {
            let bytes = mem.get(&res.metadata.files[0].name).unwrap();
            SafeTensors::deserialize(&bytes).expect("a valid safetensors file");
        }
        Err(e) => assert_error(&e, ErrorKind::InvalidInput, &["__metadata__"]),
    }
}

// ---------------------------------------------------------------------------
// Inputs found by fuzzing
// ---------------------------------------------------------------------------

fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    out
}

/// Every saved `.metadata` input of `fuzz/regressions/metadata_decode/`
/// decodes to a clean result: an error of a metadata kind, or metadata that
/// validates and round-trips.
#[test]
fn fuzz_regressions_metadata_decode() {
    let inputs = regressions("metadata_decode");
    assert!(
        inputs.len() >= 6,
        "fuzz/regressions/metadata_decode holds {} inputs: the replay checks nothing",
        inputs.len()
    );
    let mut decoded = 0;
    for (path, bytes) in &inputs {
        let r = std::panic::catch_unwind(|| Metadata::decode(bytes));
        match r {
            Err(_) => panic!("{}: decode panicked", path.display()),
            Ok(Err(e)) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::Corrupt | ErrorKind::ChecksumMismatch | ErrorKind::Unsupported
                ),
                "{}: {e:?}",
                path.display()
            ),
            Ok(Ok(md)) => {
                assert_eq!(Metadata::decode(&md.encode().unwrap()).unwrap(), md);
                decoded += 1;
            }
        }
        // The seeds say what they are: only the valid one decodes.
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("seed-") {
            assert_eq!(
                Metadata::decode(bytes).is_ok(),
                name.starts_with("seed-valid"),
                "{name}"
            );
        }
    }
    assert!(
        decoded >= 1,
        "no regression input decodes: the round trip is unchecked"
    );
    eprintln!(
        "{} metadata_decode regression inputs replayed, {decoded} decoded",
        inputs.len()
    );
}
