"""What the processes of one endpoint tell each other, as small JSON files in its state folder.

LitServe runs inference in worker processes and HTTP in API-server processes; the registry follower is a process
of its own. They share nothing but this folder (each file written atomically, so a reader sees the old or the
new one):

- `target.json` (follower): `serving`, the version every worker must serve (`version`, `path`),
  `candidate`, a version being checked beside it (`seq`, `version`, `path`, `phase`: `stage` or `abort`), and
  `pilot`, the version piloted beside the champion (`version`, `path`, `stage`: `shadow` or `canary`,
  `fraction`, `since`) or null. The follower commits a candidate by making it `serving`.
- `worker-<id>.json` (each worker): the version it serves (`version`, `engine`, `classes`, `img_size`), what
  became of the last candidate it staged (`seq`, `version`, `ok`, `check`, `reason`), and the canary's pilot it
  holds (`pilot_version`, `pilot_engine`, `pilot_failed`).
- `follower.json` (follower): the alias, where the registry last said it points, when it was last read, the
  last registry error, the last refused version with its failed check and reason, the pilot's last guardrail
  checks (`guardrails`) and its last breach (`breach`).
- `shadow.json` (the shadow process): the pilot it holds in shadow and the images it scored, failed and dropped.
- `wake` (an API server, on a signed webhook): asks the follower to read the registry now.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write


def write(path: Path, data: dict[str, Any]) -> None:
    """Publish one state file atomically."""
    text = json.dumps(data, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read(path: Path) -> dict[str, Any]:
    """A state file, or {} while it does not exist yet."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def target_file(folder: Path) -> Path:
    return folder / "target.json"


def follower_file(folder: Path) -> Path:
    return folder / "follower.json"


def shadow_file(folder: Path) -> Path:
    return folder / "shadow.json"


def worker_file(folder: Path, worker_id: int) -> Path:
    return folder / f"worker-{worker_id}.json"


def workers(folder: Path) -> dict[int, dict[str, Any]]:
    """Every worker's state by worker id."""
    found = {}
    for path in sorted(folder.glob("worker-*.json")):
        found[int(path.stem.split("-", 1)[1])] = read(path)
    return found


def wake(folder: Path) -> None:
    """Ask the follower to read the registry now."""
    (folder / "wake").write_text(str(time.time()), encoding="utf-8")


def woken(folder: Path) -> bool:
    """Whether someone asked for a read since the last call (and clear the request)."""
    try:
        os.unlink(folder / "wake")
        return True
    except FileNotFoundError:
        return False
