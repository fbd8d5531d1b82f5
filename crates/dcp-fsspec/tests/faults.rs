//! Failures against a real S3 server (moto on 127.0.0.1): an injected fault
//! mid-save, the server killed mid-save, transient errors retried, a wrong
//! bucket and a dead endpoint. Skipped with a message when `moto_server` is
//! missing and `CI` is unset.
#![cfg(feature = "s3")]

mod common;

use bytes::Bytes;
use common::*;
use dcp_core::*;
use dcp_fsspec::{OpendalFs, OpendalOptions};
use dcp_testkit::moto::free_port;
use dcp_testkit::{Fault, FaultFs, Op, TcpProxy};
use opendal::{Buffer, HttpBody, HttpTransport, HttpTransporter, Operator};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn opts(threads: usize) -> WriterOptions {
    WriterOptions::default().thread_count(threads)
}

/// Every rank failed, with the same error.
fn all_failed<T: std::fmt::Debug>(rs: &[Result<T>]) -> &Error {
    let first = rs[0].as_ref().expect_err("rank 0 should fail");
    for (i, r) in rs.iter().enumerate() {
        let e = r.as_ref().expect_err("every rank should fail");
        assert_eq!(
            e.message(),
            first.message(),
            "rank {i} reports another error"
        );
        assert_eq!(e.kind(), first.kind());
    }
    first
}

/// A data file fails mid-save (a failed part write, or a failed completion):
/// every rank errors, the previous checkpoint stays committed and loadable,
/// no object of the failed save and no multipart upload remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_mid_save_keeps_previous_checkpoint() {
    let Some(moto) = Moto::shared() else { return };
    let bucket = unique("fault");
    moto.create_bucket(&bucket);
    let s3 = Arc::new(s3_fs(moto, &bucket, "ckpt", fast_options()));
    let big_cols = 3 << 20; // 12 MiB rows: multipart uploads
    all_ok(&save_ranks(s3.clone(), 4, 1, big_cols, opts(2), T).await);
    let before = s3.list().unwrap();
    let md_before = s3.read_small(".metadata", 1 << 20).unwrap();

    for fault in [
        Fault::FailNth {
            op: Op::Write,
            nth: 3,
        },
        Fault::FailNth {
            op: Op::Finish,
            nth: 2,
        },
        Fault::ShortWrite { nth: 5 },
    ] {
        let faulty = FaultFs::new(s3.clone());
        faulty.arm(fault.clone());
        let rs = save_ranks(Arc::new(faulty), 4, 2, big_cols, opts(2), T).await;
        let e = all_failed(&rs);
        assert!(e.message().contains("injected"), "{fault:?}: {e}");
        assert_eq!(
            s3.list().unwrap(),
            before,
            "{fault:?}: objects of the failed save remain"
        );
        assert_eq!(s3.read_small(".metadata", 1 << 20).unwrap(), md_before);
        assert_eq!(
            moto.pending_uploads(&bucket),
            0,
            "{fault:?}: multipart upload left"
        );
    }
    all_ok(&load_and_check(s3, 3, 1, 4, big_cols, T).await);
}

/// A file system that passes everything through and runs `hook` at the
/// `at`-th write (counting across all files and ranks).
struct HookFs {
    inner: Arc<dyn FileSystem>,
    writes: Arc<AtomicU64>,
    at: u64,
    hook: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for HookFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookFs")
            .field("inner", &self.inner)
            .finish()
    }
}

struct HookSink {
    inner: Box<dyn FileSink>,
    writes: Arc<AtomicU64>,
    at: u64,
    hook: Arc<dyn Fn() + Send + Sync>,
}

impl FileSink for HookSink {
    fn write(&mut self, buf: Bytes) -> Result<()> {
        if self.writes.fetch_add(1, Ordering::SeqCst) == self.at {
            (self.hook)();
        }
        self.inner.write(buf)
    }
    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        self.inner.finish(sync)
    }
    fn abort(self: Box<Self>) {
        self.inner.abort()
    }
}

/// Only `create` changes (its sink runs the hook); everything else is the
/// inner file system's own.
impl FileSystemLayer for HookFs {
    fn inner(&self) -> &dyn FileSystem {
        &*self.inner
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        Ok(Box::new(HookSink {
            inner: self.inner.create(name)?,
            writes: self.writes.clone(),
            at: self.at,
            hook: self.hook.clone(),
        }))
    }
}

/// The S3 server dies in the middle of a save: every rank returns the same
/// error, promptly (limited retries, bounded timeouts, collective deadline),
/// nothing hangs, and the checkpoint saved before is still there, byte for
/// byte.
///
/// The save talks to moto through a [`TcpProxy`], and the proxy is what is
/// killed (listener closed, every connection reset): to the save the server
/// is gone, while moto keeps its objects in memory, so the first checkpoint
/// can be checked afterwards over a direct connection. (Killing moto itself
/// would take its in-memory objects with it and leave nothing to check.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_save_fails_every_rank() {
    let Some(moto) = Moto::shared() else { return };
    let bucket = unique("killed");
    moto.create_bucket(&bucket);
    let big_cols = 3 << 20;
    let direct: Arc<dyn FileSystem> = Arc::new(s3_fs(moto, &bucket, "ckpt", fast_options()));
    all_ok(&save_ranks(direct.clone(), 4, 1, big_cols, opts(2), T).await);
    let md_before = direct.read_small(".metadata", 1 << 20).unwrap();

    let proxy = Arc::new(TcpProxy::start(moto.port).expect("start the proxy"));
    let url = format!("s3://{bucket}/ckpt");
    let s3 = through_proxy(moto, &proxy, &url);
    let p2 = proxy.clone();
    let fs: Arc<dyn FileSystem> = Arc::new(HookFs {
        inner: s3,
        writes: Arc::default(),
        at: 4,
        hook: Arc::new(move || p2.kill()),
    });
    let started = Instant::now();
    let rs = save_ranks(fs, 4, 3, big_cols, opts(2), Duration::from_secs(30)).await;
    let took = started.elapsed();
    let e = all_failed(&rs);
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(
        matches!(e.kind(), ErrorKind::Temporary | ErrorKind::Io),
        "{:?}: {e}",
        e.kind()
    );
    assert!(e.message().contains(&url), "{e}");
    // The server itself is alive behind the dead proxy: the first
    // checkpoint is committed unchanged and loads byte for byte.
    assert_eq!(direct.read_small(".metadata", 1 << 20).unwrap(), md_before);
    all_ok(&load_and_check(direct.clone(), 3, 1, 4, big_cols, T).await);
    eprintln!(
        "server killed mid-save (a TCP proxy in front of moto): every rank failed after {took:?}: \
         {e}; the previous checkpoint loads byte for byte"
    );
}

/// The PUT of `.metadata` is stored by the server but its reply is lost (a
/// proxy in front of moto cuts the connection instead of forwarding it),
/// every retry too: the save cannot tell from the reply whether it
/// committed. The commit protocol reads `.metadata` back, finds its own
/// save there, and succeeds on every rank; the new checkpoint loads byte
/// for byte, and the one it replaced keeps its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_reply_to_the_commit_put_is_resolved_by_reading_back() {
    let metadata_of = |fs: &dyn FileSystem| {
        dcp_core::Metadata::decode(&fs.read_small(".metadata", 1 << 20).unwrap()).unwrap()
    };
    let Some(moto) = Moto::shared() else { return };
    let bucket = unique("lost-reply");
    moto.create_bucket(&bucket);
    let cols = 1 << 10;
    let direct: Arc<dyn FileSystem> = Arc::new(s3_fs(moto, &bucket, "ckpt", fast_options()));
    all_ok(&save_ranks(direct.clone(), 2, 1, cols, opts(1), T).await);
    let first: Vec<String> = metadata_of(direct.as_ref())
        .files
        .into_iter()
        .map(|f| f.name)
        .collect();

    let proxy = TcpProxy::start(moto.port).expect("start the proxy");
    proxy.drop_replies_to(Some(".metadata"));
    let fs = through_proxy(moto, &proxy, &format!("s3://{bucket}/ckpt"));
    let rs = save_ranks(fs, 2, 2, cols, opts(1), Duration::from_secs(60)).await;
    assert!(proxy.dropped() >= 1, "no reply was lost");
    all_ok(&rs);
    let md = metadata_of(direct.as_ref());
    assert_eq!(md.save_id, rs[0].as_ref().unwrap().metadata.save_id);
    all_ok(&load_and_check(direct.clone(), 3, 2, 2, cols, T).await);
    // The replaced checkpoint's files are kept until the next commit.
    for name in &first {
        assert!(
            direct.file_len(name).unwrap().is_some(),
            "{name} was removed"
        );
    }
    eprintln!(
        "lost replies to the commit's PUT: {} replies dropped; every rank succeeded, the new \
         checkpoint loads byte for byte",
        proxy.dropped()
    );
}

/// What the commit protocol costs on S3, in requests: a save that
/// replaces a checkpoint, by 1 rank and by 4, through a proxy that logs
/// every request. The protocol's own requests (lease, `.metadata`, listing)
/// do not grow with the ranks; only the data files do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_the_commit_protocol_do_not_grow_with_ranks() {
    let Some(moto) = Moto::shared() else { return };
    let mut protocol = Vec::new();
    for world in [1usize, 4] {
        let bucket = unique("requests");
        moto.create_bucket(&bucket);
        let proxy = TcpProxy::start(moto.port).expect("start the proxy");
        let fs = through_proxy(moto, &proxy, &format!("s3://{bucket}/ckpt"));
        all_ok(&save_ranks(fs.clone(), world, 1, 1 << 10, opts(1), T).await);
        proxy.clear_requests();
        all_ok(&save_ranks(fs, world, 2, 1 << 10, opts(1), T).await);
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for r in proxy.requests() {
            let (method, path) = r.split_once(' ').unwrap();
            let file = path.rsplit('/').next().unwrap_or("");
            let what = if file.ends_with(".dcp") {
                format!("{method} data file")
            } else if file.is_empty() || file == bucket {
                format!("{method} listing")
            } else {
                format!("{method} {file}")
            };
            *by.entry(what).or_default() += 1;
        }
        let data: usize = by
            .iter()
            .filter(|(k, _)| k.ends_with("data file"))
            .map(|(_, n)| n)
            .sum();
        let total: usize = by.values().sum();
        eprintln!(
            "a {world}-rank save replacing a checkpoint on S3: {total} requests, {} of the \
             protocol, {data} on data files: {by:?}",
            total - data
        );
        assert!(
            by.contains_key("PUT .lease") && by.contains_key("DELETE .lease"),
            "{by:?}"
        );
        assert_eq!(by.get("PUT .metadata"), Some(&1), "one commit: {by:?}");
        by.retain(|k, _| !k.ends_with("data file"));
        protocol.push(by);
    }
    assert_eq!(
        protocol[0], protocol[1],
        "the protocol's requests grew with the ranks"
    );
}

/// `url` on moto, reached through `proxy`, with few retries and short
/// timeouts so that a dead or lossy proxy ends a save promptly.
fn through_proxy(moto: &Moto, proxy: &TcpProxy, url: &str) -> Arc<dyn FileSystem> {
    let mut through = moto.options();
    through.insert("endpoint".into(), proxy.endpoint());
    let o = OpendalOptions {
        max_retries: 2,
        timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        ..fast_options()
    };
    Arc::new(OpendalFs::from_url_with(url, &through, o).unwrap())
}

/// S3 options for an operator built by hand (so a test can add layers or a
/// transport below dcp's retry layer).
fn s3_operator(moto: &Moto, bucket: &str, prefix: &str) -> Operator {
    let cfg: HashMap<String, String> = [
        ("bucket", bucket.to_string()),
        ("root", format!("/{prefix}/")),
        ("endpoint", moto.endpoint()),
        ("region", "us-east-1".to_string()),
        ("access_key_id", "testing".to_string()),
        ("secret_access_key", "testing".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Operator::from_iter::<opendal::services::S3>(cfg).unwrap()
}

fn chaos_options(retries: usize) -> OpendalOptions {
    OpendalOptions {
        max_retries: retries,
        retry_min_delay: Duration::from_millis(1),
        retry_max_delay: Duration::from_millis(20),
        ..fast_options()
    }
}

/// Reads through OpenDAL's `ChaosLayer` (30% of reads fail with a temporary
/// error): the retry layer hides them and the load succeeds; with retries
/// off the same load fails, so the chaos was real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_layer_read_errors_are_retried() {
    let Some(moto) = Moto::shared() else { return };
    let bucket = unique("chaos-read");
    moto.create_bucket(&bucket);
    let s3: Arc<dyn FileSystem> = Arc::new(s3_fs(moto, &bucket, "ckpt", fast_options()));
    all_ok(&save_ranks(s3, 4, 4, 1 << 20, opts(2), T).await);

    let chaotic = |retries| -> Arc<dyn FileSystem> {
        let op = s3_operator(moto, &bucket, "ckpt").layer(opendal::layers::ChaosLayer::new(0.3));
        Arc::new(OpendalFs::from_operator(op, "s3://chaos", chaos_options(retries)).unwrap())
    };
    all_ok(&load_and_check(chaotic(12), 3, 4, 4, 1 << 20, T).await);
    let rs = load_and_check(chaotic(0), 3, 4, 4, 1 << 20, T).await;
    let e = all_failed(&rs);
    assert_eq!(e.kind(), ErrorKind::Temporary, "{e}");
    assert!(e.message().contains("chaos"), "{e}");
}

/// An HTTP transport that fails a share of requests before sending them,
/// with a temporary error (a reset connection, say).
struct ChaosTransport {
    inner: HttpTransporter,
    every: u64,
    seen: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl HttpTransport for ChaosTransport {
    async fn fetch(&self, req: http::Request<Buffer>) -> opendal::Result<http::Response<HttpBody>> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        // Deterministic: fail every `every`-th request (but never two in a
        // row), spread over every kind of request.
        if n % self.every == self.every - 1 {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(opendal::Error::new(
                opendal::ErrorKind::Unexpected,
                "injected connection reset",
            )
            .set_temporary());
        }
        self.inner.fetch(req).await
    }
}

fn chaos_http_fs(
    moto: &Moto,
    bucket: &str,
    retries: usize,
    every: u64,
) -> (Arc<dyn FileSystem>, Arc<AtomicU64>) {
    let op = s3_operator(moto, bucket, "ckpt");
    let failed = Arc::new(AtomicU64::new(0));
    let chaos = ChaosTransport {
        inner: op.base_context().http_transport().clone(),
        every,
        seen: Arc::default(),
        failed: failed.clone(),
    };
    let ctx = op
        .base_context()
        .with_http_transport(HttpTransporter::new(chaos));
    let op = op.with_context(ctx);
    let fs = OpendalFs::from_operator(op, &format!("s3://{bucket}/ckpt"), chaos_options(retries))
        .unwrap();
    (Arc::new(fs), failed)
}

/// A third of all HTTP requests (part uploads, upload initiation and
/// completion, PUT of `.metadata`, list, delete, reads) fail with a temporary
/// error: retried by the retry layer, the save and the load succeed and
/// leave no multipart upload behind. With retries off, the save fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_http_errors_are_retried() {
    let Some(moto) = Moto::shared() else { return };
    let bucket = unique("chaos-http");
    moto.create_bucket(&bucket);
    let (fs, failed) = chaos_http_fs(moto, &bucket, 8, 3);
    let big_cols = 3 << 20;
    all_ok(&save_ranks(fs.clone(), 4, 5, big_cols, opts(2), T).await);
    let first = Metadata::decode(&fs.read_small(".metadata", 1 << 20).unwrap()).unwrap();
    all_ok(&save_ranks(fs.clone(), 4, 6, big_cols, opts(2), T).await);
    let previous = Metadata::decode(&fs.read_small(".metadata", 1 << 20).unwrap()).unwrap();
    // Save again so the cleanup of the first save's objects also runs.
    let third = save_ranks(fs.clone(), 4, 8, big_cols, opts(2), T).await;
    all_ok(&third);
    let mut removed = third[0].as_ref().unwrap().removed.clone();
    removed.sort();
    let mut first_files: Vec<String> = first.files.iter().map(|f| f.name.clone()).collect();
    first_files.sort();
    assert_eq!(removed, first_files);
    all_ok(&load_and_check(fs.clone(), 3, 8, 4, big_cols, T).await);
    assert!(
        failed.load(Ordering::SeqCst) > 10,
        "chaos injected too few errors"
    );
    assert_eq!(moto.pending_uploads(&bucket), 0);
    let md = Metadata::decode(&fs.read_small(".metadata", 1 << 20).unwrap()).unwrap();
    assert_only_referenced(fs.as_ref(), &md, Some(&previous));

    let bucket = unique("chaos-http-noretry");
    moto.create_bucket(&bucket);
    let (fs, _) = chaos_http_fs(moto, &bucket, 0, 3);
    let rs = save_ranks(fs.clone(), 4, 6, big_cols, opts(2), T).await;
    let e = all_failed(&rs);
    assert_eq!(e.kind(), ErrorKind::Temporary, "{e}");
    let clean = s3_fs(moto, &bucket, "ckpt", fast_options());
    assert_eq!(clean.file_len(".metadata").unwrap(), None);
}

/// A bucket that does not exist: the save fails on every rank before any
/// rank writes, naming the bucket and the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bucket_is_a_clear_error() {
    let Some(moto) = Moto::shared() else { return };
    let fs: Arc<dyn FileSystem> = Arc::new(s3_fs(moto, "no-such-bucket", "ckpt", fast_options()));
    let started = Instant::now();
    let rs = save_ranks(fs.clone(), 2, 1, 0, opts(1), T).await;
    let e = all_failed(&rs);
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.message().contains("no-such-bucket"), "{e}");
    assert!(e.message().contains(&moto.endpoint()), "{e}");
    assert!(e.message().contains("does not exist"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Loading from it names the bucket too.
    let rs = load_and_check(fs, 1, 1, 2, 0, T).await;
    let e = all_failed(&rs);
    assert!(e.message().contains("no-such-bucket"), "{e}");
}

/// Nothing listens at the endpoint: a clear error naming it, within a
/// bounded time (limited retries), on every rank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_fails_fast_and_clearly() {
    let port = free_port();
    let so: HashMap<String, String> = [
        ("endpoint", format!("http://127.0.0.1:{port}")),
        ("access_key_id", "x".to_string()),
        ("secret_access_key", "y".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let o = OpendalOptions {
        max_retries: 2,
        timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        ..fast_options()
    };
    let fs: Arc<dyn FileSystem> =
        Arc::new(OpendalFs::from_url_with("s3://bkt/ckpt", &so, o).unwrap());
    let started = Instant::now();
    let rs = save_ranks(fs, 2, 1, 0, opts(1), T).await;
    let took = started.elapsed();
    let e = all_failed(&rs);
    assert_eq!(e.kind(), ErrorKind::Temporary, "{e}");
    assert!(e.message().contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(e.message().contains("reachable"), "{e}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}
