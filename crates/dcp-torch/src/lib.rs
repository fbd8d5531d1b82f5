//! Read checkpoints written by PyTorch's `torch.distributed.checkpoint`
//! (DCP) with dcp, without Python and without running any code from them.
//!
//! A torch DCP checkpoint is a directory (or object-store prefix) holding
//! `.metadata`, a pickle, and data files `__{rank}_{n}.distcp`, each record
//! a whole `torch.save` zip archive. This crate plugs it into dcp's normal
//! load path, so resharding, partial loads, shared reads and every
//! [`FileSystem`](dcp_core::FileSystem) work on it unchanged:
//!
//! * [`pickle`]: a safe pickle reader (protocols 2 to 5) that knows exactly
//!   the globals torch DCP uses and refuses every other, naming it;
//! * [`metadata`]: torch's `.metadata` read and translated into dcp's
//!   [`Metadata`](dcp_core::Metadata) ([`TorchTranslator`], a
//!   [`MetadataTranslator`](dcp_core::MetadataTranslator));
//! * [`record`]: one `torch.save` archive: its tensor (dtype, shape,
//!   strides, storage offset, where its bytes are) or its plain value as
//!   JSON;
//! * [`safetensors`]: tensors of torch's SAFETENSORS serialization format,
//!   found in their data file's safetensors blob;
//! * [`format`](mod@format): the hooks dcp reads records through: the
//!   `torch-save` [`SerializationFormat`](dcp_core::SerializationFormat)
//!   ([`TorchSaveFormat`], which points dcp at a tensor's bytes inside its
//!   archive) and the `torch.save` stream transform ([`TorchSave`], which
//!   decodes a whole record, zstd-compressed or not).
//!
//! Tensors load bit-exact into any sharding; non-tensor items (ints,
//! floats, strings, bools, `None`, and lists, tuples and dicts of those)
//! load as dcp bytes items holding their value as JSON; anything else is
//! refused with an error naming the item. dcp never writes this format.
//!
//! ```no_run
//! use dcp_core::{FileSystemReader, ReaderOptions};
//! # fn fs() -> std::sync::Arc<dyn dcp_core::FileSystem> { unimplemented!() }
//! let mut options = ReaderOptions::default();
//! dcp_torch::register(&mut options);
//! let reader = FileSystemReader::new(fs(), options);
//! // `dcp_core::load(dest, &reader, &collective)` now reads a torch
//! // checkpoint as it reads dcp's own. The dcp crate's `dcp::reader` does
//! // this by itself with its `torch` feature.
//! ```

pub mod format;
pub mod metadata;
pub mod pickle;
pub mod record;
pub mod safetensors;

pub use format::{TorchSave, TorchSaveFactory, TorchSaveFormat};
pub use metadata::{is_torch_metadata, TorchTranslator};

use dcp_core::ReaderOptions;
use std::sync::Arc;

/// Make `options` read torch DCP checkpoints: add [`TorchTranslator`] to its
/// translators, [`TorchSaveFormat`] to its formats, and [`TorchSaveFactory`]
/// and dcp-ext's CRC-32 (which checks the archives' CRCs on load) to its
/// extension registry (each unless one of the same name is there).
pub fn register(options: &mut ReaderOptions) {
    if !options
        .translators
        .iter()
        .any(|t| t.name() == dcp_core::MetadataTranslator::name(&TorchTranslator))
    {
        options.translators.push(Arc::new(TorchTranslator));
    }
    let kind = dcp_core::FormatKind::from_name(format::FORMAT_NAME);
    if options.formats.resolve(&kind).is_err() {
        options.formats.register(Arc::new(TorchSaveFormat));
    }
    if !options.registry.contains(format::TRANSFORM_NAME) {
        options.registry.register(Arc::new(TorchSaveFactory));
    }
    if !options.registry.contains("crc32") {
        options.registry.register(Arc::new(dcp_ext::Crc32Factory));
    }
}
