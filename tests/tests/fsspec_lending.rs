//! Loading through dcp-fsspec's reader keeps every fast path of a
//! `FileSystemReader`: ranks of one process (`LocalGroup`) loading a
//! resharded checkpoint lend each other their buffers, so each saved byte is
//! read once in total, exactly as through dcp-fs's reader.

use async_trait::async_trait;
use dcp_core::local::run_ranks;
use dcp_core::metadata::ItemMeta;
use dcp_core::plan::LoadPlan;
use dcp_core::{
    load, Collective, DType, DestStateDict, FileSystem, LoadResult, Metadata, ReadStats,
    ReaderOptions, Result, StorageReader,
};
use dcp_tests::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const SAVED: usize = 4;
const LOADING: usize = 3;

/// One tensor, rows by 4 ranks when saved, columns by 3 when loaded: every
/// rank needs a slice of every saved record (512 KiB each, above the
/// `small_record` default, so padding is never read).
fn model() -> Model {
    Model {
        seed: 5,
        ..Model::default()
    }
    .tensor("w", DType::BF16, &[1024, 1024], Sharding::Rows)
}

/// Load `m` on `LOADING` ranks of one process through `reader`.
async fn load_all<R: StorageReader + 'static>(m: &Model, reader: Arc<R>) -> Vec<LoadResult> {
    let dests: Vec<Option<DestStateDict>> = (0..LOADING)
        .map(|r| Some(m.dest(r, LOADING, SAVED, &|_| Sharding::Cols)))
        .collect();
    let dests = Arc::new(Mutex::new(dests));
    let res = run_ranks(LOADING, TIMEOUT, move |g| {
        let reader = reader.clone();
        let dests = dests.clone();
        async move {
            let dest = dests.lock().unwrap()[g.rank()].take().unwrap();
            load(dest, reader.as_ref(), &g).await
        }
    })
    .await;
    let out = all_ok(res, "load");
    for r in &out {
        m.check(&r.state_dict, SAVED);
    }
    out
}

/// Bytes of every record of the checkpoint.
fn record_bytes(md: &Metadata) -> u64 {
    md.items
        .iter()
        .map(|(_, it)| match it {
            ItemMeta::Tensor { chunks, .. } => chunks.iter().map(|c| c.storage.length).sum::<u64>(),
            ItemMeta::Bytes { storage, .. } => storage.length,
        })
        .sum()
}

fn per_rank_reads(out: &[LoadResult]) -> Vec<u64> {
    out.iter().map(|o| o.stats.bytes_read).collect()
}

/// A reader that forwards to a `FileSystemReader` but does not say it is
/// one: what a delegating wrapper looks like when it forgets
/// `file_system_reader`.
struct Opaque(dcp_core::FileSystemReader);

#[async_trait]
impl StorageReader for Opaque {
    fn location(&self) -> String {
        self.0.location()
    }
    async fn read_metadata(&self) -> Result<Vec<u8>> {
        self.0.read_metadata().await
    }
    async fn read(
        &self,
        md: Arc<Metadata>,
        plan: LoadPlan,
        dest: DestStateDict,
    ) -> Result<(DestStateDict, ReadStats)> {
        self.0.read(md, plan, dest).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsspec_reader_lends_buffers_between_ranks_of_one_process() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(dcp_fs::LocalFs::new(dir.path()));
    let saved = save_model(fs, &m, SAVED, fast_writer()).await;
    let md = saved[0].metadata.clone();
    let records = record_bytes(&md);
    assert_eq!(records, m.spec("w").nbytes());

    let url = format!("file://{}", dir.path().display());
    let fsspec =
        dcp_fsspec::reader(&url, &HashMap::new(), ReaderOptions::default()).expect("open file://");
    assert!(fsspec.file_system_reader().is_some());
    let through_fsspec = load_all(&m, Arc::new(fsspec.clone())).await;
    let local = load_all(
        &m,
        Arc::new(dcp_fs::reader(dir.path(), ReaderOptions::default())),
    )
    .await;

    // Each saved byte read once across the ranks, and nothing else.
    let fsspec_reads = per_rank_reads(&through_fsspec);
    assert_eq!(
        fsspec_reads.iter().sum::<u64>(),
        records,
        "{fsspec_reads:?}"
    );
    // The same reads as dcp-fs's reader, rank by rank: the lending path.
    assert_eq!(fsspec_reads, per_rank_reads(&local));
    // The readers split the shared records between them.
    assert!(fsspec_reads.iter().all(|&r| r > 0), "{fsspec_reads:?}");

    // A wrapper that hides the FileSystemReader still loads the right bytes
    // (through the collective), but the ranks no longer read the same way:
    // the assertion above is what catches a lost fast path.
    let opaque = load_all(&m, Arc::new(Opaque(fsspec))).await;
    assert_ne!(per_rank_reads(&opaque), fsspec_reads);
}
