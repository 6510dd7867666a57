"""Compensation: new weights for the consumers of cut channels, so removal does not shift their outputs.

Pure removal drops each cut channel's contribution W[:, c] * x_c from every consumer. On compact models that shift
alone can collapse the output (shared/DESIGN.md). `mean` folds the expected contribution E[x_c] * sum_u W[:, c, u]
into the consumer's bias instead: exact when the channel is constant at its calibration mean and the consumer is 1x1;
for a kxk consumer with zero padding the fold assumes every tap sees the mean, which holds in the interior and
over-counts on the border band of (k-1)/2 pixels, where some taps read padding zeros.

`lsq` refits each consumer in closed form: with z the unfolded input patch plus a constant 1 and Theta = [W, b], it
chooses the kept columns Theta'_K minimising  E||Theta'_K z_K - Theta z||^2 + lam ||Theta'_K - Theta0_K||^2  over the
calibration pixels, i.e. it predicts the full model's consumer output from the kept inputs, regularised towards the
original kept weights with the mean fold in the bias (Theta0; lam = ridge * mean diagonal of the kept moments):
    Theta'_K = (Theta S[:, K] + lam Theta0_K) (S[K, K] + lam I)^-1,   S = E[z z^T]  (attribution.moments).
Anchoring at the mean fold rather than at Theta itself makes the refit never worse than `mean` on the calibration
data (the mean fold is a feasible point with no penalty), and on a handful of samples (a squeeze-excite conv sees
one pixel per image) it stays close to it. Keeping everything returns Theta. Consumers without moments (too large,
or ConvTranspose) fall back to `mean`.

Replacements are returned in the original shapes, keyed by (node index, input index); compiler.prune cuts them like the
original weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from disasm.attribution.disassembler import Attribution
from disasm.compiler.channels import ChannelAnalysis

METHODS = ("none", "mean", "lsq")
DEFAULT_RIDGE = 1e-2


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values by name, not yet decoded: only the consumers' weights are ever read."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensors[node.output[0]] = attr.t
    return tensors


def _cut_consumers(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray]):
    """(edit, node, kept input channels, weight, bias) of every conv whose input loses channels."""
    tensors = _constant_tensors(model)
    for edit in analysis.edits:
        if edit.kind != "consume":
            continue
        kept = edit.channels.kept_indices(keep_sets)
        if kept.size == edit.channels.size:
            continue
        node = model.graph.node[edit.node]
        if node.input[1] not in tensors:
            raise ValueError(f"{node.op_type} {node.name!r}: weight {node.input[1]!r} is not a constant")
        weight = numpy_helper.to_array(tensors[node.input[1]])
        out_channels = weight.shape[0] if edit.axis == 1 else weight.shape[1]
        has_bias = len(node.input) > 2 and node.input[2]
        bias = numpy_helper.to_array(tensors[node.input[2]]) if has_bias else np.zeros(out_channels, weight.dtype)
        yield edit, node, kept, weight, bias


def _mean_bias(edit, node, kept: np.ndarray, weight: np.ndarray, bias: np.ndarray, attribution: Attribution) -> np.ndarray:
    """b + sum_{c cut} E[x_c] * sum_u W[:, c, u]."""
    if node.input[0] not in attribution.mean_sum:
        raise ValueError(f"no calibration statistics for {node.input[0]!r}, the input of {node.op_type} {node.name!r}")
    removed = np.setdiff1d(np.arange(edit.channels.size), kept)
    mean = attribution.channel_mean(node.input[0])[removed]
    per_input = weight.sum(axis=tuple(range(2, weight.ndim)))  # Conv: [out, in]; ConvTranspose: [in, out]
    delta = mean @ per_input[:, removed].T if edit.axis == 1 else mean @ per_input[removed, :]
    return (bias + delta).astype(weight.dtype)


def mean_compensation(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                      attribution: Attribution) -> dict[tuple[int, int], np.ndarray]:
    """New biases (original shape) for every conv that reads cut channels."""
    return {(edit.node, 2): _mean_bias(edit, node, kept, weight, bias, attribution)
            for edit, node, kept, weight, bias in _cut_consumers(model, analysis, keep_sets)}


def kept_features(kept_channels: np.ndarray, kernel_size: int, features: int) -> np.ndarray:
    """Indices into [z; 1] of the kept channels' patch entries (z is channel-major: c * k*k + tap) and the bias."""
    taps = (kept_channels[:, None] * kernel_size + np.arange(kernel_size)[None, :]).ravel()
    return np.concatenate([taps, [features]])


def mean_fold(theta: np.ndarray, second_moment: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Theta0_K: the kept columns, with the removed features' expected contribution folded into the bias column (the
    last one). The expectations E[z_f] = S[-1, f] are per patch entry, so zero padding at borders is accounted for."""
    removed = np.setdiff1d(np.arange(theta.shape[1]), kept)
    anchor = theta[:, kept].copy()
    anchor[:, -1] += theta[:, removed] @ second_moment[-1, removed]
    return anchor


def refit(theta: np.ndarray, second_moment: np.ndarray, kept: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Theta'_K: the ridge least-squares refit of the kept columns (`kept` ends with the bias column)."""
    sub = second_moment[np.ix_(kept, kept)]
    lam = ridge * float(np.mean(np.diag(sub)))
    rhs = theta @ second_moment[:, kept] + lam * mean_fold(theta, second_moment, kept)
    return np.linalg.solve(sub + lam * np.eye(len(kept)), rhs.T).T


def reconstruction_error(theta_new: np.ndarray, theta: np.ndarray, second_moment: np.ndarray) -> float:
    """Mean squared error per output channel, over the calibration pixels, of a consumer with weights theta_new
    (removed columns zero) against the full consumer: tr(D S D^T) / O with D = theta_new - theta."""
    delta = theta_new - theta
    return float(np.einsum("oi,ij,oj->", delta, second_moment, delta)) / theta.shape[0]


def lsq_compensation(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                     attribution: Attribution, ridge: float = DEFAULT_RIDGE) -> tuple[dict[tuple[int, int], np.ndarray], list[str]]:
    """New weights and biases (original shapes) for every conv that reads cut channels, and the names of the
    consumers that fell back to mean compensation for lack of moments."""
    replacements: dict[tuple[int, int], np.ndarray] = {}
    fallbacks: list[str] = []
    for edit, node, kept, weight, bias in _cut_consumers(model, analysis, keep_sets):
        moments = attribution.moments.get(edit.node)
        if moments is None or node.op_type != "Conv":
            replacements[(edit.node, 2)] = _mean_bias(edit, node, kept, weight, bias, attribution)
            fallbacks.append(node.name or node.output[0])
            continue
        second_moment = moments / moments[-1, -1]  # the last diagonal entry counts the pixels
        taps = int(np.prod(weight.shape[2:]))
        features = weight.shape[1] * taps
        theta = np.concatenate([weight.reshape(weight.shape[0], features), bias[:, None]], axis=1).astype(np.float64)
        columns = kept_features(kept, taps, features)
        new = theta.copy()
        new[:, columns] = refit(theta, second_moment, columns, ridge)
        replacements[(edit.node, 1)] = new[:, :features].reshape(weight.shape).astype(weight.dtype)
        replacements[(edit.node, 2)] = new[:, features].astype(weight.dtype)
    return replacements, fallbacks


def consumer_losses(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                    attribution: Attribution, replacements: dict[tuple[int, int], np.ndarray] | None) -> dict[int, float]:
    """Per group: the largest share of a consumer's output energy, E||y||^2 over the calibration pixels, that the cut
    still loses after compensation (`replacements`; None = plain removal). Exact for consumers with moments; the
    groups it names are the fragile ones, where the cut changes what the next layer sees."""
    losses: dict[int, float] = {}
    replacements = replacements or {}
    for edit, node, kept, weight, bias in _cut_consumers(model, analysis, keep_sets):
        moments = attribution.moments.get(edit.node)
        if moments is None or node.op_type != "Conv":
            continue
        second_moment = moments / moments[-1, -1]
        taps = int(np.prod(weight.shape[2:]))
        features = weight.shape[1] * taps

        def theta(w: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.concatenate([w.reshape(w.shape[0], features), b[:, None]], axis=1).astype(np.float64)

        full = theta(weight, bias)
        new = theta(replacements.get((edit.node, 1), weight), replacements.get((edit.node, 2), bias))
        mask = np.zeros(features + 1)
        mask[kept_features(kept, taps, features)] = 1
        energy = float(np.einsum("oi,ij,oj->", full, second_moment, full)) / full.shape[0]
        loss = reconstruction_error(new * mask, full, second_moment) / max(energy, 1e-12)
        for seg in edit.channels.segments:
            keep = keep_sets.get(seg.group)
            if keep is not None and ((keep >= seg.start) & (keep < seg.stop)).sum() < seg.size:
                losses[seg.group] = max(losses.get(seg.group, 0.0), loss)
    return losses
