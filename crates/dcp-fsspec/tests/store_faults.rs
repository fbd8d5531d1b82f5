//! Faults on every object store: S3 (moto), GCS (fake-gcs-server) and
//! Azure Blob (Azurite), each on 127.0.0.1 behind a [`TcpProxy`] that can
//! die, hang, or answer in the server's place. Every case ends in a clear
//! error on every rank or a successful retry, promptly, and the checkpoint
//! saved before is intact and loads byte for byte over a direct
//! connection. Skipped with a message when a server is not installed and
//! `CI` is unset.

mod common;

use bytes::Bytes;
use common::*;
use dcp_core::layer::FileSystemLayer;
use dcp_core::*;
use dcp_fsspec::{OpendalFs, OpendalOptions};
use dcp_testkit::azurite::Azurite;
use dcp_testkit::gcs::FakeGcs;
use dcp_testkit::TcpProxy;
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
/// Records of 1 MiB per rank (one row of `big`).
const BIG: u64 = 1 << 18;

/// One store's server, reached directly or through a proxy.
struct Store {
    kind: &'static str,
    port: u16,
    /// Storage options for a direct connection.
    options: HashMap<String, String>,
    /// What follows host:port in the endpoint (Azurite's account).
    endpoint_path: String,
    bucket: String,
}

impl Store {
    /// A fresh bucket on the `kind` server of this test binary; `None`
    /// (skipped) when that server is not installed.
    fn new(kind: &'static str) -> Option<Store> {
        let bucket = unique(kind);
        let (port, options, endpoint_path) = match kind {
            "s3" => {
                let m = Moto::shared()?;
                m.create_bucket(&bucket);
                (m.port, m.options(), String::new())
            }
            "gcs" => {
                let g = FakeGcs::shared()?;
                g.create_bucket(&bucket);
                (g.port(), g.options(), String::new())
            }
            "azblob" => {
                let a = Azurite::shared()?;
                a.create_container(&bucket);
                (
                    a.port(),
                    a.options(),
                    format!("/{}", dcp_testkit::azurite::ACCOUNT),
                )
            }
            _ => unreachable!(),
        };
        Some(Store {
            kind,
            port,
            options,
            endpoint_path,
            bucket,
        })
    }

    fn url(&self) -> String {
        let scheme = match self.kind {
            "s3" => "s3",
            "gcs" => "gs",
            _ => "azblob",
        };
        format!("{scheme}://{}/ckpt", self.bucket)
    }

    /// A direct connection.
    fn direct(&self) -> Arc<dyn FileSystem> {
        Arc::new(OpendalFs::from_url_with(&self.url(), &self.options, fast_options()).unwrap())
    }

    /// A connection through `proxy`, with few retries and short timeouts.
    fn through(&self, proxy: &TcpProxy, o: OpendalOptions) -> Arc<dyn FileSystem> {
        let mut so = self.options.clone();
        so.insert(
            "endpoint".into(),
            format!("{}{}", proxy.endpoint(), self.endpoint_path),
        );
        Arc::new(OpendalFs::from_url_with(&self.url(), &so, o).unwrap())
    }

    /// Throttling replies as this service sends them: `(status, reason,
    /// content type, body)` for a 503 and a 429.
    fn throttling(&self) -> [(u16, &'static str, &'static str, &'static str); 2] {
        match self.kind {
            "s3" => [
                (503, "Slow Down", "application/xml", "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
                (429, "Too Many Requests", "application/xml", "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>TooManyRequests</Code><Message>Too many requests.</Message></Error>"),
            ],
            "gcs" => [
                (503, "Service Unavailable", "application/json", r#"{"error":{"code":503,"message":"Backend Error","errors":[{"domain":"global","reason":"backendError","message":"Backend Error"}]}}"#),
                (429, "Too Many Requests", "application/json", r#"{"error":{"code":429,"message":"The rate of change requests to the object is too high.","errors":[{"domain":"usageLimits","reason":"rateLimitExceeded","message":"The rate of change requests to the object is too high."}]}}"#),
            ],
            _ => [
                (503, "Server Busy", "application/xml", "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>ServerBusy</Code><Message>The server is currently unable to receive requests. Please retry your request.</Message></Error>"),
                (429, "Too Many Requests", "application/xml", "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>ServerBusy</Code><Message>Ingress is over the account limit.</Message></Error>"),
            ],
        }
    }

    /// Save the first checkpoint (4 ranks, seed 1) directly; returns its
    /// `.metadata` bytes.
    async fn first_checkpoint(&self) -> Vec<u8> {
        let direct = self.direct();
        all_ok(&save_ranks(direct.clone(), 4, 1, BIG, opts(2), T).await);
        direct.read_small(".metadata", 1 << 20).unwrap()
    }

    /// The first checkpoint is still committed, unchanged, and loads byte
    /// for byte on 3 ranks (4 -> 3).
    async fn first_checkpoint_intact(&self, md: &[u8], what: &str) {
        let direct = self.direct();
        assert_eq!(
            direct.read_small(".metadata", 1 << 20).unwrap(),
            md,
            "{}: {what}: .metadata changed",
            self.kind
        );
        all_ok(&load_and_check(direct, 3, 1, 4, BIG, T).await);
    }
}

fn opts(threads: usize) -> WriterOptions {
    WriterOptions::default().thread_count(threads)
}

/// Few retries, short timeouts: a dead or hung server ends an operation in
/// seconds.
fn impatient() -> OpendalOptions {
    OpendalOptions {
        max_retries: 1,
        timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(2),
        ..fast_options()
    }
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
    }
    first
}

/// Runs `hook` once, at the `at`-th data write or read (counted across
/// files and ranks); everything else is the inner file system's own.
struct HookFs {
    inner: Arc<dyn FileSystem>,
    count: Arc<AtomicU64>,
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

impl HookFs {
    fn new(inner: Arc<dyn FileSystem>, at: u64, hook: impl Fn() + Send + Sync + 'static) -> Self {
        HookFs {
            inner,
            count: Arc::default(),
            at,
            hook: Arc::new(hook),
        }
    }
    fn tick(&self) {
        if self.count.fetch_add(1, Ordering::SeqCst) == self.at {
            (self.hook)();
        }
    }
}

struct HookSink {
    inner: Box<dyn FileSink>,
    fs: Arc<HookFs>,
}

impl FileSink for HookSink {
    fn write(&mut self, buf: Bytes) -> Result<()> {
        self.fs.tick();
        self.inner.write(buf)
    }
    fn finish(self: Box<Self>, sync: bool) -> Result<u64> {
        self.inner.finish(sync)
    }
    fn abort(self: Box<Self>) {
        self.inner.abort()
    }
}

/// Writes tick through the sinks, reads through `read_into` and
/// `read_scattered`.
struct Hooked(Arc<HookFs>);

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl FileSystemLayer for Hooked {
    fn inner(&self) -> &dyn FileSystem {
        &*self.0.inner
    }
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        Ok(Box::new(HookSink {
            inner: self.0.inner.create(name)?,
            fs: self.0.clone(),
        }))
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.tick();
        self.0.inner.read_into(name, offset, buf)
    }
    fn read_scattered(&self, name: &str, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.0.tick();
        self.0.inner.read_scattered(name, offset, bufs)
    }
}

fn hooked(
    inner: Arc<dyn FileSystem>,
    at: u64,
    hook: impl Fn() + Send + Sync + 'static,
) -> Arc<dyn FileSystem> {
    Arc::new(Hooked(Arc::new(HookFs::new(inner, at, hook))))
}

/// The server dies mid-save (the proxy in front of it is killed at the 4th
/// data write: listener closed, connections reset): every rank fails with
/// the same clear error, promptly; the previous checkpoint is intact.
async fn killed_mid_save(kind: &'static str) {
    let Some(s) = Store::new(kind) else { return };
    let md = s.first_checkpoint().await;
    let proxy = Arc::new(TcpProxy::start(s.port).unwrap());
    let p2 = proxy.clone();
    let fs = hooked(s.through(&proxy, impatient()), 4, move || p2.kill());
    let started = Instant::now();
    let rs = save_ranks(fs, 4, 2, BIG, opts(2), Duration::from_secs(30)).await;
    let took = started.elapsed();
    let e = all_failed(&rs);
    assert!(
        matches!(e.kind(), ErrorKind::Temporary | ErrorKind::Io),
        "{kind}: {:?}: {e}",
        e.kind()
    );
    assert!(e.message().contains(&s.url()), "{kind}: {e}");
    assert!(took < Duration::from_secs(45), "{kind}: took {took:?}");
    s.first_checkpoint_intact(&md, "killed mid-save").await;
    eprintln!("{kind}: server killed mid-save: every rank failed after {took:?}: {e}");
}

/// The server dies mid-load (at the 2nd data read): every rank fails with
/// the same clear error, promptly; the checkpoint itself is untouched.
async fn killed_mid_load(kind: &'static str) {
    let Some(s) = Store::new(kind) else { return };
    let md = s.first_checkpoint().await;
    let proxy = Arc::new(TcpProxy::start(s.port).unwrap());
    let p2 = proxy.clone();
    let fs = hooked(s.through(&proxy, impatient()), 1, move || p2.kill());
    let started = Instant::now();
    let rs = load_and_check(fs, 3, 1, 4, BIG, Duration::from_secs(30)).await;
    let took = started.elapsed();
    let e = all_failed(&rs);
    assert!(
        matches!(e.kind(), ErrorKind::Temporary | ErrorKind::Io),
        "{kind}: {:?}: {e}",
        e.kind()
    );
    assert!(e.message().contains(&s.url()), "{kind}: {e}");
    assert!(took < Duration::from_secs(45), "{kind}: took {took:?}");
    s.first_checkpoint_intact(&md, "killed mid-load").await;
    eprintln!("{kind}: server killed mid-load: every rank failed after {took:?}: {e}");
}

/// The server hangs (accepts, never answers) mid-save, and during a load:
/// the timeouts end both with an error on every rank, no hang; once it
/// answers again the previous checkpoint is intact.
async fn stalled(kind: &'static str) {
    let Some(s) = Store::new(kind) else { return };
    let md = s.first_checkpoint().await;
    let proxy = Arc::new(TcpProxy::start(s.port).unwrap());
    let p2 = proxy.clone();
    let fs = hooked(s.through(&proxy, impatient()), 4, move || p2.stall());
    let started = Instant::now();
    let rs = save_ranks(fs, 4, 2, BIG, opts(2), Duration::from_secs(40)).await;
    let took = started.elapsed();
    let e = all_failed(&rs);
    assert!(took < Duration::from_secs(50), "{kind}: save took {took:?}");
    assert!(
        matches!(e.kind(), ErrorKind::Temporary | ErrorKind::Io),
        "{kind}: {:?}: {e}",
        e.kind()
    );
    let save_err = e.to_string();

    // A load from a server that hangs from the start.
    let fs = s.through(&proxy, impatient());
    let started = Instant::now();
    let rs = load_and_check(fs, 3, 1, 4, BIG, Duration::from_secs(40)).await;
    let load_took = started.elapsed();
    let e = all_failed(&rs);
    assert!(
        load_took < Duration::from_secs(50),
        "{kind}: load took {load_took:?}"
    );
    assert!(
        e.message().contains("timed out") || e.message().contains("timeout"),
        "{kind}: {e}"
    );
    proxy.resume();
    s.first_checkpoint_intact(&md, "stalled").await;
    eprintln!(
        "{kind}: stalled server: the save failed after {took:?} ({save_err}); the load after \
         {load_took:?} ({e})"
    );
}

/// Throttling (a 503 SlowDown / ServerBusy, a 429) answered to the first
/// three requests of a save and of a load: retried with exponential
/// backoff (50, 100, 200 ms), both succeed byte for byte. Throttling that
/// outlasts the retries fails every rank with a `Temporary` error and
/// leaves the previous checkpoint intact.
async fn throttled(kind: &'static str) {
    let Some(s) = Store::new(kind) else { return };
    let proxy = TcpProxy::start(s.port).unwrap();
    let o = OpendalOptions {
        max_retries: 4,
        retry_min_delay: Duration::from_millis(50),
        retry_max_delay: Duration::from_secs(1),
        ..fast_options()
    };
    let fs = s.through(&proxy, o);
    for (seed, (status, reason, ctype, body)) in s.throttling().into_iter().enumerate() {
        let seed = seed as u32 + 1;
        proxy.reply_instead(3, status, reason, ctype, body);
        let before = proxy.replied_instead();
        // One rank, one thread: the three throttled replies go to one
        // request, retried three times.
        let started = Instant::now();
        let rs = save_ranks(fs.clone(), 1, seed, BIG, opts(1), T).await;
        let took = started.elapsed();
        all_ok(&rs);
        assert_eq!(proxy.replied_instead() - before, 3, "{kind} {status}");
        assert!(
            took >= Duration::from_millis(350),
            "{kind} {status}: three retries with backoff from 50 ms took only {took:?}"
        );
        proxy.reply_instead(3, status, reason, ctype, body);
        all_ok(&load_and_check(fs.clone(), 3, seed, 1, BIG, T).await);
        assert_eq!(proxy.replied_instead() - before, 6, "{kind} {status}");
        eprintln!("{kind}: {status} {reason} x3 on a save and a load: retried, both succeeded (save {took:?})");
    }
    // Throttled for good: the save fails, the last checkpoint stays.
    let md = fs.read_small(".metadata", 1 << 20).unwrap();
    let (status, reason, ctype, body) = s.throttling()[0];
    proxy.reply_instead(usize::MAX, status, reason, ctype, body);
    let rs = save_ranks(fs.clone(), 2, 9, BIG, opts(1), T).await;
    let e = all_failed(&rs);
    assert_eq!(e.kind(), ErrorKind::Temporary, "{kind}: {e}");
    assert!(e.message().contains("after 4 retries"), "{kind}: {e}");
    proxy.reply_instead(0, status, reason, ctype, body);
    assert_eq!(fs.read_small(".metadata", 1 << 20).unwrap(), md);
    all_ok(&load_and_check(fs, 3, 2, 1, BIG, T).await);
    eprintln!("{kind}: throttled beyond the retries: {e}");
}

macro_rules! faults {
    ($kind:ident) => {
        mod $kind {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn server_killed_mid_save() {
                killed_mid_save(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn server_killed_mid_load() {
                killed_mid_load(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stalled_server_times_out() {
                stalled(stringify!($kind)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn throttling_is_retried_with_backoff() {
                throttled(stringify!($kind)).await
            }
        }
    };
}

faults!(s3);
faults!(gcs);
faults!(azblob);

/// Azurite checks Shared Key signatures: a wrong account key is refused.
/// The save fails on every rank with an error saying access was denied and
/// which settings hold the credentials; so does a load; the checkpoint
/// saved with the right key is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azblob_wrong_key_is_refused() {
    let Some(s) = Store::new("azblob") else {
        return;
    };
    let md = s.first_checkpoint().await;
    let mut so = s.options.clone();
    // A well-formed key (base64, 64 bytes) that is not the account's.
    so.insert(
        "account_key".into(),
        "d3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmc=".into(),
    );
    let fs: Arc<dyn FileSystem> =
        Arc::new(OpendalFs::from_url_with(&s.url(), &so, fast_options()).unwrap());
    let started = Instant::now();
    let rs = save_ranks(fs.clone(), 2, 2, BIG, opts(1), T).await;
    let e = all_failed(&rs);
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.message().contains("access denied"), "{e}");
    assert!(e.message().contains("AZURE_STORAGE_KEY"), "{e}");
    assert!(e.message().contains(&s.bucket), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let rs = load_and_check(fs, 3, 1, 4, BIG, T).await;
    let le = all_failed(&rs);
    assert!(le.message().contains("access denied"), "{le}");
    s.first_checkpoint_intact(&md, "wrong key").await;
    eprintln!("azblob: a wrong account key: {e}");
}

/// fake-gcs-server accepts any request, signed or not, so refused
/// credentials cannot be tested against it; what dcp can check is a
/// credential file it cannot use: refused when the store is opened, with
/// an error naming the file and what is wrong with it, before any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_unusable_credential_file_is_a_clear_error() {
    let Some(s) = Store::new("gcs") else { return };
    let md = s.first_checkpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.json");
    std::fs::write(&path, b"{ not json").unwrap();
    let mut so = s.options.clone();
    so.remove("allow_anonymous");
    so.remove("disable_config_load");
    so.insert("credential_path".into(), path.display().to_string());
    let e = OpendalFs::from_url_with(&s.url(), &so, fast_options()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let want = format!(
        "storage option credential_path={:?}: not JSON",
        path.display().to_string()
    );
    assert!(e.message().starts_with(&want), "{e}");
    s.first_checkpoint_intact(&md, "bad credential file").await;
    eprintln!("gcs: an unusable credential file: {e}");
}
