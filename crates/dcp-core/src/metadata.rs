//! The `.metadata` file: what a checkpoint holds and where every byte is.
//!
//! Layout: a 28-byte header (magic `DCPMETA\0`, format version u32 LE, flags
//! u32 LE, body length u64 LE, CRC-32C of the body u32 LE) and a postcard
//! body. Files and transform descriptors are tables referenced by index, and
//! integers are varints, so a chunk costs about 13 to 30 bytes. Large
//! sharded checkpoints are written in sections instead (version 3, same
//! header, see [`sections`]): an index and per-tensor sections of chunk
//! records, so that a loading rank reads only what its destination needs.
//!
//! Decoding never executes code, bounds every length before allocating, and
//! validates the result ([`Metadata::validate`]) before anyone uses it: every
//! file name is plain, every record lies inside its file, every chunk inside
//! its tensor, and the chunks of a tensor do not overlap.

use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{ChunkBox, Dims};
use crate::storage::check_file_name;
use crate::transform::{Descriptor, TransformKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod items;
pub mod sections;

/// Magic bytes that open a `.metadata` file.
pub const MAGIC: [u8; 8] = *b"DCPMETA\0";
/// The one-body metadata format version this build writes (every checkpoint
/// but large sharded ones, which are written as version 3,
/// [`sections::SECTIONED_FORMAT_VERSION`]). Version 2 added
/// [`Metadata::generation`]; this build also reads version 1 (as generation 0).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest metadata format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The newest metadata format version this build reads.
pub const NEWEST_FORMAT_VERSION: u32 = sections::SECTIONED_FORMAT_VERSION;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 28;
/// The largest `.metadata` this build accepts (4 GiB).
pub const MAX_METADATA_LEN: u64 = 4 << 30;
/// The most dimensions a tensor may have.
pub const MAX_NDIM: usize = 64;

/// The name of the [`SerializationFormat`](crate::format::SerializationFormat)
/// that laid out a checkpoint's data files, as the metadata records it.
/// dcp's own formats are variants; any other is [`FormatKind::Named`]
/// (encoded after them, so metadata written before it existed decodes
/// unchanged).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum FormatKind {
    /// [`Raw`](crate::format::Raw): records back to back, each aligned to 64 bytes.
    #[default]
    Raw,
    /// [`Safetensors`](crate::format::Safetensors): every data file is a
    /// valid safetensors file.
    Safetensors,
    /// Another format, by its [`SerializationFormat::name`](crate::format::SerializationFormat::name).
    Named(String),
}

impl FormatKind {
    /// The format's name (`raw`, `safetensors`, or the name of another).
    pub fn name(&self) -> &str {
        match self {
            FormatKind::Raw => "raw",
            FormatKind::Safetensors => "safetensors",
            FormatKind::Named(n) => n,
        }
    }

    /// The kind recorded for a format called `name`.
    pub fn from_name(name: &str) -> FormatKind {
        match name {
            "raw" => FormatKind::Raw,
            "safetensors" => FormatKind::Safetensors,
            other => FormatKind::Named(other.to_string()),
        }
    }
}

/// A data file of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// Plain name inside the checkpoint location.
    pub name: String,
    /// Length in bytes when the save completed.
    pub length: u64,
}

/// A transform's recorded value: a checksum's 4 bytes fit inline, so a
/// record's metadata allocates nothing for it.
pub type TransformValue = smallvec::SmallVec<[u8; 8]>;

/// The transforms applied to a record: one (a checksum) fits inline.
pub type Transforms = smallvec::SmallVec<[AppliedTransform; 1]>;

/// One transform applied to a record, with the value its encoder returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedTransform {
    /// Index into [`Metadata::transforms`].
    pub descriptor: u32,
    /// The encoder's recorded value (a checksum), possibly empty; up to 8
    /// bytes are held inline.
    #[serde(with = "crate::model::inline_seq")]
    pub value: TransformValue,
    /// For a codec, the length of its input (the exact output length its
    /// decoder must produce); `None` for checksums.
    pub input_len: Option<u64>,
}

/// Where one record's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageInfo {
    /// Index into [`Metadata::files`].
    pub file: u32,
    /// Byte offset of the record in the file.
    pub offset: u64,
    /// Stored length (after transforms).
    pub length: u64,
    /// Transforms in order of application (one is held inline).
    #[serde(with = "crate::model::inline_seq")]
    pub transforms: Transforms,
}

/// One saved chunk of a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// The chunk's box in global coordinates.
    pub region: ChunkBox,
    /// Where its bytes are.
    pub storage: StorageInfo,
}

/// What an item is, as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemMeta {
    /// A tensor and its saved chunks.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Global shape.
        #[serde(with = "crate::model::inline_seq")]
        shape: Dims,
        /// Saved chunks, pairwise disjoint.
        chunks: Vec<ChunkMeta>,
    },
    /// A bytes item.
    Bytes {
        /// Logical length.
        length: u64,
        /// Where its bytes are.
        storage: StorageInfo,
    },
}

/// Everything a reader needs to find every byte of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Unique id of the save that wrote this checkpoint (16 hex digits).
    pub save_id: String,
    /// Number of ranks that saved it.
    pub world_size: u32,
    /// Record layout of the data files.
    pub format: FormatKind,
    /// Data files.
    pub files: Vec<DataFile>,
    /// Transform descriptor table (`name/version[:params]`).
    pub transforms: Vec<String>,
    /// Items, sorted by name, names unique.
    #[serde(deserialize_with = "items::deserialize")]
    pub items: Vec<(String, ItemMeta)>,
    /// User key/value metadata.
    pub user: BTreeMap<String, String>,
    /// The commit number: one more than the generation of the checkpoint
    /// the save replaced (1 for the first save into an empty location; 0 for
    /// metadata of format version 1, which had no generation). A save
    /// commits only if `.metadata` still holds the generation it started
    /// from. Encoded last, so version 2 is version 1's body plus this varint.
    pub generation: u64,
}

/// The body of format version 1: [`Metadata`] without `generation`.
#[derive(Deserialize)]
struct MetadataV1 {
    save_id: String,
    world_size: u32,
    format: FormatKind,
    files: Vec<DataFile>,
    transforms: Vec<String>,
    #[serde(deserialize_with = "items::deserialize")]
    items: Vec<(String, ItemMeta)>,
    user: BTreeMap<String, String>,
}

impl From<MetadataV1> for Metadata {
    fn from(v: MetadataV1) -> Metadata {
        Metadata {
            save_id: v.save_id,
            world_size: v.world_size,
            format: v.format,
            files: v.files,
            transforms: v.transforms,
            items: v.items,
            user: v.user,
            generation: 0,
        }
    }
}

/// The fixed header of every version.
pub(crate) struct Header {
    /// Format version.
    pub version: u32,
    /// Length of the body (versions 1 and 2) or of the index (version 3).
    pub body_len: u64,
    /// CRC-32C of the body or of the index.
    pub crc: u32,
}

/// Parse the header at the start of `bytes`: refuses a short input, a wrong
/// magic, a version this build does not read and unknown flags.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::corrupt(format!(
            ".metadata is {} bytes, shorter than its {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if bytes[..8] != MAGIC {
        return Err(Error::corrupt(
            ".metadata does not start with the dcp magic bytes",
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(OLDEST_FORMAT_VERSION..=NEWEST_FORMAT_VERSION).contains(&version) {
        return Err(Error::unsupported(format!(
            ".metadata has format version {version}; this build reads versions {OLDEST_FORMAT_VERSION} to {NEWEST_FORMAT_VERSION}"
        )));
    }
    let flags = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if flags != 0 {
        return Err(Error::unsupported(format!(
            ".metadata has unknown flags {flags:#x}"
        )));
    }
    Ok(Header {
        version,
        body_len: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
        crc: u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes")),
    })
}

impl Metadata {
    /// Look up an item by name (binary search).
    pub fn item(&self, name: &str) -> Option<&ItemMeta> {
        self.items
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.items[i].1)
    }

    /// Every record (chunk or bytes item) with the item's name, in item order.
    pub fn records(&self) -> impl Iterator<Item = (&str, Option<&ChunkBox>, &StorageInfo)> {
        self.items.iter().flat_map(|(name, item)| {
            let v: Vec<(&str, Option<&ChunkBox>, &StorageInfo)> = match item {
                ItemMeta::Tensor { chunks, .. } => chunks
                    .iter()
                    .map(|c| (name.as_str(), Some(&c.region), &c.storage))
                    .collect(),
                ItemMeta::Bytes { storage, .. } => vec![(name.as_str(), None, storage)],
            };
            v
        })
    }

    /// Total stored bytes of all records.
    pub fn stored_bytes(&self) -> u64 {
        self.records().map(|(_, _, s)| s.length).sum()
    }

    /// Total logical bytes of all records (before transforms).
    pub fn logical_bytes(&self) -> u64 {
        self.items
            .iter()
            .map(|(_, item)| match item {
                ItemMeta::Tensor { dtype, chunks, .. } => chunks
                    .iter()
                    .map(|c| c.region.numel() * dtype.size() as u64)
                    .sum::<u64>(),
                ItemMeta::Bytes { length, .. } => *length,
            })
            .sum()
    }

    /// Number of records.
    pub fn record_count(&self) -> usize {
        self.items
            .iter()
            .map(|(_, i)| match i {
                ItemMeta::Tensor { chunks, .. } => chunks.len(),
                ItemMeta::Bytes { .. } => 1,
            })
            .sum()
    }

    /// Encode with header. Validates first, so an invalid metadata is never
    /// written. A checkpoint of at least
    /// [`sections::SECTIONED_MIN_RECORDS`] records with a tensor of several
    /// chunks is written in sections (version 3, see [`sections`]), so that
    /// a loading rank reads only the records its destination overlaps; any
    /// other stays one body (version 2).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        if sections::should_section(self) {
            return sections::encode_sectioned(self, None);
        }
        self.encode_body()
    }

    /// Encode in sections of at most `per_section` chunks (version 3),
    /// whatever the size. Validates first.
    pub fn encode_sectioned(&self, per_section: usize) -> Result<Vec<u8>> {
        self.validate()?;
        sections::encode_sectioned(self, Some(per_section))
    }

    /// Encode as one body (version 2), whatever the size. Validates first.
    pub fn encode_one_body(&self) -> Result<Vec<u8>> {
        self.validate()?;
        self.encode_body()
    }

    /// The one-body encoding of validated metadata.
    fn encode_body(&self) -> Result<Vec<u8>> {
        let body = postcard::to_allocvec(self)
            .map_err(|e| Error::invalid(format!("encode metadata: {e}")))?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decode and validate. Refuses a wrong magic, an unknown version, a body
    /// whose length or CRC does not match, and anything
    /// [`Metadata::validate`] refuses. Sectioned metadata (version 3) is
    /// decoded whole: the index and every section.
    pub fn decode(bytes: &[u8]) -> Result<Metadata> {
        let Header {
            version,
            body_len,
            crc,
        } = parse_header(bytes)?;
        if version == sections::SECTIONED_FORMAT_VERSION {
            return sections::decode_full(bytes);
        }
        let body = &bytes[HEADER_LEN..];
        if body.len() as u64 != body_len {
            return Err(Error::corrupt(format!(
                ".metadata body is {} bytes but its header says {body_len} (truncated or extended)",
                body.len()
            )));
        }
        let actual = crc32c::crc32c(body);
        if actual != crc {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(".metadata body CRC-32C is {actual:#010x}, header says {crc:#010x}"),
            ));
        }
        let undecodable =
            |e: postcard::Error| Error::corrupt(format!(".metadata body does not decode: {e}"));
        // The items list reserved once, as long as the body could hold it.
        let bound = items::ItemsBound::new(body.len());
        let (md, rest): (Metadata, &[u8]) = if version == 1 {
            let (v1, rest): (MetadataV1, &[u8]) =
                postcard::take_from_bytes(body).map_err(undecodable)?;
            (v1.into(), rest)
        } else {
            postcard::take_from_bytes(body).map_err(undecodable)?
        };
        drop(bound);
        if !rest.is_empty() {
            return Err(Error::corrupt(format!(
                ".metadata body has {} trailing bytes",
                rest.len()
            )));
        }
        md.validate()?;
        Ok(md)
    }

    /// Check every invariant a reader relies on; the error names the first
    /// violation (item, chunk, file).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::corrupt(format!("invalid metadata: {m}")));
        if self.world_size == 0 {
            return bad("world size is 0".into());
        }
        if self.save_id.is_empty() || self.save_id.len() > 64 {
            return bad(format!("save id {:?} is not 1 to 64 bytes", self.save_id));
        }
        if let FormatKind::Named(n) = &self.format {
            crate::format::check_format_name(n).map_err(|e| e.context("invalid metadata"))?;
        }
        for f in &self.files {
            check_file_name(&f.name).map_err(|e| e.context("invalid metadata"))?;
            if f.name.starts_with(".metadata") {
                return bad(format!("data file {:?} shadows the metadata file", f.name));
            }
        }
        let mut kinds = Vec::with_capacity(self.transforms.len());
        for t in &self.transforms {
            Descriptor::parse(t)?;
            kinds.push(());
        }
        let check_storage = |name: &str, s: &StorageInfo| -> Result<()> {
            let file = self.files.get(s.file as usize).ok_or_else(|| {
                Error::corrupt(format!(
                    "invalid metadata: {name}: file index {} out of {} files",
                    s.file,
                    self.files.len()
                ))
            })?;
            let end = s.offset.checked_add(s.length);
            if end.is_none_or(|e| e > file.length) {
                return Err(Error::corrupt(format!(
                    "invalid metadata: {name}: record at offset {} length {} lies past the end of {} ({} bytes)",
                    s.offset, s.length, file.name, file.length
                )));
            }
            if s.transforms.len() > 16 {
                return Err(Error::corrupt(format!(
                    "invalid metadata: {name}: more than 16 transforms"
                )));
            }
            for t in &s.transforms {
                if t.descriptor as usize >= self.transforms.len() {
                    return Err(Error::corrupt(format!(
                        "invalid metadata: {name}: transform index {} out of {}",
                        t.descriptor,
                        self.transforms.len()
                    )));
                }
                if t.value.len() > 256 {
                    return Err(Error::corrupt(format!(
                        "invalid metadata: {name}: transform value too long"
                    )));
                }
            }
            Ok(())
        };
        // One pass over the items (each name is an allocation of its own:
        // a second pass would miss the cache on every name again).
        let mut previous: Option<&str> = None;
        for (name, item) in &self.items {
            if previous.is_some_and(|p| p >= name.as_str()) {
                return bad(format!("items not sorted or duplicated at {name:?}"));
            }
            previous = Some(name);
            crate::model::check_name(name).map_err(|e| e.context("invalid metadata"))?;
            match item {
                ItemMeta::Bytes { length, storage } => {
                    check_storage(name, storage)?;
                    if storage.transforms.is_empty() && storage.length != *length {
                        return bad(format!(
                            "{name}: stored length {} differs from length {length} without transforms",
                            storage.length
                        ));
                    }
                }
                ItemMeta::Tensor {
                    dtype,
                    shape,
                    chunks,
                } => {
                    if shape.len() > MAX_NDIM {
                        return bad(format!(
                            "{name}: {} dimensions (at most {MAX_NDIM})",
                            shape.len()
                        ));
                    }
                    let total = shape.iter().try_fold(1u64, |a, &s| a.checked_mul(s));
                    let Some(total) = total.and_then(|t| t.checked_mul(dtype.size() as u64)) else {
                        return bad(format!("{name}: shape {shape:?} overflows"));
                    };
                    let mut volume: u128 = 0;
                    for c in chunks {
                        c.region.check_within(shape).map_err(|e| {
                            Error::corrupt(format!("invalid metadata: {name}: {}", e.message()))
                        })?;
                        check_storage(name, &c.storage)?;
                        let logical = c.region.numel() * dtype.size() as u64;
                        volume += logical as u128;
                        if c.storage.transforms.is_empty() && c.storage.length != logical {
                            return bad(format!(
                                "{name}: chunk ({}) stores {} bytes, expected {logical}",
                                c.region, c.storage.length
                            ));
                        }
                    }
                    if volume > total as u128 {
                        return bad(format!("{name}: chunks hold more bytes than the tensor"));
                    }
                    // One chunk overlaps nothing: no list to build.
                    if chunks.len() > 1 {
                        check_disjoint(name, chunks.iter().map(|c| &c.region).collect())?;
                    }
                }
            }
        }
        if self.user.len() > 1 << 20 {
            return bad("too many user metadata entries".into());
        }
        Ok(())
    }

    /// The kind of each record's transform chain, resolved by the caller's
    /// registry; true when any transform of `storage` changes bytes.
    pub fn has_codec(
        &self,
        storage: &StorageInfo,
        kind_of: impl Fn(&str) -> TransformKind,
    ) -> bool {
        storage
            .transforms
            .iter()
            .any(|t| kind_of(&self.transforms[t.descriptor as usize]) == TransformKind::Codec)
    }
}

/// Refuse overlapping chunks. Sweeps along the dimension with the most
/// distinct chunk offsets, so typical shardings compare few pairs.
pub(crate) fn check_disjoint(name: &str, boxes: Vec<&ChunkBox>) -> Result<()> {
    let boxes: Vec<&ChunkBox> = boxes.into_iter().filter(|b| !b.is_empty()).collect();
    if boxes.len() < 2 {
        return Ok(());
    }
    let ndim = boxes[0].ndim();
    if ndim == 0 {
        return Err(Error::corrupt(format!(
            "invalid metadata: {name}: a scalar has several chunks"
        )));
    }
    let dim = (0..ndim)
        .max_by_key(|&d| {
            let mut v: Vec<u64> = boxes.iter().map(|b| b.offsets[d]).collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        })
        .unwrap_or(0);
    let mut order: Vec<&ChunkBox> = boxes;
    order.sort_by_key(|b| b.offsets[dim]);
    let mut active: Vec<&ChunkBox> = Vec::new();
    for b in order {
        let start = b.offsets[dim];
        active.retain(|a| a.offsets[dim] + a.sizes[dim] > start);
        for a in &active {
            if a.overlaps(b) {
                return Err(Error::corrupt(format!(
                    "invalid metadata: {name}: chunks ({a}) and ({b}) overlap"
                )));
            }
        }
        active.push(b);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Metadata {
        let st = |file, offset, length| StorageInfo {
            file,
            offset,
            length,
            transforms: Default::default(),
        };
        Metadata {
            save_id: "00112233aabbccdd".into(),
            world_size: 2,
            format: FormatKind::Raw,
            files: vec![
                DataFile {
                    name: "__0_0-00112233aabbccdd.dcp".into(),
                    length: 128,
                },
                DataFile {
                    name: "__1_0-00112233aabbccdd.dcp".into(),
                    length: 64,
                },
            ],
            transforms: Default::default(),
            items: vec![
                (
                    "a".into(),
                    ItemMeta::Bytes {
                        length: 5,
                        storage: st(1, 0, 5),
                    },
                ),
                (
                    "w".into(),
                    ItemMeta::Tensor {
                        dtype: DType::F32,
                        shape: vec![4, 2].into(),
                        chunks: vec![
                            ChunkMeta {
                                region: ChunkBox::new(vec![0, 0], vec![2, 2]).unwrap(),
                                storage: st(0, 0, 16),
                            },
                            ChunkMeta {
                                region: ChunkBox::new(vec![2, 0], vec![2, 2]).unwrap(),
                                storage: st(0, 64, 16),
                            },
                        ],
                    },
                ),
            ],
            user: BTreeMap::from([("step".into(), "100".into())]),
            generation: 1,
        }
    }

    #[test]
    fn round_trip() {
        let md = sample();
        let enc = md.encode().unwrap();
        assert_eq!(Metadata::decode(&enc).unwrap(), md);
    }

    /// A version-1 file (no generation) still decodes, as generation 0; its
    /// body is version 2's without the trailing varint.
    #[test]
    fn version_1_decodes_as_generation_0() {
        let md = Metadata {
            generation: 7,
            ..sample()
        };
        let v2 = md.encode().unwrap();
        let body = &v2[HEADER_LEN..v2.len() - 1];
        assert_eq!(*v2.last().unwrap(), 7, "the generation is the last byte");
        let mut v1 = Vec::new();
        v1.extend_from_slice(&MAGIC);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v1.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        v1.extend_from_slice(body);
        let back = Metadata::decode(&v1).unwrap();
        assert_eq!(
            back,
            Metadata {
                generation: 0,
                ..md
            }
        );
        // A version-2 header over a version-1 body is refused, not guessed.
        let mut bad = v1.clone();
        bad[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            Metadata::decode(&bad).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn refuses_damage() {
        let enc = sample().encode().unwrap();
        let mut v = enc.clone();
        v[9] = 7;
        assert_eq!(
            Metadata::decode(&v).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let mut v = enc.clone();
        *v.last_mut().unwrap() ^= 1;
        assert_eq!(
            Metadata::decode(&v).unwrap_err().kind(),
            ErrorKind::ChecksumMismatch
        );
        let e = Metadata::decode(&enc[..enc.len() - 1]).unwrap_err();
        assert!(e.message().contains("truncated"), "{e}");
        assert_eq!(
            Metadata::decode(&enc[..10]).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut v = enc.clone();
        v[0] = b'X';
        assert!(Metadata::decode(&v)
            .unwrap_err()
            .message()
            .contains("magic"));
    }

    #[test]
    fn validate_refuses_hostile_fields() {
        let mut md = sample();
        md.files[0].name = "../escape".into();
        assert!(md.validate().unwrap_err().message().contains("plain name"));
        let mut md = sample();
        md.files[0].name = "/etc/passwd".into();
        assert!(md.validate().is_err());
        let mut md = sample();
        if let ItemMeta::Tensor { chunks, .. } = &mut md.items[1].1 {
            chunks[1].region = ChunkBox::new(vec![1, 0], vec![2, 2]).unwrap();
        }
        assert!(md.validate().unwrap_err().message().contains("overlap"));
        let mut md = sample();
        if let ItemMeta::Tensor { chunks, .. } = &mut md.items[1].1 {
            chunks[1].storage.offset = 120;
        }
        assert!(md
            .validate()
            .unwrap_err()
            .message()
            .contains("past the end"));
        let mut md = sample();
        md.items.swap(0, 1);
        assert!(md.validate().unwrap_err().message().contains("sorted"));
        let mut md = sample();
        if let ItemMeta::Tensor { shape, .. } = &mut md.items[1].1 {
            *shape = vec![u64::MAX, u64::MAX].into();
        }
        assert!(md.validate().unwrap_err().message().contains("overflow"));
    }

    #[test]
    fn hostile_lengths_do_not_allocate() {
        // A body claiming 2^60 files must fail on the bytes, not allocate.
        let mut body = Vec::new();
        body.push(16u8);
        body.extend_from_slice(b"00112233aabbccdd");
        body.push(1); // world size
        body.push(0); // format
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut enc = Vec::new();
        enc.extend_from_slice(&MAGIC);
        enc.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        enc.extend_from_slice(&0u32.to_le_bytes());
        enc.extend_from_slice(&(body.len() as u64).to_le_bytes());
        enc.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        enc.extend_from_slice(&body);
        assert_eq!(
            Metadata::decode(&enc).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
