//! Structure-aware sectioned metadata (format version 3): take a sample
//! encoded in sections, apply the fuzzer's edits (set, insert or delete a
//! byte, or overwrite one with a huge varint) to the index or the sections,
//! then re-frame the index with a correct length and CRC so every input
//! reaches the index decoder, the section checks and `validate`. Neither
//! `Metadata::decode` nor a rank's partial read (`MetadataIndex::decode`,
//! `sections_for`, `ranges`, `select`) may panic or allocate beyond the
//! input; whatever decodes whole re-encodes to an equal value.
#![no_main]

use dcp_core::metadata::sections::{index_len, MetadataIndex};
use dcp_core::metadata::{ItemMeta, Metadata, HEADER_LEN};
use dcp_core::{ChunkBox, DestStateDict};
use dcp_fuzz::samples;
use libfuzzer_sys::fuzz_target;

fn varint(mut x: u64) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let b = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            v.push(b);
            return v;
        }
        v.push(b | 0x80);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, edits)) = data.split_first() else {
        return;
    };
    let all = samples();
    let md = &all[pick as usize % all.len()];
    let Ok(enc) = md.encode_sectioned(1 + (pick as usize >> 4) % 3) else {
        return;
    };
    let ilen = index_len(&enc).expect("header").expect("sectioned") as usize;
    let (mut index, mut area) = (enc[HEADER_LEN..ilen].to_vec(), enc[ilen..].to_vec());
    for e in edits.chunks_exact(4) {
        let buf = if e[0] & 0x80 == 0 { &mut index } else { &mut area };
        let pos = u16::from_le_bytes([e[1], e[2]]) as usize;
        let v = e[3];
        match e[0] % 5 {
            0 if !buf.is_empty() => {
                let p = pos % buf.len();
                buf[p] = v;
            }
            1 => {
                let p = pos % (buf.len() + 1);
                buf.insert(p, v);
            }
            2 if !buf.is_empty() => {
                let p = pos % buf.len();
                buf.remove(p);
            }
            3 if !buf.is_empty() => {
                let p = pos % buf.len();
                buf.splice(p..p + 1, varint(1u64 << (v % 64)));
            }
            4 => buf.truncate(pos % (buf.len() + 1)),
            _ => {}
        }
    }
    let mut file = enc[..HEADER_LEN].to_vec();
    file[16..24].copy_from_slice(&(index.len() as u64).to_le_bytes());
    file[24..28].copy_from_slice(&crc32c::crc32c(&index).to_le_bytes());
    file.extend_from_slice(&index);
    let prefix_len = file.len();
    file.extend_from_slice(&area);

    if let Ok(md) = Metadata::decode(&file) {
        let again = md
            .encode()
            .expect("decoded metadata validates, so it encodes");
        assert_eq!(Metadata::decode(&again).expect("round trip"), md);
    }
    // A rank's partial read: the first tensor's first chunk's box, or the
    // whole of every tensor when the pick says so.
    if let Ok(idx) = MetadataIndex::decode(&file[..prefix_len]) {
        let mut dest = DestStateDict::new();
        for (name, item) in &md.items {
            if let ItemMeta::Tensor { dtype, shape, chunks } = item {
                let region = match chunks.first() {
                    Some(c) if pick & 1 == 0 => c.region.clone(),
                    _ => ChunkBox::full(shape),
                };
                let _ = dest.want_tensor(name.clone(), *dtype, shape.to_vec(), vec![region]);
            }
        }
        let ids = idx.sections_for(&dest);
        let ranges = idx.ranges(&ids);
        let bufs: Vec<&[u8]> = ranges
            .iter()
            .map(|&(o, l)| {
                let from = (o as usize).min(file.len());
                let to = (o.saturating_add(l) as usize).min(file.len());
                &file[from..to]
            })
            .collect();
        let fetched: Vec<(u64, &[u8])> = ranges.iter().map(|r| r.0).zip(bufs).collect();
        if let Ok(sel) = idx.select(&ids, &fetched) {
            sel.metadata.validate().expect("select validates what it returns");
            for (i, (_, item)) in sel.metadata.items.iter().enumerate() {
                if let ItemMeta::Tensor { chunks, .. } = item {
                    assert_eq!(chunks.len(), sel.chunk_numbers[i].len());
                }
            }
        }
    }
});
