//! The byte-moving paths: write workers, read workers, and the copy kernel.

pub mod copy;
pub(crate) mod exchange;
pub(crate) mod read;
pub(crate) mod write;

pub use read::ReadStats;
