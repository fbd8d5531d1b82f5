//! Decompression bombs: streams that expand far beyond the record's recorded
//! length are refused without the decoder allocating the expansion.
//!
//! One test in its own binary, so the process's peak resident memory
//! (`VmHWM`) reflects this test alone: a decoder that materialised the bomb
//! would raise it by a gibibyte.

mod common;

use common::encode_pieces;
use dcp_core::{ErrorKind, StreamTransformExtension};
use dcp_ext::{Lz4, Zstd};
use lz4_flex::frame::{BlockMode, BlockSize, FrameEncoder, FrameInfo};
use std::io::Write;

const GIB: usize = 1 << 30;

/// Peak resident set of this process in bytes (Linux), if known.
fn peak_rss() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A zstd stream of many concatenated frames, each 1 MiB of zeros: 1 GiB
/// of output from a few tens of KiB.
fn zstd_bomb() -> Vec<u8> {
    let frame = encode_pieces(&Zstd::default(), &vec![0u8; 1 << 20], &[])
        .unwrap()
        .0;
    frame.repeat(GIB >> 20)
}

/// One lz4 frame with 16384 copies of a 64 KiB block of zeros (1 GiB), and
/// no content checksum, so nothing but the length gives it away.
fn lz4_bomb() -> Vec<u8> {
    let info = FrameInfo::new()
        .block_size(BlockSize::Max64KB)
        .block_mode(BlockMode::Independent);
    let mut enc = FrameEncoder::with_frame_info(info, Vec::new());
    enc.write_all(&vec![0u8; 64 << 10]).unwrap();
    let one = enc.finish().unwrap();
    // magic(4) FLG BD HC, then one block: size(4) + data, then the end mark.
    let header = &one[..7];
    let block_len = u32::from_le_bytes(one[7..11].try_into().unwrap()) as usize & 0x7fff_ffff;
    let block = &one[7..11 + block_len];
    assert_eq!(&one[11 + block_len..], &[0, 0, 0, 0], "single block frame");
    let mut bomb = header.to_vec();
    for _ in 0..(GIB / (64 << 10)) {
        bomb.extend_from_slice(block);
    }
    bomb.extend_from_slice(&[0, 0, 0, 0]);
    bomb
}

#[test]
fn bombs_are_refused_without_big_allocations() {
    let zb = zstd_bomb();
    let lb = lz4_bomb();
    assert!(zb.len() < 1 << 20 && lb.len() < 8 << 20, "bombs are small");
    let before = peak_rss();
    let cases: [(&dyn StreamTransformExtension, &[u8]); 2] = [(&Zstd::default(), &zb), (&Lz4, &lb)];
    for (t, bomb) in cases {
        for expected in [0usize, 4096, 10 << 20] {
            match t.decode(bomb, &[], expected) {
                Ok(_) => panic!(
                    "{} accepted a bomb expecting {expected} bytes",
                    t.descriptor()
                ),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Corrupt, "{}: {e}", t.descriptor());
                    assert!(e.message().contains("more than"), "{}: {e}", t.descriptor());
                }
            }
        }
    }
    // `bomb_builders_make_real_bombs` shows the same constructions decode
    // when their full length is expected: the refusals are about length.
    if let (Some(b), Some(a)) = (before, peak_rss()) {
        let grew = a.saturating_sub(b);
        assert!(
            grew < 64 << 20,
            "peak resident memory grew by {} MiB while refusing bombs",
            grew >> 20
        );
    }
}

#[test]
fn bomb_builders_make_real_bombs() {
    // Smaller copies of the same construction decode to their full length.
    let frame = encode_pieces(&Zstd::default(), &vec![0u8; 1 << 20], &[])
        .unwrap()
        .0;
    let z = frame.repeat(8);
    let out = Zstd::default().decode(&z, &[], 8 << 20).unwrap().unwrap();
    assert!(out.len() == 8 << 20 && out.iter().all(|&b| b == 0));
    let lb = lz4_bomb();
    // Keep the header and the first 8 blocks, then end the frame.
    let block_len = u32::from_le_bytes(lb[7..11].try_into().unwrap()) as usize + 4;
    let mut small = lb[..7 + 8 * block_len].to_vec();
    small.extend_from_slice(&[0, 0, 0, 0]);
    let out = Lz4.decode(&small, &[], 8 * (64 << 10)).unwrap().unwrap();
    assert!(out.len() == 8 * (64 << 10) && out.iter().all(|&b| b == 0));
}
