"""Typed parameters: `params.yaml` (grouped by stage) validated into one `Params` object.

`params.yaml` is the single parameter file: DVC stages read it for their `params:` dependencies and every
`vitops` command loads it through `load_params`. Values not given in the file take the defaults written
here. A bad value fails with an error that names the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitops.flows.serving_config import DriftParams, EndpointParams, PilotParams, PredictionLogParams, Section

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A parameter file that cannot be used; the message names the file, key, value and what is allowed."""


_Section = Section


class SplitParams(_Section):
    """Fractions for the deterministic, content-hash based split of a folder that is not pre-split."""

    train: float = Field(0.8, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1.0, got {total:g}")
        return self


class DataParams(_Section):
    """Where the DVC-tracked images live and where their versions are pushed."""

    raw_dir: Path = Path("data/raw")
    remote: str = "~/.cache/vitops/dvc-remote"
    remote_name: str = "vitops"
    classes: list[str] = Field(default_factory=list)
    split: SplitParams = Field(default_factory=SplitParams)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str]) -> list[str]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"class names must be unique, repeated: {dupes}")
        return value


class ValidateParams(_Section):
    """Thresholds of the Great Expectations gate."""

    manifest: Path = Path("artifacts/manifest.csv")
    report: Path = Path("artifacts/validation/report.json")
    min_width: int = Field(16, ge=1)
    min_height: int = Field(16, ge=1)
    min_images_per_class: int = Field(5, ge=1)
    max_imbalance_ratio: float = Field(10.0, ge=1.0)
    reference_manifest: Path | None = None
    drift_kl_threshold: float = Field(0.1, gt=0.0)
    max_file_mb: float = Field(64.0, gt=0.0, description="files larger than this are refused before they are read")
    max_rejected_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of files that may be rejected without failing the gate"
    )
    workers: int = Field(0, ge=0, description="scanner processes; 0 = one per CPU core")


class PretrainParams(_Section):
    """The offline quickstart's stand-in for public pretrained weights (docs/training.md): a ViT pretrained on
    generated images of rendered characters by `vitops pretrain-standin`. Not used with real hub weights."""

    model: str = "vit_tiny_patch16_224"
    img_size: int = Field(32, ge=8)
    patch_size: int = Field(8, ge=1)
    depth: int = Field(6, ge=1)
    images: int = Field(30000, ge=100, description="generated training images")
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    seed: int = 0
    out: Path = Path("assets/standin/vit_tiny_chars.safetensors")


class TrainParams(_Section):
    """Fine-tuning recipe (vit/train.py `TrainConfig`); defaults suit small fine-tuning sets."""

    model: str = "vit_tiny_patch16_224"
    source: str = "file:assets/standin/vit_tiny_chars.safetensors"
    img_size: int = Field(32, ge=8)
    patch_size: int | None = Field(8, ge=1, description="None keeps the architecture's (and the weights') own")
    depth: int | None = Field(6, ge=1, description="None keeps the architecture's own")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="per process and micro-step")
    accum_steps: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0.0, description="peak lr for the effective batch")
    layer_decay: float | None = Field(0.85, gt=0.0, le=1.0, description="None or 1.0 turns it off")
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    warmup_lr: float = Field(1e-6, ge=0.0, description="learning rate at the start of warmup")
    min_lr: float = Field(1e-6, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0)
    cutmix: float = Field(0.0, ge=0.0)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="0 turns EMA off")
    clip_grad: float | None = Field(None, gt=0.0, description="max gradient norm; None turns clipping off")
    class_balance: Literal["none", "loss", "sampler"] = "loss"
    patience: int = Field(12, ge=0, description="epochs without val improvement before stopping; 0 = off")
    seed: int = 0
    deterministic: bool = False
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = False
    compile: bool = False
    workers: int = Field(0, ge=0, description="data-loading processes per training process")
    crop_pct: float | None = Field(1.0, gt=0.0, le=1.0, description="eval centre crop; None = the model's own")
    scale_min: float = Field(0.8, gt=0.0, le=1.0, description="smallest RandomResizedCrop area fraction")
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    color_jitter: float = Field(0.0, ge=0.0)
    auto_augment: str | None = None
    re_prob: float = Field(0.0, ge=0.0, le=1.0)
    augment_on: Literal["auto", "device", "loader"] = "auto"  # device: in batches on the device; loader: per image
    decode_cache: Path | None = Path("~/.cache/vitops/decoded")  # decoded sets over 64 MiB; None: in memory only
    teacher: str | None = Field(
        None, description="model to distil from: file:<vitops model folder> or mlflow:models:/<name>@<alias>"
    )
    distill: Literal["hard", "soft"] = "hard"
    distill_alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the teacher's term")
    distill_temperature: float = Field(3.0, gt=0.0, description="soft distillation only")
    out_dir: Path = Path("artifacts/train/vit")


class BaselineParams(_Section):
    """The CNN baseline trained through the same data and pipeline; uplift is measured against it.
    Every `train` setting not listed here (batch size, augmentation, ...) is shared."""

    model: str = "resnet18"
    source: str = "scratch"
    epochs: int = Field(15, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    out_dir: Path = Path("artifacts/train/baseline")


class EvaluateParams(_Section):
    """Held-out evaluation."""

    out_dir: Path = Path("artifacts/eval")
    ece_bins: int = Field(15, ge=2)


class ExportParams(_Section):
    """ONNX export and its parity gate against PyTorch on the validation split."""

    out: Path = Path("artifacts/engines/model.onnx")
    opset: int = Field(18, ge=17, description="17+ keeps LayerNormalization one op")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="auto = dynamo, falling back to the TorchScript exporter when dynamo fails"
    )
    parity_images: int = Field(256, ge=1, description="validation images for the parity gates")
    max_abs_diff: float = Field(1e-3, gt=0.0)
    min_top1_agreement: float = Field(0.999, ge=0.0, le=1.0)


class EngineParams(_Section):
    """Engine builds per target: TensorRT and torch-aot on NVIDIA GPUs, ONNX Runtime and OpenVINO on CPUs."""

    out_dir: Path = Path("artifacts/engines")
    target: Literal["auto", "onnxruntime", "openvino", "tensorrt", "torch-aot"] = Field(
        "auto",
        description="auto = with CUDA: TensorRT (when installed) and torch-aot, else every CPU engine this machine "
        "runs; serving the fastest that agrees enough",
    )
    ort_threads: int = Field(
        0, ge=0, description="intra-op threads; 0 = tuned at build: the fastest of 1, 2, 4 ... physical cores"
    )
    ort_quantization: Literal["none", "static", "dynamic"] = "dynamic"
    quant_calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    quant_per_channel: bool = True
    quant_exclude: list[Literal["head", "patch_embed"]] = Field(
        default_factory=list, description="parts left in float when that recovers agreement"
    )
    calibration_images: int = Field(256, ge=1)
    min_int8_top1_agreement: float = Field(0.99, ge=0.0, le=1.0, description="INT8 and BF16 engines' parity floor")
    ov_precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="--target openvino: auto = every precision this CPU runs natively (BF16 only with it)"
    )
    ov_threads: int = Field(
        0, ge=0, description="OpenVINO inference threads; 0 = tuned at build: the fastest of 1, 2, 4 ... cores"
    )
    select_min_top1_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="auto serves the fastest engine with at least this; None = min_int8_..."
    )
    select_iters: int = Field(50, ge=1, description="batch-1 calls per engine and round when auto times them")
    trt_precision: Literal["fp16", "int8", "fp32"] = "fp16"
    trt_min_batch: int = Field(1, ge=1)
    trt_opt_batch: int = Field(8, ge=1)
    trt_max_batch: int = Field(64, ge=1)
    trt_workspace_gib: float = Field(4.0, gt=0.0)
    trt_timing_cache: Path = Path("~/.cache/vitops/trt-timing.cache")
    aot_precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, else fp32")
    aot_device: Literal["auto", "cuda", "cpu"] = Field("auto", description="torch-aot: auto = CUDA where there is one")
    aot_max_batch: int = Field(256, ge=2, description="torch-aot: the largest batch of its dynamic batch (from 1)")
    aot_fallback: Literal["compile", "on-failure", "none"] = Field(
        "compile", description="torch-aot: when to build and gate the torch.compile route (on-failure: of the package)"
    )

    @model_validator(mode="after")
    def _profile_order(self) -> EngineParams:
        if not self.trt_min_batch <= self.trt_opt_batch <= self.trt_max_batch:
            raise ValueError(
                "optimization profile needs trt_min_batch <= trt_opt_batch <= trt_max_batch, got "
                f"{self.trt_min_batch}/{self.trt_opt_batch}/{self.trt_max_batch}"
            )
        return self


class BenchParams(_Section):
    """Latency benchmark settings; the numbers feed the latency KPI."""

    warmup: int = Field(10, ge=0)
    iters: int = Field(100, ge=1, description="timed batch-1 calls per backend")
    large_batch: int = Field(64, ge=1, description="batch size of the throughput figure")
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads for torch and ONNX Runtime; 0 = each at its fastest (engines: as tuned at build)",
    )
    out: Path = Path("artifacts/bench/latency.json")


class GateParams(_Section):
    """The KPI gate: thresholds on accuracy uplift, latency on the target engine and total cost of ownership.

    Uplift is the candidate's test top-1 minus the reference's on the same test split and data version, in
    points, where the reference is the current champion (re-evaluated today) or, without one, the CNN
    baseline. `min_uplift_points` > 0 asks for superiority, < 0 for non-inferiority within that margin.
    """

    reference: Literal["auto", "champion", "baseline"] = Field(
        "auto", description="auto = the champion when the registry has one, else the CNN baseline"
    )
    min_uplift_points: float = Field(
        -2.0, ge=-100.0, le=100.0, description="> 0 superiority; < 0 non-inferiority margin (points)"
    )
    require_interval: bool = Field(True, description="the interval's lower bound (not only the estimate) must clear it")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the bootstrap interval")
    bootstrap_samples: int = Field(10_000, ge=100)
    max_p95_ms: float | None = Field(50.0, gt=0.0, description="batch-1 p95 latency on the target engine; None = off")
    max_monthly_tco: float | None = Field(None, gt=0.0, description="monthly TCO ceiling; None = off")
    max_tco_increase: float | None = Field(
        0.10, ge=0.0, description="largest monthly TCO increase over the reference, as a fraction; None = off"
    )
    report: Path = Path("artifacts/gate/report.md")


class CostParams(_Section):
    """Prices and volumes for the cost KPI. The shipped values are EXAMPLES; set your own.

    training cost = training device hours x `train_price_per_hour`;
    serving cost per image = `serve_price_per_hour` / (3600 x images/s on the target engine) / `utilisation`;
    monthly TCO = training cost x `retrains_per_month` + `images_per_month` x serving cost per image
    + `upkeep_per_month`.
    """

    currency: str = Field("USD", min_length=1)
    train_price_per_hour: float = Field(
        ..., ge=0.0, description="price of one hour of the training machine (e.g. a cloud GPU VM)"
    )
    serve_price_per_hour: float = Field(..., ge=0.0, description="price of one hour of the serving hardware")
    utilisation: float = Field(..., gt=0.0, le=1.0, description="share of paid serving time spent inferring")
    retrains_per_month: float = Field(..., ge=0.0)
    images_per_month: float = Field(..., ge=0.0)
    upkeep_per_month: float = Field(..., ge=0.0, description="fixed monthly upkeep: monitoring, labelling, on-call")


class RetrainParams(_Section):
    """The retrain flow and its deployments (prefect.yaml, `vitops serve`)."""

    cron: str = Field("0 2 * * *", description="schedule of the retrain/nightly deployment")
    timezone: str = "UTC"
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) for the fine-tune; > 1 runs torchrun")
    wait_timeout_s: float = Field(
        6 * 3600.0, gt=0.0, description="how long a second retrain of the same model waits for the running one"
    )


class TrackingParams(_Section):
    """MLflow; `MLFLOW_TRACKING_URI` in the environment wins over `uri`."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "vitops"
    registered_model: str = "vitops-vit"
    connect_timeout_s: float = Field(
        20.0, gt=0.0, description="a tracking server or Prefect API that does not answer within this fails the command"
    )


class Params(_Section):
    """Every stage's parameters, as read from `params.yaml`."""

    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    train: TrainParams = Field(default_factory=TrainParams)
    baseline: BaselineParams = Field(default_factory=BaselineParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)
    engine: EngineParams = Field(default_factory=EngineParams)
    bench: BenchParams = Field(default_factory=BenchParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    gate: GateParams = Field(default_factory=GateParams)
    retrain: RetrainParams = Field(default_factory=RetrainParams)
    pilot: PilotParams = Field(default_factory=PilotParams)
    endpoint: EndpointParams = Field(default_factory=EndpointParams)
    prediction_log: PredictionLogParams = Field(default_factory=PredictionLogParams)
    drift: DriftParams = Field(default_factory=DriftParams)
    cost: CostParams | None = Field(None, description="prices for the cost KPI; the gate needs them")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())


def _format_error(source: str, err: ValidationError, raw: dict[str, Any]) -> str:
    lines = [f"{source}: invalid parameters"]
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            section = _lookup_model(item["loc"][:-1])
            allowed = ", ".join(sorted(_aliases(section))) if section else "see params.yaml"
            lines.append(f"  {loc}: unknown key; allowed keys here: {allowed}")
            continue
        value = item.get("input")
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {value!r} is not allowed: {msg}")
    return "\n".join(lines)


def _aliases(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _lookup_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        field = fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a parsed parameter mapping.

    Raises:
        ParamsError: naming each bad key, its value and what is allowed.
    """
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of stage names to settings, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(source, err, raw)) from None


def load_params(path: Path | str = DEFAULT_PARAMS, must_exist: bool = False) -> Params:
    """Load `params.yaml`; a missing file gives the defaults written in this module, unless `must_exist`
    (a file the user named).

    Raises:
        ParamsError: if the file is missing (with `must_exist`), is not YAML or holds values that are not allowed.
    """
    path = Path(path)
    if not path.exists():
        if must_exist:
            raise ParamsError(f"{path}: no such parameter file; name an existing file or leave --params out")
        return Params()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, source=str(path))


def with_overrides(params: Params, model_name: str | None = None, data: Path | str | None = None) -> Params:
    """The run's effective params: a copy with a flow's or command's overrides applied (params are never written
    to; every stage of a run reads this one copy)."""
    tracking = params.tracking.model_copy(update={"registered_model": model_name}) if model_name else params.tracking
    data_params = params.data.model_copy(update={"raw_dir": Path(data)}) if data else params.data
    return params.model_copy(update={"tracking": tracking, "data": data_params})


def params_hash(params: Params) -> str:
    """sha256 of the effective parameters (after defaults), so two runs with the same settings match."""
    import hashlib

    text = params.model_dump_json(by_alias=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
