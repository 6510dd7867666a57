"""Torch backend: an ONNX model run by the attribution interpreter on a torch device, optionally FP16 and replayed
from CUDA graphs.

This is the GPU backend where TensorRT cannot run: TensorRT for RTX has no SM90 target, so on an H200 full and pruned
models are timed here (FP16, CUDA graphs). On the CPU in float32 it is the interpreter attribution uses, which makes
it a reference for the other backends too.

    with TorchRunner("pruned.onnx", device="cuda", fp16=True) as runner:   # CUDA graphs by default on CUDA
        (logits,) = runner.infer(image)                                    # numpy in, numpy out
        run = runner.device_call(image)     # what to time on a GPU: replay + synchronise, no host copies
        measure_latency({"pruned": run})

This module is the one in `runtime/` that needs `disasm.attribution` (its interpreter); the other backends need only
ONNX files and engines.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper

from disasm.attribution.interpreter import TorchGraph
from disasm.compiler.errors import DisasmError
from disasm.runtime.runner import Feed, InputSpec, Runner, check_feed, describe_model

#: Eager runs on a side stream before a CUDA graph is captured (cuDNN picks its algorithms, allocations settle).
CAPTURE_WARMUP = 3


@dataclass
class _Captured:
    """One CUDA graph for one set of input shapes: its static input buffers and the outputs it writes."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: list[torch.Tensor]


class TorchRunner(Runner):
    """One ONNX model on a torch device through `disasm.attribution.interpreter.TorchGraph`.

    Args:
        model: Path to an ONNX file (external data next to it is loaded), its serialized bytes, or a ModelProto.
        device: A torch device: "cpu", "cuda", "cuda:1". Defaults to "cpu".
        fp16: Run every float tensor (weights, activations, float inputs) in float16; float outputs come back in the
            type the model declares (float32). Defaults to False (float32; on CUDA, cuDNN may use TF32 for
            convolutions as torch allows by default: `conditions` says).
        cuda_graphs: Capture the whole forward as one CUDA graph per input shape (on the first call with that shape)
            and replay it afterwards, which removes the interpreter's per-node Python and launch overhead. Defaults
            to True on a CUDA device; on a CPU it is an error. A model the capture fails on (an op that reads a device
            value on the host, say) runs eagerly instead, with a warning, and `conditions["cuda_graphs"]` is False.

    `infer` copies the feed to the device and the outputs back; `last_inference_ms` times the device work only.
    `device_call(feed)` returns a callable that runs on a feed already on the device and waits for it: what to
    time on a GPU. Nothing is allocated on the device after `close()`.
    """

    def __init__(self, model: str | os.PathLike | bytes | onnx.ModelProto, device: str | torch.device = "cpu",
                 fp16: bool = False, cuda_graphs: bool | None = None):
        self.description = describe_model(model)
        self.device = _checked_device(device)
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise DisasmError(f"torch runner: CUDA graphs need a CUDA device, not {self.device}; leave cuda_graphs "
                              "unset or use device='cuda'")
        self.name = f"torch-{self.device.type}"
        self.fp16 = bool(fp16)
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self.capture_failure: str | None = None  # why the CUDA graph capture failed, when it did
        proto = _load(model)
        self._graph = TorchGraph(proto, device=self.device, dtype=torch.float16 if self.fp16 else torch.float32)
        initializers = {t.name for t in proto.graph.initializer}
        self.inputs = tuple(_input_spec(v) for v in proto.graph.input if v.name not in initializers)
        self.output_names: list[str] = list(self._graph.output_names)
        self._output_dtypes = {v.name: _np_dtype(v) for v in proto.graph.output}
        self._captured: dict[tuple, _Captured] = {}

    @property
    def conditions(self) -> dict[str, object]:
        """Backend, torch version, device, precision, whether CUDA graphs replay, and the math modes that change
        timings (TF32 on CUDA, the thread count on a CPU)."""
        conditions: dict[str, object] = {"backend": self.name, "torch": torch.__version__, "device": str(self.device),
                                         "precision": "fp16" if self.fp16 else "fp32",
                                         "cuda_graphs": self.cuda_graphs and self.capture_failure is None}
        if self.device.type == "cuda":
            conditions |= {"device_name": torch.cuda.get_device_name(self.device),
                           "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                           "cudnn_benchmark": torch.backends.cudnn.benchmark}
        else:
            conditions["threads"] = torch.get_num_threads()
        return conditions

    def device_call(self, feed: Feed) -> Callable[[], None]:
        """A callable taking no arguments that runs the model once on `feed` and waits for the device: the feed is
        checked and copied to the device now (and, with CUDA graphs, the graph for its shapes captured now), so
        calling it times the device work alone. The outputs of the last call stay on the device, unread. With CUDA
        graphs a captured graph reads fixed input buffers: a later `infer` or `device_call` with the same shapes
        replaces the data this callable runs on."""
        self._check_open()
        run = self._bind(check_feed(self.name, feed, self.inputs))

        def call() -> None:
            run()
            self._synchronize()

        return call

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        run = self._bind(feed)
        self._synchronize()
        start = time.perf_counter_ns()
        outputs = run()
        self._synchronize()
        self.last_inference_ms = (time.perf_counter_ns() - start) / 1e6
        return [self._to_numpy(name, value) for name, value in zip(self.output_names, outputs)]

    def _release(self) -> None:
        self._captured.clear()
        self._graph = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return (f"TorchRunner({self.description}, device={str(self.device)!r}, fp16={self.fp16}, "
                f"cuda_graphs={self.cuda_graphs})")

    # -- running -------------------------------------------------------------------------------------------------------

    def _bind(self, feed: dict[str, np.ndarray]) -> Callable[[], list[torch.Tensor]]:
        """Put the feed on the device and return what runs the model on it."""
        host = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in feed.items()}
        if self.cuda_graphs and self.capture_failure is None:
            key = tuple((name, tuple(t.shape), t.dtype) for name, t in host.items())
            captured = self._captured.get(key) or self._capture(key, host)
            if captured is not None:
                for name, tensor in host.items():
                    captured.inputs[name].copy_(tensor)
                return lambda: (captured.graph.replay(), captured.outputs)[1]
        on_device = {name: self._device_tensor(t).copy_(t) for name, t in host.items()}
        return lambda: self._eager(on_device)

    def _eager(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            outputs = self._graph.run(inputs)
        return [outputs[name] for name in self.output_names]

    def _capture(self, key: tuple, host: dict[str, torch.Tensor]) -> _Captured | None:
        """Capture the forward for these input shapes; None (and eager runs from now on) when the model cannot be
        captured."""
        static = {name: self._device_tensor(t).copy_(t) for name, t in host.items()}
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARMUP):
                    self._eager(static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(self.device), torch.cuda.graph(graph):
                outputs = self._eager(static)
        except Exception as error:  # noqa: BLE001  (a capture error is torch's or CUDA's; the model still runs eagerly)
            torch.cuda.synchronize(self.device)
            self.capture_failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(f"{self.name}: CUDA graph capture failed for {self.description} ({self.capture_failure}); "
                          "running eagerly", RuntimeWarning, stacklevel=3)
            return None
        self._captured[key] = _Captured(graph, static, outputs)
        return self._captured[key]

    def _device_tensor(self, host: torch.Tensor) -> torch.Tensor:
        """An empty device tensor for a host input, in the dtype the interpreter computes in (float16 with fp16)."""
        dtype = self._graph.dtype if host.is_floating_point() else host.dtype
        return torch.empty(host.shape, dtype=dtype, device=self.device)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _to_numpy(self, name: str, value: torch.Tensor) -> np.ndarray:
        array = value.detach().cpu().numpy()
        declared = self._output_dtypes.get(name)
        if array.dtype.kind == "f" and declared is not None and declared.kind == "f":
            return array.astype(declared, copy=False)
        return array.astype(np.float32) if array.dtype == np.float16 else array


def _load(model: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(os.fspath(model))  # external data next to the file is loaded with it


def _checked_device(device: str | torch.device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DisasmError(f"torch runner: {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DisasmError(f"torch runner: device {device!r}: torch sees no CUDA GPU here; use device='cpu'")
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        if index >= torch.cuda.device_count():
            raise DisasmError(f"torch runner: device {device!r}: there are {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device("cuda", index)
    if parsed.type != "cpu":
        raise DisasmError(f"torch runner: device {device!r} is not supported; use cpu or cuda")
    return parsed


def _np_dtype(value: onnx.ValueInfoProto) -> np.dtype | None:
    elem_type = value.type.tensor_type.elem_type
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type else None


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    tensor_type = value.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in tensor_type.shape.dim)
    return InputSpec(value.name, shape, _np_dtype(value))


__all__ = ["TorchRunner"]
