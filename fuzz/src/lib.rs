//! Helpers shared by the fuzz targets: framing a `.metadata` body with a
//! correct header (so mutated bodies get past the CRC), valid sample
//! metadata to mutate, toy transforms (a checksum and a codec) for the
//! registry, and one runtime for the targets that save or load.

use dcp_core::metadata::{
    AppliedTransform, ChunkMeta, DataFile, FormatKind, ItemMeta, Metadata, StorageInfo,
};
use dcp_core::transform::Descriptor;
use dcp_core::{
    ChunkBox, DType, Error, ErrorKind, ExtensionFactory, ExtensionRegistry, Result, StreamEncoder,
    StreamTransformExtension, TransformKind,
};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// `.metadata` framing (a header whose length and CRC match the body, so
/// mutated bodies get past the CRC), shared with the test suites.
pub use dcp_testkit::{encode_metadata_current, frame_metadata};

fn st(file: u32, offset: u64, length: u64, transforms: Vec<AppliedTransform>) -> StorageInfo {
    StorageInfo {
        file,
        offset,
        length,
        transforms,
    }
}

/// Valid metadata of several shapes, as mutation seeds.
pub fn samples() -> Vec<Metadata> {
    let crc = |v: u32| AppliedTransform {
        descriptor: 0,
        value: v.to_le_bytes().to_vec(),
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
        transforms: vec!["testcrc/1".into(), "rev/1".into()],
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
                    shape: vec![4, 2],
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
                                    value: vec![],
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
                    shape: vec![],
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
                    shape: vec![3, 5, 7],
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

/// A checksum transform (`testcrc/1`): CRC-32C, 4 bytes LE.
#[derive(Debug)]
pub struct TestCrc;

struct CrcEnc(u32);

impl StreamEncoder for CrcEnc {
    fn update(&mut self, input: &[u8], _out: &mut Vec<u8>) -> Result<()> {
        self.0 = crc32c::crc32c_append(self.0, input);
        Ok(())
    }
    fn finish(self: Box<Self>, _out: &mut Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.0.to_le_bytes().to_vec())
    }
}

impl StreamTransformExtension for TestCrc {
    fn descriptor(&self) -> String {
        "testcrc/1".into()
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Checksum
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(CrcEnc(0)))
    }
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        if input.len() != expected_len {
            return Err(Error::corrupt("checksum input length"));
        }
        if value != crc32c::crc32c(input).to_le_bytes() {
            return Err(Error::new(ErrorKind::ChecksumMismatch, "crc mismatch"));
        }
        Ok(None)
    }
}

/// A codec (`rev/1`): reverses each record. Its decoder allocates exactly
/// `expected_len`, as the trait asks, after checking the input length.
#[derive(Debug)]
pub struct Rev;

struct RevEnc(Vec<u8>);

impl StreamEncoder for RevEnc {
    fn update(&mut self, input: &[u8], _out: &mut Vec<u8>) -> Result<()> {
        self.0.extend_from_slice(input);
        Ok(())
    }
    fn finish(self: Box<Self>, out: &mut Vec<u8>) -> Result<Vec<u8>> {
        out.extend(self.0.iter().rev());
        Ok(Vec::new())
    }
}

impl StreamTransformExtension for Rev {
    fn descriptor(&self) -> String {
        "rev/1".into()
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Codec
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(RevEnc(Vec::new())))
    }
    fn decode(&self, input: &[u8], _value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        if input.len() != expected_len {
            return Err(Error::corrupt(format!(
                "rev: {} bytes, expected {expected_len}",
                input.len()
            )));
        }
        Ok(Some(input.iter().rev().copied().collect()))
    }
}

struct Factory(&'static str);

impl ExtensionFactory for Factory {
    fn name(&self) -> &str {
        self.0
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        if d.version != 1 || !d.params.is_empty() {
            return Err(Error::unsupported(format!("unknown {d}")));
        }
        Ok(match self.0 {
            "testcrc" => Arc::new(TestCrc),
            _ => Arc::new(Rev),
        })
    }
}

/// A registry resolving `testcrc/1` and `rev/1`.
pub fn registry() -> ExtensionRegistry {
    let mut r = ExtensionRegistry::new();
    r.register(Arc::new(Factory("testcrc")));
    r.register(Arc::new(Factory("rev")));
    r
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
