"""Evaluation metrics: top-k accuracy for classification, a confusion matrix for segmentation.

Segmentation follows the usual ADE20K protocol (mmsegmentation's ``IoUMetric``): stored label maps
hold 0 = "other" and 1..150 = classes; training targets are ``label - 1`` with 0 mapped to the
ignore index 255 (``ade20k_targets``). IoU per class = TP / (TP + FP + FN) over all evaluated pixels;
mIoU is the mean over classes whose union is non-empty (classes never predicted nor present are
NaN and left out); pixel accuracy = correct / labelled pixels. Counts are int64 and add across
batches and ranks (``ConfusionMatrix.merge`` or an all-reduce of ``.matrix``).
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "topk_accuracy", "ade20k_targets", "ConfusionMatrix"]

IGNORE_INDEX = 255


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of samples whose label is among the k highest logits. logits (B, C), labels int64 (B,).

    Samples with label < 0 are not counted; k larger than C counts every labelled sample as correct.
    Returns {"top1": ..., "top5": ...} (NaN when no sample is labelled).
    """
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    out = {}
    for k in ks:
        if len(labels) == 0:
            out[f"top{k}"] = float("nan")
            continue
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        out[f"top{k}"] = float((top == labels.unsqueeze(-1)).any(-1).float().mean())
    return out


def ade20k_targets(labelmap: torch.Tensor) -> torch.Tensor:
    """Stored ADE20K labels uint8 (..., H, W) (0 = other, 1..150) -> int64 targets 0..149, 255 = ignore."""
    t = labelmap.long() - 1
    return torch.where(t < 0, torch.full_like(t, IGNORE_INDEX), t)


class ConfusionMatrix:
    """Counts ``matrix[target, prediction]`` (int64 (C, C)) over labelled pixels; ignore_index is skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction, target: int (..., H, W) of the same shape; target may hold ``ignore_index``."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        t = target.reshape(-1).long().cpu()
        p = prediction.reshape(-1).long().cpu()
        keep = t != self.ignore_index
        t, p = t[keep], p[keep]
        c = self.num_classes
        if len(t) and (t.min() < 0 or t.max() >= c or p.min() < 0 or p.max() >= c):
            raise ValueError(f"labels must lie in [0, {c}) or equal ignore_index {self.ignore_index}")
        self.matrix += torch.bincount(t * c + p, minlength=c * c).reshape(c, c)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    def iou(self) -> torch.Tensor:
        """float64 (C,) per-class IoU; NaN where the class is neither present nor predicted."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        return float(self.iou().nanmean())

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diag().sum().double() / total) if total > 0 else float("nan")

    def report(self, class_names: tuple[str, ...] = ()) -> dict:
        """{"miou", "pixel_accuracy", "per_class_iou": {name: iou or None}} (JSON-ready)."""
        names = class_names or tuple(str(i) for i in range(self.num_classes))
        ious = self.iou().tolist()
        return {"miou": self.miou(), "pixel_accuracy": self.pixel_accuracy(),
                "per_class_iou": {n: (None if v != v else v) for n, v in zip(names, ious)}}
