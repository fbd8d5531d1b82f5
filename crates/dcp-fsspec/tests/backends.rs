//! The same save/load/commit-protocol cases against every backend: OpenDAL
//! memory, OpenDAL fs (a temporary directory), and real servers on
//! 127.0.0.1: S3 (moto), GCS (fake-gcs-server) and Azure Blob (Azurite),
//! each skipped with a message when the server is not installed and `CI`
//! is unset.

mod common;

use common::*;
use dcp_core::*;
use dcp_fsspec::OpendalFs;
use dcp_testkit::azurite::Azurite;
use dcp_testkit::gcs::FakeGcs;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// A backend under test: its URL, storage options, and whatever must live
/// as long as the test (the moto server, the temporary directory).
struct Backend {
    url: String,
    options: HashMap<String, String>,
    moto: Option<&'static Moto>,
    bucket: String,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    fn new(kind: &str) -> Option<Backend> {
        let name = unique(kind);
        Some(match kind {
            "memory" => Backend {
                url: format!("memory://{name}/ckpt/step-1"),
                options: HashMap::new(),
                moto: None,
                bucket: name,
                _dir: None,
            },
            "fs" => {
                let dir = tempfile::tempdir().unwrap();
                Backend {
                    url: format!("file://{}/ckpt", dir.path().display()),
                    options: HashMap::new(),
                    moto: None,
                    bucket: String::new(),
                    _dir: Some(dir),
                }
            }
            "s3" => {
                let moto = Moto::shared()?;
                moto.create_bucket(&name);
                Backend {
                    url: format!("s3://{name}/ckpt/step-1"),
                    options: moto.options(),
                    moto: Some(moto),
                    bucket: name,
                    _dir: None,
                }
            }
            "gcs" => {
                let gcs = FakeGcs::shared()?;
                gcs.create_bucket(&name);
                Backend {
                    url: format!("gs://{name}/ckpt/step-1"),
                    options: gcs.options(),
                    moto: None,
                    bucket: name,
                    _dir: None,
                }
            }
            "azblob" => {
                let az = Azurite::shared()?;
                az.create_container(&name);
                Backend {
                    url: format!("azblob://{name}/ckpt/step-1"),
                    options: az.options(),
                    moto: None,
                    bucket: name,
                    _dir: None,
                }
            }
            _ => unreachable!(),
        })
    }

    fn fs(&self) -> OpendalFs {
        OpendalFs::from_url_with(&self.url, &self.options, fast_options()).unwrap()
    }

    fn no_pending_uploads(&self) {
        if let Some(m) = &self.moto {
            assert_eq!(
                m.pending_uploads(&self.bucket),
                0,
                "multipart uploads left behind"
            );
        }
    }
}

fn opts(threads: usize) -> WriterOptions {
    WriterOptions::default().thread_count(threads)
}

async fn roundtrip(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let fs: Arc<dyn FileSystem> = Arc::new(b.fs());
    let caps = fs.capabilities();
    assert!(caps.atomic_replace && caps.list);
    assert_eq!(caps.durable_sync, kind != "memory");
    let saved = save_ranks(fs.clone(), 4, 11, 0, opts(2), T).await;
    all_ok(&saved);
    let md = saved[0].as_ref().unwrap().metadata.clone();
    assert_eq!(md.world_size, 4);
    assert_only_referenced(fs.as_ref(), &md, None);
    // A fresh file system on the same URL sees the checkpoint.
    let fs2: Arc<dyn FileSystem> = Arc::new(b.fs());
    all_ok(&load_and_check(fs2, 3, 11, 4, 0, T).await);
    b.no_pending_uploads();
}

async fn by_url(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let (url, so) = (b.url.clone(), b.options.clone());
    let res = dcp_core::local::run_ranks(4, T, move |g| {
        let (url, so) = (url.clone(), so.clone());
        async move {
            let sd = state_dict(5, g.rank() as u64, 4, 0)?;
            let w = dcp_fsspec::writer_with(&url, &so, opts(2), fast_options())?;
            assert_eq!(w.options().thread_count, 2);
            save(&sd, &w, &g).await
        }
    })
    .await;
    all_ok(&res);
    // Load through dcp_fsspec::reader (3 ranks, column blocks).
    let (url, so) = (b.url.clone(), b.options.clone());
    let res = dcp_core::local::run_ranks(3, T, move |g| {
        let (url, so) = (url.clone(), so.clone());
        async move {
            let c = COLS * g.rank() as u64 / 3;
            let c2 = COLS * (g.rank() as u64 + 1) / 3;
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![ROWS, COLS],
                vec![ChunkBox::new(vec![0, c], vec![ROWS, c2 - c])?],
            )?;
            let r = dcp_fsspec::reader(&url, &so, ReaderOptions::default())?;
            assert!(dcp_core::StorageReader::file_system_reader(&r).is_some());
            let out = load(dest, &r, &g).await?;
            let mut expect = Vec::new();
            for row in 0..ROWS {
                for col in c..c2 {
                    expect.extend_from_slice(&elem(5, row * COLS + col, 2));
                }
            }
            assert!(out.state_dict.tensor("w").unwrap().chunks[0].data == expect);
            Ok(())
        }
    })
    .await;
    all_ok(&res);
    // `open` (the CLI's entry point) sees the same files.
    let fs = dcp_fsspec::open(&b.url, &b.options).unwrap();
    assert!(fs.file_len(".metadata").unwrap().is_some());
}

async fn second_save_replaces_first(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let fs: Arc<dyn FileSystem> = Arc::new(b.fs());
    let first = save_ranks(fs.clone(), 4, 1, 0, opts(3), T).await;
    all_ok(&first);
    let first_md = first[0].as_ref().unwrap().metadata.clone();
    let second = save_ranks(fs.clone(), 4, 2, 0, opts(1), T).await;
    all_ok(&second);
    let md = second[0].as_ref().unwrap().metadata.clone();
    assert_ne!(md.save_id, first_md.save_id);
    // The replaced checkpoint's files stay until the next commit.
    assert!(second[0].as_ref().unwrap().removed.is_empty());
    assert_only_referenced(fs.as_ref(), &md, Some(&first_md));
    all_ok(&load_and_check(fs.clone(), 3, 2, 4, 0, T).await);
    let third = save_ranks(fs.clone(), 4, 3, 0, opts(2), T).await;
    all_ok(&third);
    let removed = &third[0].as_ref().unwrap().removed;
    let mut old: Vec<String> = first_md.files.iter().map(|f| f.name.clone()).collect();
    old.sort();
    let mut removed = removed.clone();
    removed.sort();
    assert_eq!(
        removed, old,
        "every file of the first save is removed by the third"
    );
    let third_md = third[0].as_ref().unwrap().metadata.clone();
    assert_eq!(third_md.generation, md.generation + 1);
    assert_only_referenced(fs.as_ref(), &third_md, Some(&md));
    all_ok(&load_and_check(fs, 3, 3, 4, 0, T).await);
    b.no_pending_uploads();
}

async fn overwrite_false_refused(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let fs: Arc<dyn FileSystem> = Arc::new(b.fs());
    all_ok(&save_ranks(fs.clone(), 2, 1, 0, opts(1), T).await);
    let before = fs.list().unwrap();
    let refused = save_ranks(
        fs.clone(),
        2,
        2,
        0,
        WriterOptions::default().overwrite(false),
        T,
    )
    .await;
    for r in &refused {
        let e = r.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert!(e.message().contains("already exists"), "{e}");
    }
    assert_eq!(fs.list().unwrap(), before, "nothing written or removed");
    // Still the first checkpoint (saved by 2 ranks; read back by 3).
    all_ok(&load_and_check(fs, 3, 1, 2, 0, T).await);
}

async fn read_errors(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let fs = b.fs();
    fs.prepare().unwrap();
    let mut sink = fs.create("__0_0-x.dcp").unwrap();
    sink.write(bytes::Bytes::from(vec![1u8; 1000])).unwrap();
    sink.write(bytes::Bytes::from(vec![2u8; 24])).unwrap();
    assert_eq!(sink.finish(true).unwrap(), 1024);
    assert_eq!(fs.file_len("__0_0-x.dcp").unwrap(), Some(1024));
    let mut buf = vec![0u8; 30];
    fs.read_into("__0_0-x.dcp", 990, &mut buf).unwrap();
    assert_eq!(&buf[..10], &[1u8; 10]);
    assert_eq!(&buf[10..], &[2u8; 20]);
    for (off, len) in [(1000usize, 100usize), (1024, 1), (5000, 10), (1025, 0)] {
        let mut buf = vec![0u8; len];
        let e = fs
            .read_into("__0_0-x.dcp", off as u64, &mut buf)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{off}+{len}: {e}");
        assert!(e.message().contains("__0_0-x.dcp"), "{e}");
    }
    let e = fs.read_into("missing.dcp", 0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(fs.file_len("missing.dcp").unwrap(), None);
    fs.remove("missing.dcp").unwrap();
    // Names that could leave the prefix are refused.
    assert_eq!(fs.create("../x").err().unwrap().kind(), ErrorKind::Corrupt);
    assert_eq!(
        fs.read_into("a/b", 0, &mut buf).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    // A big read split into concurrent ranges (read_chunk is 1 MiB here).
    let data: Vec<u8> = (0..(5u32 << 20) + 123).map(|i| (i % 251) as u8).collect();
    let mut sink = fs.create("__0_1-x.dcp").unwrap();
    sink.write(bytes::Bytes::from(data.clone())).unwrap();
    sink.finish(true).unwrap();
    let mut buf = vec![0u8; data.len() - 7];
    fs.read_into("__0_1-x.dcp", 7, &mut buf).unwrap();
    assert!(buf == data[7..]);
    // write_atomic replaces; remove removes.
    fs.write_atomic("small", b"one", true).unwrap();
    fs.write_atomic("small", b"two!", true).unwrap();
    assert_eq!(fs.read_small("small", 100).unwrap(), b"two!");
    fs.remove("small").unwrap();
    assert_eq!(fs.file_len("small").unwrap(), None);
    let names: Vec<_> = fs
        .list()
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.length))
        .collect();
    assert_eq!(
        names,
        vec![
            ("__0_0-x.dcp".to_string(), 1024),
            ("__0_1-x.dcp".to_string(), data.len() as u64)
        ]
    );
}

async fn abort_leaves_nothing(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let fs = b.fs();
    fs.prepare().unwrap();
    let mut sink = fs.create("__0_0-abort.dcp").unwrap();
    // Two full 5 MiB parts and some: a multipart upload is in progress.
    sink.write(bytes::Bytes::from(vec![3u8; 11 << 20])).unwrap();
    sink.abort();
    assert_eq!(fs.file_len("__0_0-abort.dcp").unwrap(), None);
    assert!(fs.list().unwrap().is_empty());
    b.no_pending_uploads();
}

/// The commit's compare-and-swap: on S3 and Azure Blob, `version` is the
/// ETag and `replace_if` a PUT with `If-Match` (or `If-None-Match: *`); on
/// GCS `version` is the object's generation and `replace_if` an upload
/// with `ifGenerationMatch` (0 for "absent"). The server refuses either once
/// the object changed. Services without conditional writes (memory, fs)
/// refuse both with `Unsupported` (dcp then compares under its lease).
async fn conditional_replace(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let fs = b.fs();
    fs.prepare().unwrap();
    if !matches!(kind, "s3" | "gcs" | "azblob") {
        for e in [
            fs.version("f").unwrap_err(),
            fs.replace_if("f", b"x", true, None).unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{kind}: {e}");
        }
        return;
    }
    if kind == "gcs" {
        return gcs_generation_preconditions(&b);
    }
    assert_eq!(fs.version("f").unwrap(), None, "absent");
    assert!(fs.replace_if("f", b"one", true, None).unwrap(), "created");
    assert!(!fs.replace_if("f", b"two", true, None).unwrap(), "exists");
    let v1 = fs.version("f").unwrap().expect("an ETag or a generation");
    assert_eq!(fs.version("f").unwrap().as_deref(), Some(&v1[..]), "stable");
    // Another writer replaces it: a swap based on v1 is refused.
    fs.write_atomic("f", b"other", true).unwrap();
    let v2 = fs.version("f").unwrap().unwrap();
    assert_ne!(v1, v2);
    assert!(!fs.replace_if("f", b"two", true, Some(&v1)).unwrap());
    assert_eq!(
        fs.read_small("f", 100).unwrap(),
        b"other",
        "nothing written"
    );
    assert!(fs.replace_if("f", b"two", true, Some(&v2)).unwrap());
    assert_eq!(fs.read_small("f", 100).unwrap(), b"two");
}

/// GCS: `version` is the generation, and `replace_if` uploads with
/// `ifGenerationMatch` (0 when the object must be absent), seen on the wire
/// through a proxy. fake-gcs-server (1.54) ignores generation preconditions
/// on uploads, so that the store refuses a stale one is not checkable
/// here; real GCS refuses it with 412, which is `Ok(false)` as on S3.
fn gcs_generation_preconditions(b: &Backend) {
    let gcs = FakeGcs::shared().unwrap();
    let proxy = dcp_testkit::TcpProxy::start(gcs.port()).unwrap();
    let mut so = b.options.clone();
    so.insert("endpoint".into(), proxy.endpoint());
    let fs = OpendalFs::from_url_with(&b.url, &so, fast_options()).unwrap();
    assert_eq!(fs.version("f").unwrap(), None, "absent");
    assert!(fs.replace_if("f", b"one", true, None).unwrap(), "created");
    let v1 = fs.version("f").unwrap().expect("a generation");
    assert!(v1.parse::<u64>().is_ok(), "a generation is a number: {v1}");
    fs.write_atomic("f", b"other", true).unwrap();
    let v2 = fs.version("f").unwrap().unwrap();
    assert_ne!(v1, v2, "a new generation");
    assert!(fs.replace_if("f", b"two", true, Some(&v2)).unwrap());
    assert_eq!(fs.read_small("f", 100).unwrap(), b"two");
    let uploads: Vec<String> = proxy
        .request_targets()
        .into_iter()
        .filter(|r| r.starts_with("POST /upload/"))
        .collect();
    assert_eq!(uploads.len(), 3, "{uploads:?}");
    assert!(uploads[0].contains("ifGenerationMatch=0"), "{uploads:?}");
    assert!(!uploads[1].contains("ifGenerationMatch"), "{uploads:?}");
    assert!(
        uploads[2].contains(&format!("ifGenerationMatch={v2}")),
        "{uploads:?}"
    );
}

/// `read_small`: empty objects, objects at and over the limit, and missing
/// ones.
async fn small_reads(kind: &str) {
    let Some(b) = Backend::new(kind) else { return };
    let fs = b.fs();
    fs.prepare().unwrap();
    fs.write_atomic("empty", b"", true).unwrap();
    assert_eq!(
        fs.read_small("empty", 10).unwrap(),
        Vec::<u8>::new(),
        "{kind}"
    );
    fs.write_atomic("ten", &[7u8; 10], true).unwrap();
    assert_eq!(fs.read_small("ten", 10).unwrap(), vec![7u8; 10], "{kind}");
    let e = fs.read_small("ten", 9).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{kind}: {e}");
    assert!(e.message().contains("limit of 9"), "{kind}: {e}");
    let e = fs.read_small("missing", 9).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{kind}: {e}");
}

macro_rules! suite {
    ($kind:ident) => {
        mod $kind {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn roundtrip_4_ranks_to_3() {
                roundtrip(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writer_and_reader_by_url() {
                by_url(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn second_save_replaces_first_no_stale_objects() {
                second_save_replaces_first(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn overwrite_false_is_refused() {
                overwrite_false_refused(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reads_writes_and_errors() {
                read_errors(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn abort_leaves_no_object() {
                abort_leaves_nothing(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn small_reads_whole_or_refused() {
                small_reads(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn conditional_replace_compares_the_etag() {
                conditional_replace(stringify!($kind)).await
            }
        }
    };
}

suite!(memory);
suite!(fs);
#[cfg(feature = "s3")]
suite!(s3);
#[cfg(feature = "gcs")]
suite!(gcs);
#[cfg(feature = "azblob")]
suite!(azblob);

#[cfg(feature = "s3")]
/// Records of 12 MiB with 5 MiB parts: every data file is a multipart upload
/// of several concurrent parts; 4 ranks save, 3 load resharded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_records_larger_than_parts() {
    let Some(b) = Backend::new("s3") else { return };
    let fs: Arc<dyn FileSystem> = Arc::new(b.fs());
    let big_cols = 3 << 20; // f32: 12 MiB per row, one row per rank
    let saved = save_ranks(fs.clone(), 4, 7, big_cols, opts(2), T).await;
    all_ok(&saved);
    let md = saved[0].as_ref().unwrap().metadata.clone();
    let big: Vec<_> = md.files.iter().filter(|f| f.length >= 12 << 20).collect();
    assert_eq!(big.len(), 4, "{:?}", md.files);
    // An object completed from N multipart parts has an ETag ending in -N:
    // 12 MiB in 5 MiB parts is 3 parts.
    let dal = b.fs();
    for f in big {
        let m = dal.stat(&f.name).unwrap();
        let etag = m.etag().unwrap_or_default().trim_matches('"').to_string();
        assert!(etag.ends_with("-3"), "{}: etag {etag}", f.name);
    }
    assert_only_referenced(fs.as_ref(), &md, None);
    b.no_pending_uploads();
    all_ok(&load_and_check(fs, 3, 7, 4, big_cols, T).await);
}

/// Standard base64 of a big-endian CRC-32C, as S3's `x-amz-checksum-crc32c`.
#[cfg(feature = "s3")]
fn crc32c_header(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = crc32c::crc32c(bytes).to_be_bytes();
    let n = u32::from_be_bytes(b);
    let mut out: String = (0..5)
        .map(|i| {
            // 4 bytes = 32 bits: five 6-bit groups, then 2 bits padded.
            A[((n >> (26 - 6 * i)) & 63) as usize] as char
        })
        .collect();
    out.push(A[((n & 3) << 4) as usize] as char);
    out.push_str("==");
    out
}

/// The value of header `name` (lower case) in a request head.
#[cfg(feature = "s3")]
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[cfg(feature = "s3")]
/// S3 uploads carry CRC-32C checksums by default, seen on the wire through a
/// proxy: the multipart upload declares the algorithm, each part's
/// `x-amz-checksum-crc32c` is the CRC-32C of exactly the bytes that part
/// holds (recomputed here from the object read back: 12.6 MiB in parts of
/// 5 MiB), `.metadata`'s PUT carries the CRC-32C of its bytes, and the
/// checkpoint loads byte for byte. With `checksum_algorithm=none` no request
/// carries a checksum and the save is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_uploads_carry_crc32c_checksums() {
    let Some(moto) = Moto::shared() else { return };
    for off in [false, true] {
        let bucket = unique("crc");
        moto.create_bucket(&bucket);
        let proxy = dcp_testkit::TcpProxy::start(moto.port).unwrap();
        let mut so = moto.options();
        so.insert("endpoint".into(), proxy.endpoint());
        if off {
            so.insert("checksum_algorithm".into(), "none".into());
        }
        let url = format!("s3://{bucket}/ckpt");
        let fs: Arc<dyn FileSystem> =
            Arc::new(OpendalFs::from_url_with(&url, &so, fast_options()).unwrap());
        let big_cols = 3 << 20; // f32: one 12 MiB record
        let saved = save_ranks(fs.clone(), 1, 5, big_cols, opts(1), T).await;
        all_ok(&saved);
        let md = saved[0].as_ref().unwrap().metadata.clone();
        assert_eq!(md.files.len(), 1, "{:?}", md.files);
        let heads = proxy.request_heads();
        let direct = OpendalFs::from_url_with(&url, &moto.options(), fast_options()).unwrap();
        let file = &md.files[0];
        let mut data = vec![0u8; file.length as usize];
        direct.read_into(&file.name, 0, &mut data).unwrap();
        let part = fast_options().part_size;
        let mut parts = 0;
        for h in &heads {
            let line = h.lines().next().unwrap_or_default();
            let sent = header(h, "x-amz-checksum-crc32c");
            if off {
                assert!(
                    !h.to_ascii_lowercase().contains("x-amz-checksum"),
                    "a checksum with checksum_algorithm=none: {h}"
                );
                continue;
            }
            if line.starts_with(&format!("POST /{bucket}/ckpt/{}?uploads", file.name)) {
                assert_eq!(header(h, "x-amz-checksum-algorithm"), Some("CRC32C"), "{h}");
            }
            if let Some(q) = line.split_once("partNumber=") {
                let n: usize = q.1.split(['&', ' ']).next().unwrap().parse().unwrap();
                let bytes = &data[(n - 1) * part..(n * part).min(data.len())];
                assert_eq!(sent, Some(crc32c_header(bytes).as_str()), "part {n}: {h}");
                parts += 1;
            }
            if line.starts_with(&format!("PUT /{bucket}/ckpt/.metadata ")) {
                let md_bytes = direct.read_small(".metadata", 1 << 30).unwrap();
                assert_eq!(sent, Some(crc32c_header(&md_bytes).as_str()), "{h}");
            }
        }
        if !off {
            assert_eq!(
                parts,
                file.length.div_ceil(part as u64) as usize,
                "{heads:#?}"
            );
            assert_eq!(parts, 3);
        }
        all_ok(&load_and_check(fs, 1, 5, 1, big_cols, T).await);
        assert_eq!(moto.pending_uploads(&bucket), 0, "uploads left behind");
    }
}

#[cfg(feature = "s3")]
#[test]
fn s3_part_size_below_5_mib_is_refused() {
    let opts = dcp_fsspec::OpendalOptions {
        part_size: (5 << 20) - 1,
        ..Default::default()
    };
    let so: HashMap<String, String> =
        [("endpoint".to_string(), "http://127.0.0.1:9".to_string())].into();
    let e = OpendalFs::from_url_with("s3://b/p", &so, opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.message().contains("5 MiB"), "{e}");
    let so2: HashMap<String, String> = [("dcp_part_size".to_string(), "1MiB".to_string())].into();
    let e = OpendalFs::from_url("s3://b/p", &so2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // Other backends take any part size.
    OpendalFs::from_url("memory://any", &so2).unwrap();
}

#[test]
fn unknown_scheme_is_invalid_and_missing_feature_unsupported() {
    let e = dcp_fsspec::open("hdfs://nn/p", &HashMap::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.message().contains("hdfs://"), "{e}");
    assert!(e.message().contains("s3://"), "{e}");
    #[cfg(not(feature = "azblob"))]
    {
        let e = dcp_fsspec::open("azblob://c/p", &HashMap::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("`azblob` feature"), "{e}");
    }
}

/// The memory store is shared per name, and prefixes inside it are separate.
#[test]
fn memory_prefixes_are_separate() {
    let n = unique("mem");
    let a = dcp_fsspec::open(&format!("memory://{n}/a"), &HashMap::new()).unwrap();
    let a2 = dcp_fsspec::open(&format!("memory://{n}/a/"), &HashMap::new()).unwrap();
    let b = dcp_fsspec::open(&format!("memory://{n}/b"), &HashMap::new()).unwrap();
    a.write_atomic(".metadata", b"x", true).unwrap();
    assert_eq!(a2.read_small(".metadata", 10).unwrap(), b"x");
    assert_eq!(b.file_len(".metadata").unwrap(), None);
    assert!(b.list().unwrap().is_empty());
    assert_eq!(a.location(), format!("memory://{n}/a"));
}

/// Records the length each data file's sink is told before its first write.
#[derive(Debug)]
struct HintLayer {
    inner: Arc<dyn FileSystem>,
    hints: Arc<std::sync::Mutex<HashMap<String, (u64, bool)>>>,
}

struct HintSink {
    name: String,
    inner: Box<dyn FileSink>,
    hints: Arc<std::sync::Mutex<HashMap<String, (u64, bool)>>>,
    wrote: bool,
}

impl FileSink for HintSink {
    fn expect_len(&mut self, len: u64) {
        let before_writes = !self.wrote;
        self.hints
            .lock()
            .unwrap()
            .insert(self.name.clone(), (len, before_writes));
        self.inner.expect_len(len)
    }
    fn write(&mut self, buf: bytes::Bytes) -> Result<()> {
        self.wrote = true;
        self.inner.write(buf)
    }
    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        self.inner.finish(sync)
    }
    fn abort(self: Box<Self>) {
        self.inner.abort()
    }
}

impl dcp_core::layer::FileSystemLayer for HintLayer {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        Ok(Box::new(HintSink {
            name: name.to_string(),
            inner: self.inner.create(name)?,
            hints: self.hints.clone(),
            wrote: false,
        }))
    }
}

/// Every data file's sink is told its length before the first write (what
/// an S3 upload sizes its parts by), at least the length written and not
/// far above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_sinks_are_told_their_length_first() {
    let hints = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let inner: Arc<dyn FileSystem> = Arc::new(
        OpendalFs::from_url(&format!("memory://{}/p", unique("hint")), &HashMap::new()).unwrap(),
    );
    let fs: Arc<dyn FileSystem> = Arc::new(HintLayer {
        inner,
        hints: hints.clone(),
    });
    let saved = save_ranks(fs, 2, 3, 1 << 12, opts(2), T).await;
    all_ok(&saved);
    let md = saved[0].as_ref().unwrap().metadata.clone();
    let hints = hints.lock().unwrap().clone();
    assert_eq!(hints.len(), md.files.len(), "{hints:?}");
    for f in &md.files {
        let (hint, first) = hints[&f.name];
        assert!(first, "{}: told after a write", f.name);
        // Padding and prefixes: at most 64 + 64 bytes per record.
        let records: u64 = md
            .items
            .iter()
            .map(|(_, i)| match i {
                dcp_core::metadata::ItemMeta::Tensor { chunks, .. } => chunks.len() as u64,
                dcp_core::metadata::ItemMeta::Bytes { .. } => 1,
            })
            .sum();
        assert!(
            hint >= f.length && hint <= f.length + records * (64 + 64) + 4096,
            "{}: told {hint}, wrote {} ({records} records)",
            f.name,
            f.length
        );
    }
}
