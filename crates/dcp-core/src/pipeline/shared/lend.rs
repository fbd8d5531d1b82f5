//! Lending: ranks of one process read shared chunks straight into each
//! other's destination buffers.

use crate::checkpoint::wire::{decode, encode, on_rank};
use crate::checkpoint::{located, FileSystemReader};
use crate::collective::Collective;
use crate::error::{Error, Result, WireError};
use crate::metadata::Metadata;
use crate::model::DestStateDict;
use crate::pipeline::blocking;
use crate::pipeline::read::ReadStats;
use crate::plan::LoadPlan;
use std::sync::Arc;

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
pub(super) async fn read_lent(
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
    let lent = super::gather_local(collective, mine.clone(), "destination buffers").await?;
    // Serve only when every rank lent its buffers (a failed rank has none;
    // the outcome exchange below then fails the load everywhere).
    if outcome.is_ok() && lent.iter().all(|l| l.0.is_some()) {
        // Every rank's destination items, one flat index space.
        let mut base = Vec::with_capacity(lent.len());
        let mut count = 0usize;
        for l in &lent {
            base.push(count);
            count += l.0.as_ref().map_or(0, DestSlots::len);
        }
        // Sized up front: growing a vector of many reads copies it and
        // makes the allocator consolidate the small blocks freed before.
        let reads: usize = sched
            .shared
            .iter()
            .filter(|c| c.reader == rank)
            .flat_map(|c| &c.users)
            .map(|&(r, i)| needs[r][i].overlaps.len())
            .sum();
        let mut plan = LoadPlan {
            tensor_reads: Vec::with_capacity(reads),
            bytes_reads: Vec::new(),
        };
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
                        let slots: Vec<Slot<'_>> = lent
                            .iter()
                            .flat_map(|l| l.0.as_ref().map(|d| d.slots()).into_iter().flatten())
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
