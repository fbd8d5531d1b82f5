//! [`Raw`]: records back to back, each aligned to [`RAW_ALIGN`] bytes.

use super::SerializationFormat;

/// Alignment of records in `Raw` data files.
pub const RAW_ALIGN: u64 = 64;

/// The default format: no header or footer, every record at a multiple of
/// [`RAW_ALIGN`] bytes, so a data file can be memory-mapped and each record
/// viewed in place. Holds any transform chain. Data files end in `.dcp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Raw;

impl SerializationFormat for Raw {
    fn name(&self) -> &str {
        "raw"
    }
    fn file_extension(&self) -> &str {
        "dcp"
    }
    fn record_alignment(&self) -> u64 {
        RAW_ALIGN
    }
}
