//! The I/O runtime that drives OpenDAL's async API for dcp's blocking
//! worker threads.
//!
//! One multi-threaded tokio runtime per process, started on first use and
//! never dropped. Owning it (rather than borrowing the caller's) matters:
//! the HTTP client's pooled connections belong to the runtime that opened
//! them, so a runtime that ends (every `#[tokio::test]`, every short-lived
//! `block_on`) would strand them; and a caller's runtime may lack the I/O or
//! timer drivers that the HTTP client and the timeout layer need.

use dcp_core::{Error, ErrorKind, Result};
use std::future::Future;
use std::sync::OnceLock;

static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// The handle of the process-wide I/O runtime, starting it on first use.
pub(crate) fn io_handle() -> Result<tokio::runtime::Handle> {
    let rt = RUNTIME.get_or_init(|| {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 16);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("dcp-opendal-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(Error::new(
            ErrorKind::Io,
            format!("dcp-fsspec: cannot start its I/O runtime: {e}"),
        )),
    }
}

/// Run `fut` to completion on the calling thread, with `handle`'s runtime
/// entered so that sockets and timers register with its drivers (which its
/// worker threads keep turning).
///
/// Unlike `Handle::block_on`, this does not panic when the calling thread is
/// itself inside an async context; it only blocks it, as every
/// `FileSystem` method is documented to do. The future runs outside tokio's
/// cooperative budget: a caller's task that has spent its budget would
/// otherwise make every tokio resource return `Pending` and wake at once,
/// and this loop would spin forever.
pub(crate) fn block_on<F: Future>(handle: &tokio::runtime::Handle, fut: F) -> F::Output {
    let _entered = handle.enter();
    futures::executor::block_on(tokio::task::coop::unconstrained(fut))
}
