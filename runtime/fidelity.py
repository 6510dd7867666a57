"""Fidelity of a pruned model against its full source: pixel agreement and restricted mIoU on evaluation images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from disasm.runtime.metrics import (AgreementResult, confusion_matrix, iou_from_confusion, label_agreement,
                                    restrict_labels, restricted_argmax)

Infer = Callable[[np.ndarray], np.ndarray]  # one batch of model input -> class scores ([N, K, H, W] or [N, H, W, K])


def _finite(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def _to_size(labels: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of label maps [N, h, w] to [N, H, W] (pixel centres), for models whose output is
    coarser or finer than the ground truth."""
    if labels.shape[1:] == tuple(size):
        return labels
    rows = ((np.arange(size[0]) + 0.5) * labels.shape[1] / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * labels.shape[2] / size[1]).astype(np.int64)
    return labels[:, rows][:, :, cols]


def evaluate_fidelity(full: Infer, pruned: Infer, inputs: np.ndarray, masks: np.ndarray | None,
                      classes: Sequence[str], kept: Sequence[int], background: int | None,
                      progress: Callable[[int], None] | None = None, class_axis: int = 1) -> dict[str, Any]:
    """Compare a pruned model (outputs = the `kept` classes, in order) with the full model restricted to the same
    output channels (argmax over the kept logits only), image by image so nothing large is held in memory.
    `class_axis` is the axis of both models' outputs that holds the classes (1 for [N, K, H, W], 3 for [N, H, W, K]).
    Predictions are compared with masks of another size after a nearest-neighbour resize to the mask size.

    Returns agreement (fraction of equal pixels) and, with ground-truth masks, mIoU of both over the kept classes
    (ground truth of other classes counts as background), per-class IoU, and the full model's all-class mIoU."""
    names = [classes[i] for i in kept]
    n = len(kept)
    agreement: AgreementResult | None = None
    cm_full, cm_pruned = np.zeros((n, n), np.int64), np.zeros((n, n), np.int64)
    cm_all = np.zeros((len(classes), len(classes)), np.int64)
    for i in range(len(inputs)):
        x = inputs[i:i + 1]
        scores_full, scores_pruned = full(x), pruned(x)
        pred_full = restricted_argmax(scores_full, kept, class_axis)
        pred_pruned = np.argmax(scores_pruned, axis=class_axis)
        part = label_agreement(pred_full, pred_pruned)
        agreement = part if agreement is None else agreement + part
        if masks is not None:
            size = masks.shape[1:]
            target = restrict_labels(masks[i:i + 1], kept, background)
            cm_full += confusion_matrix(_to_size(pred_full, size), target, n)
            cm_pruned += confusion_matrix(_to_size(pred_pruned, size), target, n)
            cm_all += confusion_matrix(_to_size(np.argmax(scores_full, axis=class_axis), size), masks[i:i + 1],
                                       len(classes))
        if progress:
            progress(i + 1)
    if agreement is None:
        raise ValueError("no evaluation images")
    result: dict[str, Any] = {"images": len(inputs), "agreement": agreement.agreement, "miou_full": None,
                              "miou_pruned": None}
    if masks is not None:
        iou_full, iou_pruned = iou_from_confusion(cm_full, names), iou_from_confusion(cm_pruned, names)
        result |= {"miou_full": iou_full.miou, "miou_pruned": iou_pruned.miou,
                   "miou_full_all_classes": iou_from_confusion(cm_all, list(classes)).miou,
                   "per_class": {name: {"full": _finite(f), "pruned": _finite(p)}
                                 for name, f, p in zip(names, iou_full.per_class_iou, iou_pruned.per_class_iou)}}
    return result
