"""One import root: a built wheel installs only `vitops` into site-packages, and the CLI and `python -m vitops`
work from any directory, from the wheel as from the editable install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the venv's setuptools builds it, offline
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (found,) = out.glob("vitops-*.whl")
    return found


def test_the_wheel_holds_only_vitops_at_its_top_level(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"vitops", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    for package in ("flows", "flows/cli", "vit", "deploy", "data_checks", "common"):
        assert f"vitops/{package}/__init__.py" in names
    assert "vitops/__main__.py" in names and "vitops/flows/pyfunc_model.py" in names
    assert not [n for n in names if n.startswith("vitops/") and n.split("/")[1] in ("tests", "bench", "docs")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vitops = vitops.flows.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_runs_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the wheel's copy comes first on the path, so this imports it rather than the editable checkout
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [sys.executable, "-c", "import vitops.flows.cli; print(vitops.flows.cli.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(site)), where
    out = subprocess.run([sys.executable, "-m", "vitops", "--help"], cwd=elsewhere, env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0 and "retrain" in out.stdout and "usage: vitops" in out.stdout, out.stderr


def test_the_console_script_and_module_run_outside_the_checkout(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("vitops")
    for cmd in ([str(script), "--help"], [sys.executable, "-m", "vitops", "--help"]):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0 and "pretrain-standin" in out.stdout, out.stderr
    # a usage error from another directory: exit 2 with one message, no traceback
    out = subprocess.run([str(script), "lineage", "no-such-ref"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
