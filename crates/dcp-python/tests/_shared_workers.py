"""Rank bodies of the shared-read tests (test_shared_reads.py), spawned by
torch.multiprocessing. Each loading rank reports what it saw in a JSON file
of its own (``{out}/{rank}.json``), so the test can check every rank,
including ranks that failed, without relying on the process exit."""

import json
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as tdcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import dcp.torch
from _workers import leave


def _init(rank: int, world: int, port: int, timeout_s: float = 120) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def originals(names=("wq", "wk", "emb")) -> dict:
    """The full tensors: rows not divisible by 4 or 3, columns not by 3."""
    g = torch.Generator().manual_seed(99)
    shapes = {"wq": (140, 100), "wk": (100, 140), "emb": (262, 84)}
    dtypes = {"wq": torch.float32, "wk": torch.bfloat16, "emb": torch.float32}
    return {n: torch.randn(*shapes[n], generator=g).to(dtypes[n]) for n in names}


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return -1


def save_rows(rank: int, world: int, port: int, path: str, names) -> None:
    """``world`` ranks save ``originals(names)`` split by rows, plus a
    non-tensor value."""
    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        sd = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in originals(names).items()}
        sd["extra"] = {"epoch": 5}
        tdcp.save(sd, storage_writer=dcp.torch.FileSystemWriter(path))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()


class _FailingPlanner(DefaultLoadPlanner):
    """torch's planner, except that on ``rank`` resolving a destination
    raises (``how="raise"``) or ends the process (``how="exit"``): a rank
    that fails in the middle of ``read_data``, before it reads."""

    def __init__(self, rank: int, how: str) -> None:
        super().__init__()
        self.fail_rank = rank
        self.how = how

    def resolve_tensor(self, read_item):
        if dist.get_rank() == self.fail_rank:
            if self.how == "exit":
                os._exit(7)
            raise RuntimeError("injected failure while resolving a destination")
        return super().resolve_tensor(read_item)


def load(rank: int, world: int, port: int, path: str, out: str, dim: int, names,
         reader_kwargs: dict, fail=None) -> None:
    """Load ``originals(names)`` split along ``dim`` over ``world`` ranks;
    write ``{out}/{rank}.json``: ``ok``, the bytes this rank's reader read
    (dcp's counter and ``rchar``), the error's text, the seconds taken."""
    _init(rank, world, port, timeout_s=30 if fail else 120)
    report = {"rank": rank}
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = originals(names)
        sd = {n: distribute_tensor(torch.zeros_like(t), mesh, [Shard(dim)]) for n, t in full.items()}
        sd["extra"] = {"epoch": 0}
        if reader_kwargs.get("process_group") == "new":
            # A group of its own (every rank, another gloo group), given to
            # both torch's load and dcp's reader.
            reader_kwargs = dict(reader_kwargs, process_group=dist.new_group(backend="gloo"))
        group = reader_kwargs.get("process_group")
        reader = dcp.torch.FileSystemReader(path, **reader_kwargs)
        planner = _FailingPlanner(*fail) if fail else None
        dist.barrier()
        before = _rchar()
        t0 = time.monotonic()
        try:
            tdcp.load(sd, storage_reader=reader, planner=planner, process_group=group)
            report["ok"] = True
        except BaseException as e:  # torch's CheckpointException is one
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            report["ok"] = False
            report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        report["seconds"] = time.monotonic() - t0
        report["rchar"] = _rchar() - before
        report["bytes_read"] = reader.read_stats["bytes_read"]
        if report["ok"]:
            for n, t in full.items():
                got = sd[n].to_local()
                # DTensor's Shard splits as torch.chunk does.
                want = t.chunk(world, dim=dim)[rank]
                # Bit-exact: the bytes, not the values.
                assert got.shape == want.shape, (n, got.shape, want.shape)
                assert torch.equal(
                    got.contiguous().view(-1).view(torch.uint8),
                    want.contiguous().view(-1).view(torch.uint8),
                ), n
            assert sd["extra"] == {"epoch": 5}, sd["extra"]
    except BaseException as e:  # an assertion: reported, and the rank fails
        report["ok"] = False
        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        raise
    finally:
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(report, f)
        if not fail:
            dist.barrier()
        dist.destroy_process_group()
    leave()
