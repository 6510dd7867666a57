"""Fidelity of a pruned model against its full source: pixel agreement and restricted mIoU on evaluation images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from disasm.runtime.metrics import (AgreementResult, confusion_matrix, iou_from_confusion, label_agreement,
                                    restrict_labels, restricted_argmax)

Infer = Callable[[np.ndarray], np.ndarray]  # one batch of model input -> class scores [N, K, H, W]


def _finite(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def evaluate_fidelity(full: Infer, pruned: Infer, inputs: np.ndarray, masks: np.ndarray | None,
                      classes: Sequence[str], kept: Sequence[int], background: int | None,
                      progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Compare a pruned model (outputs = the `kept` classes, in order) with the full model restricted to the same
    output channels (argmax over the kept logits only), image by image so nothing large is held in memory.

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
        pred_full = restricted_argmax(scores_full, kept)
        pred_pruned = np.argmax(scores_pruned, axis=1)
        part = label_agreement(pred_full, pred_pruned)
        agreement = part if agreement is None else agreement + part
        if masks is not None:
            target = restrict_labels(masks[i:i + 1], kept, background)
            cm_full += confusion_matrix(pred_full, target, n)
            cm_pruned += confusion_matrix(pred_pruned, target, n)
            cm_all += confusion_matrix(np.argmax(scores_full, axis=1), masks[i:i + 1], len(classes))
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
