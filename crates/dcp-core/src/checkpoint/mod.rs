//! Save and load orchestration: the commit protocol across ranks, and the
//! writer and reader that run the pipeline over any [`FileSystem`](crate::FileSystem).
//!
//! Save: every rank offers a plan; the coordinator (rank 0) checks the
//! location, takes its lease (one writer at a time), dedups and assigns
//! records, and scatters assignments; every rank writes its data files under
//! names unique to this save; the coordinator gathers the results and, only
//! if every rank succeeded, replaces `.metadata` atomically if it still holds
//! the checkpoint the save started from (compare-and-swap; an ambiguous
//! failure is decided by reading it back), removes data files of older
//! generations and dead saves (keeping the replaced checkpoint's), releases
//! the lease and broadcasts the outcome. Every rank returns the same `Ok` or
//! the same error, naming the failing rank.
//!
//! Load: the coordinator reads and validates `.metadata` once and broadcasts
//! it; every rank plans and reads only what its destination needs; the
//! outcome is agreed by an all-gather. A load into device memory
//! ([`load_to_device`]) runs the same protocol, reading in bounded batches
//! through staging buffers copied to the device while the next are read.

mod assemble;
mod async_save;
mod device_load;
mod foreign;
mod fs_reader;
mod fs_writer;
mod lease;
mod load;
mod options;
mod plan_cache;
mod save;
pub mod simulate;
mod store;
mod versioned;
pub(crate) mod wire;

pub use assemble::assemble_metadata;
pub use async_save::{AsyncSave, AsyncSaver, WhenBusy};
pub use device_load::{
    load_to_device, DeviceDest, DeviceLoadOptions, DeviceLoadResult, DeviceTensor,
};
pub use foreign::MetadataTranslator;
pub(crate) use fs_reader::located;
pub use fs_reader::FileSystemReader;
pub use fs_writer::{is_data_file_name, FileSystemWriter};
pub use lease::{LeaseInfo, LEASE_FILE};
pub use load::{load, load_from, load_with, read_metadata, LoadResult};
pub use options::{LoadOptions, ReaderOptions, SaveOptions, WriterOptions};
pub use plan_cache::{PlanCacheStats, SavePlanCache};
pub use save::{save, save_with, SaveResult};
pub use store::{RankWrite, StorageReader, StorageWriter, WriteRecord};

/// The coordinator of saves and loads.
pub(crate) const ROOT: usize = 0;
