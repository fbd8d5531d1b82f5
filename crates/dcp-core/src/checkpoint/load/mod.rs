//! The load protocol: read the metadata once, plan, read, agree. The
//! sectioned-metadata fetch is in [`sectioned`].

mod sectioned;

use crate::checkpoint::wire::{decode, encode, on_rank, wire};
use crate::checkpoint::{LoadOptions, StorageReader, ROOT};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::Metadata;
use crate::model::DestStateDict;
use crate::pipeline::read::{Dest, DestSlots};
use crate::pipeline::shared::{moves_slots_early, read_alone, read_shared};
use crate::pipeline::ReadStats;
use crate::plan::LoadPlan;
use sectioned::{load_sectioned, read_head, Head};
use std::sync::Arc;
use tracing::Instrument;

/// What a load returns on every rank.
#[derive(Debug)]
pub struct LoadResult {
    /// The filled destination.
    pub state_dict: DestStateDict,
    /// What this rank read.
    pub stats: ReadStats,
    /// The checkpoint's metadata. Of sectioned metadata (large sharded
    /// checkpoints, see [`sections`](crate::metadata::sections)), every item, each tensor with only
    /// the chunks of the sections this rank read: those its destination
    /// overlaps (with shared reads on a resharded load, those any rank's
    /// overlaps). [`read_metadata`] reads all of it.
    pub metadata: Arc<Metadata>,
}

/// Load with the default planner. See [`load_with`].
pub async fn load(
    dest: DestStateDict,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
) -> Result<LoadResult> {
    load_with(dest, reader, collective, &LoadOptions::default()).await
}

/// Fill this rank's `dest` from the checkpoint. The coordinator reads the
/// metadata once (of sectioned metadata, its index) and broadcasts it;
/// every rank reads only what `dest` needs, of sectioned metadata the
/// sections it overlaps too. Returns the same
/// outcome on every rank: all succeed, or all fail with the first failing
/// rank's error.
pub async fn load_with(
    dest: DestStateDict,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<LoadResult> {
    let span = tracing::info_span!("load", rank = collective.rank(), location = %reader.location());
    load_inner(dest, reader, collective, options)
        .instrument(span)
        .await
}

async fn load_inner(
    mut dest: DestStateDict,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<LoadResult> {
    // Names inserted out of order join the sorted vector once, before the
    // load walks it (nothing to do for a destination built in name order).
    dest.settle();
    // Ranks that will lend their buffers move them into read slots while
    // rank 0 reads the metadata (rank 0 on a blocking thread beside it).
    let (dest, head) = if moves_slots_early(reader, collective, options.share_reads) {
        let moving = crate::pipeline::blocking(move || Ok(DestSlots::new(dest)));
        let (moved, head) = tokio::join!(moving, broadcast_head(reader, collective));
        (Dest::Slots(moved?), head?)
    } else {
        (Dest::Whole(dest), broadcast_head(reader, collective).await?)
    };
    let (metadata, result) = match &*head {
        Head::Whole(md) => {
            let metadata = md.clone();
            drop(head);
            let planned = dest.plan(options.planner.as_ref(), &metadata);
            let result =
                read_planned(planned, dest, &metadata, reader, collective, options).await?;
            (metadata, result)
        }
        Head::Index(idx) => {
            load_sectioned(idx, dest.into_whole(), reader, collective, options).await?
        }
    };
    finish(result, metadata, reader, collective).await
}

/// Rank 0 reads the metadata once (of sectioned metadata, only its header
/// and index) and validates it, then broadcasts it; the others validate
/// what they receive (a rank never trusts bytes it did not check). Ranks of
/// one process share rank 0's decoded value instead.
async fn broadcast_head(
    reader: &dyn StorageReader,
    collective: &dyn Collective,
) -> Result<Arc<Head>> {
    broadcast_decoded(collective, read_head(reader), Head::decode).await
}

/// Rank 0 runs `read` and decodes its bytes with `decode_with`, then
/// broadcasts the bytes (or its error); every other rank decodes what it
/// receives itself. Ranks of one process ([`Collective::shares_memory`])
/// share rank 0's decoded value instead: one decode per process, not one
/// per rank (rank 0 validated it in this address space); a collective that
/// cannot share values ([`Collective::all_gather_local`] unsupported) gets
/// the bytes. Every rank returns the decoded value or the same error.
async fn broadcast_decoded<T: Send + Sync + 'static>(
    collective: &dyn Collective,
    read: impl std::future::Future<Output = Result<Vec<u8>>>,
    decode_with: impl Fn(&[u8]) -> Result<T>,
) -> Result<Arc<T>> {
    type Shared<T> = std::result::Result<Arc<T>, WireError>;
    // Rank 0's bytes and what they decode to (or its error).
    let mut root: Option<(Vec<u8>, Shared<T>)> = None;
    if collective.rank() == ROOT {
        root = Some(match read.await {
            Ok(b) => {
                let v = wire(decode_with(&b).map(Arc::new), ROOT);
                (b, v)
            }
            Err(e) => (Vec::new(), wire(Err(e), ROOT)),
        });
    }
    if collective.shares_memory() {
        let mine: crate::collective::LocalValue = match &root {
            Some((_, v)) => Arc::new(v.clone()),
            None => Arc::new(()),
        };
        match collective.all_gather_local(mine).await {
            Ok(all) => {
                let shared = all
                    .into_iter()
                    .nth(ROOT)
                    .and_then(|v| v.downcast::<Shared<T>>().ok())
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Collective,
                            "rank 0 shared something other than the checkpoint's metadata",
                        )
                    })?;
                return (*shared).clone().map_err(Error::from_wire);
            }
            // Refused on every rank: the bytes, as between processes.
            Err(e) if e.kind() == ErrorKind::Unsupported => {}
            Err(e) => return Err(e),
        }
    }
    let msg = match &root {
        Some((b, v)) => {
            let sent: std::result::Result<&[u8], WireError> = match v {
                Ok(_) => Ok(b),
                Err(w) => Err(w.clone()),
            };
            collective.broadcast(Some(encode(&sent)?), ROOT).await?
        }
        None => collective.broadcast(None, ROOT).await?,
    };
    let bytes =
        decode::<std::result::Result<Vec<u8>, WireError>>(&msg)?.map_err(Error::from_wire)?;
    match root {
        Some((_, v)) => v.map_err(Error::from_wire),
        None => decode_with(&bytes).map(Arc::new),
    }
}

/// Load into this rank's `dest` from a checkpoint whose `metadata` every
/// rank already read and validated itself (a host such as torch's load
/// protocol, which reads the metadata on every rank), with shared reads and
/// the outcome agreed as [`load_with`] does. Every rank of `collective`
/// calls it together.
///
/// `dest` is this rank's destination, or the error that kept the rank from
/// building one: the rank still takes part, so the others fail with its
/// error at once rather than wait for it. Refuses (on every rank, with
/// [`ErrorKind::NotFound`], "checkpoint replaced during load") ranks whose
/// metadata are of different saves (the checkpoint was replaced between
/// their reads), since their plans would not agree on what each saved chunk
/// holds.
pub async fn load_from(
    metadata: Arc<Metadata>,
    dest: Result<DestStateDict>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<LoadResult> {
    let span = tracing::info_span!("load", rank = collective.rank(), location = %reader.location());
    async move {
        if collective.world_size() > 1 {
            let mine = (metadata.save_id.clone(), metadata.generation);
            let all = collective.all_gather(encode(&mine)?).await?;
            for (rank, b) in all.iter().enumerate() {
                let theirs = decode::<(String, u64)>(b)?;
                if theirs != mine {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "checkpoint replaced during load: ranks read the metadata of \
                             different saves at {}: rank {} save {} (generation {}), rank \
                             {rank} save {} (generation {}); load again",
                            reader.location(),
                            collective.rank(),
                            mine.0,
                            mine.1,
                            theirs.0,
                            theirs.1
                        ),
                    ));
                }
            }
        }
        let (planned, dest) = match dest {
            Ok(mut d) => {
                d.settle();
                (options.planner.plan(&metadata, &d), d)
            }
            Err(e) => (Err(e), DestStateDict::new()),
        };
        read_agreed(planned, dest, metadata, reader, collective, options).await
    }
    .instrument(span)
    .await
}

/// Read `planned` into `dest` (shared reads when the options ask for them),
/// then agree on the outcome: every rank returns success, or the first
/// failing rank's error.
async fn read_agreed(
    planned: Result<LoadPlan>,
    dest: DestStateDict,
    metadata: Arc<Metadata>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<LoadResult> {
    let result = read_planned(
        planned,
        Dest::Whole(dest),
        &metadata,
        reader,
        collective,
        options,
    )
    .await?;
    finish(result, metadata, reader, collective).await
}

/// Read `planned` into `dest`, with shared reads when the options ask for
/// them. The outer `Result` is a collective failure; the inner one this
/// rank's outcome, not yet agreed.
async fn read_planned(
    planned: Result<LoadPlan>,
    dest: Dest,
    metadata: &Arc<Metadata>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<Result<(DestStateDict, ReadStats)>> {
    if options.share_reads && collective.world_size() > 1 {
        read_shared(
            planned,
            dest,
            metadata,
            reader,
            collective,
            options.exchange_budget,
        )
        .await
    } else {
        Ok(match planned {
            Ok(plan) => read_alone(reader, metadata, plan, dest).await,
            Err(e) => Err(e),
        })
    }
}

/// Agree on this rank's outcome with the others and return it.
async fn finish(
    result: Result<(DestStateDict, ReadStats)>,
    metadata: Arc<Metadata>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
) -> Result<LoadResult> {
    let (state_dict, stats) = agree(result, &metadata, reader, collective).await?;
    Ok(LoadResult {
        state_dict,
        stats,
        metadata,
    })
}

/// Rank 0 reads and validates the whole metadata once and broadcasts it;
/// the others validate what they receive.
pub(crate) async fn broadcast_metadata(
    reader: &dyn StorageReader,
    collective: &dyn Collective,
) -> Result<Arc<Metadata>> {
    broadcast_decoded(collective, reader.read_metadata(), Metadata::decode).await
}

/// Agree on a load's outcome across ranks (all succeed, or all fail with
/// the first failing rank's error); a missing file is reported as the
/// checkpoint replaced during the load when it was.
pub(crate) async fn agree<T>(
    result: Result<T>,
    metadata: &Metadata,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
) -> Result<T> {
    let rank = collective.rank();
    let result = match result {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(replaced_during_load(e, metadata, reader).await)
        }
        r => r,
    };
    let status: std::result::Result<(), WireError> = match &result {
        Ok(_) => Ok(()),
        Err(e) => Err(on_rank(e, rank).to_wire()),
    };
    let all = collective.all_gather(encode(&status)?).await?;
    for b in &all {
        decode::<std::result::Result<(), WireError>>(b)?.map_err(Error::from_wire)?;
    }
    result
}

/// A file the load needs is missing: if `.metadata` no longer holds the
/// checkpoint the load began with, a newer save replaced it (and removed its
/// files) during the load; say so. Otherwise `e` as it is.
async fn replaced_during_load(e: Error, loaded: &Metadata, reader: &dyn StorageReader) -> Error {
    let now = match reader.read_metadata().await {
        Ok(b) => Metadata::decode(&b).ok(),
        Err(r) if r.kind() == ErrorKind::NotFound => None,
        Err(_) => return e, // cannot tell: the error as it is
    };
    match now {
        Some(m) if m.save_id == loaded.save_id => e,
        Some(m) => Error::new(
            ErrorKind::NotFound,
            format!(
                "checkpoint replaced during load: the load began with save {} (generation {}) and {} now holds save {} (generation {}); load again ({})",
                loaded.save_id,
                loaded.generation,
                reader.location(),
                m.save_id,
                m.generation,
                e.message()
            ),
        ),
        None => Error::new(
            ErrorKind::NotFound,
            format!(
                "checkpoint replaced during load: the load began with save {} (generation {}) and {} no longer holds a readable .metadata ({})",
                loaded.save_id,
                loaded.generation,
                reader.location(),
                e.message()
            ),
        ),
    }
}

/// Read and validate the metadata of a checkpoint (no collective).
pub async fn read_metadata(reader: &dyn StorageReader) -> Result<Metadata> {
    let b = reader.read_metadata().await?;
    Metadata::decode(&b)
}
