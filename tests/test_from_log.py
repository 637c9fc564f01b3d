"""`vitops data from-log` in a real git + DVC repository with a local-folder remote: the labelled, kept images of
the prediction log (written here with `PredictionLog` and `keep_image`, as the endpoint writes them) become an
ImageFolder, disagreements first, and then a new data version beside the old files, through the data gate; a
failed gate leaves the data version as it was; the log is never changed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.data import noise_image, tree_digest, write_clean

from vitops.deploy.prediction_log import Feedback, Prediction, PredictionLog, keep_image
from vitops.flows.cli import main
from vitops.flows.versioning import data_version, list_versions


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _png(seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    noise_image(seed).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repository (cwd) holding a first data version of 12 bolt and 12 nut images."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "test@example.com")
    _git(repo, "config", "user.name", "vitops test")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    params = {
        "data": {"remote": str(tmp_path / "remote"), "classes": ["bolt", "nut"]},
        "validate": {"min_images_per_class": 3, "workers": 1, "manifest": str(tmp_path / "a" / "manifest.csv"),
                     "report": str(tmp_path / "a" / "validation" / "report.json")},
        "prediction_log": {"dir": str(tmp_path / "log")},
    }  # fmt: skip
    (repo / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    monkeypatch.chdir(repo)
    write_clean(tmp_path / "first", {"bolt": 12, "nut": 12}, seed=0)
    assert main(["data", "import", str(tmp_path / "first")]) == 0
    return repo


def _log(folder: Path, seed: int, label: str, confidence: float, *, shadow_label: str | None = None,
         feedback: str | None = None, keep: bytes | None = None) -> str:  # fmt: skip
    """One image answered by the champion (and the shadow), optionally kept and labelled; its sha256."""
    data = keep if keep is not None else _png(seed)
    sha = hashlib.sha256(data).hexdigest()
    kept = keep_image(folder, sha, data, ".png") if keep is not None or feedback else ""
    now = time.time() - 600
    with PredictionLog(folder) as plog:
        plog.append(Prediction(now, f"r{seed}", sha, "line-vit", "1", "onnxruntime-fp32", label, confidence, 2.0,
                               "champion", "st-1", image=kept))  # fmt: skip
        if shadow_label:
            plog.append(Prediction(now, f"r{seed}", sha, "line-vit", "2", "onnxruntime-fp32", shadow_label, 0.9, 4.0,
                                   "shadow", "st-1", champion_label=label, champion_confidence=confidence))  # fmt: skip
        if feedback:
            plog.append_feedback(Feedback(now + 1, sha, feedback, "ana", "api"))
    return sha


def _records(log: Path) -> dict[str, str]:
    """The day files and kept images (a reader's WAL and shared-memory files, SQLite's own, left out)."""
    return {k: v for k, v in tree_digest(log).items() if not k.endswith(("-wal", "-shm"))}


def test_from_log_makes_a_data_version_of_the_labelled_images(repo: Path, tmp_path: Path, capsys) -> None:
    log = tmp_path / "log"
    raw = repo / "data" / "raw"
    v1, before = data_version(Path("data/raw")), tree_digest(raw)
    disagreed = _log(log, 101, "bolt", 0.95, shadow_label="nut", feedback="nut")  # the shadow was right
    unsure = _log(log, 102, "nut", 0.41, feedback="nut")
    sure = _log(log, 103, "bolt", 0.97, feedback="bolt")
    unkept = _log(log, 104, "bolt", 0.5)  # labelled below, but its image was not kept
    with PredictionLog(log) as plog:
        plog.append_feedback(Feedback(time.time(), unkept, "bolt", "ana", "api"))
    _log(log, 105, "nut", 0.3, keep=_png(105))  # kept, never labelled: not taken
    known = _log(log, 106, "bolt", 0.8, feedback="bolt", keep=(raw / "bolt" / "img_000.png").read_bytes())
    screw = _log(log, 107, "bolt", 0.2, feedback="screw")  # a label outside data.classes
    log_before = _records(log)

    assert main(["data", "from-log", "--since", "1h", "--limit", "1", "--no-import", "--out", "one"]) == 0
    assert {p.relative_to("one").as_posix() for p in Path("one").rglob("*.png")} == {f"nut/{disagreed}.png"}
    assert main(["data", "from-log", "--since", "1h", "--limit", "2", "--no-import", "--out", "two"]) == 0
    assert {p.name for p in Path("two").rglob("*.png")} == {f"{disagreed}.png", f"{unsure}.png"}  # then the least sure
    out = capsys.readouterr()
    assert "1 disagreement(s) first" in out.out and "more left out by --limit" in out.out
    assert "1 labelled image(s) were not kept" in out.out
    assert "1 image(s) labelled 'screw' left out: not a class of data.classes" in out.err
    assert data_version(Path("data/raw")) == v1, "--no-import leaves the data alone"

    assert main(["data", "from-log", "--since", "1h", "--out", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    written = {p.relative_to(tmp_path / "all").as_posix() for p in (tmp_path / "all").rglob("*.png")}
    assert written == {f"nut/{disagreed}.png", f"nut/{unsure}.png", f"bolt/{sure}.png", f"bolt/{known}.png"}
    assert f"1 of them are in data version {v1} already" in out and "data gate passed" in out
    v2 = data_version(Path("data/raw"))
    assert v2 != v1 and f"data version {v2}" in out and f"was {v1}" in out
    after = tree_digest(raw)
    assert before.items() <= after.items(), "the old files are all still there, unchanged"
    assert set(after) - set(before) == {f"nut/{disagreed}.png", f"nut/{unsure}.png", f"bolt/{sure}.png"}
    assert sum(sha == hashlib.sha256((raw / "bolt" / "img_000.png").read_bytes()).hexdigest()
               for sha in after.values()) == 1, "an image already in the data is not added twice"  # fmt: skip
    assert [v.version for v in list_versions(Path("data/raw"))] == [v2, v1]
    assert "data: import from-log (3 new files)" in _git(repo, "log", "-1", "--format=%s")
    assert any((tmp_path / "remote").rglob("*")), "pushed to the remote"
    assert _records(log) == log_before, "the prediction log is never changed"
    assert screw not in "".join(written)

    # A broken kept image fails the data gate: exit 1, the data version and the folder stay as they were.
    _log(log, 108, "bolt", 0.1, feedback="bolt", keep=b"\x89PNG\r\n\x1a\n not really a png")
    head = _git(repo, "rev-parse", "HEAD")
    assert main(["data", "from-log", "--since", "1h", "--out", str(tmp_path / "again")]) == 1
    out = capsys.readouterr().out
    assert "data gate FAILED" in out and f"data version {v2} unchanged" in out
    assert data_version(Path("data/raw")) == v2 and tree_digest(raw) == after
    assert _git(repo, "rev-parse", "HEAD") == head
    assert not list(raw.parent.glob(".raw.from-log-*")), "the staging tree is gone"

    # An output folder that holds something is refused before anything is written.
    assert main(["data", "from-log", "--since", "1h", "--out", str(tmp_path / "all")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
