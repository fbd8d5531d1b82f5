//! The shared-read message exchange, for ranks with neither lent buffers
//! nor a node window: round by round, each rank reads the shared chunks it
//! serves whole and sends every other user its slices in one
//! `all_to_all_v`, each message led by a status buffer.

use super::DestVec;
use crate::checkpoint::wire::{decode, encode, on_rank};
use crate::checkpoint::StorageReader;
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::{ItemMeta, Metadata};
use crate::model::{ChunkBox, DestStateDict};
use crate::pipeline::blocking;
use crate::pipeline::exchange::{compact, fill_from_chunk, fill_from_compact, Need, Schedule};
use crate::pipeline::read::ReadStats;
use crate::plan::LoadPlan;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Serve and receive the shared chunks of `sched`, round by round, as
/// messages. The outer `Result` is a collective failure; the inner one
/// this rank's outcome (the first failure of any rank after the round it
/// happened in).
pub(super) async fn read_exchanged(
    mut state: Result<(DestStateDict, ReadStats)>,
    md: &Arc<Metadata>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    sched: &Schedule,
    mut needs: Vec<Vec<Need>>,
    mut shared_reads: BTreeMap<usize, Vec<crate::plan::ReadItem>>,
) -> Result<Result<(DestStateDict, ReadStats)>> {
    let rank = collective.rank();
    let n = collective.world_size();
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
pub(super) fn first_failure(recv: &[Vec<Bytes>]) -> Option<Error> {
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
            shape.to_vec(),
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
