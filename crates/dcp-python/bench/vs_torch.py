#!/usr/bin/env python3
"""dcp.torch against torch's own storage classes: same run, same machine.

    python crates/dcp-python/bench/vs_torch.py --runs 3

(in an environment with torch, the dcp package built with S3 support,
s3fs and boto3, and `moto_server` on PATH; see BENCHMARKS.md).

Three parts, each repeated ``--runs`` times, medians reported:

* ``local``: the llm workload of ``dcp bench`` (L=10, H=2048, V=32000,
  bf16: 1.14 GB, 83 items) saved and loaded by one process (``no_dist``)
  with ``dcp.torch.FileSystemWriter``/``Reader`` and with torch's
  ``FileSystemWriter``/``Reader``, the same ``thread_count`` and
  ``sync_files=True`` for both; loads fill preallocated tensors (page cache
  warm).
* ``s3``: a smaller model (L=4, H=1024: 166 MB) to S3 on a moto server the
  script starts on 127.0.0.1, with ``dcp.torch.FsspecWriter``/``Reader``
  and torch's ``FsspecWriter``/``Reader`` (s3fs) at thread_count 1 and 4,
  plus a raw upload and download of the same number of bytes as one object
  with boto3's managed transfer (``TransferConfig(max_concurrency=...)``).
* ``reshard``: the smaller model saved by 4 ranks (gloo, rows) to a local
  directory and loaded by 3 ranks, by rows and by columns, with each
  implementation;
  reports the bytes the loading processes read (``rchar`` of
  ``/proc/self/io``, every read and pread, page cache included) against
  the checkpoint's bytes on disk, and the load time; for dcp also the
  bytes its readers requested from storage (``FsspecReader.read_stats``).
  dcp loads with shared reads (the default: each saved record read by one
  rank, slices exchanged over gloo), without them (``share_reads=False``:
  each rank reads the whole records it needs part of), and with
  ``verify_checksums=False`` (records read in part).

Speed ratios are ``torch seconds / dcp seconds`` (above 1: dcp faster).
Prints a table, and the JSON of every run and median (also to ``--json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as tdcp
import torch.multiprocessing as mp

import dcp.torch


def model(layers: int, hidden: int, vocab: int, seed: int = 0) -> Dict[str, Any]:
    """The llm workload of ``dcp bench``: per layer q, k, v, o [H,H], up
    [4H,H], down [H,4H], two norms [H] (bf16); the embedding [V,H]; an i64
    step and a non-tensor value."""
    g = torch.Generator().manual_seed(seed)
    h = hidden

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.bfloat16)

    sd: Dict[str, Any] = {"embed.weight": t(vocab, h)}
    for i in range(layers):
        p = f"layers.{i}"
        for n in ("q", "k", "v", "o"):
            sd[f"{p}.attn.{n}.weight"] = t(h, h)
        sd[f"{p}.mlp.up.weight"] = t(4 * h, h)
        sd[f"{p}.mlp.down.weight"] = t(h, 4 * h)
        sd[f"{p}.norm1.weight"] = t(h)
        sd[f"{p}.norm2.weight"] = t(h)
    sd["optim.step"] = torch.tensor(1234, dtype=torch.int64)
    sd["extra"] = {"epoch": 3, "note": "a non-tensor value"}
    return sd


def nbytes(sd: Dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


def blank(v: Any) -> Any:
    """A destination for ``v``: zeros of a tensor, the keys of a dict
    (torch's planner flattens dicts), None for the rest."""
    if isinstance(v, torch.Tensor):
        return torch.zeros_like(v)
    if isinstance(v, dict):
        return {k: None for k in v}
    return None


def zeros_like(sd: Dict[str, Any]) -> Dict[str, Any]:
    return {k: blank(v) for k, v in sd.items()}


def check(dest: Dict[str, Any], sd: Dict[str, Any], what: str) -> None:
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            if not torch.equal(dest[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)):
                raise AssertionError(f"{what}: {k} differs after the load")
        elif dest[k] != v:
            raise AssertionError(f"{what}: {k} is {dest[k]!r}, saved {v!r}")


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


# --- local -----------------------------------------------------------------


def bench_local(args: argparse.Namespace, runs: List[Dict[str, Any]]) -> None:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    sd = model(args.layers, args.hidden, args.vocab)
    size = nbytes(sd)
    dest = zeros_like(sd)
    impls = {
        "dcp": (
            lambda p: dcp.torch.FileSystemWriter(p, thread_count=args.threads),
            lambda p: dcp.torch.FileSystemReader(p, thread_count=args.threads),
        ),
        "torch": (
            lambda p: FileSystemWriter(p, thread_count=args.threads),
            lambda p: FileSystemReader(p),
        ),
    }
    for run in range(args.runs):
        order = list(impls) if run % 2 == 0 else list(reversed(impls))
        for impl in order:
            w, r = impls[impl]
            path = os.path.join(args.dir, f"local-{impl}")
            shutil.rmtree(path, ignore_errors=True)
            save_s = timed(lambda: tdcp.save(sd, storage_writer=w(path), no_dist=True))
            for v in dest.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()
            load_s = timed(lambda: tdcp.load(dest, storage_reader=r(path), no_dist=True))
            check(dest, sd, f"local {impl}")
            rec = dict(part="local", impl=impl, run=run, bytes=size, ckpt_bytes=dir_bytes(path),
                       threads=args.threads, save_s=save_s, load_s=load_s)
            runs.append(rec)
            print(f"  local {impl:5} run {run}: save {save_s:6.2f} s  load {load_s:6.2f} s", flush=True)
            shutil.rmtree(path, ignore_errors=True)
    del sd, dest


# --- S3 on moto ------------------------------------------------------------


class Moto:
    def __init__(self) -> None:
        exe = shutil.which("moto_server")
        if exe is None:
            raise SystemExit("moto_server is not installed (pip install 'moto[server]')")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise SystemExit(f"moto_server did not start on {self.url}")
                time.sleep(0.2)
        # The same storage options for both: s3fs's spelling, which dcp takes.
        self.options = {"key": "testing", "secret": "testing",
                        "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"}}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def bench_s3(args: argparse.Namespace, runs: List[Dict[str, Any]]) -> None:
    import boto3
    import s3fs
    from boto3.s3.transfer import TransferConfig
    from torch.distributed.checkpoint import FsspecReader, FsspecWriter

    moto = Moto()
    try:
        client = boto3.client("s3", endpoint_url=moto.url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        fs = s3fs.S3FileSystem(**moto.options)
        sd = model(args.s3_layers, args.s3_hidden, args.vocab, seed=1)
        size = nbytes(sd)
        dest = zeros_like(sd)
        payload = b"".join(v.view(-1).view(torch.uint8).numpy().tobytes()
                           for v in sd.values() if isinstance(v, torch.Tensor))
        # dcp's own settings on top (`--dcp-options dcp_part_size=8MiB,...`).
        dcp_options = dict(moto.options)
        for kv in filter(None, args.dcp_options.split(",")):
            k, sep, v = kv.partition("=")
            if not sep or not k.startswith("dcp_"):
                raise SystemExit(f"--dcp-options: {kv!r} is not dcp_KEY=VALUE")
            dcp_options[k] = v
        tc = TransferConfig(max_concurrency=args.raw_concurrency,
                            multipart_threshold=8 << 20, multipart_chunksize=8 << 20)
        for run in range(args.runs):
            for threads in args.s3_threads:
                impls = {
                    "dcp": (lambda p, t=threads: dcp.torch.FsspecWriter(p, thread_count=t, **dcp_options),
                            lambda p, t=threads: dcp.torch.FsspecReader(p, thread_count=t, **dcp_options)),
                    "torch": (lambda p, t=threads: FsspecWriter(p, thread_count=t, **moto.options),
                              lambda p: FsspecReader(p, **moto.options)),
                }
                order = list(impls) if run % 2 == 0 else list(reversed(impls))
                for impl in order:
                    w, r = impls[impl]
                    url = f"s3://bench/{impl}-t{threads}-r{run}"
                    save_s = timed(lambda: tdcp.save(sd, storage_writer=w(url), no_dist=True))
                    ckpt = sum(fs.du(url, total=False).values())
                    for v in dest.values():
                        if isinstance(v, torch.Tensor):
                            v.zero_()
                    load_s = timed(lambda: tdcp.load(dest, storage_reader=r(url), no_dist=True))
                    check(dest, sd, f"s3 {impl}")
                    fs.rm(url, recursive=True)
                    fs.invalidate_cache()
                    runs.append(dict(part="s3", impl=impl, run=run, threads=threads, bytes=size,
                                     ckpt_bytes=ckpt, save_s=save_s, load_s=load_s))
                    print(f"  s3 {impl:5} t{threads} run {run}: save {save_s:6.2f} s  load {load_s:6.2f} s",
                          flush=True)
            key = f"raw-r{run}"
            up = timed(lambda: client.upload_fileobj(io.BytesIO(payload), "bench", key, Config=tc))
            got = io.BytesIO()
            down = timed(lambda: client.download_fileobj("bench", key, got, Config=tc))
            if got.getvalue() != payload:
                raise AssertionError("raw download differs from the upload")
            client.delete_object(Bucket="bench", Key=key)
            del got
            runs.append(dict(part="s3", impl="raw boto3", run=run, threads=args.raw_concurrency,
                             bytes=len(payload), save_s=up, load_s=down))
            print(f"  s3 raw boto3 c{args.raw_concurrency} run {run}: up {up:6.2f} s  down {down:6.2f} s",
                  flush=True)
    finally:
        moto.close()


# --- reshard 4 -> 3 -----------------------------------------------------------


def _rank_init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _sharded(full: Dict[str, Any], mesh: Any, dim: int, zero: bool) -> Dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    out: Dict[str, Any] = {}
    for k, v in full.items():
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            out[k] = distribute_tensor(torch.zeros_like(v) if zero else v, mesh, [Shard(dim)])
        else:
            out[k] = blank(v) if zero else v
    return out


def _reshard_save(rank: int, world: int, port: int, impl: str, path: str, a: Dict[str, int]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    _rank_init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        sd = _sharded(model(a["layers"], a["hidden"], a["vocab"], seed=2), mesh, 0, zero=False)
        w = dcp.torch.FileSystemWriter(path) if impl == "dcp" else tdcp.FileSystemWriter(path)
        tdcp.save(sd, storage_writer=w)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reshard_load(rank: int, world: int, port: int, impl: str, path: str, a: Dict[str, int],
                  out: str, dim: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    _rank_init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = model(a["layers"], a["hidden"], a["vocab"], seed=2)
        sd = _sharded(full, mesh, dim, zero=True)
        if impl == "torch":
            r = tdcp.FileSystemReader(path)
        else:
            r = dcp.torch.FileSystemReader(path, verify_checksums=impl != "dcp, no verify",
                                           share_reads=impl != "dcp, unshared")
        dist.barrier()
        before = _rchar()
        t0 = time.perf_counter()
        tdcp.load(sd, storage_reader=r)
        dt = time.perf_counter() - t0
        read = _rchar() - before
        requested = r.read_stats["bytes_read"] if impl != "torch" else None
        for k, v in full.items():
            got = sd[k].to_local() if hasattr(sd[k], "to_local") else sd[k]
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                want = torch.chunk(v, world, dim=dim)[rank]
            else:
                want = v
            ok = torch.equal(got, want) if isinstance(v, torch.Tensor) else got == want
            if not ok:
                raise AssertionError(f"reshard {impl}: rank {rank}: {k} differs")
        stats = [None] * world
        dist.all_gather_object(stats, (read, dt, requested))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(stats, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def bench_reshard(args: argparse.Namespace, runs: List[Dict[str, Any]]) -> None:
    a = {"layers": args.s3_layers, "hidden": args.s3_hidden, "vocab": args.vocab}
    size = nbytes(model(a["layers"], a["hidden"], a["vocab"], seed=2))
    for run in range(args.reshard_runs):
        for impl in ("dcp", "torch"):
            path = os.path.join(args.dir, f"reshard-{impl}")
            shutil.rmtree(path, ignore_errors=True)
            mp.spawn(_reshard_save, args=(4, free_port(), impl, path, a), nprocs=4, join=True)
            ckpt = dir_bytes(path)
            out = os.path.join(args.dir, f"reshard-{impl}.json")
            loads = [(impl, 0, "4 rows -> 3 rows"), (impl, 1, "4 rows -> 3 columns")]
            if impl == "dcp":
                # The same checkpoint with each rank reading on its own
                # (whole records, as before shared reads), and without
                # checking records' checksums (partial records read in part).
                loads += [(v, d, l) for v in ("dcp, unshared", "dcp, no verify") for _, d, l in loads]
            for impl_load, dim, layout in loads:
                mp.spawn(_reshard_load, args=(3, free_port(), impl_load, path, a, out, dim),
                         nprocs=3, join=True)
                with open(out) as f:
                    stats = json.load(f)
                read = sum(s[0] for s in stats)
                load_s = max(s[1] for s in stats)
                rec = dict(part=f"reshard {layout}", impl=impl_load, run=run, bytes=size,
                           ckpt_bytes=ckpt, bytes_read=read, read_x=read / ckpt, load_s=load_s)
                extra = ""
                if stats[0][2] is not None:
                    requested = sum(s[2] for s in stats)
                    rec.update(storage_bytes=requested, storage_x=requested / ckpt)
                    extra = f", requested from storage {requested / ckpt:.2f}x"
                runs.append(rec)
                print(f"  reshard {layout} {impl_load:5} run {run}: read {read / 1e6:8.1f} MB of "
                      f"{ckpt / 1e6:8.1f} MB ({read / ckpt:.2f}x{extra}), load {load_s:6.2f} s",
                      flush=True)
                os.remove(out)
            shutil.rmtree(path, ignore_errors=True)


# --- report ----------------------------------------------------------------


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["part"], r["impl"], r.get("threads")), []).append(r)
    rows = []
    for (part, impl, threads), rs in groups.items():
        row: Dict[str, Any] = dict(part=part, impl=impl, threads=threads, runs=len(rs), bytes=rs[0]["bytes"])
        for k in ("save_s", "load_s", "bytes_read", "read_x", "ckpt_bytes", "storage_bytes", "storage_x"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                row[k] = statistics.median(vals)
        rows.append(row)
    # Ratios against dcp of the same part and thread count: torch s / dcp s.
    for row in rows:
        if row["impl"] == "dcp":
            continue
        base = [d for d in rows if d["impl"] == "dcp" and d["part"] == row["part"]
                and (d["threads"] == row["threads"] or row["impl"] == "raw boto3")]
        for k in ("save_s", "load_s"):
            if base and k in row and k in base[0]:
                row[f"{k}_ratio_vs_dcp"] = [round(row[k] / d[k], 3) for d in base]
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| part | impl | threads | bytes | save s | load s | save GB/s | load GB/s | "
             "torch/dcp save | torch/dcp load | read / checkpoint |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k: str) -> str:
            return f"{r[k]:.2f}" if k in r else ""

        def rate(k: str) -> str:
            return f"{r['bytes'] / r[k] / 1e9:.2f}" if k in r and not r["part"].startswith("reshard") else ""

        ratio = lambda k: ", ".join(f"{x:.2f}" for x in r.get(f"{k}_ratio_vs_dcp", [])) if r["impl"] == "torch" else ""  # noqa: E731
        rx = f"{r['read_x']:.2f}x ({r['bytes_read'] / 1e6:.0f} MB)" if "read_x" in r else ""
        if "storage_x" in r:
            rx += f"; requested {r['storage_x']:.2f}x"
        lines.append(f"| {r['part']} | {r['impl']} | {r['threads'] if r['threads'] is not None else ''} | "
                     f"{r['bytes'] / 1e6:.0f} MB | {f('save_s')} | {f('load_s')} | {rate('save_s')} | "
                     f"{rate('load_s')} | {ratio('save_s')} | {ratio('load_s')} | {rx} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--parts", default="local,s3,reshard", help="comma-separated: local, s3, reshard")
    p.add_argument("--dir", default=None, help="local directory (default: a temporary one)")
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1, help="thread_count of the local saves and loads")
    p.add_argument("--s3-layers", type=int, default=4)
    p.add_argument("--s3-hidden", type=int, default=1024)
    p.add_argument("--s3-threads", default="1,4")
    p.add_argument("--raw-concurrency", type=int, default=8)
    p.add_argument("--dcp-options", default="",
                   help="dcp storage options for the s3 part, e.g. dcp_part_size=16MiB,dcp_write_concurrency=8")
    p.add_argument("--reshard-runs", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args()
    args.s3_threads = [int(t) for t in args.s3_threads.split(",")]
    parts = set(args.parts.split(","))
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="dcp-vs-torch-")
    os.makedirs(args.dir, exist_ok=True)
    runs: List[Dict[str, Any]] = []
    try:
        if "local" in parts:
            bench_local(args, runs)
        if "s3" in parts:
            bench_s3(args, runs)
        if "reshard" in parts:
            bench_reshard(args, runs)
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)
    rows = summarize(runs)
    print()
    print(table(rows))
    doc = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
           "args": {k: v for k, v in vars(args).items() if k != "dir"}, "medians": rows, "runs": runs}
    print(json.dumps(doc, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
