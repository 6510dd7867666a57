"""TensorRT backend: build engines from ONNX ahead of time, inspect them, and run them on a GPU.

Either TensorRT module works: `tensorrt` (preferred when installed; it builds only for the local GPU) or NVIDIA's
TensorRT for RTX, `tensorrt_rtx` (`pip install 'disasm[trt]'`), whose builder needs **no GPU**: it compiles for a
named compute capability ("sm86"), so engines can be built and inspected in CI. Running an engine always needs a
matching GPU. Both modules are imported lazily, so `disasm.runtime` imports without either.

Both are strongly typed (TensorRT 11 removed BuilderFlag.FP16): an FP16 engine is built from an FP16 copy of the
ONNX graph (onnxconverter-common, float32 inputs and outputs kept), never from a builder flag.

Deserialising an engine needs CUDA (EngineInspector works only on a deserialised engine), so the layer information
that is testable without a GPU comes from the builder itself: `build_engine` captures the per-layer report TensorRT
logs while building (`EngineBuild.layers`, `.weight_bytes`). `inspect_engine` asks the EngineInspector (GPU only).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from disasm.compiler.errors import DisasmError
from disasm.compiler.files import write_atomic
from disasm.runtime.runner import FeedError, InputSpec, Runner, describe_model

#: TensorRT modules this backend accepts, in order of preference.
TRT_MODULES: tuple[str, ...] = ("tensorrt", "tensorrt_rtx")

#: Values of `EngineBuild.precision` (`build_engine(fp16=...)`), as used in engine file names (`full.fp16.engine`).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")

_INSTALL_HINT = "install the TensorRT for RTX builder with `pip install 'disasm[trt]'` (no GPU needed to build)"


class TensorRTError(DisasmError):
    """TensorRT cannot do what was asked: no module or GPU, an unsupported graph, a bad target or shape.

    `nodes` names the ONNX nodes the parser rejected (empty for other problems).
    """

    def __init__(self, message: str, nodes: Sequence[str] = ()):
        super().__init__(message)
        self.nodes = tuple(nodes)


@dataclass(frozen=True)
class EngineBuild:
    """A serialized engine and what the builder reported about it.

    `layers` is TensorRT's own per-layer report, captured from the builder's log (no deserialisation, no GPU): one
    dict per engine layer, keyed as TensorRT prints them (Name, LayerType, Inputs, Constants, Outputs, TacticName,
    Metadata; tensors as dicts with Name, Dimensions, Datatype, Format, ...). `weight_bytes` and `activation_bytes`
    are the builder's "Total Weights/Activation Memory". What the builder did not report is None or empty.
    """

    serialized: bytes = field(repr=False)
    precision: str                      # "fp32" or "fp16"
    target: str                         # compute capability the engine runs on, e.g. "sm86"
    build_seconds: float                # the builder call alone (parsing and FP16 conversion excluded)
    input_shapes: dict[str, tuple[int, ...]]
    layer_count: int | None
    layers: list[dict[str, Any]] = field(repr=False)
    weight_bytes: int | None
    activation_bytes: int | None
    warnings: list[str]                 # FP16 conversion, parser and builder warnings, prefixed with their source
    module: str                         # e.g. "tensorrt_rtx 1.7.1.116"

    @property
    def size_bytes(self) -> int:
        return len(self.serialized)


def trt_module() -> ModuleType | None:
    """The first importable module of `TRT_MODULES`, or None when neither is installed."""
    for name in TRT_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def trt_available() -> bool:
    """True when `build_engine` can run here (a TensorRT module is installed; a GPU may still be needed)."""
    return trt_module() is not None


def build_engine(
    model: str | os.PathLike | bytes,
    compute_capability: str | None = None,
    fp16: bool = False,
    workspace_mb: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> EngineBuild:
    """Parse an ONNX model and build a serialized TensorRT engine for one GPU architecture.

    Args:
        model: Path to an ONNX file (external data next to it is found), or the serialized model bytes.
        compute_capability: Target GPU architecture, e.g. "sm86". TensorRT for RTX builds for any of its targets
            without a GPU; `tensorrt` builds only for the local GPU. Defaults to the local GPU; without one this is
            an error.
        fp16: Build from an FP16 copy of the graph (float32 inputs and outputs kept). Defaults to False (FP32).
        workspace_mb: Builder workspace limit in MiB. Defaults to TensorRT's default (the device's memory).
        input_shapes: Input name -> shape for inputs with dynamic dimensions; the engine is built for exactly these
            shapes. Defaults to the model's shapes with a dynamic leading (batch) dimension set to 1.

    Raises:
        TensorRTError: no TensorRT module, no target, an unknown target, the parser rejects nodes (named in the
            message and in `.nodes`), a shape is missing, or the builder fails (its errors in the message).
    """
    trt = _require_module()
    target = _resolve_target(trt, compute_capability)
    if workspace_mb is not None and (isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int)
                                     or workspace_mb < 1):
        raise TensorRTError(f"workspace_mb must be a positive integer or None (TensorRT's default), "
                            f"got {workspace_mb!r}")
    data, path, conversion_warnings = _onnx_bytes(model, fp16)
    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    _parse(parser, data, path, describe_model(model), logger)
    logger.phase = "builder"
    config = builder.create_builder_config()
    _set_target(trt, config, target)
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    shapes = _fix_input_shapes(builder, network, config, input_shapes)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - start
    if serialized is None:
        raise TensorRTError(f"TensorRT could not build an engine for {describe_model(model)} ({target}): "
                            + ("; ".join(logger.errors) or "no error was logged"))
    engine_bytes = bytes(serialized)
    layers = _layers_from_builder_log(logger.layer_report)
    if not layers and target == _local_target():  # `tensorrt` logs its layers in another format: inspect
        layers = inspect_engine(engine_bytes)["layers"]
    return EngineBuild(
        serialized=engine_bytes, precision="fp16" if fp16 else "fp32", target=target, build_seconds=build_seconds,
        input_shapes=shapes, layer_count=len(layers) if layers else None, layers=layers,
        weight_bytes=logger.totals.get("Weights"), activation_bytes=logger.totals.get("Activation"),
        warnings=[f"fp16 conversion: {w}" for w in conversion_warnings] + logger.warnings,
        module=f"{trt.__name__} {trt.__version__}",
    )


def inspect_engine(serialized: bytes) -> dict[str, Any]:
    """Layer information of a serialized engine from TensorRT's EngineInspector (needs a GPU that runs it).

    Returns:
        {"layers": [one dict per layer, EngineInspector's JSON], "bindings": [I/O tensor names],
        "layer_count": int, "weight_bytes": int or None}. Engines built by `build_engine` carry full layer details;
        others may give only layer names. Without a GPU, use `EngineBuild.layers`, captured while building.
    """
    trt = _require_module()
    _require_cuda("inspect a TensorRT engine (EngineInspector needs a deserialised engine)")
    _runtime, engine = _deserialize(trt, serialized)
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    info = json.loads(text)
    weight_bytes = engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE) if hasattr(engine, "get_engine_stat") \
        else None
    return {"layers": info.get("Layers", []), "bindings": info.get("Bindings", []), "layer_count": engine.num_layers,
            "weight_bytes": weight_bytes}


def save_engine(path: str | os.PathLike, serialized: bytes) -> Path:
    """Write a serialized engine atomically (temporary file + rename) and return its path."""
    path = Path(path)
    write_atomic(path, bytes(serialized))
    return path


class TensorRTRunner(Runner):
    """Runs one serialized engine on a CUDA GPU; I/O buffers are torch CUDA tensors. Feeds are checked by
    `disasm.runtime.runner` (names, rank, static dimensions, dtype); a shape outside the engine's optimisation profile
    is caught by TensorRT itself and reported as a FeedError too.

    Args:
        engine: A serialized engine (bytes) or the path of an engine file. It must have been built for this GPU's
            compute capability by the same TensorRT module and version.
        device: CUDA device index. Defaults to the current device.

    The engine is deserialised on construction and released by `close()` or by leaving a `with` block.
    `infer` takes and returns numpy arrays: it copies inputs to the GPU and outputs back, so timing `infer` from
    outside (as `disasm.runtime.latency` does) includes the copies; `last_inference_ms` does not.
    """

    name: str = "tensorrt"

    def __init__(self, engine: bytes | str | os.PathLike, device: int | None = None):
        trt = _require_module()
        torch = _require_cuda("run a TensorRT engine")
        self.description = _describe_engine(engine)
        serialized = engine if isinstance(engine, (bytes, bytearray)) else Path(engine).read_bytes()
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.name = trt.__name__.replace("_", "-")
        with torch.cuda.device(self.device):
            self._runtime, self._engine = _deserialize(trt, bytes(serialized))  # the runtime must outlive the engine
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {name: self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self._dtypes = {name: np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))) for name in names}
        self.inputs = tuple(InputSpec(name, tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(name)),
                                      self._dtypes[name]) for name in names if is_input[name])
        self.output_names: list[str] = [name for name in names if not is_input[name]]
        self._module = f"{trt.__name__} {trt.__version__}"
        self._torch = torch

    @property
    def conditions(self) -> dict[str, object]:
        torch = self._torch
        major, minor = torch.cuda.get_device_capability(self.device)
        return {"backend": self.name, "module": self._module, "device": torch.cuda.get_device_name(self.device),
                "compute_capability": f"sm{major}{minor}",
                "host_copies": "inside infer (included when infer is timed; last_inference_ms excludes them)"}

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch, context = self._torch, self._context
        with torch.cuda.device(self.device):
            buffers = {}
            for name, array in feed.items():
                buffers[name] = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
                if not context.set_input_shape(name, tuple(array.shape)):
                    raise FeedError(f"{self.name}: input {name!r}: shape {list(array.shape)} is outside the engine's "
                                    f"profile {list(self._engine.get_tensor_shape(name))}; rebuild with input_shapes")
            for name in self.output_names:
                dtype = torch.from_numpy(np.empty(0, self._dtypes[name])).dtype
                buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            for name, tensor in buffers.items():
                context.set_tensor_address(name, tensor.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            torch.cuda.synchronize(self.device)
            start = time.perf_counter_ns()
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.name}: executing {self.description} failed")
            stream.synchronize()
            self.last_inference_ms = (time.perf_counter_ns() - start) / 1e6
            return [buffers[name].cpu().numpy() for name in self.output_names]

    def _release(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None

    def __repr__(self) -> str:
        return f"TensorRTRunner({self.description}, device={self.device})"


# --- module, GPU and target -----------------------------------------------------------------------------------------

def _require_module() -> ModuleType:
    trt = trt_module()
    if trt is None:
        raise TensorRTError(f"no TensorRT module is installed (tried {', '.join(TRT_MODULES)}); {_INSTALL_HINT}")
    return trt


def _require_cuda(what: str) -> ModuleType:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError(f"a CUDA GPU is needed to {what}, and torch sees none here; building engines needs no "
                            "GPU with tensorrt_rtx (build_engine(..., compute_capability='sm86'))")
    return torch


def _local_target() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def _module_targets(trt: ModuleType) -> list[str]:
    """Targets the builder accepts without a GPU (TensorRT for RTX); empty for `tensorrt` (local GPU only)."""
    capability = getattr(trt, "ComputeCapability", None)
    if capability is None or not hasattr(trt.IBuilderConfig, "set_compute_capability"):
        return []
    return [name.lower() for name in capability.__members__ if re.fullmatch(r"SM\d+", name)]


def _resolve_target(trt: ModuleType, compute_capability: str | None) -> str:
    targets, local = _module_targets(trt), _local_target()
    if compute_capability is None:
        if local is None:
            choices = f"one of {', '.join(targets)}" if targets else "the local GPU's (this module needs one)"
            raise TensorRTError(f"no CUDA GPU here to build for; pass compute_capability, {choices}")
        wanted = local
    else:
        wanted = str(compute_capability).strip().lower().replace(".", "")
        wanted = wanted if wanted.startswith("sm") else f"sm{wanted}"
    if targets:
        if wanted not in targets:
            raise TensorRTError(f"{trt.__name__} {trt.__version__} cannot build for {wanted}"
                                f"{' (the local GPU)' if compute_capability is None else ''}; "
                                f"its targets are {', '.join(targets)}")
    elif wanted != local:
        raise TensorRTError(f"{trt.__name__} builds only for the local GPU ({local or 'none here'}), not {wanted}; "
                            f"to build for other targets without a GPU, uninstall tensorrt and {_INSTALL_HINT}")
    return wanted


def _set_target(trt: ModuleType, config: Any, target: str) -> None:
    if not _module_targets(trt):
        return  # `tensorrt`: the local GPU, checked by _resolve_target
    config.num_compute_capabilities = 1
    if not config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0):
        raise TensorRTError(f"{trt.__name__} refused compute capability {target}")


def _network_flags(trt: ModuleType) -> int:
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


# --- ONNX in ---------------------------------------------------------------------------------------------------------

def _describe_engine(engine: object) -> str:
    if isinstance(engine, (bytes, bytearray)):
        return f"<{len(engine)} bytes of engine>"
    if isinstance(engine, (str, os.PathLike)):
        if not os.path.isfile(engine):
            raise FileNotFoundError(f"TensorRT engine not found: {os.fspath(engine)}")
        return repr(os.fspath(engine))
    raise ValueError(f"engine must be serialized bytes or a path, got {type(engine).__name__}")


def _onnx_bytes(model: str | os.PathLike | bytes, fp16: bool) -> tuple[bytes, str | None, list[str]]:
    """(serialized model, path for external data or None, FP16 conversion warnings)."""
    if isinstance(model, (bytes, bytearray)):
        data, path = bytes(model), None
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise TensorRTError(f"ONNX model not found: {path}")
        data = Path(path).read_bytes()
    else:
        raise TensorRTError(f"model must be a path or serialized ONNX bytes, got {type(model).__name__}")
    if not fp16:
        return data, path, []
    converted, conversion_warnings = _float16_bytes(data, path)
    return converted, None, conversion_warnings  # the converted model carries its weights inline


def _float16_bytes(data: bytes, path: str | None) -> tuple[bytes, list[str]]:
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise TensorRTError(f"FP16 engines need onnxconverter-common; {_INSTALL_HINT}") from None
    proto = onnx.load(path) if path is not None else onnx.load_from_string(data)  # external data loaded by path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            converted = float16.convert_float_to_float16(proto, keep_io_types=True)
        except ValueError as e:
            if "already converted to float16" in str(e):
                raise TensorRTError(f"{path or 'the model'} is already float16; build it with fp16=False") from None
            raise
    return converted.SerializeToString(), sorted({str(w.message) for w in caught})


def _parse(parser: Any, data: bytes, path: str | None, description: str, logger: Any) -> None:
    parsed = parser.parse(data, path) if path is not None else parser.parse(data)
    if parsed:
        return
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    nodes = [e.node_name() or f"#{e.node()}" for e in errors if e.node() >= 0]
    described = [_describe_parser_error(e) for e in errors] or logger.errors or ["no error was reported"]
    hint = "; replace or remove these nodes (or export at another opset) and build again" if nodes else ""
    raise TensorRTError(f"TensorRT's ONNX parser rejected {description}: {'; '.join(described)}{hint}", nodes=nodes)


def _describe_parser_error(error: Any) -> str:
    code = str(error.code()).rsplit(".", 1)[-1].lower().replace("_", " ")
    desc = error.desc().strip().rstrip(".")
    detail = f"{code}" + (f": {desc}" if desc and desc != "false" else f" ({error.func()})")
    if error.node() < 0:
        return detail
    return f"node {error.node_name() or '#' + str(error.node())!r} ({error.node_operator()}): {detail}"


def _fix_input_shapes(builder: Any, network: Any, config: Any,
                      given: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """Resolve every input's shape; dynamic ones get a one-shape optimization profile."""
    given = dict(given or {})
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    unknown = sorted(set(given) - {t.name for t in inputs})
    if unknown:
        raise TensorRTError(f"input_shapes names unknown input(s) {unknown}; the model's inputs are "
                            f"{[t.name for t in inputs]}")
    shapes, profile = {}, None
    for tensor in inputs:
        declared = tuple(tensor.shape)
        shape = tuple(int(d) for d in given[tensor.name]) if tensor.name in given \
            else _default_shape(tensor.name, declared)
        fits = len(shape) == len(declared) and all(s == d or d == -1 for d, s in zip(declared, shape))
        if not fits or any(s < 1 for s in shape):
            raise TensorRTError(f"input {tensor.name!r}: shape {list(shape)} does not fit the model's "
                                f"{_shape_text(declared)}")
        if -1 in declared:
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(tensor.name, shape, shape, shape)
        shapes[tensor.name] = shape
    if profile is not None:
        config.add_optimization_profile(profile)
    return shapes


def _default_shape(name: str, declared: tuple[int, ...]) -> tuple[int, ...]:
    shape = (1, *declared[1:]) if declared and declared[0] == -1 else declared
    if -1 in shape:
        example = ", ".join(str(d) if d >= 0 else "N" for d in shape)
        raise TensorRTError(f"input {name!r} has dynamic dimensions {_shape_text(declared)}; pass "
                            f"input_shapes={{{name!r}: ({example})}} with the sizes to build for")
    return shape


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) if d >= 0 else "?" for d in shape) + "]"


# --- the builder's log -----------------------------------------------------------------------------------------------

def _capturing_logger(trt: ModuleType) -> Any:
    """An ILogger that keeps warnings, errors, the builder's layer report and its memory totals."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.phase = "parser"
            self.warnings: list[str] = []
            self.errors: list[str] = []
            self.layer_report = ""
            self.totals: dict[str, int] = {}

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(f"{self.phase}: {msg}")
            elif msg.startswith("Layers:"):
                self.layer_report = msg
            elif match := _TOTAL_MEMORY.match(msg):
                self.totals[match["kind"]] = int(match["bytes"])

    return CapturingLogger()


_TOTAL_MEMORY = re.compile(r"Total (?P<kind>Weights|Activation) Memory: (?P<bytes>\d+) bytes")
_FIELD_START = re.compile(r"[A-Za-z][A-Za-z0-9]*: ")


def _layers_from_builder_log(report: str) -> list[dict[str, Any]]:
    """Parse TensorRT-RTX's "Layers:" report (one `Name: ..., LayerType: ..., ...` line per layer)."""
    lines = report.split("\n")[1:]
    layers = []
    for line in lines:
        if not line.strip():
            break  # the I/O tensor section follows an empty line
        layers.append(_fields(line))
    return layers


def _fields(text: str) -> dict[str, Any]:
    """`Key: value, Key: [ { ... }, { ... } ], ...` -> dict; lists of {...} become lists of dicts."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if depth == 0 and text.startswith(", ", i) and _FIELD_START.match(text, i + 2):
            parts.append(text[start:i])
            start = i + 2
    parts.append(text[start:])
    return {key.strip(): _value(value.strip()) for key, _, value in (part.partition(": ") for part in parts)}


def _value(text: str) -> Any:
    if re.fullmatch(r"\[-?\d+(,-?\d+)*\]", text):
        return [int(d) for d in text[1:-1].split(",")]
    if text.startswith("[") and text.endswith("]") and text[1:].lstrip().startswith(("{", "]")):
        inner, items, depth, start = text[1:-1], [], 0, 0
        for i, char in enumerate(inner):
            if char == "{":
                depth += 1
                start = i + 1 if depth == 1 else start
            elif char == "}":
                depth -= 1
                if depth == 0:
                    items.append(_fields(inner[start:i].strip()))
        return items
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


# --- engines --------------------------------------------------------------------------------------------------------

def _deserialize(trt: ModuleType, serialized: bytes) -> tuple[Any, Any]:
    """(runtime, engine); keep the runtime referenced as long as the engine."""
    logger = _capturing_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise TensorRTError(
            f"{trt.__name__} {trt.__version__} cannot deserialize this engine ("
            + ("; ".join(logger.errors) or "no error was logged")
            + "); engines run only on the GPU architecture and TensorRT version they were built for"
        )
    return runtime, engine
