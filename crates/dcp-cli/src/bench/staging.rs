//! The staging scenarios of `dcp bench`: `async_save` (how long an
//! asynchronous save blocks, against a plain copy of the same bytes),
//! `device` (a save of chunks in simulated device memory, against the
//! larger of the copy time and a raw write of the same bytes: 1.0 is full
//! overlap of copies and writes) and `device-load` (a load into simulated
//! device memory, against the larger of the copy time and a raw read).

use super::workload::Content;
use super::{sys, Bench, BenchRecord, Rep, COLLECTIVE_TIMEOUT};
use crate::CliError;
use dcp_core::local::run_ranks;
use dcp_core::metadata::Metadata;
use dcp_core::stage::sim::{SimDevice, SimSink};
use dcp_core::{
    load_to_device, AsyncSaver, ChunkBox, ChunkData, ChunkSink, Collective, DestChunk,
    DestStateDict, DeviceDest, DeviceLoadOptions, FileSystemReader, Item, ReaderOptions,
    SaveOptions, StateDict, StorageWriter, TensorChunk,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The simulated device's default copy bandwidth per lane (`dcp bench
/// --device-gbps`): PCIe 4.0 x16 in practice.
pub const DEVICE_BANDWIDTH: f64 = 20e9;
/// The simulated device's latency per copy.
pub const DEVICE_LATENCY: Duration = Duration::from_micros(10);

impl Bench {
    /// `async_save`: per rep, an asynchronous save whose blocking time is
    /// measured (each rank keeps its saver across reps, so later reps reuse
    /// the pool; the peak RSS covers the whole save); after all reps, the
    /// baseline as many times: a plain copy of every rank's state dict into
    /// fresh buffers, each rank on its own thread.
    pub(super) fn async_scenario(
        &self,
        sds: &Arc<Vec<StateDict>>,
        sync: bool,
    ) -> Result<BenchRecord, CliError> {
        let savers: Arc<Vec<AsyncSaver>> =
            Arc::new((0..self.ranks).map(|_| AsyncSaver::new()).collect());
        let mut reps = Vec::new();
        let mut md = None;
        let mut reset = true;
        for rep in 0..=self.args.reps {
            self.progress.phase(format_args!(
                "async_save: rep {rep} with {} ranks",
                self.ranks
            ));
            sys::remove_dir(&self.ckpt).map_err(|e| self.io_err(&self.ckpt, e))?;
            let mut r = Rep::default();
            reset &= sys::reset_peak_rss();
            r.base_rss = sys::status_bytes("VmRSS").unwrap_or(0);
            let writer: Arc<dyn StorageWriter> = Arc::new(self.writer(sync)?);
            let (sds2, savers2) = (sds.clone(), savers.clone());
            let started = Instant::now();
            let handles = self
                .rt
                .block_on(run_ranks(self.ranks, COLLECTIVE_TIMEOUT, move |g| {
                    let (sds, savers, writer) = (sds2.clone(), savers2.clone(), writer.clone());
                    async move {
                        let rank = g.rank();
                        savers[rank]
                            .async_save(&sds[rank], writer, Arc::new(g), SaveOptions::default())
                            .await
                    }
                }))
                .into_iter()
                .collect::<dcp_core::Result<Vec<_>>>()?;
            r.seconds = started.elapsed().as_secs_f64();
            let mut results = Vec::new();
            for h in handles {
                results.push(self.rt.block_on(h)?);
            }
            r.peak_rss = sys::status_bytes("VmHWM").unwrap_or(0);
            md = results.into_iter().next().map(|s| s.metadata);
            if rep > 0 {
                reps.push(r);
            }
        }
        // The baseline after every save: the allocator keeps some of the
        // plain copies' memory, which must not count in the saves' peaks.
        for r in &mut reps {
            r.raw_seconds = memcpy_seconds(sds);
        }
        let md = md.ok_or_else(|| CliError::msg("no rank ran"))?;
        let mut rec = self.record(&md, "async_save", self.ranks as u32, sync, &reps)?;
        rec.peak_rss_reset = reset;
        Ok(rec)
    }

    /// `device`: the state dicts' tensors in a simulated device's memory
    /// (`--device-gbps`, default [`DEVICE_BANDWIDTH`]; [`DEVICE_LATENCY`]; DMA-like: the copies cost
    /// the host no CPU, as on a GPU), saved; the baseline is the
    /// larger of the copy time of those bytes and a raw write of the
    /// checkpoint's bytes (the save can go no faster than either).
    pub(super) fn device_scenario(
        &self,
        sds: &Arc<Vec<StateDict>>,
        sync: bool,
    ) -> Result<BenchRecord, CliError> {
        let dev = SimDevice::dma(DEVICE_LATENCY, self.args.device_gbps * 1e9)?;
        let on_device: Arc<Vec<StateDict>> = Arc::new(
            sds.iter()
                .map(|sd| on_device(sd, &dev))
                .collect::<dcp_core::Result<_>>()?,
        );
        let mut reps = Vec::new();
        let mut md = None;
        let mut images: Option<Vec<Vec<u8>>> = None;
        for rep in 0..=self.args.reps {
            self.progress
                .phase(format_args!("device: rep {rep} with {} ranks", self.ranks));
            sys::remove_dir(&self.ckpt).map_err(|e| self.io_err(&self.ckpt, e))?;
            sys::remove_dir(&self.raw).map_err(|e| self.io_err(&self.raw, e))?;
            sys::sync_everything();
            let copied = dev.copied_bytes();
            let started = Instant::now();
            let m = self.save_once(&on_device, sync)?;
            let seconds = started.elapsed().as_secs_f64();
            let copy = dev.copy_time(dev.copied_bytes() - copied).as_secs_f64();
            if images.is_none() {
                images = Some(
                    sys::mirror(&m, sds)
                        .map_err(CliError::msg)?
                        .iter()
                        .map(sys::RawFile::image)
                        .collect(),
                );
            }
            std::fs::create_dir_all(&self.raw).map_err(|e| self.io_err(&self.raw, e))?;
            sys::sync_everything();
            let images = images.as_deref().expect("built above");
            let started = Instant::now();
            sys::raw_write(&self.raw, images, sync, self.raw_checksum())
                .map_err(|e| self.io_err(&self.raw, e))?;
            let write = started.elapsed().as_secs_f64();
            md = Some(m);
            if rep > 0 {
                reps.push(Rep {
                    seconds,
                    raw_seconds: copy.max(write),
                    ..Rep::default()
                });
            }
        }
        let md = md.ok_or_else(|| CliError::msg("no rank ran"))?;
        self.record(&md, "device_save", self.ranks as u32, sync, &reps)
    }
}

/// Staged bytes per copy lane of the `device-load` scenario: room for two
/// of the largest records of the standard LLM workload per lane, so the
/// read of one overlaps the copy of the one before (records are staged
/// whole while their checksums are verified).
pub const DEVICE_LOAD_COPY_AHEAD: usize = 64 << 20;

/// One rank's device destination and its sinks (name, box, sink).
type DeviceRank = (DeviceDest, Vec<(String, ChunkBox, Arc<SimSink>)>);

impl Bench {
    /// `device-load`: the checkpoint loaded by the ranks that saved it, in
    /// the sharding they saved, into a simulated device's memory
    /// (`--device-gbps`, default [`DEVICE_BANDWIDTH`]; [`DEVICE_LATENCY`]; DMA-like: the copies cost
    /// the host no CPU) through staging buffers of at most `threads x`
    /// [`DEVICE_LOAD_COPY_AHEAD`] bytes per rank, from the device's pool
    /// (reused across reps). Warm cache: one untimed pass of each first. The baseline is the larger of the copy time of
    /// those bytes and a raw read of the checkpoint's bytes (the load can
    /// go no faster than either).
    pub(super) fn device_load_scenario(
        &self,
        md: &Metadata,
        sync: bool,
        raw_lens: &[usize],
    ) -> Result<BenchRecord, CliError> {
        let n = self.ranks;
        let threads = self.args.threads as usize;
        let reader = FileSystemReader::new(
            Arc::new(dcp::fs::LocalFs::new(&self.ckpt)),
            ReaderOptions::default()
                .thread_count(threads)
                .registry(crate::registry()),
        );
        let options = DeviceLoadOptions::default()
            .thread_count(threads)
            .per_thread_copy_ahead(DEVICE_LOAD_COPY_AHEAD);
        let mut reps = Vec::new();
        let mut verified = None;
        let mut reset = true;
        // One device for all reps: its pool of staging buffers is reused
        // from the warm-up on, as a CUDA stager's pinned pool is.
        let dev = SimDevice::dma(DEVICE_LATENCY, self.args.device_gbps * 1e9)?;
        for rep in 0..=self.args.reps as usize {
            let timed = rep > 0;
            self.progress.phase(format_args!(
                "device_load: {} with {n} ranks",
                if timed { "rep" } else { "warm-up" }
            ));
            let ranks: Vec<DeviceRank> = (0..n).map(|k| self.device_dest(&dev, k, n)).collect();
            let (dests, sinks): (Vec<DeviceDest>, Vec<_>) = ranks.into_iter().unzip();
            let dests = Arc::new(dests);
            sys::sync_everything();
            reset &= sys::reset_peak_rss();
            let mut r = Rep {
                base_rss: sys::status_bytes("VmRSS").unwrap_or(0),
                ..Rep::default()
            };
            let (reader, options) = (reader.clone(), options.clone());
            let started = Instant::now();
            let results = self.rt.block_on(run_ranks(n, COLLECTIVE_TIMEOUT, move |g| {
                let (dests, reader, options) = (dests.clone(), reader.clone(), options.clone());
                async move { load_to_device(&dests[g.rank()], &reader, &g, &options).await }
            }));
            r.seconds = started.elapsed().as_secs_f64();
            r.peak_rss = sys::status_bytes("VmHWM").unwrap_or(0);
            let loaded = results.into_iter().collect::<dcp_core::Result<Vec<_>>>()?;
            r.bytes_read = loaded.iter().map(|l| l.stats.bytes_read).sum();
            r.requests = loaded.iter().map(|l| l.stats.requests).sum();
            let uploaded: u64 = loaded.iter().map(|l| l.uploaded_bytes).sum();
            let copy = dev.copy_time(uploaded).as_secs_f64();
            if timed && verified.is_none() && !self.args.no_verify {
                let bad = self.workload.check(&device_images(&self.workload, sinks)?);
                for line in bad.iter().take(10) {
                    eprintln!("mismatch: device_load: {line}");
                }
                verified = Some(bad.is_empty());
            } else {
                drop(sinks);
            }
            // The baseline: every raw file read whole, from the same state.
            let mut bufs: Vec<Vec<u8>> = raw_lens
                .iter()
                .map(|&l| vec![crate::model::POISON; l])
                .collect();
            sys::sync_everything();
            let started = Instant::now();
            sys::raw_read(&self.raw, &mut bufs, self.raw_checksum())
                .map_err(|e| self.io_err(&self.raw, e))?;
            r.raw_seconds = copy.max(started.elapsed().as_secs_f64());
            drop(bufs);
            if timed {
                reps.push(r);
            }
        }
        let mut rec = self.record(md, "device_load", n as u32, sync, &reps)?;
        rec.cache = Some("warm");
        rec.verified = verified;
        rec.peak_rss_reset = reset;
        Ok(rec)
    }

    /// What rank `rank` of `n` loads (the saved sharding), each box in its
    /// own memory of `dev`.
    fn device_dest(&self, dev: &Arc<SimDevice>, rank: usize, n: usize) -> DeviceRank {
        let mut d = DeviceDest::new();
        let mut sinks = Vec::new();
        for it in &self.workload.items {
            let Content::Tensor { dtype, shape } = &it.content else {
                continue;
            };
            let Some(region) = it.layout.region(shape, rank, n) else {
                continue;
            };
            let sink = dev.sink(region.numel() * dtype.size() as u64);
            sinks.push((it.name.clone(), region.clone(), sink.clone()));
            d.insert_tensor(
                &it.name,
                *dtype,
                shape.clone(),
                vec![(region, sink as Arc<dyn ChunkSink>)],
            )
            .expect("the workload's boxes fit its shapes");
        }
        (d, sinks)
    }
}

/// The device memory of every rank as destination state dicts, to check
/// (a sink is dropped as soon as its bytes are copied out).
fn device_images(
    workload: &super::Workload,
    sinks: Vec<Vec<(String, ChunkBox, Arc<SimSink>)>>,
) -> dcp_core::Result<Vec<DestStateDict>> {
    sinks
        .into_iter()
        .map(|rank| {
            let mut d = DestStateDict::new();
            for (name, region, sink) in rank {
                let bytes = sink.to_vec();
                drop(sink);
                let Some(Content::Tensor { dtype, shape }) = workload
                    .items
                    .iter()
                    .find(|it| it.name == name)
                    .map(|it| &it.content)
                else {
                    continue;
                };
                d.insert_tensor(
                    name,
                    *dtype,
                    shape.clone(),
                    vec![DestChunk::new(region, bytes)],
                )?;
            }
            Ok(d)
        })
        .collect()
}

/// `sd` with every tensor chunk in `dev`'s memory.
fn on_device(sd: &StateDict, dev: &Arc<SimDevice>) -> dcp_core::Result<StateDict> {
    let mut out = StateDict::new();
    for (name, item) in sd.iter() {
        match item {
            Item::Tensor(t) => {
                let chunks = t
                    .chunks
                    .iter()
                    .map(|c| match &c.data {
                        ChunkData::Host(b) => TensorChunk::new(
                            c.region.clone(),
                            ChunkData::Source(dev.source(b.clone())),
                        ),
                        ChunkData::Source(_) => c.clone(),
                    })
                    .collect();
                out.insert_tensor(name.clone(), t.dtype, t.shape.clone(), chunks, t.replicated)?;
            }
            Item::Bytes { data, replicated } => {
                out.insert_bytes(name.clone(), data.clone(), *replicated)?
            }
        }
    }
    Ok(out)
}

/// Seconds to copy every rank's state dict into fresh buffers, each rank
/// on its own thread: the plain copy an asynchronous save's staging is
/// measured against (`dcp demo --async` reports the same).
pub fn memcpy_seconds(sds: &[StateDict]) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for sd in sds {
            s.spawn(move || {
                let mut copies: Vec<Vec<u8>> = Vec::new();
                for (_, item) in sd.iter() {
                    match item {
                        Item::Tensor(t) => {
                            for c in &t.chunks {
                                if let Some(b) = c.data.host() {
                                    copies.push(b.to_vec());
                                }
                            }
                        }
                        Item::Bytes { data, .. } => copies.push(data.to_vec()),
                    }
                }
                std::hint::black_box(&copies);
            });
        }
    });
    started.elapsed().as_secs_f64()
}
