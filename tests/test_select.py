"""Selection: thresholds, per-group budgets, rounding and the class head, on a real channel analysis."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from architectures import MiniDeepLab, export, randomise_batchnorm
from disasm.attribution.select import (SelectionSettings, class_keep_set, select_channels, select_with_budget)
from disasm.compiler.channels import analyse
from disasm.compiler.errors import DisasmError


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    path = tmp_path_factory.mktemp("sel") / "m.onnx"
    export(randomise_batchnorm(MiniDeepLab()), path)
    return analyse(onnx.shape_inference.infer_shapes(onnx.load(str(path))))


def scores_for(analysis, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.size) for g in analysis.groups if g.prunable}


def test_threshold_keeps_high_scores_rounded_up_to_round_to(analysis):
    scores = scores_for(analysis)
    keep, choices = select_channels(analysis, scores, SelectionSettings(alpha=0.5, round_to=4), np.array([0, 2]))
    for c in choices:
        if c.reason:
            continue
        s = scores[c.group]
        assert c.kept == min(int((s > 0.5).sum()), c.total)
        assert c.total % 4 == 0 or c.total == c.size
        assert set(np.flatnonzero(s > 0.5)) <= set(keep[c.group]) or c.total < (s > 0.5).sum()
    np.testing.assert_array_equal(keep[analysis.class_group], [0, 2])


def test_keep_ratio_is_a_per_group_budget(analysis):
    scores = scores_for(analysis)
    keep, choices = select_channels(analysis, scores, SelectionSettings(keep_ratio=0.25, round_to=1), np.array([0]))
    for c in choices:
        if not c.reason:
            assert len(keep[c.group]) == int(np.ceil(0.25 * c.size))
            best = np.sort(np.argsort(-scores[c.group], kind="stable")[:len(keep[c.group])])
            np.testing.assert_array_equal(keep[c.group], best)


def test_budget_matching_keeps_the_same_counts_with_another_criterion(analysis):
    keep, choices = select_channels(analysis, scores_for(analysis, 0), SelectionSettings(alpha=0.6), np.array([0, 1]))
    other = select_with_budget(scores_for(analysis, 1), choices, keep)
    assert {g: len(k) for g, k in other.items()} == {g: len(k) for g, k in keep.items()}
    assert any(not np.array_equal(other[g], keep[g]) for g in keep if g != analysis.class_group)


def test_settings_reject_out_of_range_values():
    for bad in ({"alpha": 1.5}, {"round_to": 0}, {"keep_ratio": 0.0}, {"rule": "vote"}, {"last_n": 0}):
        with pytest.raises(DisasmError):
            SelectionSettings(**bad)


def test_class_keep_set_keeps_background_and_original_order():
    classes = ("background", "cat", "dog", "car")
    np.testing.assert_array_equal(class_keep_set(classes, ["car", "cat"], "background"), [0, 1, 3])
    np.testing.assert_array_equal(class_keep_set(classes, ["dog"], None), [2])
