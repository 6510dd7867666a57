"""The runner interface every backend implements, and the one check of what is fed to a model.

A runner executes one model on one backend (ONNX Runtime on the CPU, a TensorRT engine, the torch interpreter on a
GPU) and nothing else: timing runners fairly is `disasm.runtime.latency`'s job, comparing outputs
`disasm.runtime.metrics`'. Every runner offers the same things (Polygraphy's BaseRunner, STYLE.md lessons 6 and 13):

    with OnnxRuntimeRunner("pruned.onnx", threads=2) as runner:     # or TensorRTRunner(engine), TorchRunner(model)
        runner.input_names, runner.input_shapes, runner.input_dtypes  # what it takes (None: a dynamic dimension)
        (logits,) = runner.infer(image)                               # or runner.infer({"image": image})
        runner.conditions                                             # the settings its timings depend on

`Runner.infer` checks the feed here, once for every backend (`check_feed`: one array or a name -> array mapping; the
names, each array's rank, static dimensions and dtype), and only then hands it to the backend's `_infer`. A feed that
does not fit is a `FeedError` with one line naming the runner, the input, what was expected and what came.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from disasm.compiler.errors import DisasmError  # the one user-error type (a leaf module: no graph code comes with it)

#: What `Runner.infer` takes: the input array of a one-input model, or a mapping from input name to array.
Feed = np.ndarray | Mapping[str, np.ndarray]


class FeedError(DisasmError, ValueError):
    """What was fed to a runner does not fit the model's inputs. The message names the runner and the input and
    says what was expected and what came. (Also a ValueError, which runners raised before this type existed.)"""


@dataclass(frozen=True)
class InputSpec:
    """One model input as a runner checks it.

    `shape` holds None for a dynamic dimension, and is None itself when not even the rank is known; `dtype` is None
    when the backend does not say (nothing is checked then)."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype | None

    def shape_text(self) -> str:
        """"[1, 3, ?, ?]" (a ? for each dynamic dimension)."""
        if self.shape is None:
            return "[...]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def check_feed(runner: str, feed: Feed, inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The feed as a dict from input name to array, after checking it against `inputs`.

    Args:
        runner: The runner's name, for the messages.
        feed: One numpy array (a model with one input) or a mapping from input name to numpy array.
        inputs: The model's inputs.

    Raises:
        FeedError: not an array or mapping, one array for several inputs, missing or unknown names, a value that is
            not a numpy array, a dtype other than the input's, another rank, or a static dimension of another size.
    """
    names = [spec.name for spec in inputs]
    if isinstance(feed, np.ndarray):
        if len(names) != 1:
            raise FeedError(f"{runner}: the model has {len(names)} inputs ({', '.join(names)}); pass a dict from "
                            "input name to array")
        feed = {names[0]: feed}
    elif not isinstance(feed, Mapping):
        raise FeedError(f"{runner}: feed must be a numpy array or a dict from input name to array, "
                        f"got {type(feed).__name__}")
    missing = [name for name in names if name not in feed]
    unknown = [name for name in feed if name not in names]
    if missing or unknown:
        raise FeedError(f"{runner}: feed names do not match the model's inputs: missing {missing}, unknown {unknown}; "
                        f"expected {names}")
    not_arrays = [name for name in names if not isinstance(feed[name], np.ndarray)]
    if not_arrays:
        raise FeedError(f"{runner}: feed values must be numpy arrays; not arrays: {not_arrays}")
    for spec in inputs:
        _check_array(runner, spec, feed[spec.name])
    return {name: feed[name] for name in names}


def _check_array(runner: str, spec: InputSpec, array: np.ndarray) -> None:
    if spec.dtype is not None and array.dtype != spec.dtype:
        raise FeedError(f"{runner}: input {spec.name!r}: expected dtype {spec.dtype}, got {array.dtype}; "
                        f"convert with .astype(np.{spec.dtype})")
    if spec.shape is None:
        return
    fits = len(spec.shape) == array.ndim and all(d is None or d == n for d, n in zip(spec.shape, array.shape))
    if not fits:
        raise FeedError(f"{runner}: input {spec.name!r}: expected shape {spec.shape_text()}, got {list(array.shape)}")


class Runner(ABC):
    """One model on one backend: checks feeds (`check_feed`), runs, and says under which conditions it ran.

    A subclass sets in its constructor `name` (the backend, e.g. "onnxruntime-cpu"), `description` (the model, for
    messages), `inputs` and `output_names`, and implements `_infer` (given a checked feed, return the outputs in
    `output_names` order and set `last_inference_ms`), `_release` and `conditions`. The public `infer`, `close` and
    the context manager live here, so every backend checks and closes alike.
    """

    name: str
    description: str
    inputs: tuple[InputSpec, ...]
    output_names: list[str]
    #: Wall time of the latest `infer` in milliseconds, the backend's execution only (feed checks and, on a GPU, the
    #: host-device copies excluded); None before the first call.
    last_inference_ms: float | None = None
    _closed: bool = False

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def input_name(self) -> str:
        """The first input's name (the image, for the segmentation models this project handles)."""
        return self.inputs[0].name

    @property
    def input_shapes(self) -> dict[str, tuple[int | None, ...] | None]:
        """Input name -> shape, None for a dynamic dimension (or for the whole shape when the rank is unknown)."""
        return {spec.name: spec.shape for spec in self.inputs}

    @property
    def input_dtypes(self) -> dict[str, np.dtype | None]:
        return {spec.name: spec.dtype for spec in self.inputs}

    @property
    @abstractmethod
    def conditions(self) -> dict[str, object]:
        """The settings this runner's timings depend on besides the model: what two runners compared side by side
        must share (backend and its version, threads or device, precision, ...)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def infer(self, feed: Feed) -> list[np.ndarray]:
        """Run the model once on `feed` (the input array, or a dict from input name to array) and return its outputs
        in `output_names` order, as numpy arrays. A feed that does not fit is a FeedError, raised before the backend
        sees it."""
        self._check_open()
        return self._infer(check_feed(self.name, feed, self.inputs))

    def close(self) -> None:
        """Release what the backend holds (session, engine, device memory). `infer` fails afterwards."""
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: {self.description} is closed; create a new runner")

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on a checked feed (every input name, in `inputs` order) and return the outputs."""

    @abstractmethod
    def _release(self) -> None:
        """Drop the backend's resources (called once, by `close`)."""


def describe_model(model: object) -> str:
    """How a runner names its model in messages: a path (which must exist), bytes, or an in-memory ModelProto."""
    if hasattr(model, "graph") and hasattr(model, "SerializeToString"):  # onnx.ModelProto, without importing onnx
        return f"<ONNX model {model.graph.name or 'graph'!r}>"
    if isinstance(model, (bytes, bytearray)):
        return f"<{len(model)} bytes of ONNX>"
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model not found: {path}")
        return repr(path)
    raise ValueError(f"model must be a path, serialized ONNX bytes or an onnx.ModelProto, got {type(model).__name__}")


__all__ = ["Feed", "FeedError", "InputSpec", "Runner", "check_feed", "describe_model"]
