"""ONNX export of a trained model with a dynamic batch axis, checked with `onnx.checker`.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`, built on `torch.export`) is tried first; when
it fails on a model the legacy TorchScript exporter is used instead, and the log and the result say which
one produced the file. Opset 18 by default: LayerNormalization is then one op (from opset 17), which both
ONNX Runtime and TensorRT run as a fused kernel. The file is written atomically and only after the
checker passes, so a failed export never leaves a file that looks good.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vitops.common.files import atomic_copy, sha256_file, utc_now
from vitops.deploy.engine_meta import EngineMeta, vitops_version, write_meta
from vitops.deploy.parity import ParityReport, compare_logits, require_parity, torch_logits

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
Exporter = Literal["auto", "dynamo", "torchscript"]


class ExportError(RuntimeError):
    """The model could not be exported to a valid ONNX file."""


@dataclass
class ExportResult:
    """Where the ONNX file is and how it was made."""

    path: Path
    exporter: str
    opset: int
    fallback_reason: str = ""


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    out: Path,
    opset: int = 18,
    exporter: Exporter = "auto",
) -> ExportResult:
    """Export `model` (put in eval mode, on CPU) to `out` with a dynamic batch axis.

    Args:
        model: the network; its forward takes one image batch and returns logits.
        example: an input batch of the right shape (`N, C, H, W`); only its shape and dtype matter.
        out: the `.onnx` file to write (replaced atomically).
        opset: ONNX opset; 17 or more keeps LayerNormalization a single op.
        exporter: `auto` (dynamo, then TorchScript if dynamo fails), `dynamo` or `torchscript`.

    Raises:
        ExportError: when no exporter produced a file that passes `onnx.checker`.
    """
    model = model.eval().cpu()
    example = example.detach().cpu().float()
    if example.shape[0] < 2:
        # A batch of 1 invites exporters to specialise size-1 dims; 2 keeps the batch axis symbolic.
        example = example.expand(2, *example.shape[1:]).contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fallback_reason = ""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        used = exporter
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(model, example, tmp_path, opset)
                used = "dynamo"
            except Exception as err:  # torch.export raises many error types for unsupported models
                if exporter == "dynamo":
                    raise ExportError(f"dynamo ONNX export of {type(model).__name__} failed: {err}") from err
                fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", fallback_reason)
                used = "torchscript"
        if used == "torchscript":
            try:
                _export_torchscript(model, example, tmp_path, opset)
            except Exception as err:
                raise ExportError(f"TorchScript ONNX export of {type(model).__name__} failed: {err}") from err
        check_onnx(tmp_path)
        atomic_copy(tmp_path, out)
    log.info("exported %s with the %s exporter (opset %d)", out, used, opset)
    return ExportResult(path=out, exporter=used, opset=opset, fallback_reason=fallback_reason)


def export_checked(
    model: nn.Module,
    images: torch.Tensor,
    out: Path,
    opset: int = 18,
    exporter: Exporter = "auto",
    max_abs_diff: float = 1e-3,
    min_top1_agreement: float = 0.999,
    threads: int = 0,
    source: dict[str, str] | None = None,
) -> tuple[ExportResult, ParityReport]:
    """Export, then hold the ONNX file to the parity gate under ONNX Runtime before publishing it.

    Args:
        model: the PyTorch network.
        images: preprocessed validation images `N, C, H, W` for the parity gate.
        out: the `.onnx` file; `out.json` gets the export metadata (exporter, opset, parity, source).
        opset: ONNX opset.
        exporter: `auto`, `dynamo` or `torchscript`.
        max_abs_diff: largest allowed |logit difference| against PyTorch.
        min_top1_agreement: smallest allowed top-1 agreement.
        threads: ONNX Runtime threads for the parity run; 0 = physical cores.
        source: provenance recorded in the metadata (e.g. the model folder and its weights hash).

    Raises:
        ExportError: no exporter produced a valid file.
        ParityError: ONNX Runtime disagrees with PyTorch; nothing is written and an older file stays.
    """
    import onnxruntime as ort

    from vitops.deploy.onnxrt import create_session, session_logits

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images_np = images.detach().cpu().float().numpy()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        result = export_onnx(model, images[:2], Path(tmp) / out.name, opset, exporter)
        reference = torch_logits(model, images_np)
        logits = session_logits(create_session(result.path, threads), images_np)
        report = require_parity(
            compare_logits(reference, logits, f"onnx ({result.exporter})", min_top1_agreement, max_abs_diff)
        )
        meta = EngineMeta(
            target="onnx",
            precision="fp32",
            onnx_sha256=sha256_file(result.path),
            runtime_version=f"torch {torch.__version__}, onnxruntime {ort.__version__}",
            device="",
            vitops_version=vitops_version(),
            created=utc_now(),
            extra={
                "exporter": result.exporter,
                "opset": opset,
                "fallback_reason": result.fallback_reason,
                "parity": report.as_dict(),
                "source": source or {},
            },
        )
        atomic_copy(result.path, out)
        write_meta(out, meta)
    log.info("%s", report.describe())
    result.path = out
    return result, report


def check_onnx(path: Path) -> None:
    """Run `onnx.checker` with full shape inference on a file.

    Raises:
        ExportError: naming the file and what the checker found.
    """
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{path}: ONNX checker failed: {err}") from err


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    import warnings

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")  # TracerWarnings about Python asserts and the deprecation notice
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


@contextlib.contextmanager
def _quiet():
    # The exporters print progress lines to stdout; keep the CLI output to our own messages.
    with contextlib.redirect_stdout(io.StringIO()):
        yield
