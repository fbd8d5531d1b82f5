//! The scale simulation does the real protocol's work: at 1,024 ranks, the
//! metadata `simulate_protocol` builds has the same items, chunks and
//! placements (which rank's data file holds each chunk, at what length) as
//! a real save of the same state by 1,024 `LocalGroup` ranks; a simulated
//! cached save (plan and skeleton reused) builds the same metadata.

use dcp_core::checkpoint::simulate::{simulate_protocol, simulate_protocol_with};
use dcp_core::metadata::ItemMeta;
use dcp_core::{
    ChunkBox, DType, DestStateDict, FileSystem, FileSystemWriter, Metadata, StateDict, TensorChunk,
    WriterOptions,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const RANKS: usize = 1024;
const TENSORS: usize = 3;

fn state_dict(rank: usize) -> dcp_core::Result<StateDict> {
    let mut sd = StateDict::new();
    for t in 0..TENSORS {
        let region = ChunkBox::new(vec![rank as u64, 0], vec![1, 4])?;
        sd.insert_tensor(
            format!("layers.{t}.w"),
            DType::U8,
            vec![RANKS as u64, 4],
            vec![TensorChunk::new(region, vec![(rank % 251) as u8; 4])],
            false,
        )?;
    }
    // A replicated item every rank holds: written once.
    sd.insert_bytes("step", b"12345678".to_vec(), true)?;
    Ok(sd)
}

/// (item, chunk offsets) -> (rank of the file holding it, stored length).
fn placements(md: &Metadata) -> BTreeMap<(String, Vec<u64>), (String, u64)> {
    let rank_of = |file: u32| {
        let name = &md.files[file as usize].name;
        name.split('_').nth(2).unwrap().to_string()
    };
    let mut out = BTreeMap::new();
    for (name, item) in &md.items {
        match item {
            ItemMeta::Tensor { chunks, .. } => {
                for c in chunks {
                    out.insert(
                        (name.clone(), c.region.offsets.to_vec()),
                        (rank_of(c.storage.file), c.storage.length),
                    );
                }
            }
            ItemMeta::Bytes { storage, .. } => {
                out.insert(
                    (name.clone(), vec![]),
                    (rank_of(storage.file), storage.length),
                );
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_metadata_matches_a_real_save_at_1024_ranks() {
    let sim = simulate_protocol(RANKS, state_dict, |_| Ok(DestStateDict::new()))
        .unwrap()
        .metadata
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path().join("c")));
    let writer =
        Arc::new(FileSystemWriter::new(fs, WriterOptions::default().sync_files(false)).unwrap());
    let results = dcp_core::local::run_ranks(RANKS, Duration::from_secs(600), move |g| {
        let writer = writer.clone();
        async move {
            let sd = state_dict(dcp_core::Collective::rank(&g))?;
            dcp_core::save(&sd, writer.as_ref(), &g).await
        }
    })
    .await;
    let real = results.into_iter().next().unwrap().unwrap().metadata;

    assert_eq!(sim.world_size, real.world_size);
    assert_eq!(sim.files.len(), real.files.len());
    let names = |md: &Metadata| md.items.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&sim), names(&real));
    assert_eq!(placements(&sim), placements(&real));
    assert_eq!(placements(&sim).len(), RANKS * TENSORS + 1);

    // A second, cached save of the same layout fills the cached skeleton:
    // the same metadata but for its generation.
    let mut cached = simulate_protocol_with(RANKS, state_dict, |_| Ok(DestStateDict::new()), true)
        .unwrap()
        .metadata
        .unwrap();
    assert_eq!(cached.generation, 2);
    cached.generation = sim.generation;
    assert_eq!(cached, sim);
}
