//! One record of a TORCH_SAVE checkpoint: a whole `torch.save` zip archive.
//!
//! torch DCP saves each record (a tensor chunk, or a non-tensor value) with
//! `torch.save` into a zip archive of stored (uncompressed) entries:
//! `<prefix>/data.pkl`, the pickle of the value, and for a tensor
//! `<prefix>/data/<key>`, the bytes of its storage. `data.pkl` of a tensor
//! is `torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
//! stride, requires_grad, backward_hooks)`, the storage a persistent id
//! `('storage', torch.<Type>Storage, key, location, numel)`.
//!
//! [`parse`] reads the archive's directory and `data.pkl` (with the safe
//! [`pickle`] reader) and checks everything the tensor's
//! bytes depend on: the storage entry is stored, lies inside the record and
//! holds exactly `numel` elements of the storage's dtype, the view has at
//! most as many elements as the storage (so a record never decodes to more
//! bytes than it holds), and every element the view reaches lies inside
//! the storage. A non-tensor value must be
//! plain data ([`Pickle::to_json`](crate::pickle::Pickle::to_json)). Errors
//! are [`ErrorKind::Corrupt`](dcp_core::ErrorKind::Corrupt) for a record
//! that lies and [`ErrorKind::Unsupported`](dcp_core::ErrorKind::Unsupported)
//! for a valid one outside what dcp reads (a compressed entry, a tensor
//! subclass, an object that is not plain data).

use crate::pickle::{self, uints, Value};
use dcp_core::{DType, Error, Result};
use std::io::{Cursor, Read, Seek};

/// A tensor record: where its bytes are inside the archive, and their view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRecord {
    /// Element type.
    pub dtype: DType,
    /// Shape of the tensor.
    pub shape: Vec<u64>,
    /// Strides, in elements.
    pub strides: Vec<u64>,
    /// Offset of the first element in the storage, in elements.
    pub storage_offset: u64,
    /// The storage's entry in the archive (`archive/data/0`).
    pub entry: String,
    /// Byte offset of the storage's bytes from the start of the record.
    pub data_start: u64,
    /// Length of the storage entry in bytes.
    pub data_len: u64,
    /// CRC-32 of the storage entry, from the archive's directory.
    pub crc32: u32,
}

impl TensorRecord {
    /// Number of elements of the tensor.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Bytes of the tensor, contiguous.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// True when the tensor's elements lie in row-major order without gaps
    /// (sizes-1 dimensions may have any stride): its bytes are one range of
    /// the storage, starting at [`TensorRecord::byte_range`].
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1u64;
        for (&s, &st) in self.shape.iter().zip(&self.strides).rev() {
            if s != 1 && st != expect {
                return false;
            }
            expect = expect.saturating_mul(s);
        }
        true
    }

    /// The tensor's bytes as an offset from the start of the record and a
    /// length, when it is contiguous.
    pub fn byte_range(&self) -> Option<(u64, u64)> {
        self.is_contiguous().then(|| {
            (
                self.data_start + self.storage_offset * self.dtype.size() as u64,
                self.nbytes(),
            )
        })
    }

    /// The tensor's bytes, row-major and contiguous, from `storage` (the
    /// storage entry's bytes, already checked to hold every element the
    /// view reaches).
    pub fn gather(&self, storage: &[u8]) -> Vec<u8> {
        let es = self.dtype.size();
        let n = self.nbytes() as usize;
        if let Some((start, len)) = self.byte_range() {
            let s = (start - self.data_start) as usize;
            return storage[s..s + len as usize].to_vec();
        }
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        let nd = self.shape.len();
        let mut idx = vec![0u64; nd];
        loop {
            let e = self.storage_offset
                + idx
                    .iter()
                    .zip(&self.strides)
                    .map(|(i, s)| i * s)
                    .sum::<u64>();
            let b = e as usize * es;
            out.extend_from_slice(&storage[b..b + es]);
            // Next index, row-major.
            let mut d = nd;
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
}

/// What a record holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A tensor.
    Tensor(TensorRecord),
    /// A plain value (int, float, str, bool, None, and lists, tuples and
    /// dicts of those), as JSON.
    Object(serde_json::Value),
}

/// The dtype a legacy storage class stands for.
pub fn storage_dtype(class: &pickle::Global) -> Result<DType> {
    if class.module != "torch" {
        return Err(Error::unsupported(format!(
            "storage of type {}",
            class.qualified()
        )));
    }
    Ok(match class.name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        "UInt16Storage" => DType::U16,
        "UInt32Storage" => DType::U32,
        "UInt64Storage" => DType::U64,
        "Float8_e4m3fnStorage" => DType::F8E4M3,
        "Float8_e5m2Storage" => DType::F8E5M2,
        other => {
            return Err(Error::unsupported(format!(
                "storage of type torch.{other}: dcp has no such dtype, or the storage is untyped"
            )))
        }
    })
}

fn zip_error(e: zip::result::ZipError) -> Error {
    Error::corrupt(format!("not a valid torch.save archive: {e}"))
}

/// Read the record of `len` bytes that `reader` holds (positions 0 to
/// `len`): its directory and `data.pkl`, not the tensor's bytes. Every
/// read stays inside the record.
pub fn parse<R: Read + Seek>(reader: R, len: u64) -> Result<Record> {
    let mut zip = zip::ZipArchive::new(reader).map_err(zip_error)?;
    let pkl_name = zip
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_string)
        .ok_or_else(|| Error::corrupt("not a torch.save archive: it has no data.pkl"))?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let pkl = {
        let f = zip.by_name(&pkl_name).map_err(zip_error)?;
        check_entry(&f, len)?;
        let size = f.size();
        let mut buf = Vec::new();
        f.take(size)
            .read_to_end(&mut buf)
            .map_err(|e| Error::corrupt(format!("{pkl_name}: cannot be read: {e}")))?;
        if buf.len() as u64 != size {
            return Err(Error::corrupt(format!(
                "{pkl_name}: holds {} bytes, its directory entry says {size}",
                buf.len()
            )));
        }
        buf
    };
    let p = pickle::load(&pkl).map_err(|e| e.context(&pkl_name))?;
    let root = p.root();
    let rebuild = match root {
        Value::Object(_) => {
            let o = p.object(root, "data.pkl")?;
            if !o.class.is("torch._utils", "_rebuild_tensor_v2") {
                return Err(Error::unsupported(format!(
                    "the record holds a {} object, which is neither a tensor nor plain data",
                    o.class.qualified()
                )));
            }
            o
        }
        _ => {
            let json = p
                .to_json(root)
                .map_err(|e| e.context("the record's value cannot be read as plain data"))?;
            return Ok(Record::Object(json));
        }
    };
    let args = p.tuple(&rebuild.args, "_rebuild_tensor_v2 arguments")?;
    if !(6..=7).contains(&args.len()) {
        return Err(Error::corrupt(format!(
            "_rebuild_tensor_v2 takes 6 or 7 arguments, the record gives {}",
            args.len()
        )));
    }
    let pid = p.persistent(&args[0], "tensor storage")?;
    let pid = p.tuple(pid, "storage persistent id")?;
    let [tag, class, key, _location, numel] = pid else {
        return Err(Error::corrupt(format!(
            "storage persistent id has {} fields, expected 5",
            pid.len()
        )));
    };
    if !matches!(tag, Value::Str(s) if &**s == "storage") {
        return Err(Error::corrupt("persistent id is not a storage"));
    }
    let Value::Global(class) = class else {
        return Err(Error::corrupt("storage type is not a global"));
    };
    let dtype = storage_dtype(class)?;
    let Value::Str(key) = key else {
        return Err(Error::corrupt("storage key is not a string"));
    };
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Error::corrupt(format!("storage key {key:?} is not plain")));
    }
    let Value::Int(numel) = *numel else {
        return Err(Error::corrupt("storage size is not an integer"));
    };
    let numel =
        u64::try_from(numel).map_err(|_| Error::corrupt(format!("storage of {numel} elements")))?;
    let Value::Int(storage_offset) = args[1] else {
        return Err(Error::corrupt("storage offset is not an integer"));
    };
    let storage_offset = u64::try_from(storage_offset)
        .map_err(|_| Error::corrupt(format!("storage offset {storage_offset}")))?;
    let shape = uints(&p, &args[2], "tensor size")?;
    let strides = uints(&p, &args[3], "tensor stride")?;
    if shape.len() != strides.len() || shape.len() > dcp_core::metadata::MAX_NDIM {
        return Err(Error::corrupt(format!(
            "tensor of {} sizes and {} strides",
            shape.len(),
            strides.len()
        )));
    }
    let entry = format!("{prefix}data/{key}");
    let (data_start, data_len, crc32) = {
        let f = zip
            .by_name(&entry)
            .map_err(|e| Error::corrupt(format!("storage entry {entry}: {e}")))?;
        check_entry(&f, len)?;
        let start = f
            .data_start()
            .ok_or_else(|| Error::corrupt(format!("storage entry {entry}: no data offset")))?;
        (start, f.size(), f.crc32())
    };
    let es = dtype.size() as u64;
    let storage_bytes = numel.checked_mul(es);
    if storage_bytes != Some(data_len) {
        return Err(Error::corrupt(format!(
            "storage {entry} of {numel} {} elements needs {} bytes, the entry holds {data_len}",
            dtype.name(),
            numel.saturating_mul(es)
        )));
    }
    // Every element the view reaches lies inside the storage.
    let count = shape
        .iter()
        .try_fold(1u64, |a, &s| a.checked_mul(s))
        .ok_or_else(|| Error::corrupt(format!("tensor size {shape:?} overflows")))?;
    // torch DCP saves a view's own copy when it does not cover its storage
    // exactly, so a record never repeats storage elements (stride 0); such
    // a view would also decode to more bytes than the record holds.
    if count > numel {
        return Err(Error::corrupt(format!(
            "tensor of size {shape:?} has {count} elements over a storage of {numel}: it repeats elements"
        )));
    }
    if count > 0 {
        let last = shape
            .iter()
            .zip(&strides)
            .try_fold(storage_offset, |a, (&s, &st)| {
                (s - 1).checked_mul(st).and_then(|x| a.checked_add(x))
            });
        match last {
            Some(l) if l < numel => {}
            _ => {
                return Err(Error::corrupt(format!(
                    "tensor of size {shape:?}, stride {strides:?} at storage offset {storage_offset} reaches past its storage of {numel} elements"
                )))
            }
        }
    }
    Ok(Record::Tensor(TensorRecord {
        dtype,
        shape,
        strides,
        storage_offset,
        entry,
        data_start,
        data_len,
        crc32,
    }))
}

/// The entry is stored (torch never compresses) and lies inside the record.
fn check_entry<R: Read>(f: &zip::read::ZipFile<'_, R>, len: u64) -> Result<()> {
    if f.compression() != zip::CompressionMethod::Stored {
        return Err(Error::unsupported(format!(
            "entry {} is compressed ({}); torch.save stores entries",
            f.name(),
            f.compression()
        )));
    }
    if f.compressed_size() != f.size() {
        return Err(Error::corrupt(format!(
            "stored entry {} has size {} but {} stored bytes",
            f.name(),
            f.size(),
            f.compressed_size()
        )));
    }
    let start = f.data_start().unwrap_or(u64::MAX);
    if start.checked_add(f.size()).is_none_or(|end| end > len) {
        return Err(Error::corrupt(format!(
            "entry {} of {} bytes at offset {start} lies past the end of the {len}-byte record",
            f.name(),
            f.size()
        )));
    }
    Ok(())
}

/// A record held in memory: what it holds, and for a tensor its bytes,
/// row-major and contiguous, after checking the storage entry's CRC-32.
pub fn decode(record: &[u8]) -> Result<(Record, Option<Vec<u8>>)> {
    let len = record.len() as u64;
    let r = parse(Cursor::new(record), len)?;
    let Record::Tensor(t) = &r else {
        return Ok((r, None));
    };
    let s = t.data_start as usize;
    let storage = &record[s..s + t.data_len as usize];
    let crc = crc32fast::hash(storage);
    if crc != t.crc32 {
        return Err(Error::new(
            dcp_core::ErrorKind::ChecksumMismatch,
            format!(
                "storage entry {} has CRC-32 {crc:#010x}, the archive records {:#010x}",
                t.entry, t.crc32
            ),
        ));
    }
    let bytes = t.gather(storage);
    Ok((r, Some(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(shape: Vec<u64>, strides: Vec<u64>, offset: u64) -> TensorRecord {
        TensorRecord {
            dtype: DType::U8,
            shape,
            strides,
            storage_offset: offset,
            entry: "archive/data/0".into(),
            data_start: 0,
            data_len: 0,
            crc32: 0,
        }
    }

    #[test]
    fn gather_follows_strides() {
        let storage: Vec<u8> = (0..12).collect();
        // A 3x4 row-major view, then its transpose (4x3, strides 1, 4).
        let r = rec(vec![3, 4], vec![4, 1], 0);
        assert!(r.is_contiguous());
        assert_eq!(r.gather(&storage), storage);
        let t = rec(vec![4, 3], vec![1, 4], 0);
        assert!(!t.is_contiguous());
        assert_eq!(
            t.gather(&storage),
            vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
        );
        // An offset column: elements 1, 5, 9.
        let c = rec(vec![3], vec![4], 1);
        assert_eq!(c.gather(&storage), vec![1, 5, 9]);
        // A scalar and an empty tensor.
        assert_eq!(rec(vec![], vec![], 7).gather(&storage), vec![7]);
        assert!(rec(vec![0, 4], vec![4, 1], 0).gather(&storage).is_empty());
        // Size-1 dimensions may have any stride.
        assert!(rec(vec![1, 4], vec![99, 1], 0).is_contiguous());
    }

    /// A `torch.save` archive of a float32 view over a 6-element storage,
    /// as torch writes it (protocol 2, stored entries).
    fn archive(size: &[u8], stride: &[u8], offset: u8) -> Vec<u8> {
        use std::io::Write;
        let mut pkl =
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage".to_vec();
        pkl.extend_from_slice(
            b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK",
        );
        pkl.push(offset);
        pkl.extend_from_slice(size);
        pkl.extend_from_slice(stride);
        pkl.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR.");
        let data: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("archive/data.pkl", o).unwrap();
        w.write_all(&pkl).unwrap();
        w.start_file("archive/data/0", o).unwrap();
        w.write_all(&data).unwrap();
        w.finish().unwrap().into_inner()
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn archives_decode_through_their_strides() {
        // (2, 3) row-major, its transpose (3, 2) with strides (1, 3), and a
        // column at offset 1 with stride 3.
        let (r, b) = decode(&archive(b"K\x02K\x03\x86", b"K\x03K\x01\x86", 0)).unwrap();
        assert!(matches!(r, Record::Tensor(ref t) if t.is_contiguous()));
        assert_eq!(floats(&b.unwrap()), vec![0., 1., 2., 3., 4., 5.]);
        let (_, b) = decode(&archive(b"K\x03K\x02\x86", b"K\x01K\x03\x86", 0)).unwrap();
        assert_eq!(floats(&b.unwrap()), vec![0., 3., 1., 4., 2., 5.]);
        let (_, b) = decode(&archive(b"K\x02\x85", b"K\x03\x85", 1)).unwrap();
        assert_eq!(floats(&b.unwrap()), vec![1., 4.]);
    }

    #[test]
    fn views_that_lie_about_their_storage_are_refused() {
        // 16 elements of stride 0 over a storage of 6: repeated elements.
        let e = decode(&archive(b"K\x10\x85", b"K\x00\x85", 0)).unwrap_err();
        assert!(e.message().contains("repeats elements"), "{e}");
        // A (2, 3) view starting at element 1 reaches element 6.
        let e = decode(&archive(b"K\x02K\x03\x86", b"K\x03K\x01\x86", 1)).unwrap_err();
        assert!(e.message().contains("reaches past its storage"), "{e}");
        // A damaged storage byte fails the entry's CRC-32.
        let mut a = archive(b"K\x02K\x03\x86", b"K\x03K\x01\x86", 0);
        let at = a.windows(4).position(|w| w == 2f32.to_le_bytes()).unwrap();
        a[at] ^= 1;
        let e = decode(&a).unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::ChecksumMismatch, "{e}");
    }

    #[test]
    fn garbage_is_not_an_archive() {
        let e = decode(b"not a zip at all").unwrap_err();
        assert_eq!(e.kind(), dcp_core::ErrorKind::Corrupt);
        assert!(e.message().contains("torch.save archive"), "{e}");
    }
}
