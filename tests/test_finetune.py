"""Label-free finetuning (attribution.finetune): the written ONNX model holds exactly the trained weights and
reproduces the trained torch outputs in ONNX Runtime, the same seed gives the same bytes, a damaged model (half its
channels cut, nothing compensated) answers more like the full model after one epoch, and an epoch that makes the
calibration loss worse is undone.

Models are the tiny graphs of test_inputs.seg_model, specialised as compiler.pipeline.specialise does it: the class
conv sliced where every output channel is one class, else its rows reordered and the chosen-or-none head added.
"""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from disasm.attribution.finetune import Finetuner, TeacherTargets, finetune, trainable_initializers
from disasm.compiler.channels import analyse
from disasm.compiler.errors import DisasmError
from disasm.compiler.images import load_images, preprocess
from disasm.compiler.load import Preprocessing
from disasm.compiler.outputs import OutputPlan, add_output_head, plan_outputs
from disasm.compiler.prune import prune
from disasm.runtime.fidelity import evaluate_fidelity
from test_inputs import SIZE, seg_model, write_scene

CLASSES = ("background", "red", "green", "blue")
KINDS = {None: "logits", "softmax": "probs", "sigmoid": "sigmoid"}


def damaged(head: str | None, chosen: list[str], layout: str = "nchw", opset: int = 17,
            batch: int | str = "N") -> tuple[onnx.ModelProto, onnx.ModelProto, OutputPlan, str, int]:
    """(full, pruned, plan, output kind, class axis): every other channel of each hidden group cut, uncompensated."""
    full = seg_model(layout=layout, opset=opset, head=head, batch=batch)
    kind, axis = KINDS[head], 1 if layout == "nchw" else 3
    analysis = analyse(full)
    plan = plan_outputs(CLASSES, chosen, "background", kind)
    blocked = bool(analysis.groups[analysis.class_group].blocked)
    sliced = None if blocked else plan.single_sources
    rows = np.arange(len(CLASSES)) if blocked else plan.row_order
    keep = {g.id: np.arange(0, g.size, 2) for g in analysis.groups if g.prunable and g.id != analysis.class_group}
    keep[analysis.class_group] = sliced if sliced is not None else rows
    pruned = prune(full, analysis, keep)
    if sliced is None:
        pruned = add_output_head(pruned, plan, axis, rows)
    return full, pruned, plan, kind, axis


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> np.ndarray:
    """48 preprocessed scenes (NCHW, 16x16): the first 32 calibrate, the rest are judged."""
    root = tmp_path_factory.mktemp("finetune")
    paths = []
    for i in range(48):
        write_scene(root / f"s{i}.png", None, seed=i)
        paths.append(root / f"s{i}.png")
    return preprocess(load_images(paths, (SIZE, SIZE), "stretch"), Preprocessing())


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"image": x})[0]


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def test_trainable_initializers_are_weights_biases_and_per_channel_constants():
    full = seg_model()  # weights w1..w3, biases b1..b3; Clip bounds, Resize roi and scales are no parameters
    assert trainable_initializers(full) == ["w1", "b1", "w2", "b2", "w3", "b3"]
    nodes = [helper.make_node("Mul", ["x", "gamma"], ["y"]), helper.make_node("Add", ["y", "three"], ["z"]),
             helper.make_node("Reshape", ["z", "shape"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 1, 1])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 2])],
                              [numpy_helper.from_array(np.ones((1, 2, 1, 1), np.float32), "gamma"),
                               numpy_helper.from_array(np.array(3, np.float32), "three"),
                               numpy_helper.from_array(np.array([1, 2], np.int64), "shape")])
    assert trainable_initializers(helper.make_model(graph)) == ["gamma"]


@pytest.mark.parametrize("head, chosen, layout, opset", [
    (None, ["green"], "nchw", 17),                  # head: Split of reordered rows, ReduceMax, Concat
    ("softmax", ["green"], "nchw", 17),             # the softmax blocks the class conv: Gathers over probabilities
    ("sigmoid", ["green", "red"], "nchw", 17),      # sliced class conv, Sigmoid output
    (None, ["red", "green", "blue"], "nhwc", 9),    # tf2onnx shape: NHWC, Upsample, sliced class conv, class axis 3
])
def test_written_model_holds_the_trained_weights_and_reproduces_torch_in_onnx_runtime(scenes, head, chosen, layout,
                                                                                       opset):
    full, pruned, plan, kind, axis = damaged(head, chosen, layout, opset)
    x = scenes if layout == "nchw" else nhwc(scenes)
    trainer = Finetuner(pruned, full, x[:8], plan.sources, kind, axis, lr=1e-2, batch_size=2)
    trainer.train_epoch()
    written = trainer.to_onnx()
    onnx.checker.check_model(written)
    assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in pruned.graph.node]
    before, after = initializers(pruned), initializers(written)
    assert list(after) == list(before)
    for name, tensor in after.items():
        value = numpy_helper.to_array(tensor)
        assert value.dtype == numpy_helper.to_array(before[name]).dtype and value.shape == tuple(before[name].dims)
        if name in trainer.parameters:
            np.testing.assert_array_equal(value, trainer.parameters[name].detach().numpy())  # bit for bit
            assert not np.array_equal(value, numpy_helper.to_array(before[name])), f"{name} was not trained"
        else:
            assert tensor.SerializeToString() == before[name].SerializeToString()
    judged = x[32:40]
    np.testing.assert_allclose(ort_run(written, judged), trainer.outputs(judged), rtol=1e-5, atol=1e-5)


def test_the_same_seed_gives_the_same_bytes(scenes):
    full, pruned, plan, kind, axis = damaged(None, ["green"], batch=1)  # static batch: images accumulate per step
    run = lambda seed, teacher=None: finetune(pruned, full, scenes[:12], plan.sources, kind, axis, epochs=2,
                                              seed=seed, lr=1e-2, batch_size=3, teacher=teacher).SerializeToString()
    first = run(0)
    assert run(0) == first
    assert run(0, TeacherTargets(full, scenes[:12], plan.sources, kind, axis)) == first  # targets computed once
    assert run(1) != first  # the seed draws the image order


def test_progress_and_history_per_epoch_and_zero_epochs_is_a_copy(scenes):
    full, pruned, plan, kind, axis = damaged("softmax", ["green"])
    done, history = [], []
    finetune(pruned, full, scenes[:4], plan.sources, kind, axis, epochs=3, progress=done.append, history=history)
    assert done == [1, 2, 3]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["loss"] >= 0 for h in history)
    copy = finetune(pruned, full, scenes[:4], plan.sources, kind, axis, epochs=0)
    assert copy is not pruned and copy.SerializeToString() == pruned.SerializeToString()
    with pytest.raises(DisasmError, match="output plan"):
        finetune(pruned, full, scenes[:4], plan.sources[:1], kind, axis, epochs=1)


def _fidelity(full: onnx.ModelProto, pruned: onnx.ModelProto, plan: OutputPlan, kind: str, x: np.ndarray) -> float:
    full_session, session = ort.InferenceSession(full.SerializeToString()), ort.InferenceSession(
        pruned.SerializeToString())
    result = evaluate_fidelity(lambda v: full_session.run(None, {"image": v})[0],
                               lambda v: session.run(None, {"image": v})[0], x, None, CLASSES, list(plan.names),
                               plan.none, kind)
    return result["category_fidelity"]


@pytest.mark.parametrize("head, chosen", [(None, ["green"]), ("softmax", ["green"]), ("sigmoid", ["green", "red"])])
def test_fidelity_rises_after_one_epoch_from_a_damaged_start(scenes, head, chosen):
    full, pruned, plan, kind, axis = damaged(head, chosen)
    calibration, judged = scenes[:32], scenes[32:]
    history = []
    trained = finetune(pruned, full, calibration, plan.sources, kind, axis, epochs=1, lr=1e-2, history=history)
    before, after = _fidelity(full, pruned, plan, kind, judged), _fidelity(full, trained, plan, kind, judged)
    assert after > before + 0.04, (before, after, history)  # measured: +0.08 each


def test_an_epoch_that_raises_the_calibration_loss_is_undone(scenes):
    full, pruned, plan, kind, axis = damaged(None, ["green"])
    history = []
    trained = finetune(pruned, full, scenes[:8], plan.sources, kind, axis, epochs=1, lr=1e3, history=history)
    assert [h["kept"] for h in history] == [False]
    assert history[0]["lr"] == pytest.approx(1e3 / 3 ** 5)  # the first step backed off 4 times, then the epoch once
    assert trained.SerializeToString() == pruned.SerializeToString()  # the pruned model's own weights, bit for bit
