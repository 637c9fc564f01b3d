"""The parameters of serving and of the pilots on it (params.yaml's `pilot`, `endpoint`, `prediction_log` and
`drift`), split from `config.py`, which assembles them into `Params` with the stages' sections.

The endpoint, the shadow and canary on it, the prediction log it appends to, and the daily drift check all read
these; the pilot flow records the canary's fraction on the version it pilots, so every station routes alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A params.yaml section: unknown keys are refused and values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class OnlineGuardrails(Section):
    """The endpoint's live checks of the pilot model, over a sliding window of its most recent answers (`pilot.online`).

    A breach stops routing to the pilot at once and removes its `pilot` alias; `champion` is never touched."""

    window: int = Field(200, ge=10, description="the pilot's most recent answers (shadow or canary) judged together")
    min_samples: int = Field(50, ge=1, description="answers in the window before any check may breach")
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0, description="share of the pilot's attempts that failed")
    max_p95_ms: float | None = Field(
        250.0, gt=0.0, description="canary: p95 of the pilot's answers, arrival to answer; None = off"
    )
    max_disagreement: float | None = Field(
        0.3, ge=0.0, le=1.0, description="shadow: share of images the pilot labels unlike the champion; None = off"
    )
    max_confidence_drop: float | None = Field(
        0.15, ge=0.0, le=1.0, description="mean confidence of the pilot below the champion's in the window; None = off"
    )
    max_accuracy_drop_points: float | None = Field(
        5.0, ge=0.0, description="with feedback: pilot top-1 below the champion's, in points; None = off"
    )
    min_feedback: int = Field(
        20, ge=1, description="labelled (feedback) answers of each model before accuracy is judged"
    )
    check_every_s: float = Field(1.0, gt=0.0, le=60.0, description="how often the endpoint evaluates the window")


class PilotParams(Section):
    """The staged pilot (flows/pilot.py): the batch, the canary's split and guardrails, the approval wait."""

    batch: Path = Field(Path("build/line-batch"), description="folder of new images: unlabelled or in class folders")
    out_dir: Path = Path("artifacts/pilot")
    canary_fraction: float = Field(0.3, gt=0.0, le=1.0, description="share of the batch routed to the candidate")
    max_accuracy_drop_points: float = Field(
        2.0, ge=0.0, description="candidate top-1 on its labelled canary images may trail the champion's by this"
    )
    max_p95_ms: float | None = Field(50.0, gt=0.0, description="candidate batch-1 p95 on its engine; None = off")
    min_labelled: int = Field(20, ge=1, description="labelled canary images the candidate needs for a verdict")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the accuracy intervals")
    max_rejected_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of batch files the gate may reject")
    grid_images: int = Field(16, ge=0, description="disagreements shown in the report's picture grid")
    approval_timeout_s: int = Field(86_400, ge=1, description="how long `promote` waits for an approval")
    four_eyes: bool = Field(
        False, description="the approver must differ from who registered the candidate and who started the promote"
    )
    approval_poll_s: int = Field(10, ge=1, description="how often the paused run checks for the approval")
    online: OnlineGuardrails = Field(default_factory=OnlineGuardrails)


class EndpointParams(Section):
    """The line-side endpoint (`vitops endpoint NAME`); the `*_env` keys name environment variables, never values."""

    accelerator: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: GPUs if nvidia-smi lists any")
    workers: int = Field(1, ge=1, description="inference processes per device, each holding the served version")
    api_servers: int = Field(0, ge=0, description="HTTP processes that decode and check images; 0 = one per worker")
    max_batch_size: int = Field(8, ge=1, description="requests a worker runs as one dynamic batch")
    batch_timeout: float = Field(0.005, ge=0.0, le=1.0, description="seconds a worker waits to fill a batch")
    timeout_s: float = Field(30.0, ge=2.0, description="a request not answered by then gets 504")
    max_pixels: int = Field(16_000_000, ge=1, description="largest width x height of one image (decompression bombs)")
    max_body_mb: float = Field(16.0, gt=0.0, description="largest request body, in MiB")
    max_batch_images: int = Field(64, ge=1, description="most images one request may carry")
    poll_s: float = Field(10.0, gt=0.0, description="how often the alias is read from the registry")
    swap_timeout_s: float = Field(600.0, gt=0.0, description="longest a new version may take to load and warm up")
    warmup_iters: int = Field(3, ge=1, description="warm-up runs of a new version at batch 1 and at full batch")
    cache_dir: Path = Field(Path("~/.cache/vitops/endpoint"), description="verified downloads of served versions")
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="bearer token; None = no auth")
    webhook_secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="None = no webhook")
    station: str | None = Field(None, min_length=1, description="station id in the prediction log; None = host name")
    shadow_queue: int = Field(64, ge=1, description="images waiting for the shadow model; more are dropped, counted")


class PredictionLogParams(Section):
    """The endpoint's prediction log: one SQLite file per UTC day, appended to and never rewritten."""

    dir: Path = Field(Path("artifacts/prediction-log"), description="folder of the day files and kept images")
    flush_s: float = Field(0.5, gt=0.0, le=1.0, description="records are committed at least this often")
    keep_images: float = Field(
        0.05, ge=0.0, le=1.0, description="share of images kept by content hash (disagreements are always kept)"
    )
    keep_below_confidence: float = Field(
        0.6, ge=0.0, le=1.0, description="images answered with a lower confidence are kept too (likely feedback)"
    )


class DriftParams(Section):
    """The daily drift check of the logged images against the training manifest (`drift/daily`)."""

    cron: str = Field("0 6 * * *", description="schedule of the drift/daily deployment")
    since_hours: float = Field(24.0, gt=0.0, description="the logged images looked at: this many hours back")
    min_images: int = Field(20, ge=1, description="fewer kept images than this: no verdict")
    kl_threshold: float | None = Field(
        None, gt=0.0, description="strong drift above this; None = validate's drift_kl_threshold"
    )
    retrain_on_drift: bool = Field(False, description="a strong drift runs the retrain deployment")
    retrain_deployment: str = Field("retrain/on-demand", description="the deployment a strong drift runs")
