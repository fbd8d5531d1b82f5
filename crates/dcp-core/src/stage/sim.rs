//! A simulated device: device memory that is host memory, and copies that
//! take the time a device's would. It drives the staging pipeline (copy
//! lanes, pieces in flight, the copy-ahead budget, overlap with writes) in
//! tests and benchmarks on machines without an accelerator.

use super::pool::HostPool;
use super::source::{ChunkSource, StagedCopy};
use crate::error::{Error, Result};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A device whose copies to the host take `latency + len / bandwidth` each,
/// in order on each copy lane (one thread per lane, like one CUDA stream
/// per writer thread), into buffers of a [`HostPool`] reused across
/// copies.
#[derive(Debug)]
pub struct SimDevice {
    latency: Duration,
    bandwidth: f64,
    lanes: Mutex<Vec<Sender<Job>>>,
    pool: HostPool,
    copied: AtomicU64,
    host_copy: bool,
}

struct Job {
    data: Bytes,
    done: SyncSender<Result<Bytes>>,
}

impl SimDevice {
    /// A device with this per-copy latency and copy bandwidth (bytes per
    /// second; refused unless positive and finite).
    pub fn new(latency: Duration, bandwidth: f64) -> Result<Arc<SimDevice>> {
        if !(bandwidth.is_finite() && bandwidth > 0.0) {
            return Err(Error::invalid(format!(
                "simulated device bandwidth {bandwidth} is not a positive number of bytes per second"
            )));
        }
        Ok(Arc::new(SimDevice {
            latency,
            bandwidth,
            lanes: Mutex::new(Vec::new()),
            pool: HostPool::new(),
            copied: AtomicU64::new(0),
            host_copy: true,
        }))
    }

    /// Like [`SimDevice::new`], but a copy costs the host no CPU, as a
    /// device's DMA engine does: after its simulated duration it hands out
    /// the bytes themselves instead of copying them into a pooled buffer.
    /// For benchmarks on machines with few cores, where a real copy on the
    /// lane threads would compete with the writes it should overlap.
    pub fn dma(latency: Duration, bandwidth: f64) -> Result<Arc<SimDevice>> {
        let dev = SimDevice::new(latency, bandwidth)?;
        Ok(Arc::new(SimDevice {
            host_copy: false,
            latency: dev.latency,
            bandwidth: dev.bandwidth,
            lanes: Mutex::new(Vec::new()),
            pool: HostPool::new(),
            copied: AtomicU64::new(0),
        }))
    }

    /// `data` as device memory of this device.
    pub fn source(self: &Arc<Self>, data: Bytes) -> Arc<dyn ChunkSource> {
        Arc::new(SimSource {
            device: self.clone(),
            data,
        })
    }

    /// Bytes copied to the host so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// The pool of the host buffers copies land in.
    pub fn pool(&self) -> &HostPool {
        &self.pool
    }

    /// How long copying `len` bytes takes.
    pub fn copy_time(&self, len: u64) -> Duration {
        self.latency + Duration::from_secs_f64(len as f64 / self.bandwidth)
    }

    fn lane(&self, lane: usize) -> Sender<Job> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        while lanes.len() <= lane {
            let (tx, rx) = channel::<Job>();
            let (pool, latency, bandwidth) = (self.pool.clone(), self.latency, self.bandwidth);
            let pool = self.host_copy.then_some(pool);
            std::thread::Builder::new()
                .name(format!("dcp-sim-lane-{}", lanes.len()))
                .spawn(move || run_lane(rx, pool, latency, bandwidth))
                .expect("spawn a simulated copy lane");
            lanes.push(tx);
        }
        lanes[lane].clone()
    }
}

/// One lane: copies in order, each finishing no earlier than the previous
/// one's end plus its own duration; into a pooled buffer, or (no pool: a
/// DMA-like device) handing out the bytes themselves.
fn run_lane(rx: Receiver<Job>, pool: Option<HostPool>, latency: Duration, bandwidth: f64) {
    let mut free_at = Instant::now();
    for job in rx {
        let start = free_at.max(Instant::now());
        let end = start + latency + Duration::from_secs_f64(job.data.len() as f64 / bandwidth);
        let out = match &pool {
            Some(pool) => {
                let mut buf = pool.take(job.data.len());
                buf.as_mut_slice().copy_from_slice(&job.data);
                buf.into_bytes()
            }
            None => job.data,
        };
        let now = Instant::now();
        if end > now {
            std::thread::sleep(end - now);
        }
        free_at = end;
        let _ = job.done.send(Ok(out));
    }
}

#[derive(Debug)]
struct SimSource {
    device: Arc<SimDevice>,
    data: Bytes,
}

impl ChunkSource for SimSource {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn stage(&self, lane: usize, offset: u64, len: usize) -> Result<Box<dyn StagedCopy>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.data.len() as u64)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "stage {len} bytes at {offset} of a {}-byte simulated chunk",
                    self.data.len()
                ))
            })?;
        let (done, rx) = sync_channel(1);
        let data = self.data.slice(offset as usize..end as usize);
        self.device.copied.fetch_add(len as u64, Ordering::Relaxed);
        self.device
            .lane(lane)
            .send(Job { data, done })
            .map_err(|_| Error::invalid("the simulated copy lane has stopped"))?;
        Ok(Box::new(SimCopy(rx)))
    }
}

struct SimCopy(Receiver<Result<Bytes>>);

impl StagedCopy for SimCopy {
    fn wait(self: Box<Self>) -> Result<Bytes> {
        self.0
            .recv()
            .map_err(|_| Error::invalid("the simulated copy lane stopped mid-copy"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_take_their_time_in_lane_order_and_return_the_bytes() {
        let dev = SimDevice::new(Duration::from_millis(2), 1e9).unwrap();
        let src = dev.source(Bytes::from(
            (0..=255u8).cycle().take(4000).collect::<Vec<_>>(),
        ));
        let t = Instant::now();
        let a = src.stage(0, 0, 1000).unwrap();
        let b = src.stage(0, 1000, 3000).unwrap();
        let (a, b) = (a.wait().unwrap(), b.wait().unwrap());
        assert!(
            t.elapsed() >= Duration::from_millis(4),
            "two copies in order on one lane"
        );
        assert_eq!(
            a[..],
            (0..=255u8).cycle().take(1000).collect::<Vec<_>>()[..]
        );
        assert_eq!(b[0], (1000 % 256) as u8);
        assert_eq!(dev.copied_bytes(), 4000);
        let Err(e) = src.stage(1, 3999, 2) else {
            panic!("a range past the end was staged");
        };
        assert!(e.message().contains("of a 4000-byte"), "{e}");
        assert!(SimDevice::new(Duration::ZERO, 0.0).is_err());
        drop((a, b));
        assert_eq!(dev.pool().free_bytes(), 4000, "buffers back in the pool");
    }
}
