"""The prediction log: records round-trip, one file per UTC day that stops changing once its day is over, several
processes appending at once, a SIGKILL that loses only the last flush, forks, locked files, feedback joined into
realized accuracy, kept images, and clear errors for bad input."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vitops.deploy import prediction_log as pl
from vitops.deploy.guardrails import accuracy, routes_to_candidate
from vitops.deploy.prediction_log import Feedback, LogError, Prediction, PredictionLog

DAY1 = pl.parse_time("2025-03-01T10:00")  # days long past: feedback and events go to today's file
DAY2 = DAY1 + 86_400
DAY3 = DAY2 + 86_400


def sha(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def answer(i: int, t: float = DAY1, **changes: object) -> Prediction:
    record = Prediction(
        time=t,
        request_id=f"req-{i}",
        sha256=sha(i),
        model="line",
        version="1",
        engine="onnxruntime-fp32",
        label="ok",
        confidence=0.9,
        latency_ms=12.5,
        route="champion",
        station="st-1",
    )
    return replace(record, **changes)


def records(frame) -> list[Prediction]:
    return [Prediction(**row) for row in frame.astype(object).where(frame.notna(), None).to_dict("records")]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_records_round_trip_with_every_field(tmp_path: Path) -> None:
    sent = [
        answer(0),
        answer(
            1,
            DAY1 + 0.123456,
            version="7",
            engine="openvino-int8",
            label="scratch",
            confidence=0.4321,
            latency_ms=3.25,
            route="shadow",
            station="st-2",
            champion_label="ok",
            champion_confidence=0.875,
            image="images/ab/x.png",
        ),
        answer(2, DAY1 + 1, route="canary", status="error", error="RuntimeError: boom", label=None, confidence=None),
    ]
    with PredictionLog(tmp_path, flush_s=0.1) as plog:
        for record in sent:
            plog.append(record)
        plog.append_feedback(Feedback(DAY1 + 5, sha(1), "scratch", "ana", "csv:line.csv", "st-2"))
        plog.event("breach", {"version": "7", "reasons": ["error_rate"]})
    assert records(pl.read_predictions(tmp_path)) == sent
    assert list(pl.read_predictions(tmp_path).columns) == list(pl.PREDICTION_COLUMNS)
    assert pl.latest_labels(tmp_path) == {sha(1): Feedback(DAY1 + 5, sha(1), "scratch", "ana", "csv:line.csv", "st-2")}
    events = pl.read_events(tmp_path, kind="breach")
    assert events["detail"].tolist() == [{"version": "7", "reasons": ["error_rate"]}]


def test_a_file_per_utc_day_and_a_past_day_is_never_changed(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path, flush_s=1.0)
    plog.append(answer(0, DAY1 + 3600))
    plog.append(answer(1, pl.parse_time("2025-03-02") - 0.001))  # 23:59:59.999 UTC still belongs to day 1
    plog.flush()
    plog.append(answer(2, pl.parse_time("2025-03-02")))
    plog.flush()  # day 1 had no records in this commit: its file is left to settle
    past = tmp_path / "2025-03-01.sqlite"
    before = file_hash(past)
    for i in range(3, 200):
        plog.append(answer(i, DAY2 + i if i % 2 else DAY3 + i))
        plog.append_feedback(Feedback(time.time(), sha(i), "ok", "ana", "api"))
        plog.event("swap", {"i": i})
    plog.close()
    today = pl.day_of(time.time())  # where the feedback and events went
    assert {p.stem for p in tmp_path.glob("*.sqlite")} == {"2025-03-01", "2025-03-02", "2025-03-03", today}
    assert file_hash(past) == before
    assert not (tmp_path / "2025-03-01.sqlite-wal").exists()
    day1 = pl.read_predictions(tmp_path, "2025-03-01", "2025-03-02")
    assert day1["request_id"].tolist() == ["req-0", "req-1"]
    assert len(pl.read_predictions(tmp_path)) == 200


def _append_many(folder: str, prefix: str, n: int) -> None:
    with PredictionLog(Path(folder), flush_s=0.05) as plog:
        for i in range(n):
            plog.append(answer(i, DAY1 + i if i % 2 else DAY2 + i, request_id=f"{prefix}-{i}", station=prefix))
            if i % 20 == 0:
                time.sleep(0.002)  # a few records at a time, as requests come: the two processes' commits interleave


def test_two_processes_appending_at_once_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), name, 2000)) for name in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    ids = pl.read_predictions(tmp_path)["request_id"].tolist()
    assert len(ids) == 4000
    assert set(ids) == {f"{p}-{i}" for p in ("a", "b") for i in range(2000)}


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from vitops.deploy.prediction_log import Prediction, PredictionLog

    folder, progress = Path(sys.argv[1]), open(sys.argv[2], "w")
    plog = PredictionLog(folder, flush_s=float(sys.argv[3]))
    i = 0
    while True:
        for _ in range(20):
            plog.append(Prediction(time.time(), str(i), "ab" * 32, "line", "1", "ort", "ok", 0.9, 1.0, "champion", "s"))
            i += 1
        progress.write(f"{i} {time.time()}\\n")  # i records were appended by this time
        progress.flush()
        os.fsync(progress.fileno())
        time.sleep(0.01)
    """
)


def test_a_sigkill_loses_only_the_records_of_the_last_flush(tmp_path: Path) -> None:
    flush_s, margin = 0.2, 1.0
    folder, progress = tmp_path / "log", tmp_path / "progress.txt"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(folder), str(progress), str(flush_s)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # run until records older than flush_s + margin exist
            lines = progress.read_text().split() if progress.exists() else []
            if len(lines) >= 4 and float(lines[-1]) - float(lines[1]) > 2 * (flush_s + margin):
                break
            assert proc.poll() is None, "the writer died before it was killed"
            time.sleep(0.05)
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    reports = [line.split() for line in progress.read_text().splitlines() if line.count(" ") == 1]
    safe = max(int(n) for n, t in reports if float(t) <= killed_at - (flush_s + margin))
    assert safe > 0
    ids = sorted(int(i) for i in pl.read_predictions(folder)["request_id"])
    assert ids == list(range(len(ids))), "the log must hold the appended records in order, without gaps or repeats"
    assert len(ids) >= safe, f"{safe} records were appended {flush_s + margin} s before the kill; {len(ids)} logged"
    for day in folder.glob("*.sqlite"):
        with sqlite3.connect(day) as con:
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with PredictionLog(folder) as plog:  # a restarted endpoint appends to the same files
        plog.append(answer(0, time.time(), request_id=str(len(ids))))
    assert len(pl.read_predictions(folder)) == len(ids) + 1


def _append_on_inherited(plog: PredictionLog) -> None:
    for i in range(300):
        plog.append(answer(i, request_id=f"child-{i}"))
    plog.close()


def test_a_forked_child_never_writes_through_the_parents_log(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path, flush_s=1.0)
    for i in range(100):
        plog.append(answer(i, request_id=f"early-{i}"))
    plog.flush()
    for i in range(50):
        plog.append(answer(i, request_id=f"buffered-{i}"))  # still in the parent's buffer at the fork
    child = multiprocessing.get_context("fork").Process(target=_append_on_inherited, args=(plog,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    for i in range(100):
        plog.append(answer(i, request_id=f"late-{i}"))
    plog.close()
    ids = pl.read_predictions(tmp_path)["request_id"].tolist()
    assert len(ids) == len(set(ids)) == 550
    assert {i.split("-")[0] for i in ids} == {"early", "buffered", "child", "late"}
    with sqlite3.connect(tmp_path / "2025-03-01.sqlite") as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_locked_day_file_keeps_records_buffered_until_it_frees(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pl, "_BUSY_MS", 20)
    with PredictionLog(tmp_path, flush_s=0.05) as plog:
        plog.append(answer(0))
        plog.flush()
        blocker = sqlite3.connect(tmp_path / "2025-03-01.sqlite", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        for i in range(1, 500):
            plog.append(answer(i))  # never waits for the lock
        deadline = time.monotonic() + 30
        while plog.last_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "locked" in str(plog.last_error)
        assert plog.pending == 499
        assert pl.read_predictions(tmp_path)["request_id"].tolist() == ["req-0"]  # readers are not blocked
        blocker.execute("ROLLBACK")
        blocker.close()
    assert pl.read_predictions(tmp_path)["request_id"].tolist() == [f"req-{i}" for i in range(500)]


def test_feedback_joins_the_log_into_realized_accuracy_per_version_and_route(tmp_path: Path) -> None:
    now = time.time()
    with PredictionLog(tmp_path) as plog:
        for i in range(40):
            # the champion gets 30 of 40 right, the canary (v2) all of its 20, the shadow (v2) 10 of 40
            plog.append(answer(i, now - 100 + i, label="ok" if i < 30 else "scratch"))
            plog.append(answer(i, now - 100 + i, version="2", route="shadow", label="ok" if i < 10 else "dent"))
        for i in range(40, 60):
            plog.append(answer(i, now - 50 + i, version="2", route="canary"))
        for i in range(40, 50):  # retried images: answered again, counted once
            plog.append(answer(i, now - 5, version="2", route="canary", request_id=f"retry-{i}"))
        plog.append(answer(60, now - 1, version="2", route="canary", status="error", label=None, confidence=None))
        for i in range(60):
            plog.append_feedback(Feedback(now - 30, sha(i), "scratch" if i < 30 else "ok", "ana", "api"))
        for i in range(60):  # a later verdict overrides the first one
            plog.append_feedback(Feedback(now - 20, sha(i), "ok" if i < 30 else "scratch", "bo", "csv:fix.csv"))
        for i in range(60, 70):  # feedback for images never answered joins nothing
            plog.append_feedback(Feedback(now - 20, sha(i), "ok", "bo", "api"))
    rows = pl.realized_accuracy(tmp_path, since="1h")
    assert [(r.model, r.version, r.route) for r in rows] == [("line", "1", "champion"), ("line", "2", "canary"),
                                                              ("line", "2", "shadow")]  # fmt: skip
    champion, canary, shadow = rows
    assert (champion.accuracy.correct, champion.labelled, champion.answered) == (40, 40, 40)
    assert (canary.accuracy.correct, canary.labelled, canary.answered) == (0, 20, 20)
    assert (shadow.accuracy.correct, shadow.labelled) == (10, 40)
    assert shadow.accuracy == accuracy(10, 40, 0.95)
    assert 0 < shadow.accuracy.low < 0.25 < shadow.accuracy.high < 1
    assert "line v2 shadow: 25.00 % (10/40, 95% CI" in shadow.describe()
    assert pl.realized_accuracy(tmp_path, since="1h", confidence=0.99)[2].accuracy == accuracy(10, 40, 0.99)
    assert pl.realized_accuracy(tmp_path, until=now - 1000) == []
    assert pl.latest_labels(tmp_path)[sha(0)].operator == "bo"


def test_keep_image_is_content_addressed_idempotent_and_atomic(tmp_path: Path, monkeypatch) -> None:
    data = b"\x89PNG fake image bytes"
    digest = hashlib.sha256(data).hexdigest()
    rel = pl.keep_image(tmp_path, digest, data, ".png")
    assert rel == f"images/{digest[:2]}/{digest}.png"
    assert (tmp_path / rel).read_bytes() == data
    assert pl.image_path(tmp_path, digest) == tmp_path / rel
    assert pl.keep_image(tmp_path, digest, b"other bytes", "jpg") == rel  # kept once: the first file stays
    assert (tmp_path / rel).read_bytes() == data

    other = sha("other")

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("vitops.common.files.os.replace", crash)
    with pytest.raises(LogError, match="cannot keep image"):
        pl.keep_image(tmp_path, other, data, "png")
    assert pl.image_path(tmp_path, other) is None
    assert sorted(p.name for p in (tmp_path / "images").rglob("*") if p.is_file()) == [f"{digest}.png"]


def test_should_keep_is_a_deterministic_sample_unlike_the_canary() -> None:
    shas = [sha(i) for i in range(2000)]
    small = {s for s in shas if pl.should_keep(s, 0.1)}
    large = {s for s in shas if pl.should_keep(s, 0.5)}
    assert small == {s for s in shas if pl.should_keep(s, 0.1)}
    assert small <= large and 100 < len(small) < 300 and 850 < len(large) < 1150
    assert large != {s for s in shas if routes_to_candidate(s, 0.5)}
    assert not any(pl.should_keep(s, 0.0) for s in shas) and all(pl.should_keep(s, 1.0) for s in shas)


def test_bad_input_is_refused_with_the_value_and_what_to_do(tmp_path: Path) -> None:
    with PredictionLog(tmp_path / "log") as plog:
        with pytest.raises(LogError, match="'ABC' is not a sha256"):
            plog.append(answer(0, sha256="ABC"))
        with pytest.raises(LogError, match="route 'pilot'.*champion, canary, shadow"):
            plog.append(answer(0, route="pilot"))
        with pytest.raises(LogError, match="not a sha256"):
            plog.append_feedback(Feedback(DAY1, "x" * 64, "ok", "ana", "api"))
        with pytest.raises(LogError, match="needs a label"):
            plog.append(answer(0, label=None))
        assert plog.pending == 0
    with pytest.raises(LogError, match="closed"):
        plog.append(answer(0))
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(LogError, match=f"{afile} is a file"):
        PredictionLog(afile)
    with pytest.raises(LogError, match="is a file"):
        pl.read_predictions(afile)
    assert pl.read_predictions(tmp_path / "missing").empty
    with pytest.raises(LogError, match="flush_s"):
        PredictionLog(tmp_path / "log", flush_s=5)


def test_a_corrupt_day_file_is_named_and_its_records_are_kept_in_memory(tmp_path: Path) -> None:
    corrupt = tmp_path / "2025-03-01.sqlite"
    corrupt.write_bytes(b"not sqlite at all" * 500)
    with pytest.raises(LogError, match=f"{corrupt}: not a readable day file.*mv "):
        pl.read_predictions(tmp_path)
    plog = PredictionLog(tmp_path, flush_s=1.0)
    plog.append(answer(0))
    with pytest.raises(LogError, match=f"{corrupt}: not a readable day file"):
        plog.flush()
    assert plog.pending == 1
    corrupt.rename(tmp_path / "2025-03-01.sqlite.corrupt")  # what the message says to do
    plog.close()
    assert pl.read_predictions(tmp_path)["request_id"].tolist() == ["req-0"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01", DAY1 - 10 * 3600),
        ("2025-03-01T10:00", DAY1),
        ("2025-03-01T11:00+01:00", DAY1),
        ("2025-03-01T10:00:00Z", DAY1),
        ("1740823200", DAY1),
        ("24h", 1_000_000_000 - 86_400),
        ("90m", 1_000_000_000 - 5_400),
        ("7d", 1_000_000_000 - 7 * 86_400),
        ("now", 1_000_000_000),
    ],
)
def test_parse_time_reads_dates_iso_times_and_ages(text: str, expected: float) -> None:
    assert pl.parse_time(text, now=1_000_000_000) == expected


def test_parse_time_names_a_bad_value() -> None:
    with pytest.raises(LogError, match="'yesterday' is not a date.*24h"):
        pl.parse_time("yesterday")
