//! The save protocol: plan, write, commit, agree on the outcome.

use crate::checkpoint::plan_cache::{
    coordinate, layout_digest, replica_digests, Assign, CompactWrite, CoordEntry, Decision, Offer,
    PendingCoord, RankEntry, Report,
};
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
                // Each message freed once decoded.
                let offers = first_error(
                    gathered
                        .into_iter()
                        .enumerate()
                        .map(|(r, b)| {
                            decode::<std::result::Result<Offer<SavePlan>, WireError>>(&b)
                                .map_err(|e| e.with_rank(r).to_wire())
                                .and_then(|x| x)
                        })
                        .collect(),
                )?;
                wire(coordinate(cache, options.planner.as_ref(), offers), ROOT)
            })();
            let id = root_id.expect("the coordinator has a save id").to_string();
            let msgs = match outcome {
                Ok(Decision::Planned { global, pending: p }) => {
                    let plan_id = p.plan_id();
                    let msgs = global
                        .iter()
                        .map(|g| {
                            encode(&Ok::<_, WireError>((
                                &id,
                                Assign::Plan { plan: g, plan_id },
                            )))
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
            Assign::Plan { plan, plan_id } => {
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
    // A cached save reports its records' storage in assignment order,
    // without names.
    let report = written.and_then(|w| {
        if cached {
            CompactWrite::from_write(w, &my_plan).map(Report::Compact)
        } else {
            Ok(Report::Full(w))
        }
    });
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
    let mut slots: Option<Slots> = None;
    let outcome = if rank == ROOT {
        let gathered = gathered.expect("root receives");
        let result: std::result::Result<Vec<u8>, WireError> = async {
            // Each rank's report decoded (and, for a planned save, added to
            // the metadata) in turn: never every decoded report at once.
            let mut gathered: Vec<Option<bytes::Bytes>> = gathered.into_iter().map(Some).collect();
            let mut next_report = |r: usize| {
                let b = gathered[r].take().expect("each report once");
                decode::<std::result::Result<Report, WireError>>(&b)
                    .map_err(|e| e.with_rank(r).to_wire())
                    .and_then(|x| x)
            };
            let mismatch = || {
                Error::plan("a rank reported its writes for another kind of plan")
                    .with_rank(ROOT)
                    .to_wire()
            };
            let md = match cached_entry.as_mut() {
                Some(entry) => {
                    let writes = (0..n)
                        .map(|r| match next_report(r)? {
                            Report::Compact(c) => Ok(c),
                            Report::Full(_) => Err(mismatch()),
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    wire(
                        entry.fill(
                            &save_id,
                            generation,
                            writes,
                            writer.format(),
                            &options.user_metadata,
                        ),
                        ROOT,
                    )?
                }
                None => {
                    let mut a = Assembler::new(&global_plans);
                    if pending.is_some() {
                        a = a.tracking();
                    }
                    for r in 0..n {
                        match next_report(r)? {
                            Report::Full(w) => wire(a.add(w), ROOT)?,
                            Report::Compact(_) => return Err(mismatch()),
                        }
                    }
                    let (md, s) = a.finish_tracked(
                        &save_id,
                        generation,
                        writer.format(),
                        &options.user_metadata,
                    );
                    slots = s;
                    Arc::new(md)
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
                match (cached_entry.take(), pending.take()) {
                    (Some(entry), _) => c.set_coord(entry, true),
                    (None, Some(p)) => match slots.take() {
                        Some(s) => c.set_coord(p.complete(s, md.clone()), false),
                        None => tracing::warn!(
                            "save plan not cached: a record was not reported exactly once"
                        ),
                    },
                    (None, None) => {}
                }
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
                    name: it.name.clone(),
                    index: it.index.clone(),
                    dtype: Some(t.dtype),
                    whole: b.offsets.iter().all(|&o| o == 0) && b.sizes[..] == t.shape[..],
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
    let mut a = Assembler::new(plans);
    for w in writes {
        a.add(w)?;
    }
    Ok(a.finish(save_id, generation, format, user))
}

/// Where each rank's assigned records sit in the metadata, in assignment
/// order: `slots[start[r]..start[r + 1]]` for rank r, each (item index,
/// chunk index; `u32::MAX` for a bytes item).
pub(crate) struct Slots {
    pub start: Vec<usize>,
    pub slots: Vec<(u32, u32)>,
}

/// [`assemble_metadata`] one rank's write result at a time, in rank order
/// (the coordinator decodes and adds each as it goes, so it never holds
/// every decoded write result at once); optionally noting where each
/// assigned record lands ([`Slots`], for the plan cache).
pub(crate) struct Assembler<'a> {
    plans: &'a [SavePlan],
    kinds: HashMap<&'a str, (Option<crate::DType>, &'a [u64], u64)>,
    files: Vec<crate::metadata::DataFile>,
    transforms: Vec<String>,
    /// Item name -> index into `items`.
    index: HashMap<String, usize>,
    items: Vec<(String, ItemMeta)>,
    ranks_added: usize,
    /// With tracking: (item, chunk) of every assigned record before the
    /// final sort, laid out as [`Slots`].
    track: Option<Slots>,
}

impl<'a> Assembler<'a> {
    pub(crate) fn new(plans: &'a [SavePlan]) -> Assembler<'a> {
        let mut kinds: HashMap<&str, (Option<crate::DType>, &[u64], u64)> = HashMap::new();
        for p in plans {
            for it in &p.items {
                kinds
                    .entry(&it.name)
                    .or_insert((it.dtype, &it.shape, it.nbytes));
            }
        }
        Assembler {
            plans,
            kinds,
            files: Vec::new(),
            transforms: Vec::new(),
            index: HashMap::new(),
            items: Vec::new(),
            ranks_added: 0,
            track: None,
        }
    }

    /// Also note where every assigned record lands (see [`Slots`]).
    pub(crate) fn tracking(mut self) -> Assembler<'a> {
        let mut start = Vec::with_capacity(self.plans.len() + 1);
        let mut total = 0;
        for p in self.plans {
            start.push(total);
            total += p.items.len();
        }
        start.push(total);
        self.track = Some(Slots {
            start,
            slots: vec![(u32::MAX, u32::MAX); total],
        });
        self
    }

    /// Add the next rank's write result.
    pub(crate) fn add(&mut self, w: RankWrite) -> Result<()> {
        let rank = self.ranks_added;
        self.ranks_added += 1;
        // With tracking: each record's index in the rank's assignment.
        let positions = match &self.track {
            Some(_) => Some(assignment_positions(&w, self.plans.get(rank))?),
            None => None,
        };
        let base = self.files.len() as u32;
        let transforms = &mut self.transforms;
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
        self.files.extend(w.files);
        for (j, (name, index, mut storage)) in w.records.into_iter().enumerate() {
            storage.file += base;
            for t in &mut storage.transforms {
                t.descriptor = *remap
                    .get(t.descriptor as usize)
                    .ok_or_else(|| Error::corrupt("write result names an unknown transform"))?;
            }
            let (dtype, shape, nbytes) = self
                .kinds
                .get(name.as_str())
                .copied()
                .ok_or_else(|| Error::plan(format!("{name}: written but never planned")))?;
            let slot = match index {
                WriteIndex::Chunk(region) => {
                    let i = match self.index.get(name.as_str()) {
                        Some(&i) => i,
                        None => {
                            self.index.insert(name.clone(), self.items.len());
                            self.items.push((
                                name,
                                ItemMeta::Tensor {
                                    dtype: dtype.unwrap_or(crate::DType::U8),
                                    shape: shape.to_vec(),
                                    chunks: Vec::new(),
                                },
                            ));
                            self.items.len() - 1
                        }
                    };
                    match &mut self.items[i].1 {
                        ItemMeta::Tensor { chunks, .. } => {
                            chunks.push(ChunkMeta { region, storage });
                            (i as u32, (chunks.len() - 1) as u32)
                        }
                        // Never planned (a name is a tensor or bytes
                        // item on every rank); ignored, as before.
                        ItemMeta::Bytes { .. } => (u32::MAX, u32::MAX),
                    }
                }
                WriteIndex::Bytes => {
                    let meta = ItemMeta::Bytes {
                        length: nbytes,
                        storage,
                    };
                    let i = match self.index.get(name.as_str()) {
                        Some(&i) => {
                            self.items[i].1 = meta;
                            i
                        }
                        None => {
                            self.index.insert(name.clone(), self.items.len());
                            self.items.push((name, meta));
                            self.items.len() - 1
                        }
                    };
                    (i as u32, u32::MAX)
                }
            };
            if let (Some(t), Some(pos)) = (&mut self.track, &positions) {
                t.slots[t.start[rank] + pos[j]] = slot;
            }
        }
        Ok(())
    }

    /// The metadata: declared tensors added, items sorted by name, each
    /// tensor's chunks by offsets.
    pub(crate) fn finish(
        self,
        save_id: &str,
        generation: u64,
        format: FormatKind,
        user: &BTreeMap<String, String>,
    ) -> Metadata {
        self.finish_tracked(save_id, generation, format, user).0
    }

    /// [`finish`](Assembler::finish), with the [`Slots`] of every assigned
    /// record when tracking (`None` when a record was not reported once).
    pub(crate) fn finish_tracked(
        mut self,
        save_id: &str,
        generation: u64,
        format: FormatKind,
        user: &BTreeMap<String, String>,
    ) -> (Metadata, Option<Slots>) {
        for d in self.plans.iter().flat_map(|p| &p.declared) {
            if !self.index.contains_key(d.name.as_str()) {
                self.index.insert(d.name.clone(), self.items.len());
                self.items.push((
                    d.name.clone(),
                    ItemMeta::Tensor {
                        dtype: d.dtype,
                        shape: d.shape.clone(),
                        chunks: Vec::new(),
                    },
                ));
            }
        }
        drop(self.index);
        // Items by name, each tensor's chunks by offsets (stable), noting
        // where each item and chunk went.
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        order.sort_unstable_by(|&a, &b| self.items[a].0.cmp(&self.items[b].0));
        let mut new_item = vec![0u32; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_item[old] = new as u32;
        }
        let mut new_chunk: Vec<Vec<u32>> = Vec::new();
        let tracking = self.track.is_some();
        for (_, item) in &mut self.items {
            let moved = match item {
                // Already in order (rank order often is): nothing moves.
                ItemMeta::Tensor { chunks, .. }
                    if chunks.is_sorted_by(|a, b| a.region.offsets <= b.region.offsets) =>
                {
                    // Empty: the identity.
                    Vec::new()
                }
                ItemMeta::Tensor { chunks, .. } if tracking => {
                    let mut perm: Vec<u32> = (0..chunks.len() as u32).collect();
                    perm.sort_by(|&a, &b| {
                        chunks[a as usize]
                            .region
                            .offsets
                            .cmp(&chunks[b as usize].region.offsets)
                    });
                    let mut old: Vec<Option<ChunkMeta>> =
                        std::mem::take(chunks).into_iter().map(Some).collect();
                    *chunks = perm
                        .iter()
                        .map(|&p| old[p as usize].take().expect("a permutation"))
                        .collect();
                    let mut inv = vec![0u32; perm.len()];
                    for (new, &p) in perm.iter().enumerate() {
                        inv[p as usize] = new as u32;
                    }
                    inv
                }
                ItemMeta::Tensor { chunks, .. } => {
                    chunks.sort_by(|a, b| a.region.offsets.cmp(&b.region.offsets));
                    Vec::new()
                }
                ItemMeta::Bytes { .. } => Vec::new(),
            };
            if tracking {
                new_chunk.push(moved);
            }
        }
        let mut old: Vec<Option<(String, ItemMeta)>> = std::mem::take(&mut self.items)
            .into_iter()
            .map(Some)
            .collect();
        let items = order
            .iter()
            .map(|&o| old[o].take().expect("a permutation"))
            .collect();
        let slots = self.track.take().and_then(|mut t| {
            for s in &mut t.slots {
                if s.0 == u32::MAX {
                    return None;
                }
                let chunk = match s.1 {
                    u32::MAX => u32::MAX,
                    c => match &new_chunk[s.0 as usize] {
                        m if m.is_empty() => c,
                        m => m[c as usize],
                    },
                };
                *s = (new_item[s.0 as usize], chunk);
            }
            Some(t)
        });
        let md = Metadata {
            save_id: save_id.to_string(),
            world_size: self.plans.len() as u32,
            format,
            files: self.files,
            transforms: self.transforms,
            items,
            user: user.clone(),
            generation,
        };
        (md, slots)
    }
}

/// The index in `plan` (the rank's assignment) of each record of `w`;
/// refuses a record not assigned, or a count that differs.
fn assignment_positions(w: &RankWrite, plan: Option<&SavePlan>) -> Result<Vec<usize>> {
    let plan = plan.ok_or_else(|| Error::plan("a write result from a rank without a plan"))?;
    let n = plan.items.len();
    if w.records.len() != n {
        return Err(Error::plan(format!(
            "the writer reported {} records for {n} assigned",
            w.records.len()
        )));
    }
    if w.records
        .iter()
        .zip(&plan.items)
        .all(|(r, it)| r.0 == it.name && r.1 == it.index)
    {
        return Ok((0..n).collect());
    }
    let pos: HashMap<(&str, &WriteIndex), usize> = plan
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| ((it.name.as_str(), &it.index), i))
        .collect();
    w.records
        .iter()
        .map(|(name, index, _)| {
            pos.get(&(name.as_str(), index))
                .copied()
                .ok_or_else(|| Error::plan(format!("{name}: written but not assigned")))
        })
        .collect()
}
