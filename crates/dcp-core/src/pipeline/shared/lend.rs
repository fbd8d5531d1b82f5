//! Lending: ranks of one process read every shared chunk once between
//! them, straight into each other's destination buffers.

use super::split::{cuts, served_reads, Key};
use crate::checkpoint::wire::{decode, encode, on_rank};
use crate::checkpoint::{located, FileSystemReader, ROOT};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::Metadata;
use crate::model::DestStateDict;
use crate::pipeline::blocking;
use crate::pipeline::read::{read_slots, Dest, DestSlots, ReadStats, Slot};
use crate::plan::LoadPlan;
use std::sync::Arc;

/// What a rank lends the other ranks of its process: its destination
/// buffers (`None`: its own reads failed) and its plan of the shared
/// chunks; rank 0 also the cuts that say which rank reads which of them
/// ([`cuts`]).
struct Lent {
    slots: Option<DestSlots>,
    plan: LoadPlan,
    /// Whether `plan` reads the chunks in key order.
    ordered: bool,
    cuts: Option<Vec<Key>>,
}

/// Shared reads for ranks in one process (see [`read_shared`]), after each
/// rank read what only it needs (`state`): every rank lends its destination
/// buffers and its plan of the `shared` chunks (sorted keys) to the others
/// (`all_gather_local`). The shared chunks, in key order, are cut into one
/// run per rank of about equal bytes (by rank 0, while the others move
/// their buffers into slots); each rank then reads its run once, straight
/// into the buffers of every rank that needs each chunk, one scattered
/// read per record. Nothing is staged in memory or copied between ranks,
/// so no rounds or budget are needed. An all-gather of the outcome then
/// ends the lending: after it no rank writes into another's buffers, and
/// each takes its own back.
pub(super) async fn read_lent(
    state: Result<(Dest, ReadStats)>,
    plan: LoadPlan,
    md: &Arc<Metadata>,
    reader: &FileSystemReader,
    collective: &dyn Collective,
    shared: &[Key],
) -> Result<Result<(DestStateDict, ReadStats)>> {
    let rank = collective.rank();
    let cuts = (rank == ROOT).then(|| cuts(md, &[shared], collective.world_size()));
    let ordered = plan
        .tensor_reads
        .windows(2)
        .all(|w| (w[0].md_item, w[0].saved_chunk) <= (w[1].md_item, w[1].saved_chunk));
    let (slots, mut stats, failed) = match state {
        Ok((dest, stats)) => (Some(dest.into_slots()), stats, None),
        Err(e) => (None, ReadStats::default(), Some(e)),
    };
    let mine = Arc::new(Lent {
        slots,
        plan,
        ordered,
        cuts,
    });
    let lent = super::gather_local(collective, mine.clone(), "destination buffers").await?;
    // Serve only when every rank lent its buffers (a rank that failed has
    // none; the outcome exchange below then fails the load everywhere).
    let served = match failed {
        Some(e) => Err(e),
        None if lent.iter().all(|l| l.slots.is_some()) => serve(&lent, md, reader, rank).await,
        None => Ok(ReadStats::default()),
    };
    drop(lent);
    // The end of the lending: once every rank is past this, nobody writes
    // into another rank's buffers.
    let status: std::result::Result<(), WireError> = match &served {
        Ok(_) => Ok(()),
        Err(e) => Err(on_rank(e, rank).to_wire()),
    };
    let all = collective.all_gather(encode(&status)?).await?;
    match served {
        Ok(s) => {
            stats.bytes_read += s.bytes_read;
            stats.requests += s.requests;
            stats.records += s.records;
        }
        Err(e) => return Ok(Err(e)),
    }
    for b in &all {
        if let Err(w) = decode::<std::result::Result<(), WireError>>(b)? {
            return Ok(Err(Error::from_wire(w)));
        }
    }
    let dest = mine
        .slots
        .as_ref()
        .map(DestSlots::take)
        .expect("a rank that did not fail lent its buffers");
    Ok(Ok((dest, stats)))
}

/// Read this rank's run of the shared chunks into every lent buffer that
/// needs them. The reads are the lent plans' own, borrowed; working them
/// out is part of the blocking work, with the lent values moved into it.
async fn serve(
    lent: &[Arc<Lent>],
    md: &Arc<Metadata>,
    reader: &FileSystemReader,
    rank: usize,
) -> Result<ReadStats> {
    if lent.get(ROOT).and_then(|l| l.cuts.as_ref()).is_none() {
        return Err(Error::new(
            ErrorKind::Collective,
            "rank 0 lent no cuts of the shared reads",
        ));
    }
    let (reader, md, lent) = (reader.clone(), md.clone(), lent.to_vec());
    blocking(move || {
        let cuts = lent[ROOT].cuts.as_deref().expect("checked above");
        // Every rank's destination items, one flat index space.
        let mut bases = Vec::with_capacity(lent.len());
        let mut count = 0usize;
        for l in &lent {
            bases.push(count);
            count += l.slots.as_ref().map_or(0, DestSlots::len);
        }
        let plans: Vec<&LoadPlan> = lent.iter().map(|l| &l.plan).collect();
        let ordered: Vec<bool> = lent.iter().map(|l| l.ordered).collect();
        let reads = served_reads(&plans, &ordered, &bases, cuts, rank);
        if reads.is_empty() {
            return Ok(ReadStats::default());
        }
        let (resolved, cfg, format) = reader.prepare_read(&md, &reads)?;
        let fs = reader.fs();
        let md = located(fs.as_ref(), format.as_ref(), md, &reads)?;
        let slots: Vec<Slot<'_>> = lent
            .iter()
            .flat_map(|l| l.slots.as_ref().map(|s| s.slots()).into_iter().flatten())
            .collect();
        read_slots(fs.as_ref(), &md, &reads, &slots, &resolved, &cfg)
    })
    .await
}
