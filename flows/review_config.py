"""The parameters of a candidate's review (params.yaml's `robustness` and `slices`), split from `config.py`, which
assembles them into `Params` with the stages' sections.

`robustness` fixes the corruption suite the evaluation runs on the test split (`vit.robustness`); the KPI gate's
limits on its drops live in `gate`. `slices` says which groups of test images get their own accuracy
(`deploy.slices`); the gate's optional worst-class floor lives in `gate` too.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vitops.flows.serving_config import Section


class RobustnessParams(Section):
    """One severity per corruption of the suite; null leaves that corruption out (`vit.robustness.Severities`)."""

    enabled: bool = Field(True, description="run the suite in every evaluation; off: no robustness check either")
    seed: int = Field(0, description="seed of the noise; the suite is otherwise deterministic")
    blur: float | None = Field(0.8, gt=0.0, le=10.0, description="Gaussian blur sigma, pixels of the model input")
    noise: float | None = Field(0.05, gt=0.0, le=1.0, description="Gaussian noise std on the 0..1 scale")
    jpeg: int | None = Field(30, ge=1, le=100, description="JPEG quality")
    brightness: float | None = Field(0.6, gt=0.0, le=3.0, description="brightness factor; 1 = unchanged")
    contrast: float | None = Field(0.5, gt=0.0, le=3.0, description="contrast factor; 1 = unchanged")
    resize: float | None = Field(
        0.25, gt=0.0, lt=1.0, description="fraction of the side resized down to, then back up with nearest neighbour"
    )
    rotate: float | None = Field(10.0, gt=0.0, le=45.0, description="rotation, degrees")
    shift: int | None = Field(2, ge=1, le=64, description="shift right and down, pixels")


class SliceParams(Section):
    """Groups of test images with their own accuracy: `size` (width x height of the file), `folder` (the folder
    above the class folder) and any column of `metadata` (a CSV with a `path` column relative to the data root)."""

    by: list[str] = Field(
        default_factory=lambda: ["size", "folder"], description="size, folder and/or metadata columns"
    )
    metadata: Path | None = Field(None, description="optional CSV: path plus one column per slice attribute")
    min_images: int = Field(5, ge=1, description="smaller slices are listed but never flagged as the worst")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the Wilson intervals")
    explain_images: int = Field(16, ge=0, description="misclassified test images shown with heatmaps in the report")


class ModelCardParams(Section):
    """What the model card of every registered version says beyond the measured facts (`flows/model_card.py`)."""

    intended_use: str = Field(
        "Classifying images of the trained classes, taken the way the training data was, at one station of the line",
        min_length=1,
        description="what the model is for, in one or two sentences",
    )
    out_of_scope: str = Field(
        "Classes it was not trained on; images from another camera, lighting or resize setting than the data "
        "without a new gate run on such images",
        description="uses it must not be put to",
    )
    known_limits: list[str] = Field(
        default_factory=list, description="limits people know of; the measured ones (robustness, slices) are added"
    )
