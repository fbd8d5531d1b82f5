//! A simulated device: device memory that is host memory, and copies that
//! take the time a device's would. It drives the staging pipeline (copy
//! lanes, pieces in flight, the copy-ahead budget, overlap with writes, and
//! on load, host-to-device copies overlapped with reads) in tests and
//! benchmarks on machines without an accelerator.

use super::pool::HostPool;
use super::sink::{check_runs, ChunkSink, PendingUpload};
use super::source::{ChunkSource, StagedCopy};
use crate::error::{Error, ErrorKind, Result};
use crate::model::TensorBuffer;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A device whose copies take `latency + len / bandwidth` each, in order on
/// each copy lane (one thread per lane, like one CUDA stream per writer or
/// reader thread): to the host into buffers of a [`HostPool`] reused across
/// copies ([`SimDevice::source`]), and from host staging buffers of that
/// pool into simulated device memory ([`SimDevice::sink`]).
#[derive(Debug)]
pub struct SimDevice {
    latency: Duration,
    bandwidth: f64,
    lanes: Mutex<Vec<Sender<Job>>>,
    pool: HostPool,
    copied: AtomicU64,
    host_copy: bool,
}

enum Job {
    /// Device to host.
    Down {
        data: Bytes,
        done: SyncSender<Result<Bytes>>,
    },
    /// Host to device.
    Up {
        sink: Arc<SinkInner>,
        runs: Vec<(u64, u64)>,
        src: Box<dyn TensorBuffer>,
        done: SyncSender<Result<()>>,
    },
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

    /// `len` bytes of zeroed device memory of this device, to load into.
    pub fn sink(self: &Arc<Self>, len: u64) -> Arc<SimSink> {
        Arc::new(SimSink {
            device: self.clone(),
            inner: Arc::new(SinkInner {
                len,
                mem: Mutex::new(SinkMem::default()),
                failing: AtomicBool::new(false),
            }),
            uploaded: AtomicU64::new(0),
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
            // Lanes are created as needed and live as long as the device.
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
/// one's end plus its own duration. To the host: into a pooled buffer, or
/// (no pool: a DMA-like device) handing out the bytes themselves. To the
/// device: the staging buffer's bytes into the sink's memory, or (a
/// DMA-like device) the buffer itself kept as that memory, which costs the
/// host no CPU.
fn run_lane(rx: Receiver<Job>, pool: Option<HostPool>, latency: Duration, bandwidth: f64) {
    let mut free_at = Instant::now();
    let wait_until = |free_at: &mut Instant, len: usize| {
        let start = (*free_at).max(Instant::now());
        let end = start + latency + Duration::from_secs_f64(len as f64 / bandwidth);
        *free_at = end;
        end
    };
    let sleep_until = |end: Instant| {
        let now = Instant::now();
        if end > now {
            std::thread::sleep(end - now);
        }
    };
    for job in rx {
        match job {
            Job::Down { data, done } => {
                let end = wait_until(&mut free_at, data.len());
                let out = match &pool {
                    Some(pool) => {
                        let mut buf = pool.take(data.len());
                        buf.as_mut_slice().copy_from_slice(&data);
                        buf.into_bytes()
                    }
                    None => data,
                };
                sleep_until(end);
                let _ = done.send(Ok(out));
            }
            Job::Up {
                sink,
                runs,
                src,
                done,
            } => {
                let end = wait_until(&mut free_at, src.as_bytes().len());
                let r = if sink.failing.load(Ordering::SeqCst) {
                    drop(src);
                    Err(Error::new(
                        ErrorKind::Io,
                        "simulated device: the copy to the device failed",
                    ))
                } else {
                    sink.apply(runs, src, pool.is_some());
                    Ok(())
                };
                sleep_until(end);
                let _ = done.send(r);
            }
        }
    }
}

/// Device memory of a [`SimDevice`] a load fills ([`SimDevice::sink`]).
pub struct SimSink {
    device: Arc<SimDevice>,
    inner: Arc<SinkInner>,
    uploaded: AtomicU64,
}

/// What the copy lanes share with a sink.
struct SinkInner {
    len: u64,
    mem: Mutex<SinkMem>,
    failing: AtomicBool,
}

/// A staging buffer kept as device memory, with the byte runs it fills.
type Kept = (Vec<(u64, u64)>, Box<dyn TensorBuffer>);

/// A sink's memory: bytes copied in, and (a DMA-like device) staging
/// buffers kept as they are, applied over them in upload order.
#[derive(Default)]
struct SinkMem {
    bytes: Vec<u8>,
    kept: Vec<Kept>,
}

impl std::fmt::Debug for SimSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimSink({} bytes)", self.inner.len)
    }
}

impl SimSink {
    /// The memory's bytes now (a copy): what completed copies put there,
    /// zeros elsewhere.
    pub fn to_vec(&self) -> Vec<u8> {
        let mem = self.inner.mem.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = if mem.bytes.is_empty() {
            vec![0u8; self.inner.len as usize]
        } else {
            mem.bytes.clone()
        };
        for (runs, src) in &mem.kept {
            scatter_runs(&mut out, runs, src.as_bytes());
        }
        out
    }

    /// Make every later copy into this memory fail (after its simulated
    /// duration), as a device error would.
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    /// Bytes copied into this memory so far (copies started).
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }
}

impl SinkInner {
    fn apply(&self, runs: Vec<(u64, u64)>, src: Box<dyn TensorBuffer>, copy: bool) {
        let mut mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        if copy {
            if mem.bytes.is_empty() && self.len > 0 {
                mem.bytes = vec![0u8; self.len as usize];
                let kept = std::mem::take(&mut mem.kept);
                for (runs, src) in &kept {
                    scatter_runs(&mut mem.bytes, runs, src.as_bytes());
                }
            }
            scatter_runs(&mut mem.bytes, &runs, src.as_bytes());
        } else {
            mem.kept.push((runs, src));
        }
    }
}

/// Write `src` in order over the byte ranges `runs` of `dst`.
fn scatter_runs(dst: &mut [u8], runs: &[(u64, u64)], src: &[u8]) {
    let mut at = 0usize;
    for &(off, len) in runs {
        let (off, len) = (off as usize, len as usize);
        dst[off..off + len].copy_from_slice(&src[at..at + len]);
        at += len;
    }
}

impl ChunkSink for SimSink {
    fn len(&self) -> u64 {
        self.inner.len
    }

    fn staging(&self, len: usize) -> Result<Box<dyn TensorBuffer>> {
        Ok(Box::new(self.device.pool.take(len)))
    }

    fn upload(
        &self,
        lane: usize,
        runs: Vec<(u64, u64)>,
        src: Box<dyn TensorBuffer>,
    ) -> Result<Box<dyn PendingUpload>> {
        check_runs(&runs, self.inner.len, src.as_bytes().len())?;
        let sink = self.inner.clone();
        let (done, rx) = sync_channel(1);
        self.uploaded
            .fetch_add(src.as_bytes().len() as u64, Ordering::Relaxed);
        self.device
            .lane(lane)
            .send(Job::Up {
                sink,
                runs,
                src,
                done,
            })
            .map_err(|_| Error::invalid("the simulated copy lane has stopped"))?;
        Ok(Box::new(SimUpload(rx)))
    }
}

struct SimUpload(Receiver<Result<()>>);

impl PendingUpload for SimUpload {
    fn wait(self: Box<Self>) -> Result<()> {
        self.0
            .recv()
            .map_err(|_| Error::invalid("the simulated copy lane stopped mid-copy"))?
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
            .send(Job::Down { data, done })
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

    #[test]
    fn uploads_fill_their_runs_in_lane_order_and_refuse_bad_runs() {
        for dma in [false, true] {
            let dev = if dma {
                SimDevice::dma(Duration::from_micros(100), 1e9).unwrap()
            } else {
                SimDevice::new(Duration::from_micros(100), 1e9).unwrap()
            };
            let sink = dev.sink(10);
            let mut a = sink.staging(4).unwrap();
            a.as_mut_bytes().copy_from_slice(&[1, 2, 3, 4]);
            let mut b = sink.staging(3).unwrap();
            b.as_mut_bytes().copy_from_slice(&[7, 8, 9]);
            let t = Instant::now();
            // Two runs of two bytes from one buffer, then an overwrite.
            let ua = sink.upload(0, vec![(0, 2), (6, 2)], a).unwrap();
            let ub = sink.upload(0, vec![(1, 3)], b).unwrap();
            ua.wait().unwrap();
            ub.wait().unwrap();
            assert!(t.elapsed() >= Duration::from_micros(200), "in lane order");
            assert_eq!(
                sink.to_vec(),
                vec![1, 7, 8, 9, 0, 0, 3, 4, 0, 0],
                "dma {dma}"
            );
            assert_eq!(sink.uploaded_bytes(), 7);
            let c = sink.staging(2).unwrap();
            let Err(e) = sink.upload(1, vec![(9, 2)], c) else {
                panic!("a run past the end was accepted");
            };
            assert!(e.message().contains("10-byte destination"), "{e}");
            let c = sink.staging(2).unwrap();
            let Err(e) = sink.upload(1, vec![(0, 1)], c) else {
                panic!("runs shorter than the buffer were accepted");
            };
            assert!(e.message().contains("cover 1 bytes"), "{e}");
            sink.set_failing(true);
            let c = sink.staging(2).unwrap();
            let e = sink.upload(1, vec![(0, 2)], c).unwrap().wait().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            assert_eq!(sink.to_vec()[..2], [1, 7], "a failed copy wrote nothing");
        }
    }
}
