"""The code version the retrain's skip decision compares: code changes move it, data commits and docs do not."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vitops.flows.versioning import code_version


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_code_version_follows_the_code_folders_only(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "train.py").write_text("lr = 1e-3\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "code")
    first = code_version(tmp_path)

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.dvc").write_text("outs:\n- md5: abc.dir\n")
    (tmp_path / "README.md").write_text("docs\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "data version")
    assert code_version(tmp_path) == first  # a new data version or docs are not a code change

    (tmp_path / "vit" / "train.py").write_text("lr = 5e-4\n")
    dirty = code_version(tmp_path)
    assert dirty.startswith(first + "-dirty-")  # uncommitted code counts, by its content
    _git(tmp_path, "commit", "-qam", "lr")
    assert code_version(tmp_path) not in (first, dirty)
    assert code_version(tmp_path / "nowhere") == "unknown"
