//! Helpers shared by the transforms: descriptor checks and bounded buffers.

use dcp_core::{Error, ErrorKind, Result};

/// A codec's recorded value must be empty: codecs record nothing.
pub(crate) fn check_empty_value(name: &str, value: &[u8]) -> Result<()> {
    if value.is_empty() {
        Ok(())
    } else {
        Err(Error::corrupt(format!(
            "{name}: a codec records no value, but {} bytes were recorded",
            value.len()
        )))
    }
}

/// An empty vector with room for exactly `len` bytes, or an error (never an
/// abort) when memory cannot be had.
pub(crate) fn with_capacity(name: &str, len: usize) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("{name}: cannot allocate {len} bytes for a decoded record: {e}"),
        )
    })?;
    Ok(v)
}
