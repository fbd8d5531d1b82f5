//! torch DCP's `.metadata`, read with the safe [`pickle`]
//! reader and translated into dcp's [`Metadata`].
//!
//! torch pickles `Metadata(state_dict_metadata, planner_data, storage_data,
//! storage_meta, version)`: each item a `TensorStorageMetadata(properties,
//! size, chunks=[ChunkStorageMetadata(offsets, sizes)])` or a
//! `BytesStorageMetadata()`, and `storage_data` mapping
//! `MetadataIndex(fqn, offset, index)` to `_StorageInfo(relative_path,
//! offset, length, transform_descriptors)`. [`parse`] reads exactly that
//! ([`TorchMetadata`]); [`translate`] makes dcp metadata of it:
//!
//! * every tensor chunk becomes a dcp chunk whose record is the whole
//!   `torch.save` archive, with one `torch.save` transform
//!   ([`TorchSave`]) that records its dtype and
//!   shape; empty chunks are dropped (dcp records a tensor without data
//!   with no chunks); the transform table also holds `crc32/1`, which the
//!   format gives located tensors (the archive's CRC-32 of their bytes);
//! * every non-tensor item becomes a dcp bytes item holding its value as
//!   JSON; the record is read once here to learn the JSON's length;
//! * the data files are the `relative_path`s, each checked to be a plain
//!   name and present, with its length as it is now;
//! * the save id is torch's `storage_meta.save_id` (or a hash of the
//!   `.metadata` when there is none), the world size one more than the
//!   highest rank in the data files' names (`__{rank}_{n}.distcp`), the
//!   generation 0, and the user metadata `torch.version`.
//!
//! Tensor records of torch's SAFETENSORS serialization format are found in
//! their data file's safetensors blob ([`crate::safetensors`]): torch 2.15
//! records them at the blob's offset, not their own, and its own reader
//! cannot load them. They are plain bytes (no transform, no checksum).

use crate::format::{RecordTag, TorchSave, FORMAT_NAME};
use crate::pickle::{self, uints, Global, Object, Pickle, Value};
use dcp_core::metadata::{
    AppliedTransform, ChunkMeta, DataFile, FormatKind, ItemMeta, Metadata, StorageInfo, Transforms,
};
use dcp_core::storage::check_file_name;
use dcp_core::{ChunkBox, DType, Error, ErrorKind, FileSystem, MetadataTranslator, Result};
use std::collections::{BTreeMap, HashMap};

/// The torch extension descriptor dcp reads (`ZStandard()`).
pub const TORCH_ZSTD: &str = "stream.zstd/1";
/// dcp-ext's CRC-32, the checksum zip archives record for each entry.
pub const CRC32_DESCRIPTOR: &str = "crc32/1";
/// Where the translation puts [`CRC32_DESCRIPTOR`] in the transform table.
pub const CRC32_INDEX: u32 = 0;

/// True when `bytes` open like a torch `.metadata`: a pickle of protocol 2
/// to 5 (`0x80` and the protocol byte), where dcp's own open with
/// `DCPMETA\0`.
pub fn is_torch_metadata(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1])
}

/// One item of torch's `state_dict_metadata`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TorchItem {
    /// A tensor: dtype, global size, and each saved chunk's offsets and
    /// sizes.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Global size.
        size: Vec<u64>,
        /// Saved chunks: `(offsets, sizes)`.
        chunks: Vec<(Vec<u64>, Vec<u64>)>,
    },
    /// A non-tensor value (`BytesStorageMetadata`).
    Bytes,
}

/// Where torch stored one record (`_StorageInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchStorage {
    /// The data file, relative to the checkpoint.
    pub relative_path: String,
    /// Byte offset of the record in it.
    pub offset: u64,
    /// Stored length of the record.
    pub length: u64,
    /// torch's extension descriptors, in the order torch lists them.
    pub transforms: Vec<String>,
}

/// What torch's `.metadata` says, as dcp needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TorchMetadata {
    /// Items by flattened name (`model.layers.0.attn.q.weight`).
    pub items: BTreeMap<String, TorchItem>,
    /// Records by item name and chunk offsets (`None` for a bytes item).
    pub storage: BTreeMap<(String, Option<Vec<u64>>), TorchStorage>,
    /// `storage_meta.save_id`, when recorded.
    pub save_id: Option<String>,
    /// torch's metadata version (`1.0.0`).
    pub version: Option<String>,
}

/// Reads torch DCP checkpoints through a
/// [`FileSystemReader`](dcp_core::FileSystemReader): register it in
/// [`ReaderOptions::translators`](dcp_core::ReaderOptions::translators)
/// (with the format and transform: [`crate::register`] does all three).
#[derive(Clone, Copy, Debug, Default)]
pub struct TorchTranslator;

impl MetadataTranslator for TorchTranslator {
    fn name(&self) -> &str {
        "torch.distributed.checkpoint"
    }

    fn recognizes(&self, metadata: &[u8]) -> bool {
        is_torch_metadata(metadata)
    }

    fn translate(&self, fs: &dyn FileSystem, metadata: &[u8]) -> Result<Metadata> {
        translate(fs, metadata)
    }
}

/// The fields of a dataclass instance: its `BUILD` state, a dict, or the
/// dict of a `(dict, slots)` pair; no state is no fields.
fn fields<'p>(p: &'p Pickle, o: &'p Object) -> Result<&'p [(Value, Value)]> {
    let what = o.class.name;
    match &o.state {
        None => Ok(&[]),
        Some(s @ Value::Dict(_)) => p.dict(s, what),
        Some(s @ Value::Tuple(_)) => {
            let t = p.tuple(s, what)?;
            match t {
                [Value::None, d @ Value::Dict(_)] | [d @ Value::Dict(_), Value::None] => {
                    p.dict(d, what)
                }
                _ => Err(Error::corrupt(format!(
                    "{what}: state is an unexpected tuple"
                ))),
            }
        }
        Some(other) => Err(Error::corrupt(format!(
            "{what}: state is a {}",
            other.type_name()
        ))),
    }
}

fn instance<'p>(p: &'p Pickle, v: &Value, class: &str, what: &str) -> Result<&'p Object> {
    let o = p.object(v, what)?;
    if o.class.module != "torch.distributed.checkpoint.metadata"
        && o.class.module != "torch.distributed.checkpoint.filesystem"
        || o.class.name != class
    {
        return Err(Error::corrupt(format!(
            "{what}: expected a {class}, found a {}",
            o.class.qualified()
        )));
    }
    Ok(o)
}

fn field<'p>(p: &'p Pickle, f: &'p [(Value, Value)], key: &str, what: &str) -> Result<&'p Value> {
    p.get(f, key)
        .ok_or_else(|| Error::corrupt(format!("{what}: has no field {key:?}")))
}

fn string(v: &Value, what: &str) -> Result<String> {
    match v {
        Value::Str(s) => Ok(s.to_string()),
        other => Err(Error::corrupt(format!(
            "{what}: expected a str, found a {}",
            other.type_name()
        ))),
    }
}

fn uint(v: &Value, what: &str) -> Result<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        other => Err(Error::corrupt(format!(
            "{what}: expected a non-negative int, found {other:?}"
        ))),
    }
}

/// A `torch.Size` (or a plain tuple of ints).
fn size(p: &Pickle, v: &Value, what: &str) -> Result<Vec<u64>> {
    match v {
        Value::Object(_) => {
            let o = p.object(v, what)?;
            if !o.class.is("torch", "Size") {
                return Err(Error::corrupt(format!(
                    "{what}: expected a torch.Size, found a {}",
                    o.class.qualified()
                )));
            }
            match p.tuple(&o.args, what)? {
                [] => Ok(Vec::new()),
                [dims] => uints(p, dims, what),
                _ => Err(Error::corrupt(format!(
                    "{what}: torch.Size of several arguments"
                ))),
            }
        }
        _ => uints(p, v, what),
    }
}

/// The dtype a `torch.<dtype>` global stands for.
pub fn dtype_of(g: &Global) -> Result<DType> {
    if g.module != "torch" {
        return Err(Error::corrupt(format!("{} is not a dtype", g.qualified())));
    }
    Ok(match g.name {
        "float32" | "float" => DType::F32,
        "float64" | "double" => DType::F64,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "int16" | "short" => DType::I16,
        "int8" => DType::I8,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        "uint16" => DType::U16,
        "uint32" => DType::U32,
        "uint64" => DType::U64,
        "float8_e4m3fn" => DType::F8E4M3,
        "float8_e5m2" => DType::F8E5M2,
        other => {
            return Err(Error::unsupported(format!(
                "dtype torch.{other}: dcp has no such dtype"
            )))
        }
    })
}

fn properties_dtype(p: &Pickle, v: &Value, what: &str) -> Result<DType> {
    let o = instance(p, v, "TensorProperties", what)?;
    // TensorProperties pickles its fields as a tuple through __setstate__
    // (dtype first); a dict state names them.
    let dt = match &o.state {
        Some(s @ Value::Tuple(_)) => p
            .tuple(s, what)?
            .first()
            .ok_or_else(|| Error::corrupt(format!("{what}: empty TensorProperties")))?,
        _ => field(p, fields(p, o)?, "dtype", what)?,
    };
    match dt {
        Value::Global(g) => dtype_of(g).map_err(|e| e.context(what)),
        other => Err(Error::corrupt(format!(
            "{what}: dtype is a {}",
            other.type_name()
        ))),
    }
}

/// Read torch's `.metadata` pickle. Refuses, naming what is wrong, any
/// global outside the allow-list, any structure other than torch's, and
/// duplicate items or records.
pub fn parse(bytes: &[u8]) -> Result<TorchMetadata> {
    let p = pickle::load(bytes)?;
    let root = instance(&p, p.root(), "Metadata", ".metadata")?;
    let f = fields(&p, root)?;
    let mut out = TorchMetadata::default();
    let sdm = field(&p, f, "state_dict_metadata", "Metadata")?;
    for (k, v) in p.dict(sdm, "state_dict_metadata")? {
        let name = string(k, "state_dict_metadata key")?;
        let what = name.as_str();
        let o = p.object(v, what)?;
        let item = match o.class.name {
            "BytesStorageMetadata" => {
                instance(&p, v, "BytesStorageMetadata", what)?;
                TorchItem::Bytes
            }
            "TensorStorageMetadata" => {
                let o = instance(&p, v, "TensorStorageMetadata", what)?;
                let tf = fields(&p, o)?;
                let dtype = properties_dtype(&p, field(&p, tf, "properties", what)?, what)?;
                let size = size(&p, field(&p, tf, "size", what)?, what)?;
                let mut chunks = Vec::new();
                for c in p.list(field(&p, tf, "chunks", what)?, what)? {
                    let co = instance(&p, c, "ChunkStorageMetadata", what)?;
                    let cf = fields(&p, co)?;
                    chunks.push((
                        size_of(&p, cf, "offsets", what)?,
                        size_of(&p, cf, "sizes", what)?,
                    ));
                }
                TorchItem::Tensor {
                    dtype,
                    size,
                    chunks,
                }
            }
            _ => {
                return Err(Error::corrupt(format!(
                    "{what}: expected a TensorStorageMetadata or BytesStorageMetadata, found a {}",
                    o.class.qualified()
                )))
            }
        };
        if out.items.insert(name.clone(), item).is_some() {
            return Err(Error::corrupt(format!("item {name:?} appears twice")));
        }
    }
    let sd = field(&p, f, "storage_data", "Metadata")?;
    for (k, v) in p.dict(sd, "storage_data")? {
        let mi = instance(&p, k, "MetadataIndex", "storage_data key")?;
        let mf = fields(&p, mi)?;
        let fqn = string(field(&p, mf, "fqn", "MetadataIndex")?, "MetadataIndex.fqn")?;
        let what = fqn.as_str();
        let offset = match p.get(mf, "offset") {
            None | Some(Value::None) => None,
            Some(o) => Some(size(&p, o, what)?),
        };
        let si = instance(&p, v, "_StorageInfo", what)?;
        let sf = fields(&p, si)?;
        let transforms = match p.get(sf, "transform_descriptors") {
            None | Some(Value::None) => Vec::new(),
            Some(t) => p
                .sequence(t, what)?
                .iter()
                .map(|d| string(d, what))
                .collect::<Result<_>>()?,
        };
        let storage = TorchStorage {
            relative_path: string(field(&p, sf, "relative_path", what)?, what)?,
            offset: uint(field(&p, sf, "offset", what)?, what)?,
            length: uint(field(&p, sf, "length", what)?, what)?,
            transforms,
        };
        if out.storage.insert((fqn.clone(), offset), storage).is_some() {
            return Err(Error::corrupt(format!("{what}: a record appears twice")));
        }
    }
    if let Some(sm @ Value::Object(_)) = p.get(f, "storage_meta") {
        let o = instance(&p, sm, "StorageMeta", "storage_meta")?;
        if let Some(Value::Str(s)) = p.get(fields(&p, o)?, "save_id") {
            out.save_id = Some(s.to_string());
        }
    }
    if let Some(Value::Str(v)) = p.get(f, "version") {
        out.version = Some(v.to_string());
    }
    Ok(out)
}

fn size_of(p: &Pickle, f: &[(Value, Value)], key: &str, what: &str) -> Result<Vec<u64>> {
    size(p, field(p, f, key, what)?, what)
}

/// Whether torch's descriptors say zstd; anything else is refused.
fn zstd_of(name: &str, transforms: &[String]) -> Result<bool> {
    match transforms {
        [] => Ok(false),
        [d] if d == TORCH_ZSTD => Ok(true),
        _ => Err(Error::unsupported(format!(
            "{name}: torch extensions {transforms:?}; dcp reads records without extensions or with {TORCH_ZSTD} alone"
        ))),
    }
}

/// How the tensor records of one data file are stored.
#[derive(Debug)]
enum FileKind {
    /// Each a `torch.save` archive (TORCH_SAVE).
    TorchSave,
    /// In one safetensors blob at this offset (SAFETENSORS).
    Safetensors(u64, crate::safetensors::Blob),
}

/// The state of one translation: the data files met so far (checked and
/// measured once each), the transform table, the highest rank.
struct Translation<'a> {
    fs: &'a dyn FileSystem,
    files: Vec<DataFile>,
    file_index: HashMap<String, u32>,
    kinds: HashMap<u32, FileKind>,
    transforms: Vec<String>,
    world: u32,
}

impl Translation<'_> {
    /// The data file `name` (checked plain and present), by index.
    fn file(&mut self, item: &str, name: &str) -> Result<u32> {
        if let Some(&i) = self.file_index.get(name) {
            return Ok(i);
        }
        check_file_name(name).map_err(|e| e.context(item))?;
        let len = self.fs.file_len(name)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "{item}: data file {name} is missing from {}",
                    self.fs.location()
                ),
            )
        })?;
        if let Some(r) = rank_of(name) {
            self.world = self.world.max(r.saturating_add(1));
        }
        self.files.push(DataFile {
            name: name.to_string(),
            length: len,
        });
        let i = (self.files.len() - 1) as u32;
        self.file_index.insert(name.to_string(), i);
        Ok(i)
    }

    /// The torch record `s` of item `item`, inside its file, with its
    /// `torch.save` transform.
    fn record(
        &mut self,
        item: &str,
        s: &TorchStorage,
        tag: &RecordTag,
        input_len: u64,
    ) -> Result<StorageInfo> {
        let file = self.file(item, &s.relative_path)?;
        let flen = self.files[file as usize].length;
        if s.offset.checked_add(s.length).is_none_or(|e| e > flen) {
            return Err(Error::corrupt(format!(
                "{item}: record at offset {} of {} bytes lies past the end of {} ({flen} bytes)",
                s.offset, s.length, s.relative_path
            )));
        }
        let d = TorchSave::descriptor_for(tag.zstd);
        let descriptor = match self.transforms.iter().position(|t| *t == d) {
            Some(i) => i as u32,
            None => {
                self.transforms.push(d);
                (self.transforms.len() - 1) as u32
            }
        };
        Ok(StorageInfo {
            file,
            offset: s.offset,
            length: s.length,
            transforms: Transforms::from_buf([AppliedTransform {
                descriptor,
                value: tag.encode().into(),
                input_len: Some(input_len),
            }]),
        })
    }

    /// How the tensor records of `s`'s file are stored: looked at once per
    /// file, at the first uncompressed tensor record's offset (a zip
    /// archive, or a safetensors blob).
    fn kind(&mut self, item: &str, s: &TorchStorage) -> Result<(u32, &FileKind)> {
        let file = self.file(item, &s.relative_path)?;
        if !self.kinds.contains_key(&file) {
            let flen = self.files[file as usize].length;
            let mut head = [0u8; 4];
            let n = flen.saturating_sub(s.offset).min(4) as usize;
            self.fs
                .read_into(&s.relative_path, s.offset, &mut head[..n])
                .map_err(|e| e.context(item))?;
            let kind = if crate::safetensors::is_zip(&head[..n]) {
                FileKind::TorchSave
            } else {
                let blob = crate::safetensors::read_blob(self.fs, &s.relative_path, flen, s.offset)
                    .map_err(|e| {
                        e.context(format!(
                            "{item}: the record is neither a torch.save archive nor in a safetensors blob"
                        ))
                    })?;
                FileKind::Safetensors(s.offset, blob)
            };
            self.kinds.insert(file, kind);
        }
        Ok((file, &self.kinds[&file]))
    }
}

/// Translate torch's `.metadata` (`bytes`) into dcp's [`Metadata`], reading
/// through `fs` the length of every data file, every non-tensor record (to
/// know its JSON's length), and a few bytes of each data file's first
/// tensor record (a `torch.save` archive, or torch's SAFETENSORS format,
/// whose blob header is read once per file: see [`crate::safetensors`]).
/// Errors name the item: a missing data file is [`ErrorKind::NotFound`], a
/// record past the end of its file, a record that is not a `torch.save`
/// archive or a chunk without a record [`ErrorKind::Corrupt`].
pub fn translate(fs: &dyn FileSystem, bytes: &[u8]) -> Result<Metadata> {
    let tm = parse(bytes)?;
    // `crc32/1` first (CRC32_INDEX): the archives' CRC-32 of an
    // uncompressed tensor's bytes, which the format's `locate` gives dcp
    // to check on every load.
    let mut t = Translation {
        fs,
        files: Vec::new(),
        file_index: HashMap::new(),
        kinds: HashMap::new(),
        transforms: vec![CRC32_DESCRIPTOR.to_string()],
        world: 1,
    };
    let mut items = Vec::with_capacity(tm.items.len());
    let mut used = 0usize;
    for (name, item) in &tm.items {
        match item {
            TorchItem::Bytes => {
                let s = tm
                    .storage
                    .get(&(name.clone(), None))
                    .ok_or_else(|| Error::corrupt(format!("{name}: no record in storage_data")))?;
                used += 1;
                let zstd = zstd_of(name, &s.transforms)?;
                let tag = RecordTag {
                    object: true,
                    zstd,
                    dtype: None,
                    shape: None,
                    crc32: None,
                };
                // Placed first (file opened, bounds checked), then read.
                let mut st = t.record(name, s, &tag, 0)?;
                let mut buf = vec![0u8; s.length as usize];
                fs.read_into(&s.relative_path, s.offset, &mut buf)
                    .map_err(|e| e.context(name))?;
                let json = TorchSave { zstd }.read_object(&buf).map_err(|e| {
                    e.context(format!(
                        "{name}: record in {} at offset {}",
                        s.relative_path, s.offset
                    ))
                })?;
                st.transforms[0].input_len = Some(json.len() as u64);
                items.push((
                    name.clone(),
                    ItemMeta::Bytes {
                        length: json.len() as u64,
                        storage: st,
                    },
                ));
            }
            TorchItem::Tensor {
                dtype,
                size,
                chunks,
            } => {
                let mut out = Vec::with_capacity(chunks.len());
                let mut blob_keys = std::collections::HashSet::new();
                for (offsets, sizes) in chunks {
                    let region = ChunkBox::new(offsets.clone(), sizes.clone())
                        .map_err(|e| Error::corrupt(format!("{name}: {}", e.message())))?;
                    let s = tm.storage.get(&(name.clone(), Some(offsets.clone())));
                    let Some(s) = s else {
                        return Err(Error::corrupt(format!(
                            "{name}: chunk at {offsets:?} has no record in storage_data"
                        )));
                    };
                    used += 1;
                    let Some(logical) = region
                        .checked_numel()
                        .and_then(|n| n.checked_mul(dtype.size() as u64))
                    else {
                        return Err(Error::corrupt(format!("{name}: chunk {sizes:?} overflows")));
                    };
                    if logical == 0 {
                        continue;
                    }
                    let zstd = zstd_of(name, &s.transforms)?;
                    let storage = match if zstd { None } else { Some(t.kind(name, s)?) } {
                        Some((file, FileKind::Safetensors(at, blob))) => {
                            if s.offset != *at {
                                return Err(Error::corrupt(format!(
                                    "{name}: record at offset {} of {}, whose tensors are in the safetensors blob at {at}",
                                    s.offset, s.relative_path
                                )));
                            }
                            if !blob_keys.insert(file) {
                                return Err(Error::corrupt(format!(
                                    "{name}: several chunks in the safetensors blob of {}, which keys tensors by name",
                                    s.relative_path
                                )));
                            }
                            let e = blob.find(name, *dtype, offsets, sizes, logical)?;
                            StorageInfo {
                                file,
                                offset: e.offset,
                                length: e.length,
                                transforms: Transforms::new(),
                            }
                        }
                        _ => {
                            let tag = RecordTag {
                                object: false,
                                zstd,
                                dtype: Some(*dtype),
                                shape: Some(sizes.clone()),
                                crc32: (!zstd).then_some(CRC32_INDEX),
                            };
                            t.record(name, s, &tag, logical)?
                        }
                    };
                    out.push(ChunkMeta { region, storage });
                }
                items.push((
                    name.clone(),
                    ItemMeta::Tensor {
                        dtype: *dtype,
                        shape: size.as_slice().into(),
                        chunks: out,
                    },
                ));
            }
        }
    }
    if used != tm.storage.len() {
        let stray = tm
            .storage
            .keys()
            .find(|(n, o)| match tm.items.get(n) {
                Some(TorchItem::Bytes) => o.is_some(),
                Some(TorchItem::Tensor { chunks, .. }) => {
                    !chunks.iter().any(|(off, _)| Some(off) == o.as_ref())
                }
                None => true,
            })
            .map(|(n, o)| format!("{n} at {o:?}"))
            .unwrap_or_default();
        return Err(Error::corrupt(format!(
            "storage_data holds a record of no item's chunk: {stray}"
        )));
    }
    let save_id = match &tm.save_id {
        Some(s) if !s.is_empty() && s.len() <= 64 => s.clone(),
        _ => format!("torch-{:08x}", crc32fast::hash(bytes)),
    };
    let mut user = BTreeMap::new();
    user.insert(
        "source".to_string(),
        "torch.distributed.checkpoint".to_string(),
    );
    if let Some(v) = &tm.version {
        user.insert("torch.version".to_string(), v.clone());
    }
    let md = Metadata {
        save_id,
        world_size: t.world,
        format: FormatKind::from_name(FORMAT_NAME),
        files: t.files,
        transforms: t.transforms,
        items,
        user,
        generation: 0,
    };
    md.validate()?;
    Ok(md)
}

/// The rank in a torch data file name `__{rank}_{n}.distcp`.
fn rank_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("__")?.strip_suffix(".distcp")?;
    let (r, n) = rest.split_once('_')?;
    n.parse::<u64>().ok()?;
    r.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_pickles_only() {
        assert!(is_torch_metadata(b"\x80\x04\x95"));
        assert!(is_torch_metadata(b"\x80\x02"));
        assert!(!is_torch_metadata(b"\x80\x06"));
        assert!(!is_torch_metadata(b"DCPMETA\0"));
        assert!(!is_torch_metadata(b"\x80"));
    }

    #[test]
    fn ranks_from_file_names() {
        assert_eq!(rank_of("__3_0.distcp"), Some(3));
        assert_eq!(rank_of("__12_7.distcp"), Some(12));
        assert_eq!(rank_of("__x_0.distcp"), None);
        assert_eq!(rank_of("data.distcp"), None);
    }

    #[test]
    fn refuses_other_roots() {
        // A pickle of a plain list is not torch metadata.
        let e = parse(b"\x80\x04].").unwrap_err();
        assert!(e.message().contains("expected an object"), "{e}");
        let e = zstd_of("w", &["stream.lz4/1".into()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("stream.lz4/1"), "{e}");
    }
}
