"""The chosen-or-none head (compiler.outputs): exact values, and built before the Transposes that end a graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from disasm.compiler.outputs import add_output_head, plan_outputs

CLASSES = ("background", "road", "car", "person", "sky")


def class_model(layout_tail: list[str], shared: bool = False) -> onnx.ModelProto:
    """image [1,3,8,8] -> 1x1 Conv to 5 class scores (NCHW) -> `layout_tail` ops -> output.

        image -> Conv -> scores -> [Identity] -> [Transpose 0,2,3,1] -> output ([1,8,8,5] when transposed)
                           \\-> ReduceMean -> side (a second output) when `shared`: the head must stay after the tail
    """
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((5, 3, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["image", "w"], ["scores"], name="classes")]
    x = "scores"
    for i, op in enumerate(layout_tail):
        attrs = {"perm": [0, 2, 3, 1]} if op == "Transpose" else {}
        nodes.append(helper.make_node(op, [x], [f"tail{i}"], name=f"tail{i}", **attrs))
        x = f"tail{i}"
    nodes[-1].output[0] = "output"
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None] * 4)]
    if shared:
        nodes.append(helper.make_node("ReduceMean", ["scores"], ["side"], axes=[1], keepdims=1))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    graph = helper.make_graph(nodes, "classes", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                              [1, 3, 8, 8])], outputs, [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["output"], {"image": x})[0]


def expected(full: np.ndarray, sources: tuple[tuple[int, ...], ...], axis: int) -> np.ndarray:
    return np.concatenate([full.take(list(s), axis=axis).max(axis=axis, keepdims=True) for s in sources], axis=axis)


HEAD_CASES = [  # (chosen, background): "none" rows around chosen ones (Split into rows, Max), "none" after them (Split)
    (["car"], "background"),
    (["road", "car"], "background"),
    (["background", "road"], None),
]


@pytest.mark.parametrize("chosen, background", HEAD_CASES)
@pytest.mark.parametrize("tail", [["Transpose"], ["Identity", "Transpose"]])
def test_head_goes_before_the_final_transpose_and_keeps_the_values(chosen, background, tail):
    model = class_model(tail)
    plan = plan_outputs(CLASSES, [c for c in chosen if c != background], background, "logits")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    headed = add_output_head(model, plan, axis=3)
    onnx.checker.check_model(headed)
    np.testing.assert_array_equal(run(headed, x), expected(run(model, x), plan.sources, 3))
    last = headed.graph.node[-1]
    assert last.op_type == "Transpose" and last.output[0] == "output"  # the Transpose moves only the kept channels
    inferred = onnx.shape_inference.infer_shapes(headed, strict_mode=True).graph.value_info
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred}
    assert shapes[last.input[0]] == [1, len(plan.names), 8, 8]


@pytest.mark.parametrize("chosen, background", HEAD_CASES)
def test_head_stays_after_a_transpose_whose_input_is_read_elsewhere(chosen, background):
    model = class_model(["Transpose"], shared=True)
    plan = plan_outputs(CLASSES, [c for c in chosen if c != background], background, "logits")
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    headed = add_output_head(model, plan, axis=3)
    np.testing.assert_array_equal(run(headed, x), expected(run(model, x), plan.sources, 3))
    transpose = next(n for n in headed.graph.node if n.op_type == "Transpose")
    assert transpose.input[0] == "scores"  # precondition: `scores` also feeds ReduceMean, so it keeps every class


def test_restricted_head_takes_the_kept_rows_and_leaves_the_others_unread():
    model = class_model(["Relu"])
    plan = plan_outputs(CLASSES, ["car", "sky"], "background", "logits", mode="restricted")
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    headed = add_output_head(model, plan, axis=1, rows=np.arange(len(CLASSES)))  # the class conv kept whole
    onnx.checker.check_model(headed)
    np.testing.assert_array_equal(run(headed, x), run(model, x)[:, [0, 2, 4]])


def test_head_without_a_layout_tail_is_built_at_the_output():
    model = class_model(["Relu"])
    plan = plan_outputs(CLASSES, ["car"], "background", "logits")
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    headed = add_output_head(model, plan, axis=1)
    np.testing.assert_array_equal(run(headed, x), expected(run(model, x), plan.sources, 1))
    assert headed.graph.node[-1].op_type == "Concat" and headed.graph.node[-1].output[0] == "output"
