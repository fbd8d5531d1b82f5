"""``torch.distributed.checkpoint`` storage plug-ins whose bytes move in dcp.

Drop-in for torch's classes of the same names::

    import torch.distributed.checkpoint as tdcp
    import dcp.torch

    tdcp.save(state_dict, storage_writer=dcp.torch.FsspecWriter("s3://bucket/ckpt"))
    tdcp.load(state_dict, storage_reader=dcp.torch.FsspecReader("s3://bucket/ckpt"))

torch's planners and process groups do what they always do (which rank
writes what, resharding on load, collectives); these classes only store:
``write_data`` hands each CPU tensor's memory to dcp's Rust core without a
copy (CUDA tensors are staged through dcp's stager: copied to pinned host
memory piece by piece, overlapping the writes), ``read_data`` reads
straight into the destination tensors where their memory allows, and the
GIL is released while the I/O runs. What they write is a dcp checkpoint:
dcp's ``.metadata`` and data files, CRC-32C on every record, committed
atomically; the ``dcp`` command and the Rust library load it, and what they
write loads here (the reader presents dcp's metadata to torch as torch's
``Metadata``). Under a process group, a resharded load reads each saved
record once across the ranks: the rank needing most of it reads it (its
checksum verified) and sends the others their slices over the group
(dcp's shared reads; ``FsspecReader(share_reads=False)`` turns it off).

Like torch's own writers and readers, these require that the tensors of a
state dict being saved or loaded are not modified by another thread until
the call returns.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import _dcp

__all__ = ["FsspecWriter", "FsspecReader", "FileSystemWriter", "FileSystemReader"]

_DCP_DTYPE: Dict[torch.dtype, str] = {
    torch.bool: "bool",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint16: "u16",
    torch.uint32: "u32",
    torch.uint64: "u64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float8_e4m3fn: "f8_e4m3",
    torch.float8_e5m2: "f8_e5m2",
}
_TORCH_DTYPE: Dict[str, torch.dtype] = {v: k for k, v in _DCP_DTYPE.items()}

# Where dcp's metadata keeps torch's planner data (JSON).
_PLANNER_DATA_KEY = "torch.planner_data"

PathLike = Union[str, "os.PathLike[str]"]


def _dcp_dtype(dtype: torch.dtype, name: str) -> str:
    try:
        return _DCP_DTYPE[dtype]
    except KeyError:
        raise ValueError(f"dcp: {name}: dtype {dtype} is not supported by dcp") from None


def _storage_options(options: Dict[str, Any]) -> Dict[str, str]:
    """``storage_options`` as the strings dcp takes: a dict value (s3fs's
    ``client_kwargs={"endpoint_url": ...}``) as a JSON object, a bool as
    ``true``/``false``, anything else as ``str(v)``. dcp's store (in Rust)
    reads ``client_kwargs`` for every store: it refuses a key it does not
    map and one that contradicts the same key given directly."""
    out = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = json.dumps(v)
        elif isinstance(v, bool):
            out[k] = "true" if v else "false"
        else:
            out[k] = str(v)
    return out


def _location(path: PathLike) -> str:
    return os.fspath(path)


def _is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


class _StagedPiece:
    """A copy :meth:`_DeviceSource.stage` started: ``wait()`` returns the
    host bytes as a numpy array once the copy is complete."""

    __slots__ = ("_host", "_event")

    def __init__(self, host: torch.Tensor, event: Any) -> None:
        self._host = host
        self._event = event

    def wait(self) -> Any:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class _DeviceSource:
    """A tensor dcp cannot read in place (a CUDA tensor), as the source
    dcp's save pipeline stages (``dcp._dcp.Writer.write`` takes it where it
    takes a numpy array): dcp asks for pieces of at most
    ``per_thread_copy_ahead`` bytes on the copy lane of the writer thread
    that will write them, a few ahead of the writes, and writes each as soon
    as its copy completes, so device-to-host copies overlap the writes and
    at most that many bytes per writer thread are in host memory.

    On CUDA each lane is a CUDA stream of the tensor's device (waiting for
    the stream that produced the tensor), each piece is copied into a
    page-locked buffer (torch's caching host allocator reuses them) and an
    event recorded after it marks it ready. Other devices copy each piece
    synchronously (``.cpu()``)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._flat = t.reshape(-1).view(torch.uint8)
        self.nbytes = int(self._flat.numel())
        self._cuda = t.device.type == "cuda"
        self._streams: Dict[int, Any] = {}
        self._producer = torch.cuda.current_stream(t.device) if self._cuda else None

    def _stream(self, lane: int) -> Any:
        st = self._streams.get(lane)
        if st is None:
            st = torch.cuda.Stream(device=self._flat.device)
            st.wait_stream(self._producer)
            self._streams[lane] = st
        return st

    def stage(self, lane: int, offset: int, length: int) -> _StagedPiece:
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise ValueError(
                f"dcp: staging range {offset}+{length} is past the tensor's {self.nbytes} bytes"
            )
        piece = self._flat[offset : offset + length]
        if not self._cuda:
            return _StagedPiece(piece.cpu().clone(), None)
        stream = self._stream(lane)
        host = torch.empty(length, dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(piece, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return _StagedPiece(host, event)


def _staged(t: torch.Tensor) -> bool:
    """Whether ``write_data`` stages ``t`` through dcp's stager rather than
    reading its memory in place: every tensor not in CPU memory."""
    return t.device.type != "cpu"


def _memory(t: torch.Tensor) -> Any:
    """The bytes of a contiguous CPU tensor as a numpy uint8 array sharing
    its memory (numpy has no bfloat16 or float8: viewing as uint8 avoids
    them)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _span(t: torch.Tensor) -> Tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _options(
    extensions: Optional[Sequence[Any]], serialization_format: Any
) -> Tuple[Optional[str], Optional[str], str]:
    """dcp's compression, checksum and format for torch's ``_extensions``
    (torch's ``ZStandard``, or names: ``"zstd"``, ``"lz4"``, ``"crc32c"``,
    ``"crc32"``, ``"nochecksum"``) and ``serialization_format`` (torch's
    ``SerializationFormat`` or ``"raw"``/``"safetensors"``)."""
    compression: Optional[str] = None
    checksum: Optional[str] = "crc32c"
    for ext in extensions or ():
        name = ext if isinstance(ext, str) else type(ext).__name__
        low = name.lower()
        if low in ("zstandard", "zstd"):
            compression = "zstd"
        elif low == "lz4":
            compression = "lz4"
        elif low in ("crc32c", "crc32"):
            checksum = low
        elif low == "nochecksum":
            checksum = None
        else:
            raise ValueError(f"dcp: unknown extension {name!r}")
    fmt = "raw"
    if serialization_format is not None:
        value = getattr(serialization_format, "value", serialization_format)
        if str(value).lower() == "safetensors":
            fmt = "safetensors"
        elif str(value).lower() not in ("torch_save", "raw"):
            raise ValueError(f"dcp: unknown serialization format {serialization_format!r}")
    return compression, checksum, fmt


@dataclasses.dataclass(frozen=True)
class _SaveTicket:
    """``SavePlan.storage_data`` of a save: the id the coordinator's lease
    was taken for, and the plan's rank."""

    save_id: str
    rank: int


@dataclasses.dataclass(frozen=True)
class _RankResult:
    """``WriteResult.storage_data``: the rank, and (on its first result
    only) dcp's opaque account of what the rank wrote."""

    rank: int
    blob: Optional[bytes]


@dataclasses.dataclass(frozen=True)
class _LoadTicket:
    """``LoadPlan.storage_data`` of a load: the plan's rank among the
    coordinator's plans, their number, and whether the ranks share reads.
    The coordinator's reader decides for every rank, so all agree on
    whether ``read_data`` runs collectives."""

    rank: int
    world: int
    share_reads: bool


def _exchange_device(group: Any) -> torch.device:
    """The device whose tensors ``group``'s collectives take: CPU for gloo
    (or a group with a CPU backend), the current CUDA device for NCCL
    alone (torch's own rule for object collectives)."""
    try:
        kind = dist.distributed_c10d._get_object_coll_device(group)
    except Exception:
        return torch.device("cpu")
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


class _Exchange:
    """A torch.distributed process group as the byte transport of dcp's
    shared reads (``dcp._dcp.Reader.read(exchange=...)``): dcp's Rust core
    copies each rank's messages into ``buffer(n)`` and calls ``all_to_all``,
    one ``all_to_all_single`` of the message lengths and one of the bytes
    (gloo and NCCL both have it). A collective that fails (a peer gone, the
    group's timeout) raises, and dcp fails the load with its message."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.device = _exchange_device(group)

    def buffer(self, n: int) -> Any:
        return torch.empty(n, dtype=torch.uint8).numpy()

    def all_to_all(self, send: Any, splits: List[int]) -> Tuple[Any, List[int]]:
        # Every rank learns every rank's lengths, so all agree on skipping
        # the byte exchange when nothing moves at all.
        counts = torch.tensor(splits, dtype=torch.int64, device=self.device)
        every = [torch.empty_like(counts) for _ in range(len(splits))]
        dist.all_gather(every, counts, group=self.group)
        me = dist.get_rank(self.group)
        rs = [int(c[me]) for c in every]
        out = torch.empty(sum(rs), dtype=torch.uint8, device=self.device)
        if all(int(c.sum()) == 0 for c in every):
            return out.cpu().numpy(), rs
        dist.all_to_all_single(
            out,
            torch.from_numpy(send).to(self.device),
            output_split_sizes=rs,
            input_split_sizes=[int(x) for x in splits],
            group=self.group,
        )
        return out.cpu().numpy(), rs


class FsspecWriter(StorageWriter):
    """torch's ``FsspecWriter``, same arguments and meanings, storing a dcp
    checkpoint at ``path`` (a local path, ``file://``, ``memory://``, or an
    object store URL such as ``s3://bucket/prefix`` where the build has it).

    ``thread_count`` writer threads per rank, ``sync_files`` fsyncs before
    the commit, ``per_thread_copy_ahead`` bounds staged bytes per thread,
    ``overwrite=False`` refuses an existing checkpoint (``FileExistsError``).
    ``_extensions``: torch's ``ZStandard`` (or ``"zstd"``, ``"lz4"``;
    ``"crc32"``/``"nochecksum"`` change the default CRC-32C).
    ``serialization_format``: ``SerializationFormat.SAFETENSORS`` makes
    every data file a safetensors file; otherwise dcp's raw records (tensors
    are never pickled). ``storage_options`` go to the store (see dcp's
    README; for S3 s3fs's ``endpoint_url``, ``key``, ``secret``,
    ``region_name``, and ``client_kwargs={"endpoint_url": ...}``). ``single_file_per_rank`` is accepted for compatibility: dcp
    always writes ``thread_count`` files per rank.
    """

    def __init__(
        self,
        path: PathLike,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        _extensions: Optional[Sequence[Any]] = None,
        serialization_format: Any = None,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        self.path = _location(path)
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.overwrite = overwrite
        self.compression, self.checksum, self.format = _options(
            _extensions, serialization_format
        )
        self.storage_options = _storage_options(storage_options)
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = False
        self.rank: Optional[int] = None
        self._rust: Optional[_dcp.Writer] = None
        self._ticket: Optional[Tuple[str, int]] = None

    def _writer(self) -> _dcp.Writer:
        if self._rust is None:
            self._rust = _dcp.Writer(
                self.path,
                self.storage_options,
                thread_count=self.thread_count,
                sync_files=self.sync_files,
                per_thread_copy_ahead=self.per_thread_copy_ahead,
                overwrite=self.overwrite,
                single_file_per_rank=self.single_file_per_rank,
                compression=self.compression,
                checksum=self.checksum,
                format=self.format,
            )
        return self._rust

    def _release(self) -> None:
        if self._rust is not None:
            self._rust.end()
        self._ticket = None

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        # A save that failed before its commit left its lease: release it.
        self._release()
        if checkpoint_id:
            self.path = _location(checkpoint_id)
            self._rust = None
        self.save_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return _dcp.validate_checkpoint_id(_location(checkpoint_id))

    def storage_meta(self) -> Optional[StorageMeta]:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: List[SavePlan]) -> List[SavePlan]:
        # The coordinator takes the location before any rank writes: refuses
        # an existing checkpoint unless overwriting, takes the lease.
        save_id, generation = self._writer().begin()
        self._ticket = (save_id, generation)
        return [
            dataclasses.replace(p, storage_data=_SaveTicket(save_id, rank))
            for rank, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[List[WriteResult]]:
        ticket = plan.storage_data
        if not isinstance(ticket, _SaveTicket):
            raise ValueError("dcp: write_data of a plan prepare_global_plan did not assign")
        records = []
        sizes = []
        for item in plan.items:
            data = planner.resolve_data(item)
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
                import numpy as np

                records.append((fqn, None, [], [], [], np.frombuffer(raw, dtype=np.uint8)))
                sizes.append(len(raw))
                continue
            td = item.tensor_data
            assert td is not None
            t = data.detach().contiguous()
            nbytes = t.numel() * t.element_size()
            sizes.append(nbytes)
            if t.numel() == 0:
                continue  # recorded from the metadata, with its dtype and shape
            records.append(
                (
                    fqn,
                    _dcp_dtype(t.dtype, fqn),
                    list(td.size),
                    list(td.chunk.offsets),
                    list(td.chunk.sizes),
                    _DeviceSource(t) if _staged(t) else _memory(t),
                )
            )
        blob = self._writer().write(ticket.rank, ticket.save_id, records)
        results = [
            WriteResult(
                index=item.index,
                size_in_bytes=size,
                storage_data=_RankResult(ticket.rank, blob if i == 0 else None),
            )
            for i, (item, size) in enumerate(zip(plan.items, sizes))
        ]
        fut: Future[List[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: List[List[WriteResult]]) -> None:
        if self._ticket is None:
            raise ValueError("dcp: finish without prepare_global_plan")
        save_id, generation = self._ticket
        blobs: List[Optional[bytes]] = [None] * len(results)
        for rank, rank_results in enumerate(results):
            for r in rank_results:
                sd = r.storage_data
                if isinstance(sd, _RankResult) and sd.blob is not None:
                    blobs[rank] = sd.blob
        declared = [
            (fqn, _dcp_dtype(md.properties.dtype, fqn), list(md.size))
            for fqn, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        ]
        user = {"torch.version": torch.__version__}
        try:
            user[_PLANNER_DATA_KEY] = json.dumps(metadata.planner_data)
        except (TypeError, ValueError):
            pass  # planner data that is not JSON is not kept
        try:
            self._writer().commit(save_id, generation, blobs, declared, user)
        finally:
            self._ticket = None


class FsspecReader(StorageReader):
    """torch's ``FsspecReader``: loads a dcp checkpoint at ``path`` (any
    location ``FsspecWriter`` takes) through torch's planner, every byte read
    by dcp (coalesced, checksums verified, straight into the destination
    tensors where their memory allows). ``storage_options`` go to the store;
    ``thread_count`` (a dcp addition) sets the reader threads per rank.

    Non-tensor values are unpickled with ``torch.load(weights_only=True)``
    before torch's planner sees them, so a checkpoint holding a pickle that
    would run code (or build any object outside torch's allow-list) is
    refused with ``pickle.UnpicklingError`` naming the item; types of your
    own can be allowed with ``torch.serialization.safe_globals([...])``
    around the load. ``weights_only=False`` (a dcp addition) trusts the
    checkpoint, as torch's own readers do.

    ``verify_checksums=False`` (a dcp addition) skips checking each record's
    checksum: a load that needs part of a record (a reshard) then reads only
    that part, where checking it reads the whole record.

    ``share_reads`` (a dcp addition, default on): under a process group, a
    saved record that several ranks need is read by one rank only (whole,
    its checksum verified), which sends every other rank its slices over
    the group, so a resharded load reads the checkpoint about once in total
    rather than once per rank. The group is ``process_group`` when given
    (the one passed to ``dcp.load``), else torch's default group when the
    load spans all of it; a load over another group reads without sharing.
    The ranks agree on the outcome: one that fails makes every rank raise,
    naming it; a rank that dies or stalls fails the others through the
    group's own error or timeout (``init_process_group(timeout=...)``).
    ``read_stats`` holds what this rank's last ``read_data`` read.
    """

    def __init__(
        self,
        path: PathLike,
        thread_count: int = 1,
        weights_only: bool = True,
        verify_checksums: bool = True,
        share_reads: bool = True,
        process_group: Optional[Any] = None,
        **storage_options: Any,
    ) -> None:
        super().__init__()
        self.path = _location(path)
        self.thread_count = thread_count
        self.weights_only = weights_only
        self.verify_checksums = verify_checksums
        self.share_reads = share_reads
        self.process_group = process_group
        self.read_stats: Dict[str, int] = {"bytes_read": 0, "requests": 0, "records": 0}
        self.storage_options = _storage_options(storage_options)
        self.load_id = uuid.uuid4().hex
        self.is_coordinator = False
        self._rust: Optional[_dcp.Reader] = None
        self._dtypes: Dict[str, torch.dtype] = {}

    def _reader(self) -> _dcp.Reader:
        if self._rust is None:
            self._rust = _dcp.Reader(
                self.path,
                self.storage_options,
                thread_count=self.thread_count,
                verify_checksums=self.verify_checksums,
            )
        return self._rust

    def reset(self, checkpoint_id: Optional[PathLike] = None) -> None:
        if checkpoint_id:
            self.path = _location(checkpoint_id)
            self._rust = None
        self.load_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return _dcp.validate_checkpoint_id(_location(checkpoint_id))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        d = self._reader().read_metadata()
        sdm: Dict[str, Any] = {}
        self._dtypes = {}
        for name, kind, a, shape, chunks in d["items"]:  # type: ignore[union-attr]
            if kind == "tensor":
                dtype = _TORCH_DTYPE[a]
                self._dtypes[name] = dtype
                sdm[name] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=dtype),
                    size=torch.Size(shape),
                    chunks=[
                        ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                        for o, s in chunks
                    ],
                )
            else:
                sdm[name] = BytesStorageMetadata()
        planner_data = None
        pd = d["user"].get(_PLANNER_DATA_KEY)  # type: ignore[union-attr]
        if pd is not None:
            raw = json.loads(pd)
            planner_data = (
                {k: tuple(v) for k, v in raw.items()} if isinstance(raw, dict) else raw
            )
        return Metadata(
            state_dict_metadata=sdm,
            planner_data=planner_data,
            storage_data={},
            storage_meta=StorageMeta(
                checkpoint_id=self.path, save_id=str(d["save_id"]), load_id=self.load_id
            ),
        )

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: List[LoadPlan]) -> List[LoadPlan]:
        return [
            dataclasses.replace(
                p, storage_data=_LoadTicket(rank, len(plans), self.share_reads)
            )
            for rank, p in enumerate(plans)
        ]

    def _exchange(self, plan: LoadPlan) -> Optional[Tuple[_Exchange, int, int]]:
        """The group this load's ranks share reads over, with this rank and
        the group's size; None to read alone (one rank, no process group,
        sharing off, or a load over a group other than the default one
        when none was given). Every rank decides alike: from the
        coordinator's ticket and the group's size."""
        t = plan.storage_data
        if not isinstance(t, _LoadTicket) or t.world <= 1 or not t.share_reads:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group
        world = dist.get_world_size(group)
        if world != t.world:
            if group is not None:
                raise ValueError(
                    f"dcp: the reader's process_group has {world} ranks, the load {t.world}: "
                    "pass the group given to dcp.load"
                )
            return None  # a load over a subgroup dcp was not given
        rank = dist.get_rank(group)
        if rank != t.rank:
            raise ValueError(
                f"dcp: this rank is rank {rank} of the reader's process group but "
                f"rank {t.rank} of the load: pass the group given to dcp.load"
            )
        return _Exchange(group), rank, world

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self.read_stats = {"bytes_read": 0, "requests": 0, "records": 0}
        shared = self._exchange(plan)
        share_kw: Dict[str, Any] = {}
        if shared is not None:
            share_kw = {"exchange": shared[0], "rank": shared[1], "world_size": shared[2]}
        try:
            tensors, names, pending, direct, buffers, byte_reqs = self._prepare(plan, planner)
        except Exception as e:
            if shared is not None:
                # Every other rank is about to exchange with this one: take
                # part with the failure, so they fail now rather than wait.
                try:
                    self._reader().read([], [], failure=f"{type(e).__name__}: {e}", **share_kw)
                except Exception:
                    pass
            raise
        reader = self._reader()
        got = reader.read(tensors, names, **share_kw)
        self.read_stats = reader.stats()
        for (req, target, _, _, _), d, buf in zip(pending, direct, buffers):
            if buf is not None and not d:
                target.copy_(buf)
            planner.commit_tensor(req, target)
        checked: Dict[str, bytes] = {}
        for req in byte_reqs:
            fqn = req.storage_index.fqn
            raw = got[fqn]
            if self.weights_only and fqn not in checked:
                # torch's planners unpickle with weights_only=False: the bytes
                # reach them only once the restricted unpickler took them (the
                # same bytes unpickle to the same allow-listed objects).
                try:
                    torch.load(io.BytesIO(raw), weights_only=True)
                except pickle.UnpicklingError as e:
                    raise pickle.UnpicklingError(
                        f"dcp: {fqn} in {self.path} is not loadable with weights_only=True "
                        f"(pass weights_only=False to the reader only for a trusted "
                        f"checkpoint): {e}"
                    ) from None
                checked[fqn] = raw
            planner.load_bytes(req, io.BytesIO(raw))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _prepare(self, plan: LoadPlan, planner: LoadPlanner) -> Tuple[Any, ...]:
        """What ``read_data`` hands to dcp: the destinations (memory of the
        targets, or of buffers copied into them after), the bytes items,
        and what it needs to commit them to the planner."""
        byte_reqs = []
        pending = []  # (request, target, saved dtype, global offsets, sizes)
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                byte_reqs.append(req)
                continue
            fqn = req.storage_index.fqn
            if fqn not in self._dtypes:
                raise FileNotFoundError(f"dcp: {fqn} is not a tensor of the checkpoint at {self.path}")
            saved = req.storage_index.offset
            assert saved is not None
            offsets = [int(a) + int(b) for a, b in zip(saved, req.storage_offsets)]
            target = planner.resolve_tensor(req).detach()
            pending.append((req, target, self._dtypes[fqn], offsets, list(req.lengths)))

        # Read straight into a target where its memory allows: CPU,
        # contiguous, the saved dtype, and no memory shared with another
        # target (tied weights); otherwise into a buffer, copied after.
        direct = [
            t.device.type == "cpu" and t.is_contiguous() and t.dtype == dt and t.numel() > 0
            for _, t, dt, _, _ in pending
        ]
        spans = sorted(
            (_span(pending[i][1]) + (i,)) for i in range(len(pending)) if direct[i]
        )
        for (s0, e0, i), (s1, e1, j) in zip(spans, spans[1:]):
            if s1 < e0:
                direct[i] = direct[j] = False
        tensors = []
        buffers: List[Optional[torch.Tensor]] = []
        for (req, target, dtype, offsets, lengths), d in zip(pending, direct):
            if target.numel() == 0:
                buffers.append(None)
                continue
            buf = target if d else torch.empty(lengths, dtype=dtype)
            buffers.append(buf)
            tensors.append((req.storage_index.fqn, offsets, lengths, _memory(buf)))
        names = sorted({r.storage_index.fqn for r in byte_reqs})
        return tensors, names, pending, direct, buffers, byte_reqs


class FileSystemWriter(FsspecWriter):
    """torch's ``FileSystemWriter`` (a local directory), storing a dcp
    checkpoint; arguments as :class:`FsspecWriter`, without storage
    options."""

    def __init__(
        self,
        path: PathLike,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        _extensions: Optional[Sequence[Any]] = None,
        serialization_format: Any = None,
    ) -> None:
        if not _is_local(_location(path)):
            raise ValueError(f"dcp: FileSystemWriter takes a local path, not {path!r}")
        super().__init__(
            path,
            single_file_per_rank=single_file_per_rank,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            overwrite=overwrite,
            _extensions=_extensions,
            serialization_format=serialization_format,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        loc = _location(checkpoint_id)
        return _is_local(loc) and _dcp.validate_checkpoint_id(loc)


class FileSystemReader(FsspecReader):
    """torch's ``FileSystemReader`` (a local directory), loading a dcp
    checkpoint; ``thread_count``, ``weights_only``, ``verify_checksums``,
    ``share_reads`` and ``process_group`` as :class:`FsspecReader`."""

    def __init__(
        self,
        path: PathLike,
        thread_count: int = 1,
        weights_only: bool = True,
        verify_checksums: bool = True,
        share_reads: bool = True,
        process_group: Optional[Any] = None,
    ) -> None:
        if not _is_local(_location(path)):
            raise ValueError(f"dcp: FileSystemReader takes a local path, not {path!r}")
        super().__init__(
            path,
            thread_count=thread_count,
            weights_only=weights_only,
            verify_checksums=verify_checksums,
            share_reads=share_reads,
            process_group=process_group,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        loc = _location(checkpoint_id)
        return _is_local(loc) and _dcp.validate_checkpoint_id(loc)
