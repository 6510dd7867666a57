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

Which consumers are refitted: `lsq` needs a plain (group=1) 2-D Conv with moments; other consumers that read cut
channels get the mean fold, which holds for any linear map: grouped convs and ConvTranspose (per group), convs too
large for moments, and a squeeze-excite's Gemm (its means are read on the pooled map it flattens). A Gemm whose bias
is one number for all outputs, a MatMul, and consumers without calibration statistics lose the channels plainly.

Replacements are returned in the original shapes, keyed by (node index, input index); compiler.prune cuts them like the
original weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from disasm.attribution.disassembler import Attribution
from disasm.compiler.channels import ChannelAnalysis, ConvSpec, constant_value, conv_spec

METHODS = ("none", "mean", "lsq", "sequential")  # sequential: attribution.refit
DEFAULT_RIDGE = 1e-2


@dataclass(frozen=True)
class CutConsumer:
    """A consumer whose input loses channels, as the mean fold sees it: y = W x + b with W [out, in] the sum over
    kernel taps (zero between the groups of a grouped conv). `spec` describes convs; Gemms have none."""

    node: int                  # index in the graph's node list, as in the analysis edits
    name: str
    tensor: str                # its input
    sources: tuple[str, ...]   # its input, then the feature maps it is a reshape of: where channel means may be read
    kept: np.ndarray           # kept input channels, indices into the whole input tensor
    weights: np.ndarray        # [out, in]
    bias: np.ndarray           # [out], as added to the output (zeros where there is none)
    bias_shape: tuple[int, ...]
    bias_scale: float = 1.0    # what the node multiplies its bias input by (a Gemm's beta)
    spec: ConvSpec | None = None
    fixed_bias: bool = False   # it has no bias and its outputs are cut: a bias given to it would not be cut with them,
    #                            so its bias stays zero (the refit fits no intercept, nothing is folded)

    @property
    def plain(self) -> bool:
        """A group=1 Conv, the one kind the least-squares refit models exactly."""
        return self.spec is not None and self.spec.op == "Conv" and self.spec.group == 1


def cut_consumers(model: onnx.ModelProto, analysis: ChannelAnalysis,
                   keep_sets: dict[int, np.ndarray]) -> Iterator[CutConsumer]:
    """Every conv or Gemm whose input loses channels (a MatMul is only cut)."""
    graph = None
    for edit in analysis.edits:
        if edit.kind != "consume" or edit.channels.kept_indices(keep_sets).size == edit.channels.size:
            continue
        if graph is None:
            graph = gs.import_onnx(model)  # constants are read lazily: only the consumers' are decoded
        node = graph.nodes[edit.node]
        layout = analysis.tensors.get(node.inputs[0].name)
        if layout is None:
            continue
        kept = layout.kept_indices(keep_sets)
        consumer = _conv_consumer(edit.node, node, kept) if node.op in ("Conv", "ConvTranspose") else \
            _gemm_consumer(edit.node, node, kept) if node.op == "Gemm" else None
        if consumer is not None:
            yield _with_bias_rule(consumer, node, analysis, keep_sets)


def _with_bias_rule(consumer: CutConsumer, node: gs.Node, analysis: ChannelAnalysis,
                    keep_sets: dict[int, np.ndarray]) -> CutConsumer:
    out = analysis.tensors.get(node.outputs[0].name)
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    cut = out is not None and out.kept_indices(keep_sets).size < out.size
    return replace(consumer, fixed_bias=not has_bias and cut)


def consumer_at(graph: gs.Graph, index: int, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                kept: np.ndarray | None = None) -> CutConsumer | None:
    """The conv or Gemm graph.nodes[index] as a CutConsumer keeping the input channels `kept` (None: all of them),
    or None for other nodes and ones without constant weights."""
    node = graph.nodes[index]
    consumer = None
    if node.op in ("Conv", "ConvTranspose"):
        spec = conv_spec(node)
        consumer = None if spec is None else \
            _conv_consumer(index, node, np.arange(spec.in_channels) if kept is None else kept)
    elif node.op == "Gemm" and constant_value(node.inputs[1]) is not None:
        if kept is None:
            weight = np.asarray(constant_value(node.inputs[1]))
            kept = np.arange(weight.shape[1] if node.attrs.get("transB", 0) else weight.shape[0])  # K of A [M, K]
        consumer = _gemm_consumer(index, node, kept)
    return None if consumer is None else _with_bias_rule(consumer, node, analysis, keep_sets)


def _conv_consumer(index: int, node: gs.Node, kept: np.ndarray) -> CutConsumer | None:
    spec = conv_spec(node)
    if spec is None:
        return None
    bias = spec.bias if spec.bias is not None else np.zeros(spec.out_channels, spec.weight.dtype)
    return CutConsumer(index, node.name or node.outputs[0].name, node.inputs[0].name, (node.inputs[0].name,), kept,
                       input_weights(spec), bias, bias.shape, spec=spec)


def _gemm_consumer(index: int, node: gs.Node, kept: np.ndarray) -> CutConsumer | None:
    """Y = alpha A B' + beta C over the channels of A: W = alpha B'^T. A C that is one number for every output (or a
    beta of 0) cannot take a per-output fold: such a Gemm loses its channels plainly."""
    weight = np.asarray(constant_value(node.inputs[1]))
    weights = float(node.attrs.get("alpha", 1.0)) * (weight if node.attrs.get("transB", 0) else weight.T)
    beta = float(node.attrs.get("beta", 1.0))
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    c = np.asarray(constant_value(node.inputs[2])) if has_bias else np.zeros(weights.shape[0], weight.dtype)
    if beta == 0 or c.size != weights.shape[0]:
        return None
    sources = [node.inputs[0]]
    while sources[-1].inputs and sources[-1].inputs[0].op in ("Flatten", "Reshape", "Squeeze"):
        sources.append(sources[-1].inputs[0].inputs[0])  # GlobalAveragePool -> Flatten: the pooled map's means
    return CutConsumer(index, node.name or node.outputs[0].name, node.inputs[0].name, tuple(t.name for t in sources),
                       kept, weights, beta * c.reshape(-1), c.shape, beta)


def input_weights(spec: ConvSpec) -> np.ndarray:
    """[out, in] over all channels: the sum over kernel taps of the weights from each input to each output channel,
    zero between different groups."""
    taps = spec.weight.sum(axis=tuple(range(2, spec.weight.ndim)))  # Conv: [out, in/g]; ConvTranspose: [in, out/g]
    dense = np.zeros((spec.out_channels, spec.in_channels), np.float64)
    cin, cout = spec.in_channels // spec.group, spec.out_channels // spec.group
    for g in range(spec.group):
        block = taps[g * cout:(g + 1) * cout] if not spec.transpose else taps[g * cin:(g + 1) * cin].T
        dense[g * cout:(g + 1) * cout, g * cin:(g + 1) * cin] = block
    return dense


def _mean_bias(consumer: CutConsumer, attribution: Attribution) -> np.ndarray | None:
    """The bias input that adds sum_{c cut} E[x_c] * W[:, c] to the outputs (None without calibration statistics)."""
    channels = consumer.weights.shape[1]
    source = next((t for t in consumer.sources if t in attribution.mean_sum and
                   attribution.mean_sum[t].shape[-1] == channels), None)
    if source is None:
        return None
    removed = np.setdiff1d(np.arange(channels), consumer.kept)
    delta = consumer.weights[:, removed].astype(np.float64) @ attribution.channel_mean(source)[removed]
    bias = (consumer.bias + delta) / consumer.bias_scale
    return bias.reshape(consumer.bias_shape).astype(consumer.bias.dtype)


def mean_compensation(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                      attribution: Attribution) -> dict[tuple[int, int], np.ndarray]:
    """New biases (original shape) for every conv or Gemm that reads cut channels."""
    replacements = {}
    for consumer in cut_consumers(model, analysis, keep_sets):
        bias = None if consumer.fixed_bias else _mean_bias(consumer, attribution)
        if bias is not None:
            replacements[(consumer.node, 2)] = bias
    return replacements


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
    return refit_cross(theta, second_moment[np.ix_(kept, kept)], second_moment[kept], kept, ridge)


def refit_cross(theta: np.ndarray, kept_moment: np.ndarray, cross: np.ndarray, kept: np.ndarray,
                ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Theta'_K predicting the full consumer's output Theta z from other kept inputs z' (the sequential refit,
    attribution.refit): kept_moment = E[z' z'^T], cross = E[z' z^T], both with the trailing 1 (last row/column);
    `kept` (ending with the bias column, unless the bias must stay zero: then z' has no trailing 1) says which columns
    of Theta z' stands for. The anchor is the mean match:
    the kept columns, with the bias making E[Theta0 z'] = E[Theta z]. Where z' = z[kept] this is `refit`."""
    lam = ridge * float(np.mean(np.diag(kept_moment)))
    anchor = theta[:, kept].copy()
    if kept[-1] == theta.shape[1] - 1:  # with an intercept (else the fit keeps the bias at zero: no fold)
        anchor[:, -1] += theta @ cross[-1] - theta[:, kept] @ kept_moment[-1]
    rhs = theta @ cross.T + lam * anchor
    return np.linalg.solve(kept_moment + lam * np.eye(len(kept)), rhs.T).T


def reconstruction_error(theta_new: np.ndarray, theta: np.ndarray, second_moment: np.ndarray) -> float:
    """Mean squared error per output channel, over the calibration pixels, of a consumer with weights theta_new
    (removed columns zero) against the full consumer: tr(D S D^T) / O with D = theta_new - theta."""
    delta = theta_new - theta
    return float(np.einsum("oi,ij,oj->", delta, second_moment, delta)) / theta.shape[0]


def theta_matrix(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[W, b] of a plain conv as a matrix over its unfolded input patch plus 1 (channel-major, as in moments)."""
    return np.concatenate([weight.reshape(weight.shape[0], -1), bias[:, None]], axis=1).astype(np.float64)


def lsq_compensation(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                     attribution: Attribution, ridge: float = DEFAULT_RIDGE) -> tuple[dict[tuple[int, int], np.ndarray], list[str]]:
    """New weights and biases (original shapes) for every consumer that reads cut channels, and the names of the
    consumers that were not refitted (no moments, or not a plain group=1 Conv): they get the mean fold, or lose the
    channels plainly where there are no statistics to fold."""
    replacements: dict[tuple[int, int], np.ndarray] = {}
    fallbacks: list[str] = []
    for consumer in cut_consumers(model, analysis, keep_sets):
        moments = attribution.moments.get(consumer.node)
        if moments is None or not consumer.plain:
            bias = None if consumer.fixed_bias else _mean_bias(consumer, attribution)
            if bias is not None:
                replacements[(consumer.node, 2)] = bias
            fallbacks.append(consumer.name)
            continue
        weight = consumer.spec.weight
        second_moment = moments / moments[-1, -1]  # the last diagonal entry counts the pixels
        taps = int(np.prod(consumer.spec.kernel))
        features = weight.shape[1] * taps
        theta = theta_matrix(weight, consumer.bias)
        columns = kept_features(consumer.kept, taps, features)[:-1 if consumer.fixed_bias else None]
        new = theta.copy()
        new[:, columns] = refit(theta, second_moment, columns, ridge)
        replacements[(consumer.node, 1)] = new[:, :features].reshape(weight.shape).astype(weight.dtype)
        if not consumer.fixed_bias:
            replacements[(consumer.node, 2)] = new[:, features].astype(weight.dtype)
    return replacements, fallbacks


def consumer_losses(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                    attribution: Attribution, replacements: dict[tuple[int, int], np.ndarray] | None) -> dict[int, float]:
    """Per group: the largest share of a consumer's output energy, E||y||^2 over the calibration pixels, that the cut
    still loses after compensation (`replacements`; None = plain removal). Exact for plain convs with moments (the
    others are not measured); the groups it names are the fragile ones, where the cut changes what the next layer
    sees."""
    losses: dict[int, float] = {}
    replacements = replacements or {}
    for consumer in cut_consumers(model, analysis, keep_sets):
        moments = attribution.moments.get(consumer.node)
        if moments is None or not consumer.plain:
            continue
        second_moment = moments / moments[-1, -1]
        weight = consumer.spec.weight
        taps = int(np.prod(consumer.spec.kernel))
        features = weight.shape[1] * taps
        full = theta_matrix(weight, consumer.bias)
        new = theta_matrix(replacements.get((consumer.node, 1), weight), replacements.get((consumer.node, 2), consumer.bias))
        mask = np.zeros(features + 1)
        mask[kept_features(consumer.kept, taps, features)] = 1
        energy = float(np.einsum("oi,ij,oj->", full, second_moment, full)) / full.shape[0]
        loss = reconstruction_error(new * mask, full, second_moment) / max(energy, 1e-12)
        for seg in analysis.tensors[consumer.tensor].segments:
            keep = keep_sets.get(seg.group)
            if keep is not None and ((keep >= seg.start) & (keep < seg.stop)).sum() < seg.size:
                losses[seg.group] = max(losses.get(seg.group, 0.0), loss)
    return losses

