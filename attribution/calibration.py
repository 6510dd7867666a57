"""One attribution run over a calibration set: which tensors it observes, the moments it gathers, its cache keys.

Shared by disasm-compile, the distributed runner and the benchmarks, so that all of them compute (and find in the
cache) exactly the same thing.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from disasm.attribution.cache import CacheKey
from disasm.attribution.disassembler import Attribution, AttributionSettings, attribute
from disasm.attribution.interpreter import TorchGraph
from disasm.attribution.moments import find_consumers
from disasm.compiler.channels import ChannelAnalysis
from disasm.compiler.errors import DisasmError
from disasm.compiler.load import Model


def observed_tensors(analysis: ChannelAnalysis) -> list[str]:
    """Tensors attribution must look at: the conv inputs of every group that could be cut."""
    names = {t for g in analysis.groups if g.prunable and g.id != analysis.class_group for t in g.observed}
    return [t for t in analysis.tensors if t in names]  # graph order, deterministic


def attribution_graph(model: Model) -> tuple[onnx.ModelProto, str]:
    """The graph attribution runs and what its output holds (disassembler.OUTPUT_KINDS): the model with its final
    Softmax/Sigmoid over the classes (model.activation) replaced by an Identity, so that the output is the logits, in
    output coordinates, and saturated probabilities cannot poison the gradients; the masks take the softmax/sigmoid
    of those logits. (Where a Resize follows that activation, the masks are then thresholded on resized logits'
    probabilities rather than on resized probabilities: the same up to interpolation.) A model without such a node
    is run as it is, under its own output kind."""
    if model.activation is None:
        return model.proto, model.output_kind
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    nodes = [n for n in proto.graph.node if model.activation in n.output]
    if len(nodes) != 1 or nodes[0].op_type not in ("Softmax", "Sigmoid"):
        raise DisasmError(f"{model.path}: the final activation {model.activation!r} is not the output of one "
                          f"Softmax/Sigmoid node")
    node = nodes[0]
    node.CopyFrom(onnx.helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name))
    return proto, "sigmoid-logits" if model.output_kind == "sigmoid" else "logits"


def calibrate(model: Model, analysis: ChannelAnalysis, inputs: np.ndarray, settings: AttributionSettings,
              device: str, progress=None, moments: bool = False,
              gather: Callable[[np.ndarray], np.ndarray] | None = None, check: bool = True) -> Attribution:
    """Disassembler attribution for all categories, on the tensors the surgery could cut, and (for `lsq`
    compensation) the input moments of every conv that could lose input channels. Back-propagates from the logits
    (attribution_graph). `gather` and `check`: see disassembler.attribute (a distributed run passes a sum over its
    processes and checks finiteness after reducing the shards)."""
    proto, output_kind = attribution_graph(model)
    graph = TorchGraph(proto, device=device)
    consumers = find_consumers(model.proto, analysis) if moments else []
    return attribute(graph, inputs, observed_tensors(analysis), len(model.classes), output_kind, settings,
                     progress, consumers, model.class_axis, gather=gather, check=check, classes=model.classes)


def cache_keys(model: Model, analysis: ChannelAnalysis, images_sha256: str, settings: AttributionSettings,
               moments: bool) -> list[CacheKey]:
    """Cache entries that can serve a run, best first: a run without moments can also use one with them. The key
    for storing a fresh run is keys[0]."""
    scored = {k: v for k, v in settings.to_dict().items() if k != "batch_size"}  # batching does not change the sums
    tensors = tuple(observed_tensors(analysis))
    with_moments = CacheKey(model.sha256, images_sha256, scored, tensors,
                            tuple(c.node for c in find_consumers(model.proto, analysis)))
    plain = CacheKey(model.sha256, images_sha256, scored, tensors, ())
    return [with_moments] if moments else [plain, with_moments]
