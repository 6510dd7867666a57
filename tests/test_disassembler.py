"""The Disassembler's vectors equal a direct, one image and one category at a time, computation of the formulas in
attribution/disassembler.py (shared/algorithm.md section 3), whatever the batching of images and gradient rows."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from disasm.attribution import disassembler
from disasm.attribution.calibration import attribution_graph, calibrate, observed_tensors
from disasm.attribution.disassembler import Attribution, AttributionSettings, attribute, attribute_batch
from disasm.attribution.interpreter import TorchGraph
from disasm.attribution.moments import Consumer, accumulate, find_consumers, patches
from disasm.compiler.channels import analyse
from disasm.compiler.errors import DisasmError
from disasm.compiler.images import load_images, preprocess, scan_images
from disasm.compiler.load import Model, Overrides, load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes_seg.onnx"
CORPUS = ROOT.parent / "shared" / "corpus"


def reference(graph: TorchGraph, images: np.ndarray, tensors: list[str], settings: AttributionSettings):
    """Per tensor [K, C] sums over images of the normalised forward, backward and Taylor vectors, the per-category
    image counts, the fallback categories and the mask pixels: one forward per image, one backward per (image,
    category) with a big enough mask. A category with no such confident mask on any image takes its argmax pixels
    (on the images where they reach min_mask_fraction, or on any image where it is predicted if none does)."""
    name, out = graph.input_names[0], graph.output_names[0]
    with torch.no_grad():
        probs = [torch.softmax(graph.run({name: torch.from_numpy(image[None])})[out][0], 0) for image in images]
    k = len(probs[0])
    confident = [(p > settings.tau).float() for p in probs]
    predicted = [F.one_hot(p.argmax(0), k).permute(2, 0, 1).float() for p in probs]
    enough = settings.min_mask_fraction
    confident_images = sum((m.mean((1, 2)) >= enough).long() for m in confident)
    fallback = ((confident_images == 0) & (sum(m.sum((1, 2)) for m in predicted) > 0)).numpy()
    reaches = sum((m.mean((1, 2)) >= enough).long() for m in predicted).numpy() > 0
    sums: dict[str, dict[str, np.ndarray]] = {"forward": {}, "backward": {}, "taylor": {}}
    counts, mask_pixels = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for i, image in enumerate(images):
        values = graph.run({name: torch.from_numpy(image[None])}, capture=tensors)
        logits = values[out][0]
        for c in range(k):
            mask = predicted[i][c] if fallback[c] else confident[i][c]
            if mask.sum() == 0 or (mask.mean() < enough and not (fallback[c] and not reaches[c])):
                continue
            counts[c] += 1
            mask_pixels[c] += int(mask.sum())
            grads = torch.autograd.grad((logits[c] * mask).sum(), [values[t] for t in tensors], retain_graph=True)
            for t, grad in zip(tensors, grads):
                a, g = values[t][0].detach(), grad[0]
                m = F.adaptive_avg_pool2d(mask[None, None], a.shape[-2:])[0, 0]  # area fraction of each cell
                forward = (m * a.relu()).sum((1, 2))
                backward = (m * g.relu()).sum((1, 2))
                taylor = (m * g * a).sum((1, 2)).abs()
                for kind, v in (("forward", forward / forward.sum()), ("backward", backward / backward.max()),
                                ("taylor", taylor / taylor.max())):
                    sums[kind].setdefault(t, np.zeros((k, len(v))))[c] += v.double().numpy()
    return sums, counts, fallback, mask_pixels


@dataclass
class Example:
    model: Model
    graph: TorchGraph
    tensors: list[str]
    images: np.ndarray  # five preprocessed calibration images

    def attribute(self, images: np.ndarray, settings: AttributionSettings):
        return attribute(self.graph, images, self.tensors, len(self.model.classes), self.model.output_kind, settings)


@pytest.fixture(scope="module")
def example() -> Example:
    if not EXAMPLE.exists():
        pytest.skip("example model not built")
    model = load_model(EXAMPLE)
    images = preprocess(load_images(scan_images(ROOT / "examples" / "data" / "calib").paths[:5], model.image_size),
                        model.preprocessing)
    return Example(model, TorchGraph(model.proto), observed_tensors(analyse(model.proto)), images)


BATCHED = AttributionSettings(batch_size=3)  # image batches 3 + 2; gradient rows in chunks of 3


@pytest.fixture(scope="module")
def batched(example):
    """The five images attributed in batches of three (shared by the tests that only read it)."""
    return example.attribute(example.images, BATCHED)


@pytest.fixture(scope="module")
def expected(example):
    """The reference sums of the five images (one image and one category at a time)."""
    return reference(example.graph, example.images, example.tensors, BATCHED)


def _check_against_reference(ours: Attribution, expected, tensors: list[str]) -> None:
    sums, counts, fallback, mask_pixels = expected
    np.testing.assert_array_equal(ours.images_per_class, counts)
    np.testing.assert_array_equal(ours.fallback, fallback)
    np.testing.assert_array_equal(ours.mask_pixels, mask_pixels)
    assert counts.sum() > 5, "several categories per image, so rows are spread over chunks"
    assert fallback.any() and not fallback.all(), "these five images have categories with and without confidence"
    for kind, ours_sums in (("forward", ours.forward_sum), ("backward", ours.backward_sum),
                            ("taylor", ours.taylor_sum)):
        for t in tensors:
            present = counts > 0
            np.testing.assert_allclose(ours_sums[t], sums[kind].get(t, np.zeros_like(ours_sums[t])),
                                       rtol=1e-4, atol=1e-5, err_msg=f"{kind} {t}")
            assert np.all(ours_sums[t][~present] == 0)


def test_batched_rows_equal_one_image_one_category_at_a_time(example, batched, expected):
    _check_against_reference(batched, expected, example.tensors)


@pytest.mark.parametrize("backward_cost", [0.0, float("inf")], ids=["all-rows-on-the-batch-graph", "all-rows-repeated"])
def test_rows_give_the_same_sums_on_the_batch_graph_or_repeated(example, expected, backward_cost, monkeypatch):
    """Every row through the batch's own graph (backward rounds), or every row through repeated images (one forward
    + backward per chunk of rows), or the mix the cost model picks (the test above): the same sums."""
    monkeypatch.setattr(disassembler, "BACKWARD_COST", backward_cost)
    rows = disassembler._shared_rounds(torch.tensor([3, 1, 0]))
    assert rows == (3 if backward_cost == 0 else 0)
    _check_against_reference(example.attribute(example.images, BATCHED), expected, example.tensors)


def test_shared_rounds_stop_where_too_few_images_have_that_many_rows():
    # BACKWARD_COST 1.5: a round over a batch of 4 must serve more than 0.6 * 4 = 2.4 images
    assert disassembler._shared_rounds(torch.tensor([5, 5, 5, 1])) == 5
    assert disassembler._shared_rounds(torch.tensor([5, 5, 1, 1])) == 1
    assert disassembler._shared_rounds(torch.tensor([0, 0, 0, 0])) == 0
    assert disassembler._shared_rounds(torch.tensor([2])) == 2  # one image: every row on its own graph


@pytest.mark.parametrize("kernel, stride, dilation, pads, auto_pad", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET"),
    ((3, 3), (1, 1), (3, 3), (3, 3, 3, 3), "NOTSET"),   # dilated
    ((3, 3), (1, 1), (6, 6), (6, 6, 6, 6), "NOTSET"),   # dilation past the grid: windows do not overlap
    ((5, 5), (1, 1), (1, 1), (2, 2, 2, 2), "NOTSET"),
    ((1, 3), (1, 1), (1, 1), (0, 1, 0, 1), "NOTSET"),   # asymmetric kernels and dilations
    ((3, 1), (1, 1), (1, 2), (1, 0, 1, 0), "NOTSET"),
    ((3, 3), (1, 1), (1, 1), (0, 2, 1, 0), "NOTSET"),   # uneven pads
    ((2, 2), (1, 1), (1, 1), (0, 0, 0, 0), "SAME_LOWER"),
    ((3, 3), (2, 2), (1, 1), (0, 0, 0, 0), "SAME_UPPER"),  # strided: unfolded
    ((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), "NOTSET"),   # pointwise: read as it is
    ((1, 1), (2, 2), (1, 1), (0, 0, 0, 0), "NOTSET"),
])
def test_moments_equal_the_summed_outer_products_of_the_patches(kernel, stride, dilation, pads, auto_pad):
    consumer = Consumer(7, "conv", "t", 5, kernel, stride, dilation, pads, auto_pad)
    x = torch.randn(3, 5, 9, 8, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    z = patches(x, consumer).double()
    expected = (z.T @ z).numpy()
    got = accumulate({"t": x}, [consumer])[7]
    assert got.shape == expected.shape and got[-1, -1] == len(z)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def test_a_batch_without_confident_pixels_adds_nothing(example):
    settings = AttributionSettings(tau=0.999999)  # no pixel is that confident, so no (image, category) rows
    x = torch.from_numpy(example.images[:2])
    result = attribute_batch(example.graph, x, example.tensors, len(example.model.classes), "logits", settings)
    assert result.images == 2 and result.images_per_class.sum() == 0 and not result.fallback.any()
    assert all(not result.backward_sum[t].any() and not result.forward_sum[t].any() for t in example.tensors)
    assert all(result.mean_sum[t].any() for t in example.tensors)  # channel means do not depend on the masks


def test_a_set_without_confident_pixels_falls_back_to_the_argmax(example):
    settings = AttributionSettings(tau=0.999999)
    result = example.attribute(example.images[:2], settings)
    predicted = result.predicted_pixels > 0
    assert result.images == 2 and predicted.any() and not predicted.all()
    np.testing.assert_array_equal(result.fallback, predicted)  # every predicted category, and only those
    np.testing.assert_array_equal(result.images_per_class > 0, predicted)
    assert result.fallback_pixels() == {int(k): int(result.mask_pixels[k]) for k in np.flatnonzero(predicted)}
    assert all(result.mask_pixels[k] > 0 for k in np.flatnonzero(predicted))
    for t in example.tensors:
        assert result.forward_sum[t][predicted].any() and not result.forward_sum[t][~predicted].any()
        assert result.backward_sum[t][predicted].any() and not result.backward_sum[t][~predicted].any()


def test_no_observed_tensors_means_no_backward(example, batched):
    consumers = find_consumers(example.model.proto, analyse(example.model.proto))
    full = batched
    bare = attribute(example.graph, example.images, [], len(example.model.classes), "logits", BATCHED,
                     consumers=consumers)
    assert bare.tensors == [] and bare.images == len(example.images) and bare.moments
    np.testing.assert_array_equal(bare.images_per_class, full.images_per_class)
    np.testing.assert_array_equal(bare.fallback, full.fallback)
    np.testing.assert_array_equal(bare.mask_pixels, full.mask_pixels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_attribution_equals_cpu(example, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs would differ from CPU by ~1e-3
    settings = AttributionSettings(batch_size=3)
    cpu = example.attribute(example.images, settings)
    gpu = attribute(TorchGraph(example.model.proto, device="cuda"), example.images, example.tensors,
                    len(example.model.classes), example.model.output_kind, settings)
    np.testing.assert_array_equal(gpu.images_per_class, cpu.images_per_class)
    for t in example.tensors:
        for ours, theirs in ((gpu.forward_sum, cpu.forward_sum), (gpu.backward_sum, cpu.backward_sum),
                             (gpu.taylor_sum, cpu.taylor_sum), (gpu.mean_sum, cpu.mean_sum)):
            np.testing.assert_allclose(ours[t], theirs[t], rtol=1e-4, atol=1e-5, err_msg=t)


def tiny_model(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, final: str | None = None,
               size: int = 8) -> onnx.ModelProto:
    """x [N, 3, size, size] -> 1x1 Conv (w1, b1) -> Relu 't' -> 1x1 Conv (w2, b2) 'z' -> optional `final` -> 'y'."""
    h = onnx.helper
    k = len(w2)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c"]), h.make_node("Relu", ["c"], ["t"]),
             h.make_node("Conv", ["t", "w2", "b2"], ["z" if final else "y"])]
    if final:
        nodes.append(h.make_node(final, ["z"], ["y"], **({"axis": 1} if final == "Softmax" else {})))
    weights = {"w1": w1[..., None, None], "b1": b1, "w2": w2[..., None, None], "b2": b2}
    graph = h.make_graph(nodes, "tiny", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, size, size])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", k, size, size])],
                         [onnx.numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in weights.items()])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9)


def saved(proto: onnx.ModelProto, folder: Path, labels: str) -> Model:
    onnx.save(proto, str(folder / "tiny.onnx"))
    return load_model(folder / "tiny.onnx", labels)


def test_saturated_sigmoid_back_propagates_its_logits(tmp_path):
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(4, 3)), np.array([[0.5, -1, 2, 0.1], [1, 0.3, -0.2, -1]])
    model = saved(tiny_model(w1, np.zeros(4), w2, np.array([100.0, 100.0]), "Sigmoid"), tmp_path, "skin,clothes")
    assert model.output_kind == "sigmoid" and model.activation == "y"
    x = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        assert (TorchGraph(model.proto).run({"x": torch.from_numpy(x)})["y"] == 1).all()  # saturated: p == 1.0
    proto, kind = attribution_graph(model)
    assert kind == "sigmoid-logits" and [n.op_type for n in proto.graph.node][-1] == "Identity"
    assert [n.op_type for n in model.proto.graph.node][-1] == "Sigmoid"  # the model itself is untouched

    result = calibrate(model, analyse(model.proto), x, AttributionSettings(batch_size=2), "cpu")
    assert result.tensors == ["t"]
    np.testing.assert_array_equal(result.images_per_class, [3, 3])
    assert not result.fallback.any()
    for sums in (result.forward_sum, result.backward_sum, result.taylor_sum, result.mean_sum):
        assert np.isfinite(sums["t"]).all()
    # the logit is linear in t: d z_k / d t[c] = w2[k, c] everywhere, so the max-normalised backward vector of each
    # image is relu(w2[k]) / max relu(w2[k])
    expected = np.maximum(w2, 0) / np.maximum(w2, 0).max(1, keepdims=True)
    np.testing.assert_allclose(result.backward("t"), expected, rtol=1e-5)

    # without the logit tensor (the probabilities as they come), the clamped inversion stays finite
    plain = attribute(TorchGraph(model.proto), x, ["t"], 2, "sigmoid", AttributionSettings())
    assert np.isfinite(plain.backward_sum["t"]).all()


def test_softmax_models_back_propagate_logits_not_log_probabilities(tmp_path):
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(4, 3)), rng.normal(size=(3, 4)) * 4
    model = saved(tiny_model(w1, np.zeros(4), w2, np.zeros(3), "Softmax"), tmp_path, "a,b,c")
    assert model.output_kind == "probs" and model.activation == "y"
    x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    settings = AttributionSettings(tau=0.5)
    ours = calibrate(model, analyse(model.proto), x, settings, "cpu")
    logits = tiny_model(w1, np.zeros(4), w2, np.zeros(3))  # the same network without its Softmax
    theirs = attribute(TorchGraph(logits), x, ["t"], 3, "logits", settings)
    np.testing.assert_array_equal(ours.images_per_class, theirs.images_per_class)
    for a, b in ((ours.forward_sum, theirs.forward_sum), (ours.backward_sum, theirs.backward_sum)):
        np.testing.assert_allclose(a["t"], b["t"], rtol=1e-5, atol=1e-7)


def test_a_non_finite_sum_stops_the_run_naming_the_tensor_and_category():
    # t[0] = 1e37 on every pixel: its masked sum overflows float32 to inf, while the output (1e-37 * t[0]) is finite
    w1 = np.array([[1e37, 0, 0], [0, 1, 0]])
    w2 = np.array([[8e-37, 0], [0, 1]])
    proto = tiny_model(w1, np.zeros(2), w2, np.zeros(2))
    x = np.ones((2, 3, 8, 8), np.float32)
    with torch.no_grad():
        values = TorchGraph(proto).run({"x": torch.from_numpy(x)}, capture=["t"])
    assert torch.isinf(values["t"].sum((2, 3))).any() and torch.isfinite(values["y"]).all()
    with pytest.raises(DisasmError, match=r"forward sum of tensor 't' for category 'road'"):
        attribute(TorchGraph(proto), x, ["t"], 2, "logits", AttributionSettings(), classes=("road", "car"))
    unchecked = attribute(TorchGraph(proto), x, ["t"], 2, "logits", AttributionSettings(), check=False)
    assert not np.isfinite(unchecked.forward_sum["t"][0]).all()


def test_a_non_finite_output_stops_the_run():
    proto = tiny_model(np.eye(3), np.zeros(3), np.eye(3), np.zeros(3))
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[1, 2, 3, 3] = np.inf
    with pytest.raises(DisasmError, match=r"model output 'y' is not finite .*3 inf/NaN values, the first in "
                                          r"category 'a'"):  # inf in x2 makes 0 * inf = NaN in z0 and z1
        attribute(TorchGraph(proto), x, ["t"], 3, "logits", AttributionSettings(), classes=("a", "b", "c"))


def fallback_case() -> tuple[onnx.ModelProto, np.ndarray]:
    """Logits z = (8 t0, 0.5 t1, -10) with t = relu(x): class 0 is confident (p = 0.9997) where x0 = 1; class 1 is
    the argmax, at p = 0.62 < tau, where x1 = 1; class 2 is never the argmax. Image 0: class 0 on the left half;
    image 1: class 1 on a 4x4 corner; image 2: class 1 on a single pixel (below min_mask_fraction)."""
    proto = tiny_model(np.eye(3), np.zeros(3), np.diag([8.0, 0.5, 0.0]), np.array([0.0, 0.0, -10.0]))
    x = np.zeros((3, 3, 8, 8), np.float32)
    x[0, 0, :, :4] = 1
    x[1, 1, :4, :4] = 1
    x[2, 1, 5, 5] = 1
    return proto, x


def test_a_category_never_confident_but_predicted_falls_back_to_its_argmax_pixels():
    proto, x = fallback_case()
    settings = AttributionSettings(tau=0.8, min_mask_fraction=0.02, batch_size=2)
    result = attribute(TorchGraph(proto), x, ["t"], 3, "logits", settings)
    np.testing.assert_array_equal(result.images_per_class, [1, 1, 0])  # image 2's single pixel is below 2 %
    np.testing.assert_array_equal(result.fallback, [False, True, False])
    assert result.fallback_pixels() == {1: 16}
    np.testing.assert_array_equal(result.mask_pixels, [32, 16, 0])
    np.testing.assert_array_equal(result.predicted_pixels, [64 + 48 + 63, 16 + 1, 0])  # ties at z = 0 go to class 0
    np.testing.assert_allclose(result.forward("t")[1], [0, 1, 0], atol=1e-6)  # only t1 is active in its mask
    np.testing.assert_allclose(result.backward("t")[1], [0, 1, 0], atol=1e-6)  # dz1/dt = (0, 0.5, 0)
    assert not result.forward_sum["t"][2].any() and not result.backward_sum["t"][2].any()

    # where no image reaches min_mask_fraction, every image where the category is predicted counts
    single = attribute(TorchGraph(proto), x[[0, 2]], ["t"], 3, "logits", settings)
    np.testing.assert_array_equal(single.images_per_class, [1, 1, 0])
    assert single.fallback_pixels() == {1: 1}


def test_the_fallback_is_decided_over_all_shards():
    """Two shards, as two threads whose `gather` sums their counts (the distributed all-reduce): the shard without
    class 1 still takes the fallback decision, and the merged result equals the single run."""
    proto, x = fallback_case()
    settings = AttributionSettings(tau=0.8, min_mask_fraction=0.02)
    whole = attribute(TorchGraph(proto), x, ["t"], 3, "logits", settings)
    barrier, shared = threading.Barrier(2), {}

    def gather(rank: int):
        def summed(counts: np.ndarray) -> np.ndarray:
            shared[rank] = counts
            barrier.wait()
            return shared[0] + shared[1]
        return summed

    results: dict[int, Attribution] = {}

    def shard(rank: int, images: list[int]) -> None:
        results[rank] = attribute(TorchGraph(proto), x[images], ["t"], 3, "logits", settings, gather=gather(rank))

    threads = [threading.Thread(target=shard, args=(0, [0])), threading.Thread(target=shard, args=(1, [1, 2]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    np.testing.assert_array_equal(results[0].fallback, [False, True, False])  # shard 0 never sees class 1
    merged = results[0].merge(results[1])
    np.testing.assert_array_equal(merged.images_per_class, whole.images_per_class)
    np.testing.assert_array_equal(merged.predicted_pixels, whole.predicted_pixels)
    assert merged.fallback_pixels() == whole.fallback_pixels() == {1: 16}
    for a, b in ((merged.forward_sum, whole.forward_sum), (merged.backward_sum, whole.backward_sum)):
        np.testing.assert_allclose(a["t"], b["t"], rtol=1e-6)
    alone = attribute(TorchGraph(proto), x[[0]], ["t"], 3, "logits", settings)  # decided on its own shard only
    with pytest.raises(DisasmError, match="different masks"):
        alone.merge(results[1])


@pytest.mark.skipif(not (CORPUS / "models" / "sinet-portrait.onnx").exists(), reason="no model corpus")
def test_sinet_has_no_observed_tensors_and_still_attributes():
    model = load_model(CORPUS / "models" / "sinet-portrait.onnx", "background,person",
                       Overrides(mean=(102.890434, 111.25247, 126.91212), std=(16047.89, 16019.45, 16920.70),
                                 color="bgr"))
    analysis = analyse(model.proto)
    images = scan_images(CORPUS / "images" / "people").paths[:2]
    x = preprocess(load_images(images, model.image_size), model.preprocessing)
    result = calibrate(model, analysis, x, AttributionSettings(batch_size=1), "cpu", moments=True)
    assert result.images == 2 and result.images_per_class.sum() > 0
    if not observed_tensors(analysis):  # today's channel analysis blocks every group of SINet
        assert result.tensors == []


def test_subnormal_weights_are_set_to_zero_when_the_graph_is_built():
    """Subnormal weights (dead channels of trained models) take a slow CPU path in every multiplication; the
    interpreter sets them to 0, which changes no output beyond float32 resolution."""
    w1 = np.array([[1.0, 1e-40, 0.5], [2e-39, 0.0, -1e-41], [0.25, 1.0, 1.0]], np.float32)
    proto = tiny_model(w1, np.zeros(3), np.eye(3), np.zeros(3))
    graph = TorchGraph(proto)
    weights = graph._constants["w1"][..., 0, 0].numpy()
    np.testing.assert_array_equal(weights, np.where(np.abs(w1) < np.finfo(np.float32).tiny, 0, w1))
    assert weights[0, 0] == 1.0 and weights[2, 2] == 1.0
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = torch.relu(torch.einsum("oc,nchw->nohw", torch.from_numpy(w1), x))
    torch.testing.assert_close(graph.run({"x": x})["y"], expected, rtol=1e-6, atol=1e-30)
