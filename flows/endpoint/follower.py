"""The registry follower: one process per endpoint that watches an alias and moves every worker to the version it
points at, all of them or none.

It reads the alias every `poll_s` (sooner when a signed MLflow webhook wakes it). On a move it

1. downloads the new version into the cache and checks each file's sha256 against the version's records
   (`registry.fetch_version`);
2. stages it: every worker loads it beside the version it serves, predicts the input example and warms it
   up, and reports (`worker.Worker`);
3. commits it when every worker passed, by naming it `serving` in `target.json`: each worker switches between
   two batches, so a request finishes on the version that accepted it; or, when any check failed, aborts it
   and keeps the old version, saying why in its log, in `follower.json` (read by `GET /v2/models/NAME`) and in
   `vitops_endpoint_swap_failures_total`.

A refused version is not tried again until the alias moves away from it; a registry that cannot be reached is
logged and read again at the next poll, while the served version goes on answering. A rollback is a move like
any other.

While it serves `champion`, each poll also reads `pilot` and publishes the version piloted beside the champion,
and every `pilot.online.check_every_s` it judges that pilot's logged answers by the online guardrails
(`watch.PilotWatch`).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitops.flows.endpoint import state

log = logging.getLogger("vitops.endpoint")


@dataclass(frozen=True)
class FollowerConfig:
    """What the follower process needs (picklable: it is handed to a spawned process)."""

    name: str
    alias: str
    poll_s: float
    swap_timeout_s: float
    cache_dir: Path
    state_dir: Path
    n_workers: int
    tracking_uri: str
    verbose: bool = False
    pilot: Any = None  # watch.PilotSettings; None: no pilot beside the served alias


class Refused(Exception):
    """A version failed one of its checks; `check` names which (sha256, load, input_example, warmup)."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check, self.reason = check, reason


def first_version(cfg: FollowerConfig) -> dict[str, str]:
    """Resolve the alias and fetch its version (checked), publishing it as `serving` before any worker starts.

    Raises:
        RegistryError: the alias is not set, the registry cannot be read, or the version fails its sha256 check.
    """
    from vitops.flows import registry

    holder = registry.current_aliases(cfg.name).get(cfg.alias)
    if holder is None:
        raise registry.RegistryError(
            f"{cfg.name} has no alias {cfg.alias!r} at {registry.server_uri()}: promote a version first "
            f"(vitops promote {cfg.name} --version N --alias {cfg.alias}) or serve another alias with --alias"
        )
    path = registry.fetch_version(cfg.name, holder, cfg.cache_dir)
    serving = {"version": holder, "path": str(path)}
    state.write(state.target_file(cfg.state_dir), {"serving": serving, "candidate": None, "pilot": None})
    _status(cfg, registry_version=holder, registry_error=None, refused=None)
    return serving


def follow(cfg: FollowerConfig) -> None:
    """The follower process's body: poll, move, repeat, until the endpoint ends it."""
    # Ctrl-C in a terminal reaches the whole process group: the main process stops this one, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
    configure_logging(cfg.verbose)
    from vitops.flows import registry
    from vitops.flows.endpoint import metrics
    from vitops.flows.endpoint.watch import PilotWatch

    watch = None
    if cfg.alias == "champion" and cfg.pilot is not None:
        # reading the log and judging the window is no work for the cores that answer requests
        os.nice(10)
        watch = PilotWatch(cfg.name, cfg.state_dir, cfg.cache_dir, cfg.pilot)
    refused: dict[str, str] = {}  # version -> why, forgotten once the alias points elsewhere
    seq, next_read = 0, 0.0
    while True:
        if time.monotonic() >= next_read or state.woken(cfg.state_dir):
            next_read = time.monotonic() + cfg.poll_s
            try:
                aliases = registry.current_aliases(cfg.name)
            except registry.RegistryError as err:
                metrics.REGISTRY_ERRORS.labels(cfg.name).inc()
                log.warning("cannot read %s@%s; still serving version %s: %s", cfg.name, cfg.alias, _served(cfg), err)
                _status(cfg, registry_error=str(err))
            else:
                _status(cfg, registry_version=aliases.get(cfg.alias), registry_error=None)
                refused = {v: why for v, why in refused.items() if v == aliases.get(cfg.alias)}
                seq = _follow_alias(cfg, aliases.get(cfg.alias), refused, seq)
                if watch is not None:
                    watch.follow(aliases.get("pilot"), _served(cfg))
        if watch is not None:
            watch.tick(_served(cfg))
        time.sleep(0.1)


def _served(cfg: FollowerConfig) -> str:
    return state.read(state.target_file(cfg.state_dir))["serving"]["version"]


def _follow_alias(cfg: FollowerConfig, holder: str | None, refused: dict[str, str], seq: int) -> int:
    """Move every worker to `holder` (all or none) if it is new and was not refused; returns the move counter."""
    from vitops.flows import registry
    from vitops.flows.endpoint import metrics

    serving = state.read(state.target_file(cfg.state_dir))["serving"]
    if holder is None:
        log.warning("%s@%s is not set; still serving version %s", cfg.name, cfg.alias, serving["version"])
        return seq
    if holder == serving["version"] or holder in refused:
        return seq
    seq += 1
    log.info("%s@%s moved %s -> %s: checking it beside the served version", cfg.name, cfg.alias,
             serving["version"], holder)  # fmt: skip
    try:
        path = _fetch(cfg, holder)
        _stage(cfg, seq, holder, path, serving)
    except Refused as err:
        refused[holder] = str(err)
        metrics.SWAP_FAILURES.labels(cfg.name, holder, err.check).inc()
        metrics.REFUSED.labels(cfg.name).set(int(holder))
        at = datetime.now(UTC).isoformat(timespec="seconds")
        _status(cfg, refused={"version": holder, "check": err.check, "reason": err.reason, "at": at})
        log.error("refused %s version %s (%s check failed: %s); still serving version %s", cfg.name, holder,
                  err.check, err.reason, serving["version"])  # fmt: skip
    except registry.RegistryError as err:  # the download itself failed: try again at the next poll
        metrics.REGISTRY_ERRORS.labels(cfg.name).inc()
        log.warning("cannot download %s version %s (will retry): %s", cfg.name, holder, err)
        _status(cfg, registry_error=str(err))
    else:
        metrics.SWAPS.labels(cfg.name).inc()
        _status(cfg, refused=None)
    return seq


def _fetch(cfg: FollowerConfig, version: str) -> Path:
    from vitops.flows import registry

    try:
        return registry.fetch_version(cfg.name, version, cfg.cache_dir)
    except registry.ArtifactCheckError as err:
        raise Refused("sha256", str(err)) from None


def _stage(cfg: FollowerConfig, seq: int, version: str, path: Path, serving: dict) -> None:
    """Have every worker check `version` beside the served one, then commit it, or abort and raise `Refused`."""
    candidate = {"seq": seq, "version": version, "path": str(path), "phase": "stage"}
    _target(cfg, serving=serving, candidate=candidate)
    deadline = time.monotonic() + cfg.swap_timeout_s
    while True:
        reports = [w.get("staged") or {} for w in state.workers(cfg.state_dir).values()]
        done = [r for r in reports if r.get("seq") == seq]
        failed = [r for r in done if not r.get("ok")]
        if failed or (len(done) >= cfg.n_workers and all(r.get("ok") for r in done)):
            break
        if time.monotonic() > deadline:
            failed = [{"check": "warmup", "reason": f"not ready within endpoint.swap_timeout_s ({cfg.swap_timeout_s})"}]
            break
        time.sleep(0.05)
    if failed:
        _target(cfg, serving=serving, candidate=candidate | {"phase": "abort"})
        raise Refused(failed[0].get("check", "load"), failed[0].get("reason", "unknown"))
    _target(cfg, serving={"version": version, "path": str(path)}, candidate=None)
    while time.monotonic() < deadline:  # the switch itself is one assignment per worker, within its next poll
        if all(w.get("version") == version for w in state.workers(cfg.state_dir).values()):
            break
        time.sleep(0.05)
    log.info("now serving %s version %s (was %s)", cfg.name, version, serving["version"])


def _target(cfg: FollowerConfig, **changes: Any) -> None:
    """Change `target.json`'s serving or candidate, keeping the pilot as it is."""
    path = state.target_file(cfg.state_dir)
    state.write(path, state.read(path) | changes)


def _status(cfg: FollowerConfig, **changes: object) -> None:
    path = state.follower_file(cfg.state_dir)
    current = state.read(path) or {"alias": cfg.alias, "poll_s": cfg.poll_s}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    state.write(path, current | changes | {"checked_at": now})


def configure_logging(verbose: bool) -> None:
    # A spawned process starts with no logging set up: the same lines as `vitops`, on stderr.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("vitops").setLevel(logging.INFO)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
