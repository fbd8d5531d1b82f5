//! Shared helpers of the dcp-ext integration tests: a reproducible RNG
//! (`dcp_testkit::data::Rng`), a synthetic sharded state dict whose every
//! byte is a function of its global position, and save/load drivers over
//! `MemoryFs`.
#![allow(dead_code)]

use bytes::Bytes;
use dcp_core::local::run_ranks;
use dcp_core::mem::MemoryFs;
use dcp_core::*;
use std::sync::Arc;
use std::time::Duration;

/// The seeded SplitMix64 stream of `dcp_testkit::data`.
pub use dcp_testkit::data::Rng;

fn mix(a: u64, b: u64) -> u64 {
    dcp_testkit::data::splitmix64(a.wrapping_mul(0x1000_0000_01b3) ^ b)
}

/// A tensor of the test state dict: row-sharded on save, column-sharded on
/// load. `compressible` tensors repeat a short pattern.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub name: &'static str,
    pub dtype: DType,
    pub rows: u64,
    pub cols: u64,
    pub id: u64,
    pub compressible: bool,
}

/// Tensors large enough that some records span several codec pieces
/// (the pipeline feeds codecs at least 64 KiB at a time).
pub const SPECS: &[Spec] = &[
    Spec {
        name: "layers.0.mlp.weight",
        dtype: DType::F32,
        rows: 128,
        cols: 640,
        id: 1,
        compressible: true,
    },
    Spec {
        name: "layers.0.attn.weight",
        dtype: DType::BF16,
        rows: 37,
        cols: 23,
        id: 2,
        compressible: false,
    },
    Spec {
        name: "optim.exp_avg",
        dtype: DType::F32,
        rows: 64,
        cols: 96,
        id: 3,
        compressible: false,
    },
];

/// Replicated on every saving rank.
pub const BIAS: &str = "layers.0.bias";
pub const BIAS_LEN: u64 = 50;

/// The bytes of element `(r, c)` of `spec`, computed independently of any
/// chunking.
pub fn element(spec: &Spec, r: u64, c: u64) -> Vec<u8> {
    let size = spec.dtype.size();
    let v = if spec.compressible {
        // A short repeating pattern: compresses well.
        ((r * 7 + c) % 13) * 0x0101_0101_0101_0101
    } else {
        mix(spec.id, r * spec.cols + c)
    };
    v.to_le_bytes()[..size].to_vec()
}

/// Bytes of the box `[r0, r1) x [c0, c1)`, row-major.
pub fn region(spec: &Spec, r0: u64, r1: u64, c0: u64, c1: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for r in r0..r1 {
        for c in c0..c1 {
            v.extend_from_slice(&element(spec, r, c));
        }
    }
    v
}

pub fn bias() -> Vec<u8> {
    (0..BIAS_LEN)
        .flat_map(|i| (i as f32 * 0.25).to_le_bytes())
        .collect()
}

pub fn rng_state(rank: u64) -> Vec<u8> {
    Rng::new(1000 + rank).bytes(40 + rank as usize * 3)
}

/// What `rank` of `world` saves: rows `[rows*rank/world, rows*(rank+1)/world)`
/// of every tensor, the replicated bias, a replicated step and its own RNG
/// state.
pub fn saved_state(rank: u64, world: u64) -> Result<StateDict> {
    let mut sd = StateDict::new();
    for s in SPECS {
        let (lo, hi) = (s.rows * rank / world, s.rows * (rank + 1) / world);
        sd.insert_tensor(
            s.name,
            s.dtype,
            vec![s.rows, s.cols],
            vec![TensorChunk {
                region: ChunkBox::new(vec![lo, 0], vec![hi - lo, s.cols])?,
                data: Bytes::from(region(s, lo, hi, 0, s.cols)).into(),
            }],
            false,
        )?;
    }
    sd.insert_tensor(
        BIAS,
        DType::F32,
        vec![BIAS_LEN],
        vec![TensorChunk {
            region: ChunkBox::full(&[BIAS_LEN]),
            data: Bytes::from(bias()).into(),
        }],
        true,
    )?;
    sd.insert_bytes("step", b"1234".to_vec(), true)?;
    sd.insert_bytes(format!("rng.{rank}"), rng_state(rank), false)?;
    Ok(sd)
}

/// Column range of `rank` of `world` on load.
pub fn cols_of(spec: &Spec, rank: u64, world: u64) -> (u64, u64) {
    (spec.cols * rank / world, spec.cols * (rank + 1) / world)
}

/// What `rank` of `world` loads: columns of every tensor, the whole bias, the
/// step and every saving rank's RNG state.
pub fn wanted_state(rank: u64, world: u64, saved_world: u64) -> Result<DestStateDict> {
    let mut d = DestStateDict::new();
    for s in SPECS {
        let (lo, hi) = cols_of(s, rank, world);
        d.want_tensor(
            s.name,
            s.dtype,
            vec![s.rows, s.cols],
            vec![ChunkBox::new(vec![0, lo], vec![s.rows, hi - lo])?],
        )?;
    }
    d.want_tensor(
        BIAS,
        DType::F32,
        vec![BIAS_LEN],
        vec![ChunkBox::full(&[BIAS_LEN])],
    )?;
    d.want_bytes("step")?;
    for r in 0..saved_world {
        d.want_bytes(format!("rng.{r}"))?;
    }
    Ok(d)
}

/// Compare every byte of a loaded destination with the independent value.
pub fn check_loaded(d: &DestStateDict, rank: u64, world: u64, saved_world: u64) {
    for s in SPECS {
        let (lo, hi) = cols_of(s, rank, world);
        let t = d
            .tensor(s.name)
            .unwrap_or_else(|| panic!("{} missing", s.name));
        assert_eq!(t.chunks.len(), 1);
        assert!(
            t.chunks[0].data == region(s, 0, s.rows, lo, hi),
            "{} on rank {rank}: loaded bytes differ",
            s.name
        );
    }
    let b = d.tensor(BIAS).expect("bias");
    assert_eq!(b.chunks[0].data, bias());
    assert_eq!(d.bytes("step"), Some(&b"1234"[..]));
    for r in 0..saved_world {
        assert_eq!(
            d.bytes(&format!("rng.{r}")),
            Some(&rng_state(r)[..]),
            "rng.{r}"
        );
    }
}

pub fn writer_options(
    format: FormatKind,
    extensions: Vec<Arc<dyn StreamTransformExtension>>,
) -> WriterOptions {
    WriterOptions::default()
        .thread_count(2)
        .sync_files(false)
        .per_thread_copy_ahead(1)
        // the pipeline raises it to 64 KiB pieces
        .extensions(extensions)
        .serialization_format(dcp_core::format::builtin(&format).unwrap())
}

/// Save the test state dict from `world` ranks; every rank's result.
pub async fn save_world(
    fs: Arc<dyn FileSystem>,
    world: u64,
    opts: WriterOptions,
) -> Vec<Result<SaveResult>> {
    run_ranks(world as usize, Duration::from_secs(30), move |g| {
        let fs = fs.clone();
        let opts = opts.clone();
        async move {
            let sd = saved_state(g.rank() as u64, world)?;
            let w = FileSystemWriter::new(fs, opts)?;
            save(&sd, &w, &g).await
        }
    })
    .await
}

/// Load from `world` ranks (column-sharded) and check every byte on each.
pub async fn load_world(
    fs: Arc<dyn FileSystem>,
    world: u64,
    saved_world: u64,
    opts: ReaderOptions,
) -> Vec<Result<ReadStats>> {
    run_ranks(world as usize, Duration::from_secs(30), move |g| {
        let fs = fs.clone();
        let opts = opts.clone();
        async move {
            let rank = g.rank() as u64;
            let dest = wanted_state(rank, world, saved_world)?;
            let r = FileSystemReader::new(fs, opts);
            let out = load(dest, &r, &g).await?;
            check_loaded(&out.state_dict, rank, world, saved_world);
            Ok(out.stats)
        }
    })
    .await
}

pub fn reader_options() -> ReaderOptions {
    ReaderOptions::default()
        .registry(dcp_ext::registry())
        .thread_count(2)
}

pub fn memfs(name: &str) -> (MemoryFs, Arc<dyn FileSystem>) {
    let m = MemoryFs::new(format!("memory://{name}"));
    let fs: Arc<dyn FileSystem> = Arc::new(m.clone());
    (m, fs)
}

/// Run `t`'s encoder over `data` split at `cuts` (sorted offsets); returns the
/// stored bytes and the recorded value. Asserts that checksum encoders emit
/// nothing.
pub fn encode_pieces(
    t: &dyn StreamTransformExtension,
    data: &[u8],
    cuts: &[usize],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut enc = t.encoder()?;
    let mut stored = Vec::new();
    let mut start = 0;
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        let c = c.clamp(start, data.len());
        let mut out = Vec::new();
        enc.update(&data[start..c], &mut out)?;
        if t.kind() == TransformKind::Checksum {
            assert!(out.is_empty(), "a checksum encoder emitted bytes");
        }
        stored.extend_from_slice(&out);
        start = c;
    }
    let mut out = Vec::new();
    let value = enc.finish(&mut out)?;
    if t.kind() == TransformKind::Checksum {
        assert!(out.is_empty(), "a checksum encoder emitted bytes on finish");
        stored = data.to_vec();
    } else {
        stored.extend_from_slice(&out);
    }
    Ok((stored, value))
}
