//! Hostile metadata through the whole load: build metadata from the input
//! (any shapes, boxes, offsets, lengths, claimed file lengths, transforms),
//! encode it without validation and decode it (which validates); if it is
//! accepted, plan a load with `DefaultLoadPlanner` for arbitrary destination
//! boxes and run the read over a `MemoryFs` holding files of arbitrary bytes
//! and lengths. Must never panic, hang or allocate beyond what the files
//! and the destination justify (run with `-rss_limit_mb=2048`, which also
//! caps single allocations).
//!
//! Records go through dcp-ext's real decoders (zstd, lz4, CRC-32C, CRC-32;
//! checksums given the right value when the input asks, so verified reads
//! reach the copy paths). A load that succeeds must have returned exactly
//! the file's bytes: every destination element covered by exactly one saved
//! chunk stored without a codec is compared with a naive reference (the
//! element's row-major position in that chunk's record), and every bytes
//! item with the record's bytes (up to 2^18 element checks per input).
#![no_main]

use arbitrary::Arbitrary;
use dcp_core::mem::MemoryFs;
use dcp_core::metadata::{AppliedTransform, ChunkMeta, DataFile, ItemMeta, Metadata, StorageInfo};
use dcp_core::plan::{DefaultLoadPlanner, LoadPlanner};
use dcp_core::{
    load_with, ChunkBox, DestItem, DestStateDict, FileSystem, FileSystemReader, FormatKind,
    LoadOptions, ReaderOptions, Single,
};
use dcp_fuzz::{dtype, encode_metadata_current, registry, runtime};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Arbitrary, Debug)]
struct FFile {
    /// Claimed length: small, or any u64.
    claimed: u64,
    huge: bool,
    /// Actual bytes in the file.
    actual: u16,
    fill: u8,
}

#[derive(Arbitrary, Debug)]
struct FTransform {
    descriptor: u8,
    value: Vec<u8>,
    input_len: Option<u64>,
    small_input_len: bool,
}

#[derive(Arbitrary, Debug)]
struct FStorage {
    file: u8,
    offset: u32,
    /// `None`: the length the chunk's box implies.
    length: Option<u64>,
    transforms: Vec<FTransform>,
    good_crc: bool,
}

#[derive(Arbitrary, Debug)]
struct FChunk {
    offsets: Vec<u32>,
    sizes: Vec<u32>,
    storage: FStorage,
}

#[derive(Arbitrary, Debug)]
enum FItem {
    Tensor {
        dtype: u8,
        shape: Vec<u32>,
        chunks: Vec<FChunk>,
    },
    Bytes {
        length: u64,
        auto: bool,
        storage: FStorage,
    },
}

#[derive(Arbitrary, Debug)]
struct FDest {
    item: u8,
    boxes: Vec<(Vec<u32>, Vec<u32>)>,
    wrong_dtype: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    files: Vec<FFile>,
    transforms: Vec<u8>,
    items: Vec<FItem>,
    dests: Vec<FDest>,
    allow_missing: bool,
    verify: bool,
    threads: u8,
    gap: u32,
    max_request: u32,
    /// Tidy mode: claimed file lengths are the real ones, shapes small,
    /// chunk boxes inside their shape and records inside their file, so
    /// that many loads succeed and reach the comparison with the reference.
    tidy: bool,
}

/// Real descriptors (and one unknown version): codecs and checksums of
/// dcp-ext.
const DESCRIPTORS: [&str; 6] = [
    "crc32c/1",
    "crc32/1",
    "zstd/1:level=3",
    "lz4/1",
    "crc32c/2",
    "zstd/1",
];
/// Element comparisons against the reference per input.
const CHECK_BUDGET: u64 = 1 << 18;
/// Destination buffers the harness may allocate per input.
const DEST_BUDGET: u64 = 4 << 20;

fn storage(s: &FStorage, logical: u64, nfiles: usize, ntransforms: usize) -> StorageInfo {
    let length = s.length.unwrap_or(logical);
    StorageInfo {
        file: if nfiles == 0 {
            s.file as u32
        } else {
            (s.file as usize % (nfiles + 1)) as u32
        },
        offset: s.offset as u64,
        length,
        transforms: s
            .transforms
            .iter()
            .take(3)
            .map(|t| AppliedTransform {
                descriptor: if ntransforms == 0 {
                    t.descriptor as u32
                } else {
                    (t.descriptor as usize % (ntransforms + 1)) as u32
                },
                value: t.value[..].into(),
                input_len: if t.small_input_len {
                    t.input_len.map(|l| l % logical.saturating_add(2))
                } else {
                    t.input_len
                },
            })
            .collect(),
    }
}

/// Tidy mode: the record's length is its logical length and it lies inside
/// its file when the file is long enough.
fn tidy_record(st: &mut StorageInfo, logical: u64, contents: &[Vec<u8>]) {
    if contents.is_empty() {
        return;
    }
    st.file %= contents.len() as u32;
    st.length = logical;
    let have = contents[st.file as usize].len() as u64;
    if have >= logical {
        st.offset %= have - logical + 1;
    }
}

fn build(input: &Input) -> (Metadata, Vec<Vec<u8>>) {
    let files: Vec<DataFile> = input
        .files
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, f)| DataFile {
            name: format!("__{i}_0-fuzz.dcp"),
            length: if input.tidy {
                f.actual as u64
            } else if f.huge {
                f.claimed
            } else {
                f.claimed % 70_000
            },
        })
        .collect();
    let contents: Vec<Vec<u8>> = input
        .files
        .iter()
        .take(4)
        .map(|f| {
            (0..f.actual as usize)
                .map(|i| (i as u8).wrapping_mul(17) ^ f.fill)
                .collect()
        })
        .collect();
    let transforms: Vec<String> = input
        .transforms
        .iter()
        .take(4)
        .map(|&t| DESCRIPTORS[t as usize % DESCRIPTORS.len()].to_string())
        .collect();
    let mut items = Vec::new();
    for (i, it) in input.items.iter().take(6).enumerate() {
        let meta = match it {
            FItem::Tensor {
                dtype: d,
                shape,
                chunks,
            } => {
                let dt = dtype(*d);
                let shape: Vec<u64> = shape
                    .iter()
                    .take(4)
                    .map(|&s| {
                        if input.tidy {
                            s as u64 % 8 + 1
                        } else {
                            s as u64
                        }
                    })
                    .collect();
                let chunks = chunks
                    .iter()
                    .take(8)
                    .map(|c| {
                        let region = if input.tidy {
                            // Inside the shape, one entry per dimension.
                            let offsets: Vec<u64> = (0..shape.len())
                                .map(|k| c.offsets.get(k).map_or(0, |&x| x as u64 % shape[k]))
                                .collect();
                            let sizes = (0..shape.len())
                                .map(|k| {
                                    let room = shape[k] - offsets[k];
                                    c.sizes.get(k).map_or(room, |&x| x as u64 % room + 1)
                                })
                                .collect();
                            ChunkBox {
                                offsets: offsets.into(),
                                sizes,
                            }
                        } else {
                            ChunkBox {
                                offsets: c.offsets.iter().take(4).map(|&x| x as u64).collect(),
                                sizes: c.sizes.iter().take(4).map(|&x| x as u64).collect(),
                            }
                        };
                        let logical = region
                            .checked_numel()
                            .and_then(|n| n.checked_mul(dt.size() as u64))
                            .unwrap_or(u64::MAX);
                        let mut storage =
                            storage(&c.storage, logical, files.len(), transforms.len());
                        if input.tidy {
                            tidy_record(&mut storage, logical, &contents);
                        }
                        ChunkMeta { storage, region }
                    })
                    .collect();
                ItemMeta::Tensor {
                    dtype: dt,
                    shape: shape.into(),
                    chunks,
                }
            }
            FItem::Bytes {
                length,
                auto,
                storage: s,
            } => {
                let length = if *auto || input.tidy {
                    *length % 70_000
                } else {
                    *length
                };
                let mut storage = storage(s, length, files.len(), transforms.len());
                if input.tidy {
                    tidy_record(&mut storage, length, &contents);
                }
                ItemMeta::Bytes { length, storage }
            }
        };
        items.push((format!("item{i}"), meta));
    }
    let mut md = Metadata {
        save_id: "fuzz".into(),
        world_size: 1,
        format: FormatKind::Raw,
        files,
        transforms,
        items,
        user: BTreeMap::new(),
        generation: 1,
    };
    // Give checksums the right value when asked, so verified reads get past
    // the CRC and into the copy paths.
    let fixes: Vec<_> = input.items.iter().take(6).collect();
    for ((_, item), f) in md.items.iter_mut().zip(fixes) {
        let pairs: Vec<(&mut StorageInfo, &FStorage)> = match (item, f) {
            (ItemMeta::Tensor { chunks, .. }, FItem::Tensor { chunks: fc, .. }) => chunks
                .iter_mut()
                .zip(fc.iter())
                .map(|(c, f)| (&mut c.storage, &f.storage))
                .collect(),
            (ItemMeta::Bytes { storage, .. }, FItem::Bytes { storage: fs, .. }) => {
                vec![(storage, fs)]
            }
            _ => vec![],
        };
        for (st, fs) in pairs {
            if !fs.good_crc {
                continue;
            }
            let Some(data) = contents.get(st.file as usize) else {
                continue;
            };
            let (o, l) = (st.offset as usize, st.length as usize);
            if o.checked_add(l).is_some_and(|e| e <= data.len()) {
                let rec = &data[o..o + l];
                for t in &mut st.transforms {
                    match md.transforms.get(t.descriptor as usize).map(String::as_str) {
                        Some("crc32c/1") => t.value = crc32c::crc32c(rec).to_le_bytes()[..].into(),
                        Some("crc32/1") => t.value = crc32fast::hash(rec).to_le_bytes()[..].into(),
                        _ => {}
                    }
                }
            }
        }
    }
    (md, contents)
}

fn dest_for(md: &Metadata, input: &Input) -> DestStateDict {
    let mut dest = DestStateDict::new();
    let mut budget = DEST_BUDGET;
    for d in input.dests.iter().take(6) {
        if md.items.is_empty() {
            break;
        }
        let (name, item) = &md.items[d.item as usize % md.items.len()];
        match item {
            ItemMeta::Bytes { .. } => {
                let _ = dest.want_bytes(name.clone());
            }
            ItemMeta::Tensor {
                dtype: dt, shape, ..
            } => {
                let dt = if d.wrong_dtype {
                    dtype(dt.code().wrapping_add(1))
                } else {
                    *dt
                };
                let mut regions = Vec::new();
                for (offs, sizes) in d.boxes.iter().take(4) {
                    let mut b = ChunkBox::full(shape);
                    for k in 0..shape.len() {
                        let o = offs.get(k).map_or(0, |&x| x as u64 % (shape[k] + 1));
                        let s = sizes
                            .get(k)
                            .map_or(shape[k] - o, |&x| x as u64 % (shape[k] - o + 1));
                        b.offsets[k] = o;
                        b.sizes[k] = s;
                    }
                    let bytes = b
                        .checked_numel()
                        .and_then(|n| n.checked_mul(dt.size() as u64));
                    match bytes {
                        Some(n) if n <= budget => {
                            budget -= n;
                            regions.push(b);
                        }
                        _ => {}
                    }
                }
                let _ = dest.want_tensor(name.clone(), dt, shape.to_vec(), regions);
            }
        }
    }
    dest
}

/// Whether a record is stored through a codec (its bytes in the file are not
/// the logical bytes).
fn has_codec(md: &Metadata, st: &StorageInfo) -> bool {
    st.transforms.iter().any(|t| {
        md.transforms
            .get(t.descriptor as usize)
            .is_none_or(|d| !d.starts_with("crc32"))
    })
}

/// The file bytes of `len` bytes at `offset` in file `file`, if present.
fn file_bytes(files: &[Vec<u8>], file: u32, offset: u64, len: u64) -> Option<&[u8]> {
    let f = files.get(file as usize)?;
    let end = offset.checked_add(len)?;
    f.get(offset as usize..usize::try_from(end).ok()?)
}

/// A load that succeeded returned the file's bytes: the naive reference
/// (see the module doc).
fn check_against_reference(md: &Metadata, files: &[Vec<u8>], loaded: &DestStateDict) {
    let mut budget = CHECK_BUDGET;
    for (name, item) in loaded.iter() {
        let Some((_, meta)) = md.items.iter().find(|(n, _)| n == name) else {
            continue;
        };
        match (item, meta) {
            (DestItem::Bytes(Some(got)), ItemMeta::Bytes { length, storage }) => {
                if has_codec(md, storage) {
                    continue;
                }
                let want = file_bytes(files, storage.file, storage.offset, *length)
                    .expect("a loaded bytes item lies inside its file");
                assert_eq!(&got[..], want, "{name}: loaded bytes differ from the file");
            }
            (DestItem::Tensor(t), ItemMeta::Tensor { dtype, chunks, .. }) => {
                let es = dtype.size() as u64;
                for dc in &t.chunks {
                    let r = &dc.region;
                    let n = r.checked_numel().expect("a loaded box has a size");
                    assert_eq!(dc.data.len() as u64, n * es, "{name}: buffer length");
                    let mut coord = r.offsets.clone();
                    for k in 0..n {
                        if budget == 0 {
                            return;
                        }
                        budget -= 1;
                        // The saved chunks holding this element.
                        let mut holders = chunks.iter().filter(|c| {
                            c.region
                                .offsets
                                .iter()
                                .zip(&c.region.sizes)
                                .zip(&coord)
                                .all(|((&o, &s), &x)| x >= o && x - o < s)
                        });
                        if let (Some(c), None) = (holders.next(), holders.next()) {
                            if !has_codec(md, &c.storage) {
                                let mut idx = 0u64;
                                for d in 0..coord.len() {
                                    idx =
                                        idx * c.region.sizes[d] + (coord[d] - c.region.offsets[d]);
                                }
                                let want = file_bytes(
                                    files,
                                    c.storage.file,
                                    c.storage.offset + idx * es,
                                    es,
                                )
                                .expect("a loaded element lies inside its file");
                                let got = &dc.data[(k * es) as usize..((k + 1) * es) as usize];
                                assert_eq!(
                                    got, want,
                                    "{name}: element {coord:?} of destination {r} differs from \
                                     the file"
                                );
                            }
                        }
                        // Next coordinate, row-major.
                        for d in (0..coord.len()).rev() {
                            coord[d] += 1;
                            if coord[d] < r.offsets[d] + r.sizes[d] {
                                break;
                            }
                            coord[d] = r.offsets[d];
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fuzz_target!(|input: Input| {
    let (md, contents) = build(&input);
    let encoded = encode_metadata_current(&md);
    let Ok(md) = Metadata::decode(&encoded) else {
        return;
    };
    let mem = MemoryFs::new("memory://fuzz");
    for (f, data) in md.files.iter().zip(&contents) {
        mem.put(&f.name, data.clone());
    }
    mem.put(".metadata", encoded);
    let dest = dest_for(&md, &input);
    let planner = DefaultLoadPlanner {
        allow_missing: input.allow_missing,
    };
    // The planner alone, then the whole load through the reader.
    let _ = planner.plan(&md, &dest);
    let fs: Arc<dyn FileSystem> = Arc::new(mem);
    let reader = FileSystemReader::new(
        fs,
        ReaderOptions::default()
            .thread_count(1 + input.threads as usize % 4)
            .verify_checksums(input.verify)
            .registry(registry())
            .coalesce_gap(input.gap as u64)
            .max_request(input.max_request as u64)
            // Both read paths: straight into destinations and through spans.
            .small_record(if input.verify { 0 } else { 256 * 1024 }),
    );
    let options = LoadOptions::default().planner(Arc::new(planner));
    if let Ok(loaded) = runtime().block_on(load_with(dest, &reader, &Single, &options)) {
        let files: Vec<Vec<u8>> = md
            .files
            .iter()
            .zip(&contents)
            .map(|(_, c)| c.clone())
            .collect();
        check_against_reference(&md, &files, &loaded.state_dict);
    }
});
