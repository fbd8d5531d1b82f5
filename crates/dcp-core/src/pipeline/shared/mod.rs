//! Shared reads across ranks: each saved chunk that several ranks need is
//! read once, then lent (ranks of one process, [`lend`]), filled through
//! memory shared by the ranks of a node ([`window`]), or exchanged as
//! messages ([`message`]).

mod lend;
mod message;
mod split;
mod window;

use crate::checkpoint::wire::{decode, encode, wire};
use crate::checkpoint::StorageReader;
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::Metadata;
use crate::model::DestStateDict;
use crate::pipeline::read::{Dest, ReadStats};
use crate::plan::LoadPlan;
use std::sync::Arc;

/// Round 1 of a shared read, from each rank: the saved chunks it reads
/// (sorted, distinct), whether it can lend buffers, whether it can fill
/// through a node window; or the error that kept it from planning.
type KeysMsg = std::result::Result<(Vec<(u32, u32)>, bool, bool), WireError>;

/// Every rank's `value`, in rank order. Ranks of one process share them
/// ([`gather_local`]: an `Arc` each, nothing encoded or copied); other
/// collectives gather them encoded. `what` names the values in the error a
/// rank that shared something else gets.
async fn all_gather_value<T>(
    collective: &dyn Collective,
    value: T,
    what: &str,
) -> Result<Vec<Arc<T>>>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let value = Arc::new(value);
    if collective.shares_memory() {
        match gather_local(collective, value.clone(), what).await {
            // Refused on every rank: encoded, as between processes.
            Err(e) if e.kind() == ErrorKind::Unsupported => {}
            other => return other,
        }
    }
    let all = collective.all_gather(encode(&*value)?).await?;
    all.iter().map(|b| decode::<T>(b).map(Arc::new)).collect()
}

/// Every rank's `value`, in rank order, shared between the ranks of one
/// process ([`Collective::all_gather_local`]; refused with
/// [`ErrorKind::Unsupported`] by collectives that cannot). A rank that
/// shared something other than a `T` is an error naming `what`.
pub(super) async fn gather_local<T: Send + Sync + 'static>(
    collective: &dyn Collective,
    value: Arc<T>,
    what: &str,
) -> Result<Vec<Arc<T>>> {
    collective
        .all_gather_local(value as crate::collective::LocalValue)
        .await?
        .into_iter()
        .map(|v| {
            v.downcast::<T>().map_err(|_| {
                Error::new(
                    ErrorKind::Collective,
                    format!("a rank shared something other than its {what}"),
                )
            })
        })
        .collect()
}

/// A rank's destination items by index, for filling in place.
type DestVec = Vec<(String, crate::model::DestItem)>;

/// Load with shared reads (see [`LoadOptions::share_reads`]). The outer
/// `Result` is a collective failure; the inner one this rank's outcome, which
/// every rank then agrees on.
pub(crate) async fn read_shared(
    planned: Result<LoadPlan>,
    dest: Dest,
    md: &Arc<Metadata>,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    budget: u64,
) -> Result<Result<(DestStateDict, ReadStats)>> {
    use crate::pipeline::exchange::{
        chunk_keys, needs_of, repeated_keys, schedule, split_plan, Need,
    };
    let rank = collective.rank();
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
    let keys_msg: KeysMsg = wire(
        planned
            .as_ref()
            .map(|p| (chunk_keys(p), can_lend, can_window))
            .map_err(Error::detached),
        rank,
    );
    let all = all_gather_value(collective, keys_msg, "chunk keys").await?;
    let mut lists: Vec<&[(u32, u32)]> = Vec::with_capacity(all.len());
    let mut lend = true;
    let mut window = true;
    for msg in &all {
        match &**msg {
            Ok((keys, l, w)) => {
                lists.push(keys);
                lend &= *l;
                window &= *w;
            }
            // Every rank sees the same failure and stops here together.
            Err(w) => return Ok(Err(Error::from_wire(w.clone()))),
        }
    }
    let plan = planned.expect("errors returned above");
    // A key two or more ranks hold is a chunk they share (sorted, distinct:
    // looked up by binary search).
    let shared = repeated_keys(&lists);
    if shared.is_empty() {
        return Ok(read_alone(reader, md, plan, dest).await);
    }
    if lend {
        // Ranks of one process read every shared chunk once between them,
        // straight into each other's buffers. What only this rank reads it
        // reads first, alone, before it lends anything: a rank whose
        // storage stalls there holds no lock on another rank's buffers,
        // and the others' collective deadline names it.
        let (local, plan) = split_shared(plan, lists[rank], &shared);
        drop(lists);
        drop(all);
        let state = read_local(reader, md, local, dest).await;
        let fsr = reader
            .file_system_reader()
            .expect("every rank said it has a file-system reader");
        return lend::read_lent(state, plan, md, fsr, collective, &shared).await;
    }
    drop(lists);
    drop(all);
    // Round 2: what each rank needs of the chunks it shares.
    let mine: Vec<Need> = needs_of(&plan)
        .into_iter()
        .filter(|n| shared.binary_search(&(n.item, n.chunk)).is_ok())
        .collect();
    let all = collective.all_gather(encode(&mine)?).await?;
    drop(mine);
    let needs: Vec<Vec<Need>> = all
        .iter()
        .map(|b| decode::<Vec<Need>>(b))
        .collect::<Result<_>>()?;
    let sched = if window {
        crate::pipeline::exchange::schedule_windowed(md, &needs, budget)
    } else {
        schedule(md, &needs, budget)
    };
    let (local_plan, shared_reads) = split_plan(plan, &sched);
    let state = read_local(reader, md, local_plan, dest)
        .await
        .map(|(d, s)| (d.into_whole(), s));
    if window && !sched.shared.is_empty() {
        let fsr = reader
            .file_system_reader()
            .expect("every rank said it has a file-system reader");
        return window::read_windowed(state, md, fsr, collective, &sched, &needs, shared_reads)
            .await;
    }
    message::read_exchanged(state, md, reader, collective, &sched, needs, shared_reads).await
}

/// Whether every key of `keys` is in `of` (both sorted and distinct): one
/// merge walk.
fn is_subset(keys: &[(u32, u32)], of: &[(u32, u32)]) -> bool {
    if keys.len() > of.len() {
        return false;
    }
    let mut j = 0;
    for k in keys {
        while j < of.len() && of[j] < *k {
            j += 1;
        }
        if of.get(j) != Some(k) {
            return false;
        }
        j += 1;
    }
    true
}

/// Split `plan`, whose chunk keys are `keys` (sorted, distinct), into the
/// reads of chunks no other rank reads and those of the `shared` chunks
/// (sorted keys), each in plan order; the bytes reads go with the first.
/// When every key is shared (a resharded load of small items), one merge
/// walk over the keys says so and the reads move whole.
fn split_shared(
    plan: LoadPlan,
    keys: &[(u32, u32)],
    shared: &[(u32, u32)],
) -> (LoadPlan, LoadPlan) {
    if is_subset(keys, shared) {
        let local = LoadPlan {
            tensor_reads: Vec::new(),
            bytes_reads: plan.bytes_reads,
        };
        let lent = LoadPlan {
            tensor_reads: plan.tensor_reads,
            bytes_reads: Vec::new(),
        };
        return (local, lent);
    }
    let (mine, theirs) = plan.tensor_reads.into_iter().partition(|r| {
        shared
            .binary_search(&(r.md_item as u32, r.saved_chunk as u32))
            .is_err()
    });
    (
        LoadPlan {
            tensor_reads: mine,
            bytes_reads: plan.bytes_reads,
        },
        LoadPlan {
            tensor_reads: theirs,
            bytes_reads: Vec::new(),
        },
    )
}

/// Read `plan` into `dest` (whole, or already in read slots) and return it
/// whole: what a rank reads when it shares nothing.
pub(crate) async fn read_alone(
    reader: &dyn StorageReader,
    md: &Arc<Metadata>,
    plan: LoadPlan,
    dest: Dest,
) -> Result<(DestStateDict, ReadStats)> {
    match dest {
        Dest::Whole(d) => reader.read(md.clone(), plan, d).await,
        slots => {
            let (s, stats) = slots_reader(reader)?
                .read_into_slots(md.clone(), plan, slots)
                .await?;
            Ok((s.take(), stats))
        }
    }
}

/// Read what this rank reads alone; a plan with nothing in it (every chunk
/// this rank needs is shared) leaves `dest` as it is without a pass over it.
async fn read_local(
    reader: &dyn StorageReader,
    md: &Arc<Metadata>,
    plan: LoadPlan,
    dest: Dest,
) -> Result<(Dest, ReadStats)> {
    if plan.tensor_reads.is_empty() && plan.bytes_reads.is_empty() {
        return Ok((dest, ReadStats::default()));
    }
    match dest {
        Dest::Whole(d) => {
            let (d, stats) = reader.read(md.clone(), plan, d).await?;
            Ok((Dest::Whole(d), stats))
        }
        slots => {
            let (s, stats) = slots_reader(reader)?
                .read_into_slots(md.clone(), plan, slots)
                .await?;
            Ok((Dest::Slots(s), stats))
        }
    }
}

/// The file-system reader that reads into a destination already in read
/// slots (only ranks with one move their buffers early, see
/// [`moves_slots_early`]).
fn slots_reader(reader: &dyn StorageReader) -> Result<&crate::checkpoint::FileSystemReader> {
    reader.file_system_reader().ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "a destination in read slots needs a file-system reader",
        )
    })
}

/// Whether this rank moves its destination's buffers into read slots
/// while rank 0 reads the metadata: every rank of ranks in one process
/// that lend each other their buffers (shared reads asked for, a
/// file-system reader, a collective whose ranks share memory). The others
/// would otherwise wait idle for rank 0, and rank 0 moves its own on a
/// blocking thread beside its read and decode (done later, the others
/// would wait for it before lending); every rank moves them anyway, when
/// it lends them or reads alone. Only sectioned metadata (known once it
/// arrives; large sharded checkpoints) takes them back out to plan its
/// sections: one more pass over the rank's own destination.
pub(crate) fn moves_slots_early(
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    share_reads: bool,
) -> bool {
    share_reads
        && collective.world_size() > 1
        && collective.shares_memory()
        && reader.file_system_reader().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merge walk agrees with a lookup of each key, on lists with and
    /// without keys missing from the other.
    #[test]
    fn subsets_by_merge_match_lookups() {
        let of: Vec<(u32, u32)> = (0..40u32)
            .filter(|i| i % 3 != 0)
            .map(|i| (i / 4, i % 4))
            .collect();
        let cases: Vec<Vec<(u32, u32)>> = vec![
            vec![],
            of.clone(),
            of.iter().copied().step_by(2).collect(),
            vec![(0, 0)],
            vec![(0, 1), (0, 3)],
            vec![(0, 1), (9, 3)],
            vec![(9, 3)],
            vec![(99, 0)],
            of.iter().copied().chain([(99, 0)]).collect(),
        ];
        for keys in cases {
            let want = keys.iter().all(|k| of.binary_search(k).is_ok());
            assert_eq!(is_subset(&keys, &of), want, "{keys:?}");
        }
    }

    /// Splitting sends each read to the side its key says, in plan order,
    /// and the bytes reads to the rank's own side.
    #[test]
    fn split_shared_keeps_plan_order_on_each_side() {
        use crate::model::ChunkBox;
        use crate::plan::{BytesRead, ReadItem};
        let read = |md_item: usize, saved_chunk: usize| ReadItem {
            dest_item: md_item,
            dest_chunk: 0,
            md_item,
            saved_chunk,
            overlap: ChunkBox::full(&[1]),
        };
        let plan = LoadPlan {
            tensor_reads: vec![read(3, 0), read(1, 1), read(2, 0), read(1, 0)],
            bytes_reads: vec![BytesRead {
                dest_item: 9,
                md_item: 9,
            }],
        };
        let plan_keys = [(1, 0), (1, 1), (2, 0), (3, 0)];
        let keys = |p: &LoadPlan| -> Vec<(usize, usize)> {
            p.tensor_reads
                .iter()
                .map(|r| (r.md_item, r.saved_chunk))
                .collect()
        };
        // Some keys shared: split by key.
        let (mine, theirs) = split_shared(plan.clone(), &plan_keys, &[(1, 0), (3, 0)]);
        assert_eq!(keys(&mine), vec![(1, 1), (2, 0)]);
        assert_eq!(keys(&theirs), vec![(3, 0), (1, 0)]);
        assert_eq!(mine.bytes_reads.len(), 1);
        assert!(theirs.bytes_reads.is_empty());
        // Every key shared (and more): the reads move whole, in order.
        let every = [(0, 5), (1, 0), (1, 1), (2, 0), (3, 0), (4, 0)];
        let (mine, theirs) = split_shared(plan, &plan_keys, &every);
        assert!(mine.tensor_reads.is_empty());
        assert_eq!(keys(&theirs), vec![(3, 0), (1, 1), (2, 0), (1, 0)]);
        assert_eq!(mine.bytes_reads.len(), 1);
        assert!(theirs.bytes_reads.is_empty());
    }
}
