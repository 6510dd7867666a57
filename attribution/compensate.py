"""Compensation: new weights for the consumers of cut channels, so removal does not shift their outputs.

Pure removal drops each cut channel's contribution W[:, c] * x_c from every consumer. On compact models that shift
alone can collapse the output (shared/DESIGN.md). `mean` folds the expected contribution E[x_c] * sum_u W[:, c, u]
into the consumer's bias instead: exact when the channel is constant at its calibration mean and the consumer is 1x1;
for a kxk consumer with zero padding the fold assumes every tap sees the mean, which holds in the interior and
over-counts on the border band of (k-1)/2 pixels, where some taps read padding zeros.

Replacements are returned in the original shapes, keyed by (node index, input index); compiler.prune cuts them like the
original weights.
"""

from __future__ import annotations

import numpy as np
import onnx

from disasm.attribution.disassembler import Attribution
from disasm.compiler.channels import ChannelAnalysis

METHODS = ("none", "mean")


def _initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def mean_compensation(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                      attribution: Attribution) -> dict[tuple[int, int], np.ndarray]:
    """New biases (original shape) for every conv that reads cut channels: b' = b + sum_{c cut} E[x_c] * sum_u W[:, c, u]."""
    values = _initializer_values(model)
    nodes = list(model.graph.node)
    replacements: dict[tuple[int, int], np.ndarray] = {}
    for edit in analysis.edits:
        if edit.kind != "consume":
            continue
        kept = edit.channels.kept_indices(keep_sets)
        if kept.size == edit.channels.size:
            continue
        node = nodes[edit.node]
        tensor = node.input[0]
        if tensor not in attribution.mean_sum:
            raise ValueError(f"no calibration statistics for {tensor!r}, the input of {node.op_type} {node.name!r}")
        removed = np.setdiff1d(np.arange(edit.channels.size), kept)
        weight = values.get(node.input[1])
        if weight is None:
            raise ValueError(f"{node.op_type} {node.name!r}: weight {node.input[1]!r} is not a constant")
        mean = attribution.channel_mean(tensor)[removed]
        spatial = tuple(range(2, weight.ndim))
        per_input = weight.sum(axis=spatial)  # Conv: [out, in]; ConvTranspose: [in, out]
        delta = mean @ per_input[:, removed].T if edit.axis == 1 else mean @ per_input[removed, :]
        has_bias = len(node.input) > 2 and node.input[2]
        bias = values[node.input[2]] if has_bias else np.zeros(delta.shape[0], weight.dtype)
        replacements[(edit.node, 2)] = (bias + delta).astype(weight.dtype)
    return replacements
