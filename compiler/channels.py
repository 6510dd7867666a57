"""Channel dependency analysis: which tensors share a channel index space and must be cut together.

Every conv output opens a *root* channel space (so do Gemm and a MatMul against constant weights). Ops that keep
channels apart (activations, BN, pooling, resize, ...) pass their input's layout through; residual Add/Mul/... unify
the roots of their inputs (a coupled group must keep the same channels everywhere), while a one-channel operand (an
attention map, a gate) broadcasts; Concat lays inputs' layouts end to end, Split/Slice take sub-ranges. A tensor's
channel axis is therefore described as a tuple of segments, each a range of one root (TensorChannels), tracked
through Transposes, Squeeze/Unsqueeze and reshapes by its axis. Where only part of a root must be unified with
something (a residual add of a concat and one conv), the root is split into consecutive roots.

What real graphs add, each exact against the masked reference:
- grouped convs keep the same channels in every group (their groups' tiles of input and output are unified), so the
  group count stays and each group keeps as many channels; depthwise convs pass their input's channels through, each
  repeated by the channel multiplier, and their group count becomes the kept count;
- reshapes keep the channels where one axis still holds them: a Flatten/Reshape of [N,C,1,1] to [N,C] and back, a
  tf2onnx [1,1,1,C] pooling branch with Tile, and a channel shuffle (split [N,g,C/g,..] with its g blocks unified,
  transposed, merged back with every channel repeated g times);
- squeeze-excite through Gemm cuts matching rows and columns; MatMul over pixels (position attention) keeps channels.
Anything that mixes channels in a way these rules cannot prove safe *blocks* the groups it touches (a softmax or
pooling over channels, attention energies summed over channels, a channel Gram matrix): they are kept whole, and the
reason is recorded per group (never guess).

Exporters also compute with channel counts at run time (Shape -> Gather -> ... -> Reshape/Resize/Slice). Such values
are followed element by element, with their static values: a Resize whose sizes read its own channel count follows a
cut by itself, a Slice whose bounds are static is cut like a constant one, and any other use blocks the groups whose
count it reads, since the cut would change the value. Pads computed from static spatial dims are evaluated.

While propagating, each rule also records the *edits* a cut implies (slice this weight along that axis by that layout,
set this depthwise conv's group count, rewrite these split sizes or this reshape target's channel entry);
compiler.prune applies them. One table holds both, so the analysis and the surgery cannot drift apart.

Hand-written because no maintained library analyses channel coupling on ONNX graphs (Torch-Pruning works on torch
modules via autograd tracing; onnx-graphsurgeon only gives the graph IR we build on).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Ops that transform each channel independently and keep the channel axis where it is.
UNARY = {"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus", "Softsign", "Exp",
         "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Erf", "Gelu", "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round",
         "Sin", "Cos", "Mish", "ThresholdedRelu", "Celu", "Clip", "Sign"}
# Ops that work on spatial axes only (checked per op where an attribute could touch channels).
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Upsample", "Resize",
           "Pad", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceLogSumExp",
           "ReduceSumSquare", "ReduceProd", "DepthToSpace", "SpaceToDepth"}
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where"}
SHAPE_READERS = {"Shape", "Size"}  # read only the shape; what they read may be a channel count (see _read_shape)


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
    'shape_entry' (constant input `input`, entry `axis`, becomes the kept count). A Slice whose bounds are computed at
    run time from static channel counts carries their values in `bounds`; the surgery writes them as constants."""

    node: int
    kind: str
    channels: TensorChannels
    input: int = -1
    axis: int = 0
    bounds: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # slice_bounds: (starts, ends) computed at run time


@dataclass(frozen=True)
class _ShapeValue:
    """A value computed at run time from tensor shapes that depends on some channel count. entries: per element (of
    the flattened value), the layout whose channel count it is, or None where the element is no channel count; the
    whole tuple is None where the elements could not be followed. roots: every root whose count it depends on.
    Channel counts are static in a feature map, so such values often are too: then a Slice whose bounds they are can
    be cut like one with constant bounds (the surgery writes the new bounds as constants)."""

    entries: tuple[TensorChannels | None, ...] | None
    roots: frozenset[int]
    static: tuple[int | None, ...] | None = None  # per element, the value where every dim it reads is static


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
    """Union-find over root channel spaces, with sizes and block reasons.

    A root can be *split* into consecutive child roots when only part of it must be unified with something else (a
    residual add of a concat with one conv, the groups of a grouped conv, a channel shuffle). A split root is no
    longer a channel space of its own: its channels are those of its children (see `leaves`), which inherit its
    producers and block reasons. Layouts keep their segments in the coordinates of the root they were made with and
    are resolved to the live roots (`leaves`) when they are compared and at the end of the analysis."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.parts: dict[int, list[int]] = {}  # split representative -> its consecutive child roots
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
        """Merge two live roots of equal size (callers pass `leaves`)."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        lo, hi = min(a, b), max(a, b)  # the earlier root stays the representative: deterministic group order
        self.parent[hi] = lo
        for reason in self.reasons.pop(hi, []):
            if reason not in self.reasons.setdefault(lo, []):
                self.reasons[lo].append(reason)
        for producer in self.producers.pop(hi):
            if producer not in self.producers[lo]:
                self.producers[lo].append(producer)

    def block(self, r: int, reason: str) -> None:
        r = self.find(r)
        for child in self.parts.get(r, []):
            self.block(child, reason)
        if r not in self.parts and reason not in self.reasons.setdefault(r, []):
            self.reasons[r].append(reason)

    def leaves(self, seg: Segment) -> list[Segment]:
        """The live roots holding channels [start, stop) of `seg`'s root, in order."""
        r = self.find(seg.group)
        if r not in self.parts:
            return [Segment(r, seg.start, seg.stop)]
        out, offset = [], 0
        for child in self.parts[r]:
            lo, hi = max(seg.start, offset), min(seg.stop, offset + self.size[child])
            if lo < hi:
                out.extend(self.leaves(Segment(child, lo - offset, hi - offset)))
            offset += self.size[child]
        return out

    def split(self, r: int, points: list[int]) -> None:
        """Split the live root `r` at `points` (strictly inside it) into consecutive children."""
        bounds = [0, *sorted(set(points)), self.size[r]]
        children = [self.new(hi - lo) for lo, hi in zip(bounds, bounds[1:])]
        for child in children:
            self.producers[child] = list(self.producers.get(r, []))
            if r in self.reasons:
                self.reasons[child] = list(self.reasons[r])
        self.parts[r] = children


class _Context:
    """State of one analysis pass: tensor layouts in root coordinates, recorded edits, and graph helpers."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.roots = _Roots()
        self.layout: dict[str, TensorChannels] = {}
        self.edits: list[Edit] = []
        self.observed: dict[str, TensorChannels] = {}
        self.shapes: dict[str, _ShapeValue] = {}  # run-time values that depend on a channel count (see _read_shape)
        self.static: dict[str, np.ndarray | None] = {}  # values computed at run time from static shapes (see value)

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of a small tensor where it is known before run time: a constant, or computed only from
        constants and static dims (run-time "same" padding: Shape -> Gather -> arithmetic -> Pad). Only for
        checks that need no rewrite (pads, repeats): a value that reads a channel count has its groups blocked
        where it is used (_shape_computation)."""
        found = constant_value(t)
        if found is not None or not t.name or t.name in self.layout:
            return found
        if t.name not in self.static:
            self.static[t.name] = None  # no cycles; a value that cannot be evaluated stays unknown
            self.static[t.name] = _evaluate_static(self, t)
        return self.static[t.name]

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

    def resolve(self, t: TensorChannels) -> TensorChannels:
        """The layout in live roots, adjacent pieces of one root merged."""
        segments: list[Segment] = []
        for s in t.segments:
            for leaf in self.roots.leaves(s):
                last = segments[-1] if segments else None
                if last is not None and last.group == leaf.group and last.stop == leaf.start:
                    segments[-1] = Segment(leaf.group, last.start, leaf.stop)
                else:
                    segments.append(leaf)
        return TensorChannels(t.axis, tuple(segments))

    def unify(self, a: TensorChannels, b: TensorChannels, reason: str) -> bool:
        """Make two layouts the same channel space, position by position. Roots are split where a boundary of one
        layout falls inside a root of the other, so that whole roots can be merged. Layouts of different sizes or
        axes cannot be aligned: that blocks every root involved."""
        if a.size != b.size or a.axis != b.axis:
            for s in a.segments + b.segments:
                self.roots.block(s.group, reason)
            return False
        while True:
            ra, rb = self.resolve(a), self.resolve(b)
            cuts = set(_boundaries(ra)) | set(_boundaries(rb))
            if not (self._split_at(ra, cuts) or self._split_at(rb, cuts)):
                break
        for sa, sb in zip(ra.segments, rb.segments):
            self.roots.union(sa.group, sb.group)
        return True

    def _split_at(self, t: TensorChannels, cuts: set[int]) -> bool:
        """Split the first root of the resolved layout `t` that is used only in part or that a cut falls inside."""
        offset = 0
        for s in t.segments:
            inner = {s.start + c - offset for c in cuts if offset < c < offset + s.size}
            points = sorted((inner | {s.start, s.stop}) - {0, self.roots.size[s.group]})
            if points:
                self.roots.split(s.group, points)
                return True
            offset += s.size
        return False

    def tiles(self, t: TensorChannels, count: int, reason: str) -> TensorChannels:
        """Require `t` to be `count` equal tiles that keep the same channels (the groups of a grouped conv, the
        blocks of a channel shuffle): unify them, and return the first."""
        size = t.size // count
        first = sub_layout(t, 0, size)
        for j in range(1, count):
            self.unify(first, sub_layout(t, j * size, (j + 1) * size), reason)
        return first


def _boundaries(t: TensorChannels) -> list[int]:
    out, offset = [0], 0
    for s in t.segments:
        offset += s.size
        out.append(offset)
    return out


def sub_layout(t: TensorChannels, lo: int, hi: int) -> TensorChannels:
    """The channels [lo, hi) of a layout, as a layout."""
    segments, offset = [], 0
    for s in t.segments:
        a, b = max(lo, offset), min(hi, offset + s.size)
        if a < b:
            segments.append(Segment(s.group, s.start + a - offset, s.start + b - offset))
        offset += s.size
    return TensorChannels(t.axis, tuple(segments))


def tile(t: TensorChannels, count: int) -> TensorChannels:
    """The layout `count` times end to end (e.g. [a, b] -> [a, b, a, b])."""
    return TensorChannels(t.axis, t.segments * count)


def repeat_each(t: TensorChannels, count: int) -> TensorChannels:
    """Every channel of the layout `count` times in a row (e.g. [a, b] -> [a, a, b, b])."""
    if count == 1:
        return t
    segments = []
    for s in t.segments:
        for c in range(s.start, s.stop):
            segments.extend([Segment(s.group, c, c + 1)] * count)
    return TensorChannels(t.axis, tuple(segments))


def _dim(tensor: gs.Tensor, axis: int) -> int | None:
    shape = tensor.shape
    if shape is None or axis >= len(shape) or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor: an initializer, a Constant node's output, or a chain of Identity, Cast,
    Unsqueeze, Squeeze and Reshape over one (what exporters leave behind without constant folding)."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) != 1 or len(tensor.inputs[0].outputs) != 1:
        return None
    producer = tensor.inputs[0]
    if producer.op == "Constant":
        return _constant_attribute(producer)
    fold = _FOLDS.get(producer.op)
    if fold is None or not producer.inputs or not producer.inputs[0].name:
        return None
    value = constant_value(producer.inputs[0])
    return None if value is None else fold(producer, np.asarray(value))


def _constant_attribute(node: gs.Node) -> np.ndarray | None:
    for key, dtype in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in node.attrs:
            value = node.attrs[key]
            return value.values if isinstance(value, gs.Constant) else np.asarray(value, dtype=dtype)
    return None


def _optional_constant(node: gs.Node, index: int, attr: str) -> list[int] | None:
    """An axes-like argument given as an attribute (older opsets) or a constant input (newer ones)."""
    if attr in node.attrs:
        return list(node.attrs[attr])
    if len(node.inputs) > index and node.inputs[index].name:
        value = constant_value(node.inputs[index])
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    return None


def _fold_unsqueeze(node: gs.Node, value: np.ndarray) -> np.ndarray | None:
    axes = _optional_constant(node, 1, "axes")
    if axes is None:
        return None
    rank = value.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        value = np.expand_dims(value, axis)
    return value


def _fold_squeeze(node: gs.Node, value: np.ndarray) -> np.ndarray | None:
    axes = _optional_constant(node, 1, "axes")
    if axes is None and (len(node.inputs) > 1 and node.inputs[1].name):
        return None
    return np.squeeze(value) if axes is None else np.squeeze(value, tuple(a % value.ndim for a in axes))


def _fold_reshape(node: gs.Node, value: np.ndarray) -> np.ndarray | None:
    shape = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None or node.attrs.get("allowzero", 0):
        return None
    shape = [value.shape[i] if d == 0 else int(d) for i, d in enumerate(np.asarray(shape).tolist())]
    return value.reshape(shape)


_FOLDS: dict[str, Callable[[gs.Node, np.ndarray], np.ndarray | None]] = {
    "Identity": lambda node, value: value,
    "Cast": lambda node, value: value.astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))),
    "Unsqueeze": _fold_unsqueeze, "Squeeze": _fold_squeeze, "Reshape": _fold_reshape,
}


STATIC_OPS = {"Identity", "Cast", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose",
              "ConstantOfShape", "Range", "Expand", "Tile", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Max",
              "Min", "Floor", "Ceil", "Equal", "Less", "Greater", "Where", "Not", "And", "Or", "ReduceProd",
              "ReduceSum", "ReduceMax", "ReduceMin", "Sign", "Clip"}
MAX_STATIC_ELEMENTS = 4096  # shape arithmetic only: never evaluate feature maps


def _evaluate_static(ctx: "_Context", t: gs.Tensor) -> np.ndarray | None:
    """Evaluate the node producing `t` (ONNX's reference evaluator, one node at a time) when its inputs are known
    before run time: constants, static dims read by Shape, or values evaluated the same way."""
    if len(t.inputs) != 1 or (t.shape is not None and _static_product(list(t.shape)) is None and
                              any(d is None for d in t.shape)):
        return None
    node = t.inputs[0]
    if node.op == "Shape":
        dims = node.inputs[0].shape
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        return np.asarray(dims[slice(start, end)], np.int64)
    if node.op not in STATIC_OPS:
        return None
    args = [ctx.value(i) if i.name else None for i in node.inputs]
    if any(v is None and i.name for v, i in zip(args, node.inputs)) or \
            any(v is not None and np.size(v) > MAX_STATIC_ELEMENTS for v in args):
        return None
    try:
        outputs = _run_one_node(node, args, ctx.graph.opset)
    except Exception:  # noqa: BLE001 - an op the evaluator does not take simply stays unknown
        return None
    value = outputs[node.outputs.index(t)]
    return value if np.size(value) <= MAX_STATIC_ELEMENTS else None


def _run_one_node(node: gs.Node, args: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    inputs = [gs.Variable(f"in{i}", dtype=np.asarray(v).dtype, shape=np.shape(v)) if v is not None
              else gs.Variable.empty() for i, v in enumerate(args)]
    outputs = [gs.Variable(f"out{i}") for i in range(len(node.outputs))]
    copy = gs.Node(node.op, attrs=dict(node.attrs), inputs=inputs, outputs=outputs, domain=node.domain)
    graph = gs.Graph(nodes=[copy], inputs=[t for t in inputs if t.name], outputs=outputs, opset=opset)
    model = gs.export_onnx(graph, do_type_check=False)
    feeds = {f"in{i}": np.asarray(v) for i, v in enumerate(args) if v is not None}
    return ReferenceEvaluator(model).run(None, feeds)


def _label(node: gs.Node) -> str:
    return f"{node.op} {node.name!r}" if node.name else node.op


Rule = Callable[[_Context, int, gs.Node], None]


@dataclass(frozen=True)
class ConvSpec:
    """One Conv or ConvTranspose as the analysis, the surgery and compensation see it. Weights are [out, in/group,
    k...] for Conv and [in, out/group, k...] for ConvTranspose; `in_axis`/`out_axis` name the weight axes that index
    input and output channels (within a group where the conv is grouped)."""

    op: str
    weight: np.ndarray
    bias: np.ndarray | None      # None: no bias input
    group: int
    strides: tuple[int, ...]
    pads: tuple[int, ...]        # begin values for every spatial axis, then end values (ONNX order)
    dilations: tuple[int, ...]
    auto_pad: str

    @property
    def transpose(self) -> bool:
        return self.op == "ConvTranspose"

    @property
    def in_axis(self) -> int:
        return 0 if self.transpose else 1

    @property
    def out_axis(self) -> int:
        return 1 if self.transpose else 0

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transpose else self.weight.shape[1] * self.group

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.group if self.transpose else self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def depthwise(self) -> bool:
        """One input channel per group (a channel multiplier when there are more outputs than inputs)."""
        return self.group > 1 and self.group == self.in_channels


def conv_spec(node: gs.Node) -> ConvSpec | None:
    """The description of a Conv/ConvTranspose node, or None where its weight or bias is not a constant."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    bias = constant_value(node.inputs[2]) if has_bias else None
    if weight is None or (has_bias and bias is None):
        return None
    spatial = weight.ndim - 2
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    return ConvSpec(node.op, np.asarray(weight), None if bias is None else np.asarray(bias),
                    int(node.attrs.get("group", 1)),
                    tuple(node.attrs.get("strides", [1] * spatial)), tuple(node.attrs.get("pads", [0] * 2 * spatial)),
                    tuple(node.attrs.get("dilations", [1] * spatial)),
                    auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad))


def _conv(ctx: _Context, index: int, node: gs.Node) -> None:
    x, out = node.inputs[0], node.outputs[0]
    spec = conv_spec(node)
    lx = ctx.layout.get(x.name)
    if spec is None:
        reason = f"{_label(node)} has non-constant weights or bias"
        ctx.block_inputs(node, reason)
        ctx.opaque(out, 1, reason)
        return
    if lx is not None and (lx.axis != 1 or lx.size != spec.in_channels):
        problem = f"reads channels from axis {lx.axis}" if lx.axis != 1 else "reads a different channel count"
        ctx.block_tensor(x.name, f"{_label(node)} {problem}")
        lx = None
    if not spec.depthwise:
        _dense_conv(ctx, index, node, spec, lx)
    elif lx is not None:
        _depthwise_conv(ctx, index, node, spec, lx)
    else:
        reason = f"{_label(node)} is depthwise over channels of unknown origin"
        ctx.opaque(out, 1, reason)


def _dense_conv(ctx: _Context, index: int, node: gs.Node, spec: ConvSpec, lx: TensorChannels | None) -> None:
    """A conv whose outputs mix the input channels of their group. With group > 1, each group must keep the same
    input and output channels (the same offsets in every group), so that the group count stays and every group
    keeps as many channels: the groups' tiles of the input and of the output are unified."""
    reason = f"{_label(node)} has {spec.group} groups"
    if lx is not None:
        per_group = ctx.tiles(lx, spec.group, reason)
        # Conv weights index the input channels of one group; ConvTranspose weights every input channel
        ctx.edits.append(Edit(index, "consume", lx if spec.transpose else per_group, input=1, axis=spec.in_axis))
        ctx.observed.setdefault(node.inputs[0].name, lx)
    cout = spec.out_channels
    mine = TensorChannels(1, (Segment(ctx.roots.new(cout, producer=node.name or node.op), 0, cout),))
    per_group_out = ctx.tiles(mine, spec.group, reason)
    ctx.edits.append(Edit(index, "slice", per_group_out if spec.transpose else mine, input=1, axis=spec.out_axis))
    # Recorded even without a bias: compensation may give the conv one, which must be cut like its outputs.
    ctx.edits.append(Edit(index, "slice", mine, input=2, axis=0))
    ctx.layout[node.outputs[0].name] = mine


def _depthwise_conv(ctx: _Context, index: int, node: gs.Node, spec: ConvSpec, lx: TensorChannels) -> None:
    """Output channel c*m+j (m = channel multiplier) depends on input channel c only: the layout passes through, each
    channel repeated m times, and the group count becomes the kept input count."""
    multiplier = spec.out_channels // spec.group
    mine = repeat_each(lx, multiplier)
    ctx.edits.append(Edit(index, "slice", lx if spec.transpose else mine, input=1, axis=0))
    ctx.edits.append(Edit(index, "slice", mine, input=2, axis=0))  # even without a bias, as _dense_conv
    ctx.edits.append(Edit(index, "group", lx))
    ctx.layout[node.outputs[0].name] = mine


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
    elif node.op in POOLING and axis >= 2:
        problem = "pools over the channel axis"  # pooling windows span every axis from 2 on
    elif node.op in ("DepthToSpace", "SpaceToDepth"):
        problem = "moves channels into space"
    elif node.op == "Pad":
        problem = _check_pad(ctx, node, axis, rank)
    elif node.op in ("Resize", "Upsample"):
        problem = _check_resize(ctx, index, node, lx)
    if problem:
        ctx.block_tensor(x.name, f"{_label(node)} {problem}")
        ctx.opaque(out, axis, f"{_label(node)} {problem}")
        return
    ctx.layout[out.name] = TensorChannels(axis, lx.segments)


def _check_pad(ctx: _Context, node: gs.Node, axis: int, rank: int | None) -> str | None:
    """A Pad is spatial where it pads nothing on the channel axis; its pads may be computed at run time from static
    dims (exporters' "same" padding), and (opset 18) given for some axes only."""
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        value = ctx.value(node.inputs[1])
        pads = None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    axes = list(range(rank)) if rank is not None else None
    if len(node.inputs) > 3 and node.inputs[3].name:
        value = ctx.value(node.inputs[3])
        axes = None if value is None or rank is None else [int(v) % rank for v in np.asarray(value).reshape(-1)]
    if pads is None or axes is None:
        return "has pads computed at run time from dynamic dims"
    if axis not in axes:
        return None
    k = axes.index(axis)
    return "pads the channel axis" if pads[k] or pads[k + len(axes)] else None


def _check_resize(ctx: _Context, index: int, node: gs.Node, lx: TensorChannels) -> str | None:
    scales_input = 1 if node.op == "Upsample" else 2
    scales = node.attrs.get("scales")
    if scales is None and len(node.inputs) > scales_input and node.inputs[scales_input].name:
        value = constant_value(node.inputs[scales_input])
        if value is None:
            return "has scales computed at run time"
        scales = None if value.size == 0 else value.tolist()
    if scales is not None:
        return None if scales[lx.axis] == 1 else "scales the channel axis"
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        if "axes" in node.attrs:
            return "has an axes attribute with explicit sizes"
        sizes = constant_value(node.inputs[3])
        if sizes is None:
            return _check_dynamic_sizes(ctx, node.inputs[3], lx)
        if sizes[lx.axis] != lx.size:
            return "resizes the channel axis"
        ctx.edits.append(Edit(index, "shape_entry", lx, input=3, axis=lx.axis))
    return None


def _check_dynamic_sizes(ctx: _Context, sizes: gs.Tensor, lx: TensorChannels) -> str | None:
    """Sizes computed at run time are exact only where their channel entry is read from the resized tensor's own
    channel count (as exporters write `interpolate(x, size=...)`): then it follows any cut by itself."""
    value = ctx.shapes.get(sizes.name)
    if value is None:
        return "has run-time sizes whose channel entry does not follow the cut"
    if value.entries is None or len(value.entries) <= lx.axis or value.entries[lx.axis] is None or \
            not _same_channels(ctx, value.entries[lx.axis], lx) or \
            any(e is not None for i, e in enumerate(value.entries) if i != lx.axis):
        for r in value.roots:
            ctx.roots.block(r, "a Resize takes its channel count from another tensor")
        return "has run-time sizes whose channel entry is not its own channel count"
    return None


def _same_channels(ctx: _Context, a: TensorChannels, b: TensorChannels) -> bool:
    return ctx.resolve(a).segments == ctx.resolve(b).segments


def _value_shape(t: gs.Tensor) -> list | None:
    """The shape of an operand: a constant's own, else the inferred one (None where unknown)."""
    value = constant_value(t)
    return list(np.shape(value)) if value is not None else (None if t.shape is None else list(t.shape))


def _elementwise(ctx: _Context, index: int, node: gs.Node) -> None:
    """Residual adds, gates, attention maps and per-channel constants, after numpy broadcasting. The widest operand
    with a layout sets the output's channels; every other operand must be the same channel space along that axis
    (unified), broadcast along it (size 1: a one-channel attention map, a scalar, a [N,1,H,W] gate), or a constant
    with one value per channel (sliced with them)."""
    inputs = [(i, t) for i, t in enumerate(node.inputs) if t.name]
    laid = [(i, t) for i, t in inputs if t.name in ctx.layout]
    if not laid:
        return
    out = node.outputs[0]
    shapes = {i: _value_shape(t) for i, t in inputs}
    if any(shape is None for shape in shapes.values()):
        reason = f"{_label(node)} has an input of unknown rank"
        ctx.block_inputs(node, reason)
        ctx.opaque(out, ctx.layout[laid[0][1].name].axis, reason)
        return
    out_rank = max(len(shape) for shape in shapes.values())
    main, main_tensor = max(laid, key=lambda it: ctx.layout[it[1].name].size)  # first of the widest
    ref = ctx.layout[main_tensor.name]
    axis = ref.axis + out_rank - len(shapes[main])
    for i, t in inputs:
        if i == main:
            continue
        local = axis - (out_rank - len(shapes[i]))  # the output's channel axis in this operand's own axes
        lay = ctx.layout.get(t.name)
        size = 1 if local < 0 else lay.size if lay is not None and lay.axis == local else shapes[i][local]
        if lay is not None and lay.axis == local and lay.size == ref.size:
            ctx.unify(ref, lay, f"{_label(node)} combines channels that cannot be aligned")
        elif size == 1 and (lay is None or lay.size == 1):
            continue  # broadcast along the channels: the same for every channel, whichever are kept
        elif lay is None and constant_value(t) is not None and size == ref.size:
            ctx.edits.append(Edit(index, "slice", ref, input=i, axis=local))
        else:
            reason = f"{_label(node)} input {t.name!r} has channels of unknown origin"
            ctx.block_inputs(node, reason)
            if size != ref.size:  # the output does not have the layout's channels either
                ctx.opaque(out, axis, reason)
                return
    ctx.layout[out.name] = TensorChannels(axis, ref.segments)


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
    """A channel Slice takes a sub-range of its input's layout. Bounds computed at run time are fine where their values
    are static (e.g. torch.chunk in the legacy exporter reads the static channel count): the surgery writes the new
    bounds as constants. Where such bounds read a channel count and the Slice is not cut that way, the groups whose
    count they read are blocked, since the run-time value would change with the cut."""
    x = node.inputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    out, rank = node.outputs[0], _rank(x)
    reads = frozenset().union(*(ctx.shapes[t.name].roots for t in node.inputs[1:] if t.name in ctx.shapes))

    def keep_whole(problem: str, out_layout: TensorChannels | None = None) -> None:
        for r in reads:
            ctx.roots.block(r, f"{_label(node)} {problem}, with bounds that read a channel count at run time")
        if out_layout is not None:
            ctx.layout[out.name] = out_layout
            return
        ctx.block_tensor(x.name, f"{_label(node)} {problem}")
        ctx.opaque(out, lx.axis, f"{_label(node)} {problem}")

    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        values = [_static_values(ctx, t) for t in node.inputs[1:]] + [None] * 4
        starts, ends, axes, steps = values[:4]
        dynamic = [i for i in range(1, min(5, len(node.inputs))) if node.inputs[i].name and values[i - 1] is None]
        if 3 not in dynamic and axes is not None and rank and lx.axis not in [a % rank for a in axes]:
            keep_whole("slices other axes", out_layout=lx)
            return
        if dynamic or any(t.name in ctx.shapes for t in node.inputs[3:5]):
            keep_whole("has dynamic bounds")
            return
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
    axes = [a % rank for a in axes] if rank else axes
    if lx.axis not in axes:
        keep_whole("slices other axes", out_layout=lx)
        return
    k = axes.index(lx.axis)
    if steps[k] != 1:
        keep_whole(f"slices channels with step {steps[k]}")
        return
    lo, hi, _ = slice(starts[k], ends[k]).indices(lx.size)
    ctx.layout[out.name] = sub_layout(lx, lo, max(lo, hi))
    computed = "starts" not in node.attrs and any(t.name in ctx.shapes for t in node.inputs[1:3])
    bounds = (tuple(int(v) for v in starts), tuple(int(v) for v in ends)) if computed else None
    ctx.edits.append(Edit(index, "slice_bounds", lx, axis=k, bounds=bounds))


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


MAX_SEGMENTS = 1 << 14  # a reshape that would interleave more channel copies than this is kept whole instead


def _same_product(a: list, b: list) -> bool:
    """Whether two lists of dims have the same product: computed where all are static, else the same dims apart
    from ones (symbolic dims compare by name)."""
    if all(isinstance(d, int) for d in a + b):
        return int(np.prod(a, dtype=np.int64)) == int(np.prod(b, dtype=np.int64))
    if any(d is None for d in a + b):
        return False
    return [d for d in a if d != 1] == [d for d in b if d != 1]


def _static_product(dims: list) -> int | None:
    return int(np.prod(dims, dtype=np.int64)) if all(isinstance(d, int) for d in dims) else None


def _regroup(ctx: _Context, in_dims: list, out_dims: list, lx: TensorChannels, reason: str) -> TensorChannels | None:
    """Where a reshape (row-major, as ONNX Reshape and Flatten are) puts the channels of `lx`, or None where they do
    not stay a channel axis. Three exact cases:
    - kept: one output axis of the channel count, with as many elements before it as before the channel axis;
    - split into [g, C/g] (a channel shuffle's first step): the channel axis becomes the C/g one, which requires the
      g blocks to keep the same channels (they are unified);
    - merged with neighbouring axes into one (a shuffle's last step, a flatten): the layout is tiled by the size of
      the axes before it and every channel repeated by the size of those after it."""
    a, size = lx.axis, lx.size
    before, after = in_dims[:a], in_dims[a + 1:]
    for b in sorted(range(len(out_dims)), key=lambda b: b != a):  # where ones make several fit, the same axis first
        if out_dims[b] == size and _same_product(before, out_dims[:b]) and _same_product(after, out_dims[b + 1:]):
            return TensorChannels(b, lx.segments)
    for b in range(len(out_dims) - 1):
        blocks, per_block = out_dims[b], out_dims[b + 1]
        if isinstance(blocks, int) and isinstance(per_block, int) and blocks * per_block == size and \
                _same_product(before, out_dims[:b]) and _same_product(after, out_dims[b + 2:]):
            return TensorChannels(b + 1, ctx.tiles(lx, blocks, reason).segments)
    for b, dim in enumerate(out_dims):
        for first in range(a, -1, -1):
            for last in range(a, len(in_dims)):
                major, minor = _static_product(in_dims[first:a]), _static_product(in_dims[a + 1:last + 1])
                if major is None or minor is None or dim != major * size * minor or (first, last) == (a, a) or \
                        not _same_product(in_dims[:first], out_dims[:b]) or \
                        not _same_product(in_dims[last + 1:], out_dims[b + 1:]):
                    continue
                if major * size * minor > MAX_SEGMENTS:
                    return None
                return TensorChannels(b, tile(repeat_each(lx, minor), major).segments)
    return None


def _reshape(ctx: _Context, index: int, node: gs.Node) -> None:
    """Reshape and Flatten: exact where the channels stay one axis (_regroup). A Reshape's constant target names the
    channel count explicitly, -1 (inferred) or 0 (copied from the input): an explicit count becomes the kept count."""
    x, out = node.inputs[0], node.outputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    target = None
    if node.op == "Reshape":
        value = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if value is None or node.attrs.get("allowzero", 0):
            return _keep_whole(ctx, node, lx, "has a target shape computed at run time")
        target = [int(v) for v in np.asarray(value).reshape(-1)]
    in_dims, out_dims = x.shape, out.shape
    if in_dims is None or out_dims is None:
        return _keep_whole(ctx, node, lx, "has shapes that shape inference could not find")
    reason = f"{_label(node)} splits the channel axis into blocks that must keep the same channels"
    mine = _regroup(ctx, list(in_dims), list(out_dims), lx, reason)
    if mine is None:
        return _keep_whole(ctx, node, lx, "moves channels into other axes")
    if target is not None:
        if any(v == 0 and i == lx.axis and (mine.axis != i or mine.size != lx.size) for i, v in enumerate(target)):
            return _keep_whole(ctx, node, lx, "copies the channel count into another axis")
        if target[mine.axis] > 0:
            ctx.edits.append(Edit(index, "shape_entry", mine, input=1, axis=mine.axis))
    ctx.layout[out.name] = mine


def _keep_whole(ctx: _Context, node: gs.Node, lx: TensorChannels, problem: str) -> None:
    reason = f"{_label(node)} {problem}"
    ctx.block_tensor(node.inputs[0].name, reason)
    out = node.outputs[0]
    if _rank(out) and _rank(out) >= 2:
        ctx.opaque(out, 1, reason)  # like _blocker: an uncuttable stand-in where a channel axis usually is


def _squeeze(ctx: _Context, index: int, node: gs.Node) -> None:
    """Unsqueeze/Squeeze on other axes move the channel axis by the axes added or removed before it."""
    x, out = node.inputs[0], node.outputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    axes = _optional_constant(node, 1, "axes")
    rank = _rank(x)
    if node.op == "Squeeze" and axes is None and x.shape is not None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    if axes is None or rank is None:
        return _keep_whole(ctx, node, lx, "has axes that are not constant")
    if node.op == "Unsqueeze":
        out_rank = rank + len(axes)
        added = {a % out_rank for a in axes}
        axis = [i for i in range(out_rank) if i not in added][lx.axis]
    else:
        removed = {a % rank for a in axes}
        if lx.axis in removed:
            return _keep_whole(ctx, node, lx, "removes the channel axis")
        axis = lx.axis - sum(a < lx.axis for a in removed)
    ctx.layout[out.name] = TensorChannels(axis, lx.segments)


def _tile(ctx: _Context, index: int, node: gs.Node) -> None:
    """Tile repeating other axes (tf2onnx image pooling broadcasts [1,1,1,C] to [1,H,W,C]) keeps the channels."""
    lx = ctx.layout.get(node.inputs[0].name)
    if lx is None:
        return
    repeats = ctx.value(node.inputs[1]) if len(node.inputs) > 1 else None
    if repeats is None or np.asarray(repeats).reshape(-1)[lx.axis] != 1:
        return _keep_whole(ctx, node, lx, "repeats the channel axis or has run-time repeats")
    ctx.layout[node.outputs[0].name] = lx


def _expand(ctx: _Context, index: int, node: gs.Node) -> None:
    """Expand is broadcasting written out. Onto the same channel count (or 1) it keeps the channels; a one-channel
    map expanded to C channels (a gate made explicit) is C copies, a channel space of its own that follows whatever
    it is combined with. An explicit C in the constant target becomes the kept count."""
    x, out = node.inputs[0], node.outputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    target = constant_value(node.inputs[1])
    rank = _rank(x)
    if target is None or rank is None:
        return _keep_whole(ctx, node, lx, "expands to a shape computed at run time")
    target = [int(v) for v in np.asarray(target).reshape(-1)]
    out_rank = max(rank, len(target))
    axis = lx.axis + out_rank - rank
    k = axis - (out_rank - len(target))
    entry = target[k] if k >= 0 else 1
    if entry in (1, lx.size):
        mine = TensorChannels(axis, lx.segments)
    elif lx.size == 1:
        mine = TensorChannels(axis, (Segment(ctx.roots.new(entry), 0, entry),))
    else:
        return _keep_whole(ctx, node, lx, "expands the channel axis")
    if k >= 0 and entry > 1:
        ctx.edits.append(Edit(index, "shape_entry", mine, input=1, axis=k))
    ctx.layout[out.name] = mine


def _gemm(ctx: _Context, index: int, node: gs.Node) -> None:
    """Gemm on pooled channels ([N, C] -> [N, K], squeeze-excite): like a 1x1 conv, it consumes the columns of A
    (rows of B, or columns with transB) and opens a new channel space of its outputs (B's other axis, and C)."""
    a, out = node.inputs[0], node.outputs[0]
    la = ctx.layout.get(a.name)
    if la is None:
        if any(t.name in ctx.layout for t in node.inputs[1:]):
            ctx.block_inputs(node, f"{_label(node)} multiplies channels that are not its first input's")
        return
    weight = constant_value(node.inputs[1])
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    bias = constant_value(node.inputs[2]) if has_bias else None
    contracted = 0 if node.attrs.get("transA", 0) else 1
    if weight is None or la.axis != contracted or (has_bias and bias is None):
        return _keep_whole(ctx, node, la, "is not a product of its input's channels with constant weights")
    k_axis = 1 if node.attrs.get("transB", 0) else 0
    ctx.edits.append(Edit(index, "consume", la, input=1, axis=k_axis))
    pooled = _pooled_source(ctx, a, la)
    if pooled is not None:
        ctx.observed.setdefault(pooled, ctx.layout[pooled])
    size = weight.shape[1 - k_axis]
    mine = TensorChannels(1, (Segment(ctx.roots.new(size, producer=node.name or node.op), 0, size),))
    ctx.edits.append(Edit(index, "slice", mine, input=1, axis=1 - k_axis))
    if bias is None or (np.ndim(bias) >= 1 and np.shape(bias)[-1] == size > 1):
        # Recorded even without C: mean compensation may give the Gemm one, which must be cut like its outputs.
        ctx.edits.append(Edit(index, "slice", mine, input=2, axis=0 if bias is None else np.ndim(bias) - 1))
    ctx.layout[out.name] = mine


def _pooled_source(ctx: _Context, t: gs.Tensor, lay: TensorChannels) -> str | None:
    """The [N,C,1,1] feature map a Gemm's [N,C] input is a reshape of (GlobalAveragePool -> Flatten): attribution
    observes NCHW feature maps, so that is where it can score those channels and measure the means that mean
    compensation folds into the Gemm."""
    while t.inputs and t.inputs[0].op in ("Flatten", "Reshape", "Squeeze"):
        t = t.inputs[0].inputs[0]
        src = ctx.layout.get(t.name)
        if src is not None and _rank(t) == 4 and src.axis == 1 and src.size == lay.size and \
                all(d == 1 for d in t.shape[2:]):
            return t.name
    return None


def _matmul(ctx: _Context, index: int, node: gs.Node) -> None:
    """MatMul [.., M, K] x [.., K, N]. Channels on a row axis of A, a column axis of B or a batch axis pass
    through (position attention: [N,C,HW] x [N,HW,HW] keeps C). Channels on the contracted axis are summed over:
    exact only against a constant B (a linear layer on channels-last data: cut like a Gemm); against another
    feature map (attention energies q^T k) every output mixes all channels, and so does a product that pairs the
    channels of both operands (a channel Gram matrix)."""
    a, b, out = node.inputs[0], node.inputs[1], node.outputs[0]
    la, lb = ctx.layout.get(a.name), ctx.layout.get(b.name)
    if la is None and lb is None:
        return
    ra, rb = _rank(a), len(_value_shape(b) or []) or None
    if ra is None or rb is None or ra < 2 or rb < 2:
        ctx.block_inputs(node, f"{_label(node)} has operands of unknown or vector rank")
        return
    out_rank = max(ra, rb)
    weight = constant_value(b)
    if la is not None and la.axis == ra - 1 and weight is not None:
        ctx.edits.append(Edit(index, "consume", la, input=1, axis=rb - 2))
        size = weight.shape[-1]
        mine = TensorChannels(out_rank - 1, (Segment(ctx.roots.new(size, producer=node.name or node.op), 0, size),))
        ctx.edits.append(Edit(index, "slice", mine, input=1, axis=rb - 1))
        ctx.layout[out.name] = mine
        return
    if (la is not None and la.axis == ra - 1) or (lb is not None and lb.axis == rb - 2):
        ctx.block_inputs(node, f"{_label(node)} sums over the channel axis of a feature map: every output mixes all "
                               f"channels")
        return  # the operands are kept whole, so the product does not change with any cut: no layout
    if la is not None and lb is not None:
        ctx.block_inputs(node, f"{_label(node)} pairs the channels of both operands")
        return
    lay, rank, other = (la, ra, b) if la is not None else (lb, rb, a)
    axis = lay.axis + out_rank - rank
    other_shape = _value_shape(other)
    local = axis - (out_rank - len(other_shape))
    if axis < out_rank - 2 and local >= 0 and other_shape[local] != 1:  # a batch axis the other operand also spans
        ctx.block_inputs(node, f"{_label(node)} multiplies per channel with an operand of unknown channels")
        return
    ctx.layout[out.name] = TensorChannels(axis, lay.segments)


def _read_shape(ctx: _Context, index: int, node: gs.Node) -> None:
    """Shape/Size read no values, but what they read may be a channel count that a cut changes. Such values are
    followed element by element through shape arithmetic (_follow_shape_value); wherever one is used in a way the
    analysis cannot check, the groups whose count it carries are blocked."""
    x = node.inputs[0]
    lx = ctx.layout.get(x.name)
    if lx is None:
        return
    roots = frozenset(s.group for s in lx.segments)
    rank = _rank(x)
    if node.op == "Size" or rank is None:
        ctx.shapes[node.outputs[0].name] = _ShapeValue(None, roots)
        return
    entries = [lx if i == lx.axis else None for i in range(rank)]
    static = [d if isinstance(d, int) else None for d in x.shape]
    start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
    entries, static = entries[slice(start, end)], static[slice(start, end)]
    if any(e is not None for e in entries):
        ctx.shapes[node.outputs[0].name] = _ShapeValue(tuple(entries), roots, tuple(static))


# Ops that move elements of small 1-D shape values around (followed element by element), and ops that compute with
# them (the result depends on the same counts, element correspondence lost).
SHAPE_FOLLOWERS = {"Identity", "Cast", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze"}
SHAPE_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Max", "Min", "Floor", "Ceil", "Sqrt", "Equal",
                    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Where", "Not", "And", "Or", "ReduceProd",
                    "ReduceSum", "ReduceMax", "ReduceMin", "Sign", "Clip"}


def _shape_computation(ctx: _Context, node: gs.Node) -> bool:
    """Follow a node that computes with channel-count values; True if that is all it does (no feature map in or out).
    A node that uses such a value otherwise (Reshape target, Expand, ConstantOfShape, Slice bounds on a feature map,
    ...) blocks the groups the value depends on, and is then analysed by its own rule."""
    values = [ctx.shapes.get(t.name) for t in node.inputs]
    if not any(values):
        return False
    roots = frozenset().union(*(v.roots for v in values if v))
    if not any(t.name in ctx.layout for t in node.inputs) and node.op in SHAPE_FOLLOWERS | SHAPE_ARITHMETIC:
        entries = _follow_shape_value(ctx, node) if node.op in SHAPE_FOLLOWERS else _arithmetic_entries(ctx, node)
        if entries is not None:  # exact: only the counts actually selected
            roots = frozenset(s.group for e in entries if e is not None for s in e.segments)
        static = _static_result(ctx, node)
        for out in node.outputs:
            ctx.shapes[out.name] = _ShapeValue(entries, roots, static)
        return True
    if node.op == "Resize" and all(v is None or i == 3 for i, v in enumerate(values)):
        return False  # run-time sizes: _check_resize verifies them against the resized tensor
    if node.op == "Slice" and node.inputs[0].name in ctx.layout:
        return False  # a Slice of a feature map checks its own bounds (_slice)
    for r in roots:
        ctx.roots.block(r, f"{_label(node)} uses a channel count read at run time (Shape) in a way that does not "
                           f"follow the cut")
    return False


def _arithmetic_entries(ctx: _Context, node: gs.Node) -> tuple[None, ...] | None:
    """Elementwise arithmetic on values none of whose elements is a channel count (e.g. padding computed from the
    height) gives such a value too; where any element is one, the correspondence is lost (None)."""
    if node.op.startswith("Reduce"):
        return None
    parts = [_elements(ctx, t) for t in node.inputs if t.name]
    if any(p is None or any(e is not None for e in p) for p in parts):
        return None
    n = max(len(p) for p in parts)
    return (None,) * n if all(len(p) in (1, n) for p in parts) else None


def _elements(ctx: _Context, t: gs.Tensor) -> list[TensorChannels | None] | None:
    """Per-element channel entries of a small integer tensor: tracked, constant (no channel counts), or of static
    size and free of any channel count."""
    if t.name in ctx.shapes:
        entries = ctx.shapes[t.name].entries
        return None if entries is None else list(entries)
    value = constant_value(t)
    if value is not None:
        return [None] * int(np.asarray(value).size)
    shape = t.shape
    if shape is not None and all(isinstance(d, int) for d in shape):
        return [None] * int(np.prod(shape, dtype=np.int64))
    return None


def _static_values(ctx: _Context, t: gs.Tensor) -> list[int] | None:
    """The static integer values of a small tensor: constant, or a followed shape value whose dims are all static."""
    values = _partly_static(ctx, t)
    return None if values is None or any(v is None for v in values) else values


def _partly_static(ctx: _Context, t: gs.Tensor) -> list[int | None] | None:
    """Per element, the static value of a small integer tensor (None for elements that read a dynamic dim)."""
    if not t.name:
        return None
    if t.name in ctx.shapes:
        static = ctx.shapes[t.name].static
        return None if static is None else list(static)
    value = constant_value(t)
    if value is None or not np.issubdtype(np.asarray(value).dtype, np.integer):
        return None
    return [int(v) for v in np.asarray(value).reshape(-1)]


_STATIC_ARITHMETIC: dict[str, Callable[[int, int], int]] = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Div": lambda a, b: int(a / b),  # integer Div truncates toward zero
    "Max": max, "Min": min,
}


def _static_result(ctx: _Context, node: gs.Node) -> tuple[int | None, ...] | None:
    """Evaluate a shape computation on static values, element by element (None where that is not possible)."""
    args = [_partly_static(ctx, t) for t in node.inputs if t.name]
    if not args or args[0] is None:
        return None
    if node.op in ("Gather", "Slice"):  # indices and bounds are read as constants
        return _move_elements(node, args[0])
    if any(a is None for a in args):
        return None
    if node.op in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
        return tuple(args[0])
    if node.op == "Concat":
        return tuple(v for a in args for v in a)
    if node.op in _STATIC_ARITHMETIC and len(args) == 2 and len(args[0]) in (1, len(args[1])) and \
            len(args[1]) in (1, len(args[0])):
        n = max(len(args[0]), len(args[1]))
        a, b = (x * n if len(x) == 1 else x for x in args)
        if node.op == "Div" and 0 in b:
            return None
        return tuple(None if x is None or y is None else _STATIC_ARITHMETIC[node.op](x, y) for x, y in zip(a, b))
    return None


def _follow_shape_value(ctx: _Context, node: gs.Node) -> tuple[TensorChannels | None, ...] | None:
    data = _elements(ctx, node.inputs[0])
    if data is None:
        return None
    if node.op == "Concat":
        parts = [_elements(ctx, t) for t in node.inputs if t.name]
        return None if any(p is None for p in parts) else tuple(e for p in parts for e in p)
    return _move_elements(node, data)


def _move_elements(node: gs.Node, data: list) -> tuple | None:
    """Apply a follower's element moves (Identity, Cast, Unsqueeze, Squeeze, Gather, Slice of a 1-D value) to a list."""
    if node.op in ("Identity", "Cast", "Unsqueeze", "Squeeze"):
        return tuple(data)
    if node.op == "Gather":
        indices = constant_value(node.inputs[1])
        if indices is None or int(node.attrs.get("axis", 0)) != 0:
            return None
        return tuple(data[int(i)] for i in np.asarray(indices).reshape(-1))
    # Slice of a 1-D value
    if "starts" in node.attrs:
        starts, ends, axes, steps = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes", [0]), [1]
    else:
        args = [constant_value(t) if t.name else None for t in node.inputs[1:]] + [None] * 4
        if args[0] is None or args[1] is None or any(args[i] is None and len(node.inputs) > i + 1 and
                                                    node.inputs[i + 1].name for i in (2, 3)):
            return None
        starts, ends = args[0].tolist(), args[1].tolist()
        axes = [0] if args[2] is None else args[2].tolist()
        steps = [1] if args[3] is None else args[3].tolist()
    if len(starts) != 1 or axes[0] not in (0, -1):
        return None
    return tuple(data[slice(*slice(int(starts[0]), int(ends[0]), int(steps[0])).indices(len(data)))])


def _softmax(ctx: _Context, index: int, node: gs.Node) -> None:
    """Softmax and friends normalise over an axis: harmless elsewhere, but over the channel axis every output depends
    on every channel. In particular a softmax over fewer classes is not the original restricted to them."""
    lx = ctx.layout.get(node.inputs[0].name)
    if lx is None:
        return
    rank = _rank(node.inputs[0])
    if rank is None:
        touches = True
    elif ctx.graph.opset < 13:  # the input is coerced to 2-D: normalised over all axes from `axis` on
        touches = lx.axis >= int(node.attrs.get("axis", 1)) % rank
    else:
        touches = int(node.attrs.get("axis", -1)) % rank == lx.axis
    if touches:
        ctx.block_tensor(node.inputs[0].name, f"{_label(node)} normalises over the channel axis: cutting channels (or "
                                              f"output classes) would change every remaining value")
    ctx.layout[node.outputs[0].name] = lx


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
    **{op: _read_shape for op in SHAPE_READERS},
    **{op: _softmax for op in ("Softmax", "LogSoftmax")},
    "Conv": _conv, "ConvTranspose": _conv,
    "BatchNormalization": _norm, "InstanceNormalization": _norm,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Transpose": _transpose,
    "Reshape": _reshape, "Flatten": _reshape, "Squeeze": _squeeze, "Unsqueeze": _squeeze, "Tile": _tile,
    "Expand": _expand, "Gemm": _gemm, "MatMul": _matmul,
}


def analyse(graph_or_model: gs.Graph | onnx.ModelProto) -> ChannelAnalysis:
    """Channel groups of a (shape-inferred) graph. Does not modify its argument."""
    graph = gs.import_onnx(graph_or_model) if isinstance(graph_or_model, onnx.ModelProto) else graph_or_model
    ctx = _Context(graph)
    layout_hint = _layout_hint(graph_or_model)
    for t in graph.inputs:
        axis = _input_channel_axis(t, layout_hint)
        size = _dim(t, axis)
        if size is not None:
            root = ctx.roots.new(size, blocked="model input channels")
            ctx.layout[t.name] = TensorChannels(axis, (Segment(root, 0, size),))
    for index, node in enumerate(graph.nodes):
        if not _shape_computation(ctx, node):
            RULES.get(node.op, _blocker)(ctx, index, node)
    for out in graph.outputs:
        if out.name in ctx.shapes:
            for r in ctx.shapes[out.name].roots:
                ctx.roots.block(r, f"graph output {out.name!r} carries a channel count")

    class_root = _class_root(ctx, graph)
    for out in graph.outputs:
        if out.name in ctx.layout and (class_root is None or out is not graph.outputs[0]):
            ctx.block_tensor(out.name, f"feeds graph output {out.name!r}")
    return _finish(ctx, graph, class_root)


def _layout_hint(graph_or_model: gs.Graph | onnx.ModelProto) -> str | None:
    if isinstance(graph_or_model, onnx.ModelProto):
        return next((p.value for p in graph_or_model.metadata_props if p.key == "disasm.layout"), None)
    return None


def _input_channel_axis(t: gs.Tensor, layout_hint: str | None) -> int:
    """Axis 1, unless the model says it takes NHWC images (metadata disasm.layout) or every consumer of a rank-4 input
    is the NHWC -> NCHW Transpose that tf2onnx-style exports start with."""
    rank = _rank(t)
    if rank == 4 and (layout_hint == "nhwc" or (t.outputs and all(
            n.op == "Transpose" and list(n.attrs.get("perm", [])) == [0, 3, 1, 2] for n in t.outputs))):
        return 3
    return 1


def _class_root(ctx: _Context, graph: gs.Graph) -> int | None:
    """The root of the first output, if that output is one whole conv output space (the class logits)."""
    lay = ctx.layout.get(graph.outputs[0].name) if graph.outputs else None
    if lay is None:
        return None
    lay = ctx.resolve(lay)
    if len(lay.segments) != 1:
        return None
    seg = lay.segments[0]
    if seg.start != 0 or seg.size != ctx.roots.size[seg.group]:
        return None
    return seg.group


def _finish(ctx: _Context, graph: gs.Graph, class_root: int | None) -> ChannelAnalysis:
    """Renumber the live union-find roots into compact group ids (in order of creation), resolve every layout and
    edit to them, and collect group facts."""
    ids: dict[int, int] = {}
    groups: list[ChannelGroup] = []
    for r in range(len(ctx.roots.parent)):
        rep = ctx.roots.find(r)
        if rep not in ids and rep not in ctx.roots.parts:
            ids[rep] = len(groups)
            groups.append(ChannelGroup(ids[rep], ctx.roots.size[rep], producers=list(ctx.roots.producers.get(rep, [])),
                                       blocked=list(ctx.roots.reasons.get(rep, []))))

    def remap(t: TensorChannels) -> TensorChannels:
        live = ctx.resolve(t)
        return TensorChannels(t.axis, tuple(Segment(ids[s.group], s.start, s.stop) for s in live.segments))

    tensors = {name: remap(t) for name, t in ctx.layout.items()}
    for name, t in tensors.items():
        for g in dict.fromkeys(s.group for s in t.segments):
            groups[g].tensors.append(name)
    for name, t in ctx.observed.items():
        for g in dict.fromkeys(s.group for s in tensors[name].segments):
            groups[g].observed.append(name)
    edits = [replace(e, channels=remap(e.channels)) for e in ctx.edits]
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
        out_groups = {s.group for s in tensors[node.outputs[0].name].segments}
        lx = tensors.get(node.inputs[0].name)
        if lx is not None:
            for s in lx.segments:
                consumers[s.group] |= out_groups - {s.group}
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
