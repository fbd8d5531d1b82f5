//! Tensor records of torch's SAFETENSORS serialization format
//! (`FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)`).
//!
//! torch 2.15 writes each data file as its non-tensor records (`torch.save`
//! archives, as in the TORCH_SAVE format) followed by one safetensors blob
//! (8-byte little-endian header length, a JSON header, the tensors' bytes)
//! holding every tensor record of the file, keyed by item name, with
//! `__metadata__.DCP_SHARDING_INFO` giving each key's chunk offsets. Its
//! `.metadata` records every tensor of a file at the blob's offset rather
//! than its own (torch's own reader cannot load these checkpoints), so dcp
//! finds each tensor in the blob's header: [`read_blob`] reads the header
//! once per data file, and [`Blob::find`] gives a chunk's bytes, checked
//! against its dtype, shape and offsets.

use dcp_core::{DType, Error, FileSystem, Result};
use std::collections::BTreeMap;

/// The largest safetensors header dcp reads (the `safetensors` crate's own
/// limit).
pub const MAX_HEADER: u64 = 100 << 20;

/// One tensor of a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobEntry {
    /// Element type.
    pub dtype: DType,
    /// Shape (the chunk's sizes).
    pub shape: Vec<u64>,
    /// Byte offset of its data in the file.
    pub offset: u64,
    /// Length of its data.
    pub length: u64,
    /// Its chunk's offsets, from `DCP_SHARDING_INFO` (if recorded).
    pub saved_offsets: Option<Vec<u64>>,
}

/// The header of a safetensors blob at a known offset of a data file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob {
    /// Entries by key (the item name).
    pub entries: BTreeMap<String, BlobEntry>,
}

/// True when `head` (the first bytes at a tensor record's recorded offset)
/// opens a `torch.save` archive (a zip local header), not a safetensors
/// blob.
pub fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
}

/// Read the safetensors blob at `offset` of `file` (`file_len` bytes):
/// its header length is checked against the file and [`MAX_HEADER`] before
/// it is read, and every entry's data must lie inside the file.
pub fn read_blob(fs: &dyn FileSystem, file: &str, file_len: u64, offset: u64) -> Result<Blob> {
    let bad = |why: String| {
        Error::corrupt(format!(
            "{file}: the safetensors blob at offset {offset} {why}"
        ))
    };
    let room = file_len.saturating_sub(offset);
    if room < 8 {
        return Err(bad(format!("is cut short ({room} bytes)")));
    }
    let mut len = [0u8; 8];
    fs.read_into(file, offset, &mut len)?;
    let n = u64::from_le_bytes(len);
    if n > room - 8 || n > MAX_HEADER {
        return Err(bad(format!(
            "claims a {n}-byte header; {} bytes follow (at most {MAX_HEADER})",
            room - 8
        )));
    }
    let mut header = vec![0u8; n as usize];
    fs.read_into(file, offset + 8, &mut header)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("has a header that is not JSON: {e}")))?;
    let serde_json::Value::Object(map) = json else {
        return Err(bad("has a header that is not a JSON object".into()));
    };
    let data_start = offset + 8 + n;
    // DCP_SHARDING_INFO: a JSON string {key: {"saved_offsets": [...]}}.
    let mut sharding: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    if let Some(info) = map
        .get("__metadata__")
        .and_then(|m| m.get("DCP_SHARDING_INFO"))
        .and_then(|s| s.as_str())
    {
        let info: serde_json::Value = serde_json::from_str(info)
            .map_err(|e| bad(format!("has a DCP_SHARDING_INFO that is not JSON: {e}")))?;
        if let serde_json::Value::Object(info) = info {
            for (k, v) in info {
                if let Some(o) = v.get("saved_offsets").and_then(|o| o.as_array()) {
                    let o: Option<Vec<u64>> = o.iter().map(|x| x.as_u64()).collect();
                    let o = o.ok_or_else(|| bad(format!("has bad saved_offsets for {k:?}")))?;
                    sharding.insert(k, o);
                }
            }
        }
    }
    let mut entries = BTreeMap::new();
    for (key, v) in &map {
        if key == "__metadata__" {
            continue;
        }
        let what = |why: &str| bad(format!("has entry {key:?} {why}"));
        let dtype = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| what("without a dtype"))?;
        let dtype = DType::from_safetensors_name(dtype).map_err(|e| what(e.message()))?;
        let shape: Option<Vec<u64>> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().map(|x| x.as_u64()).collect())
            .unwrap_or(None);
        let shape = shape.ok_or_else(|| what("without a shape"))?;
        let offs: Option<Vec<u64>> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().map(|x| x.as_u64()).collect())
            .unwrap_or(None);
        let (begin, end) = match offs.as_deref() {
            Some(&[b, e]) if b <= e => (b, e),
            _ => return Err(what("without valid data_offsets")),
        };
        let start = data_start
            .checked_add(begin)
            .filter(|s| s.checked_add(end - begin).is_some_and(|e| e <= file_len))
            .ok_or_else(|| what("whose data lies past the end of the file"))?;
        entries.insert(
            key.clone(),
            BlobEntry {
                dtype,
                shape,
                offset: start,
                length: end - begin,
                saved_offsets: sharding.get(key).cloned(),
            },
        );
    }
    Ok(Blob { entries })
}

impl Blob {
    /// The entry of item `name`'s chunk at `offsets` of `sizes`, which must
    /// have `dtype` and `length` bytes; an error naming what differs.
    pub fn find(
        &self,
        name: &str,
        dtype: DType,
        offsets: &[u64],
        sizes: &[u64],
        length: u64,
    ) -> Result<&BlobEntry> {
        let e = self.entries.get(name).ok_or_else(|| {
            Error::corrupt(format!(
                "{name}: no tensor of that name in its data file's safetensors blob"
            ))
        })?;
        let lies = |why: String| Err(Error::corrupt(format!("{name}: {why}")));
        if e.dtype != dtype {
            return lies(format!(
                "the safetensors blob holds {}, the metadata records {}",
                e.dtype.name(),
                dtype.name()
            ));
        }
        if e.shape != sizes {
            return lies(format!(
                "the safetensors blob holds shape {:?}, the metadata records a chunk of {sizes:?}",
                e.shape
            ));
        }
        if let Some(o) = &e.saved_offsets {
            if o != offsets {
                return lies(format!(
                    "the safetensors blob holds the chunk at {o:?}, the metadata records {offsets:?}"
                ));
            }
        }
        if e.length != length {
            return lies(format!(
                "the safetensors blob holds {} bytes, the chunk needs {length}",
                e.length
            ));
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcp_core::mem::MemoryFs;

    fn blob(header: &str, data: &[u8], prefix: usize) -> (MemoryFs, u64) {
        let mut f = vec![0x5a; prefix];
        f.extend_from_slice(&(header.len() as u64).to_le_bytes());
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(data);
        let len = f.len() as u64;
        let m = MemoryFs::new("memory://st");
        m.put("f", f);
        (m, len)
    }

    #[test]
    fn finds_tensors_and_refuses_lies() {
        let h = r#"{"__metadata__":{"DCP_SHARDING_INFO":"{\"a\": {\"saved_offsets\": [2, 0]}}"},"a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}"#;
        let (m, len) = blob(h, &[1; 8], 10);
        let b = read_blob(&m, "f", len, 10).unwrap();
        let e = b.find("a", DType::F32, &[2, 0], &[1, 2], 8).unwrap();
        assert_eq!((e.offset, e.length), (10 + 8 + h.len() as u64, 8));
        for (dt, off, sizes, n, why) in [
            (DType::F16, vec![2, 0], vec![1, 2], 8, "holds f32"),
            (DType::F32, vec![0, 0], vec![1, 2], 8, "at [2, 0]"),
            (DType::F32, vec![2, 0], vec![2, 1], 8, "shape [1, 2]"),
        ] {
            let e = b.find("a", dt, &off, &sizes, n).unwrap_err();
            assert!(e.message().contains(why), "{e}");
        }
        assert!(b.find("b", DType::F32, &[0], &[2], 8).is_err());
        // Data past the end, a header longer than the file, not JSON.
        let (m, len) = blob(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[1; 8],
            0,
        );
        assert!(read_blob(&m, "f", len, 0)
            .unwrap_err()
            .message()
            .contains("past the end"));
        let (m, len) = blob("{}", &[], 0);
        let e = read_blob(&m, "f", len, 1).unwrap_err();
        assert!(
            e.message().contains("header") || e.message().contains("short"),
            "{e}"
        );
        let (m, len) = blob("nope", &[], 0);
        assert!(read_blob(&m, "f", len, 0)
            .unwrap_err()
            .message()
            .contains("not JSON"));
        let mut f = u64::MAX.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}");
        let m = MemoryFs::new("memory://st2");
        m.put("f", f);
        assert!(read_blob(&m, "f", 10, 0)
            .unwrap_err()
            .message()
            .contains("claims"));
        assert!(is_zip(b"PK\x03\x04rest") && !is_zip(b"\x10\0\0\0"));
    }
}
