"""Fidelity of a pruned model to its full source on evaluation images: category fidelity (the headline), pixel
agreement (secondary) and, with ground-truth masks, mIoU of both models under the same reading of their answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from disasm.runtime.metrics import (CHOSEN_OR_NONE, AgreementResult, CategoryOverlap, PrunedOutput, answer_labels,
                                    category_masks, confusion_matrix, full_answer, iou_from_confusion, label_agreement,
                                    output_from_names, pruned_answer)

Infer = Callable[[np.ndarray], np.ndarray]  # one batch of model input -> class scores ([N, K, H, W] or [N, H, W, K])


def _finite(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def _to_size(labels: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of label maps or masks [N, h, w] to [N, H, W] (pixel centres), for models whose
    output is coarser or finer than the ground truth."""
    if labels.shape[1:] == tuple(size):
        return labels
    rows = ((np.arange(size[0]) + 0.5) * labels.shape[1] / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * labels.shape[2] / size[1]).astype(np.int64)
    return labels[:, rows][:, :, cols]


def _absence_note(output: PrunedOutput, iou: np.ndarray, images: int) -> str | None:
    absent = [name for name, v in zip(output.chosen_names, iou) if np.isnan(v)]
    where = f"{images} evaluation image{'s' if images != 1 else ''}"
    if len(absent) == len(iou):
        return (f"no chosen category ({', '.join(absent)}) appears in the answer of either model on the {where}: "
                "category fidelity is undefined; evaluate on images that show the chosen categories")
    if absent:
        return (f"left out of category fidelity (in neither model's answer on any of the {where}): "
                f"{', '.join(absent)}")
    return None


def evaluate_fidelity(full: Infer, pruned: Infer, inputs: np.ndarray, masks: np.ndarray | None,
                      classes: Sequence[str], output_classes: Sequence[str], none: str | None,
                      output_kind: str = "logits", mode: str = CHOSEN_OR_NONE,
                      progress: Callable[[int], None] | None = None, class_axis: int = 1) -> dict[str, Any]:
    """Compare a pruned model with the full model on `inputs`, one image at a time so nothing large is held.

    Args:
        full, pruned: Run one batch (one image) and return the class scores of the full / pruned model.
        inputs: Preprocessed evaluation images [N, ...]; these should be images calibration did not use.
        masks: Ground-truth label maps [N, H, W] in the full model's class ids (255 = not scored), or None.
        classes: The full model's class names, in output order.
        output_classes: The pruned output's channel names, in order (the pruned model's metadata `disasm.classes`).
            Each is a class of the full model, except a none channel such as `other`.
        none: The name of the pruned output's none channel (metadata `disasm.background`), or None; it takes every
            class of the full model that is no other channel's. See `metrics.output_from_names`.
        output_kind: "logits", "probs" or "sigmoid" (the full model's output kind).
        mode: "chosen-or-none" (the full model's argmax over all classes, non-chosen classes read as none) or
            "restricted" (the paper's protocol: its argmax over the kept channels only).
        progress: Called with the number of images done.
        class_axis: The axis of both models' outputs that holds the classes (1 for [N, K, H, W], 3 for [N, H, W, K]).

    Returns:
        category_fidelity: mean over the chosen categories of IoU(pruned answer, full answer), intersections and
            unions summed over all images; categories in neither answer on any image are left out; None (with a
            `note`) when every category is. per_category: that IoU per category (None where left out).
        agreement: fraction of equal pixels of the two answers (secondary: an all-none model scores the none share).
        With masks: miou_full / miou_pruned against ground truth read the same way (ground truth of non-chosen
        classes counts as none, 255 ignored, dataset-level confusion matrix), per_class IoU, and (softmax models) the
        full model's all-class mIoU. Also images, mode, output_kind, output_classes, none, categories_scored, note.
        Predictions are compared with masks of another size after a nearest-neighbour resize to the mask size.
    """
    output = output_from_names(classes, output_classes, none, output_kind, mode)
    if len(inputs) == 0:
        raise ValueError("no evaluation images")
    if masks is not None and len(masks) != len(inputs):
        raise ValueError(f"got {len(masks)} masks for {len(inputs)} evaluation images")
    categories = len(output.chosen)
    n_out = len(output.names)
    fidelity = CategoryOverlap.zeros(categories)
    agreement = AgreementResult.from_counts(0, 0)
    gt_full, gt_pruned = CategoryOverlap.zeros(categories), CategoryOverlap.zeros(categories)  # sigmoid models
    cm_full, cm_pruned = np.zeros((n_out, n_out), np.int64), np.zeros((n_out, n_out), np.int64)
    cm_all = np.zeros((len(classes), len(classes)), np.int64)
    for i in range(len(inputs)):
        x = inputs[i:i + 1]
        scores_full, scores_pruned = np.asarray(full(x)), np.asarray(pruned(x))
        answer_full = full_answer(scores_full, output, class_axis)
        answer_pruned = pruned_answer(scores_pruned, output, class_axis)
        if answer_full.shape != answer_pruned.shape:
            raise ValueError(f"full and pruned answers differ in shape: {list(answer_full.shape)} and "
                             f"{list(answer_pruned.shape)}; the models' outputs must have the same spatial size")
        masks_full = category_masks(answer_full, output, class_axis)
        masks_pruned = category_masks(answer_pruned, output, class_axis)
        fidelity = fidelity + CategoryOverlap.of_masks(masks_pruned, masks_full)
        agreement = agreement + label_agreement(answer_full.astype(np.uint8) if output.sigmoid else answer_full,
                                                answer_pruned.astype(np.uint8) if output.sigmoid else answer_pruned)
        if masks is not None:
            mask = masks[i:i + 1]
            size = mask.shape[1:]
            if output.sigmoid:
                truth = [mask == class_id for class_id in output.chosen]
                valid = mask != 255
                gt_full = gt_full + CategoryOverlap.of_masks([_to_size(m, size) for m in masks_full], truth, valid)
                gt_pruned = gt_pruned + CategoryOverlap.of_masks([_to_size(m, size) for m in masks_pruned], truth,
                                                                 valid)
            else:
                target = answer_labels(mask, output)
                cm_full += confusion_matrix(_to_size(answer_full, size), target, n_out)
                cm_pruned += confusion_matrix(_to_size(answer_pruned, size), target, n_out)
                cm_all += confusion_matrix(_to_size(np.argmax(scores_full, axis=class_axis), size), mask,
                                           len(classes))
        if progress:
            progress(i + 1)

    iou = fidelity.iou
    result: dict[str, Any] = {
        "images": len(inputs), "mode": output.mode, "output_kind": output.output_kind,
        "output_classes": list(output.names), "none": output.none_name,
        "category_fidelity": _finite(fidelity.mean_iou),
        "per_category": {name: _finite(v) for name, v in zip(output.chosen_names, iou)},
        "categories_scored": int(np.count_nonzero(~np.isnan(iou))),
        "category_pixels": {name: {"full": int(f), "pruned": int(p), "intersection": int(a), "union": int(u)}
                            for name, f, p, a, u in zip(output.chosen_names, fidelity.b_pixels, fidelity.a_pixels,
                                                        fidelity.intersection, fidelity.union)},
        "note": _absence_note(output, iou, len(inputs)),
        "agreement": _finite(agreement.agreement),
        "miou_full": None, "miou_pruned": None,
    }
    if masks is not None:
        if output.sigmoid:
            names, per_full, per_pruned = output.chosen_names, gt_full.iou, gt_pruned.iou
            result |= {"miou_full": _finite(gt_full.mean_iou), "miou_pruned": _finite(gt_pruned.mean_iou),
                       "miou_full_all_classes": None}
        else:
            iou_full = iou_from_confusion(cm_full, output.names)
            iou_pruned = iou_from_confusion(cm_pruned, output.names)
            names, per_full, per_pruned = output.names, iou_full.per_class_iou, iou_pruned.per_class_iou
            result |= {"miou_full": _finite(iou_full.miou), "miou_pruned": _finite(iou_pruned.miou),
                       "miou_full_all_classes": _finite(iou_from_confusion(cm_all, list(classes)).miou)}
        result["per_class"] = {name: {"full": _finite(f), "pruned": _finite(p)}
                               for name, f, p in zip(names, per_full, per_pruned)}
    return result
