//! Unit-level tests of each transform: piecewise round trips, descriptors
//! through the registry, and refusal of damaged, short, long and foreign
//! input.

mod common;

use common::{encode_pieces, Rng};
use dcp_core::{ErrorKind, StreamTransformExtension, TransformKind};
use dcp_ext::{Crc32, Crc32c, Lz4, Zstd};
use proptest::prelude::*;
use std::sync::Arc;

fn all() -> Vec<Arc<dyn StreamTransformExtension>> {
    vec![
        Arc::new(Zstd::default()),
        Arc::new(Zstd::new(3).unwrap()),
        Arc::new(Zstd::new(-5).unwrap()),
        Arc::new(Lz4::new()),
        Arc::new(Crc32c::new()),
        Arc::new(Crc32::new()),
    ]
}

fn codecs() -> Vec<Arc<dyn StreamTransformExtension>> {
    vec![
        Arc::new(Zstd::default()),
        Arc::new(Zstd::new(19).unwrap()),
        Arc::new(Lz4::new()),
    ]
}

/// Mixed data: runs of a repeated byte and random stretches.
fn mixed(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let run = 1 + r.below(300) as usize;
        if r.below(2) == 0 {
            let b = r.next_u64() as u8;
            v.extend(std::iter::repeat_n(b, run));
        } else {
            v.extend(r.bytes(run));
        }
    }
    v.truncate(len);
    v
}

fn roundtrip(t: &dyn StreamTransformExtension, data: &[u8], cuts: &[usize]) {
    let (stored, value) = encode_pieces(t, data, cuts).unwrap();
    match t.kind() {
        TransformKind::Codec => {
            assert!(
                value.is_empty(),
                "{}: a codec recorded a value",
                t.descriptor()
            );
            let out = t.decode(&stored, &value, data.len()).unwrap();
            assert!(
                out.as_deref() == Some(data),
                "{}: round trip",
                t.descriptor()
            );
        }
        TransformKind::Checksum => {
            assert_eq!(value.len(), 4);
            assert_eq!(stored, data);
            assert!(t.decode(&stored, &value, data.len()).unwrap().is_none());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any split of a record into pieces encodes to something that decodes
    /// to the record; for checksums, to the same value as one piece.
    #[test]
    fn roundtrip_over_piece_splits(
        seed in any::<u64>(),
        len in 0usize..140_000,
        mut cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let data = mixed(seed, len);
        let mut cuts: Vec<usize> = cuts.drain(..).map(|i| i.index(len + 1)).collect();
        cuts.sort_unstable();
        for t in all() {
            roundtrip(t.as_ref(), &data, &cuts);
        }
        for t in [Arc::new(Crc32c) as Arc<dyn StreamTransformExtension>, Arc::new(Crc32)] {
            let (_, whole) = encode_pieces(t.as_ref(), &data, &[]).unwrap();
            let (_, split) = encode_pieces(t.as_ref(), &data, &cuts).unwrap();
            prop_assert_eq!(whole, split);
        }
    }

    /// A single flipped byte in a compressed record never decodes to wrong
    /// data: it is refused as corrupt, or (a bit the format ignores) decodes
    /// to the original.
    #[test]
    fn flipped_compressed_bytes_never_decode_wrong(
        seed in any::<u64>(),
        len in 1usize..20_000,
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let data = mixed(seed, len);
        for t in codecs() {
            let (mut stored, value) = encode_pieces(t.as_ref(), &data, &[len / 3]).unwrap();
            let i = at.index(stored.len());
            stored[i] ^= xor;
            match t.decode(&stored, &value, len) {
                Ok(out) => prop_assert!(out.as_deref() == Some(&data[..]), "{} flip at {i}", t.descriptor()),
                Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Corrupt, "{}: {}", t.descriptor(), e),
            }
        }
    }

    /// Arbitrary bytes given to a codec are refused (or, vanishingly
    /// unlikely, decode to exactly the expected length) without panicking.
    #[test]
    fn garbage_is_refused(garbage in proptest::collection::vec(any::<u8>(), 0..2000), expected in 0usize..5000) {
        for t in codecs() {
            if let Err(e) = t.decode(&garbage, &[], expected) {
                prop_assert_eq!(e.kind(), ErrorKind::Corrupt);
            }
        }
    }
}

#[test]
fn empty_records_roundtrip() {
    for t in all() {
        roundtrip(t.as_ref(), &[], &[]);
        roundtrip(t.as_ref(), &[], &[0, 0]);
    }
}

#[test]
fn descriptors_are_stable_and_resolve() {
    let reg = dcp_ext::registry();
    let expect = [
        "zstd/1:level=1",
        "zstd/1:level=3",
        "zstd/1:level=-5",
        "lz4/1",
        "crc32c/1",
        "crc32/1",
    ];
    for (t, d) in all().iter().zip(expect) {
        assert_eq!(t.descriptor(), d);
        let back = reg.resolve(d).unwrap();
        assert_eq!(back.descriptor(), d);
        assert_eq!(back.kind(), t.kind());
        // The rebuilt transform decodes what the original encoded.
        let data = mixed(7, 70_000);
        let (stored, value) = encode_pieces(t.as_ref(), &data, &[1000]).unwrap();
        let out = back.decode(&stored, &value, data.len()).unwrap();
        if t.kind() == TransformKind::Codec {
            assert!(out.as_deref() == Some(&data[..]));
        } else {
            assert!(out.is_none());
        }
    }
    // torch's spelling of zstd carries no level; the level does not matter
    // for decoding.
    assert_eq!(
        reg.resolve("zstd/1").unwrap().descriptor(),
        "zstd/1:level=1"
    );
    assert_eq!(Zstd::default(), Zstd::new(1).unwrap());
    assert_eq!(Zstd::default().level(), 1);
}

#[test]
fn unknown_versions_params_and_names_are_unsupported() {
    let reg = dcp_ext::registry();
    for d in [
        "zstd/2",
        "zstd/0:level=1",
        "zstd/1:level=1,window=20",
        "zstd/1:level=x",
        "zstd/1:level=99",
        "zstd/1:level=0",
        "lz4/2",
        "lz4/1:level=1",
        "crc32c/2",
        "crc32c/1:seed=1",
        "crc32/7",
        "crc32/1:x=y",
        "snappy/1",
    ] {
        let e = reg.resolve(d).err_short();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{d}: {e}");
        assert!(
            e.message().contains(d),
            "{d}: message does not name it: {e}"
        );
    }
}

#[test]
fn constructors_and_name_helpers() {
    assert_eq!(Zstd::new(0).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(Zstd::new(23).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(
        Zstd::new(i32::MIN).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(Zstd::new(22).unwrap().level(), 22);

    let z = dcp_ext::compression_from_name("zstd", 7).unwrap().unwrap();
    assert_eq!(z.descriptor(), "zstd/1:level=7");
    assert_eq!(
        dcp_ext::compression_from_name("LZ4", 7)
            .unwrap()
            .unwrap()
            .descriptor(),
        "lz4/1"
    );
    assert!(dcp_ext::compression_from_name("none", 0).unwrap().is_none());
    assert_eq!(
        dcp_ext::compression_from_name("zstd", 0)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        dcp_ext::compression_from_name("gzip", 1)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        dcp_ext::checksum_from_name("crc32c")
            .unwrap()
            .unwrap()
            .descriptor(),
        "crc32c/1"
    );
    assert_eq!(
        dcp_ext::checksum_from_name("crc32")
            .unwrap()
            .unwrap()
            .descriptor(),
        "crc32/1"
    );
    assert!(dcp_ext::checksum_from_name("none").unwrap().is_none());
    assert_eq!(
        dcp_ext::checksum_from_name("md5").unwrap_err().kind(),
        ErrorKind::InvalidInput
    );

    let c = dcp_ext::chain(
        dcp_ext::compression_from_name("lz4", 1).unwrap(),
        dcp_ext::checksum_from_name("crc32").unwrap(),
    );
    let d: Vec<String> = c.iter().map(|t| t.descriptor()).collect();
    assert_eq!(d, ["lz4/1", "crc32/1"]);
    assert!(dcp_ext::chain(None, None).is_empty());
    assert_eq!(dcp_ext::chain(None, Some(Arc::new(Crc32c))).len(), 1);
}

#[test]
fn checksum_mismatch_names_both_values() {
    let data = mixed(3, 5000);
    for (t, actual) in [
        (
            Arc::new(Crc32c) as Arc<dyn StreamTransformExtension>,
            Crc32c::checksum(&data),
        ),
        (Arc::new(Crc32), Crc32::checksum(&data)),
    ] {
        let (_, value) = encode_pieces(t.as_ref(), &data, &[17]).unwrap();
        assert_eq!(value, actual.to_le_bytes());
        let mut bad = data.clone();
        bad[4321] ^= 0x10;
        let e = t.decode(&bad, &value, bad.len()).err_short();
        assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
        let computed = Crc32c::checksum(&bad);
        let computed = if t.descriptor() == "crc32c/1" {
            computed
        } else {
            Crc32::checksum(&bad)
        };
        assert!(e.message().contains(&format!("{actual:#010x}")), "{e}");
        assert!(e.message().contains(&format!("{computed:#010x}")), "{e}");
        // A malformed recorded value is corrupt metadata, not a mismatch.
        let e = t.decode(&data, &value[..3], data.len()).err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        // A record of the wrong length is refused too.
        let e = t.decode(&data[1..], &value, data.len()).err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }
}

#[test]
fn codecs_refuse_short_long_truncated_and_trailing() {
    let data = mixed(11, 300_000);
    for t in codecs() {
        let name = t.descriptor();
        let (stored, value) = encode_pieces(t.as_ref(), &data, &[100_000, 200_000]).unwrap();
        assert!(stored.len() < data.len(), "{name} did not compress");
        // Expected longer than the stream: short output.
        let e = t.decode(&stored, &value, data.len() + 1).err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        // Expected shorter than the stream: long output.
        for short in [0, 1, data.len() / 2, data.len() - 1] {
            let e = t.decode(&stored, &value, short).err_short();
            assert_eq!(
                e.kind(),
                ErrorKind::Corrupt,
                "{name} expecting {short}: {e}"
            );
            assert!(e.message().contains("more than"), "{name}: {e}");
        }
        // Truncated anywhere.
        for cut in [
            0,
            1,
            4,
            stored.len() / 2,
            stored.len() - 4,
            stored.len() - 1,
        ] {
            let e = t.decode(&stored[..cut], &value, data.len()).err_short();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{name} cut at {cut}: {e}");
        }
        // Trailing garbage, or a second frame.
        let mut tail = stored.clone();
        tail.extend_from_slice(b"garbage!");
        let e = t
            .decode(&tail, &value, data.len())
            .map_err(|e| e.context(&name))
            .err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        let mut twice = stored.clone();
        twice.extend_from_slice(&stored);
        let e = t.decode(&twice, &value, data.len()).err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        // A value recorded for a codec is refused.
        let e = t.decode(&stored, &[1, 2, 3, 4], data.len()).err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        // Another codec's stream.
        let other: Arc<dyn StreamTransformExtension> = if name.starts_with("zstd") {
            Arc::new(Lz4)
        } else {
            Arc::new(Zstd::default())
        };
        let (foreign, _) = encode_pieces(other.as_ref(), &data, &[]).unwrap();
        let e = t.decode(&foreign, &value, data.len()).err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        // And the intact stream still decodes.
        assert!(t.decode(&stored, &value, data.len()).unwrap().as_deref() == Some(&data[..]));
    }
}

#[test]
fn encoders_are_independent_per_record() {
    // Two records encoded by interleaved encoders of one transform (the
    // pipeline runs several workers over one shared transform).
    for t in codecs() {
        let a = mixed(1, 150_000);
        let b = mixed(2, 90_000);
        let mut ea = t.encoder().unwrap();
        let mut eb = t.encoder().unwrap();
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let (pa, pb) = (
                &a[i * 50_000..(i + 1) * 50_000],
                &b[i * 30_000..(i + 1) * 30_000],
            );
            ea.update(pa, &mut sa).unwrap();
            eb.update(pb, &mut sb).unwrap();
        }
        ea.finish(&mut sa).unwrap();
        eb.finish(&mut sb).unwrap();
        assert!(t.decode(&sa, &[], a.len()).unwrap().as_deref() == Some(&a[..]));
        assert!(t.decode(&sb, &[], b.len()).unwrap().as_deref() == Some(&b[..]));
        // Reused (pooled) state leaks nothing into the next record.
        for _ in 0..3 {
            let (s, v) = encode_pieces(t.as_ref(), &b, &[]).unwrap();
            assert_eq!(s, sb_single(t.as_ref(), &b), "{}", t.descriptor());
            assert!(t.decode(&s, &v, b.len()).unwrap().as_deref() == Some(&b[..]));
        }
    }
}

/// `unwrap_err` without printing a (possibly huge) decoded record.
trait ErrShort {
    fn err_short(self) -> dcp_core::Error;
}

impl<T> ErrShort for dcp_core::Result<T> {
    #[track_caller]
    fn err_short(self) -> dcp_core::Error {
        match self {
            Ok(_) => panic!("expected an error, got Ok ({})", std::any::type_name::<T>()),
            Err(e) => e,
        }
    }
}

fn sb_single(t: &dyn StreamTransformExtension, data: &[u8]) -> Vec<u8> {
    encode_pieces(t, data, &[]).unwrap().0
}

/// lz4 frames from other writers: standard frames decode when their block
/// size fits the record; oversized blocks for a small record, legacy and
/// skippable frames are refused before the decoder allocates for them.
#[test]
fn lz4_frames_from_other_writers() {
    use lz4_flex::frame::{BlockSize, FrameEncoder, FrameInfo};
    use std::io::Write;
    let frame = |size: BlockSize, data: &[u8]| {
        let mut e = FrameEncoder::with_frame_info(FrameInfo::new().block_size(size), Vec::new());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let small = mixed(5, 100);
    let e = Lz4
        .decode(&frame(BlockSize::Max4MB, &small), &[], 100)
        .err_short();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.message().contains("4194304-byte blocks"), "{e}");
    let big: Vec<u8> = (0..(4 << 20) + 4321u32).map(|i| (i % 251) as u8).collect();
    let out = Lz4
        .decode(&frame(BlockSize::Max4MB, &big), &[], big.len())
        .unwrap();
    assert!(out.as_deref() == Some(&big[..]));
    let out = Lz4
        .decode(&frame(BlockSize::Max64KB, &small), &[], 100)
        .unwrap();
    assert!(out.as_deref() == Some(&small[..]));
    // Legacy frame magic, skippable frame magic.
    for magic in [0x184c_2102u32, 0x184d_2a50] {
        let mut s = magic.to_le_bytes().to_vec();
        s.extend_from_slice(&[0; 16]);
        let e = Lz4.decode(&s, &[], 100).err_short();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("not an lz4 frame"), "{e}");
    }
}
