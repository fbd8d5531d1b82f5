//! [`Checksum32`]: the shape every 32-bit checksum transform shares. A type
//! names its descriptor and how to extend a running checksum; it then is a
//! [`StreamTransformExtension`] of kind [`TransformKind::Checksum`] that
//! records 4 bytes little-endian, leaves the stored bytes as they are, and
//! refuses a mismatch with [`ErrorKind::ChecksumMismatch`](crate::ErrorKind::ChecksumMismatch).

use super::{Descriptor, StreamEncoder, StreamTransformExtension, TransformKind};
use crate::error::{Error, ErrorKind, Result};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// A 32-bit checksum over a record's stored bytes. Implement it (with
/// `Copy + Default`) and the type is a stream transform; rebuild it from
/// metadata with [`build_checksum32`].
pub trait Checksum32: Copy + Default + fmt::Debug + Send + Sync + 'static {
    /// The descriptor name (`crc32c`).
    const NAME: &'static str;
    /// The descriptor this transform records (`crc32c/1`).
    const DESCRIPTOR: &'static str;
    /// The checksum of the bytes so far (`state`, 0 before any) extended
    /// with `data`.
    fn append(state: u32, data: &[u8]) -> u32;
}

/// Compare a checksum recorded as 4 bytes little-endian (`value`) with
/// `actual`, computed over `input`, which must be `expected_len` bytes long.
/// A different length is [`ErrorKind::Corrupt`]; a different checksum
/// [`ErrorKind::ChecksumMismatch`], naming `name` and both values.
pub fn check_checksum32(
    name: &str,
    value: &[u8],
    input: &[u8],
    expected_len: usize,
    actual: u32,
) -> Result<()> {
    if input.len() != expected_len {
        return Err(Error::corrupt(format!(
            "{name}: record has {} bytes, expected {expected_len}",
            input.len()
        )));
    }
    let expected: [u8; 4] = value.try_into().map_err(|_| {
        Error::corrupt(format!(
            "{name}: recorded checksum has {} bytes, expected 4",
            value.len()
        ))
    })?;
    let expected = u32::from_le_bytes(expected);
    if expected != actual {
        return Err(Error::new(
            ErrorKind::ChecksumMismatch,
            format!(
                "{name} checksum mismatch over {} bytes: expected {expected:#010x}, actual {actual:#010x}",
                input.len()
            ),
        ));
    }
    Ok(())
}

/// The running checksum of one record.
struct Encoder<T>(u32, PhantomData<T>);

impl<T: Checksum32> StreamEncoder for Encoder<T> {
    fn update(&mut self, input: &[u8], _out: &mut Vec<u8>) -> Result<()> {
        self.0 = T::append(self.0, input);
        Ok(())
    }
    fn finish(self: Box<Self>, _out: &mut Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.0.to_le_bytes().to_vec())
    }
}

impl<T: Checksum32> StreamTransformExtension for T {
    fn descriptor(&self) -> String {
        T::DESCRIPTOR.to_string()
    }
    fn kind(&self) -> TransformKind {
        TransformKind::Checksum
    }
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Ok(Box::new(Encoder::<T>(0, PhantomData)))
    }
    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        check_checksum32(
            T::DESCRIPTOR,
            value,
            input,
            expected_len,
            T::append(0, input),
        )?;
        Ok(None)
    }
}

/// Rebuild the checksum `T` from `descriptor`: version 1 and no parameters,
/// anything else refused with [`ErrorKind::Unsupported`].
pub fn build_checksum32<T: Checksum32>(
    descriptor: &Descriptor,
) -> Result<Arc<dyn StreamTransformExtension>> {
    descriptor.check_version(1)?;
    descriptor.check_params(&[])?;
    Ok(Arc::new(T::default()))
}
