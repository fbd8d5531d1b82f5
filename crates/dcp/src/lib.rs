//! dcp: distributed checkpointing for machine-learning state, in one crate.
//!
//! dcp saves the state of a training job (weights, optimizer moments, RNG and
//! data-loader state) as tensors sharded across ranks, to a local disk or an
//! object store, and loads it back on any number of ranks with any sharding.
//! This crate is the front door: it re-exports everything of
//! [dcp-core](dcp_core) (the data model, [`save`], [`load`], the planners and
//! the plug-in traits) and, by cargo feature, the storage and transform
//! crates, and it maps a checkpoint location, a path or a URL, to the
//! storage that serves it:
//!
//! * [`writer`] / [`writer_with`]: a [`FileSystemWriter`] for a location;
//! * [`reader`] / [`reader_with`]: a [`FileSystemReader`] for a location that
//!   resolves every transform this build ships ([`default_registry`]), so a
//!   compressed or checksummed checkpoint loads with default options, and
//!   (feature `torch`) reads a checkpoint written by
//!   `torch.distributed.checkpoint` as well, recognized by its `.metadata`
//!   (a pickle where dcp's opens with `DCPMETA`);
//! * [`open`]: the location's [`FileSystem`] itself;
//! * [`validate_checkpoint_id`]: whether this build can open a location
//!   (torch's `validate_checkpoint_id`).
//!
//! ```
//! # #[cfg(all(feature = "fs", feature = "ext"))]
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use dcp::{load, save, ChunkBox, DType, DestStateDict, ReaderOptions, Single, StateDict, WriterOptions};
//! use std::sync::Arc;
//!
//! let tmp = tempfile::tempdir().unwrap();
//! let location = format!("file://{}/step-100", tmp.path().display());
//! let data: Vec<u8> = (0..4096u32).flat_map(|i| (i % 7).to_le_bytes()).collect();
//! let mut sd = StateDict::new();
//! sd.insert_full_tensor("w", DType::U32, vec![4096], bytes::Bytes::from(data.clone())).unwrap();
//!
//! // zstd, then CRC-32C over the stored bytes.
//! let options = WriterOptions::default()
//!     .extensions(vec![Arc::new(dcp::ext::Zstd::new(3).unwrap()), Arc::new(dcp::ext::Crc32c::new())]);
//! save(&sd, &dcp::writer(&location, options).unwrap(), &Single).await.unwrap();
//!
//! // Default reader options: the default registry knows zstd and CRC-32C.
//! let mut dest = DestStateDict::new();
//! dest.want_tensor("w", DType::U32, vec![4096], vec![ChunkBox::full(&[4096])]).unwrap();
//! let reader = dcp::reader(&location, ReaderOptions::default()).unwrap();
//! let loaded = load(dest, &reader, &Single).await.unwrap();
//! assert_eq!(loaded.state_dict.tensor("w").unwrap().chunks[0].data, data);
//! # });
//! ```
//!
//! # Locations
//!
//! The one table of schemes is [`location::SCHEMES`] in dcp-core:
//!
//! | location | served by | feature |
//! |---|---|---|
//! | `ckpt/step100`, `/data/ckpt`, `file:///abs/path` | `fs::LocalFs` (dcp-fs) | `fs` |
//! | `s3://bucket/prefix` (`s3a://`) | `fsspec::OpendalFs` (OpenDAL S3) | `s3` |
//! | `gs://bucket/prefix` (`gcs://`) | `fsspec::OpendalFs` (OpenDAL GCS) | `gcs` |
//! | `azblob://container/prefix` (`az://`, `azure://`, `abfs://`, `abfss://`) | `fsspec::OpendalFs` (OpenDAL Azure Blob) | `azblob` |
//! | `memory://name/prefix` | see below | none |
//!
//! A location whose feature is off is refused with
//! [`ErrorKind::Unsupported`], naming the feature to enable; any other
//! scheme (`ftp://`, `http://`) with [`ErrorKind::InvalidInput`], naming it
//! and listing the accepted ones.
//!
//! **`memory://` needs no feature.** It is one store per name in the process
//! (as in fsspec), so a writer and a reader opened on the same location share
//! it. When dcp-fsspec is compiled in (any of `s3`, `gcs`, `azblob`) the store
//! is OpenDAL's memory service, the same one `dcp::fsspec` opens; otherwise it
//! is a [`mem::MemoryFs`] kept per location by this crate. Either way it
//! holds bytes, not durability, and serves tests and examples.
//!
//! `storage_options` are fsspec's: settings for the object store (S3's
//! `endpoint`, `region`, `access_key_id`, ..., and s3fs's spellings
//! `endpoint_url`, `key`, `secret`; any field of OpenDAL's configuration of
//! the service) and `dcp_*` tuning keys (see dcp-fsspec, `dcp::fsspec`). An unknown key is
//! an [`ErrorKind::InvalidInput`] error naming it and listing the accepted
//! ones. Local paths take none, nor does `memory://` without dcp-fsspec.
//!
//! # Feature flags
//!
//! Like tokio's, dcp's features add what you name and nothing else:
//!
//! - `fs` *(default)*: local paths and `file://` URLs, through dcp-fs
//!   (re-exported as `dcp::fs`): positional I/O, fsync, atomic rename.
//! - `ext` *(default)*: compression (zstd, lz4) and checksums (CRC-32C,
//!   CRC-32) from dcp-ext (re-exported as `dcp::ext`), and their factories in
//!   [`default_registry`], so every checkpoint they wrote loads.
//! - `s3`: `s3://` and `s3a://` through dcp-fsspec on OpenDAL (re-exported
//!   as `dcp::fsspec`), with settings from `AWS_ENDPOINT_URL`, `AWS_REGION`,
//!   `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `storage_options`.
//! - `gcs`: `gs://` and `gcs://` through dcp-fsspec.
//! - `azblob`: `azblob://`, `az://`, `azure://`, `abfs://`, `abfss://`
//!   through dcp-fsspec.
//!
//! - `mpi`: ranks as the processes of an MPI job (`mpirun`, Slurm's
//!   `srun`), through dcp-mpi (re-exported as `dcp::mpi`):
//!   `dcp::mpi::MpiGroup` is a [`Collective`] over an MPI communicator.
//!   Off by default: it needs an MPI library and libclang to build (Debian:
//!   `libopenmpi-dev openmpi-bin libclang-dev`).
//! - `cuda`: NVIDIA GPUs, through dcp-cuda (re-exported as `dcp::cuda`):
//!   `dcp::cuda::CudaStager` turns device tensors into chunks a save stages
//!   through pinned host buffers, one CUDA stream per writer thread. Off by
//!   default; builds without a CUDA toolkit, needs the NVIDIA driver at run
//!   time (without it, an `Unsupported` error, never a panic).
//!
//! Without `fs`, local paths are refused; without `ext`, checkpoints using a
//! transform load only if the caller registers its factory. Without `mpi`,
//! the ranks of a save or load are tasks of one process
//! ([`LocalGroup`]), or any other [`Collective`] the caller brings.

pub mod hf;
pub mod hf_import;
pub use dcp_core::location::{Backend, Location};
pub use dcp_core::*;

/// NVIDIA GPUs: device tensors as chunk sources staged through pinned host
/// buffers, one CUDA stream per writer thread: the dcp-cuda crate (feature
/// `cuda`).
#[cfg(feature = "cuda")]
pub use dcp_cuda as cuda;
/// Compression and checksums: the dcp-ext crate (feature `ext`).
#[cfg(feature = "ext")]
pub use dcp_ext as ext;
/// The local file system backend: the dcp-fs crate (feature `fs`).
#[cfg(feature = "fs")]
pub use dcp_fs as fs;
/// Object stores through OpenDAL: the dcp-fsspec crate (features `s3`,
/// `gcs`, `azblob`).
#[cfg(any(feature = "s3", feature = "gcs", feature = "azblob"))]
pub use dcp_fsspec as fsspec;
/// Ranks as the processes of an MPI job: the dcp-mpi crate (feature
/// `mpi`).
#[cfg(feature = "mpi")]
pub use dcp_mpi as mpi;

/// Checkpoints written by `torch.distributed.checkpoint`: the dcp-torch
/// crate (feature `torch`), which [`reader`] registers.
#[cfg(feature = "torch")]
pub use dcp_torch as torch;

use std::collections::HashMap;
use std::sync::Arc;

/// Whether this build serves `backend` (its feature is on).
// With every feature on, the arms are all `true` but the last.
#[allow(clippy::match_like_matches_macro)]
fn served(backend: Backend) -> bool {
    match backend {
        Backend::Local => cfg!(feature = "fs"),
        Backend::Memory => true,
        Backend::S3 => cfg!(feature = "s3"),
        Backend::Gcs => cfg!(feature = "gcs"),
        Backend::Azblob => cfg!(feature = "azblob"),
        _ => false,
    }
}

/// The error for a location whose backend this build does not serve.
fn missing_feature(loc: &Location) -> Error {
    let what = match loc.backend() {
        Backend::Local => "local paths".to_string(),
        b => format!("{}:// locations ({})", loc.scheme(), b.name()),
    };
    let feature = loc.feature().unwrap_or("?");
    Error::unsupported(format!(
        "{}: this build of dcp cannot open {what}; enable the \"{feature}\" feature of the dcp crate",
        loc.as_str()
    ))
}

/// Refuse every key of `storage_options`: `loc` takes none.
#[cfg(any(
    feature = "fs",
    not(any(feature = "s3", feature = "gcs", feature = "azblob"))
))]
fn no_storage_options(loc: &Location, storage_options: &HashMap<String, String>) -> Result<()> {
    let mut keys: Vec<&String> = storage_options.keys().collect();
    keys.sort_unstable();
    match keys.first() {
        None => Ok(()),
        Some(k) => Err(Error::invalid(format!(
            "unknown storage option {k:?} for {}; accepted: none ({} takes no storage options)",
            loc.as_str(),
            if loc.backend() == Backend::Local {
                "a local path"
            } else {
                "memory:// without an object-store feature"
            }
        ))),
    }
}

/// Open the checkpoint location `location` (a path or URL; see the [crate
/// docs](crate#locations)) as a [`FileSystem`], configured by
/// `storage_options`.
///
/// Refuses with [`ErrorKind::InvalidInput`] what [`Location::parse`]
/// refuses (an empty string, an unknown scheme, a relative `file://` URL, a
/// URL without a bucket) and a storage option the location does not take;
/// with [`ErrorKind::Unsupported`] a location whose cargo feature is off,
/// naming it (`enable the "s3" feature of the dcp crate`). Opening checks no
/// credentials and touches no storage: errors of access come with the first
/// read or write.
pub fn open(
    location: &str,
    storage_options: &HashMap<String, String>,
) -> Result<Arc<dyn FileSystem>> {
    open_location(&Location::parse(location)?, storage_options)
}

/// [`open`] for a location already parsed.
pub fn open_location(
    loc: &Location,
    storage_options: &HashMap<String, String>,
) -> Result<Arc<dyn FileSystem>> {
    if !served(loc.backend()) {
        return Err(missing_feature(loc));
    }
    match loc.backend() {
        #[cfg(feature = "fs")]
        Backend::Local => {
            no_storage_options(loc, storage_options)?;
            let path = loc.local_path().expect("a local location has a path");
            Ok(Arc::new(dcp_fs::LocalFs::new(path)))
        }
        #[cfg(any(feature = "s3", feature = "gcs", feature = "azblob"))]
        Backend::Memory | Backend::S3 | Backend::Gcs | Backend::Azblob => {
            dcp_fsspec::open(loc.as_str(), storage_options)
        }
        #[cfg(not(any(feature = "s3", feature = "gcs", feature = "azblob")))]
        Backend::Memory => {
            no_storage_options(loc, storage_options)?;
            Ok(Arc::new(memory_store(loc)))
        }
        _ => Err(missing_feature(loc)),
    }
}

/// The [`mem::MemoryFs`] for `loc`, one per normalised location in the
/// process, so a writer and a reader of one location share it.
#[cfg(not(any(feature = "s3", feature = "gcs", feature = "azblob")))]
fn memory_store(loc: &Location) -> mem::MemoryFs {
    use std::sync::{Mutex, OnceLock};
    static STORES: OnceLock<Mutex<HashMap<String, mem::MemoryFs>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let url = loc.url();
    stores
        .entry(url.clone())
        .or_insert_with(|| mem::MemoryFs::new(url))
        .clone()
}

/// Whether this build can open `location` (torch's `validate_checkpoint_id`):
/// it parses ([`Location::parse`]) and the cargo feature serving it is on.
/// It touches no storage, so a location that opens may still hold no
/// checkpoint.
pub fn validate_checkpoint_id(location: &str) -> bool {
    Location::parse(location).is_ok_and(|l| served(l.backend()))
}

/// A [`FileSystemWriter`] saving to `location` with `options`, without
/// storage options. Refuses what [`open`] and [`FileSystemWriter::new`]
/// refuse.
pub fn writer(location: &str, options: WriterOptions) -> Result<FileSystemWriter> {
    writer_with(location, &HashMap::new(), options)
}

/// A [`FileSystemWriter`] saving to `location`, opened with
/// `storage_options` (see [`open`]). Refuses what [`open`] and
/// [`FileSystemWriter::new`] refuse (`thread_count == 0`).
pub fn writer_with(
    location: &str,
    storage_options: &HashMap<String, String>,
    options: WriterOptions,
) -> Result<FileSystemWriter> {
    FileSystemWriter::new(open(location, storage_options)?, options)
}

/// A [`FileSystemReader`] loading from `location` with `options`, without
/// storage options; its registry also resolves every transform this build
/// ships (see [`reader_with`]). Refuses what [`open`] refuses.
pub fn reader(location: &str, options: ReaderOptions) -> Result<FileSystemReader> {
    reader_with(location, &HashMap::new(), options)
}

/// A [`FileSystemReader`] loading from `location`, opened with
/// `storage_options` (see [`open`]). Every factory of [`default_registry`]
/// whose name `options.registry` lacks is added to it (the caller's own
/// factories win), so a checkpoint saved with dcp-ext's compression or
/// checksums loads with [`ReaderOptions::default`]. With the `torch`
/// feature it also reads checkpoints written by
/// `torch.distributed.checkpoint` ([`add_foreign_readers`]). Refuses what
/// [`open`] refuses.
pub fn reader_with(
    location: &str,
    storage_options: &HashMap<String, String>,
    options: ReaderOptions,
) -> Result<FileSystemReader> {
    let fs = open(location, storage_options)?;
    let mut options = options;
    add_default_extensions(&mut options.registry);
    add_foreign_readers(&mut options);
    Ok(FileSystemReader::new(fs, options))
}

/// Make `options` read the checkpoints of other tools this build knows:
/// with the `torch` feature, `torch.distributed.checkpoint`'s
/// ([`dcp_torch::register`]: its metadata translator, record format and
/// transform). Without it, nothing.
pub fn add_foreign_readers(options: &mut ReaderOptions) {
    #[cfg(feature = "torch")]
    dcp_torch::register(options);
    #[cfg(not(feature = "torch"))]
    let _ = options;
}

/// The factories of every transform the enabled crates ship: dcp-ext's
/// `zstd`, `lz4`, `crc32c` and `crc32` with the `ext` feature, none
/// without.
pub fn default_factories() -> Vec<Arc<dyn ExtensionFactory>> {
    #[cfg(feature = "ext")]
    {
        dcp_ext::factories()
    }
    #[cfg(not(feature = "ext"))]
    {
        Vec::new()
    }
}

/// An [`ExtensionRegistry`] resolving every descriptor the enabled crates
/// ship ([`default_factories`]). A descriptor it does not know is refused
/// at load time with [`ErrorKind::Unsupported`], naming the crate that
/// provides it.
pub fn default_registry() -> ExtensionRegistry {
    let mut r = ExtensionRegistry::new();
    add_default_extensions(&mut r);
    r
}

/// Add to `registry` every factory of [`default_factories`] whose name it
/// does not have yet; factories already registered are kept.
pub fn add_default_extensions(registry: &mut ExtensionRegistry) {
    for f in default_factories() {
        if !registry.contains(f.name()) {
            registry.register(f);
        }
    }
}

/// The README's code blocks, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_matches_features() {
        assert_eq!(validate_checkpoint_id("ckpt"), cfg!(feature = "fs"));
        assert_eq!(validate_checkpoint_id("file:///x"), cfg!(feature = "fs"));
        assert_eq!(validate_checkpoint_id("s3://b/p"), cfg!(feature = "s3"));
        assert_eq!(validate_checkpoint_id("gs://b/p"), cfg!(feature = "gcs"));
        assert_eq!(validate_checkpoint_id("az://c/p"), cfg!(feature = "azblob"));
        assert!(validate_checkpoint_id("memory://m"));
        assert!(!validate_checkpoint_id("ftp://h/x"));
        assert!(!validate_checkpoint_id("file://relative"));
        assert!(!validate_checkpoint_id(""));
    }

    /// `dcp::reader` picks torch's reader by the `.metadata` it finds: the
    /// zstd fixture written by torch 2.15 loads with default options.
    #[cfg(all(feature = "torch", feature = "fs"))]
    #[test]
    fn reader_recognizes_a_torch_checkpoint() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/torch-dcp-2.15/torch_save_zstd/ckpt"
        );
        let r = reader(dir, ReaderOptions::default()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let md = rt.block_on(read_metadata(&r)).unwrap();
        assert_eq!(md.format.name(), "torch-save");
        let mut dest = DestStateDict::new();
        dest.want_bytes("optim.name").unwrap();
        dest.want_tensor(
            "optim.hist.1",
            DType::F32,
            vec![2, 3],
            vec![ChunkBox::full(&[2, 3])],
        )
        .unwrap();
        let l = rt.block_on(load(dest, &r, &Single)).unwrap();
        assert_eq!(l.state_dict.bytes("optim.name").unwrap(), b"\"adamw\"");
        let hist: Vec<f32> = l.state_dict.tensor("optim.hist.1").unwrap().chunks[0]
            .data
            .as_slice()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(hist, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    }

    #[test]
    fn default_registry_holds_the_shipped_transforms() {
        let r = default_registry();
        for name in ["zstd", "lz4", "crc32"] {
            assert_eq!(r.contains(name), cfg!(feature = "ext"), "{name}");
        }
        // CRC-32C, the default checksum, is dcp-core's own: always there.
        assert!(r.contains("crc32c"));
    }
}
