//! `load_from`: loads whose ranks each read the metadata themselves (as
//! torch's load protocol does), over a byte transport between processes:
//! shared reads read each saved byte once across the ranks, a rank that
//! fails before it has a destination fails every rank at once, and ranks
//! holding the metadata of different saves are refused.

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

const R: u64 = 40;
const C: u64 = 31;

fn value(r: u64, c: u64) -> [u8; 4] {
    ((r * 1000 + c) as u32).to_le_bytes()
}

/// A collective with only `all_to_all`, as a transport between processes
/// (torch.distributed in the Python package) is: slices travel as bytes.
struct BytesOnly(LocalGroup);

#[async_trait::async_trait]
impl Collective for BytesOnly {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    async fn all_to_all(&self, send: Vec<Bytes>) -> Result<Vec<Bytes>> {
        self.0.all_to_all(send).await
    }
}

/// 4 ranks save `w` [R, C] (u32) split by rows; returns the save id.
async fn save_rows(fs: Arc<dyn FileSystem>, salt: u32) -> String {
    let res = run_ranks(4, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let (lo, hi) = (R * rank / 4, R * (rank + 1) / 4);
            let mut data = Vec::new();
            for r in lo..hi {
                for c in 0..C {
                    data.extend_from_slice(&value(r, c));
                }
            }
            let mut sd = StateDict::new();
            sd.insert_tensor(
                "w",
                DType::U32,
                vec![R, C],
                vec![TensorChunk {
                    region: ChunkBox::new(vec![lo, 0], vec![hi - lo, C])?,
                    data: Bytes::from(data).into(),
                }],
                false,
            )?;
            sd.insert_bytes("salt", salt.to_le_bytes().to_vec(), true)?;
            let w = FileSystemWriter::new(fs, WriterOptions::default())?;
            save(&sd, &w, &g).await
        }
    })
    .await;
    let res: Vec<SaveResult> = res.into_iter().map(|r| r.unwrap()).collect();
    res[0].metadata.save_id.clone()
}

/// Rank `rank` of 3: columns `[C*rank/3, C*(rank+1)/3)` of every row.
fn columns(rank: u64) -> (u64, u64) {
    (C * rank / 3, C * (rank + 1) / 3)
}

fn dest_columns(rank: u64) -> Result<DestStateDict> {
    let (lo, hi) = columns(rank);
    let mut dest = DestStateDict::new();
    dest.want_tensor(
        "w",
        DType::U32,
        vec![R, C],
        vec![ChunkBox::new(vec![0, lo], vec![R, hi - lo])?],
    )?;
    Ok(dest)
}

/// Rows saved by 4 ranks load as columns on 3, each rank with the metadata
/// it read itself: bit-exact, and every saved tensor byte read once in
/// total (every rank needs part of every saved record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_from_shares_reads_over_a_byte_transport() {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://load-from"));
    save_rows(fs.clone(), 1).await;
    let fs3 = fs.clone();
    let res = run_ranks(3, Duration::from_secs(20), move |g| {
        let fs = fs3.clone();
        async move {
            let rank = g.rank() as u64;
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            let md = Arc::new(read_metadata(&r).await?);
            let out = load_from(
                md,
                dest_columns(rank),
                &r,
                &BytesOnly(g),
                &LoadOptions::default(),
            )
            .await?;
            let (lo, hi) = columns(rank);
            let mut expect = Vec::new();
            for r in 0..R {
                for c in lo..hi {
                    expect.extend_from_slice(&value(r, c));
                }
            }
            assert_eq!(out.state_dict.tensor("w").unwrap().chunks[0].data, expect);
            Ok(out.stats.bytes_read)
        }
    })
    .await;
    let total: u64 = res.into_iter().map(|r| r.unwrap()).sum();
    let saved = R * C * 4;
    assert!(
        total >= saved && total <= saved + 4 * 64,
        "read {total} bytes for a {saved}-byte tensor"
    );

    // Without shared reads each rank reads every record whole: 3 times.
    let res = run_ranks(3, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        async move {
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            let md = Arc::new(read_metadata(&r).await?);
            let opts = LoadOptions::default().share_reads(false);
            let rank = g.rank() as u64;
            let out = load_from(md, dest_columns(rank), &r, &BytesOnly(g), &opts).await?;
            Ok(out.stats.bytes_read)
        }
    })
    .await;
    let alone: u64 = res.into_iter().map(|r| r.unwrap()).sum();
    assert!(alone >= 3 * saved, "read {alone} bytes unshared");
}

/// A rank that failed before it had a destination still takes part: every
/// rank fails with its error at once, not at the collective deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_without_a_destination_fails_every_rank_at_once() {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://load-from-fail"));
    save_rows(fs.clone(), 1).await;
    let start = Instant::now();
    let res = run_ranks(3, Duration::from_secs(60), move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            let md = Arc::new(read_metadata(&r).await?);
            let dest = if rank == 1 {
                Err(Error::new(
                    ErrorKind::RankFailed,
                    "rank 1 could not build its destination",
                )
                .with_rank(1))
            } else {
                dest_columns(rank)
            };
            load_from(md, dest, &r, &BytesOnly(g), &LoadOptions::default()).await
        }
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    for r in res {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::RankFailed, "{e}");
        assert!(
            e.message().contains("could not build its destination"),
            "{e}"
        );
    }
}

/// Ranks whose metadata are of different saves (the checkpoint replaced
/// between their reads) are refused on every rank, naming both saves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_with_metadata_of_different_saves_are_refused() {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://load-from-replaced"));
    let first = save_rows(fs.clone(), 1).await;
    let r = FileSystemReader::new(fs.clone(), ReaderOptions::default());
    let old = Arc::new(read_metadata(&r).await.unwrap());
    let second = save_rows(fs.clone(), 2).await;
    assert_ne!(first, second);
    let res = run_ranks(3, Duration::from_secs(20), move |g| {
        let (fs, old) = (fs.clone(), old.clone());
        async move {
            let rank = g.rank() as u64;
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            let md = if rank == 2 {
                old
            } else {
                Arc::new(read_metadata(&r).await?)
            };
            load_from(
                md,
                dest_columns(rank),
                &r,
                &BytesOnly(g),
                &LoadOptions::default(),
            )
            .await
        }
    })
    .await;
    for r in res {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.message().contains("replaced during load"), "{e}");
        assert!(
            e.message().contains(&first) && e.message().contains(&second),
            "{e}"
        );
    }
}
