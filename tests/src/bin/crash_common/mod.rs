//! Shared by the crash child (`dcp-crash-child`) and the reliability tests
//! (`tests/crash.rs`, `tests/hostile.rs`): the deterministic model each
//! checkpoint generation holds, the CRC-32C checksum every record carries,
//! and the save of one generation.
//!
//! This directory has no `main.rs`, so cargo does not build it as a binary;
//! each user includes it with `#[path]`.

#![allow(dead_code)]

use dcp_core::{DType, ExtensionRegistry, Result};
use dcp_tests::{Model, Sharding};
use std::sync::Arc;

/// The checksum every crash-test record carries: `dcp-ext`'s CRC-32C.
pub type TestCrc = dcp_ext::Crc32c;

/// A registry that resolves every `dcp-ext` extension.
pub fn registry() -> ExtensionRegistry {
    dcp_ext::registry()
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
            WriterOptions::default()
                .sync_files(true)
                .thread_count(2)
                .extensions(vec![Arc::new(TestCrc::new())]),
        )
        .expect("writer"),
    );
    let options = Arc::new(
        SaveOptions::default().user_metadata(std::collections::BTreeMap::from([(
            GEN_KEY.to_string(),
            g.to_string(),
        )])),
    );
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
