"""Orchestration and tracking overhead of the retrain flow: the same stages called directly, then through the
Prefect flow, in the same run, on the quickstart's digits (or fewer images with --images).

    python bench/flow_overhead.py [--images 300] [--epochs 2] [--workdir build/bench/flow]

Direct: each stage function (flows/validation.py, training.py, ...) in the flow's order, with MLflow tracking
on (the same local SQLite store), timed one by one. Flow: `retrain(force=True)` on Prefect's ephemeral API,
with every stage function timed inside its task. Overhead = the flow's wall time minus the time spent inside
the stage functions: Prefect's task and state bookkeeping, the concurrency slot, the skip check, the parent
MLflow run and the artifacts. Prints a table per stage and the overhead as a share of the direct wall time
(target: at most 10 %).
Run it alone: torch with 2 threads stalls when another process holds a core.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the flow tests' tiny-project builder

STAGES = ["validate", "train", "evaluate", "build", "bench", "gate", "register"]


def _timed(module: object, names: list[str], spent: dict[str, float]) -> None:
    """Wrap the stage functions that `module` imported so that the time inside each is added to `spent`."""
    for name in names:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args: object, __f=original, __n=name, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return __f(*args, **kwargs)
            finally:
                spent[__n] = spent.get(__n, 0.0) + time.perf_counter() - start

        setattr(module, name, wrapper)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench" / "flow")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_HOME", str(args.workdir / "prefect-home"))  # its own API database
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="project-", dir=args.workdir))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root.parent / (root.name + '-mlflow.db')}"

    from helpers.projects import make_project, set_params

    from vitops.flows.benchmark import bench
    from vitops.flows.config import load_params, params_hash
    from vitops.flows.engines import build
    from vitops.flows.evaluation import EvalSettings, evaluate
    from vitops.flows.gate import GateInputs, GateSettings, gate
    from vitops.flows.registration import RegisterInputs, register
    from vitops.flows.settings import dataset_of, recipe_for, run_context
    from vitops.flows.training import train
    from vitops.flows.validation import validate

    params_file = make_project(root, "bench-digits", images=args.images)
    set_params(params_file, train={"epochs": args.epochs}, baseline={"epochs": args.epochs})
    os.chdir(root)
    params = load_params(params_file)
    data, run, model = dataset_of(params), run_context(params), params.tracking.registered_model
    vit, baseline = params.train.out_dir / "model", params.baseline.out_dir / "model"
    ev, scoring = params.evaluate, EvalSettings.from_params(params)

    steps = [
        ("validate", lambda: validate(params.data.raw_dir, params.validate_, params.data)),
        ("train", lambda: train(recipe_for(params, baseline=True), data, overwrite=True, run=run)),
        ("evaluate", lambda: evaluate(baseline, data, ev.out_dir / "baseline", "baseline", scoring, run=run)),
        ("train", lambda: train(recipe_for(params), data, overwrite=True, run=run)),
        ("evaluate", lambda: evaluate(vit, data, ev.out_dir / "vit", "vit", scoring, run=run)),
        ("build", lambda: build(vit, data, params.export, params.engine)),
        (
            "bench",
            lambda: bench(
                vit, params.bench.out, params.bench, params.engine.out_dir, params.export.out, run=run, track=True
            ),
        ),  # fmt: skip
        ("gate", lambda: gate(vit, GateInputs.from_params(params), GateSettings.from_params(params), run)),
        ("register", lambda: register(vit, RegisterInputs.from_params(params), model, params_hash(params), run)),
    ]
    direct: dict[str, float] = {}
    start = time.perf_counter()
    for name, call in steps:
        t0 = time.perf_counter()
        call()
        direct[name] = direct.get(name, 0.0) + time.perf_counter() - t0
    direct_wall = time.perf_counter() - start

    from prefect import flow

    from vitops.flows import retrain as retrain_module
    from vitops.flows.retrain import retrain

    @flow
    def noop() -> None:
        """Starts the ephemeral API (once per process), so it is timed apart from the retrain."""

    t0 = time.perf_counter()
    noop()
    api_start = time.perf_counter() - t0

    inside: dict[str, float] = {}
    _timed(retrain_module, STAGES, inside)  # the flow's tasks call the stage functions it imported
    start = time.perf_counter()
    state = retrain(params_file=str(params_file), force=True, return_state=True)
    flow_wall = time.perf_counter() - start
    if not state.is_completed():
        print(f"the flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1

    rows = [("stage", "direct s", "in flow s")]
    rows += [(n, f"{direct[n]:.2f}", f"{inside.get(n, 0.0):.2f}") for n in STAGES]
    rows.append(("total", f"{direct_wall:.2f}", f"{flow_wall:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0 or i == len(rows) - 2:
            print("  ".join("-" * w for w in widths))
    overhead = flow_wall - sum(inside.values())
    share = overhead / direct_wall
    verdict = "meets" if share <= 0.10 else "MISSES"
    print(
        f"\noverhead (flow wall - time in stages): {overhead:.2f} s = {share:.1%} of the direct wall time "
        f"({verdict} the 10 % target); flow / direct wall: {flow_wall / direct_wall:.2f}x"
    )
    print(f"plus the ephemeral Prefect API's start, once per process (not with a running server): {api_start:.2f} s")
    print("direct runs first, so it pays the one-time imports (GX, the pyfunc code): compare totals, not rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
