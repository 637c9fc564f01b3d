"""Load on the line-side endpoint against `mlflow models serve` of the same version, then across an alias move.

    python bench/endpoint_load.py [--clients 8] [--seconds 30] [--image FILE] [--model NAME] [--dry-run]
    python bench/endpoint_load.py --shadow [--rate R] [--rounds 2] [--seconds 30]

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

`--shadow` (issue 20) measures what a pilot in shadow costs the champion instead: one endpoint, a steady request
rate below saturation (`--rate`, default 40 % of the req/s that `--clients` closed-loop clients reach in a short
probe, whose batches are fuller than an open loop's) sent open-loop (each request at its scheduled time, latency
counted from then), distinct PNGs on `/predict`, for `--seconds` without a pilot and `--seconds` with the second
bench version in shadow, `--rounds` times in alternation, each phase 3 s after the switch (steady state: the
pilot's loading is over). It prints p50/p95/p99 without and with the shadow, their ratio, and the images the
shadow scored and dropped, and says SATURATED when a phase fell behind its rate. Target: the champion's p95 with
the shadow at most 1.1x its p95 without.
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
    parser.add_argument("--shadow", action="store_true", help="the champion's latency without and with a shadow")
    parser.add_argument("--rate", type=float, help="--shadow: requests/s (default: 40%% of the probed throughput)")
    parser.add_argument("--rounds", type=int, default=2, help="--shadow: alternations of without and with")
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
    if args.shadow:
        return _shadow_bench(args, params, name)
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
    _write_params(work, params)
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


def _write_params(work: Path, params: object) -> None:
    """The bench endpoint's params.yaml: params.yaml's endpoint (no auth, poll_s 1 s), its log under `work`."""
    import yaml

    endpoint = params.endpoint.model_dump(mode="json") | {"poll_s": 1.0, "cache_dir": str(work / "cache")}
    endpoint = {k: v for k, v in endpoint.items() if k not in ("token_env", "webhook_secret_env")}
    log = params.prediction_log.model_dump(mode="json") | {"dir": str(work / "prediction-log")}
    (work / "params.yaml").write_text(yaml.safe_dump({"endpoint": endpoint, "prediction_log": log}))


def _shadow_bench(args: argparse.Namespace, params: object, name: str) -> int:
    """The champion's p50/p95/p99 at a steady rate without and with the second bench version in shadow."""
    from mlflow import MlflowClient

    images = [_png(seed) for seed in range(64)]
    plan = (f"shadow cost: {args.rounds} x ({args.seconds:g} s without + {args.seconds:g} s with a shadow) at "
            f"{f'{args.rate:g} req/s' if args.rate else '40 % of the probed req/s'}, open loop, 64 distinct PNGs on "
            f"/predict; model {name} at {os.environ['MLFLOW_TRACKING_URI']}; CPU {_cpu()}")  # fmt: skip
    if args.dry_run:
        print("plan:", plan)
        return 0
    print(plan, flush=True)
    bench_name, first, second = _bench_versions(name)
    client = MlflowClient()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shadow-", dir=args.workdir))
    _write_params(work, params)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start([sys.executable, "-m", "vitops", "--params", str(work / "params.yaml"), "endpoint", bench_name,
                   "--port", str(port)], f"{base}/v2/health/ready", work / "endpoint.log")  # fmt: skip
    try:
        rate = args.rate
        if not rate:
            probe = asyncio.run(_load(f"{base}/predict", _body(images[0]), args.clients, min(10.0, args.seconds)))
            rate = 0.4 * _stats(probe["rows"], probe["seconds"])["rps"]
            print(f"probe: {rate / 0.4:.1f} req/s with {args.clients} closed-loop clients; sending {rate:.1f} req/s",
                  flush=True)  # fmt: skip
        phases: dict[str, list] = {"without": [], "with": []}
        shadow = {"scored": 0, "dropped": 0}
        for _ in range(args.rounds):
            _pilot(client, base, bench_name, second, on=False)
            time.sleep(3.0)  # steady state: the shadow's last images and the pilot's loading are over
            phases["without"] += _saturation(asyncio.run(_open_loop(f"{base}/predict", images, rate, args.seconds)))
            _pilot(client, base, bench_name, second, on=True)
            time.sleep(3.0)
            before = _pilot(client, base, bench_name, second, on=True)
            phases["with"] += _saturation(asyncio.run(_open_loop(f"{base}/predict", images, rate, args.seconds)))
            time.sleep(2.0)  # the shadow's last images
            after = _pilot(client, base, bench_name, second, on=True)
            shadow["scored"] += after["scored"] - before["scored"]
            shadow["dropped"] += sum(after.get(k, 0) - before.get(k, 0) for k in ("dropped_full", "dropped_not_loaded"))
        _pilot(client, base, bench_name, second, on=False)
        _shadow_table(phases, shadow, rate, args.rounds * args.seconds)
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


def _pilot(client: object, base: str, name: str, version: str, on: bool) -> dict:
    """Put `version` in shadow (or take `pilot` away) and wait until the endpoint has; the shadow's counts."""
    import httpx

    if on:
        from datetime import UTC, datetime

        client.set_model_version_tag(name, version, "pilot.stage", "shadow")
        client.set_model_version_tag(name, version, "pilot.stage_since", datetime.now(UTC).isoformat())
        client.set_registered_model_alias(name, "pilot", version)
    elif "pilot" in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, "pilot")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pilot = httpx.get(f"{base}/v2/models/{name}", timeout=10).json()["pilot"]
        if (pilot["shadow"]["version"] == version) if on else (pilot["version"] is None):
            return pilot["shadow"]
        time.sleep(0.5)
    raise SystemExit(f"the endpoint did not {'start' if on else 'stop'} the shadow of version {version} in 180 s")


async def _open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> list:
    """`rate` requests/s for `seconds`, each sent at its scheduled time whatever the earlier ones do; latency counts
    from the scheduled time, so a stalled server is not hidden by a client that waited for it."""
    import httpx

    rows: list[tuple[float, float, int, str]] = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(i: int, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                r = await http.post(url, **_body(images[i % len(images)]))
                rows.append((due, time.monotonic() - due, r.status_code, ""))
            except httpx.HTTPError:
                rows.append((due, time.monotonic() - due, 0, ""))

        start = time.monotonic() + 0.5
        n = int(rate * seconds)
        await asyncio.gather(*(one(i, start + i / rate) for i in range(n)))
    return rows


def _saturation(rows: list) -> list:
    """Warn when a phase did not keep up with its rate: its last answer came over a second after its last request."""
    if rows:
        lag = max(due + seconds for due, seconds, _, _ in rows) - max(due for due, _, _, _ in rows)
        if lag > 1.0:
            print(f"SATURATED: the last answer came {lag:.1f} s after the last request; these numbers measure a "
                  "backlog, not the shadow: run again with a lower --rate", flush=True)  # fmt: skip
    return rows


def _body(png: bytes) -> dict:
    return {"content": png, "headers": {"Content-Type": "image/png"}}


def _shadow_table(phases: dict, shadow: dict, rate: float, seconds: float) -> None:
    stats = {k: _stats(rows, seconds) for k, rows in phases.items()}
    print(f"\nchampion at {rate:.1f} req/s, open loop, {seconds:g} s per phase (all rounds)")
    print(f"{'phase':14} {'answers':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} {'shadow scored':>14} "
          f"{'shadow dropped':>15}")  # fmt: skip
    for phase, s in stats.items():
        scored, dropped = (shadow["scored"], shadow["dropped"]) if phase == "with" else ("-", "-")
        print(f"{phase + ' shadow':14} {len(phases[phase]):8d} {s['p50']:8.2f} {s['p95']:8.2f} {s['p99']:8.2f} "
              f"{s['errors']:7d} {scored!s:>14} {dropped!s:>15}")  # fmt: skip
    w, wo = stats["with"], stats["without"]
    print(f"{'with/without':14} {'':8} {w['p50'] / wo['p50']:7.2f}x {w['p95'] / wo['p95']:7.2f}x "
          f"{w['p99'] / wo['p99']:7.2f}x")  # fmt: skip
    ratio = w["p95"] / wo["p95"]
    print(f"target: p95 with the shadow <= 1.1x without: {'met' if ratio <= 1.1 else 'MISSED'} ({ratio:.2f}x)")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


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


def _png(seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


if __name__ == "__main__":
    sys.exit(main())
