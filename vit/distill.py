"""Knowledge distillation from a trained teacher (DeiT, Touvron et al. 2021), e.g. the CNN a ViT would replace.

On small labelled sets a ViT lacks the locality bias of a CNN; DeiT showed that learning from a CNN teacher's
predictions as well as from the labels closes that gap. The teacher is any vitops model folder trained on the
same classes (the baseline, or the champion pulled from the registry). It sees the student's augmented (and
mixed) images, converted to its own normalisation and size, and is never trained.

- `hard`: the teacher's top-1 is a second label: (1 - alpha) * loss(labels) + alpha * CE(student, teacher top-1).
  DeiT's best variant.
- `soft`: (1 - alpha) * loss(labels) + alpha * tau^2 * KL(teacher || student) at temperature tau.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from vitops.vit.bundle import ModelMeta

DistillKind = Literal["hard", "soft"]


class DistillError(ValueError):
    """A teacher that cannot teach this student; the message names the teacher and what to change."""


class Teacher(nn.Module):
    """A frozen model that answers in the student's class order for images normalised the student's way.

    Args:
        model: the teacher network.
        teacher_classes: its class names, in its output order.
        student_classes: the student's class names, in its output order.
        teacher_norm: (mean, std) per channel the teacher was trained with.
        student_norm: (mean, std) per channel of the images the student gets.
        img_size: the teacher's input side; student images of another size are resized (bicubic) to it.
        name: how the teacher is named in errors (its source).

    Raises:
        DistillError: if the class names differ from the student's (a different order is fine).
    """

    def __init__(
        self,
        model: nn.Module,
        teacher_classes: Sequence[str],
        student_classes: Sequence[str],
        teacher_norm: tuple[Sequence[float], Sequence[float]],
        student_norm: tuple[Sequence[float], Sequence[float]],
        img_size: int | None = None,
        name: str = "teacher",
    ) -> None:
        super().__init__()
        if sorted(teacher_classes) != sorted(student_classes) or len(set(teacher_classes)) != len(teacher_classes):
            missing = sorted(set(student_classes) - set(teacher_classes))
            extra = sorted(set(teacher_classes) - set(student_classes))
            raise DistillError(
                f"teacher {name} was trained on other classes than this data (missing: {missing}, not in the "
                f"data: {extra}); distil from a model trained on the same classes, e.g. the baseline, or set "
                "train.teacher: null"
            )
        self.model = model.eval().requires_grad_(False)
        order = [list(teacher_classes).index(c) for c in student_classes]
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)
        (s_mean, s_std), (t_mean, t_std) = student_norm, teacher_norm
        s_mean_t, s_std_t = torch.tensor(s_mean).view(1, -1, 1, 1), torch.tensor(s_std).view(1, -1, 1, 1)
        t_mean_t, t_std_t = torch.tensor(t_mean).view(1, -1, 1, 1), torch.tensor(t_std).view(1, -1, 1, 1)
        # x_student = (x - s_mean) / s_std  ->  x_teacher = (x - t_mean) / t_std = x_student * scale + shift
        self.register_buffer("scale", s_std_t / t_std_t, persistent=False)
        self.register_buffer("shift", (s_mean_t - t_mean_t) / t_std_t, persistent=False)
        self.img_size = img_size

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode (no dropout, frozen BatchNorm statistics) whatever the student does."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.scale + self.shift
        if self.img_size and x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return self.model(x).float()[:, self.order]


class DistillationLoss(nn.Module):
    """The label loss mixed with a loss against the teacher's answers (see the module docstring).

    Args:
        base: the label loss (cross-entropy with smoothing and class weights, or soft-target CE under Mixup).
        kind: `hard` or `soft`.
        alpha: weight of the teacher's term, in [0, 1].
        temperature: softening of both distributions for `soft`.
    """

    def __init__(self, base: nn.Module, kind: DistillKind = "hard", alpha: float = 0.5, temperature: float = 3.0):
        super().__init__()
        if kind not in ("hard", "soft"):
            raise DistillError(f"distill must be 'hard' or 'soft', got {kind!r}")
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise DistillError(
                f"distill_alpha must lie in [0, 1] and distill_temperature above 0, got {alpha} and {temperature}"
            )
        self.base, self.kind, self.alpha, self.temperature = base, kind, alpha, temperature

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        label_loss = self.base(logits, targets)
        if self.kind == "hard":
            teacher_loss = F.cross_entropy(logits, teacher_logits.argmax(dim=1))
        else:
            tau = self.temperature
            teacher_loss = F.kl_div(
                F.log_softmax(logits.float() / tau, dim=1),
                F.log_softmax(teacher_logits.float() / tau, dim=1),
                reduction="batchmean",
                log_target=True,
            ) * (tau * tau)
        return (1.0 - self.alpha) * label_loss + self.alpha * teacher_loss


def load_teacher(bundle_dir: Path, student_classes: Sequence[str], student_meta: ModelMeta, name: str) -> Teacher:
    """The vitops model folder `bundle_dir` as a `Teacher` for a student described by `student_meta`.

    Raises:
        DistillError: if the folder is not a vitops model folder, or was trained on other classes.
    """
    from vitops.vit.bundle import BundleError, load_bundle

    try:
        model, meta = load_bundle(bundle_dir)
    except BundleError as err:
        raise DistillError(
            f"teacher {name}: {err}. A teacher is a vitops model folder trained on the same classes "
            "(file:artifacts/train/baseline/model after `vitops train --baseline`) or a registered model "
            "(mlflow:models:/<name>@<alias>)"
        ) from err
    return Teacher(
        model,
        meta.classes,
        student_classes,
        (meta.mean, meta.std),
        (student_meta.mean, student_meta.std),
        img_size=meta.img_size,
        name=name,
    )
