import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(why: str) -> None:
    """Skip for a missing tool, saying why; under CI=true, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: required)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def dcp_cli() -> str:
    """The `dcp` command: $DCP_CLI, or target/{release,debug}/dcp of this
    repository (`cargo build -p dcp-cli`)."""
    cands = [os.environ.get("DCP_CLI")] + [
        str(REPO / "target" / p / "dcp") for p in ("release", "debug")
    ]
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        cands += [str(Path(target) / p / "dcp") for p in ("release", "debug")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    if shutil.which("cargo"):
        subprocess.run(
            ["cargo", "build", "-q", "-p", "dcp-cli"], cwd=REPO, check=True
        )
        for c in cands[1:]:
            if c and os.path.isfile(c):
                return c
    missing("the dcp command is not built (cargo build -p dcp-cli, or set DCP_CLI)")
    raise AssertionError("unreachable")
