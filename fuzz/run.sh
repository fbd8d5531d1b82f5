#!/usr/bin/env bash
# Run every cargo-fuzz target of dcp for SECONDS each (default 60), one after
# another, with overflow checks and debug assertions on (-a), a 2 GiB RSS and
# single-allocation limit and a 10 s per-input timeout (a hang is a crash).
# Leak detection is off: threads of the tokio blocking pool outlive an input
# and LeakSanitizer reports their thread-local storage.
# Known crashing inputs in regressions/<target>/ are run first, so a bug that
# comes back fails at once.
#
#   fuzz/run.sh [SECONDS]        (wired to `cargo xtask fuzz --seconds N`)
#
# Exit status: 0 when no target found a crash, 1 otherwise; logs and crash
# inputs are in fuzz/artifacts/. No nightly toolchain is needed:
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the sanitizer flags on stable.
set -uo pipefail
secs="${1:-60}"
cd "$(dirname "$0")"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked || exit 2
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -a || exit 2
status=0
for t in $(cargo fuzz list); do
    mkdir -p "corpus/$t" "artifacts/$t"
    seeds=()
    if [ -d "regressions/$t" ] && [ -n "$(ls -A "regressions/$t")" ]; then
        seeds=("regressions/$t")
    fi
    echo "=== $t: ${secs}s"
    cargo fuzz run -a "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 -detect_leaks=0 \
        -print_final_stats=1 >"artifacts/$t.log" 2>&1
    rc=$?
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs" "artifacts/$t.log" || true
    if [ $rc -ne 0 ]; then
        status=1
        echo "!!! $t found a crash (exit $rc); see fuzz/artifacts/$t.log and fuzz/artifacts/$t/"
        grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written" "artifacts/$t.log" | head -5
    fi
done
exit $status
