"""Static cost of an ONNX model: multiply-accumulates of its conv/matmul layers and its parameter count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort


@dataclass(frozen=True)
class Cost:
    macs: int    # multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul for one image
    params: int  # elements of float constants (weights, biases, per-channel constants)

    def to_dict(self) -> dict[str, int]:
        return {"macs": self.macs, "params": self.params}


def _image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The graph's image input (before IR version 4, initializers were listed as inputs too)."""
    initializers = {i.name for i in graph.initializer}
    return next(i for i in graph.input if i.name not in initializers)


def _with_static_input(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    dims = _image_input(fixed.graph).type.tensor_type.shape.dim
    for d, size in zip(dims, input_shape):
        d.Clear()
        d.dim_value = size
    del fixed.graph.value_info[:]
    # data_prop: sizes computed from Shape at run time (interpolate(x, size=y.shape[-2:])) become known
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def count_params(model: onnx.ModelProto) -> int:
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in floats)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in floats:
                    total += int(np.prod(attr.t.dims))
    return total


def _measured_shapes(model: onnx.ModelProto, input_shape: tuple[int, ...], names: set[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` from one ONNX Runtime run on zeros at `input_shape`. Static inference gives up where sizes
    come from run-time arithmetic it cannot follow (a legacy torch.chunk's Split bounds, a Reshape whose target is
    read from Shape); running the graph gives them exactly."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(names - listed))
    image = _image_input(probe.graph)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(image.type.tensor_type.elem_type)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {image.name: np.zeros(input_shape, dtype)})
    return {o.name: tuple(v.shape) for o, v in zip(session.get_outputs(), outputs) if o.name in names}


def _layer_shapes(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor the MAC count reads: from static inference, else measured."""
    shapes = _shapes(_with_static_input(model, input_shape))
    needed = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            needed.update(n for n in (node.input[0], node.input[1], node.output[0]) if n)
    missing = needed - shapes.keys()
    return shapes | _measured_shapes(model, input_shape, missing) if missing else shapes


def conv_macs(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per Conv, ConvTranspose, Gemm and MatMul node (by node name, else its first output's name) for one forward
    pass at `input_shape` (batch included; pass batch 1 for per-image cost)."""
    shapes = _layer_shapes(model, input_shape)
    macs: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = shapes[node.input[1]]
            ref = shapes[node.output[0] if node.op_type == "Conv" else node.input[0]]
            # Conv: every output element takes (C_in/group) * k*k MACs. ConvTranspose: every input element scatters
            # into (C_out/group) * k*k outputs; weight is [C_in, C_out/group, k...].
            count = int(np.prod(ref)) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            transposed = node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute)
            count = int(np.prod(out)) * (a[0] if transposed else a[-1])
        else:
            continue
        macs[node.name or node.output[0]] = count
    return macs


def count_macs(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> int:
    """MACs for one forward pass at `input_shape` (batch included; pass batch 1 for per-image cost)."""
    return sum(conv_macs(model, input_shape).values())


def model_cost(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> Cost:
    return Cost(macs=count_macs(model, input_shape), params=count_params(model))
