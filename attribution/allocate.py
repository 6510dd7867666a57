"""Global allocation: how many channels each group keeps, decided across groups by the reconstruction loss a cut
costs per MAC it saves, instead of one score threshold for every group.

The threshold rule (attribution.select) keeps, in every group, the channels whose max-normalised score exceeds
alpha: each group loses the same *relative* relevance, whatever the cut costs downstream. Here the channels of each
group are still taken best score first, but the number kept is chosen globally:

- loss curve of a group: for every consumer conv that reads it (plain, with input moments), the share of its output
  variance E||y - E[y]||^2 that the best least-squares refit from the kept inputs still misses, when the group keeps its top
  k channels (and everything else is kept). With S = E[z z^T] (attribution.moments) reordered so that the always-kept
  entries (bias, other groups' channels) come first and the group's channels follow best first (all kernel taps of a
  channel together), and S = L L^T (Cholesky), the explained energy of a prefix of p entries is the sum of the first p
  squared column norms of Theta L: one factorisation gives the loss of every k. A group's loss is the sum over its
  consumers.
- cost: MACs of every Conv/ConvTranspose/Gemm/MatMul scale with the kept fractions of the channels they read and
  write (a grouped conv only with its outputs'), so MACs(keep-sets) is a sum of products of kept fractions
  (`MacModel`), exact for the surgery's cuts.
- greedy: starting from every group whole, repeatedly make the cut (to any multiple of the group's rounding unit,
  SelectionSettings.unit, below the current count) with the least added loss per MAC saved, until the model is at
  most `macs_target` of the full MACs.

Groups read by any consumer without moments (a grouped conv, a Gemm, a MatMul, a conv too large for moments) have no
measured loss: cutting them can cost anything downstream. They stay whole (or, when asked, keep the count the
threshold rule gives them at `fallback_alpha`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from disasm.attribution.compensate import theta_matrix
from disasm.attribution.disassembler import Attribution
from disasm.attribution.select import GroupChoice, SelectionSettings, select_channels
from disasm.compiler.channels import ChannelAnalysis, conv_spec
from disasm.compiler.cost import conv_macs

JITTER = 1e-7  # relative diagonal added before the Cholesky factorisation (moments of few pixels are singular)


@dataclass(frozen=True)
class _Term:
    macs: float
    tensors: tuple[str, ...]   # the layouts whose kept fractions multiply this node's MACs


@dataclass
class MacModel:
    """MACs of the pruned model as a function of its keep-sets: sum over layers of full MACs x kept fractions."""

    total: float
    terms: list[_Term]

    def macs(self, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray]) -> float:
        fractions: dict[str, float] = {}
        total = 0.0
        for term in self.terms:
            value = term.macs
            for t in term.tensors:
                if t not in fractions:
                    lay = analysis.tensors[t]
                    fractions[t] = lay.kept_indices(keep_sets).size / lay.size
                value *= fractions[t]
            total += value
        return total


def mac_model(model: onnx.ModelProto, analysis: ChannelAnalysis, input_shape: tuple[int, ...]) -> MacModel:
    """The MacModel of `model` at `input_shape` (batch 1): conv_macs per layer, and which of its input and output
    channel layouts its cost scales with: both, except where the cut changes the conv's group count (depthwise
    convs: whole groups go, each group's width stays), only the output's."""
    import onnx_graphsurgeon as gs

    per_node = conv_macs(model, input_shape)
    graph = gs.import_onnx(model)
    regrouped = {e.node for e in analysis.edits if e.kind == "group"}  # the group count follows the cut
    terms = []
    for index, node in enumerate(graph.nodes):
        key = node.name or node.outputs[0].name
        if key not in per_node:
            continue
        inp, out = node.inputs[0].name, node.outputs[0].name
        tensors = [out] if out in analysis.tensors else []
        if inp in analysis.tensors and index not in regrouped:
            tensors.append(inp)
        terms.append(_Term(float(per_node[key]), tuple(tensors)))
    return MacModel(float(sum(per_node.values())), terms)


@dataclass
class LossCurves:
    """Per group: loss[k] for keeping its k best channels (k = 0..size), and whether any consumer measured it."""

    loss: dict[int, np.ndarray] = field(default_factory=dict)
    consumers: dict[int, list[str]] = field(default_factory=dict)   # consumers whose loss is counted
    unmeasured: dict[int, list[str]] = field(default_factory=dict)  # consumers without moments (grouped, Gemm, ...)

    def measured(self, group: int) -> bool:
        """Whether the curve covers every consumer of the group."""
        return bool(self.consumers.get(group)) and not self.unmeasured.get(group)


def loss_curves(model: onnx.ModelProto, analysis: ChannelAnalysis, attribution: Attribution,
                order: dict[int, np.ndarray], groups: list[int]) -> LossCurves:
    """Loss of keeping the first k channels of `order[g]` (best first), for every group in `groups` (module doc)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    curves = LossCurves({g: np.zeros(analysis.groups[g].size + 1) for g in groups}, {g: [] for g in groups},
                        {g: [] for g in groups})
    wanted = set(groups)
    counted = set()
    for node_index, moments in sorted(attribution.moments.items()):
        node = graph.nodes[node_index]
        spec = conv_spec(node) if node.op == "Conv" else None
        layout = analysis.tensors.get(node.inputs[0].name)
        if spec is None or layout is None or spec.group != 1 or not any(s.group in wanted for s in layout.segments):
            continue
        s = moments / moments[-1, -1]
        taps = int(np.prod(spec.kernel))
        theta = theta_matrix(spec.weight, spec.bias if spec.bias is not None else np.zeros(spec.out_channels))
        energy = float(np.einsum("oi,ij,oj->", theta, s, theta))
        mean = theta @ s[-1]  # E[y]: the loss is a share of the output's variance, not of its energy (which a
        variance = energy - float(mean @ mean)  # large constant can dominate)
        if variance <= 1e-12 * energy:
            continue
        offset = 0
        for seg in layout.segments:
            if seg.group in wanted:
                ranked = order[seg.group]
                inside = (ranked >= seg.start) & (ranked < seg.stop)
                missed = _prefix_loss(theta, s, ranked[inside] - seg.start + offset, taps, energy, variance)
                # the group keeps its k best: this segment then holds those of them that lie in it
                curves.loss[seg.group] += missed[np.concatenate([[0], np.cumsum(inside)])]
                curves.consumers[seg.group].append(node.name or node.outputs[0].name)
                counted.add(node_index)
            offset += seg.size
    for edit in analysis.edits:
        if edit.kind == "consume" and edit.node not in counted:
            node = graph.nodes[edit.node]
            for seg in edit.channels.segments:
                if seg.group in wanted and (node.name or node.outputs[0].name) not in curves.unmeasured[seg.group]:
                    curves.unmeasured[seg.group].append(node.name or node.outputs[0].name)
    return curves


def _prefix_loss(theta: np.ndarray, s: np.ndarray, channels: np.ndarray, taps: int, energy: float,
                 variance: float) -> np.ndarray:
    """[len(channels) + 1]: the output energy the best refit misses when only the first j of `channels` (input
    channel indices, best first) are kept, j = 0..len, as a share of the output variance; every other input entry
    (and the bias, so the mean is always met) is kept."""
    features = s.shape[0] - 1
    own = (channels[:, None] * taps + np.arange(taps)[None, :]).ravel()
    mine = np.zeros(features + 1, bool)
    mine[own] = True
    first = np.flatnonzero(~mine)  # bias and every other channel: always kept
    perm = np.concatenate([first, own])
    sp = s[np.ix_(perm, perm)]
    sp = sp + JITTER * float(np.mean(np.diag(sp))) * np.eye(len(perm))
    explained = np.sum((theta[:, perm] @ np.linalg.cholesky(sp)) ** 2, axis=0)
    per_channel = explained[len(first):].reshape(len(channels), taps).sum(axis=1)
    cumulative = explained[:len(first)].sum() + np.concatenate([[0.0], np.cumsum(per_channel)])
    return np.maximum(energy - cumulative, 0.0) / variance


def allocate(model: onnx.ModelProto, analysis: ChannelAnalysis, attribution: Attribution,
             scores: dict[int, np.ndarray], settings: SelectionSettings, class_keep: np.ndarray,
             macs: MacModel, macs_target: float, fallback_alpha: float | None = None,
             curves: LossCurves | None = None) -> tuple[dict[int, np.ndarray], list[GroupChoice], LossCurves]:
    """Keep-sets with at most `macs_target` x the full MACs by the greedy of the module docstring, and the
    GroupChoices the report reads. Groups the threshold rule keeps whole stay whole; groups without a measured loss
    stay whole too, or keep what the threshold rule at `fallback_alpha` keeps when it is given. The MAC target may
    be out of reach (every measured group at round_to channels): the result is then the smallest model the greedy
    reaches."""
    keep_sets, choices = select_channels(analysis, scores, replace(settings, keep_ratio=1.0), class_keep)
    fallback = replace(settings, alpha=0.0 if fallback_alpha is None else fallback_alpha, keep_ratio=None)
    threshold_keep, threshold_choices = select_channels(analysis, scores, fallback, class_keep)
    free = [c.group for c in choices if not c.reason]
    order = {g: np.lexsort((np.arange(len(scores[g])), -scores[g])) for g in free}
    if curves is None:
        curves = loss_curves(model, analysis, attribution, order, free)
    measured = [g for g in free if curves.measured(g)]
    for g in free:
        if g not in measured and fallback_alpha is not None:
            keep_sets[g] = threshold_keep[g]
    state = _MacState(macs, analysis, keep_sets)
    counts = {g: analysis.groups[g].size for g in measured}
    current = macs.macs(analysis, keep_sets)
    while current > macs_target * macs.total:
        best = None
        for g in measured:
            k, step = counts[g], settings.unit(analysis.groups[g].size)
            ks = np.arange(step, k, step) if k > step else np.zeros(0, np.int64)
            if ks.size == 0:
                continue
            slope = state.saved(g, np.sort(order[g][:ks[0]])) / (k - ks[0])  # MACs saved per channel removed
            if slope <= 0:
                continue
            ratio = (curves.loss[g][ks] - curves.loss[g][k]) / (slope * (k - ks))
            i = int(np.argmin(ratio))  # ties: the smallest cut
            if best is None or ratio[i] < best[0] or (ratio[i] == best[0] and g < best[1]):
                best = (float(ratio[i]), g, int(ks[i]))
        if best is None:
            break
        _, g, k = best
        step = settings.unit(analysis.groups[g].size)
        slope = state.saved(g, np.sort(order[g][:k])) / (counts[g] - k)
        needed = int(np.ceil((current - macs_target * macs.total) / slope / step)) * step  # do not overshoot
        k = max(k, counts[g] - needed)
        counts[g] = k
        state.set(g, np.sort(order[g][:k]))
        current = macs.macs(analysis, state.keep_sets)
    out = []
    by_group = {c.group: c for c in threshold_choices}
    for c in choices:
        if c.group in counts:
            out.append(GroupChoice(c.group, c.size, counts[c.group], 0, ""))
        elif c.group in free and fallback_alpha is not None:
            out.append(by_group[c.group])
        elif c.group in free:
            out.append(replace(c, reason="no measured reconstruction loss (global allocation)"))
        else:
            out.append(c)
    return state.keep_sets, out, curves


class _MacState:
    """Kept fractions of every tensor a MAC term reads, updated group by group."""

    def __init__(self, macs: MacModel, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray]):
        self.macs, self.analysis, self.keep_sets = macs, analysis, dict(keep_sets)
        used = {t for term in macs.terms for t in term.tensors}
        self.tensors_of: dict[int, list[str]] = {}
        for t in sorted(used):
            for seg in analysis.tensors[t].segments:
                self.tensors_of.setdefault(seg.group, [])
                if t not in self.tensors_of[seg.group]:
                    self.tensors_of[seg.group].append(t)
        self.terms_of = {g: [term for term in macs.terms if set(term.tensors) & set(ts)]
                         for g, ts in self.tensors_of.items()}
        self.fraction = {t: self._fraction(t, self.keep_sets) for t in used}

    def _fraction(self, t: str, keep_sets: dict[int, np.ndarray]) -> float:
        lay = self.analysis.tensors[t]
        return lay.kept_indices(keep_sets).size / lay.size

    def saved(self, g: int, keep: np.ndarray) -> float:
        """MACs saved by giving group g the keep-set `keep` instead of its current one."""
        trial = {**self.keep_sets, g: keep}
        new = {t: self._fraction(t, trial) for t in self.tensors_of.get(g, [])}
        total = 0.0
        for term in self.terms_of.get(g, []):
            before = after = term.macs
            for t in term.tensors:
                before *= self.fraction[t]
                after *= new.get(t, self.fraction[t])
            total += before - after
        return total

    def set(self, g: int, keep: np.ndarray) -> None:
        self.keep_sets[g] = keep
        for t in self.tensors_of.get(g, []):
            self.fraction[t] = self._fraction(t, self.keep_sets)
