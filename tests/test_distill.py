"""Distillation from a trained teacher (DeiT): class order, input conversion, the two losses, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.vit import fit_tiny, write_digits, write_manifest, write_params, write_tiny_checkpoint
from torch import nn
from torch.nn import functional as F

from vitops.flows.cli import main
from vitops.vit.distill import DistillationLoss, DistillError, Teacher
from vitops.vit.train import TrainConfig

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class _Recorder(nn.Module):
    """Records its input and answers fixed logits; has a BatchNorm to show it is never put in train mode."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)
        self.bn = nn.BatchNorm2d(3)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        self.bn(x)
        return self.logits.expand(x.shape[0], -1)


def test_teacher_answers_in_student_class_order_on_its_own_normalisation_and_size() -> None:
    recorder = _Recorder([0.0, 1.0, 2.0])  # teacher's classes: c, a, b
    teacher = Teacher(recorder, ["c", "a", "b"], ["a", "b", "c"], IMAGENET, HALF, img_size=16, name="file:cnn")
    teacher.train()  # what fit() does to every module it trains alongside: the teacher must stay frozen
    raw = torch.rand(2, 3, 32, 32)
    student_input = (raw - 0.5) / 0.5
    logits = teacher(student_input)

    assert logits.tolist() == [[1.0, 2.0, 0.0]] * 2  # a, b, c in the student's order
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    expected = F.interpolate((raw - mean) / std, size=(16, 16), mode="bicubic", align_corners=False)
    assert recorder.seen is not None and recorder.seen.shape == (2, 3, 16, 16)
    assert torch.allclose(recorder.seen, expected, atol=1e-5)
    assert not recorder.training and int(recorder.bn.num_batches_tracked) == 0  # BatchNorm statistics untouched
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_trained_on_other_classes_is_refused_with_its_name() -> None:
    with pytest.raises(DistillError) as err:
        Teacher(_Recorder([0.0, 1.0]), ["cat", "dog"], ["cat", "bird"], HALF, HALF, name="file:old/model")
    message = str(err.value)
    assert "file:old/model" in message and "'bird'" in message and "'dog'" in message
    assert "train.teacher: null" in message


def test_hard_and_soft_losses_follow_their_formulas() -> None:
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(6, 4), torch.randn(6, 4)
    targets = torch.randint(0, 4, (6,))
    base = nn.CrossEntropyLoss(label_smoothing=0.1)

    hard = DistillationLoss(base, "hard", alpha=0.3)(logits, targets, teacher_logits)
    expected = 0.7 * base(logits, targets) + 0.3 * F.cross_entropy(logits, teacher_logits.argmax(1))
    assert torch.allclose(hard, expected)

    soft = DistillationLoss(base, "soft", alpha=0.5, temperature=2.0)(logits, targets, teacher_logits)
    p_teacher = F.softmax(teacher_logits / 2, 1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(logits / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(soft, 0.5 * base(logits, targets) + 0.5 * kl, atol=1e-6)

    labels_only = DistillationLoss(base, "hard", alpha=0.0)(logits, targets, teacher_logits)
    assert torch.allclose(labels_only, base(logits, targets))
    with pytest.raises(DistillError, match="distill_alpha"):
        DistillationLoss(base, "hard", alpha=1.5)


def test_student_learns_the_teachers_answers(data: tuple, tmp_path: Path) -> None:
    """With all weight on the teacher, a teacher that always answers "3" makes a student that answers "3"."""
    digits = [str(d) for d in range(10)]
    always_three = _Recorder([10.0 if d == 3 else 0.0 for d in range(10)])
    teacher = Teacher(always_three, digits, digits, HALF, HALF, name="always-3")
    cfg = TrainConfig(epochs=3, batch_size=8, lr=2e-3, warmup_epochs=0.0, patience=0, distill_alpha=1.0)
    model, _ = fit_tiny(data, cfg, tmp_path / "ckpt", teacher=teacher)
    model.eval()
    images = torch.stack([data[1][i][0] for i in range(len(data[1]))])
    with torch.no_grad():
        answers = model(images).argmax(1)
    assert (answers == 3).float().mean() > 0.9


def test_train_cli_distils_from_the_baseline_and_names_a_missing_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_digits(tmp_path / "data", size=40)
    write_manifest(tmp_path / "data", tmp_path / "manifest.csv")
    write_tiny_checkpoint(tmp_path / "pretrained.safetensors")
    baseline = tmp_path / "out" / "baseline" / "model"
    params = write_params(
        tmp_path, tmp_path / "data", tmp_path / "manifest.csv", tmp_path / "pretrained.safetensors",
        teacher=f"file:{baseline}", epochs=1,
    )  # fmt: skip

    # No baseline yet: the error names the teacher and how to make it; nothing is written.
    assert main(["--params", str(params), "train", "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert f"file:{baseline}" in err and "vitops train --baseline" in err
    assert not (tmp_path / "out" / "vit" / "model").exists()

    assert main(["--params", str(params), "train", "--baseline", "--no-tracking"]) == 0
    baseline_meta = json.loads((baseline / "model.json").read_text())
    assert "teacher" not in baseline_meta["extra"]  # the baseline never distils from itself
    assert main(["--params", str(params), "train", "--no-tracking"]) == 0
    meta = json.loads((tmp_path / "out" / "vit" / "model" / "model.json").read_text())
    assert meta["extra"]["teacher"] == f"file:{baseline}" and meta["extra"]["distill"] == "hard"

    # A resume against a retrained teacher is refused: it would not reach the weights of one run.
    assert main(["--params", str(params), "train", "--baseline", "--no-tracking", "--overwrite", "--epochs", "2"]) == 0
    assert main(["--params", str(params), "train", "--no-tracking", "--resume"]) == 2
    assert "teacher" in capsys.readouterr().err
