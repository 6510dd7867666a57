"""The Disassembler's vectors equal a direct, one image and one category at a time, computation of the formulas in
attribution/disassembler.py (shared/algorithm.md section 3), whatever the batching of images and gradient rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from disasm.attribution.calibration import observed_tensors
from disasm.attribution.disassembler import AttributionSettings, attribute
from disasm.attribution.interpreter import TorchGraph
from disasm.compiler.channels import analyse
from disasm.compiler.images import load_images, preprocess, scan_images
from disasm.compiler.load import Model, load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes_seg.onnx"
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="example model not built")


def reference(graph: TorchGraph, images: np.ndarray, tensors: list[str], settings: AttributionSettings):
    """Per tensor [K, C] sums over images of the normalised forward, backward and Taylor vectors, and the per-category
    image counts: one forward per image, one backward per (image, category) with a big enough mask."""
    name, out = graph.input_names[0], graph.output_names[0]
    sums: dict[str, dict[str, np.ndarray]] = {"forward": {}, "backward": {}, "taylor": {}}
    counts = None
    for image in images:
        values = graph.run({name: torch.from_numpy(image[None])}, capture=tensors)
        logits = values[out][0]
        masks = (torch.softmax(logits, 0) > settings.tau).float()
        counts = np.zeros(len(masks), np.int64) if counts is None else counts
        for k, mask in enumerate(masks):
            if mask.mean() < settings.min_mask_fraction:
                continue
            counts[k] += 1
            grads = torch.autograd.grad((logits[k] * mask).sum(), [values[t] for t in tensors], retain_graph=True)
            for t, grad in zip(tensors, grads):
                a, g = values[t][0].detach(), grad[0]
                m = F.adaptive_avg_pool2d(mask[None, None], a.shape[-2:])[0, 0]  # area fraction of each cell
                forward = (m * a.relu()).sum((1, 2))
                backward = (m * g.relu()).sum((1, 2))
                taylor = (m * g * a).sum((1, 2)).abs()
                for kind, v in (("forward", forward / forward.sum()), ("backward", backward / backward.max()),
                                ("taylor", taylor / taylor.max())):
                    sums[kind].setdefault(t, np.zeros((len(masks), len(v))))[k] += v.double().numpy()
    return sums, counts


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
    model = load_model(EXAMPLE)
    images = preprocess(load_images(scan_images(ROOT / "examples" / "data" / "calib").paths[:5], model.image_size),
                        model.preprocessing)
    return Example(model, TorchGraph(model.proto), observed_tensors(analyse(model.proto)), images)


def test_batched_rows_equal_one_image_one_category_at_a_time(example):
    settings = AttributionSettings(batch_size=3)  # image batches 3 + 2; gradient rows in chunks of 3
    ours = example.attribute(example.images, settings)
    expected, counts = reference(example.graph, example.images, example.tensors, settings)

    np.testing.assert_array_equal(ours.images_per_class, counts)
    assert counts.sum() > len(example.images), "several categories per image, so rows are spread over chunks"
    for kind, ours_sums in (("forward", ours.forward_sum), ("backward", ours.backward_sum),
                            ("taylor", ours.taylor_sum)):
        for t in example.tensors:
            present = counts > 0
            np.testing.assert_allclose(ours_sums[t], expected[kind].get(t, np.zeros_like(ours_sums[t])),
                                       rtol=1e-4, atol=1e-5, err_msg=f"{kind} {t}")
            assert np.all(ours_sums[t][~present] == 0)


def test_a_batch_without_confident_pixels_adds_nothing(example):
    settings = AttributionSettings(tau=0.999999)  # no pixel is that confident, so no (image, category) rows
    result = example.attribute(example.images[:2], settings)
    assert result.images == 2 and result.images_per_class.sum() == 0
    assert all(not result.backward_sum[t].any() and not result.forward_sum[t].any() for t in example.tensors)
    assert all(result.mean_sum[t].any() for t in example.tensors)  # channel means do not depend on the masks


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
