//! Checking a checkpoint without loading it: every referenced file present
//! with its recorded length, every record inside its file, and every
//! recorded checksum matching the stored bytes.

use crate::error::{Error, Result};
use crate::metadata::{AppliedTransform, ItemMeta, Metadata};
use crate::storage::FileSystem;
use crate::transform::{ExtensionRegistry, StreamTransformExtension, TransformKind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The item, when the problem is in a record.
    pub item: Option<String>,
    /// The data file.
    pub file: String,
    /// Byte offset of the record, when in a record.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.item, self.offset) {
            (Some(i), Some(o)) => write!(f, "{i}: {} at offset {o}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Every problem, one per bad file or record.
    pub problems: Vec<Problem>,
    /// Records whose checksums were checked.
    pub checksummed_records: u64,
    /// Bytes read to check checksums.
    pub bytes_checked: u64,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check `md` against the files in `fs`. With `checksums`, read every record
/// that carries a checksum and check it, on `threads` threads; checksums
/// taken over the stored bytes are checked without decoding. Blocking.
pub fn verify(
    fs: &dyn FileSystem,
    md: &Metadata,
    registry: &ExtensionRegistry,
    checksums: bool,
    threads: usize,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut actual = Vec::with_capacity(md.files.len());
    for f in &md.files {
        let len = match fs.file_len(&f.name) {
            Ok(l) => l,
            Err(e) => {
                report.problems.push(Problem {
                    item: None,
                    file: f.name.clone(),
                    offset: None,
                    message: e.to_string(),
                });
                actual.push(None);
                continue;
            }
        };
        match len {
            None => report.problems.push(Problem {
                item: None,
                file: f.name.clone(),
                offset: None,
                message: "missing".into(),
            }),
            Some(l) if l != f.length => report.problems.push(Problem {
                item: None,
                file: f.name.clone(),
                offset: None,
                message: format!("is {l} bytes, metadata records {}", f.length),
            }),
            _ => {}
        }
        actual.push(len);
    }
    let mut resolved: Vec<Option<Arc<dyn StreamTransformExtension>>> = Vec::new();
    for d in &md.transforms {
        resolved.push(registry.resolve(d).ok());
    }
    // Records inside their (actual) files; collect checksum work.
    let mut work = Vec::new();
    let logical_of = |item: &ItemMeta, region: Option<&crate::ChunkBox>| match (item, region) {
        (ItemMeta::Tensor { dtype, .. }, Some(b)) => b.numel().saturating_mul(dtype.size() as u64),
        (ItemMeta::Bytes { length, .. }, _) => *length,
        _ => 0,
    };
    for (name, region, st) in md.records() {
        let logical = md.item(name).map_or(0, |it| logical_of(it, region));
        let file = &md.files[st.file as usize];
        let Some(len) = actual[st.file as usize] else {
            continue;
        };
        if st.offset + st.length > len {
            report.problems.push(Problem {
                item: Some(name.to_string()),
                file: file.name.clone(),
                offset: Some(st.offset),
                message: format!(
                    "record of {} bytes lies past the end of the file ({len} bytes)",
                    st.length
                ),
            });
            continue;
        }
        if checksums && !st.transforms.is_empty() {
            work.push((name, st, logical));
        }
    }
    let next = AtomicUsize::new(0);
    let checked = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let found: Mutex<Vec<(usize, Problem)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(work.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, st, logical)) = work.get(i) else {
                    break;
                };
                let file = &md.files[st.file as usize].name;
                let r = check_record(
                    fs,
                    md,
                    &resolved,
                    file,
                    st.offset,
                    st.length,
                    &st.transforms,
                    *logical,
                    name,
                );
                match r {
                    Ok(n) => {
                        if n > 0 {
                            checked.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(st.length, Ordering::Relaxed);
                        }
                    }
                    Err(e) => found.lock().unwrap_or_else(|p| p.into_inner()).push((
                        i,
                        Problem {
                            item: Some(name.to_string()),
                            file: file.clone(),
                            offset: Some(st.offset),
                            message: e.to_string(),
                        },
                    )),
                }
            });
        }
    });
    let mut found = found.into_inner().unwrap_or_else(|p| p.into_inner());
    found.sort_by_key(|(i, _)| *i);
    report.problems.extend(found.into_iter().map(|(_, p)| p));
    report.checksummed_records = checked.into_inner();
    report.bytes_checked = bytes.into_inner();
    Ok(report)
}

/// Check one record; returns how many integrity checks ran. Checksums
/// applied after the last codec cover the stored bytes and are checked
/// without decoding. A record with a codec and no such checksum, or with
/// checksums taken before a codec, is decoded whole (bounded by its logical
/// length), which also runs the codec's own integrity checks.
#[allow(clippy::too_many_arguments)]
fn check_record(
    fs: &dyn FileSystem,
    md: &Metadata,
    resolved: &[Option<Arc<dyn StreamTransformExtension>>],
    file: &str,
    offset: u64,
    length: u64,
    transforms: &[AppliedTransform],
    logical: u64,
    name: &str,
) -> Result<usize> {
    let mut tail = Vec::new();
    let mut kinds = Vec::with_capacity(transforms.len());
    for t in transforms.iter().rev() {
        let ext = resolved[t.descriptor as usize].as_ref().ok_or_else(|| {
            Error::unsupported(format!(
                "needs stream extension {:?}, which this build does not have",
                md.transforms[t.descriptor as usize]
            ))
        })?;
        kinds.push(ext.kind());
        if ext.kind() == TransformKind::Checksum && !kinds.contains(&TransformKind::Codec) {
            tail.push((ext.clone(), t));
        }
    }
    let has_codec = kinds.contains(&TransformKind::Codec);
    let checksums = kinds
        .iter()
        .filter(|k| **k == TransformKind::Checksum)
        .count();
    let needs_decode = has_codec && (tail.is_empty() || checksums > tail.len());
    if tail.is_empty() && !needs_decode {
        return Ok(0);
    }
    let mut buf =
        vec![0u8; usize::try_from(length).map_err(|_| Error::corrupt("record too large"))?];
    fs.read_into(file, offset, &mut buf)?;
    for (ext, t) in &tail {
        ext.decode(&buf, &t.value, buf.len())?;
    }
    if needs_decode {
        let what = format!("{name}: record in {file} at offset {offset}");
        crate::pipeline::read::decode_record(resolved, &what, transforms, logical, &buf, true)?;
        return Ok(tail.len() + 1);
    }
    Ok(tail.len())
}
