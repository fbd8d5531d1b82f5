//! The byte-moving paths: write workers, read workers, shared reads across
//! ranks, and the copy kernel.

pub mod copy;
pub(crate) mod exchange;
pub(crate) mod prefetch;
pub(crate) mod read;
pub(crate) mod shared;
pub(crate) mod write;

pub use read::ReadStats;

use crate::error::{Error, ErrorKind, Result};

/// Run blocking work (file I/O, copies, transforms) off the async executor.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("a storage worker failed: {e}")))?
}
