//! zstd compression (`zstd/1:level=N`).

use crate::common::{check_empty_value, with_capacity};
use dcp_core::transform::Descriptor;
use dcp_core::{
    Error, ErrorKind, ExtensionFactory, Result, StreamEncoder, StreamTransformExtension,
    TransformKind,
};
use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, Mutex};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, InBuffer, OutBuffer, ResetDirective};

/// Compression contexts kept for reuse per [`Zstd`] instance: a context holds
/// about a megabyte of tables, too much to allocate for every record.
const POOL_MAX: usize = 64;

/// zstd compression of each record as one zstd frame, compressed piecewise
/// as the pipeline feeds it. Frames carry zstd's own content checksum
/// (XXH64), so damage to a compressed record is detected on load even
/// without a checksum extension.
///
/// Descriptor `zstd/1:level=N`; kind [`TransformKind::Codec`]. The level
/// only affects writing; any `zstd/1` frame decodes the same way.
#[derive(Clone)]
pub struct Zstd {
    level: i32,
    pool: Arc<Mutex<Vec<CCtx<'static>>>>,
}

impl fmt::Debug for Zstd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zstd").field("level", &self.level).finish()
    }
}

impl Default for Zstd {
    /// Level 1: fast, and most of the gain on checkpoint data.
    fn default() -> Self {
        Zstd {
            level: Self::DEFAULT_LEVEL,
            pool: Arc::default(),
        }
    }
}

impl PartialEq for Zstd {
    fn eq(&self, other: &Self) -> bool {
        self.level == other.level
    }
}

fn zstd_error(what: &str, code: usize) -> Error {
    Error::new(
        ErrorKind::Io,
        format!("zstd {what} failed: {}", zstd_safe::get_error_name(code)),
    )
}

impl Zstd {
    /// The descriptor name.
    pub const NAME: &'static str = "zstd";
    /// The level of [`Zstd::default`].
    pub const DEFAULT_LEVEL: i32 = 1;

    /// zstd at `level`: 1 to 22, or a negative "fast" level down to zstd's
    /// minimum. Refuses 0 (zstd's alias for its default; write 3) and
    /// anything outside zstd's range with [`ErrorKind::InvalidInput`].
    pub fn new(level: i32) -> Result<Zstd> {
        let range = zstd::compression_level_range();
        if level == 0 || !range.contains(&level) {
            return Err(Error::invalid(format!(
                "zstd level {level} is invalid: use 1 to {} (or a negative fast level down to {})",
                range.end(),
                range.start()
            )));
        }
        Ok(Zstd {
            level,
            pool: Arc::default(),
        })
    }

    /// The compression level.
    pub fn level(&self) -> i32 {
        self.level
    }

    fn context(&self) -> Result<CCtx<'static>> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        let mut c = CCtx::try_create()
            .ok_or_else(|| Error::new(ErrorKind::Io, "zstd: cannot allocate a context"))?;
        c.set_parameter(CParameter::CompressionLevel(self.level))
            .map_err(|e| zstd_error("set level", e))?;
        c.set_parameter(CParameter::ChecksumFlag(true))
            .map_err(|e| zstd_error("enable checksums", e))?;
        Ok(c)
    }
}

struct ZstdEncoder {
    ctx: CCtx<'static>,
    pool: Arc<Mutex<Vec<CCtx<'static>>>>,
}

impl StreamEncoder for ZstdEncoder {
    fn update(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut inb = InBuffer::around(input);
        while inb.pos() < input.len() {
            // Room for the worst case of what is left, so one call usually
            // consumes the whole piece without reallocating.
            let left = input.len() - inb.pos();
            out.reserve(zstd::compress_bound(left).max(CCtx::out_size()));
            let at = out.len();
            let mut outb = OutBuffer::around_pos(out, at);
            self.ctx
                .compress_stream(&mut outb, &mut inb)
                .map_err(|e| zstd_error("compression", e))?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, out: &mut Vec<u8>) -> Result<Vec<u8>> {
        loop {
            out.reserve(CCtx::out_size());
            let at = out.len();
            let mut outb = OutBuffer::around_pos(out, at);
            let left = self
                .ctx
                .end_stream(&mut outb)
                .map_err(|e| zstd_error("compression", e))?;
            if left == 0 {
                break;
            }
        }
        if self.ctx.reset(ResetDirective::SessionOnly).is_ok() {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(self.ctx);
            }
        }
        Ok(Vec::new())
    }
}

thread_local! {
    /// One decompression context per thread, reused across records.
    static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

/// Decompress `input` into a buffer of capacity exactly `expected_len`:
/// zstd's one-shot decoder writes only into that buffer (no window buffer),
/// so a bomb or a corrupt frame cannot make it allocate more.
fn decompress_bounded(input: &[u8], expected_len: usize) -> Result<Vec<u8>> {
    let out = decompress_at_most(input, expected_len)?;
    if out.len() == expected_len {
        Ok(out)
    } else {
        Err(Error::corrupt(format!(
            "zstd/1: stream decodes to {} bytes, expected {expected_len}",
            out.len()
        )))
    }
}

/// Decompress the zstd frames of `input` (any zstd stream: dcp's `zstd/1`
/// records, torch's `stream.zstd/1`) into a buffer of capacity `max_len`,
/// for callers that know a bound on the output but not its exact length.
/// zstd's one-shot decoder writes only into that buffer, so a bomb cannot
/// make it allocate more; a stream that decodes to more than `max_len`
/// bytes, or is corrupt, is an [`ErrorKind::Corrupt`] error.
pub fn decompress_at_most(input: &[u8], max_len: usize) -> Result<Vec<u8>> {
    const NAME: &str = "zstd/1";
    let corrupt = |why: String| Error::corrupt(format!("{NAME}: {why}"));
    // A frame that declares its size lets us refuse early with both numbers.
    if let Ok(Some(declared)) = zstd_safe::get_frame_content_size(input) {
        if declared > max_len as u64 {
            return Err(corrupt(format!(
                "stream declares {declared} decoded bytes, at most {max_len} expected"
            )));
        }
    }
    let mut out = with_capacity(NAME, max_len)?;
    let res = DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = DCtx::try_create();
        }
        let Some(ctx) = slot.as_mut() else {
            return Err(Error::new(
                ErrorKind::Io,
                "zstd: cannot allocate a decompression context",
            ));
        };
        let r = ctx.decompress(&mut out, input);
        if r.is_err() {
            // Start the next record from a fresh context.
            *slot = None;
        }
        Ok(r)
    })?;
    match res {
        Ok(_) => Ok(out),
        Err(code) => {
            let name = zstd_safe::get_error_name(code);
            if name.contains("too small") {
                Err(corrupt(format!(
                    "stream decodes to more than the expected {max_len} bytes"
                )))
            } else {
                Err(corrupt(format!(
                    "corrupt stream of {} bytes: {name}",
                    input.len()
                )))
            }
        }
    }
}

impl StreamTransformExtension for Zstd {
    fn descriptor(&self) -> String {
        format!("{}/1:level={}", Self::NAME, self.level)
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Codec
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(ZstdEncoder {
            ctx: self.context()?,
            pool: self.pool.clone(),
        }))
    }
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        check_empty_value("zstd/1", value)?;
        decompress_bounded(input, expected_len).map(Some)
    }
}

/// Rebuilds [`Zstd`] from `zstd/1:level=N` (or `zstd/1`, read as the default
/// level: the level does not matter for decoding). Refuses other versions,
/// other parameters and invalid levels with [`ErrorKind::Unsupported`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ZstdFactory;

impl ExtensionFactory for ZstdFactory {
    fn name(&self) -> &str {
        Zstd::NAME
    }
    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        d.check_version(1)?;
        d.check_params(&["level"])?;
        let level = match d.params.get("level") {
            None => Zstd::DEFAULT_LEVEL,
            Some(s) => s.parse::<i32>().map_err(|_| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("stream extension {d}: level {s:?} is not an integer"),
                )
            })?,
        };
        let z = Zstd::new(level).map_err(|e| {
            Error::new(
                ErrorKind::Unsupported,
                format!("stream extension {d}: {}", e.message()),
            )
        })?;
        Ok(Arc::new(z))
    }
}
