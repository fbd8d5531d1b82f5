"""Shared reads over torch's process group: a 4 -> 3 resharded load through
``dcp.torch`` reads each saved record once across the ranks (dcp's shared
reads, bytes exchanged over gloo), bit-exact; checksums still checked; a
rank that fails or dies mid-load fails the others, never hangs them."""

import json
import multiprocessing
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from conftest import free_port

import _shared_workers as w

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

NAMES = ("wq", "wk", "emb")


def spawn(fn, world, *args):
    mp.spawn(fn, args=(world, free_port()) + args, nprocs=world, join=True)


def reports(out: Path, world: int) -> list:
    got = []
    for r in range(world):
        p = out / f"{r}.json"
        got.append(json.loads(p.read_text()) if p.exists() else None)
    return got


def data_bytes(path: str) -> int:
    """The checkpoint's data files on disk (every byte of every record)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.suffix == ".dcp")


@pytest.fixture(scope="module")
def saved_rows(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rows4"))
    spawn(w.save_rows, 4, path, NAMES)
    return path


def load3(path, tmp_path, dim, names=NAMES, **reader_kwargs) -> list:
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    spawn(w.load, 3, path, str(out), dim, names, reader_kwargs)
    got = reports(out, 3)
    for r in got:
        assert r is not None and r["ok"], r
    return got


@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "columns"])
def test_reshard_4_to_3_reads_the_checkpoint_once(saved_rows, tmp_path, dim):
    """Rows saved by 4 ranks load by rows and by columns on 3, bit-exact,
    reading at most 1.1x the checkpoint's data across the 3 ranks (each
    rank alone reads whole records it needs part of: 1.5x by rows, 3x by
    columns)."""
    ckpt = data_bytes(saved_rows)
    # By columns, over a process group of its own given to torch and dcp.
    got = load3(saved_rows, tmp_path, dim, **({"process_group": "new"} if dim else {}))
    read = sum(r["bytes_read"] for r in got)
    assert 0.9 * ckpt <= read <= 1.1 * ckpt, (read, ckpt, got)
    # The same load without sharing: every rank reads each record it needs
    # whole (checksums), so this layout's loads read more than 1.1x: the
    # counter and the sharing both matter.
    alone = load3(saved_rows, tmp_path, dim, share_reads=False)
    unshared = sum(r["bytes_read"] for r in alone)
    print(
        f"4 -> 3 by {'rows' if dim == 0 else 'columns'}: checkpoint data {ckpt} B; read "
        f"{read / ckpt:.3f}x shared (rchar {sum(r['rchar'] for r in got) / ckpt:.3f}x), "
        f"{unshared / ckpt:.3f}x alone (rchar {sum(r['rchar'] for r in alone) / ckpt:.3f}x); "
        f"load s {max(r['seconds'] for r in got):.2f} shared, "
        f"{max(r['seconds'] for r in alone):.2f} alone"
    )
    assert unshared >= (1.4 if dim == 0 else 2.9) * ckpt, (unshared, ckpt)


def test_shared_reads_check_checksums_naming_the_item(saved_rows, tmp_path):
    """A damaged record that one rank reads for all three: every rank's
    load fails, with the item and the file named."""
    path = tmp_path / "damaged"
    spawn(w.save_rows, 4, str(path), ("emb",))
    # Rank 1's data file (``__1_0-<save id>.dcp``) holds emb's rows 66..131
    # alone (the pickled extra is the coordinator's): damage its middle.
    (victim,) = [p for p in path.iterdir() if p.name.startswith("__1_") and p.suffix == ".dcp"]
    b = bytearray(victim.read_bytes())
    b[len(b) // 2] ^= 0xFF
    victim.write_bytes(bytes(b))
    out = tmp_path / "out"
    out.mkdir()
    spawn(w.load, 3, str(path), str(out), 1, ("emb",), {})
    got = reports(out, 3)
    for r in got:
        assert r is not None and not r["ok"], r
        assert "emb" in r["error"] and victim.name in r["error"], r["error"]
        assert "checksum" in r["error"].lower(), r["error"]


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_rank_failing_mid_load_fails_the_others(saved_rows, tmp_path, how):
    """Rank 1 raises (or its process ends) inside ``read_data`` before it
    reads; ranks 0 and 2, which would exchange with it, fail within the
    timeout instead of waiting for it forever."""
    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=w.load,
            args=(r, 3, port, saved_rows, str(out), 1, NAMES, {}, (1, how)),
        )
        for r in range(3)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    deadline = start + 120
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running {time.monotonic() - start:.0f} s in"
    got = reports(out, 3)
    for rank in (0, 2):
        r = got[rank]
        assert r is not None and not r["ok"], r
        assert r["seconds"] < 60, r
        if how == "raise":
            # dcp's exchange carries rank 1's error to the others.
            assert "injected failure" in r["error"], r["error"]
    if how == "exit":
        assert procs[1].exitcode == 7
        assert got[1] is None
    else:
        assert "injected failure" in got[1]["error"], got[1]
