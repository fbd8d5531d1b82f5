//! Structure-aware `Metadata::decode`: take a valid encoded body, apply the
//! fuzzer's edits (set, insert or delete a byte, or overwrite a byte with a
//! huge varint), then frame it with a correct length and CRC so every input
//! reaches the postcard decoder and `validate`.
#![no_main]

use dcp_core::metadata::FORMAT_VERSION;
use dcp_core::Metadata;
use dcp_fuzz::{frame_metadata, samples};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, edits)) = data.split_first() else {
        return;
    };
    let all = samples();
    let md = &all[pick as usize % all.len()];
    let mut body = postcard::to_allocvec(md).expect("encodes");
    for e in edits.chunks_exact(4) {
        let pos = u16::from_le_bytes([e[1], e[2]]) as usize;
        let v = e[3];
        match e[0] % 5 {
            0 if !body.is_empty() => {
                let p = pos % body.len();
                body[p] = v;
            }
            1 => {
                let p = pos % (body.len() + 1);
                body.insert(p, v);
            }
            2 if !body.is_empty() => {
                let p = pos % body.len();
                body.remove(p);
            }
            3 if !body.is_empty() => {
                // A varint of 2^(v % 64): a huge count or length.
                let p = pos % body.len();
                let mut x: u64 = 1u64 << (v % 64);
                let mut varint = Vec::new();
                loop {
                    let b = (x & 0x7f) as u8;
                    x >>= 7;
                    if x == 0 {
                        varint.push(b);
                        break;
                    }
                    varint.push(b | 0x80);
                }
                body.splice(p..p + 1, varint);
            }
            4 => body.truncate(pos % (body.len() + 1)),
            _ => {}
        }
    }
    if let Ok(md) = Metadata::decode(&frame_metadata(&body, FORMAT_VERSION)) {
        let again = md
            .encode()
            .expect("decoded metadata validates, so it encodes");
        assert_eq!(Metadata::decode(&again).expect("round trip"), md);
    }
});
