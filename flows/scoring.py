"""Asking registered versions about images the way serving does: one image at a time, each model on the engine
its pyfunc model picks, each answer timed; and what the answers measure (top-1 with its interval, p50/p95)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitops.flows import registry


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


def load_classifier(name: str, version: str) -> Any:
    """The version's pyfunc `ImageClassifier`, downloaded once per process and tracking server (the batch gate
    reads its classes, then the stage scores with it).

    Raises:
        RegistryError: the version cannot be downloaded or loaded.
    """
    key = (registry.server_uri(), name, str(version))
    if key not in _LOADED:
        _LOADED[key] = registry.load_pyfunc(name, str(version))
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


def latency_ms(answers: Answers) -> tuple[float | None, float | None]:
    """p50 and p95 of the batch-1 engine times, or None without answers."""
    from vitops.deploy.timing import percentiles_ms

    if not answers.seconds:
        return None, None
    p50, p95, _ = percentiles_ms(answers.seconds)
    return p50, p95


def accuracy_of(answers: Answers, truth: dict[str, str], confidence: float) -> Any:
    """Top-1 on the labelled images among the answers, with its `confidence` interval (`deploy.guardrails`)."""
    from vitops.deploy.guardrails import accuracy

    labelled = [(truth[p], lab) for p, lab in zip(answers.paths, answers.labels, strict=True) if truth.get(p)]
    return accuracy(sum(t == lab for t, lab in labelled), len(labelled), confidence)


def measures_of(answers: Answers, truth: dict[str, str], confidence: float) -> dict[str, Any]:
    """What one model's answers measure, as the stage's summary and records keep it."""
    acc = accuracy_of(answers, truth, confidence)
    p50, p95 = latency_ms(answers)
    return {
        "version": answers.version,
        "engine": answers.engine,
        "images": len(answers.paths),
        "accuracy": acc.as_dict(),
        "accuracy_text": acc.describe(),
        "p50_ms": p50,
        "p95_ms": p95,
    }


def model_rows(measures: dict[str, dict[str, Any]]) -> list[Any]:
    """The report's table: one `deploy.pilot_report.ModelRow` per role."""
    from vitops.deploy.pilot_report import ModelRow

    return [
        ModelRow(role, m["version"], m["engine"], m["images"], m["accuracy_text"], m["p50_ms"], m["p95_ms"])
        for role, m in measures.items()
    ]
