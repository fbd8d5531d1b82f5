//! dcp-testkit: the scaffolding dcp's test suites share, kept out of the
//! library's API (`publish = false`).
//!
//! * [`FaultFs`] ([`fault`]): a [`FileSystem`](dcp_core::FileSystem)
//!   wrapper that fails chosen operations (the n-th write, fsync, rename,
//!   list, remove or read; a short write; a full disk), before or after
//!   passing them on, simulates a power cut over a `MemoryFs` (rolling back
//!   to what was synced), or hides the page cache, and counts every
//!   operation.
//! * [`RecordingFs`] ([`recording`]): a wrapper that records every read,
//!   and every create, finish, atomic write, directory sync, list and remove
//!   in order.
//! * [`StepFs`] ([`steps`]): numbers a save's storage operations and calls
//!   a hook before and after each (the crash harness's aimed kills).
//! * [`TcpProxy`] ([`proxy`]): a TCP proxy that can be killed, to make a
//!   server (moto) unreachable mid-save while keeping its state to check.
//! * [`moto`]: a moto S3 server on 127.0.0.1, once per test binary or
//!   private, that skips (or fails under CI) when moto is not installed.
//! * [`gcs`] and [`azurite`]: fake-gcs-server and Azurite on 127.0.0.1, the
//!   same way (their process lifetime in [`server`]).
//! * [`frame_metadata`], [`encode_metadata_unchecked`]: `.metadata` bytes
//!   built by hand, to craft hostile checkpoints.
//! * [`data`] (feature `data`, on by default): deterministic tensors and
//!   bytes, from the demo's generator.
//!
//! Both wrappers are [`FileSystemLayer`](dcp_core::layer::FileSystemLayer)s:
//! what they do not change is the inner file system's own method, so a test
//! through them runs the inner backend's fast paths (`preadv`, the
//! page-cache probe), not the trait's defaults.
//!
//! ```
//! use dcp_core::{mem::MemoryFs, FileSystem};
//! use dcp_testkit::{Fault, FaultFs, Op};
//! use std::sync::Arc;
//!
//! let fs = FaultFs::new(Arc::new(MemoryFs::new("memory://kit")));
//! fs.arm(Fault::FailNth { op: Op::List, nth: 1 });
//! fs.list().unwrap();
//! let e = fs.list().unwrap_err();
//! assert!(e.to_string().contains("injected fault: List #1"));
//! assert_eq!(fs.count(Op::List), 2);
//! ```

pub mod azurite;
pub mod fault;
pub mod gcs;
pub mod moto;
pub mod proxy;
pub mod recording;
pub mod server;
pub mod steps;

#[cfg(feature = "data")]
pub mod data;

pub use fault::{Fault, FaultFs, Op};
pub use proxy::TcpProxy;
pub use recording::{ReadCall, RecordingFs, StorageCall};
pub use steps::{step_key, Step, StepFs, When};

use dcp_core::metadata::{Metadata, FORMAT_VERSION, MAGIC};

/// Length of the `.metadata` header that precedes the body.
pub const METADATA_HEADER_LEN: usize = 28;

/// Frame `body` as a `.metadata` file of format `version`: the layout of
/// `dcp_core::metadata` (magic, version, flags 0, body length, CRC-32C of
/// the body, then the body), with a length and CRC that match the body, so
/// a mutated or hand-made body gets past the header checks to the decoder.
pub fn frame_metadata(body: &[u8], version: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(METADATA_HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Encode `md` as a `.metadata` file of format `version` **without**
/// validating it (`Metadata::encode` refuses invalid metadata), to craft
/// hostile checkpoints.
pub fn encode_metadata_unchecked(md: &Metadata, version: u32) -> Vec<u8> {
    let body = postcard::to_allocvec(md).expect("postcard encodes metadata");
    frame_metadata(&body, version)
}

/// [`encode_metadata_unchecked`] with the current format version.
pub fn encode_metadata_current(md: &Metadata) -> Vec<u8> {
    encode_metadata_unchecked(md, FORMAT_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framing is the one `Metadata::encode` writes and `decode` reads.
    #[test]
    fn framing_matches_the_format() {
        let md = Metadata::decode(&metadata_sample()).expect("the sample decodes");
        assert_eq!(encode_metadata_current(&md), md.encode().unwrap());
        let mut other = encode_metadata_current(&md);
        other[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(encode_metadata_unchecked(&md, FORMAT_VERSION + 1), other);
    }

    fn metadata_sample() -> Vec<u8> {
        use dcp_core::{mem::MemoryFs, *};
        use std::sync::Arc;
        let fs: Arc<dyn FileSystem> = Arc::new(MemoryFs::new("memory://frame"));
        let mut sd = StateDict::new();
        sd.insert_full_tensor("w", DType::F32, vec![2], bytes::Bytes::from(vec![0u8; 8]))
            .unwrap();
        sd.insert_bytes("b", b"xyz".to_vec(), false).unwrap();
        let writer = FileSystemWriter::new(fs.clone(), WriterOptions::default()).unwrap();
        dcp_core::local::block_on(save(&sd, &writer, &Single))
            .unwrap()
            .unwrap();
        fs.read_small(dcp_core::storage::METADATA_FILE, 1 << 20)
            .unwrap()
    }
}
