"""Fidelity metrics: what a pruned model answers, category fidelity, confusion matrix, mIoU (mmsegmentation
convention), category restriction, agreement."""

import json
import math

import numpy as np
import pytest

from disasm.runtime.fidelity import evaluate_fidelity
from disasm.runtime.metrics import (
    AgreementResult,
    CategoryOverlap,
    IoUResult,
    answer_labels,
    chosen_or_none_argmax,
    confusion_matrix,
    full_answer,
    iou_from_confusion,
    label_agreement,
    output_from_names,
    pixel_agreement,
    pruned_answer,
    restrict_labels,
    restricted_argmax,
    sigmoid_masks,
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


# ---- what a pruned model answers: output layout and the full model's chosen-or-none answer ---------------------------

CLASSES = ["background", "person", "bus", "car", "dog"]
OUT = ["background", "person", "car"]  # what compiler/outputs.py lays out for person, car (background the none)


@pytest.mark.parametrize(
    "classes, names, none, kind, mode, source_ids, none_index, chosen, lookup",
    [
        (CLASSES, OUT, "background", "logits", "chosen-or-none", (0, 1, 3), 0, (1, 3), [0, 1, 0, 2, 0]),
        (["person", "bus", "bg", "car"], ["person", "bg", "car"], "bg", "probs", "chosen-or-none", (0, 2, 3), 1,
         (0, 3), [0, 1, 1, 2]),
        (["road", "car", "sky"], ["road", "sky", "other"], "other", "logits", "chosen-or-none", (0, 2, None), 2,
         (0, 2), [0, 2, 1]),
        (["road", "other", "sky"], ["sky", "other"], "other", "logits", "chosen-or-none", (2, 1), 1, (2,), [1, 1, 0]),
        (CLASSES, ["car", "person", "background"], "background", "logits", "chosen-or-none", (3, 1, 0), 2, (3, 1),
         [2, 1, 2, 0, 2]),
        (["road", "car", "sky"], ["road", "sky"], None, "sigmoid", "chosen-or-none", (0, 2), None, (0, 2), None),
        (["road", "car", "sky"], ["road", "sky"], "", "sigmoid", "chosen-or-none", (0, 2), None, (0, 2), None),
        (CLASSES, OUT, "background", "logits", "restricted", (0, 1, 3), 0, (1, 3), [0, 1, 0, 2, 0]),
        (["road", "car", "sky"], ["road", "sky"], None, "logits", "restricted", (0, 2), None, (0, 2), None),
    ],
    ids=["background-first", "background-in-the-middle", "other-appended", "other-a-class-of-the-model",
         "order-as-given", "sigmoid-chosen-only", "sigmoid-empty-none-from-metadata", "restricted",
         "restricted-no-background"],
)
def test_output_from_names_maps_each_channel_to_its_class_and_the_rest_to_none(classes, names, none, kind, mode,
                                                                                source_ids, none_index, chosen,
                                                                                lookup):
    out = output_from_names(classes, names, none, kind, mode)
    assert out.names == tuple(names) and out.source_ids == source_ids and out.none_index == none_index
    assert out.chosen == chosen and out.chosen_names == tuple(classes[i] for i in chosen)
    assert (out.output_kind, out.mode, out.num_classes) == (kind, mode, len(classes))
    if lookup is None:
        assert out.lookup is None
    else:
        np.testing.assert_array_equal(out.lookup, lookup)


@pytest.mark.parametrize(
    "classes, chosen, background, kind, mode",
    [
        (CLASSES, ["person", "car"], "background", "logits", "chosen-or-none"),
        (["person", "bus", "bg", "car"], ["person", "car"], "bg", "logits", "chosen-or-none"),
        (["road", "car", "sky", "tree"], ["road", "sky"], None, "probs", "chosen-or-none"),
        (["road", "car", "sky"], ["road", "sky"], None, "sigmoid", "chosen-or-none"),
        (CLASSES, ["person", "car"], "background", "logits", "restricted"),
        (["road", "car", "sky"], ["road", "sky"], None, "logits", "restricted"),
    ],
)
def test_the_judge_reads_the_layout_the_compiler_builds(classes, chosen, background, kind, mode):
    """Each output channel answers exactly the full model's classes the compiler's head takes the max of."""
    from disasm.compiler.outputs import plan_outputs  # tests may join the two sides; runtime/ itself may not

    plan = plan_outputs(tuple(classes), chosen, background, kind, mode)
    out = output_from_names(classes, plan.names, plan.none, kind, mode)
    assert out.names == plan.names and out.none_index == plan.none_index and out.none_name == plan.none
    if out.lookup is not None and mode == "chosen-or-none":
        for channel, sources in enumerate(plan.sources):
            assert all(out.lookup[k] == channel for k in sources), (channel, sources)
        assert sorted(k for sources in plan.sources for k in sources) == list(range(len(classes)))
    else:
        assert out.source_ids == tuple(s[0] for s in plan.sources)


@pytest.mark.parametrize(
    "names, none, kind, mode, message",
    [
        (["background", "cat"], "background", "logits", "chosen-or-none",
         r"output class\(es\) 'cat' are not classes of the full model"),
        (["person", "other"], "none", "logits", "chosen-or-none", "none channel 'none' is not one of the output"),
        (["background", "person", "person"], "background", "logits", "chosen-or-none", "'person' more than once"),
        (["background"], "background", "logits", "chosen-or-none", "no category besides the none channel"),
        (["person", "car"], None, "logits", "chosen-or-none", "needs a none channel"),
        (["person", "car", "background"], "background", "sigmoid", "chosen-or-none", "sigmoid model .* no none"),
        (["person", "other"], "other", "logits", "restricted", "'other' is not a class of the full model"),
        ("background,person", "background", "logits", "chosen-or-none", "split a comma-separated list"),
        ([], None, "sigmoid", "chosen-or-none", "at least one class"),
        (OUT, "background", "softmax", "chosen-or-none", "output kind 'softmax' unknown"),
        (OUT, "background", "logits", "paper", "mode 'paper' unknown"),
    ],
    ids=["unknown-name", "none-not-an-output", "duplicate", "only-none", "softmax-without-none", "sigmoid-with-none",
         "restricted-other", "comma-string", "empty", "bad-kind", "bad-mode"],
)
def test_output_from_names_rejects_layouts_it_cannot_read(names, none, kind, mode, message):
    with pytest.raises(ValueError, match=message):
        output_from_names(CLASSES, names, none, kind, mode)


def test_full_answer_maps_non_chosen_winner_to_none_not_to_the_nearest_kept_class():
    # one pixel per column; winners: bus (not chosen), car, person, dog (not chosen), background
    logits = np.zeros((1, 5, 1, 5))
    for col, winner in enumerate([2, 3, 1, 4, 0]):
        logits[0, winner, 0, col] = 5.0
    logits[0, 3, 0, 0] = 4.0  # car is the runner-up on the bus pixel: restricted reads it as car
    out = output_from_names(CLASSES, OUT, "background")
    np.testing.assert_array_equal(chosen_or_none_argmax(logits, out), [[[0, 2, 1, 0, 0]]])
    np.testing.assert_array_equal(full_answer(logits, out), [[[0, 2, 1, 0, 0]]])
    restricted = output_from_names(CLASSES, OUT, "background", mode="restricted")
    np.testing.assert_array_equal(full_answer(logits, restricted), [[[2, 2, 1, 0, 0]]])


def test_without_background_other_is_last_and_takes_every_non_chosen_class():
    classes = ["road", "car", "sky", "tree"]
    out = output_from_names(classes, ["road", "sky", "other"], "other")
    assert out.none_index == 2 and out.chosen_positions == (0, 1) and out.source_ids == (0, 2, None)
    logits = np.eye(4)[[0, 1, 2, 3]].T[None, :, None, :]  # [1, 4, 1, 4]: pixel j won by class j
    np.testing.assert_array_equal(chosen_or_none_argmax(logits, out), [[[0, 2, 1, 2]]])
    # channels last gives the same answer
    np.testing.assert_array_equal(chosen_or_none_argmax(np.moveaxis(logits, 1, -1), out, class_axis=-1),
                                  [[[0, 2, 1, 2]]])
    # ground truth is read the same way; 255 stays ignored
    np.testing.assert_array_equal(answer_labels(np.array([[0, 1, 2, 3, 255]], np.uint8), out), [[0, 2, 1, 2, 255]])


def test_chosen_or_none_argmax_rejects_scores_of_the_wrong_model():
    out = output_from_names(CLASSES, ["background", "person"], "background")
    with pytest.raises(ValueError, match=r"full model scores have 3 channels on axis 1 .* expected 5"):
        chosen_or_none_argmax(np.zeros((1, 3, 2, 2)), out)


def test_sigmoid_answers_are_thresholded_per_category():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.51]])[None, :, :, None]  # [1, 3 classes, 2 px, 1]
    out = output_from_names(["road", "car", "sky"], ["road", "sky"], None, "sigmoid")
    masks = full_answer(probs, out)
    assert masks.dtype == bool and masks.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(masks[0, :, :, 0], [[True, False], [False, True]])  # road, sky
    np.testing.assert_array_equal(sigmoid_masks(probs, [1])[0, 0, :, 0], [True, True])  # car: both > 0.5
    # the pruned model holds just road and sky
    np.testing.assert_array_equal(pruned_answer(probs[:, [0, 2]], out), masks)


def test_category_overlap_accumulates_at_dataset_level():
    # image 1: category 0 predicted right on 1 px; image 2: 1 of 3 px. Per-image mean would be (1 + 1/3) / 2.
    a1, b1 = [np.array([True, False])], [np.array([True, False])]
    a2, b2 = [np.array([True, True, True])], [np.array([True, False, False])]
    total = CategoryOverlap.zeros(1) + CategoryOverlap.of_masks(a1, b1) + CategoryOverlap.of_masks(a2, b2)
    assert (total.intersection[0], total.union[0]) == (2, 4)
    assert total.mean_iou == pytest.approx(0.5)


def test_category_overlap_leaves_absent_categories_out():
    overlap = CategoryOverlap.of_masks([np.zeros(3, bool), np.array([1, 0, 0], bool)],
                                       [np.zeros(3, bool), np.array([1, 1, 0], bool)])
    assert math.isnan(overlap.iou[0]) and overlap.mean_iou == pytest.approx(0.5)
    assert math.isnan(CategoryOverlap.of_masks([np.zeros(2, bool)], [np.zeros(2, bool)]).mean_iou)


# ---- evaluate_fidelity on tiny fake models -------------------------------------------------------------------------


def _onehot(labels: np.ndarray, channels: int, scale: float = 4.0) -> np.ndarray:
    """[N, H, W] label maps -> [N, C, H, W] scores whose argmax is the label."""
    return np.moveaxis(np.eye(channels)[labels], -1, 1) * scale


def _fake_models(full_labels: np.ndarray, classes: list[str], names: list[str], none: str | None,
                 pruned_labels: np.ndarray | None = None):
    """Full model returning one-hot scores of `full_labels[i]`; pruned returns its own labels (in output space),
    defaulting to a perfect copy of the full model's chosen-or-none answer."""
    out = output_from_names(classes, names, none)
    inputs = np.arange(len(full_labels), dtype=np.float32).reshape(-1, 1)
    if pruned_labels is None:
        pruned_labels = out.lookup[full_labels]

    def full(x):
        return _onehot(full_labels[int(x[0, 0]):int(x[0, 0]) + 1], len(classes))

    def pruned(x):
        return _onehot(pruned_labels[int(x[0, 0]):int(x[0, 0]) + 1], len(out.names))

    return full, pruned, inputs, out


def test_perfect_copy_scores_fidelity_one_and_matches_ground_truth_reading():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 5, (3, 6, 7))
    full, pruned, inputs, _ = _fake_models(labels, CLASSES, OUT, "background")
    result = evaluate_fidelity(full, pruned, inputs, labels, CLASSES, OUT, "background", "logits", "chosen-or-none")
    assert result["category_fidelity"] == 1.0 and result["per_category"] == {"person": 1.0, "car": 1.0}
    assert result["agreement"] == 1.0 and result["note"] is None
    assert result["output_classes"] == ["background", "person", "car"] and result["none"] == "background"
    # the full model predicts the ground truth exactly, so under the same reading both score mIoU 1
    assert result["miou_full"] == 1.0 and result["miou_pruned"] == 1.0
    assert set(result["per_class"]) == {"background", "person", "car"}
    json.dumps(result, allow_nan=False)


def test_the_judge_follows_the_stated_channel_order_not_the_model_order():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 5, (2, 6, 6))
    names = ["car", "person", "background"]
    full, pruned, inputs, _ = _fake_models(labels, CLASSES, names, "background")
    result = evaluate_fidelity(full, pruned, inputs, labels, CLASSES, names, "background")
    assert result["category_fidelity"] == 1.0 and list(result["per_category"]) == ["car", "person"]
    assert result["output_classes"] == names and result["none"] == "background" and result["miou_pruned"] == 1.0
    # the same answers read under the model-order layout are wrong: the layout comes from the names
    _, shuffled, _, _ = _fake_models(labels, CLASSES, OUT, "background")
    misread = evaluate_fidelity(full, shuffled, inputs, None, CLASSES, names, "background")
    assert misread["per_category"] == {"car": 0.0, "person": 1.0}  # person sits at channel 1 in both layouts


def test_all_none_model_scores_zero_category_fidelity_though_agreement_is_high():
    labels = np.zeros((4, 10, 10), np.int64)
    labels[:, :2, :2] = 1  # person on 4% of each image, background elsewhere
    labels[0, 5, 5] = 3  # one car pixel
    full, pruned, inputs, _ = _fake_models(labels, CLASSES, OUT, "background", pruned_labels=np.zeros_like(labels))
    result = evaluate_fidelity(full, pruned, inputs, None, CLASSES, OUT, "background", "logits", "chosen-or-none")
    assert result["category_fidelity"] == 0.0
    assert result["per_category"] == {"person": 0.0, "car": 0.0}
    assert result["agreement"] > 0.95  # why pixel agreement is not a fidelity measure
    assert result["category_pixels"]["person"] == {"full": 16, "pruned": 0, "intersection": 0, "union": 16}


def test_fidelity_falls_as_the_chosen_categories_are_lost():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 5, (4, 8, 8))
    out = output_from_names(CLASSES, OUT, "background")
    answer = out.lookup[labels]
    scores = []
    for lost in (0.0, 0.3, 0.6, 1.0):  # share of the chosen pixels the pruned model answers as none
        damaged = answer.copy()
        damaged[(answer > 0) & (rng.random(answer.shape) < lost)] = 0
        full, pruned, inputs, _ = _fake_models(labels, CLASSES, OUT, "background", pruned_labels=damaged)
        scores.append(evaluate_fidelity(full, pruned, inputs, None, CLASSES, OUT, "background")["category_fidelity"])
    assert scores[0] == 1.0 and scores[-1] == 0.0
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def test_category_absent_everywhere_is_left_out_and_all_absent_gives_none_with_a_note():
    labels = np.zeros((2, 4, 4), np.int64)
    labels[:, 0, 0] = 1  # person only; car never appears
    full, pruned, inputs, _ = _fake_models(labels, CLASSES, OUT, "background")
    result = evaluate_fidelity(full, pruned, inputs, None, CLASSES, OUT, "background")
    assert result["category_fidelity"] == 1.0 and result["per_category"] == {"person": 1.0, "car": None}
    assert "car" in result["note"] and result["categories_scored"] == 1
    empty = np.zeros((2, 4, 4), np.int64)
    full, pruned, inputs, _ = _fake_models(empty, CLASSES, OUT, "background")
    result = evaluate_fidelity(full, pruned, inputs, None, CLASSES, OUT, "background")
    assert result["category_fidelity"] is None and "undefined" in result["note"]
    json.dumps(result, allow_nan=False)


def test_ground_truth_of_non_chosen_classes_counts_as_none_in_miou():
    classes = ["road", "car", "sky", "bus"]
    truth = np.array([[[1, 3, 2, 255]]])  # car, bus (not chosen), sky, ignored
    predicted = np.array([[[1, 3, 0, 1]]])  # full model: car, bus (-> other), road (-> other), car (ignored)
    full, pruned, inputs, out = _fake_models(predicted, classes, ["car", "sky", "other"], "other")
    assert out.names == ("car", "sky", "other")
    result = evaluate_fidelity(full, pruned, inputs, truth, classes, ["car", "sky", "other"], "other")
    # pixels scored: car right, bus as other right, sky as other wrong
    assert result["per_class"] == {"car": {"full": 1.0, "pruned": 1.0}, "sky": {"full": 0.0, "pruned": 0.0},
                                   "other": {"full": 0.5, "pruned": 0.5}}
    assert result["miou_full"] == pytest.approx(0.5)


def test_restricted_mode_reads_the_full_model_on_the_kept_channels():
    labels = np.array([[[2, 3]]])  # bus, car
    out = output_from_names(CLASSES, OUT, "background", mode="restricted")

    def full(x):
        scores = _onehot(labels, 5)
        scores[0, 3, 0, 0] = 1.0  # car is runner-up on the bus pixel
        return scores

    def pruned(x):
        return _onehot(np.array([[[2, 2]]]), 3)  # car on both

    result = evaluate_fidelity(full, pruned, np.zeros((1, 1)), None, CLASSES, OUT, "background", "logits", "restricted")
    assert result["mode"] == "restricted" and result["per_category"]["car"] == 1.0
    result = evaluate_fidelity(full, pruned, np.zeros((1, 1)), None, CLASSES, OUT, "background", "logits", "chosen-or-none")
    assert result["per_category"]["car"] == 0.5  # the bus pixel is none for the full model
    assert out.names == ("background", "person", "car")


def test_sigmoid_fidelity_and_ground_truth_per_category():
    classes = ["road", "car", "sky"]
    probs_full = np.array([[[[0.9, 0.9, 0.1]], [[0.8, 0.1, 0.1]], [[0.1, 0.7, 0.9]]]])  # [1, 3, 1, 3]
    probs_pruned = probs_full[:, [0, 2]].copy()
    probs_pruned[0, 1, 0, 1] = 0.2  # pruned loses sky on pixel 1
    truth = np.array([[[0, 2, 255]]])
    result = evaluate_fidelity(lambda x: probs_full, lambda x: probs_pruned, np.zeros((1, 1)), truth, classes,
                               ["road", "sky"], None, "sigmoid")
    assert result["output_classes"] == ["road", "sky"] and result["none"] is None
    assert result["per_category"] == {"road": 1.0, "sky": 0.5}
    assert result["category_fidelity"] == pytest.approx(0.75)
    assert result["agreement"] == pytest.approx(5 / 6)
    # vs ground truth (pixel 2 ignored): road full {0,1} vs truth {0} -> 0.5; sky full {1} vs {1} -> 1, pruned {} -> 0
    assert result["per_class"] == {"road": {"full": 0.5, "pruned": 0.5}, "sky": {"full": 1.0, "pruned": 0.0}}


def test_predictions_are_resized_to_the_mask_size_and_channels_last_works():
    labels = np.array([[[1, 0], [0, 3]]])
    full, pruned, inputs, _ = _fake_models(labels, CLASSES, OUT, "background")
    truth = np.kron(labels[0], np.ones((2, 2), np.int64))[None]  # 4x4 masks for 2x2 outputs
    result = evaluate_fidelity(lambda x: np.moveaxis(full(x), 1, -1), lambda x: np.moveaxis(pruned(x), 1, -1),
                               inputs, truth, CLASSES, OUT, "background", class_axis=3)
    assert result["category_fidelity"] == 1.0 and result["miou_full"] == 1.0


def test_fidelity_rejects_a_pruned_model_with_the_wrong_channels():
    labels = np.zeros((1, 2, 2), np.int64)
    full, _, inputs, _ = _fake_models(labels, CLASSES, OUT, "background")
    with pytest.raises(ValueError, match=r"pruned model scores have 5 channels .* expected 3"):
        evaluate_fidelity(full, full, inputs, None, CLASSES, OUT, "background")
