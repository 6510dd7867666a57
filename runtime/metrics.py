"""Segmentation fidelity metrics (numpy only): what a pruned model answers, confusion matrices, IoU/mIoU, agreement.

What a pruned model answers: "one of the chosen categories, or none". Its output layout (which channels, in which
order, which one is none) is decided where the model is built and stated in the model's metadata (`disasm.classes`,
`disasm.background`); `output_from_names` reads it from those names and maps the full model's classes onto it (each
channel named after a class is that class, the none channel takes every other class; sigmoid models have no none).
`full_answer` reads the full model the same way: its argmax over ALL classes with every non-chosen class mapped to
none (`chosen_or_none_argmax`), or, for the paper's protocol (`mode="restricted"`), its argmax over the kept channels
only (`restricted_argmax`). Sigmoid models answer per category with a binary mask p > 0.5 (`sigmoid_masks`).

Category fidelity (`CategoryOverlap`) is the mean over the chosen categories of IoU(pruned answer, full answer), with
intersections and unions summed over the whole image set; a category in neither answer on any image is left out.

mIoU follows the mmsegmentation convention: one confusion matrix for the whole dataset (per-image matrices add),
ground-truth pixels labelled `ignore_index` (255) are skipped, and classes absent from both ground truth and prediction
get IoU NaN and are left out of the mean. A class that appears only in the prediction scores 0. `answer_labels` maps
ground truth into the pruned output's index space the same way as the full model's answer (non-chosen classes count as
none; under `restricted`, `restrict_labels`).

Typical use over a dataset, holding one image at a time::

    out = output_from_names(classes, output_classes, none, "logits")
    cm = np.zeros((len(out.names), len(out.names)), dtype=np.int64)
    for logits, mask in dataset:
        cm += confusion_matrix(full_answer(logits, out), answer_labels(mask, out), len(out.names))
    result = iou_from_confusion(cm, out.names)
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


# ---- what a pruned model answers -------------------------------------------------------------------------------------

CHOSEN_OR_NONE = "chosen-or-none"
RESTRICTED = "restricted"
MODES = (CHOSEN_OR_NONE, RESTRICTED)
OUTPUT_KINDS = ("logits", "probs", "sigmoid")
SIGMOID_THRESHOLD = 0.5


@dataclass(frozen=True)
class PrunedOutput:
    """The pruned model's output channels and how the full model's classes map onto them (see `output_from_names`).

    names: channel names in output order. source_ids: the full model's class id behind each channel (None for a none
    channel that is no class of the full model, such as `other`). none_index: the channel that answers "none" (None
    for sigmoid models and for `restricted` without a background class). chosen: the class ids of the other channels
    (the categories), in output order; chosen_positions: their channels. lookup: full class id -> output channel under
    chosen-or-none (every class that is no other channel's -> none); None where there is no none channel.
    """

    names: tuple[str, ...]
    source_ids: tuple[int | None, ...]
    none_index: int | None
    chosen: tuple[int, ...]
    chosen_positions: tuple[int, ...]
    num_classes: int
    output_kind: str
    mode: str

    @property
    def none_name(self) -> str | None:
        return None if self.none_index is None else self.names[self.none_index]

    @property
    def chosen_names(self) -> tuple[str, ...]:
        return tuple(self.names[p] for p in self.chosen_positions)

    @property
    def sigmoid(self) -> bool:
        return self.output_kind == "sigmoid"

    @property
    def lookup(self) -> np.ndarray | None:
        if self.none_index is None:
            return None
        table = np.full(self.num_classes, self.none_index, dtype=np.int64)
        table[list(self.chosen)] = self.chosen_positions
        return table


def output_from_names(classes: Sequence[str], output_classes: Sequence[str], none: str | None,
                      output_kind: str = "logits", mode: str = CHOSEN_OR_NONE) -> PrunedOutput:
    """Read the pruned output's layout from its names, as the pruned model states it (metadata `disasm.classes`,
    `disasm.background`); the layout itself is decided where the model is built, not here.

    Args:
        classes: The full model's class names, in output-channel order.
        output_classes: The pruned output's channel names, in order. Each name that is a class of the full model is
            that class; only the none channel may be another name (such as `other`).
        none: The name of the none channel (one of `output_classes`), or None (or "") when there is none. It takes
            every class of the full model that is no other channel's; a name that is not a full class has no source.
        output_kind: "logits", "probs" (softmax) or "sigmoid" (independent per-class probabilities; no none channel).
        mode: "chosen-or-none" (default; a softmax model's output then needs a none channel) or "restricted" (the
            paper's protocol: the full model is read by argmax over the output's channels only, so each must be a
            class of the full model).
    """
    classes = _names(classes, "classes")
    names = _names(output_classes, "output_classes")
    if output_kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind {output_kind!r} unknown; choose one of {', '.join(OUTPUT_KINDS)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} unknown; choose one of {', '.join(MODES)}")
    if none == "":
        none = None
    if none is not None and (not isinstance(none, str) or none not in names):
        raise ValueError(f"none channel {none!r} is not one of the output classes: {', '.join(names)}")
    ids = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in names if n not in ids and n != none]
    if unknown:
        raise ValueError(f"output class(es) {', '.join(map(repr, unknown))} are not classes of the full model "
                         f"({', '.join(classes)}); only the none channel may have another name")
    if output_kind == "sigmoid" and none is not None:
        raise ValueError(f"a sigmoid model answers per category and has no none channel; got none={none!r}")
    if output_kind != "sigmoid" and mode == CHOSEN_OR_NONE and none is None:
        raise ValueError(f"a chosen-or-none output of a softmax model needs a none channel; name it among "
                         f"{', '.join(names)}")
    if mode == RESTRICTED and none is not None and none not in ids:
        raise ValueError(f"restricted mode reads the full model on the output's channels only, but the none channel "
                         f"{none!r} is not a class of the full model")
    source_ids = tuple(ids.get(n) for n in names)
    none_index = None if none is None else names.index(none)
    positions = tuple(p for p in range(len(names)) if p != none_index)
    if not positions:
        raise ValueError(f"the output has no category besides the none channel {none!r}")
    return PrunedOutput(names, source_ids, none_index, tuple(source_ids[p] for p in positions), positions,
                        len(classes), output_kind, mode)


def chosen_or_none_argmax(scores: np.ndarray, output: PrunedOutput, class_axis: int = 1) -> np.ndarray:
    """The full model's chosen-or-none answer: argmax over ALL its classes, each chosen class mapped to its channel in
    the pruned output and every other class to the none channel. int64, class axis removed."""
    scores = _scores(scores, class_axis, output.num_classes, "full model")
    if output.lookup is None:
        raise ValueError("this output has no none channel (sigmoid or restricted without background); "
                         "use sigmoid_masks or restricted_argmax")
    return output.lookup[scores.argmax(axis=class_axis)]


def sigmoid_masks(probs: np.ndarray, channels: Sequence[int], class_axis: int = 1,
                  threshold: float = SIGMOID_THRESHOLD) -> np.ndarray:
    """Per-category answers of a sigmoid (multi-label) model: bool masks probs > threshold for the given channels,
    stacked on the class axis in that order."""
    probs = _scores(probs, class_axis, None, "sigmoid output")
    channels = _validated_kept(channels, "channels")
    return np.take(probs, channels, axis=class_axis) > threshold


def full_answer(scores: np.ndarray, output: PrunedOutput, class_axis: int = 1) -> np.ndarray:
    """The full model's answer in the pruned output's terms: label map of output channels (softmax models; under
    `restricted` the argmax over the kept channels only) or bool masks of the chosen categories (sigmoid)."""
    if output.sigmoid:
        _scores(scores, class_axis, output.num_classes, "full model")
        return sigmoid_masks(scores, output.chosen, class_axis)
    if output.mode == RESTRICTED:
        _scores(scores, class_axis, output.num_classes, "full model")
        return restricted_argmax(scores, [i for i in output.source_ids if i is not None], class_axis)
    return chosen_or_none_argmax(scores, output, class_axis)


def pruned_answer(scores: np.ndarray, output: PrunedOutput, class_axis: int = 1) -> np.ndarray:
    """The pruned model's answer: argmax over its channels, or bool masks p > 0.5 per channel for sigmoid models."""
    scores = _scores(scores, class_axis, len(output.names), "pruned model")
    if output.sigmoid:
        return sigmoid_masks(scores, output.chosen_positions, class_axis)
    return scores.argmax(axis=class_axis).astype(np.int64, copy=False)


def category_masks(answer: np.ndarray, output: PrunedOutput, class_axis: int = 1) -> list[np.ndarray]:
    """One bool mask per chosen category (output order) from an answer of `full_answer` or `pruned_answer`."""
    if output.sigmoid:
        return [np.take(answer, k, axis=class_axis) for k in range(len(output.chosen))]
    return [answer == position for position in output.chosen_positions]


def answer_labels(target: np.ndarray, output: PrunedOutput, ignore_index: int = 255) -> np.ndarray:
    """Ground truth (full model's class ids) in the pruned output's index space, read like the models' answers:
    chosen categories to their channels, every other class to none (`restricted` without background: not scored),
    `ignore_index` kept. Not for sigmoid models (their ground truth is scored per category)."""
    if output.sigmoid:
        raise ValueError("sigmoid models are scored per category against ground truth, not by a label map")
    if output.mode == RESTRICTED or output.lookup is None:
        background = None if output.none_index is None else output.source_ids[output.none_index]
        return restrict_labels(target, [i for i in output.source_ids if i is not None], background, ignore_index)
    target = _label_map(target, "target")
    if 0 <= ignore_index < len(output.names):
        raise ValueError(f"ignore_index {ignore_index} collides with an output channel; use one >= {len(output.names)}")
    scored = target != ignore_index
    bad = _values_outside(target[scored], output.num_classes)
    if bad:
        raise ValueError(f"target contains label(s) {bad} that are neither classes 0..{output.num_classes - 1} "
                         f"nor ignore_index={ignore_index}")
    out = np.full(target.shape, ignore_index, dtype=_dtype_holding(target.dtype, [ignore_index, len(output.names) - 1]))
    out[scored] = output.lookup[target[scored]]
    return out


@dataclass(frozen=True)
class CategoryOverlap:
    """Per-category pixel counts of two answers (a, b), summed over images (`+`); IoU = intersection / union.

    Start from `CategoryOverlap.zeros(k)`; add `CategoryOverlap.of_masks(masks_a, masks_b)` image by image.
    """

    intersection: np.ndarray
    union: np.ndarray
    a_pixels: np.ndarray
    b_pixels: np.ndarray

    @classmethod
    def zeros(cls, categories: int) -> CategoryOverlap:
        z = np.zeros(categories, dtype=np.int64)
        return cls(z, z.copy(), z.copy(), z.copy())

    @classmethod
    def of_masks(cls, masks_a: Sequence[np.ndarray], masks_b: Sequence[np.ndarray],
                 valid: np.ndarray | None = None) -> CategoryOverlap:
        """Counts from one bool mask per category for each answer; pixels outside `valid` (if given) are skipped."""
        if len(masks_a) != len(masks_b):
            raise ValueError(f"got {len(masks_a)} and {len(masks_b)} category masks")
        counts = np.zeros((4, len(masks_a)), dtype=np.int64)
        for k, (a, b) in enumerate(zip(masks_a, masks_b)):
            a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
            if a.shape != b.shape:
                raise ValueError(f"category masks must have the same shape, got {list(a.shape)} and {list(b.shape)}")
            if valid is not None:
                a, b = a & valid, b & valid
            counts[:, k] = (np.count_nonzero(a & b), np.count_nonzero(a | b), np.count_nonzero(a), np.count_nonzero(b))
        return cls(*counts)

    def __add__(self, other: CategoryOverlap) -> CategoryOverlap:
        if not isinstance(other, CategoryOverlap):
            return NotImplemented
        if len(self.union) != len(other.union):
            raise ValueError(f"cannot add overlaps of {len(self.union)} and {len(other.union)} categories")
        return CategoryOverlap(self.intersection + other.intersection, self.union + other.union,
                               self.a_pixels + other.a_pixels, self.b_pixels + other.b_pixels)

    @property
    def iou(self) -> np.ndarray:
        """IoU per category; NaN where neither answer has the category anywhere."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.intersection / np.maximum(self.union, 1), np.nan)

    @property
    def mean_iou(self) -> float:
        """Mean IoU over the categories present in either answer; NaN when none is."""
        iou = self.iou
        scored = iou[~np.isnan(iou)]
        return float(scored.mean()) if scored.size else math.nan


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


def _names(values: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        hint = " (split a comma-separated list such as disasm.classes first)" if isinstance(values, str) else ""
        raise ValueError(f"{what} must be a sequence of class names, got {type(values).__name__}{hint}")
    names = tuple(values)
    if not names:
        raise ValueError(f"{what} must name at least one class; got an empty sequence")
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must hold non-empty class names, got {list(names)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{what} lists {', '.join(map(repr, duplicates))} more than once: {', '.join(names)}")
    return names


def _scores(scores: np.ndarray, class_axis: int, channels: int | None, what: str) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim == 0:
        raise ValueError(f"{what} scores must have a class axis; got a scalar")
    if not -scores.ndim <= class_axis < scores.ndim:
        raise ValueError(f"class_axis {class_axis} is out of range for {what} scores of shape {list(scores.shape)}")
    if channels is not None and scores.shape[class_axis] != channels:
        raise ValueError(f"{what} scores have {scores.shape[class_axis]} channels on axis {class_axis} "
                         f"(shape {list(scores.shape)}); expected {channels}")
    return scores


def _dtype_holding(dtype: np.dtype, values: list[int]) -> np.dtype:
    info = np.iinfo(dtype)
    return dtype if all(info.min <= value <= info.max for value in values) else np.dtype(np.int64)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
