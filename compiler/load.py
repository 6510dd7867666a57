"""Load and validate a segmentation model: the ONNX graph plus what is needed to use it without guessing.

How a model is read, for every setting: a command-line flag wins, then the model's `disasm.*` metadata, then what the
graph shows, then a default. The rules for what the graph shows:

- Input layout. The first op that reads the image, past elementwise pre-processing (Cast, Sub, Div, ...): a Conv reads
  channels on axis 1, so NCHW; a Transpose with perm [0,3,1,2] (tf2onnx) means NHWC. Otherwise the input shape: NCHW
  when only dimension 1 is 1 or 3, NHWC when only dimension 3 is. Otherwise it is an error that asks for --layout.
- Class axis of the output. Walking back from the output through Transposes and ops that keep every axis in place
  (Softmax, Sigmoid, Resize, Relu, Add, ...) to the conv that makes the class scores: its axis 1, carried through the
  Transposes. Without such a conv: the axis (1 or 3) whose size matches the class names of --labels or the metadata;
  else the only one of the two that is static; else the input layout's (3 for NHWC, 1 for NCHW).
- Output kind. The last op before the output, past Transposes, Resize, Cast and Identity: Softmax over the class axis
  means probabilities (`probs`), Sigmoid means independent per-class probabilities (`sigmoid`), anything else logits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.logger import G_LOGGER
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from disasm.compiler.errors import DisasmError
from disasm.compiler.graphs import export_like
from disasm.compiler.labels import given_label_count, resolve_labels

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
GREY_MEAN = (114.495,)  # ImageNet's mean and std averaged over R, G, B: the default for 1-channel models
GREY_STD = (57.63,)
LAYOUTS = ("nchw", "nhwc")
OUTPUT_KINDS = ("logits", "probs", "sigmoid")
COLORS = ("rgb", "bgr")
IMAGE_CHANNELS = (1, 3)
MAX_FOLD_ROUNDS = 8

# Ops that leave every axis where it is: followed when tracing the class axis from the output back to its conv.
_AXIS_KEEPING = {"Identity", "Cast", "Dropout", "Resize", "Upsample", "Softmax", "LogSoftmax", "Sigmoid", "Relu", "Clip",
                 "LeakyRelu", "HardSigmoid", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Pad"}
# Ops that neither compute nor normalise scores: skipped when looking for the op that decides the output kind.
_NOT_SCORING = {"Identity", "Cast", "Dropout", "Resize", "Upsample", "Transpose"}
# Elementwise ops that tf2onnx and torch exports put between the image input and the first Conv / Transpose.
_PREPROCESSING = {"Identity", "Cast", "Sub", "Add", "Mul", "Div"}


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the model's input: (pixel - mean) / std per channel, in `color` order and `layout`.
    1-channel models get grey images (ITU-R 601 luma, as PIL's "L" mode)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    color: str = "rgb"
    layout: str = "nchw"
    channels: int = 3

    def metadata(self) -> dict[str, str]:
        return {"disasm.mean": ",".join(f"{v:g}" for v in self.mean), "disasm.std": ",".join(f"{v:g}" for v in self.std),
                "disasm.color": self.color, "disasm.layout": self.layout}


@dataclass(frozen=True)
class Overrides:
    """What the command line says about the model; None = not given (use the metadata, then the graph)."""

    layout: str | None = None
    output: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color: str | None = None
    head: str | None = None  # the output holding the class scores, for models with several


@dataclass(frozen=True)
class Model:
    """A loaded segmentation model. `proto` carries inferred shapes (and the resolved `disasm.layout` in its metadata,
    for the channel analysis); it is never written back to `path`."""

    path: Path
    proto: onnx.ModelProto
    sha256: str                 # of the .onnx file, followed by its external data files when it has any
    classes: tuple[str, ...]
    background: str | None
    labels_source: str          # where the class names came from (built-in set, file, metadata, generic)
    preprocessing: Preprocessing
    output_kind: str
    input_name: str
    output_name: str
    input_shape: tuple[int | None, ...]  # None where the dimension is dynamic
    class_axis: int = 1                  # axis of the output that holds the classes (1: [N,K,H,W], 3: [N,H,W,K])
    external_data: tuple[str, ...] = ()  # external data files, relative to the model's folder
    sources: dict[str, str] = field(default_factory=dict)  # setting -> where its value came from
    removed_heads: tuple[str, ...] = ()  # other outputs of the file, removed with the layers only they use
    subnormals: int = 0                  # subnormal and tiny weights set to 0 at load (flush_subnormals)
    activation: str | None = None        # output of the final Softmax/Sigmoid over the classes, if the graph has one:
    #                                      attribution reads the logits before it (saturated probabilities have no
    #                                      usable gradient)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) when the model has a static input size, else None."""
        h, w = (self.input_shape[2], self.input_shape[3]) if self.preprocessing.layout == "nchw" else self.input_shape[1:3]
        return (h, w) if h and w else None

    def class_index(self, name: str) -> int:
        return self.classes.index(name)


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim)


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, e.g. '123.7,116.3,103.5'; `what` names the source in the error."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DisasmError(f"{what}={text!r} is not a comma-separated list of numbers, e.g. 123.675,116.28,103.53") from None
    if not all(abs(v) < float("inf") for v in values):
        raise DisasmError(f"{what}={text!r} holds a value that is not a finite number")
    return values


def _external_files(proto: onnx.ModelProto) -> list[str]:
    files = []
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            if location not in files:
                files.append(location)
    return files


def _read(path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """Parse an ONNX file and its external data files, or raise a DisasmError that says what is wrong with it."""
    if not path.exists():
        raise DisasmError(f"{path}: no such file")
    if not path.is_file():
        raise DisasmError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise DisasmError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not proto.graph.node:
        raise DisasmError(f"{path}: not an ONNX model (no graph nodes)")
    files = _external_files(proto)
    for name in files:
        # judged by the text alone, so the answer never tells whether a file outside the model's folder exists
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
            raise DisasmError(f"{path}: external data location {name!r} points outside the model's folder")
        if not (path.parent / name).is_file():
            raise DisasmError(f"{path}: external data file missing: {path.parent / name} (keep it next to the model)")
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DisasmError(f"{path}: cannot read its external data: {first}") from None
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise DisasmError(f"{path}: invalid ONNX model: {first}") from None
    return proto, files


def fold_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every value computable without the image folded into a constant (onnx-graphsurgeon's folding,
    which evaluates such subgraphs with ONNX Runtime): weights behind Identity/Cast/DequantizeLinear chains, and pads,
    sizes and shapes computed from static shapes, become initializers, so every later stage sees plain constants.
    Initializers an old exporter also lists as graph inputs become plain initializers, which ONNX Runtime can fold
    too. Subgraphs that fail to evaluate are left as they are."""
    severity = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)  # the folding sessions' optimiser notes are not the user's business
    try:
        folded = proto
        for _ in range(MAX_FOLD_ROUNDS):  # a folded shape lets inference find the next one (timm "same" padding)
            graph = gs.import_onnx(onnx.shape_inference.infer_shapes(folded, data_prop=True))
            before = len(folded.graph.node)
            # IR 4 and later: initializers need not be listed as graph inputs
            folded = export_like(graph.fold_constants(error_ok=True), proto, ir_version=max(proto.ir_version, 4))
            if len(folded.graph.node) == before:
                break
    finally:
        G_LOGGER.severity = severity
    return folded


# Float32 weights smaller than this in magnitude are set to 0 at load: subnormal ones (below 1.2e-38) take a slow path
# in every multiplication on x86 CPUs, and so do the products of the tiny normal ones with small activations (the
# loaded TwinLiteNet ran 1.6x faster with its 5,028 weights below 1e-30 zeroed, outputs bitwise identical;
# benchmarks/results/latency.md). Such a weight moves no output by anything float32 resolves.
TINY_WEIGHT = 1e-30


def flush_subnormals(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`proto` with every float32 initializer value below TINY_WEIGHT in magnitude (subnormal, or so small that its
    products are) set to 0, and how many there were. Pruning rewrites many of them away, so leaving them in would
    credit the cut with a speed-up it did not make (measured: road-segmentation-adas 2.04x and TwinLiteNet 3.19x
    slower in ONNX Runtime with its subnormal weights, 1.6x with the tiny normal ones)."""
    tiny, count = TINY_WEIGHT, 0
    flushed = onnx.ModelProto()
    flushed.CopyFrom(proto)
    for tensor in flushed.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(tensor)
        small = (values != 0) & (np.abs(values) < tiny)
        if small.any():
            count += int(small.sum())
            tensor.CopyFrom(numpy_helper.from_array(np.where(small, 0, values).astype(np.float32), tensor.name))
    return flushed, count


def write_onnx(proto: onnx.ModelProto, path: Path, external_data: bool = False) -> None:
    """Write `proto` to `path` atomically; with `external_data`, its weights go to `<name>.data` next to it (the
    pair is written in a fresh temporary folder and moved in, data first). `proto` is not modified."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)  # saving with external data strips the weights from the proto it is given
            onnx.save_model(copy, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name)
        else:
            (tmp / path.name).write_bytes(proto.SerializeToString())
        if (tmp / data.name).exists():
            os.replace(tmp / data.name, data)
        else:
            data.unlink(missing_ok=True)  # a stale pair must not outlive the model it belonged to
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _content_sha256(path: Path, external: list[str]) -> str:
    h = hashlib.sha256(path.read_bytes())
    for name in external:
        with open(path.parent / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _layout_from_graph(graph: onnx.GraphProto, name: str) -> tuple[str, str] | None:
    """(layout, evidence) from the first op that reads the image past elementwise pre-processing, if it tells."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    frontier, seen = [name], set()
    found: set[str] = set()
    evidence = []
    while frontier:
        tensor = frontier.pop()
        for n in consumers.get(tensor, []):
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type in ("Conv", "ConvTranspose") and n.input[0] == tensor:
                found.add("nchw")
                evidence.append(f"{n.op_type} reads it")
            elif n.op_type == "Transpose" and list(_attr(n, "perm", [])) == [0, 3, 1, 2]:
                found.add("nhwc")
                evidence.append("Transpose perm [0,3,1,2] reads it")
            elif n.op_type in _PREPROCESSING:
                frontier.extend(o for o in n.output if o)
    if len(found) == 1:
        return found.pop(), evidence[0]
    return None


def _layout_from_shape(dims: tuple[int | None, ...]) -> str | None:
    first, last = dims[1] in IMAGE_CHANNELS, dims[3] in IMAGE_CHANNELS
    if first != last:
        return "nchw" if first else "nhwc"
    return None


@dataclass(frozen=True)
class _Head:
    class_axis: int | None  # found by tracing back to the class conv, else None
    last_op: str | None     # the op deciding the output kind (past Transposes and resizes), None for a bare input
    softmax_axes: frozenset[int] = frozenset()  # output axes a Softmax there normalises over
    class_channels: int | None = None  # output channels of the class conv, from its weight
    last_output: str | None = None     # the output tensor of the op deciding the output kind


def _trace_head(graph: onnx.GraphProto, output: str, opset: int, rank: int) -> _Head:
    """Walk back from the output: the op that decides its kind, and the class conv's axis 1 in output coordinates."""
    producers = _producers(graph)
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    constants = set(weights) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    perm = list(range(rank))  # output axis i is axis perm[i] of the tensor being looked at
    last_op, last_output, softmax_axes = None, None, frozenset()
    tensor = output
    while (node := producers.get(tensor)) is not None:
        if last_op is None and node.op_type not in _NOT_SCORING:
            last_op, last_output = node.op_type, tensor
            if node.op_type == "Softmax":
                if opset < 13:  # the input is coerced to 2-D: normalised over every axis from `axis` on
                    axes = range(_attr(node, "axis", 1) % rank, rank)
                else:
                    axes = [_attr(node, "axis", -1) % rank]
                softmax_axes = frozenset(perm.index(a) for a in axes)
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = weights.get(node.input[1])
            group = _attr(node, "group", 1)
            channels = None if not weight else weight[0] if node.op_type == "Conv" else weight[1] * group
            return _Head(perm.index(1), last_op, softmax_axes, channels, last_output)
        if node.op_type == "Transpose":
            order = list(_attr(node, "perm", list(range(rank))[::-1]))
            perm = [order[i] for i in perm]
        elif node.op_type not in _AXIS_KEEPING:
            break
        data = [i for i in node.input[:2] if i and i not in constants]
        if not data:
            break
        tensor = data[0]
    return _Head(None, last_op, softmax_axes, None, last_output)


def _flag_or_metadata(flag: str | None, meta: dict[str, str], key: str, allowed: tuple[str, ...], option: str,
                      path: Path) -> tuple[str, str] | None:
    """(value, where it came from) when the command line or the metadata decides; a flag wins over metadata."""
    if flag is not None:
        return flag, option
    if key in meta:
        if meta[key] not in allowed:
            raise DisasmError(f"{path}: metadata {key}={meta[key]!r}; expected one of {', '.join(allowed)} "
                              f"(or pass {option})")
        return meta[key], "metadata"
    return None


def _resolve_layout(flag: str | None, meta: dict[str, str], graph: onnx.GraphProto, image: onnx.ValueInfoProto,
                    dims: tuple[int | None, ...], path: Path) -> tuple[str, str]:
    decided = _flag_or_metadata(flag, meta, "disasm.layout", LAYOUTS, "--layout", path)
    if decided:
        return decided
    from_graph = _layout_from_graph(graph, image.name)
    if from_graph:
        return from_graph[0], f"graph: {from_graph[1]}"
    from_shape = _layout_from_shape(dims)
    if from_shape:
        return from_shape, f"graph: input shape {_shape_text(dims)}"
    raise DisasmError(f"{path}: cannot tell whether input {image.name!r} {_shape_text(dims)} is NCHW or NHWC; "
                      f"pass --layout nchw or --layout nhwc")


def _names_fit(labels: str | None, meta: dict[str, str], count: int) -> bool:
    try:
        resolve_labels(labels, meta, count)
    except DisasmError:
        return False
    return True


def _resolve_class_axis(head: _Head, labels: str | None, meta: dict[str, str], out_dims: tuple[int | None, ...],
                        layout: str) -> tuple[int, str]:
    if head.class_axis in (1, 3):
        return head.class_axis, "graph: class conv's channel axis"
    if labels is not None or "disasm.classes" in meta:
        matching = [axis for axis in (1, 3) if out_dims[axis] and _names_fit(labels, meta, out_dims[axis])]
        if len(matching) == 1:
            return matching[0], "graph: output size matches the class names"
    static = [axis for axis in (1, 3) if out_dims[axis] is not None]
    if len(static) == 1:
        return static[0], "graph: the only static axis of 1 and 3"
    return (3 if layout == "nhwc" else 1), f"input layout {layout}"


def _resolve_output(flag: str | None, meta: dict[str, str], head: _Head, class_axis: int, path: Path) -> tuple[str, str]:
    decided = _flag_or_metadata(flag, meta, "disasm.output", OUTPUT_KINDS, "--output", path)
    if decided:
        return decided
    if head.last_op == "Softmax" and head.softmax_axes == {class_axis}:
        return "probs", "graph: Softmax over the classes"
    if head.last_op == "Sigmoid":
        return "sigmoid", "graph: Sigmoid"
    return "logits", f"graph: last op {head.last_op or 'none'}"


def _per_channel(values: tuple[float, ...], channels: int, where: str) -> tuple[float, ...]:
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise DisasmError(f"{where} has {len(values)} values; the model takes {channels}-channel images, so give "
                          f"{channels} (or one for all channels)")
    return values


def _resolve_preprocessing(overrides: Overrides, meta: dict[str, str], layout: str, channels: int,
                           path: Path) -> tuple[Preprocessing, dict[str, str]]:
    sources: dict[str, str] = {}
    stats = {}
    for what, flag, default in (("mean", overrides.mean, IMAGENET_MEAN if channels == 3 else GREY_MEAN),
                                ("std", overrides.std, IMAGENET_STD if channels == 3 else GREY_STD)):
        if flag is not None:
            stats[what], sources[what] = _per_channel(flag, channels, f"--{what}"), f"--{what}"
        elif f"disasm.{what}" in meta:
            where = f"{path}: metadata disasm.{what}"
            stats[what], sources[what] = _per_channel(parse_floats(meta[f"disasm.{what}"], where), channels, where), "metadata"
        else:
            stats[what], sources[what] = default, "default (ImageNet)"
    if any(v <= 0 for v in stats["std"]):
        raise DisasmError(f"std must be positive in every channel, got {','.join(f'{v:g}' for v in stats['std'])} "
                          f"({sources['std']})")
    if overrides.color is not None:
        color, sources["color"] = overrides.color, f"--{overrides.color}"
    elif "disasm.color" in meta:
        color, sources["color"] = meta["disasm.color"], "metadata"
        if color not in COLORS:
            raise DisasmError(f"{path}: metadata disasm.color={color!r}; expected one of {', '.join(COLORS)} "
                              f"(or pass --rgb / --bgr)")
    else:
        color, sources["color"] = "rgb", "default"
    return Preprocessing(stats["mean"], stats["std"], color, layout, channels), sources


def _shape_text(dims: tuple[int | None, ...]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _choose_head(proto: onnx.ModelProto, head: str | None, classes: int | None, path: Path) -> str:
    """The output that holds the class scores: --head, else the only output, else the only rank-4 output with as many
    channels (axis 1 or 3) as there are class names."""
    outputs = [o for o in proto.graph.output]
    listing = ", ".join(f"{o.name} {_shape_text(_dims(o))}" for o in outputs)
    if head is not None:
        if head not in [o.name for o in outputs]:
            raise DisasmError(f"{path}: --head {head!r} is not an output of the model; its outputs: {listing}")
        return head
    if len(outputs) == 1:
        return outputs[0].name
    fitting = [o.name for o in outputs if len(_dims(o)) == 4 and classes in (_dims(o)[1], _dims(o)[3])]
    if classes is not None and len(fitting) == 1:
        return fitting[0]
    raise DisasmError(f"{path}: the model has {len(outputs)} outputs ({listing}); name the one that holds the class "
                      f"scores with --head NAME" + ("" if classes else " (and its class names with --labels)"))


def _keep_only(proto: onnx.ModelProto, head: str) -> onnx.ModelProto:
    """The model with one output, without the layers only the other outputs used."""
    graph = gs.import_onnx(proto)
    graph.outputs = [t for t in graph.outputs if t.name == head]
    return onnx.shape_inference.infer_shapes(export_like(graph, proto))


def load_model(path: str | Path, labels: str | None = None, overrides: Overrides | None = None) -> Model:
    """Read `path`, check it is an image segmentation network, and resolve labels, layout, class axis, output kind and
    preprocessing (flag > metadata > graph > default; see the module docstring). `labels` (a built-in set, a label
    file or a comma list; see compiler.labels) overrides the metadata names. A model with several outputs is reduced
    to the one with the class scores (`overrides.head`, or the one whose channel count matches the labels)."""
    path = Path(path)
    overrides = overrides or Overrides()
    proto, external = _read(path)
    proto, subnormals = flush_subnormals(fold_constants(proto))
    proto = onnx.shape_inference.infer_shapes(proto)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise DisasmError(f"{path}: expected one image input, found {len(inputs)} "
                          f"({', '.join(i.name for i in inputs)}); not an image segmentation network")
    meta = {p.key: p.value for p in proto.metadata_props}
    head_name = _choose_head(proto, overrides.head, given_label_count(labels, meta), path)
    removed = tuple(o.name for o in proto.graph.output if o.name != head_name)
    if removed:
        proto = _keep_only(proto, head_name)
    image, output = inputs[0], proto.graph.output[0]
    in_dims, out_dims = _dims(image), _dims(output)
    if len(in_dims) != 4 or len(out_dims) != 4:
        raise DisasmError(f"{path}: input {image.name!r} has rank {len(in_dims)} and output {output.name!r} rank "
                          f"{len(out_dims)}; a segmentation network maps [N,C,H,W] (or [N,H,W,C]) images to "
                          f"[N,K,H,W] (or [N,H,W,K]) class maps")
    layout, layout_source = _resolve_layout(overrides.layout, meta, proto.graph, image, in_dims, path)
    channels = in_dims[1] if layout == "nchw" else in_dims[3]
    if channels not in IMAGE_CHANNELS:
        raise DisasmError(f"{path}: input {image.name!r} {_shape_text(in_dims)} read as {layout.upper()} has "
                          f"{'a dynamic number of' if channels is None else channels} channels; disasm feeds 1-channel "
                          f"(grey) or 3-channel (RGB/BGR) images (wrong layout? pass --layout)")
    if in_dims[0] not in (None, 1):
        raise DisasmError(f"{path}: input {image.name!r} has a static batch of {in_dims[0]}; export the model with "
                          f"batch 1 or a dynamic batch")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    head = _trace_head(proto.graph, output.name, opset, 4)
    class_axis, axis_source = _resolve_class_axis(head, labels, meta, out_dims, layout)
    num_classes = out_dims[class_axis]
    if num_classes is None and head.class_channels and given_label_count(labels, meta) == head.class_channels:
        num_classes = head.class_channels  # a dynamic output shape: the class conv's weight confirms the labels
    output_kind, output_source = _resolve_output(overrides.output, meta, head, class_axis, path)
    if num_classes is None or num_classes < 1 or (num_classes == 1 and output_kind != "sigmoid"):
        raise DisasmError(f"{path}: output {output.name!r} has shape {_shape_text(out_dims)}; expected a static class "
                          f"axis (axis {class_axis}) with >= 2 classes, or one sigmoid channel (--output sigmoid)"
                          + ("; with a dynamic class axis, give the class names with --labels" if num_classes is None
                             else ""))
    label_set = resolve_labels(labels, meta, num_classes)
    preprocessing, sources = _resolve_preprocessing(overrides, meta, layout, channels, path)
    onnx.helper.set_model_props(proto, meta | {"disasm.layout": layout})  # what the channel analysis reads
    sources = {"layout": layout_source, "class_axis": axis_source, "output": output_source, **sources}
    return Model(path=path, proto=proto, sha256=_content_sha256(path, external), classes=label_set.names,
                 background=label_set.background, labels_source=label_set.source, preprocessing=preprocessing,
                 output_kind=output_kind, input_name=image.name, output_name=output.name, input_shape=in_dims,
                 class_axis=class_axis, external_data=tuple(external), sources=sources, removed_heads=removed,
                 subnormals=subnormals,
                 activation=_activation(head, output_kind))


def _activation(head: _Head, output_kind: str) -> str | None:
    """The tensor a final Softmax/Sigmoid writes, when that op is what makes the output probabilities."""
    if (output_kind, head.last_op) in (("probs", "Softmax"), ("sigmoid", "Sigmoid")):
        return head.last_output
    return None
