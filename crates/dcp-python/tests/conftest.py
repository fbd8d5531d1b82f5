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


class Moto:
    """A moto S3 server on 127.0.0.1 (`moto_server`), with the storage
    options that reach it."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url
        self.options = {
            "endpoint_url": url,
            "key": "testing",
            "secret": "testing",
            "region_name": "us-east-1",
        }

    def bucket(self, name: str) -> str:
        """Create bucket `name` (moto takes an unsigned PUT); returns it."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/{name}", method="PUT")).read()
        return name


def start_moto() -> "Moto | None":
    """Start `moto_server` on a free loopback port and wait until it
    answers; None when it is not installed."""
    import time
    import urllib.request

    exe = shutil.which("moto_server")
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            return Moto(proc, url)
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {url}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def moto():
    """A moto S3 server for the session (skips without `moto_server`;
    fails under CI=true)."""
    m = start_moto()
    if m is None:
        missing("moto_server is not installed (pip install 'moto[server]')")
    yield m
    m.proc.terminate()
    m.proc.wait(timeout=10)
