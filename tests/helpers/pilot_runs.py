"""Running the pilot the way a user does, for the pilot tests: `vitops` processes against the test servers, the
Prefect API read over HTTP, and a paused `promote` run found and started."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def vitops(env: dict[str, Any], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m vitops ARGS` in `cwd` and capture its output."""
    cmd = [sys.executable, "-m", "vitops", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def prefect_api(env: dict[str, Any], path: str, body: dict | None = None) -> Any:
    """A JSON request to the Prefect API at env's PREFECT_API_URL (a POST when there is a body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def start_promote(env: dict[str, Any], cwd: Path, params: Path, version: str) -> subprocess.Popen:
    """`vitops pilot promote` in the background (it pauses for an approval); stdout and stderr together."""
    cmd = [sys.executable, "-m", "vitops", "--params", str(params), "pilot", "promote", "--version", version]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def paused_run(env: dict[str, Any], params: Path, proc: subprocess.Popen, timeout: float = 120) -> str:
    """The id of the paused promote run of this params file (the run waits for its approval)."""
    deadline = time.monotonic() + timeout
    body = {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "sort": "START_TIME_DESC", "limit": 20}
    while time.monotonic() < deadline:
        for run in prefect_api(env, "/flow_runs/filter", body):
            if run["parameters"].get("params_file") == str(params):
                return run["id"]
        if proc.poll() is not None:
            raise AssertionError(f"promote ended before pausing: {proc.stdout.read()}")  # type: ignore[union-attr]
        time.sleep(1)
    raise AssertionError("promote never paused for an approval")
