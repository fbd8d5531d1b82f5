//! [`Safetensors`]: every data file is a valid safetensors file.

use super::{RecordLayout, SerializationFormat};
use crate::error::{Error, Result};
use crate::plan::WriteIndex;
use crate::transform::{StreamTransformExtension, TransformKind};
use crate::DType;
use std::fmt::Write as _;
use std::sync::Arc;

/// What the safetensors header needs to know of one record.
#[derive(Clone, Debug)]
pub struct SafetensorsEntry {
    /// Unique key in the file.
    pub key: String,
    /// Element type (`U8` for bytes items).
    pub dtype: DType,
    /// Shape of the record (a chunk's sizes, or `[len]` for bytes).
    pub shape: Vec<u64>,
    /// Stored length in bytes.
    pub length: u64,
}

/// Build a safetensors header (8-byte length prefix plus JSON padded with
/// spaces to a multiple of 8) for records stored back to back in order.
/// Returns the header bytes; record `i` then starts at
/// `header.len() + sum(length[..i])`.
pub fn safetensors_header(entries: &[SafetensorsEntry], save_id: &str) -> Result<Vec<u8>> {
    let mut json = String::with_capacity(64 + entries.len() * 96);
    json.push('{');
    write!(
        json,
        "\"__metadata__\":{{\"format\":\"dcp\",\"dcp_save_id\":{}}}",
        serde_json::to_string(save_id).map_err(|e| Error::invalid(e.to_string()))?
    )
    .expect("write to String");
    let mut pos = 0u64;
    for e in entries {
        let key = serde_json::to_string(&e.key).map_err(|e| Error::invalid(e.to_string()))?;
        let shape: Vec<String> = e.shape.iter().map(|s| s.to_string()).collect();
        write!(
            json,
            ",{key}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            e.dtype.safetensors_name(),
            shape.join(","),
            pos,
            pos + e.length
        )
        .expect("write to String");
        pos += e.length;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

/// The key of a record in a safetensors data file: the item name with every
/// `@` doubled, and for a chunk that is not the whole tensor, a single `@`
/// and its offsets (`layers.0.w@128,0`). Keys are unique within a checkpoint:
/// names are unique, escaping makes the name part unambiguous, and the
/// non-empty chunks of a tensor have distinct offsets. An item named
/// `__metadata__` (the header's reserved key) becomes `@__metadata__`: a
/// single leading `@` never comes from an escaped name.
pub fn safetensors_key(name: &str, offsets: Option<&[u64]>, whole: bool) -> String {
    let mut escaped = name.replace('@', "@@");
    if escaped == "__metadata__" {
        escaped.insert(0, '@');
    }
    match offsets {
        Some(o) if !whole => {
            let o: Vec<String> = o.iter().map(|x| x.to_string()).collect();
            format!("{escaped}@{}", o.join(","))
        }
        _ => escaped,
    }
}

/// Every data file is a valid safetensors file that any safetensors reader
/// opens: a header computed from the plan, then the records back to back.
/// Keys come from [`safetensors_key`]. The header records each record's
/// length before it is written, so codecs (compression) are refused;
/// checksums work. Data files end in `.safetensors`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Safetensors;

impl SerializationFormat for Safetensors {
    fn name(&self) -> &str {
        "safetensors"
    }

    fn file_extension(&self) -> &str {
        "safetensors"
    }

    fn check_transforms(&self, transforms: &[Arc<dyn StreamTransformExtension>]) -> Result<()> {
        match transforms.iter().find(|t| t.kind() == TransformKind::Codec) {
            Some(t) => Err(Error::invalid(format!(
                "the safetensors format cannot hold records transformed by {}: its files must stay valid safetensors; \
                 use the raw format, or only checksum extensions",
                t.descriptor()
            ))),
            None => Ok(()),
        }
    }

    fn header(&self, records: &[RecordLayout<'_>], save_id: &str) -> Result<Vec<u8>> {
        let entries: Vec<SafetensorsEntry> = records
            .iter()
            .map(|r| match r.index {
                WriteIndex::Chunk(b) => SafetensorsEntry {
                    key: safetensors_key(r.name, Some(&b.offsets), r.whole),
                    dtype: r.dtype.unwrap_or(DType::U8),
                    shape: b.sizes.to_vec(),
                    length: r.length,
                },
                WriteIndex::Bytes => SafetensorsEntry {
                    key: safetensors_key(r.name, None, true),
                    dtype: DType::U8,
                    shape: vec![r.length],
                    length: r.length,
                },
            })
            .collect();
        safetensors_header(&entries, save_id)
    }
}
