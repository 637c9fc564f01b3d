"""The code's layout holds: one import root, imports pointing one way (CLI -> flows -> stages -> tracking and
registry -> core -> common), no import cycles (imports inside functions included), MLflow only behind the
tracking and registry modules, and no flows/ module too long to read."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_checks", "deploy", "vit", "flows")
# The layers of flows/, lowest first: a module imports only its own layer or lower ones (and the core).
FLOWS_LAYERS = {
    "config": 0,
    "serving_config": 0,
    "retries": 0,
    "connection": 0,
    "signing": 0,
    "tracking": 1,
    "registry": 1,
    "aliases": 1,
    "access": 1,
    "artifacts": 1,
    "packaging": 1,
    "pyfunc_model": 1,
    "versioning": 1,
    "settings": 2,
    "summaries": 2,
    "records": 3,
    "validation": 3,
    "training": 3,
    "evaluation": 3,
    "engines": 3,
    "gpu_engines": 3,
    "benchmark": 3,
    "gate": 3,
    "registration": 3,
    "pilot_batch": 3,
    "pilot_log": 3,
    "from_log": 3,
    "scoring": 3,
    "promotion": 3,
    "approval": 3,
    "retrain": 4,
    "pilot": 4,
    "drift": 4,
    "endpoint": 4,
    "cli": 5,
}
# The core may import only these of vitops (DESIGN.md, "Layers").
CORE_MAY_IMPORT = {"common": set(), "data_checks": {"common"}, "vit": {"common"}, "deploy": {"common"}}
MLFLOW_MODULES = {
    "flows.tracking",
    "flows.registry",
    "flows.aliases",
    "flows.packaging",
    "flows.pyfunc_model",
    "flows.access",
    "flows.artifacts",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, names: set[str]) -> tuple[set[str], set[str]]:
    """The vitops modules a file imports anywhere (functions included), and the top-level names of the others."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from vitops.flows import tracking` imports the module vitops.flows.tracking
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("vitops."):
                inner = target.removeprefix("vitops.")
                while inner not in names and "." in inner:
                    inner = inner.rsplit(".", 1)[0]
                if inner in names:
                    ours.add(inner)
            else:
                others.add(target.split(".")[0])
    return ours, others


MODULES = _modules()
GRAPH = {name: _imports(path, set(MODULES)) for name, path in MODULES.items()}


def test_one_import_root_and_no_cycles_anywhere() -> None:
    graph = {name: {dep for dep in ours if dep != name and not name.startswith(dep + ".")}
             for name, (ours, _) in GRAPH.items()}  # fmt: skip
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert node.module.split(".")[0] not in PACKAGES, f"{path}: imports {node.module} outside vitops."


def test_the_core_imports_downwards_only_and_never_prefect_or_mlflow() -> None:
    for name, (ours, others) in GRAPH.items():
        package = name.split(".")[0]
        if package == "flows":
            continue
        allowed = CORE_MAY_IMPORT[package] | {package}
        assert {dep.split(".")[0] for dep in ours} <= allowed, f"{name} imports {sorted(ours)}"
        assert not others & {"prefect", "mlflow"}, f"{name} imports {sorted(others & {'prefect', 'mlflow'})}"


def test_flows_imports_point_one_way() -> None:
    for name, (ours, _) in GRAPH.items():
        if not name.startswith("flows."):
            continue
        layer = FLOWS_LAYERS[name.split(".")[1]]  # a new module of flows/ must be given its layer above
        for dep in ours:
            if dep.startswith("flows.") and dep != name:
                dep_layer = FLOWS_LAYERS[dep.split(".")[1]]
                assert dep_layer <= layer, f"{name} (layer {layer}) imports {dep} (layer {dep_layer})"


def test_mlflow_is_called_only_behind_tracking_and_registry() -> None:
    callers = {name for name, (_, others) in GRAPH.items() if "mlflow" in others}
    assert callers <= MLFLOW_MODULES, f"mlflow imported by {sorted(callers - MLFLOW_MODULES)}"


def test_no_flows_module_is_over_450_lines() -> None:
    long = {name: n for name, path in MODULES.items() if name.startswith("flows")
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > 450}  # fmt: skip
    assert not long, f"split these by concern: {long}"
