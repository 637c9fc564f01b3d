"""Model creation from a source string: public hub weights, a local file, or an explicit random init.

Sources (see DESIGN.md, "Pretrained weights"):

- `hf-hub:timm/<model>`: a timm model repository on the Hugging Face hub; its `config.json` names the
  architecture. Downloaded by timm/huggingface_hub, or read from their cache when `HF_HUB_OFFLINE=1`.
- `timm:<name>.<tag>`: a timm architecture with one of its published pretrained tags, same download path.
- `file:<path>`: a `.safetensors` file (preferred), a vitops model folder (`model.json` + weights), or a
  torch checkpoint, which is only ever read with `weights_only=True`.
- `scratch`: random initialisation, only when asked for by name (the CNN baseline).

`mlflow:` sources are resolved to a local folder by `flows/` before they reach this module. The network
always gets a new classifier head for the user's classes; other image and patch sizes are handled by
timm's resampling of the position and patch embeddings. When weights cannot be had, `SourceError` says
which source failed and how to provide weights; nothing falls back to random weights.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vitops.vit.bundle import META_FILE, WEIGHTS_FILE, read_meta

log = logging.getLogger(__name__)

SCRATCH = "scratch"
_HOW_TO = (
    "Provide weights with `file:<path>` (a .safetensors file or a vitops model folder), or fill the Hugging Face "
    "cache on a machine with internet (`hf download timm/<model>`) and copy it to HF_HUB_CACHE here"
)


class SourceError(ValueError):
    """Weights could not be had from a model source; the message names the source and how to provide weights."""


@dataclass(frozen=True)
class Source:
    """A parsed model source string.

    Attributes:
        kind: `hf-hub`, `timm`, `file` or `scratch`.
        value: hub id, `name.tag`, or file path; empty for scratch.
    """

    kind: str
    value: str

    def __str__(self) -> str:
        return SCRATCH if self.kind == SCRATCH else f"{self.kind}:{self.value}"


def parse_source(text: str) -> Source:
    """Split a source string into its kind and value.

    Raises:
        SourceError: for an unknown prefix or an `mlflow:` source (resolve those first in flows/).
    """
    text = text.strip()
    if text == SCRATCH:
        return Source(SCRATCH, "")
    kind, sep, value = text.partition(":")
    if not sep or not value:
        raise SourceError(
            f"model source {text!r} is not understood; use hf-hub:timm/<model>, timm:<name>.<tag>, file:<path>, "
            "mlflow:models:/<name>@<alias> or scratch"
        )
    if kind == "mlflow":
        raise SourceError(f"{text}: mlflow sources must be downloaded first (vitops train does this)")
    if kind not in ("hf-hub", "timm", "file"):
        raise SourceError(
            f"model source {text!r}: unknown kind {kind!r}; use hf-hub:, timm:, file:, mlflow: or scratch"
        )
    if kind == "hf-hub" and "/" not in value:
        raise SourceError(
            f"model source {text!r}: expected hf-hub:<org>/<model>, e.g. hf-hub:timm/vit_small_patch16_224"
        )
    return Source(kind, value)


def create_model(
    source: str,
    model_name: str,
    num_classes: int,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    allow_scratch: bool = False,
) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build a network with pretrained weights from `source` and a new head of `num_classes` outputs.

    Args:
        source: the model source string.
        model_name: timm architecture for `file:` and `scratch` sources (hub sources name their own).
        num_classes: outputs of the new classifier head.
        img_size: input side for ViTs; position embeddings are resampled when it differs from the weights.
        model_kwargs: extra architecture arguments (patch_size, depth, drop_path_rate, ...); a different
            patch_size resamples the patch embedding.
        allow_scratch: permit the `scratch` source (random init).

    Returns:
        The network, the timm architecture name it was built as, and the architecture arguments needed to
        rebuild it (without num_classes and img_size).

    Raises:
        SourceError: if the source cannot provide weights for this architecture.
    """
    src = parse_source(source)
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if v is not None}
    if src.kind == SCRATCH:
        if not allow_scratch:
            raise SourceError(
                "source 'scratch' means random weights; it is allowed for the CNN baseline only. "
                "Set a pretrained source (hf-hub:, timm:, file:) for the ViT"
            )
        return _timm_create(model_name, src, False, num_classes, img_size, kwargs), model_name, kwargs
    if src.kind == "file":
        return _create_from_file(src, model_name, num_classes, img_size, kwargs)
    name = f"hf-hub:{src.value}" if src.kind == "hf-hub" else src.value
    model = _timm_create(name, src, True, num_classes, img_size, kwargs)
    arch = getattr(model, "pretrained_cfg", {}).get("architecture") or name.split(".")[0]
    return model, arch, kwargs


def _timm_create(
    name: str, src: Source, pretrained: bool, num_classes: int, img_size: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    import timm

    args = dict(kwargs)
    if img_size is not None:
        args["img_size"] = img_size
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **args)
        except TypeError as err:
            # CNNs take any input size and reject an img_size argument.
            if "img_size" not in str(err) or img_size is None:
                raise
            args.pop("img_size")
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **args)
    except Exception as err:  # huggingface_hub raises many types: offline, missing entry, HTTP, repo not found
        if not pretrained:
            raise SourceError(f"{src}: cannot build {name} with {args}: {err}") from err
        raise SourceError(_hub_message(src, err)) from err


def _hub_message(src: Source, err: Exception) -> str:
    from huggingface_hub import constants

    text = f"{type(err).__name__}: {err}".strip()
    if _is_offline_miss(err):
        return (
            f"{src}: pretrained weights are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
            f"is not reachable (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}). {_HOW_TO}. Cause: {text}"
        )
    return f"{src}: cannot load pretrained weights: {text}. {_HOW_TO}"


def _is_offline_miss(err: BaseException) -> bool:
    names = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "EntryNotFoundError", "RepositoryNotFoundError")
    while err is not None:
        if type(err).__name__ in names or isinstance(err, (ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _create_from_file(
    src: Source, model_name: str, num_classes: int, img_size: int | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, str, dict[str, Any]]:
    path = Path(src.value).expanduser()
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise SourceError(f"{src}: folder has no {META_FILE}; point file: at a .safetensors file or a model folder")
        meta = read_meta(path)
        # A vitops model folder describes its own architecture; settings given here win over it.
        model_name, kwargs = meta.model, {**meta.model_kwargs, **kwargs}
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise SourceError(f"{src}: file {path} does not exist. {_HOW_TO}")
    model = _timm_create(model_name, src, False, num_classes, img_size, kwargs)
    state = read_state_dict(path, src)
    load_pretrained_state(model, state, src)
    return model, model_name, kwargs


def read_state_dict(path: Path, src: Source | None = None) -> dict[str, Any]:
    """A state dict from a safetensors file, or a torch file read with `weights_only=True` only.

    Raises:
        SourceError: if the file cannot be read safely.
    """
    from timm.models import load_state_dict

    label = src or f"file:{path}"
    try:
        return load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as err:  # safetensors header errors, pickle refusals, truncated zip archives
        raise SourceError(
            f"{label}: cannot read weights from {path} ({type(err).__name__}: {err}). Torch files are read with "
            "weights_only=True only; convert other checkpoints to .safetensors"
        ) from err


def load_pretrained_state(model: nn.Module, state: dict[str, Any], src: Source | str) -> None:
    """Load pretrained weights into `model`, keeping its new head.

    Runs the architecture's timm `checkpoint_filter_fn` (which resamples position and patch embeddings to
    the model's grid), drops the checkpoint's classifier, and insists that every other weight is loaded.

    Raises:
        SourceError: if the checkpoint does not fit the architecture.
    """
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # shape errors inside timm's resampling
            raise SourceError(f"{src}: weights do not fit {type(model).__name__}: {err}") from err
    head = _classifier_keys(model)
    state = {k: v for k, v in state.items() if k not in head}
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    result = model.load_state_dict({k: v for k, v in state.items() if k not in wrong}, strict=False)
    missing = [k for k in result.missing_keys if k not in head]
    problems = []
    if wrong:
        problems.append(f"shape mismatch for {wrong[:5]}")
    if missing:
        problems.append(f"missing {len(missing)} weights such as {missing[:5]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected weights such as {result.unexpected_keys[:5]}")
    if problems:
        raise SourceError(
            f"{src}: checkpoint does not match the architecture {type(model).__name__} "
            f"({'; '.join(problems)}). Check model, depth and patch_size against the checkpoint"
        )


def _classifier_keys(model: nn.Module) -> set[str]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}
