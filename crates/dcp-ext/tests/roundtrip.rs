//! Save and load through the whole pipeline for every combination of format
//! x compression x checksum, resharded from 4 ranks (rows) to 3 ranks
//! (columns), every byte compared with an independently computed value.

mod common;

use common::*;
use dcp_core::verify::verify;
use dcp_core::*;
use std::sync::Arc;

const COMPRESSIONS: [&str; 3] = ["none", "zstd", "lz4"];
const CHECKSUMS: [&str; 3] = ["none", "crc32c", "crc32"];

fn extensions(compression: &str, checksum: &str) -> Vec<Arc<dyn StreamTransformExtension>> {
    dcp_ext::chain(
        dcp_ext::compression_from_name(compression, 3).unwrap(),
        dcp_ext::checksum_from_name(checksum).unwrap(),
    )
}

async fn case(format: FormatKind, compression: &str, checksum: &str) {
    let what = format!("{} / {compression} / {checksum}", format.name());
    let (mem, fs) = memfs(&what.replace(' ', ""));
    let ext = extensions(compression, checksum);
    let want: Vec<String> = ext.iter().map(|t| t.descriptor()).collect();
    let saved = save_world(fs.clone(), 4, writer_options(format.clone(), ext)).await;

    if format == FormatKind::Safetensors && compression != "none" {
        // Refused at plan time on every rank, before any file is written.
        for (rank, r) in saved.iter().enumerate() {
            let e = r
                .as_ref()
                .err()
                .unwrap_or_else(|| panic!("{what}: rank {rank} saved"));
            assert_eq!(
                e.kind(),
                ErrorKind::InvalidInput,
                "{what}: rank {rank}: {e}"
            );
            assert!(e.message().contains("safetensors"), "{what}: {e}");
        }
        assert!(
            fs.list().unwrap().is_empty(),
            "{what}: files were written: {:?}",
            fs.list().unwrap()
        );
        return;
    }

    let md = saved[0]
        .as_ref()
        .unwrap_or_else(|e| panic!("{what}: save failed: {e}"))
        .metadata
        .clone();
    for r in &saved {
        assert_eq!(r.as_ref().unwrap().metadata.save_id, md.save_id, "{what}");
    }
    assert_eq!(md.transforms, want, "{what}");
    assert_eq!(md.format, format);
    // Every record carries the whole chain, checksums as 4-byte values.
    for (name, _, st) in md.records() {
        assert_eq!(st.transforms.len(), want.len(), "{what}: {name}");
        for (t, d) in st.transforms.iter().zip(&want) {
            if d.starts_with("crc") {
                assert_eq!(t.value.len(), 4, "{what}: {name}");
            }
        }
    }
    if compression != "none" {
        assert!(
            md.stored_bytes() < md.logical_bytes(),
            "{what}: {} stored for {} logical",
            md.stored_bytes(),
            md.logical_bytes()
        );
    } else {
        assert_eq!(md.stored_bytes(), md.logical_bytes(), "{what}");
    }

    // verify() finds nothing wrong and checks every checksum.
    let report = verify(fs.as_ref(), &md, &dcp_ext::registry(), true, 2).unwrap();
    assert!(report.is_sound(), "{what}: {:?}", report.problems);
    if checksum != "none" {
        assert_eq!(
            report.checksummed_records as usize,
            md.record_count(),
            "{what}"
        );
    }

    // 3 ranks load columns; every byte is checked inside load_world.
    for r in load_world(fs.clone(), 3, 4, reader_options()).await {
        r.unwrap_or_else(|e| panic!("{what}: load failed: {e}"));
    }

    // Safetensors data files stay valid safetensors files (with checksums).
    if format == FormatKind::Safetensors {
        let mut seen = 0;
        for f in &md.files {
            let bytes = mem.get(&f.name).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .unwrap_or_else(|e| panic!("{what}: {} is not safetensors: {e}", f.name));
            for (key, view) in st.tensors() {
                let name = key.split('@').next().unwrap();
                if let Some(spec) = SPECS.iter().find(|s| s.name == name) {
                    let shape = view.shape();
                    let offsets: Vec<u64> = match key.split_once('@') {
                        Some((_, o)) => o.split(',').map(|x| x.parse().unwrap()).collect(),
                        None => vec![0, 0],
                    };
                    let (r0, c0) = (offsets[0], offsets[1]);
                    let expect = region(spec, r0, r0 + shape[0] as u64, c0, c0 + shape[1] as u64);
                    assert!(view.data() == &expect[..], "{what}: {key} in {}", f.name);
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 4 * SPECS.len(), "{what}: every saved chunk found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_format_compression_and_checksum_reshards() {
    for format in [FormatKind::Raw, FormatKind::Safetensors] {
        for c in COMPRESSIONS {
            for k in CHECKSUMS {
                case(format.clone(), c, k).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_descriptors_are_unsupported_and_named() {
    let (mem, fs) = memfs("unknown");
    let saved = save_world(
        fs.clone(),
        1,
        writer_options(FormatKind::Raw, extensions("zstd", "crc32c")),
    )
    .await;
    saved[0].as_ref().unwrap();

    // A reader without dcp-ext's factories.
    let bare = ReaderOptions::default().registry(ExtensionRegistry::new());
    let e = load_world(fs.clone(), 1, 1, bare)
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.message().contains("zstd/1:level=3"), "{e}");

    // A checkpoint naming versions or transforms this build does not know.
    let original = mem.get(".metadata").unwrap();
    for bad in ["zstd/2:level=3", "zstd/1:dict=7,level=3", "snappy/1"] {
        let mut md = Metadata::decode(&original).unwrap();
        md.transforms[0] = bad.to_string();
        mem.put(".metadata", md.encode().unwrap());
        let e = load_world(fs.clone(), 1, 1, reader_options())
            .await
            .remove(0)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{bad}: {e}");
        assert!(e.message().contains(bad), "{bad}: {e}");
    }
    mem.put(".metadata", original);
    load_world(fs, 1, 1, reader_options())
        .await
        .remove(0)
        .unwrap();
}
