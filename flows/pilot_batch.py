"""The scoring stages of a staged pilot, on new images from the site (the batch); `flows/pilot.py` wraps them in
Prefect tasks.

- `resolve_versions`: who takes part: the candidate, the champion it would replace, who holds `pilot`;
- `check_batch`: the batch's data gate (`data_checks.batch`): rejected files are listed and never scored, no
  file of the batch is changed, drift against the training data's manifest is a warning;
- `shadow`: champion and candidate both answer every usable image, each on the engine its pyfunc model picks;
  only the champion's answers count; the candidate's are recorded;
- `canary`: a content-hash share of the batch goes to the candidate, the rest to the champion, then the
  guardrails of `deploy.guardrails`.

Each scoring stage writes into `pilot.out_dir/<stage>/`: `predictions.csv` (one row per usable image: who
answered what, with confidences and batch-1 engine times), `report.md` (with a picture grid of disagreements
for shadow) and `summary.json`. `flows/records.py` logs them to MLflow and Prefect.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.common.files import atomic_write_json, utc_now
from vitops.flows import registry, tracking
from vitops.flows.config import PilotParams, ValidateParams
from vitops.flows.scoring import Answers, accuracy_of, load_classifier, measures_of, model_rows, score
from vitops.flows.tracking import RunContext

SHADOW, CANARY = "shadow", "canary"


class PilotError(ValueError):
    """A pilot that cannot go on as asked; the message names the version, alias or file and what to do."""


@dataclass
class Versions:
    """Who takes part: the registered model, the candidate and the champion it would replace (None: none yet)."""

    name: str
    candidate: str
    champion: str | None
    pilot: str | None  # who holds `pilot` now
    tags: dict[str, str] = field(default_factory=dict)  # the candidate's, as read when the run started


def resolve_versions(name: str, ref: str, run: RunContext) -> Versions:
    """The candidate (`candidate`, `@pilot`, or a number) with its tags, and the current champion and pilot.

    Args:
        name: the registered model.
        ref: the candidate: an alias or a version number.
        run: the MLflow server and experiment, which this selects for the whole run (the stage's MLflow run).
    """
    run.configure()
    ref = str(ref).strip().lstrip("@") or "candidate"
    candidate = registry.version_info(name, ref)
    held = registry.current_aliases(name)
    return Versions(name, candidate.version, held.get("champion"), held.get("pilot"), dict(candidate.tags))


# ------------------------------------------------------------------------------------------------- batch gate


@dataclass(frozen=True)
class BatchRules:
    """The batch gate's thresholds (params.yaml's `validate` image sizes and drift, `pilot`'s rejected share)."""

    min_width: int
    min_height: int
    max_rejected_fraction: float
    drift_kl_threshold: float
    workers: int
    manifest: Path  # this machine's training manifest: the drift reference when the version logged none
    max_file_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_params(cls, validate: ValidateParams, pilot: PilotParams) -> BatchRules:
        """The rules of params.yaml's `validate` and `pilot` sections."""
        return cls(
            min_width=validate.min_width,
            min_height=validate.min_height,
            max_rejected_fraction=pilot.max_rejected_fraction,
            drift_kl_threshold=validate.drift_kl_threshold,
            workers=validate.workers,
            manifest=Path(validate.manifest),
            max_file_bytes=int(validate.max_file_mb * 2**20),
        )


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


def check_batch(batch: Path, versions: Versions, out: Path, rules: BatchRules) -> BatchCheck:
    """Run the batch through the data gate, against the candidate's classes and training manifest."""
    from vitops.data_checks.batch import validate_batch
    from vitops.data_checks.suite import GateRules

    batch = Path(batch)
    classes = list(load_classifier(versions.name, versions.candidate).meta["classes"])
    gate_rules = GateRules(
        classes=tuple(classes),
        min_width=rules.min_width,
        min_height=rules.min_height,
        max_rejected_fraction=rules.max_rejected_fraction,
        drift_kl_threshold=rules.drift_kl_threshold,
        max_file_bytes=rules.max_file_bytes,
    )
    reference = _training_manifest(versions, rules.manifest, out)
    report = validate_batch(
        batch, gate_rules, report_path=out / "batch_report.json", manifest_path=out / "batch_manifest.csv",
        reference_path=reference, workers=rules.workers,
    )  # fmt: skip
    warnings = list(report["warnings"])
    if reference is None:
        warnings.append(
            "no training manifest to compare the batch with (the version logged none and "
            f"{rules.manifest} is missing): drift was not checked"
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


def _training_manifest(versions: Versions, local: Path, out: Path) -> Path | None:
    """The candidate's training manifest as logged with its version, else this machine's, else None."""
    uri = versions.tags.get("validation.manifest")
    if uri:
        try:
            return tracking.download_artifact(uri, out / "reference")
        except tracking.TrackingError:  # an artifact store this machine cannot reach: fall back to the local one
            pass
    return local if local.is_file() else None


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class StageResult:
    """What a scoring stage measured and wrote."""

    stage: str
    versions: Versions
    summary: dict[str, Any]  # measures per role, agreement, checks, verdict, counts
    files: list[Path]  # report.md first
    verdict: str = "recorded"
    checks: list[Any] = field(default_factory=list)


def shadow(
    versions: Versions, batch: BatchCheck, out: Path, settings: PilotParams, flow_run_id: str = ""
) -> StageResult:
    """Champion and candidate answer every usable image; only the champion's answers count."""
    from vitops.deploy.guardrails import agreement
    from vitops.deploy.kpi import paired_uplift
    from vitops.deploy.pilot_report import write_grid, write_report

    p = settings
    paths = [item["path"] for item in batch.usable]
    truth = {item["path"]: item["label"] for item in batch.usable}
    models = _models(versions)
    answers = score(models, batch.root, dict.fromkeys(models, paths))
    measures = {role: measures_of(a, truth, p.confidence) for role, a in answers.items()}
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
        out / "report.md", title, _context(versions, batch, flow_run_id), model_rows(measures), lines, [],
        batch.rejected, disagreements, grid, batch.warnings,
    )  # fmt: skip
    summary["lines"] = lines
    files = [report, predictions, batch.report_path] + ([grid] if grid else [])
    atomic_write_json(out / "summary.json", summary)
    return StageResult(SHADOW, versions, summary, files + [out / "summary.json"])


def canary(
    versions: Versions, batch: BatchCheck, out: Path, settings: PilotParams, flow_run_id: str = ""
) -> StageResult:
    """A content-hash share of the batch goes to the candidate, the rest to the champion; then the guardrails."""
    from vitops.deploy.guardrails import Guardrails, canary_verdict, check_canary, routes_to_candidate
    from vitops.deploy.pilot_report import write_report

    p = settings
    truth = {item["path"]: item["label"] for item in batch.usable}
    to_candidate = [i["path"] for i in batch.usable if routes_to_candidate(i["sha256"], p.canary_fraction)]
    to_champion = [i["path"] for i in batch.usable if i["path"] not in set(to_candidate)]
    models = _models(versions)
    routes = {"candidate": to_candidate}
    if versions.champion is not None:
        routes["champion"] = to_champion
    answers = score(models, batch.root, routes)
    measures = {role: measures_of(a, truth, p.confidence) for role, a in answers.items()}
    cand_acc = accuracy_of(answers["candidate"], truth, p.confidence)
    champ_acc = accuracy_of(answers["champion"], truth, p.confidence) if "champion" in answers else None
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
        out / "report.md", title, _context(versions, batch, flow_run_id), model_rows(measures), lines, checks,
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


def _models(versions: Versions) -> dict[str, tuple[str, Any]]:
    models = {}
    if versions.champion is not None:
        models["champion"] = (versions.champion, load_classifier(versions.name, versions.champion))
    models["candidate"] = (versions.candidate, load_classifier(versions.name, versions.candidate))
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


def _context(versions: Versions, batch: BatchCheck, flow_run_id: str) -> dict[str, str]:
    return {
        "model": versions.name,
        "candidate": f"version {versions.candidate}",
        "champion": f"version {versions.champion}" if versions.champion else "none yet",
        "batch": f"{batch.root} ({batch.counts.get('usable', 0)} usable of {batch.counts.get('files', 0)} files, "
        f"{batch.counts.get('labelled', 0)} labelled; {len(batch.rejected)} rejected)",
        "flow run": flow_run_id or "-",
        "time": utc_now(),
    }
