"""What a specialised model outputs: the chosen categories and one "none" channel, or the paper's restricted classes.

`chosen-or-none` (the default): one channel per chosen category, in the model's order, plus one "none" channel: the
model's background class where it has one (at its own place in that order), else a new channel `other`, last. The
none channel holds the largest score of every class that is not chosen, so the pruned argmax is the full model's
argmax with each non-chosen class read as none, exactly (ties aside): the class conv keeps every row and the max is
taken after the output (a Split of the class scores, a ReduceMax or Max of the others, a Concat). The max, not
the sum, also for probabilities: with a sum a chosen class would need more than all others together to win, which is
not what the full model answers. Sigmoid (multi-label) models answer per category: they keep just the chosen channels.
`restricted` keeps the chosen classes plus background and reads the full model by argmax over those only (the
paper's protocol; it labels a bus as car).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from disasm.compiler.graphs import export_like

MODES = ("chosen-or-none", "restricted")
OTHER = "other"


@dataclass(frozen=True)
class OutputPlan:
    """The specialised output: per channel its name and the full model's class ids it takes the max of."""

    names: tuple[str, ...]
    sources: tuple[tuple[int, ...], ...]
    none: str | None  # the name of the "none" channel, if there is one
    mode: str

    @property
    def none_index(self) -> int | None:
        return None if self.none is None else self.names.index(self.none)

    @property
    def row_order(self) -> np.ndarray:
        """The full model's classes in the order that makes every output channel's sources contiguous."""
        return np.array([c for sources in self.sources for c in sources], dtype=np.int64)

    @property
    def single_sources(self) -> np.ndarray | None:
        """The class ids in output order when every channel is one class (the class conv can then be sliced)."""
        if all(len(s) == 1 for s in self.sources):
            return np.array([s[0] for s in self.sources], dtype=np.int64)
        return None


def plan_outputs(classes: tuple[str, ...], chosen: list[str], background: str | None, output_kind: str,
                 mode: str = "chosen-or-none") -> OutputPlan:
    if mode not in MODES:
        raise ValueError(f"output mode {mode!r}; expected one of {', '.join(MODES)}")
    ids = [classes.index(c) for c in chosen]
    if output_kind == "sigmoid":  # independent per-class answers: nothing else to fold into "none"
        return OutputPlan(tuple(classes[i] for i in ids), tuple((i,) for i in ids), None, mode)
    back = classes.index(background) if background is not None else None
    if mode == "restricted":
        kept = sorted(set(ids) | ({back} if back is not None else set()))
        return OutputPlan(tuple(classes[i] for i in kept), tuple((i,) for i in kept), background, mode)
    others = tuple(i for i in range(len(classes)) if i not in ids)
    if back is None:
        none = next(n for n in (OTHER, "none", "not chosen") if n not in classes)  # never a class's own name
        return OutputPlan(tuple(classes[i] for i in ids) + (none,), tuple((i,) for i in ids) + (others,), none, mode)
    order = sorted(ids + [back])
    return OutputPlan(tuple(classes[i] for i in order), tuple(others if i == back else (i,) for i in order),
                      background, mode)


def _reduce_max(graph: gs.Graph, x: gs.Variable, axis: int, opset: int, name: str) -> gs.Variable:
    out = gs.Variable(f"{name}__none", dtype=x.dtype)
    if opset >= 18:  # axes became an input
        axes = gs.Constant(f"{name}__none_axes", np.array([axis], np.int64))
        graph.nodes.append(gs.Node("ReduceMax", f"{name}__none", {"keepdims": 1}, [x, axes], [out]))
    else:
        graph.nodes.append(gs.Node("ReduceMax", f"{name}__none", {"axes": [axis], "keepdims": 1}, [x], [out]))
    return out


def _split(graph: gs.Graph, x: gs.Variable, sizes: list[int], axis: int, opset: int, name: str,
           outputs: list[gs.Variable]) -> None:
    split = gs.Constant(f"{name}_sizes", np.array(sizes, np.int64))
    if opset >= 13:  # the sizes became an input
        graph.nodes.append(gs.Node("Split", name, {"axis": axis}, [x, split], outputs))
    else:
        graph.nodes.append(gs.Node("Split", name, {"axis": axis, "split": sizes}, [x], outputs))


# Ops that only move axes (or nothing): the chosen-or-none channels commute with them exactly.
_LAYOUT_ONLY = ("Transpose", "Identity")


def _layout_tail(graph: gs.Graph, out: gs.Variable, axis: int) -> tuple[gs.Tensor, int, list[gs.Node]]:
    """The tensor before the Transposes / Identities that end the graph at `out` (each the only reader of its input),
    its class axis, and those nodes, last first. The head is built on that tensor: a tf2onnx model's final
    NCHW -> NHWC Transpose then moves the few output channels instead of every class, and the head splits and reduces
    whole contiguous planes instead of strided pixels (measured on the 513x513 Cityscapes DeepLab, ONNX Runtime CPU:
    the head's +9.1 ms, 10% of the model's time, falls to about nothing)."""
    tensor, tail = out, []
    while len(tensor.inputs) == 1 and tensor.inputs[0].op in _LAYOUT_ONLY:
        node = tensor.inputs[0]
        source = node.inputs[0]
        if isinstance(source, gs.Constant) or len(source.outputs) != 1 or source in graph.outputs + graph.inputs:
            break
        if node.op == "Transpose":
            perm = node.attrs.get("perm")
            if perm is None and source.shape is None:
                break
            perm = list(perm) if perm is not None else list(reversed(range(len(source.shape))))
            axis = perm[axis]
        tail.append(node)
        tensor = source
    return tensor, axis, tail


def add_output_head(model: onnx.ModelProto, plan: OutputPlan, axis: int,
                    rows: np.ndarray | None = None) -> onnx.ModelProto:
    """`model` (whose single output holds every class on `axis`) with its output replaced by the plan's channels.
    `rows`: the full model's class id of each output channel of `model` (default: all classes in order); when the
    class conv's rows were put in `plan.row_order`, every piece is contiguous and one Split takes them apart, which
    costs ONNX Runtime a fraction of per-piece Gathers (measured: +6% vs +27% of the whole model's time on the
    513x513 Cityscapes DeepLab). Where the output is written by Transposes (or Identities) alone, the head goes before
    them (`_layout_tail`); the values are the same. The output keeps its name; `model` is not modified."""
    graph = gs.import_onnx(model)
    out, out_axis = graph.outputs[0], axis
    everything, axis, tail = _layout_tail(graph, out, axis)
    if tail:
        result = gs.Variable(f"{out.name}__chosen", dtype=out.dtype)
        tail[-1].inputs[0] = result
        for node in tail:
            for tensor in node.outputs:
                if tensor is not out:
                    tensor.shape = None  # fewer channels now; re-inferred on export
    else:
        everything = gs.Variable(f"{out.name}__all_classes", dtype=out.dtype)
        for producer in list(out.inputs):
            producer.outputs[producer.outputs.index(out)] = everything
        result = out
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    rows = np.arange(sum(len(s) for s in plan.sources)) if rows is None else np.asarray(rows)
    pieces: list[tuple[int, list[int]]] = []  # (first output channel, classes): runs of single classes, folded ones
    for i, sources in enumerate(plan.sources):
        if len(sources) == 1 and pieces and len(plan.sources[i - 1]) == 1:
            pieces[-1][1].append(sources[0])
        else:
            pieces.append((i, list(sources)))
    if [c for _, classes in pieces for c in classes] == rows.tolist():  # every piece contiguous: one Split
        parts = [everything]
        if len(pieces) > 1:
            parts = [gs.Variable(f"{out.name}__part{i}", dtype=out.dtype) for i, _ in pieces]
            _split(graph, everything, [len(c) for _, c in pieces], axis, opset, f"{out.name}__parts", parts)
        tensors = [_reduce_max(graph, part, axis, opset, f"{out.name}_{i}") if len(plan.sources[i]) > 1 else part
                   for part, (i, _) in zip(parts, pieces)]
    else:  # the rows keep the model's order (a Softmax over them, say): Split into single rows, a Max per "none"
        # (measured on road-segmentation's 512x896 probabilities: 3.4 ms against 6.6 ms for Gathers + ReduceMax,
        # benchmarks/results/softmax_head.md)
        singles = [gs.Variable(f"{out.name}__row{k}", dtype=out.dtype) for k in range(len(rows))]
        _split(graph, everything, [1] * len(rows), axis, opset, f"{out.name}__rows", singles)
        position = {int(c): k for k, c in enumerate(rows)}
        tensors = []
        for i, sources in enumerate(plan.sources):
            inputs = [singles[position[c]] for c in sources]
            if len(inputs) > 1:
                tensors.append(gs.Variable(f"{out.name}_{i}__none", dtype=out.dtype))
                graph.nodes.append(gs.Node("Max", f"{out.name}_{i}__none", {}, inputs, [tensors[-1]]))
            else:
                tensors += inputs
    if len(tensors) == 1:
        graph.nodes.append(gs.Node("Identity", f"{out.name}__head", {}, tensors, [result]))
    else:
        graph.nodes.append(gs.Node("Concat", f"{out.name}__head", {"axis": axis}, tensors, [result]))
    if out.shape is not None:
        shape = list(out.shape)
        shape[out_axis] = len(plan.names)
        out.shape = shape
    return export_like(graph, model)
