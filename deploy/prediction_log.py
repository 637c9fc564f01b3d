"""The endpoint's prediction log: every answer, operator feedback and pilot event, in one SQLite file per UTC day.

Layout of a log folder (`params.yaml` `prediction_log.dir`):

    2026-12-04.sqlite      tables predictions, feedback, events (WAL journal; -wal/-shm beside it while in use)
    2026-12-05.sqlite
    images/ab/ab12....png  kept images, named by the sha256 of the image (content-addressed)

A prediction goes to the file of the UTC day of its `time`; feedback and events go to the day they arrive. Rows
are only ever INSERTed: nothing here UPDATEs, DELETEs or VACUUMs, and a past day's file is opened for writing only
for records whose time falls on that day, so yesterday's file stops changing once its writers moved on.

Writing: `PredictionLog.append()` only puts the record in a buffer; a daemon thread commits the buffer every
`flush_s` (<= 1 s) in one transaction per day file, so a SIGKILL loses at most the last `flush_s` of records.
Several processes may append to the same folder at once (SQLite locking with a busy timeout); a commit that finds
the file locked keeps its records buffered and tries again, so a record is never dropped. Create one
`PredictionLog` per process: a child forked from a process that holds one starts its own connections and thread on
its first append (the records still buffered at the fork belong to the parent, which commits them).

Querying, for analysts (`sqlite3`, pandas, DuckDB), read-only while the endpoint writes:

    sqlite3 -readonly artifacts/prediction-log/2026-12-04.sqlite \\
        "SELECT version, route, count(*), avg(latency_ms) FROM predictions GROUP BY version, route"

    import sqlite3, pandas as pd
    con = sqlite3.connect("file:artifacts/prediction-log/2026-12-04.sqlite?mode=ro", uri=True)
    df = pd.read_sql("SELECT * FROM predictions WHERE status = 'ok'", con)

    INSTALL sqlite; LOAD sqlite;   -- DuckDB
    ATTACH 'artifacts/prediction-log/2026-12-04.sqlite' AS d4 (TYPE sqlite, READ_ONLY);
    SELECT route, count(*) FROM d4.predictions GROUP BY route;

or, over several days at once, `read_predictions(folder, since="7d")` here (`vitops feedback accuracy` prints the
realized accuracy per version and route).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import re
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_bytes
from vitops.deploy.guardrails import Accuracy, accuracy

log = logging.getLogger(__name__)

ROUTES = ("champion", "canary", "shadow")
STATUSES = ("ok", "error")
SCHEMA_VERSION = 1
_KEEP_SALT = b"vitops-keep-image:"  # not the canary's salt: kept images must not all be canary images
_SHA = re.compile(r"[0-9a-f]{64}")
_DAY_FILE = re.compile(r"(\d{4}-\d{2}-\d{2})\.sqlite")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
_BUSY_MS = 5_000  # how long one commit waits for another process's write lock before it retries later
_FLUSH_DEADLINE_S = 60.0  # an explicit flush()/close() keeps retrying a locked file this long


class LogError(ValueError):
    """A record, value, folder or day file the log cannot use; the message names it and what to do."""


@dataclass(frozen=True)
class Prediction:
    """One answer of the endpoint (or one attempt of the pilot), as logged."""

    time: float  # unix seconds (UTC) when the answer was given
    request_id: str  # uuid4 hex per image answered; a shadow record carries its champion's request_id
    sha256: str
    model: str  # registered model name
    version: str
    engine: str  # e.g. onnxruntime-fp32
    label: str | None  # None when status == "error"
    confidence: float | None
    latency_ms: float  # champion/canary: request arrival -> answer; shadow: dequeue -> answer
    route: str  # one of ROUTES
    station: str
    status: str = "ok"  # "ok" | "error"
    error: str = ""
    champion_label: str | None = None  # shadow: the champion's label for the same request
    champion_confidence: float | None = None
    image: str = ""  # path of the kept image relative to the log dir, "" when not kept


@dataclass(frozen=True)
class Feedback:
    """An operator's verdict on an image: its true label."""

    time: float
    sha256: str
    label: str
    operator: str
    source: str  # "api" or "csv:<file name>"
    station: str = ""


PREDICTION_COLUMNS = tuple(f.name for f in fields(Prediction))
FEEDBACK_COLUMNS = tuple(f.name for f in fields(Feedback))
EVENT_COLUMNS = ("time", "kind", "detail", "host", "pid")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS predictions (
    time REAL NOT NULL, request_id TEXT NOT NULL, sha256 TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    engine TEXT NOT NULL, label TEXT, confidence REAL, latency_ms REAL NOT NULL, route TEXT NOT NULL,
    station TEXT NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL, champion_label TEXT, champion_confidence REAL,
    image TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time);
CREATE INDEX IF NOT EXISTS predictions_sha256 ON predictions (sha256);
CREATE TABLE IF NOT EXISTS feedback (
    time REAL NOT NULL, sha256 TEXT NOT NULL, label TEXT NOT NULL, operator TEXT NOT NULL, source TEXT NOT NULL,
    station TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_time ON feedback (time);
CREATE INDEX IF NOT EXISTS feedback_sha256 ON feedback (sha256);
CREATE TABLE IF NOT EXISTS events (time REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL, host TEXT NOT NULL,
    pid INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
PRAGMA user_version = {SCHEMA_VERSION};
"""
_INSERT = {
    "predictions": f"INSERT INTO predictions VALUES ({', '.join('?' * len(PREDICTION_COLUMNS))})",
    "feedback": f"INSERT INTO feedback VALUES ({', '.join('?' * len(FEEDBACK_COLUMNS))})",
    "events": f"INSERT INTO events VALUES ({', '.join('?' * len(EVENT_COLUMNS))})",
}
# Connections inherited across a fork are never closed in the child: closing one there could checkpoint or unlink
# the parent's WAL. The child parks them here for the life of the process.
_INHERITED: list[sqlite3.Connection] = []
_OPEN_LOGS: weakref.WeakSet[PredictionLog] = weakref.WeakSet()
_HELD: list[PredictionLog] = []  # logs whose commit lock a fork in progress holds
_FORK_HOOKS: list[bool] = []


def _before_fork() -> None:
    # No commit may be under way in a fork: a child would inherit SQLite's internal locks held mid-call.
    for plog in list(_OPEN_LOGS):
        if plog._pid == os.getpid() and plog._write_lock.acquire(timeout=2 * _BUSY_MS / 1000):
            _HELD.append(plog)


def _after_fork_in_parent() -> None:
    while _HELD:
        _HELD.pop()._write_lock.release()


def _after_fork_in_child() -> None:
    _HELD.clear()
    for plog in list(_OPEN_LOGS):
        plog._park()


def day_of(t: float) -> str:
    """The UTC day of a unix time, as its file stem: `2026-12-04`."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def check_sha256(sha256: str) -> str:
    """The hash itself if it is 64 lowercase hex digits, else LogError."""
    if not isinstance(sha256, str) or not _SHA.fullmatch(sha256):
        raise LogError(f"{sha256!r} is not a sha256 (64 lowercase hex digits): send the hash of the image's bytes")
    return sha256


def _check_folder(folder: Path | str) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LogError(f"prediction log dir {folder} is a file: set prediction_log.dir to a folder")
    return folder


def _check_time(value: float, what: str) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise LogError(f"{what} time {value!r} is not a unix time in seconds (e.g. time.time())")


def _check_prediction(record: Prediction) -> tuple:
    if not isinstance(record, Prediction):
        raise LogError(f"append() takes a Prediction, got {type(record).__name__}: use append_feedback for Feedback")
    check_sha256(record.sha256)
    _check_time(record.time, "prediction")
    if record.route not in ROUTES:
        raise LogError(f"route {record.route!r} of request {record.request_id} is not one of {', '.join(ROUTES)}")
    if record.status not in STATUSES:
        raise LogError(f"status {record.status!r} of request {record.request_id} is not one of {', '.join(STATUSES)}")
    if record.status == "ok" and record.label is None:
        raise LogError(f"request {record.request_id}: an ok answer needs a label (use status='error' otherwise)")
    return tuple(getattr(record, name) for name in PREDICTION_COLUMNS)


def _check_feedback(record: Feedback) -> tuple:
    if not isinstance(record, Feedback):
        raise LogError(f"append_feedback() takes a Feedback, got {type(record).__name__}")
    check_sha256(record.sha256)
    _check_time(record.time, "feedback")
    if not record.label:
        raise LogError(f"feedback for {record.sha256} has no label: send the image's true class")
    return tuple(getattr(record, name) for name in FEEDBACK_COLUMNS)


def _connect_write(path: Path) -> sqlite3.Connection:
    """A writing connection to one day file, its schema in place (created when the file is new)."""
    con = sqlite3.connect(path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        con.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise LogError(f"{path}: could not switch to the WAL journal (got {mode}); is the folder on a local disk?")
        con.execute("PRAGMA synchronous = NORMAL")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise LogError(
                f"{path} has log schema {version}, this code writes {SCHEMA_VERSION}: "
                "point prediction_log.dir at a new folder or upgrade vitops"
            )
        if version == 0:
            con.execute("BEGIN IMMEDIATE")  # several processes may create the same new day at once
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
    except BaseException:
        con.close()
        raise
    return con


def _corrupt(path: Path, err: Exception) -> LogError:
    return LogError(
        f"{path}: not a readable day file of the prediction log ({err}); move it aside "
        f"(mv {path} {path}.corrupt) and the log carries on with a fresh file for that day"
    )


class PredictionLog:
    """Appends from one process: append() only buffers (thread-safe, never blocks on disk); a daemon thread
    commits the buffer every `flush_s` (<= 1 s) in one transaction per day file, so a SIGKILL loses at most the
    last `flush_s` of records. Safe with several processes appending to the same dir (SQLite locking,
    busy_timeout). A PredictionLog must not cross a fork: create one per process (check os.getpid()); a child
    that appends to an inherited one gets its own connections and thread, never the parent's.

    Also a context manager: `with PredictionLog(folder) as plog: ...` closes (and so commits) on exit.
    """

    def __init__(self, folder: Path | str, flush_s: float = 0.5) -> None:
        """Start the flush thread; creates `folder` when missing.

        Args:
            folder: the log dir (`prediction_log.dir`).
            flush_s: how often the buffer is committed, in (0, 1] seconds (`prediction_log.flush_s`).
        """
        if not 0.0 < flush_s <= 1.0:
            raise LogError(f"flush_s {flush_s} must be in (0, 1] seconds (prediction_log.flush_s), e.g. 0.5")
        self.folder = _check_folder(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LogError(f"cannot create prediction log dir {self.folder}: {err}") from err
        self.flush_s = float(flush_s)
        self.host = socket.gethostname()
        self._start()
        if not _FORK_HOOKS:
            os.register_at_fork(
                before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
            )
            _FORK_HOOKS.append(True)
        _OPEN_LOGS.add(self)
        ref = weakref.ref(self)
        self._atexit = lambda: (plog := ref()) is not None and plog._close_quietly()
        atexit.register(self._atexit)

    def _start(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()  # guards _pending only: held for a list operation, never for I/O
        self._write_lock = threading.Lock()  # one writer at a time: the flush thread or a flush() caller
        self._pending: list[tuple[str, str, tuple]] = []  # (day, table, row), in arrival order
        self._in_flight = 0  # records taken from _pending by the commit under way
        self._connections: dict[str, sqlite3.Connection] = {}
        self._closed = False
        self.last_error: Exception | None = None  # the latest failed commit (its records stay buffered)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log-flush", daemon=True)
        self._thread.start()

    def _ensure_process(self) -> None:
        if self._pid != os.getpid():
            # Forked: the parent's buffered records, connections and thread are the parent's. Start afresh.
            self._park()
            if self._closed:
                self._pid = os.getpid()
            else:
                self._start()

    def _park(self) -> None:
        _INHERITED.extend(self._connections.values())
        self._connections = {}

    # -- appending -------------------------------------------------------------------------------------------

    def append(self, record: Prediction) -> None:
        """Buffer one answer; committed within `flush_s`. LogError for a malformed record (nothing buffered)."""
        row = _check_prediction(record)
        self._put(day_of(record.time), "predictions", row)

    def append_feedback(self, record: Feedback) -> None:
        """Buffer one operator verdict; it goes to the file of the day it arrives."""
        row = _check_feedback(record)
        self._put(day_of(time.time()), "feedback", row)

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        """Buffer one event (e.g. "breach", "pilot-started", "swap") with its JSON-serialisable details."""
        if not isinstance(kind, str) or not kind:
            raise LogError(f"event kind {kind!r} must be a non-empty string, e.g. 'breach'")
        try:
            text = json.dumps(detail, sort_keys=True, default=str)
        except (TypeError, ValueError) as err:
            raise LogError(f"details of event {kind!r} are not JSON: {err}") from err
        now = time.time()
        self._put(day_of(now), "events", (now, kind, text, self.host, os.getpid()))

    def _put(self, day: str, table: str, row: tuple) -> None:
        self._ensure_process()
        if self._closed:
            raise LogError(f"the prediction log of {self.folder} is closed: create a new PredictionLog")
        with self._lock:
            self._pending.append((day, table, row))

    @property
    def pending(self) -> int:
        """Records not committed yet: buffered, or in a commit under way."""
        with self._lock:
            return len(self._pending) + self._in_flight

    # -- committing ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self._commit()
            except Exception as err:  # the records stay buffered; the next tick tries again
                if repr(err) != repr(self.last_error):
                    log.error("prediction log: commit failed, records kept in memory: %s", err)
                self.last_error = err

    def _commit(self) -> int:
        """Commit everything buffered now; records of a day whose commit fails go back to the buffer's front."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                self._in_flight = len(batch)
            if not batch:
                return 0
            by_day: dict[str, dict[str, list[tuple]]] = {}
            for day, table, row in batch:
                by_day.setdefault(day, {}).setdefault(table, []).append(row)
            done: set[str] = set()
            error: Exception | None = None
            try:
                for day, tables in by_day.items():
                    try:
                        self._write_day(day, tables)
                        done.add(day)
                    except (sqlite3.Error, OSError, LogError) as err:
                        error = err
                for day in set(self._connections) - set(by_day):
                    # a day that got no records in this batch is over for this process: let its file settle
                    self._connections.pop(day).close()
            finally:  # whatever happened, a record not committed goes back to the buffer, in order
                with self._lock:
                    self._pending[:0] = [item for item in batch if item[0] not in done]
                    self._in_flight = 0
            if error is not None:
                raise error
            self.last_error = None
            return len(batch)

    def _write_day(self, day: str, tables: dict[str, list[tuple]]) -> None:
        path = self.folder / f"{day}.sqlite"
        con = self._connections.get(day)
        try:
            if con is None:
                con = self._connections[day] = _connect_write(path)
            con.execute("BEGIN IMMEDIATE")
            try:
                for table, rows in tables.items():
                    con.executemany(_INSERT[table], rows)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as err:
            if day in self._connections:
                self._connections.pop(day).close()
            if isinstance(err, sqlite3.OperationalError):
                raise  # locked or busy: retried
            raise _corrupt(path, err) from err

    def flush(self) -> None:
        """Commit everything buffered now, retrying a locked file for up to a minute; LogError if it cannot."""
        self._ensure_process()
        deadline = time.monotonic() + _FLUSH_DEADLINE_S
        while True:
            try:
                self._commit()
                return
            except sqlite3.OperationalError as err:
                if time.monotonic() > deadline:
                    raise LogError(
                        f"{self.folder}: could not commit {self.pending} records for {_FLUSH_DEADLINE_S:g} s ({err}); "
                        "they are still in memory: is another process holding the day file locked?"
                    ) from err
                time.sleep(0.05)
            except (sqlite3.Error, OSError) as err:
                raise LogError(f"{self.folder}: could not commit {self.pending} records: {err}") from err

    def close(self) -> None:
        """Stop the thread and commit what is buffered; idempotent. LogError when a commit cannot be made (the
        message says how many records stay unwritten and why)."""
        self._ensure_process()
        if self._closed:
            return
        self._stop.set()
        self._thread.join()
        try:
            self.flush()
        finally:
            self._closed = True
            for con in self._connections.values():
                con.close()
            self._connections.clear()
            _OPEN_LOGS.discard(self)
            atexit.unregister(self._atexit)

    def _close_quietly(self) -> None:
        if self._pid == os.getpid():
            try:
                self.close()
            except Exception as err:
                log.error("prediction log %s: records lost at exit: %s", self.folder, err)

    def __enter__(self) -> PredictionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- kept images -----------------------------------------------------------------------------------------------


def should_keep(sha256: str, fraction: float) -> bool:
    """Whether an image is in the kept sample of `fraction`: a pure function of its hash (its own salt, not the
    canary's), so a retried image is kept or not alike everywhere, and a larger fraction only adds images."""
    if not 0.0 <= fraction <= 1.0:
        raise LogError(f"keep fraction {fraction} must be in [0, 1] (prediction_log.keep_images), e.g. 0.05")
    check_sha256(sha256)
    digest = hashlib.sha256(_KEEP_SALT + sha256.encode("ascii")).hexdigest()
    return int(digest[:13], 16) / float(1 << 52) < fraction


def image_path(folder: Path | str, sha256: str) -> Path | None:
    """The kept image of a hash (`<folder>/images/<sha[:2]>/<sha>.<ext>`), or None when it was not kept."""
    check_sha256(sha256)
    shard = _check_folder(folder) / "images" / sha256[:2]
    if not shard.is_dir():
        return None
    found = sorted(p for p in shard.glob(f"{sha256}.*") if not p.name.startswith("."))
    return found[0] if found else None


def keep_image(folder: Path | str, sha256: str, data: bytes, suffix: str) -> str:
    """Keep an image under its hash, atomically (temporary file, fsync, rename) and once: a second call for the
    same hash leaves the first file as it is.

    Args:
        folder: the log dir.
        sha256: the image's hash as logged (of the file's bytes, or of a tensor's raw bytes).
        data: the bytes to keep (the image file, or e.g. an .npy of a tensor).
        suffix: file extension, e.g. ".png" or "jpg".

    Returns:
        The path relative to `folder` (for `Prediction.image`), e.g. `images/ab/ab12...ef.png`.
    """
    check_sha256(sha256)
    folder = _check_folder(folder)
    ext = "." + suffix.lower().lstrip(".") if suffix else ".bin"
    if not _SUFFIX.fullmatch(ext):
        raise LogError(f"image suffix {suffix!r} is not a file extension such as '.png'")
    existing = image_path(folder, sha256)
    if existing is not None:
        return existing.relative_to(folder).as_posix()
    target = folder / "images" / sha256[:2] / f"{sha256}{ext}"
    try:
        atomic_write_bytes(target, bytes(data))
    except OSError as err:
        raise LogError(f"cannot keep image {target}: {err}") from err
    return target.relative_to(folder).as_posix()


# -- reading -----------------------------------------------------------------------------------------------------


def day_files(folder: Path | str, since: float | None = None, until: float | None = None) -> list[Path]:
    """The day files of a log, oldest first, limited to the days that [since, until) touches."""
    folder = _check_folder(folder)
    if not folder.is_dir():
        return []
    first = day_of(since) if since is not None else ""
    last = day_of(until) if until is not None else "9999"
    days = []
    for path in folder.iterdir():
        match = _DAY_FILE.fullmatch(path.name)
        if match and first <= match.group(1) <= last:
            days.append(path)
    return sorted(days)


def _query(path: Path, sql: str, args: Sequence[Any]) -> list[tuple]:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_MS / 1000)
    except sqlite3.Error as err:
        raise _corrupt(path, err) from err
    try:
        con.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError as err:
        if "no such table" in str(err):
            return []  # a file created by a writer that has not committed its schema yet
        if "not a database" in str(err) or "malformed" in str(err):
            raise _corrupt(path, err) from err
        raise LogError(f"{path}: cannot read it now ({err}); try again") from err
    except sqlite3.DatabaseError as err:
        raise _corrupt(path, err) from err
    finally:
        con.close()


def _where(since: float | None, until: float | None, **equal: Any) -> tuple[str, list[Any]]:
    clauses, args = [], []
    if since is not None:
        clauses.append("time >= ?")
        args.append(float(since))
    if until is not None:
        clauses.append("time < ?")
        args.append(float(until))
    for column, value in equal.items():
        if value is None:
            continue
        values = [value] if isinstance(value, str) else list(value)
        clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
        args.extend(str(v) for v in values)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _frame(rows: Iterable[tuple], columns: Sequence[str], floats: Sequence[str]) -> Any:
    import pandas as pd

    frame = pd.DataFrame.from_records(list(rows), columns=list(columns))
    for column in floats:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def _times(since: float | str | None, until: float | str | None) -> tuple[float | None, float | None]:
    since = parse_time(since) if isinstance(since, str) else since
    until = parse_time(until) if isinstance(until, str) else until
    return since, until


def read_predictions(
    folder: Path | str,
    since: float | str | None = None,
    until: float | str | None = None,
    *,
    model: str | None = None,
    version: str | Sequence[str] | None = None,
    route: str | Sequence[str] | None = None,
    last: int | None = None,
) -> Any:
    """The logged answers in [since, until), oldest first, as a pandas DataFrame whose columns are Prediction's
    fields (confidence columns float with NaN for None).

    Args:
        folder: the log dir; a missing one has no records.
        since, until: unix times or `parse_time` text ("24h", "2026-12-04").
        model, version, route: keep only these (a version or route may also be a list of them).
        last: keep only the most recent `last` matching records (still returned oldest first).
    """
    if route is not None:
        for name in [route] if isinstance(route, str) else route:
            if name not in ROUTES:
                raise LogError(f"route {name!r} is not one of {', '.join(ROUTES)}")
    since, until = _times(since, until)
    where, args = _where(since, until, model=model, version=version, route=route)
    columns = ", ".join(PREDICTION_COLUMNS)
    rows: list[tuple] = []
    if last is None:
        for path in day_files(folder, since, until):
            rows.extend(_query(path, f"SELECT {columns} FROM predictions{where} ORDER BY time, rowid", args))
    else:
        for path in reversed(day_files(folder, since, until)):
            wanted = last - len(rows)
            if wanted <= 0:
                break
            sql = f"SELECT {columns} FROM predictions{where} ORDER BY time DESC, rowid DESC LIMIT ?"
            rows.extend(_query(path, sql, [*args, wanted]))
        rows.reverse()
    frame = _frame(rows, PREDICTION_COLUMNS, ("time", "confidence", "latency_ms", "champion_confidence"))
    return frame.sort_values("time", kind="stable", ignore_index=True)


def read_feedback(folder: Path | str, since: float | str | None = None, until: float | str | None = None) -> Any:
    """The operators' feedback with `time` in [since, until), oldest first, as a DataFrame of Feedback's fields."""
    since, until = _times(since, until)
    where, args = _where(since, until)
    rows: list[tuple] = []
    # feedback is filed by arrival, which is never before its time: a file of a day after `until` may hold some
    for path in day_files(folder, since, None):
        rows.extend(_query(path, f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback{where} ORDER BY rowid", args))
    frame = _frame(rows, FEEDBACK_COLUMNS, ("time",))
    return frame.sort_values("time", kind="stable", ignore_index=True)


def read_events(
    folder: Path | str, since: float | str | None = None, until: float | str | None = None, kind: str | None = None
) -> Any:
    """The logged events in [since, until), oldest first: time, kind, detail (a dict), host, pid."""
    since, until = _times(since, until)
    where, args = _where(since, until, kind=kind)
    rows: list[tuple] = []
    for path in day_files(folder, since, until):
        rows.extend(_query(path, f"SELECT {', '.join(EVENT_COLUMNS)} FROM events{where} ORDER BY rowid", args))
    frame = _frame(rows, EVENT_COLUMNS, ("time",))
    frame["detail"] = [json.loads(text) for text in frame["detail"]]
    return frame.sort_values("time", kind="stable", ignore_index=True)


def latest_labels(folder: Path | str) -> dict[str, Feedback]:
    """The last feedback per sha256 (by its time; of equal times, the one filed last wins)."""
    labels: dict[str, Feedback] = {}
    for row in read_feedback(folder).itertuples(index=False):
        labels[row.sha256] = Feedback(**row._asdict())
    return labels


# -- realized accuracy -------------------------------------------------------------------------------------------


@dataclass
class RealizedAccuracy:
    """Top-1 of one model version on one route, over the logged images that operators labelled."""

    model: str
    version: str
    route: str
    answered: int  # distinct images answered (status ok)
    accuracy: Accuracy  # over the labelled ones (its n = labelled images)

    @property
    def labelled(self) -> int:
        """Distinct answered images that have feedback."""
        return self.accuracy.n

    def as_dict(self) -> dict[str, Any]:
        """All fields, the accuracy's flattened, for JSON."""
        out = {k: v for k, v in asdict(self).items() if k != "accuracy"}
        return out | {"labelled": self.labelled} | self.accuracy.as_dict()

    def describe(self) -> str:
        """E.g. `vit-line v3 canary: 97.50 % (78/80, 95% CI 91.3..99.3); 80 of 412 answered images labelled`."""
        return (
            f"{self.model} v{self.version} {self.route}: {self.accuracy.describe()}; "
            f"{self.labelled} of {self.answered} answered images labelled"
        )


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def realized_accuracy(
    folder: Path | str,
    since: float | str | None = None,
    until: float | str | None = None,
    confidence: float = 0.95,
    model: str | None = None,
) -> list[RealizedAccuracy]:
    """Realized accuracy per (model, version, route): the ok answers in [since, until) joined with the latest
    feedback per sha256. A retried image counts once per (sha256, version, route) (its latest answer); the interval
    is Wilson's (`deploy.guardrails.accuracy`). Sorted by model, version, route."""
    frame = read_predictions(folder, since, until, model=model)
    frame = frame[frame["status"] == "ok"]
    frame = frame.drop_duplicates(["model", "sha256", "version", "route"], keep="last")
    truth = {sha: fb.label for sha, fb in latest_labels(folder).items()}
    results = []
    for (name, version, route), group in frame.groupby(["model", "version", "route"], sort=False):
        labels = group["sha256"].map(truth)
        labelled = labels.notna()
        correct = int((group["label"][labelled] == labels[labelled]).sum())
        acc = accuracy(correct, int(labelled.sum()), confidence)
        results.append(RealizedAccuracy(str(name), str(version), str(route), len(group), acc))
    return sorted(results, key=lambda r: (r.model, _version_key(r.version), ROUTES.index(r.route)))


# -- times -------------------------------------------------------------------------------------------------------

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time as unix seconds, from `2026-12-04` (UTC midnight), `2026-12-04T10:00` (UTC),
    ISO 8601 with a zone (`2026-12-04T10:00+01:00`, `...Z`), an age (`90s`, `90m`, `24h`, `7d`, `2w`: that long
    before `now`), `now`, or unix seconds (`1796400000`)."""
    text = str(text).strip()
    now = time.time() if now is None else now
    if text.lower() == "now":
        return now
    if match := _AGO.fullmatch(text.lower()):
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text) if re.fullmatch(r"\d{9,}(\.\d+)?", text) else _iso(text)
    except ValueError:
        raise LogError(
            f"time {text!r} is not a date (2026-12-04), an ISO time (2026-12-04T10:00, UTC unless it has a zone), "
            "an age such as 90m, 24h or 7d, or unix seconds"
        ) from None


def _iso(text: str) -> float:
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def day_start(t: float) -> float:
    """Unix time of the UTC midnight that begins the day of `t`."""
    day = datetime.fromtimestamp(t, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()
