"""One tiny graph per channel rule of compiler/channels.py, for what real graphs contain (grouped and depthwise convs,
gates, squeeze-excite through Gemm, attention, image pooling, channel shuffle): the analysis finds the groups and
edits the rule implies, or keeps the groups whole with a reason, and the pruned graph equals the masked reference
for random keep-sets (shared/DESIGN.md, "Correctness standard for the surgery"), checked with ONNX Runtime. A last
test keeps the op lists of the analysis, the loader and the interpreter in agreement."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from disasm.compiler.channels import RULES, ChannelAnalysis, analyse
from disasm.compiler.prune import masked_reference, prune

SIZE = 8  # spatial size of every test image


class Net:
    """A graph built node by node on a [1, 3, SIZE, SIZE] image: convs with random weights, constants, other ops."""

    def __init__(self, opset: int = 17, image_shape: tuple = (1, 3, SIZE, SIZE)):
        self.rng = np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.consts: dict[str, np.ndarray] = {}
        self.opset, self.image_shape = opset, image_shape

    def const(self, value) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = np.asarray(value)
        return name

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.normal(size=shape).astype(np.float32))

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str:
        names = [f"t{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"{op_type.lower()}{len(self.nodes)}",
                                           **attrs))
        return names[0] if outputs == 1 else names

    def conv(self, x: str, cin: int, cout: int, k: int = 1, group: int = 1, op: str = "Conv") -> str:
        shape = (cin, cout // group, k, k) if op == "ConvTranspose" else (cout, cin // group, k, k)
        return self.op(op, x, self.weight(*shape), self.weight(cout), group=group, pads=[k // 2] * 4)

    def model(self, output: str) -> onnx.ModelProto:
        image = helper.make_tensor_value_info("image", TensorProto.FLOAT, list(self.image_shape))
        graph = helper.make_graph(self.nodes, "rule", [image], [helper.make_tensor_value_info(output, TensorProto.FLOAT,
                                                                                            None)],
                                  [numpy_helper.from_array(v, k) for k, v in self.consts.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=9)
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def random_keep_sets(analysis: ChannelAnalysis, rng: np.random.Generator) -> dict[int, np.ndarray]:
    return {g.id: np.sort(rng.choice(g.size, rng.integers(1, g.size + 1), replace=False))
            for g in analysis.groups if g.prunable}


def assert_exact(model: onnx.ModelProto, seeds: int = 4) -> ChannelAnalysis:
    """Pruned == masked reference (on the kept classes) for a few random keep-sets; returns the analysis."""
    analysis = analyse(model)
    x = np.random.default_rng(1).normal(size=[d if d else SIZE for d in _input_dims(model)]).astype(np.float32)
    for seed in range(seeds):
        keep_sets = random_keep_sets(analysis, np.random.default_rng(seed))
        pruned = prune(model, analysis, keep_sets)
        onnx.checker.check_model(pruned, full_check=True)
        expected = run(masked_reference(model, analysis, keep_sets), x)
        if analysis.class_group in keep_sets:
            expected = expected[:, keep_sets[analysis.class_group]]
        got = run(pruned, x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    return analysis


def _input_dims(model: onnx.ModelProto) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def group(analysis: ChannelAnalysis, tensor: str):
    """The one group of a tensor's channels."""
    groups = {s.group for s in analysis.tensors[tensor].segments}
    assert len(groups) == 1, analysis.tensors[tensor]
    return analysis.groups[groups.pop()]


def positions(analysis: ChannelAnalysis, tensor: str) -> list[int]:
    """Per position along the tensor's channel axis, the group channel it holds."""
    return [c for s in analysis.tensors[tensor].segments for c in range(s.start, s.stop)]


def node_edits(model: onnx.ModelProto, analysis: ChannelAnalysis, output: str) -> list[str]:
    index = next(i for i, n in enumerate(model.graph.node) if output in n.output)
    return sorted(f"{e.kind}:{e.input}" for e in analysis.edits if e.node == index)


# --- grouped and depthwise convs -----------------------------------------------------------------------------------

def test_grouped_conv_cuts_the_same_channels_in_every_group():
    net = Net()
    a = net.op("Relu", net.conv("image", 3, 8, k=3))
    g = net.conv(a, 8, 12, k=3, group=2)
    model = net.model(net.conv(net.op("Relu", g), 12, 4))
    analysis = assert_exact(model)
    # input: 2 groups of 4 input channels, kept alike; output: 2 groups of 6
    assert [s.size for s in analysis.tensors[a].segments] == [4, 4]
    assert group(analysis, a).size == 4 and group(analysis, g).size == 6
    assert group(analysis, a).prunable and group(analysis, g).prunable
    assert node_edits(model, analysis, g) == ["consume:1", "slice:1", "slice:2"]  # the group count stays
    keep = {group(analysis, a).id: np.array([0, 3]), group(analysis, g).id: np.array([1, 2, 5])}
    pruned = prune(model, analysis, keep)
    conv = next(n for n in pruned.graph.node if n.output[0] == g)
    weight = next(i for i in pruned.graph.initializer if i.name == conv.input[1])
    assert list(weight.dims) == [6, 2, 3, 3] and helper.get_attribute_value(conv.attribute[0]) == 2


def test_grouped_conv_over_a_concat_ties_its_members():
    net = Net()
    cat = net.op("Concat", net.conv("image", 3, 4), net.conv("image", 3, 4), axis=1)
    model = net.model(net.conv(net.conv(cat, 8, 6, group=2), 6, 3))
    analysis = assert_exact(model)
    assert len(group(analysis, cat).producers) == 2


def test_grouped_conv_transpose_is_cut_per_group():
    net = Net()
    a = net.conv("image", 3, 8)
    up = net.op("ConvTranspose", a, net.weight(8, 3, 2, 2), net.weight(6), group=2, strides=[2, 2])
    analysis = assert_exact(net.model(net.conv(up, 6, 3)))
    assert group(analysis, a).size == 4 and group(analysis, up).size == 3


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_depthwise_multiplier_is_not_a_grouped_conv(op):
    """group == C_in with C_out = 2 * C_in: output 2c and 2c+1 read input c only; the input stays cuttable channel by
    channel (a grouped conv with one input per group would tie every input channel together)."""
    net = Net()
    a = net.conv("image", 3, 4)
    dw = net.conv(a, 4, 8, k=3, group=4, op=op) if op == "Conv" else \
        net.op(op, a, net.weight(4, 2, 3, 3), net.weight(8), group=4, pads=[1, 1, 1, 1])
    model = net.model(net.conv(dw, 8, 3))
    analysis = assert_exact(model)
    assert group(analysis, a).size == 4 and group(analysis, a).prunable
    assert positions(analysis, dw) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert "group:-1" in node_edits(model, analysis, dw)


@pytest.mark.parametrize("pads", ["constant", "static shape", "dynamic shape"])
def test_depthwise_conv_behind_a_pad(pads):
    """Exporters pad explicitly before depthwise convs, with pads constant (after folding) or computed from the
    input's height at run time. Static dims make them known; dynamic ones keep the group whole."""
    dynamic = pads == "dynamic shape"
    net = Net(image_shape=(1, 3, "h", "w") if dynamic else (1, 3, SIZE, SIZE))
    a = net.op("Relu", net.conv("image", 3, 8))
    if pads == "constant":
        amount = net.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    else:  # one pixel each side, computed as height // height from Shape, the way "same" padding is exported
        height = net.op("Gather", net.op("Shape", a), net.const(np.array(2, np.int64)), axis=0)
        one = net.op("Unsqueeze", net.op("Div", height, height), net.const(np.array([0], np.int64)))
        zeros = net.const(np.array([0, 0], np.int64))
        amount = net.op("Concat", zeros, one, one, zeros, one, one, axis=0)
    padded = net.op("Pad", a, amount)
    dw = net.op("Conv", padded, net.weight(8, 1, 3, 3), group=8)
    model = net.model(net.conv(dw, 8, 3))
    if dynamic:
        analysis = analyse(model)
        assert any("pads computed at run time from dynamic dims" in r for r in group(analysis, a).blocked)
        return
    analysis = assert_exact(model)
    assert group(analysis, a).prunable and group(analysis, dw) == group(analysis, a)
    assert "group:-1" in node_edits(model, analysis, dw)


# --- elementwise with broadcast operands ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("first", [True, False])
def test_one_channel_attention_map_broadcasts(op, first):
    """A [N,1,H,W] map (spatial attention, a gate) broadcasts over the channels: it does not tie its own one-channel
    group to the feature map's, and the result keeps the feature map's channels."""
    net = Net()
    a = net.op("Sigmoid", net.conv("image", 3, 8, k=3))  # never zero: Div by it stays finite
    attention = net.op("Sigmoid", net.conv(a, 8, 1, k=3))
    combined = net.op(op, a, attention) if first else net.op(op, attention, a)
    model = net.model(net.conv(combined, 8, 3))
    analysis = assert_exact(model)
    assert group(analysis, combined) == group(analysis, a) and group(analysis, a).prunable
    assert group(analysis, attention).size == 1


def test_one_channel_map_expanded_to_the_channels_follows_the_cut():
    """Expand [N,1,H,W] -> [N,C,H,W] before a Mul is broadcasting written out: the expanded copies follow the
    channels they multiply (the constant target's C becomes the kept count)."""
    net = Net()
    a = net.op("Relu", net.conv("image", 3, 8, k=3))
    gate = net.op("Expand", net.op("Sigmoid", net.conv(a, 8, 1)), net.const(np.array([1, 8, SIZE, SIZE], np.int64)))
    model = net.model(net.conv(net.op("Mul", a, gate), 8, 3))
    analysis = assert_exact(model)
    assert group(analysis, gate) == group(analysis, a) and group(analysis, a).prunable
    assert node_edits(model, analysis, gate) == ["shape_entry:1"]


def test_squeeze_excite_gate_from_the_same_group():
    net = Net()
    a = net.op("Relu", net.conv("image", 3, 8, k=3))
    gate = net.op("HardSigmoid", net.conv(net.op("Relu", net.conv(net.op("GlobalAveragePool", a), 8, 4)), 4, 8))
    model = net.model(net.conv(net.op("Mul", a, gate), 8, 3))
    analysis = assert_exact(model)
    assert len(group(analysis, a).producers) == 2  # the block's conv and the excite conv


def test_residual_add_of_a_concat_and_one_conv_splits_the_conv():
    """conv(8) + concat(conv(4), conv(4)): the single conv's outputs are two channel spaces, one per concat member."""
    net = Net()
    whole = net.conv("image", 3, 8)
    cat = net.op("Concat", net.conv("image", 3, 4), net.conv("image", 3, 4), axis=1)
    total = net.op("Add", whole, cat)
    analysis = assert_exact(net.model(net.conv(total, 8, 3)))
    assert [s.size for s in analysis.tensors[whole].segments] == [4, 4]
    assert all(len(analysis.groups[s.group].producers) == 2 and analysis.groups[s.group].prunable
               for s in analysis.tensors[whole].segments)


# --- squeeze-excite through Gemm, PRelu, BatchNormalization ---------------------------------------------------------

@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("back", ["Reshape", "Unsqueeze"])
def test_squeeze_excite_through_gemm(trans_b, back):
    """GlobalAveragePool -> Flatten -> Gemm -> PRelu -> Gemm -> Sigmoid -> Reshape/Unsqueeze -> Mul: the Gemms cut
    matching rows and columns (their weight axes depend on transB); the reshape back keeps the channel axis."""
    net = Net()
    a = net.op("PRelu", net.conv("image", 3, 8, k=3), net.weight(8, 1, 1))
    pooled = net.op("Flatten", net.op("GlobalAveragePool", a), axis=1)

    def gemm(x: str, cin: int, cout: int) -> str:
        weight = net.weight(*((cout, cin) if trans_b else (cin, cout)))
        return net.op("Gemm", x, weight, net.weight(cout), transB=trans_b)

    squeezed = net.op("PRelu", gemm(pooled, 8, 4), net.weight(4))
    excited = net.op("Sigmoid", gemm(squeezed, 4, 8))
    gate = net.op("Reshape", excited, net.const(np.array([1, 8, 1, 1], np.int64))) if back == "Reshape" else \
        net.op("Unsqueeze", excited, net.const(np.array([2, 3], np.int64)))
    model = net.model(net.conv(net.op("Mul", a, gate), 8, 3))
    analysis = assert_exact(model)
    assert group(analysis, gate) == group(analysis, a) and len(group(analysis, a).producers) == 2
    assert group(analysis, squeezed).size == 4 and group(analysis, squeezed).prunable
    if back == "Reshape":
        assert node_edits(model, analysis, gate) == ["shape_entry:1"]


def test_batchnorm_and_prelu_after_a_concat_are_cut_per_segment():
    net = Net()
    cat = net.op("Concat", net.conv("image", 3, 4), net.conv("image", 3, 6), axis=1)
    rng = np.random.default_rng(5)
    bn = net.op("BatchNormalization", cat, *[net.const(rng.uniform(0.5, 2, 10).astype(np.float32)) for _ in range(4)])
    activated = net.op("PRelu", bn, net.weight(10, 1, 1))
    model = net.model(net.conv(activated, 10, 3))
    analysis = assert_exact(model)
    assert [s.size for s in analysis.tensors[activated].segments] == [4, 6]
    assert node_edits(model, analysis, bn) == ["slice:1", "slice:2", "slice:3", "slice:4"]


# --- attention, image pooling, channel shuffle ----------------------------------------------------------------------

def test_position_attention_matmul_over_pixels_keeps_channels():
    """value [N,C,HW] x attention [N,HW,HW] keeps C; the energies q^T k sum over the query/key channels, so those
    two small groups stay whole."""
    net = Net()
    a = net.op("Relu", net.conv("image", 3, 8, k=3))
    flat = net.const(np.array([1, -1, SIZE * SIZE], np.int64))
    q, k = (net.op("Reshape", net.conv(a, 8, 2), flat) for _ in "qk")
    v = net.op("Reshape", net.conv(a, 8, 8), flat)
    energy = net.op("MatMul", net.op("Transpose", q, perm=[0, 2, 1]), k)
    attention = net.op("Transpose", net.op("Softmax", energy, axis=-1), perm=[0, 2, 1])
    attended = net.op("Reshape", net.op("MatMul", v, attention), net.const(np.array([1, 8, SIZE, SIZE], np.int64)))
    model = net.model(net.conv(net.op("Add", attended, a), 8, 3))
    analysis = assert_exact(model)
    assert group(analysis, attended) == group(analysis, a) and group(analysis, a).prunable
    for t in (q, k):
        assert any("sums over the channel axis" in r for r in group(analysis, t).blocked)


def test_tf2onnx_image_pooling_reshape_and_tile_keep_the_channel_axis():
    """tf2onnx's ASPP image pooling: pool -> conv -> Reshape [1,1,1,C] -> Tile [1,H,W,1] -> Transpose -> Concat."""
    net = Net()
    a = net.op("Relu", net.conv("image", 3, 8, k=3))
    pooled = net.op("Relu", net.conv(net.op("GlobalAveragePool", a), 8, 6))
    nhwc = net.op("Reshape", pooled, net.const(np.array([1, 1, 1, 6], np.int64)))
    tiled = net.op("Tile", nhwc, net.const(np.array([1, SIZE, SIZE, 1], np.int64)))
    cat = net.op("Concat", net.op("Transpose", tiled, perm=[0, 3, 1, 2]), a, axis=1)
    model = net.model(net.conv(cat, 14, 3))
    analysis = assert_exact(model)
    assert analysis.tensors[nhwc].axis == 3 and group(analysis, nhwc).prunable
    assert node_edits(model, analysis, nhwc) == ["shape_entry:1"]


def test_channel_shuffle_is_cut_exactly():
    """ShuffleNet/SINet shuffle: Reshape [N,g,C/g,H,W] -> Transpose -> Reshape [N,C,H,W]. The g blocks keep the same
    channels (they come from a grouped conv anyway), and channel c of a block lands at 2c + block."""
    net = Net()
    grouped = net.conv(net.conv("image", 3, 8), 8, 8, group=2)
    split = net.op("Reshape", grouped, net.const(np.array([1, 2, 4, SIZE, SIZE], np.int64)))
    shuffled = net.op("Reshape", net.op("Transpose", split, perm=[0, 2, 1, 3, 4]),
                      net.const(np.array([1, -1, SIZE, SIZE], np.int64)))
    dw = net.op("Conv", shuffled, net.weight(8, 1, 3, 3), group=8, pads=[1, 1, 1, 1])
    model = net.model(net.conv(dw, 8, 3))
    analysis = assert_exact(model)
    assert group(analysis, grouped).size == 4 and group(analysis, grouped).prunable
    assert positions(analysis, shuffled) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert node_edits(model, analysis, split) == ["shape_entry:1"]


# --- what stays whole, and why ----------------------------------------------------------------------------------------

def _reshape_into_space(net: Net, a: str) -> str:
    moved = net.op("Reshape", a, net.const(np.array([1, 4, 8, SIZE], np.int64)))  # channels spill into the height
    return net.op("Reshape", moved, net.const(np.array([1, 8, SIZE, SIZE], np.int64)))


def _gram_matrix(net: Net, a: str) -> str:
    flat = net.op("Reshape", a, net.const(np.array([1, 8, SIZE * SIZE], np.int64)))
    gram = net.op("Softmax", net.op("MatMul", flat, net.op("Transpose", flat, perm=[0, 2, 1])), axis=-1)
    return net.op("Reshape", net.op("MatMul", gram, flat), net.const(np.array([1, 8, SIZE, SIZE], np.int64)))


def _tile_channels(net: Net, a: str) -> str:
    half = net.conv(a, 8, 4)
    return net.op("Tile", half, net.const(np.array([1, 2, 1, 1], np.int64)))


def _max_over_channels(net: Net, a: str) -> str:
    """SINet's confidence: the channels moved onto a pooled axis by Reshape + Transpose, then MaxPool over them."""
    blocks = net.op("Reshape", a, net.const(np.array([1, 2, 4, SIZE * SIZE], np.int64)))
    pooled = net.op("MaxPool", net.op("Transpose", blocks, perm=[0, 3, 1, 2]), kernel_shape=[2, 4])
    confidence = net.op("Reshape", pooled, net.const(np.array([1, 1, SIZE, SIZE], np.int64)))
    return net.op("Mul", net.conv(a, 8, 8), confidence)


@pytest.mark.parametrize("build,reason", [(_reshape_into_space, "moves channels into other axes"),
                                          (_gram_matrix, "pairs the channels of both operands"),
                                          (_tile_channels, "repeats the channel axis"),
                                          (_max_over_channels, "pools over the channel axis")])
def test_what_cannot_be_followed_keeps_its_group_whole(build, reason):
    net = Net()
    a = net.op("Relu", net.conv("image", 3, 8))
    model = net.model(net.conv(build(net, a), 8, 3))
    analysis = analyse(model)
    blocked = [r for g in analysis.groups for r in g.blocked]
    assert any(reason in r for r in blocked), blocked
    assert_exact(model, seeds=2)  # what is left cuttable is still cut exactly


# --- op lists -----------------------------------------------------------------------------------------------------

def test_op_lists_of_analysis_loader_and_interpreter_agree():
    """Every op the analysis has a channel rule for, and every op the loader walks through, is one the interpreter
    runs (attribution must run any graph the surgery accepts); the ops the loader treats as keeping every axis in
    place are ones the analysis follows too."""
    from disasm.attribution.ops import supported_op_types
    from disasm.compiler import channels, load

    runnable = supported_op_types()
    assert set(RULES) - runnable == set()
    assert (channels.SHAPE_FOLLOWERS | channels.SHAPE_ARITHMETIC) - runnable == set()
    for listed in (load._AXIS_KEEPING, load._NOT_SCORING, load._PREPROCESSING):
        assert set(listed) - runnable == set()
    assert set(load._AXIS_KEEPING) - set(RULES) == set()
