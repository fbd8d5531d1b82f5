//! Throughput and compression ratio of dcp-ext's transforms on synthetic
//! checkpoint-like data, beside a plain memcpy of the same bytes.
//!
//! Run with `cargo run --release -p dcp-ext --example ext_bench [MiB]`
//! (default 64 MiB per data set). Every figure is the median of 5 runs on
//! one core; `vs memcpy` is memcpy_seconds / op_seconds (1.0 = as fast as
//! copying the bytes once).

use dcp_core::{StreamTransformExtension, TransformKind};
use dcp_ext::{Crc32, Crc32c, Lz4, Zstd};
use std::hint::black_box;
use std::time::Instant;

const REPS: usize = 5;
/// The pipeline's default piece size (`per_thread_copy_ahead`).
const PIECE: usize = 10_000_000;

/// xorshift64*: seeded and reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

/// bf16 weights: normal(0, 0.02), converted to bf16 by truncation.
fn bf16_weights(bytes: usize) -> Vec<u8> {
    let mut r = XorShift(0x9e37_79b9_7f4a_7c15);
    (0..bytes / 2)
        .flat_map(|_| (((r.normal() * 0.02).to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

/// fp32 Adam moments: first half exp_avg ~ normal * 1e-4, second half
/// exp_avg_sq ~ (normal * 1e-4)^2.
fn fp32_moments(bytes: usize) -> Vec<u8> {
    let mut r = XorShift(0x2545_f491_4f6c_dd1d);
    let n = bytes / 4;
    (0..n)
        .flat_map(|i| {
            let g = r.normal() * 1e-4;
            let v = if i < n / 2 { g } else { g * g };
            v.to_le_bytes()
        })
        .collect()
}

/// Mostly-zero fp32 tensor: 95 % zeros, the rest normal values.
fn mostly_zero(bytes: usize) -> Vec<u8> {
    let mut r = XorShift(0xdead_beef_cafe_f00d);
    (0..bytes / 4)
        .flat_map(|_| {
            let v = if r.next() % 100 < 5 { r.normal() } else { 0.0 };
            v.to_le_bytes()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    f(); // warm up (page faults, pools)
    median(
        (0..REPS)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn memcpy_seconds(data: &[u8]) -> f64 {
    let mut dst = vec![1u8; data.len()];
    time(|| {
        dst.copy_from_slice(black_box(data));
        black_box(&mut dst);
    })
}

fn encode(t: &dyn StreamTransformExtension, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut enc = t.encoder().expect("encoder");
    let mut stored = Vec::new();
    for piece in data.chunks(PIECE) {
        let mut out = Vec::new();
        enc.update(piece, &mut out).expect("update");
        stored.extend_from_slice(&out);
    }
    let value = enc.finish(&mut stored).expect("finish");
    if t.kind() == TransformKind::Checksum {
        stored = Vec::new();
    }
    (stored, value)
}

fn row(data: &str, op: &str, ratio: Option<f64>, bytes: usize, secs: f64, memcpy: f64) {
    let ratio = ratio.map_or("-".to_string(), |r| format!("{r:.3}"));
    println!(
        "| {data:<16} | {op:<16} | {ratio:>6} | {:>9.1} | {:>9.1} | {:>8.3} |",
        bytes as f64 / secs / 1e6,
        bytes as f64 / memcpy / 1e6,
        memcpy / secs
    );
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let bytes = mib << 20;
    println!(
        "dcp-ext bench: {mib} MiB per data set, {REPS} reps (median), one core, pieces of {PIECE} bytes"
    );
    println!(
        "ratio = logical / stored bytes; MB/s over logical bytes; vs memcpy = memcpy_s / op_s\n"
    );
    println!(
        "| {:<16} | {:<16} | {:>6} | {:>9} | {:>9} | {:>8} |",
        "data", "op", "ratio", "op MB/s", "memcpy", "vs mcpy"
    );
    println!(
        "|{:-<18}|{:-<18}|{:->8}|{:->11}|{:->11}|{:->10}|",
        "", "", "", "", "", ""
    );
    let sets: [(&str, Vec<u8>); 3] = [
        ("bf16 weights", bf16_weights(bytes)),
        ("fp32 moments", fp32_moments(bytes)),
        ("mostly-zero f32", mostly_zero(bytes)),
    ];
    let codecs: Vec<(&str, Box<dyn StreamTransformExtension>)> = vec![
        ("zstd-1", Box::new(Zstd::new(1).expect("level"))),
        ("zstd-3", Box::new(Zstd::new(3).expect("level"))),
        ("lz4", Box::new(Lz4::new())),
    ];
    let checksums: Vec<(&str, Box<dyn StreamTransformExtension>)> = vec![
        ("crc32c", Box::new(Crc32c::new())),
        ("crc32", Box::new(Crc32::new())),
    ];
    for (name, data) in &sets {
        let memcpy = memcpy_seconds(data);
        for (op, t) in &codecs {
            let (stored, value) = encode(t.as_ref(), data);
            let ratio = data.len() as f64 / stored.len() as f64;
            let enc = time(|| {
                black_box(encode(t.as_ref(), black_box(data)));
            });
            row(
                name,
                &format!("{op} encode"),
                Some(ratio),
                data.len(),
                enc,
                memcpy,
            );
            let out = t.decode(&stored, &value, data.len()).expect("decode");
            assert!(out.as_deref() == Some(&data[..]), "{op} round trip");
            let dec = time(|| {
                black_box(
                    t.decode(black_box(&stored), &value, data.len())
                        .expect("decode"),
                );
            });
            row(
                name,
                &format!("{op} decode"),
                Some(ratio),
                data.len(),
                dec,
                memcpy,
            );
        }
        for (op, t) in &checksums {
            let (_, value) = encode(t.as_ref(), data);
            let secs = time(|| {
                black_box(encode(t.as_ref(), black_box(data)));
            });
            row(
                name,
                &format!("{op} compute"),
                None,
                data.len(),
                secs,
                memcpy,
            );
            let secs = time(|| {
                t.decode(black_box(data), &value, data.len())
                    .expect("verify");
            });
            row(
                name,
                &format!("{op} verify"),
                None,
                data.len(),
                secs,
                memcpy,
            );
        }
    }
}
