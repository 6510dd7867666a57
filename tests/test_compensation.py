"""Compensation of cut channels: mean folding is exact where it claims to be, the least-squares refit is a true
refit (identity when nothing is cut, lower reconstruction error than mean and none), and surgery stays exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from architectures import MiniDeepLab, export, randomise_batchnorm
from disasm.attribution.compensate import (consumer_losses, kept_features, lsq_compensation,
                                           mean_compensation,
                                           reconstruction_error, refit)
from disasm.attribution.disassembler import Attribution, AttributionSettings, attribute
from disasm.attribution.interpreter import TorchGraph
from disasm.attribution.moments import Consumer, find_consumers, patches
from disasm.compiler.channels import analyse
from disasm.compiler.prune import masked_reference, prune


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def two_convs(kernel: int, group: int = 1, weight_behind_identity: bool = False) -> onnx.ModelProto:
    """x -> Conv 3x3 (3->8) -> Relu -> t -> Conv kxk (8->6, `group` groups, no bias) -> y. t's group is cut; y is the
    class head. The consumer's weight may come through an Identity node, as unfolded exports write shared weights."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(6, 8 // group, kernel, kernel)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["t"], name="relu"),
             helper.make_node("Conv", ["t", "w2_read" if weight_behind_identity else "w2"], ["y"], name="conv2",
                              pads=[kernel // 2] * 4, group=group)]
    if weight_behind_identity:
        nodes.insert(0, helper.make_node("Identity", ["w2"], ["w2_read"], name="shared_weight"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 12, 12])], [w1, b1, w2])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def pooled_gemm() -> onnx.ModelProto:
    """x -> Conv 3x3 (3->8) -> Relu -> t -> GlobalAveragePool -> pooled -> Flatten -> Gemm (8->5, no C) -> [1,5,1,1]."""
    rng = np.random.default_rng(0)
    consts = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1"),
              numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "g"),
              numpy_helper.from_array(np.array([1, 5, 1, 1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["t"]),
             helper.make_node("GlobalAveragePool", ["t"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "g"], ["scores"], name="gemm", transB=1, alpha=0.5),
             helper.make_node("Reshape", ["scores", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 1, 1])], consts)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_mean_folding_into_a_gemm_equals_channels_held_at_their_mean():
    """A squeeze-excite Gemm reads pooled channels: the fold uses the pooled map's means and gives the Gemm a C."""
    model = pooled_gemm()
    analysis = analyse(model)
    assert "pooled" in analysis.groups[analysis.tensors["t"].segments[0].group].observed
    group_id = analysis.tensors["t"].segments[0].group
    keep = np.array([1, 2, 6])
    mean = np.random.default_rng(1).uniform(0.5, 2.0, size=8)
    replacements = mean_compensation(model, analysis, {group_id: keep}, fake_attribution("pooled", mean))
    assert [v.shape for v in replacements.values()] == [(5,)]
    pruned = prune(model, analysis, {group_id: keep}, replacements=replacements)
    reference = constant_channels_reference(model, "t", np.setdiff1d(np.arange(8), keep), mean)
    x = np.random.default_rng(2).normal(size=(1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run(pruned, x), run(reference, x), atol=1e-4, rtol=1e-4)


def constant_channels_reference(model: onnx.ModelProto, tensor: str, removed: np.ndarray, mean: np.ndarray) -> onnx.ModelProto:
    """The model in which the removed channels of `tensor` are replaced by their constant mean."""
    c = len(mean)
    keep = np.ones((1, c, 1, 1), np.float32)
    keep[0, removed] = 0
    fill = np.zeros((1, c, 1, 1), np.float32)
    fill[0, removed, 0, 0] = mean[removed]
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.graph.initializer.extend([numpy_helper.from_array(keep, "keep_mask"), numpy_helper.from_array(fill, "fill")])
    for node in ref.graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = "t_const"
    ref.graph.node.extend([helper.make_node("Mul", [tensor, "keep_mask"], ["t_kept"]),
                           helper.make_node("Add", ["t_kept", "fill"], ["t_const"])])
    return onnx.shape_inference.infer_shapes(gs.export_onnx(gs.import_onnx(ref).toposort()))


def fake_attribution(tensor: str, mean: np.ndarray) -> Attribution:
    return Attribution([tensor], {tensor: np.zeros((5, len(mean)))}, {tensor: np.zeros((5, len(mean)))},
                       {tensor: mean.astype(np.float64)}, np.zeros(5, np.int64), images=1)


@pytest.mark.parametrize("kernel,group,identity", [(1, 1, False), (3, 1, False), (1, 2, False), (1, 1, True)])
def test_mean_folding_equals_channels_held_at_their_mean(kernel, group, identity):
    """Also for a grouped consumer (each group folds its own removed inputs) and a weight read through Identity."""
    model = two_convs(kernel, group, identity)
    analysis = analyse(model)
    group_id = analysis.tensors["t"].segments[0].group
    keep = np.array([0, 2, 5, 7]) if group == 1 else np.array([0, 2])  # grouped: the same offsets in both groups
    mean = np.random.default_rng(1).uniform(0.5, 2.0, size=8)
    replacements = mean_compensation(model, analysis, {group_id: keep}, fake_attribution("t", mean))
    assert list(replacements) == [(next(i for i, n in enumerate(model.graph.node) if n.name == "conv2"), 2)]
    pruned = prune(model, analysis, {group_id: keep}, replacements=replacements)
    removed = np.setdiff1d(np.arange(8), analysis.tensors["t"].kept_indices({group_id: keep}))
    reference = constant_channels_reference(model, "t", removed, mean)
    x = np.random.default_rng(2).normal(size=(1, 3, 12, 12)).astype(np.float32)
    got, expected = run(pruned, x), run(reference, x)
    if kernel == 1:
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    else:  # exact in the interior; the border band of (k-1)/2 pixels sees padding zeros, which the fold ignores
        np.testing.assert_allclose(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)
        assert not np.allclose(got[..., 0, :], expected[..., 0, :], atol=1e-4)


@pytest.mark.parametrize("stride,dilation,pads,auto_pad", [(1, 1, (1, 1, 1, 1), "NOTSET"), (2, 2, (2, 0, 1, 3), "NOTSET"),
                                                          (2, 1, (0, 0, 0, 0), "SAME_UPPER")])
def test_patches_reproduce_the_convolution(stride, dilation, pads, auto_pad):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 4, 9, 11, generator=g), torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, generator=g)
    consumer = Consumer(0, "c", "x", 4, (3, 3), (stride, stride), (dilation, dilation), pads, auto_pad)
    if auto_pad == "SAME_UPPER":
        expected = F.conv2d(F.pad(x, (1, 1, 1, 1)), w, b, stride)[..., :5, :6]
    else:
        top, left, bottom, right = pads
        expected = F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, dilation=dilation)
    theta = torch.cat([w.reshape(6, -1), b[:, None]], 1)
    got = (patches(x, consumer) @ theta.T).reshape(2, expected.shape[2], expected.shape[3], 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_refit_keeping_everything_returns_the_original_weights():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(size=(500, 12)), np.ones((500, 1))], axis=1)
    second_moment = z.T @ z / len(z)
    theta = rng.normal(size=(4, 13))
    np.testing.assert_allclose(refit(theta, second_moment, np.arange(13)), theta, atol=1e-9)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("comp") / "deeplab.onnx"
    export(randomise_batchnorm(MiniDeepLab()), path)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    analysis = analyse(model)
    consumers = find_consumers(model, analysis)
    tensors = sorted({c.tensor for c in consumers})
    x = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    attribution = attribute(TorchGraph(model), x, tensors, 5, "logits", AttributionSettings(batch_size=8),
                            consumers=consumers)
    rng = np.random.default_rng(3)
    keep_sets = {g.id: np.sort(rng.choice(g.size, g.size // 2, replace=False))
                 for g in analysis.groups if g.prunable and g.id != analysis.class_group}
    return model, analysis, attribution, keep_sets, x


def test_lsq_reconstructs_consumer_outputs_better_than_mean_and_none(calibrated):
    model, analysis, attribution, keep_sets, _ = calibrated
    lsq, fallbacks = lsq_compensation(model, analysis, keep_sets, attribution)
    mean = mean_compensation(model, analysis, keep_sets, attribution)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not fallbacks
    totals = {"none": 0.0, "mean": 0.0, "lsq": 0.0}
    checked = 0
    for edit in analysis.edits:
        kept = edit.channels.kept_indices(keep_sets)
        if edit.kind != "consume" or kept.size == edit.channels.size:
            continue
        node = model.graph.node[edit.node]
        w = values[node.input[1]]
        b = values[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32)
        taps, features = int(np.prod(w.shape[2:])), int(np.prod(w.shape[1:]))
        columns = kept_features(kept, taps, features)
        mask = np.zeros(features + 1)
        mask[columns] = 1

        def theta(weight, bias):
            return np.concatenate([weight.reshape(w.shape[0], -1), bias[:, None]], 1).astype(np.float64)

        full = theta(w, b)
        second_moment = attribution.moments[edit.node] / attribution.moments[edit.node][-1, -1]
        errors = {"none": reconstruction_error(full * mask, full, second_moment),
                  "mean": reconstruction_error(theta(w, mean[(edit.node, 2)]) * mask, full, second_moment),
                  "lsq": reconstruction_error(theta(lsq[(edit.node, 1)], lsq[(edit.node, 2)]) * mask, full, second_moment)}
        assert errors["lsq"] <= errors["mean"] * (1 + 1e-6) and errors["lsq"] <= errors["none"] * (1 + 1e-6), node.name
        if taps == 1:  # for 1x1 consumers the mean fold is the best constant, so it never loses to plain removal
            assert errors["mean"] <= errors["none"] * (1 + 1e-6), node.name
        for k, v in errors.items():
            totals[k] += v
        checked += 1
    assert checked >= 5
    assert totals["lsq"] < totals["mean"] and totals["lsq"] < totals["none"]


def test_compensated_surgery_equals_its_masked_reference(calibrated):
    model, analysis, attribution, keep_sets, x = calibrated
    keep_sets = dict(keep_sets)
    keep_sets[analysis.class_group] = np.array([0, 3])
    replacements, _ = lsq_compensation(model, analysis, keep_sets, attribution)
    pruned = prune(model, analysis, keep_sets, replacements=replacements)
    onnx.checker.check_model(pruned, full_check=True)
    expected = run(masked_reference(model, analysis, keep_sets, replacements), x[:2])[:, [0, 3]]
    np.testing.assert_allclose(run(pruned, x[:2]), expected, atol=1e-4, rtol=1e-4)


def test_output_loss_names_cut_groups_and_shrinks_with_compensation(calibrated):
    model, analysis, attribution, keep_sets, _ = calibrated
    assert consumer_losses(model, analysis, {}, attribution, None) == {}
    plain = consumer_losses(model, analysis, keep_sets, attribution, None)
    refit, _ = lsq_compensation(model, analysis, keep_sets, attribution)
    compensated = consumer_losses(model, analysis, keep_sets, attribution, refit)
    assert plain.keys() == compensated.keys() and set(plain) <= set(keep_sets)
    assert all(0 <= compensated[g] <= plain[g] + 1e-9 for g in plain)
    assert sum(compensated.values()) < sum(plain.values())


def squeeze_excite_grouped() -> onnx.ModelProto:
    """x -> conv 3x3 (3->8) -> Relu -> t; squeeze-excite through Gemm (8->4->8) gates t; then a grouped conv (g=2)
    and a plain head. The cut consumers of t are a Gemm and a grouped conv: neither is refitted, both get the mean
    fold (the Gemm's from the pooled map's means)."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    consts = [w("w1", 8, 3, 3, 3), w("b1", 8), w("g1", 4, 8), w("gb1", 4), w("g2", 8, 4), w("gb2", 8),
              w("wg", 8, 4, 3, 3), w("bg", 8), w("wh", 5, 8, 1, 1), w("bh", 5),
              numpy_helper.from_array(np.array([1, 8, 1, 1], np.int64), "gate_shape")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["t"]),
             helper.make_node("GlobalAveragePool", ["t"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "g1", "gb1"], ["s1"], name="squeeze", transB=1),
             helper.make_node("Relu", ["s1"], ["s2"]),
             helper.make_node("Gemm", ["s2", "g2", "gb2"], ["e1"], name="excite", transB=1),
             helper.make_node("Sigmoid", ["e1"], ["e2"]),
             helper.make_node("Reshape", ["e2", "gate_shape"], ["gate"]),
             helper.make_node("Mul", ["t", "gate"], ["u"]),
             helper.make_node("Conv", ["u", "wg", "bg"], ["v0"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["v0"], ["v"]),
             helper.make_node("Conv", ["v", "wh", "bh"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 12, 12])], consts)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_gemm_and_grouped_consumers_are_compensated_only_where_the_math_holds():
    from disasm.attribution.calibration import observed_tensors

    model = squeeze_excite_grouped()
    analysis = analyse(model)
    consumers = find_consumers(model, analysis)
    assert "head" in [c.name for c in consumers] and "grouped" not in [c.name for c in consumers]  # plain convs only
    x = np.random.default_rng(0).normal(size=(8, 3, 12, 12)).astype(np.float32)
    attribution = attribute(TorchGraph(model), x, observed_tensors(analysis), 5, "logits",
                            AttributionSettings(batch_size=1), consumers=consumers)  # the Reshape fixes batch 1
    rng = np.random.default_rng(1)
    keep_sets = {g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
                 for g in analysis.groups if g.prunable and g.id != analysis.class_group}
    index = {n.name: i for i, n in enumerate(model.graph.node) if n.name}
    assert analysis.groups[analysis.tensors["t"].segments[0].group].prunable
    replacements, fallbacks = lsq_compensation(model, analysis, keep_sets, attribution)
    assert sorted(fallbacks) == ["excite", "grouped", "squeeze"]        # not refitted:
    for name in ("grouped", "squeeze"):                                 # mean fold
        assert (index[name], 2) in replacements and (index[name], 1) not in replacements
    assert not any(node == index["excite"] for node, _ in replacements)  # no statistics for its [N,4]: cut plainly
    assert (index["head"], 1) in replacements                          # refitted
    assert set(mean_compensation(model, analysis, keep_sets, attribution)) == \
        {(index["squeeze"], 2), (index["grouped"], 2), (index["head"], 2)}
    losses = consumer_losses(model, analysis, keep_sets, attribution, replacements)
    assert set(losses) <= set(keep_sets)
    pruned = prune(model, analysis, keep_sets, replacements=replacements)
    onnx.checker.check_model(pruned, full_check=True)
    expected = run(masked_reference(model, analysis, keep_sets, replacements), x[:1])
    np.testing.assert_allclose(run(pruned, x[:1]), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Sequential least squares (attribution.refit): consumers refitted in depth order on the pruned network's inputs
# ---------------------------------------------------------------------------------------------------------------------

def conv_chain(depth: int = 5, width: int = 16, seed: int = 0, bias: bool = True) -> onnx.ModelProto:
    """x -> depth x (Conv 3x3 width->width, Relu) -> Conv 1x1 (width->4): every hidden group is cut, so each refit
    sits behind the previous one. Without `bias` the hidden convs have none (as before an unfolded BatchNorm)."""
    rng = np.random.default_rng(seed)
    consts, nodes, previous, cin = [], [], "x", 3
    for i in range(depth):
        consts.append(numpy_helper.from_array((rng.normal(size=(width, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32), f"w{i}"))
        if bias:
            consts.append(numpy_helper.from_array(rng.normal(size=width).astype(np.float32) * 0.1, f"b{i}"))
        nodes += [helper.make_node("Conv", [previous, f"w{i}"] + ([f"b{i}"] if bias else []), [f"a{i}"], name=f"conv{i}",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"a{i}"], [f"t{i}"], name=f"relu{i}")]
        previous, cin = f"t{i}", width
    consts.append(numpy_helper.from_array(rng.normal(size=(4, width, 1, 1)).astype(np.float32), "wh"))
    nodes.append(helper.make_node("Conv", [previous, "wh"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 16, 16])], consts)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def moments_of(model: onnx.ModelProto, analysis, x: np.ndarray) -> Attribution:
    from disasm.attribution.calibration import observed_tensors

    return attribute(TorchGraph(model), x, observed_tensors(analysis), 4, "logits", AttributionSettings(batch_size=8),
                     consumers=find_consumers(model, analysis))


def test_sequential_refit_equals_the_independent_one_when_nothing_upstream_is_cut(calibrated):
    """One group cut: every consumer of it sees the full network's inputs, so the two refits agree."""
    from disasm.attribution.refit import sequential_compensation

    model, analysis, attribution, keep_sets, x = calibrated
    for group in list(keep_sets)[:3]:
        one = {group: keep_sets[group]}
        independent, fallbacks = lsq_compensation(model, analysis, one, attribution)
        sequential = sequential_compensation(model, analysis, one, x, batch_size=8)
        assert sequential.levels == 1 and sequential.fallbacks == fallbacks
        assert sorted(sequential.replacements) == sorted(independent)
        for key, value in independent.items():
            np.testing.assert_allclose(sequential.replacements[key], value, atol=1e-4, rtol=1e-4)


def test_sequential_refit_is_deterministic_and_batching_does_not_change_it(calibrated):
    from disasm.attribution.refit import sequential_compensation

    model, analysis, _, keep_sets, x = calibrated
    first = sequential_compensation(model, analysis, keep_sets, x[:6], batch_size=4)
    again = sequential_compensation(model, analysis, keep_sets, x[:6], batch_size=4)
    one_by_one = sequential_compensation(model, analysis, keep_sets, x[:6], batch_size=1)
    assert first.levels > 1
    assert sorted(first.replacements) == sorted(again.replacements) == sorted(one_by_one.replacements)
    for key, value in first.replacements.items():
        assert np.array_equal(value, again.replacements[key])
        # other batches sum the float32 products in another order, and ONNX Runtime may pick other conv kernels
        np.testing.assert_allclose(one_by_one.replacements[key], value, atol=1e-3 * np.abs(value).max())
    a = prune(model, analysis, keep_sets, replacements=first.replacements).SerializeToString()
    assert a == prune(model, analysis, keep_sets, replacements=again.replacements).SerializeToString()


def test_sequential_refit_reconstructs_a_deep_cut_better_than_independent_refits():
    """On a chain where every layer is cut, fitting each layer to the inputs the pruned layers before it really give
    brings the pruned output closer to the full one, on the calibration images and on others."""
    from disasm.attribution.refit import sequential_compensation

    model = conv_chain()
    analysis = analyse(model)
    rng = np.random.default_rng(0)
    x, held = rng.normal(size=(12, 3, 16, 16)).astype(np.float32), rng.normal(size=(6, 3, 16, 16)).astype(np.float32)
    keep_sets = {g.id: np.sort(rng.choice(g.size, g.size // 2, replace=False))
                 for g in analysis.groups if g.prunable and g.id != analysis.class_group}
    assert len(keep_sets) == 5
    independent, _ = lsq_compensation(model, analysis, keep_sets, moments_of(model, analysis, x))
    sequential = sequential_compensation(model, analysis, keep_sets, x, batch_size=4)
    assert sequential.levels == 5 and not sequential.fallbacks
    for images in (x, held):
        full = run(model, images)

        def error(replacements):
            return float(np.mean((run(prune(model, analysis, keep_sets, replacements=replacements), images) - full) ** 2))

        assert error(sequential.replacements) < 0.95 * error(independent) < error(None)


def test_sequential_refit_matches_means_where_it_cannot_refit_and_surgery_stays_exact():
    """Gemm and grouped consumers get the bias that matches their output means on the pruned network's inputs (the
    excite Gemm too, whose pooled inputs the attribution has no statistics for); a static batch runs one by one."""
    from disasm.attribution.refit import sequential_compensation

    model = squeeze_excite_grouped()
    analysis = analyse(model)
    x = np.random.default_rng(0).normal(size=(6, 3, 12, 12)).astype(np.float32)
    rng = np.random.default_rng(1)
    keep_sets = {g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
                 for g in analysis.groups if g.prunable and g.id != analysis.class_group}
    index = {n.name: i for i, n in enumerate(model.graph.node) if n.name}
    refit = sequential_compensation(model, analysis, keep_sets, x, batch_size=1)
    assert sorted(refit.fallbacks) == ["excite", "grouped", "squeeze"]
    for name in ("excite", "grouped", "squeeze"):
        assert (index[name], 2) in refit.replacements and (index[name], 1) not in refit.replacements
    assert (index["head"], 1) in refit.replacements
    pruned = prune(model, analysis, keep_sets, replacements=refit.replacements)
    onnx.checker.check_model(pruned, full_check=True)
    expected = run(masked_reference(model, analysis, keep_sets, refit.replacements), x[:1])
    np.testing.assert_allclose(run(pruned, x[:1]), expected, atol=1e-4, rtol=1e-4)


def test_downstream_scope_also_refits_the_convs_behind_a_cut():
    """scope='downstream': convs that read nothing cut but whose inputs the cut changed are refitted too (all their
    inputs kept), which brings the output closer on the calibration images; the surgery applies them exactly."""
    from disasm.attribution.refit import sequential_compensation

    model = conv_chain(depth=4)
    analysis = analyse(model)
    first = analysis.tensors["t0"].segments[0].group
    keep_sets = {first: np.arange(0, 16, 2)}
    x = np.random.default_rng(0).normal(size=(12, 3, 16, 16)).astype(np.float32)
    cut = sequential_compensation(model, analysis, keep_sets, x, batch_size=4)
    everything = sequential_compensation(model, analysis, keep_sets, x, batch_size=4, scope="downstream")
    index = {n.name: i for i, n in enumerate(model.graph.node)}
    assert {k[0] for k in cut.replacements} == {index["conv1"]}
    assert {k[0] for k in everything.replacements} == {index[n] for n in ("conv1", "conv2", "conv3", "head")}
    for key, value in cut.replacements.items():
        np.testing.assert_allclose(everything.replacements[key], value, atol=1e-5)
    full = run(model, x)
    errors = {}
    for name, refit in (("cut", cut), ("downstream", everything)):
        pruned = prune(model, analysis, keep_sets, replacements=refit.replacements)
        np.testing.assert_allclose(run(pruned, x[:2]), run(masked_reference(model, analysis, keep_sets, refit.replacements),
                                                              x[:2]), atol=1e-4, rtol=1e-4)
        errors[name] = float(np.mean((run(pruned, x) - full) ** 2))
    assert errors["downstream"] < errors["cut"]


def test_consumers_without_bias_whose_outputs_are_cut_get_no_bias():
    """A bias added to a conv that has none would not be cut with its outputs: such consumers are refitted without
    an intercept (lsq, sequential) and get no fold (mean), and every pruned model runs and equals its reference."""
    from disasm.attribution.refit import sequential_compensation

    model = conv_chain(depth=3, bias=False)
    analysis = analyse(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 16, 16)).astype(np.float32)
    keep_sets = {g.id: np.sort(rng.choice(g.size, g.size // 2, replace=False))
                 for g in analysis.groups if g.prunable and g.id != analysis.class_group}
    index = {n.name: i for i, n in enumerate(model.graph.node)}
    attribution = moments_of(model, analysis, x)
    lsq, _ = lsq_compensation(model, analysis, keep_sets, attribution)
    sequential = sequential_compensation(model, analysis, keep_sets, x, batch_size=4).replacements
    mean = mean_compensation(model, analysis, keep_sets, attribution)
    for replacements in (lsq, sequential):
        assert (index["conv1"], 1) in replacements and (index["conv1"], 2) not in replacements
        assert (index["head"], 2) in replacements  # the head's outputs are not cut: it may get a bias
    assert (index["conv1"], 2) not in mean and (index["head"], 2) in mean
    for replacements in (lsq, sequential, mean):
        pruned = prune(model, analysis, keep_sets, replacements=replacements)
        np.testing.assert_allclose(run(pruned, x[:2]), run(masked_reference(model, analysis, keep_sets, replacements),
                                                           x[:2]), atol=1e-4, rtol=1e-4)
