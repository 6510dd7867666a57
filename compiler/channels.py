"""Channel dependency analysis: which tensors share a channel index space and must be cut together.

Every conv output opens a *root* channel space. Ops that keep channels apart (activations, BN, pooling, resize, ...)
pass their input's layout through; residual Add/Mul/... unify the roots of their inputs (a coupled group must keep the
same channels everywhere); Concat lays inputs' layouts end to end, Split/Slice take sub-ranges. A tensor's channel
axis is therefore described as a tuple of segments, each a range of one root (TensorChannels), tracked through
Transposes by its axis. Anything that mixes or reshapes channels in a way this table cannot prove safe *blocks* the
groups it touches: they are kept whole, and the reason is recorded per group (never guess).

While propagating, each rule also records the *edits* a cut implies (slice this weight along that axis by that layout,
set this depthwise conv's group count, rewrite these split sizes); compiler.prune applies them. One table holds both,
so the analysis and the surgery cannot drift apart.

Hand-written because no maintained library analyses channel coupling on ONNX graphs (Torch-Pruning works on torch
modules via autograd tracing; onnx-graphsurgeon only gives the graph IR we build on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Ops that transform each channel independently and keep the channel axis where it is.
UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "Exp",
         "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Erf", "Gelu", "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round",
         "Sin", "Cos", "Mish", "ThresholdedRelu", "Celu", "Clip", "Sign"}
# Ops that work on spatial axes only (checked per op where an attribute could touch channels).
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Upsample", "Resize",
           "Pad", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceLogSumExp",
           "ReduceSumSquare", "ReduceProd", "DepthToSpace", "SpaceToDepth"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where"}
SHAPE_READERS = {"Shape", "Size"}  # read only the shape; their outputs carry no channels


@dataclass(frozen=True)
class Segment:
    """Channels [start, stop) of one channel group (or, during analysis, of one root)."""

    group: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TensorChannels:
    """A tensor's channel axis and which group ranges lie along it, in order."""

    axis: int
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def kept_indices(self, keep_sets: dict[int, np.ndarray]) -> np.ndarray:
        """Indices along this tensor's channel axis that survive `keep_sets` (group -> sorted kept group indices);
        groups missing from keep_sets are kept whole."""
        parts, offset = [], 0
        for s in self.segments:
            keep = keep_sets.get(s.group)
            if keep is None:
                parts.append(np.arange(offset, offset + s.size))
            else:
                inside = keep[(keep >= s.start) & (keep < s.stop)]
                parts.append(inside - s.start + offset)
            offset += s.size
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class Edit:
    """One change a cut implies. kinds: 'slice' (constant input `input` along `axis`), 'consume' (the same, on the
    input-channel axis of a conv that reads the channels: the one edit the masked reference zeroes instead), 'group' (Conv group attribute =
    kept count), 'split' (Split sizes from the outputs' kept counts), 'slice_bounds' (Slice channel start/end),
    'shape_entry' (constant input `input`, entry `axis`, becomes the kept count)."""

    node: int
    kind: str
    channels: TensorChannels
    input: int = -1
    axis: int = 0


@dataclass
class ChannelGroup:
    id: int
    size: int
    producers: list[str] = field(default_factory=list)   # conv nodes whose output channels open this group
    tensors: list[str] = field(default_factory=list)     # tensors whose channel axis holds (part of) this group
    observed: list[str] = field(default_factory=list)    # tensors consumed by convs: where attribution looks
    blocked: list[str] = field(default_factory=list)     # why it must be kept whole; empty = prunable
    depth: int = 0                                       # convs between the group and the output (0 = class head)

    @property
    def prunable(self) -> bool:
        return not self.blocked


@dataclass
class ChannelAnalysis:
    groups: list[ChannelGroup]
    tensors: dict[str, TensorChannels]
    edits: list[Edit]
    class_group: int | None  # the group of the class-output conv, sliced to the kept categories


class _Roots:
    """Union-find over root channel spaces, with sizes and block reasons."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.producers: dict[int, list[str]] = {}

    def new(self, size: int, producer: str | None = None, blocked: str | None = None) -> int:
        root = len(self.parent)
        self.parent.append(root)
        self.size.append(size)
        self.producers[root] = [producer] if producer else []
        if blocked:
            self.reasons[root] = [blocked]
        return root

    def find(self, r: int) -> int:
        while self.parent[r] != r:
            self.parent[r] = self.parent[self.parent[r]]
            r = self.parent[r]
        return r

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        lo, hi = min(a, b), max(a, b)  # the earlier root stays the representative: deterministic group order
        self.parent[hi] = lo
        self.reasons.setdefault(lo, []).extend(self.reasons.pop(hi, []))
        self.producers[lo].extend(self.producers.pop(hi))

    def block(self, r: int, reason: str) -> None:
        r = self.find(r)
        if reason not in self.reasons.setdefault(r, []):
            self.reasons[r].append(reason)


class _Context:
    """State of one analysis pass: tensor layouts in root coordinates, recorded edits, and graph helpers."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.roots = _Roots()
        self.layout: dict[str, TensorChannels] = {}
        self.edits: list[Edit] = []
        self.observed: dict[str, TensorChannels] = {}

    def block_tensor(self, name: str, reason: str) -> None:
        if name in self.layout:
            for s in self.layout[name].segments:
                self.roots.block(s.group, reason)

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            self.block_tensor(t.name, reason)

    def opaque(self, tensor: gs.Tensor, axis: int, reason: str) -> None:
        """Give a tensor a blocked root of its own, so later consumers see a known (uncuttable) channel range."""
        size = _dim(tensor, axis)
        if size is not None:
            self.layout[tensor.name] = TensorChannels(axis, (Segment(self.roots.new(size, blocked=reason), 0, size),))

    def unify(self, a: TensorChannels, b: TensorChannels, reason: str) -> bool:
        """Make two layouts the same channel space. Only whole roots of equal size can be merged; anything else
        (e.g. a residual add of a concat with a single conv) blocks every root involved."""
        if a.size != b.size or a.axis != b.axis:
            for s in a.segments + b.segments:
                self.roots.block(s.group, reason)
            return False
        cuts = sorted(set(_boundaries(a)) | set(_boundaries(b)))
        ok = True
        for lo, hi in zip(cuts, cuts[1:]):
            sa, sb = _piece(a, lo, hi), _piece(b, lo, hi)
            same = self.roots.find(sa.group) == self.roots.find(sb.group) and sa.start == sb.start
            whole = all(s.start == 0 and s.size == self.roots.size[s.group] for s in (sa, sb))
            if same:
                continue
            if whole and sa.size == sb.size:
                self.roots.union(sa.group, sb.group)
            else:
                self.roots.block(sa.group, reason)
                self.roots.block(sb.group, reason)
                ok = False
        return ok


def _boundaries(t: TensorChannels) -> list[int]:
    out, offset = [0], 0
    for s in t.segments:
        offset += s.size
        out.append(offset)
    return out


def _piece(t: TensorChannels, lo: int, hi: int) -> Segment:
    """The segment covering [lo, hi) of t (the caller guarantees no segment boundary falls inside)."""
    offset = 0
    for s in t.segments:
        if offset <= lo < offset + s.size:
            return Segment(s.group, s.start + lo - offset, s.start + hi - offset)
        offset += s.size
    raise AssertionError("range outside the layout")


def sub_layout(t: TensorChannels, lo: int, hi: int) -> TensorChannels:
    """The channels [lo, hi) of a layout, as a layout."""
    segments, offset = [], 0
    for s in t.segments:
        a, b = max(lo, offset), min(hi, offset + s.size)
        if a < b:
            segments.append(Segment(s.group, s.start + a - offset, s.start + b - offset))
        offset += s.size
    return TensorChannels(t.axis, tuple(segments))


def _dim(tensor: gs.Tensor, axis: int) -> int | None:
    shape = tensor.shape
    if shape is None or axis >= len(shape) or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor: an initializer, a Constant node's output, or an Identity of either."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op == "Constant" and "value" in producer.attrs:
            value = producer.attrs["value"]
            return value.values if isinstance(value, gs.Constant) else np.asarray(value)
        if producer.op == "Identity":
            return constant_value(producer.inputs[0])
    return None


def _label(node: gs.Node) -> str:
    return f"{node.op} {node.name!r}" if node.name else node.op


Rule = Callable[[_Context, int, gs.Node], None]


def _conv(ctx: _Context, index: int, node: gs.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    weight = constant_value(node.inputs[1])
    lx = ctx.layout.get(x.name)
    if weight is None:
        ctx.block_inputs(node, f"{_label(node)} has non-constant weights")
        ctx.opaque(out, 1, f"{_label(node)} has non-constant weights")
        return
    group = int(node.attrs.get("group", 1))
    transpose = node.op == "ConvTranspose"
    cout = weight.shape[1] * group if transpose else weight.shape[0]
    cin = weight.shape[0] if transpose else weight.shape[1] * group
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    if lx is not None and lx.axis != 1:
        ctx.block_tensor(x.name, f"{_label(node)} reads channels from axis {lx.axis}")
        lx = None
    if group == 1:
        if lx is not None:
            ctx.edits.append(Edit(index, "consume", lx, input=1, axis=1 if not transpose else 0))
            ctx.observed.setdefault(x.name, lx)
        root = ctx.roots.new(cout, producer=node.name or node.op)
        mine = TensorChannels(1, (Segment(root, 0, cout),))
        ctx.edits.append(Edit(index, "slice", mine, input=1, axis=0 if not transpose else 1))
        # Recorded even without a bias: compensation may give the conv one, which must be cut like its outputs.
        ctx.edits.append(Edit(index, "slice", mine, input=2, axis=0))
        ctx.layout[out.name] = mine
    elif group == cin == cout and not transpose and lx is not None:
        # Depthwise: output channel c depends on input channel c only, so it passes the layout through.
        ctx.edits.append(Edit(index, "slice", lx, input=1, axis=0))
        if has_bias:
            ctx.edits.append(Edit(index, "slice", lx, input=2, axis=0))
        ctx.edits.append(Edit(index, "group", lx))
        ctx.layout[out.name] = lx
    else:
        reason = f"{_label(node)} is a grouped conv (group={group}); cutting whole groups is not supported yet"
        ctx.block_tensor(x.name, reason)
        ctx.opaque(out, 1, reason)


def _passthrough(ctx: _Context, index: int, node: gs.Node) -> None:
    lx = ctx.layout.get(node.inputs[0].name)
    if lx is None:
        return
    if node.op == "Clip" and any(constant_value(t) is None or constant_value(t).size > 1 for t in node.inputs[1:] if t.name):
        ctx.block_tensor(node.inputs[0].name, f"{_label(node)} has non-scalar or dynamic bounds")
        return
    ctx.layout[node.outputs[0].name] = lx


def _spatial(ctx: _Context, index: int, node: gs.Node) -> None:
    """Pooling, resizing, padding and reductions: fine as long as they leave the channel axis alone."""
    x = node.inputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    out = node.outputs[0]
    axis = lx.axis
    rank = _rank(x)
    problem = None
    if node.op.startswith("Reduce"):
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            value = constant_value(node.inputs[1])
            axes = None if value is None else value.tolist()
            if value is None:
                problem = "has dynamic axes"
        if axes is None and problem is None:
            problem = "reduces over all axes"
        elif axes is not None and rank is not None:
            axes = [a % rank for a in axes]
            if axis in axes:
                problem = "reduces over the channel axis"
            elif not node.attrs.get("keepdims", 1):
                axis -= sum(a < lx.axis for a in axes)
    elif node.op in ("DepthToSpace", "SpaceToDepth"):
        problem = "moves channels into space"
    elif node.op == "Pad":
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            value = constant_value(node.inputs[1])
            pads = None if value is None else value.tolist()
        if pads is None or rank is None or (len(node.inputs) > 3 and node.inputs[3].name):
            problem = "has dynamic pads or explicit axes"
        elif pads[axis] or pads[axis + rank]:
            problem = "pads the channel axis"
    elif node.op in ("Resize", "Upsample"):
        problem = _check_resize(ctx, index, node, lx)
    if problem:
        ctx.block_tensor(x.name, f"{_label(node)} {problem}")
        ctx.opaque(out, axis, f"{_label(node)} {problem}")
        return
    ctx.layout[out.name] = TensorChannels(axis, lx.segments)


def _check_resize(ctx: _Context, index: int, node: gs.Node, lx: TensorChannels) -> str | None:
    scales_input = 1 if node.op == "Upsample" else 2
    scales = node.attrs.get("scales")
    if scales is None and len(node.inputs) > scales_input and node.inputs[scales_input].name:
        value = constant_value(node.inputs[scales_input])
        scales = None if value is None or value.size == 0 else value.tolist()
    if scales is not None:
        return None if scales[lx.axis] == 1 else "scales the channel axis"
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        sizes = constant_value(node.inputs[3])
        if sizes is None:
            return None  # sizes computed from Shape at run time follow the pruned channel count by themselves
        if "axes" in node.attrs:
            return "has an axes attribute with constant sizes"
        if sizes[lx.axis] != lx.size:
            return "resizes the channel axis"
        ctx.edits.append(Edit(index, "shape_entry", lx, input=3, axis=lx.axis))
    return None


def _elementwise(ctx: _Context, index: int, node: gs.Node) -> None:
    """Residual adds, SE gating, per-channel affine constants: inputs share one channel space after broadcasting."""
    inputs = [t for t in node.inputs if t.name]
    laid = [ctx.layout[t.name] for t in inputs if t.name in ctx.layout]
    if not laid:
        return
    out = node.outputs[0]
    out_rank = _rank(out) or max(_rank(t) or 0 for t in inputs)
    ref = laid[0]
    ranks = {_rank(t) for t in inputs if t.name in ctx.layout}
    if len(ranks) != 1 or None in ranks:
        ctx.block_inputs(node, f"{_label(node)} mixes feature maps of different or unknown rank")
        ctx.opaque(out, ref.axis, f"{_label(node)} mixes feature maps of different or unknown rank")
        return
    reason = f"{_label(node)} combines channels that cannot be aligned"
    for lay in laid[1:]:
        ctx.unify(ref, lay, reason)
    for i, t in enumerate(node.inputs):
        if not t.name or t.name in ctx.layout:
            continue
        value = constant_value(t)
        rank = len(value.shape) if value is not None else _rank(t)
        if rank is None:
            ctx.block_inputs(node, f"{_label(node)} has an input of unknown shape")
            continue
        dim_index = ref.axis - (out_rank - rank)
        size = 1 if dim_index < 0 else (value.shape[dim_index] if value is not None else _dim(t, dim_index))
        if size == 1:
            continue  # broadcast along channels: the same for every channel
        if value is not None and size == ref.size:
            ctx.edits.append(Edit(index, "slice", ref, input=i, axis=dim_index))
        else:
            ctx.block_inputs(node, f"{_label(node)} input {t.name!r} has channels of unknown origin")
    ctx.layout[out.name] = ref


def _norm(ctx: _Context, index: int, node: gs.Node) -> None:
    lx = ctx.layout.get(node.inputs[0].name)
    if lx is None:
        return
    params = range(1, len(node.inputs)) if node.op == "BatchNormalization" else (1, 2)
    if lx.axis != 1 or any(constant_value(node.inputs[i]) is None for i in params):
        ctx.block_tensor(node.inputs[0].name, f"{_label(node)} is not a per-channel affine with constant parameters")
        return
    for i in params:
        ctx.edits.append(Edit(index, "slice", lx, input=i, axis=0))
    ctx.layout[node.outputs[0].name] = lx


def _concat(ctx: _Context, index: int, node: gs.Node) -> None:
    inputs = [t for t in node.inputs if t.name]
    if not any(t.name in ctx.layout for t in inputs):
        return
    rank = next(_rank(t) for t in inputs if t.name in ctx.layout)
    axis = int(node.attrs["axis"]) % rank if rank else None
    channel_axis = next(ctx.layout[t.name].axis for t in inputs if t.name in ctx.layout)
    if axis != channel_axis:
        _elementwise_layouts_only(ctx, node, inputs)
        return
    segments: list[Segment] = []
    for t in inputs:
        if t.name not in ctx.layout:
            ctx.opaque(t, axis, f"{_label(node)} input {t.name!r} has channels of unknown origin")
        if t.name not in ctx.layout:
            ctx.block_inputs(node, f"{_label(node)} input {t.name!r} has an unknown channel count")
            return
        segments.extend(ctx.layout[t.name].segments)
    ctx.layout[node.outputs[0].name] = TensorChannels(axis, tuple(segments))


def _elementwise_layouts_only(ctx: _Context, node: gs.Node, inputs: list[gs.Tensor]) -> None:
    """Concat along a non-channel axis: every input must carry the same channels."""
    laid = [ctx.layout.get(t.name) for t in inputs]
    if any(lay is None for lay in laid):
        ctx.block_inputs(node, f"{_label(node)} joins a feature map with a tensor of unknown channels")
        return
    for lay in laid[1:]:
        ctx.unify(laid[0], lay, f"{_label(node)} joins feature maps whose channels cannot be aligned")
    ctx.layout[node.outputs[0].name] = laid[0]


def _split(ctx: _Context, index: int, node: gs.Node) -> None:
    x = node.inputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    rank = _rank(x)
    axis = int(node.attrs.get("axis", 0)) % rank if rank else None
    if axis != lx.axis:
        for out in node.outputs:
            ctx.layout[out.name] = lx
        return
    sizes = node.attrs.get("split")
    if sizes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        sizes = None if value is None else value.tolist()
        if value is None:
            ctx.block_tensor(x.name, f"{_label(node)} has dynamic split sizes")
            return
    if sizes is None:  # equal parts (ceil-sized, the last may be smaller: opset 18 num_outputs semantics)
        n = len(node.outputs)
        part = -(-lx.size // n)
        sizes = [min(part, lx.size - i * part) for i in range(n)]
    offset = 0
    for out, size in zip(node.outputs, sizes):
        ctx.layout[out.name] = sub_layout(lx, offset, offset + size)
        offset += size
    ctx.edits.append(Edit(index, "split", lx))


def _slice(ctx: _Context, index: int, node: gs.Node) -> None:
    x = node.inputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    rank = _rank(x)
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        values = [constant_value(t) if t.name else None for t in node.inputs[1:]] + [None] * 4
        starts, ends, axes, steps = values[:4]
        if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None) or \
                (len(node.inputs) > 4 and node.inputs[4].name and steps is None):
            ctx.block_tensor(x.name, f"{_label(node)} has dynamic bounds")
            ctx.opaque(node.outputs[0], lx.axis, f"{_label(node)} has dynamic bounds")
            return
        axes = list(range(len(starts))) if axes is None else axes.tolist()
        steps = [1] * len(starts) if steps is None else steps.tolist()
        starts, ends = starts.tolist(), ends.tolist()
    axes = [a % rank for a in axes] if rank else axes
    if lx.axis not in axes:
        ctx.layout[node.outputs[0].name] = lx
        return
    k = axes.index(lx.axis)
    if steps[k] != 1:
        ctx.block_tensor(x.name, f"{_label(node)} slices channels with step {steps[k]}")
        ctx.opaque(node.outputs[0], lx.axis, f"{_label(node)} slices channels with a step")
        return
    lo, hi, _ = slice(starts[k], ends[k]).indices(lx.size)
    ctx.layout[node.outputs[0].name] = sub_layout(lx, lo, max(lo, hi))
    ctx.edits.append(Edit(index, "slice_bounds", lx, axis=k))


def _transpose(ctx: _Context, index: int, node: gs.Node) -> None:
    lx = ctx.layout.get(node.inputs[0].name)
    if lx is None:
        return
    perm = node.attrs.get("perm")
    rank = _rank(node.inputs[0])
    if perm is None:
        perm = list(range(rank))[::-1] if rank else None
    if perm is None:
        ctx.block_tensor(node.inputs[0].name, f"{_label(node)} has an unknown permutation")
        return
    ctx.layout[node.outputs[0].name] = TensorChannels(list(perm).index(lx.axis), lx.segments)


def _shape_reader(ctx: _Context, index: int, node: gs.Node) -> None:
    """Shape/Size read no values; a later Reshape that uses them on a feature map blocks there."""


def _blocker(ctx: _Context, index: int, node: gs.Node) -> None:
    touched = [t for t in node.inputs if t.name in ctx.layout]
    if not touched:
        return
    reason = f"{_label(node)} touches the channel axis in a way the analysis cannot follow"
    ctx.block_inputs(node, reason)
    for out in node.outputs:
        if _rank(out) and _rank(out) >= 3:
            ctx.opaque(out, 1, reason)


RULES: dict[str, Rule] = {
    **{op: _passthrough for op in UNARY},
    **{op: _spatial for op in SPATIAL},
    **{op: _elementwise for op in ELEMENTWISE},
    **{op: _shape_reader for op in SHAPE_READERS},
    "Conv": _conv, "ConvTranspose": _conv,
    "BatchNormalization": _norm, "InstanceNormalization": _norm,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Transpose": _transpose,
}


def analyse(graph_or_model: gs.Graph | onnx.ModelProto) -> ChannelAnalysis:
    """Channel groups of a (shape-inferred) graph. Does not modify its argument."""
    graph = gs.import_onnx(graph_or_model) if isinstance(graph_or_model, onnx.ModelProto) else graph_or_model
    ctx = _Context(graph)
    for t in graph.inputs:
        axis = 1
        size = _dim(t, axis)
        if size is not None:
            ctx.layout[t.name] = TensorChannels(axis, (Segment(ctx.roots.new(size, blocked="model input channels"), 0, size),))
    for index, node in enumerate(graph.nodes):
        RULES.get(node.op, _blocker)(ctx, index, node)

    class_root = _class_root(ctx, graph)
    for out in graph.outputs:
        if out.name in ctx.layout and (class_root is None or out is not graph.outputs[0]):
            ctx.block_tensor(out.name, f"feeds graph output {out.name!r}")
    return _finish(ctx, graph, class_root)


def _class_root(ctx: _Context, graph: gs.Graph) -> int | None:
    """The root of the first output, if that output is one whole conv output space (the class logits)."""
    lay = ctx.layout.get(graph.outputs[0].name) if graph.outputs else None
    if lay is None or len(lay.segments) != 1:
        return None
    seg = lay.segments[0]
    if seg.start != 0 or seg.size != ctx.roots.size[seg.group]:
        return None
    return ctx.roots.find(seg.group)


def _finish(ctx: _Context, graph: gs.Graph, class_root: int | None) -> ChannelAnalysis:
    """Renumber union-find roots into compact group ids (in order of first appearance) and collect group facts."""
    ids: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    for r in range(len(ctx.roots.parent)):
        rep = ctx.roots.find(r)
        if rep not in ids:
            ids[rep] = len(groups)
            groups.append(ChannelGroup(ids[rep], ctx.roots.size[rep], producers=list(ctx.roots.producers.get(rep, [])),
                                       blocked=list(ctx.roots.reasons.get(rep, []))))

    def remap(t: TensorChannels) -> TensorChannels:
        return TensorChannels(t.axis, tuple(Segment(ids[ctx.roots.find(s.group)], s.start, s.stop) for s in t.segments))

    tensors = {name: remap(t) for name, t in ctx.layout.items()}
    for name, t in tensors.items():
        for g in {s.group for s in t.segments}:
            groups[g].tensors.append(name)
    for name, t in ctx.observed.items():
        for g in {s.group for s in tensors[name].segments}:
            groups[g].observed.append(name)
    edits = [Edit(e.node, e.kind, remap(e.channels), e.input, e.axis) for e in ctx.edits]
    class_group = ids[class_root] if class_root is not None else None
    _set_depths(groups, tensors, graph, class_group)
    return ChannelAnalysis(groups, tensors, edits, class_group)


def _set_depths(groups: list[ChannelGroup], tensors: dict[str, TensorChannels], graph: gs.Graph,
                class_group: int | None) -> None:
    """Depth of a group = the fewest convs between it and the output, counted backwards in data-flow order.
    Used by the last-N-layers rule: depth 1 is the class conv's input, 2 the layer before, and so on."""
    consumers: dict[int, set[int]] = {g.id: set() for g in groups}  # group -> groups produced by convs reading it
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose") or node.outputs[0].name not in tensors:
            continue
        out_group = tensors[node.outputs[0].name].segments[0].group
        lx = tensors.get(node.inputs[0].name)
        if lx is not None:
            for s in lx.segments:
                if s.group != out_group:
                    consumers[s.group].add(out_group)
    depth = {g.id: None for g in groups}
    if class_group is not None:
        depth[class_group] = 0
    changed = True
    while changed:  # relax to the shortest distance; graphs are DAGs of modest size
        changed = False
        for g, outs in consumers.items():
            known = [depth[o] for o in outs if depth[o] is not None]
            if known and (depth[g] is None or min(known) + 1 < depth[g]):
                depth[g] = min(known) + 1
                changed = True
    for g in groups:
        g.depth = depth[g.id] if depth[g.id] is not None else 10**6
