"""Channel analysis + surgery: a pruned model must equal the masked reference (shared/DESIGN.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from architectures import MiniDeepLab, export, randomise_batchnorm
from disasm.compiler.channels import analyse
from disasm.compiler.cost import model_cost
from disasm.compiler.prune import masked_reference, prune

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes_seg.onnx"


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def deeplab(tmp_path_factory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("deeplab") / "deeplab.onnx"
    export(randomise_batchnorm(MiniDeepLab()), path)
    return onnx.shape_inference.infer_shapes(onnx.load(str(path)))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)


def producers_group(analysis, name_part: str) -> int:
    return next(g.id for g in analysis.groups if any(name_part in p for p in g.producers))


def test_coupled_groups_follow_the_architecture(deeplab):
    analysis = analyse(deeplab)
    # residual partners share one channel space: the block's second conv and its projection shortcut
    assert producers_group(analysis, "/low/b/") == producers_group(analysis, "/low/short/")
    # squeeze-excite gates the depthwise output channel by channel: excite conv is coupled to the expand conv
    assert producers_group(analysis, "/high/high.1/excite") == producers_group(analysis, "/high/high.1/expand/")
    # the SE block's residual add ties its projection to the previous stage's output
    assert producers_group(analysis, "/high/high.1/project/") == producers_group(analysis, "/high/high.0/b/")
    # the fuse conv reads the ASPP concat: three segments from three distinct groups, in concat order
    fuse = next(n for n in deeplab.graph.node if n.op_type == "Conv" and "/fuse/" in n.name)
    segments = analysis.tensors[fuse.input[0]].segments
    assert [s.size for s in segments] == [16, 16, 16] and len({s.group for s in segments}) == 3
    # the model input is never cut, and the class head is its own group at depth 0
    assert analysis.groups[0].blocked == ["model input channels"]
    head = analysis.groups[analysis.class_group]
    assert head.size == 5 and head.depth == 0 and head.prunable


def test_keeping_everything_reproduces_the_original_exactly(deeplab, image):
    analysis = analyse(deeplab)
    pruned = prune(deeplab, analysis, {})
    np.testing.assert_array_equal(run(pruned, image), run(deeplab, image))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_keep_sets_equal_the_masked_reference(deeplab, image, data):
    analysis = analyse(deeplab)
    keep_sets = {}
    for g in analysis.groups:
        if g.prunable:
            keep = data.draw(st.lists(st.integers(0, g.size - 1), min_size=1, max_size=g.size, unique=True))
            keep_sets[g.id] = np.sort(np.array(keep))
    pruned = prune(deeplab, analysis, keep_sets)
    onnx.checker.check_model(pruned, full_check=True)
    reference = masked_reference(deeplab, analysis, keep_sets)
    classes = keep_sets[analysis.class_group]
    expected = run(reference, image)[:, classes]
    got = run(pruned, image)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert pruned.graph.output[0].type.tensor_type.shape.dim[1].dim_value == len(classes)


def test_cutting_half_the_channels_reduces_macs_and_params(deeplab):
    analysis = analyse(deeplab)
    keep_sets = {g.id: np.arange(max(1, g.size // 2)) for g in analysis.groups if g.prunable}
    before, after = model_cost(deeplab, (1, 3, 32, 32)), model_cost(prune(deeplab, analysis, keep_sets), (1, 3, 32, 32))
    assert after.macs < 0.5 * before.macs and after.params < 0.5 * before.params


def test_blocked_group_cannot_be_cut(deeplab):
    analysis = analyse(deeplab)
    with pytest.raises(ValueError, match="blocked"):
        prune(deeplab, analysis, {0: np.array([0, 1])})


def test_surgery_does_not_modify_its_input(deeplab):
    before = deeplab.SerializeToString()
    analysis = analyse(deeplab)
    prune(deeplab, analysis, {g.id: np.arange(1) for g in analysis.groups if g.prunable})
    assert deeplab.SerializeToString() == before


@pytest.mark.skipif(not EXAMPLE.exists(), reason="example model not built")
def test_example_model_prunes_exactly(image):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(EXAMPLE)))
    analysis = analyse(model)
    assert analysis.class_group is not None
    assert sum(g.prunable for g in analysis.groups) >= 15  # residual, SE, ASPP and decoder groups are all cuttable
    rng = np.random.default_rng(1)
    keep_sets = {g.id: np.sort(rng.choice(g.size, max(1, g.size // 3), replace=False))
                 for g in analysis.groups if g.prunable}
    x = rng.normal(size=(1, 3, 128, 128)).astype(np.float32)
    expected = run(masked_reference(model, analysis, keep_sets), x)[:, keep_sets[analysis.class_group]]
    np.testing.assert_allclose(run(prune(model, analysis, keep_sets), x), expected, atol=1e-4, rtol=1e-4)
