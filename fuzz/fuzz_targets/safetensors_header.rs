//! Safetensors data files must be valid safetensors files.
//!
//! 1. `dcp_core::format::safetensors_header` over arbitrary entries (unique
//!    keys, lengths matching their shapes, any save id) followed by the data
//!    must parse with the `safetensors` crate, every entry where the header
//!    says.
//! 2. A state dict of arbitrary items (any names, dtypes, shapes, chunking,
//!    bucket count, with or without a checksum) saved with
//!    `FormatKind::Safetensors` must give data files that the `safetensors`
//!    crate parses, each record's bytes under its key.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use dcp_core::format::{safetensors_header, safetensors_key, SafetensorsEntry};
use dcp_core::mem::MemoryFs;
use dcp_core::metadata::ItemMeta;
use dcp_core::{
    save, ChunkBox, FileSystem, FileSystemWriter, FormatKind, Single, StateDict, TensorChunk,
    WriterOptions,
};
use dcp_fuzz::{dtype, runtime};
use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

#[derive(Arbitrary, Debug)]
struct Entry {
    key: String,
    dtype: u8,
    shape: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Item {
    Tensor {
        name: String,
        dtype: u8,
        shape: Vec<u8>,
        split: u8,
    },
    Bytes {
        name: String,
        len: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    save_id: String,
    entries: Vec<Entry>,
    items: Vec<Item>,
    threads: u8,
    checksum: bool,
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

fn header_case(input: &Input) {
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for e in input.entries.iter().take(64) {
        if e.key == "__metadata__" || !seen.insert(e.key.clone()) {
            continue; // the caller's contract: unique keys, not the metadata key
        }
        let shape: Vec<u64> = e.shape.iter().take(4).map(|&d| d as u64 % 17).collect();
        let dt = dtype(e.dtype);
        entries.push(SafetensorsEntry {
            key: e.key.clone(),
            dtype: dt,
            length: numel(&shape) * dt.size() as u64,
            shape,
        });
    }
    let header = safetensors_header(&entries, &input.save_id).expect("header builds");
    let total: u64 = entries.iter().map(|e| e.length).sum();
    let mut file = header.clone();
    file.resize(header.len() + total as usize, 0xa5);
    let st = SafeTensors::deserialize(&file).unwrap_or_else(|e| {
        panic!(
            "our header does not parse: {e:?}: {:?}",
            String::from_utf8_lossy(&header)
        )
    });
    assert_eq!(st.len(), entries.len());
    let mut pos = 0u64;
    for e in &entries {
        let view = st.tensor(&e.key).expect("entry present");
        assert_eq!(view.dtype().to_string(), e.dtype.safetensors_name());
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        assert_eq!(shape, e.shape);
        let start = header.len() as u64 + pos;
        let off = view.data().as_ptr() as usize - file.as_ptr() as usize;
        assert_eq!(off as u64, start, "{}: data offset", e.key);
        assert_eq!(view.data().len() as u64, e.length);
        pos += e.length;
    }
    let (_, meta) = SafeTensors::read_metadata(&file).expect("metadata parses");
    let m = meta.metadata().as_ref().expect("__metadata__ present");
    assert_eq!(m.get("dcp_save_id"), Some(&input.save_id));
}

fn fill(n: usize, salt: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ salt).collect()
}

fn save_case(input: &Input) {
    let mut sd = StateDict::new();
    let mut expect: BTreeMap<String, Vec<(Option<ChunkBox>, Bytes)>> = BTreeMap::new();
    for (i, it) in input.items.iter().take(12).enumerate() {
        match it {
            Item::Tensor {
                name,
                dtype: d,
                shape,
                split,
            } => {
                let dt = dtype(*d);
                let shape: Vec<u64> = shape.iter().take(3).map(|&x| x as u64 % 9).collect();
                let mut chunks: Vec<(ChunkBox, Bytes)> = Vec::new();
                if shape.is_empty() || *split <= 1 || shape[0] == 0 {
                    let data = Bytes::from(fill(numel(&shape) as usize * dt.size(), i as u8));
                    chunks.push((ChunkBox::full(&shape), data));
                } else {
                    let parts = (*split as u64).min(shape[0]);
                    for p in 0..parts {
                        let lo = shape[0] * p / parts;
                        let hi = shape[0] * (p + 1) / parts;
                        let mut region = ChunkBox::full(&shape);
                        region.offsets[0] = lo;
                        region.sizes[0] = hi - lo;
                        let data = Bytes::from(fill(
                            region.numel() as usize * dt.size(),
                            (i + p as usize) as u8,
                        ));
                        chunks.push((region, data));
                    }
                }
                let kept: Vec<(Option<ChunkBox>, Bytes)> = chunks
                    .iter()
                    .map(|(r, d)| (Some(r.clone()), d.clone()))
                    .collect();
                let chunks = chunks
                    .into_iter()
                    .map(|(r, d)| TensorChunk::new(r, d))
                    .collect();
                if sd
                    .insert_tensor(name.clone(), dt, shape, chunks, false)
                    .is_ok()
                {
                    expect.insert(name.clone(), kept);
                }
            }
            Item::Bytes { name, len } => {
                let data = Bytes::from(fill(*len as usize, i as u8));
                if sd.insert_bytes(name.clone(), data.clone(), false).is_ok() {
                    expect.insert(name.clone(), vec![(None, data)]);
                }
            }
        }
    }
    let mem = MemoryFs::new("memory://fuzz");
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    let writer = FileSystemWriter::new(
        fs,
        WriterOptions::default()
            .serialization_format(dcp_core::format::builtin(&FormatKind::Safetensors).unwrap())
            .thread_count(1 + input.threads as usize % 3)
            .sync_files(false)
            .extensions(if input.checksum {
                vec![Arc::new(dcp_ext::Crc32c::new())]
            } else {
                vec![]
            }),
    )
    .expect("writer");
    let Ok(res) = runtime().block_on(save(&sd, &writer, &Single)) else {
        return;
    };
    let md = &res.metadata;
    if std::env::var_os("DCP_FUZZ_DEBUG").is_some() {
        eprintln!("input: {input:?}\nstate dict: {sd:?}\nmetadata: {md:?}");
    }
    let files: Vec<Vec<u8>> = md
        .files
        .iter()
        .map(|f| mem.get(&f.name).expect("data file written"))
        .collect();
    let parsed: Vec<SafeTensors<'_>> = files
        .iter()
        .zip(&md.files)
        .map(|(bytes, f)| {
            SafeTensors::deserialize(bytes).unwrap_or_else(|e| {
                let hl = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                panic!(
                    "data file {} is not a valid safetensors file: {e:?}\nheader: {}",
                    f.name,
                    String::from_utf8_lossy(&bytes[8..(8 + hl).min(bytes.len())])
                )
            })
        })
        .collect();
    let header_of = |f: usize| -> String {
        let b = &files[f];
        let hl = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        String::from_utf8_lossy(&b[8..(8 + hl).min(b.len())]).into_owned()
    };
    for (name, item) in &md.items {
        let want = &expect[name];
        match item {
            ItemMeta::Tensor { chunks, shape, .. } => {
                for c in chunks {
                    let (_, data) = want
                        .iter()
                        .find(|(r, _)| r.as_ref() == Some(&c.region))
                        .expect("saved chunk was offered");
                    let f = c.storage.file as usize;
                    let whole = c.region == ChunkBox::full(shape);
                    let key = safetensors_key(name, Some(&c.region.offsets), whole);
                    let view = parsed[f].tensor(&key).unwrap_or_else(|e| {
                        panic!("chunk key {key:?}: {e:?}\nheader: {}", header_of(f))
                    });
                    assert_eq!(view.data(), &data[..], "{key}");
                    let at = c.storage.offset as usize;
                    assert_eq!(&files[f][at..at + data.len()], &data[..], "{key}: offset");
                }
            }
            ItemMeta::Bytes { storage, .. } => {
                let data = &want[0].1;
                let f = storage.file as usize;
                let key = safetensors_key(name, None, true);
                let view = parsed[f].tensor(&key).unwrap_or_else(|e| {
                    panic!("bytes item {name:?}: {e:?}\nheader: {}", header_of(f))
                });
                assert_eq!(view.data(), &data[..], "{name}");
            }
        }
    }
}

fuzz_target!(|input: Input| {
    header_case(&input);
    save_case(&input);
});
