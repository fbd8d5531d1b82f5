//! Sectioned `.metadata` (format version 3): an index that every loading
//! rank reads, and sections of chunk records that a rank reads only where
//! its destination overlaps them.
//!
//! Layout: the 28-byte header of every version (magic, version 3, flags 0,
//! the index's length, the index's CRC-32C), the index (postcard), then the
//! sections, back to back. The index holds everything but the chunk records
//! of sectioned tensors: the save id, world size, format, files, transforms,
//! user metadata, generation, and every item (name, dtype, shape, or a
//! bytes item's record). A tensor of one chunk keeps it in the index
//! (inline); a tensor of n chunks keeps them in sections of
//! [`section_chunks`]`(n)` (about the square root of 2n) consecutive chunks,
//! each listed in the index with its bounding box, chunk count, place,
//! length and CRC-32C: a rank that needs one chunk of each tensor then
//! receives about as many bytes of index as of sections, in all about
//! 2 x sqrt(26 n x 13) bytes a tensor instead of 13 n. Sections are laid
//! out part-major (the first section of every item, then the second of
//! every item, ...), so a rank that loads one shard of every tensor of an
//! evenly sharded model finds its sections next to each other.
//!
//! [`Metadata::encode`] writes this layout only for checkpoints of at least
//! [`SECTIONED_MIN_RECORDS`] records with a tensor of several chunks; every
//! other checkpoint stays one body (version 2). The file is still one object,
//! published by one atomic write.
//!
//! Decoding bounds every count and length by the bytes present before
//! allocating, checks every section's CRC-32C and that its chunks lie inside
//! the bounding box the index gives, and validates what it builds with
//! [`Metadata::validate`].

use super::{
    parse_header, ChunkMeta, DataFile, FormatKind, ItemMeta, Metadata, StorageInfo, HEADER_LEN,
    MAGIC, MAX_METADATA_LEN, MAX_NDIM,
};
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{ChunkBox, DestItem, DestStateDict, Dims};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The format version of sectioned metadata.
pub const SECTIONED_FORMAT_VERSION: u32 = 3;
/// The fewest chunks per section [`Metadata::encode`] chooses.
pub const MIN_SECTION_CHUNKS: usize = 16;

/// Chunks per section of a tensor of `n` chunks as [`Metadata::encode`]
/// writes it (the last section may hold fewer): the ceiling of the square
/// root of 2n, at least [`MIN_SECTION_CHUNKS`]. An index entry costs about
/// twice a chunk record, so this about balances the index a rank receives
/// against the one section of the tensor it reads.
pub fn section_chunks(n: usize) -> usize {
    let mut k = ((2.0 * n as f64).sqrt().ceil() as usize).max(MIN_SECTION_CHUNKS);
    while k > MIN_SECTION_CHUNKS && (k - 1) * (k - 1) >= 2 * n {
        k -= 1;
    }
    k.min(MAX_SECTION_CHUNKS as usize)
}
/// The fewest records for which [`Metadata::encode`] writes sections.
pub const SECTIONED_MIN_RECORDS: usize = 1 << 16;
/// The most chunks a section may claim.
pub const MAX_SECTION_CHUNKS: u32 = 1 << 20;
/// Sections closer than this in the file are read in one request.
pub const COALESCE_GAP: u64 = 64 << 10;

/// One section of a tensor's chunk records, as the index lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The smallest box holding every chunk of the section.
    pub region: ChunkBox,
    /// Number of chunk records.
    pub count: u32,
    /// Offset of the section after the index.
    pub offset: u64,
    /// Encoded length.
    pub length: u64,
    /// CRC-32C of the encoded section.
    pub crc: u32,
}

/// An item as the index holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexItem {
    /// A tensor: chunks kept in the index, then chunks in sections.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Global shape.
        shape: Vec<u64>,
        /// Chunks kept in the index (an item of one chunk).
        chunks: Vec<ChunkMeta>,
        /// Sections holding the other chunks, in chunk order.
        sections: Vec<Section>,
    },
    /// A bytes item.
    Bytes {
        /// Logical length.
        length: u64,
        /// Where its bytes are.
        storage: StorageInfo,
    },
}

/// The index as encoded.
#[derive(Deserialize)]
struct IndexBody {
    save_id: String,
    world_size: u32,
    format: FormatKind,
    files: Vec<DataFile>,
    transforms: Vec<String>,
    items: Vec<(String, IndexItem)>,
    user: BTreeMap<String, String>,
    generation: u64,
    sections_len: u64,
}

/// [`IndexBody`] borrowed from a [`Metadata`], for encoding.
#[derive(Serialize)]
struct IndexBodyRef<'a> {
    save_id: &'a str,
    world_size: u32,
    format: &'a FormatKind,
    files: &'a [DataFile],
    transforms: &'a [String],
    items: Vec<(&'a str, IndexItemRef<'a>)>,
    user: &'a BTreeMap<String, String>,
    generation: u64,
    sections_len: u64,
}

/// [`IndexItem`] borrowed (the same variants in the same order).
#[derive(Serialize)]
enum IndexItemRef<'a> {
    Tensor {
        dtype: DType,
        shape: &'a [u64],
        chunks: &'a [ChunkMeta],
        sections: Vec<Section>,
    },
    Bytes {
        length: u64,
        storage: &'a StorageInfo,
    },
}

/// True when [`Metadata::encode`] writes `md` in sections.
pub(super) fn should_section(md: &Metadata) -> bool {
    md.record_count() >= SECTIONED_MIN_RECORDS
        && md
            .items
            .iter()
            .any(|(_, i)| matches!(i, ItemMeta::Tensor { chunks, .. } if chunks.len() > 1))
}

/// Encode `md` (validated by the caller) in sections of at most
/// `per_section` chunks; `None`: [`section_chunks`] of each tensor's count.
pub(super) fn encode_sectioned(md: &Metadata, per_section: Option<usize>) -> Result<Vec<u8>> {
    let (sections, area) = layout(md, per_section)?;
    assemble(md, sections, &area)
}

/// Each item's sections (in chunk order) and the bytes of all sections.
type Layout = (Vec<Vec<Section>>, Vec<u8>);

/// The [`Layout`] of `md`'s sections, part-major, encoded on as many
/// threads as the machine has cores (at most 8, one per
/// [`PARALLEL_RECORDS`] chunk records).
fn layout(md: &Metadata, per_section: Option<usize>) -> Result<Layout> {
    let records: usize = md
        .items
        .iter()
        .map(|(_, i)| match i {
            ItemMeta::Tensor { chunks, .. } => chunks.len(),
            ItemMeta::Bytes { .. } => 0,
        })
        .sum();
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(8)
        .min(records / PARALLEL_RECORDS)
        .max(1);
    layout_on(md, per_section, threads)
}

/// [`layout`] on `threads` threads (at most one per part index).
fn layout_on(md: &Metadata, per_section: Option<usize>, threads: usize) -> Result<Layout> {
    let enc = |e: postcard::Error| Error::invalid(format!("encode metadata: {e}"));
    // Per item: chunks per section, and sections (0 for an inline tensor).
    let shape: Vec<(usize, usize)> = md
        .items
        .iter()
        .map(|(_, i)| match i {
            ItemMeta::Tensor { chunks, .. } if chunks.len() > 1 => {
                let k = per_section
                    .unwrap_or_else(|| section_chunks(chunks.len()))
                    .clamp(1, MAX_SECTION_CHUNKS as usize);
                (k, chunks.len().div_ceil(k))
            }
            _ => (1, 0),
        })
        .collect();
    let most = shape.iter().map(|s| s.1).max().unwrap_or(0);
    // Part-major: the j-th section of every item, then the next j. Ranges
    // of j are encoded on separate threads (each into its own bytes, its
    // sections' offsets relative to them), then joined in order.
    let encode_parts = |js: std::ops::Range<usize>| -> Result<Layout> {
        let mut sections: Vec<Vec<Section>> = shape.iter().map(|_| Vec::new()).collect();
        let mut area: Vec<u8> = Vec::new();
        for j in js {
            for (i, (_, item)) in md.items.iter().enumerate() {
                let ItemMeta::Tensor { chunks, .. } = item else {
                    continue;
                };
                let (k, n) = shape[i];
                if j >= n {
                    continue;
                }
                let part = &chunks[j * k..((j + 1) * k).min(chunks.len())];
                let start = area.len();
                for c in part {
                    area = postcard::to_extend(c, area).map_err(enc)?;
                }
                sections[i].push(Section {
                    region: bounding_box(part.iter().map(|c| &c.region)),
                    count: part.len() as u32,
                    offset: start as u64,
                    length: (area.len() - start) as u64,
                    crc: crc32c::crc32c(&area[start..]),
                });
            }
        }
        Ok((sections, area))
    };
    let threads = threads.clamp(1, most.max(1));
    let per = most.div_ceil(threads).max(1);
    let pieces: Vec<Result<Layout>> = if threads == 1 {
        vec![encode_parts(0..most)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let js = (t * per).min(most)..((t + 1) * per).min(most);
                    s.spawn(move || encode_parts(js))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::invalid("encoding metadata sections panicked"))
                    })
                })
                .collect()
        })
    };
    let mut sections: Vec<Vec<Section>> = shape.iter().map(|s| Vec::with_capacity(s.1)).collect();
    let mut area: Vec<u8> = Vec::new();
    for piece in pieces {
        let (secs, bytes) = piece?;
        let base = area.len() as u64;
        if area.is_empty() {
            area = bytes;
        } else {
            area.extend_from_slice(&bytes);
        }
        for (all, mine) in sections.iter_mut().zip(secs) {
            all.extend(mine.into_iter().map(|mut x| {
                x.offset += base;
                x
            }));
        }
    }
    Ok((sections, area))
}

/// Chunk records above which sections are encoded on more than one thread
/// (one more thread per this many).
const PARALLEL_RECORDS: usize = 1 << 20;

/// The file of `md` whose tensors' sections are `sections` (per item, in
/// chunk order; none for a tensor kept in the index) over `area`.
fn assemble(md: &Metadata, sections: Vec<Vec<Section>>, area: &[u8]) -> Result<Vec<u8>> {
    let enc = |e: postcard::Error| Error::invalid(format!("encode metadata: {e}"));
    let items = md
        .items
        .iter()
        .zip(sections)
        .map(|((name, item), sections)| {
            let r = match item {
                ItemMeta::Tensor {
                    dtype,
                    shape,
                    chunks,
                } => IndexItemRef::Tensor {
                    dtype: *dtype,
                    shape,
                    chunks: if sections.is_empty() { chunks } else { &[] },
                    sections,
                },
                ItemMeta::Bytes { length, storage } => IndexItemRef::Bytes {
                    length: *length,
                    storage,
                },
            };
            (name.as_str(), r)
        })
        .collect();
    let body = IndexBodyRef {
        save_id: &md.save_id,
        world_size: md.world_size,
        format: &md.format,
        files: &md.files,
        transforms: &md.transforms,
        items,
        user: &md.user,
        generation: md.generation,
        sections_len: area.len() as u64,
    };
    let index = postcard::to_allocvec(&body).map_err(enc)?;
    let mut out = Vec::with_capacity(HEADER_LEN + index.len() + area.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SECTIONED_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(index.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&index).to_le_bytes());
    out.extend_from_slice(&index);
    out.extend_from_slice(area);
    Ok(out)
}

/// The smallest box holding every box of `boxes` (all of one rank).
fn bounding_box<'a>(mut boxes: impl Iterator<Item = &'a ChunkBox>) -> ChunkBox {
    let Some(first) = boxes.next() else {
        return ChunkBox {
            offsets: crate::model::Dims::new(),
            sizes: crate::model::Dims::new(),
        };
    };
    let mut lo = first.offsets.clone();
    let mut hi: Vec<u64> = first
        .offsets
        .iter()
        .zip(&first.sizes)
        .map(|(o, s)| o + s)
        .collect();
    for b in boxes {
        for d in 0..lo.len() {
            lo[d] = lo[d].min(b.offsets[d]);
            hi[d] = hi[d].max(b.offsets[d] + b.sizes[d]);
        }
    }
    let sizes = hi.iter().zip(&lo).map(|(h, l)| h - l).collect();
    ChunkBox { offsets: lo, sizes }
}

/// The length of the header and index of sectioned metadata, read from the
/// first bytes of a `.metadata` (at least its header): `Some(length)` for
/// version 3, `None` for a one-body version (1 or 2). Refuses what
/// [`Metadata::decode`] refuses in a header, and an index longer than
/// [`MAX_METADATA_LEN`].
pub fn index_len(head: &[u8]) -> Result<Option<u64>> {
    let h = parse_header(head)?;
    if h.version != SECTIONED_FORMAT_VERSION {
        return Ok(None);
    }
    if h.body_len > MAX_METADATA_LEN {
        return Err(Error::corrupt(format!(
            ".metadata index is {} bytes, more than the limit of {MAX_METADATA_LEN}",
            h.body_len
        )));
    }
    Ok(Some(HEADER_LEN as u64 + h.body_len))
}

/// The decoded index of sectioned metadata: every item, and where the
/// chunk records of each tensor's sections are. A loading rank decodes it,
/// asks [`MetadataIndex::sections_for`] which sections its destination
/// overlaps, reads those byte ranges ([`MetadataIndex::ranges`]) and builds
/// the [`Metadata`] it plans against ([`MetadataIndex::select`]).
#[derive(Clone, Debug)]
pub struct MetadataIndex {
    /// Everything but the items.
    shell: Metadata,
    items: Vec<(String, IndexItem)>,
    /// Bytes of header and index: where the sections start in the file.
    sections_start: u64,
    sections_len: u64,
    /// The index's CRC-32C (tells one save's index from another's).
    crc: u32,
    /// Per item, the global number of its first section.
    first_section: Vec<u32>,
    /// Per global section: its item.
    section_item: Vec<u32>,
}

/// What [`MetadataIndex::select`] builds: the metadata of the chosen
/// sections, and the number each of its chunks has in the whole checkpoint.
#[derive(Clone, Debug)]
pub struct Selected {
    /// Every item of the checkpoint, each tensor with the chunks kept in
    /// the index and those of the chosen sections, in chunk order.
    pub metadata: Metadata,
    /// For each item of `metadata`, the number each of its chunks has among
    /// all the item's chunks in the checkpoint.
    pub chunk_numbers: Vec<Vec<u32>>,
}

impl MetadataIndex {
    /// Decode the index from `prefix`, the first bytes of a version-3
    /// `.metadata` (at least its header and index; more is ignored).
    /// Refuses another version, a short prefix, a CRC that does not match,
    /// an index that does not decode or has trailing bytes, and a section
    /// that claims no chunks or more than [`MAX_SECTION_CHUNKS`], lies past
    /// the sections' end, or whose box lies outside its tensor.
    pub fn decode(prefix: &[u8]) -> Result<MetadataIndex> {
        let h = parse_header(prefix)?;
        if h.version != SECTIONED_FORMAT_VERSION {
            return Err(Error::invalid(format!(
                ".metadata has format version {}, not the sectioned version {SECTIONED_FORMAT_VERSION}",
                h.version
            )));
        }
        let end = index_len(prefix)?.expect("version 3");
        if (prefix.len() as u64) < end {
            return Err(Error::corrupt(format!(
                ".metadata index is {} bytes but only {} are present (truncated)",
                h.body_len,
                (prefix.len() as u64).saturating_sub(HEADER_LEN as u64)
            )));
        }
        let index = &prefix[HEADER_LEN..end as usize];
        let actual = crc32c::crc32c(index);
        if actual != h.crc {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    ".metadata index CRC-32C is {actual:#010x}, header says {:#010x}",
                    h.crc
                ),
            ));
        }
        let (body, rest): (IndexBody, &[u8]) = postcard::take_from_bytes(index)
            .map_err(|e| Error::corrupt(format!(".metadata index does not decode: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::corrupt(format!(
                ".metadata index has {} trailing bytes",
                rest.len()
            )));
        }
        if body.sections_len > MAX_METADATA_LEN {
            return Err(Error::corrupt(format!(
                ".metadata sections are {} bytes, more than the limit of {MAX_METADATA_LEN}",
                body.sections_len
            )));
        }
        let mut first_section = Vec::with_capacity(body.items.len());
        let mut section_item = Vec::new();
        for (i, (name, item)) in body.items.iter().enumerate() {
            first_section.push(section_item.len() as u32);
            let IndexItem::Tensor {
                shape,
                sections,
                chunks,
                ..
            } = item
            else {
                continue;
            };
            let bad = |m: String| Err(Error::corrupt(format!("invalid metadata: {name}: {m}")));
            if shape.len() > MAX_NDIM {
                return bad(format!("{} dimensions (at most {MAX_NDIM})", shape.len()));
            }
            let mut total = chunks.len() as u64;
            for (k, s) in sections.iter().enumerate() {
                if s.count == 0 || s.count > MAX_SECTION_CHUNKS {
                    return bad(format!(
                        "section {k} claims {} chunks (1 to {MAX_SECTION_CHUNKS})",
                        s.count
                    ));
                }
                if s.length < s.count as u64 {
                    return bad(format!(
                        "section {k} is {} bytes, too short for {} chunks",
                        s.length, s.count
                    ));
                }
                if s.offset
                    .checked_add(s.length)
                    .is_none_or(|e| e > body.sections_len)
                {
                    return bad(format!(
                        "section {k} at offset {} length {} lies past the end of the sections ({} bytes)",
                        s.offset, s.length, body.sections_len
                    ));
                }
                s.region.check_within(shape).map_err(|e| {
                    Error::corrupt(format!(
                        "invalid metadata: {name}: section {k}: {}",
                        e.message()
                    ))
                })?;
                total += s.count as u64;
                section_item.push(i as u32);
            }
            if total > u32::MAX as u64 {
                return bad(format!("{total} chunks (at most {})", u32::MAX));
            }
            if section_item.len() > u32::MAX as usize {
                return bad("too many sections".into());
            }
        }
        let shell = Metadata {
            save_id: body.save_id,
            world_size: body.world_size,
            format: body.format,
            files: body.files,
            transforms: body.transforms,
            items: Vec::new(),
            user: body.user,
            generation: body.generation,
        };
        shell.validate()?;
        Ok(MetadataIndex {
            shell,
            items: body.items,
            sections_start: end,
            sections_len: body.sections_len,
            crc: h.crc,
            first_section,
            section_item,
        })
    }

    /// The checkpoint's metadata without its items: save id, world size,
    /// format, files, transforms, user metadata, generation.
    pub fn shell(&self) -> Metadata {
        self.shell.clone()
    }

    /// The save that wrote the checkpoint.
    pub fn save_id(&self) -> &str {
        &self.shell.save_id
    }

    /// The index's CRC-32C, as the header gives it: another save's index
    /// (almost surely) has another.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// Bytes of the header and the index.
    pub fn index_bytes(&self) -> u64 {
        self.sections_start
    }

    /// Bytes of the whole `.metadata`.
    pub fn file_len(&self) -> u64 {
        self.sections_start + self.sections_len
    }

    /// The number of sections.
    pub fn section_count(&self) -> usize {
        self.section_item.len()
    }

    fn section(&self, id: u32) -> &Section {
        let item = self.section_item[id as usize] as usize;
        let IndexItem::Tensor { sections, .. } = &self.items[item].1 else {
            unreachable!("sections belong to tensors")
        };
        &sections[(id - self.first_section[item]) as usize]
    }

    /// The sections (global numbers, ascending) whose box overlaps a chunk
    /// of a tensor `dest` asks for. Items `dest` names that the checkpoint
    /// lacks, or of another kind, are left to the planner to refuse.
    pub fn sections_for(&self, dest: &DestStateDict) -> Vec<u32> {
        let mut out = Vec::new();
        for (name, want) in dest.iter() {
            let DestItem::Tensor(t) = want else { continue };
            let Ok(i) = self
                .items
                .binary_search_by(|(n, _)| n.as_str().cmp(name.as_str()))
            else {
                continue;
            };
            let IndexItem::Tensor { sections, .. } = &self.items[i].1 else {
                continue;
            };
            for (k, s) in sections.iter().enumerate() {
                if t.chunks.iter().any(|c| c.region.overlaps(&s.region)) {
                    out.push(self.first_section[i] + k as u32);
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// Every section's number.
    pub fn all_sections(&self) -> Vec<u32> {
        (0..self.section_item.len() as u32).collect()
    }

    /// The section (global number) holding chunk `chunk` (its number among
    /// all the item's chunks) of item `item`; `None` for a chunk kept in
    /// the index or a number out of range.
    pub fn section_of(&self, item: usize, chunk: u32) -> Option<u32> {
        let IndexItem::Tensor {
            chunks, sections, ..
        } = &self.items.get(item)?.1
        else {
            return None;
        };
        let mut at = chunks.len() as u64;
        if (chunk as u64) < at {
            return None;
        }
        for (k, s) in sections.iter().enumerate() {
            at += s.count as u64;
            if (chunk as u64) < at {
                return Some(self.first_section[item] + k as u32);
            }
        }
        None
    }

    /// The byte ranges `(offset, length)` of `.metadata` that hold
    /// `sections`: sorted by offset, neighbours closer than
    /// [`COALESCE_GAP`] merged into one range.
    pub fn ranges(&self, sections: &[u32]) -> Vec<(u64, u64)> {
        let mut spans: Vec<(u64, u64)> = sections
            .iter()
            .filter(|&&id| (id as usize) < self.section_item.len())
            .map(|&id| {
                let s = self.section(id);
                (self.sections_start + s.offset, s.length)
            })
            .collect();
        spans.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (o, l) in spans {
            if let Some(last) = out.last_mut() {
                let end = last.0 + last.1;
                if o <= end.saturating_add(COALESCE_GAP) {
                    last.1 = last.1.max(o + l - last.0);
                    continue;
                }
            }
            out.push((o, l));
        }
        out
    }

    /// Build the metadata of `sections` (sorted, as
    /// [`MetadataIndex::sections_for`] returns them) from `fetched`, the
    /// bytes of `.metadata` read at each range's offset (the ranges of
    /// [`MetadataIndex::ranges`], or any that cover the sections). Every
    /// item of the checkpoint is in the result; each tensor holds its chunks
    /// kept in the index and those of the chosen sections. Refuses a
    /// section not covered by `fetched` (truncated), whose CRC-32C differs
    /// from the index's (kind `ChecksumMismatch`), that does not decode into
    /// exactly its count of chunks, or with a chunk outside its box; then
    /// validates the result ([`Metadata::validate`]).
    pub fn select(&self, sections: &[u32], fetched: &[(u64, &[u8])]) -> Result<Selected> {
        let mut chosen: Vec<Vec<(u32, Vec<ChunkMeta>)>> = vec![Vec::new(); self.items.len()];
        if sections.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid("sections not sorted or repeated"));
        }
        if let Some(&id) = sections
            .last()
            .filter(|&&id| id as usize >= self.section_item.len())
        {
            return Err(Error::invalid(format!(
                "section {id} does not exist ({} sections)",
                self.section_item.len()
            )));
        }
        for &id in sections {
            let item = self.section_item[id as usize] as usize;
            let name = &self.items[item].0;
            let k = id - self.first_section[item];
            let s = self.section(id);
            let at = self.sections_start + s.offset;
            let bytes = fetched
                .iter()
                .find_map(|&(o, b)| {
                    let from = at.checked_sub(o)?;
                    let to = from.checked_add(s.length)?;
                    (to <= b.len() as u64).then(|| &b[from as usize..to as usize])
                })
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        ".metadata: {name}: section {k} (bytes {at} to {}) was not read in full (truncated?)",
                        at + s.length
                    ))
                })?;
            let actual = crc32c::crc32c(bytes);
            if actual != s.crc {
                return Err(Error::new(
                    ErrorKind::ChecksumMismatch,
                    format!(
                        ".metadata: {name}: section {k} CRC-32C is {actual:#010x}, the index says {:#010x}",
                        s.crc
                    ),
                ));
            }
            let mut rest = bytes;
            // A chunk record is at least 6 bytes: no capacity beyond the input.
            let mut chunks = Vec::with_capacity((s.count as usize).min(bytes.len() / 6));
            for _ in 0..s.count {
                let (c, r): (ChunkMeta, &[u8]) = postcard::take_from_bytes(rest).map_err(|e| {
                    Error::corrupt(format!(
                        ".metadata: {name}: section {k} does not decode: {e}"
                    ))
                })?;
                if !s.region.contains(&c.region) {
                    return Err(Error::corrupt(format!(
                        "invalid metadata: {name}: section {k}: chunk ({}) lies outside the section's box ({})",
                        c.region, s.region
                    )));
                }
                chunks.push(c);
                rest = r;
            }
            if !rest.is_empty() {
                return Err(Error::corrupt(format!(
                    ".metadata: {name}: section {k} has {} trailing bytes",
                    rest.len()
                )));
            }
            chosen[item].push((k, chunks));
        }
        let mut items = Vec::with_capacity(self.items.len());
        let mut chunk_numbers = Vec::with_capacity(self.items.len());
        for ((name, item), picked) in self.items.iter().zip(chosen) {
            match item {
                IndexItem::Bytes { length, storage } => {
                    items.push((
                        name.clone(),
                        ItemMeta::Bytes {
                            length: *length,
                            storage: storage.clone(),
                        },
                    ));
                    chunk_numbers.push(Vec::new());
                }
                IndexItem::Tensor {
                    dtype,
                    shape,
                    chunks: inline,
                    sections,
                } => {
                    // Where each section's chunks start among the item's.
                    let mut starts = Vec::with_capacity(sections.len());
                    let mut at = inline.len() as u32;
                    for s in sections {
                        starts.push(at);
                        at += s.count;
                    }
                    let mut chunks = inline.clone();
                    let mut numbers: Vec<u32> = (0..inline.len() as u32).collect();
                    for (k, cs) in picked {
                        let start = starts[k as usize];
                        numbers.extend(start..start + cs.len() as u32);
                        chunks.extend(cs);
                    }
                    items.push((
                        name.clone(),
                        ItemMeta::Tensor {
                            dtype: *dtype,
                            shape: Dims::from_slice(shape),
                            chunks,
                        },
                    ));
                    chunk_numbers.push(numbers);
                }
            }
        }
        let metadata = Metadata {
            items,
            ..self.shell.clone()
        };
        metadata.validate()?;
        Ok(Selected {
            metadata,
            chunk_numbers,
        })
    }
}

/// Decode the whole of a version-3 `.metadata`: the index and every section.
pub(super) fn decode_full(bytes: &[u8]) -> Result<Metadata> {
    let idx = MetadataIndex::decode(bytes)?;
    if bytes.len() as u64 != idx.file_len() {
        return Err(Error::corrupt(format!(
            ".metadata is {} bytes but its index says {} (truncated or extended)",
            bytes.len(),
            idx.file_len()
        )));
    }
    let all = idx.all_sections();
    let sel = idx.select(&all, &[(0, bytes)])?;
    Ok(sel.metadata)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{DefaultLoadPlanner, LoadPlanner};

    fn st(offset: u64, length: u64) -> StorageInfo {
        StorageInfo {
            file: 0,
            offset,
            length,
            transforms: Default::default(),
        }
    }

    /// Tensors `names`, each of shape [rows, 4] u8 saved one row a chunk,
    /// a bytes item `a` and a one-chunk tensor `b`; records 64 bytes apart.
    fn md_of(names: &[&str], rows: u64) -> Metadata {
        let mut at = 0u64;
        let mut items = vec![
            (
                "a".to_string(),
                ItemMeta::Bytes {
                    length: 5,
                    storage: st(0, 5),
                },
            ),
            (
                "b".to_string(),
                ItemMeta::Tensor {
                    dtype: DType::U8,
                    shape: vec![3].into(),
                    chunks: vec![ChunkMeta {
                        region: ChunkBox::full(&[3]),
                        storage: st(64, 3),
                    }],
                },
            ),
        ];
        at += 128;
        for n in names {
            let chunks = (0..rows)
                .map(|r| {
                    at += 64;
                    ChunkMeta {
                        region: ChunkBox::new(vec![r, 0], vec![1, 4]).unwrap(),
                        storage: st(at - 64, 4),
                    }
                })
                .collect();
            items.push((
                n.to_string(),
                ItemMeta::Tensor {
                    dtype: DType::U8,
                    shape: vec![rows, 4].into(),
                    chunks,
                },
            ));
        }
        Metadata {
            save_id: "00112233aabbccdd".into(),
            world_size: 4,
            format: FormatKind::Raw,
            files: vec![DataFile {
                name: "__0_0-00112233aabbccdd.dcp".into(),
                length: at,
            }],
            transforms: Default::default(),
            items,
            user: BTreeMap::from([("step".into(), "7".into())]),
            generation: 3,
        }
    }

    fn version(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[8..12].try_into().unwrap())
    }

    fn want_rows(names: &[&str], rows: u64, from: u64, n: u64) -> DestStateDict {
        let mut d = DestStateDict::new();
        for name in names {
            d.want_tensor(
                *name,
                DType::U8,
                vec![rows, 4],
                vec![ChunkBox::new(vec![from, 0], vec![n, 4]).unwrap()],
            )
            .unwrap();
        }
        d.want_bytes("a").unwrap();
        d
    }

    /// `md` encoded in sections of `per`, with `f` applied to the sections
    /// and their bytes first (the index's CRC stays right).
    fn tampered(
        md: &Metadata,
        per: usize,
        f: impl FnOnce(&mut Vec<Vec<Section>>, &mut Vec<u8>),
    ) -> Vec<u8> {
        let (mut sections, mut area) = layout(md, Some(per)).unwrap();
        f(&mut sections, &mut area);
        assemble(md, sections, &area).unwrap()
    }

    fn prefix(b: &[u8]) -> &[u8] {
        &b[..index_len(b).unwrap().unwrap() as usize]
    }

    #[test]
    fn sectioned_round_trip_and_small_stays_one_body() {
        let md = md_of(&["w"], 40);
        let enc = md.encode_sectioned(4).unwrap();
        assert_eq!(version(&enc), SECTIONED_FORMAT_VERSION);
        assert_eq!(Metadata::decode(&enc).unwrap(), md);
        let idx = MetadataIndex::decode(prefix(&enc)).unwrap();
        assert_eq!(idx.section_count(), 10);
        assert_eq!(idx.file_len(), enc.len() as u64);
        // Below the threshold, encode() writes one body, as before.
        let one = md.encode().unwrap();
        assert_eq!(version(&one), 2);
        assert_eq!(one, md.encode_one_body().unwrap());
        assert_eq!(Metadata::decode(&one).unwrap(), md);
    }

    #[test]
    fn large_sharded_metadata_is_written_in_sections() {
        let rows = SECTIONED_MIN_RECORDS as u64;
        let md = md_of(&["w"], rows);
        let enc = md.encode().unwrap();
        assert_eq!(version(&enc), SECTIONED_FORMAT_VERSION);
        assert_eq!(Metadata::decode(&enc).unwrap(), md);
        // One row of the tensor: the index and one section.
        let dest = want_rows(&["w"], rows, 1000, 1);
        let (got, bytes) = crate::checkpoint::simulate::receive_metadata(&enc, &dest).unwrap();
        assert!(bytes * 20 < enc.len() as u64, "{bytes} of {}", enc.len());
        let ItemMeta::Tensor { chunks, .. } = got.item("w").unwrap() else {
            panic!()
        };
        assert_eq!(chunks.len(), section_chunks(rows as usize));
    }

    /// Sections encoded on several threads are the bytes and offsets one
    /// thread writes, for tensors of different section counts.
    #[test]
    fn sections_encoded_on_several_threads_are_those_of_one() {
        let mut md = md_of(&["w", "x", "y"], 300);
        // One tensor with fewer parts than the others.
        if let ItemMeta::Tensor { chunks, .. } = &mut md.items[3].1 {
            chunks.truncate(40);
        }
        let one = layout_on(&md, Some(7), 1).unwrap();
        for threads in [2, 3, 8, 100] {
            let many = layout_on(&md, Some(7), threads).unwrap();
            assert_eq!(one.1, many.1, "{threads} threads");
            assert_eq!(one.0, many.0, "{threads} threads");
        }
        assert_eq!(one.0.iter().map(Vec::len).sum::<usize>(), 43 * 2 + 6);
    }

    /// Plans against the selected sections read the same saved chunks
    /// (numbered as in the whole checkpoint) as plans against everything.
    #[test]
    fn a_rank_reads_only_the_sections_it_overlaps_and_plans_the_same() {
        let names = ["w1", "w2"];
        let md = md_of(&names, 40);
        let enc = md.encode_sectioned(4).unwrap();
        let idx = MetadataIndex::decode(prefix(&enc)).unwrap();
        for (from, n) in [(0, 1), (9, 1), (7, 6), (36, 4), (0, 40)] {
            let dest = want_rows(&names, 40, from, n);
            let ids = idx.sections_for(&dest);
            let per_item = (from + n).div_ceil(4) - from / 4;
            assert_eq!(ids.len() as u64, 2 * per_item, "rows {from}+{n}");
            let ranges = idx.ranges(&ids);
            // Part-major: the same rows of both tensors lie together.
            assert_eq!(ranges.len(), 1, "rows {from}+{n}: {ranges:?}");
            let bufs: Vec<Vec<u8>> = ranges
                .iter()
                .map(|&(o, l)| enc[o as usize..(o + l) as usize].to_vec())
                .collect();
            let fetched: Vec<(u64, &[u8])> = ranges
                .iter()
                .zip(&bufs)
                .map(|(&(o, _), b)| (o, b.as_slice()))
                .collect();
            let sel = idx.select(&ids, &fetched).unwrap();
            assert_eq!(sel.metadata.items.len(), md.items.len());
            let planner = DefaultLoadPlanner::default();
            let part = planner.plan(&sel.metadata, &dest).unwrap();
            let full = planner.plan(&md, &dest).unwrap();
            let key = |r: &crate::plan::ReadItem, n: Option<&Vec<Vec<u32>>>| {
                let c = n.map_or(r.saved_chunk as u32, |n| n[r.md_item][r.saved_chunk]);
                (r.dest_item, r.dest_chunk, r.md_item, c, r.overlap.clone())
            };
            let mut a: Vec<_> = part
                .tensor_reads
                .iter()
                .map(|r| key(r, Some(&sel.chunk_numbers)))
                .collect();
            let mut b: Vec<_> = full.tensor_reads.iter().map(|r| key(r, None)).collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "rows {from}+{n}");
            assert_eq!(part.bytes_reads, full.bytes_reads);
            // The chunks kept are exactly those of the chosen sections.
            let ItemMeta::Tensor { chunks, .. } = sel.metadata.item("w2").unwrap() else {
                panic!()
            };
            assert_eq!(chunks.len() as u64, 4 * per_item);
        }
    }

    #[test]
    fn sections_grow_as_the_square_root() {
        for (n, k) in [
            (2, 16),
            (128, 16),
            (200, 20),
            (256, 23),
            (16384, 182),
            (1 << 20, 1449),
        ] {
            assert_eq!(section_chunks(n), k, "{n}");
            assert!(k * k >= 2 * n || k == MIN_SECTION_CHUNKS);
        }
    }

    #[test]
    fn section_of_maps_chunk_numbers_back() {
        let md = md_of(&["w1", "w2"], 10);
        let enc = md.encode_sectioned(4).unwrap();
        let idx = MetadataIndex::decode(prefix(&enc)).unwrap();
        // Items: a (bytes), b (inline), w1 (sections 0..3), w2 (3..6).
        assert_eq!(idx.section_of(1, 0), None);
        assert_eq!(idx.section_of(2, 0), Some(0));
        assert_eq!(idx.section_of(2, 9), Some(2));
        assert_eq!(idx.section_of(3, 4), Some(4));
        assert_eq!(idx.section_of(3, 10), None);
        assert_eq!(idx.section_of(9, 0), None);
    }

    /// A seed written by an earlier build (format version 1) still decodes.
    #[test]
    fn metadata_of_an_older_format_still_decodes() {
        let old = include_bytes!(
            "../../../../fuzz/regressions/metadata_decode/seed-valid-3-ranks-crc32c"
        );
        assert_eq!(version(old), 1);
        let md = Metadata::decode(old).unwrap();
        let again = md.encode().unwrap();
        assert_eq!(version(&again), 2);
        assert_eq!(Metadata::decode(&again).unwrap(), md);
    }

    #[test]
    fn hostile_indexes_are_refused_by_name() {
        let md = md_of(&["w"], 12);
        let good = md.encode_sectioned(4).unwrap();
        let msg = |b: &[u8]| {
            let e = Metadata::decode(b).unwrap_err();
            (e.kind(), e.message().to_string())
        };
        // Truncated anywhere: the index, or the sections.
        let p = prefix(&good).len();
        let e = MetadataIndex::decode(&good[..p - 1]).unwrap_err();
        assert!(e.message().contains("truncated"), "{e}");
        let (k, m) = msg(&good[..good.len() - 1]);
        assert!(k == ErrorKind::Corrupt && m.contains("truncated"), "{m}");
        let mut ext = good.clone();
        ext.push(0);
        assert!(msg(&ext).1.contains("extended"));
        // The index's CRC.
        let mut v = good.clone();
        v[HEADER_LEN + 3] ^= 1;
        assert_eq!(msg(&v).0, ErrorKind::ChecksumMismatch);
        // An index claiming more than the limit.
        let mut v = good.clone();
        v[16..24].copy_from_slice(&(MAX_METADATA_LEN + 1).to_le_bytes());
        let (k, m) = msg(&v);
        assert!(k == ErrorKind::Corrupt && m.contains("limit"), "{m}");
        // A section's bytes.
        let mut v = good.clone();
        *v.last_mut().unwrap() ^= 1;
        let (k, m) = msg(&v);
        assert!(
            k == ErrorKind::ChecksumMismatch && m.contains("section 2"),
            "{m}"
        );

        const W: usize = 2; // the item index of "w"
        type Edit = Box<dyn FnOnce(&mut Vec<Vec<Section>>, &mut Vec<u8>)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "past the end",
                Box::new(|s, _| s[W][1].offset = u64::MAX - 1),
            ),
            (
                "past the end",
                Box::new(|s, a| s[W][1].offset = a.len() as u64),
            ),
            ("claims 0 chunks", Box::new(|s, _| s[W][0].count = 0)),
            (
                "claims 4294967295 chunks",
                Box::new(|s, _| s[W][0].count = u32::MAX),
            ),
            ("too short", Box::new(|s, _| s[W][0].length = 1)),
            (
                "outside the section's box",
                Box::new(|s, _| s[W][0].region = ChunkBox::new(vec![0, 0], vec![3, 4]).unwrap()),
            ),
            (
                "extends past shape",
                Box::new(|s, _| s[W][0].region = ChunkBox::new(vec![0, 0], vec![99, 4]).unwrap()),
            ),
            ("trailing bytes", Box::new(|s, _| s[W][0].count = 3)),
            ("does not decode", Box::new(|s, _| s[W][2].count = 5)),
            (
                "overlap",
                Box::new(|s, a| {
                    // The second section's bytes say what the first's say.
                    let first = a[..s[W][0].length as usize].to_vec();
                    let at = s[W][1].offset as usize;
                    a[at..at + first.len()].copy_from_slice(&first);
                    s[W][1].crc = crc32c::crc32c(&first);
                    s[W][1].region = s[W][0].region.clone();
                }),
            ),
        ];
        for (want, f) in cases {
            let v = tampered(&md, 4, f);
            let (k, m) = msg(&v);
            assert_eq!(k, ErrorKind::Corrupt, "{want}: {m}");
            assert!(m.contains(want), "{want}: {m}");
        }
        // A section not read at all.
        let idx = MetadataIndex::decode(prefix(&good)).unwrap();
        let e = idx.select(&[1], &[]).unwrap_err();
        assert!(e.message().contains("not read in full"), "{e}");
        assert!(idx
            .select(&[7], &[])
            .unwrap_err()
            .message()
            .contains("does not exist"));
        assert!(idx
            .select(&[1, 1], &[])
            .unwrap_err()
            .message()
            .contains("repeated"));
    }
}
