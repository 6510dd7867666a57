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
- disassembler+taylor (the default, chosen in benchmarks/results/frontier.md): per group, the mean of the
  Disassembler score and the Taylor score, each divided by its maximum over the group. With it the Disassembler sets
  the per-group counts and the mean picks the channels.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from disasm.attribution.disassembler import Attribution
from disasm.attribution.select import SelectionSettings, group_scores, scatter_to_groups
from disasm.compiler.channels import ChannelAnalysis, constant_value

CRITERIA = ("disassembler+taylor", "disassembler", "taylor", "l1", "magnitude", "random")


def _filter_l1(model: onnx.ModelProto, analysis: ChannelAnalysis) -> dict[int, np.ndarray]:
    """Per group, the L1 norm of the filters that produce each channel: read from the weight slices the surgery
    would make on the producers (Conv, ConvTranspose, Gemm), so grouped convs and groups that hold part of a
    producer's outputs are scored channel by channel; producers that share a channel add up."""
    graph = gs.import_onnx(model)  # weights are read lazily, only the producers'
    scores = {g.id: np.zeros(g.size) for g in analysis.groups}
    for edit in analysis.edits:
        node = graph.nodes[edit.node]
        if edit.kind != "slice" or edit.input != 1 or node.outputs[0].name not in analysis.tensors:
            continue
        if not any((node.name or node.op) in analysis.groups[s.group].producers for s in edit.channels.segments):
            continue  # a depthwise conv passes channels through: its filters are not what produces them
        w = np.abs(np.asarray(constant_value(node.inputs[1]), np.float64))
        per_out = w.sum(axis=tuple(a for a in range(w.ndim) if a != edit.axis))
        offset = 0
        for s in edit.channels.segments:
            scores[s.group][s.start:s.stop] += per_out[offset:offset + s.size]
            offset += s.size
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
    if criterion == "disassembler+taylor":
        parts = [criterion_scores(c, model, analysis, attribution, categories, settings, seed)
                 for c in ("disassembler", "taylor")]
        return {g: 0.5 * (_unit(parts[0][g]) + _unit(parts[1][g])) for g in parts[0] if g in parts[1]}
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {g.id: rng.random(g.size) for g in analysis.groups}
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def _unit(scores: np.ndarray) -> np.ndarray:
    top = float(np.max(scores)) if scores.size else 0.0
    return scores / top if top > 0 else np.zeros_like(scores, dtype=np.float64)
