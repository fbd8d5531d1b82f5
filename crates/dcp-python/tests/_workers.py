"""Rank bodies for the multi-process tests (spawned by torch.multiprocessing,
so they live in an importable module)."""

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as tdcp
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

import dcp.torch


def leave() -> None:
    """End a spawned rank whose work succeeded without the interpreter's
    finalization. A DeviceMesh keeps torch's gloo group alive past
    ``destroy_process_group``, and the group's worker threads destroyed
    while the interpreter is torn down can abort the process ("terminate
    called without an active exception", pytorch/pytorch#179291) after
    every check passed; the process exits 0 instead, its output flushed.
    A failing rank raises as before (spawn reports its traceback)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def originals() -> dict:
    """The full tensors and values every test saves (the same on every rank)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "row": torch.randn(10, 6, generator=g),  # 10 rows over 4 ranks: 3, 3, 3, 1
        "col": torch.randn(5, 9, generator=g).to(torch.bfloat16),
        "rep": torch.randn(7, generator=g, dtype=torch.float64),
        "grid": torch.randn(8, 6, generator=g),
        "ids": torch.arange(13, dtype=torch.int64),
        "exp_avg": torch.randn(10, 6, generator=g),
    }


SAVE_PLACEMENTS = {
    "row": [Shard(0)],
    "col": [Shard(1)],
    "rep": [Replicate()],
    "ids": [Shard(0)],
    "exp_avg": [Shard(0)],
}
LOAD_PLACEMENTS = {
    "row": [Shard(1)],
    "col": [Shard(0)],
    "rep": [Shard(0)],
    "grid": [Replicate()],
    "ids": [Shard(0)],
    "exp_avg": [Replicate()],
}


def _state(full: dict, mesh, mesh2d, placements: dict, zero: bool) -> dict:
    def dt(name):
        t = torch.zeros_like(full[name]) if zero else full[name]
        if name == "grid" and mesh2d is not None:
            return distribute_tensor(t, mesh2d, [Shard(0), Shard(1)])
        return distribute_tensor(t, mesh, placements[name])

    return {
        "model": {k: dt(k) for k in ("row", "col", "rep", "grid", "ids")},
        "optim": {"state": {"exp_avg": dt("exp_avg")}, "step": 0 if zero else 42},
        "extra": {"epoch": 0 if zero else 3, "name": "" if zero else "run-1"},
    }


def _writer(path: str, kwargs: dict):
    """dcp's FsspecWriter for a URL (its storage options in ``kwargs``),
    FileSystemWriter for a local path."""
    if "://" in path:
        return dcp.torch.FsspecWriter(path, **kwargs)
    return dcp.torch.FileSystemWriter(path, **kwargs)


def _reader(path: str, kwargs: dict):
    if "://" in path:
        return dcp.torch.FsspecReader(path, **kwargs)
    return dcp.torch.FileSystemReader(path, **kwargs)


def save_worker(rank: int, world: int, port: int, path: str, kwargs: dict) -> None:
    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        mesh2d = init_device_mesh("cpu", (2, world // 2)) if world % 2 == 0 else None
        sd = _state(originals(), mesh, mesh2d, SAVE_PLACEMENTS, zero=False)
        tdcp.save(sd, storage_writer=_writer(path, kwargs))
        # Every rank done with its collectives before any tears gloo down
        # (a rank destroying its group while a peer still sends aborts the
        # peer: "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()


def load_worker(rank: int, world: int, port: int, path: str, kwargs: dict = {}) -> None:
    _init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = originals()
        sd = _state(full, mesh, None, LOAD_PLACEMENTS, zero=True)
        tdcp.load(sd, storage_reader=_reader(path, kwargs))
        for k in ("row", "col", "rep", "grid", "ids"):
            got = sd["model"][k].full_tensor()
            assert got.dtype == full[k].dtype, k
            # Bit-exact: compare the bytes, not the values.
            assert torch.equal(got.view(-1).view(torch.uint8), full[k].view(-1).view(torch.uint8)), k
        got = sd["optim"]["state"]["exp_avg"].full_tensor()
        assert torch.equal(got, full["exp_avg"])
        assert sd["optim"]["step"] == 42, sd["optim"]["step"]
        assert sd["extra"] == {"epoch": 3, "name": "run-1"}, sd["extra"]
        dist.barrier()
    except BaseException:
        # Said before the group is torn down: tearing it down while other
        # ranks still wait in a collective can abort this process, and the
        # exception would be lost with it.
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    leave()


def _fsdp_model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 30), torch.nn.ReLU(), torch.nn.Linear(30, 7, bias=False)
    )


def _fsdp(model, world: int):
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2_save_worker(rank: int, world: int, port: int, path: str, ref: str) -> None:
    """FSDP2 (fully_shard) model and Adam state after two steps, saved with
    dcp's FileSystemWriter; rank 0 also keeps the full state dicts (torch's
    own gathering) in ``ref`` for the loaders to compare with."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    _init(rank, world, port)
    try:
        model = _fsdp(_fsdp_model(0), world)
        optim = torch.optim.Adam(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(7 + rank)
        for _ in range(2):
            model(torch.randn(5, 16, generator=g)).square().sum().backward()
            optim.step()
            optim.zero_grad()
        msd, osd = get_state_dict(model, optim)
        tdcp.save({"model": msd, "optim": osd}, storage_writer=dcp.torch.FileSystemWriter(path))
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        fm, fo = get_state_dict(model, optim, options=full)
        if rank == 0:
            torch.save({"model": fm, "optim": fo}, ref)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()


def fsdp2_load_worker(rank: int, world: int, port: int, path: str, ref: str) -> None:
    """A fresh FSDP2 model (other initial values) and optimizer on ``world``
    ranks, loaded from the checkpoint, equal to the saved full state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    _init(rank, world, port)
    try:
        model = _fsdp(_fsdp_model(1), world)
        optim = torch.optim.Adam(model.parameters(), lr=0.1)
        # Optimizer state exists before loading (torch's recipe: one step).
        model(torch.zeros(1, 16)).sum().backward()
        optim.step()
        optim.zero_grad()
        msd, osd = get_state_dict(model, optim)
        sd = {"model": msd, "optim": osd}
        tdcp.load(sd, storage_reader=dcp.torch.FileSystemReader(path))
        set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        fm, fo = get_state_dict(model, optim, options=full)
        want = torch.load(ref, weights_only=True)
        if rank == 0:
            assert fm.keys() == want["model"].keys(), (fm.keys(), want["model"].keys())
            for k, v in want["model"].items():
                assert torch.equal(fm[k], v), k
            ws, gs = want["optim"]["state"], fo["state"]
            assert ws.keys() == gs.keys(), (ws.keys(), gs.keys())
            for k in ws:
                for name, v in ws[k].items():
                    assert torch.equal(torch.as_tensor(gs[k][name]), torch.as_tensor(v)), (k, name)
            assert fo["param_groups"] == want["optim"]["param_groups"]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()
