//! Loads into device memory: records are read into host staging buffers
//! (bounded by `thread_count x per_thread_copy_ahead` staged bytes),
//! verified, and copied to the device on one copy lane per reader lane
//! while the next records are read.
//!
//! The destination chunks are [`ChunkSink`]s. Each chunk is cut into
//! *parts*: its intersection with each saved chunk (so a part needs one
//! saved record: a resharded load reads no record more than once for it),
//! and, when checksums are not verified, further into contiguous pieces of
//! at most half of `per_thread_copy_ahead`. Parts are grouped in batches of
//! at most half the budget; each batch is planned and read by the ordinary
//! read pipeline into staging buffers the sinks hand out, then every filled
//! buffer is handed to its sink's [`ChunkSink::upload`] (scattered into the
//! runs of the chunk it fills) and the next batch is read while those
//! copies run. A staged buffer counts against the budget until its copy
//! completes.

use crate::checkpoint::load::{agree, broadcast_metadata};
use crate::checkpoint::{LoadOptions, StorageReader};
use crate::collective::Collective;
use crate::error::{Error, ErrorKind, Result};
use crate::metadata::{ItemMeta, Metadata};
use crate::model::{check_name, ChunkBox, DestChunk, DestData, DestItem, DestStateDict};
use crate::pipeline::copy::for_each_run;
use crate::pipeline::{blocking, ReadStats};
use crate::stage::budget::{Budget, Permit};
use crate::stage::{ChunkSink, PendingUpload, StagedGauge};
use crate::DType;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A tensor a device load fills: its dtype and global shape (which must
/// match what was saved) and its chunks in device memory.
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    /// Expected dtype.
    pub dtype: DType,
    /// Expected global shape.
    pub shape: Vec<u64>,
    /// The chunks to fill: each box and the device memory holding it,
    /// row-major.
    pub chunks: Vec<(ChunkBox, Arc<dyn ChunkSink>)>,
}

/// What one rank loads into device memory: tensor names mapped to
/// [`DeviceTensor`]s. The device memory is the caller's (the sinks); a
/// load fills it in place.
#[derive(Clone, Debug, Default)]
pub struct DeviceDest {
    items: BTreeMap<String, DeviceTensor>,
}

impl DeviceDest {
    /// An empty destination.
    pub fn new() -> DeviceDest {
        DeviceDest::default()
    }

    /// Ask for a tensor into device memory. Refuses an invalid name, boxes
    /// outside `shape`, and sinks whose length is not their box's bytes.
    pub fn insert_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        chunks: Vec<(ChunkBox, Arc<dyn ChunkSink>)>,
    ) -> Result<()> {
        let name = name.into();
        check_name(&name)?;
        for (region, sink) in &chunks {
            region.check_within(&shape).map_err(|e| e.context(&name))?;
            let want = region.numel() as u128 * dtype.size() as u128;
            if sink.len() as u128 != want {
                return Err(Error::invalid(format!(
                    "{name}: device chunk ({region}) has {} bytes, expected {want}",
                    sink.len()
                )));
            }
        }
        self.items.insert(
            name,
            DeviceTensor {
                dtype,
                shape,
                chunks,
            },
        );
        Ok(())
    }

    /// Look up a tensor.
    pub fn get(&self, name: &str) -> Option<&DeviceTensor> {
        self.items.get(name)
    }

    /// Iterate in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &DeviceTensor)> {
        self.items.iter()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there is no tensor.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Options of [`load_to_device`]. Built from its `Default` with one method
/// per field.
#[derive(Clone)]
#[non_exhaustive]
pub struct DeviceLoadOptions {
    /// The options of the reads (planner). `share_reads` does not apply:
    /// every rank reads what its own device memory needs.
    pub load: LoadOptions,
    /// Copy lanes (one CUDA stream each), normally the reader's
    /// `thread_count`. Default 4; 0 is refused.
    pub thread_count: usize,
    /// Staged bytes per lane: a rank holds at most `thread_count x
    /// per_thread_copy_ahead` bytes read and not yet copied to the device,
    /// except that a saved record's part is staged whole while checksums
    /// are verified (its checksum is checked before any of it reaches the
    /// device), alone when it is larger than that. Default 10,000,000; 0
    /// is refused.
    pub per_thread_copy_ahead: usize,
    /// Whether the reader verifies checksums (then parts are staged whole,
    /// see above). `None` (the default): asked of a
    /// [`FileSystemReader`](crate::FileSystemReader), assumed `true` for
    /// other readers.
    pub verify_checksums: Option<bool>,
}

impl std::fmt::Debug for DeviceLoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLoadOptions")
            .field("thread_count", &self.thread_count)
            .field("per_thread_copy_ahead", &self.per_thread_copy_ahead)
            .field("verify_checksums", &self.verify_checksums)
            .finish_non_exhaustive()
    }
}

impl Default for DeviceLoadOptions {
    fn default() -> Self {
        DeviceLoadOptions {
            load: LoadOptions::default(),
            thread_count: 4,
            per_thread_copy_ahead: 10_000_000,
            verify_checksums: None,
        }
    }
}

impl DeviceLoadOptions {
    /// Set [`DeviceLoadOptions::load`].
    #[must_use]
    pub fn load(mut self, value: LoadOptions) -> Self {
        self.load = value;
        self
    }

    /// Set [`DeviceLoadOptions::thread_count`].
    #[must_use]
    pub fn thread_count(mut self, value: usize) -> Self {
        self.thread_count = value;
        self
    }

    /// Set [`DeviceLoadOptions::per_thread_copy_ahead`].
    #[must_use]
    pub fn per_thread_copy_ahead(mut self, value: usize) -> Self {
        self.per_thread_copy_ahead = value;
        self
    }

    /// Set [`DeviceLoadOptions::verify_checksums`].
    #[must_use]
    pub fn verify_checksums(mut self, value: Option<bool>) -> Self {
        self.verify_checksums = value;
        self
    }
}

/// What [`load_to_device`] returns on every rank.
#[derive(Debug)]
pub struct DeviceLoadResult {
    /// What this rank read.
    pub stats: ReadStats,
    /// The checkpoint's metadata.
    pub metadata: Arc<Metadata>,
    /// The most bytes this rank held staged (read, not yet copied to the
    /// device) at once.
    pub staged_peak_bytes: u64,
    /// Bytes this rank copied to the device.
    pub uploaded_bytes: u64,
    /// Batches read (each planned and read by the read pipeline).
    pub batches: u64,
}

/// Fill this rank's device memory `dest` from the checkpoint: the
/// coordinator reads the metadata once; every rank reads what its chunks
/// need into staging buffers and copies them to the device, overlapping
/// copies with reads (see the module docs). Returns when every copy is
/// complete, with the same outcome on every rank: all succeed, or all fail
/// with the first failing rank's error. A failed copy fails the load with
/// an error naming the item and chunk. Refuses what a load refuses (dtype
/// or shape differing from what was saved, names not in the checkpoint,
/// regions no saved chunk covers), and `thread_count` or
/// `per_thread_copy_ahead` of 0.
pub async fn load_to_device(
    dest: &DeviceDest,
    reader: &dyn StorageReader,
    collective: &dyn Collective,
    options: &DeviceLoadOptions,
) -> Result<DeviceLoadResult> {
    let metadata = broadcast_metadata(reader, collective).await?;
    let result = fill(dest, &metadata, reader, options).await;
    let (stats, staged_peak_bytes, uploaded_bytes, batches) =
        agree(result, &metadata, reader, collective).await?;
    Ok(DeviceLoadResult {
        stats,
        metadata,
        staged_peak_bytes,
        uploaded_bytes,
        batches,
    })
}

/// A part of a destination chunk staged as one buffer.
struct Part {
    item: usize,
    chunk: usize,
    region: ChunkBox,
    bytes: u64,
}

/// A copy in flight and the budget its buffer holds.
struct InFlight {
    pending: Box<dyn PendingUpload>,
    _permit: Permit,
    what: String,
}

async fn fill(
    dest: &DeviceDest,
    md: &Arc<Metadata>,
    reader: &dyn StorageReader,
    options: &DeviceLoadOptions,
) -> Result<(ReadStats, u64, u64, u64)> {
    if options.thread_count == 0 || options.per_thread_copy_ahead == 0 {
        return Err(Error::invalid(format!(
            "a device load needs thread_count and per_thread_copy_ahead above 0 (got {} and {})",
            options.thread_count, options.per_thread_copy_ahead
        )));
    }
    let verify = options.verify_checksums.unwrap_or_else(|| {
        reader
            .file_system_reader()
            .is_none_or(|r| r.options().verify_checksums)
    });
    let limit = (options.thread_count as u64).saturating_mul(options.per_thread_copy_ahead as u64);
    let piece = (options.per_thread_copy_ahead as u64 / 2).max(1);
    let items: Vec<(&String, &DeviceTensor)> = dest.iter().collect();
    let parts = cut_parts(&items, md, (!verify).then_some(piece))?;
    let batches = batches(&parts, (limit / 2).max(1));

    let gauge = Arc::new(StagedGauge::default());
    let budget = Budget::new(limit, gauge.clone());
    let failed = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<InFlight>();
    // Waits for the copies in the order they were started, giving back
    // their budget; the first failure stops the reads.
    let waiter = {
        let failed = failed.clone();
        std::thread::Builder::new()
            .name("dcp-upload-wait".into())
            .spawn(move || {
                let mut first: Option<Error> = None;
                for f in rx {
                    if let Err(e) = f.pending.wait() {
                        failed.store(true, Ordering::SeqCst);
                        first.get_or_insert(e.context(f.what));
                    }
                }
                first
            })
            .map_err(|e| Error::new(ErrorKind::Io, format!("start the upload waiter: {e}")))?
    };
    let mut stats = ReadStats::default();
    let mut uploaded = 0u64;
    let run = async {
        for batch in &batches {
            if failed.load(Ordering::SeqCst) {
                break;
            }
            let sizes: Vec<u64> = batch.iter().map(|&i| parts[i].bytes).collect();
            let b = budget.clone();
            let mut permits: Vec<Permit> =
                blocking(move || Ok(sizes.into_iter().map(|n| b.acquire(n)).collect())).await?;
            // The batch as a destination state dict of staging buffers.
            let mut by_item: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for &i in batch {
                by_item.entry(parts[i].item).or_default().push(i);
            }
            let mut d = DestStateDict::new();
            for (&item, list) in &by_item {
                let (name, t) = items[item];
                let mut chunks = Vec::with_capacity(list.len());
                for &i in list {
                    let p = &parts[i];
                    let staging = t.chunks[p.chunk].1.staging(p.bytes as usize).map_err(|e| {
                        e.context(format!("{name}: staging buffer for ({})", p.region))
                    })?;
                    if staging.as_bytes().len() as u64 != p.bytes {
                        return Err(Error::invalid(format!(
                            "{name}: the device handed out a {}-byte staging buffer for {} bytes",
                            staging.as_bytes().len(),
                            p.bytes
                        )));
                    }
                    chunks.push(DestChunk {
                        region: p.region.clone(),
                        data: DestData::Provided(staging),
                    });
                }
                d.insert_tensor(name.clone(), t.dtype, t.shape.clone(), chunks)?;
            }
            let plan = options.load.planner.plan(md, &d)?;
            let (mut filled, s) = reader.read(md.clone(), plan, d).await?;
            stats.bytes_read += s.bytes_read;
            stats.requests += s.requests;
            stats.records += s.records;
            // Checksums were verified by the read: copy each buffer out.
            let mut permits_by_part: BTreeMap<usize, Permit> =
                batch.iter().copied().zip(permits.drain(..)).collect();
            for (&item, list) in &by_item {
                let (name, t) = items[item];
                let Some(DestItem::Tensor(ft)) = filled.remove(name) else {
                    return Err(Error::invalid(format!(
                        "{name}: the reader returned no tensor for a staged batch"
                    )));
                };
                if ft.chunks.len() != list.len() {
                    return Err(Error::invalid(format!(
                        "{name}: the reader returned {} chunks for {} staged parts",
                        ft.chunks.len(),
                        list.len()
                    )));
                }
                for (c, &i) in ft.chunks.into_iter().zip(list) {
                    let p = &parts[i];
                    let (chunk_box, sink) = &t.chunks[p.chunk];
                    let Some(buf) = c.data.into_provided() else {
                        return Err(Error::invalid(format!(
                            "{name}: the reader replaced a staging buffer"
                        )));
                    };
                    let mut runs = Vec::new();
                    for_each_run(t.dtype.size(), chunk_box, &p.region, |o, l| {
                        runs.push((o as u64, l as u64))
                    });
                    let what = format!(
                        "{name}: copy of ({}) to device chunk ({chunk_box})",
                        p.region
                    );
                    let lane = i % options.thread_count;
                    let pending = sink.upload(lane, runs, buf).map_err(|e| e.context(&what))?;
                    uploaded += p.bytes;
                    let permit = permits_by_part.remove(&i).expect("one permit per part");
                    if tx
                        .send(InFlight {
                            pending,
                            _permit: permit,
                            what,
                        })
                        .is_err()
                    {
                        return Err(Error::new(ErrorKind::Io, "the upload waiter stopped"));
                    }
                }
            }
        }
        Ok::<(), Error>(())
    };
    let read_result = run.await;
    drop(tx);
    let copy_error = blocking(move || {
        waiter
            .join()
            .map_err(|_| Error::new(ErrorKind::Io, "the upload waiter panicked"))
    })
    .await?;
    if let Some(e) = copy_error {
        return Err(e);
    }
    read_result?;
    Ok((stats, gauge.peak(), uploaded, batches.len() as u64))
}

/// Cut every destination chunk into its intersections with the saved
/// chunks, each further into contiguous pieces of at most `piece` bytes
/// when given. Refuses items not in the checkpoint (or not tensors there),
/// dtype or shape differences, and chunks the saved chunks do not cover.
fn cut_parts(
    items: &[(&String, &DeviceTensor)],
    md: &Metadata,
    piece: Option<u64>,
) -> Result<Vec<Part>> {
    let mut parts = Vec::new();
    for (item, (name, t)) in items.iter().enumerate() {
        let saved = match md.item(name) {
            None => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{name}: not in the checkpoint"),
                ))
            }
            Some(ItemMeta::Bytes { .. }) => {
                return Err(Error::invalid(format!(
                    "{name}: saved as bytes, the device destination asks for a tensor"
                )))
            }
            Some(ItemMeta::Tensor {
                dtype,
                shape,
                chunks,
            }) => {
                if t.dtype != *dtype || t.shape[..] != shape[..] {
                    return Err(Error::invalid(format!(
                        "{name}: saved as {dtype} {shape:?}, destination asks for {} {:?}",
                        t.dtype, t.shape
                    )));
                }
                chunks
            }
        };
        let elem = t.dtype.size() as u64;
        for (chunk, (region, _)) in t.chunks.iter().enumerate() {
            let mut covered: u128 = 0;
            for s in saved {
                let Some(x) = region.intersect(&s.region) else {
                    continue;
                };
                covered += x.numel() as u128;
                let pieces = match piece {
                    Some(p) => split_contiguous(&x, elem, p),
                    None => vec![x],
                };
                for r in pieces {
                    parts.push(Part {
                        item,
                        chunk,
                        bytes: r.numel() * elem,
                        region: r,
                    });
                }
            }
            if covered != region.numel() as u128 {
                return Err(Error::plan(format!(
                    "{name}: destination chunk ({region}) is not covered by the saved chunks"
                )));
            }
        }
    }
    Ok(parts)
}

/// Consecutive parts in groups of at most `max` bytes (a larger part
/// alone).
fn batches(parts: &[Part], max: u64) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut bytes = 0u64;
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_empty() && bytes + p.bytes > max {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push(i);
        bytes += p.bytes;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Cut `region` into boxes each contiguous in `region`'s own row-major
/// layout, of at most `max` bytes (at least one element each), in
/// row-major order.
pub(crate) fn split_contiguous(region: &ChunkBox, elem: u64, max: u64) -> Vec<ChunkBox> {
    let n = region.ndim();
    if region.is_empty() {
        return Vec::new();
    }
    if region.numel() * elem <= max || n == 0 {
        return vec![region.clone()];
    }
    // The outermost dimension one step of which fits.
    let mut inner = vec![elem; n];
    for d in (0..n - 1).rev() {
        inner[d] = inner[d + 1] * region.sizes[d + 1];
    }
    let k = (0..n).find(|&d| inner[d] <= max).unwrap_or(n - 1);
    let steps = (max / inner[k]).max(1);
    let mut out = Vec::new();
    let mut idx = vec![0u64; k];
    loop {
        let mut at = 0;
        while at < region.sizes[k] {
            let len = steps.min(region.sizes[k] - at);
            let mut offsets = region.offsets.clone();
            let mut sizes = region.sizes.clone();
            for d in 0..k {
                offsets[d] += idx[d];
                sizes[d] = 1;
            }
            offsets[k] += at;
            sizes[k] = len;
            out.push(ChunkBox { offsets, sizes });
            at += len;
        }
        // Next index over the dimensions before k.
        let mut d = k;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < region.sizes[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::copy::contiguous_range;

    fn b(o: &[u64], s: &[u64]) -> ChunkBox {
        ChunkBox::new(o.to_vec(), s.to_vec()).unwrap()
    }

    #[test]
    fn split_contiguous_tiles_the_region_in_order_with_contiguous_pieces() {
        let region = b(&[2, 1, 0], &[3, 4, 5]);
        for max in [4u64, 7, 20, 39, 40, 41, 80, 160, 240, 10_000] {
            let pieces = split_contiguous(&region, 2, max);
            let mut next = 0usize;
            for p in &pieces {
                assert!(p.numel() * 2 <= max.max(2), "{p} over {max}");
                let (start, len) =
                    contiguous_range(2, &region, p).expect("each piece is contiguous");
                assert_eq!(start, next, "pieces in order without gaps ({max})");
                next += len;
            }
            assert_eq!(next as u64, region.numel() * 2, "tiles the region ({max})");
        }
        assert_eq!(split_contiguous(&b(&[], &[]), 8, 1).len(), 1, "a scalar");
        assert!(split_contiguous(&b(&[0], &[0]), 8, 1).is_empty());
    }
}
