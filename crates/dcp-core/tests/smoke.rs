//! End-to-end smoke test of the core over the in-memory file system: 4 ranks
//! save a row-sharded tensor, 3 ranks load it column-sharded.

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::*;
use std::sync::Arc;
use std::time::Duration;

const R: u64 = 37;
const C: u64 = 23;

fn value(r: u64, c: u64) -> [u8; 2] {
    ((r * 1000 + c) as u16).to_le_bytes()
}

fn rows(lo: u64, hi: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for r in lo..hi {
        for c in 0..C {
            v.extend_from_slice(&value(r, c));
        }
    }
    v
}

/// A collective that exposes only `all_to_all`, as a byte transport between
/// processes would: shared reads then send compacted slices. With
/// `claims_shared_memory` it says its ranks share one address space but
/// still cannot share in-process values.
struct BytesOnly {
    g: LocalGroup,
    claims_shared_memory: bool,
}

impl BytesOnly {
    fn new(g: LocalGroup) -> Self {
        BytesOnly {
            g,
            claims_shared_memory: false,
        }
    }
}

#[async_trait::async_trait]
impl Collective for BytesOnly {
    fn rank(&self) -> usize {
        self.g.rank()
    }
    fn world_size(&self) -> usize {
        self.g.world_size()
    }
    fn shares_memory(&self) -> bool {
        self.claims_shared_memory
    }
    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
        self.g.all_to_all(send).await
    }
}

/// A collective claiming one address space without in-process values: a
/// load that would lend buffers through it refuses, on every rank, naming
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lending_through_a_collective_without_local_values_is_refused() {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://refuse"));
    save_rows(fs.clone()).await;
    let res = run_ranks(2, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![R, C],
                vec![ChunkBox::new(
                    vec![0, rank * 11],
                    vec![R, if rank == 0 { 11 } else { C - 11 }],
                )?],
            )?;
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            load(
                dest,
                &r,
                &BytesOnly {
                    g,
                    claims_shared_memory: true,
                },
            )
            .await
        }
    })
    .await;
    for r in res {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("in-process values"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_rows_to_columns() {
    reshard(false, ReaderOptions::default().small_record).await;
}

/// Every record, however small, read with one scattered read straight into
/// the three ranks' buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_rows_to_columns_scattered() {
    reshard(false, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_rows_to_columns_over_a_byte_transport() {
    reshard(true, 0).await;
}

/// 4 ranks save `w` split by rows, and a replicated bytes item `step`.
async fn save_rows(fs: Arc<dyn FileSystem>) -> Vec<SaveResult> {
    let res = run_ranks(4, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let (lo, hi) = (R * rank / 4, R * (rank + 1) / 4);
            let mut sd = StateDict::new();
            sd.insert_tensor(
                "w",
                DType::BF16,
                vec![R, C],
                vec![TensorChunk {
                    region: ChunkBox::new(vec![lo, 0], vec![hi - lo, C])?,
                    data: Bytes::from(rows(lo, hi)).into(),
                }],
                false,
            )?;
            sd.insert_bytes("step", b"42".to_vec(), true)?;
            let opts = WriterOptions::default().thread_count(2);
            let w = FileSystemWriter::new(fs, opts)?;
            save(&sd, &w, &g).await
        }
    })
    .await;
    res.into_iter().map(|r| r.unwrap()).collect()
}

async fn reshard(bytes_only: bool, small_record: u64) {
    let mem = MemoryFs::new("memory://smoke");
    let fs: Arc<dyn FileSystem> = Arc::new(mem.clone());
    let res = save_rows(fs.clone()).await;
    let md = &res[0].metadata;
    assert_eq!(md.world_size, 4);
    assert!(mem.get(".metadata").is_some());

    let fs3 = fs.clone();
    let res = run_ranks(3, Duration::from_secs(20), move |g| {
        let fs = fs3.clone();
        async move {
            let rank = g.rank() as u64;
            let (lo, hi) = (C * rank / 3, C * (rank + 1) / 3);
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![R, C],
                vec![ChunkBox::new(vec![0, lo], vec![R, hi - lo])?],
            )?;
            dest.want_bytes("step")?;
            let r = FileSystemReader::new(fs, ReaderOptions::default().small_record(small_record));
            // A small exchange budget forces several rounds.
            let opts = LoadOptions::default().exchange_budget(2048);
            let out = if bytes_only {
                load_with(dest, &r, &BytesOnly::new(g), &opts).await?
            } else {
                load_with(dest, &r, &g, &opts).await?
            };
            assert!(out.stats.bytes_read > 0);
            let t = out.state_dict.tensor("w").unwrap();
            let mut expect = Vec::new();
            for r in 0..R {
                for c in lo..hi {
                    expect.extend_from_slice(&value(r, c));
                }
            }
            assert_eq!(t.chunks[0].data, expect);
            assert_eq!(out.state_dict.bytes("step"), Some(&b"42"[..]));
            Ok(out.stats)
        }
    })
    .await;
    let total: u64 = res.into_iter().map(|r| r.unwrap().bytes_read).sum();
    // Shared reads: every saved byte is read once across the 3 ranks, not
    // once per rank (the bytes item is read by each rank).
    let saved = R * C * 2;
    assert!(
        total >= saved && total <= saved + 3 * 64,
        "read {total} bytes for a {saved}-byte tensor"
    );
}
