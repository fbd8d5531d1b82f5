//! Running N ranks in one process: each rank a task with its own
//! [`LocalGroup`] member.

use crate::collective::LocalGroup;
use crate::error::{Error, ErrorKind, Result};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Run `f(group)` for `n` ranks as tasks on the current tokio runtime and
/// collect their results in rank order. A rank that panics yields an error
/// naming it (and its group member is dropped, so the others fail fast).
pub async fn run_ranks<F, Fut, T>(n: usize, timeout: Duration, f: F) -> Vec<Result<T>>
where
    F: Fn(LocalGroup) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let f = Arc::new(f);
    let handles: Vec<_> = LocalGroup::with_timeout(n, timeout)
        .into_iter()
        .map(|g| {
            let f = f.clone();
            tokio::spawn(async move { f(g).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for (rank, h) in handles.into_iter().enumerate() {
        out.push(match h.await {
            Ok(r) => r,
            Err(e) => Err(
                Error::new(ErrorKind::RankFailed, format!("rank {rank} panicked: {e}"))
                    .with_rank(rank),
            ),
        });
    }
    out
}

/// Run `fut` to completion on a new multi-threaded runtime: the blocking
/// entry point for callers without one. Refuses to run inside a runtime.
pub fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::invalid(
            "block_on called from inside a tokio runtime; await the future instead",
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::new(ErrorKind::Io, format!("start tokio runtime: {e}")))?;
    Ok(rt.block_on(fut))
}
