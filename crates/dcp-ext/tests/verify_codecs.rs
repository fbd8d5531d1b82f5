//! `verify` decodes compressed records that carry no checksum after the
//! codec, and `verify_checksums: false` skips checksum stages even inside a
//! codec chain.

use bytes::Bytes;
use dcp_core::mem::MemoryFs;
use dcp_core::metadata::Metadata;
use dcp_core::verify::verify;
use dcp_core::*;
use std::sync::Arc;

fn data() -> Vec<u8> {
    // Compressible but not trivial: a slow ramp with noise.
    (0..256 * 1024u32)
        .map(|i| ((i / 7) ^ (i % 13)) as u8)
        .collect()
}

async fn save_with(mem: &MemoryFs, ext: Vec<Arc<dyn StreamTransformExtension>>) -> Metadata {
    let mut sd = StateDict::new();
    sd.insert_full_tensor("w", DType::U8, vec![256, 1024], Bytes::from(data()))
        .unwrap();
    let w = FileSystemWriter::new(
        Arc::new(mem.clone()),
        WriterOptions::default().extensions(ext),
    )
    .unwrap();
    save(&sd, &w, &Single)
        .await
        .unwrap()
        .metadata
        .as_ref()
        .clone()
}

async fn load_w(mem: &MemoryFs, verify_checksums: bool) -> Result<Vec<u8>> {
    let mut dest = DestStateDict::new();
    dest.want_tensor(
        "w",
        DType::U8,
        vec![256, 1024],
        vec![ChunkBox::full(&[256, 1024])],
    )?;
    let r = FileSystemReader::new(
        Arc::new(mem.clone()),
        ReaderOptions::default()
            .registry(dcp_ext::registry())
            .verify_checksums(verify_checksums),
    );
    let out = load(dest, &r, &Single).await?;
    Ok(out.state_dict.tensor("w").unwrap().chunks[0].data.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_decodes_compressed_records_without_checksum() {
    let mem = MemoryFs::new("memory://v1");
    let md = save_with(
        &mem,
        dcp_ext::chain(dcp_ext::compression_from_name("zstd", 3).unwrap(), None),
    )
    .await;
    let report = verify(&mem, &md, &dcp_ext::registry(), true, 2).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    assert_eq!(
        report.checksummed_records, 1,
        "the compressed record is decoded and checked"
    );
    // Flip a byte in the middle of the compressed record.
    let file = &md.files[0].name;
    let mut bytes = mem.get(file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    mem.put(file, bytes);
    let report = verify(&mem, &md, &dcp_ext::registry(), true, 2).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(p.item.as_deref(), Some("w"));
    assert_eq!(&p.file, file);
    assert!(
        load_w(&mem, true).await.is_err(),
        "a damaged compressed record must not load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checksums_off_skips_checksums_inside_codec_chains() {
    let mem = MemoryFs::new("memory://v2");
    let chain = dcp_ext::chain(
        dcp_ext::compression_from_name("lz4", 1).unwrap(),
        dcp_ext::checksum_from_name("crc32c").unwrap(),
    );
    let md = save_with(&mem, chain).await;
    assert_eq!(load_w(&mem, true).await.unwrap(), data());
    // Damage only the recorded checksum value: the stored bytes are intact.
    let mut bad = md.clone();
    if let metadata::ItemMeta::Tensor { chunks, .. } = &mut bad.items[0].1 {
        let crc = chunks[0]
            .storage
            .transforms
            .iter_mut()
            .find(|t| bad.transforms[t.descriptor as usize].starts_with("crc32c"))
            .unwrap();
        crc.value[0] ^= 1;
    }
    mem.put(".metadata", bad.encode().unwrap());
    let e = load_w(&mem, true).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
    assert_eq!(
        load_w(&mem, false).await.unwrap(),
        data(),
        "verification off: the checksum is not consulted"
    );
}
