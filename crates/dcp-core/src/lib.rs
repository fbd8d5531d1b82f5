//! dcp-core: the heart of dcp, distributed checkpointing for machine-learning
//! state.
//!
//! It holds the data model ([`StateDict`], [`DestStateDict`], [`ChunkBox`]),
//! the metadata format ([`Metadata`]), the planners ([`plan`]), the pipeline
//! that moves bytes, and the plug points other crates implement:
//! [`FileSystem`] (where bytes go: `dcp-fs`, `dcp-fsspec`),
//! [`StreamTransformExtension`] (compression, checksums: `dcp-ext`) and
//! [`Collective`] (how ranks talk: [`Single`], [`LocalGroup`], later MPI),
//! and [`ChunkSource`]/[`ChunkSink`] (device memory a save copies out of
//! and a load, [`load_to_device`], copies into).
//!
//! dcp-core does no I/O of its own: every byte goes through a `FileSystem`.
//! It refuses, with an [`Error`] naming what is wrong, hostile or damaged
//! metadata, shapes or dtypes that differ from what was saved, conflicting
//! items across ranks, and unknown transforms; it never executes code found
//! in a checkpoint.
//!
//! ```
//! use dcp_core::{mem::MemoryFs, *};
//! use std::sync::Arc;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://example"));
//! let mut sd = StateDict::new();
//! sd.insert_full_tensor("w", DType::F32, vec![2], bytes::Bytes::from(vec![0u8; 8])).unwrap();
//! let writer = FileSystemWriter::new(fs.clone(), WriterOptions::default()).unwrap();
//! save(&sd, &writer, &Single).await.unwrap();
//!
//! let mut dest = DestStateDict::new();
//! dest.want_tensor("w", DType::F32, vec![2], vec![ChunkBox::full(&[2])]).unwrap();
//! let reader = FileSystemReader::new(fs, ReaderOptions::default());
//! let loaded = load(dest, &reader, &Single).await.unwrap();
//! assert_eq!(loaded.state_dict.tensor("w").unwrap().chunks[0].data, vec![0u8; 8]);
//! # });
//! ```

pub mod checkpoint;
pub mod collective;
pub mod dtype;
pub mod error;
pub mod format;
mod heap;
pub mod layer;
pub mod local;
pub mod location;
pub mod mem;
pub mod metadata;
pub mod model;
pub mod pipeline;
pub mod placement;
pub mod plan;
pub mod stage;
pub mod storage;
pub mod transform;
pub mod verify;

pub use checkpoint::{
    is_data_file_name, load, load_from, load_to_device, load_with, read_metadata, save, save_with,
    AsyncSave, AsyncSaver, DeviceDest, DeviceLoadOptions, DeviceLoadResult, DeviceTensor,
    FileSystemReader, FileSystemWriter, LeaseInfo, LoadOptions, LoadResult, MetadataTranslator,
    PlanCacheStats, ReaderOptions, SaveOptions, SavePlanCache, SaveResult, StorageReader,
    StorageWriter, WhenBusy, WriterOptions, LEASE_FILE,
};
pub use collective::{Collective, LocalGroup, LocalValue, NodeWindow, Single};
pub use dtype::DType;
pub use error::{Error, ErrorKind, Result};
pub use format::{FormatRegistry, SerializationFormat};
pub use layer::FileSystemLayer;
pub use metadata::{FormatKind, Metadata};
pub use model::{
    ChunkBox, DestChunk, DestData, DestItem, DestStateDict, DestTensor, Dims, Item, StateDict,
    TensorBuffer, TensorChunk, TensorItem,
};
pub use pipeline::ReadStats;
pub use stage::{ChunkData, ChunkSink, ChunkSource, HostPool};
pub use storage::{Capabilities, FileEntry, FileSink, FileSystem};
pub use transform::{
    Crc32c, ExtensionFactory, ExtensionRegistry, StreamEncoder, StreamTransformExtension,
    TransformKind,
};
