//! The sectioned-metadata side of a load: rank 0's first read of
//! `.metadata` (the whole of one body, or only the header and index of
//! sectioned metadata), the sections each rank fetches from storage for
//! its destination, and the load that plans against them.

use crate::checkpoint::wire::{decode, encode, wire};
use crate::checkpoint::{LoadOptions, StorageReader};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result, WireError};
use crate::metadata::sections::{self, MetadataIndex, Selected};
use crate::metadata::{Metadata, HEADER_LEN, MAGIC, MAX_METADATA_LEN};
use crate::model::DestStateDict;
use crate::pipeline::shared::read_shared;
use crate::pipeline::ReadStats;
use crate::plan::LoadPlan;
use std::sync::Arc;

/// What rank 0 broadcasts, decoded: the whole metadata (one body, or a
/// foreign checkpoint translated), or the index of sectioned metadata.
// One per load, behind an `Arc`: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Head {
    Whole(Arc<Metadata>),
    Index(MetadataIndex),
}

impl Head {
    /// `bytes` is the index of sectioned metadata when it is exactly its
    /// header and index; otherwise a whole `.metadata`.
    pub(super) fn decode(bytes: &[u8]) -> Result<Head> {
        match sections::index_len(bytes)? {
            Some(n) if n == bytes.len() as u64 => Ok(Head::Index(MetadataIndex::decode(bytes)?)),
            _ => Ok(Head::Whole(Arc::new(Metadata::decode(bytes)?))),
        }
    }
}

/// How much of `.metadata` rank 0 reads first: all of a small checkpoint's,
/// and the index of most sectioned ones, in one request.
const HEAD_READ: u64 = 1 << 20;

/// Rank 0's read: the header and index of sectioned metadata, otherwise the
/// whole `.metadata` (a foreign checkpoint's translated by the reader).
pub(super) async fn read_head(reader: &dyn StorageReader) -> Result<Vec<u8>> {
    let mut head = reader
        .read_metadata_ranges(&[(0, HEAD_READ)])
        .await?
        .pop()
        .unwrap_or_default();
    if !head.starts_with(&MAGIC) || head.len() < HEADER_LEN {
        // Not dcp's own (a checkpoint a translator reads), or too short to
        // say: the reader's whole read decides.
        return reader.read_metadata().await;
    }
    let have = head.len() as u64;
    if have < HEAD_READ {
        // The whole file: of sectioned metadata, keep the header and index
        // (a truncated one is left for the decoder to name).
        if let Some(n) = sections::index_len(&head)? {
            if n <= have {
                head.truncate(n as usize);
            }
        }
        return Ok(head);
    }
    match sections::index_len(&head)? {
        // One body longer than the first read: the reader's whole read,
        // as before sectioned metadata (its limit, its messages).
        None => reader.read_metadata().await,
        Some(want) => {
            if want > MAX_METADATA_LEN + HEADER_LEN as u64 {
                return Err(Error::corrupt(format!(
                    ".metadata says its index is {want} bytes, more than the limit of {MAX_METADATA_LEN}"
                )));
            }
            if have < want {
                let rest = reader
                    .read_metadata_ranges(&[(have, want - have)])
                    .await?
                    .pop()
                    .unwrap_or_default();
                head.extend_from_slice(&rest);
            }
            head.truncate(want.min(head.len() as u64) as usize);
            Ok(head)
        }
    }
}

/// The sections `ids` of the checkpoint `idx` indexes, read from storage
/// and decoded. A section whose bytes do not match the index because a
/// newer save replaced `.metadata` in the meantime is reported as such.
async fn fetch_sections(
    idx: &MetadataIndex,
    ids: &[u32],
    reader: &dyn StorageReader,
) -> Result<Selected> {
    let ranges = idx.ranges(ids);
    let bufs = reader.read_metadata_ranges(&ranges).await?;
    let fetched: Vec<(u64, &[u8])> = ranges
        .iter()
        .zip(&bufs)
        .map(|(&(o, _), b)| (o, b.as_slice()))
        .collect();
    match idx.select(ids, &fetched) {
        Ok(s) => Ok(s),
        Err(e) if matches!(e.kind(), ErrorKind::ChecksumMismatch | ErrorKind::Corrupt) => {
            // Compare the header now there with the index read first.
            let now = reader
                .read_metadata_ranges(&[(0, HEADER_LEN as u64)])
                .await
                .ok()
                .and_then(|mut v| v.pop());
            let same = now.as_deref().is_some_and(|h| {
                h.len() == HEADER_LEN
                    && sections::index_len(h).ok().flatten() == Some(idx.index_bytes())
                    && h[24..28] == idx.crc().to_le_bytes()
            });
            if same {
                Err(e)
            } else {
                Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "checkpoint replaced during load: the load began with save {} and {} now holds another .metadata; load again ({})",
                        idx.save_id(),
                        reader.location(),
                        e.message()
                    ),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// The metadata this rank's destination needs, and its plan.
async fn plan_sectioned(
    idx: &MetadataIndex,
    ids: &[u32],
    dest: &DestStateDict,
    reader: &dyn StorageReader,
    options: &LoadOptions,
) -> Result<(Selected, LoadPlan)> {
    let sel = fetch_sections(idx, ids, reader).await?;
    let plan = options.planner.plan(&sel.metadata, dest)?;
    Ok((sel, plan))
}

/// Load from sectioned metadata: every rank reads the sections its
/// destination overlaps and plans against them. With shared reads, ranks
/// first exchange the chunks they read, numbered as in the whole
/// checkpoint; when no chunk is read by two ranks (a load into the
/// sharding that was saved) each reads its own, and otherwise every rank
/// reads the sections of every chunk any rank reads (the same metadata on
/// every rank, as shared reads need) and the load proceeds as for one body.
/// The outer `Result` is a collective failure.
pub(super) async fn load_sectioned(
    idx: &MetadataIndex,
    dest: DestStateDict,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &LoadOptions,
) -> Result<(Arc<Metadata>, Result<(DestStateDict, ReadStats)>)> {
    let rank = collective.rank();
    let ids = idx.sections_for(&dest);
    let planned = plan_sectioned(idx, &ids, &dest, reader, options).await;
    if !(options.share_reads && collective.world_size() > 1) {
        return Ok(match planned {
            Ok((sel, plan)) => {
                let md = Arc::new(sel.metadata);
                (md.clone(), reader.read(md, plan, dest).await)
            }
            Err(e) => (Arc::new(idx.shell()), Err(e)),
        });
    }
    let keys = planned.as_ref().map(|(sel, plan)| {
        let mut k: Vec<(u32, u32)> = plan
            .tensor_reads
            .iter()
            .map(|r| {
                (
                    r.md_item as u32,
                    sel.chunk_numbers[r.md_item][r.saved_chunk],
                )
            })
            .collect();
        k.sort_unstable();
        k.dedup();
        k
    });
    let msg = wire(keys.map_err(Error::detached), rank);
    let all = collective.all_gather(encode(&msg)?).await?;
    let mut every: Vec<(u32, u32)> = Vec::new();
    for b in &all {
        match decode::<std::result::Result<Vec<(u32, u32)>, WireError>>(b)? {
            Ok(k) => every.extend(k),
            // Every rank sees the same failure and stops here together.
            Err(w) => {
                let md = match planned {
                    Ok((sel, _)) => sel.metadata,
                    Err(_) => idx.shell(),
                };
                return Ok((Arc::new(md), Err(Error::from_wire(w))));
            }
        }
    }
    drop(all);
    let (sel, plan) = planned.expect("errors returned above");
    every.sort_unstable();
    if every.windows(2).all(|w| w[0] != w[1]) {
        let md = Arc::new(sel.metadata);
        return Ok((md.clone(), reader.read(md, plan, dest).await));
    }
    // Some chunk is read by two ranks: the same metadata everywhere.
    let mut union: Vec<u32> = every
        .iter()
        .filter_map(|&(i, c)| idx.section_of(i as usize, c))
        .collect();
    drop(every);
    union.sort_unstable();
    union.dedup();
    drop((sel, plan));
    let planned = plan_sectioned(idx, &union, &dest, reader, options)
        .await
        .map(|(sel, plan)| (Arc::new(sel.metadata), plan));
    let (md, planned) = match planned {
        Ok((md, plan)) => (md, Ok(plan)),
        Err(e) => (Arc::new(idx.shell()), Err(e)),
    };
    let result = read_shared(
        planned,
        crate::pipeline::read::Dest::Whole(dest),
        &md,
        reader,
        collective,
        options.exchange_budget,
    )
    .await?;
    Ok((md, result))
}
