//! The hooks through which dcp's load path reads torch DCP records: the
//! serialization format [`TorchSaveFormat`] (`torch-save`) and the stream
//! transform [`TorchSave`] (`torch.save/1`, and `torch.save/1:zstd=1` for
//! torch's `stream.zstd/1` records).
//!
//! The translated metadata ([`crate::metadata`]) records each torch record
//! where it is, whole (the zip archive, compressed or not), with one
//! `torch.save` transform, a codec whose decoder parses the archive and
//! returns the tensor's bytes or the value as JSON. That alone reads every
//! record correctly (whole, like torch). The format then makes the common
//! case fast: for an uncompressed tensor record whose view is contiguous,
//! [`TorchSaveFormat::locate`] reads the archive's directory and `data.pkl`
//! (two small reads) and points dcp at the tensor's bytes inside the
//! archive, so dcp reads only the bytes a destination needs, straight into
//! it, as for its own files (partial and scattered reads, shared reads).

use crate::record::{self, Record};
use dcp_core::format::SerializationFormat;
use dcp_core::metadata::{AppliedTransform, StorageInfo, TransformValue, Transforms, MAX_NDIM};
use dcp_core::transform::Descriptor;
use dcp_core::{
    DType, Error, ErrorKind, ExtensionFactory, FileSystem, Result, StreamEncoder,
    StreamTransformExtension, TransformKind,
};
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

/// The format name the translated metadata records.
pub const FORMAT_NAME: &str = "torch-save";
/// The transform descriptor name of torch records.
pub const TRANSFORM_NAME: &str = "torch.save";
/// The most bytes a zstd-compressed non-tensor record may decode to (its
/// JSON length is not known before).
pub const MAX_OBJECT_RECORD: usize = 256 << 20;

/// What the translation knows of a record before reading it, kept as the
/// `torch.save` transform's recorded value: whether it is a tensor or a
/// plain value, whether it is zstd-compressed, and a tensor's dtype and
/// shape, which its `data.pkl` must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordTag {
    /// A non-tensor value, read as JSON.
    pub object: bool,
    /// Compressed with torch's `stream.zstd/1`.
    pub zstd: bool,
    /// A tensor's element type (`None` for an object).
    pub dtype: Option<DType>,
    /// A tensor chunk's shape (`None` for an object).
    pub shape: Option<Vec<u64>>,
    /// The index of `crc32/1` in the metadata's transform table, for an
    /// uncompressed tensor record: [`TorchSaveFormat::locate`] gives the
    /// located bytes that checksum with the CRC-32 the archive records for
    /// them, so every load verifies them.
    pub crc32: Option<u32>,
}

const TAG_VERSION: u8 = 1;
/// Shapes of more dimensions than this are not recorded in the tag (the
/// metadata's transform values are at most 256 bytes); the record's byte
/// count is still checked.
const TAG_MAX_NDIM: usize = 30;

impl RecordTag {
    /// The encoded value: version, flags, dtype code, the `crc32/1`
    /// descriptor index (4 bytes, when flagged), then the shape.
    pub fn encode(&self) -> Vec<u8> {
        let flags = u8::from(self.object)
            | (u8::from(self.zstd) << 1)
            | (u8::from(self.crc32.is_some()) << 2);
        let mut v = vec![TAG_VERSION, flags, self.dtype.map_or(0, DType::code)];
        if let Some(i) = self.crc32 {
            v.extend_from_slice(&i.to_le_bytes());
        }
        match &self.shape {
            Some(s) if s.len() <= TAG_MAX_NDIM => {
                v.push(s.len() as u8);
                for d in s {
                    v.extend_from_slice(&d.to_le_bytes());
                }
            }
            _ => v.push(u8::MAX),
        }
        v
    }

    /// Decode [`RecordTag::encode`]'s bytes; anything else is
    /// [`ErrorKind::Corrupt`].
    pub fn decode(v: &[u8]) -> Result<RecordTag> {
        let bad = || {
            Error::corrupt(format!(
                "{TRANSFORM_NAME}: recorded value {v:02x?} is not a record tag"
            ))
        };
        let [version, flags, dtype, rest @ ..] = v else {
            return Err(bad());
        };
        if *version != TAG_VERSION || *flags > 7 {
            return Err(bad());
        }
        let object = flags & 1 != 0;
        let zstd = flags & 2 != 0;
        let (crc32, rest) = if flags & 4 != 0 {
            match rest {
                [a, b, c, d, rest @ ..] if !object && !zstd => {
                    (Some(u32::from_le_bytes([*a, *b, *c, *d])), rest)
                }
                _ => return Err(bad()),
            }
        } else {
            (None, rest)
        };
        let [ndim, rest @ ..] = rest else {
            return Err(bad());
        };
        let (dtype, shape) = if object {
            if *dtype != 0 || *ndim != u8::MAX || !rest.is_empty() {
                return Err(bad());
            }
            (None, None)
        } else {
            let dtype = DType::from_code(*dtype).map_err(|_| bad())?;
            let shape = if *ndim == u8::MAX {
                if !rest.is_empty() {
                    return Err(bad());
                }
                None
            } else {
                if *ndim as usize > TAG_MAX_NDIM || rest.len() != *ndim as usize * 8 {
                    return Err(bad());
                }
                Some(
                    rest.chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect(),
                )
            };
            (Some(dtype), shape)
        };
        Ok(RecordTag {
            object,
            zstd,
            dtype,
            shape,
            crc32,
        })
    }
}

/// The layout of a TORCH_SAVE checkpoint's data files (`__{rank}_{n}.distcp`,
/// each record a whole `torch.save` archive), for reading only: every save
/// with it is refused. It relocates uncompressed, contiguous tensor records
/// to the tensor's bytes inside the archive (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct TorchSaveFormat;

impl SerializationFormat for TorchSaveFormat {
    fn name(&self) -> &str {
        FORMAT_NAME
    }

    fn file_extension(&self) -> &str {
        "distcp"
    }

    /// Refuses every save: dcp reads torch's records but writes its own
    /// formats.
    fn check_transforms(&self, _: &[Arc<dyn StreamTransformExtension>]) -> Result<()> {
        Err(Error::unsupported(
            "the torch-save format reads checkpoints written by torch.distributed.checkpoint; dcp does not write it \
             (save with dcp's raw or safetensors format, or convert with `dcp convert`)",
        ))
    }

    fn relocates(&self) -> bool {
        true
    }

    /// For an uncompressed tensor record (one `torch.save/1` transform),
    /// the tensor's bytes inside the archive, checked against the record:
    /// stored entry inside the record, dtype and shape as the metadata
    /// says, every element inside the storage; with the archive's CRC-32
    /// of them as a `crc32/1` checksum when the tag names that descriptor
    /// and the bytes are the whole storage entry. A non-contiguous view, a
    /// compressed record or a non-tensor value stays where it is (`None`)
    /// and is decoded whole.
    fn locate(
        &self,
        fs: &dyn FileSystem,
        file: &str,
        stored: &StorageInfo,
    ) -> Result<Option<StorageInfo>> {
        let [t] = stored.transforms.as_slice() else {
            return Ok(None);
        };
        let Ok(tag) = RecordTag::decode(&t.value) else {
            return Ok(None);
        };
        if tag.object || tag.zstd {
            return Ok(None);
        }
        let reader = RangeReader::new(fs, file, stored.offset, stored.length);
        let what = || format!("torch.save record in {file} at offset {}", stored.offset);
        let rec = record::parse(reader, stored.length).map_err(|e| e.context(what()))?;
        let Record::Tensor(rec) = rec else {
            return Err(Error::corrupt(format!(
                "{}: holds a plain value where the metadata records a tensor",
                what()
            )));
        };
        check_tensor(&tag, &rec).map_err(|e| e.context(what()))?;
        let Some((start, len)) = rec.byte_range() else {
            return Ok(None);
        };
        // The archive's CRC-32 covers the whole storage entry: it checks the
        // located bytes when they are all of it (torch saves a view's own
        // copy when its storage is larger).
        let transforms = match tag.crc32 {
            Some(descriptor) if rec.storage_offset == 0 && len == rec.data_len => {
                Transforms::from_buf([AppliedTransform {
                    descriptor,
                    value: TransformValue::from_slice(&rec.crc32.to_le_bytes()),
                    input_len: None,
                }])
            }
            _ => Transforms::new(),
        };
        Ok(Some(StorageInfo {
            file: stored.file,
            offset: stored.offset + start,
            length: len,
            transforms,
        }))
    }
}

/// The record's tensor is the one the metadata records.
fn check_tensor(tag: &RecordTag, rec: &record::TensorRecord) -> Result<()> {
    if tag.dtype != Some(rec.dtype) {
        return Err(Error::corrupt(format!(
            "the record holds a {} tensor, the metadata records {}",
            rec.dtype.name(),
            tag.dtype.map_or("no dtype", DType::name)
        )));
    }
    if let Some(shape) = &tag.shape {
        if *shape != rec.shape {
            return Err(Error::corrupt(format!(
                "the record holds a tensor of size {:?}, the metadata records a chunk of {shape:?}",
                rec.shape
            )));
        }
    }
    if rec.shape.len() > MAX_NDIM {
        return Err(Error::corrupt("tensor of too many dimensions"));
    }
    Ok(())
}

/// Reads the bytes `[base, base + len)` of a data file through a
/// [`FileSystem`] in 64 KiB blocks (a few kept), as `Read + Seek` for the
/// zip reader: the directory at the end and `data.pkl` at the start of a
/// record cost one request each.
struct RangeReader<'a> {
    fs: &'a dyn FileSystem,
    file: &'a str,
    base: u64,
    len: u64,
    pos: u64,
    blocks: Vec<(u64, Vec<u8>)>,
}

const BLOCK: u64 = 64 << 10;

impl<'a> RangeReader<'a> {
    fn new(fs: &'a dyn FileSystem, file: &'a str, base: u64, len: u64) -> Self {
        RangeReader {
            fs,
            file,
            base,
            len,
            pos: 0,
            blocks: Vec::new(),
        }
    }
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let start = self.pos / BLOCK * BLOCK;
        let i = match self.blocks.iter().position(|(s, _)| *s == start) {
            Some(i) => i,
            None => {
                let n = BLOCK.min(self.len - start) as usize;
                let mut v = vec![0u8; n];
                self.fs
                    .read_into(self.file, self.base + start, &mut v)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                if self.blocks.len() >= 4 {
                    self.blocks.remove(0);
                }
                self.blocks.push((start, v));
                self.blocks.len() - 1
            }
        };
        let block = &self.blocks[i].1;
        let at = (self.pos - start) as usize;
        let n = buf.len().min(block.len() - at);
        buf[..n].copy_from_slice(&block[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangeReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the record's start",
            )
        })?;
        Ok(self.pos)
    }
}

/// torch's records as a dcp stream transform: a codec whose decoder turns a
/// whole record (a `torch.save` archive, zstd-compressed with `zstd=1`)
/// into the tensor's bytes, row-major, or a plain value's JSON. Its
/// recorded value is a [`RecordTag`]. It only decodes: dcp never writes
/// torch records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TorchSave {
    /// The record is compressed with torch's `stream.zstd/1`.
    pub zstd: bool,
}

impl TorchSave {
    /// The descriptor of records without and with torch's zstd.
    pub fn descriptor_for(zstd: bool) -> String {
        if zstd {
            format!("{TRANSFORM_NAME}/1:zstd=1")
        } else {
            format!("{TRANSFORM_NAME}/1")
        }
    }

    /// Decode a whole record whose expected output length is not known (a
    /// non-tensor value, at translation): the value's JSON. A zstd record
    /// may decode to at most [`MAX_OBJECT_RECORD`] bytes.
    pub fn read_object(&self, stored: &[u8]) -> Result<Vec<u8>> {
        let zip = self.unzstd(stored, MAX_OBJECT_RECORD)?;
        match record::decode(&zip)?.0 {
            Record::Object(json) => Ok(json_bytes(&json)),
            Record::Tensor(_) => Err(Error::corrupt(
                "the record holds a tensor where the metadata records a non-tensor value",
            )),
        }
    }

    fn unzstd<'a>(&self, stored: &'a [u8], max: usize) -> Result<std::borrow::Cow<'a, [u8]>> {
        if self.zstd {
            Ok(std::borrow::Cow::Owned(
                dcp_ext::decompress_at_most(stored, max).map_err(|e| e.context("stream.zstd/1"))?,
            ))
        } else {
            Ok(std::borrow::Cow::Borrowed(stored))
        }
    }
}

/// A plain value's JSON, as dcp stores it in a bytes item.
pub fn json_bytes(json: &serde_json::Value) -> Vec<u8> {
    json.to_string().into_bytes()
}

impl StreamTransformExtension for TorchSave {
    fn descriptor(&self) -> String {
        Self::descriptor_for(self.zstd)
    }

    fn kind(&self) -> TransformKind {
        TransformKind::Codec
    }

    /// Refused: dcp reads torch records and never writes them.
    fn encoder(&self) -> Result<Box<dyn StreamEncoder>> {
        Err(Error::unsupported(
            "torch.save/1 only decodes records written by torch.distributed.checkpoint",
        ))
    }

    fn decode(&self, input: &[u8], value: &[u8], expected_len: usize) -> Result<Option<Vec<u8>>> {
        let tag = RecordTag::decode(value)?;
        if tag.zstd != self.zstd {
            return Err(Error::corrupt(format!(
                "{}: the record's tag says zstd={}",
                self.descriptor(),
                tag.zstd
            )));
        }
        // The archive around a tensor adds about 1.5 KiB; a plain value's
        // pickle is at most a few times its JSON.
        let max = if tag.object {
            expected_len.saturating_mul(16).saturating_add(1 << 20)
        } else {
            expected_len.saturating_add(1 << 20)
        };
        let zip = self.unzstd(input, max)?;
        let out = match record::decode(&zip)? {
            (Record::Object(json), _) if tag.object => json_bytes(&json),
            (Record::Tensor(t), Some(bytes)) if !tag.object => {
                check_tensor(&tag, &t)?;
                bytes
            }
            (Record::Object(_), _) => {
                return Err(Error::corrupt(
                    "the record holds a plain value where the metadata records a tensor",
                ))
            }
            _ => {
                return Err(Error::corrupt(
                    "the record holds a tensor where the metadata records a non-tensor value",
                ))
            }
        };
        if out.len() != expected_len {
            return Err(Error::corrupt(format!(
                "the record decodes to {} bytes, the metadata expects {expected_len}",
                out.len()
            )));
        }
        Ok(Some(out))
    }
}

/// Builds [`TorchSave`] from `torch.save/1` or `torch.save/1:zstd=1`;
/// refuses other versions and parameters with [`ErrorKind::Unsupported`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TorchSaveFactory;

impl ExtensionFactory for TorchSaveFactory {
    fn name(&self) -> &str {
        TRANSFORM_NAME
    }

    fn build(&self, d: &Descriptor) -> Result<Arc<dyn StreamTransformExtension>> {
        d.check_version(1)?;
        d.check_params(&["zstd"])?;
        let zstd = match d.params.get("zstd").map(String::as_str) {
            None => false,
            Some("1") => true,
            Some(other) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("stream extension {d}: zstd={other:?} (only 1)"),
                ))
            }
        };
        Ok(Arc::new(TorchSave { zstd }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_refuse_garbage() {
        for tag in [
            RecordTag {
                object: true,
                zstd: false,
                dtype: None,
                shape: None,
                crc32: None,
            },
            RecordTag {
                object: false,
                zstd: true,
                dtype: Some(DType::BF16),
                shape: Some(vec![3, 0, 7]),
                crc32: None,
            },
            RecordTag {
                object: false,
                zstd: false,
                dtype: Some(DType::F32),
                shape: None,
                crc32: Some(7),
            },
        ] {
            assert_eq!(RecordTag::decode(&tag.encode()).unwrap(), tag);
        }
        for bad in [
            &[][..],
            &[1, 0, 0],
            &[2, 0, 0, 0],
            &[1, 4, 0, 255],
            &[1, 0, 11, 1, 0],
        ] {
            assert_eq!(
                RecordTag::decode(bad).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn factory_reads_descriptors() {
        let f = TorchSaveFactory;
        for (s, zstd) in [("torch.save/1", false), ("torch.save/1:zstd=1", true)] {
            let t = f.build(&Descriptor::parse(s).unwrap()).unwrap();
            assert_eq!(t.descriptor(), s);
            assert_eq!(TorchSave::descriptor_for(zstd), s);
            assert!(t.encoder().is_err());
        }
        for bad in [
            "torch.save/2",
            "torch.save/1:zstd=2",
            "torch.save/1:level=3",
        ] {
            let e = f.build(&Descriptor::parse(bad).unwrap()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{bad}");
        }
    }

    #[test]
    fn the_format_refuses_saves() {
        let e = TorchSaveFormat.check_transforms(&[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}
