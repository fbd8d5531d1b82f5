//! Reading torch DCP checkpoints never panics, hangs or runs code, whatever
//! the bytes.
//!
//! 1. The safe pickle reader (`dcp_torch::pickle::load`), then walking the
//!    result as JSON, over arbitrary bytes.
//! 2. torch's `.metadata` parsed (`dcp_torch::metadata::parse`) and a
//!    `torch.save` record decoded (`dcp_torch::record::decode`) from the
//!    same bytes.
//! 3. Structure-aware: a real torch 2.15 `.metadata` (the `torch_save`
//!    fixture) with the input's `(position, xor)` pairs applied, translated
//!    against the fixture's real data file, and the fixture's data file
//!    damaged the same way under the real `.metadata`: translation and
//!    every record's decoding either succeed or fail with an error.
#![no_main]

use dcp_core::mem::MemoryFs;
use dcp_core::FileSystem;
use libfuzzer_sys::fuzz_target;

const METADATA: &[u8] =
    include_bytes!("../../tests/fixtures/torch-dcp-2.15/torch_save/ckpt/.metadata");
const DATA: &[u8] =
    include_bytes!("../../tests/fixtures/torch-dcp-2.15/torch_save/ckpt/__0_0.distcp");

fn mutate(base: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for e in edits.chunks_exact(3) {
        let at = u16::from_le_bytes([e[0], e[1]]) as usize;
        if !v.is_empty() {
            let at = at % v.len();
            v[at] ^= e[2];
        }
    }
    v
}

fn translate_and_decode(metadata: &[u8], data: Vec<u8>) {
    let mem = MemoryFs::new("memory://fuzz-torch");
    mem.put("__0_0.distcp", data);
    let fs: &dyn FileSystem = &mem;
    let Ok(md) = dcp_torch::metadata::translate(fs, metadata) else {
        return;
    };
    // Every record through the transform that loads it.
    let mut registry = dcp_core::ExtensionRegistry::new();
    registry.register(std::sync::Arc::new(dcp_torch::TorchSaveFactory));
    let _ = dcp_core::verify::verify(fs, &md, &registry, true, 1);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = dcp_torch::pickle::load(data) {
        let _ = p.to_json(p.root());
    }
    let _ = dcp_torch::metadata::parse(data);
    let _ = dcp_torch::record::decode(data);
    match data.split_first() {
        Some((0, edits)) => translate_and_decode(&mutate(METADATA, edits), DATA.to_vec()),
        Some((1, edits)) => translate_and_decode(METADATA, mutate(DATA, edits)),
        _ => {}
    }
});
