#!/usr/bin/env bash
# The MPI benchmarks of BENCHMARKS.md: save, load and a 4 -> 3 resharded
# load by 4 MPI processes (`mpirun -n 4 dcp bench --mpi`) beside the same
# scenarios by 4 LocalGroup ranks (`dcp bench --ranks 4`), each `dcp bench`
# run measuring its own raw baseline on the same bytes, in the same
# directory. ROUNDS rounds alternate the two modes; the summary gives, per
# mode and scenario, the median over the rounds of each run's medians.
#
#   scripts/bench-mpi.sh                 # 3 rounds of 3 reps, llm 4x1024
#   ROUNDS=5 REPS=5 DIR=/mnt/nvme/b scripts/bench-mpi.sh
#   MODEL="--layers 10 --hidden 2048" scripts/bench-mpi.sh
#
# Needs Open MPI (mpirun) and a release dcp built with the mpi feature
# (built here). Every JSON line is kept in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REPS=${REPS:-3}
DIR=${DIR:-${TMPDIR:-/tmp}/dcp-bench-mpi}
MODEL=${MODEL:---layers 4 --hidden 1024 --vocab 32000}
EXTRA=${EXTRA:-}
OUT=${OUT:-target/bench-mpi.jsonl}

command -v mpirun >/dev/null || { echo "bench-mpi: mpirun not found (apt-get install openmpi-bin libopenmpi-dev libclang-dev)" >&2; exit 1; }
cargo build --release -p dcp-cli --features mpi --bin dcp
DCP=${CARGO_TARGET_DIR:-target}/release/dcp
MPIRUN=(mpirun -n 4)
if mpirun --version 2>/dev/null | grep -q 'Open MPI'; then
    MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none -n 4)
fi

# shellcheck disable=SC2206
COMMON=(bench --json --reps "$REPS" --workload llm --load-ranks 3
    --scenarios save,load,reshard --dir "$DIR" $MODEL $EXTRA)
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
for round in $(seq 1 "$ROUNDS"); do
    echo "bench-mpi: round $round of $ROUNDS: 4 LocalGroup ranks" >&2
    "$DCP" "${COMMON[@]}" --ranks 4 >>"$OUT"
    echo "bench-mpi: round $round of $ROUNDS: 4 MPI processes" >&2
    "${MPIRUN[@]}" "$DCP" "${COMMON[@]}" --mpi >>"$OUT"
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    if r.get("reps", 0) == 0:
        continue
    by.setdefault((r["scenario"], r["collective"]), []).append(r)
med = statistics.median
first = rows[0]
print(f"llm {first['bytes']/1e6:.0f} MB logical, {first['checkpoint_bytes']/1e6:.0f} MB in {first['files']} files;"
      f" {len(rows)} records; medians over rounds of each run's medians")
print(f"{'scenario':<13} {'ranks':<11} {'n':>2} {'dcp s':>8} {'raw s':>8} {'ratio':>6} {'runs (ratio)':<22} {'read/size':>9} {'verified':>8}")
order = ["save", "save_nosync", "load_warm", "load_cold", "reshard_warm", "reshard_cold"]
for sc in order:
    for coll in ["local", "mpi"]:
        rs = by.get((sc, coll))
        if not rs:
            continue
        ratios = [r["ratio"] for r in rs]
        ver = {r.get("verified") for r in rs}
        print(f"{sc:<13} {coll + ' x' + str(rs[0]['ranks']):<11} {len(rs):>2} {med(r['seconds'] for r in rs):>8.3f}"
              f" {med(r['raw_seconds'] for r in rs):>8.3f} {med(ratios):>6.2f} {', '.join(f'{x:.2f}' for x in ratios):<22}"
              f" {med(r['read_amplification'] for r in rs):>9.2f} {'-' if ver == {None} else str(all(ver)).lower():>8}")
PY
