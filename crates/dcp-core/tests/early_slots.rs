//! Ranks of one process that lend each other their buffers move them into
//! read slots while rank 0 reads the metadata (rank 0 on a blocking thread
//! beside its read): the planner of every rank then plans against a
//! destination whose buffers are moved out
//! (its contract: plan from names, dtypes, shapes and regions only), and
//! the load still fills every byte, resharded (shared reads) or not (each
//! rank reads alone into its slots). Without shared reads nothing moves
//! early.

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::plan::{DefaultLoadPlanner, LoadPlan, LoadPlanner};
use dcp_core::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const R: u64 = 24;
const C: u64 = 10;

fn value(t: u64, r: u64, c: u64) -> [u8; 4] {
    ((t * 100_000 + r * 100 + c) as u32).to_le_bytes()
}

/// 2 ranks save tensors `t0`..`t2` [R, C] (u32), split by rows.
async fn save_rows(fs: Arc<dyn FileSystem>) {
    let res = run_ranks(2, Duration::from_secs(20), move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let (lo, hi) = (R * rank / 2, R * (rank + 1) / 2);
            let mut sd = StateDict::new();
            for t in 0..3 {
                let mut data = Vec::new();
                for r in lo..hi {
                    for c in 0..C {
                        data.extend_from_slice(&value(t, r, c));
                    }
                }
                sd.insert_tensor(
                    format!("t{t}"),
                    DType::U32,
                    vec![R, C],
                    vec![TensorChunk {
                        region: ChunkBox::new(vec![lo, 0], vec![hi - lo, C])?,
                        data: Bytes::from(data).into(),
                    }],
                    false,
                )?;
            }
            let w = FileSystemWriter::new(fs, WriterOptions::default())?;
            save(&sd, &w, &g).await
        }
    })
    .await;
    for r in res {
        r.unwrap();
    }
}

/// The default planner, recording for each destination it plans (named by
/// its first chunk's region) whether every buffer was empty (moved out).
#[derive(Default)]
struct Recording {
    seen: Mutex<Vec<(ChunkBox, bool)>>,
}

impl LoadPlanner for Recording {
    fn plan(&self, md: &Metadata, dest: &DestStateDict) -> Result<LoadPlan> {
        let mut first = None;
        let mut all_empty = true;
        for (_, item) in dest.iter() {
            if let DestItem::Tensor(t) = item {
                for c in &t.chunks {
                    first.get_or_insert_with(|| c.region.clone());
                    all_empty &= c.data.is_empty();
                }
            }
        }
        let first = first.expect("every destination asks for a tensor");
        self.seen.lock().unwrap().push((first, all_empty));
        DefaultLoadPlanner::default().plan(md, dest)
    }
}

/// Load with `n` ranks, rank `k` asking for `region(k)` of every tensor
/// (odd ranks in reverse name order); check every byte and return what the
/// planner saw, by rank.
async fn load_regions(
    fs: Arc<dyn FileSystem>,
    n: usize,
    region: fn(usize, usize) -> ChunkBox,
    share_reads: bool,
) -> Vec<bool> {
    let planner = Arc::new(Recording::default());
    let mut options = LoadOptions::default();
    options.planner = planner.clone();
    options.share_reads = share_reads;
    let res = run_ranks(n, Duration::from_secs(20), move |g| {
        let (fs, options) = (fs.clone(), options.clone());
        async move {
            let b = region(g.rank(), n);
            let mut dest = DestStateDict::new();
            // Odd ranks ask in reverse name order: the load merges the
            // names inserted out of order before it walks the destination.
            let order = if g.rank() % 2 == 1 {
                [2, 1, 0]
            } else {
                [0, 1, 2]
            };
            for t in order {
                dest.want_tensor(format!("t{t}"), DType::U32, vec![R, C], vec![b.clone()])?;
            }
            let reader = FileSystemReader::new(fs, ReaderOptions::default());
            let loaded = load_with(dest, &reader, &g, &options).await?;
            Ok((b, loaded))
        }
    })
    .await;
    for r in res {
        let (b, loaded) = r.unwrap();
        for t in 0..3u64 {
            let got = loaded.state_dict.tensor(&format!("t{t}")).unwrap().chunks[0]
                .data
                .as_slice()
                .to_vec();
            let mut want = Vec::new();
            for r in b.offsets[0]..b.offsets[0] + b.sizes[0] {
                for c in b.offsets[1]..b.offsets[1] + b.sizes[1] {
                    want.extend_from_slice(&value(t, r, c));
                }
            }
            assert_eq!(got, want, "t{t} {b}");
        }
    }
    let seen = planner.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), n, "one plan a rank");
    (0..n)
        .map(|k| {
            let b = region(k, n);
            seen.iter()
                .find(|(first, _)| *first == b)
                .map(|(_, empty)| *empty)
                .expect("every rank planned")
        })
        .collect()
}

/// Rank `k` of `n`: a band of columns of every row (every saved chunk is
/// shared by every rank).
fn columns(k: usize, n: usize) -> ChunkBox {
    let (k, n) = (k as u64, n as u64);
    let (lo, hi) = (C * k / n, C * (k + 1) / n);
    ChunkBox::new(vec![0, lo], vec![R, hi - lo]).unwrap()
}

/// Rank `k` of 2: the rows it saved (no saved chunk is shared).
fn rows(k: usize, n: usize) -> ChunkBox {
    let (k, n) = (k as u64, n as u64);
    let (lo, hi) = (R * k / n, R * (k + 1) / n);
    ChunkBox::new(vec![lo, 0], vec![hi - lo, C]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_that_lend_plan_against_moved_buffers_and_load_every_byte() {
    let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://early-slots"));
    save_rows(fs.clone()).await;
    // Resharded: shared reads, lent buffers.
    assert_eq!(
        load_regions(fs.clone(), 3, columns, true).await,
        vec![true, true, true],
        "every rank moves its buffers while rank 0 reads the metadata"
    );
    // The saved sharding: nothing shared, each rank reads alone into the
    // slots it moved its buffers into.
    assert_eq!(
        load_regions(fs.clone(), 2, rows, true).await,
        vec![true, true]
    );
    // Without shared reads no rank moves its buffers early.
    assert_eq!(
        load_regions(fs, 3, columns, false).await,
        vec![false, false, false]
    );
}
