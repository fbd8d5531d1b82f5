//! The save protocol: plan, write, commit, agree on the outcome.

use crate::checkpoint::assemble::build;
use crate::checkpoint::plan_cache::{
    coordinate, decode_offers, layout_digest, replica_digests, Assign, CompactWrite, CoordEntry,
    Decision, Offer, PendingCoord, RankEntry,
};
use crate::checkpoint::wire::{decode, encode, wire};
use crate::checkpoint::{SaveOptions, StorageWriter, WriteRecord, ROOT};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::Metadata;
use crate::model::{Item, StateDict};
use crate::plan::{SavePlan, WriteIndex};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// What a save returns on every rank.
#[derive(Clone, Debug)]
pub struct SaveResult {
    /// The committed metadata.
    pub metadata: Arc<Metadata>,
    /// Bytes this rank wrote into data files.
    pub bytes_written: u64,
    /// Data files removed after the commit (rank 0 only): those of
    /// generations before the one this save replaced, and of saves that
    /// died. The replaced generation's files stay until the next commit.
    pub removed: Vec<String>,
    /// The most bytes this rank held staged (copied out of
    /// [`ChunkData::Source`](crate::ChunkData::Source) chunks) and not yet
    /// written at once: at most `thread_count x per_thread_copy_ahead`; 0
    /// for host memory, which is written without staging.
    pub staged_peak_bytes: u64,
}

fn new_save_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Save `state_dict` with the default planner. See [`save_with`].
pub async fn save(
    state_dict: &StateDict,
    writer: &dyn StorageWriter,
    collective: &dyn Collective,
) -> Result<SaveResult> {
    save_with(state_dict, writer, collective, &SaveOptions::default()).await
}

/// Save this rank's `state_dict` as part of a checkpoint written by every
/// rank of `collective`. Returns the same outcome on every rank: the
/// committed metadata, or the error of the first failing rank (named in it).
/// Nothing is committed unless every rank succeeded.
pub async fn save_with(
    state_dict: &StateDict,
    writer: &dyn StorageWriter,
    collective: &dyn Collective,
    options: &SaveOptions,
) -> Result<SaveResult> {
    let span = tracing::info_span!("save", rank = collective.rank(), location = %writer.location());
    save_inner(state_dict, writer, collective, options)
        .instrument(span)
        .await
}

async fn save_inner(
    state_dict: &StateDict,
    writer: &dyn StorageWriter,
    collective: &dyn Collective,
    options: &SaveOptions,
) -> Result<SaveResult> {
    // The coordinator fixes the save id before it takes the location, and
    // releases the location at the end, whatever the outcome.
    let root_id = (collective.rank() == ROOT).then(new_save_id);
    let out = save_phases(state_dict, writer, collective, options, root_id.as_deref()).await;
    if let Some(id) = &root_id {
        writer.end(id).await;
    }
    out
}

async fn save_phases(
    state_dict: &StateDict,
    writer: &dyn StorageWriter,
    collective: &dyn Collective,
    options: &SaveOptions,
    root_id: Option<&str>,
) -> Result<SaveResult> {
    let rank = collective.rank();
    let n = collective.world_size();
    let started = Instant::now();
    let cache = options.plan_cache.as_ref();

    // 1. Plan.
    let local = options
        .planner
        .local_plan(state_dict, rank)
        .and_then(|p| writer.check_plan(&p).map(|_| p));
    let layout = local.as_ref().ok().map(layout_digest);
    // This rank's cached assignment, when its layout is unchanged.
    let hit = match (cache, layout) {
        (Some(c), Some(l)) => c.rank_entry(rank, n).filter(|e| e.layout == l),
        _ => None,
    };
    // The coordinator takes the location (the lease) before any rank
    // writes, and learns the generation it will commit.
    let prep: std::result::Result<u64, WireError> = match root_id {
        Some(id) => match writer.prepare().await {
            Ok(()) => wire(writer.begin(id).await, ROOT),
            Err(e) => wire(Err(e), ROOT),
        },
        None => Ok(0),
    };
    let generation = *prep.as_ref().unwrap_or(&0);
    // The coordinator's planning state: the assignments (planned saves) or
    // the cache entry (cached saves), and what to cache after the commit.
    let mut global_plans: Vec<SavePlan> = Vec::new();
    let mut pending: Option<PendingCoord> = None;
    let mut cached_entry: Option<CoordEntry> = None;
    // At most two rounds: a digest the coordinator cannot confirm makes
    // every rank offer its whole plan again.
    let mut full_only = false;
    let (save_id, my_plan, new_rank_entry) = loop {
        let offer = local.as_ref().map(|p| match (&hit, full_only) {
            (Some(e), false) => Offer::Same {
                layout: e.layout,
                plan_id: e.plan_id,
                replicas: replica_digests(p),
            },
            _ => Offer::Full {
                plan: p,
                layout: layout.expect("digest of a plan"),
            },
        });
        let offer = offer.map_err(|e| e.detached());
        let gathered = collective.gather(encode(&wire(offer, rank))?, ROOT).await?;
        let assignment = if rank == ROOT {
            let gathered = gathered.expect("root receives");
            let outcome: std::result::Result<Decision, WireError> = (|| {
                prep.clone()?;
                // Each message freed once decoded; repeated names and
                // shapes decoded once.
                let offers = decode_offers(gathered)?;
                wire(coordinate(cache, options.planner.as_ref(), offers), ROOT)
            })();
            let id = root_id.expect("the coordinator has a save id").to_string();
            let msgs = match outcome {
                Ok(Decision::Planned {
                    global,
                    offered,
                    pending: p,
                }) => {
                    let plan_id = p.plan_id();
                    let same = encode(&Ok::<_, WireError>((
                        &id,
                        Assign::<SavePlan>::Offered { plan_id },
                    )))?;
                    let msgs = global
                        .iter()
                        .zip(offered)
                        .map(|(g, offered)| match offered {
                            true => Ok(same.clone()),
                            false => encode(&Ok::<_, WireError>((
                                &id,
                                Assign::Plan { plan: g, plan_id },
                            ))),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    global_plans = global;
                    pending = Some(p);
                    msgs
                }
                Ok(Decision::Cached(entry)) => {
                    cached_entry = Some(entry);
                    vec![encode(&Ok::<_, WireError>((&id, Assign::<SavePlan>::Cached)))?; n]
                }
                Ok(Decision::Resend) => {
                    vec![encode(&Ok::<_, WireError>((&id, Assign::<SavePlan>::Resend)))?; n]
                }
                Err(w) => vec![encode(&Err::<(String, Assign<SavePlan>), _>(w))?; n],
            };
            collective.scatter(Some(msgs), ROOT).await?
        } else {
            collective.scatter(None, ROOT).await?
        };
        let (save_id, assign) =
            decode::<std::result::Result<(String, Assign<SavePlan>), WireError>>(&assignment)?
                .map_err(Error::from_wire)?;
        match assign {
            Assign::Resend => full_only = true,
            Assign::Cached => match &hit {
                Some(e) if !full_only => break (save_id, e.assignment.clone(), None),
                _ => {
                    return Err(Error::plan(
                        "the coordinator reused a cached plan this rank does not hold",
                    )
                    .with_rank(rank))
                }
            },
            Assign::Plan { .. } | Assign::Offered { .. } => {
                let (plan, plan_id) = match assign {
                    Assign::Plan { plan, plan_id } => (plan, plan_id),
                    Assign::Offered { plan_id } => match &local {
                        Ok(p) => (p.clone(), plan_id),
                        Err(_) => {
                            return Err(Error::plan(
                                "the coordinator assigned an offer this rank did not make",
                            )
                            .with_rank(rank))
                        }
                    },
                    _ => unreachable!("matched above"),
                };
                let plan = Arc::new(plan);
                let entry = layout.map(|layout| RankEntry {
                    world: n,
                    layout,
                    plan_id,
                    assignment: plan.clone(),
                });
                break (save_id, plan, entry);
            }
        }
    };
    let cached = new_rank_entry.is_none();
    tracing::debug!(
        rank,
        records = my_plan.items.len(),
        bytes = my_plan.bytes(),
        cached,
        "planned"
    );

    // 2. Write.
    let written = match records_for(state_dict, &my_plan) {
        Ok(records) => writer.write_rank(rank, &save_id, records).await,
        Err(e) => Err(e),
    };
    let my_files = written
        .as_ref()
        .map(|w| w.files.clone())
        .unwrap_or_default();
    let bytes_written = written.as_ref().map(|w| w.bytes()).unwrap_or(0);
    let staged_peak_bytes = written.as_ref().map_or(0, |w| w.staged_peak_bytes);
    // Every rank reports its records' storage in assignment order, without
    // names: the coordinator knows them from the plan.
    let report = written.and_then(|w| CompactWrite::from_write(w, &my_plan));
    let gathered = match collective.gather(encode(&wire(report, rank))?, ROOT).await {
        Ok(g) => g,
        Err(e) => {
            // The coordinator commits only after this gather completes, and a
            // collective that fails on one rank completes on none (the
            // `Collective` contract), so nothing references these files.
            writer.discard(&my_files).await;
            return Err(e);
        }
    };

    // 3. Commit on the coordinator, then agree on the outcome.
    let mut removed = Vec::new();
    let mut committed: Option<Arc<Metadata>> = None;
    let mut planned = false;
    let outcome = if rank == ROOT {
        let gathered = gathered.expect("root receives");
        let result: std::result::Result<Vec<u8>, WireError> = async {
            // Each rank's report decoded (and, for a planned save, added to
            // the metadata) in turn: never every decoded report at once.
            // Each report decoded as it is added, and freed.
            let writes = gathered.into_iter().enumerate().map(|(r, b)| {
                decode::<std::result::Result<CompactWrite, WireError>>(&b)
                    .map_err(|e| e.with_rank(r))
                    .and_then(|x| x.map_err(Error::from_wire))
            });
            // A planned save's metadata from the assignments (freed rank by
            // rank) and the reports; a cached save fills the cache's.
            let (entry, md) = match cached_entry.take() {
                Some(mut entry) => {
                    let md = wire(
                        entry.fill(
                            &save_id,
                            generation,
                            writes,
                            writer.format(),
                            &options.user_metadata,
                        ),
                        ROOT,
                    )?;
                    (entry, md)
                }
                None => {
                    let (md, s) = wire(
                        build(
                            std::mem::take(&mut global_plans),
                            writes,
                            &save_id,
                            generation,
                            writer.format(),
                            &options.user_metadata,
                        ),
                        ROOT,
                    )?;
                    let p = pending.take().unwrap_or_else(PendingCoord::unplanned);
                    planned = true;
                    let md = Arc::new(md);
                    (p.complete(s, md.clone()), md)
                }
            };
            let encoded = wire(md.encode(), ROOT)?;
            wire(
                writer
                    .commit(&md, &encoded)
                    .await
                    .map_err(|e| e.context("commit")),
                ROOT,
            )?;
            match writer.cleanup(&md).await {
                Ok(r) => removed = r,
                Err(e) => tracing::warn!(
                    "checkpoint committed, but removing files of earlier saves failed: {e}"
                ),
            }
            // Only a committed save is cached; a failed one leaves the
            // coordinator without an entry, so the next save re-plans.
            if let Some(c) = cache {
                c.set_coord(entry, !planned);
            }
            committed = Some(md);
            Ok(encoded)
        }
        .await;
        let msg = encode(&result)?;
        collective.broadcast(Some(msg), ROOT).await?
    } else {
        collective.broadcast(None, ROOT).await?
    };
    match decode::<std::result::Result<Vec<u8>, WireError>>(&outcome)? {
        Ok(md_bytes) => {
            // The coordinator keeps what it built; the others check what
            // they received.
            let metadata = match committed {
                Some(md) => md,
                None => Arc::new(Metadata::decode(&md_bytes)?),
            };
            if let (Some(c), Some(e)) = (cache, new_rank_entry) {
                c.set_rank_entry(rank, e);
            }
            tracing::info!(
                rank,
                bytes_written,
                seconds = started.elapsed().as_secs_f64(),
                "saved"
            );
            Ok(SaveResult {
                metadata,
                bytes_written,
                removed,
                staged_peak_bytes,
            })
        }
        Err(w) => {
            // Only a definite failure frees this save's files: when the
            // commit's outcome is unknown, `.metadata` may name them.
            let e = Error::from_wire(w);
            if e.kind() != ErrorKind::OutcomeUnknown {
                writer.discard(&my_files).await;
            }
            Err(e)
        }
    }
}

/// The records of `state_dict` that `plan` assigns to this rank.
fn records_for(sd: &StateDict, plan: &SavePlan) -> Result<Vec<crate::checkpoint::WriteRecord>> {
    let mut out = Vec::with_capacity(plan.items.len());
    for it in &plan.items {
        let item = sd.get(&it.name).ok_or_else(|| {
            Error::plan(format!("{}: assigned but not in the state dict", it.name))
        })?;
        match (item, &it.index) {
            (Item::Tensor(t), WriteIndex::Chunk(b)) => {
                let c = t.chunks.iter().find(|c| &c.region == b).ok_or_else(|| {
                    Error::plan(format!("{}: assigned chunk ({b}) not held", it.name))
                })?;
                out.push(WriteRecord {
                    name: it.name.to_string(),
                    index: it.index.clone(),
                    dtype: Some(t.dtype),
                    whole: b.offsets.iter().all(|&o| o == 0) && b.sizes[..] == t.shape[..],
                    data: c.data.clone(),
                });
            }
            (Item::Bytes { data, .. }, WriteIndex::Bytes) => out.push(WriteRecord {
                name: it.name.to_string(),
                index: WriteIndex::Bytes,
                dtype: None,
                whole: true,
                data: data.clone().into(),
            }),
            _ => {
                return Err(Error::plan(format!(
                    "{}: assigned record of the wrong kind",
                    it.name
                )))
            }
        }
    }
    Ok(out)
}
