"""ONNX channel surgery: apply keep-sets per channel group to a graph, exactly.

compiler.prune takes keep-sets (group id -> sorted kept channel indices), never scores. Every cut is one of the edits
recorded by the channel analysis, so the surgery is a small loop over edit kinds. The result must equal the masked
reference (`masked_reference`): the original model with every removed channel zeroed at the input of each consumer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from disasm.compiler.channels import ChannelAnalysis, Edit, constant_value
from disasm.compiler.graphs import export_like


def _checked_keep_sets(analysis: ChannelAnalysis, keep_sets: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    clean: dict[int, np.ndarray] = {}
    for gid, keep in keep_sets.items():
        group = analysis.groups[gid]
        keep = np.asarray(keep, dtype=np.int64).reshape(-1)
        if gid != analysis.class_group or np.unique(keep).size != keep.size:
            keep = np.unique(keep)  # only the class conv's rows may also be reordered (compiler.outputs)
        if keep.size == 0 or keep.min() < 0 or keep.max() >= group.size:
            raise ValueError(f"keep-set of group {gid} must be non-empty indices in [0, {group.size}); got {keep.size} "
                             f"indices in [{keep.min(initial=0)}, {keep.max(initial=0)}]")
        if group.blocked and keep.size != group.size:
            raise ValueError(f"group {gid} is blocked ({group.blocked[0]}) and must be kept whole")
        clean[gid] = keep
    return clean


def _input_value(node: gs.Node, index: int) -> np.ndarray | None:
    """The constant an edit rewrites; None for an omitted optional input (a conv without bias). The analysis only
    records edits on constant inputs, so anything else is a bug that must not pass silently."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    value = constant_value(node.inputs[index])
    if value is None:
        raise AssertionError(f"{node.op} {node.name!r}: input {index} ({node.inputs[index].name!r}) is not a constant")
    return np.array(value)


def _label(graph: gs.Graph, node: gs.Node) -> str:
    """A stable name for naming new constants: the node's own, else its position (never a memory address, so the
    same inputs give the same pruned bytes)."""
    return node.name or f"node{graph.nodes.index(node)}"


def _set_input(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray) -> None:
    label = _label(graph, node)
    old = node.inputs[index].name if index < len(node.inputs) and node.inputs[index].name else f"{label}_input{index}"
    constant = gs.Constant(f"{old}__pruned_{label}_{index}", np.ascontiguousarray(value))
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = constant


def _apply(graph: gs.Graph, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray], zero_consumers: bool,
           replacements: Mapping[tuple[int, int], np.ndarray] | None) -> None:
    """Apply every edit of the analysis. Replacements (compensated weights, in the original shapes) are the starting
    values of their inputs and are then cut like the originals."""
    values: dict[tuple[int, int], np.ndarray] = {k: np.array(v) for k, v in (replacements or {}).items()}
    for edit in analysis.edits:
        node = graph.nodes[edit.node]
        kept = edit.channels.kept_indices(keep_sets)
        if edit.kind in ("slice", "consume", "shape_entry"):
            key = (edit.node, edit.input)
            value = values.get(key)
            value = _input_value(node, edit.input) if value is None else value
            if value is None or np.array_equal(kept, np.arange(edit.channels.size)):
                continue  # nothing cut and nothing reordered
            values[key] = _edit_value(value, edit, kept, zero_consumers)
        elif zero_consumers or (kept.size == edit.channels.size and edit.bounds is None):
            continue  # (bounds computed at run time are always written as constants: they may read other cut groups)
        elif edit.kind == "group":
            node.attrs["group"] = int(kept.size)
        elif edit.kind == "split":
            _rewrite_split(graph, node, analysis, keep_sets)
        elif edit.kind == "slice_bounds":
            _rewrite_slice(graph, node, edit, keep_sets)
    for (node_index, input_index), value in values.items():
        _set_input(graph, graph.nodes[node_index], input_index, value)


def _edit_value(value: np.ndarray, edit: Edit, kept: np.ndarray, zero_consumers: bool) -> np.ndarray:
    if edit.kind == "shape_entry":
        if zero_consumers:
            return value
        value = value.copy()
        value[edit.axis] = kept.size
        return value
    if not zero_consumers:
        return np.take(value, kept, axis=edit.axis)
    if edit.kind == "consume":
        removed = np.setdiff1d(np.arange(value.shape[edit.axis]), kept)
        value = value.copy()
        index = [slice(None)] * value.ndim
        index[edit.axis] = removed
        value[tuple(index)] = 0
    return value


def _rewrite_split(graph: gs.Graph, node: gs.Node, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray]) -> None:
    sizes = [int(analysis.tensors[out.name].kept_indices(keep_sets).size) for out in node.outputs]
    if any(s == 0 for s in sizes):
        raise ValueError(f"Split {node.name!r}: the keep-sets remove every channel of one of its outputs")
    node.attrs.pop("num_outputs", None)
    if "split" in node.attrs:
        node.attrs["split"] = sizes
    else:
        value = np.asarray(sizes, dtype=np.int64)
        if len(node.inputs) > 1:
            node.inputs[1] = gs.Constant(f"{_label(graph, node)}__split", value)
        else:
            node.inputs.append(gs.Constant(f"{_label(graph, node)}__split", value))


def _rewrite_slice(graph: gs.Graph, node: gs.Node, edit: Edit, keep_sets: dict[int, np.ndarray]) -> None:
    lx = edit.channels
    if "starts" in node.attrs:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
    elif edit.bounds is not None:  # computed at run time from channel counts the cut changes: written as constants
        starts, ends = list(edit.bounds[0]), list(edit.bounds[1])
    else:
        starts, ends = constant_value(node.inputs[1]).tolist(), constant_value(node.inputs[2]).tolist()
    lo, hi, _ = slice(starts[edit.axis], ends[edit.axis]).indices(lx.size)
    kept = lx.kept_indices(keep_sets)
    new_lo, new_hi = int(np.searchsorted(kept, lo)), int(np.searchsorted(kept, max(lo, hi)))
    if new_hi <= new_lo:
        raise ValueError(f"Slice {node.name!r}: the keep-sets remove every channel it selects")
    starts[edit.axis], ends[edit.axis] = new_lo, new_hi
    if "starts" in node.attrs:
        node.attrs["starts"], node.attrs["ends"] = starts, ends
    else:
        dtype = np.int64 if edit.bounds is not None else constant_value(node.inputs[1]).dtype
        node.inputs[1] = gs.Constant(f"{node.inputs[1].name}__pruned_{_label(graph, node)}", np.asarray(starts, dtype))
        node.inputs[2] = gs.Constant(f"{node.inputs[2].name}__pruned_{_label(graph, node)}", np.asarray(ends, dtype))


def _export(graph: gs.Graph, original: onnx.ModelProto, metadata: Mapping[str, str] | None) -> onnx.ModelProto:
    """Drop stale intermediate shapes, re-infer them, and carry the original's identity and metadata over."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs:
            tensor.shape = None if tensor not in graph.outputs else tensor.shape
    proto = export_like(graph, original, metadata)
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _set_output_channels(graph: gs.Graph, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray]) -> None:
    for out in graph.outputs:
        lay = analysis.tensors.get(out.name)
        if lay is not None and out.shape is not None:
            shape = list(out.shape)
            shape[lay.axis] = int(lay.kept_indices(keep_sets).size)
            out.shape = shape


def _gather_output(graph: gs.Graph, keep: np.ndarray, axis: int) -> None:
    """Keep only `keep` along `axis` of the first output, by a Gather at the very end. For class heads that cannot be
    sliced (a Softmax normalising over the classes): the kept classes' values are then exactly the full model's."""
    out = graph.outputs[0]
    everything = gs.Variable(f"{out.name}__all_classes", dtype=out.dtype)
    for producer in list(out.inputs):
        producer.outputs[producer.outputs.index(out)] = everything
    indices = gs.Constant(f"{out.name}__kept_classes", np.asarray(keep, dtype=np.int64))
    graph.nodes.append(gs.Node("Gather", f"{out.name}__keep_classes", {"axis": axis}, [everything, indices], [out]))
    if out.shape is not None:
        shape = list(out.shape)
        shape[axis] = len(keep)
        out.shape = shape


def prune(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: Mapping[int, np.ndarray],
          metadata: Mapping[str, str] | None = None,
          replacements: Mapping[tuple[int, int], np.ndarray] | None = None,
          output_keep: np.ndarray | None = None, output_axis: int = 1) -> onnx.ModelProto:
    """A new model with only the kept channels of each group. `model` is not modified.

    keep_sets: group id -> kept channel indices (groups not listed are kept whole; blocked groups must be whole).
    replacements: (node index, input index) -> new constant for compensated consumer weights/biases, given in the
    original shape (a conv without bias may get one); the surgery cuts them like the originals.
    output_keep: classes to keep by a Gather on the output's `output_axis`, where the class group itself cannot be
    cut. metadata: extra `metadata_props` (e.g. disasm.classes of the kept classes).
    """
    keep = _checked_keep_sets(analysis, keep_sets)
    graph = gs.import_onnx(model)
    _apply(graph, analysis, keep, zero_consumers=False, replacements=replacements)
    _set_output_channels(graph, analysis, keep)
    if output_keep is not None:
        _gather_output(graph, output_keep, output_axis)
    return _export(graph, model, metadata)


def masked_reference(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: Mapping[int, np.ndarray],
                     replacements: Mapping[tuple[int, int], np.ndarray] | None = None) -> onnx.ModelProto:
    """The original model in which every removed channel is zeroed at the input of each consumer (whose weights and
    bias are first replaced by `replacements`, when compensated). The class group is not sliced here: compare the
    reference's output restricted to the kept classes with the pruned model's output."""
    keep = _checked_keep_sets(analysis, keep_sets)
    if analysis.class_group is not None:
        keep.pop(analysis.class_group, None)
    graph = gs.import_onnx(model)
    _apply(graph, analysis, keep, zero_consumers=True, replacements=replacements)
    return _export(graph, model, None)

