//! A third `SerializationFormat`, defined only here, round trips through
//! save, a resharded load and verify, with no change to the pipeline: the
//! format decides the file extension, a header, the alignment, a frame in
//! front of every record, a footer, and checks each record's frame when it
//! is read back.

use dcp_core::format::{RecordLayout, SerializationFormat};
use dcp_core::metadata::{FormatKind, StorageInfo};
use dcp_core::verify::verify;
use dcp_core::{DType, ErrorKind, FileSystem, FormatRegistry, ReaderOptions, Result};
use dcp_tests::*;
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"FRAMEDv1";
const FRAME: usize = 12;

/// Files start with `FRAMEDv1` and the record count; every record is
/// aligned to 256 bytes and preceded by a 12-byte frame (`REC:` and its
/// stored length); the file ends with the records' offsets and `END!`.
#[derive(Debug)]
struct Framed;

impl SerializationFormat for Framed {
    fn name(&self) -> &str {
        "framed"
    }
    fn file_extension(&self) -> &str {
        "frm"
    }
    fn header(&self, records: &[RecordLayout<'_>], _save_id: &str) -> Result<Vec<u8>> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&(records.len() as u32).to_le_bytes());
        Ok(h)
    }
    fn record_alignment(&self) -> u64 {
        256
    }
    fn record_prefix(&self, record: &RecordLayout<'_>) -> Result<Vec<u8>> {
        let mut p = b"REC:".to_vec();
        p.extend_from_slice(&record.length.to_le_bytes());
        Ok(p)
    }
    fn footer(&self, _records: &[RecordLayout<'_>], placed: &[StorageInfo]) -> Result<Vec<u8>> {
        let mut f: Vec<u8> = placed.iter().flat_map(|p| p.offset.to_le_bytes()).collect();
        f.extend_from_slice(b"END!");
        Ok(f)
    }
    fn relocates(&self) -> bool {
        true
    }
    /// Reading back: the frame in front of the record must say `REC:` and
    /// the record's length; the record stays where the metadata says.
    fn locate(
        &self,
        fs: &dyn FileSystem,
        file: &str,
        stored: &StorageInfo,
    ) -> Result<Option<StorageInfo>> {
        let mut frame = [0u8; FRAME];
        let at = stored.offset.checked_sub(FRAME as u64).ok_or_else(|| {
            dcp_core::Error::corrupt(format!("{file}: record at {} has no frame", stored.offset))
        })?;
        fs.read_into(file, at, &mut frame)?;
        let len = u64::from_le_bytes(frame[4..].try_into().expect("8 bytes"));
        if &frame[..4] != b"REC:" || len != stored.length {
            return Err(dcp_core::Error::corrupt(format!(
                "{file}: bad frame in front of the record at offset {}",
                stored.offset
            )));
        }
        Ok(Some(stored.clone()))
    }
}

fn model() -> Model {
    Model {
        seed: 31,
        ..Model::default()
    }
    .tensor("w", DType::BF16, &[96, 80], Sharding::Rows)
    .tensor("v", DType::F32, &[33, 7], Sharding::Grid)
    .bytes("opt", 100, true)
}

fn cols(_: &TensorSpec) -> Sharding {
    Sharding::Cols
}

fn reader() -> ReaderOptions {
    let mut formats = FormatRegistry::new();
    formats.register(Arc::new(Framed));
    ReaderOptions::default().formats(formats).thread_count(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_defined_outside_dcp_round_trips_reshards_and_verifies() {
    let store = Backend::Fs.make_fs("framed");
    let m = model();
    let opts = fast_writer().serialization_format(Arc::new(Framed));
    let saved = save_model(store.fs(), &m, 4, opts.clone()).await;
    let md = &saved[0].metadata;
    assert_eq!(md.format, FormatKind::Named("framed".into()));

    // Every data file has the format's extension, header, frames and footer.
    let files = store.data_files();
    assert_eq!(files.len(), 4);
    for f in &files {
        assert!(f.ends_with(".frm"), "{f}");
        let bytes = store.read_raw(f).unwrap();
        assert_eq!(&bytes[..8], MAGIC, "{f}");
        assert_eq!(&bytes[bytes.len() - 4..], b"END!", "{f}");
    }
    for (_, item) in &md.items {
        let storages: Vec<&StorageInfo> = match item {
            dcp_core::metadata::ItemMeta::Tensor { chunks, .. } => {
                chunks.iter().map(|c| &c.storage).collect()
            }
            dcp_core::metadata::ItemMeta::Bytes { storage, .. } => vec![storage],
        };
        for s in storages {
            assert_eq!(s.offset % 256, 0, "aligned");
            let bytes = store.read_raw(&md.files[s.file as usize].name).unwrap();
            let at = s.offset as usize - FRAME;
            assert_eq!(&bytes[at..at + 4], b"REC:");
        }
    }

    // A resharded load (rows and grid saved by 4 ranks, columns into 3)
    // against the independent reference, with the default checksums on.
    load_and_check(store.fs(), &m, 4, 3, reader(), &cols).await;

    // Verify reads every record and checks its checksum.
    let report = verify(store.fs().as_ref(), md, &Default::default(), true, 2).unwrap();
    assert!(report.is_sound(), "{:?}", report.problems);
    assert!(report.checksummed_records > 0);

    // A reader that does not know the format refuses it by name.
    let dests = (0..2).map(|r| m.dest(r, 2, 4, &cols)).collect();
    let rs = load_ranks(store.fs(), ReaderOptions::default(), dests).await;
    for e in all_err(rs, "load without the format") {
        assert_error(
            &e,
            ErrorKind::Unsupported,
            &["\"framed\"", "ReaderOptions::formats"],
        );
    }

    // A save over it replaces the checkpoint and keeps the replaced one's
    // `.frm` files until the next commit, which removes them.
    let old = store.data_files();
    let saved = save_model(store.fs(), &m.reseeded(32), 2, opts.clone()).await;
    let new: Vec<String> = saved[0]
        .metadata
        .files
        .iter()
        .map(|f| f.name.clone())
        .collect();
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|f| !old.contains(f)), "{old:?} {new:?}");
    let mut kept: Vec<String> = old.iter().chain(&new).cloned().collect();
    kept.sort();
    assert_eq!(
        store.data_files(),
        kept,
        "the replaced checkpoint's files are kept"
    );
    assert!(saved[0].removed.is_empty());
    load_and_check(store.fs(), &m.reseeded(32), 2, 3, reader(), &cols).await;
    let saved = save_model(store.fs(), &m.reseeded(33), 2, opts).await;
    let mut removed = saved[0].removed.clone();
    removed.sort();
    assert_eq!(
        removed, old,
        "the generation before the replaced one is removed"
    );
    let mut want: Vec<String> = new;
    want.extend(saved[0].metadata.files.iter().map(|f| f.name.clone()));
    want.sort();
    assert_eq!(store.data_files(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_frame_is_caught_when_reading_back() {
    let store = Backend::Fs.make_fs("framed-damaged");
    let m = model();
    let saved = save_model(
        store.fs(),
        &m,
        2,
        fast_writer().serialization_format(Arc::new(Framed)),
    )
    .await;
    let md = &saved[0].metadata;
    let (name, item) = md.items.iter().find(|(n, _)| n == "w").unwrap();
    let dcp_core::metadata::ItemMeta::Tensor { chunks, .. } = item else {
        unreachable!()
    };
    let s = &chunks[0].storage;
    let file = &md.files[s.file as usize].name;
    let mut bytes = store.read_raw(file).unwrap();
    bytes[s.offset as usize - FRAME] = b'X';
    store.write_raw(file, bytes);
    let dests = (0..2).map(|r| m.dest(r, 2, 2, &cols)).collect();
    for e in all_err(load_ranks(store.fs(), reader(), dests).await, "load") {
        assert_error(&e, ErrorKind::Corrupt, &[name, "bad frame", file]);
    }
}

#[test]
fn invalid_format_names_and_extensions_are_refused() {
    #[derive(Debug)]
    struct Bad(&'static str, &'static str);
    impl SerializationFormat for Bad {
        fn name(&self) -> &str {
            self.0
        }
        fn file_extension(&self) -> &str {
            self.1
        }
    }
    let fs = Backend::Memory.make_fs("bad-format").fs();
    for (name, ext) in [("Raw", "dcp"), ("", "dcp"), ("ok", "d/p"), ("ok", "")] {
        let e = dcp_core::FileSystemWriter::new(
            fs.clone(),
            fast_writer().serialization_format(Arc::new(Bad(name, ext))),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name:?} {ext:?}: {e}");
    }
}
