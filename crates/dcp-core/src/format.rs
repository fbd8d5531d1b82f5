//! Serialization formats: how records sit in a data file.
//!
//! * [`FormatKind::Raw`]: records back to back, each starting at a multiple
//!   of [`RAW_ALIGN`] bytes, so a data file can be memory-mapped and every
//!   record viewed in place.
//! * [`FormatKind::Safetensors`]: every data file is a valid safetensors
//!   file. Its header is computed from the plan and written first, so
//!   transforms that change lengths (compression) are refused for it.

use crate::error::{Error, Result};
use crate::metadata::FormatKind;
use crate::DType;
use std::fmt::Write as _;

/// Alignment of records in `Raw` data files.
pub const RAW_ALIGN: u64 = 64;

/// Padding needed to bring `pos` to the next multiple of `align`.
pub fn padding(pos: u64, align: u64) -> u64 {
    (align - pos % align) % align
}

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

/// The format's file-name extension.
pub fn extension(format: FormatKind) -> &'static str {
    match format {
        FormatKind::Raw => "dcp",
        FormatKind::Safetensors => "safetensors",
    }
}
