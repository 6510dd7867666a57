"""ONNX Runtime backend: one CPU inference session for one ONNX model.

The runner only executes; timing many runners fairly is `disasm.runtime.latency`'s job, and comparing outputs is
`disasm.runtime.metrics`'. Everything here needs only an ONNX file (or its bytes) and the `onnxruntime` wheel.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from disasm.runtime.runner import InputSpec, Runner, describe_model

if TYPE_CHECKING:
    import onnx

#: Allowed values of `optimization`, mapped to ONNX Runtime's graph optimization levels.
OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: Execution providers this runner may use, in order of preference.
SUPPORTED_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)

# ONNX Runtime's input type strings ("tensor(float)") -> numpy dtypes, for clear feed errors.
_ORT_TYPE_TO_NUMPY: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "float": np.float32, "float16": np.float16, "double": np.float64, "bool": np.bool_,
        "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
        "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    }.items()
}

_QUIET_LOG_SEVERITY = 3  # 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


class OnnxRuntimeRunner(Runner):
    """CPU EP session for one model (path or serialized bytes); feeds are checked by `disasm.runtime.runner`.

    Args:
        model: Path to an ONNX file, the serialized model bytes, or an onnx.ModelProto. A model with external data
            (`model.onnx.data`) must be given by path, so ONNX Runtime can find the data next to it.
        threads: Intra-op threads. Defaults to ONNX Runtime's choice (one per physical core). Set it explicitly
            when comparing latencies, so both models run under the same conditions. Inter-op threads are always 1
            and execution is sequential.
        optimization: Graph optimization level, one of "disabled", "basic", "extended", "all". Defaults to "all".
        spinning: Whether the intra-op worker threads busy-wait for work after a run (ONNX Runtime's
            "session.intra_op.allow_spinning"). None keeps ONNX Runtime's default (they spin). Every session owns its
            thread pool, so with two sessions in one process the idle one's spinning threads compete for the cores
            with the running one; when timing several runners side by side on few cores, give them all the same
            value (`conditions` says what each runner was created with).

    The session is created on construction and released by `close()` or by leaving a `with` block.

    Providers are picked from `onnxruntime.get_available_providers()`, restricted to `SUPPORTED_PROVIDERS`
    (CPUExecutionProvider only, for now). To run on a GPU, replace the `onnxruntime` wheel by `onnxruntime-gpu` of the
    same version and add "CUDAExecutionProvider" in front of `SUPPORTED_PROVIDERS`. Never install both wheels: they
    own the same `onnxruntime/` package and overwrite each other's files.
    """

    name: str = "onnxruntime-cpu"

    def __init__(
        self,
        model: str | os.PathLike | bytes | onnx.ModelProto,
        threads: int | None = None,
        optimization: str = "all",
        spinning: bool | None = None,
    ):
        self.description = describe_model(model)
        options = session_options(threads, optimization, spinning)
        self.providers: list[str] = _pick_providers(ort.get_available_providers())
        if hasattr(model, "SerializeToString"):  # an in-memory onnx.ModelProto (weights inside it)
            source = model.SerializeToString()
        else:
            source = bytes(model) if isinstance(model, (bytes, bytearray)) else os.fspath(model)
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                source, sess_options=options, providers=self.providers
            )
        except Exception as error:  # ONNX Runtime's own types (InvalidProtobuf, Fail, ...); keep them, add context.
            error.add_note(f"while creating an ONNX Runtime session for {self.description}")
            raise
        self.threads = threads
        self.optimization = optimization
        self.spinning = spinning
        self.inputs = tuple(_input_spec(arg) for arg in self._session.get_inputs())
        self.output_names: list[str] = [arg.name for arg in self._session.get_outputs()]

    @property
    def conditions(self) -> dict[str, object]:
        """The settings this runner's timings depend on besides the model: what two runners compared side by side
        must share (same threads, optimisation level, spinning, providers, ONNX Runtime version)."""
        return {"backend": self.name, "onnxruntime": ort.__version__, "providers": list(self.providers),
                "intra_op_threads": self.threads, "inter_op_threads": 1, "execution_mode": "sequential",
                "optimization": self.optimization, "spinning": self.spinning}

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter_ns()
        outputs = self._session.run(self.output_names, feed)
        self.last_inference_ms = (time.perf_counter_ns() - start) / 1e6
        return outputs

    def _release(self) -> None:
        self._session = None

    def __repr__(self) -> str:
        return (
            f"OnnxRuntimeRunner({self.description}, threads={self.threads}, "
            f"optimization={self.optimization!r}, spinning={self.spinning}, providers={self.providers})"
        )


def session_options(threads: int | None, optimization: str = "all", spinning: bool | None = None) -> ort.SessionOptions:
    """The options every OnnxRuntimeRunner session gets (benchmarks that need a raw session add theirs on top)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (ONNX Runtime's default), got {threads!r}")
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(
            f"unknown optimization level {optimization!r}; choose one of: {', '.join(OPTIMIZATION_LEVELS)}"
        )
    if spinning is not None and not isinstance(spinning, bool):
        raise ValueError(f"spinning must be True, False or None (ONNX Runtime's default), got {spinning!r}")
    options = ort.SessionOptions()
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = _QUIET_LOG_SEVERITY
    return options


def _pick_providers(available: list[str]) -> list[str]:
    providers = [provider for provider in SUPPORTED_PROVIDERS if provider in available]
    if not providers:
        raise RuntimeError(
            f"ONNX Runtime offers none of the supported execution providers {list(SUPPORTED_PROVIDERS)} "
            f"(available: {available}); reinstall the onnxruntime wheel pinned in pyproject.toml"
        )
    return providers


def _input_spec(arg: ort.NodeArg) -> InputSpec:
    """What ONNX Runtime says about an input: "tensor(float)" -> float32; a symbolic or unknown dimension -> None."""
    dtype = _ORT_TYPE_TO_NUMPY.get(arg.type.removeprefix("tensor(").removesuffix(")"))
    shape = None if arg.shape is None else tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return InputSpec(arg.name, shape, dtype)
