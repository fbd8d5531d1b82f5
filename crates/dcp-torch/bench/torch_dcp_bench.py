#!/usr/bin/env python3
"""Load a checkpoint written by torch.distributed.checkpoint three ways and
time each: dcp (dcp-torch; with the archives' CRC-32 checked, and without),
a raw read of the same data files, and torch's own FileSystemReader. Needs torch (CPU is enough) and a release build of the
example `load_bench` of the dcp-torch crate.

    cargo build --release -p dcp-torch --example load_bench
    python crates/dcp-torch/bench/torch_dcp_bench.py DIR [--layers 10] [--hidden 2048]
        [--vocab 32000] [--threads 4] [--reps 3] [--ranks 1]

DIR receives the checkpoint: the llm workload of `dcp bench` (bf16 embedding
[vocab, hidden]; per layer q, k, v, o [h, h], mlp up [4h, h], down [h, 4h],
two norms [h]; a 0-d int64 step), about 1.1 GB with the defaults, saved by one
process with torch's FileSystemWriter (thread_count data files). Each
contender runs --reps times warm (page cache full: every file read once
before) and cold (every data file dropped from the page cache with
posix_fadvise(POSIX_FADV_DONTNEED) after fdatasync); the median is printed,
and one JSON line per contender and cache state.
"""
import argparse, json, os, statistics, subprocess, sys, time

import torch
import torch.distributed.checkpoint as dcp


def state(layers, h, v, fill):
    sd = {"model.embed.weight": (torch.randn if fill else torch.empty)(v, h, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, shape in (("attn.q.weight", (h, h)), ("attn.k.weight", (h, h)),
                            ("attn.v.weight", (h, h)), ("attn.o.weight", (h, h)),
                            ("mlp.up.weight", (4 * h, h)), ("mlp.down.weight", (h, 4 * h)),
                            ("attn_norm.weight", (h,)), ("mlp_norm.weight", (h,))):
            sd[f"{p}.{name}"] = (torch.randn if fill else torch.empty)(*shape, dtype=torch.bfloat16)
    sd["model.step"] = torch.tensor(1000, dtype=torch.int64)
    return sd


def data_files(d):
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".distcp")]


def drop_cache(d):
    for f in data_files(d) + [os.path.join(d, ".metadata")]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(d):
    for f in data_files(d):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def torch_load(d, args):
    sd = state(args.layers, args.hidden, args.vocab, fill=False)
    for t in sd.values():
        t.fill_(0)  # touch the destination before the clock starts
    t0 = time.perf_counter()
    dcp.load(sd, storage_reader=dcp.FileSystemReader(d), no_dist=True)
    return time.perf_counter() - t0


def example(d, mode, args, exe):
    extra = [str(args.ranks), str(args.threads)] if mode.startswith("dcp") else [str(args.threads)]
    out = subprocess.run([exe, d, mode] + extra, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--exe", default=os.path.join(os.path.dirname(__file__), "../../../target/release/examples/load_bench"))
    args = ap.parse_args()
    d = args.dir
    if not os.path.exists(os.path.join(d, ".metadata")):
        sd = state(args.layers, args.hidden, args.vocab, fill=True)
        t0 = time.perf_counter()
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(d, thread_count=args.threads), no_dist=True)
        print(f"# torch saved {sum(t.numel() * t.element_size() for t in sd.values()) / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        del sd
    nbytes = sum(os.path.getsize(f) for f in data_files(d))
    contenders = {
        "dcp": lambda: example(d, "dcp", args, args.exe),
        "dcp-nocrc": lambda: example(d, "dcp-nocrc", args, args.exe),
        "raw": lambda: example(d, "raw", args, args.exe),
        "torch": lambda: torch_load(d, args),
    }
    results = {}
    for cache in ("warm", "cold"):
        for name, run in contenders.items():
            times = []
            for _ in range(args.reps):
                (warm_cache if cache == "warm" else drop_cache)(d)
                times.append(run())
            med = statistics.median(times)
            results[(cache, name)] = med
            print(json.dumps({"contender": name, "cache": cache, "median_s": round(med, 4),
                              "gb_per_s": round(nbytes / med / 1e9, 3), "runs_s": [round(t, 4) for t in times],
                              "bytes": nbytes, "ranks": args.ranks if name.startswith("dcp") else 1}))
    for cache in ("warm", "cold"):
        raw, theirs = results[(cache, "raw")], results[(cache, "torch")]
        for n in ("dcp", "dcp-nocrc"):
            mine = results[(cache, n)]
            print(f"# {cache}: {n} at {raw / mine:.2f} of a raw read, {theirs / mine:.2f}x torch's FileSystemReader",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
