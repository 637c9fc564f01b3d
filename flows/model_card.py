"""The model card of a registered version: one Markdown page an inspection engineer reads before the model
reaches the line, logged with the version (`model_card/model_card.md`) and shown by `vitops lineage`.

    model_card(decision, facts, card)   intended use; data version and class balance; training recipe; KPIs with
                                        intervals; the robustness table; classes and the worst slices; known
                                        limits; approvals                                         -> Markdown

Built at registration from what the run measured (the gate's `decision.json`, the model folder's `model.json`,
the data gate's manifest) and `model_card` of params.yaml. Approvals come later: the card lists the approval
tags recorded when it was written, and `vitops lineage` prints the version's approvals as they are now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD_FILE = "model_card.md"
CARD_DIR = "model_card"
# model.json facts of the training run shown in the recipe section, in this order.
_RECIPE_FACTS = ("kind", "source", "teacher", "distill", "epochs_run", "best_epoch", "train_seconds", "device")


@dataclass(frozen=True)
class CardFacts:
    """What the card says beyond the gate's decision: the params.yaml text and recipe, and the run's records."""

    intended_use: str
    out_of_scope: str
    known_limits: tuple[str, ...] = ()
    recipe: dict[str, Any] = field(default_factory=dict)  # params.yaml `train` keys worth reading
    model: dict[str, Any] = field(default_factory=dict)  # model.json: architecture, classes, input, extra


def class_balance(manifest: Path) -> dict[str, dict[str, int]]:
    """Images per class and split of the usable rows of a data gate's manifest (empty when it is missing)."""
    from vitops.data_checks.manifest import load_usable

    if not Path(manifest).is_file():
        return {}
    rows = load_usable(Path(manifest))
    counts = rows.groupby(["label", "split"]).size()
    out: dict[str, dict[str, int]] = {}
    for (label, split), n in counts.items():
        out.setdefault(str(label), {})[str(split)] = int(n)
    return out


def model_card(
    decision: dict[str, Any],
    facts: dict[str, str],
    card: CardFacts,
    balance: dict[str, dict[str, int]],
    approvals: dict[str, str] | None = None,
) -> str:
    """The card's Markdown.

    Args:
        decision: the gate's `decision.json`.
        facts: `model`, `version`, `data_version`, `validation`, `git_commit`, `params_hash`, `engine`.
        card: the params.yaml text, the recipe and the model folder's metadata.
        balance: images per class and split (`class_balance`).
        approvals: `approval.*` tags of the version, when there are any.
    """
    from vitops.deploy.guardrails import accuracy

    model, extra = card.model, card.model.get("extra", {})
    uplift = decision.get("uplift") or {}
    name = f"{facts.get('model', '?')} version {facts.get('version', '?')}"
    lines = [f"# Model card: {name}", "", f"**KPI gate {decision['decision'].get('summary', '')}**", ""]
    lines += ["## Intended use", "", card.intended_use, "", f"Out of scope: {card.out_of_scope}", ""]
    lines += ["## Data", "", f"- data version `{facts.get('data_version', '?')}` (DVC)"]
    lines += [f"- {facts['validation']}"] if facts.get("validation") else []
    lines += ["", _balance_table(balance), ""]
    lines += ["## Training recipe", "", f"- architecture `{model.get('model', '?')}`, input {model.get('img_size')} px"]
    lines += [f"- {k}: `{extra[k]}`" for k in _RECIPE_FACTS if extra.get(k) is not None]
    lines += [f"- {k}: `{v}`" for k, v in card.recipe.items()]
    lines += [f"- code: git `{facts.get('git_commit', '?')}`, params `{facts.get('params_hash', '?')}`", ""]
    lines += ["## KPIs", ""]
    if uplift.get("n"):
        n = int(uplift["n"])
        top1 = accuracy(round(uplift["candidate_top1"] * n), n, uplift.get("confidence", 0.95))
        lines += [f"- test top-1 {top1.describe()}", ""]
    lines += [decision.get("kpi_table_markdown") or "(no KPI table recorded)", ""]
    review = decision.get("review") or {}
    lines += ["## Robustness", "", review.get("Robustness", "Not measured (robustness.enabled is off)."), ""]
    lines += ["## Classes and slices", "", review.get("Classes and slices", "Not measured."), ""]
    lines += ["## Known limits", "", *[f"- {limit}" for limit in known_limits(decision, card)], ""]
    lines += ["## Approvals", ""]
    if approvals:
        lines += [f"- {k.removeprefix('approval.')}: {v}" for k, v in sorted(approvals.items())]
    else:
        lines += ["- none when this card was written: `vitops lineage` shows the approvals recorded since"]
    return "\n".join(lines).rstrip() + "\n"


def known_limits(decision: dict[str, Any], card: CardFacts) -> list[str]:
    """The limits people wrote down, then the measured ones: failed checks, the corruptions that cost the most,
    the worst class and slice, the size of the test split."""
    out = list(card.known_limits)
    out += [f"failed {c['kpi']}/{c['name']}: {c['reason']}" for c in decision["decision"]["checks"] if not c["passed"]]
    robust = ((decision.get("candidate") or {}).get("robustness")) or {}
    if robust:
        clean = robust["clean"]
        worst = sorted(((clean - v) * 100.0, k) for k, v in robust.items() if k != "clean")[-2:]
        out += [f"under {k}: top-1 {robust[k] * 100:.2f} % ({-d:+.2f} points vs clean)" for d, k in reversed(worst)]
    sliced = decision.get("slices") or {}
    for what in ("class", "slice"):
        g = sliced.get(f"worst_{what}")
        if g:
            out.append(
                f"worst {what}: {g['attribute']} {g['value']} at {g['top1'] * 100:.2f} % ({g['correct']}/{g['n']}, "
                f"CI {g['low'] * 100:.1f}..{g['high'] * 100:.1f})"
            )
    n = (decision.get("uplift") or {}).get("n")
    if n:
        out.append(f"measured on {n} test images: one image is {100 / n:.2f} points")
    img = card.model.get("img_size")
    if img:
        out.append(f"trained and tested at {img} x {img} px input; other sizes are resized to it")
    return out


def _balance_table(balance: dict[str, dict[str, int]]) -> str:
    if not balance:
        return "(no manifest recorded: class balance unknown)"
    splits = [s for s in ("train", "val", "test") if any(s in v for v in balance.values())]
    lines = ["| class | " + " | ".join(splits) + " | total |", "|---|" + "---|" * (len(splits) + 1)]
    for label in sorted(balance):
        counts = [balance[label].get(s, 0) for s in splits]
        lines.append(f"| {label} | " + " | ".join(str(c) for c in counts) + f" | {sum(counts)} |")
    totals = [sum(balance[label].get(s, 0) for label in balance) for s in splits]
    most = max(sum(v.values()) for v in balance.values())
    least = min(sum(v.values()) for v in balance.values())
    lines.append("| **all** | " + " | ".join(str(t) for t in totals) + f" | {sum(totals)} |")
    return "\n".join(lines) + f"\n\nImbalance (largest / smallest class): {most / max(least, 1):.2f}"


_RECIPE_PARAMS = (
    "epochs", "lr", "batch_size", "layer_decay", "label_smoothing", "scale_min", "color_jitter", "rotate_deg",
    "translate", "blur_prob", "blur_sigma", "noise_std", "lowres_prob", "lowres_min", "lowres_max", "mixup", "cutmix",
    "class_balance",
)  # fmt: skip


def card_facts(params: Any) -> CardFacts:
    """The card's facts from params.yaml (`model_card`, and the `train` keys of the recipe)."""
    c, t = params.model_card, params.train
    recipe = {k: getattr(t, k) for k in _RECIPE_PARAMS}
    return CardFacts(c.intended_use, c.out_of_scope, tuple(c.known_limits), recipe)


def write_card(folder: Path, text: str) -> Path:
    """Write the card as `folder/model_card.md`."""
    from vitops.common.files import atomic_write

    path = Path(folder) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
