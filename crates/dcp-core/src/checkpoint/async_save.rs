//! [`AsyncSaver`]: saves that block only while the state dict is copied out
//! of the way, then write and commit in the background.

use crate::checkpoint::{save_with, SaveOptions, SavePlanCache, SaveResult, StorageWriter};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Item, StateDict, TensorChunk, TensorItem};
use crate::stage::{ChunkData, HostPool};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// What [`AsyncSaver::async_save`] does while an earlier save of the same
/// saver is still writing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenBusy {
    /// Wait for it to end (its outcome stays with its own handle).
    #[default]
    Wait,
    /// Fail at once with [`ErrorKind::Busy`].
    Fail,
}

/// Asynchronous saves of one rank: each copies the state dict once into
/// host buffers of a [`HostPool`] (reused by the next save while the layout
/// is unchanged; a changed layout frees what it no longer needs), returns an
/// [`AsyncSave`] handle, and writes and commits in the background. Saves of
/// one saver never interleave: a second waits for the first to end, or
/// fails ([`WhenBusy`]). Keep one saver per rank for the life of the job.
///
/// Memory: the staged copy is the second copy of the state dict the caller
/// asks for by saving asynchronously; nothing else is held.
#[derive(Clone, Debug)]
pub struct AsyncSaver {
    pool: HostPool,
    gate: Arc<Semaphore>,
    when_busy: WhenBusy,
    plan_cache: SavePlanCache,
}

impl Default for AsyncSaver {
    fn default() -> Self {
        AsyncSaver::new()
    }
}

impl AsyncSaver {
    /// A saver with an empty pool that waits for a save in flight.
    pub fn new() -> AsyncSaver {
        AsyncSaver {
            pool: HostPool::new(),
            gate: Arc::new(Semaphore::new(1)),
            when_busy: WhenBusy::Wait,
            plan_cache: SavePlanCache::new(),
        }
    }

    /// Set what a save does while another is in flight.
    pub fn when_busy(mut self, when_busy: WhenBusy) -> AsyncSaver {
        self.when_busy = when_busy;
        self
    }

    /// The plan cache of this saver's saves (used when the options passed
    /// to [`async_save`](AsyncSaver::async_save) carry none): a save with
    /// the layout of the last one reuses its plan.
    pub fn plan_cache(&self) -> &SavePlanCache {
        &self.plan_cache
    }

    /// The pool staged copies live in.
    pub fn pool(&self) -> &HostPool {
        &self.pool
    }

    /// Save `state_dict` as part of a checkpoint written by every rank of
    /// `collective`, as [`save_with`] does, in the background. Returns once
    /// this rank's state dict is copied (the caller may change it from
    /// then on); the handle yields the same outcome `save_with` would.
    /// Chunks of [`ChunkData::Source`] are copied out of their source.
    ///
    /// Refuses (before copying anything) with [`ErrorKind::Busy`] when a
    /// save of this saver is in flight and the saver was built with
    /// [`WhenBusy::Fail`]; must be called inside a tokio runtime, which runs
    /// the background save.
    pub async fn async_save(
        &self,
        state_dict: &StateDict,
        writer: Arc<dyn StorageWriter>,
        collective: Arc<dyn Collective>,
        options: SaveOptions,
    ) -> Result<AsyncSave> {
        let started = Instant::now();
        let busy = || {
            Error::new(
                ErrorKind::Busy,
                "an asynchronous save of this saver is still writing; wait for its handle first",
            )
        };
        let permit = match self.when_busy {
            // The semaphore is never closed: acquiring fails only if it were.
            WhenBusy::Wait => self
                .gate
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| busy())?,
            WhenBusy::Fail => self.gate.clone().try_acquire_owned().map_err(|_| busy())?,
        };
        let mut options = options;
        if options.plan_cache.is_none() {
            options.plan_cache = Some(self.plan_cache.clone());
        }
        let staged = stage_all(state_dict, &self.pool)?;
        let staged_bytes = staged.local_bytes();
        let staging = started.elapsed();
        let task = tokio::spawn(async move {
            let r = save_with(&staged, writer.as_ref(), collective.as_ref(), &options).await;
            // The staged buffers go back to the pool before the next save
            // of this saver may start.
            drop(staged);
            drop(permit);
            r
        });
        Ok(AsyncSave {
            task,
            staging,
            staged_bytes,
        })
    }
}

/// Copy every chunk and bytes item of `sd` into buffers of `pool`.
fn stage_all(sd: &StateDict, pool: &HostPool) -> Result<StateDict> {
    let mut lens = Vec::new();
    for (_, item) in sd.iter() {
        match item {
            Item::Tensor(t) => lens.extend(t.chunks.iter().map(|c| c.data.len() as usize)),
            Item::Bytes { data, .. } => lens.push(data.len()),
        }
    }
    pool.retain_lengths(&lens);
    let copy = |b: &[u8]| -> Bytes {
        let mut buf = pool.take(b.len());
        buf.as_mut_slice().copy_from_slice(b);
        buf.into_bytes()
    };
    let mut out = StateDict::new();
    for (name, item) in sd.iter() {
        match item {
            Item::Tensor(t) => {
                let mut chunks = Vec::with_capacity(t.chunks.len());
                for c in &t.chunks {
                    let data = match &c.data {
                        ChunkData::Host(b) => copy(b),
                        ChunkData::Source(src) => src
                            .stage(0, 0, src.len() as usize)
                            .and_then(|s| s.wait())
                            .map_err(|e| e.context(format!("stage {name} ({})", c.region)))?,
                    };
                    chunks.push(TensorChunk::new(c.region.clone(), data));
                }
                let TensorItem {
                    dtype,
                    shape,
                    replicated,
                    ..
                } = t;
                out.insert_tensor(name.clone(), *dtype, shape.clone(), chunks, *replicated)?;
            }
            Item::Bytes { data, replicated } => {
                out.insert_bytes(name.clone(), copy(data), *replicated)?;
            }
        }
    }
    Ok(out)
}

/// An asynchronous save in flight: await it (or [`AsyncSave::wait`]) for
/// the outcome. Owns everything it needs: it may be moved, stored or
/// spawned. Dropping it does not stop the save.
#[derive(Debug)]
pub struct AsyncSave {
    task: tokio::task::JoinHandle<Result<SaveResult>>,
    staging: Duration,
    staged_bytes: u64,
}

impl AsyncSave {
    /// How long `async_save` blocked: waiting for an earlier save and
    /// copying the state dict.
    pub fn blocking_time(&self) -> Duration {
        self.staging
    }

    /// Bytes copied.
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes
    }

    /// True once the save has ended (committed or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Wait for the outcome: the committed metadata, or the error (a
    /// failure in the background; nothing was committed after it).
    pub async fn wait(self) -> Result<SaveResult> {
        self.await
    }
}

impl Future for AsyncSave {
    type Output = Result<SaveResult>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.task).poll(cx).map(|r| match r {
            Ok(r) => r,
            Err(e) => Err(Error::new(
                ErrorKind::Io,
                format!("the background save ended abnormally: {e}"),
            )),
        })
    }
}
