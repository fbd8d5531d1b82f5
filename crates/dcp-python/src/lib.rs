//! `dcp._dcp`: the Rust half of the `dcp` Python package.
//!
//! Python's `dcp.torch` drives torch's save and load protocol (torch's
//! planners and process groups); every byte moves here, in dcp's Rust core:
//!
//! * `Writer`: the coordinator takes the location (`begin`: refuses an
//!   existing checkpoint unless overwriting, takes the lease, fixes the save
//!   id and the generation); every rank writes its records
//!   (`write`, [`StorageWriter::write_rank`]) straight from the tensors'
//!   memory, with the GIL released; the coordinator assembles dcp metadata
//!   from every rank's result and commits it (`commit`: compare-and-swap of
//!   `.metadata`, cleanup, lease release).
//! * `Reader`: `read_metadata` reads and validates dcp's `.metadata` and
//!   hands it to Python (which presents it to torch as torch's `Metadata`);
//!   `read` fills destination buffers in place through dcp's load pipeline
//!   (coalesced reads, checksums verified), with the GIL released. Given
//!   the ranks' process group (`TorchCollective`), a resharded load reads
//!   each saved record once across the ranks and exchanges the slices
//!   (dcp's shared reads, [`dcp::load_from`]).
//!
//! Memory dcp cannot read in place (CUDA tensors) crosses over as a Python
//! stager object instead: `PySource`, a [`dcp::ChunkSource`] that dcp's save
//! pipeline stages piece by piece, as any device memory.
//!
//! Tensor memory crosses over as numpy arrays (`tensor.view(torch.uint8)
//! .numpy()` shares the tensor's memory): the array is kept alive, and its
//! address and length are numpy's own, never numbers taken from the caller.

use bytes::Bytes;
use dcp::checkpoint::{assemble_metadata, RankWrite, WriteRecord};
use dcp::metadata::ItemMeta;
use dcp::plan::{SavePlan, TensorDecl, WriteIndex, WriteItem};
use dcp::{
    ChunkBox, ChunkData, Collective, DType, DestChunk, DestStateDict, ErrorKind, FileSystemReader,
    FileSystemWriter, LoadOptions, Metadata, ReadStats, ReaderOptions, Single, StorageReader,
    StorageWriter, TensorBuffer, WriterOptions,
};
use pyo3::exceptions::{PyFileExistsError, PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyType};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

/// The runtime every blocking call of the module runs its futures on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dcp")
            .enable_all()
            .build()
            .expect("the tokio runtime starts")
    })
}

/// A dcp error as the Python exception of its kind, with dcp's message and
/// kind: `FileNotFoundError`, `FileExistsError`, `ValueError` (corruption,
/// checksum mismatches, invalid input), `OSError` (storage and the rest).
fn to_py(e: dcp::Error) -> PyErr {
    let msg = format!("{e} [dcp: {}]", e.kind());
    match e.kind() {
        ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
        ErrorKind::Corrupt
        | ErrorKind::ChecksumMismatch
        | ErrorKind::InvalidInput
        | ErrorKind::Plan
        | ErrorKind::Unsupported => PyValueError::new_err(msg),
        _ => PyOSError::new_err(msg),
    }
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    name.parse::<DType>().map_err(to_py)
}

fn new_save_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// The memory of a numpy array: an exact `numpy.ndarray` (no subclass, so
/// its attributes are numpy's own), of `uint8`, C-contiguous, held by a
/// strong reference so it lives as long as this value. Its address and
/// length are numpy's (`__array_interface__`, `nbytes`), never numbers the
/// caller chose. (The buffer protocol would do the same, but it is in the
/// stable ABI only from CPython 3.11, and the module supports 3.9.)
struct ArrayMemory {
    /// Keeps the array, hence its memory, alive.
    _array: Py<PyAny>,
    ptr: usize,
    len: usize,
}

impl ArrayMemory {
    fn new(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let py = obj.py();
        let ndarray = numpy_ndarray(py)?;
        if !obj.get_type().is(ndarray) {
            return Err(PyValueError::new_err(format!(
                "dcp: tensor memory must be an exact numpy.ndarray, got {}",
                obj.get_type().name()?
            )));
        }
        let flags = obj.getattr("flags")?;
        let dtype: String = obj.getattr("dtype")?.getattr("str")?.extract()?;
        if dtype != "|u1" || !flags.getattr("c_contiguous")?.extract::<bool>()? {
            return Err(PyValueError::new_err(
                "dcp: tensor memory must be a C-contiguous uint8 array",
            ));
        }
        let (ptr, readonly): (usize, bool) = obj
            .getattr("__array_interface__")?
            .get_item("data")?
            .extract()?;
        if writable && (readonly || !flags.getattr("writeable")?.extract::<bool>()?) {
            return Err(PyValueError::new_err(
                "dcp: a destination must be writable memory",
            ));
        }
        let len: usize = obj.getattr("nbytes")?.extract()?;
        Ok(ArrayMemory {
            _array: obj.clone().unbind(),
            ptr,
            len,
        })
    }

    fn range(&self) -> (usize, usize) {
        (self.ptr, self.ptr + self.len)
    }

    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` and `len` are numpy's own address and size of the
        // array's data (`ArrayMemory::new` accepts only an exact
        // `numpy.ndarray`, C-contiguous `uint8`, so its `len` bytes from
        // `ptr` are exactly its memory), valid for reads while the array
        // lives, which `_array` ensures; an array holding a reference cannot
        // be resized (numpy's reference check) so the memory does not move;
        // `u8` needs no alignment; numpy arrays are at most `isize::MAX`
        // bytes. The memory is not written while it is borrowed: the caller's
        // contract (as for torch's own writers and readers) is that the
        // tensors of a state dict being saved or loaded are not touched until
        // the call returns.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

/// `numpy.ndarray`, imported once.
fn numpy_ndarray(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static NDARRAY: pyo3::sync::PyOnceLock<Py<PyType>> = pyo3::sync::PyOnceLock::new();
    NDARRAY.import(py, "numpy", "ndarray")
}

/// A source record's memory, owned by the [`Bytes`] the writer sends to
/// storage (no copy).
struct SourceBuffer(ArrayMemory);

impl AsRef<[u8]> for SourceBuffer {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// Memory dcp cannot read directly (a CUDA tensor), lent by a Python object
/// with an int `nbytes` and `stage(lane, offset, length)`, which starts
/// copying those bytes to host memory and returns a handle whose `wait()`
/// returns them as a C-contiguous `uint8` numpy array of exactly `length`
/// bytes (`dcp.torch` passes its device stager). dcp's save pipeline drives
/// it as any [`dcp::ChunkSource`]: pieces of at most `per_thread_copy_ahead`
/// bytes per writer thread, on the writer thread's copy lane, a few ahead of
/// the writes. Each call takes the GIL; the save releases it while it runs.
struct PySource {
    obj: Py<PyAny>,
    len: u64,
    /// The item, for messages.
    name: String,
}

impl std::fmt::Debug for PySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PySource({}, {} bytes)", self.name, self.len)
    }
}

/// A Python exception raised while staging `name`, as a dcp I/O error that
/// keeps its message.
fn staging_error(name: &str, what: &str, e: PyErr) -> dcp::Error {
    dcp::Error::new(
        ErrorKind::Io,
        format!("staging {name} to host memory: {what}: {e}"),
    )
}

impl dcp::ChunkSource for PySource {
    fn len(&self) -> u64 {
        self.len
    }

    fn stage(
        &self,
        lane: usize,
        offset: u64,
        len: usize,
    ) -> dcp::Result<Box<dyn dcp::stage::StagedCopy>> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(dcp::Error::invalid(format!(
                "staging {}: range {offset}+{len} is past its {} bytes",
                self.name, self.len
            )));
        }
        Python::attach(|py| {
            let handle = self
                .obj
                .bind(py)
                .call_method1("stage", (lane, offset, len))
                .map_err(|e| staging_error(&self.name, "stage()", e))?;
            Ok(Box::new(PyStaged {
                handle: handle.unbind(),
                len,
                name: self.name.clone(),
            }) as Box<dyn dcp::stage::StagedCopy>)
        })
    }
}

/// A copy [`PySource::stage`] started: its `wait()` yields the bytes.
struct PyStaged {
    handle: Py<PyAny>,
    len: usize,
    name: String,
}

impl dcp::stage::StagedCopy for PyStaged {
    fn wait(self: Box<Self>) -> dcp::Result<Bytes> {
        Python::attach(|py| {
            let arr = self
                .handle
                .bind(py)
                .call_method0("wait")
                .map_err(|e| staging_error(&self.name, "wait()", e))?;
            let mem = ArrayMemory::new(&arr, false)
                .map_err(|e| staging_error(&self.name, "wait() result", e))?;
            if mem.len != self.len {
                return Err(dcp::Error::invalid(format!(
                    "staging {}: wait() returned {} bytes for a piece of {}",
                    self.name, mem.len, self.len
                )));
            }
            Ok(Bytes::from_owner(SourceBuffer(mem)))
        })
    }
}

/// A destination's memory, writable, that a load fills in place.
struct DestBuffer(ArrayMemory);

impl TensorBuffer for DestBuffer {
    fn as_bytes(&self) -> &[u8] {
        self.0.bytes()
    }

    fn as_mut_bytes(&mut self) -> &mut [u8] {
        let m = &self.0;
        if m.len == 0 {
            return &mut [];
        }
        // SAFETY: as for `ArrayMemory::bytes`, and writable: `DestBuffer` is
        // built only from arrays `ArrayMemory::new(_, true)` found writeable.
        // No other Rust reference to this memory exists while the returned
        // one lives: it borrows `self` mutably, and `Reader::read` refuses
        // two destinations whose memory overlaps, so no other `DestBuffer`
        // of the load aliases it.
        unsafe { std::slice::from_raw_parts_mut(m.ptr as *mut u8, m.len) }
    }
}

fn py_storage_options(options: Option<HashMap<String, String>>) -> HashMap<String, String> {
    options.unwrap_or_default()
}

/// One record `write` takes: item name, dtype name (`None` for a bytes
/// item), global shape, the chunk's offsets and sizes, and its memory.
type PyRecord<'py> = (
    String,
    Option<String>,
    Vec<u64>,
    Vec<u64>,
    Vec<u64>,
    Bound<'py, PyAny>,
);

/// The storage side of a save (`dcp._dcp.Writer`).
#[pyclass(module = "dcp._dcp", frozen)]
struct Writer {
    inner: Arc<FileSystemWriter>,
    location: String,
    /// The save id whose lease this writer holds (between `begin` and
    /// `commit`/`end`).
    active: Mutex<Option<String>>,
}

impl Writer {
    fn end_active(&self) {
        let id = self.active.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(id) = id {
            runtime().block_on(self.inner.end(&id));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.end_active();
    }
}

#[pymethods]
impl Writer {
    #[new]
    #[pyo3(signature = (location, storage_options=None, *, thread_count=1, sync_files=true,
        per_thread_copy_ahead=10_000_000, overwrite=true, single_file_per_rank=true,
        compression=None, zstd_level=3, checksum=Some("crc32c".to_string()),
        format="raw".to_string()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        location: String,
        storage_options: Option<HashMap<String, String>>,
        thread_count: usize,
        sync_files: bool,
        per_thread_copy_ahead: usize,
        overwrite: bool,
        single_file_per_rank: bool,
        compression: Option<String>,
        zstd_level: i32,
        checksum: Option<String>,
        format: String,
    ) -> PyResult<Self> {
        let compression = match compression {
            Some(c) => dcp::ext::compression_from_name(&c, zstd_level).map_err(to_py)?,
            None => None,
        };
        let checksum = match checksum {
            Some(c) => dcp::ext::checksum_from_name(&c).map_err(to_py)?,
            None => None,
        };
        let serialization: Arc<dyn dcp::SerializationFormat> = match format.as_str() {
            "raw" => Arc::new(dcp::format::Raw),
            "safetensors" => Arc::new(dcp::format::Safetensors),
            other => {
                let msg = format!("dcp: unknown serialization format {other:?}");
                return Err(PyValueError::new_err(
                    msg + ": expected \"raw\" or \"safetensors\"",
                ));
            }
        };
        let options = WriterOptions::default()
            .thread_count(thread_count)
            .sync_files(sync_files)
            .per_thread_copy_ahead(per_thread_copy_ahead)
            .overwrite(overwrite)
            .single_file_per_rank(single_file_per_rank)
            .extensions(dcp::ext::chain(compression, checksum))
            .serialization_format(serialization);
        let inner = dcp::writer_with(&location, &py_storage_options(storage_options), options)
            .map_err(to_py)?;
        Ok(Writer {
            inner: Arc::new(inner),
            location,
            active: Mutex::new(None),
        })
    }

    /// The location, as given.
    #[getter]
    fn location(&self) -> &str {
        &self.location
    }

    /// On the coordinator, before any rank writes: create the location,
    /// refuse an existing checkpoint unless overwriting, take the lease for
    /// a fresh save id. Returns `(save_id, generation)`.
    fn begin(&self, py: Python<'_>) -> PyResult<(String, u64)> {
        self.end_active();
        let id = new_save_id();
        let inner = self.inner.clone();
        let sid = id.clone();
        let generation = py
            .detach(move || {
                runtime().block_on(async move {
                    inner.prepare().await?;
                    inner.begin(&sid).await
                })
            })
            .map_err(to_py);
        // `begin` may have taken the lease before failing: always release.
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
        match generation {
            Ok(g) => Ok((id, g)),
            Err(e) => {
                self.end_active();
                Err(e)
            }
        }
    }

    /// Write this rank's records under names unique to `save_id`, straight
    /// from their memory (no copy without a codec), with the GIL released.
    /// Returns this rank's result, opaque, for `commit` on the coordinator.
    fn write<'py>(
        &self,
        py: Python<'py>,
        rank: usize,
        save_id: String,
        records: Vec<PyRecord<'py>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut plan = SavePlan::default();
        let mut out = Vec::with_capacity(records.len());
        for (name, dtype, shape, offsets, sizes, obj) in records {
            let data = if obj.get_type().is(numpy_ndarray(py)?) {
                ChunkData::from(Bytes::from_owner(SourceBuffer(ArrayMemory::new(
                    &obj, false,
                )?)))
            } else if obj.hasattr("stage")? {
                let len: u64 = obj.getattr("nbytes")?.extract()?;
                ChunkData::Source(Arc::new(PySource {
                    obj: obj.clone().unbind(),
                    len,
                    name: name.clone(),
                }))
            } else {
                return Err(PyValueError::new_err(format!(
                    "dcp: {name}: tensor memory must be an exact numpy.ndarray, or a \
                     stager with nbytes and stage(lane, offset, length); got {}",
                    obj.get_type().name()?
                )));
            };
            let len = data.len();
            let (index, dtype, whole) = match dtype {
                Some(d) => {
                    let d = parse_dtype(&d)?;
                    let region = ChunkBox::new(offsets, sizes).map_err(to_py)?;
                    region.check_within(&shape).map_err(to_py)?;
                    let want = region.numel() * d.size() as u64;
                    if want != len {
                        return Err(PyValueError::new_err(format!(
                            "dcp: {name}: chunk ({region}) of {} needs {want} bytes, the buffer has {len}",
                            d.name()
                        )));
                    }
                    let whole =
                        region.offsets.iter().all(|&o| o == 0) && region.sizes[..] == shape[..];
                    (WriteIndex::Chunk(region), Some(d), whole)
                }
                None => (WriteIndex::Bytes, None, true),
            };
            plan.items.push(WriteItem {
                name: name.as_str().into(),
                index: index.clone(),
                dtype,
                shape: if dtype.is_some() {
                    shape.into()
                } else {
                    [].into()
                },
                nbytes: len,
                replicated: false,
                digest: None,
            });
            out.push(WriteRecord {
                name,
                index,
                dtype,
                whole,
                data,
            });
        }
        let inner = self.inner.clone();
        let written: RankWrite = py
            .detach(move || runtime().block_on(inner.write_rank(rank, &save_id, out)))
            .map_err(to_py)?;
        let blob = postcard::to_allocvec(&(plan, written))
            .map_err(|e| PyValueError::new_err(format!("dcp: encoding a write result: {e}")))?;
        Ok(PyBytes::new(py, &blob))
    }

    /// On the coordinator, after every rank wrote: assemble the metadata
    /// from every rank's result (`results[r]`: rank `r`'s, `None` for a rank
    /// that wrote nothing), with `declared` tensors (name, dtype, shape)
    /// recorded even without data, and commit it (compare-and-swap of
    /// `.metadata`), remove dead files, release the lease. Returns the names
    /// of the files removed.
    fn commit(
        &self,
        py: Python<'_>,
        save_id: String,
        generation: u64,
        results: Vec<Option<Vec<u8>>>,
        declared: Vec<(String, String, Vec<u64>)>,
        user: BTreeMap<String, String>,
    ) -> PyResult<Vec<String>> {
        let mut plans = Vec::with_capacity(results.len());
        let mut writes = Vec::with_capacity(results.len());
        for (rank, r) in results.iter().enumerate() {
            match r {
                Some(b) => {
                    let (p, w): (SavePlan, RankWrite) = postcard::from_bytes(b).map_err(|e| {
                        PyValueError::new_err(format!(
                            "dcp: the write result of rank {rank} does not decode: {e}"
                        ))
                    })?;
                    plans.push(p);
                    writes.push(w);
                }
                None => {
                    plans.push(SavePlan::default());
                    writes.push(RankWrite::default());
                }
            }
        }
        if plans.is_empty() {
            plans.push(SavePlan::default());
        }
        for (name, dtype, shape) in declared {
            let dtype = parse_dtype(&dtype)?;
            plans[0].declared.push(TensorDecl { name, dtype, shape });
        }
        let format = self.inner.format();
        let md = assemble_metadata(&save_id, generation, &plans, writes, format, &user)
            .map_err(to_py)?;
        let inner = self.inner.clone();
        let result = py.detach(move || {
            runtime().block_on(async move {
                let encoded = md.encode()?;
                inner
                    .commit(&md, &encoded)
                    .await
                    .map_err(|e| e.context("commit"))?;
                Ok::<_, dcp::Error>(inner.cleanup(&md).await.unwrap_or_default())
            })
        });
        self.end_active();
        result.map_err(to_py)
    }

    /// Release the lease `begin` took, if this writer still holds it (a
    /// save that failed before its commit). Idempotent.
    fn end(&self, py: Python<'_>) {
        py.detach(|| self.end_active());
    }
}

/// torch.distributed as a dcp [`Collective`], so that dcp's shared reads
/// run unchanged over the process group of a torch load.
///
/// `exchange` is a Python object (`dcp.torch`'s `_Exchange`) with
/// `buffer(n)`, which returns a writable C-contiguous `uint8` numpy array of
/// `n` bytes, and `all_to_all(buffer, splits)`, which sends
/// `buffer[sum(splits[:j]):][:splits[j]]` to rank `j` of the group and
/// returns `(received, recv_splits)`: a `uint8` numpy array holding every
/// rank's message in rank order and their lengths. Every operation is one
/// such call: [`Collective::all_to_all`] and its framed
/// [`Collective::all_to_all_v`] are native, the rest are the trait's
/// defaults on top.
///
/// GIL: the load runs with the GIL released; each operation takes it on a
/// blocking thread of the runtime (never an executor thread) for the Python
/// call, and torch's collectives release it while they wait. A collective
/// that fails in Python (a peer gone, torch's timeout) is an
/// [`ErrorKind::Collective`] error with Python's message.
struct TorchCollective {
    exchange: Arc<Py<PyAny>>,
    rank: usize,
    world: usize,
}

/// A failure of the Python side of an exchange, as a dcp error.
fn exchange_error(rank: usize, what: impl std::fmt::Display) -> dcp::Error {
    dcp::Error::new(
        ErrorKind::Collective,
        format!("exchanging bytes over the torch.distributed process group: {what}"),
    )
    .with_rank(rank)
}

impl TorchCollective {
    /// One all-to-all of `send[j]` (several buffers, sent as one message)
    /// to each rank `j`; returns each rank's message. With `framed`, each
    /// message is `[count][len, bytes]...` (little-endian u64s) so the
    /// receiver can split it (`dcp::collective::unframe`).
    async fn exchange(&self, send: Vec<Vec<Bytes>>, framed: bool) -> dcp::Result<Vec<Bytes>> {
        if send.len() != self.world {
            return Err(dcp::Error::invalid(format!(
                "all_to_all needs {} messages, got {}",
                self.world,
                send.len()
            )));
        }
        let exchange = self.exchange.clone();
        let (rank, world) = (self.rank, self.world);
        tokio::task::spawn_blocking(move || {
            Python::attach(|py| exchange_blocking(py, &exchange, rank, world, send, framed))
        })
        .await
        .map_err(|e| exchange_error(rank, format!("the exchange thread failed: {e}")))?
    }
}

/// The body of [`TorchCollective::exchange`], with the GIL held.
fn exchange_blocking(
    py: Python<'_>,
    exchange: &Py<PyAny>,
    rank: usize,
    world: usize,
    send: Vec<Vec<Bytes>>,
    framed: bool,
) -> dcp::Result<Vec<Bytes>> {
    let err = |e: PyErr| exchange_error(rank, e);
    let splits: Vec<usize> = send
        .iter()
        .map(|bufs| {
            let data: usize = bufs.iter().map(Bytes::len).sum();
            if framed {
                8 + 8 * bufs.len() + data
            } else {
                data
            }
        })
        .collect();
    let total: usize = splits.iter().sum();
    let ex = exchange.bind(py);
    let buf = ex.call_method1("buffer", (total,)).map_err(err)?;
    {
        let mut dest = DestBuffer(ArrayMemory::new(&buf, true).map_err(err)?);
        let out = dest.as_mut_bytes();
        if out.len() != total {
            return Err(exchange_error(
                rank,
                format!("buffer({total}) returned {} bytes", out.len()),
            ));
        }
        let mut at = 0;
        let mut put = |b: &[u8]| {
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        for bufs in &send {
            if framed {
                put(&(bufs.len() as u64).to_le_bytes());
            }
            for b in bufs {
                if framed {
                    put(&(b.len() as u64).to_le_bytes());
                }
                put(b);
            }
        }
    }
    drop(send);
    let (recv, recv_splits): (Bound<'_, PyAny>, Vec<usize>) = ex
        .call_method1("all_to_all", (buf, splits))
        .and_then(|r| r.extract())
        .map_err(err)?;
    let recv = Bytes::from_owner(SourceBuffer(ArrayMemory::new(&recv, false).map_err(err)?));
    if recv_splits.len() != world || recv_splits.iter().sum::<usize>() != recv.len() {
        return Err(exchange_error(
            rank,
            format!(
                "all_to_all returned {} bytes split as {recv_splits:?} for {world} ranks",
                recv.len()
            ),
        ));
    }
    let mut at = 0;
    Ok(recv_splits
        .into_iter()
        .map(|len| {
            at += len;
            recv.slice(at - len..at)
        })
        .collect())
}

#[async_trait::async_trait]
impl Collective for TorchCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    async fn all_to_all(&self, send: Vec<Bytes>) -> dcp::Result<Vec<Bytes>> {
        self.exchange(send.into_iter().map(|b| vec![b]).collect(), false)
            .await
    }

    async fn all_to_all_v(&self, send: Vec<Vec<Bytes>>) -> dcp::Result<Vec<Vec<Bytes>>> {
        let recv = self.exchange(send, true).await?;
        recv.into_iter()
            .enumerate()
            .map(|(from, m)| {
                dcp::collective::unframe(m)
                    .map_err(|e| e.context(format!("message from rank {from}")))
            })
            .collect()
    }
}

/// The storage side of a load (`dcp._dcp.Reader`).
#[pyclass(module = "dcp._dcp", frozen)]
struct Reader {
    inner: Arc<FileSystemReader>,
    location: String,
    metadata: Mutex<Option<Arc<Metadata>>>,
    /// What the last `read` read from storage.
    stats: Mutex<ReadStats>,
}

/// One tensor destination `read` takes: item name, the box in global
/// coordinates (offsets, sizes), and writable memory of the saved dtype.
type PyDest<'py> = (String, Vec<u64>, Vec<u64>, Bound<'py, PyAny>);

#[pymethods]
impl Reader {
    #[new]
    #[pyo3(signature = (location, storage_options=None, *, thread_count=1, verify_checksums=true))]
    fn new(
        location: String,
        storage_options: Option<HashMap<String, String>>,
        thread_count: usize,
        verify_checksums: bool,
    ) -> PyResult<Self> {
        let options = ReaderOptions::default()
            .thread_count(thread_count.max(1))
            .verify_checksums(verify_checksums);
        let inner = dcp::reader_with(&location, &py_storage_options(storage_options), options)
            .map_err(to_py)?;
        Ok(Reader {
            inner: Arc::new(inner),
            location,
            metadata: Mutex::new(None),
            stats: Mutex::new(ReadStats::default()),
        })
    }

    /// The location, as given.
    #[getter]
    fn location(&self) -> &str {
        &self.location
    }

    /// Read and validate `.metadata`, keep it for `read`, and return it as
    /// a dict: `save_id`, `generation`, `world_size`, `format`, `user`, and
    /// `items`: `(name, "tensor", dtype, shape, [(offsets, sizes), ...])` or
    /// `(name, "bytes", length, None, None)`.
    fn read_metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = self.inner.clone();
        let md = py
            .detach(move || {
                runtime().block_on(async move {
                    let b = inner.read_metadata().await?;
                    Metadata::decode(&b)
                })
            })
            .map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("save_id", &md.save_id)?;
        d.set_item("generation", md.generation)?;
        d.set_item("world_size", md.world_size)?;
        d.set_item("format", md.format.name())?;
        d.set_item("user", md.user.clone())?;
        let items = PyList::empty(py);
        for (name, item) in &md.items {
            match item {
                ItemMeta::Tensor {
                    dtype,
                    shape,
                    chunks,
                } => {
                    let cs: Vec<(Vec<u64>, Vec<u64>)> = chunks
                        .iter()
                        .map(|c| (c.region.offsets.to_vec(), c.region.sizes.to_vec()))
                        .collect();
                    items.append((name, "tensor", dtype.name(), shape.to_vec(), cs))?;
                }
                ItemMeta::Bytes { length, .. } => {
                    items.append((name, "bytes", *length, py.None(), py.None()))?;
                }
            }
        }
        d.set_item("items", items)?;
        *self.metadata.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(md));
        Ok(d)
    }

    /// Fill `tensors` (each a box of a saved tensor, in global coordinates,
    /// with writable memory of its saved dtype) and return the bytes of
    /// `byte_items`, from the checkpoint `read_metadata` read: dcp's load
    /// pipeline reads only what they need, coalesced, straight into the
    /// memory, checksums verified, with the GIL released. Refuses
    /// destinations whose memory overlaps.
    ///
    /// With `exchange` (see `TorchCollective`) and `world_size` above 1,
    /// every rank of the group calls `read` together and the ranks share
    /// reads: each saved record several ranks need is read (whole, its
    /// checksum verified) by one of them, which sends the others their
    /// slices, so a resharded load reads each record about once in total.
    /// The outcome is agreed: a rank that fails makes every rank fail with
    /// its error. `failure` is a rank that failed before it could call
    /// `read` properly (its message): it still takes part, so the others
    /// fail at once instead of waiting for it; it raises `RuntimeError`.
    #[pyo3(signature = (tensors, byte_items, *, exchange=None, rank=0, world_size=1, failure=None))]
    #[allow(clippy::too_many_arguments)]
    fn read<'py>(
        &self,
        py: Python<'py>,
        tensors: Vec<PyDest<'py>>,
        byte_items: Vec<String>,
        exchange: Option<Py<PyAny>>,
        rank: usize,
        world_size: usize,
        failure: Option<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = ReadStats::default();
        let md = self
            .metadata
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("dcp: read before read_metadata"))?;
        let group = match exchange {
            Some(ex) if world_size > 1 => {
                if rank >= world_size {
                    return Err(PyValueError::new_err(format!(
                        "dcp: rank {rank} is outside a group of {world_size}"
                    )));
                }
                Some(TorchCollective {
                    exchange: Arc::new(ex),
                    rank,
                    world: world_size,
                })
            }
            _ => None,
        };
        // This rank's own failure: raised here once every rank knows of it.
        let mut local: Option<PyErr> = None;
        let dest = match (&failure, self.build_dest(&md, tensors, &byte_items)) {
            (Some(msg), _) => {
                local = Some(pyo3::exceptions::PyRuntimeError::new_err(format!(
                    "dcp: rank {rank} failed before reading: {msg}"
                )));
                Err(dcp::Error::new(
                    ErrorKind::RankFailed,
                    format!("rank {rank} failed before reading: {msg}"),
                )
                .with_rank(rank))
            }
            (None, Ok(d)) => Ok(d),
            (None, Err(e)) => {
                let msg = e.to_string();
                local = Some(e);
                Err(
                    dcp::Error::new(ErrorKind::RankFailed, format!("rank {rank}: {msg}"))
                        .with_rank(rank),
                )
            }
        };
        if group.is_none() {
            if let Some(e) = local {
                return Err(e);
            }
        }
        let inner = self.inner.clone();
        let loaded = py.detach(move || {
            runtime().block_on(async move {
                let options = LoadOptions::default();
                match &group {
                    Some(g) => dcp::load_from(md, dest, inner.as_ref(), g, &options).await,
                    None => dcp::load_from(md, dest, inner.as_ref(), &Single, &options).await,
                }
            })
        });
        if let Some(e) = local {
            return Err(e);
        }
        let loaded = loaded.map_err(to_py)?;
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = loaded.stats;
        let out = PyDict::new(py);
        for name in &byte_items {
            if let Some(b) = loaded.state_dict.bytes(name) {
                out.set_item(name, PyBytes::new(py, b))?;
            }
        }
        Ok(out)
    }

    /// What the last `read` on this rank read from storage, as a dict:
    /// `bytes_read` (bytes requested from storage, whole records where
    /// their checksums are checked; `.metadata` not counted), `requests`,
    /// `records`. Zeros before the first read and after a failed one.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = *self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let d = PyDict::new(py);
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("requests", s.requests)?;
        d.set_item("records", s.records)?;
        Ok(d)
    }
}

impl Reader {
    /// The destination `read` fills: refuses memory that is not writable,
    /// destinations sharing memory, and names that are not tensors of the
    /// checkpoint.
    fn build_dest(
        &self,
        md: &Metadata,
        tensors: Vec<PyDest<'_>>,
        byte_items: &[String],
    ) -> PyResult<DestStateDict> {
        let mut by_name: BTreeMap<String, Vec<DestChunk>> = BTreeMap::new();
        let mut ranges = Vec::with_capacity(tensors.len());
        for (name, offsets, sizes, obj) in tensors {
            let buf = DestBuffer(ArrayMemory::new(&obj, true)?);
            let (start, end) = buf.0.range();
            if end > start {
                ranges.push((start, end, name.clone()));
            }
            let region = ChunkBox::new(offsets, sizes).map_err(to_py)?;
            by_name
                .entry(name)
                .or_default()
                .push(DestChunk::provided(region, buf));
        }
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(PyValueError::new_err(format!(
                    "dcp: destinations of {} and {} share memory",
                    w[0].2, w[1].2
                )));
            }
        }
        let mut dest = DestStateDict::new();
        for (name, chunks) in by_name {
            let (dtype, shape) = match md.item(&name) {
                Some(ItemMeta::Tensor { dtype, shape, .. }) => (*dtype, shape.to_vec()),
                Some(_) => {
                    return Err(PyValueError::new_err(format!(
                        "dcp: {name} is a bytes item in {}, not a tensor",
                        self.location
                    )))
                }
                None => {
                    return Err(PyFileNotFoundError::new_err(format!(
                        "dcp: {name} is not in the checkpoint at {}",
                        self.location
                    )))
                }
            };
            dest.insert_tensor(name, dtype, shape, chunks)
                .map_err(to_py)?;
        }
        for name in byte_items {
            dest.want_bytes(name.clone()).map_err(to_py)?;
        }
        Ok(dest)
    }
}

/// Whether this build opens `location` (torch's `validate_checkpoint_id`):
/// it parses and its backend is compiled in. Touches no storage.
#[pyfunction]
fn validate_checkpoint_id(location: &str) -> bool {
    dcp::validate_checkpoint_id(location)
}

/// The module: `dcp._dcp`.
#[pymodule]
fn _dcp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Writer>()?;
    m.add_class::<Reader>()?;
    m.add_function(wrap_pyfunction!(validate_checkpoint_id, m)?)?;
    Ok(())
}
