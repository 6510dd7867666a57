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
    assert any(g.size % 4 for g in analysis.groups if g.prunable) and any(g.size % 4 == 0 for g in analysis.groups)
    scores = scores_for(analysis)
    keep, choices = select_channels(analysis, scores, SelectionSettings(alpha=0.5, round_to=4), np.array([0, 2]))
    for c in choices:
        if c.reason:
            continue
        s = scores[c.group]
        assert c.kept == min(int((s > 0.5).sum()), c.total)
        if c.size % 4 == 0:
            assert c.total % 4 == 0 or c.total == c.size
        else:  # the full model already runs this group off the blocks: no rounding
            assert c.total == max(1, c.kept) and c.padded == 0
        assert set(np.flatnonzero(s > 0.5)) <= set(keep[c.group]) or c.total < (s > 0.5).sum()
    np.testing.assert_array_equal(keep[analysis.class_group], [0, 2])


def test_auto_rounding_follows_the_group_size():
    auto = SelectionSettings()
    assert [auto.unit(n) for n in (24, 12, 9, 131, 64, 36)] == [8, 4, 1, 1, 8, 4]
    assert [SelectionSettings(round_to=16).unit(n) for n in (32, 24)] == [16, 1]


def test_auto_rounded_counts_are_multiples_of_each_groups_unit(analysis):
    settings = SelectionSettings(alpha=0.5)
    scores = scores_for(analysis, 3)
    _, choices = select_channels(analysis, scores, settings, np.array([0, 2]))
    cut = [c for c in choices if not c.reason]
    assert {settings.unit(c.size) for c in cut} == {4, 8}  # a group of 12 and multiples of 8
    for c in cut:
        assert c.total % settings.unit(c.size) == 0 or c.total == c.size
        assert c.total - c.padded == c.kept and c.padded <= settings.unit(c.size)


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


# ---------------------------------------------------------------------------------------------------------------------
# Global allocation (attribution.allocate): MACs model, loss curves, the greedy
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    import torch
    from architectures import MiniDeepLab, export, randomise_batchnorm
    from disasm.attribution.calibration import observed_tensors
    from disasm.attribution.disassembler import AttributionSettings, attribute
    from disasm.attribution.interpreter import TorchGraph
    from disasm.attribution.moments import find_consumers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("alloc") / "m.onnx"
    export(randomise_batchnorm(MiniDeepLab()), path)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    analysis = analyse(model)
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    attribution = attribute(TorchGraph(model), x, observed_tensors(analysis), 5, "logits",
                            AttributionSettings(batch_size=8), consumers=find_consumers(model, analysis))
    return model, analysis, attribution


def test_mac_model_counts_what_the_surgery_leaves(calibrated):
    from disasm.attribution.allocate import mac_model
    from disasm.compiler.cost import model_cost
    from disasm.compiler.prune import prune

    model, analysis, _ = calibrated
    macs = mac_model(model, analysis, (1, 3, 32, 32))
    assert macs.total == model_cost(model, (1, 3, 32, 32)).macs
    rng = np.random.default_rng(1)
    for _ in range(3):
        keep = {g.id: np.sort(rng.choice(g.size, rng.integers(1, g.size + 1), replace=False))
                for g in analysis.groups if g.prunable and g.id != analysis.class_group}
        expected = model_cost(prune(model, analysis, keep), (1, 3, 32, 32)).macs
        assert macs.macs(analysis, keep) == pytest.approx(expected, rel=1e-9)


def test_loss_curve_is_the_least_squares_error_of_each_prefix(calibrated):
    from disasm.attribution.allocate import loss_curves
    from disasm.attribution.compensate import kept_features, reconstruction_error, theta_matrix
    from disasm.compiler.channels import conv_spec
    import onnx_graphsurgeon as gs

    model, analysis, attribution = calibrated
    graph = gs.import_onnx(model)
    # a group read by exactly one consumer with moments, alone on its tensor
    for node_index, moments in sorted(attribution.moments.items()):
        layout = analysis.tensors[graph.nodes[node_index].inputs[0].name]
        group = layout.segments[0].group
        readers = [n for n in attribution.moments
                   if any(s.group == group for s in analysis.tensors[graph.nodes[n].inputs[0].name].segments)]
        if len(layout.segments) == 1 and readers == [node_index] and analysis.groups[group].prunable:
            break
    else:
        pytest.fail("no group with a single measured consumer")
    size = analysis.groups[group].size
    order = np.random.default_rng(2).permutation(size)
    curves = loss_curves(model, analysis, attribution, {group: order}, [group])
    loss = curves.loss[group]
    assert loss[size] == pytest.approx(0.0, abs=1e-5) and loss[0] > loss[size // 2] > 0
    assert np.all(np.diff(loss) <= 1e-9)
    spec = conv_spec(graph.nodes[node_index])
    s = moments / moments[-1, -1]
    taps = int(np.prod(spec.kernel))
    theta = theta_matrix(spec.weight, spec.bias)
    energy = float(np.einsum("oi,ij,oj->", theta, s, theta)) - float(np.sum((theta @ s[-1]) ** 2))  # variance
    for k in (1, size // 2, size - 1):
        cols = kept_features(np.sort(order[:k]), taps, spec.in_channels * taps)
        best = np.zeros_like(theta)
        best[:, cols] = theta @ s[:, cols] @ np.linalg.pinv(s[np.ix_(cols, cols)])  # plain least squares
        assert loss[k] == pytest.approx(reconstruction_error(best, theta, s) * theta.shape[0] / energy, rel=1e-3,
                                        abs=1e-6)


def test_global_allocation_meets_the_mac_target_with_less_loss_than_one_threshold(calibrated):
    from disasm.attribution.allocate import allocate, mac_model

    model, analysis, attribution = calibrated
    rng = np.random.default_rng(3)
    scores = {g.id: rng.random(g.size) for g in analysis.groups if g.prunable}
    settings = SelectionSettings(alpha=0.5, round_to=2)
    macs = mac_model(model, analysis, (1, 3, 32, 32))
    threshold, _ = select_channels(analysis, scores, settings, np.array([0, 1]))
    ratio = macs.macs(analysis, threshold) / macs.total
    keep, choices, curves = allocate(model, analysis, attribution, scores, settings, np.array([0, 1]), macs, ratio)
    again, _, _ = allocate(model, analysis, attribution, scores, settings, np.array([0, 1]), macs, ratio)
    assert all(np.array_equal(keep[g], again[g]) for g in keep)  # deterministic
    assert macs.macs(analysis, keep) <= ratio * macs.total
    np.testing.assert_array_equal(keep[analysis.class_group], [0, 1])
    assert {c.group: c.total for c in choices} == {g: len(k) for g, k in keep.items()} | \
        {c.group: c.total for c in choices if c.group not in keep}
    for g, k in keep.items():  # each group keeps its best channels
        if g != analysis.class_group:
            best = np.sort(np.lexsort((np.arange(len(scores[g])), -scores[g]))[:len(k)])
            np.testing.assert_array_equal(k, best)

    def total(keep_sets):
        return sum(curves.loss[g][len(keep_sets[g])] for g in curves.loss if curves.measured(g))

    assert total(keep) < total(threshold)


def test_disassembler_taylor_combination_averages_the_unit_scaled_scores(calibrated):
    from disasm.attribution.baselines import criterion_scores

    model, analysis, attribution = calibrated
    settings = SelectionSettings()
    both = criterion_scores("disassembler+taylor", model, analysis, attribution, [0, 1, 2, 3, 4], settings)
    dis = criterion_scores("disassembler", model, analysis, attribution, [0, 1, 2, 3, 4], settings)
    tay = criterion_scores("taylor", model, analysis, attribution, [0, 1, 2, 3, 4], settings)
    assert both and set(both) <= set(dis) & set(tay)
    for g, s in both.items():
        assert np.all((s >= 0) & (s <= 1 + 1e-12))
        unit = [v / v.max() if v.max() > 0 else np.zeros_like(v) for v in (dis[g], tay[g])]
        np.testing.assert_allclose(s, 0.5 * (unit[0] + unit[1]))
