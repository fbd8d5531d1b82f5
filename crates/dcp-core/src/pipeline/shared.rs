//! Shared reads across ranks: each saved chunk that several ranks need is
//! read once, then lent (ranks of one process) or exchanged.

use crate::checkpoint::wire::{decode, encode, on_rank, wire};
use crate::checkpoint::{located, FileSystemReader, StorageReader};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::{ItemMeta, Metadata};
use crate::model::{ChunkBox, DestStateDict};
use crate::pipeline::blocking;
use crate::pipeline::read::ReadStats;
use crate::plan::LoadPlan;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A rank's destination items by index, for filling in place.
type DestVec = Vec<(String, crate::model::DestItem)>;

/// Load with shared reads (see [`LoadOptions::share_reads`]). The outer
/// `Result` is a collective failure; the inner one this rank's outcome, which
/// every rank then agrees on.
pub(crate) async fn read_shared(
    planned: Result<LoadPlan>,
    dest: DestStateDict,
    md: &Arc<Metadata>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    budget: u64,
) -> Result<Result<(DestStateDict, ReadStats)>> {
    use crate::pipeline::exchange::{
        chunk_keys, compact, fill_from_chunk, fill_from_compact, needs_of, schedule, split_plan,
        Need,
    };
    let rank = collective.rank();
    let n = collective.world_size();
    // Ranks of one process whose readers are all file-system readers lend
    // each other their buffers instead of exchanging bytes.
    let can_lend = collective.shares_memory() && reader.file_system_reader().is_some();
    // Ranks in separate processes whose collective has memory shared by
    // the ranks of a node fill each other's destinations through it.
    let can_window = !collective.shares_memory()
        && collective.node_ranks().is_some()
        && reader.file_system_reader().is_some();
    // Round 1: the saved chunks each rank reads, as sorted (item, chunk)
    // pairs (a few bytes each), so that ranks sharing nothing (a load into
    // the sharding that was saved) stop here without exchanging overlaps.
    let keys_msg = wire(
        planned
            .as_ref()
            .map(|p| (chunk_keys(p), can_lend, can_window))
            .map_err(Error::detached),
        rank,
    );
    let all = collective.all_gather(encode(&keys_msg)?).await?;
    let mut every: Vec<(u32, u32)> = Vec::new();
    let mut lend = true;
    let mut window = true;
    for b in &all {
        match decode::<std::result::Result<(Vec<(u32, u32)>, bool, bool), WireError>>(b)? {
            Ok((keys, l, w)) => {
                every.extend(keys);
                lend &= l;
                window &= w;
            }
            // Every rank sees the same failure and stops here together.
            Err(w) => return Ok(Err(Error::from_wire(w))),
        }
    }
    let plan = planned.expect("errors returned above");
    // Each rank's keys are distinct, so a repeated key is a chunk two or
    // more ranks read.
    every.sort_unstable();
    let shared: std::collections::BTreeSet<(u32, u32)> = every
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    drop(every);
    if shared.is_empty() {
        return Ok(reader.read(md.clone(), plan, dest).await);
    }
    // Round 2: what each rank needs of the chunks it shares.
    let mine: Vec<Need> = needs_of(&plan)
        .into_iter()
        .filter(|n| shared.contains(&(n.item, n.chunk)))
        .collect();
    if lend {
        // Ranks of one process hand each other their lists as they are:
        // nothing to encode, copy or decode.
        let all = collective
            .all_gather_local(Arc::new(mine) as crate::collective::LocalValue)
            .await?;
        let lists: Vec<Arc<Vec<Need>>> = all
            .into_iter()
            .map(|v| {
                v.downcast::<Vec<Need>>().map_err(|_| {
                    Error::new(
                        ErrorKind::Collective,
                        "a rank shared something other than its shared-read needs",
                    )
                })
            })
            .collect::<Result<_>>()?;
        let needs: Vec<&[Need]> = lists.iter().map(|l| l.as_slice()).collect();
        let sched = schedule(md, &needs, budget, true);
        let (local_plan, _) = split_plan(plan, &sched);
        let state = read_local(reader, md, local_plan, dest).await;
        if sched.shared.is_empty() {
            return Ok(state);
        }
        let fsr = reader
            .file_system_reader()
            .expect("every rank said it has a file-system reader");
        return read_lent(state, md, fsr, collective, &sched, &needs).await;
    }
    let all = collective.all_gather(encode(&mine)?).await?;
    drop(mine);
    let mut needs: Vec<Vec<Need>> = all
        .iter()
        .map(|b| decode::<Vec<Need>>(b))
        .collect::<Result<_>>()?;
    let sched = if window {
        crate::pipeline::exchange::schedule_windowed(md, &needs, budget)
    } else {
        schedule(md, &needs, budget, false)
    };
    let (local_plan, mut shared_reads) = split_plan(plan, &sched);
    let mut state = read_local(reader, md, local_plan, dest).await;
    if window && !sched.shared.is_empty() {
        let fsr = reader
            .file_system_reader()
            .expect("every rank said it has a file-system reader");
        return read_windowed(state, md, fsr, collective, &sched, &needs, shared_reads).await;
    }
    for round in &sched.rounds {
        // Read the shared chunks this rank serves in this round, whole.
        let mine: Vec<usize> = round
            .iter()
            .copied()
            .filter(|&s| sched.shared[s].reader == rank)
            .collect();
        let mut decoded: Result<Vec<Vec<u8>>> = Ok(Vec::new());
        if state.is_ok() && !mine.is_empty() {
            let want = mine
                .iter()
                .map(|&s| (sched.shared[s].item, sched.shared[s].chunk))
                .collect();
            decoded = read_saved_chunks(reader, md, want).await.map(|(v, st)| {
                if let Ok((_, stats)) = &mut state {
                    stats.bytes_read += st.bytes_read;
                    stats.requests += st.requests;
                    stats.records += st.records;
                }
                v
            });
        }
        let err = match (&state, &decoded) {
            (Err(e), _) | (_, Err(e)) => Some(on_rank(e, rank)),
            _ => None,
        };
        // Each message: a status buffer ([0], or [1] and the error), then
        // either the decoded chunks themselves (ranks sharing memory: no
        // copy) or one buffer of compacted slices (any other transport).
        let zero_copy = collective.shares_memory();
        let msgs: Vec<Vec<Bytes>> = if let Some(e) = err {
            let mut m = vec![1u8];
            m.extend_from_slice(&encode(&e.to_wire())?);
            state = Err(e);
            vec![vec![Bytes::from(m)]; n]
        } else {
            let (dest_state, stats) = state.expect("checked ok");
            let decoded = decoded.expect("checked ok");
            let mut dest_vec: DestVec = dest_state.into_items().into_iter().collect();
            // Per served chunk: its box and element size, the decoded bytes,
            // this rank's own read items, and each other user's overlaps
            // (receivers in rank order; each receiver's chunks in round
            // order, which is the order it unpacks them in).
            type Job = (
                ChunkBox,
                usize,
                Vec<u8>,
                Vec<crate::plan::ReadItem>,
                Vec<(usize, Vec<ChunkBox>)>,
            );
            let mut sizes = vec![0usize; n];
            let mut jobs: Vec<Job> = Vec::with_capacity(mine.len());
            for (&s, data) in mine.iter().zip(decoded) {
                let c = &sched.shared[s];
                let ItemMeta::Tensor { chunks, .. } = &md.items[c.item].1 else {
                    return Err(Error::invalid("shared chunk is not a tensor"));
                };
                let mut to: Vec<(usize, Vec<ChunkBox>)> = Vec::new();
                for &(r, i) in &c.users {
                    if r != rank {
                        let overlaps = std::mem::take(&mut needs[r][i].overlaps);
                        sizes[r] += overlaps
                            .iter()
                            .map(|o| o.numel() as usize * c.elem)
                            .sum::<usize>();
                        to.push((r, overlaps));
                    }
                }
                let own = shared_reads.remove(&s).unwrap_or_default();
                jobs.push((chunks[c.chunk].region.clone(), c.elem, data, own, to));
            }
            // Fill this rank's own needs (and compact the others' slices) off
            // the executor.
            let (dv, built) = blocking(move || {
                let mut out: Vec<Vec<Bytes>> = vec![vec![Bytes::from_static(&[0])]; n];
                let mut compacted: Vec<Vec<u8>> = if zero_copy {
                    Vec::new()
                } else {
                    sizes.iter().map(|&len| Vec::with_capacity(len)).collect()
                };
                for (saved_box, elem, data, own, to) in jobs {
                    fill_from_chunk(&mut dest_vec, &saved_box, elem, &data, &own);
                    if zero_copy {
                        let shared = Bytes::from(data);
                        for (r, _) in &to {
                            out[*r].push(shared.clone());
                        }
                    } else {
                        for (r, overlaps) in &to {
                            compact(&mut compacted[*r], &saved_box, elem, &data, overlaps);
                        }
                    }
                }
                if !zero_copy {
                    for (r, c) in compacted.into_iter().enumerate() {
                        out[r].push(Bytes::from(c));
                    }
                }
                Ok((dest_vec, out))
            })
            .await?;
            state = Ok((DestStateDict::from_items(dv.into_iter().collect()), stats));
            built
        };
        let recv = collective.all_to_all_v(msgs).await?;
        // Any rank's failure ends the exchange for everyone after this round.
        if let Some(e) = first_failure(&recv) {
            return Ok(Err(e));
        }
        // Fill this rank's needs from what it received.
        let (dest_state, stats) = state.expect("no failure in this round");
        let mut dest_vec: DestVec = dest_state.into_items().into_iter().collect();
        let mut jobs: Vec<(usize, usize, ChunkBox, Vec<crate::plan::ReadItem>)> = Vec::new();
        for &s in round {
            let c = &sched.shared[s];
            if c.reader != rank && c.users.iter().any(|u| u.0 == rank) {
                let ItemMeta::Tensor { chunks, .. } = &md.items[c.item].1 else {
                    return Err(Error::invalid("shared chunk is not a tensor"));
                };
                jobs.push((
                    c.reader,
                    c.elem,
                    chunks[c.chunk].region.clone(),
                    shared_reads.remove(&s).unwrap_or_default(),
                ));
            }
        }
        let (dv, r) = blocking(move || {
            let mut next = vec![1usize; recv.len()];
            let mut pos = vec![0usize; recv.len()];
            let mut res = Ok(());
            for (from, elem, saved_box, reads) in &jobs {
                let r = if zero_copy {
                    let i = next[*from];
                    next[*from] += 1;
                    match recv[*from].get(i) {
                        Some(chunk) if chunk.len() as u64 == saved_box.numel() * *elem as u64 => {
                            fill_from_chunk(&mut dest_vec, saved_box, *elem, chunk, reads);
                            Ok(())
                        }
                        _ => Err(Error::new(
                            ErrorKind::Collective,
                            "shared-read message does not match the plan",
                        )),
                    }
                } else {
                    let buf = recv[*from].get(1).cloned().unwrap_or_default();
                    fill_from_compact(&mut dest_vec, *elem, &buf, &mut pos[*from], reads)
                };
                if let Err(e) = r {
                    res = Err(e);
                    break;
                }
            }
            Ok((dest_vec, res))
        })
        .await?;
        state = r.map(|_| (DestStateDict::from_items(dv.into_iter().collect()), stats));
    }
    Ok(state)
}

/// The first failure among the exchange's messages: each begins with a
/// status buffer, `[0]`, or `[1]` and the failing rank's error.
fn first_failure(recv: &[Vec<Bytes>]) -> Option<Error> {
    recv.iter().enumerate().find_map(|(from, m)| {
        let status = m.first().cloned().unwrap_or_default();
        (status.first() != Some(&0)).then(|| {
            status
                .get(1..)
                .ok_or_else(|| Error::new(ErrorKind::Collective, "empty shared-read message"))
                .and_then(decode::<WireError>)
                .map(Error::from_wire)
                .unwrap_or_else(|e| e.with_rank(from))
        })
    })
}

/// Read what this rank reads alone; a plan with nothing in it (every chunk
/// this rank needs is shared) leaves `dest` as it is without a pass over it.
async fn read_local(
    reader: &dyn StorageReader,
    md: &Arc<Metadata>,
    plan: LoadPlan,
    dest: DestStateDict,
) -> Result<(DestStateDict, ReadStats)> {
    if plan.tensor_reads.is_empty() && plan.bytes_reads.is_empty() {
        return Ok((dest, ReadStats::default()));
    }
    reader.read(md.clone(), plan, dest).await
}

/// A rank's destination, lent to the other ranks of its process while they
/// read shared chunks into it (`None`: the rank already failed).
struct Lent(Option<crate::pipeline::read::DestSlots>);

/// Shared reads for ranks in one process (see [`read_shared`]): every rank
/// lends its destination buffers to the others (`all_gather_local`), then
/// reads the shared chunks it was scheduled to serve straight into the
/// buffers of every rank that needs them, with one scattered read each. No
/// chunk is staged in memory or copied between ranks, so no rounds or
/// budget are needed. An all-gather of the outcome then ends the lending:
/// after it no rank writes into another's buffers, and each takes its own
/// back.
async fn read_lent(
    state: Result<(DestStateDict, ReadStats)>,
    md: &Arc<Metadata>,
    reader: &FileSystemReader,
    collective: &dyn Collective,
    sched: &crate::pipeline::exchange::Schedule,
    needs: &[&[crate::pipeline::exchange::Need]],
) -> Result<Result<(DestStateDict, ReadStats)>> {
    use crate::pipeline::read::{read_slots, DestSlots, Slot};
    let rank = collective.rank();
    let (mine, mut stats, mut outcome) = match state {
        Ok((dest, stats)) => (Arc::new(Lent(Some(DestSlots::new(dest)))), stats, Ok(())),
        Err(e) => (Arc::new(Lent(None)), ReadStats::default(), Err(e)),
    };
    let values = collective
        .all_gather_local(mine.clone() as crate::collective::LocalValue)
        .await?;
    let mut lent: Vec<Arc<Lent>> = Vec::with_capacity(values.len());
    for v in values {
        lent.push(v.downcast::<Lent>().map_err(|_| {
            Error::new(
                ErrorKind::Collective,
                "a rank lent something other than its destination buffers",
            )
        })?);
    }
    // Serve only when every rank lent its buffers (a failed rank has none;
    // the outcome exchange below then fails the load everywhere).
    if outcome.is_ok() && lent.iter().all(|l| l.0.is_some()) {
        // Every rank's destination items, one flat index space.
        let mut base = Vec::with_capacity(lent.len());
        let mut count = 0usize;
        for l in &lent {
            base.push(count);
            count += l.0.as_ref().map_or(0, |d| d.slots.len());
        }
        let mut plan = LoadPlan::default();
        for c in sched.shared.iter().filter(|c| c.reader == rank) {
            for &(r, i) in &c.users {
                let need = &needs[r][i];
                for (o, &(di, dc)) in need.overlaps.iter().zip(&need.dests) {
                    plan.tensor_reads.push(crate::plan::ReadItem {
                        dest_item: base[r] + di as usize,
                        dest_chunk: dc as usize,
                        md_item: c.item,
                        saved_chunk: c.chunk,
                        overlap: o.clone(),
                    });
                }
            }
        }
        if !plan.tensor_reads.is_empty() {
            let served = reader
                .prepare_read(md, &plan)
                .map(|(resolved, cfg, format)| {
                    let (fs, md, lent) = (reader.fs().clone(), md.clone(), lent.clone());
                    blocking(move || {
                        let md = located(fs.as_ref(), format.as_ref(), md, &plan)?;
                        let slots: Vec<&Slot> = lent
                            .iter()
                            .flat_map(|l| {
                                l.0.as_ref().map(|d| d.slots.iter()).into_iter().flatten()
                            })
                            .collect();
                        read_slots(fs.as_ref(), &md, &plan, &slots, &resolved, &cfg)
                    })
                });
            match served {
                Ok(task) => match task.await {
                    Ok(s) => {
                        stats.bytes_read += s.bytes_read;
                        stats.requests += s.requests;
                        stats.records += s.records;
                    }
                    Err(e) => outcome = Err(e),
                },
                Err(e) => outcome = Err(e),
            }
        }
    }
    drop(lent);
    // The end of the lending: once every rank is past this, nobody writes
    // into another rank's buffers.
    let status: std::result::Result<(), WireError> = match &outcome {
        Ok(()) => Ok(()),
        Err(e) => Err(on_rank(e, rank).to_wire()),
    };
    let all = collective.all_gather(encode(&status)?).await?;
    if let Err(e) = outcome {
        return Ok(Err(e));
    }
    for b in &all {
        if let Err(w) = decode::<std::result::Result<(), WireError>>(b)? {
            return Ok(Err(Error::from_wire(w)));
        }
    }
    let dest = mine
        .0
        .as_ref()
        .map(DestSlots::take)
        .expect("a rank that did not fail lent its buffers");
    Ok(Ok((dest, stats)))
}

/// Shared reads for ranks in separate processes whose collective has memory
/// shared by the ranks of a node ([`Collective::node_window`]), round by
/// round as the message exchange:
///
/// 1. each rank reads the shared chunks it serves once, scattered straight
///    into its own destination, into its window segment (the slices other
///    ranks of its node need, compacted, one piece per distinct slice) and
///    into one buffer per slice for ranks on other nodes;
/// 2. `sync`, one `all_to_all_v` carrying every rank's status and the
///    slices for other nodes, `sync`: from here the segments hold what the
///    ranks wrote;
/// 3. each rank copies its slices from its node peers' segments straight
///    into its destination (one copy), and the others' messages likewise;
/// 4. a barrier before the next round writes the segments again (after
///    the last round, the load's own outcome exchange, and the next load's
///    `node_window`, which every rank must reach first).
///
/// A rank that failed still takes part in every collective step, with an
/// error status: every rank returns the first failure after the exchange
/// of that round, before reading any segment.
async fn read_windowed(
    mut state: Result<(DestStateDict, ReadStats)>,
    md: &Arc<Metadata>,
    reader: &FileSystemReader,
    collective: &dyn Collective,
    sched: &crate::pipeline::exchange::Schedule,
    needs: &[Vec<crate::pipeline::exchange::Need>],
    mut shared_reads: BTreeMap<usize, Vec<crate::plan::ReadItem>>,
) -> Result<Result<(DestStateDict, ReadStats)>> {
    use crate::pipeline::exchange::{window_layout, WindowLayout};
    let rank = collective.rank();
    let n = collective.world_size();
    let node = collective.node_ranks().unwrap_or_else(|| vec![rank]);
    let on_node = |r: usize| node.binary_search(&r).is_ok();
    let layouts: Vec<WindowLayout> = sched
        .rounds
        .iter()
        .map(|round| window_layout(sched, needs, round, &node))
        .collect();
    let len = layouts
        .iter()
        .map(|l| l.used.get(&rank).copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    // Seconds spent per phase, for the debug trace at the end.
    let mut clock = std::time::Instant::now();
    let mut phases = [0f64; 5];
    let mut lap = |i: usize| {
        let now = std::time::Instant::now();
        phases[i] += (now - clock).as_secs_f64();
        clock = now;
    };
    let window = collective.node_window(len).await?;
    lap(0);
    for (ri, round) in sched.rounds.iter().enumerate() {
        if ri > 0 {
            // Nobody reads the previous round's pieces any more.
            collective.barrier().await?;
            lap(4);
        }
        let lay = &layouts[ri];
        let served: Vec<usize> = round
            .iter()
            .copied()
            .filter(|&s| sched.shared[s].reader == rank)
            .collect();
        let mut remote: Vec<Vec<Bytes>> = vec![Vec::new(); n];
        if !served.is_empty() {
            if let Ok((dest, mut stats)) = state {
                let own: Vec<crate::plan::ReadItem> = served
                    .iter()
                    .flat_map(|s| shared_reads.remove(s).unwrap_or_default())
                    .collect();
                let job = ServeJob {
                    md,
                    reader,
                    window: &window,
                    sched,
                    needs,
                    served: &served,
                    layout: lay,
                    rank,
                    n,
                    node: &node,
                };
                state = match job.run(dest, own).await {
                    Ok((dest, st, rem)) => {
                        stats.bytes_read += st.bytes_read;
                        stats.requests += st.requests;
                        stats.records += st.records;
                        remote = rem;
                        Ok((dest, stats))
                    }
                    Err(e) => Err(e),
                };
            }
        }
        lap(1);
        let status = match &state {
            Ok(_) => Bytes::from_static(&[0]),
            Err(e) => {
                let mut m = vec![1u8];
                m.extend_from_slice(&encode(&on_rank(e, rank).to_wire())?);
                Bytes::from(m)
            }
        };
        let msgs: Vec<Vec<Bytes>> = remote
            .into_iter()
            .map(|bufs| {
                let mut v = Vec::with_capacity(bufs.len() + 1);
                v.push(status.clone());
                v.extend(bufs);
                v
            })
            .collect();
        window.sync();
        let recv = collective.all_to_all_v(msgs).await?;
        window.sync();
        lap(2);
        if let Some(e) = first_failure(&recv) {
            return Ok(Err(e));
        }
        // Fill this rank's needs: from its node peers' segments, or from
        // their messages.
        let (dest_state, stats) = state.expect("no failure in this round");
        let mut dest_vec: DestVec = dest_state.into_items().into_iter().collect();
        // (reader, elem, via the window, read items with their offsets)
        type Fill = (usize, usize, bool, Vec<(crate::plan::ReadItem, usize)>);
        let mut jobs: Vec<Fill> = Vec::new();
        for &s in round {
            let c = &sched.shared[s];
            if c.reader == rank || !c.users.iter().any(|u| u.0 == rank) {
                continue;
            }
            let reads = shared_reads.remove(&s).unwrap_or_default();
            let via_window = on_node(c.reader);
            let mut items = Vec::with_capacity(reads.len());
            for r in reads {
                let at = if via_window {
                    lay.offset(s, &r.overlap).ok_or_else(|| {
                        Error::new(
                            ErrorKind::Collective,
                            "a slice is missing from the shared-memory layout",
                        )
                    })?
                } else {
                    0
                };
                items.push((r, at));
            }
            jobs.push((c.reader, c.elem, via_window, items));
        }
        let win = window.clone();
        let (dv, r) = blocking(move || {
            let mut next = vec![1usize; recv.len()];
            let mut runs: Vec<(usize, usize, usize)> = Vec::new();
            let res = (|| -> Result<()> {
                for (from, elem, via_window, items) in &jobs {
                    for (r, at) in items {
                        let crate::model::DestItem::Tensor(t) = &mut dest_vec[r.dest_item].1 else {
                            continue;
                        };
                        let crate::model::DestChunk { region, data } = &mut t.chunks[r.dest_chunk];
                        if *via_window {
                            let mut pos = *at;
                            runs.clear();
                            crate::pipeline::copy::for_each_run(
                                *elem,
                                region,
                                &r.overlap,
                                |off, len| {
                                    runs.push((pos, off, len));
                                    pos += len;
                                },
                            );
                            win.copy_out(*from, &runs, data)?;
                        } else {
                            let i = next[*from];
                            next[*from] += 1;
                            match recv[*from].get(i) {
                                Some(piece)
                                    if piece.len() as u64 == r.overlap.numel() * *elem as u64 =>
                                {
                                    crate::pipeline::copy::copy_region(
                                        *elem, piece, &r.overlap, data, region, &r.overlap,
                                    );
                                }
                                _ => {
                                    return Err(Error::new(
                                        ErrorKind::Collective,
                                        "shared-read message does not match the plan",
                                    ))
                                }
                            }
                        }
                    }
                }
                Ok(())
            })();
            Ok((dest_vec, res))
        })
        .await?;
        state = r.map(|_| (DestStateDict::from_items(dv.into_iter().collect()), stats));
        lap(3);
    }
    tracing::debug!(
        rank,
        rounds = sched.rounds.len(),
        window_bytes = len,
        window_s = phases[0],
        serve_s = phases[1],
        exchange_s = phases[2],
        fill_s = phases[3],
        barrier_s = phases[4],
        "shared reads through the node window"
    );
    Ok(state)
}

/// What one rank serves in one round of [`read_windowed`].
struct ServeJob<'a> {
    md: &'a Arc<Metadata>,
    reader: &'a FileSystemReader,
    window: &'a Arc<dyn crate::collective::NodeWindow>,
    sched: &'a crate::pipeline::exchange::Schedule,
    needs: &'a [Vec<crate::pipeline::exchange::Need>],
    served: &'a [usize],
    layout: &'a crate::pipeline::exchange::WindowLayout,
    rank: usize,
    n: usize,
    node: &'a [usize],
}

impl ServeJob<'_> {
    /// Read the served chunks once: this rank's own slices (`own`) into
    /// `dest`, its node peers' into its window segment, other nodes' into
    /// one buffer per slice, returned per destination rank in the order
    /// the receivers expect (round order, users' rank order, plan order).
    async fn run(
        &self,
        dest: DestStateDict,
        own: Vec<crate::plan::ReadItem>,
    ) -> Result<(DestStateDict, ReadStats, Vec<Vec<Bytes>>)> {
        use crate::model::DestData;
        use crate::pipeline::read::{read_slots, DestSlots, Slot};
        use std::sync::Mutex;
        let own_slots = DestSlots::new(dest);
        let base = own_slots.slots.len();
        let mut plan = LoadPlan {
            tensor_reads: own,
            bytes_reads: Vec::new(),
        };
        // This rank's pieces of its segment, in offset order.
        let pieces: Vec<(usize, &ChunkBox)> = self
            .served
            .iter()
            .flat_map(|&s| {
                self.layout
                    .pieces
                    .get(&s)
                    .into_iter()
                    .flatten()
                    .map(move |(o, _)| (s, o))
            })
            .collect();
        let lens: Vec<usize> = pieces
            .iter()
            .map(|(s, o)| o.numel() as usize * self.sched.shared[*s].elem)
            .collect();
        let bufs = self.window.carve(&lens)?;
        let mut extra: Vec<Slot> = Vec::with_capacity(pieces.len());
        let read_item = |s: usize, dest_item: usize, overlap: &ChunkBox| {
            let c = &self.sched.shared[s];
            crate::plan::ReadItem {
                dest_item,
                dest_chunk: 0,
                md_item: c.item,
                saved_chunk: c.chunk,
                overlap: overlap.clone(),
            }
        };
        for ((s, o), buf) in pieces.iter().zip(bufs) {
            plan.tensor_reads.push(read_item(*s, base + extra.len(), o));
            extra.push(Slot::Tensor(vec![(
                (*o).clone(),
                Mutex::new(DestData::Provided(buf)),
            )]));
        }
        let first_remote = extra.len();
        let mut remote_to: Vec<usize> = Vec::new();
        for &s in self.served {
            let c = &self.sched.shared[s];
            for &(r, i) in &c.users {
                if r == self.rank || self.node.binary_search(&r).is_ok() {
                    continue;
                }
                for o in &self.needs[r][i].overlaps {
                    let len = o.numel() as usize * c.elem;
                    plan.tensor_reads.push(read_item(s, base + extra.len(), o));
                    extra.push(Slot::Tensor(vec![(
                        o.clone(),
                        Mutex::new(DestData::Owned(vec![0u8; len])),
                    )]));
                    remote_to.push(r);
                }
            }
        }
        let (resolved, cfg, format) = self.reader.prepare_read(self.md, &plan)?;
        let (fs, md) = (self.reader.fs().clone(), self.md.clone());
        let (own_slots, extra, stats) = blocking(move || {
            let md = located(fs.as_ref(), format.as_ref(), md, &plan)?;
            let slots: Vec<&Slot> = own_slots.slots.iter().chain(extra.iter()).collect();
            let stats = read_slots(fs.as_ref(), &md, &plan, &slots, &resolved, &cfg)?;
            drop(slots);
            Ok((own_slots, extra, stats))
        })
        .await?;
        let mut remote: Vec<Vec<Bytes>> = vec![Vec::new(); self.n];
        // The window's pieces are dropped here: the segment is written.
        for (k, slot) in extra.into_iter().enumerate() {
            if k < first_remote {
                continue;
            }
            if let Slot::Tensor(mut v) = slot {
                if let Some((_, m)) = v.pop() {
                    let data = m.into_inner().unwrap_or_else(|p| p.into_inner());
                    remote[remote_to[k - first_remote]].push(Bytes::from(data.into_vec()));
                }
            }
        }
        Ok((own_slots.take(), stats, remote))
    }
}

/// Read whole saved chunks `(md_item, saved_chunk)`, decoded and verified,
/// through the reader's ordinary path (the saved box as the destination).
async fn read_saved_chunks(
    reader: &dyn StorageReader,
    md: &Arc<Metadata>,
    chunks: Vec<(usize, usize)>,
) -> Result<(Vec<Vec<u8>>, ReadStats)> {
    let mut by_item: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(i, c) in &chunks {
        by_item.entry(i).or_default().push(c);
    }
    let mut dest = DestStateDict::new();
    let mut plan = LoadPlan::default();
    for (di, (&i, cs)) in by_item.iter().enumerate() {
        let (
            name,
            ItemMeta::Tensor {
                dtype,
                shape,
                chunks: saved,
            },
        ) = &md.items[i]
        else {
            return Err(Error::invalid("shared chunk is not a tensor"));
        };
        dest.want_tensor(
            name.clone(),
            *dtype,
            shape.clone(),
            cs.iter().map(|&c| saved[c].region.clone()).collect(),
        )?;
        for (dc, &c) in cs.iter().enumerate() {
            plan.tensor_reads.push(crate::plan::ReadItem {
                dest_item: di,
                dest_chunk: dc,
                md_item: i,
                saved_chunk: c,
                overlap: saved[c].region.clone(),
            });
        }
    }
    // Item names are unique and sorted in the metadata, so the destination's
    // name order is the metadata's index order, as the plan assumes.
    let (filled, stats) = reader.read(md.clone(), plan, dest).await?;
    let mut out_map: BTreeMap<(usize, usize), Vec<u8>> = BTreeMap::new();
    for ((&i, cs), (_, item)) in by_item.iter().zip(filled.into_items()) {
        if let crate::model::DestItem::Tensor(t) = item {
            for (&c, ch) in cs.iter().zip(t.chunks) {
                out_map.insert((i, c), ch.data.into_vec());
            }
        }
    }
    let out = chunks
        .iter()
        .map(|k| out_map.remove(k).unwrap_or_default())
        .collect();
    Ok((out, stats))
}
