//! [`FileSystemReader`]: the reader of the design (torch's
//! `FileSystemReader`) over any [`FileSystem`].

use crate::checkpoint::MetadataTranslator;
use crate::checkpoint::{ReaderOptions, StorageReader};
use crate::error::{Error, ErrorKind, Result};
use crate::format::SerializationFormat;
use crate::metadata::{ItemMeta, Metadata, StorageInfo, MAGIC, MAX_METADATA_LEN};
use crate::model::DestStateDict;
use crate::pipeline::blocking;
use crate::pipeline::read::{read_slots, Dest, DestSlots, ReadConfig, ReadStats, Reads, Slot};
use crate::plan::LoadPlan;
use crate::storage::{FileSystem, METADATA_FILE};
use async_trait::async_trait;
use std::sync::Arc;

/// The reader of the design (torch's `FileSystemReader`), generic over the
/// [`FileSystem`].
#[derive(Clone, Debug)]
pub struct FileSystemReader {
    fs: Arc<dyn FileSystem>,
    options: ReaderOptions,
}

impl FileSystemReader {
    /// A reader over `fs` with `options`.
    pub fn new(fs: Arc<dyn FileSystem>, options: ReaderOptions) -> Self {
        FileSystemReader { fs, options }
    }

    /// The options.
    pub fn options(&self) -> &ReaderOptions {
        &self.options
    }

    /// The file system.
    pub fn fs(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }
}

#[async_trait]
impl StorageReader for FileSystemReader {
    fn location(&self) -> String {
        self.fs.location()
    }

    /// The bytes of `.metadata`; a checkpoint of another tool that one of
    /// [`ReaderOptions::translators`] recognizes comes back translated, as
    /// dcp's encoded [`Metadata`].
    async fn read_metadata(&self) -> Result<Vec<u8>> {
        let fs = self.fs.clone();
        let translators = self.options.translators.clone();
        blocking(move || {
            let bytes = fs
                .read_small(METADATA_FILE, MAX_METADATA_LEN)
                .map_err(|e| {
                    if e.kind() == ErrorKind::NotFound {
                        Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "no checkpoint at {}: {METADATA_FILE} is missing",
                                fs.location()
                            ),
                        )
                    } else {
                        e
                    }
                })?;
            translate_foreign(fs.as_ref(), &translators, bytes)
        })
        .await
    }

    /// Ranges of `.metadata` as stored (never translated: a load asks for
    /// ranges only of dcp's own metadata, after reading its magic).
    async fn read_metadata_ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        let fs = self.fs.clone();
        let ranges = ranges.to_vec();
        blocking(move || {
            // One range from the start, as a load's first read: a file that
            // fits is read whole, as `read_metadata` reads it (one request).
            // A longer file is refused as `Corrupt`: read its range below.
            if let [(0, l)] = ranges[..] {
                match fs.read_small(METADATA_FILE, l) {
                    Ok(b) => return Ok(vec![b]),
                    Err(e) if e.kind() == ErrorKind::Corrupt => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        return Err(Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "no checkpoint at {}: {METADATA_FILE} is missing",
                                fs.location()
                            ),
                        ))
                    }
                    Err(e) => return Err(e),
                }
            }
            let len = fs.file_len(METADATA_FILE)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no checkpoint at {}: {METADATA_FILE} is missing",
                        fs.location()
                    ),
                )
            })?;
            ranges
                .iter()
                .map(|&(o, l)| {
                    let from = o.min(len);
                    let to = o.saturating_add(l).min(len);
                    let mut buf = vec![0u8; (to - from) as usize];
                    if !buf.is_empty() {
                        fs.read_into(METADATA_FILE, from, &mut buf)?;
                    }
                    Ok(buf)
                })
                .collect()
        })
        .await
    }

    async fn read(
        &self,
        md: Arc<Metadata>,
        plan: LoadPlan,
        dest: DestStateDict,
    ) -> Result<(DestStateDict, ReadStats)> {
        let (slots, stats) = self.read_into_slots(md, plan, Dest::Whole(dest)).await?;
        Ok((slots.take(), stats))
    }

    fn file_system_reader(&self) -> Option<&FileSystemReader> {
        Some(self)
    }
}

/// Transforms resolved for the records a plan reads, by descriptor index.
pub(crate) type Resolved = Vec<Option<Arc<dyn crate::transform::StreamTransformExtension>>>;

impl FileSystemReader {
    /// Read `plan` into `dest` (whole: its buffers are moved into read
    /// slots first, in the blocking work; or already in slots) and hand
    /// back its slots.
    pub(crate) async fn read_into_slots(
        &self,
        md: Arc<Metadata>,
        plan: LoadPlan,
        dest: Dest,
    ) -> Result<(DestSlots, ReadStats)> {
        let (resolved, cfg, format) = self.prepare_read(&md, &Reads::Plan(&plan))?;
        let fs = self.fs.clone();
        blocking(move || {
            let slots = dest.into_slots();
            let md = located(fs.as_ref(), format.as_ref(), md, &Reads::Plan(&plan))?;
            let all: Vec<Slot<'_>> = slots.slots().collect();
            let stats = read_slots(fs.as_ref(), &md, &Reads::Plan(&plan), &all, &resolved, &cfg)?;
            drop(all);
            Ok((slots, stats))
        })
        .await
    }

    /// Resolve the serialization format and the transforms `reads` need,
    /// and the settings of their read.
    pub(crate) fn prepare_read(
        &self,
        md: &Metadata,
        reads: &Reads<'_>,
    ) -> Result<(Resolved, ReadConfig, Arc<dyn SerializationFormat>)> {
        let format = self.options.formats.resolve(&md.format)?;
        // Resolve only the transforms the planned records use. The look
        // stops once every one is used (usually at the first record: most
        // checkpoints apply the same transforms to every record), so a
        // large plan costs no cache miss per read here.
        let mut used = vec![false; md.transforms.len()];
        let mut unused = used.len();
        let mut mark = |s: &StorageInfo| {
            for t in &s.transforms {
                if !std::mem::replace(&mut used[t.descriptor as usize], true) {
                    unused -= 1;
                }
            }
            unused == 0
        };
        let tensors = reads
            .tensors()
            .filter_map(|(r, _)| match &md.items[r.md_item].1 {
                ItemMeta::Tensor { chunks, .. } => Some(&chunks[r.saved_chunk].storage),
                ItemMeta::Bytes { .. } => None,
            });
        let bytes = reads
            .bytes()
            .iter()
            .filter_map(|b| match &md.items[b.md_item].1 {
                ItemMeta::Bytes { storage, .. } => Some(storage),
                ItemMeta::Tensor { .. } => None,
            });
        for s in tensors.chain(bytes) {
            if mark(s) {
                break;
            }
        }
        // A format that relocates records may give them transforms of the
        // table the metadata's records do not use (a checksum over the
        // located bytes): resolve those too, where the registry can.
        let mut resolved = Vec::with_capacity(md.transforms.len());
        for (i, d) in md.transforms.iter().enumerate() {
            resolved.push(if used[i] {
                Some(self.options.registry.resolve(d)?)
            } else if format.relocates() {
                self.options.registry.resolve(d).ok()
            } else {
                None
            });
        }
        // A store with a request size of its own reads neighbouring records
        // together in requests of at most that size (see
        // `read_request_size`).
        let request_size = self.fs.read_request_size().map(|n| n.max(1));
        let max_request = match request_size {
            Some(n) => self.options.max_request.min(n),
            None => self.options.max_request,
        };
        let cfg = ReadConfig {
            thread_count: self.options.thread_count.max(1),
            requests_in_flight: self.fs.read_requests_in_flight().max(1),
            request_size,
            verify_checksums: self.options.verify_checksums,
            coalesce_gap: self.options.coalesce_gap,
            max_request: max_request.max(1),
            small_record: self.options.small_record,
        };
        Ok((resolved, cfg, format))
    }
}

/// `md` with the records `reads` read where `format` finds them
/// ([`SerializationFormat::locate`]); `md` itself when the format never
/// moves records. Blocking: a format may read the data files.
pub(crate) fn located(
    fs: &dyn FileSystem,
    format: &dyn SerializationFormat,
    md: Arc<Metadata>,
    reads: &Reads<'_>,
) -> Result<Arc<Metadata>> {
    if !format.relocates() {
        return Ok(md);
    }
    let mut out = (*md).clone();
    let relocate = |name: &str, s: &mut StorageInfo| -> Result<()> {
        let file = &md.files[s.file as usize];
        if let Some(found) = format
            .locate(fs, &file.name, s)
            .map_err(|e| e.context(name))?
        {
            if found.file != s.file
                || found
                    .offset
                    .checked_add(found.length)
                    .is_none_or(|end| end > file.length)
            {
                return Err(Error::corrupt(format!(
                    "{name}: format {} located the record outside {} ({} bytes)",
                    format.name(),
                    file.name,
                    file.length
                )));
            }
            *s = found;
        }
        Ok(())
    };
    let mut seen = std::collections::BTreeSet::new();
    for (r, _) in reads.tensors() {
        if seen.insert((r.md_item, r.saved_chunk)) {
            let (name, item) = &mut out.items[r.md_item];
            if let ItemMeta::Tensor { chunks, .. } = item {
                relocate(name, &mut chunks[r.saved_chunk].storage)?;
            }
        }
    }
    for b in reads.bytes() {
        let (name, item) = &mut out.items[b.md_item];
        if let ItemMeta::Bytes { storage, .. } = item {
            relocate(name, storage)?;
        }
    }
    Ok(Arc::new(out))
}

/// `bytes` as they are when they are dcp's metadata; otherwise translated
/// by the first of `translators` that recognizes them and encoded as dcp's.
/// A pickle no translator takes is refused with a hint (a torch DCP
/// checkpoint read by a build without torch support).
fn translate_foreign(
    fs: &dyn FileSystem,
    translators: &[Arc<dyn MetadataTranslator>],
    bytes: Vec<u8>,
) -> Result<Vec<u8>> {
    if bytes.starts_with(&MAGIC) {
        return Ok(bytes);
    }
    if let Some(t) = translators.iter().find(|t| t.recognizes(&bytes)) {
        let md = t.translate(fs, &bytes).map_err(|e| {
            e.context(format!(
                "{}: reading a {} checkpoint",
                fs.location(),
                t.name()
            ))
        })?;
        return md.encode();
    }
    if bytes.len() >= 2 && bytes[0] == 0x80 && bytes[1] <= 5 {
        return Err(Error::unsupported(format!(
            "{}: {METADATA_FILE} is a Python pickle (a torch.distributed.checkpoint checkpoint?), \
             and this reader has no translator for it; open it with the dcp crate's `torch` feature \
             (dcp::reader), or add dcp_torch's translator to ReaderOptions::translators",
            fs.location()
        )));
    }
    Ok(bytes)
}
