"""Load on the line-side endpoint against `mlflow models serve` of the same version, then across an alias move.

    python bench/endpoint_load.py [--clients 8] [--seconds 30] [--image FILE] [--model NAME] [--dry-run]

The quickstart model (`tracking.registered_model` at `MLFLOW_TRACKING_URI` or `tracking.uri`, after `make run`):
its `champion`, else its `candidate`. The user's model and aliases are left alone: the bench registers two
versions of a model of its own, `<NAME>-endpoint-bench`, both pointing at that version's artifacts, and moves
that model's `champion`.

1. Throughput: `--clients` concurrent httpx clients (asyncio, one process) for `--seconds` each against
   - `vitops endpoint` `/predict` with the PNG (decoding included),
   - `vitops endpoint` `/v2/models/NAME/infer` with the same image as a UINT8 tensor,
   - `mlflow models serve --env-manager local` `/invocations` with the same UINT8 tensor (it takes no PNG);
   printed as throughput, p50/p95/p99 and errors, with ratios to `mlflow models serve`.
2. Swap: the same load on `/predict` while `champion` moves half-way; failed requests (target 0) and the p99
   from the move until every answer comes from the new version, against the p99 before the move (target 2x).

Targets on 2 CPU cores (issue 19): at least 3x the throughput of `mlflow models serve` at an equal or lower p95;
0 failed requests across a swap; p99 during the swap at most 2x the p99 before. Run it alone: the servers and
the clients share the cores, so anything else running skews every number. `--dry-run` prints the plan only;
`--seconds 3` is a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--image", type=Path, help="a PNG (default: a generated 64x64 RGB image)")
    parser.add_argument("--model", help="registered model (default: params.yaml tracking.registered_model)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench" / "endpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    from vitops.flows.config import load_params
    from vitops.flows.tracking import tracking_uri

    params = load_params(args.params)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(params.tracking.uri)
    name = args.model or params.tracking.registered_model
    png = args.image.read_bytes() if args.image else _png()
    pixels = np.asarray(_decode(png))
    plan = (f"{args.clients} clients x {args.seconds:g} s against vitops endpoint (/predict PNG, OIP UINT8) and "
            f"mlflow models serve (UINT8), then a swap under load; model {name} at {os.environ['MLFLOW_TRACKING_URI']}"
            f", image {pixels.shape[1]}x{pixels.shape[0]}")  # fmt: skip
    if args.dry_run:
        print("plan:", plan)
        return 0
    print(plan, flush=True)
    bench_name, first, second = _bench_versions(name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    endpoint = params.endpoint.model_dump(mode="json") | {"poll_s": 1.0, "cache_dir": str(work / "cache")}
    endpoint = {k: v for k, v in endpoint.items() if k not in ("token_env", "webhook_secret_env")}
    (work / "params.yaml").write_text("endpoint:\n" + "".join(f"  {k}: {v}\n" for k, v in endpoint.items()))
    ours, theirs = _free_port(), _free_port()
    procs = [
        _start([sys.executable, "-m", "vitops", "--params", str(work / "params.yaml"), "endpoint", bench_name,
                "--port", str(ours)], f"http://127.0.0.1:{ours}/v2/health/ready", work / "endpoint.log"),
        _start([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{bench_name}/{first}",
                "--env-manager", "local", "--host", "127.0.0.1", "--port", str(theirs)],
               f"http://127.0.0.1:{theirs}/ping", work / "mlflow-serve.log"),
    ]  # fmt: skip
    try:
        tensor = {"name": "image", "datatype": "UINT8", "shape": [1, *pixels.shape], "data": pixels.ravel().tolist()}
        targets = [
            ("vitops /predict (PNG)", f"http://127.0.0.1:{ours}/predict", {"content": png,
             "headers": {"Content-Type": "image/png"}}),
            ("vitops OIP infer (UINT8)", f"http://127.0.0.1:{ours}/v2/models/{bench_name}/infer",
             {"json": {"inputs": [tensor]}}),
            ("mlflow models serve (UINT8)", f"http://127.0.0.1:{theirs}/invocations",
             {"json": {"inputs": pixels[None].tolist()}}),
        ]  # fmt: skip
        rows = [(label, asyncio.run(_load(url, kw, args.clients, args.seconds))) for label, url, kw in targets]
        _table(rows)
        swap = asyncio.run(_load(*targets[0][1:], args.clients, args.seconds, move=(bench_name, second)))
        _swap_report(swap)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    return 0


async def _load(url: str, kw: dict, clients: int, seconds: float, move: tuple[str, str] | None = None) -> dict:
    """`clients` loops posting `kw` to `url` for `seconds`; with `move`, champion moves half-way."""
    import httpx

    rows: list[tuple[float, float, int, str]] = []  # start, seconds, status, version
    end = time.monotonic() + seconds
    moved_at: list[float] = []

    async def client() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while time.monotonic() < end:
                start = time.monotonic()
                try:
                    r = await http.post(url, **kw)
                    version = r.json().get("version", "") if r.status_code == 200 and "predict" in url else ""
                    rows.append((start, time.monotonic() - start, r.status_code, version))
                except httpx.HTTPError:
                    rows.append((start, time.monotonic() - start, 0, ""))

    async def mover() -> None:
        await asyncio.sleep(seconds / 2)
        from mlflow import MlflowClient

        await asyncio.to_thread(MlflowClient().set_registered_model_alias, move[0], "champion", move[1])
        moved_at.append(time.monotonic())

    await asyncio.gather(*(client() for _ in range(clients)), *([mover()] if move else []))
    return {"rows": rows, "seconds": seconds, "moved_at": moved_at[0] if moved_at else None, "to": move and move[1]}


def _stats(rows: list, seconds: float) -> dict:
    ok = np.array([r[1] for r in rows if r[2] == 200]) * 1000
    pct = np.percentile(ok, [50, 95, 99]) if len(ok) else [float("nan")] * 3
    return {"rps": len(ok) / seconds, "p50": pct[0], "p95": pct[1], "p99": pct[2], "errors": len(rows) - len(ok)}


def _table(rows: list) -> None:
    base = _stats(rows[-1][1]["rows"], rows[-1][1]["seconds"])
    print(f"\n{'server':30} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} {'x req/s':>8} "
          f"{'x p95':>7}")  # fmt: skip
    for label, result in rows:
        s = _stats(result["rows"], result["seconds"])
        print(f"{label:30} {s['rps']:8.1f} {s['p50']:8.2f} {s['p95']:8.2f} {s['p99']:8.2f} {s['errors']:7d} "
              f"{s['rps'] / base['rps']:8.2f} {s['p95'] / base['p95']:7.2f}")  # fmt: skip


def _swap_report(result: dict) -> None:
    rows, moved = result["rows"], result["moved_at"]
    after = [r for r in rows if r[0] >= moved and r[3] == result["to"]]
    switched = min((r[0] for r in after), default=float("inf"))
    before = _stats([r for r in rows if r[0] < moved], moved - rows[0][0] if rows else 1.0)
    during = [r for r in rows if moved <= r[0] <= switched + 1.0]
    failed = sum(1 for r in rows if r[2] != 200)
    p99 = float(np.percentile([r[1] * 1000 for r in during if r[2] == 200], 99)) if during else float("nan")
    print(f"\nswap under load: {len(rows)} requests, {failed} failed; alias moved at +{moved - rows[0][0]:.1f} s, "
          f"first answer from version {result['to']} {switched - moved:.1f} s later")  # fmt: skip
    print(f"p99 before the move {before['p99']:.2f} ms; during the swap {p99:.2f} ms ({p99 / before['p99']:.2f}x)")


def _bench_versions(name: str) -> tuple[str, str, str]:
    """Two versions of `<name>-endpoint-bench` with the artifacts of `name`'s champion (else candidate)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    aliases = client.get_registered_model(name).aliases
    source = aliases.get("champion") or aliases.get("candidate")
    if source is None:
        raise SystemExit(f"{name} has no champion or candidate: run `make run` first")
    mv = client.get_model_version(name, source)
    bench = f"{name}-endpoint-bench"
    try:
        client.create_registered_model(bench, description=f"bench/endpoint_load.py copies of {name} {source}")
    except MlflowException:
        pass
    made = [client.create_model_version(bench, mv.source, mv.run_id, tags=dict(mv.tags)).version for _ in range(2)]
    client.set_registered_model_alias(bench, "champion", made[0])
    print(f"{bench} versions {made[0]} and {made[1]} = {name} version {source}", flush=True)
    return bench, str(made[0]), str(made[1])


def _start(cmd: list[str], health: str, log: Path) -> subprocess.Popen:
    import httpx

    # `mlflow models serve` runs `uvicorn` through bash: the venv's bin must be on PATH
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(health, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"{cmd[2:5]} did not start; see {log}:\n{log.read_text()[-2000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


if __name__ == "__main__":
    sys.exit(main())
