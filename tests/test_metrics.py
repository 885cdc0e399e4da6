"""Evaluation metrics against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.metrics import IGNORE_INDEX, ConfusionMatrix, ade20k_targets, topk_accuracy


def test_miou_on_a_hand_computed_example():
    # 3 classes, a 2 x 4 map; 255 is ignored.
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # Labelled pixels: 7. Class 0: TP 1, FP 1 (target 2 -> 0), FN 1 (target 0 -> 1): IoU 1/3.
    # Class 1: TP 2, FP 1 (target 0 -> 1), FN 1 (target 1 -> 2): IoU 2/4. Class 2: TP 1, FP 1, FN 1: 1/3.
    expected = torch.tensor([1 / 3, 2 / 4, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(cm.iou(), expected)
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)
    report = cm.report(("wall", "sky", "floor"))
    assert report["per_class_iou"]["sky"] == pytest.approx(0.5)


def test_absent_classes_are_left_out_and_counts_add_up():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]))
    iou = cm.iou()
    assert iou[0] == 1.0 and all(math.isnan(v) for v in iou[1:].tolist())
    assert cm.miou() == 1.0
    other = ConfusionMatrix(4)
    other.update(torch.tensor([[1]]), torch.tensor([[0]]))
    cm.merge(other)
    assert cm.matrix.sum() == 3 and cm.iou()[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cm.update(torch.tensor([[5]]), torch.tensor([[0]]))


def test_ade20k_targets_shift_and_ignore_other():
    lm = torch.tensor([[0, 1, 150]], dtype=torch.uint8)
    assert ade20k_targets(lm).tolist() == [[IGNORE_INDEX, 0, 149]]


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, -1])
    acc = topk_accuracy(logits, labels, ks=(1, 2))
    assert acc == {"top1": 0.5, "top2": 1.0}
    assert topk_accuracy(logits, labels, ks=(5,))["top5"] == 1.0
    assert math.isnan(topk_accuracy(logits, torch.tensor([-1, -1, -1]))["top1"])
