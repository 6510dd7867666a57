"""Baseline channel criteria, for comparing the Disassembler with common pruning scores at an equal channel budget.

Each criterion maps to a [size] score per channel group (higher = keep); attribution.select.select_with_budget then
keeps, in every group the Disassembler cut, the same number of channels by that score, so MACs are equal and only the
choice of channels differs.
- l1: L1 norm of each output filter of the group's producer convs (Li et al. 2017), summed over coupled producers.
- magnitude: mean activation of the channel over all calibration pixels, read where convs consume it. It stands in for
  BN-scale criteria (network slimming), which exported models no longer have because BN is folded into the convs.
- taylor: |activation x gradient| of the target categories' masked logit (Molchanov et al. 2017), from the same
  backward passes as the Disassembler.
- random: uniform, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from disasm.attribution.disassembler import Attribution
from disasm.attribution.select import SelectionSettings, group_scores, scatter_to_groups
from disasm.compiler.channels import ChannelAnalysis

CRITERIA = ("disassembler", "taylor", "l1", "magnitude", "random")


def _filter_l1(model: onnx.ModelProto, analysis: ChannelAnalysis) -> dict[int, np.ndarray]:
    weights = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node if n.name}
    scores: dict[int, np.ndarray] = {}
    for group in analysis.groups:
        total = np.zeros(group.size)
        for producer in group.producers:
            node = by_name.get(producer)
            if node is None or node.input[1] not in weights:
                continue
            w = np.abs(numpy_helper.to_array(weights[node.input[1]]))
            # Conv weights are [out, in/group, k...]; ConvTranspose weights [in, out/group, k...]
            out_axis = 0 if node.op_type == "Conv" else 1
            per_out = w.sum(axis=tuple(a for a in range(w.ndim) if a != out_axis))
            if per_out.size == group.size:
                total += per_out
        scores[group.id] = total
    return scores


def _per_category(attribution: Attribution, sums: dict[str, np.ndarray], categories: list[int]) -> dict[str, np.ndarray]:
    counts = np.maximum(attribution.images_per_class, 1)[:, None]
    return {t: (sums[t] / counts)[categories].max(axis=0) for t in attribution.tensors}


def criterion_scores(criterion: str, model: onnx.ModelProto, analysis: ChannelAnalysis, attribution: Attribution,
                     categories: list[int], settings: SelectionSettings, seed: int = 0) -> dict[int, np.ndarray]:
    if criterion == "disassembler":
        return group_scores(attribution, analysis, categories, settings)
    if criterion == "taylor":
        return scatter_to_groups(analysis, _per_category(attribution, attribution.taylor_sum, categories))
    if criterion == "magnitude":
        return scatter_to_groups(analysis, {t: np.abs(attribution.channel_mean(t)) for t in attribution.tensors})
    if criterion == "l1":
        return _filter_l1(model, analysis)
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {g.id: rng.random(g.size) for g in analysis.groups}
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
