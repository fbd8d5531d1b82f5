//! Serialization formats: how records sit in a data file.
//!
//! A [`SerializationFormat`] decides a data file's name extension, the bytes
//! written before the first record (a header computed from the plan) and
//! after the last (a footer computed from where the records landed), where
//! each record is placed (alignment, and bytes written in front of it), and
//! how a record recorded in the metadata is found again when reading. The
//! write pipeline calls these hooks and nothing else, so a new format needs
//! no change to the pipeline. Its [`SerializationFormat::name`] is recorded
//! in the metadata ([`FormatKind`]), and a reader finds the format again in
//! its [`FormatRegistry`].
//!
//! dcp ships two:
//! * [`Raw`] (the default): records back to back, each starting at a
//!   multiple of [`RAW_ALIGN`] bytes, so a data file can be memory-mapped and
//!   every record viewed in place.
//! * [`Safetensors`]: every data file is a valid safetensors file. Its header
//!   is computed from the plan and written first, so transforms that change
//!   lengths (compression) are refused for it.

mod raw;
mod safetensors;

pub use raw::{Raw, RAW_ALIGN};
pub use safetensors::{safetensors_header, safetensors_key, Safetensors, SafetensorsEntry};

use crate::error::{Error, ErrorKind, Result};
use crate::metadata::{FormatKind, StorageInfo};
use crate::plan::WriteIndex;
use crate::storage::FileSystem;
use crate::transform::StreamTransformExtension;
use crate::DType;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Padding needed to bring `pos` to the next multiple of `align`.
pub fn padding(pos: u64, align: u64) -> u64 {
    let align = align.max(1);
    (align - pos % align) % align
}

/// What a format learns of one record of a data file before it is written.
#[derive(Clone, Copy, Debug)]
pub struct RecordLayout<'a> {
    /// Item name.
    pub name: &'a str,
    /// Which record of the item (a chunk's box, or the bytes item).
    pub index: &'a WriteIndex,
    /// Element type of a tensor chunk; `None` for a bytes item.
    pub dtype: Option<DType>,
    /// True when the chunk covers its whole tensor.
    pub whole: bool,
    /// The record's length before transforms (its stored length when the
    /// chain has no codec).
    pub length: u64,
}

/// How records sit in a data file. Implementations must be deterministic
/// (the same records give the same bytes) and must not keep state between
/// files: one instance writes every file of a save, from several threads.
pub trait SerializationFormat: Send + Sync + fmt::Debug {
    /// The name recorded in the metadata and looked up in a
    /// [`FormatRegistry`] on load: 1 to 64 bytes of `[a-z0-9._-]`.
    fn name(&self) -> &str;

    /// The data files' name extension, without the dot (`dcp`).
    fn file_extension(&self) -> &str;

    /// Refuse a transform chain this format cannot hold (a format whose
    /// header records lengths before writing refuses codecs). Runs on every
    /// rank before anything is written. The default accepts every chain.
    fn check_transforms(&self, transforms: &[Arc<dyn StreamTransformExtension>]) -> Result<()> {
        let _ = transforms;
        Ok(())
    }

    /// Bytes written at the start of a data file holding `records`, in the
    /// order they will be written. The default writes none.
    fn header(&self, records: &[RecordLayout<'_>], save_id: &str) -> Result<Vec<u8>> {
        let _ = (records, save_id);
        Ok(Vec::new())
    }

    /// Every record starts at a multiple of this many bytes (after its
    /// [`SerializationFormat::record_prefix`]); zero bytes pad the gap. The
    /// default, 1, packs records.
    fn record_alignment(&self) -> u64 {
        1
    }

    /// Bytes written in front of a record (after the alignment padding) and
    /// not part of it: a per-record frame. The default writes none.
    fn record_prefix(&self, record: &RecordLayout<'_>) -> Result<Vec<u8>> {
        let _ = record;
        Ok(Vec::new())
    }

    /// Bytes written after the last record, given where each record landed
    /// (`placed[i]` is `records[i]`'s stored location). The default writes
    /// none.
    fn footer(&self, records: &[RecordLayout<'_>], placed: &[StorageInfo]) -> Result<Vec<u8>> {
        let _ = (records, placed);
        Ok(Vec::new())
    }

    /// Whether [`SerializationFormat::locate`] can move a record: when
    /// `false` (the default) readers skip it and read records where the
    /// metadata says.
    fn relocates(&self) -> bool {
        false
    }

    /// Reading records back: where the bytes of the record the metadata
    /// records as `stored` in data file `file` really are, reading the file
    /// through `fs` if needed (a container format finds its payload). `None`
    /// keeps the metadata's location. The located record's transforms may
    /// name any descriptor of the metadata's table (a checksum the container
    /// records over its payload); readers resolve the whole table for a
    /// format that relocates, and a descriptor they cannot resolve fails
    /// the read of such a record. Called only when
    /// [`SerializationFormat::relocates`] is true, once per record a load
    /// reads; a record that is not where the format expects is an error of
    /// kind [`ErrorKind::Corrupt`] naming the file and offset.
    fn locate(
        &self,
        fs: &dyn FileSystem,
        file: &str,
        stored: &StorageInfo,
    ) -> Result<Option<StorageInfo>> {
        let _ = (fs, file, stored);
        Ok(None)
    }
}

/// Check that `name` is a valid format name: 1 to 64 bytes of `[a-z0-9._-]`
/// starting with a letter.
pub fn check_format_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "serialization format name {name:?} is not 1 to 64 bytes of [a-z0-9._-] starting with a letter"
        )))
    }
}

/// The format called `kind` among dcp's own, or `None`.
pub fn builtin(kind: &FormatKind) -> Option<Arc<dyn SerializationFormat>> {
    match kind {
        FormatKind::Raw => Some(Arc::new(Raw)),
        FormatKind::Safetensors => Some(Arc::new(Safetensors)),
        FormatKind::Named(_) => None,
    }
}

/// Maps format names recorded in metadata to formats. A new registry holds
/// [`Raw`] and [`Safetensors`]; register others with
/// [`FormatRegistry::register`].
#[derive(Clone)]
pub struct FormatRegistry {
    formats: BTreeMap<String, Arc<dyn SerializationFormat>>,
}

impl Default for FormatRegistry {
    fn default() -> Self {
        let mut r = FormatRegistry {
            formats: BTreeMap::new(),
        };
        r.register(Arc::new(Raw));
        r.register(Arc::new(Safetensors));
        r
    }
}

impl fmt::Debug for FormatRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FormatRegistry")
            .field("names", &self.formats.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl FormatRegistry {
    /// A registry holding dcp's own formats.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `format` under its name, replacing one of the same name.
    pub fn register(&mut self, format: Arc<dyn SerializationFormat>) {
        self.formats.insert(format.name().to_string(), format);
    }

    /// The format a checkpoint recorded as `kind`. An unknown name is an
    /// [`ErrorKind::Unsupported`] error naming it.
    pub fn resolve(&self, kind: &FormatKind) -> Result<Arc<dyn SerializationFormat>> {
        self.formats.get(kind.name()).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the checkpoint's data files use serialization format {:?}, which this reader does not have \
                     (known: {}); register it in ReaderOptions::formats",
                    kind.name(),
                    self.formats.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }
}
