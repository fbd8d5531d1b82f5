//! Shared by the crash child (`dcp-crash-child`) and the reliability tests
//! (`tests/crash.rs`, `tests/hostile.rs`): the deterministic model each
//! checkpoint generation holds, and a small CRC-32C checksum extension so
//! loads verify every record without depending on `dcp-ext`.
//!
//! This directory has no `main.rs`, so cargo does not build it as a binary;
//! each user includes it with `#[path]`.

#![allow(dead_code)]

use dcp_core::transform::Descriptor;
use dcp_core::{
    DType, Error, ErrorKind, ExtensionFactory, ExtensionRegistry, Result, StreamEncoder,
    StreamTransformExtension, TransformKind,
};
use dcp_tests::{Model, Sharding};
use std::sync::Arc;

/// Descriptor name of the test checksum (distinct from `dcp-ext`'s `crc32c`,
/// so the two can never be confused in a checkpoint).
pub const CRC_NAME: &str = "testcrc32c";

/// A `Checksum` transform: CRC-32C of a record's bytes, 4 bytes LE.
#[derive(Debug, Default)]
pub struct TestCrc;

struct TestCrcEncoder(u32);

impl StreamEncoder for TestCrcEncoder {
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
        format!("{CRC_NAME}/1")
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Checksum
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(TestCrcEncoder(0)))
    }
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        if input.len() != expected_len {
            return Err(Error::corrupt(format!(
                "{} bytes where {expected_len} were expected",
                input.len()
            )));
        }
        let want: [u8; 4] = value
            .try_into()
            .map_err(|_| Error::corrupt(format!("checksum value of {} bytes", value.len())))?;
        let got = crc32c::crc32c(input);
        if got != u32::from_le_bytes(want) {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "CRC-32C {got:#010x}, recorded {:#010x}",
                    u32::from_le_bytes(want)
                ),
            ));
        }
        Ok(None)
    }
}

struct TestCrcFactory;

impl ExtensionFactory for TestCrcFactory {
    fn name(&self) -> &str {
        CRC_NAME
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        if d.version != 1 || !d.params.is_empty() {
            return Err(Error::unsupported(format!("{CRC_NAME}: unknown {d}")));
        }
        Ok(Arc::new(TestCrc))
    }
}

/// A registry that resolves the test checksum.
pub fn registry() -> ExtensionRegistry {
    let mut r = ExtensionRegistry::new();
    r.register(Arc::new(TestCrcFactory));
    r
}

/// Ranks that save generation `g` (2 to 4, so consecutive generations differ
/// in world size and in the set of data files).
pub fn world_of(g: u64) -> usize {
    2 + (g % 3) as usize
}

/// What generation `g` holds: a few small tensors under different shardings
/// and bytes items, about 1.5 MiB in all; every byte a function of `g`.
pub fn model(g: u64) -> Model {
    Model {
        seed: 1000 + g,
        ..Model::default()
    }
    .tensor("emb", DType::BF16, &[256, 512], Sharding::Rows)
    .tensor("layers.0.w", DType::F32, &[128, 256], Sharding::Grid)
    .tensor("layers.0.b", DType::F32, &[256], Sharding::Replicated)
    .tensor("layers.1.w", DType::F16, &[300, 200], Sharding::Uneven)
    .tensor("layers.1.v", DType::U8, &[64, 1000], Sharding::Cols)
    .tensor("optim.m", DType::F32, &[96, 333], Sharding::Blocks(2))
    .tensor("optim.step", DType::I64, &[], Sharding::Full)
    .bytes("rng", 5000, true)
    .bytes("config", 300, false)
}

/// User metadata key recording the generation.
pub const GEN_KEY: &str = "crash.generation";

/// Save generation `g` (each rank its state dict of `sds`) into `fs` with
/// `sync_files` on, 2 threads per rank and the test checksum on every record,
/// recording `g` in the user metadata. One result per rank.
pub fn save_gen(
    fs: Arc<dyn dcp_core::FileSystem>,
    sds: Arc<Vec<dcp_core::StateDict>>,
    g: u64,
) -> Vec<Result<()>> {
    use dcp_core::{save_with, Collective, FileSystemWriter, SaveOptions, WriterOptions};
    let writer = Arc::new(
        FileSystemWriter::new(
            fs,
            WriterOptions {
                sync_files: true,
                thread_count: 2,
                extensions: vec![Arc::new(TestCrc)],
                ..Default::default()
            },
        )
        .expect("writer"),
    );
    let options = Arc::new(SaveOptions {
        user_metadata: std::collections::BTreeMap::from([(GEN_KEY.to_string(), g.to_string())]),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(dcp_core::local::run_ranks(
        sds.len(),
        std::time::Duration::from_secs(60),
        move |grp| {
            let (sds, writer, options) = (sds.clone(), writer.clone(), options.clone());
            async move {
                let rank = grp.rank();
                save_with(&sds[rank], writer.as_ref(), &grp, &options)
                    .await
                    .map(|_| ())
            }
        },
    ))
}
