"""DVC data versions in a real git + DVC repository with a local-folder remote, driven through the `vitops` CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import tree_digest, write_clean, write_png

from vitops.data_checks.sample import write_sample
from vitops.flows.cli import main
from vitops.flows.versioning import data_version, list_versions


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git + DVC repository (cwd) whose params.yaml points at a local-folder remote."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "test@example.com")
    _git(repo, "config", "user.name", "vitops test")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text(f"data:\n  remote: {tmp_path / 'remote'}\n", encoding="utf-8")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    monkeypatch.chdir(repo)
    return repo


def test_import_push_pull_versions_and_checkout(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    write_sample(src, size=30)
    os_link = src / "3" / "elsewhere.png"
    os_link.symlink_to(tmp_path / "nowhere.png")
    before = tree_digest(src)

    assert main(["data", "import", str(src)]) == 0
    assert "not imported: 3/elsewhere.png (symbolic link" in capsys.readouterr().err
    raw = repo / "data" / "raw"
    v1 = data_version(Path("data/raw"))
    assert v1 and v1.endswith(".dir")
    assert tree_digest(src) == before, "the source folder is never modified"
    copied = tree_digest(raw)
    assert copied == {k: v for k, v in before.items() if not v.startswith("link:") and not k.startswith(".")}
    assert "data: import src" in _git(repo, "log", "-1", "--format=%s")
    assert _git(repo, "status", "--porcelain", ".dvc/config") == "", "the remote goes to the local config"
    assert any((tmp_path / "remote").rglob("*")), "pushed to the remote"

    # Wipe the cache and the data; pulling from the remote restores the same version.
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(raw)
    assert main(["data", "pull"]) == 0
    assert tree_digest(raw) == copied and data_version(Path("data/raw")) == v1
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data/raw.dvc"], capture_output=True, text=True)
    assert "up to date" in status.stdout

    # A second import of more images is a new version; the first can still be checked out.
    write_sample(src, size=60)
    assert main(["data", "import", str(src)]) == 0
    v2 = data_version(Path("data/raw"))
    assert v2 != v1 and len(tree_digest(raw)) == 60
    assert [v.version for v in list_versions(Path("data/raw"))] == [v2, v1]
    capsys.readouterr()
    assert main(["data", "versions"]) == 0 and v1 in capsys.readouterr().out

    shutil.rmtree(repo / ".dvc" / "cache")  # the old version must come back from the remote
    assert main(["data", "checkout", "HEAD~1"]) == 0
    assert data_version(Path("data/raw")) == v1 and tree_digest(raw) == copied
    assert main(["data", "checkout", "HEAD"]) == 0
    assert data_version(Path("data/raw")) == v2
    capsys.readouterr()
    assert main(["data", "version"]) == 0 and capsys.readouterr().out.strip() == v2


def test_conflicts_and_mixed_layouts_are_refused_before_copying(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = tmp_path / "first"
    write_clean(first, {"a": 3, "b": 3})
    assert main(["data", "import", str(first), "--no-push"]) == 0
    head, raw_before = _git(repo, "rev-parse", "HEAD"), tree_digest(repo / "data" / "raw")

    clash = tmp_path / "clash"
    write_clean(clash, {"a": 2}, seed=900, prefix="fresh")  # new files that would be fine ...
    write_png(clash / "b" / "img_000.png", seed=999)  # ... and one that differs from b/img_000.png
    capsys.readouterr()
    assert main(["data", "import", str(clash), "--no-push"]) == 2
    err = capsys.readouterr().err
    assert "1 file(s)" in err and "b/img_000.png" in err and "nothing was copied" in err
    assert tree_digest(repo / "data" / "raw") == raw_before and _git(repo, "rev-parse", "HEAD") == head

    split = tmp_path / "split"
    write_clean(split / "train", {"a": 2}, seed=700)
    assert main(["data", "import", str(split), "--no-push"]) == 2
    assert "pre-split" in capsys.readouterr().err

    mixed = tmp_path / "mixed"
    write_clean(mixed / "train", {"a": 1}, seed=800)
    write_clean(mixed, {"cats": 1}, seed=801)
    assert main(["data", "import", str(mixed), "--no-push"]) == 2
    assert "mixes split folders (train) with label folders (cats)" in capsys.readouterr().err
    assert tree_digest(repo / "data" / "raw") == raw_before and _git(repo, "rev-parse", "HEAD") == head

    # Checking out another version would lose files that are in no version: refused.
    write_png(repo / "data" / "raw" / "a" / "unrecorded.png", seed=555)
    assert main(["data", "checkout", "HEAD"]) == 2
    assert "would lose those changes" in capsys.readouterr().err
    assert (repo / "data" / "raw" / "a" / "unrecorded.png").exists()


def test_pre_split_source_keeps_its_layout(tmp_path: Path) -> None:
    from vitops.flows.versioning import plan_import

    src = tmp_path / "src"
    write_clean(src / "train", {"a": 2}, seed=10)
    write_clean(src / "val", {"a": 1}, seed=20)
    (src / "train" / ".DS_Store").write_bytes(b"x")
    plan = plan_import(src, tmp_path / "raw")
    assert plan.layout == "split"
    assert plan.copy == ["train/a/img_000.png", "train/a/img_001.png", "val/a/img_000.png"]
