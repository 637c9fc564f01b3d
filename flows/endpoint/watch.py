"""The pilot beside the champion, as the follower keeps it: which version is piloted, in which stage, and the online
guardrails that stop it.

Every poll (only while the endpoint serves `champion`), `PilotWatch.follow` reads who holds `pilot` and that
version's stage tags (`pilot.stage`: `shadow` or `canary`; `pilot.canary_fraction`; `pilot.stage_since`, all
written by the pilot flow), fetches it with its sha256 checks (`registry.fetch_version`) and publishes it in
`target.json` as `pilot: {version, path, stage, fraction, since}`, or `pilot: null`. A version is not piloted when
it is the one served, when its stage tag says anything else (`stopped`, none), or when a guardrail stopped it here
(until the pilot flow starts a new stage of it).

Every `pilot.online.check_every_s`, `PilotWatch.tick` reads the pilot's most recent `window` records of its
stage from the prediction log, the champion's over the same span and the feedback since, and runs
`deploy.online_guardrails.check_window`. A breach

1. publishes `pilot: null` at once: the API servers stop routing within their 0.25 s snapshot, the workers and the
   shadow drop the pilot within 0.1 s;
2. tags the version `pilot.online.breach` (the reasons), `pilot.online.breach_time` and `pilot.stage=stopped`;
3. removes `pilot` through the registry's checked move (`aliases.move_alias(..., None, expect=<pilot>)`), with
   the failed checks as the reason; a lost race (someone moved `pilot` already) is logged, not fatal;
4. appends a `breach` event to the prediction log and counts `vitops_endpoint_guardrail_breaches_total`.

`champion` is never touched. Registry steps that fail (the server is down) are retried at every poll.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitops.flows.endpoint import state

log = logging.getLogger("vitops.endpoint")
STAGES = ("shadow", "canary")


@dataclass(frozen=True)
class PilotSettings:
    """What the watch needs of params.yaml (picklable: part of the follower's config)."""

    log: Any  # recorder.LogSettings
    rules: Any  # deploy.online_guardrails.OnlineRules
    check_every_s: float = 1.0
    canary_fraction: float = 0.3  # when a canary version carries no valid pilot.canary_fraction tag


class PilotWatch:
    """Publishes the pilot and judges it, in the follower process."""

    def __init__(self, name: str, state_dir: Path, cache_dir: Path, settings: PilotSettings) -> None:
        self.name, self.state_dir, self.cache_dir, self.settings = name, state_dir, cache_dir, settings
        self.pilot: dict[str, Any] | None = None
        self.stopped: dict[str, dict[str, Any]] = {}  # version -> its breach, with the registry steps done
        self._checked_at = 0.0
        self._plog: Any = None
        self._refused: dict[str, str] = {}  # version -> why it cannot be fetched (forgotten when pilot moves)
        # imported now, at the endpoint's start: pandas costs a second of CPU, not to be paid when a pilot starts
        import pandas  # noqa: F401

        import vitops.deploy.online_guardrails  # noqa: F401
        import vitops.deploy.prediction_log  # noqa: F401

    # -- which pilot ---------------------------------------------------------------------------------------------

    def follow(self, holder: str | None, serving: str) -> None:
        """Publish the pilot that `holder` (the version holding `pilot`, or None) should be, or none."""
        from vitops.flows import registry

        for version in list(self.stopped):
            self._settle(version)
        self._refused = {v: why for v, why in self._refused.items() if v == holder}
        if holder is None or holder == serving or holder in self._refused:
            return self._publish(None)
        try:
            tags = registry.version_info(self.name, holder).tags
        except registry.RegistryError as err:
            log.warning("cannot read the tags of %s pilot version %s; keeping the pilot as it is: %s", self.name,
                        holder, err)  # fmt: skip
            return
        stage, since = tags.get("pilot.stage"), tags.get("pilot.stage_since", "")
        breach = self.stopped.get(holder)
        if breach is not None and _unix(since) <= breach["time"]:
            return self._publish(None)  # stopped here; the pilot flow has not started a new stage since
        if stage not in STAGES:
            return self._publish(None)
        fraction = None
        if stage == "canary":
            fraction = _fraction(tags.get("pilot.canary_fraction"), self.settings.canary_fraction, self.name, holder)
        current = self.pilot or {}
        if current.get("version") == holder:
            path = current["path"]
        else:
            try:
                path = str(registry.fetch_version(self.name, holder, self.cache_dir))
            except registry.ArtifactCheckError as err:
                self._refused[holder] = str(err)
                log.error("%s pilot version %s failed its sha256 check; not piloted: %s", self.name, holder, err)
                return self._publish(None)
            except registry.RegistryError as err:
                log.warning("cannot download %s pilot version %s (will retry): %s", self.name, holder, err)
                return
        self._publish({"version": holder, "path": path, "stage": stage, "fraction": fraction, "since": since})

    def _publish(self, pilot: dict[str, Any] | None) -> None:
        from vitops.flows.endpoint import metrics

        if pilot == self.pilot:
            return
        target = state.target_file(self.state_dir)
        state.write(target, state.read(target) | {"pilot": pilot})
        old, self.pilot = self.pilot, pilot
        for stage in STAGES:
            metrics.PILOT.labels(self.name, stage).set(
                int(pilot["version"]) if pilot and pilot["stage"] == stage else 0
            )
        if pilot is None:
            log.info("%s: no pilot beside the champion now (was version %s)", self.name, (old or {}).get("version"))
            self._event("pilot-stopped", {"version": (old or {}).get("version")})
        else:
            share = f" for {pilot['fraction']:.0%} of the images" if pilot["stage"] == "canary" else ""
            log.info("%s pilot version %s in %s%s beside the champion", self.name, pilot["version"], pilot["stage"],
                     share)  # fmt: skip
            self._event("pilot-started", {k: pilot[k] for k in ("version", "stage", "fraction", "since")})

    # -- the online guardrails -----------------------------------------------------------------------------------

    def tick(self, serving: str) -> None:
        """Judge the pilot's window when `check_every_s` has passed since the last time."""
        now = time.monotonic()
        if self.pilot is None or now - self._checked_at < self.settings.check_every_s:
            return
        self._checked_at = now
        try:
            checks, n = self._checks(self.pilot, serving)
        except Exception as err:  # a day file being created, a locked read: judged again at the next tick
            log.warning("%s: could not judge pilot version %s: %s", self.name, self.pilot["version"], err)
            return
        from vitops.deploy.online_guardrails import breaches

        failed = breaches(checks)
        _status(self.state_dir, guardrails={
            "version": self.pilot["version"], "stage": self.pilot["stage"], "answers": n, "breached": bool(failed),
            "checked_at": _iso(time.time()), "checks": [_plain(c.as_dict()) for c in checks],
        })  # fmt: skip
        if failed:
            self._breach(self.pilot, checks)

    def _checks(self, pilot: dict[str, Any], serving: str) -> tuple[list[Any], int]:
        from vitops.deploy.online_guardrails import check_window
        from vitops.deploy.prediction_log import read_feedback, read_predictions

        folder, rules = self.settings.log.folder, self.settings.rules
        since = _unix(pilot.get("since") or "") or None
        mine = read_predictions(folder, since, model=self.name, version=pilot["version"], route=pilot["stage"],
                                last=rules.window)  # fmt: skip
        if len(mine) < rules.min_samples:
            return check_window(mine, None, {}, pilot["stage"], rules), len(mine)
        start = float(mine["time"].min())
        champion = read_predictions(folder, start, model=self.name, version=serving, route="champion")
        feedback: dict[str, str] = {}
        if rules.max_accuracy_drop_points is not None:
            labels = read_feedback(folder, start)
            feedback = dict(zip(labels["sha256"], labels["label"], strict=True))  # sorted by time: the last wins
        return check_window(mine, champion, feedback, pilot["stage"], rules), len(mine)

    def _breach(self, pilot: dict[str, Any], checks: list[Any]) -> None:
        from vitops.deploy.online_guardrails import breach_reasons, breaches
        from vitops.flows.endpoint import metrics

        version, reasons, now = pilot["version"], breach_reasons(checks), time.time()
        self.stopped[version] = {"version": version, "stage": pilot["stage"], "reasons": reasons, "time": now,
                                 "at": _iso(now), "moved": None, "tagged": False}  # fmt: skip
        log.error("%s pilot version %s breached its online guardrails in %s; stopping it: %s", self.name, version,
                  pilot["stage"], reasons)  # fmt: skip
        self._publish(None)  # routing stops now; the registry follows
        for check in breaches(checks):
            metrics.BREACHES.labels(self.name, version, check.kpi).inc()
        self._event("breach", {"version": version, "stage": pilot["stage"], "reasons": reasons,
                               "checks": [_plain(c.as_dict()) for c in checks]})  # fmt: skip
        self._settle(version)

    def _settle(self, version: str) -> None:
        """The registry steps of a breach, each once: the version's tags (the stage last), then the checked removal of
        `pilot`; so once `pilot` is gone, the version says why."""
        from vitops.flows import aliases, registry

        b = self.stopped[version]
        if b["tagged"] and b["moved"] is not None:
            return
        try:
            if not b["tagged"]:
                tags = {"pilot.online.breach": b["reasons"], "pilot.online.breach_time": b["at"]}
                registry.set_version_tags(self.name, version, tags | {"pilot.stage": "stopped"})
                b["tagged"] = True
            if b["moved"] is None:
                reason = f"online guardrail breach at {self.settings.log.station}: {b['reasons']}"
                try:
                    aliases.move_alias(self.name, "pilot", None, expect=version, reason=reason)
                    b["moved"] = True
                    log.info("%s: removed pilot (version %s) after the breach; champion untouched", self.name, version)
                except aliases.MoveConflict as err:
                    if registry.current_aliases(self.name).get("pilot") == version:
                        raise  # a move in progress: try again at the next poll
                    b["moved"] = False
                    log.warning("%s: pilot had already moved from version %s; nothing removed: %s", self.name,
                                version, err)  # fmt: skip
                self._event("breach-recorded", {"version": version, "pilot_removed": b["moved"]})
        except registry.RegistryError as err:
            log.warning("%s: the registry steps of pilot version %s's breach will be retried: %s", self.name,
                        version, err)  # fmt: skip
        _status(self.state_dir, breach={k: b[k] for k in ("version", "stage", "reasons", "at", "moved", "tagged")})

    def _event(self, kind: str, detail: dict[str, Any]) -> None:
        """An event in the prediction log, committed now (the follower is stopped with SIGTERM)."""
        from vitops.deploy.prediction_log import PredictionLog

        try:
            if self._plog is None:
                self._plog = PredictionLog(self.settings.log.folder, self.settings.log.flush_s)
            self._plog.event(kind, {"model": self.name, "station": self.settings.log.station, **detail})
            self._plog.flush()
        except Exception as err:  # the event is a record of what happened; what happened stands
            log.error("%s: could not log the %s event: %s", self.name, kind, err)


def _fraction(tag: str | None, default: float, name: str, version: str) -> float:
    try:
        value = float(tag) if tag is not None else math.nan
    except ValueError:
        value = math.nan
    if 0.0 < value <= 1.0:
        return value
    log.warning("%s pilot version %s: pilot.canary_fraction %r is not in (0, 1]; routing pilot.canary_fraction "
                "%g of params.yaml", name, version, tag, default)  # fmt: skip
    return default


def _unix(stamp: str) -> float:
    """Unix seconds of an ISO time (UTC unless it says otherwise); 0 for none or an unreadable one."""
    if not stamp:
        return 0.0
    try:
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON without NaN (a check still waiting has no value)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _status(state_dir: Path, **changes: Any) -> None:
    path = state.follower_file(state_dir)
    state.write(path, state.read(path) | changes)
