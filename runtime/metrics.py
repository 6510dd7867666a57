"""Segmentation fidelity metrics (numpy only): confusion matrices, IoU/mIoU, category restriction, agreement.

mIoU follows the mmsegmentation convention: one confusion matrix for the whole dataset (per-image matrices add),
ground-truth pixels labelled `ignore_index` (255) are skipped, and classes absent from both ground truth and prediction
get IoU NaN and are left out of the mean. A class that appears only in the prediction scores 0.

For a category subset, `restrict_labels` maps the ground truth into the kept classes' index space (other classes count
as background) and `restricted_argmax` scores the full model on the same output channels as the pruned one.

Typical use over a dataset, holding one image at a time::

    cm = np.zeros((len(kept), len(kept)), dtype=np.int64)
    for logits, mask in dataset:
        cm += confusion_matrix(restricted_argmax(logits, kept), restrict_labels(mask, kept, background), len(kept))
    result = iou_from_confusion(cm, class_names)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Count (ground truth, prediction) pairs over the pixels whose target is not `ignore_index`.

    Args:
        pred: Predicted class per pixel, integers in [0, num_classes).
        target: Ground-truth class per pixel, same shape, integers in [0, num_classes) or `ignore_index`.
        num_classes: Number of classes C.
        ignore_index: Target label of pixels that are not scored. Defaults to 255.

    Returns:
        int64 array [C, C]; rows are ground truth, columns prediction. Matrices of several images add with `+`.
    """
    pred = _label_map(pred, "pred")
    target = _label_map(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    bad_pred = _values_outside(pred, num_classes)
    if bad_pred:
        raise ValueError(
            f"pred contains value(s) {bad_pred} outside the classes 0..{num_classes - 1} (num_classes={num_classes}); "
            "pass the argmax over the model's output channels (restricted_argmax for a category subset)"
        )
    scored = target != ignore_index
    target_scored = target[scored]
    bad_target = _values_outside(target_scored, num_classes)
    if bad_target:
        raise ValueError(
            f"target contains label(s) {bad_target} that are neither classes 0..{num_classes - 1} "
            f"(num_classes={num_classes}) nor ignore_index={ignore_index}; map them with restrict_labels "
            "or pass the right num_classes / ignore_index"
        )
    pairs = target_scored.astype(np.int64) * num_classes + pred[scored].astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class IoUResult:
    """Intersection over union per class, their mean, and overall pixel accuracy.

    per_class_iou is NaN for classes absent from both ground truth and prediction; miou is the mean over the others
    (NaN when no class was scored). pixel_accuracy (mmsegmentation's aAcc) is the fraction of scored pixels predicted
    correctly.
    """

    per_class_iou: np.ndarray
    miou: float
    pixel_accuracy: float
    class_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: NaN becomes None; per-class values are keyed by class name (or index as a string)."""
        names = self.class_names or tuple(str(index) for index in range(len(self.per_class_iou)))
        return {
            "miou": _json_float(self.miou),
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "classes_scored": int(np.count_nonzero(~np.isnan(self.per_class_iou))),
            "per_class_iou": {name: _json_float(value) for name, value in zip(names, self.per_class_iou)},
        }


def iou_from_confusion(cm: np.ndarray, class_names: Sequence[str] | None = None) -> IoUResult:
    """IoU per class, mIoU (NaN-mean) and pixel accuracy from a [C, C] confusion matrix (rows = ground truth)."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square [C, C] with C >= 1, got shape {list(cm.shape)}")
    if not (np.issubdtype(cm.dtype, np.integer) or np.issubdtype(cm.dtype, np.floating)):
        raise ValueError(f"confusion matrix must hold pixel counts, got dtype {cm.dtype}")
    if np.any(cm < 0):
        raise ValueError("confusion matrix holds negative counts; it must count pixels (see confusion_matrix)")
    if class_names is not None:
        class_names = tuple(class_names)
        if len(class_names) != cm.shape[0]:
            raise ValueError(
                f"got {len(class_names)} class names for a confusion matrix of {cm.shape[0]} classes: {class_names}"
            )
    counts = cm.astype(np.float64)
    intersection = np.diag(counts)
    union = counts.sum(axis=0) + counts.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_iou = np.where(union > 0, intersection / union, np.nan)
    scored = per_class_iou[~np.isnan(per_class_iou)]
    total = counts.sum()
    return IoUResult(
        per_class_iou=per_class_iou,
        miou=float(scored.mean()) if scored.size else math.nan,
        pixel_accuracy=float(intersection.sum() / total) if total > 0 else math.nan,
        class_names=class_names,
    )


def restrict_labels(
    target: np.ndarray, kept: Sequence[int], background: int | None, ignore_index: int = 255
) -> np.ndarray:
    """Map ground-truth labels to the kept classes' index space (the position of each class in `kept`).

    Args:
        target: Ground-truth labels in the full model's class ids.
        kept: Class ids kept, in the pruned model's output order.
        background: Class id that absorbs every class not kept, if it is in `kept`. If it is None or not kept, those
            pixels become `ignore_index` instead (they are not scored).
        ignore_index: Label of pixels that are not scored; it stays as is. Defaults to 255.

    Returns:
        Array of target's shape, in target's dtype where that dtype holds every output value, else int64.
    """
    target = _label_map(target, "target")
    kept = _validated_kept(kept, "kept")
    if ignore_index in kept:
        raise ValueError(f"kept contains ignore_index {ignore_index}; a kept class cannot also be the ignore label")
    if 0 <= ignore_index < len(kept):
        raise ValueError(
            f"ignore_index {ignore_index} collides with the position of a kept class (0..{len(kept) - 1}); "
            "use an ignore_index >= len(kept), such as 255"
        )
    if background is not None and (isinstance(background, bool) or not isinstance(background, (int, np.integer))):
        raise ValueError(f"background must be a class id or None, got {background!r}")
    negative = sorted({int(value) for value in np.unique(target[(target < 0) & (target != ignore_index)])})
    if negative:
        raise ValueError(f"target contains negative label(s) {negative[:5]} that are not ignore_index={ignore_index}")
    fill = kept.index(background) if background in kept else ignore_index
    out = np.full(target.shape, fill, dtype=_dtype_holding(target.dtype, [ignore_index, len(kept) - 1]))
    for position, class_id in enumerate(kept):
        out[target == class_id] = position
    out[target == ignore_index] = ignore_index
    return out


def restricted_argmax(logits: np.ndarray, kept: Sequence[int], class_axis: int = 1) -> np.ndarray:
    """Argmax over only the `kept` output channels; returns positions in `kept` (int64), class axis removed.

    This scores the full model on the same output channels as a pruned model keeping those classes. Softmax and
    sigmoid are monotonic, so probabilities give the same answer as logits. Ties go to the earlier position in `kept`.
    """
    logits = np.asarray(logits)
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis; got a scalar")
    if not -logits.ndim <= class_axis < logits.ndim:
        raise ValueError(f"class_axis {class_axis} is out of range for logits of shape {list(logits.shape)}")
    channels = logits.shape[class_axis]
    kept = _validated_kept(kept, "kept")
    outside = [class_id for class_id in kept if class_id >= channels]
    if outside:
        raise ValueError(
            f"kept class(es) {outside} do not exist: logits have {channels} channels on axis {class_axis} "
            f"(shape {list(logits.shape)})"
        )
    return np.take(logits, kept, axis=class_axis).argmax(axis=class_axis).astype(np.int64, copy=False)


@dataclass(frozen=True)
class AgreementResult:
    """How often two label maps agree: `matching` of `pixels` pixels, `agreement` = matching / pixels (NaN if none).

    Results add (`total = total + label_agreement(a, b)`), so a dataset is scored one image at a time; start from
    `AgreementResult.from_counts(0, 0)`.
    """

    agreement: float
    pixels: int
    matching: int

    @classmethod
    def from_counts(cls, matching: int, pixels: int) -> AgreementResult:
        if not 0 <= matching <= pixels:
            raise ValueError(f"need 0 <= matching <= pixels, got matching={matching}, pixels={pixels}")
        return cls(agreement=matching / pixels if pixels else math.nan, pixels=int(pixels), matching=int(matching))

    def __add__(self, other: AgreementResult) -> AgreementResult:
        if not isinstance(other, AgreementResult):
            return NotImplemented
        return AgreementResult.from_counts(self.matching + other.matching, self.pixels + other.pixels)


def label_agreement(a: np.ndarray, b: np.ndarray) -> AgreementResult:
    """Compare two label maps of the same shape pixel by pixel (e.g. full vs pruned model on the kept classes)."""
    a = _label_map(a, "a")
    b = _label_map(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"label maps must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    return AgreementResult.from_counts(int(np.count_nonzero(a == b)), int(a.size))


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels where two label maps of the same shape are equal (NaN for empty maps)."""
    return label_agreement(a, b).agreement


def _label_map(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{what} must be an integer label map, got dtype {array.dtype}; "
            "for model outputs take the argmax over the class axis first (restricted_argmax)"
        )
    return array


def _values_outside(values: np.ndarray, num_classes: int, shown: int = 5) -> list[int]:
    bad = values[(values < 0) | (values >= num_classes)]
    return [int(value) for value in np.unique(bad)[:shown]]


def _validated_kept(kept: Sequence[int], what: str) -> list[int]:
    if isinstance(kept, (str, bytes)) or not isinstance(kept, (Sequence, np.ndarray)):
        raise ValueError(f"{what} must be a sequence of class ids, got {type(kept).__name__}")
    ids = list(kept)
    if not ids:
        raise ValueError(f"{what} must name at least one class id; got an empty sequence")
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in ids):
        raise ValueError(f"{what} must hold non-negative integer class ids, got {ids}")
    ids = [int(i) for i in ids]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{what} lists class id(s) {duplicates} more than once: {ids}")
    return ids


def _dtype_holding(dtype: np.dtype, values: list[int]) -> np.dtype:
    info = np.iinfo(dtype)
    return dtype if all(info.min <= value <= info.max for value in values) else np.dtype(np.int64)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
