"""Load and validate a segmentation model: the ONNX graph plus what is needed to use it without guessing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from disasm.compiler.errors import DisasmError
from disasm.compiler.labels import resolve_labels

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
OUTPUT_KINDS = ("logits", "probs", "sigmoid")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the model's input: (pixel - mean) / std per channel, in `color` order and `layout`."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    color: str = "rgb"
    layout: str = "nchw"

    def metadata(self) -> dict[str, str]:
        return {"disasm.mean": ",".join(f"{v:g}" for v in self.mean), "disasm.std": ",".join(f"{v:g}" for v in self.std),
                "disasm.color": self.color, "disasm.layout": self.layout}


@dataclass(frozen=True)
class Model:
    """A loaded segmentation model. `proto` carries inferred shapes; it is never written back to `path`."""

    path: Path
    proto: onnx.ModelProto
    sha256: str
    classes: tuple[str, ...]
    background: str | None
    labels_source: str          # where the class names came from (built-in set, file, metadata, generic)
    preprocessing: Preprocessing
    output_kind: str
    input_name: str
    output_name: str
    input_shape: tuple[int | None, ...]  # None where the dimension is dynamic

    @property
    def image_size(self) -> tuple[int, int] | None:
        h, w = (self.input_shape[2], self.input_shape[3]) if self.preprocessing.layout == "nchw" else self.input_shape[1:3]
        return (h, w) if h and w else None

    def class_index(self, name: str) -> int:
        return self.classes.index(name)


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim)


def _floats(text: str, key: str, path: Path) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DisasmError(f"{path}: metadata {key}={text!r} is not a comma-separated list of numbers") from None


def read_onnx(path: Path) -> onnx.ModelProto:
    """Parse an ONNX file (external data included) or raise a DisasmError that says what is wrong with it."""
    if not path.exists():
        raise DisasmError(f"{path}: no such file")
    if not path.is_file():
        raise DisasmError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise DisasmError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    except FileNotFoundError as e:
        raise DisasmError(f"{path}: external data file missing: {e.filename}") from None
    if not proto.graph.node:
        raise DisasmError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise DisasmError(f"{path}: invalid ONNX model: {first}") from None
    return proto


def load_model(path: str | Path, labels: str | None = None) -> Model:
    """Read `path`, check it is an image segmentation network, and collect labels and preprocessing from metadata.
    `labels` (a built-in set, a label file or a comma list; see compiler.labels) overrides the metadata names."""
    path = Path(path)
    proto = read_onnx(path)
    proto = onnx.shape_inference.infer_shapes(proto)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise DisasmError(f"{path}: expected one image input and one output, found {len(inputs)} inputs and "
                          f"{len(proto.graph.output)} outputs; not a single-head segmentation network")
    image, output = inputs[0], proto.graph.output[0]
    in_dims, out_dims = _dims(image), _dims(output)
    meta = {p.key: p.value for p in proto.metadata_props}
    layout = meta.get("disasm.layout", "nchw")
    class_axis = 1 if layout == "nchw" else 3
    if len(in_dims) != 4 or len(out_dims) != 4:
        raise DisasmError(f"{path}: input {image.name!r} has rank {len(in_dims)} and output {output.name!r} rank "
                          f"{len(out_dims)}; a segmentation network maps [N,C,H,W] images to [N,K,H,W] class maps")
    num_classes = out_dims[class_axis]
    if num_classes is None or num_classes < 2:
        raise DisasmError(f"{path}: output {output.name!r} has shape {out_dims}; expected a static class axis with >= 2 classes")
    label_set = resolve_labels(labels, meta, num_classes)
    classes, background = label_set.names, label_set.background
    output_kind = meta.get("disasm.output", "logits")
    if output_kind not in OUTPUT_KINDS:
        raise DisasmError(f"{path}: metadata disasm.output={output_kind!r}; expected one of {', '.join(OUTPUT_KINDS)}")
    preprocessing = Preprocessing(
        mean=_floats(meta["disasm.mean"], "disasm.mean", path) if "disasm.mean" in meta else IMAGENET_MEAN,
        std=_floats(meta["disasm.std"], "disasm.std", path) if "disasm.std" in meta else IMAGENET_STD,
        color=meta.get("disasm.color", "rgb"), layout=layout)
    return Model(path=path, proto=proto, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), classes=classes,
                 background=background, labels_source=label_set.source, preprocessing=preprocessing, output_kind=output_kind, input_name=image.name,
                 output_name=output.name, input_shape=in_dims)
