//! Shared test support: a moto S3 server on 127.0.0.1 (`dcp_testkit::moto`),
//! a sharded state dict with a reference, and save/load helpers over N
//! ranks.
#![allow(dead_code)]

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::*;
use dcp_fsspec::{OpendalFs, OpendalOptions};
use std::sync::Arc;
use std::time::Duration;

pub use dcp_testkit::moto::Moto;

/// A unique name for buckets and memory stores.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Options for fast tests: short retry delays, bounded timeouts.
pub fn fast_options() -> OpendalOptions {
    OpendalOptions {
        part_size: 5 << 20,
        read_chunk: 1 << 20,
        max_retries: 3,
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(100),
        timeout: Duration::from_secs(20),
        io_timeout: Duration::from_secs(20),
        ..OpendalOptions::default()
    }
}

/// The shape of the test checkpoint: `w` is [ROWS, COLS] bf16, saved in
/// row blocks, loaded in column blocks; `big` is [4, BIG_COLS] f32, one row
/// per saving rank (each row one record of BIG_COLS*4 bytes).
pub const ROWS: u64 = 41;
pub const COLS: u64 = 29;

/// The value of element `i` of a tensor, as bytes, varied by `seed`: the
/// low bytes of dcp's generator (`dcp_testkit::data`).
pub fn elem(seed: u32, i: u64, width: usize) -> Vec<u8> {
    dcp_testkit::data::element_bits(seed as u64, i).to_le_bytes()[..width].to_vec()
}

fn fill(seed: u32, idx: impl Iterator<Item = u64>, width: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in idx {
        out.extend_from_slice(&elem(seed, i, width));
    }
    out
}

/// What rank `rank` of `n` saves: a row block of `w`, its row of `big`
/// (when `big_cols > 0`), a replicated `emb`, and a bytes item.
pub fn state_dict(seed: u32, rank: u64, n: u64, big_cols: u64) -> Result<StateDict> {
    let mut sd = StateDict::new();
    let (lo, hi) = (ROWS * rank / n, ROWS * (rank + 1) / n);
    sd.insert_tensor(
        "w",
        DType::BF16,
        vec![ROWS, COLS],
        vec![TensorChunk {
            region: ChunkBox::new(vec![lo, 0], vec![hi - lo, COLS])?,
            data: Bytes::from(fill(seed, lo * COLS..hi * COLS, 2)).into(),
        }],
        false,
    )?;
    if big_cols > 0 {
        sd.insert_tensor(
            "big",
            DType::F32,
            vec![n, big_cols],
            vec![TensorChunk {
                region: ChunkBox::new(vec![rank, 0], vec![1, big_cols])?,
                data: Bytes::from(fill(seed, rank * big_cols..(rank + 1) * big_cols, 4)).into(),
            }],
            false,
        )?;
    }
    sd.insert_tensor(
        "emb",
        DType::F32,
        vec![7],
        vec![TensorChunk {
            region: ChunkBox::full(&[7]),
            data: Bytes::from(fill(seed, 0..7, 4)).into(),
        }],
        true,
    )?;
    sd.insert_bytes("step", format!("step-{seed}").into_bytes(), true)?;
    Ok(sd)
}

/// Save with `n` ranks; every rank's result.
pub async fn save_ranks(
    fs: Arc<dyn FileSystem>,
    n: usize,
    seed: u32,
    big_cols: u64,
    opts: WriterOptions,
    timeout: Duration,
) -> Vec<Result<SaveResult>> {
    run_ranks(n, timeout, move |g| {
        let fs = fs.clone();
        let opts = opts.clone();
        async move {
            let sd = state_dict(seed, g.rank() as u64, n as u64, big_cols)?;
            let w = FileSystemWriter::new(fs, opts)?;
            save(&sd, &w, &g).await
        }
    })
    .await
}

/// Load with `m` ranks, column blocks of `w` and of `big` (saved by
/// `saved_ranks` ranks), and compare every byte with the reference of
/// `seed`. Returns each rank's result.
pub async fn load_and_check(
    fs: Arc<dyn FileSystem>,
    m: usize,
    seed: u32,
    saved_ranks: u64,
    big_cols: u64,
    timeout: Duration,
) -> Vec<Result<ReadStats>> {
    run_ranks(m, timeout, move |g| {
        let fs = fs.clone();
        async move {
            let rank = g.rank() as u64;
            let m = m as u64;
            let (lo, hi) = (COLS * rank / m, COLS * (rank + 1) / m);
            let mut dest = DestStateDict::new();
            dest.want_tensor(
                "w",
                DType::BF16,
                vec![ROWS, COLS],
                vec![ChunkBox::new(vec![0, lo], vec![ROWS, hi - lo])?],
            )?;
            let (blo, bhi) = (big_cols * rank / m, big_cols * (rank + 1) / m);
            if big_cols > 0 {
                dest.want_tensor(
                    "big",
                    DType::F32,
                    vec![saved_ranks, big_cols],
                    vec![ChunkBox::new(vec![0, blo], vec![saved_ranks, bhi - blo])?],
                )?;
            }
            dest.want_tensor("emb", DType::F32, vec![7], vec![ChunkBox::full(&[7])])?;
            dest.want_bytes("step")?;
            let r = FileSystemReader::new(fs, ReaderOptions::default());
            let out = load(dest, &r, &g).await?;
            let sd = &out.state_dict;
            let expect_w = fill(
                seed,
                (0..ROWS).flat_map(|r| (lo..hi).map(move |c| r * COLS + c)),
                2,
            );
            assert!(
                sd.tensor("w").unwrap().chunks[0].data == expect_w,
                "w differs on rank {rank}"
            );
            if big_cols > 0 {
                let expect_big = fill(
                    seed,
                    (0..saved_ranks).flat_map(|r| (blo..bhi).map(move |c| r * big_cols + c)),
                    4,
                );
                assert!(
                    sd.tensor("big").unwrap().chunks[0].data == expect_big,
                    "big differs on rank {rank}"
                );
            }
            assert_eq!(
                sd.tensor("emb").unwrap().chunks[0].data,
                fill(seed, 0..7, 4)
            );
            assert_eq!(sd.bytes("step"), Some(format!("step-{seed}").as_bytes()));
            Ok(out.stats)
        }
    })
    .await
}

/// Assert that every result is `Ok`.
pub fn all_ok<T: std::fmt::Debug>(rs: &[Result<T>]) {
    for (i, r) in rs.iter().enumerate() {
        if let Err(e) = r {
            panic!("rank {i} failed: {e} ({e:?})");
        }
    }
}

/// The data files listed in `fs`, and whether they are exactly those the
/// committed metadata references and those of `previous`, the checkpoint
/// it replaced (kept until the next commit): no stale objects.
pub fn assert_only_referenced(fs: &dyn FileSystem, md: &Metadata, previous: Option<&Metadata>) {
    let listed: Vec<String> = fs
        .list()
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .filter(|n| n != ".metadata")
        .collect();
    let mut referenced: Vec<String> = md
        .files
        .iter()
        .chain(previous.iter().flat_map(|p| &p.files))
        .map(|f| f.name.clone())
        .collect();
    referenced.sort();
    assert_eq!(
        listed, referenced,
        "objects under the prefix differ from the metadata's files"
    );
    for f in &md.files {
        let len = fs.file_len(&f.name).unwrap().unwrap();
        assert_eq!(len, f.length, "{} length", f.name);
    }
}

/// Open an S3 file system on `moto` at `bucket/prefix`.
pub fn s3_fs(moto: &Moto, bucket: &str, prefix: &str, opts: OpendalOptions) -> OpendalFs {
    OpendalFs::from_url_with(&format!("s3://{bucket}/{prefix}"), &moto.options(), opts).unwrap()
}
