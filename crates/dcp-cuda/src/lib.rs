//! dcp-cuda: dcp on NVIDIA GPUs.
//!
//! Device tensors become [`ChunkSource`]s: a save copies them to the host
//! piece by piece, on one CUDA stream per writer thread (the thread's copy
//! lane), into page-locked (pinned) host buffers of a pool reused across
//! copies and saves, a piece ahead of the writes, within the writer's
//! `per_thread_copy_ahead` budget. An event recorded after each copy marks
//! when its buffer is ready; the written bytes give their buffer back to the
//! pool when dropped. [`CudaStager::upload`] copies loaded bytes back to the
//! device through the same pinned buffers, two pieces in flight.
//!
//! Loads go the other way: device memory becomes a [`ChunkSink`]
//! ([`CudaStager::sink`]). [`dcp_core::load_to_device`] reads records into
//! pinned staging buffers of the same pool ([`ChunkSink::staging`]),
//! verifies them, and copies each to the device with `cuMemcpyHtoDAsync`
//! on the stream of its reader lane, an event marking its end, while the
//! next records are read; the buffer goes back to the pool once its event
//! has completed.
//!
//! It builds without a CUDA toolkit: the driver library (`libcuda.so`) is
//! loaded at run time, through cudarc's driver API with the bindings of CUDA
//! 12.8. It refuses, with an [`ErrorKind::Unsupported`] error and never a
//! panic, to start where no driver library is found or no device is present
//! ([`CudaStager::new`]); device tensors of another device
//! ([`CudaStager::source`]); and ranges past a tensor's end
//! ([`ChunkSource::stage`]).
//!
//! ```no_run
//! use dcp_core::{save, DType, FileSystemWriter, Single, StateDict, WriterOptions};
//! use std::sync::Arc;
//! # async fn demo(fs: Arc<dyn dcp_core::FileSystem>) -> dcp_core::Result<()> {
//! let stager = dcp_cuda::CudaStager::new(0)?;
//! let weights = Arc::new(stager.upload(0, &[0u8; 4096])?); // device memory
//! let mut sd = StateDict::new();
//! sd.insert_full_tensor("w", DType::F32, vec![1024], stager.chunk(weights)?)?;
//! let writer = FileSystemWriter::new(fs, WriterOptions::default().thread_count(2))?;
//! save(&sd, &writer, &Single).await?;
//! # Ok(()) }
//! ```
//!
//! Device tensors must be ready when a save starts: writes made through
//! cudarc are waited for (cudarc's events), work launched elsewhere must be
//! synchronized by the caller.
//!
//! The `unsafe` here (pinned allocation, the view of a completed copy's
//! buffer) is exercised by the GPU tests (`tests/gpu.rs`), which need a
//! device: without one they print `SKIPPED` and pass; `cargo xtask
//! gpu-check` runs them with skipping forbidden.

use bytes::Bytes;
use cudarc::driver::{
    result::DriverError, sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr,
    PinnedHostSlice,
};
pub use dcp_core::stage::StagedCopy;
use dcp_core::stage::{check_runs, PendingUpload};
use dcp_core::{ChunkData, ChunkSink, ChunkSource, Error, ErrorKind, Result, TensorBuffer};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use cudarc;

/// Whether the NVIDIA driver library (`libcuda.so`) can be loaded here.
/// Every other call of this crate checks it first.
pub fn driver_present() -> bool {
    // SAFETY: libloading marks loading a library unsafe because the
    // library's initializers run. This loads only the CUDA driver library
    // under the names cudarc itself loads it by for every driver call (and
    // unloads it again); its initializers are the driver's own.
    unsafe { sys::is_culib_present() }
}

fn require_driver() -> Result<()> {
    if driver_present() {
        Ok(())
    } else {
        Err(Error::unsupported(
            "no CUDA driver library was found (libcuda.so: install the NVIDIA driver, or \
             add its directory to LD_LIBRARY_PATH); dcp-cuda needs it at run time",
        ))
    }
}

/// The number of CUDA devices, or the error saying why there are none
/// usable (no driver library, no device).
pub fn device_count() -> Result<usize> {
    require_driver()?;
    guarded("count CUDA devices", || {
        cudarc::driver::result::init().map_err(|e| driver_err("initialize CUDA", e))?;
        let n = CudaContext::device_count().map_err(|e| driver_err("count CUDA devices", e))?;
        Ok(n.max(0) as usize)
    })
}

/// A driver error as a dcp error: no device or no working driver is
/// [`ErrorKind::Unsupported`], a bad ordinal or argument
/// [`ErrorKind::InvalidInput`], anything else (a failed copy) [`ErrorKind::Io`].
fn driver_err(what: &str, e: DriverError) -> Error {
    use sys::cudaError_enum as C;
    let kind = match e.0 {
        C::CUDA_ERROR_NO_DEVICE
        | C::CUDA_ERROR_NOT_INITIALIZED
        | C::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | C::CUDA_ERROR_NOT_SUPPORTED => ErrorKind::Unsupported,
        C::CUDA_ERROR_INVALID_DEVICE | C::CUDA_ERROR_INVALID_VALUE => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    };
    // The result code's name, not `DriverError`'s `Display`, which asks the
    // driver library for a description.
    Error::new(kind, format!("{what}: {:?}", e.0))
}

/// Runs a driver call, turning a panic of cudarc (a symbol missing from an
/// old driver library) into an error: constructors never panic.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Err(Error::unsupported(format!(
            "{what}: the CUDA driver library could not be used: {msg}"
        )))
    })
}

/// Stages device memory of one CUDA device into pinned host buffers: its
/// context, one stream per copy lane (writer thread), created when first
/// used, and the pool of pinned buffers every copy lands in. Clones of the
/// `Arc` share all three.
pub struct CudaStager {
    ctx: Arc<CudaContext>,
    lanes: Mutex<Vec<Option<Arc<CudaStream>>>>,
    pool: PinnedPool,
    copied: AtomicU64,
}

impl fmt::Debug for CudaStager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaStager")
            .field("ordinal", &self.ctx.ordinal())
            .field("pinned_allocations", &self.pool.allocations())
            .finish()
    }
}

impl CudaStager {
    /// A stager on device `ordinal` (its primary context). Refuses, with an
    /// [`ErrorKind::Unsupported`] error, a machine without the driver
    /// library or without a device, and an ordinal past the last device
    /// with [`ErrorKind::InvalidInput`]. Never panics.
    pub fn new(ordinal: usize) -> Result<Arc<CudaStager>> {
        require_driver()?;
        let ctx = guarded("open CUDA device", || {
            cudarc::driver::result::init().map_err(|e| driver_err("initialize CUDA", e))?;
            let n = CudaContext::device_count().map_err(|e| driver_err("count devices", e))?;
            if n <= 0 {
                return Err(Error::unsupported("no CUDA device is present"));
            }
            if ordinal >= n as usize {
                return Err(Error::invalid(format!(
                    "CUDA device {ordinal} does not exist ({n} devices)"
                )));
            }
            CudaContext::new(ordinal).map_err(|e| driver_err("open CUDA device", e))
        })?;
        Ok(Arc::new(CudaStager {
            ctx,
            lanes: Mutex::new(Vec::new()),
            pool: PinnedPool::default(),
            copied: AtomicU64::new(0),
        }))
    }

    /// The device's context (to allocate tensors on, with cudarc).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream of copy lane `lane`, created on first use.
    pub fn lane(&self, lane: usize) -> Result<Arc<CudaStream>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if lanes.len() <= lane {
            lanes.resize(lane + 1, None);
        }
        if let Some(s) = &lanes[lane] {
            return Ok(s.clone());
        }
        let s = self
            .ctx
            .new_stream()
            .map_err(|e| driver_err("create a CUDA stream", e))?;
        lanes[lane] = Some(s.clone());
        Ok(s)
    }

    /// A device tensor's bytes as a chunk source. Refuses memory of another
    /// device (context).
    pub fn source(self: &Arc<Self>, slice: Arc<CudaSlice<u8>>) -> Result<Arc<dyn ChunkSource>> {
        if **slice.context() != *self.ctx {
            return Err(Error::invalid(format!(
                "a tensor of CUDA device {} given to the stager of device {}",
                slice.ordinal(),
                self.ctx.ordinal()
            )));
        }
        Ok(Arc::new(CudaSource {
            stager: self.clone(),
            slice,
        }))
    }

    /// [`CudaStager::source`] as a chunk's data.
    pub fn chunk(self: &Arc<Self>, slice: Arc<CudaSlice<u8>>) -> Result<ChunkData> {
        Ok(ChunkData::Source(self.source(slice)?))
    }

    /// Bytes copied from the device so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Pinned buffers allocated so far (a copy that found no free buffer of
    /// its length); a second save of the same layout allocates none.
    pub fn pinned_allocations(&self) -> u64 {
        self.pool.allocations()
    }

    /// Pinned bytes allocated so far.
    pub fn pinned_bytes(&self) -> u64 {
        self.pool.allocated_bytes.load(Ordering::Relaxed)
    }

    /// Pinned bytes in free buffers now.
    pub fn free_pinned_bytes(&self) -> u64 {
        self.pool.free_bytes()
    }

    /// Free the pool's idle pinned buffers (buffers in use return to the
    /// pool as usual).
    pub fn trim(&self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn take(&self, len: usize) -> Result<Pinned> {
        if let Some(p) = self.pool.pop(len) {
            return Ok(p);
        }
        let p = Pinned::alloc(&self.ctx, len)?;
        self.pool.allocations.fetch_add(1, Ordering::Relaxed);
        self.pool
            .allocated_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(p)
    }

    /// Copy `data` to new device memory on copy lane `lane`, in pieces of at
    /// most `piece` bytes staged through pinned buffers, two in flight (the
    /// host copy of one overlaps the device copy of the other). Returns when
    /// the bytes are on the device. For loads: the bytes a load returned, to
    /// the device.
    pub fn upload_pieces(&self, lane: usize, data: &[u8], piece: usize) -> Result<CudaSlice<u8>> {
        let stream = self.lane(lane)?;
        let mut dst = stream
            .alloc_zeros::<u8>(data.len())
            .map_err(|e| driver_err("allocate device memory", e))?;
        let piece = piece.max(1);
        let mut in_flight: VecDeque<Pinned> = VecDeque::new();
        let result: Result<()> = (|| {
            for (i, part) in data.chunks(piece).enumerate() {
                if in_flight.len() >= 2 {
                    let p = in_flight.pop_front().expect("two in flight");
                    p.done
                        .synchronize()
                        .map_err(|e| driver_err("wait for a host-to-device copy", e))?;
                    self.pool.put(p);
                }
                let mut p = self.take(part.len())?;
                p.buf
                    .as_mut_slice()
                    .map_err(|e| driver_err("wait for a pinned buffer", e))?
                    .copy_from_slice(part);
                let start = i * piece;
                let mut view = dst.slice_mut(start..start + part.len());
                stream
                    .memcpy_htod(&p.buf, &mut view)
                    .map_err(|e| driver_err("copy to the device", e))?;
                p.done
                    .record(&stream)
                    .map_err(|e| driver_err("record a CUDA event", e))?;
                in_flight.push_back(p);
            }
            Ok(())
        })();
        for p in in_flight {
            // A buffer whose copy cannot be waited for is not reused.
            if p.done.synchronize().is_ok() {
                self.pool.put(p);
            }
        }
        result?;
        stream
            .synchronize()
            .map_err(|e| driver_err("wait for the device copies", e))?;
        Ok(dst)
    }

    /// Device memory `slice` as a load destination ([`ChunkSink`]): a
    /// device load copies into it from pinned staging buffers on the
    /// stream of each reader lane. Refuses memory of another device. Waits
    /// for work cudarc has recorded on `slice` first; get the memory back
    /// with [`CudaSink::into_slice`] once the load has returned.
    pub fn sink(self: &Arc<Self>, slice: CudaSlice<u8>) -> Result<Arc<CudaSink>> {
        if **slice.context() != *self.ctx {
            return Err(Error::invalid(format!(
                "a tensor of CUDA device {} given to the stager of device {}",
                slice.ordinal(),
                self.ctx.ordinal()
            )));
        }
        let stream = self.lane(0)?;
        let ptr = {
            let (ptr, _read) = slice.device_ptr(&stream);
            ptr
        };
        // Every copy into the sink is ordered after earlier writes to it.
        stream
            .synchronize()
            .map_err(|e| driver_err("wait for a destination tensor", e))?;
        Ok(Arc::new(CudaSink {
            stager: self.clone(),
            len: slice.len() as u64,
            ptr,
            slice: Mutex::new(Some(slice)),
        }))
    }

    /// [`CudaStager::upload_pieces`] in pieces of 32 MiB.
    pub fn upload(&self, lane: usize, data: &[u8]) -> Result<CudaSlice<u8>> {
        self.upload_pieces(lane, data, 32 << 20)
    }
}

/// A pinned host buffer and the event marking the end of the last copy
/// into or out of it.
struct Pinned {
    buf: PinnedHostSlice<u8>,
    done: CudaEvent,
}

impl Pinned {
    fn alloc(ctx: &Arc<CudaContext>, len: usize) -> Result<Pinned> {
        // SAFETY: `alloc_pinned_with_flags` is unsafe only because the
        // memory it returns is uninitialized; it is zeroed below before any
        // reference to it exists (`write_bytes` through the raw pointer).
        // Flags 0: plain page-locked memory, not write-combined (which the
        // host reads slowly, and a save reads every staged byte).
        let mut buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }
            .map_err(|e| driver_err("allocate pinned host memory", e))?;
        let ptr = buf
            .as_mut_ptr()
            .map_err(|e| driver_err("allocate pinned host memory", e))?;
        // SAFETY: `ptr` is the start of the live allocation of `len` bytes
        // just made (cudarc asserts it non-null and aligned), which nothing
        // else references yet.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        let done = ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(|e| driver_err("create a CUDA event", e))?;
        Ok(Pinned { buf, done })
    }
}

/// Free pinned buffers by exact length.
#[derive(Default)]
struct PinnedPool {
    free: Mutex<HashMap<usize, Vec<Pinned>>>,
    allocations: AtomicU64,
    allocated_bytes: AtomicU64,
}

impl PinnedPool {
    fn pop(&self, len: usize) -> Option<Pinned> {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&len)
            .and_then(Vec::pop)
    }

    /// Give back a buffer no copy uses any more (its event synchronized).
    fn put(&self, p: Pinned) {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(p.buf.len())
            .or_default()
            .push(p);
    }

    fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    fn free_bytes(&self) -> u64 {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.iter().map(|(len, v)| (*len * v.len()) as u64).sum()
    }
}

/// A device tensor's bytes as a [`ChunkSource`] (see [`CudaStager::source`]).
pub struct CudaSource {
    stager: Arc<CudaStager>,
    slice: Arc<CudaSlice<u8>>,
}

impl fmt::Debug for CudaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaSource(device {}, {} bytes)",
            self.slice.ordinal(),
            self.slice.len()
        )
    }
}

impl ChunkSource for CudaSource {
    fn len(&self) -> u64 {
        self.slice.len() as u64
    }

    fn stage(&self, lane: usize, offset: u64, len: usize) -> Result<Box<dyn StagedCopy>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.slice.len() as u64)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "stage {len} bytes at {offset} of a {}-byte device tensor",
                    self.slice.len()
                ))
            })?;
        if len == 0 {
            return Ok(Box::new(Ready));
        }
        let stream = self.stager.lane(lane)?;
        let mut p = self.stager.take(len)?;
        let view = self.slice.slice(offset as usize..end as usize);
        let copied = stream
            .memcpy_dtoh(&view, &mut p.buf)
            .and_then(|()| p.done.record(&stream));
        if let Err(e) = copied {
            // Nothing may still write into it once the stream is idle.
            let _ = stream.synchronize();
            return Err(driver_err("copy from the device", e));
        }
        self.stager.copied.fetch_add(len as u64, Ordering::Relaxed);
        Ok(Box::new(CudaCopy {
            pinned: Some(p),
            stager: self.stager.clone(),
            _slice: self.slice.clone(),
        }))
    }
}

/// An empty piece.
struct Ready;

impl StagedCopy for Ready {
    fn wait(self: Box<Self>) -> Result<Bytes> {
        Ok(Bytes::new())
    }
}

/// A device-to-host copy in flight. It keeps the device tensor alive until
/// the copy is done, and its buffer out of the pool until the copy is done
/// and (after [`StagedCopy::wait`]) the bytes are dropped: dropped unwaited,
/// it waits for the copy before giving the buffer back.
struct CudaCopy {
    pinned: Option<Pinned>,
    stager: Arc<CudaStager>,
    _slice: Arc<CudaSlice<u8>>,
}

impl StagedCopy for CudaCopy {
    fn wait(mut self: Box<Self>) -> Result<Bytes> {
        let p = self.pinned.take().expect("waited once");
        // On failure the buffer is dropped, not pooled: cudarc's drop of a
        // pinned buffer waits for its copies before freeing it.
        p.done
            .synchronize()
            .map_err(|e| driver_err("wait for a copy from the device", e))?;
        let addr = p
            .buf
            .as_ptr()
            .map_err(|e| driver_err("wait for a copy from the device", e))?
            as usize;
        Ok(Bytes::from_owner(PinnedBytes {
            pinned: Some(p),
            addr,
            stager: self.stager.clone(),
        }))
    }
}

impl Drop for CudaCopy {
    fn drop(&mut self) {
        if let Some(p) = self.pinned.take() {
            // Soundness: the DMA may still be writing into the buffer; it
            // goes back to the pool (where another copy may take it) only
            // once the copy is complete.
            if p.done.synchronize().is_ok() {
                self.stager.pool.put(p);
            }
        }
    }
}

/// Staged bytes in a pinned buffer, back to the pool when dropped.
struct PinnedBytes {
    pinned: Option<Pinned>,
    /// The buffer's address (a pointer is not `Send`).
    addr: usize,
    stager: Arc<CudaStager>,
}

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        let len = self.pinned.as_ref().map_or(0, |p| p.buf.len());
        // SAFETY: `addr` is the start of the pinned allocation of `len`
        // bytes owned by `self.pinned`, which lives (and is not pooled)
        // until `self` is dropped, so for as long as the returned borrow.
        // The copy into it completed before `self` was made (its event was
        // synchronized in `wait`), and no other copy can be started into it
        // while `self` holds it: the bytes are initialized (zeroed at
        // allocation, then written by the copy) and nothing mutates them.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, len) }
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        if let Some(p) = self.pinned.take() {
            self.stager.pool.put(p);
        }
    }
}

/// Device memory a load fills (see [`CudaStager::sink`]).
pub struct CudaSink {
    stager: Arc<CudaStager>,
    len: u64,
    /// The device address of `slice`'s first byte.
    ptr: sys::CUdeviceptr,
    slice: Mutex<Option<CudaSlice<u8>>>,
}

impl fmt::Debug for CudaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaSink(device {}, {} bytes)",
            self.stager.ctx.ordinal(),
            self.len
        )
    }
}

impl CudaSink {
    /// The device memory back, once no load uses the sink (after
    /// [`dcp_core::load_to_device`] returned, every copy into it is
    /// complete).
    pub fn into_slice(self) -> CudaSlice<u8> {
        self.slice
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .expect("the slice is taken only here")
    }
}

impl ChunkSink for CudaSink {
    fn len(&self) -> u64 {
        self.len
    }

    fn staging(&self, len: usize) -> Result<Box<dyn TensorBuffer>> {
        let p = self.stager.take(len)?;
        let addr = p
            .buf
            .as_ptr()
            .map_err(|e| driver_err("wait for a pinned buffer", e))? as usize;
        Ok(Box::new(PinnedStaging {
            pinned: Some(p),
            addr,
            stager: self.stager.clone(),
        }))
    }

    fn upload(
        &self,
        lane: usize,
        runs: Vec<(u64, u64)>,
        src: Box<dyn TensorBuffer>,
    ) -> Result<Box<dyn PendingUpload>> {
        check_runs(&runs, self.len, src.as_bytes().len())?;
        let stream = self.stager.lane(lane)?;
        let done = self
            .stager
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(|e| driver_err("create a CUDA event", e))?;
        let bytes = src.as_bytes();
        let mut at = 0usize;
        let mut started: std::result::Result<(), DriverError> = Ok(());
        for (off, len) in &runs {
            let len = *len as usize;
            // SAFETY: the destination range lies inside the live device
            // allocation `self.slice` (checked by `check_runs`), which this
            // sink keeps alive; nothing else writes that range during the
            // load (each destination byte belongs to one staged part). The
            // source is `src`'s bytes, which the returned upload owns, and
            // does not drop, move or hand out for writing until the event
            // recorded after the copy has completed (or, if recording
            // fails, until the stream is idle).
            started = unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    self.ptr + off,
                    &bytes[at..at + len],
                    stream.cu_stream(),
                )
            };
            if started.is_err() {
                break;
            }
            at += len;
        }
        let started = started.and_then(|()| done.record(&stream));
        if let Err(e) = started {
            // Nothing may still read `src` once the stream is idle.
            let _ = stream.synchronize();
            return Err(driver_err("copy to the device", e));
        }
        self.stager
            .copied
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(Box::new(CudaUpload {
            done,
            src: Some(src),
            stream,
        }))
    }
}

/// A pinned staging buffer lent to a load; back to the pool when dropped.
struct PinnedStaging {
    pinned: Option<Pinned>,
    /// The buffer's address (a pointer is not `Send`).
    addr: usize,
    stager: Arc<CudaStager>,
}

impl TensorBuffer for PinnedStaging {
    fn as_bytes(&self) -> &[u8] {
        let len = self.pinned.as_ref().map_or(0, |p| p.buf.len());
        // SAFETY: `addr` is the start of the pinned allocation of `len`
        // bytes owned by `self.pinned`, which lives (and is not pooled)
        // until `self` is dropped. Its bytes are initialized (zeroed at
        // allocation). No copy writes into it while `self` holds it: it
        // came from the pool, where only buffers whose copies completed
        // are kept, and a copy to the device only reads it.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, len) }
    }

    fn as_mut_bytes(&mut self) -> &mut [u8] {
        let len = self.pinned.as_ref().map_or(0, |p| p.buf.len());
        // SAFETY: as in `as_bytes`; `&mut self` makes this the only
        // reference, and no copy to the device reads the buffer yet (an
        // upload takes the buffer by value, so it cannot be borrowed
        // mutably while a copy reads it).
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, len) }
    }
}

impl Drop for PinnedStaging {
    fn drop(&mut self) {
        if let Some(p) = self.pinned.take() {
            self.stager.pool.put(p);
        }
    }
}

/// A host-to-device copy in flight: it owns its source buffer until the
/// event recorded after the copy has completed; dropped unwaited, it waits
/// for the copy first.
struct CudaUpload {
    done: CudaEvent,
    src: Option<Box<dyn TensorBuffer>>,
    stream: Arc<CudaStream>,
}

impl PendingUpload for CudaUpload {
    fn wait(mut self: Box<Self>) -> Result<()> {
        let r = self
            .done
            .synchronize()
            .map_err(|e| driver_err("wait for a copy to the device", e));
        if r.is_err() {
            // The event failed: the stream idle is the copy done.
            let _ = self.stream.synchronize();
        }
        drop(self.src.take());
        r
    }
}

impl Drop for CudaUpload {
    fn drop(&mut self) {
        if let Some(src) = self.src.take() {
            // Soundness: the DMA may still be reading `src`.
            if self.done.synchronize().is_err() {
                let _ = self.stream.synchronize();
            }
            drop(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver library (CI, this machine), every entry point
    /// returns the clear error; none panics.
    #[test]
    fn without_a_driver_the_error_is_clear_and_nothing_panics() {
        if driver_present() {
            println!("a CUDA driver library is present: the no-driver path was not exercised");
            return;
        }
        let e = CudaStager::new(0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("no CUDA driver library"), "{e}");
        let e = device_count().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    }

    #[test]
    fn guarded_turns_a_panic_into_an_unsupported_error() {
        let r: Result<()> = guarded("open", || panic!("symbol cuFoo not found"));
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("cuFoo"), "{e}");
    }

    #[test]
    fn driver_errors_get_their_kind() {
        use sys::cudaError_enum as C;
        let k = |c| driver_err("x", DriverError(c)).kind();
        assert_eq!(k(C::CUDA_ERROR_NO_DEVICE), ErrorKind::Unsupported);
        assert_eq!(k(C::CUDA_ERROR_INVALID_DEVICE), ErrorKind::InvalidInput);
        assert_eq!(k(C::CUDA_ERROR_LAUNCH_FAILED), ErrorKind::Io);
        let e = driver_err("copy", DriverError(C::CUDA_ERROR_LAUNCH_FAILED));
        assert_eq!(e.message(), "copy: CUDA_ERROR_LAUNCH_FAILED");
    }
}
