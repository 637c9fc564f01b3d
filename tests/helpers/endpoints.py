"""A real `vitops endpoint` process for the integration tests, in a process group of its own so that a test can
SIGKILL all of its processes at once (LitServe's workers and API servers, the follower, the shadow)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def start_endpoint(work: Path, name: str, tracking_url: str, params: str, port: int) -> subprocess.Popen:
    """Start `vitops endpoint NAME` with `params` as its params.yaml (its state folder under `work`), and wait (up
    to 180 s) until it is ready; its output goes to `work/endpoint.log`."""
    (work / "params.yaml").write_text(params)
    (work / "tmp").mkdir(exist_ok=True)
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_url, "TMPDIR": str(work / "tmp")}
    cmd = [sys.executable, "-m", "vitops", "--params", str(work / "params.yaml"), "endpoint", name, "--port", str(port)]
    log = open(work / "endpoint.log", "w")  # noqa: SIM115 - the process owns it; closed by stop_endpoint
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_endpoint(proc)
            raise RuntimeError(f"the endpoint did not start: {(work / 'endpoint.log').read_text()[-3000:]}")
        time.sleep(0.5)


def stop_endpoint(proc: subprocess.Popen) -> None:
    """SIGTERM, as systemd stops it; the whole group is killed if it is not gone within 60 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_endpoint(proc)
    proc.log.close()  # type: ignore[attr-defined]


def kill_endpoint(proc: subprocess.Popen) -> float:
    """SIGKILL every process of the endpoint's group at once; returns the time of the kill."""
    at = time.time()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    return at


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A random RGB PNG, different for every seed."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
