//! [`OpendalFs`]: a dcp [`FileSystem`] over an OpenDAL [`Operator`].

use crate::config::{self, Target};
use crate::runtime;
use bytes::Bytes;
use dcp_core::location::Backend;
use dcp_core::storage::check_file_name;
use dcp_core::{Capabilities, Error, ErrorKind, FileEntry, FileSink, FileSystem, Result};
use futures::{StreamExt, TryStreamExt};
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{Buffer, Operator};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The smallest multipart part S3 accepts (except the last part).
pub const S3_MIN_PART_SIZE: usize = 5 << 20;
/// The largest multipart part S3 accepts.
pub const S3_MAX_PART_SIZE: usize = 5 << 30;
/// The most parts one S3 multipart upload may have.
pub const S3_MAX_PARTS: u64 = 10_000;

/// The part size for an upload of about `expected` bytes: `part_size`, or
/// the smallest whole number of MiB that keeps the object (with a margin of
/// 1/64 and 64 MiB for a codec's output or a short hint) within
/// [`S3_MAX_PARTS`] parts, at most [`S3_MAX_PART_SIZE`].
pub fn part_size_for(expected: u64, part_size: usize) -> usize {
    let with_margin = expected
        .saturating_add(expected / 64)
        .saturating_add(64 << 20);
    let need = with_margin.div_ceil(S3_MAX_PARTS).next_multiple_of(1 << 20);
    let need = usize::try_from(need).unwrap_or(usize::MAX);
    part_size.max(need.min(S3_MAX_PART_SIZE))
}

/// Tuning of an [`OpendalFs`]: multipart writes, concurrent ranged reads,
/// retries and timeouts. Each field can also be set through
/// `storage_options` keys (`dcp_part_size`, `dcp_write_concurrency`,
/// `dcp_read_chunk`, `dcp_read_concurrency`, `dcp_max_retries`,
/// `dcp_retry_min_delay_ms`, `dcp_retry_max_delay_ms`, `dcp_timeout_ms`,
/// `dcp_io_timeout_ms`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpendalOptions {
    /// Multipart part size in bytes (default 8 MiB; S3 needs at least
    /// 5 MiB and takes at most 10,000 parts per object, so a data file
    /// whose expected length ([`FileSink::expect_len`]) needs more parts
    /// is uploaded in larger parts: [`part_size_for`]). Default chosen by
    /// measurement with `write_concurrency` (BENCHMARKS.md).
    pub part_size: usize,
    /// Parts of one object uploaded at once (default 16): the single
    /// upload of a writer thread keeps this many parts in flight. OpenDAL
    /// starts a part only when a slot frees up behind the oldest part in
    /// flight, so a slow part holds the next ones back; more slots than
    /// a typical file has parts keeps them all going from the start.
    pub write_concurrency: usize,
    /// Part size of reads: a read larger than this is split into ranged
    /// GETs of this size, fetched concurrently, and neighbouring records
    /// smaller than this are read together in one GET of at most this size
    /// ([`FileSystem::read_request_size`](dcp_core::FileSystem::read_request_size)).
    /// Default 32 MiB, chosen by measurement (`examples/s3_bench.rs`; see
    /// BENCHMARKS.md): fewer, larger requests load faster wherever a request
    /// costs more than its bytes.
    pub read_chunk: usize,
    /// Requests in flight per reader thread (default 8): a load's reader
    /// thread runs this many reads at once (one record, or one span of
    /// small records, each; see
    /// [`FileSystem::read_requests_in_flight`](dcp_core::FileSystem::read_requests_in_flight)),
    /// and one read larger than `read_chunk` fetches up to this many of its
    /// ranges at once. Independent of the number of reader threads.
    pub read_concurrency: usize,
    /// Retries of a temporary failure before giving up (default 4; 0 turns
    /// retrying off).
    pub max_retries: usize,
    /// First retry delay; doubles up to `retry_max_delay` (default 200 ms).
    pub retry_min_delay: Duration,
    /// Longest retry delay (default 10 s).
    pub retry_max_delay: Duration,
    /// Limit on one non-streaming operation: stat, list, delete, initiate
    /// or complete an upload (default 60 s).
    pub timeout: Duration,
    /// Limit on one streaming I/O step: a part upload, a chunk of a read
    /// (default 60 s).
    pub io_timeout: Duration,
}

impl Default for OpendalOptions {
    fn default() -> Self {
        OpendalOptions {
            part_size: 8 << 20,
            write_concurrency: 16,
            read_chunk: 32 << 20,
            read_concurrency: 8,
            max_retries: 4,
            retry_min_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(60),
        }
    }
}

struct Inner {
    op: Operator,
    /// Path prefix inside the operator (used where the operator's own root
    /// cannot be the checkpoint prefix, as for shared memory stores).
    base: String,
    location: String,
    endpoint: String,
    bucket: String,
    durable: bool,
    options: OpendalOptions,
    handle: tokio::runtime::Handle,
    /// No credentials were configured (no key in the environment or the
    /// storage options, no anonymous access) for a service that signs.
    no_credentials: bool,
}

/// A dcp [`FileSystem`] over an OpenDAL [`Operator`] rooted at the
/// checkpoint prefix: S3 (and S3-compatible stores), GCS, Azure Blob, local
/// files or memory.
///
/// - `create` streams into an OpenDAL `Writer` with `.chunk(part_size)` and
///   `.concurrent(write_concurrency)`: multipart parts upload concurrently,
///   the caller's `Bytes` are handed over without copying, `finish` completes
///   the upload and `abort` aborts it (no partial object remains).
/// - `write_atomic` is one PUT: readers see the old object or the new one.
/// - `read_into` issues ranged reads, split into `read_chunk` ranges fetched
///   `read_concurrency` at a time and copied straight into the caller's
///   buffer.
/// - `list` lists the objects directly under the prefix, with lengths;
///   `sync_dir` is a no-op (object stores have no directories).
/// - Temporary failures are retried with exponential backoff (OpenDAL's
///   `RetryLayer`), and every operation is bounded in time (`TimeoutLayer`).
///
/// Methods block the calling thread; the async work runs on a
/// process-wide I/O runtime owned by this crate.
#[derive(Clone)]
pub struct OpendalFs {
    inner: Arc<Inner>,
}

impl fmt::Debug for OpendalFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpendalFs")
            .field("location", &self.inner.location)
            .field("endpoint", &self.inner.endpoint)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// What a service's conditional writes compare: the ETag (`If-Match`: s3,
/// azblob) or the object's version (GCS generations, `ifGenerationMatch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compare {
    Etag,
    Version,
}

impl OpendalFs {
    /// How the service writes conditionally on a version of the object and
    /// on its absence (OpenDAL's `write_with_if_match` or
    /// `write_with_if_version_match`, and `write_with_if_not_exists`);
    /// `Unsupported` when it cannot.
    fn check_conditional(&self) -> Result<Compare> {
        let cap = self.inner.op.info().capability();
        match cap.write_with_if_not_exists {
            true if cap.write_with_if_match => Ok(Compare::Etag),
            true if cap.write_with_if_version_match => Ok(Compare::Version),
            _ => Err(Error::unsupported(format!(
                "{} cannot write conditionally on an ETag or a generation",
                self.location()
            ))),
        }
    }

    /// Open `url` with fsspec-style `storage_options` and default
    /// [`OpendalOptions`] (overridden by `dcp_*` keys of `storage_options`).
    ///
    /// URLs: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `azblob://container/prefix`, `file:///abs/path`, `memory://name/prefix`
    /// (a plain path means `file://`). S3 settings come from
    /// `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), then from
    /// `storage_options`, which override the environment; both OpenDAL's
    /// names (`endpoint`, `region`, `access_key_id`, ...) and s3fs's
    /// (`endpoint_url`, `region_name`, `key`, `secret`, `token`) are accepted.
    /// Refuses with [`ErrorKind::InvalidInput`] a scheme outside
    /// [`dcp_core::location::SCHEMES`], a malformed URL, and a
    /// `storage_options` key the service does not take (naming it and
    /// listing the accepted ones); with [`ErrorKind::Unsupported`] a scheme
    /// whose Cargo feature is off.
    pub fn from_url(url: &str, storage_options: &HashMap<String, String>) -> Result<Self> {
        Self::from_url_with(url, storage_options, OpendalOptions::default())
    }

    /// Like [`OpendalFs::from_url`], starting from `options` instead of the
    /// defaults (`dcp_*` keys of `storage_options` still override them).
    pub fn from_url_with(
        url: &str,
        storage_options: &HashMap<String, String>,
        mut options: OpendalOptions,
    ) -> Result<Self> {
        let target = config::parse_url(url)?;
        config::check_keys(&target, storage_options)?;
        config::apply_dcp_options(&mut options, storage_options)?;
        let cfg = config::service_config(&target, storage_options, &|k| std::env::var(k).ok())?;
        let endpoint = config::endpoint_of(&target, &cfg);
        let no_credentials = target.scheme == Backend::S3
            && !cfg.contains_key("access_key_id")
            && cfg.get("allow_anonymous").is_none_or(|v| v != "true");
        let op = config::build_operator(&target, cfg)?;
        let mut fs = Self::build(op, &target, endpoint, options)?;
        if let Some(inner) = Arc::get_mut(&mut fs.inner) {
            inner.no_credentials = no_credentials;
        }
        Ok(fs)
    }

    /// Wrap an operator you configured yourself, already rooted at the
    /// checkpoint prefix. `location` names it in messages (`s3://b/p`).
    /// Retry and timeout layers from `options` are added on top, so a layer
    /// you added (a chaos layer, say) sits below the retries.
    pub fn from_operator(op: Operator, location: &str, options: OpendalOptions) -> Result<Self> {
        let info = op.info();
        let scheme = match info.scheme() {
            "s3" => Backend::S3,
            "gcs" => Backend::Gcs,
            "azblob" => Backend::Azblob,
            "fs" => Backend::Local,
            _ => Backend::Memory,
        };
        let target = Target {
            scheme,
            bucket: info.name(),
            prefix: String::new(),
            url: location.to_string(),
        };
        let endpoint = format!("{} service", info.scheme());
        Self::build(op, &target, endpoint, options)
    }

    fn build(
        op: Operator,
        target: &Target,
        endpoint: String,
        options: OpendalOptions,
    ) -> Result<Self> {
        if options.part_size == 0
            || options.write_concurrency == 0
            || options.read_chunk == 0
            || options.read_concurrency == 0
        {
            return Err(Error::invalid(
                "part_size, write_concurrency, read_chunk and read_concurrency must be at least 1",
            ));
        }
        if target.scheme == Backend::S3
            && !(S3_MIN_PART_SIZE..=S3_MAX_PART_SIZE).contains(&options.part_size)
        {
            return Err(Error::invalid(format!(
                "part size {} bytes for {}: S3 multipart parts must be 5 MiB to 5 GiB",
                options.part_size, target.url
            )));
        }
        // The memory store is shared per name; the prefix lives in paths.
        let base = if target.scheme == Backend::Memory && !target.prefix.is_empty() {
            format!("{}/", target.prefix)
        } else {
            String::new()
        };
        #[cfg(feature = "http")]
        opendal::install_default();
        let op = op.layer(
            TimeoutLayer::new()
                .with_timeout(options.timeout)
                .with_io_timeout(options.io_timeout),
        );
        let op = if options.max_retries > 0 {
            op.layer(
                RetryLayer::new()
                    .with_max_times(options.max_retries)
                    .with_min_delay(options.retry_min_delay)
                    .with_max_delay(options.retry_max_delay.max(options.retry_min_delay))
                    .with_jitter(),
            )
        } else {
            op
        };
        Ok(OpendalFs {
            inner: Arc::new(Inner {
                op,
                base,
                location: target.url.clone(),
                endpoint,
                bucket: target.bucket.clone(),
                durable: config::durable(target.scheme),
                options,
                handle: runtime::io_handle()?,
                no_credentials: false,
            }),
        })
    }

    /// An OpenDAL writer for `name` with parts of `part` bytes,
    /// `write_concurrency` in flight.
    fn open_writer(&self, name: &str, part: usize) -> Result<opendal::Writer> {
        let o = &self.inner.options;
        self.block_on(async {
            self.inner
                .op
                .writer_with(&self.path(name))
                .chunk(part)
                .concurrent(o.write_concurrency)
                .await
        })
        .map_err(|e| self.err("create", name, e))
    }

    /// The sink of [`FileSystem::create`].
    fn sink(&self, name: &str) -> Result<OpendalSink> {
        check_file_name(name)?;
        let part = self.inner.options.part_size;
        let writer = self.open_writer(name, part)?;
        Ok(OpendalSink {
            fs: self.clone(),
            name: name.to_string(),
            writer: Some(writer),
            written: 0,
            part,
        })
    }

    /// The operator (with the retry and timeout layers).
    pub fn operator(&self) -> &Operator {
        &self.inner.op
    }

    /// The options in effect.
    pub fn options(&self) -> &OpendalOptions {
        &self.inner.options
    }

    /// The object's OpenDAL metadata (length, ETag, version, ...).
    pub fn stat(&self, name: &str) -> Result<opendal::Metadata> {
        check_file_name(name)?;
        self.block_on(self.inner.op.stat(&self.path(name)))
            .map_err(|e| self.err("stat", name, e))
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.inner.base)
    }

    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        runtime::block_on(&self.inner.handle, fut)
    }

    /// Map an OpenDAL error on `name` during `op` to a dcp error.
    fn err(&self, op: &str, name: &str, e: opendal::Error) -> Error {
        map_error(&self.inner, op, name, e)
    }

    /// Fill `segs`, in order, from `name` starting at `offset`: the range
    /// is cut into `read_chunk` parts, each one ranged GET, fetched
    /// `read_concurrency` at a time and copied straight into the segments
    /// it covers.
    fn read_segments(&self, name: &str, offset: u64, segs: Vec<&mut [u8]>) -> Result<()> {
        check_file_name(name)?;
        let len: u64 = segs.iter().map(|s| s.len() as u64).sum();
        let past_end = |size: u64| {
            Error::corrupt(format!(
                "read {}/{name} at offset {offset} length {len}: the object has only {size} bytes",
                self.inner.location
            ))
        };
        let end = offset.checked_add(len).ok_or_else(|| past_end(0))?;
        if len == 0 {
            let size = self.file_len(name)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("{}/{name} not found", self.inner.location),
                )
            })?;
            return if offset > size {
                Err(past_end(size))
            } else {
                Ok(())
            };
        }
        let parts = split_parts(segs, offset, self.inner.options.read_chunk);
        let path = self.path(name);
        let op = &self.inner.op;
        let result: std::result::Result<(), ReadFail> = self.block_on(async {
            // `Reader::fetch` reads each range with one request that the
            // retry layer repeats whole on a temporary error. (Streaming
            // reads resume mid-stream on retry instead, and OpenDAL 0.59
            // panics when a stream fails after its last byte.)
            let reader = op.reader(&path).await.map_err(ReadFail::Dal)?;
            let reader = &reader;
            let pieces = parts.into_iter().map(|(a, mut segs)| {
                let b = a + segs.iter().map(|s| s.len() as u64).sum::<u64>();
                async move {
                    #[allow(clippy::single_range_in_vec_init)] // one range, on purpose
                    let data: Vec<Buffer> =
                        reader.fetch(vec![a..b]).await.map_err(ReadFail::Dal)?;
                    let got: u64 = data.iter().map(|d| d.len() as u64).sum();
                    if got != b - a {
                        return Err(ReadFail::Short);
                    }
                    copy_into(&data, &mut segs);
                    Ok(())
                }
            });
            futures::stream::iter(pieces)
                .buffer_unordered(self.inner.options.read_concurrency)
                .try_collect()
                .await
        });
        match result {
            Ok(()) => Ok(()),
            Err(ReadFail::Short) => {
                let size = self.file_len(name)?.unwrap_or(0);
                Err(past_end(size))
            }
            Err(ReadFail::Dal(e)) => {
                // A range past the end shows up as "range not satisfied" on
                // some services and as a short or failed read on others:
                // decide by the object's length.
                if e.kind() != opendal::ErrorKind::NotFound {
                    if let Ok(Some(size)) = self.file_len(name) {
                        if end > size {
                            return Err(past_end(size));
                        }
                    }
                }
                Err(self.err(&format!("read at offset {offset} length {len} of"), name, e))
            }
        }
    }
}

/// Cut the segments of a read starting at file offset `offset` into parts
/// of at most `part` bytes (never across a part boundary): each part's file
/// offset and the (pieces of) segments it fills, in order. Empty segments
/// are dropped.
fn split_parts(segs: Vec<&mut [u8]>, offset: u64, part: usize) -> Vec<(u64, Vec<&mut [u8]>)> {
    let part = part.max(1);
    let mut out: Vec<(u64, Vec<&mut [u8]>)> = Vec::new();
    let mut at = offset;
    let mut room = 0usize;
    for mut seg in segs {
        while !seg.is_empty() {
            if room == 0 {
                out.push((at, Vec::new()));
                room = part;
            }
            let n = room.min(seg.len());
            let (head, tail) = std::mem::take(&mut seg).split_at_mut(n);
            out.last_mut().expect("a part is open").1.push(head);
            seg = tail;
            room -= n;
            at += n as u64;
        }
    }
    out
}

/// Whether `op` serves a store whose objects live in buckets (or
/// containers) that may be missing, as opposed to a directory or memory.
fn has_buckets(op: &Operator) -> bool {
    matches!(op.info().scheme(), "s3" | "gcs" | "azblob")
}

/// Map an OpenDAL error to a dcp error whose message names the object, the
/// location and (for access and connection problems) the endpoint.
fn map_error(inner: &Inner, op: &str, name: &str, e: opendal::Error) -> Error {
    use opendal::ErrorKind as K;
    let what = if name.is_empty() {
        inner.location.clone()
    } else {
        format!("{}/{name}", inner.location)
    };
    let text = e.to_string();
    let (kind, mut msg) = match e.kind() {
        // OpenDAL reports a missing bucket (S3's `NoSuchBucket`, GCS's and
        // Azure's missing container) as an invalid configuration: the
        // configured bucket is wrong.
        K::ConfigInvalid if has_buckets(&inner.op) => (
            ErrorKind::NotFound,
            format!(
                "{op} {what}: bucket {:?} does not exist at {} (or the service refused its configuration)",
                inner.bucket, inner.endpoint
            ),
        ),
        K::NotFound => (ErrorKind::NotFound, format!("{op} {what}: not found")),
        K::PermissionDenied => (
            ErrorKind::Io,
            format!(
                "{op} {what}: access denied by {} (bucket {:?}): the credentials were refused \
                 or lack permission; check {} (or storage_options) and the bucket's permissions",
                inner.endpoint,
                inner.bucket,
                match inner.op.info().scheme() {
                    "gcs" => "GOOGLE_APPLICATION_CREDENTIALS",
                    "azblob" =>
                        "AZURE_STORAGE_ACCOUNT / AZURE_STORAGE_KEY or AZURE_STORAGE_CONNECTION_STRING",
                    _ => "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
                }
            ),
        ),
        K::ConfigInvalid => (
            ErrorKind::InvalidInput,
            format!("{op} {what}: invalid storage configuration"),
        ),
        K::RangeNotSatisfied => (
            ErrorKind::Corrupt,
            format!("{op} {what}: the range lies past the end of the object"),
        ),
        K::AlreadyExists => (ErrorKind::AlreadyExists, format!("{op} {what}")),
        K::Unsupported => (
            ErrorKind::Unsupported,
            format!("{op} {what}: not supported by this storage service"),
        ),
        _ if e.is_temporary() || e.is_persistent() || e.kind() == K::RateLimited => (
            ErrorKind::Temporary,
            format!(
                "{op} {what}: {} failed with a temporary error{} (is {} reachable?)",
                if e.is_persistent() {
                    "still"
                } else {
                    "request"
                },
                if e.is_persistent() {
                    format!(" after {} retries", inner.options.max_retries)
                } else {
                    String::new()
                },
                inner.endpoint
            ),
        ),
        _ => (ErrorKind::Io, format!("{op} {what}")),
    };
    // Without configured credentials, requests that fail without a reply
    // (OpenDAL's "unexpected") may have failed to sign: say how to fix it.
    if inner.no_credentials && e.kind() == K::Unexpected {
        msg.push_str(
            "; no usable credentials were configured: set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY (or `key` and `secret` in storage_options)",
        );
    }
    Error::new(kind, format!("{msg}: {text}")).with_source(e)
}

/// A data object being uploaded.
struct OpendalSink {
    fs: OpendalFs,
    name: String,
    writer: Option<opendal::Writer>,
    written: u64,
    /// The writer's part size.
    part: usize,
}

impl FileSink for OpendalSink {
    /// OpenDAL's writer keeps what it is given until a part is full (and,
    /// for a store without multipart uploads, until the file closes).
    fn keeps_bytes(&self) -> bool {
        true
    }

    /// Before the first write: a file too large for 10,000 parts of
    /// `part_size` gets a writer with larger parts ([`part_size_for`]).
    fn expect_len(&mut self, len: u64) {
        let part = part_size_for(len, self.fs.inner.options.part_size);
        if self.written > 0 || part <= self.part || self.writer.is_none() {
            return;
        }
        match self.fs.open_writer(&self.name, part) {
            Ok(w) => {
                // Nothing was written: the old writer started no upload.
                if let Some(mut old) = self.writer.replace(w) {
                    let _ = self.fs.block_on(old.abort());
                }
                self.part = part;
            }
            // Keep the writer of `part_size`; the limit is checked on write.
            Err(e) => tracing::debug!("larger parts for {}: {e}", self.name),
        }
    }

    fn write(&mut self, buf: Bytes) -> Result<()> {
        let Some(w) = self.writer.as_mut() else {
            return Err(Error::invalid(format!(
                "write to {} after it was finished or aborted",
                self.name
            )));
        };
        let n = buf.len() as u64;
        let limit = S3_MAX_PARTS.saturating_mul(self.part as u64);
        if self.fs.inner.op.info().scheme() == "s3" && self.written.saturating_add(n) > limit {
            return Err(Error::invalid(format!(
                "upload of {}/{}: more than {limit} bytes, the most S3 takes in {S3_MAX_PARTS} \
                 parts of {} bytes; raise dcp_part_size (at most 5 GiB) or thread_count",
                self.fs.inner.location, self.name, self.part
            )));
        }
        // `Bytes` converts into an OpenDAL `Buffer` without copying.
        runtime::block_on(&self.fs.inner.handle, w.write(buf))
            .map_err(|e| self.fs.err("upload", &self.name, e))?;
        self.written += n;
        Ok(())
    }

    fn finish(mut self: Box<Self>, _sync: bool) -> Result<u64> {
        // Completing the upload is what makes it durable on an object store,
        // so `sync` needs no extra step.
        let Some(mut w) = self.writer.take() else {
            return Err(Error::invalid(format!(
                "finish {} after it was finished or aborted",
                self.name
            )));
        };
        let fs = self.fs.clone();
        match fs.block_on(w.close()) {
            Ok(_) => Ok(self.written),
            Err(e) => {
                let err = fs.err("complete upload of", &self.name, e);
                if let Err(e) = fs.block_on(w.abort()) {
                    tracing::debug!("abort {} after a failed close: {e}", self.name);
                }
                Err(err)
            }
        }
    }

    fn abort(mut self: Box<Self>) {
        if let Some(mut w) = self.writer.take() {
            if let Err(e) = self.fs.block_on(w.abort()) {
                tracing::warn!(
                    "could not abort the upload of {}/{}: {e}",
                    self.fs.inner.location,
                    self.name
                );
            }
        }
    }
}

impl Drop for OpendalSink {
    fn drop(&mut self) {
        // Dropped without finish or abort (a panic upstream): abort in the
        // background so no multipart upload is left behind.
        if let Some(mut w) = self.writer.take() {
            self.fs.inner.handle.spawn(async move {
                let _ = w.abort().await;
            });
        }
    }
}

impl FileSystem for OpendalFs {
    fn location(&self) -> String {
        self.inner.location.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_sync: self.inner.durable,
            atomic_replace: true,
            list: true,
        }
    }

    fn prepare(&self) -> Result<()> {
        // Object stores need no directory; listing once checks that the
        // bucket exists and the credentials work before any rank writes.
        let dir = if self.inner.base.is_empty() {
            "/".to_string()
        } else {
            self.inner.base.clone()
        };
        self.block_on(async {
            let mut l = self.inner.op.lister_with(&dir).limit(1).await?;
            match l.next().await {
                Some(Err(e)) if e.kind() != opendal::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .or_else(|e| {
            // A missing prefix (a new local directory) is fine: saves create
            // it. A missing bucket is `ConfigInvalid` and fails here.
            if e.kind() == opendal::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| self.err("prepare", "", e))
    }

    /// A multipart upload of `part_size` parts, `write_concurrency` in
    /// flight; larger parts when [`FileSink::expect_len`] says the file
    /// would need more than 10,000.
    fn create(&self, name: &str) -> Result<Box<dyn FileSink>> {
        Ok(Box::new(self.sink(name)?))
    }

    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_segments(name, offset, vec![buf])
    }

    /// Ranged GETs straight into the caller's buffers: no temporary buffer
    /// of the range's size (the trait's default), one copy out of the HTTP
    /// client's buffers, as [`FileSystem::read_into`].
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        self.read_segments(name, offset, bufs.iter_mut().map(|b| &mut **b).collect())
    }

    /// [`OpendalOptions::read_concurrency`]: each reader thread of a load
    /// keeps that many record reads in flight.
    fn read_requests_in_flight(&self) -> usize {
        self.inner.options.read_concurrency
    }

    /// [`OpendalOptions::read_chunk`]: records smaller than a part are read
    /// with their neighbours, a part per request.
    fn read_request_size(&self) -> Option<u64> {
        Some(self.inner.options.read_chunk as u64)
    }

    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        check_file_name(name)?;
        match self.block_on(self.inner.op.stat(&self.path(name))) {
            Ok(m) if m.is_file() => Ok(Some(m.content_length())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("stat", name, e)),
        }
    }

    /// The object as it is at one moment: its length (refused over
    /// `max_len` before anything is downloaded), then one GET of the whole
    /// object, conditional on the ETag just seen where the service allows
    /// (`If-Match`): a replacement in between is refused by the store and
    /// the pair retried, never read as a mix of two versions or as a
    /// length that no longer holds.
    fn read_small(&self, name: &str, max_len: u64) -> Result<Vec<u8>> {
        check_file_name(name)?;
        let path = self.path(name);
        let op = &self.inner.op;
        let if_match = op.info().capability().read_with_if_match;
        for _ in 0..5 {
            let meta = match self.block_on(op.stat(&path)) {
                Ok(m) if m.is_file() => m,
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("{name} not found in {}", self.inner.location),
                    ))
                }
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("{name} not found in {}", self.inner.location),
                    ))
                }
                Err(e) => return Err(self.err("stat", name, e)),
            };
            if meta.content_length() > max_len {
                return Err(Error::corrupt(format!(
                    "{}/{name} is {} bytes, more than the limit of {max_len}",
                    self.inner.location,
                    meta.content_length()
                )));
            }
            let len = meta.content_length();
            if len == 0 {
                return Ok(Vec::new());
            }
            // One ranged request through `Reader::fetch`, which the retry
            // layer repeats whole (a streaming read would resume mid-object
            // on retry; see `read_into`).
            let tag = if if_match {
                meta.etag().map(str::to_string)
            } else {
                None
            };
            let read = self.block_on(async {
                let reader = match &tag {
                    Some(t) => {
                        std::future::IntoFuture::into_future(op.reader_with(&path).if_match(t))
                            .await?
                    }
                    None => op.reader(&path).await?,
                };
                #[allow(clippy::single_range_in_vec_init)] // one range, on purpose
                let parts: Vec<Buffer> = reader.fetch(vec![0..len]).await?;
                let mut out = Vec::with_capacity(len as usize);
                for p in &parts {
                    out.extend_from_slice(&p.to_vec());
                }
                Ok::<Vec<u8>, opendal::Error>(out)
            });
            match read {
                Ok(buf) if buf.len() as u64 == len => return Ok(buf),
                // Shorter or longer than the stat said: replaced in between
                // (without an ETag to refuse it); again.
                Ok(_) => {}
                // Replaced (or removed) between the two requests: again.
                Err(e)
                    if matches!(
                        e.kind(),
                        opendal::ErrorKind::ConditionNotMatch
                            | opendal::ErrorKind::NotFound
                            | opendal::ErrorKind::RangeNotSatisfied
                    ) => {}
                Err(e) => return Err(self.err("get", name, e)),
            }
        }
        Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{}/{name} was replaced between every stat and read (5 tries)",
                self.inner.location
            ),
        )
        .with_temporary(true))
    }

    fn write_atomic(&self, name: &str, data: &[u8], _sync: bool) -> Result<()> {
        check_file_name(name)?;
        // One PUT: the object appears whole or not at all, replacing the old
        // one atomically. This is the commit point of a save.
        self.block_on(
            self.inner
                .op
                .write(&self.path(name), Buffer::from(data.to_vec())),
        )
        .map(|_| ())
        .map_err(|e| self.err("put", name, e))
    }

    /// A conditional PUT (`If-None-Match: *`, OpenDAL's
    /// `write_with(..).if_not_exists(true)`) where the service supports it
    /// (`write_with_if_not_exists`: s3, gcs, azblob, fs and memory in
    /// OpenDAL 0.59): the store itself refuses a second create. For a
    /// service without it, a check for the object followed by a plain PUT:
    /// two saves starting within one round trip of each other may then both
    /// believe they created it (the weaker guarantee of such stores; see
    /// RELIABILITY.md). A retried conditional PUT whose first reply was lost
    /// answers "exists" for this call's own object: callers that can tell
    /// their content (the lease holds the save id) check it.
    fn create_new(&self, name: &str, data: &[u8], _sync: bool) -> Result<bool> {
        check_file_name(name)?;
        let path = self.path(name);
        let buf = Buffer::from(data.to_vec());
        let op = &self.inner.op;
        if op.info().capability().write_with_if_not_exists {
            let put = op.write_with(&path, buf).if_not_exists(true);
            return match self.block_on(std::future::IntoFuture::into_future(put)) {
                Ok(_) => Ok(true),
                Err(e)
                    if matches!(
                        e.kind(),
                        opendal::ErrorKind::ConditionNotMatch | opendal::ErrorKind::AlreadyExists
                    ) =>
                {
                    Ok(false)
                }
                Err(e) => Err(self.err("conditional put", name, e)),
            };
        }
        if self.file_len(name)?.is_some() {
            return Ok(false);
        }
        self.block_on(op.write(&path, buf))
            .map(|_| true)
            .map_err(|e| self.err("put", name, e))
    }

    /// The object's ETag where the service writes conditionally on it
    /// (`write_with_if_match` in OpenDAL 0.59: s3, azblob), its generation
    /// where it writes conditionally on that (`write_with_if_version_match`:
    /// gcs); `Unsupported` elsewhere, where dcp compares under its lease
    /// instead.
    fn version(&self, name: &str) -> Result<Option<String>> {
        check_file_name(name)?;
        let compare = self.check_conditional()?;
        match self.block_on(self.inner.op.stat(&self.path(name))) {
            Ok(m) if m.is_file() => {
                let tag = match compare {
                    Compare::Etag => m.etag(),
                    Compare::Version => m.version(),
                };
                match tag {
                    Some(tag) => Ok(Some(tag.to_string())),
                    None => Err(Error::unsupported(format!(
                        "{} returned no {} for {name}",
                        self.location(),
                        if compare == Compare::Etag {
                            "ETag"
                        } else {
                            "generation"
                        }
                    ))),
                }
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("stat", name, e)),
        }
    }

    /// One PUT with `If-Match: <etag>` (GCS: an upload with
    /// `ifGenerationMatch=<generation>`), or `If-None-Match: *` (GCS:
    /// `ifGenerationMatch=0`) when `expected` is `None`; a `412 Precondition
    /// Failed` (or "already exists") is `Ok(false)`. `Unsupported` wherever
    /// [`version`](FileSystem::version) is.
    fn replace_if(
        &self,
        name: &str,
        data: &[u8],
        _sync: bool,
        expected: Option<&str>,
    ) -> Result<bool> {
        check_file_name(name)?;
        let compare = self.check_conditional()?;
        let path = self.path(name);
        let buf = Buffer::from(data.to_vec());
        let op = &self.inner.op;
        let put = match (expected, compare) {
            (Some(tag), Compare::Etag) => op.write_with(&path, buf).if_match(tag),
            (Some(tag), Compare::Version) => op.write_with(&path, buf).if_version_match(tag),
            (None, _) => op.write_with(&path, buf).if_not_exists(true),
        };
        match self.block_on(std::future::IntoFuture::into_future(put)) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    opendal::ErrorKind::ConditionNotMatch | opendal::ErrorKind::AlreadyExists
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err("conditional put", name, e)),
        }
    }

    fn list(&self) -> Result<Vec<FileEntry>> {
        let dir = if self.inner.base.is_empty() {
            "/".to_string()
        } else {
            self.inner.base.clone()
        };
        let entries = match self.block_on(self.inner.op.list(&dir)) {
            Ok(v) => v,
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.err("list", "", e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let meta = entry.metadata();
            let name = entry.name();
            if !meta.is_file() || check_file_name(name).is_err() {
                continue;
            }
            // Some services (local files) list names without lengths.
            let length = if meta.content_length() == 0 {
                match self.file_len(name)? {
                    Some(l) => l,
                    None => continue,
                }
            } else {
                meta.content_length()
            };
            out.push(FileEntry {
                name: name.to_string(),
                length,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn remove(&self, name: &str) -> Result<()> {
        check_file_name(name)?;
        // Deleting a missing object succeeds in OpenDAL.
        self.block_on(self.inner.op.delete(&self.path(name)))
            .map_err(|e| self.err("delete", name, e))
    }

    fn sync_dir(&self) -> Result<()> {
        Ok(())
    }
}

enum ReadFail {
    Dal(opendal::Error),
    Short,
}

/// Copy OpenDAL buffers (each possibly non-contiguous) into `dst`, whose
/// lengths add up to exactly theirs, in order.
fn copy_into(src: &[Buffer], dst: &mut [&mut [u8]]) {
    let mut segs = dst.iter_mut();
    let mut cur: &mut [u8] = &mut [];
    for buf in src {
        for bytes in buf.clone() {
            let mut from: &[u8] = &bytes;
            while !from.is_empty() {
                if cur.is_empty() {
                    match segs.next() {
                        Some(s) => cur = &mut s[..],
                        None => return,
                    }
                    continue;
                }
                let n = cur.len().min(from.len());
                let (head, tail) = std::mem::take(&mut cur).split_at_mut(n);
                head.copy_from_slice(&from[..n]);
                cur = tail;
                from = &from[n..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cut_segments_at_part_boundaries_and_copies_fill_them_in_order() {
        let (mut a, mut b, mut c) = (vec![0u8; 5], vec![0u8; 0], vec![0u8; 9]);
        let parts = split_parts(vec![&mut a, &mut b, &mut c], 100, 4);
        let shape: Vec<(u64, Vec<usize>)> = parts
            .iter()
            .map(|(o, s)| (*o, s.iter().map(|x| x.len()).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (100, vec![4]),
                (104, vec![1, 3]),
                (108, vec![4]),
                (112, vec![2])
            ]
        );
        // Fill every part from buffers split unlike the segments.
        for (o, mut segs) in parts {
            let n: usize = segs.iter().map(|s| s.len()).sum();
            let bytes: Vec<u8> = (0..n as u64).map(|i| (o + i) as u8).collect();
            let (x, y) = bytes.split_at(n / 2);
            copy_into(
                &[Buffer::from(x.to_vec()), Buffer::from(y.to_vec())],
                &mut segs,
            );
        }
        assert_eq!(a, [100, 101, 102, 103, 104]);
        assert_eq!(c, (105..114).collect::<Vec<u8>>());
    }

    #[test]
    fn part_size_grows_only_past_the_part_limit() {
        const MIB: u64 = 1 << 20;
        let p8 = 8 << 20;
        // Up to ~77 GiB, 8 MiB parts fit in 10,000 parts (with the margin).
        assert_eq!(part_size_for(0, p8), p8);
        assert_eq!(part_size_for(70 << 30, p8), p8);
        // 200 GiB: 200 GiB * 65/64 + 64 MiB over 10,000 parts, in whole MiB.
        let big = 200u64 << 30;
        let want = (big + big / 64 + 64 * MIB)
            .div_ceil(S3_MAX_PARTS)
            .next_multiple_of(MIB);
        assert_eq!(part_size_for(big, p8) as u64, want);
        assert!(want * S3_MAX_PARTS >= big + big / 64, "the object fits");
        assert_eq!(want % MIB, 0);
        // A larger configured part is kept; the S3 maximum caps the choice.
        assert_eq!(part_size_for(big, 64 << 20), 64 << 20);
        assert_eq!(part_size_for(u64::MAX, p8), S3_MAX_PART_SIZE);
    }

    #[test]
    fn a_sink_told_a_large_length_uploads_larger_parts() {
        let fs = OpendalFs::from_url("memory://parts/p", &HashMap::new()).unwrap();
        let sink = |len: u64| {
            let mut s = fs.sink("f.dcp").unwrap();
            s.expect_len(len);
            s.part
        };
        assert_eq!(sink(1 << 30), 8 << 20);
        assert_eq!(sink(200 << 30), part_size_for(200 << 30, 8 << 20));
        // After a write the writer is kept, whatever the hint.
        let mut s = fs.sink("g.dcp").unwrap();
        s.write(Bytes::from_static(b"abc")).unwrap();
        s.expect_len(200 << 30);
        assert_eq!(s.part, 8 << 20);
        assert_eq!(Box::new(s).finish(false).unwrap(), 3);
        assert_eq!(fs.read_small("g.dcp", 10).unwrap(), b"abc");
    }
}
