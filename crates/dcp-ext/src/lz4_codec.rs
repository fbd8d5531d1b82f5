//! lz4 compression (`lz4/1`), LZ4 frame format.

use crate::common::{check_empty_value, with_capacity};
use dcp_core::transform::Descriptor;
use dcp_core::{
    Error, ErrorKind, ExtensionFactory, Result, StreamEncoder, StreamTransformExtension,
    TransformKind,
};
use lz4_flex::frame::{BlockMode, BlockSize, FrameDecoder, FrameEncoder, FrameInfo};
use std::io::{Read, Write};
use std::sync::Arc;

/// lz4 compression of each record as one LZ4 frame (the standard frame
/// format, readable by `lz4 -d`), compressed piecewise as the pipeline feeds
/// it. Frames carry the format's content checksum (XXH32), so damage to a
/// compressed record is detected on load even without a checksum extension.
///
/// Descriptor `lz4/1`; kind [`TransformKind::Codec`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lz4;

impl Lz4 {
    /// The descriptor name.
    pub const NAME: &'static str = "lz4";
    /// The descriptor this transform records.
    pub const DESCRIPTOR: &'static str = "lz4/1";

    /// An lz4 transform.
    pub fn new() -> Self {
        Lz4
    }
}

fn io_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("lz4 {what} failed: {e}"))
}

struct Lz4Encoder(FrameEncoder<Vec<u8>>);

/// Move what the frame encoder produced into `out` (without a copy when
/// `out` is empty, as it is in the pipeline).
fn drain(produced: &mut Vec<u8>, out: &mut Vec<u8>) {
    if out.is_empty() {
        std::mem::swap(produced, out);
    } else {
        out.append(produced);
    }
}

impl StreamEncoder for Lz4Encoder {
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.0
            .write_all(input)
            .map_err(|e| io_error("compression", e))?;
        drain(self.0.get_mut(), out);
        Ok(())
    }

    fn finish(self: Box<Self>, out: &mut Vec<u8>) -> Result<Vec<u8>> {
        let mut rest = self.0.finish().map_err(|e| io_error("compression", e))?;
        drain(&mut rest, out);
        Ok(Vec::new())
    }
}

/// Magic number of a standard LZ4 frame.
const LZ4_FRAME_MAGIC: u32 = 0x184d_2204;

/// The block size dcp-ext writes.
const WRITE_BLOCK: usize = 64 << 10;

/// Refuse what dcp-ext never writes before the frame decoder allocates for
/// it: anything but a standard frame (legacy and skippable frames), and
/// blocks larger than both our own block size and the whole record (the
/// decoder allocates buffers of the block size the frame declares, up to
/// 4 MiB, even for a 10-byte record).
fn check_header(input: &[u8], expected_len: usize) -> Result<()> {
    let corrupt = |why: String| Error::corrupt(format!("{}: {why}", Lz4::DESCRIPTOR));
    let Some(magic) = input.get(..4) else {
        return Err(corrupt(format!(
            "stream of {} bytes is too short for an lz4 frame",
            input.len()
        )));
    };
    let magic = u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]);
    if magic != LZ4_FRAME_MAGIC {
        return Err(corrupt(format!(
            "not an lz4 frame (magic {magic:#010x}, expected {LZ4_FRAME_MAGIC:#010x})"
        )));
    }
    if let Some(&bd) = input.get(5) {
        let block = match (bd >> 4) & 7 {
            4 => 64usize << 10,
            5 => 256 << 10,
            6 => 1 << 20,
            7 => 4 << 20,
            id => return Err(corrupt(format!("invalid block size id {id}"))),
        };
        if block > WRITE_BLOCK.max(expected_len) {
            return Err(corrupt(format!(
                "frame declares {block}-byte blocks for a record of {expected_len} bytes"
            )));
        }
    }
    Ok(())
}

impl StreamTransformExtension for Lz4 {
    fn descriptor(&self) -> String {
        Self::DESCRIPTOR.to_string()
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Codec
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        let info = FrameInfo::new()
            .block_size(BlockSize::Max64KB) // = WRITE_BLOCK
            .block_mode(BlockMode::Independent)
            .content_checksum(true);
        Ok(Box::new(Lz4Encoder(FrameEncoder::with_frame_info(
            info,
            Vec::new(),
        ))))
    }

    /// Decodes into a buffer of exactly `expected_len` bytes and then checks
    /// that the stream has nothing more, so a bomb costs at most
    /// `expected_len` plus the frame decoder's block buffers, which
    /// the header check bounds by `max(64 KiB, expected_len)` each.
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        check_empty_value(Self::DESCRIPTOR, value)?;
        let corrupt = |why: String| Error::corrupt(format!("{}: {why}", Self::DESCRIPTOR));
        check_header(input, expected_len)?;
        let mut out = with_capacity(Self::DESCRIPTOR, expected_len)?;
        out.resize(expected_len, 0);
        let mut dec = FrameDecoder::new(input);
        let mut filled = 0;
        while filled < expected_len {
            match dec.read(&mut out[filled..]) {
                Ok(0) => {
                    return Err(corrupt(format!(
                        "stream decodes to {filled} bytes, expected {expected_len}"
                    )))
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(corrupt(format!(
                        "corrupt stream of {} bytes (after {filled} decoded bytes): {e}",
                        input.len()
                    )))
                }
            }
        }
        // The end of the frame (and its content checksum) is checked here. The
        // decoder reports the end of each frame as end of input, so check
        // that the input is exhausted too.
        let mut probe = [0u8; 1];
        loop {
            match dec.read(&mut probe) {
                // The frame ended; anything after it (a second frame,
                // garbage) is not part of this record.
                Ok(0) if dec.get_ref().is_empty() => return Ok(Some(out)),
                Ok(0) => {
                    return Err(corrupt(format!(
                        "{} bytes follow the end of the frame",
                        dec.get_ref().len()
                    )))
                }
                Ok(_) => {
                    return Err(corrupt(format!(
                        "stream decodes to more than the expected {expected_len} bytes"
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(corrupt(format!(
                        "corrupt stream of {} bytes (at its end): {e}",
                        input.len()
                    )))
                }
            }
        }
    }
}

/// Rebuilds [`Lz4`] from `lz4/1` (no parameters).
#[derive(Clone, Copy, Debug, Default)]
pub struct Lz4Factory;

impl ExtensionFactory for Lz4Factory {
    fn name(&self) -> &str {
        Lz4::NAME
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        d.check_version(1)?;
        d.check_params(&[])?;
        Ok(Arc::new(Lz4))
    }
}
