//! Hugging Face safetensors out of any checkpoint dcp reads: one
//! `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards with
//! `model.safetensors.index.json`, under the dotted state-dict names.
//!
//! Each output file is written in one sequential pass through a buffer of
//! at most [`ExportOptions::buffer_bytes`]: every tensor is read in
//! row-major slabs (whole rows where they fit, parts of a row where one
//! does not) through dcp's ordinary load path, so a tensor saved in many
//! chunks by many ranks is assembled on the fly and memory is bounded by
//! the buffer, not by the largest tensor. Files are written under a
//! temporary name, fsynced and renamed into place: a failed export leaves
//! no partial file at the output.

use dcp_core::metadata::ItemMeta;
use dcp_core::{
    ChunkBox, DType, DestStateDict, Error, ErrorKind, FileSystemReader, Metadata, Result, Single,
};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Error::new(ErrorKind::Io, format!("start a tokio runtime: {e}")))?;
            export_on(&rt, reader, out, options)
        })
        .join()
        .unwrap_or_else(|_| Err(Error::invalid("the export thread panicked")))
    })
}

fn export_on(
    rt: &tokio::runtime::Runtime,
    reader: &FileSystemReader,
    out: &Path,
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
    let single = out.extension().is_some_and(|e| e == "safetensors");
    if single && shards.len() > 1 {
        return Err(Error::invalid(format!(
            "{}: the tensors need {} shards of at most {} bytes; give a directory",
            out.display(),
            shards.len(),
            options.max_shard_size
        )));
    }
    let dir = if single {
        out.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        std::fs::create_dir_all(out)
            .map_err(|e| Error::io("create", &out.display().to_string(), e))?;
        out.to_path_buf()
    };
    let names: Vec<PathBuf> = if single {
        vec![out.to_path_buf()]
    } else if shards.len() == 1 {
        vec![dir.join("model.safetensors")]
    } else {
        (1..=shards.len())
            .map(|i| dir.join(format!("model-{i:05}-of-{:05}.safetensors", shards.len())))
            .collect()
    };
    let index = (!single && shards.len() > 1).then(|| dir.join("model.safetensors.index.json"));
    for p in names.iter().chain(index.iter()) {
        if p.exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{} exists; dcp convert does not overwrite", p.display()),
            ));
        }
    }
    let mut report = ExportReport {
        skipped_bytes_items: skipped,
        ..ExportReport::default()
    };
    let mut weight_map = BTreeMap::new();
    let total: u64 = plans.iter().map(|p| p.bytes).sum();
    for (shard, path) in shards.iter().zip(&names) {
        write_file(rt, reader, shard, path, options, total)?;
        for p in shard {
            weight_map.insert(
                p.out.clone(),
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            report.tensors += 1;
            report.bytes += p.bytes;
        }
        report.files.push(path.clone());
    }
    if let Some(index) = index {
        let json = serde_json::json!({
            "metadata": { "total_size": report.bytes },
            "weight_map": weight_map,
        });
        let text = serde_json::to_vec_pretty(&json).map_err(|e| Error::invalid(e.to_string()))?;
        write_atomically(&index, |f| f.write_all(&text))?;
        report.files.push(index);
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
            shape: shape.clone(),
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
    path: &Path,
    options: &ExportOptions,
    total: u64,
) -> Result<()> {
    // Two slab buffers of half the budget each: the next slab is read while
    // the last is written, so the export runs at the slower of reading and
    // writing, not their sum. Buffers go round (a fresh one per slab would
    // page-fault and zero every byte once more).
    let slab_max = (options.buffer_bytes / 2).max(1);
    let head = header(tensors)?;
    write_atomically(path, |f| {
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
            ChunkBox { offsets, sizes }
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
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
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
        // A load's error travels inside the io::Error: give it back whole.
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            if let Some(Ok(dcp)) = e.into_inner().map(|inner| inner.downcast::<Error>()) {
                return dcp.context(format!("write {show}"));
            }
            return Error::invalid(format!("write {show}: a load failed"));
        }
        Error::io("write", &show, e)
    })
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
