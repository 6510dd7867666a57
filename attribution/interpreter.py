"""Runs an ONNX conv net in PyTorch, with every ONNX tensor name as a handle for activations and gradients.

Attribution needs the activations of arbitrary intermediate tensors and the gradients of the outputs with respect to
them, addressed by the names the ONNX graph (and so the pruning surgery) uses. ONNX Runtime gives no gradients and
onnx2torch renames everything (and is unmaintained), hence this interpreter: the loop of onnx.reference's
ReferenceEvaluator (an environment dict from tensor name to value, filled node by node in topological order) with the
ops of `disasm.attribution.ops`, which are PyTorch functions and so differentiable, on CPU or CUDA.

    graph = TorchGraph(onnx.load("model.onnx"), device="cuda")
    out = graph.run({"image": x}, capture=["/backbone/layer3/relu/Relu_output_0"])
    act = out["/backbone/layer3/relu/Relu_output_0"]
    grad, = torch.autograd.grad(out["logits"][:, 3].sum(), [act])

Everything that can go wrong with the model itself (unknown ops, unsupported attribute values, dangling tensor
names) is found when the graph is built, not on the first run. Subnormal float constants are set to 0 when the graph
is built (see _without_subnormals): they cost a slow path on every multiplication and change nothing measurable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import onnx
import torch
from onnx import helper

from disasm.attribution.ops import (
    OpContext,
    OpImpl,
    find_op,
    onnx_schema_defaults,
    place,
    supported_op_types,
    tensor_from_proto,
)
from disasm.compiler.errors import DisasmError, UnsupportedOpsError

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class _Step:
    """One node, bound to its op implementation and resolved attributes."""

    impl: OpImpl
    ctx: OpContext
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]


class TorchGraph:
    """An ONNX graph as a PyTorch callable whose every tensor can be captured by name.

    Args:
        model: the ONNX model, with its external data loaded (onnx.load does that by default).
        device: where float tensors live and the network runs ("cpu", "cuda", "cuda:1", a torch.device).
        dtype: the floating-point dtype of every float tensor, whatever the ONNX types say. Defaults to float32.
    """

    def __init__(self, model: onnx.ModelProto, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if not dtype.is_floating_point:
            raise DisasmError(f"TorchGraph: dtype must be a floating-point torch dtype, got {dtype}.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.opset = default_opset(model)
        graph = model.graph
        initializer_names = {t.name for t in graph.initializer}
        # Before IR version 4 initializers were also listed as graph inputs; those are weights, not inputs.
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in initializer_names]
        self.output_names: list[str] = [o.name for o in graph.output]
        self._input_ranks = {i.name: _declared_rank(i) for i in graph.input if i.name not in initializer_names}
        _check_op_types(graph.node, self.opset)
        self._steps = [self._step(node, find_op(node.op_type, self.opset))
                       for node in _toposort(graph, set(self.input_names) | initializer_names)]
        host_only = _host_only_names(self._steps)
        self._constants = {t.name: self._place_constant(t.name, tensor_from_proto(t, dtype, self.device), host_only)
                           for t in graph.initializer}
        self._steps = self._fold_constants(self._steps, host_only)
        self._known = set(self._constants) | set(self.input_names) | {o for s in self._steps for o in s.outputs if o}
        self._release_after = _last_uses(self._steps, set(self.output_names))

    # -- public ----------------------------------------------------------------------------------------------------

    @property
    def constants(self) -> Mapping[str, torch.Tensor]:
        """The initializer values every run reads (name -> tensor, constants folded at construction included)."""
        return MappingProxyType(self._constants)

    def set_constant(self, name: str, value: torch.Tensor) -> None:
        """Replace an initializer's value, e.g. by a trainable torch.nn.Parameter; every later run reads it."""
        if name not in self._constants:
            raise DisasmError(f"TorchGraph: no initializer named {name!r}")
        self._constants[name] = value

    def run(self, inputs: Mapping[str, torch.Tensor], capture: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Runs the graph and returns the graph outputs plus every tensor named in `capture`.

        Captured float tensors stay attached to the autograd graph, so ``torch.autograd.grad(y, [captured...])``
        works; when nothing upstream requires grad (plain inputs, constant weights), a captured tensor is made a leaf
        that requires grad, so the gradient is defined all the same. Under torch.no_grad() nothing is attached.

        Raises:
            DisasmError: a missing or unknown input, an input of the wrong rank, or an unknown capture name.
        """
        capture = list(capture)
        self._check_capture(capture)
        wanted = set(capture)
        attach = torch.is_grad_enabled()
        env: dict[str, torch.Tensor] = dict(self._constants)
        env.update(self._prepare_inputs(inputs))
        for name in wanted & env.keys():
            env[name] = _attach(env[name]) if attach else env[name]
        keep = set(self.output_names) | wanted
        for index, step in enumerate(self._steps):
            results = self._run_step(step, env)
            for name, value in zip(step.outputs, results):
                if name:
                    env[name] = _attach(value) if attach and name in wanted else value
            for name in self._release_after[index]:
                if name not in keep:
                    env.pop(name, None)  # free activations nobody reads any more
        return {name: env[name] for name in [*self.output_names, *capture]}

    __call__ = run

    # -- construction ------------------------------------------------------------------------------------------------

    def _step(self, node: onnx.NodeProto, impl: OpImpl) -> _Step:
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        defaults = onnx_schema_defaults(node.op_type, max(self.opset, impl.since))
        attrs = {name: self._attribute(a) for name, a in defaults.items()}
        attrs.update({a.name: self._attribute(a) for a in node.attribute})
        ctx = OpContext(label, attrs, self.opset, self.dtype, self.device, len(node.output))
        produced = [i for i, name in enumerate(node.output) if name]
        if impl.max_outputs is not None and produced and produced[-1] >= impl.max_outputs:
            raise DisasmError(f"{label}: output {produced[-1]} ({node.output[produced[-1]]!r}) is not supported; "
                              f"the interpreter computes only the first {impl.max_outputs} (inference).")
        if impl.validate is not None:
            impl.validate(ctx)
        return _Step(impl, ctx, tuple(node.input), tuple(node.output))

    def _attribute(self, attribute: onnx.AttributeProto) -> object:
        """An attribute as a Python value: strings decoded, tensors converted to torch once, here."""
        value = helper.get_attribute_value(attribute)
        kind = attribute.type
        if kind == onnx.AttributeProto.STRING:
            return value.decode()
        if kind == onnx.AttributeProto.STRINGS:
            return [v.decode() for v in value]
        if kind == onnx.AttributeProto.TENSOR:
            return tensor_from_proto(value, self.dtype, self.device)
        if kind == onnx.AttributeProto.SPARSE_TENSOR:
            return self._dense_from_sparse(value)
        if kind in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS):
            return list(value)
        return value

    def _dense_from_sparse(self, sparse: onnx.SparseTensorProto) -> torch.Tensor:
        values = onnx.numpy_helper.to_array(sparse.values)
        indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        dense = np.zeros(int(np.prod(sparse.dims)), dtype=values.dtype)
        # Indices are either linear ([NNZ]) or coordinates ([NNZ, rank]).
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, tuple(sparse.dims))
        dense[flat] = values
        return place(torch.from_numpy(dense.reshape(tuple(sparse.dims))), self.dtype, self.device)

    def _place_constant(self, name: str, value: torch.Tensor, host_only: set[str]) -> torch.Tensor:
        # A float constant that only ever feeds host inputs (Resize scales, say) stays on the CPU: it is read as
        # Python numbers on every run, and reading it from a CUDA tensor would synchronise the device.
        return value.cpu() if name in host_only else _without_subnormals(value)

    def _fold_constants(self, steps: list[_Step], host_only: set[str]) -> list[_Step]:
        """Nodes without inputs (Constant) are evaluated once here instead of on every run."""
        remaining = []
        for step in steps:
            if step.inputs:
                remaining.append(step)
                continue
            results = _as_tuple(step.impl.fn(step.ctx))
            for name, value in zip(step.outputs, results):
                if name:
                    self._constants[name] = self._place_constant(name, value, host_only)
        return remaining

    # -- running -------------------------------------------------------------------------------------------------------

    def _run_step(self, step: _Step, env: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        args = [env[name] if name else None for name in step.inputs]
        args = self._align_devices(args, step.impl.host_inputs)
        try:
            return _as_tuple(step.impl.fn(step.ctx, *args))
        except Exception as error:
            shapes = [tuple(a.shape) if a is not None else None for a in args]
            error.add_note(f"while running {step.ctx.label} on inputs {list(step.inputs)} with shapes {shapes}")
            raise

    def _align_devices(self, args: list[torch.Tensor | None], host: frozenset[int]) -> list[torch.Tensor | None]:
        """Moves CPU-side values (constants, shape arithmetic) to the compute device when an op mixes them with device
        tensors; host inputs stay where they are, and pure shape arithmetic stays on the CPU."""
        if self.device.type == "cpu":
            return args
        data = [a for i, a in enumerate(args) if a is not None and i not in host]
        if all(a.device.type == "cpu" for a in data):
            return args
        return [a.to(self.device) if a is not None and i not in host and a.device.type == "cpu" else a
                for i, a in enumerate(args)]

    def _prepare_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self._input_ranks]
        if missing or unknown:
            raise DisasmError(
                f"TorchGraph.run: inputs do not match the graph: missing {missing}, unknown {unknown}; "
                f"the graph takes {self.input_names}."
            )
        prepared = {}
        for name in self.input_names:
            value = torch.as_tensor(inputs[name])
            rank = self._input_ranks[name]
            if rank is not None and value.dim() != rank:
                raise DisasmError(f"TorchGraph.run: input {name!r} must have rank {rank}, got shape "
                                  f"{tuple(value.shape)}.")
            prepared[name] = value.to(device=self.device, dtype=_input_dtype(value, self.dtype))
        return prepared

    def _check_capture(self, capture: list[str]) -> None:
        unknown = [name for name in capture if name not in self._known]
        if unknown:
            examples = sorted(self._known - set(self._constants))[:5]
            raise DisasmError(
                f"TorchGraph.run: cannot capture {unknown}: no input, initializer or node output has that name "
                f"(tensor names look like {examples}). Names are the ONNX tensor names, not node names."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------------------------------


def default_opset(model: onnx.ModelProto) -> int:
    """The opset version of the default ONNX domain, which decides every op's semantics."""
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return entry.version
    raise DisasmError("the model imports no opset for the default ONNX domain; it is not a valid ONNX model.")


def _check_op_types(nodes: Iterable[onnx.NodeProto], opset: int) -> None:
    """Every node must have an implementation; all unknown op types are reported together, with what is supported."""
    unknown = {
        node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
        for node in nodes
        if node.domain not in _DEFAULT_DOMAINS or find_op(node.op_type, opset) is None
    }
    if unknown:
        raise UnsupportedOpsError(f"TorchGraph (opset {opset})", unknown, supported_op_types())


def _declared_rank(value_info: onnx.ValueInfoProto) -> int | None:
    tensor_type = value_info.type.tensor_type
    return len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None


def _toposort(graph: onnx.GraphProto, available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is computed before use (ONNX requires it; some tools break it).
    Keeps the file's order where that already works."""
    producers = {name for node in graph.node for name in node.output if name}
    for node in graph.node:
        dangling = [n for n in node.input if n and n not in producers and n not in available]
        if dangling:
            raise DisasmError(f"{node.op_type} node {node.name or node.output[0]!r} reads {dangling}, which no "
                              "graph input, initializer or node provides.")
    missing_outputs = [o.name for o in graph.output if o.name not in producers and o.name not in available]
    if missing_outputs:
        raise DisasmError(f"graph outputs {missing_outputs} are not produced by any node.")
    return topological_order(graph.node, available)


def topological_order(nodes: Iterable[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each runs after whatever produces its inputs (`available` are given), keeping the
    given order where it already works; a cycle or a tensor nothing produces is a DisasmError."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:  # one pass when the file is already sorted
        still = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                still.append(node)
        if len(still) == len(pending):
            raise DisasmError(f"the graph has a cycle through {[n.name or n.op_type for n in still[:5]]}.")
        pending = still
    return ordered


def _host_only_names(steps: Sequence[_Step]) -> set[str]:
    """Tensors that every consumer reads at a host-input position (shapes, axes, scales)."""
    host, data = set(), set()
    for step in steps:
        for position, name in enumerate(step.inputs):
            (host if position in step.impl.host_inputs else data).add(name)
    return host - data


def _last_uses(steps: Sequence[_Step], outputs: set[str]) -> list[list[str]]:
    """For each step, the tensors read for the last time there (graph outputs are never released)."""
    last: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.inputs:
            if name:
                last[name] = index
    release: list[list[str]] = [[] for _ in steps]
    for name, index in last.items():
        if name not in outputs:
            release[index].append(name)
    return release


def _input_dtype(value: torch.Tensor, float_dtype: torch.dtype) -> torch.dtype:
    if value.is_floating_point():
        return float_dtype
    return torch.bool if value.dtype == torch.bool else torch.int64


def _as_tuple(result: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def _without_subnormals(value: torch.Tensor) -> torch.Tensor:
    """A float constant with its subnormal values (below torch.finfo(dtype).tiny, 1.2e-38 in float32) set to 0.

    Trained weights can hold many (TwinLiteNet: 11 % of them, whole dead channels). A CPU multiplies by one through a
    slow microcode path unless the thread flushes denormals, which torch does not by default: a forward of TwinLiteNet
    took 0.54 s with them and 0.07 s without. What they add to any sum is below float32's resolution of that sum."""
    if not value.is_floating_point():
        return value
    subnormal = (value != 0) & (value.abs() < torch.finfo(value.dtype).tiny)
    return torch.where(subnormal, torch.zeros((), dtype=value.dtype, device=value.device), value) \
        if subnormal.any() else value


def _attach(value: torch.Tensor) -> torch.Tensor:
    """Makes a captured float tensor part of the autograd graph (see TorchGraph.run)."""
    if value.is_floating_point() and not value.requires_grad:
        return value.detach().requires_grad_()
    return value


__all__ = ["TorchGraph", "default_opset"]
