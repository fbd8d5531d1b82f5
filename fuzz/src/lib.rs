//! Helpers shared by the fuzz targets: framing a `.metadata` body with a
//! correct header (so mutated bodies get past the CRC), valid sample
//! metadata to mutate, dcp-ext's registry (the real decoders), and one
//! runtime for the targets that save or load.

use dcp_core::metadata::{
    AppliedTransform, ChunkMeta, DataFile, FormatKind, ItemMeta, Metadata, StorageInfo,
};
use dcp_core::{ChunkBox, DType, ExtensionRegistry};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// `.metadata` framing (a header whose length and CRC match the body, so
/// mutated bodies get past the CRC), shared with the test suites.
pub use dcp_testkit::{encode_metadata_current, frame_metadata};

fn st(file: u32, offset: u64, length: u64, transforms: Vec<AppliedTransform>) -> StorageInfo {
    StorageInfo {
        file,
        offset,
        length,
        transforms: transforms.into(),
    }
}

/// Valid metadata of several shapes, as mutation seeds.
pub fn samples() -> Vec<Metadata> {
    let crc = |v: u32| AppliedTransform {
        descriptor: 0,
        value: v.to_le_bytes()[..].into(),
        input_len: None,
    };
    let a = Metadata {
        save_id: "00112233aabbccdd".into(),
        world_size: 2,
        format: FormatKind::Raw,
        files: vec![
            DataFile {
                name: "__0_0-00112233aabbccdd.dcp".into(),
                length: 256,
            },
            DataFile {
                name: "__1_0-00112233aabbccdd.dcp".into(),
                length: 128,
            },
        ],
        transforms: vec!["crc32c/1".into(), "lz4/1".into()],
        items: vec![
            (
                "a".into(),
                ItemMeta::Bytes {
                    length: 5,
                    storage: st(1, 0, 5, vec![crc(7)]),
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
                            storage: st(0, 0, 16, vec![]),
                        },
                        ChunkMeta {
                            region: ChunkBox::new(vec![2, 0], vec![2, 2]).unwrap(),
                            storage: st(
                                0,
                                64,
                                16,
                                vec![AppliedTransform {
                                    descriptor: 1,
                                    value: Default::default(),
                                    input_len: Some(16),
                                }],
                            ),
                        },
                    ],
                },
            ),
        ],
        user: BTreeMap::from([("step".into(), "100".into())]),
        generation: 1,
    };
    let b = Metadata {
        save_id: "ffffffffffffffff".into(),
        world_size: 1,
        format: FormatKind::Safetensors,
        files: vec![DataFile {
            name: "__0_0-ffffffffffffffff.safetensors".into(),
            length: 1 << 20,
        }],
        transforms: vec![],
        items: vec![
            (
                "s".into(),
                ItemMeta::Tensor {
                    dtype: DType::I64,
                    shape: Default::default(),
                    chunks: vec![ChunkMeta {
                        region: ChunkBox::full(&[]),
                        storage: st(0, 100, 8, vec![]),
                    }],
                },
            ),
            (
                "t".into(),
                ItemMeta::Tensor {
                    dtype: DType::BF16,
                    shape: vec![3, 5, 7].into(),
                    chunks: vec![
                        ChunkMeta {
                            region: ChunkBox::new(vec![0, 0, 0], vec![3, 5, 3]).unwrap(),
                            storage: st(0, 200, 90, vec![]),
                        },
                        ChunkMeta {
                            region: ChunkBox::new(vec![0, 0, 3], vec![3, 5, 4]).unwrap(),
                            storage: st(0, 300, 120, vec![]),
                        },
                    ],
                },
            ),
        ],
        user: BTreeMap::new(),
        generation: 1,
    };
    let c = Metadata {
        save_id: "x".into(),
        world_size: 3,
        format: FormatKind::Raw,
        files: vec![],
        transforms: vec![],
        items: vec![],
        user: BTreeMap::from([("k".into(), "v".into()), ("k2".into(), String::new())]),
        generation: 1,
    };
    vec![a, b, c]
}

/// The registry of dcp-ext: the real zstd and lz4 decoders and the CRC-32C
/// and CRC-32 checks a reader uses (`zstd/1:level=N`, `lz4/1`, `crc32c/1`,
/// `crc32/1`), so the targets decode records as a real load does.
pub fn registry() -> ExtensionRegistry {
    dcp_ext::registry()
}

/// One current-thread runtime (with its blocking pool) for every input.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Every dtype, indexable by a fuzzer byte.
pub fn dtype(b: u8) -> DType {
    DType::ALL[b as usize % DType::ALL.len()]
}
