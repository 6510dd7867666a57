"""Fidelity metrics: confusion matrix, mIoU (mmsegmentation convention), category restriction, agreement."""

import json
import math

import numpy as np
import pytest

from disasm.runtime.metrics import (
    AgreementResult,
    IoUResult,
    confusion_matrix,
    iou_from_confusion,
    label_agreement,
    pixel_agreement,
    restrict_labels,
    restricted_argmax,
)

# ---- confusion matrix and mIoU, against hand-computed examples -------------------------------------------------------

# target/pred pairs (the 255 pixel is ignored even though its prediction is class 2):
#   (0,0) (0,1) (1,1) (1,1) (2,0)  -> rows = ground truth, cols = prediction
HAND_TARGET = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
HAND_PRED = np.array([[0, 1, 1], [1, 0, 2]], dtype=np.int64)
HAND_CM = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])


def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    cm = confusion_matrix(HAND_PRED, HAND_TARGET, num_classes=3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, HAND_CM)


def test_iou_matches_hand_computation():
    result = iou_from_confusion(HAND_CM)
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 2 - 2); class 2: 0 / (0 + 1 - 0)
    np.testing.assert_allclose(result.per_class_iou, [1 / 3, 2 / 3, 0.0])
    assert result.miou == pytest.approx(1 / 3)
    assert result.pixel_accuracy == pytest.approx(3 / 5)


def test_class_absent_from_both_is_nan_and_left_out_of_the_mean():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    result = iou_from_confusion(confusion_matrix(pred, target, num_classes=4))
    assert np.isnan(result.per_class_iou[2]) and np.isnan(result.per_class_iou[3])
    # class 0: 1 / (1 + 2 - 1) = 0.5; class 1: 2 / (3 + 2 - 2) = 2/3
    assert result.miou == pytest.approx((0.5 + 2 / 3) / 2)


def test_class_only_in_prediction_scores_zero_and_counts():
    result = iou_from_confusion(confusion_matrix(np.array([0, 1]), np.array([0, 0]), num_classes=2))
    np.testing.assert_allclose(result.per_class_iou, [0.5, 0.0])
    assert result.miou == pytest.approx(0.25)
    assert result.pixel_accuracy == pytest.approx(0.5)


def test_all_pixels_ignored_gives_nan_without_warnings():
    cm = confusion_matrix(np.zeros((2, 2), np.int64), np.full((2, 2), 255, np.uint8), num_classes=2)
    assert cm.sum() == 0
    with np.errstate(all="raise"):
        result = iou_from_confusion(cm)
    assert math.isnan(result.miou) and math.isnan(result.pixel_accuracy)


def test_matrices_accumulate_over_images_at_dataset_level():
    rng = np.random.default_rng(0)
    targets = [rng.integers(0, 4, (6, 5)) for _ in range(3)]
    preds = [rng.integers(0, 4, (6, 5)) for _ in range(3)]
    total = sum(confusion_matrix(p, t, 4) for p, t in zip(preds, targets))
    np.testing.assert_array_equal(total, confusion_matrix(np.stack(preds), np.stack(targets), 4))
    assert total.sum() == 3 * 6 * 5


def test_dataset_miou_is_not_the_mean_of_per_image_mious():
    # image 1 is all class 0, predicted right; image 2 is all class 1, half wrong.
    images = [(np.zeros(4, np.int64), np.zeros(4, np.int64)), (np.array([1, 1, 0, 0]), np.ones(4, np.int64))]
    per_image = [iou_from_confusion(confusion_matrix(p, t, 2)).miou for p, t in images]
    dataset = iou_from_confusion(sum(confusion_matrix(p, t, 2) for p, t in images))
    # dataset: class 0: 4 / (6 + 4 - 4); class 1: 2 / (2 + 4 - 2)
    assert dataset.miou == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert dataset.miou != pytest.approx(np.mean(per_image))


def test_to_dict_is_json_ready_with_class_names_and_nan_as_none():
    result = iou_from_confusion(confusion_matrix(np.array([0, 1]), np.array([0, 0]), 3), ["road", "car", "sky"])
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data == {
        "miou": 0.25,
        "pixel_accuracy": 0.5,
        "classes_scored": 2,
        "per_class_iou": {"road": 0.5, "car": 0.0, "sky": None},
    }
    assert isinstance(result, IoUResult) and result.class_names == ("road", "car", "sky")


def test_to_dict_without_names_keys_by_index():
    assert list(iou_from_confusion(HAND_CM).to_dict()["per_class_iou"]) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "pred, target, num_classes, message",
    [
        (np.array([0, 1]), np.array([0, 7]), 3, r"target contains label\(s\) \[7\].*ignore_index=255"),
        (np.array([0, 5]), np.array([0, 1]), 3, r"pred contains value\(s\) \[5\]"),
        (np.array([0, -1]), np.array([0, 1]), 3, r"pred contains value\(s\) \[-1\]"),
        (np.array([0, 1]), np.array([[0, 1]]), 3, r"same shape, got \[2\] and \[1, 2\]"),
        (np.array([0.0, 1.0]), np.array([0, 1]), 3, r"pred must be an integer label map, got dtype float64"),
        (np.array([0, 1]), np.array([0, 1]), 0, r"num_classes must be a positive integer, got 0"),
    ],
)
def test_confusion_matrix_rejects_bad_inputs_with_the_value(pred, target, num_classes, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(pred, target, num_classes)


def test_custom_ignore_index_is_honoured_and_255_is_then_an_error():
    target = np.array([0, 1, 9])
    cm = confusion_matrix(np.array([0, 1, 1]), target, num_classes=2, ignore_index=9)
    np.testing.assert_array_equal(cm, [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"\[255\]"):
        confusion_matrix(np.array([0, 1]), np.array([0, 255]), num_classes=2, ignore_index=9)


@pytest.mark.parametrize(
    "cm, names, message",
    [
        (np.zeros((2, 3)), None, r"square \[C, C\].*\[2, 3\]"),
        (np.array([[1, -1], [0, 1]]), None, "negative counts"),
        (np.eye(2), ["a"], r"got 1 class names for a confusion matrix of 2 classes"),
    ],
)
def test_iou_from_confusion_rejects_bad_matrices(cm, names, message):
    with pytest.raises(ValueError, match=message):
        iou_from_confusion(cm, names)


# ---- restriction to a category subset, against brute force ----------------------------------------------------------


def _restrict_brute_force(target, kept, background, ignore_index=255):
    out = np.empty(target.shape, dtype=np.int64)
    for index, label in np.ndenumerate(target):
        if label == ignore_index:
            out[index] = ignore_index
        elif label in kept:
            out[index] = kept.index(label)
        elif background is not None and background in kept:
            out[index] = kept.index(background)
        else:
            out[index] = ignore_index
    return out


@pytest.mark.parametrize(
    "kept, background",
    [([0, 3, 7], 0), ([7, 3], None), ([3, 7], 5), ([4, 0, 9], 0), ([2], 2)],
    ids=["background-first", "no-background", "background-not-kept", "background-not-first", "single-class"],
)
def test_restrict_labels_matches_brute_force(kept, background):
    rng = np.random.default_rng(1)
    target = rng.integers(0, 11, (7, 9)).astype(np.uint8)
    target[rng.random(target.shape) < 0.15] = 255
    out = restrict_labels(target, kept, background)
    np.testing.assert_array_equal(out, _restrict_brute_force(target, kept, background))
    assert out.dtype == np.uint8


def test_restrict_labels_widens_dtype_when_ignore_does_not_fit():
    out = restrict_labels(np.array([0, 1, 2], dtype=np.uint8), [1], background=None, ignore_index=-1)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [-1, 0, -1])


@pytest.mark.parametrize(
    "kept, ignore_index, message",
    [
        ([1, 1, 2], 255, r"class id\(s\) \[1\] more than once"),
        ([], 255, "at least one class id"),
        ([0, 255], 255, "kept contains ignore_index 255"),
        ([4, 5, 6], 1, "collides with the position of a kept class"),
        ([0, -2], 255, "non-negative integer class ids"),
    ],
)
def test_restrict_labels_rejects_bad_keep_lists(kept, ignore_index, message):
    with pytest.raises(ValueError, match=message):
        restrict_labels(np.array([0, 1]), kept, background=None, ignore_index=ignore_index)


def test_restricted_argmax_matches_brute_force_and_a_pruned_head():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 10, 4, 5)).astype(np.float32)
    kept = [7, 2, 5]
    out = restricted_argmax(logits, kept)
    expected = np.empty((2, 4, 5), dtype=np.int64)
    for n, h, w in np.ndindex(2, 4, 5):
        scores = [logits[n, c, h, w] for c in kept]
        expected[n, h, w] = scores.index(max(scores))
    np.testing.assert_array_equal(out, expected)
    # the same as the argmax of a model whose head keeps only those channels, in that order
    np.testing.assert_array_equal(out, logits[:, kept].argmax(axis=1))


def test_restricted_argmax_differs_from_full_argmax_when_a_dropped_class_wins():
    logits = np.array([[[0.1]], [[0.9]], [[0.5]]])[None]  # [1, 3, 1, 1]; class 1 wins overall
    assert logits.argmax(axis=1).item() == 1
    assert restricted_argmax(logits, [0, 2]).item() == 1  # position of class 2 in kept


def test_restricted_argmax_on_channels_last():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 4, 5, 6))  # NHWC
    np.testing.assert_array_equal(restricted_argmax(logits, [5, 0], class_axis=-1), logits[..., [5, 0]].argmax(-1))


@pytest.mark.parametrize(
    "kept, axis, message",
    [
        ([1, 6], 1, r"kept class\(es\) \[6\] do not exist: logits have 3 channels on axis 1"),
        ([0], 4, r"class_axis 4 is out of range for logits of shape \[1, 3, 2, 2\]"),
        ([2, 2], 1, "more than once"),
    ],
)
def test_restricted_argmax_rejects_bad_arguments(kept, axis, message):
    with pytest.raises(ValueError, match=message):
        restricted_argmax(np.zeros((1, 3, 2, 2)), kept, class_axis=axis)


def test_full_and_pruned_model_are_scored_on_the_same_footing():
    """End to end: GT of other classes counts as background; the full model is scored on the kept channels only."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(1, 6, 8, 8))
    target = rng.integers(0, 6, (1, 8, 8))
    kept = [0, 2, 5]  # 0 is background
    labels = restrict_labels(target, kept, background=0)
    full = restricted_argmax(logits, kept)
    pruned = logits[:, kept].argmax(axis=1)  # a perfect pruned model
    cm_full = confusion_matrix(full, labels, len(kept))
    np.testing.assert_array_equal(cm_full, confusion_matrix(pruned, labels, len(kept)))
    assert cm_full.sum() == 64  # no pixel dropped: unkept classes became background
    assert pixel_agreement(full, pruned) == 1.0


# ---- agreement -------------------------------------------------------------------------------------------------------


def test_pixel_agreement_counts_equal_pixels():
    assert pixel_agreement(np.array([[1, 2], [3, 4]]), np.array([[1, 0], [3, 4]], dtype=np.uint8)) == 0.75


def test_agreement_results_accumulate_over_images():
    total = AgreementResult.from_counts(0, 0)
    assert math.isnan(total.agreement)
    total = total + label_agreement(np.array([1, 1]), np.array([1, 0]))
    total = total + label_agreement(np.array([2, 2, 2, 2]), np.array([2, 2, 2, 2]))
    assert (total.matching, total.pixels) == (5, 6)
    assert total.agreement == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    "a, b, message",
    [
        (np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64), r"same shape, got \[2, 2\] and \[2, 3\]"),
        (np.zeros(2), np.zeros(2, np.int64), "a must be an integer label map"),
    ],
)
def test_pixel_agreement_rejects_bad_inputs(a, b, message):
    with pytest.raises(ValueError, match=message):
        pixel_agreement(a, b)
