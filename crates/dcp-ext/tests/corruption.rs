//! Damage to the data files of checksummed checkpoints: random single-byte
//! flips and truncations. A load must fail (never return wrong data) and
//! `verify` must report the damage, naming the file, and for a damaged
//! record the item and its offset. Seeded, so every run damages the same
//! bytes.

mod common;

use common::*;
use dcp_core::local::block_on;
use dcp_core::mem::MemoryFs;
use dcp_core::verify::verify;
use dcp_core::*;
use std::sync::Arc;

struct Checkpoint {
    what: String,
    mem: MemoryFs,
    fs: Arc<dyn FileSystem>,
    md: Arc<Metadata>,
}

fn checkpoint(format: FormatKind, compression: &str, checksum: &str) -> Checkpoint {
    let what = format!("{}/{compression}/{checksum}", format.name());
    let (mem, fs) = memfs(&what.replace('/', "-"));
    let ext = dcp_ext::chain(
        dcp_ext::compression_from_name(compression, 1).unwrap(),
        dcp_ext::checksum_from_name(checksum).unwrap(),
    );
    let saved = block_on(save_world(fs.clone(), 4, writer_options(format, ext))).unwrap();
    let md = saved[0].as_ref().unwrap().metadata.clone();
    Checkpoint { what, mem, fs, md }
}

/// Load everything on one rank. `Ok` only if every byte is right (the
/// checks inside `load_world` panic otherwise, which fails the test).
fn load_all(c: &Checkpoint) -> Result<()> {
    let opts = reader_options();
    let out = block_on(async {
        let dest = wanted_state(0, 1, 4)?;
        let r = FileSystemReader::new(c.fs.clone(), opts);
        load(dest, &r, &Single).await
    })?;
    let out = out?;
    check_loaded(&out.state_dict, 0, 1, 4);
    Ok(())
}

/// The record of `file` covering byte `at`, if any: (item, offset).
fn record_at(md: &Metadata, file: u32, at: u64) -> Option<(String, u64)> {
    md.records()
        .find(|(_, _, s)| s.file == file && s.offset <= at && at < s.offset + s.length)
        .map(|(n, _, s)| (n.to_string(), s.offset))
}

fn report(c: &Checkpoint) -> verify::VerifyReport {
    verify(c.fs.as_ref(), &c.md, &dcp_ext::registry(), true, 2).unwrap()
}

#[test]
fn flips_and_truncations_never_load_silently() {
    let cps = [
        checkpoint(FormatKind::Raw, "zstd", "crc32c"),
        checkpoint(FormatKind::Raw, "none", "crc32c"),
        checkpoint(FormatKind::Raw, "lz4", "crc32"),
        checkpoint(FormatKind::Safetensors, "none", "crc32"),
    ];
    let mut rng = Rng::new(0x5eed_dc9e);
    let (mut flips, mut outside, mut truncations) = (0, 0, 0);
    for c in &cps {
        load_all(c).unwrap_or_else(|e| panic!("{}: intact checkpoint: {e}", c.what));
        assert!(report(c).is_sound());
        let mut in_records = 0;
        while in_records < 55 {
            let fi = rng.below(c.md.files.len() as u64) as u32;
            let file = &c.md.files[fi as usize].name;
            let original = c.mem.get(file).unwrap();
            let at = rng.below(original.len() as u64);
            let xor = 1 + rng.below(255) as u8;
            let mut bad = original.clone();
            bad[at as usize] ^= xor;
            c.mem.put(file, bad);
            let res = load_all(c);
            let rep = report(c);
            match record_at(&c.md, fi, at) {
                Some((item, offset)) => {
                    in_records += 1;
                    let e = res
                        .expect_err(&format!("{}: flip in {item} at {file}:{at} loaded", c.what));
                    assert!(
                        matches!(e.kind(), ErrorKind::ChecksumMismatch),
                        "{}: flip at {file}:{at}: {e}",
                        c.what
                    );
                    assert!(e.message().contains(file.as_str()), "{}: {e}", c.what);
                    assert_eq!(rep.problems.len(), 1, "{}: {:?}", c.what, rep.problems);
                    let p = &rep.problems[0];
                    assert_eq!(p.item.as_deref(), Some(item.as_str()), "{}", c.what);
                    assert_eq!(&p.file, file);
                    assert_eq!(p.offset, Some(offset));
                    assert!(p.message.contains("mismatch"), "{}: {p}", c.what);
                }
                None => {
                    // Alignment padding or the safetensors header: no data of
                    // any item is there, and the load returns exactly the
                    // saved bytes.
                    outside += 1;
                    res.unwrap_or_else(|e| {
                        panic!("{}: flip outside records at {file}:{at}: {e}", c.what)
                    });
                }
            }
            c.mem.put(file, original);
        }
        flips += in_records;
        for _ in 0..6 {
            let fi = rng.below(c.md.files.len() as u64) as usize;
            let file = &c.md.files[fi].name;
            let original = c.mem.get(file).unwrap();
            let len = rng.below(original.len() as u64) as usize;
            c.mem.put(file, original[..len].to_vec());
            let e = load_all(c).expect_err(&format!("{}: {file} cut to {len} loaded", c.what));
            assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::ChecksumMismatch),
                "{}: {e}",
                c.what
            );
            let rep = report(c);
            let p = rep
                .problems
                .iter()
                .find(|p| &p.file == file && p.item.is_none())
                .unwrap_or_else(|| panic!("{}: {:?}", c.what, rep.problems));
            assert!(
                p.message.contains(&format!("is {len} bytes")),
                "{}: {p}",
                c.what
            );
            // The records cut off are named too.
            assert!(rep
                .problems
                .iter()
                .any(|p| p.item.is_some() && p.offset.is_some()));
            c.mem.put(file, original);
            truncations += 1;
        }
        load_all(c).unwrap();
    }
    assert!(
        flips >= 200 && truncations >= 20,
        "{flips} flips, {truncations} cuts"
    );
    eprintln!("{flips} flips in records, {outside} outside, {truncations} truncations");
}

#[test]
fn without_verification_a_flip_in_a_plain_record_loads() {
    let c = checkpoint(FormatKind::Raw, "none", "crc32c");
    let spec = &SPECS[2];
    let (_, _, st) =
        c.md.records()
            .find(|(n, b, _)| *n == spec.name && b.is_some_and(|b| b.offsets[0] == 0))
            .unwrap();
    let file = c.md.files[st.file as usize].name.clone();
    let original = c.mem.get(&file).unwrap();
    // Byte 5 of the record: element (0, 1), byte 1 of a 4-byte f32.
    let mut bad = original.clone();
    bad[st.offset as usize + 5] ^= 0x40;
    c.mem.put(&file, bad);

    // Verified: refused.
    let e = load_all(&c).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");

    // Unverified: the flipped byte is what comes back.
    let opts = reader_options().verify_checksums(false);
    let out = block_on(async {
        let dest = wanted_state(0, 1, 4)?;
        load(dest, &FileSystemReader::new(c.fs.clone(), opts), &Single).await
    })
    .unwrap()
    .unwrap();
    let got = &out.state_dict.tensor(spec.name).unwrap().chunks[0].data;
    let mut expect = region(spec, 0, spec.rows, 0, spec.cols);
    assert_ne!(expect[5], expect[5] ^ 0x40);
    expect[5] ^= 0x40;
    assert!(got == &expect, "exactly the flipped byte differs");
}
