"""TensorRT backend: ahead-of-time engines for sm86 built on a machine without a GPU (TensorRT for RTX).

Build tests need the `trt` extra (`pip install -e '.[trt]'`) and skip cleanly without it; running an engine needs a
GPU and is marked `gpu`.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from architectures import Residual, conv_bn, export, randomise_batchnorm
from disasm.compiler.channels import analyse
from disasm.compiler.prune import prune
from disasm.runtime.tensorrt import TensorRTError, TensorRTRunner, build_engine, save_engine, trt_available, trt_module

TARGET = "sm86"


@pytest.fixture(scope="module")
def trt():
    """The RTX builder, which needs no GPU. With `tensorrt` installed too, the backend prefers it (local GPU only)."""
    module = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install '.[trt]')")
    if trt_module() is not module:
        pytest.skip("`tensorrt` is installed and preferred by the backend; it builds only for the local GPU")
    return module


class TinySeg(nn.Module):
    """conv-bn-relu stem -> residual block -> down conv -> bilinear up, concat with the skip -> fuse -> head -> up."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.ReLU())
        self.block = Residual(16, 16, 1)
        self.down = nn.Sequential(conv_bn(16, 32, 3, 2), nn.ReLU())
        self.fuse = nn.Sequential(conv_bn(48, 32), nn.ReLU())
        self.head = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        skip = self.block(self.stem(x))
        deep = F.interpolate(self.down(skip), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(self.fuse(torch.cat([deep, skip], dim=1)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, bytes]:
    """{"full": ONNX bytes, "pruned": the same with a random half of every prunable group's channels}."""
    path = tmp_path_factory.mktemp("tinyseg") / "tinyseg.onnx"
    torch.manual_seed(0)
    export(randomise_batchnorm(TinySeg()), path, size=64, opset=17)
    full = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    analysis = analyse(full)
    rng = np.random.default_rng(0)
    keep_sets = {g.id: np.sort(rng.choice(g.size, size=max(1, g.size // 2), replace=False))
                 for g in analysis.groups if g.prunable}
    assert len(keep_sets) >= 4  # precondition: stem/residual, down, fuse and the class head are all cut
    pruned = prune(full, analysis, keep_sets)
    return {"full": full.SerializeToString(), "pruned": pruned.SerializeToString()}


@pytest.fixture(scope="module")
def engines(trt, models):
    return {(name, precision): build_engine(data, TARGET, fp16=precision == "fp16")
            for name, data in models.items() for precision in ("fp32", "fp16")}


def constant_elements(build) -> int:
    return sum(int(np.prod(c["Dimensions"])) for layer in build.layers for c in layer.get("Constants", []))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_sm86_engine_builds_without_a_gpu_and_reports_its_layers(engines, precision):
    build = engines["full", precision]
    assert build.serialized and build.size_bytes == len(build.serialized) > 1000
    assert (build.target, build.precision, build.input_shapes) == (TARGET, precision, {"image": (1, 3, 64, 64)})
    assert build.layer_count == len(build.layers) > 0 and build.weight_bytes > 0
    assert all({"Name", "LayerType", "Inputs", "Outputs"} <= set(layer) for layer in build.layers)
    assert any("ONNX Layer: /head/Conv" in layer.get("Metadata", "") for layer in build.layers)
    datatypes = {c["Datatype"] for layer in build.layers for c in layer.get("Constants", [])}
    assert ("Half" in datatypes) == (precision == "fp16")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_pruned_engine_holds_fewer_weights(engines, precision):
    full, pruned = engines["full", precision], engines["pruned", precision]
    assert pruned.weight_bytes < full.weight_bytes
    assert constant_elements(pruned) < constant_elements(full)


def single_node_model(op: str, shape: list, out_shape: list | None = None) -> bytes:
    """image -> Relu -> `op` -> logits, valid ONNX (checked)."""
    nodes = [helper.make_node("Relu", ["image"], ["r"], name="relu"),
             helper.make_node(op, ["r"], ["logits"], name=f"my_{op.lower()}")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape or shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_an_unsupported_graph_names_the_rejected_node(trt):
    with pytest.raises(TensorRTError, match=r"parser rejected .*'my_det' \(Det\): unsupported node") as caught:
        build_engine(single_node_model("Det", [1, 3, 3], [1]), TARGET)  # TensorRT has no Det
    assert caught.value.nodes == ("my_det",)


def test_targets_and_shapes_are_checked_with_the_allowed_values(trt, models):
    with pytest.raises(TensorRTError, match=r"cannot build for sm90; its targets are sm75, sm80, sm86"):
        build_engine(models["full"], "sm90")
    with pytest.raises(TensorRTError, match=r"unknown input\(s\) \['img'\]; the model's inputs are \['image'\]"):
        build_engine(models["full"], TARGET, input_shapes={"img": (1, 3, 64, 64)})
    with pytest.raises(TensorRTError, match=r"shape \[2, 3, 32, 32\] does not fit the model's \[\?, 3, 64, 64\]"):
        build_engine(models["full"], TARGET, input_shapes={"image": (2, 3, 32, 32)})
    assert build_engine(models["full"], TARGET, input_shapes={"image": (2, 3, 64, 64)}).input_shapes == \
        {"image": (2, 3, 64, 64)}
    any_size = single_node_model("Sigmoid", ["n", 3, "h", "w"])
    with pytest.raises(TensorRTError, match=r"dynamic dimensions \[\?, 3, \?, \?\]; pass input_shapes="):
        build_engine(any_size, TARGET)
    assert build_engine(any_size, TARGET, input_shapes={"image": (1, 3, 40, 48)}).layer_count >= 1


def test_save_engine_writes_atomically(engines, tmp_path):
    path = save_engine(tmp_path / "engines" / "full.fp32.engine", engines["full", "fp32"].serialized)
    assert path.read_bytes() == engines["full", "fp32"].serialized
    assert [p.name for p in path.parent.iterdir()] == ["full.fp32.engine"]  # no temporary file left behind


def test_without_a_trt_module_the_backend_imports_and_says_how_to_install(monkeypatch):
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    assert trt_module() is None and not trt_available()
    with pytest.raises(TensorRTError, match=r"no TensorRT module is installed .*pip install 'disasm\[trt\]'"):
        build_engine(b"", TARGET)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_running_without_a_gpu_is_a_clear_error(engines):
    with pytest.raises(TensorRTError, match="a CUDA GPU is needed to run a TensorRT engine"):
        TensorRTRunner(engines["full", "fp32"].serialized)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_engine_for_the_local_gpu_matches_onnx_runtime(trt, models):
    import onnxruntime as ort

    major, minor = torch.cuda.get_device_capability()
    build = build_engine(models["full"], f"sm{major}{minor}")  # TensorRT-RTX has no sm90: skips are TensorRTErrors
    image = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    expected = ort.InferenceSession(models["full"], providers=["CPUExecutionProvider"]).run(None, {"image": image})
    with TensorRTRunner(build.serialized) as runner:
        (logits,) = runner.infer(image)
        assert runner.last_inference_ms > 0
    np.testing.assert_allclose(logits, expected[0], atol=1e-3, rtol=1e-3)
