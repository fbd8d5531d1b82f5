//! Hugging Face safetensors out of any checkpoint dcp reads: one
//! `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards with
//! `model.safetensors.index.json`, under the dotted state-dict names.
//!
//! Each output file is written in one sequential pass through a buffer of
//! at most [`ExportOptions::buffer_bytes`]: every tensor is read in
//! row-major slabs (whole rows where they fit, parts of a row where one
//! does not) through dcp's ordinary load path, so a tensor saved in many
//! chunks by many ranks is assembled on the fly and memory is bounded by
//! the buffer, not by the largest tensor. Local files are written under a
//! temporary name, fsynced and renamed into place; on an object store
//! ([`export_safetensors_at`]) each file is one upload that becomes
//! visible only once complete and is aborted on error: either way a failed
//! export leaves no partial file at the output.

use dcp_core::metadata::ItemMeta;
use dcp_core::{
    ChunkBox, DType, DestStateDict, Error, ErrorKind, FileSink, FileSystem, FileSystemReader,
    Metadata, Result, Single,
};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options of [`export_safetensors`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExportOptions {
    /// Start a new shard before a file would exceed this many bytes of
    /// tensor data (a tensor larger than this gets a shard of its own).
    /// Default 5 GB (10^9 bytes), as Hugging Face's `save_pretrained`.
    pub max_shard_size: u64,
    /// Glob patterns of the names to export (`*`, `?`, `[...]`); empty:
    /// every tensor. Matched against the checkpoint's names.
    pub keys: Vec<String>,
    /// `(from, to)` prefix renames, the first that matches applies:
    /// `("model.", "")` drops a prefix.
    pub renames: Vec<(String, String)>,
    /// The most bytes of tensor data held in memory at once: two slabs of
    /// half this, one read while the other is written. Default 64 MiB.
    pub buffer_bytes: u64,
    /// Check each record's checksum while exporting. A checksummed record
    /// is then read whole for every slab that touches it, so memory grows
    /// to the largest record and large records are read many times; off by
    /// default, when `dcp verify` (or a load) is the place to check them.
    pub verify_checksums: bool,
    /// Called after each slab is written (from the export's thread) with
    /// the bytes of tensor data just written and the total the export
    /// writes: drives a progress bar. None by default.
    pub on_progress: Option<OnProgress>,
}

/// A progress callback of [`ExportOptions::on_progress`]: called with the
/// number of tensor bytes just written and the export's total.
#[derive(Clone)]
pub struct OnProgress(pub std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for OnProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnProgress(..)")
    }
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            max_shard_size: 5_000_000_000,
            keys: Vec::new(),
            renames: Vec::new(),
            buffer_bytes: 64 << 20,
            verify_checksums: false,
            on_progress: None,
        }
    }
}

impl ExportOptions {
    /// Set [`ExportOptions::max_shard_size`].
    pub fn max_shard_size(mut self, bytes: u64) -> Self {
        self.max_shard_size = bytes;
        self
    }
    /// Set [`ExportOptions::keys`].
    pub fn keys(mut self, globs: Vec<String>) -> Self {
        self.keys = globs;
        self
    }
    /// Set [`ExportOptions::renames`].
    pub fn renames(mut self, renames: Vec<(String, String)>) -> Self {
        self.renames = renames;
        self
    }
    /// Set [`ExportOptions::buffer_bytes`].
    pub fn buffer_bytes(mut self, bytes: u64) -> Self {
        self.buffer_bytes = bytes;
        self
    }
    /// Set [`ExportOptions::verify_checksums`].
    pub fn verify_checksums(mut self, verify: bool) -> Self {
        self.verify_checksums = verify;
        self
    }
    /// Set [`ExportOptions::on_progress`]: `f(written, total)` is called
    /// after each slab is written.
    pub fn on_progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.on_progress = Some(OnProgress(std::sync::Arc::new(f)));
        self
    }
}

/// What [`export_safetensors`] wrote.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ExportReport {
    /// The safetensors files, in shard order (and the index, last, when
    /// sharded).
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Bytes items of the checkpoint, which safetensors cannot hold: not
    /// written.
    pub skipped_bytes_items: Vec<String>,
}

/// One tensor to export: its checkpoint name, output name, dtype, shape.
struct Plan {
    name: String,
    out: String,
    dtype: DType,
    shape: Vec<u64>,
    bytes: u64,
}

/// Export the tensors of the checkpoint `reader` reads as safetensors at
/// `out`: a path ending in `.safetensors` is one file (refused if the
/// tensors need more than one shard); any other path is a directory
/// (created) that receives `model.safetensors`, or the shards and
/// `model.safetensors.index.json`. Blocking (it runs on a thread and a
/// runtime of its own, so it may be called from anywhere, a tokio task
/// included, where it blocks that thread).
///
/// Refuses: a name that no glob of [`ExportOptions::keys`] matches when
/// globs were given and nothing matched, an invalid glob, two tensors
/// renamed to the same name, an existing output file (nothing is
/// overwritten). Bytes items are not written (listed in the report).
pub fn export_safetensors(
    reader: &FileSystemReader,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportReport> {
    let single = out.extension().is_some_and(|e| e == "safetensors");
    let (dir, single) = if single {
        let dir = out.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        (dir, Some(name.into_owned()))
    } else {
        (out.to_path_buf(), None)
    };
    export_to(reader, Dest::Local(dir), single, options)
}

/// [`export_safetensors`] to `out` given as a path or a URL: a local path
/// (or `file://`) exports as [`export_safetensors`] does; an object store
/// (`s3://`, `gs://`, `azblob://`, `memory://`, opened with
/// `storage_options` as [`crate::open`] opens it) receives each file as one
/// upload, visible only once complete and aborted on error, after a check
/// that none of the files exists (refused with `AlreadyExists`, nothing
/// written). `out` ending in `.safetensors` is one file; anything else is
/// the prefix ("directory") that receives `model.safetensors` or the
/// shards and the index.
pub fn export_safetensors_at(
    reader: &FileSystemReader,
    out: &str,
    storage_options: &HashMap<String, String>,
    options: &ExportOptions,
) -> Result<ExportReport> {
    let loc = crate::Location::parse(out)?;
    if let Some(path) = loc.local_path() {
        if !storage_options.is_empty() {
            return Err(Error::invalid(format!(
                "{out} is a local path: storage options do not apply"
            )));
        }
        return export_safetensors(reader, Path::new(&path), options);
    }
    let url = loc.url();
    let (dir, single) = match url.strip_suffix(".safetensors") {
        Some(_) => match url.rsplit_once('/') {
            Some((dir, name)) if !dir.ends_with('/') && dir.contains("://") => {
                (dir.to_string(), Some(name.to_string()))
            }
            _ => {
                return Err(Error::invalid(format!(
                    "{out}: name a file inside a bucket (scheme://bucket/name.safetensors)"
                )))
            }
        },
        None => (url.clone(), None),
    };
    let fs = crate::open(&dir, storage_options)?;
    export_to(reader, Dest::Store { fs, url: dir }, single, options)
}

/// Run the export on a thread and a runtime of its own.
fn export_to(
    reader: &FileSystemReader,
    dest: Dest,
    single: Option<String>,
    options: &ExportOptions,
) -> Result<ExportReport> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Error::new(ErrorKind::Io, format!("start a tokio runtime: {e}")))?;
            export_on(&rt, reader, &dest, single.as_deref(), options)
        })
        .join()
        .unwrap_or_else(|_| Err(Error::invalid("the export thread panicked")))
    })
}

/// Where the exported files go: a local directory, or a prefix of a store.
enum Dest {
    Local(PathBuf),
    Store {
        fs: Arc<dyn FileSystem>,
        url: String,
    },
}

impl Dest {
    /// `name` as a path or URL, for messages and the report.
    fn show(&self, name: &str) -> PathBuf {
        match self {
            Dest::Local(dir) => dir.join(name),
            Dest::Store { url, .. } => {
                PathBuf::from(format!("{}/{name}", url.trim_end_matches('/')))
            }
        }
    }

    /// Create the directory (a store needs none).
    fn prepare(&self) -> Result<()> {
        match self {
            Dest::Local(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("create", &dir.display().to_string(), e)),
            Dest::Local(_) => Ok(()),
            Dest::Store { fs, .. } => fs.prepare(),
        }
    }

    fn exists(&self, name: &str) -> Result<bool> {
        match self {
            Dest::Local(dir) => Ok(dir.join(name).exists()),
            Dest::Store { fs, .. } => Ok(fs.file_len(name)?.is_some()),
        }
    }

    /// Write `name` through `fill`, whole or not at all.
    fn write(
        &self,
        name: &str,
        fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        match self {
            Dest::Local(dir) => write_atomically(&dir.join(name), fill),
            Dest::Store { fs, .. } => {
                let show = self.show(name).display().to_string();
                let mut w = SinkWriter {
                    sink: fs.create(name)?,
                    buf: Vec::with_capacity(SINK_PIECE),
                };
                let filled = fill(&mut w).and_then(|()| w.push());
                match filled {
                    Ok(()) => w.sink.finish(true).map(|_| ()),
                    Err(e) => {
                        w.sink.abort();
                        Err(from_io(&show, e))
                    }
                }
            }
        }
    }
}

/// Bytes handed to a store's upload at a time.
const SINK_PIECE: usize = 8 << 20;

/// An upload as a `Write`: bytes gathered into pieces of [`SINK_PIECE`].
struct SinkWriter {
    sink: Box<dyn FileSink>,
    buf: Vec<u8>,
}

impl SinkWriter {
    fn push(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(SINK_PIECE));
        self.sink
            .write(bytes::Bytes::from(piece))
            .map_err(std::io::Error::other)
    }
}

impl Write for SinkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(SINK_PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == SINK_PIECE {
            self.push()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn export_on(
    rt: &tokio::runtime::Runtime,
    reader: &FileSystemReader,
    dest: &Dest,
    single: Option<&str>,
    options: &ExportOptions,
) -> Result<ExportReport> {
    let md = rt.block_on(dcp_core::read_metadata(reader))?;
    // The slabs' reader: the caller's, with checksums checked or not.
    let slab_reader = FileSystemReader::new(
        reader.fs().clone(),
        reader
            .options()
            .clone()
            .verify_checksums(options.verify_checksums),
    );
    let reader = &slab_reader;
    let (plans, skipped) = plan(&md, options)?;
    let shards = shard(&plans, options.max_shard_size);
    if let (Some(name), true) = (single, shards.len() > 1) {
        return Err(Error::invalid(format!(
            "{}: the tensors need {} shards of at most {} bytes; give a directory",
            dest.show(name).display(),
            shards.len(),
            options.max_shard_size
        )));
    }
    dest.prepare()?;
    let names: Vec<String> = if let Some(name) = single {
        vec![name.to_string()]
    } else if shards.len() == 1 {
        vec!["model.safetensors".to_string()]
    } else {
        (1..=shards.len())
            .map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len()))
            .collect()
    };
    let index =
        (single.is_none() && shards.len() > 1).then(|| "model.safetensors.index.json".to_string());
    for name in names.iter().chain(index.iter()) {
        if dest.exists(name)? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} exists; dcp convert does not overwrite",
                    dest.show(name).display()
                ),
            ));
        }
    }
    let mut report = ExportReport {
        skipped_bytes_items: skipped,
        ..ExportReport::default()
    };
    let mut weight_map = BTreeMap::new();
    let total: u64 = plans.iter().map(|p| p.bytes).sum();
    for (shard, name) in shards.iter().zip(&names) {
        write_file(rt, reader, shard, dest, name, options, total)?;
        for p in shard {
            weight_map.insert(p.out.clone(), name.clone());
            report.tensors += 1;
            report.bytes += p.bytes;
        }
        report.files.push(dest.show(name));
    }
    if let Some(index) = index {
        let json = serde_json::json!({
            "metadata": { "total_size": report.bytes },
            "weight_map": weight_map,
        });
        let text = serde_json::to_vec_pretty(&json).map_err(|e| Error::invalid(e.to_string()))?;
        dest.write(&index, |f| f.write_all(&text))?;
        report.files.push(dest.show(&index));
    }
    Ok(report)
}

/// The tensors to export, in name order, and the bytes items skipped.
fn plan(md: &Metadata, options: &ExportOptions) -> Result<(Vec<Plan>, Vec<String>)> {
    let globs = {
        let mut b = globset::GlobSetBuilder::new();
        for k in &options.keys {
            b.add(globset::Glob::new(k).map_err(|e| Error::invalid(format!("--keys {k:?}: {e}")))?);
        }
        b.build().map_err(|e| Error::invalid(e.to_string()))?
    };
    let mut plans = Vec::new();
    let mut skipped = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (name, item) in &md.items {
        if !options.keys.is_empty() && !globs.is_match(name) {
            continue;
        }
        let ItemMeta::Tensor { dtype, shape, .. } = item else {
            skipped.push(name.clone());
            continue;
        };
        let out = options
            .renames
            .iter()
            .find_map(|(from, to)| {
                name.strip_prefix(from.as_str())
                    .map(|rest| format!("{to}{rest}"))
            })
            .unwrap_or_else(|| name.clone());
        if out.is_empty() || out == "__metadata__" {
            return Err(Error::invalid(format!(
                "{name}: renamed to the reserved name {out:?}"
            )));
        }
        if let Some(first) = seen.insert(out.clone(), name.clone()) {
            return Err(Error::invalid(format!(
                "{first} and {name} are both renamed to {out}"
            )));
        }
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let bytes = numel
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .ok_or_else(|| Error::corrupt(format!("{name}: shape {shape:?} overflows")))?;
        plans.push(Plan {
            name: name.clone(),
            out,
            dtype: *dtype,
            shape: shape.to_vec(),
            bytes,
        });
    }
    if plans.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            if options.keys.is_empty() {
                "the checkpoint holds no tensor".to_string()
            } else {
                format!("no tensor matches {:?}", options.keys)
            },
        ));
    }
    // Safetensors files list tensors by name; the output names decide the
    // order within a file, and the shards follow it.
    plans.sort_by(|a, b| a.out.cmp(&b.out));
    Ok((plans, skipped))
}

/// Tensors in order, cut into shards of at most `max` bytes (a larger
/// tensor alone in its shard).
fn shard(plans: &[Plan], max: u64) -> Vec<Vec<&Plan>> {
    let mut out: Vec<Vec<&Plan>> = vec![Vec::new()];
    let mut size = 0u64;
    for p in plans {
        let last = out.last_mut().expect("at least one shard");
        if !last.is_empty() && size.saturating_add(p.bytes) > max {
            out.push(Vec::new());
            size = 0;
        }
        out.last_mut().expect("just pushed").push(p);
        size += p.bytes;
    }
    out
}

/// The safetensors header of `tensors` laid out in order: its bytes
/// (padded with spaces to a multiple of 8, as the format asks).
fn header(tensors: &[&Plan]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut at = 0u64;
    for p in tensors {
        map.insert(
            p.out.clone(),
            serde_json::json!({
                "dtype": p.dtype.safetensors_name(),
                "shape": p.shape,
                "data_offsets": [at, at + p.bytes],
            }),
        );
        at += p.bytes;
    }
    let mut text = serde_json::to_vec(&map).map_err(|e| Error::invalid(e.to_string()))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    Ok(text)
}

/// Write one safetensors file: the header, then each tensor in slabs read
/// through the checkpoint's load path.
fn write_file(
    rt: &tokio::runtime::Runtime,
    reader: &FileSystemReader,
    tensors: &[&Plan],
    dest: &Dest,
    name: &str,
    options: &ExportOptions,
    total: u64,
) -> Result<()> {
    // Two slab buffers of half the budget each: the next slab is read while
    // the last is written, so the export runs at the slower of reading and
    // writing, not their sum. Buffers go round (a fresh one per slab would
    // page-fault and zero every byte once more).
    let slab_max = (options.buffer_bytes / 2).max(1);
    let head = header(tensors)?;
    dest.write(name, |f| {
        f.write_all(&(head.len() as u64).to_le_bytes())?;
        f.write_all(&head)?;
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(1);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..2 {
            let _ = empty_tx.send(Vec::new());
        }
        std::thread::scope(|s| {
            s.spawn(move || {
                for p in tensors.iter().filter(|p| p.bytes > 0) {
                    for region in slabs(&p.shape, p.dtype.size() as u64, slab_max) {
                        // The writer gave up (its receivers are gone): stop.
                        let Ok(buf) = empty_rx.recv() else { return };
                        let slab = read_slab(rt, reader, p, region, buf);
                        let failed = slab.is_err();
                        if full_tx.send(slab).is_err() || failed {
                            return;
                        }
                    }
                }
            });
            // Owns the writer's ends, so that leaving early (an error)
            // drops them and the reader stops before the scope joins it.
            let (full_rx, empty_tx) = (full_rx, empty_tx);
            let mut written = 0u64;
            for slab in full_rx {
                let slab = slab.map_err(std::io::Error::other)?;
                f.write_all(&slab)?;
                written += slab.len() as u64;
                if let Some(OnProgress(report)) = &options.on_progress {
                    report(slab.len() as u64, total);
                }
                let _ = empty_tx.send(slab);
            }
            let want: u64 = tensors.iter().map(|p| p.bytes).sum();
            if written != want {
                return Err(std::io::Error::other(format!(
                    "the slab reader stopped after {written} of {want} bytes"
                )));
            }
            Ok(())
        })
    })
}

/// One slab of a tensor, loaded through the ordinary load path into `buf`
/// (resized to the slab; handed back filled).
fn read_slab(
    rt: &tokio::runtime::Runtime,
    reader: &FileSystemReader,
    p: &Plan,
    region: ChunkBox,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>> {
    let len = usize::try_from(region.numel() * p.dtype.size() as u64)
        .map_err(|_| Error::invalid(format!("{}: a slab does not fit in memory", p.name)))?;
    buf.resize(len, 0);
    let mut dest = DestStateDict::new();
    dest.insert_tensor(
        p.name.clone(),
        p.dtype,
        p.shape.clone(),
        vec![dcp_core::DestChunk::new(region, buf)],
    )?;
    let loaded = rt.block_on(dcp_core::load(dest, reader, &Single))?;
    let mut state = loaded.state_dict;
    match state.remove(&p.name) {
        Some(dcp_core::DestItem::Tensor(t)) => t
            .chunks
            .into_iter()
            .next()
            .map(|c| c.data.into_vec())
            .ok_or_else(|| Error::corrupt(format!("{}: not loaded", p.name))),
        _ => Err(Error::corrupt(format!("{}: not loaded", p.name))),
    }
}

/// Contiguous row-major boxes covering `shape` in order, each of at most
/// `max` bytes where possible (whole rows grouped while they fit; a row
/// that does not fit split along the next dimension, down to single
/// elements).
pub(crate) fn slabs(shape: &[u64], elem: u64, max: u64) -> Vec<ChunkBox> {
    fn rec(prefix: &mut Vec<u64>, shape: &[u64], elem: u64, max: u64, out: &mut Vec<ChunkBox>) {
        let d = prefix.len();
        let inner: u64 = shape[d + 1..].iter().product::<u64>() * elem;
        let boxed = |prefix: &[u64], start: u64, len: u64| {
            let mut offsets = prefix.to_vec();
            let mut sizes = vec![1; prefix.len()];
            offsets.push(start);
            sizes.push(len);
            offsets.extend(std::iter::repeat_n(0, shape.len() - d - 1));
            sizes.extend_from_slice(&shape[d + 1..]);
            ChunkBox {
                offsets: offsets.into(),
                sizes: sizes.into(),
            }
        };
        if inner <= max || d + 1 == shape.len() {
            let step = (max / inner.max(1)).max(1);
            let mut start = 0;
            while start < shape[d] {
                let len = step.min(shape[d] - start);
                out.push(boxed(prefix, start, len));
                start += len;
            }
            return;
        }
        for i in 0..shape[d] {
            prefix.push(i);
            rec(prefix, shape, elem, max, out);
            prefix.pop();
        }
    }
    if shape.is_empty() {
        return vec![ChunkBox::full(shape)];
    }
    let mut out = Vec::new();
    rec(&mut Vec::new(), shape, elem, max.max(1), &mut out);
    out
}

/// Write `path` through `fill` under a temporary name in the same
/// directory, fsync it, rename it into place and fsync the directory; on
/// any error the temporary file is removed and `path` is untouched.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let show = path.display().to_string();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        from_io(&show, e)
    })
}

/// The error of writing `show`: a dcp error (a load's, an upload's) that
/// travelled inside the `io::Error` given back whole, with context.
fn from_io(show: &str, e: std::io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        if let Some(Ok(dcp)) = e.into_inner().map(|inner| inner.downcast::<Error>()) {
            return dcp.context(format!("write {show}"));
        }
        return Error::invalid(format!("write {show}: a load failed"));
    }
    Error::io("write", show, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slabs tile the tensor in row-major order, each contiguous and
    /// within the limit whenever one element fits.
    #[test]
    fn slabs_tile_in_order_within_the_limit() {
        for (shape, max) in [
            (vec![10u64, 4], 16u64),
            (vec![3, 1000], 64),
            (vec![2, 3, 5], 8),
            (vec![7], 1_000_000),
            (vec![0, 4], 8),
        ] {
            let elem = 2;
            let bs = slabs(&shape, elem, max);
            let mut next = 0u64; // flat element index
            for b in &bs {
                let bytes = b.numel() * elem;
                assert!(bytes <= max.max(elem) || b.numel() == 0, "{shape:?} {b}");
                // Contiguous: its first element is the next flat index.
                let mut flat = 0;
                for (d, o) in b.offsets.iter().enumerate() {
                    flat = flat * shape[d] + o;
                }
                if b.numel() > 0 {
                    assert_eq!(flat, next, "{shape:?} {b}");
                }
                next += b.numel();
            }
            assert_eq!(next, shape.iter().product::<u64>(), "{shape:?}");
        }
    }
}
