"""The compile flow as a library: chosen-or-none outputs, the budget search and its contract, several heads, and the
import direction shared/DESIGN.md sets."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from disasm.attribution.select import SelectionSettings
from disasm.compiler import pipeline
from disasm.compiler.errors import DisasmError
from disasm.compiler.load import Overrides, load_model
from disasm.compiler.outputs import add_output_head, plan_outputs
from disasm.compiler.pipeline import Request, compile_model
from test_inputs import LABELS, save, seg_model, write_scene

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    for i in range(8):
        write_scene(root / "calib" / f"s{i}.png", None, seed=i)
        write_scene(root / "judged" / f"s{i}.png", None, seed=100 + i)
    return root


def _mapped_full_answer(full: np.ndarray, classes: tuple[str, ...], names: tuple[str, ...], none: int) -> np.ndarray:
    answer = np.full(full.shape[:1] + full.shape[2:], none)
    winner = full.argmax(1)
    for position, name in enumerate(names):
        if name in classes and position != none:
            answer[winner == classes.index(name)] = position
    return answer


@pytest.mark.parametrize("head, background", [(None, True), ("softmax", True), (None, False)])
def test_uncut_output_head_answers_exactly_the_mapped_full_argmax(tmp_path, head, background):
    labels = LABELS if background else "sky,red,green,blue"
    model = load_model(save(seg_model(head=head), tmp_path / "m.onnx"), labels)
    plan = plan_outputs(model.classes, ["green"], model.background, model.output_kind)
    assert plan.names == (("background", "green") if background else ("green", "other"))
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32) * 3
    full = ort.InferenceSession(model.proto.SerializeToString()).run(None, {"image": x})[0]
    headed = add_output_head(model.proto, plan, 1)
    onnx.checker.check_model(headed)
    pruned = ort.InferenceSession(headed.SerializeToString()).run(None, {"image": x})[0]
    assert pruned.shape == (4, 2, 16, 16)
    np.testing.assert_array_equal(pruned.argmax(1), _mapped_full_answer(full, model.classes, plan.names,
                                                                         plan.none_index))
    assert (pruned.argmax(1) == plan.names.index("green")).any()  # the chosen class is answered somewhere


def _request(tmp_path: Path, scenes: Path, **changes) -> Request:
    model = save(seg_model(), tmp_path / "m.onnx")
    return replace(Request(model=model, categories="red,green", images=scenes / "calib",
                           eval_images=scenes / "judged", labels=LABELS, out=tmp_path / "out", no_cache=True,
                           engines=False, runs=1, compensate="mean",
                           selection=SelectionSettings(round_to=1)), **changes)


def test_search_returns_the_smallest_model_that_meets_the_target(tmp_path, scenes, monkeypatch):
    monkeypatch.setattr(pipeline, "ALPHAS", (0.05, 0.1, 0.3, 0.6))
    report = compile_model(_request(tmp_path, scenes, min_fidelity=0.8))
    trials, chosen = report.search["trials"], report.search["trials"][report.search["chosen"]]
    assert report.contract["met"] and chosen["category_fidelity"] >= 0.8 and chosen["macs_ratio"] < 1
    passing = [t for t in trials if t["category_fidelity"] is not None and t["category_fidelity"] >= 0.8]
    assert chosen["macs_ratio"] == min(t["macs_ratio"] for t in passing)
    assert report.fidelity["category_fidelity"] == chosen["category_fidelity"]
    assert report.output["classes"] == ["background", "red", "green"]
    written = onnx.load(str(tmp_path / "out" / "pruned.onnx"))
    assert {p.key: p.value for p in written.metadata_props}["disasm.classes"] == "background,red,green"


def test_search_writes_the_uncut_model_when_no_cut_meets_the_target(tmp_path, scenes, monkeypatch):
    monkeypatch.setattr(pipeline, "ALPHAS", (0.9,))
    report = compile_model(_request(tmp_path, scenes, min_fidelity=1.0))
    assert report.contract["met"] and "NOTHING WAS CUT" in report.contract["message"]
    assert report.search["trials"][-1]["setting"].startswith("uncut")
    assert report.fidelity["category_fidelity"] == 1.0  # every channel kept: exactly the full model's answers
    assert report.cost["pruned"]["macs"] == report.cost["full"]["macs"]


def test_judged_images_default_to_a_held_out_share_of_the_calibration_folder(tmp_path, scenes, monkeypatch):
    monkeypatch.setattr(pipeline, "ALPHAS", (0.0,))
    report = compile_model(_request(tmp_path, scenes, eval_images=None))
    assert (report.images["calibration"], report.images["judged"]) == (6, 2)
    assert "held out" in report.fidelity["source"]


def test_finetune_trains_each_cut_trial_and_writes_the_trained_weights(tmp_path, scenes):
    from disasm.attribution.finetune import finetune

    fixed = dict(budget_fixed=True, selection=SelectionSettings(alpha=0.3, round_to=1))
    plain = _request(tmp_path / "plain", scenes, **fixed)
    untuned_report = compile_model(plain)
    report = compile_model(replace(plain, finetune=1, out=tmp_path / "tuned"))
    assert report.compensation["finetune_epochs"] == 1 and report.settings["finetune"] == 1
    assert [e["epoch"] for e in report.search["trials"][0]["finetune"]] == [1]
    assert untuned_report.search["trials"][0]["finetune"] == []
    # the written weights are those of one epoch of finetune() on the calibration images, from the untuned cut
    model = load_model(plain.model, LABELS)
    images = pipeline._images(plain, model, model.image_size)
    untuned = onnx.load(str(tmp_path / "plain" / "out" / "pruned.onnx"))
    plan = plan_outputs(model.classes, report.categories, model.background, model.output_kind)
    expected = finetune(untuned, model.proto, images.calibration_inputs, plan.sources, model.output_kind,
                        model.class_axis, 1)
    written = onnx.load(str(tmp_path / "tuned" / "pruned.onnx"))
    values = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    for tensor in expected.graph.initializer:  # the compile's teacher ran 8 images at once: float rounding differs
        np.testing.assert_allclose(values[tensor.name], onnx.numpy_helper.to_array(tensor), rtol=1e-5, atol=1e-6)
    assert report.search["trials"][0]["finetune"][0]["kept"] == any(
        not np.array_equal(values[t.name], onnx.numpy_helper.to_array(t)) for t in untuned.graph.initializer)


def test_the_report_says_when_judged_images_are_calibration_images(tmp_path, scenes, monkeypatch):
    monkeypatch.setattr(pipeline, "ALPHAS", (0.0,))
    report = compile_model(_request(tmp_path, scenes, eval_images=scenes / "calib"))
    assert report.images["judged_in_calibration"] == report.images["judged"] == 8
    assert "8 of them also calibration images" in report.fidelity["source"]
    assert compile_model(_request(tmp_path / "b", scenes, force=True)).images["judged_in_calibration"] == 0


def _two_head_model(tmp_path: Path) -> Path:
    model = seg_model()
    graph = model.graph
    graph.node.append(helper.make_node("Relu", ["r2"], ["aux"], name="aux_relu"))
    graph.output.append(helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, ["N", 16, 8, 8]))
    return save(model, tmp_path / "two.onnx")


def test_several_outputs_need_a_head_and_the_others_are_removed(tmp_path):
    path = _two_head_model(tmp_path)
    with pytest.raises(DisasmError, match="--head") as error:
        load_model(path, "a,b,c,d,e")  # five names fit neither output
    assert "output" in str(error.value) and "aux" in str(error.value)
    model = load_model(path, LABELS)  # four names: only 'output' has four channels
    assert model.output_name == "output" and model.removed_heads == ("aux",)
    assert [o.name for o in model.proto.graph.output] == ["output"]
    assert "aux_relu" not in {n.name for n in model.proto.graph.node}
    assert load_model(path, LABELS, Overrides(head="output")).removed_heads == ("aux",)
    with pytest.raises(DisasmError, match="not an output"):
        load_model(path, LABELS, Overrides(head="nope"))


def _imports(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("disasm."):
                found.add((path.name, node.module))
            elif isinstance(node, ast.Import):
                found |= {(path.name, a.name) for a in node.names if a.name.startswith("disasm.")}
    return found


def test_dependencies_point_one_way():
    """compiler's graph code imports neither attribution nor runtime (only the driver, pipeline and cli, may);
    attribution never imports runtime; runtime uses only the compiler's leaf helpers (errors, atomic files), except
    the torch backend, which runs ONNX files through attribution's interpreter (the issue 12 runner for CUDA)."""
    drivers = {"pipeline.py", "cli.py"}
    for name, module in _imports("compiler"):
        if name not in drivers:
            assert not module.startswith(("disasm.attribution", "disasm.runtime")), (name, module)
    for name, module in _imports("attribution"):
        assert not module.startswith("disasm.runtime"), (name, module)
    for name, module in _imports("runtime"):
        if (name, module) == ("torchrun.py", "disasm.attribution.interpreter"):
            continue
        assert not module.startswith("disasm.attribution"), (name, module)
        assert module in ("disasm.compiler.errors", "disasm.compiler.files") or module.startswith("disasm.runtime"), \
            (name, module)


def test_output_sizes_computed_at_run_time_still_give_the_class_count(tmp_path):
    """interpolate(x, size=image.shape[-2:]) heads declare a symbolic output shape, class axis included; the class
    count comes from the graph (shapes propagated through the size arithmetic), and labels must match it."""
    model = seg_model(size=None)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["logits" if o == "output" else o for o in node.output]
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([2], np.int64), "s2"),
                              onnx.numpy_helper.from_array(np.array([4], np.int64), "s4"),
                              onnx.numpy_helper.from_array(np.array([0], np.int64), "s0")])
    graph.node.extend([helper.make_node("Shape", ["image"], ["image_shape"]),
                       helper.make_node("Slice", ["image_shape", "s2", "s4", "s0"], ["hw"]),
                       helper.make_node("Shape", ["logits"], ["logits_shape"]),
                       helper.make_node("Slice", ["logits_shape", "s0", "s2", "s0"], ["nk"]),
                       helper.make_node("Concat", ["nk", "hw"], ["sizes"], axis=0),
                       helper.make_node("Resize", ["logits", "", "", "sizes"], ["output"], mode="linear")])
    graph.output[0].CopyFrom(helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", "K", "H", "W"]))
    path = save(model, tmp_path / "dyn.onnx")
    assert len(load_model(path, overrides=Overrides(layout="nchw")).classes) == 4  # the graph gives the count
    loaded = load_model(path, LABELS, Overrides(layout="nchw"))
    assert loaded.classes == tuple(LABELS.split(",")) and loaded.class_axis == 1
    with pytest.raises(DisasmError):
        load_model(path, "a,b,c", Overrides(layout="nchw"))  # the class conv has four rows, not three


def test_one_sigmoid_channel_is_a_segmentation_model(tmp_path):
    """Portrait and matting models answer one category or none with a single sigmoid channel."""
    model = seg_model(head="sigmoid")
    w3 = next(t for t in model.graph.initializer if t.name == "w3")
    b3 = next(t for t in model.graph.initializer if t.name == "b3")
    w3.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w3)[:1], "w3"))
    b3.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(b3)[:1], "b3"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", 1, 16, 16]))
    loaded = load_model(save(model, tmp_path / "one.onnx"))
    assert loaded.output_kind == "sigmoid" and len(loaded.classes) == 1
    plan = plan_outputs(loaded.classes, list(loaded.classes), loaded.background, loaded.output_kind)
    assert plan.names == loaded.classes and plan.none is None
