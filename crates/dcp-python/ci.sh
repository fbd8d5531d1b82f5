#!/usr/bin/env bash
# Builds the Python package (maturin, abi3) and runs its pytest suite with
# torch 2.15 from PyPI (CPU, gloo), in a virtual environment outside the
# repository. Called by .ci/run; runs alone too (from anywhere).
#
# torch from PyPI is the CUDA build: `pip install --no-deps torch` cannot be
# imported without its nvidia-* wheels (libcudart.so.13 is loaded at import),
# and the CPU-only wheels live on download.pytorch.org, not PyPI, so the
# full dependency set is installed (several GB; the time is printed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${DCP_PY_VENV:-/tmp/dcp-ci-venv}"

python3 -m venv "$venv"
start=$(date +%s)
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
    'torch==2.15.0' numpy pytest 'maturin>=1.5,<2'
echo "python test dependencies (torch 2.15.0 and its CUDA wheels) installed in $(( $(date +%s) - start )) s"

# The dcp command for the interchange tests (cargo test already built it).
(cd "$repo" && cargo build --quiet -p dcp-cli)
start=$(date +%s)
rm -rf "$venv/wheels"
"$venv/bin/maturin" build --quiet --release -m "$here/Cargo.toml" -o "$venv/wheels"
"$venv/bin/pip" install --quiet --force-reinstall --no-deps "$venv"/wheels/dcp-*.whl
echo "dcp wheel built and installed in $(( $(date +%s) - start )) s"

cd "$here"
CI="${CI:-true}" "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider tests
