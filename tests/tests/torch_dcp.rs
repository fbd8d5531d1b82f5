//! Checkpoints written by torch.distributed.checkpoint 2.15 (the fixtures in
//! `tests/fixtures/torch-dcp-2.15/`, written by `make_torch_fixtures.py`
//! beside them) load through dcp's ordinary reader with `dcp_torch`
//! registered: every tensor bit-exact against `expected.safetensors`, every
//! non-tensor value equal to `expected.json`, whole and resharded into 1, 3
//! and 5 ranks by rows and by columns, on every backend of the suite (S3 on
//! moto included). Records that lie fail the load and `verify`, naming the
//! item.

use dcp_core::metadata::{ItemMeta, Metadata};
use dcp_core::{
    ChunkBox, DType, DestStateDict, ErrorKind, FileSystem, FileSystemReader, LoadOptions,
    ReaderOptions, Single,
};
use dcp_tests::{all_err, all_ok, backends, load_boxes, load_ranks, Backend, Sharding, Store};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FIXTURES: [&str; 8] = [
    "torch_save",
    "torch_save_zstd",
    "torch_save_per_item_files",
    "torch_save_2threads",
    "sharded4",
    "strided",
    "safetensors_format",
    "safetensors_format_2threads",
];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/torch-dcp-2.15")
        .join(name)
}

/// A fixture's expected values: tensors (dtype, shape, row-major bytes) and
/// the JSON of the other values.
struct Expected {
    tensors: BTreeMap<String, (DType, Vec<u64>, Vec<u8>)>,
    json: serde_json::Map<String, serde_json::Value>,
}

fn expected(name: &str) -> Expected {
    let dir = fixture_dir(name);
    let st = std::fs::read(dir.join("expected.safetensors")).expect("expected.safetensors");
    let st = safetensors::SafeTensors::deserialize(&st).expect("valid safetensors");
    let mut tensors = BTreeMap::new();
    for (k, v) in st.tensors() {
        let dtype = match v.dtype() {
            safetensors::Dtype::BOOL => DType::Bool,
            safetensors::Dtype::U8 => DType::U8,
            safetensors::Dtype::I8 => DType::I8,
            safetensors::Dtype::I16 => DType::I16,
            safetensors::Dtype::I32 => DType::I32,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            other => panic!("{name}: {k}: dtype {other:?} not in the fixtures"),
        };
        let shape = v.shape().iter().map(|&s| s as u64).collect();
        tensors.insert(k, (dtype, shape, v.data().to_vec()));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).expect("expected.json"))
            .expect("valid JSON");
    let serde_json::Value::Object(json) = json else {
        panic!("expected.json is not an object")
    };
    Expected { tensors, json }
}

/// A fresh location on `backend` holding a copy of the fixture's `ckpt/`.
fn upload(name: &str, backend: Backend) -> Store {
    let store = backend.make_fs(&format!("torch-{name}"));
    if let Some(p) = store.os_path() {
        std::fs::create_dir_all(p).expect("create the checkpoint directory");
    }
    let ckpt = fixture_dir(name).join("ckpt");
    for e in std::fs::read_dir(&ckpt).expect("fixture ckpt/") {
        let e = e.expect("dir entry");
        let n = e.file_name().into_string().expect("UTF-8 name");
        store.write_raw(&n, std::fs::read(e.path()).expect("read fixture file"));
    }
    store
}

fn torch_options() -> ReaderOptions {
    let mut o = ReaderOptions::default();
    dcp_torch::register(&mut o);
    o
}

/// The bytes of `b` out of a row-major tensor of `shape`.
fn sub_box(full: &[u8], shape: &[u64], es: usize, b: &ChunkBox) -> Vec<u8> {
    let mut out = Vec::new();
    if b.is_empty() {
        return out;
    }
    let nd = shape.len();
    let mut idx = vec![0u64; nd];
    loop {
        let mut lin = 0u64;
        for d in 0..nd {
            lin = lin * shape[d] + b.offsets[d] + idx[d];
        }
        let at = lin as usize * es;
        out.extend_from_slice(&full[at..at + es]);
        let mut d = nd;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < b.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Load every item of `exp` on `world` ranks with `sharding` and compare
/// every byte and value.
async fn load_and_check(
    what: &str,
    fs: Arc<dyn FileSystem>,
    exp: &Expected,
    world: usize,
    sharding: Sharding,
) -> u64 {
    let mut compared = 0u64;
    let mut dests: Vec<DestStateDict> = (0..world).map(|_| DestStateDict::new()).collect();
    for (name, (dtype, shape, _)) in &exp.tensors {
        let boxes = load_boxes(shape, sharding, world);
        for (r, d) in dests.iter_mut().enumerate() {
            d.want_tensor(name.clone(), *dtype, shape.clone(), boxes[r].clone())
                .unwrap();
        }
    }
    for name in exp.json.keys() {
        for d in &mut dests {
            d.want_bytes(name.clone()).unwrap();
        }
    }
    let loaded = all_ok(load_ranks(fs, torch_options(), dests).await, what);
    for (r, l) in loaded.iter().enumerate() {
        for (name, (dtype, shape, full)) in &exp.tensors {
            let t = l.state_dict.tensor(name).expect("loaded tensor");
            for c in &t.chunks {
                let want = sub_box(full, shape, dtype.size(), &c.region);
                assert!(
                    c.data == want,
                    "{what}: rank {r}: {name} chunk ({}) differs from expected.safetensors",
                    c.region
                );
                compared += want.len() as u64;
            }
        }
        for (name, value) in &exp.json {
            let b = l.state_dict.bytes(name).expect("loaded bytes item");
            let got: serde_json::Value = serde_json::from_slice(b)
                .unwrap_or_else(|e| panic!("{what}: {name} is not JSON: {e}"));
            assert_eq!(&got, value, "{what}: rank {r}: {name}");
            compared += b.len() as u64;
        }
    }
    compared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_loads_bit_exact_whole_and_resharded_on_every_backend() {
    let (mut loads, mut compared) = (0, 0u64);
    let backends = backends();
    for &backend in &backends {
        for name in FIXTURES {
            let exp = expected(name);
            let store = upload(name, backend);
            let what = format!("{name} on {}", backend.name());
            compared += load_and_check(&what, store.fs(), &exp, 1, Sharding::Full).await;
            loads += 1;
            for world in [1, 3, 5] {
                for sharding in [Sharding::Rows, Sharding::Cols] {
                    let w = format!("{what}, {world} ranks by {sharding:?}");
                    compared += load_and_check(&w, store.fs(), &exp, world, sharding).await;
                    loads += 1;
                }
            }
        }
    }
    assert!(compared > 0);
    eprintln!(
        "torch fixtures: {loads} loads on {:?}, {compared} bytes compared, all equal",
        backends.iter().map(|b| b.name()).collect::<Vec<_>>()
    );
}

/// The metadata dcp makes of torch's: every item, dtype and shape; a
/// record per saved chunk (empty chunks dropped); world size from the file
/// names; torch's save id.
#[tokio::test]
async fn translated_metadata_describes_the_checkpoint() {
    for name in FIXTURES {
        let exp = expected(name);
        let store = upload(name, Backend::Fs);
        let reader = FileSystemReader::new(store.fs(), torch_options());
        let md: Metadata = dcp_core::read_metadata(&reader).await.unwrap();
        assert_eq!(md.format.name(), "torch-save", "{name}");
        assert_eq!(md.generation, 0);
        assert_eq!(md.user["source"], "torch.distributed.checkpoint");
        assert_eq!(md.save_id.len(), 36, "{name}: torch's uuid: {}", md.save_id);
        assert_eq!(
            md.world_size,
            if name == "sharded4" { 4 } else { 1 },
            "{name}"
        );
        assert_eq!(md.items.len(), exp.tensors.len() + exp.json.len(), "{name}");
        for (n, (dtype, shape, _)) in &exp.tensors {
            match md.item(n) {
                Some(ItemMeta::Tensor {
                    dtype: d,
                    shape: s,
                    chunks,
                }) => {
                    assert_eq!((d, &s[..]), (dtype, &shape[..]), "{name}: {n}");
                    let saved: u64 = chunks.iter().map(|c| c.region.numel()).sum();
                    // Every element saved once (the replicated one too).
                    assert_eq!(saved, shape.iter().product::<u64>(), "{name}: {n}");
                }
                other => panic!("{name}: {n}: {other:?}"),
            }
        }
        for n in exp.json.keys() {
            assert!(
                matches!(md.item(n), Some(ItemMeta::Bytes { .. })),
                "{name}: {n}"
            );
        }
        let files = std::fs::read_dir(fixture_dir(name).join("ckpt"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".distcp")
            })
            .count();
        // With one file per record, the empty tensor's file holds no byte
        // dcp reads (its chunk is dropped), so it is not a data file of
        // the translation.
        let unused = usize::from(name == "torch_save_per_item_files");
        assert_eq!(md.files.len(), files - unused, "{name}");
        if name == "sharded4" {
            let chunks = |n: &str| match md.item(n) {
                Some(ItemMeta::Tensor { chunks, .. }) => chunks.len(),
                _ => 0,
            };
            assert_eq!(
                (
                    chunks("rows"),
                    chunks("cols"),
                    chunks("grid"),
                    chunks("repl")
                ),
                (4, 3, 4, 1),
                "cols: 9 columns over 4 ranks is torch.chunk's 3+3+3+0"
            );
        }
        // The whole checkpoint verifies: every record decodes.
        let registry = torch_options().registry;
        let report =
            dcp_core::verify::verify(store.fs().as_ref(), &md, &registry, true, 2).unwrap();
        assert!(report.is_sound(), "{name}: {:?}", report.problems);
        // Every torch.save record decodes (its archive's CRCs checked);
        // tensors of torch's SAFETENSORS format are plain bytes.
        let plain = md
            .records()
            .filter(|(_, _, s)| s.transforms.is_empty())
            .count();
        assert_eq!(
            report.checksummed_records as usize,
            md.record_count() - plain,
            "{name}"
        );
        assert_eq!(plain > 0, name.starts_with("safetensors"), "{name}");
    }
}

/// Uncompressed tensor records are read where the tensor's bytes are, not
/// whole archives: loading one row reads the tensor's bytes once to check
/// the archive's CRC-32 of them, and without checksums only that row.
#[tokio::test]
async fn a_partial_load_reads_only_what_it_needs() {
    let store = upload("torch_save", Backend::Fs);
    let exp = expected("torch_save");
    let (dtype, shape, full) = &exp.tensors["model.embed.weight"];
    let one_row = ChunkBox::new(vec![5, 0], vec![1, shape[1]]).unwrap();
    for (verify, want_read) in [(true, 64 * 32 * 2), (false, shape[1] * 2)] {
        let mut dest = DestStateDict::new();
        dest.want_tensor(
            "model.embed.weight",
            *dtype,
            shape.clone(),
            vec![one_row.clone()],
        )
        .unwrap();
        let reader = FileSystemReader::new(store.fs(), torch_options().verify_checksums(verify));
        let l = dcp_core::load_with(dest, &reader, &Single, &LoadOptions::default())
            .await
            .unwrap();
        let t = l.state_dict.tensor("model.embed.weight").unwrap();
        assert_eq!(t.chunks[0].data, sub_box(full, shape, 2, &one_row));
        assert_eq!(
            l.stats.bytes_read, want_read,
            "checksums {verify}: the tensor's bytes (to check its CRC-32) or one row of bf16, never the 5673-byte archive"
        );
    }
}

/// Without the torch translator, a torch checkpoint is refused with a hint,
/// not misread.
#[tokio::test]
async fn a_reader_without_torch_support_says_what_to_enable() {
    let store = upload("torch_save", Backend::Fs);
    let reader = FileSystemReader::new(store.fs(), ReaderOptions::default());
    let e = dcp_core::read_metadata(&reader).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.message().contains("torch"), "{e}");
}

// ---------------------------------------------------------------------------
// Records that lie
// ---------------------------------------------------------------------------

/// Where `entry`'s central-directory header and its bytes are in a
/// `torch.save` archive `rec`: (central header offset, data offset, size).
fn entry_in(rec: &[u8], entry: &str) -> (usize, usize, usize) {
    let name = entry.as_bytes();
    let mut i = 0;
    while let Some(p) = rec[i..].windows(4).position(|w| w == b"PK\x01\x02") {
        let h = i + p;
        let nlen = u16::from_le_bytes([rec[h + 28], rec[h + 29]]) as usize;
        if &rec[h + 46..h + 46 + nlen] == name {
            let size = u32::from_le_bytes(rec[h + 24..h + 28].try_into().unwrap()) as usize;
            let local = u32::from_le_bytes(rec[h + 42..h + 46].try_into().unwrap()) as usize;
            let ln = u16::from_le_bytes([rec[local + 26], rec[local + 27]]) as usize;
            let le = u16::from_le_bytes([rec[local + 28], rec[local + 29]]) as usize;
            return (h, local + 30 + ln + le, size);
        }
        i = h + 4;
    }
    panic!("no entry {entry}")
}

/// Rewrite `entry` of the archive `rec` in place (same length) and fix its
/// CRC-32 in the central directory and the data descriptor, so only the
/// content lies.
fn patch_entry(rec: &mut [u8], entry: &str, f: impl FnOnce(&mut [u8])) {
    let (h, data, size) = entry_in(rec, entry);
    f(&mut rec[data..data + size]);
    let crc = crc32fast::hash(&rec[data..data + size]).to_le_bytes();
    rec[h + 16..h + 20].copy_from_slice(&crc);
    if rec[data + size..data + size + 4] == *b"PK\x07\x08" {
        rec[data + size + 4..data + size + 8].copy_from_slice(&crc);
    }
}

/// The first record of `model.embed.weight` in `torch_save` (bf16 64x32)
/// lies at offset 5044, 5673 bytes long; damage it with `f`, then load the
/// tensor and verify the checkpoint. Both must fail naming the item.
async fn lying_embed(f: impl FnOnce(&mut [u8]), needle: &str) {
    const AT: usize = 5044;
    const LEN: usize = 5673;
    let store = upload("torch_save", Backend::Memory);
    let mut data = store.read_raw("__0_0.distcp").unwrap();
    f(&mut data[AT..AT + LEN]);
    store.write_raw("__0_0.distcp", data);
    let exp = expected("torch_save");
    let (dtype, shape, _) = &exp.tensors["model.embed.weight"];
    for (world, sharding) in [(1, Sharding::Full), (3, Sharding::Cols)] {
        let dests = (0..world)
            .map(|r| {
                let mut d = DestStateDict::new();
                d.want_tensor(
                    "model.embed.weight",
                    *dtype,
                    shape.clone(),
                    load_boxes(shape, sharding, world)[r].clone(),
                )
                .unwrap();
                d
            })
            .collect();
        let errs = all_err(load_ranks(store.fs(), torch_options(), dests).await, needle);
        for e in errs {
            assert!(
                e.message().contains("model.embed.weight") && e.message().contains(needle),
                "{world} ranks: {e}"
            );
        }
    }
    let reader = FileSystemReader::new(store.fs(), torch_options());
    let md = dcp_core::read_metadata(&reader).await.unwrap();
    let registry = torch_options().registry;
    let report = dcp_core::verify::verify(store.fs().as_ref(), &md, &registry, true, 2).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(p.item.as_deref(), Some("model.embed.weight"));
    assert!(p.message.contains(needle), "{p}");
}

#[tokio::test]
async fn a_storage_entry_of_the_wrong_size_fails_load_and_verify() {
    // The directory says data/0 is 2 bytes shorter than 2048 bf16 elements.
    lying_embed(
        |rec| {
            let (h, _, size) = entry_in(rec, "archive/data/0");
            let s = ((size - 2) as u32).to_le_bytes();
            rec[h + 20..h + 24].copy_from_slice(&s);
            rec[h + 24..h + 28].copy_from_slice(&s);
        },
        "the entry holds 4094",
    )
    .await;
}

#[tokio::test]
async fn a_storage_smaller_than_its_view_fails_load_and_verify() {
    // data.pkl says the view starts one element into the storage: its last
    // element lies past the storage's 2048.
    lying_embed(
        |rec| {
            patch_entry(rec, "archive/data.pkl", |pkl| {
                let at = pkl.windows(3).position(|w| w == b"QK\x00").unwrap();
                pkl[at + 2] = 1;
            })
        },
        "reaches past its storage",
    )
    .await;
}

#[tokio::test]
async fn a_storage_count_that_lies_fails_load_and_verify() {
    // data.pkl says the storage holds 2047 elements; the entry holds 2048.
    lying_embed(
        |rec| {
            patch_entry(rec, "archive/data.pkl", |pkl| {
                let at = pkl.windows(3).position(|w| w == b"M\x00\x08").unwrap();
                pkl[at + 1] = 0xff;
                pkl[at + 2] = 0x07;
            })
        },
        "needs 4094 bytes",
    )
    .await;
}

#[tokio::test]
async fn a_damaged_tensor_byte_fails_load_and_verify_on_the_archive_crc() {
    let store = upload("torch_save", Backend::Memory);
    let mut data = store.read_raw("__0_0.distcp").unwrap();
    let (_, at, _) = entry_in(&data[5044..5044 + 5673], "archive/data/0");
    data[5044 + at + 100] ^= 1;
    store.write_raw("__0_0.distcp", data);
    // A load of any part of it, on one rank or resharded on three.
    let exp = expected("torch_save");
    let (dtype, shape, _) = &exp.tensors["model.embed.weight"];
    for (world, sharding) in [(1, Sharding::Rows), (3, Sharding::Cols)] {
        let dests = (0..world)
            .map(|r| {
                let mut d = DestStateDict::new();
                let b = load_boxes(shape, sharding, world)[r].clone();
                d.want_tensor("model.embed.weight", *dtype, shape.clone(), b)
                    .unwrap();
                d
            })
            .collect();
        for e in all_err(load_ranks(store.fs(), torch_options(), dests).await, "crc") {
            assert_eq!(e.kind(), ErrorKind::ChecksumMismatch, "{e}");
            assert!(e.message().contains("model.embed.weight"), "{e}");
        }
    }
    let reader = FileSystemReader::new(store.fs(), torch_options());
    let md = dcp_core::read_metadata(&reader).await.unwrap();
    let registry = torch_options().registry;
    let report = dcp_core::verify::verify(store.fs().as_ref(), &md, &registry, true, 2).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(
        report.problems[0].item.as_deref(),
        Some("model.embed.weight")
    );
    assert!(
        report.problems[0].message.contains("CRC-32"),
        "{}",
        report.problems[0]
    );
}

#[tokio::test]
async fn a_record_past_the_end_of_its_file_fails_naming_the_item() {
    let store = upload("torch_save", Backend::Memory);
    let mut data = store.read_raw("__0_0.distcp").unwrap();
    // The last record (optim.hist.1, at 34592) loses its end.
    data.truncate(34592 + 100);
    store.write_raw("__0_0.distcp", data);
    let reader = FileSystemReader::new(store.fs(), torch_options());
    let e = dcp_core::read_metadata(&reader).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.message().contains("optim.hist.1") && e.message().contains("past the end"),
        "{e}"
    );
    // A missing data file is NotFound, naming it.
    store.remove_raw("__0_0.distcp");
    let e = dcp_core::read_metadata(&reader).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.message().contains("__0_0.distcp"), "{e}");
}

#[tokio::test]
async fn a_non_tensor_record_that_is_not_plain_data_is_refused() {
    let store = upload("torch_save", Backend::Memory);
    let mut data = store.read_raw("__0_0.distcp").unwrap();
    // optim.step (at 0, 1261 bytes) pickles 1234 as BININT2; make it a
    // global the allow-list does not hold (same length: `c` + module +
    // name lines would not fit, so use an opcode torch never writes).
    patch_entry(&mut data[..1261], "archive/data.pkl", |pkl| {
        let at = pkl.windows(3).position(|w| w == b"M\xd2\x04").unwrap();
        pkl[at] = b'I';
    });
    store.write_raw("__0_0.distcp", data);
    let reader = FileSystemReader::new(store.fs(), torch_options());
    let e = dcp_core::read_metadata(&reader).await.unwrap_err();
    assert!(
        e.message().contains("optim.step") && e.message().contains("INT"),
        "{e}"
    );
}
