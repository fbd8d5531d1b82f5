//! Staging: turning item sources into host buffers ready to write, and
//! loaded host buffers into device memory.
//!
//! A synchronous save of host memory stages nothing: records go to the file
//! sinks as the caller's `Bytes` (zero copy). Chunks whose bytes live
//! elsewhere ([`ChunkData::Source`]: device memory) are copied out piece by
//! piece on the writer thread's copy lane, a few pieces ahead, within the
//! thread's `per_thread_copy_ahead` budget (the peak is [`StagedGauge`]'s), so copies overlap
//! writes. An asynchronous save ([`AsyncSaver`](crate::AsyncSaver)) copies
//! the whole state dict once into a [`HostPool`] reused across saves, and
//! writes in the background.
//!
//! A load into device memory ([`load_to_device`](crate::load_to_device))
//! is the mirror: records are read into staging buffers a [`ChunkSink`]
//! hands out, within `thread_count x per_thread_copy_ahead` staged bytes,
//! and each filled buffer is copied to the device on a copy lane while the
//! next ones are read.

pub(crate) mod budget;
mod pool;
pub mod sim;
mod sink;
mod source;

pub use budget::StagedGauge;
pub use pool::{HostPool, PooledBuf};
pub use sink::{check_runs, ChunkSink, PendingUpload};
pub use source::{ChunkData, ChunkSource, StagedCopy};
