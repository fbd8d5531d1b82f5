//! Every checkpoint `dcp demo` writes, with every compression and checksum it
//! offers, loads through the facade's `dcp::reader` with default options,
//! byte for byte equal to the demo's model generator. (Here rather than in
//! the dcp crate's tests: as a dev-dependency of dcp, dcp-cli would turn on
//! dcp's `fs` and `ext` features in every test build of its feature matrix.)

use dcp::{load, ChunkBox, DestStateDict, ReaderOptions, Single};
use dcp_cli::demo::{DemoArgs, Format};
use dcp_cli::model::{self, ItemKind, ModelSpec};

const SPEC: ModelSpec = ModelSpec {
    layers: 1,
    hidden: 64,
    vocab: 128,
    seed: 11,
};

/// `dcp demo --save-only` into `dir` with `compress` and `checksum`.
fn demo_save(dir: &str, compress: &str, checksum: &str) {
    let args = DemoArgs {
        dir: Some(dir.to_string()),
        ranks: 4,
        load_ranks: 3,
        layers: Some(SPEC.layers),
        hidden: Some(SPEC.hidden),
        vocab: Some(SPEC.vocab),
        threads: 2,
        format: Format::Raw,
        seed: Some(SPEC.seed),
        save_only: true,
        load_only: false,
        no_sync: true,
        compress: compress.to_string(),
        zstd_level: 1,
        checksum: checksum.to_string(),
        json: true,
        mpi: false,
        async_save: false,
    };
    let code = dcp_cli::demo::run(args).unwrap_or_else(|e| panic!("demo: {e}"));
    assert_eq!(
        format!("{code:?}"),
        format!("{:?}", std::process::ExitCode::SUCCESS)
    );
}

/// Load every item of the checkpoint at `location` whole on one rank, with
/// `dcp::reader` and default options, and compare it with the generator.
fn load_and_compare(location: &str, want_transforms: &[&str]) {
    let mut dest = DestStateDict::new();
    let items = SPEC.items();
    for it in &items {
        match &it.kind {
            ItemKind::Bytes => dest.want_bytes(&it.name).unwrap(),
            ItemKind::Tensor { dtype, shape } => dest
                .want_tensor(&it.name, *dtype, shape.clone(), vec![ChunkBox::full(shape)])
                .unwrap(),
        }
    }
    let reader = dcp::reader(location, ReaderOptions::default()).unwrap();
    let loaded = dcp::local::block_on(load(dest, &reader, &Single))
        .unwrap()
        .unwrap_or_else(|e| panic!("load {location}: {e}"));
    let mut transforms: Vec<&str> = loaded
        .metadata
        .transforms
        .iter()
        .map(|t| t.split('/').next().unwrap())
        .collect();
    transforms.sort_unstable();
    assert_eq!(transforms, want_transforms, "{location}");
    assert_eq!(loaded.state_dict.len(), items.len());
    let mut checked = 0u64;
    for it in &items {
        match &it.kind {
            ItemKind::Bytes => {
                let got = loaded
                    .state_dict
                    .bytes(&it.name)
                    .expect("bytes item loaded");
                assert!(got == SPEC.dataloader_state(), "{location}: {}", it.name);
                checked += got.len() as u64;
            }
            ItemKind::Tensor { dtype, shape } => {
                let t = loaded.state_dict.tensor(&it.name).expect("tensor loaded");
                assert_eq!(t.chunks.len(), 1);
                let full = ChunkBox::full(shape);
                let want = model::tensor_chunk(&SPEC, &it.name, *dtype, shape, &full);
                assert!(t.chunks[0].data == want, "{location}: {} differs", it.name);
                checked += want.len() as u64;
            }
        }
    }
    assert_eq!(checked, SPEC.total_bytes());
}

#[test]
fn every_demo_compression_and_checksum_loads_with_default_options() {
    let tmp = tempfile::tempdir().unwrap();
    for compress in ["none", "zstd", "lz4"] {
        for checksum in ["crc32c", "crc32", "none"] {
            let dir = tmp.path().join(format!("{compress}-{checksum}"));
            let dir = dir.to_str().unwrap();
            demo_save(dir, compress, checksum);
            let mut want: Vec<&str> = [compress, checksum]
                .into_iter()
                .filter(|t| *t != "none")
                .collect();
            want.sort_unstable();
            // Both spellings of a local location.
            load_and_compare(dir, &want);
            load_and_compare(&format!("file://{dir}"), &want);
        }
    }
}

/// A reader's own factories are kept; the defaults only fill the gaps.
#[test]
fn caller_registries_are_kept_and_completed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let dir = dir.to_str().unwrap();
    demo_save(dir, "zstd", "crc32");
    let mut registry = dcp::ExtensionRegistry::new();
    registry.register(std::sync::Arc::new(dcp::ext::ZstdFactory));
    let options = ReaderOptions::default().registry(registry);
    let reader = dcp::reader(dir, options).unwrap();
    for name in ["zstd", "lz4", "crc32c", "crc32"] {
        assert!(reader.options().registry.contains(name), "{name}");
    }
    // Without the facade, the same checkpoint needs the caller to register
    // the transforms: dcp-core names the crate that provides them.
    let bare = dcp::FileSystemReader::new(
        dcp::open(dir, &Default::default()).unwrap(),
        ReaderOptions::default(),
    );
    let mut dest = DestStateDict::new();
    dest.want_bytes(model::DATALOADER).unwrap();
    let e = dcp::local::block_on(load(dest, &bare, &Single))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), dcp::ErrorKind::Unsupported, "{e}");
    assert!(e.message().contains("dcp-ext"), "{e}");
}
