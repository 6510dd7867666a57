"""Channel surgery is exact on real segmentation architectures, as each exporter writes them (shared/DESIGN.md,
"Correctness standard for the surgery").

Every architecture of tests/architectures.py is exported by the legacy exporter at opsets 13 and 17 and by the dynamo
exporter (opset 18); a few also with unfolded BatchNormalization nodes, and one net is built at opset 9. For each:
random keep-sets give a valid model (checker, strict shape inference, ONNX Runtime) equal to the masked reference on
the kept classes; keeping everything changes nothing; and the analysis finds the coupling the architecture implies,
and keeps whole (with a reason) what it cannot prove safe.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import architectures as A
from disasm.compiler.channels import ChannelAnalysis, analyse
from disasm.compiler.cost import model_cost
from disasm.compiler.prune import masked_reference, prune

CLASSES = 5
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"  # third-party models (shared/corpus/README.md), not part of the repository


@dataclass(frozen=True)
class Expected:
    """What the analysis must find, whichever exporter wrote the graph."""

    prunable: int                         # prunable groups, the class group included
    streams: list[int] = field(default_factory=list)  # sorted producer counts of groups that several convs open
    concats: list[list[int]] = field(default_factory=list)  # segment sizes of channel concats read by convs


ARCHITECTURES: dict[str, tuple[Callable[[], torch.nn.Module], Expected]] = {
    # layer1..3: each residual stream = first block's expand conv + its projection + second block's expand conv
    "deeplabv3": (A.DeepLabV3, Expected(23, [3, 3, 3], [[16, 16, 16, 16]])),
    "fcn": (A.FCN, Expected(18, [3, 3, 3])),
    # stem+SE excite+project; 2 residual projections; 2x SE expand+excite; high projections; cbr*scale; 2 classifiers
    "lraspp": (A.LRASPP, Expected(12, [2, 2, 2, 2, 2, 2, 3])),
    "unet": (A.UNet, Expected(11, [], [[16, 16], [8, 8]])),
    # high stream: stem, 2 block outputs, 2 compressions, final compression; low stream: to_low, 2 blocks, 2 downs
    "ddrnet": (A.DDRNet, Expected(9, [5, 6])),
    "nhwc": (lambda: A.NHWC(A.FCN()), Expected(18, [3, 3, 3])),
    "sigmoid": (lambda: A.SigmoidHead(A.UNet()), Expected(11, [], [[16, 16], [8, 8]])),
    "softmax": (lambda: A.SoftmaxHead(A.UNet()), Expected(10, [], [[16, 16], [8, 8]])),
    "split": (A.SplitNet, Expected(4, [], [[8, 8]])),
    "nonlocal": (A.NonLocal, Expected(2, [2])),
}
EXPORTERS = ("legacy13", "legacy17", "dynamo")
CASES = [(arch, exporter) for arch in ARCHITECTURES for exporter in EXPORTERS] + \
    [("deeplabv3", "legacy17-bn"), ("unet", "legacy17-bn"), ("split", "legacy13-bn"), ("opset9", "helper"),
     ("dynamic_slice", "helper")]
HELPER_BUILT = {"opset9": A.opset9_model, "dynamic_slice": A.dynamic_slice_model}
# Exporter-specific differences, each for a reason the analysis must respect. nonlocal/legacy: reshape(n, c, h, w)
# reads c from the stem's Shape at run time, so the stem is kept whole; at opset 13 shape inference also loses the
# rank after that Reshape, so nothing downstream (class head included) can be proved safe.
PRUNABLE_OVERRIDES = {("nonlocal", "legacy13"): 0, ("nonlocal", "legacy17"): 1}


@dataclass
class Case:
    model: onnx.ModelProto
    analysis: ChannelAnalysis
    image: np.ndarray
    full: np.ndarray  # the original model's output on `image`

    @property
    def class_axis(self) -> int:
        output = self.analysis.tensors.get(self.model.graph.output[0].name)
        return 1 if output is None else output.axis


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = session(model)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def build(arch: str, exporter: str, folder) -> onnx.ModelProto:
    if arch in HELPER_BUILT:
        return HELPER_BUILT[arch]()
    torch.manual_seed(0)
    module = A.randomise_batchnorm(ARCHITECTURES[arch][0]())
    path = folder / f"{arch}-{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            A.export(module, path, exporter="dynamo")
        else:
            A.export(module, path, opset=int(exporter[6:8]), keep_batchnorm=exporter.endswith("-bn"))
    return onnx.load(str(path))


@pytest.fixture(scope="session")
def cases(tmp_path_factory) -> Callable[[str, str], Case]:
    """Exports are made once per session, on first use."""
    folder = tmp_path_factory.mktemp("architectures")
    cache: dict[tuple[str, str], Case] = {}

    def get(arch: str, exporter: str) -> Case:
        if (arch, exporter) not in cache:
            model = onnx.shape_inference.infer_shapes(build(arch, exporter, folder))
            declared = model.graph.input[0].type.tensor_type.shape.dim
            dims = [d.dim_value or (2 if i == 0 else 16) for i, d in enumerate(declared)]  # batch 2 where symbolic
            image = np.random.default_rng(0).normal(size=dims).astype(np.float32)
            cache[arch, exporter] = Case(model, analyse(model), image, run(model, image))
        return cache[arch, exporter]

    return get


def group_of(analysis: ChannelAnalysis, tensor: str) -> set[int]:
    return {s.group for s in analysis.tensors[tensor].segments}


def first_conv_group(case: Case):
    conv = next(n for n in case.model.graph.node if n.op_type == "Conv")
    return case.analysis.groups[case.analysis.tensors[conv.output[0]].segments[0].group]


def feature_map_nodes(model: onnx.ModelProto, analysis: ChannelAnalysis, op: str):
    """Nodes of `op` whose inputs are all feature maps with a channel layout (residual/fusion adds, SE gates)."""
    for node in model.graph.node:
        if node.op_type == op and all(i in analysis.tensors for i in node.input):
            yield node


@pytest.mark.parametrize("arch,exporter", CASES)
def test_keeping_everything_reproduces_the_original_exactly(cases, arch, exporter):
    case = cases(arch, exporter)
    whole = {g.id: np.arange(g.size) for g in case.analysis.groups if g.prunable}
    pruned = prune(case.model, case.analysis, whole)
    np.testing.assert_array_equal(run(pruned, case.image), case.full)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_macs_are_counted_alike_for_every_exporter(cases, arch):
    """Static shape inference cannot follow every export (the legacy torch.chunk's run-time Split bounds, a Reshape
    whose target comes from Shape); the count then measures the missing shapes and must still agree."""
    macs = {e: model_cost(cases(arch, e).model, (1, *cases(arch, e).image.shape[1:])).macs for e in EXPORTERS}
    assert len(set(macs.values())) == 1, macs


@pytest.mark.parametrize("arch,exporter", CASES)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
          derandomize=True)
@given(data=st.data())
def test_random_keep_sets_equal_the_masked_reference(cases, arch, exporter, data):
    case = cases(arch, exporter)
    analysis = case.analysis
    keep_sets = {g.id: np.array(sorted(data.draw(st.sets(st.integers(0, g.size - 1), min_size=1),
                                                 label=f"group {g.id}"))) for g in analysis.groups if g.prunable}
    try:
        pruned = prune(case.model, analysis, keep_sets)
    except ValueError as e:  # a Split/Slice output would lose every channel: refused with a clear message
        assert "remove every channel" in str(e)
        assume(False)
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    expected = run(masked_reference(case.model, analysis, keep_sets), case.image)
    if analysis.class_group in keep_sets:
        expected = np.take(expected, keep_sets[analysis.class_group], axis=case.class_axis)
    got = run(pruned, case.image)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    declared = pruned.graph.output[0].type.tensor_type.shape.dim[case.class_axis]
    if case.model.graph.output[0].type.tensor_type.shape.dim[case.class_axis].HasField("dim_value"):
        assert declared.dim_value == expected.shape[case.class_axis]  # the declared output shape follows the cut


@pytest.mark.parametrize("arch,exporter", [c for c in CASES if c[0] not in HELPER_BUILT])
def test_coupling_follows_the_architecture(cases, arch, exporter):
    case = cases(arch, exporter)
    analysis, expected = case.analysis, ARCHITECTURES[arch][1]
    prunable = [g for g in analysis.groups if g.prunable]
    assert len(prunable) == PRUNABLE_OVERRIDES.get((arch, exporter), expected.prunable), \
        [(g.id, g.producers, g.blocked) for g in analysis.groups]
    if (arch, exporter) == ("nonlocal", "legacy13"):
        assert analysis.class_group is None
        return
    if (arch, exporter) not in PRUNABLE_OVERRIDES:
        streams = sorted(len(g.producers) for g in analysis.groups if len(g.producers) > 1)
        assert streams == expected.streams
    # residual adds, fusion adds and SE/attention gates: both operands are the same channel space
    for op in ("Add", "Mul"):
        for node in feature_map_nodes(case.model, analysis, op):
            layouts = [analysis.tensors[i] for i in node.input]
            assert all(lay == layouts[0] for lay in layouts), node.name
    read = [analysis.tensors.get(n.input[0]) for n in case.model.graph.node if n.op_type == "Conv"]
    concats = [[s.size for s in lay.segments] for lay in read if lay is not None and len(lay.segments) > 1]
    if (arch, exporter) not in PRUNABLE_OVERRIDES:
        assert concats == expected.concats
    # the class head: one group of the class count at depth 0, laid along the output's channel axis
    head = analysis.groups[analysis.class_group]
    output = analysis.tensors[case.model.graph.output[0].name]
    assert head.size == CLASSES and head.depth == 0 and output.segments[0].group == head.id
    assert head.prunable == (arch != "softmax")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_ddrnet_fusion_adds_unify_each_branch(cases, exporter):
    case = cases("ddrnet", exporter)
    streams = {len(g.producers): g for g in case.analysis.groups if len(g.producers) > 1}
    high, low = streams[6], streams[5]
    assert (high.size, low.size) == (8, 16) and high.prunable and low.prunable
    adds = list(feature_map_nodes(case.model, case.analysis, "Add"))
    # 2 residual adds + 2 fusion adds per branch, plus the final high-res fusion
    per_branch = [len([a for a in adds if group_of(case.analysis, a.output[0]) == {g.id}]) for g in (high, low)]
    assert per_branch == [5, 4]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lraspp_gate_and_classifier_sum(cases, exporter):
    case = cases("lraspp", exporter)
    analysis = case.analysis
    # the two classifier convs (low-res and high-res) are added: both open the class group
    assert len(analysis.groups[analysis.class_group].producers) == 2
    # depthwise convs pass their input's channels through and are resized with them (group attribute edit)
    assert sum(e.kind == "group" for e in analysis.edits) == 5


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_nhwc_model_is_not_blocked_by_its_transposes(cases, exporter):
    case = cases("nhwc", exporter)
    analysis = case.analysis
    image = analysis.tensors[case.model.graph.input[0].name]
    assert image.axis == 3 and image.size == 3
    assert [g.id for g in analysis.groups if not g.prunable] == [image.segments[0].group]
    assert case.class_axis == 3
    keep = {analysis.class_group: np.array([1, 3])}
    assert run(prune(case.model, analysis, keep), case.image).shape == case.full.shape[:3] + (2,)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_sigmoid_head_slices_classes_and_softmax_head_does_not(cases, exporter):
    sigmoid, softmax = cases("sigmoid", exporter), cases("softmax", exporter)
    keep = np.array([0, 2, 4])
    pruned = run(prune(sigmoid.model, sigmoid.analysis, {sigmoid.analysis.class_group: keep}), sigmoid.image)
    np.testing.assert_allclose(pruned, sigmoid.full[:, keep], atol=1e-6)  # sigmoid is per class
    head = softmax.analysis.groups[softmax.analysis.class_group]
    assert not head.prunable and "normalises over the channel axis" in head.blocked[0]
    with pytest.raises(ValueError, match="blocked"):
        prune(softmax.model, softmax.analysis, {head.id: keep})


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_reshape_and_matmul_over_channels_keep_their_groups_whole(cases, exporter):
    case = cases("nonlocal", exporter)
    analysis = case.analysis
    blocked = [g for g in analysis.groups if g.producers and not g.prunable]
    # query and value convs feed Reshape -> MatMul: their channels are mixed in a way no rule follows
    reshaped = [g for g in blocked if any("Reshape" in r for r in g.blocked)]
    assert len(reshaped) >= 2
    if exporter.startswith("legacy"):
        # reshape(n, c, h, w) takes c from the stem's Shape at run time: cutting the stem would break it
        stem = first_conv_group(case)
        assert not stem.prunable and any("channel count read at run time" in r for r in stem.blocked)


@pytest.mark.parametrize("exporter", EXPORTERS + ("legacy13-bn",))
def test_channel_split_is_cut_per_part(cases, exporter):
    case = cases("split", exporter)
    analysis = case.analysis
    stem = first_conv_group(case)
    assert stem.prunable
    if exporter == "dynamo":  # torch.chunk -> Split with constant sizes: each part keeps its own kept channels
        assert any(e.kind == "split" for e in analysis.edits)
    else:  # the legacy exporter computes chunk bounds from Shape at run time; the channel count is static, so the
        # bounds are too: the surgery writes the new ones as constants
        computed = [e for e in analysis.edits if e.kind == "slice_bounds" and e.bounds is not None]
        assert sorted(e.bounds for e in computed) == [((0,), (8,)), ((8,), (16,))]
        keep = {stem.id: np.array([0, 3, 9, 10, 11])}
        pruned = prune(case.model, analysis, keep)
        assert not any(n.op_type == "Div" for n in pruned.graph.node)  # the run-time bound arithmetic is gone
        expected = run(masked_reference(case.model, analysis, keep), case.image)
        np.testing.assert_allclose(run(pruned, case.image), expected, atol=1e-4, rtol=1e-4)


def test_dynamic_channel_slice_keeps_its_group_whole(cases):
    """A Slice whose channel bound is read from a dynamic dim (here the image height) cannot be cut."""
    analysis = cases("dynamic_slice", "helper").analysis
    conv = analysis.groups[analysis.tensors["features"].segments[0].group]
    assert conv.blocked == ["Slice 'slice' has dynamic bounds"]
    assert analysis.groups[analysis.class_group].prunable


def test_unfolded_batchnorm_and_prelu_constants_do_not_block(cases):
    """Without constant folding, BN stays a node and PRelu slopes come through Unsqueeze: both are per channel."""
    for arch in ("deeplabv3", "unet"):
        folded, unfolded = cases(arch, "legacy17"), cases(arch, "legacy17-bn")
        assert any(n.op_type == "BatchNormalization" for n in unfolded.model.graph.node)
        assert sum(g.prunable for g in unfolded.analysis.groups) == sum(g.prunable for g in folded.analysis.groups)


def test_opset9_attribute_forms(cases):
    case = cases("opset9", "helper")
    analysis = case.analysis
    assert {n.op_type for n in case.model.graph.node} >= {"Upsample", "Split", "Slice", "Clip", "BatchNormalization"}
    conv1 = analysis.tensors["c1"].segments[0].group
    assert analysis.tensors["c3"].segments[0].group == conv1  # coupled through the Add after Upsample
    assert [s.size for s in analysis.tensors["cat"].segments] == [4, 4]
    assert [s.size for s in analysis.tensors["sl"].segments] == [4, 2]
    keep = {conv1: np.array([0, 2, 5, 7]), analysis.class_group: np.array([1, 2])}
    pruned = prune(case.model, analysis, keep)
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    assert list(onnx.helper.get_attribute_value(next(a for a in split.attribute if a.name == "split"))) == [2, 2]
    expected = run(masked_reference(case.model, analysis, keep), case.image)[:, [1, 2]]
    np.testing.assert_allclose(run(pruned, case.image), expected, atol=1e-4, rtol=1e-4)


def test_run_time_channel_count_used_elsewhere_blocks_its_group():
    """A crop on the height axis whose bound is another tensor's channel count (read by Shape) would change with the
    cut: that tensor's group must stay whole. The conv that is only cropped stays prunable."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"wa": rng.normal(size=(6, 3, 1, 1)).astype(np.float32),
              "wb": rng.normal(size=(8, 3, 1, 1)).astype(np.float32),
              "wh": rng.normal(size=(2, 8, 1, 1)).astype(np.float32),
              "one": np.array([1], np.int64), "zero": np.array([0], np.int64), "two": np.array([2], np.int64)}
    nodes = [helper.make_node("Conv", ["image", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["image", "wb"], ["b"], name="conv_b"),
             helper.make_node("Shape", ["a"], ["shape_a"], name="shape_a"),
             helper.make_node("Slice", ["shape_a", "one", "two"], ["channels_a"], name="channels_a"),
             helper.make_node("Slice", ["b", "zero", "channels_a", "two"], ["crop"], name="crop"),
             helper.make_node("Conv", ["crop", "wh"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "crop", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                                                            [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                                                ir_version=7))
    analysis = analyse(model)
    a, b = (analysis.groups[analysis.tensors[t].segments[0].group] for t in ("a", "b"))
    assert not a.prunable and "read a channel count at run time" in a.blocked[0]
    assert b.prunable


@pytest.mark.parametrize("arch,exporter", CASES)
def test_interpreter_matches_onnxruntime(cases, arch, exporter):
    """Attribution runs these models in PyTorch: the interpreter must compute what ONNX Runtime computes."""
    from disasm.attribution.interpreter import TorchGraph

    case = cases(arch, exporter)
    graph = TorchGraph(case.model)
    with torch.no_grad():
        out = graph.run({graph.input_names[0]: torch.from_numpy(case.image)})[graph.output_names[0]]
    np.testing.assert_allclose(out.numpy(), case.full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,exporter", CASES)
def test_tensorrt_builds_the_pruned_model(cases, arch, exporter):
    """TensorRT(-RTX) parses every pruned graph and builds an SM86 engine ahead of time, on this CPU-only machine."""
    tensorrt = pytest.importorskip("disasm.runtime.tensorrt")
    if tensorrt.trt_module() is None or tensorrt.trt_module().__name__ != "tensorrt_rtx":
        pytest.skip("needs tensorrt_rtx (the trt extra) to build for SM86 without a GPU")
    case = cases(arch, exporter)
    rng = np.random.default_rng(0)
    keep_sets = {g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
                 for g in case.analysis.groups if g.prunable}
    pruned = prune(case.model, case.analysis, keep_sets)
    build = tensorrt.build_engine(pruned.SerializeToString(), "sm86",
                                  input_shapes={case.model.graph.input[0].name: case.image.shape})
    assert build.serialized and build.target == "sm86"


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_softmax_head_keeps_chosen_classes_by_a_gather_exactly(cases, exporter):
    """The class conv under a Softmax cannot be sliced; the chosen classes are gathered after it instead, and the
    pruned model still equals the masked reference on them."""
    case = cases("softmax", exporter)
    analysis = case.analysis
    assert not analysis.groups[analysis.class_group].prunable
    rng = np.random.default_rng(0)
    keep_sets = {g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
                 for g in analysis.groups if g.prunable}
    classes = np.array([0, 2, 3])
    pruned = prune(case.model, analysis, keep_sets, output_keep=classes, output_axis=case.class_axis)
    onnx.checker.check_model(pruned, full_check=True)
    expected = np.take(run(masked_reference(case.model, analysis, keep_sets), case.image), classes, axis=case.class_axis)
    np.testing.assert_allclose(run(pruned, case.image), expected, atol=1e-4, rtol=1e-4)


def corpus_names() -> list[str]:
    if not (CORPUS / "corpus.json").exists():
        return []
    return [entry["name"] for entry in json.loads((CORPUS / "corpus.json").read_text())["models"]]


def corpus_image(model, rng: np.random.Generator) -> np.ndarray:
    """One random image as the model takes it: pixels in 0..255, normalised by its mean/std, in its layout; dynamic
    sizes become 16k+1 (what stride-16 models like BodyPix want)."""
    pre = model.preprocessing
    h, w = model.image_size or (257, 257)
    pixels = rng.uniform(0, 255, size=(1, h, w, pre.channels))
    x = ((pixels - np.array(pre.mean)) / np.array(pre.std)).astype(np.float32)
    return x if pre.layout == "nhwc" else x.transpose(0, 3, 1, 2).copy()


@pytest.mark.skipif(not corpus_names(), reason="no model corpus at ../shared/corpus")
@pytest.mark.parametrize("name", corpus_names())
def test_corpus_model_prunes_exactly(name):
    """Every third-party model, loaded as disasm-compile loads it: a random keep-set over its cuttable groups gives
    a valid model equal to the masked reference (on the kept classes)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from corpus_models import corpus_entries, load_corpus_model

    model = load_corpus_model(CORPUS, next(e for e in corpus_entries(CORPUS) if e["name"] == name))
    analysis = analyse(model.proto)
    assert any(g.prunable for g in analysis.groups if g.id != analysis.class_group)
    rng = np.random.default_rng(0)
    x = corpus_image(model, rng)
    for _ in range(5):  # a keep-set that empties a Split/Slice output is refused: draw again
        keep_sets = {g.id: np.sort(rng.choice(g.size, rng.integers(1, g.size + 1), replace=False))
                     for g in analysis.groups if g.prunable}
        try:
            pruned = prune(model.proto, analysis, keep_sets)
            break
        except ValueError as e:
            assert "remove every channel" in str(e)
    onnx.checker.check_model(pruned, full_check=True)
    expected = run(masked_reference(model.proto, analysis, keep_sets), x)
    if analysis.class_group in keep_sets:
        expected = np.take(expected, keep_sets[analysis.class_group], axis=model.class_axis)
    got = run(pruned, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
