//! Stream transforms through the `ExtensionRegistry`: a toy XOR codec (kind
//! `Codec`, with a 2-byte trailer so stored and logical lengths differ) and a
//! toy additive checksum (kind `Checksum`), both defined here. Chains survive
//! resharding, a flipped stored byte is caught, and a reader without the
//! extension refuses with `Unsupported`.

use dcp_core::metadata::{FormatKind, ItemMeta};
use dcp_core::transform::Descriptor;
use dcp_core::{
    DType, Error, ErrorKind, ExtensionFactory, ExtensionRegistry, ReaderOptions, Result,
    StreamEncoder, StreamTransformExtension, TransformKind, WriterOptions,
};
use dcp_tests::*;
use std::sync::Arc;

const TRAILER: u8 = 0xC0;

#[derive(Debug)]
struct Xor {
    key: u8,
}

struct XorEncoder {
    key: u8,
}

impl StreamEncoder for XorEncoder {
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.extend(input.iter().map(|b| b ^ self.key));
        Ok(())
    }
    fn finish(self: Box<Self>, out: &mut Vec<u8>) -> Result<Vec<u8>> {
        out.extend_from_slice(&[TRAILER, self.key]);
        Ok(Vec::new())
    }
}

impl StreamTransformExtension for Xor {
    fn descriptor(&self) -> String {
        format!("xor/1:key={}", self.key)
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Codec
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(XorEncoder { key: self.key }))
    }
    fn decode(&self, input: &[u8], _value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        match input.split_last_chunk::<2>() {
            Some((body, [TRAILER, k])) if *k == self.key && body.len() == expected_len => {
                Ok(Some(body.iter().map(|b| b ^ self.key).collect()))
            }
            _ => Err(Error::corrupt(format!(
                "xor: {} stored bytes do not decode to {expected_len}",
                input.len()
            ))),
        }
    }
}

struct XorFactory;

impl ExtensionFactory for XorFactory {
    fn name(&self) -> &str {
        "xor"
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        if d.version != 1 {
            return Err(Error::unsupported(format!(
                "xor version {} unknown",
                d.version
            )));
        }
        let key = d
            .params
            .get("key")
            .and_then(|k| k.parse::<u8>().ok())
            .ok_or_else(|| Error::unsupported("xor needs key=0..255"))?;
        Ok(Arc::new(Xor { key }))
    }
}

#[derive(Debug)]
struct AddSum;

struct AddSumEncoder(u64);

fn add_sum(data: &[u8]) -> u64 {
    data.iter().fold(0u64, |s, &b| s.wrapping_add(b as u64))
}

impl StreamEncoder for AddSumEncoder {
    fn update(&mut self, input: &[u8], _out: &mut Vec<u8>) -> Result<()> {
        self.0 = self.0.wrapping_add(add_sum(input));
        Ok(())
    }
    fn finish(self: Box<Self>, _out: &mut Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.0.to_le_bytes().to_vec())
    }
}

impl StreamTransformExtension for AddSum {
    fn descriptor(&self) -> String {
        "addsum/1".to_string()
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Checksum
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(AddSumEncoder(0)))
    }
    fn decode(&self, input: &[u8], value: &[u8], _expected_len: usize) -> Result<Option<Vec<u8>>> {
        let got = add_sum(input);
        let want = <[u8; 8]>::try_from(value)
            .map(u64::from_le_bytes)
            .map_err(|_| Error::corrupt("addsum value is not 8 bytes"))?;
        if got != want {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!("addsum mismatch: recorded {want}, computed {got}"),
            ));
        }
        Ok(None)
    }
}

struct AddSumFactory;

impl ExtensionFactory for AddSumFactory {
    fn name(&self) -> &str {
        "addsum"
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        if d.version != 1 || !d.params.is_empty() {
            return Err(Error::unsupported(format!("addsum {d} unknown")));
        }
        Ok(Arc::new(AddSum))
    }
}

fn registry(xor: bool, addsum: bool) -> ExtensionRegistry {
    let mut r = ExtensionRegistry::new();
    if xor {
        r.register(Arc::new(XorFactory));
    }
    if addsum {
        r.register(Arc::new(AddSumFactory));
    }
    r
}

fn reader(xor: bool, addsum: bool) -> ReaderOptions {
    ReaderOptions::default().registry(registry(xor, addsum))
}

fn model() -> Model {
    Model {
        seed: 11,
        ..Default::default()
    }
    .tensor("w", DType::F32, &[24, 10], Sharding::Rows)
    .tensor("g", DType::BF16, &[8, 9], Sharding::Grid)
    .tensor("r", DType::I64, &[5], Sharding::Replicated)
    .bytes("step", 40, false)
    .bytes("rng", 24, true)
}

fn writer(ext: Vec<Arc<dyn StreamTransformExtension>>, format: FormatKind) -> WriterOptions {
    fast_writer()
        .extensions(ext)
        .serialization_format(dcp_core::format::builtin(&format).unwrap())
        .thread_count(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_survive_resharding() {
    let m = model();
    let xor: Arc<dyn StreamTransformExtension> = Arc::new(Xor { key: 90 });
    let sum: Arc<dyn StreamTransformExtension> = Arc::new(AddSum);
    for backend in backends() {
        for chain in [
            vec![xor.clone(), sum.clone()],
            vec![sum.clone(), xor.clone()],
            vec![xor.clone()],
        ] {
            let names: Vec<String> = chain.iter().map(|t| t.descriptor()).collect();
            let store = backend.make_fs("chain");
            let saved = save_model(store.fs(), &m, 4, writer(chain.clone(), FormatKind::Raw)).await;
            let md = &saved[0].metadata;
            assert_eq!(md.transforms, names);
            // Every record carries the whole chain, in order of application,
            // and is stored 2 bytes longer than its logical length.
            for (name, _, st) in md.records() {
                let applied: Vec<&str> = st
                    .transforms
                    .iter()
                    .map(|t| md.transforms[t.descriptor as usize].as_str())
                    .collect();
                assert_eq!(applied, names, "{name}");
            }
            assert_eq!(
                md.stored_bytes(),
                md.logical_bytes() + 2 * md.record_count() as u64
            );
            // The stored bytes are transformed: a chunk of "w" is not found
            // in plain form in any data file.
            let ItemMeta::Tensor { chunks, .. } = md.item("w").unwrap() else {
                panic!()
            };
            let plain = m.spec("w").slice(&chunks[0].region);
            for f in store.data_files() {
                let raw = store.read_raw(&f).unwrap();
                assert!(
                    !raw.windows(plain.len()).any(|w| w == plain.as_slice()),
                    "{f} holds plain bytes"
                );
            }
            for (world, s) in [
                (3, Sharding::Cols),
                (1, Sharding::Full),
                (5, Sharding::Grid),
            ] {
                load_and_check(store.fs(), &m, 4, world, reader(true, true), &|_| s).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_catches_a_flipped_byte() {
    let m = model();
    for backend in backends() {
        for chain in [
            vec![Arc::new(AddSum) as Arc<dyn StreamTransformExtension>],
            vec![Arc::new(Xor { key: 7 }) as _, Arc::new(AddSum) as _],
        ] {
            let store = backend.make_fs("flip");
            save_model(store.fs(), &m, 2, writer(chain, FormatKind::Raw)).await;
            let md = store.metadata();
            let ItemMeta::Tensor { chunks, .. } = md.item("w").unwrap() else {
                panic!()
            };
            let st = &chunks[1].storage;
            let file = md.files[st.file as usize].name.clone();
            let mut raw = store.read_raw(&file).unwrap();
            raw[(st.offset + st.length / 2) as usize] ^= 0x10;
            store.write_raw(&file, raw);

            let dests = (0..2)
                .map(|r| m.dest(r, 2, 2, &|_| Sharding::Cols))
                .collect();
            let errs = all_err(
                load_ranks(store.fresh_fs(), reader(true, true), dests).await,
                "load flipped",
            );
            for e in &errs {
                assert_error(
                    e,
                    ErrorKind::ChecksumMismatch,
                    &["addsum mismatch", "w", &file],
                );
            }
            // Loads of items whose records are intact still succeed.
            let dests = (0..2)
                .map(|r| {
                    let mut d = dcp_core::DestStateDict::new();
                    let g = m.spec("g");
                    let boxes = load_boxes(&g.shape, Sharding::Rows, 2).swap_remove(r);
                    d.want_tensor("g", g.dtype, g.shape.clone(), boxes).unwrap();
                    d
                })
                .collect();
            let out = all_ok(
                load_ranks(store.fresh_fs(), reader(true, true), dests).await,
                "load intact item",
            );
            for o in &out {
                m.check(&o.state_dict, 2);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_without_extension_is_unsupported() {
    let m = model();
    for backend in backends() {
        let store = backend.make_fs("noext");
        let chain: Vec<Arc<dyn StreamTransformExtension>> =
            vec![Arc::new(Xor { key: 3 }), Arc::new(AddSum)];
        save_model(store.fs(), &m, 2, writer(chain, FormatKind::Raw)).await;
        for (xor, addsum, missing) in [
            (false, false, "xor/1:key=3"),
            (false, true, "xor/1:key=3"),
            (true, false, "addsum/1"),
        ] {
            let dests = (0..3)
                .map(|r| m.dest(r, 3, 2, &|_| Sharding::Rows))
                .collect();
            let errs = all_err(
                load_ranks(store.fs(), reader(xor, addsum), dests).await,
                "load without extension",
            );
            for e in &errs {
                assert_error(
                    e,
                    ErrorKind::Unsupported,
                    &[missing, "this reader does not have"],
                );
            }
        }
        // A descriptor version the factory does not know.
        let mut md = store.metadata();
        md.transforms[0] = "xor/2:key=3".to_string();
        store.write_raw(".metadata", encode_metadata_current(&md));
        let dests = vec![m.dest(0, 1, 2, &|_| Sharding::Full)];
        let errs = all_err(
            load_ranks(store.fs(), reader(true, true), dests).await,
            "load unknown version",
        );
        assert_error(&errs[0], ErrorKind::Unsupported, &["xor version 2 unknown"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safetensors_takes_checksums_but_refuses_codecs() {
    let m = model();
    for backend in backends() {
        let store = backend.make_fs("st-ext");
        let errs = all_err(
            save_ranks(
                store.fs(),
                writer(vec![Arc::new(Xor { key: 1 })], FormatKind::Safetensors),
                m.state_dicts(2),
            )
            .await,
            "safetensors with a codec",
        );
        for e in &errs {
            assert_error(e, ErrorKind::InvalidInput, &["safetensors", "xor/1:key=1"]);
        }
        assert!(store.names().is_empty(), "{:?}", store.names());

        save_model(
            store.fs(),
            &m,
            2,
            writer(vec![Arc::new(AddSum)], FormatKind::Safetensors),
        )
        .await;
        for f in store.data_files() {
            let raw = store.read_raw(&f).unwrap();
            let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
            assert!(!st.names().is_empty(), "{f}");
        }
        load_and_check(store.fs(), &m, 2, 3, reader(false, true), &|_| {
            Sharding::Cols
        })
        .await;
    }
}
