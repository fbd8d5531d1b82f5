//! Micro-benchmarks of dcp-core's parts: metadata encode and decode at 10 k,
//! 100 k and 1 M chunks (and bytes per chunk), read planning for 1,000 saved
//! chunks by 1,000 destination chunks, and the copy and scatter kernels
//! against a plain memcpy of the same bytes. Run:
//! `cargo bench -p dcp-core --bench core`.

#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dcp_core::metadata::{ChunkMeta, DataFile, FormatKind, ItemMeta, Metadata, StorageInfo};
use dcp_core::pipeline::copy::{copy_region, LineStreamer};
use dcp_core::plan::{DefaultLoadPlanner, LoadPlanner};
use dcp_core::{ChunkBox, DType, DestStateDict, Dims};
use std::hint::black_box;

/// A metadata of `chunks` chunks: tensors of 1,000 chunks each on a 25 x 40
/// grid, spread over 64 files, with realistic offsets.
fn build(chunks: usize) -> Metadata {
    let per_item = 1000.min(chunks);
    let items = chunks.div_ceil(per_item);
    let files: Vec<DataFile> = (0..64)
        .map(|i| DataFile {
            name: format!("__{}_{}-0123456789abcdef.dcp", i / 8, i % 8),
            length: 1 << 40,
        })
        .collect();
    let mut offsets = vec![0u64; 64];
    let mut out = Vec::with_capacity(items);
    let mut left = chunks;
    for it in 0..items {
        let n = per_item.min(left);
        left -= n;
        let (rows, cols) = (25u64, 40u64);
        let shape = vec![rows * 256, cols * 128];
        let mut cs = Vec::with_capacity(n);
        for c in 0..n as u64 {
            let f = ((it as u64 * 7 + c) % 64) as usize;
            let len = 256 * 128 * 2;
            cs.push(ChunkMeta {
                region: ChunkBox::new(vec![(c / cols) * 256, (c % cols) * 128], vec![256, 128])
                    .unwrap(),
                storage: StorageInfo {
                    file: f as u32,
                    offset: offsets[f],
                    length: len,
                    transforms: Default::default(),
                },
            });
            offsets[f] += len;
        }
        out.push((
            format!("model.layers.{it}.mlp.up_proj.weight"),
            ItemMeta::Tensor {
                dtype: DType::BF16,
                shape: shape.into(),
                chunks: cs,
            },
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Metadata {
        save_id: "0123456789abcdef".into(),
        world_size: 8,
        format: FormatKind::Raw,
        files,
        transforms: Default::default(),
        items: out,
        user: Default::default(),
        generation: 1,
    }
}

fn metadata(c: &mut Criterion) {
    let mut g = c.benchmark_group("metadata");
    g.sample_size(10);
    for n in [10_000usize, 100_000, 1_000_000] {
        let md = build(n);
        let enc = md.encode().unwrap();
        eprintln!(
            "metadata: {n} chunks -> {} bytes, {:.1} bytes per chunk",
            enc.len(),
            enc.len() as f64 / n as f64
        );
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("encode", n), &md, |b, md| {
            b.iter(|| black_box(md.encode().unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("decode", n), &enc, |b, enc| {
            b.iter(|| black_box(Metadata::decode(enc).unwrap()))
        });
    }
    g.finish();
}

fn grid(shape: [u64; 2], parts: [u64; 2]) -> Vec<ChunkBox> {
    let mut out = Vec::new();
    for i in 0..parts[0] {
        for j in 0..parts[1] {
            let (r0, r1) = (shape[0] * i / parts[0], shape[0] * (i + 1) / parts[0]);
            let (c0, c1) = (shape[1] * j / parts[1], shape[1] * (j + 1) / parts[1]);
            out.push(ChunkBox::new(vec![r0, c0], vec![r1 - r0, c1 - c0]).unwrap());
        }
    }
    out
}

fn planning(c: &mut Criterion) {
    // 1,000 saved chunks (a 25 x 40 grid) by 1,000 destination chunks (40 x 25).
    let shape = [100_000u64, 100_000];
    let saved = grid(shape, [25, 40]);
    let mut off = 0;
    let chunks = saved
        .iter()
        .map(|b| {
            let c = ChunkMeta {
                region: b.clone(),
                storage: StorageInfo {
                    file: 0,
                    offset: off,
                    length: b.numel() * 2,
                    transforms: Default::default(),
                },
            };
            off += b.numel() * 2;
            c
        })
        .collect();
    let md = Metadata {
        save_id: "0123456789abcdef".into(),
        world_size: 1,
        format: FormatKind::Raw,
        files: vec![DataFile {
            name: "f".into(),
            length: off,
        }],
        transforms: Default::default(),
        items: vec![(
            "w".into(),
            ItemMeta::Tensor {
                dtype: DType::BF16,
                shape: Dims::from_slice(&shape),
                chunks,
            },
        )],
        user: Default::default(),
        generation: 1,
    };
    // Destination chunks with empty buffers are not allowed, so plan against
    // boxes of a small tensor with the same chunk geometry scaled down.
    let small = [1000u64, 1000];
    let small_saved = grid(small, [25, 40]);
    let mut md_small = md.clone();
    if let ItemMeta::Tensor { shape, chunks, .. } = &mut md_small.items[0].1 {
        *shape = Dims::from_slice(&small);
        let mut off = 0;
        for (c, b) in chunks.iter_mut().zip(&small_saved) {
            c.region = b.clone();
            c.storage.offset = off;
            c.storage.length = b.numel() * 2;
            off += b.numel() * 2;
        }
        md_small.files[0].length = off;
    }
    let mut dest = DestStateDict::new();
    dest.want_tensor("w", DType::BF16, small.to_vec(), grid(small, [40, 25]))
        .unwrap();
    let planner = DefaultLoadPlanner::default();
    c.bench_function("plan_1000x1000", |b| {
        b.iter(|| black_box(planner.plan(&md_small, &dest).unwrap()))
    });
}

fn copy(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy");
    // A 4096 x 4096 bf16 chunk (32 MiB): columns 1024..3072 into a column chunk.
    let src_box = ChunkBox::new(vec![0, 0], vec![4096, 4096]).unwrap();
    let dst_box = ChunkBox::new(vec![0, 1024], vec![4096, 2048]).unwrap();
    let region = dst_box.clone();
    let src = vec![7u8; 4096 * 4096 * 2];
    let mut dst = vec![0u8; 4096 * 2048 * 2];
    g.throughput(Throughput::Bytes(dst.len() as u64));
    let n = dst.len();
    g.bench_function("memcpy_16MiB", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src[..n])))
    });
    g.bench_function("strided_columns_16MiB", |b| {
        b.iter(|| copy_region(2, black_box(&src), &src_box, &mut dst, &dst_box, &region))
    });
    let rows_box = ChunkBox::new(vec![1024, 0], vec![2048, 4096]).unwrap();
    g.bench_function("contiguous_rows_16MiB", |b| {
        b.iter(|| copy_region(2, black_box(&src), &src_box, &mut dst, &rows_box, &rows_box))
    });
    g.finish();

    // Scattering rows of a cache-resident 1 MiB block (256 rows of 4 KiB, as
    // a resharded load copies them out) into three column shards of a 48 MiB
    // destination, against a plain copy of the block into 48 MiB: the kernel
    // of loads resharded from rows to columns.
    let mut g = c.benchmark_group("scatter");
    let (row, rows) = (4096usize, 12288usize);
    let cuts = [0usize, 1366, 2730, 4096];
    let block: Vec<u8> = (0..256 * row).map(|i| (i * 7) as u8).collect();
    let mut shards: Vec<Vec<u8>> = (0..3)
        .map(|k| vec![0u8; rows * (cuts[k + 1] - cuts[k])])
        .collect();
    let mut flat = vec![0u8; rows * row];
    g.throughput(Throughput::Bytes((rows * row) as u64));
    g.bench_function("memcpy_48MiB", |b| {
        b.iter(|| {
            for (i, out) in flat.chunks_mut(block.len()).enumerate() {
                out.copy_from_slice(black_box(&block[..out.len()]));
                black_box(i);
            }
        })
    });
    g.bench_function("pieces_copy_from_slice_48MiB", |b| {
        b.iter(|| {
            for r in 0..rows {
                let src = &block[(r % 256) * row..(r % 256 + 1) * row];
                for (k, shard) in shards.iter_mut().enumerate() {
                    let w = cuts[k + 1] - cuts[k];
                    shard[r * w..(r + 1) * w].copy_from_slice(&src[cuts[k]..cuts[k + 1]]);
                }
            }
            black_box(&shards);
        })
    });
    g.bench_function("pieces_line_streamer_48MiB", |b| {
        b.iter(|| {
            let mut w: Vec<LineStreamer<'_>> =
                shards.iter_mut().map(|s| LineStreamer::new(s)).collect();
            for r in 0..rows {
                let src = &block[(r % 256) * row..(r % 256 + 1) * row];
                for (k, w) in w.iter_mut().enumerate() {
                    let width = cuts[k + 1] - cuts[k];
                    w.write(r * width, &src[cuts[k]..cuts[k + 1]]);
                }
            }
            for w in w {
                w.finish();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, metadata, planning, copy);
criterion_main!(benches);
