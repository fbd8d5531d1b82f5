//! The save protocol: plan, write, commit, agree on the outcome.

use crate::checkpoint::wire::{decode, encode, first_error, wire};
use crate::checkpoint::{RankWrite, SaveOptions, StorageWriter, WriteRecord, ROOT};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::{ChunkMeta, FormatKind, ItemMeta, Metadata};
use crate::model::{Item, StateDict};
use crate::plan::{SavePlan, WriteIndex};
use std::collections::{BTreeMap, HashMap};
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

    // 1. Plan.
    let local = options
        .planner
        .local_plan(state_dict, rank)
        .and_then(|p| writer.check_plan(&p).map(|_| p));
    // The coordinator takes the location (the lease) before any rank
    // writes, and learns the generation it will commit.
    let prep = match root_id {
        Some(id) => match writer.prepare().await {
            Ok(()) => writer.begin(id).await,
            Err(e) => Err(e),
        },
        None => Ok(0),
    };
    let generation = *prep.as_ref().unwrap_or(&0);
    let gathered = collective.gather(encode(&wire(local, rank))?, ROOT).await?;
    let mut global_plans: Vec<SavePlan> = Vec::new();
    let assignment = if rank == ROOT {
        let gathered = gathered.expect("root receives");
        let outcome: std::result::Result<(String, Vec<SavePlan>), WireError> = (|| {
            wire(prep, ROOT)?;
            let plans = first_error(
                gathered
                    .iter()
                    .enumerate()
                    .map(|(r, b)| {
                        decode::<std::result::Result<SavePlan, WireError>>(b)
                            .map_err(|e| e.with_rank(r).to_wire())
                            .and_then(|x| x)
                    })
                    .collect(),
            )?;
            let global = wire(options.planner.global_plan(&plans), ROOT)?;
            if global.len() != n {
                return Err(
                    Error::plan("planner returned a plan per rank of the wrong count")
                        .with_rank(ROOT)
                        .to_wire(),
                );
            }
            Ok((
                root_id.expect("the coordinator has a save id").to_string(),
                global,
            ))
        })();
        let msgs = match &outcome {
            Ok((id, g)) => {
                global_plans = g.clone();
                g.iter()
                    .map(|p| encode(&Ok::<_, WireError>((id.clone(), p.clone()))))
                    .collect::<Result<Vec<_>>>()?
            }
            Err(w) => vec![encode(&Err::<(String, SavePlan), _>(w.clone()))?; n],
        };
        collective.scatter(Some(msgs), ROOT).await?
    } else {
        collective.scatter(None, ROOT).await?
    };
    let (save_id, my_plan) =
        decode::<std::result::Result<(String, SavePlan), WireError>>(&assignment)?
            .map_err(Error::from_wire)?;
    tracing::debug!(
        rank,
        records = my_plan.items.len(),
        bytes = my_plan.bytes(),
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
    let gathered = match collective.gather(encode(&wire(written, rank))?, ROOT).await {
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
    let mut committed: Option<Metadata> = None;
    let outcome = if rank == ROOT {
        let gathered = gathered.expect("root receives");
        let result: std::result::Result<Vec<u8>, WireError> = async {
            let writes = first_error(
                gathered
                    .iter()
                    .enumerate()
                    .map(|(r, b)| {
                        decode::<std::result::Result<RankWrite, WireError>>(b)
                            .map_err(|e| e.with_rank(r).to_wire())
                            .and_then(|x| x)
                    })
                    .collect(),
            )?;
            let md = wire(
                assemble_metadata(
                    &save_id,
                    generation,
                    &global_plans,
                    writes,
                    writer.format(),
                    &options.user_metadata,
                ),
                ROOT,
            )?;
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
            let metadata = Arc::new(match committed {
                Some(md) => md,
                None => Metadata::decode(&md_bytes)?,
            });
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
                    name: it.name.clone(),
                    index: it.index.clone(),
                    dtype: Some(t.dtype),
                    whole: b.offsets.iter().all(|&o| o == 0) && b.sizes == t.shape,
                    data: c.data.clone(),
                });
            }
            (Item::Bytes { data, .. }, WriteIndex::Bytes) => out.push(WriteRecord {
                name: it.name.clone(),
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

/// Build the checkpoint's metadata from every rank's plan (`plans[r]`: the
/// records rank `r` was assigned, and the tensors it declared without data)
/// and write results (`writes`, in rank order), as the coordinator of a save
/// does before its commit. Public for drivers whose ranks are coordinated by
/// another framework (the Python bindings under torch's planners), which
/// call [`StorageWriter::write_rank`] on each rank and
/// [`StorageWriter::commit`] with the result on the coordinator.
pub fn assemble_metadata(
    save_id: &str,
    generation: u64,
    plans: &[SavePlan],
    writes: Vec<RankWrite>,
    format: FormatKind,
    user: &BTreeMap<String, String>,
) -> Result<Metadata> {
    let mut kinds: HashMap<&str, (Option<crate::DType>, &[u64], u64)> = HashMap::new();
    for p in plans {
        for it in &p.items {
            kinds
                .entry(&it.name)
                .or_insert((it.dtype, &it.shape, it.nbytes));
        }
    }
    let mut files = Vec::new();
    let mut transforms: Vec<String> = Vec::new();
    let mut items: BTreeMap<String, ItemMeta> = BTreeMap::new();
    for w in writes {
        let base = files.len() as u32;
        let remap: Vec<u32> = w
            .transforms
            .iter()
            .map(|t| match transforms.iter().position(|x| x == t) {
                Some(i) => i as u32,
                None => {
                    transforms.push(t.clone());
                    (transforms.len() - 1) as u32
                }
            })
            .collect();
        files.extend(w.files);
        for (name, index, mut storage) in w.records {
            storage.file += base;
            for t in &mut storage.transforms {
                t.descriptor = *remap
                    .get(t.descriptor as usize)
                    .ok_or_else(|| Error::corrupt("write result names an unknown transform"))?;
            }
            let (dtype, shape, nbytes) = kinds
                .get(name.as_str())
                .copied()
                .ok_or_else(|| Error::plan(format!("{name}: written but never planned")))?;
            match index {
                WriteIndex::Chunk(region) => {
                    // Looked up first: the name is moved in only once.
                    let entry = match items.get_mut(name.as_str()) {
                        Some(e) => e,
                        None => items.entry(name).or_insert_with(|| ItemMeta::Tensor {
                            dtype: dtype.unwrap_or(crate::DType::U8),
                            shape: shape.to_vec(),
                            chunks: Vec::new(),
                        }),
                    };
                    if let ItemMeta::Tensor { chunks, .. } = entry {
                        chunks.push(ChunkMeta { region, storage });
                    }
                }
                WriteIndex::Bytes => {
                    items.insert(
                        name,
                        ItemMeta::Bytes {
                            length: nbytes,
                            storage,
                        },
                    );
                }
            }
        }
    }
    for d in plans.iter().flat_map(|p| &p.declared) {
        items
            .entry(d.name.clone())
            .or_insert_with(|| ItemMeta::Tensor {
                dtype: d.dtype,
                shape: d.shape.clone(),
                chunks: Vec::new(),
            });
    }
    for item in items.values_mut() {
        if let ItemMeta::Tensor { chunks, .. } = item {
            chunks.sort_by(|a, b| a.region.offsets.cmp(&b.region.offsets));
        }
    }
    Ok(Metadata {
        save_id: save_id.to_string(),
        world_size: plans.len() as u32,
        format,
        files,
        transforms,
        items: items.into_iter().collect(),
        user: user.clone(),
        generation,
    })
}
