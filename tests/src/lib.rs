//! Shared helpers of the dcp conformance suite.
//!
//! * **Backends**: every case runs against every [`Backend`] chosen by the
//!   environment variable `DCP_TEST_BACKEND`: a comma-separated list of
//!   `fs`, `memory`, `opendal-memory`, `opendal-fs`, `s3`, or `all`
//!   (default: all but `s3`, plus `s3` when `moto_server` is installed; see
//!   [`backends`]). `s3` runs against a moto server on 127.0.0.1 started
//!   once per test binary and stopped with it ([`s3`]). [`Store`] gives raw
//!   access to the files of every backend (through the OS for `fs`, through
//!   the `FileSystem` API for the OpenDAL ones) for cases that damage them.
//! * **Data**: deterministic tensors from a seed ([`TensorSpec`]) and
//!   sharding helpers ([`Sharding`], [`save_boxes`], [`load_boxes`]).
//! * **Reference**: the expected bytes of any destination box are sliced from
//!   the assembled global tensor with a naive per-element loop
//!   ([`slice_box`]), independent of dcp-core's copy kernel.
//! * **Ranks**: [`save_ranks`] and [`load_ranks`] run N ranks as tasks with
//!   [`dcp_core::local::run_ranks`].

use bytes::Bytes;
use dcp_core::checkpoint::is_data_file_name;
use dcp_core::fault::FaultFs;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::metadata::{Metadata, FORMAT_VERSION, MAGIC};
use dcp_core::{
    load, save, ChunkBox, DType, DestItem, DestStateDict, DestTensor, Error, ErrorKind, FileSystem,
    FileSystemReader, FileSystemWriter, LoadResult, ReaderOptions, Result, SaveResult, StateDict,
    TensorChunk, WriterOptions,
};
use dcp_fsspec::{OpendalFs, OpendalOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod s3;

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
    /// server on 127.0.0.1, started once per test binary ([`s3::Moto`]).
    S3,
}

impl Backend {
    /// Every backend this build knows.
    pub const ALL: [Backend; 5] = [
        Backend::Fs,
        Backend::Memory,
        Backend::OpendalMemory,
        Backend::OpendalFs,
        Backend::S3,
    ];

    /// The name used in `DCP_TEST_BACKEND`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fs => "fs",
            Backend::Memory => "memory",
            Backend::OpendalMemory => "opendal-memory",
            Backend::OpendalFs => "opendal-fs",
            Backend::S3 => "s3",
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
        self == Backend::S3
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
                let url = format!("s3://{}/{}", s3::BUCKET, unique(label));
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

/// The default backend list: every backend, `s3` only when `moto_server`
/// is installed. Under `CI` a missing moto is an error, not a skip.
fn default_backends() -> Vec<Backend> {
    let mut v = vec![
        Backend::Fs,
        Backend::Memory,
        Backend::OpendalMemory,
        Backend::OpendalFs,
    ];
    if s3::moto_installed() {
        v.push(Backend::S3);
    } else if std::env::var_os("CI").is_some() {
        panic!(
            "{} is not on PATH and CI is set: the s3 backend cannot run \
             (pip install 'moto[server]'; .ci/run does this)",
            s3::MOTO
        );
    } else {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            eprintln!(
                "SKIPPED backend s3: {} is not installed (pip install 'moto[server]')",
                s3::MOTO
            )
        });
    }
    v
}

/// The backends selected by `DCP_TEST_BACKEND`: a comma-separated list of
/// `fs`, `memory`, `opendal-memory`, `opendal-fs`, `s3`, or `all`. Unset or
/// empty: `fs,memory,opendal-memory,opendal-fs`, plus `s3` when
/// `moto_server` is on `PATH` (when `CI` is set, a missing moto fails
/// instead). Panics on an unknown name, so a typo never silently runs
/// nothing, and when `s3` is asked for but moto is not installed.
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
    if v.contains(&Backend::S3) && !s3::moto_installed() {
        panic!(
            "DCP_TEST_BACKEND asks for s3, but {} is not on PATH (pip install 'moto[server]')",
            s3::MOTO
        );
    }
    v
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
    let opts = if backend == Backend::S3 {
        s3::Moto::shared().options()
    } else {
        HashMap::new()
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
// Deterministic data and the independent reference
// ---------------------------------------------------------------------------

/// SplitMix64: a small, good 64-bit mixer.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A tensor whose every element is a function of its name, seed and global
/// linear index.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Item name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Seed: two specs differing only in seed hold different data.
    pub seed: u64,
}

impl TensorSpec {
    /// A spec.
    pub fn new(name: &str, dtype: DType, shape: &[u64], seed: u64) -> Self {
        TensorSpec {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            seed,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes of the whole tensor.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// The whole tensor, row-major, assembled element by element from the
    /// generator.
    pub fn global(&self) -> Vec<u8> {
        let elem = self.dtype.size();
        let base = splitmix(self.seed ^ name_hash(&self.name));
        let mut out = Vec::with_capacity(self.nbytes() as usize);
        for i in 0..self.numel() {
            let v = splitmix(base ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93));
            let bytes = v.to_le_bytes();
            if self.dtype == DType::Bool {
                out.push(bytes[0] & 1);
            } else {
                out.extend_from_slice(&bytes[..elem]);
            }
        }
        out
    }

    /// The expected bytes of box `b` (reference: naive slicing of
    /// [`TensorSpec::global`]).
    pub fn slice(&self, b: &ChunkBox) -> Vec<u8> {
        slice_box(&self.global(), &self.shape, self.dtype.size(), b)
    }
}

/// Slice box `b` out of the row-major tensor `global` of `shape`, one
/// element at a time (the independent reference: no run detection, no
/// shared code with dcp-core).
pub fn slice_box(global: &[u8], shape: &[u64], elem: usize, b: &ChunkBox) -> Vec<u8> {
    let n = shape.len();
    assert_eq!(b.ndim(), n, "box rank differs from shape");
    let numel: u64 = b.sizes.iter().product();
    let mut out = Vec::with_capacity(numel as usize * elem);
    if numel == 0 {
        return out;
    }
    let mut strides = vec![1u64; n];
    for d in (0..n.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let mut idx = vec![0u64; n];
    for _ in 0..numel {
        let mut linear = 0u64;
        for d in 0..n {
            linear += (b.offsets[d] + idx[d]) * strides[d];
        }
        let at = linear as usize * elem;
        out.extend_from_slice(&global[at..at + elem]);
        // Odometer increment, last dimension fastest.
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < b.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Deterministic bytes for a bytes item.
pub fn bytes_value(name: &str, seed: u64, len: usize) -> Vec<u8> {
    let base = splitmix(seed ^ name_hash(name));
    (0..len as u64).map(|i| splitmix(base ^ i) as u8).collect()
}

// ---------------------------------------------------------------------------
// Shardings
// ---------------------------------------------------------------------------

/// How a tensor is split over ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Rank 0 holds the whole tensor.
    Full,
    /// Every rank holds the whole tensor (declared replicated on save).
    Replicated,
    /// Even split of dimension 0.
    Rows,
    /// Even split of the last dimension.
    Cols,
    /// A 2-D grid over dimensions 0 and 1 (`a x b = world`).
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
    ChunkBox { offsets, sizes }
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
    match sharding {
        Sharding::Full => out[0].push(full),
        Sharding::Replicated => out.iter_mut().for_each(|v| v.push(full.clone())),
        Sharding::Rows => {
            for (r, p) in split_even(shape[0], w).into_iter().enumerate() {
                out[r].push(box_along(shape, 0, p));
            }
        }
        Sharding::Cols => {
            for (r, p) in split_even(shape[nd - 1], w).into_iter().enumerate() {
                out[r].push(box_along(shape, nd - 1, p));
            }
        }
        Sharding::Uneven => {
            for (r, p) in split_uneven(shape[0], w).into_iter().enumerate() {
                out[r].push(box_along(shape, 0, p));
            }
        }
        Sharding::Grid => {
            let (a, b) = grid_factors(w);
            let rows = split_even(shape[0], a);
            let cols = split_even(shape[1], b);
            for (i, &(r0, rl)) in rows.iter().enumerate() {
                for (j, &(c0, cl)) in cols.iter().enumerate() {
                    let mut bx = box_along(shape, 0, (r0, rl));
                    bx.offsets[1] = c0;
                    bx.sizes[1] = cl;
                    out[i * b as usize + j].push(bx);
                }
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
                    data: Bytes::from(slice_box(&global, &spec.shape, elem, &region)),
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
    WriterOptions {
        sync_files: false,
        ..Default::default()
    }
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
    let n = sds.len();
    let sds = Arc::new(sds);
    let writer = match FileSystemWriter::new(fs, opts) {
        Ok(w) => Arc::new(w),
        Err(e) => return vec![Err(e)],
    };
    run_ranks(n, timeout, move |g| {
        let sds = sds.clone();
        let writer = writer.clone();
        async move {
            let rank = dcp_core::Collective::rank(&g);
            save(&sds[rank], writer.as_ref(), &g).await
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
// A file system that records reads
// ---------------------------------------------------------------------------

/// One `read_into` call: file, offset, length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadCall {
    /// File name.
    pub name: String,
    /// Offset of the read.
    pub offset: u64,
    /// Length of the read.
    pub len: u64,
}

/// Wraps a [`FileSystem`] and records every `read_into` and
/// `read_scattered` (one call each, with the total length). It never
/// claims data is cached (`read_if_cached` is the default `false`), so
/// loads through it scatter with `read_scattered`.
#[derive(Debug)]
pub struct RecordingFs {
    inner: Arc<dyn FileSystem>,
    reads: Mutex<Vec<ReadCall>>,
}

impl RecordingFs {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn FileSystem>) -> Self {
        RecordingFs {
            inner,
            reads: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, name: &str, offset: u64, len: u64) {
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ReadCall {
                name: name.to_string(),
                offset,
                len,
            });
    }

    /// The reads so far.
    pub fn reads(&self) -> Vec<ReadCall> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl FileSystem for RecordingFs {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn capabilities(&self) -> dcp_core::Capabilities {
        self.inner.capabilities()
    }
    fn prepare(&self) -> Result<()> {
        self.inner.prepare()
    }
    fn create(&self, name: &str) -> Result<Box<dyn dcp_core::FileSink>> {
        self.inner.create(name)
    }
    fn read_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.record(name, offset, buf.len() as u64);
        self.inner.read_into(name, offset, buf)
    }
    fn read_scattered(
        &self,
        name: &str,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<()> {
        self.record(name, offset, bufs.iter().map(|b| b.len() as u64).sum());
        self.inner.read_scattered(name, offset, bufs)
    }
    fn file_len(&self, name: &str) -> Result<Option<u64>> {
        self.inner.file_len(name)
    }
    fn write_atomic(&self, name: &str, data: &[u8], sync: bool) -> Result<()> {
        self.inner.write_atomic(name, data, sync)
    }
    fn list(&self) -> Result<Vec<dcp_core::FileEntry>> {
        self.inner.list()
    }
    fn remove(&self, name: &str) -> Result<()> {
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> Result<()> {
        self.inner.sync_dir()
    }
}

// ---------------------------------------------------------------------------
// Hand-crafted metadata
// ---------------------------------------------------------------------------

/// Encode `md` with the `.metadata` header layout of `dcp_core::metadata`
/// (magic, version, flags, body length, CRC-32C of the body, postcard body)
/// **without** validating it, to craft hostile checkpoints.
pub fn encode_metadata_unchecked(md: &Metadata, version: u32) -> Vec<u8> {
    let body = postcard::to_allocvec(md).expect("postcard encodes metadata");
    let mut out = Vec::with_capacity(28 + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// [`encode_metadata_unchecked`] with the current format version.
pub fn encode_metadata_current(md: &Metadata) -> Vec<u8> {
    encode_metadata_unchecked(md, FORMAT_VERSION)
}

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
    fn reference_slicing() {
        let spec = TensorSpec::new("t", DType::U16, &[3, 4], 7);
        let g = spec.global();
        assert_eq!(g.len(), 24);
        let b = ChunkBox::new(vec![1, 1], vec![2, 2]).unwrap();
        let s = spec.slice(&b);
        let at = |r: usize, c: usize| &g[(r * 4 + c) * 2..(r * 4 + c) * 2 + 2];
        let want = [at(1, 1), at(1, 2), at(2, 1), at(2, 2)].concat();
        assert_eq!(s, want);
        assert_eq!(slice_box(&g, &[3, 4], 2, &ChunkBox::full(&[3, 4])), g);
        let scalar = TensorSpec::new("s", DType::F64, &[], 1);
        assert_eq!(scalar.global().len(), 8);
        assert_eq!(scalar.slice(&ChunkBox::full(&[])), scalar.global());
        assert_ne!(
            TensorSpec::new("t", DType::U16, &[3, 4], 8).global(),
            g,
            "seeds differ"
        );
    }

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
