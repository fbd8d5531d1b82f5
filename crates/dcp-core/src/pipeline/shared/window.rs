//! Window exchanges: ranks in separate processes fill each other's
//! destinations through memory shared by the ranks of a node
//! ([`Collective::node_window`]).

use super::message::first_failure;
use super::DestVec;
use crate::checkpoint::wire::{encode, on_rank};
use crate::checkpoint::{located, FileSystemReader};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result};
use crate::metadata::Metadata;
use crate::model::{ChunkBox, DestStateDict};
use crate::pipeline::blocking;
use crate::pipeline::read::ReadStats;
use crate::plan::LoadPlan;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

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
pub(super) async fn read_windowed(
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
        use crate::pipeline::read::{read_slots, DestSlots, Reads, Slot, SlotChunk};
        use std::sync::Mutex;
        let own_slots = DestSlots::new(dest);
        let base = own_slots.len();
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
        let mut extra: Vec<SlotChunk> = Vec::with_capacity(pieces.len());
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
            extra.push(((*o).clone(), Mutex::new(DestData::Provided(buf))));
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
                    extra.push((o.clone(), Mutex::new(DestData::Owned(vec![0u8; len]))));
                    remote_to.push(r);
                }
            }
        }
        let (resolved, cfg, format) = self.reader.prepare_read(self.md, &Reads::Plan(&plan))?;
        let (fs, md) = (self.reader.fs().clone(), self.md.clone());
        let (own_slots, extra, stats) = blocking(move || {
            let md = located(fs.as_ref(), format.as_ref(), md, &Reads::Plan(&plan))?;
            let slots: Vec<Slot<'_>> = own_slots
                .slots()
                .chain(extra.iter().map(|c| Slot::Tensor(std::slice::from_ref(c))))
                .collect();
            let stats = read_slots(
                fs.as_ref(),
                &md,
                &Reads::Plan(&plan),
                &slots,
                &resolved,
                &cfg,
            )?;
            drop(slots);
            Ok((own_slots, extra, stats))
        })
        .await?;
        let mut remote: Vec<Vec<Bytes>> = vec![Vec::new(); self.n];
        // The window's pieces are dropped here: the segment is written.
        for (k, (_, m)) in extra.into_iter().enumerate() {
            if k < first_remote {
                continue;
            }
            let data = m.into_inner().unwrap_or_else(|p| p.into_inner());
            remote[remote_to[k - first_remote]].push(Bytes::from(data.into_vec()));
        }
        Ok((own_slots.take(), stats, remote))
    }
}
