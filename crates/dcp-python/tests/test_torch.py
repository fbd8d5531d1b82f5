"""dcp.torch under torch.distributed.checkpoint: multi-rank saves and
resharded loads (gloo, spawned processes), refusals, corruption, and
interchange with the Rust side."""

import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as tdcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException

import dcp
import dcp.torch
from conftest import free_port

import _workers

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def spawn(fn, world, *args):
    mp.spawn(fn, args=(world, free_port()) + args, nprocs=world, join=True)


def failure(exc: CheckpointException) -> BaseException:
    """The one rank's exception a single-process CheckpointException holds."""
    (f,) = exc.failures.values()
    return f[0] if isinstance(f, tuple) else f


@pytest.fixture(scope="module")
def saved_4_ranks(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt4"))
    spawn(_workers.save_worker, 4, path, {"thread_count": 2})
    return path


@pytest.mark.parametrize("world", [3, 5])
def test_dtensor_save_4_load_resharded(saved_4_ranks, world):
    # 4 ranks saved rows, columns, a 2-D mesh, replicated and uneven shards,
    # optimizer state and non-tensor values; `world` ranks load them into
    # other placements, and every rank compares the full tensors bit for bit.
    spawn(_workers.load_worker, world, saved_4_ranks)


def test_saved_checkpoint_is_dcp(saved_4_ranks, dcp_cli):
    names = sorted(os.listdir(saved_4_ranks))
    assert ".metadata" in names
    data = [n for n in names if n.endswith(".dcp")]
    # Data files are __{rank}_{n}-{save_id}.dcp: every rank wrote its own.
    assert {n[2:].split("_")[0] for n in data} == {"0", "1", "2", "3"}, data
    out = subprocess.run([dcp_cli, "verify", saved_4_ranks], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    md = dcp.Reader(saved_4_ranks).read_metadata()
    assert md["world_size"] == 4
    items = {i[0]: i for i in md["items"]}
    assert items["model.row"][1:4] == ("tensor", "f32", [10, 6])
    assert items["model.col"][2] == "bf16"
    # Replicated tensors are written once, not once per rank.
    assert len(items["model.rep"][4]) == 1
    assert items["optim.step"][1] == "bytes"


def _single_save(path, sd, **kw):
    tdcp.save(sd, storage_writer=dcp.torch.FileSystemWriter(path, **kw))


def test_overwrite_false_refused(tmp_path):
    path = str(tmp_path / "c")
    _single_save(path, {"w": torch.ones(3)})
    before = (tmp_path / "c" / ".metadata").read_bytes()
    with pytest.raises(CheckpointException) as e:
        _single_save(path, {"w": torch.zeros(3)}, overwrite=False)
    f = failure(e.value)
    assert isinstance(f, FileExistsError), repr(f)
    assert "already exists" in str(f) and path in str(f)
    assert (tmp_path / "c" / ".metadata").read_bytes() == before
    # overwrite=True (the default) replaces it.
    _single_save(path, {"w": torch.zeros(3)})
    got = {"w": torch.ones(3)}
    tdcp.load(got, storage_reader=dcp.torch.FileSystemReader(path))
    assert torch.equal(got["w"], torch.zeros(3))


def test_storage_options_take_s3fs_client_kwargs():
    # A dict value travels as JSON, a bool as "true"/"false".
    opts = dcp.torch._storage_options(
        {"client_kwargs": {"endpoint_url": "http://h:1"}, "anon": True, "dcp_part_size": 8}
    )
    assert opts == {
        "client_kwargs": '{"endpoint_url": "http://h:1"}',
        "anon": "true",
        "dcp_part_size": "8",
    }
    # Through to the store: the nested endpoint is the one dcp talks to (a
    # closed port, reached with no retries), and a key client_kwargs may
    # not hold is refused, naming it.
    port = free_port()
    reader = dcp.torch.FsspecReader(
        "s3://bkt/ckpt",
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"},
        key="k",
        secret="s",
        dcp_max_retries=0,
    )
    with pytest.raises(Exception, match=f"127.0.0.1:{port}"):
        reader.read_metadata()
    with pytest.raises(Exception, match='unknown key "verify" in storage option client_kwargs'):
        dcp.torch.FsspecReader("s3://bkt/ckpt", client_kwargs={"verify": False}).read_metadata()


def test_missing_checkpoint_is_file_not_found(tmp_path):
    reader = dcp.torch.FileSystemReader(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*none"):
        reader.read_metadata()
    # Under dcp.load, torch reports the reader's error inside its own.
    with pytest.raises(CheckpointException) as e:
        tdcp.load({"w": torch.ones(3)}, storage_reader=reader)
    assert "no checkpoint at" in str(failure(e.value)) and "not_found" in str(failure(e.value))


def test_corrupted_record_names_item_and_file(tmp_path):
    path = tmp_path / "c"
    _single_save(str(path), {"victim": torch.arange(1000, dtype=torch.float32), "tiny": torch.ones(1)})
    (data,) = [p for p in path.iterdir() if p.suffix == ".dcp"]
    b = bytearray(data.read_bytes())
    b[len(b) // 2] ^= 0xFF  # inside victim's 4000 bytes
    data.write_bytes(bytes(b))
    dest = {"victim": torch.zeros(1000), "tiny": torch.zeros(1)}
    with pytest.raises(CheckpointException) as e:
        tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(str(path)))
    f = failure(e.value)
    assert isinstance(f, ValueError), repr(f)
    assert "victim" in str(f) and data.name in str(f), str(f)


def test_verify_checksums_off_reads_damage_unchecked(tmp_path):
    path = tmp_path / "c"
    w = torch.arange(1000, dtype=torch.float32)
    _single_save(str(path), {"victim": w})
    (data,) = [p for p in path.iterdir() if p.suffix == ".dcp"]
    b = bytearray(data.read_bytes())
    b[len(b) // 2] ^= 0xFF
    data.write_bytes(bytes(b))
    dest = {"victim": torch.zeros(1000)}
    with pytest.raises(CheckpointException):
        tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(str(path)))
    # Unchecked, the damaged bytes load as they are: one element differs.
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(str(path), verify_checksums=False))
    assert (dest["victim"] != w).sum().item() == 1


def test_plain_tensors_dtypes_and_values_round_trip(tmp_path):
    path = str(tmp_path / "c")
    sd = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).to(torch.float16),
        "i8": torch.tensor([-1, 2, -3], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "obj": {"lr": 0.1, "betas": [0.9, 0.99]},
    }
    _single_save(path, sd, _extensions=["zstd"], thread_count=3)
    dest = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else None) for k, v in sd.items()}
    dest["obj"] = {"lr": 0.0, "betas": [0.0, 0.0]}
    # A destination that is a column slice (not contiguous) is filled too.
    big = torch.zeros(3, 8)
    dest["f32"] = big[:, 2:6]
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert dest[k].dtype == v.dtype, k
            assert torch.equal(dest[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)), k
    assert dest["obj"] == {"lr": 0.1, "betas": [0.9, 0.99]}
    assert torch.equal(big[:, :2], torch.zeros(3, 2))


def test_tied_weights_load(tmp_path):
    path = str(tmp_path / "c")
    w = torch.randn(4, 4)
    _single_save(path, {"embed": w, "head": w})
    shared = torch.zeros(4, 4)
    dest = {"embed": shared, "head": shared}  # the same memory twice
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    assert torch.equal(shared, w)


def test_reads_land_in_the_destination_memory(tmp_path):
    path = str(tmp_path / "c")
    w = torch.randn(64, 32)
    _single_save(path, {"w": w})
    dest = torch.zeros(64, 32)
    ptr = dest.data_ptr()
    tdcp.load({"w": dest}, storage_reader=dcp.torch.FileSystemReader(path))
    assert dest.data_ptr() == ptr and torch.equal(dest, w)


def test_native_module_refuses_unsound_memory(tmp_path):
    path = str(tmp_path / "c")
    _single_save(path, {"w": torch.arange(8, dtype=torch.uint8)})
    r = dcp.Reader(path)
    r.read_metadata()
    a = np.zeros(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="share memory"):
        r.read([("w", [0], [4], a[:4]), ("w", [4], [4], a[2:6])], [])
    with pytest.raises(ValueError, match="writable"):
        ro = np.zeros(8, dtype=np.uint8)
        ro.flags.writeable = False
        r.read([("w", [0], [8], ro)], [])
    with pytest.raises(ValueError, match="numpy.ndarray"):
        r.read([("w", [0], [8], bytearray(8))], [])
    with pytest.raises(ValueError, match="C-contiguous"):
        r.read([("w", [0], [4], np.zeros(8, dtype=np.uint8)[::2])], [])
    r.read([("w", [0], [8], a)], [])
    assert a.tolist() == list(range(8))
    w = dcp.Writer(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="needs 8 bytes"):
        w.write(0, "0123456789abcdef", [("w", "u8", [8], [0], [8], np.zeros(4, dtype=np.uint8))])


def test_validate_checkpoint_id_and_storage_meta(tmp_path):
    assert dcp.torch.FileSystemWriter.validate_checkpoint_id(str(tmp_path))
    assert dcp.torch.FsspecWriter.validate_checkpoint_id("memory://x")
    assert not dcp.torch.FileSystemWriter.validate_checkpoint_id("memory://x")
    assert not dcp.torch.FsspecReader.validate_checkpoint_id("nosuch://bucket/x")
    w = dcp.torch.FsspecWriter(str(tmp_path))
    sid = w.storage_meta().save_id
    w.reset(str(tmp_path / "other"))
    assert w.path == str(tmp_path / "other") and w.storage_meta().save_id != sid
    # checkpoint_id= passes through reset().
    tdcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "viaid"), storage_writer=w)
    assert (tmp_path / "viaid" / ".metadata").exists()


def _splitmix64(x):
    with np.errstate(over="ignore"):  # wrapping u64 arithmetic, as in Rust
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _fnv1a(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    return h


def _demo_bf16(seed, name, shape):
    """dcp demo's values (dcp-cli model.rs `element`), as bf16 bits."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed)) ^ np.uint64(_fnv1a(name))
        idx = np.arange(int(np.prod(shape)), dtype=np.uint64)
        h = _splitmix64(key ^ (idx * np.uint64(0xD6E8FEB86659FD93)))
    sign = (h >> np.uint64(63)).astype(np.uint16)
    exp = (np.uint64(118) + ((h >> np.uint64(32)) & np.uint64(7))).astype(np.uint16)
    mant = (h & np.uint64(0x7F)).astype(np.uint16)
    bits = (sign << 15) | (exp << 7) | mant
    return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16).reshape(shape)


def test_dcp_demo_checkpoint_loads_bit_exact(tmp_path, dcp_cli):
    d = tmp_path / "demo"
    out = subprocess.run(
        [dcp_cli, "demo", "--save-only", "--dir", str(d), "--layers", "2", "--hidden", "64", "--vocab", "256"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    md = dcp.Reader(str(d)).read_metadata()
    seed = int(md["user"]["dcp.demo.seed"])
    dest = {}
    for name, kind, dtype, shape, _ in md["items"]:
        if kind == "tensor":
            dest[name] = torch.zeros(shape, dtype=dcp.torch._TORCH_DTYPE[dtype])
    assert "layers.1.mlp.down.weight" in dest
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(str(d)))
    step = int(_splitmix64(np.uint64(seed ^ _fnv1a("optim.step")))) % 1_000_000
    assert dest.pop("optim.step").item() == step
    for name, t in dest.items():
        want = _demo_bf16(seed, name, list(t.shape))
        assert torch.equal(t.view(torch.int16), want.view(torch.int16)), name


def test_async_save(tmp_path):
    path = str(tmp_path / "c")
    sd = {"w": torch.randn(100, 10), "step": 3}
    fut = tdcp.async_save(sd, storage_writer=dcp.torch.FileSystemWriter(path), no_dist=True)
    fut.result()
    dest = {"w": torch.zeros(100, 10), "step": 0}
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    assert torch.equal(dest["w"], sd["w"]) and dest["step"] == 3


def test_failed_save_releases_its_lease(tmp_path):
    path = str(tmp_path / "c")
    w = dcp.torch.FileSystemWriter(path)

    class Boom(Exception):
        pass

    class Unsaveable:
        def __reduce__(self):
            raise Boom("not picklable")

    # The coordinator took the lease in prepare_global_plan; write_data fails,
    # so torch never calls finish.
    with pytest.raises(CheckpointException):
        tdcp.save({"w": torch.ones(2), "bad": Unsaveable()}, storage_writer=w)
    # The same writer saves again (its begin releases the old lease first),
    # and so does a fresh writer once that one is done.
    tdcp.save({"w": torch.ones(2)}, storage_writer=w)
    tdcp.save({"w": torch.full((2,), 5.0)}, storage_writer=dcp.torch.FileSystemWriter(path))
    dest = {"w": torch.zeros(2)}
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    assert torch.equal(dest["w"], torch.full((2,), 5.0))
    assert not (tmp_path / "c" / ".lease").exists()


# --- S3 (moto) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_4_ranks_s3(moto):
    bucket = moto.bucket("dtensor")
    url = f"s3://{bucket}/ckpt4"
    spawn(_workers.save_worker, 4, url, dict(moto.options, thread_count=2))
    return url


@pytest.mark.parametrize("world", [3, 5])
def test_dtensor_save_4_load_resharded_s3(saved_4_ranks_s3, moto, world):
    # As the local test, to S3: FsspecWriter on 4 ranks, FsspecReader on 3
    # and 5, with s3fs's client_kwargs spelling of the endpoint.
    opts = {k: v for k, v in moto.options.items() if k != "endpoint_url"}
    opts["client_kwargs"] = {"endpoint_url": moto.url}
    spawn(_workers.load_worker, world, saved_4_ranks_s3, opts)


def test_s3_checkpoint_is_dcp(saved_4_ranks_s3, moto):
    md = dcp.Reader(saved_4_ranks_s3, moto.options).read_metadata()
    assert md["world_size"] == 4
    items = {i[0]: i for i in md["items"]}
    assert items["model.row"][1:4] == ("tensor", "f32", [10, 6])
    # overwrite=False is refused on S3 too, naming the location.
    with pytest.raises(CheckpointException) as e:
        tdcp.save(
            {"w": torch.ones(2)},
            storage_writer=dcp.torch.FsspecWriter(saved_4_ranks_s3, overwrite=False, **moto.options),
            no_dist=True,
        )
    f = failure(e.value)
    assert isinstance(f, FileExistsError) and "already exists" in str(f), repr(f)


def test_storage_options_client_kwargs_conflicts_are_refused():
    # dcp's store expands client_kwargs (for every store, in Rust): a key
    # given twice with two values, or a client_kwargs that is not a dict of
    # strings, is refused when the location is opened, naming it.
    with pytest.raises(ValueError, match="endpoint_url .*given twice"):
        dcp.torch.FsspecReader(
            "s3://b/p", endpoint_url="http://a", client_kwargs={"endpoint_url": "http://b"}
        )._reader()
    with pytest.raises(ValueError, match="client_kwargs"):
        dcp.torch.FsspecReader("s3://b/p", client_kwargs="endpoint_url=x")._reader()
    # An unknown key is refused by dcp when the location is opened.
    with pytest.raises(ValueError, match='unknown storage option "endpiont"'):
        dcp.torch.FsspecReader("s3://b/p", endpiont="http://x")._reader()


# --- Non-tensor values: weights_only -------------------------------------------


class Payload:
    """Unpickling it creates directory `path` (what a hostile pickle could
    do instead)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class Config:
    """A type of the caller's own: not on torch's allow-list."""

    def __init__(self, lr=0.0):
        self.lr = lr

    def __eq__(self, other):
        return isinstance(other, Config) and other.lr == self.lr


def test_hostile_pickle_refused(tmp_path):
    path = str(tmp_path / "c")
    marker = tmp_path / "pwned"
    _single_save(path, {"w": torch.ones(2), "evil": Payload(str(marker))})
    dest = {"w": torch.zeros(2), "evil": None}
    with pytest.raises(CheckpointException) as e:
        tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    f = failure(e.value)
    import pickle

    assert isinstance(f, pickle.UnpicklingError), repr(f)
    assert "evil" in str(f) and "weights_only" in str(f), str(f)
    assert not marker.exists()
    # Opting out trusts the checkpoint: the payload runs (so the refusal
    # above is what kept it from running).
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path, weights_only=False))
    assert marker.is_dir()


def test_weights_only_allow_list(tmp_path):
    path = str(tmp_path / "c")
    _single_save(path, {"cfg": Config(0.5), "plain": {"a": [1, 2.5, "x"], "t": (True, None)}})
    dest = {"cfg": None, "plain": {"a": None, "t": None}}
    # Plain values load; a type of one's own is refused...
    with pytest.raises(CheckpointException) as e:
        tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    assert "cfg" in str(failure(e.value)) and "Config" in str(failure(e.value))
    # ...unless allowed, torch's way.
    with torch.serialization.safe_globals([Config]):
        tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    assert dest == {"cfg": Config(0.5), "plain": {"a": [1, 2.5, "x"], "t": (True, None)}}


# --- Device tensors: dcp's stager --------------------------------------------


def test_staged_tensors_through_dcps_stager(tmp_path, monkeypatch):
    # Every tensor takes the path CUDA tensors take (dcp's stager asks the
    # Python source for pieces on the writer threads' copy lanes); on CPU
    # the copies are synchronous, the path and the bounds are the same.
    calls = []
    real = dcp.torch._DeviceSource.stage

    def stage(self, lane, offset, length):
        calls.append((self.nbytes, lane, offset, length))
        return real(self, lane, offset, length)

    monkeypatch.setattr(dcp.torch, "_staged", lambda t: True)
    monkeypatch.setattr(dcp.torch._DeviceSource, "stage", stage)
    g = torch.Generator().manual_seed(3)
    sd = {
        "a": torch.randn(300, 100, generator=g),  # 120,000 bytes
        "b": torch.randn(50, generator=g).to(torch.bfloat16),
        "c": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }
    path = str(tmp_path / "c")
    _single_save(path, sd, thread_count=2, per_thread_copy_ahead=16384)
    by_size = {}
    for nbytes, lane, offset, length in calls:
        assert lane in (0, 1) and 0 < length <= 16384, (lane, length)
        by_size.setdefault(nbytes, []).append((offset, length))
    # Each tensor staged once, in pieces that tile it exactly.
    assert sorted(by_size) == sorted([100, 48, 120000]), sorted(by_size)
    for nbytes, pieces in by_size.items():
        pieces.sort()
        assert pieces[0][0] == 0 and sum(n for _, n in pieces) == nbytes
        assert all(o + n == o2 for (o, n), (o2, _) in zip(pieces, pieces[1:]))
    assert len(by_size[120000]) >= 120000 // 16384
    dest = {k: torch.zeros_like(v) for k, v in sd.items()}
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    for k, v in sd.items():
        assert torch.equal(dest[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), k


class _BadSource:
    def __init__(self, nbytes, fail):
        self.nbytes = nbytes
        self.fail = fail

    def stage(self, lane, offset, length):
        if self.fail == "stage":
            raise RuntimeError("device lost")
        return self

    def wait(self):
        return np.zeros(1, dtype=np.uint8)  # not the piece's length


def test_staging_failures_are_errors(tmp_path):
    w = dcp.Writer(str(tmp_path / "d"))
    sid, _ = w.begin()
    with pytest.raises(OSError, match="staging w to host memory: stage\\(\\): RuntimeError: device lost"):
        w.write(0, sid, [("w", "u8", [64], [0], [64], _BadSource(64, "stage"))])
    with pytest.raises(ValueError, match="staging w: wait\\(\\) returned 1 bytes for a piece of 64"):
        w.write(0, sid, [("w", "u8", [64], [0], [64], _BadSource(64, "wait"))])
    with pytest.raises(ValueError, match="needs 64 bytes, the buffer has 8"):
        w.write(0, sid, [("w", "u8", [64], [0], [64], _BadSource(8, "wait"))])
    with pytest.raises(ValueError, match="numpy.ndarray, or a stager"):
        w.write(0, sid, [("w", "u8", [64], [0], [64], object())])
    w.end()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    cpu = {"w": torch.randn(1000, 257, generator=g), "h": torch.randn(33, generator=g).half()}
    sd = {k: v.cuda() for k, v in cpu.items()}
    path = str(tmp_path / "c")
    _single_save(path, sd, thread_count=2, per_thread_copy_ahead=1 << 16)
    dest = {k: torch.zeros_like(v) for k, v in sd.items()}  # on the device
    tdcp.load(dest, storage_reader=dcp.torch.FileSystemReader(path))
    for k, v in cpu.items():
        assert torch.equal(dest[k].cpu(), v), k


# --- FSDP2 ---------------------------------------------------------------------


def test_fsdp2_save_4_load_3(tmp_path):
    # fully_shard on CPU with gloo: model and Adam state of 4 ranks, loaded
    # into a fresh FSDP2 model on 3, equal to the full state torch gathers.
    path, ref = str(tmp_path / "c"), str(tmp_path / "ref.pt")
    spawn(_workers.fsdp2_save_worker, 4, path, ref)
    spawn(_workers.fsdp2_load_worker, 3, path, ref)
