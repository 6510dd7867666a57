"""The runner interface (disasm.runtime.runner): one feed check for every backend, and the torch runner.

Everything here runs on the CPU in a few seconds; the CUDA cases (CUDA graphs, FP16 on the GPU) are marked `gpu` and
skip without one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from architectures import MiniDeepLab, export, randomise_batchnorm
from helpers_onnx import make_model
from disasm.compiler.errors import DisasmError
from disasm.runtime.latency import measure_latency
from disasm.runtime.onnxrt import OnnxRuntimeRunner
from disasm.runtime.runner import FeedError, InputSpec, Runner, check_feed
from disasm.runtime.tensorrt import TensorRTRunner
from disasm.runtime.torchrun import TorchRunner

CUDA = torch.cuda.is_available()
IMAGE = InputSpec("image", (None, 3, 8, 8), np.dtype(np.float32))
MASK = InputSpec("mask", None, None)  # nothing known: anything goes


def _image(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---- the one feed check --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("feed, message", [
    ([1.0], r"^r: feed must be a numpy array or a dict from input name to array, got list$"),
    (_image(1, 3, 8, 8), r"^r: the model has 2 inputs \(image, mask\); pass a dict from input name to array$"),
    ({"image": _image(1, 3, 8, 8)}, r"missing \['mask'\], unknown \[\]; expected \['image', 'mask'\]$"),
    ({"image": _image(1, 3, 8, 8), "mask": 0, "x": 1}, r"missing \[\], unknown \['x'\]"),
    ({"image": _image(1, 3, 8, 8).tolist(), "mask": 0}, r"feed values must be numpy arrays; not arrays: \['image', "
                                                        r"'mask'\]$"),
    ({"image": _image(1, 3, 8, 8).astype(np.float16), "mask": np.zeros(1)},
     r"^r: input 'image': expected dtype float32, got float16; convert with .astype\(np.float32\)$"),
    ({"image": _image(3, 8, 8), "mask": np.zeros(1)}, r"^r: input 'image': expected shape \[\?, 3, 8, 8\], got "
                                                      r"\[3, 8, 8\]$"),
    ({"image": _image(2, 3, 8, 9), "mask": np.zeros(1)}, r"expected shape \[\?, 3, 8, 8\], got \[2, 3, 8, 9\]$"),
])
def test_a_feed_that_does_not_fit_is_one_line_naming_the_input(feed, message):
    with pytest.raises(FeedError, match=message) as caught:
        check_feed("r", feed, [IMAGE, MASK])
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, DisasmError) and isinstance(caught.value, ValueError)  # exit 2 in the CLI


def test_a_feed_that_fits_comes_back_as_a_dict_in_input_order():
    image, mask = _image(2, 3, 8, 8), np.zeros((5, 5), np.int64)  # dynamic batch; unknown shape and dtype pass
    assert list(check_feed("r", {"mask": mask, "image": image}, [IMAGE, MASK])) == ["image", "mask"]
    assert check_feed("r", image, [IMAGE])["image"] is image
    assert IMAGE.shape_text() == "[?, 3, 8, 8]" and MASK.shape_text() == "[...]"


def test_every_backend_checks_feeds_in_the_one_place():
    for backend in (OnnxRuntimeRunner, TensorRTRunner, TorchRunner):
        assert issubclass(backend, Runner)
        assert backend.infer is Runner.infer  # none has its own infer, so none checks feeds its own way
    assert TensorRTRunner.__abstractmethods__ == frozenset()  # implements the whole interface (needs a GPU to run)


# ---- ONNX Runtime and torch behind the same interface --------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_deeplab(tmp_path_factory) -> onnx.ModelProto:
    """Residual encoder, squeeze-excite, ASPP with concat, decoder skip, bilinear resizes; dynamic batch."""
    path = tmp_path_factory.mktemp("runner") / "mini_deeplab.onnx"
    torch.manual_seed(0)
    export(randomise_batchnorm(MiniDeepLab(classes=5, size=32)), path, size=32, opset=17)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def runners(mini_deeplab):
    """The same model on ONNX Runtime and on the torch runner (CPU, float32)."""
    with OnnxRuntimeRunner(mini_deeplab.SerializeToString(), threads=1) as ort_runner, \
            TorchRunner(mini_deeplab) as torch_runner:
        yield ort_runner, torch_runner


def test_torch_runner_on_cpu_equals_onnx_runtime(runners):
    ort_runner, torch_runner = runners
    assert (torch_runner.input_names, torch_runner.output_names) == (ort_runner.input_names, ort_runner.output_names)
    assert torch_runner.input_shapes == ort_runner.input_shapes == {"image": (None, 3, 32, 32)}
    assert torch_runner.input_dtypes == ort_runner.input_dtypes == {"image": np.dtype(np.float32)}
    batch = _image(2, 3, 32, 32, seed=1)  # the dynamic batch takes two images
    (expected,), (actual,) = ort_runner.infer(batch), torch_runner.infer({"image": batch})
    assert actual.dtype == np.float32 and actual.shape == expected.shape == (2, 5, 32, 32)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert torch_runner.last_inference_ms > 0


@pytest.mark.parametrize("feed", [_image(1, 3, 32, 32).astype(np.float64), _image(1, 3, 16, 32), {"x": None}])
def test_both_backends_reject_a_bad_feed_with_the_same_words(runners, feed):
    messages = []
    for runner in runners:
        with pytest.raises(FeedError) as caught:
            runner.infer(feed)
        messages.append(str(caught.value).removeprefix(f"{runner.name}: "))
    assert messages[0] == messages[1]


def test_torch_runner_in_fp16_returns_the_declared_float32(mini_deeplab, runners):
    image = _image(1, 3, 32, 32, seed=2)
    (expected,) = runners[0].infer(image)
    with TorchRunner(mini_deeplab, fp16=True) as runner:
        (actual,) = runner.infer(image)
        assert runner.conditions["precision"] == "fp16"
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=0.05 * np.abs(expected).max())


def test_torch_runner_device_call_is_what_the_latency_harness_times(runners):
    torch_runner = runners[1]
    call = torch_runner.device_call(_image(1, 3, 32, 32))
    stats = measure_latency({"torch": call}, runs=2, warmup=1)
    assert stats["torch"].runs == 2 and stats["torch"].median_ms > 0
    with pytest.raises(FeedError, match="input 'image'"):
        torch_runner.device_call(_image(1, 3, 31, 32))  # checked when bound, not when timed


def test_torch_runner_conditions_name_device_precision_and_graphs(mini_deeplab):
    a, b = TorchRunner(mini_deeplab), TorchRunner(mini_deeplab.SerializeToString())
    assert a.conditions == b.conditions  # like for like
    assert a.conditions | {"torch": None, "threads": None} == {
        "backend": "torch-cpu", "torch": None, "device": "cpu", "precision": "fp32", "cuda_graphs": False,
        "threads": None}
    assert "fp16=False" in repr(a) and a.name == "torch-cpu"


def test_runners_close_at_the_end_of_a_with_block(mini_deeplab):
    image = _image(1, 3, 32, 32)
    for make in (lambda: OnnxRuntimeRunner(mini_deeplab.SerializeToString()), lambda: TorchRunner(mini_deeplab)):
        with make() as runner:
            runner.infer(image)
        assert runner.closed
        with pytest.raises(RuntimeError, match=f"^{runner.name}: .* is closed; create a new runner$"):
            runner.infer(image)
        runner.close()  # twice is harmless


def test_torch_runner_takes_a_path_and_says_what_is_wrong_with_its_settings(mini_deeplab, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mini_deeplab, str(path))
    assert TorchRunner(path).description == repr(str(path))
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        TorchRunner(tmp_path / "absent.onnx")
    with pytest.raises(DisasmError, match="CUDA graphs need a CUDA device, not cpu"):
        TorchRunner(path, cuda_graphs=True)
    with pytest.raises(DisasmError, match="'tpu' is not a torch device"):
        TorchRunner(path, device="tpu")


@pytest.mark.skipif(CUDA, reason="checks the message shown on machines without a GPU")
def test_torch_runner_on_cuda_without_a_gpu_is_a_clear_error(mini_deeplab):
    with pytest.raises(DisasmError, match="torch sees no CUDA GPU here; use device='cpu'"):
        TorchRunner(mini_deeplab, device="cuda")


def test_a_two_input_model_takes_a_dict():
    a, b = _image(1, 4), _image(1, 4, seed=1)
    model = make_model([helper.make_node("Add", ["a", "b"], ["y"])], {"a": a, "b": b}, ["y"])
    for runner in (OnnxRuntimeRunner(model.SerializeToString()), TorchRunner(model)):
        np.testing.assert_allclose(runner.infer({"b": b, "a": a})[0], a + b, rtol=1e-6)
        with pytest.raises(FeedError, match=r"the model has 2 inputs \(a, b\)"):
            runner.infer(a)


# ---- CUDA (skipped without a GPU) ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graphs_replay_what_onnx_runtime_computes(mini_deeplab, runners, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions differ from the CPU by ~1e-3
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ort_runner = runners[0]
    with TorchRunner(mini_deeplab, device="cuda") as runner:
        assert runner.conditions["cuda_graphs"] and runner.conditions["device"] == "cuda:0"
        for batch in (1, 2, 1):  # one capture per shape, replayed when the shape comes back
            image = _image(batch, 3, 32, 32, seed=batch)
            np.testing.assert_allclose(runner.infer(image)[0], ort_runner.infer(image)[0], rtol=1e-4, atol=1e-4)
        assert len(runner._captured) == 2 and runner.capture_failure is None
        other = _image(1, 3, 32, 32, seed=9)  # the replay reads the new values, not the captured ones
        np.testing.assert_allclose(runner.infer(other)[0], ort_runner.infer(other)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fp16_cuda_graphs_keep_the_argmax_and_time_without_copies(mini_deeplab, runners):
    image = _image(1, 3, 32, 32, seed=3)
    (expected,) = runners[0].infer(image)
    with TorchRunner(mini_deeplab, device="cuda", fp16=True) as runner, \
            TorchRunner(mini_deeplab, device="cuda", fp16=True, cuda_graphs=False) as eager:
        (graphed,) = runner.infer(image)
        (plain,) = eager.infer(image)
        stats = measure_latency({"graphs": runner.device_call(image), "eager": eager.device_call(image)}, runs=5)
    assert graphed.dtype == np.float32
    np.testing.assert_allclose(graphed, plain, rtol=1e-3, atol=1e-3)
    assert (graphed.argmax(1) == expected.argmax(1)).mean() > 0.99
    assert all(s.median_ms > 0 for s in stats.values())
