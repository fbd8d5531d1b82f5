#!/usr/bin/env bash
# Memory and speed of `dcp convert` on one 2 GiB tensor (BENCHMARKS.md,
# "Hugging Face convert"):
#   1. a safetensors file holding one F32 tensor of 16384 x 32768 (2 GiB);
#   2. import: `dcp convert big.safetensors --to-dcp ck --ranks 4` (the
#      tensor saved as 4 row chunks by 4 ranks);
#   3. export: `dcp convert ck --to-safetensors out` (the 4 chunks
#      assembled into one file);
#   4. the raw baseline: the same file copied with dd (64 MiB blocks,
#      fsync at the end, as dcp syncs what it writes).
# Each step runs REPS times (default 3); printed: wall seconds and peak RSS
# (GNU time) of each run, then medians and the speed ratios (raw copy time
# / dcp time). Every export is checked byte for byte against the source's
# tensor data. Needs python3, GNU time, a release build of the dcp command.
#
# usage: crates/dcp-cli/scripts/hf_convert_bench.sh [DIR] [REPS]
#   DCP=target/release/dcp by default; DIR (default /tmp/dcp-hf-bench) is
#   removed at the end.
set -euo pipefail
DIR=${1:-/tmp/dcp-hf-bench}
REPS=${2:-3}
DCP=${DCP:-target/release/dcp}
[ -x "$DCP" ] || { echo "build it first: cargo build --release -p dcp-cli" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT

python3 - "$DIR/big.safetensors" <<'PY'
import json, os, struct, sys
rows, cols = 16384, 32768
n = rows * cols * 4
head = json.dumps({"__metadata__": {"format": "pt"},
                   "model.embed.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, n]}},
                  separators=(",", ":")).encode()
head += b" " * (-len(head) % 8)
block = os.urandom(64 << 20)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head)
    for i in range(n // len(block)):
        # Distinct blocks: a misplaced block is caught by the comparison.
        f.write(struct.pack("<Q", i) + block[8:])
PY

# Offset of the tensor data of a safetensors file.
data_at() { python3 -c 'import struct,sys; print(8 + struct.unpack("<Q", open(sys.argv[1],"rb").read(8))[0])' "$1"; }
SRC_AT=$(data_at "$DIR/big.safetensors")
SIZE=$(( $(stat -c %s "$DIR/big.safetensors") - SRC_AT ))

# run LABEL CMD...: one timed run; appends "seconds peak_kib" to $DIR/LABEL.
run() {
    local label=$1; shift
    sync
    /usr/bin/time -f "%e %M" -o "$DIR/.t" "$@" >/dev/null
    cat "$DIR/.t" >> "$DIR/$label"
    echo "$label: $(cat "$DIR/.t") (s, peak KiB)"
}

for _ in $(seq "$REPS"); do
    rm -rf "$DIR/copy" "$DIR/ck" "$DIR/out"
    run raw dd if="$DIR/big.safetensors" of="$DIR/copy" bs=64M conv=fsync status=none
    run import "$DCP" convert --quiet "$DIR/big.safetensors" --to-dcp "$DIR/ck" --ranks 4
    run export "$DCP" convert --quiet "$DIR/ck" --to-safetensors "$DIR/out"
    OUT_AT=$(data_at "$DIR/out/model.safetensors")
    cmp -n "$SIZE" -i "$SRC_AT:$OUT_AT" "$DIR/big.safetensors" "$DIR/out/model.safetensors"
done
"$DCP" inspect "$DIR/ck" | grep -E "^(world size|items)"

python3 - "$DIR" "$SIZE" <<'PY'
import statistics, sys
d, size = sys.argv[1], int(sys.argv[2])
med = {}
for k in ("raw", "import", "export"):
    rows = [tuple(map(float, l.split())) for l in open(f"{d}/{k}")]
    med[k] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows), max(r[1] for r in rows))
    print(f"{k:7s} median {med[k][0]:6.2f} s  {size / med[k][0] / 1e9:5.2f} GB/s  peak RSS median {med[k][1] / 1024:6.1f} MiB (max {med[k][2] / 1024:.1f})")
for k in ("import", "export"):
    print(f"{k} speed / raw copy: {med['raw'][0] / med[k][0]:.2f}")
PY
