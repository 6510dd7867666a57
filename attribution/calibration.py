"""One attribution run over a calibration set: which tensors it observes, the moments it gathers, its cache keys.

Shared by disasm-compile, the distributed runner and the benchmarks, so that all of them compute (and find in the
cache) exactly the same thing.
"""

from __future__ import annotations

import numpy as np

from disasm.attribution.cache import CacheKey
from disasm.attribution.disassembler import Attribution, AttributionSettings, attribute
from disasm.attribution.interpreter import TorchGraph
from disasm.attribution.moments import find_consumers
from disasm.compiler.channels import ChannelAnalysis
from disasm.compiler.load import Model


def observed_tensors(analysis: ChannelAnalysis) -> list[str]:
    """Tensors attribution must look at: the conv inputs of every group that could be cut."""
    names = {t for g in analysis.groups if g.prunable and g.id != analysis.class_group for t in g.observed}
    return [t for t in analysis.tensors if t in names]  # graph order, deterministic


def calibrate(model: Model, analysis: ChannelAnalysis, inputs: np.ndarray, settings: AttributionSettings,
              device: str, progress=None, moments: bool = False) -> Attribution:
    """Disassembler attribution for all categories, on the tensors the surgery could cut, and (for `lsq`
    compensation) the input moments of every conv that could lose input channels."""
    graph = TorchGraph(model.proto, device=device)
    consumers = find_consumers(model.proto, analysis) if moments else []
    return attribute(graph, inputs, observed_tensors(analysis), len(model.classes), model.output_kind, settings,
                     progress, consumers, model.class_axis)


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
