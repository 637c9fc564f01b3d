"""The stages of a staged pilot as plain functions; `flows/pilot.py` wraps them in Prefect tasks.

A pilot takes a candidate version from `candidate` to `champion` on new images from the site (the batch):

- `check_batch`: the batch's data gate (`data_checks.batch`): rejected files are listed and never scored, no
  file of the batch is changed, drift against the training data's manifest is a warning;
- `shadow`: champion and candidate both answer every usable image, each on the engine its pyfunc model picks;
  only the champion's answers count; the candidate's are recorded;
- `canary`: a content-hash share of the batch goes to the candidate, the rest to the champion, then the
  guardrails of `deploy.guardrails`;
- `promotion_checks`: what `promote` asks before anyone is asked to approve (gate, shadow and canary records);
- `record_approval` and `promote_approved`: the approval is written to the version's tags, read back, and only
  then is `champion` moved, with the registry's checked move;
- `rollback`: the champion before, from the registry's history.

Each scoring stage writes into `pilot.out_dir/<stage>/`: `predictions.csv` (one row per usable image: who
answered what, with confidences and batch-1 engine times), `report.md` (with a picture grid of disagreements
for shadow) and `summary.json`. `flows/pilot_records.py` logs them to MLflow and Prefect.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, utc_now
from vitops.flows import aliases, registry
from vitops.flows.config import Params

SHADOW, CANARY, PROMOTE, ROLLBACK = "shadow", "canary", "promote", "rollback"
STAGES = (SHADOW, CANARY, PROMOTE, ROLLBACK)
SKIPPABLE = ("gate", SHADOW, CANARY)
# Version tags the pilot writes (and `promote` reads back).
TAG_SHADOW_RUN, TAG_SHADOW_TIME = "pilot.shadow.run_id", "pilot.shadow.time"
TAG_CANARY_RUN, TAG_CANARY_OUTCOME = "pilot.canary.run_id", "pilot.canary.outcome"
TAG_CANARY_REASONS = "pilot.canary.reasons"
APPROVAL_TAGS = ("decision", "approver", "time", "comment", "flow_run_id")


class PilotError(ValueError):
    """A pilot that cannot go on as asked; the message names the version, alias or file and what to do."""


@dataclass
class Versions:
    """Who takes part: the registered model, the candidate and the champion it would replace (None: none yet)."""

    name: str
    candidate: str
    champion: str | None
    pilot: str | None  # who holds `pilot` now


def resolve_versions(params: Params, version: str) -> Versions:
    """The candidate (`candidate`, `@pilot`, or a number) and the current champion and pilot."""
    from vitops.flows import tracking

    tracking.configure(params.tracking.uri, params.tracking.experiment)
    name = params.tracking.registered_model
    ref = str(version).strip().lstrip("@") or "candidate"
    candidate = registry.version_info(name, ref)
    aliases = _aliases(name)
    return Versions(name, candidate.version, aliases.get("champion"), aliases.get("pilot"))


def _aliases(name: str) -> dict[str, str]:
    return registry.current_aliases(name)


# ------------------------------------------------------------------------------------------------- batch gate


@dataclass
class BatchCheck:
    """The batch's data gate: what may be scored, what was rejected and why."""

    passed: bool
    root: Path
    report_path: Path
    usable: list[dict[str, str]]  # path (relative to root), label ("" unlabelled), sha256
    rejected: list[dict[str, str]]
    failures: list[str]
    warnings: list[str]
    counts: dict[str, Any]
    data_docs: str | None


def check_batch(params: Params, batch: Path, versions: Versions, out: Path) -> BatchCheck:
    """Run the batch through the data gate, against the candidate's classes and training manifest."""
    from vitops.data_checks.batch import validate_batch
    from vitops.data_checks.suite import GateRules

    batch = Path(batch)
    classes = _classes(versions.name, versions.candidate)
    v = params.validate_
    rules = GateRules(
        classes=tuple(classes),
        min_width=v.min_width,
        min_height=v.min_height,
        max_rejected_fraction=params.pilot.max_rejected_fraction,
        drift_kl_threshold=v.drift_kl_threshold,
    )
    reference = _training_manifest(params, versions, out)
    report = validate_batch(
        batch, rules, report_path=out / "batch_report.json", manifest_path=out / "batch_manifest.csv",
        reference_path=reference, workers=v.workers,
    )  # fmt: skip
    warnings = list(report["warnings"])
    if reference is None:
        warnings.append(
            "no training manifest to compare the batch with (the version logged none and "
            f"{params.validate_.manifest} is missing): drift was not checked"
        )
    return BatchCheck(
        passed=bool(report["passed"]),
        root=batch,
        report_path=out / "batch_report.json",
        usable=list(report["usable"]),
        rejected=list(report["rejected"]),
        failures=list(report["failures"]),
        warnings=warnings,
        counts=dict(report["counts"]),
        data_docs=report.get("data_docs"),
    )


def _classes(name: str, version: str) -> list[str]:
    return list(_load(name, version).meta["classes"])


def _training_manifest(params: Params, versions: Versions, out: Path) -> Path | None:
    """The candidate's training manifest as logged with its version, else this machine's, else None."""
    uri = registry.version_info(versions.name, versions.candidate).tags.get("validation.manifest")
    if uri:
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(out / "reference")))
        except Exception:  # an artifact store this machine cannot reach: fall back to the local manifest
            pass
    local = Path(params.validate_.manifest)
    return local if local.is_file() else None


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class Answers:
    """One model's answers on the images it was asked about, in the batch's order."""

    role: str
    version: str
    engine: str
    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # batch-1 engine time per image


_LOADED: dict[tuple[str, str, str], Any] = {}


def _load(name: str, version: str) -> Any:
    """The version's pyfunc `ImageClassifier` (downloaded once per process and tracking server)."""
    import mlflow

    key = (mlflow.get_tracking_uri(), name, str(version))
    if key not in _LOADED:
        from vitops.flows.tracking import TrackingError

        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        except Exception as err:
            where = mlflow.get_tracking_uri()
            raise TrackingError(f"cannot load {name} version {version} from {where}: {err}") from err
        _LOADED[key] = model.unwrap_python_model()
    return _LOADED[key]


def score(models: dict[str, tuple[str, Any]], root: Path, routes: dict[str, list[str]]) -> dict[str, Answers]:
    """Ask each model about the images routed to it, one image at a time, as serving would.

    Args:
        models: role -> (version, ImageClassifier).
        root: the batch folder.
        routes: role -> the image paths (relative to root) it answers; an image routed to both is run by each
            in turn, so a busy core slows both alike.

    Returns:
        role -> its answers, with each image's engine time.
    """
    import numpy as np
    from PIL import Image

    from vitops.deploy.timing import settle

    out = {role: Answers(role, version, _engine_name(model)) for role, (version, model) in models.items()}
    order = sorted({p for paths in routes.values() for p in paths})
    asked = {role: set(paths) for role, paths in routes.items()}
    for _, (_, model) in models.items():  # warm up each engine once, untimed
        model.logits(np.zeros((1, 3, int(model.meta["img_size"]), int(model.meta["img_size"])), np.float32))
    settle()
    for rel in order:
        with Image.open(root / rel) as img:
            rgb = img.convert("RGB")
        for role, (_, model) in models.items():
            if rel not in asked[role]:
                continue
            x = model.preprocess(rgb)[None]
            start = time.perf_counter()
            logits = np.asarray(model.logits(x), dtype=np.float64)[0]
            elapsed = time.perf_counter() - start
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            best = int(probs.argmax())
            a = out[role]
            a.paths.append(rel)
            a.labels.append(str(model.meta["classes"][best]))
            a.confidences.append(float(probs[best]))
            a.seconds.append(elapsed)
    return out


def _engine_name(model: Any) -> str:
    e = model.engine
    return f"{e.get('target')} {e.get('precision')}"


def _latency(answers: Answers) -> tuple[float | None, float | None]:
    from vitops.deploy.timing import percentiles_ms

    if not answers.seconds:
        return None, None
    p50, p95, _ = percentiles_ms(answers.seconds)
    return p50, p95


def _accuracy(answers: Answers, truth: dict[str, str], confidence: float) -> Any:
    from vitops.deploy.guardrails import accuracy

    labelled = [(truth[p], lab) for p, lab in zip(answers.paths, answers.labels, strict=True) if truth.get(p)]
    return accuracy(sum(t == lab for t, lab in labelled), len(labelled), confidence)


def _measures(answers: Answers, truth: dict[str, str], confidence: float) -> dict[str, Any]:
    acc = _accuracy(answers, truth, confidence)
    p50, p95 = _latency(answers)
    return {
        "version": answers.version,
        "engine": answers.engine,
        "images": len(answers.paths),
        "accuracy": acc.as_dict(),
        "accuracy_text": acc.describe(),
        "p50_ms": p50,
        "p95_ms": p95,
    }


def _rows(measures: dict[str, dict[str, Any]]) -> list[Any]:
    from vitops.deploy.pilot_report import ModelRow

    return [
        ModelRow(role, m["version"], m["engine"], m["images"], m["accuracy_text"], m["p50_ms"], m["p95_ms"])
        for role, m in measures.items()
    ]


@dataclass
class StageResult:
    """What a scoring stage measured and wrote."""

    stage: str
    versions: Versions
    summary: dict[str, Any]  # measures per role, agreement, checks, verdict, counts
    files: list[Path]  # report.md first
    verdict: str = "recorded"
    checks: list[Any] = field(default_factory=list)


def _models(versions: Versions) -> dict[str, tuple[str, Any]]:
    models = {}
    if versions.champion is not None:
        models["champion"] = (versions.champion, _load(versions.name, versions.champion))
    models["candidate"] = (versions.candidate, _load(versions.name, versions.candidate))
    classes = {role: list(m.meta["classes"]) for role, (_, m) in models.items()}
    if len({tuple(c) for c in classes.values()}) > 1:
        raise PilotError(
            f"champion version {versions.champion} and candidate version {versions.candidate} of {versions.name} "
            f"predict different classes ({classes['champion']} vs {classes['candidate']}): a pilot compares "
            "models of one use case"
        )
    return models


def _write_predictions(path: Path, batch: BatchCheck, answers: dict[str, Answers], served: dict[str, str]) -> Path:
    """One row per usable image: its label, who served it, and each model's answer, confidence and time."""
    by_role = {
        role: {p: (lab, c, s) for p, lab, c, s in zip(a.paths, a.labels, a.confidences, a.seconds, strict=True)}
        for role, a in answers.items()
    }
    header = ["path", "sha256", "label", "served_by", "served_label"]
    for role in answers:
        header += [f"{role}_label", f"{role}_confidence", f"{role}_ms"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for item in batch.usable:
            rel = item["path"]
            role = served.get(rel, "")
            row = [rel, item["sha256"], item["label"], role, by_role.get(role, {}).get(rel, ("",))[0]]
            for r in answers:
                lab, conf, sec = by_role[r].get(rel, ("", None, None))
                row += [lab, "" if conf is None else f"{conf:.6f}", "" if sec is None else f"{sec * 1e3:.4f}"]
            writer.writerow(row)
    return path


def _context(params: Params, versions: Versions, batch: BatchCheck, flow_run_id: str) -> dict[str, str]:
    return {
        "model": versions.name,
        "candidate": f"version {versions.candidate}",
        "champion": f"version {versions.champion}" if versions.champion else "none yet",
        "batch": f"{batch.root} ({batch.counts.get('usable', 0)} usable of {batch.counts.get('files', 0)} files, "
        f"{batch.counts.get('labelled', 0)} labelled; {len(batch.rejected)} rejected)",
        "flow run": flow_run_id or "-",
        "time": utc_now(),
    }


def shadow(params: Params, versions: Versions, batch: BatchCheck, out: Path, flow_run_id: str = "") -> StageResult:
    """Champion and candidate answer every usable image; only the champion's answers count."""
    from vitops.deploy.guardrails import agreement
    from vitops.deploy.kpi import paired_uplift
    from vitops.deploy.pilot_report import write_grid, write_report

    p = params.pilot
    paths = [item["path"] for item in batch.usable]
    truth = {item["path"]: item["label"] for item in batch.usable}
    models = _models(versions)
    answers = score(models, batch.root, dict.fromkeys(models, paths))
    measures = {role: _measures(a, truth, p.confidence) for role, a in answers.items()}
    summary: dict[str, Any] = {"stage": SHADOW, "measures": measures, "counts": batch.counts, "agreement": None}
    lines = []
    disagreements: list[dict[str, Any]] = []
    served = dict.fromkeys(paths, "champion" if versions.champion else "")
    if versions.champion is not None:
        champ, cand = answers["champion"], answers["candidate"]
        agree = agreement(champ.labels, cand.labels)
        summary["agreement"] = agree
        for i, rel in enumerate(paths):
            if champ.labels[i] != cand.labels[i]:
                disagreements.append({
                    "path": rel, "label": truth[rel],
                    "champion_label": champ.labels[i], "champion_confidence": champ.confidences[i],
                    "candidate_label": cand.labels[i], "candidate_confidence": cand.confidences[i],
                })  # fmt: skip
        lines.append(
            f"Agreement {agree * 100:.2f} % ({len(paths) - len(disagreements)}/{len(paths)} images); "
            f"{len(disagreements)} disagreement(s), listed below. Only the champion's answers were served."
        )
        labelled = [i for i, rel in enumerate(paths) if truth[rel]]
        if labelled:
            up = paired_uplift(
                [cand.labels[i] == truth[paths[i]] for i in labelled],
                [champ.labels[i] == truth[paths[i]] for i in labelled],
                confidence=p.confidence,
            )
            summary["uplift"] = up.as_dict()
            lines.append(
                f"On the {up.n} labelled images the candidate's top-1 differs from the champion's by "
                f"{up.points:+.2f} points ({p.confidence * 100:g}% CI {up.low:+.2f}..{up.high:+.2f}, "
                f"McNemar p={up.p_value:.2g})."
            )
    else:
        lines.append("No champion yet: the candidate's answers were recorded, none was served by a model.")
    summary["disagreements"] = disagreements
    out.mkdir(parents=True, exist_ok=True)
    predictions = _write_predictions(out / "predictions.csv", batch, answers, served)
    grid = write_grid(out / "disagreements.png", disagreements[: p.grid_images], batch.root)
    title = f"Shadow pilot of {versions.name} version {versions.candidate}"
    report = write_report(
        out / "report.md", title, _context(params, versions, batch, flow_run_id), _rows(measures), lines, [],
        batch.rejected, disagreements, grid, batch.warnings,
    )  # fmt: skip
    summary["lines"] = lines
    files = [report, predictions, batch.report_path] + ([grid] if grid else [])
    atomic_write_json(out / "summary.json", summary)
    return StageResult(SHADOW, versions, summary, files + [out / "summary.json"])


def canary(params: Params, versions: Versions, batch: BatchCheck, out: Path, flow_run_id: str = "") -> StageResult:
    """A content-hash share of the batch goes to the candidate, the rest to the champion; then the guardrails."""
    from vitops.deploy.guardrails import Guardrails, canary_verdict, check_canary, routes_to_candidate
    from vitops.deploy.pilot_report import write_report

    p = params.pilot
    truth = {item["path"]: item["label"] for item in batch.usable}
    to_candidate = [i["path"] for i in batch.usable if routes_to_candidate(i["sha256"], p.canary_fraction)]
    to_champion = [i["path"] for i in batch.usable if i["path"] not in set(to_candidate)]
    models = _models(versions)
    routes = {"candidate": to_candidate}
    if versions.champion is not None:
        routes["champion"] = to_champion
    answers = score(models, batch.root, routes)
    measures = {role: _measures(a, truth, p.confidence) for role, a in answers.items()}
    cand_acc = _accuracy(answers["candidate"], truth, p.confidence)
    champ_acc = _accuracy(answers["champion"], truth, p.confidence) if "champion" in answers else None
    rules = Guardrails(p.max_accuracy_drop_points, p.max_p95_ms, p.min_labelled)
    checks = check_canary(cand_acc, champ_acc, measures["candidate"]["p95_ms"], rules)
    verdict = canary_verdict(checks)
    served = dict.fromkeys(to_candidate, "candidate") | (
        dict.fromkeys(to_champion, "champion") if versions.champion else {}
    )
    lines = [
        f"{len(to_candidate)} of {len(batch.usable)} usable images ({p.canary_fraction * 100:g} % by content hash) "
        f"went to the candidate, {len(to_champion) if versions.champion else 0} to the champion"
        + ("" if versions.champion else " (none yet: those were not served by a model)")
        + ".",
        f"Guardrail verdict: **{verdict}**.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    predictions = _write_predictions(out / "predictions.csv", batch, answers, served)
    title = f"Canary of {versions.name} version {versions.candidate}"
    report = write_report(
        out / "report.md", title, _context(params, versions, batch, flow_run_id), _rows(measures), lines, checks,
        batch.rejected, [], None, batch.warnings,
    )  # fmt: skip
    summary = {
        "stage": CANARY, "measures": measures, "counts": batch.counts, "fraction": p.canary_fraction,
        "routed": {"candidate": len(to_candidate), "champion": len(to_champion) if versions.champion else 0},
        "checks": [c.as_dict() for c in checks], "verdict": verdict, "lines": lines,
    }  # fmt: skip
    atomic_write_json(out / "summary.json", summary)
    files = [report, predictions, batch.report_path, out / "summary.json"]
    return StageResult(CANARY, versions, summary, files, verdict, checks)


# ------------------------------------------------------------------------------------------------- promote


@dataclass
class Requirement:
    """One thing `promote` asks before it asks a person."""

    name: str  # gate | shadow | canary
    met: bool
    overridden: bool
    detail: str


def promotion_checks(tags: dict[str, str], skip: list[str], reason: str) -> list[Requirement]:
    """The KPI gate passed, a shadow record, and a canary record that passed; each may be skipped only with a
    reason, which the records keep.

    Args:
        tags: the candidate version's tags.
        skip: requirements the person skips (`gate`, `shadow`, `canary`).
        reason: why they are skipped.

    Raises:
        PilotError: an unknown name in `skip`, or a skip without a reason.
    """
    problem = skip_problem(skip, reason)
    if problem:
        raise PilotError(problem)
    gate = tags.get("gate.passed") == "true"
    shadow_run = tags.get(TAG_SHADOW_RUN, "")
    outcome = tags.get(TAG_CANARY_OUTCOME, "")
    found = [
        Requirement("gate", gate, False, f"KPI gate {'passed' if gate else 'not passed'}: {gate_record(tags)}"),
        Requirement(SHADOW, bool(shadow_run), False,
                    f"shadow record: MLflow run {shadow_run}" if shadow_run else "no shadow record"),
        Requirement(CANARY, outcome == "passed", False,
                    f"canary {outcome}: {tags.get(TAG_CANARY_REASONS, '')}".strip(": ") if outcome
                    else "no canary record"),
    ]  # fmt: skip
    for r in found:
        if not r.met and r.name in skip:
            r.overridden = True
            r.detail += f" (skipped: {reason.strip()})"
    return found


def pilot_refusal(versions: Versions, tags: dict[str, str], skip: list[str], reason: str) -> str | None:
    """Why a shadow or canary may not start, or None: a pilot starts from a version that passed its KPI gate
    (`tags`: the candidate's), unless `gate` is skipped with a reason (which the registry's history then keeps
    as an override)."""
    problem = skip_problem(skip, reason)
    if problem:
        return problem
    if tags.get("gate.passed") != "true" and "gate" not in skip:
        return (
            f"version {versions.candidate} of {versions.name} did not pass its KPI gate ({gate_record(tags)}): "
            'a pilot starts from a gated candidate; pass skip=["gate"] with a reason to pilot it anyway'
        )
    return None


def skip_problem(skip: list[str], reason: str) -> str | None:
    """What is wrong with a skip list, or None: only `SKIPPABLE` names, and never without a reason."""
    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        return f"skip {unknown}: only {list(SKIPPABLE)} may be skipped"
    if skip and not reason.strip():
        return f"skipping {sorted(skip)} needs a reason, which the records keep: pass reason=..."
    return None


def gate_record(tags: dict[str, str]) -> str:
    """The KPI gate's one-line record on a version's tags."""
    return tags.get("gate.summary") or tags.get("gate.reasons") or "no gate record"


def approval_tags(decision: str, approver: str, comment: str, flow_run_id: str) -> dict[str, str]:
    """The version tags of an approval decision (approved, rejected or timeout)."""
    values = (decision, approver, utc_now(), comment, flow_run_id)
    return {f"approval.{k}": v for k, v in zip(APPROVAL_TAGS, values, strict=True)}


def record_approval(versions: Versions, decision: str, approver: str, comment: str, flow_run_id: str) -> dict:
    """Write the decision onto the candidate version and return the tags as the registry now has them."""
    return registry.set_version_tags(
        versions.name, versions.candidate, approval_tags(decision, approver, comment, flow_run_id)
    )


def promote_approved(
    versions: Versions, flow_run_id: str, expect_champion: str | None, reason: str, override_gate: bool
) -> Any:
    """Move `champion` to the candidate after reading its approval back from the registry.

    Raises:
        PilotError: the registry holds no approval of this flow run for this version.
        MoveConflict: the champion moved since the pilot saw it (another promotion or a rollback won).
    """
    tags = registry.version_info(versions.name, versions.candidate).tags
    approval = {k: tags.get(f"approval.{k}", "") for k in APPROVAL_TAGS}
    if approval["decision"] != "approved" or approval["flow_run_id"] != flow_run_id:
        raise PilotError(
            f"version {versions.candidate} of {versions.name} carries no approval of flow run {flow_run_id} "
            f"(the registry has decision={approval['decision'] or 'none'}, flow run "
            f"{approval['flow_run_id'] or 'none'}): champion not moved"
        )
    move = aliases.move_alias(
        versions.name, "champion", versions.candidate,
        expect=expect_champion or "none",
        reason=f"approved by {approval['approver']}: {approval['comment'] or reason}".strip(),
        flow_run_id=flow_run_id, approval=approval, override_gate=override_gate,
    )  # fmt: skip
    if _aliases(versions.name).get("pilot") == versions.candidate:
        aliases.move_alias(
            versions.name, "pilot", None, expect=versions.candidate,
            reason=f"pilot over: champion since move {move.seq}", flow_run_id=flow_run_id,
        )  # fmt: skip
    return move
