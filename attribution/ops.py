"""The ONNX operators the interpreter runs, as small PyTorch functions in one table keyed by op type and since-version.

Every function has the form ``fn(ctx, *inputs)``: ``ctx`` carries the node's attributes (resolved once, when the graph
is loaded, with the schema defaults of the model's opset) plus the interpreter's float dtype and device, and ``inputs``
are the node's input tensors in ONNX order, ``None`` for an omitted optional input. A function returns one tensor or a
tuple of tensors. Math that several operators share (padding geometry, resize taps) is a plain module-level function.

Where a function departs from the ONNX text, it does so to match ONNX Runtime, which is the reference the tests compare
against; each such place says so.

Two representation rules keep the table small:
- All floating-point tensors use the interpreter's dtype (float32 by default), whatever the ONNX type (float16, double).
- Integer tensors are int64 and booleans are bool. Integer shape arithmetic (Shape, Gather on shapes, Concat of dims)
  runs on the CPU: those values are read back as Python ints, and reading a CUDA tensor would synchronise the device
  once per read. An input an op reads as Python numbers (a shape, axes, pads, scales) is a *host input*.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from disasm.compiler.errors import DisasmError

Tensor = torch.Tensor


@dataclass(frozen=True)
class OpContext:
    """What an op function may know besides its inputs: the node's resolved attributes and the interpreter settings."""

    label: str  # e.g. "Conv node 'layer1/conv'": used in every message about this node
    attrs: Mapping[str, Any]
    opset: int
    dtype: torch.dtype
    device: torch.device
    num_outputs: int


OpFn = Callable[..., "Tensor | tuple[Tensor, ...]"]


@dataclass(frozen=True)
class OpImpl:
    """One since-version of one operator.

    host_inputs: input positions read as Python numbers; they are never moved to the compute device.
    max_outputs: how many outputs the function produces (None: as many as the node declares).
    validate: checks the attributes once, at load time, so an unsupported mode fails before the first run.
    """

    since: int
    fn: OpFn
    host_inputs: frozenset[int] = field(default_factory=frozenset)
    max_outputs: int | None = 1
    validate: Callable[[OpContext], None] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_INT_TYPES = {
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
}


def torch_dtype(onnx_type: int, float_dtype: torch.dtype) -> torch.dtype:
    """The dtype the interpreter uses for an ONNX element type (see the module docstring for why so few)."""
    if onnx_type in _FLOAT_TYPES:
        return float_dtype
    if onnx_type in _INT_TYPES:
        return torch.int64
    if onnx_type == TensorProto.BOOL:
        return torch.bool
    name = TensorProto.DataType.Name(onnx_type) if onnx_type in TensorProto.DataType.values() else str(onnx_type)
    raise DisasmError(f"tensor element type {name} is not supported; expected a float, integer or bool type.")


def place(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Floats go to the compute device in the compute dtype; integers and booleans stay on the CPU (host values)."""
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    if t.dtype == torch.bool:
        return t.cpu()
    return t.to(device="cpu", dtype=torch.int64)


def tensor_from_proto(proto: TensorProto, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Converts an initializer or tensor attribute once, at load time."""
    if proto.data_location == TensorProto.EXTERNAL and not proto.raw_data:
        raise DisasmError(
            f"tensor {proto.name!r} keeps its data in an external file that was not loaded; "
            "load the model with onnx.load(path) (load_external_data=True) before building the interpreter."
        )
    target = torch_dtype(proto.data_type, dtype)
    array = numpy_helper.to_array(proto)
    if target.is_floating_point:
        array = np.asarray(array, dtype=np.float32)  # float16/bfloat16/double all pass through float32 to `dtype`
    elif target == torch.int64:
        array = np.asarray(array, dtype=np.int64)
    return place(torch.from_numpy(np.array(array, copy=True)), dtype, device)


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _floats(t: Tensor | None) -> list[float]:
    return [] if t is None else [float(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    """ONNX axes may be negative, counting from the end."""
    return axis + rank if axis < 0 else axis


def _torch_pad_list(pads: Sequence[tuple[int, int]]) -> list[int]:
    """(begin, end) pairs for the trailing axes, first axis first -> F.pad's flat list, which starts at the LAST
    axis."""
    flat: list[int] = []
    for begin, end in reversed(pads):
        flat += [begin, end]
    return flat


def _bad_attr(ctx: OpContext, name: str, allowed: Sequence[Any]) -> DisasmError:
    return DisasmError(
        f"{ctx.label}: attribute {name}={ctx.attrs.get(name)!r} is not supported; supported values: "
        f"{', '.join(map(repr, allowed))}."
    )


def _check_choice(ctx: OpContext, name: str, allowed: Sequence[Any]) -> None:
    if name in ctx.attrs and ctx.attrs[name] not in allowed:
        raise _bad_attr(ctx, name, allowed)


# ---------------------------------------------------------------------------------------------------------------------
# Elementwise: unary, binary, variadic, logic
# ---------------------------------------------------------------------------------------------------------------------


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    def run(ctx: OpContext, x: Tensor) -> Tensor:
        return fn(x)

    return run


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(ctx: OpContext, a: Tensor, b: Tensor) -> Tensor:
        return fn(a, b)

    return run


def _div(ctx: OpContext, a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates like C, torch `/` would give floats


def _pow(ctx: OpContext, base: Tensor, exponent: Tensor) -> Tensor:
    return torch.pow(base, exponent).to(base.dtype)  # the output has the base's type, whatever the exponent's


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(ctx: OpContext, *xs: Tensor) -> Tensor:
        return functools.reduce(fn, xs)

    return run


def _mean(ctx: OpContext, *xs: Tensor) -> Tensor:
    return functools.reduce(torch.add, xs) / len(xs)


def _where(ctx: OpContext, condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(condition, x, y)


def _mod(ctx: OpContext, a: Tensor, b: Tensor) -> Tensor:
    if ctx.attrs["fmod"]:
        return torch.fmod(a, b)  # C fmod: the sign of the dividend
    return torch.remainder(a, b)  # fmod=0 (integers only): the sign of the divisor, like Python's %


def _is_inf(ctx: OpContext, x: Tensor) -> Tensor:
    positive, negative = ctx.attrs["detect_positive"], ctx.attrs["detect_negative"]
    if positive and negative:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    if negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------------------


def _leaky_relu(ctx: OpContext, x: Tensor) -> Tensor:
    return F.leaky_relu(x, ctx.attrs["alpha"])


def _prelu(ctx: OpContext, x: Tensor, slope: Tensor) -> Tensor:
    # slope broadcasts numpy-style against x (exporters give [C, 1, 1]); F.prelu would want exactly [C].
    return torch.where(x < 0, x * slope, x)


def _clip_attrs(ctx: OpContext, x: Tensor) -> Tensor:
    low, high = ctx.attrs.get("min"), ctx.attrs.get("max")  # opset 1 has no defaults, opset 6 has +-FLT_MAX
    if low is None and high is None:
        return x
    return torch.clamp(x, min=low, max=high)


def _clip_inputs(ctx: OpContext, x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    # When min > max ONNX and torch.clamp agree: every value becomes max.
    if low is None and high is None:
        return x
    return torch.clamp(x, min=low, max=high)


def _hard_sigmoid(ctx: OpContext, x: Tensor) -> Tensor:
    return torch.clamp(x * ctx.attrs["alpha"] + ctx.attrs["beta"], 0.0, 1.0)


def _elu(ctx: OpContext, x: Tensor) -> Tensor:
    return F.elu(x, ctx.attrs["alpha"])


def _selu(ctx: OpContext, x: Tensor) -> Tensor:
    # F.selu hard-codes the default constants; ONNX lets a model change them.
    return ctx.attrs["gamma"] * torch.where(x > 0, x, ctx.attrs["alpha"] * torch.expm1(x))


def _gelu(ctx: OpContext, x: Tensor) -> Tensor:
    return F.gelu(x, approximate=ctx.attrs["approximate"])


def _celu(ctx: OpContext, x: Tensor) -> Tensor:
    return F.celu(x, ctx.attrs["alpha"])


def _thresholded_relu(ctx: OpContext, x: Tensor) -> Tensor:
    return torch.where(x > ctx.attrs["alpha"], x, torch.zeros_like(x))


def _shrink(ctx: OpContext, x: Tensor) -> Tensor:
    lambd, bias = ctx.attrs["lambd"], ctx.attrs["bias"]
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


# ---------------------------------------------------------------------------------------------------------------------
# Convolution and normalisation
# ---------------------------------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _window_attrs(ctx: OpContext, spatial: int) -> tuple[list[int], list[int]]:
    strides = ctx.attrs.get("strides") or [1] * spatial
    dilations = ctx.attrs.get("dilations") or [1] * spatial
    return list(strides), list(dilations)


def _same_pads(in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               upper: bool) -> list[tuple[int, int]]:
    """SAME_UPPER/SAME_LOWER: output size ceil(in / stride); an odd total padding puts the extra cell at the end
    (UPPER) or at the beginning (LOWER)."""
    pads = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        pads.append((small, total - small) if upper else (total - small, small))
    return pads


def _spatial_pads(ctx: OpContext, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis for Conv and the pools, from auto_pad or the pads attribute."""
    auto_pad = ctx.attrs.get("auto_pad", "NOTSET")
    spatial = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(in_sizes, kernel, strides, dilations, upper=auto_pad == "SAME_UPPER")
    if auto_pad == "VALID":
        return [(0, 0)] * spatial
    pads = ctx.attrs.get("pads") or [0] * (2 * spatial)
    return list(zip(pads[:spatial], pads[spatial:]))  # ONNX lists all begins, then all ends


def _check_auto_pad(ctx: OpContext) -> None:
    _check_choice(ctx, "auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])


def _conv(ctx: OpContext, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    spatial = x.dim() - 2
    strides, dilations = _window_attrs(ctx, spatial)
    pads = _spatial_pads(ctx, x.shape[2:], w.shape[2:], strides, dilations)
    if all(begin == end for begin, end in pads):
        padding = [begin for begin, _ in pads]
    else:  # torch convolutions only pad symmetrically
        x = F.pad(x, _torch_pad_list(pads))
        padding = [0] * spatial
    return _CONV[spatial](x, w, b, strides, padding, dilations, ctx.attrs["group"])


def _conv_transpose_pads(ctx: OpContext, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                         dilations: Sequence[int], output_padding: Sequence[int]) -> list[tuple[int, int]]:
    """How much to crop from each end of the full transposed-convolution output.

    With output_shape or SAME_* (target size in * stride) the total crop makes the requested size. As the spec says,
    SAME_UPPER crops the smaller half of an odd total at the beginning, everything else the larger half. A target
    larger than the full output (negative total) gets the extra cells at the end, as in ONNX Runtime.
    """
    auto_pad = ctx.attrs.get("auto_pad", "NOTSET")
    output_shape = ctx.attrs.get("output_shape")
    spatial = len(in_sizes)
    if not output_shape and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        if auto_pad == "VALID":
            return [(0, 0)] * spatial
        pads = ctx.attrs.get("pads") or [0] * (2 * spatial)
        return list(zip(pads[:spatial], pads[spatial:]))
    targets = list(output_shape)[-spatial:] if output_shape else [n * s for n, s in zip(in_sizes, strides)]
    pads = []
    for n, k, s, d, extra, target in zip(in_sizes, kernel, strides, dilations, output_padding, targets):
        total = s * (n - 1) + extra + (k - 1) * d + 1 - target
        if total < 0:
            pads.append((0, total))
        elif auto_pad == "SAME_UPPER":
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((total - total // 2, total // 2))
    return pads


def _conv_transpose(ctx: OpContext, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """Runs torch's transposed convolution unpadded, then crops `pads` and appends `output_padding`.

    torch only crops symmetrically and restricts output_padding; cropping a full output by hand handles any pads.
    The appended output_padding cells receive no input contribution, so they hold zero (plus the bias, added last).
    """
    spatial = x.dim() - 2
    strides, dilations = _window_attrs(ctx, spatial)
    output_padding = list(ctx.attrs.get("output_padding") or [0] * spatial)
    y = _CONV_TRANSPOSE[spatial](x, w, None, strides, 0, 0, ctx.attrs["group"], dilations)
    pads = _conv_transpose_pads(ctx, x.shape[2:], w.shape[2:], strides, dilations, output_padding)
    y = F.pad(y, _torch_pad_list([(-begin, extra - end) for (begin, end), extra in zip(pads, output_padding)]))
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * spatial))
    return y


def _batch_norm(ctx: OpContext, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    eps = ctx.attrs["epsilon"]
    if scale.dim() == 1:
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    # opset < 9 with spatial=0: statistics per activation, shaped like x[1:], so plain broadcasting applies.
    return (x - mean) / torch.sqrt(var + eps) * scale + bias


def _check_batch_norm(ctx: OpContext) -> None:
    if ctx.attrs.get("training_mode", 0):
        raise DisasmError(f"{ctx.label}: training_mode=1 is not supported; the interpreter runs inference only. "
                          "Export the model in eval mode.")


def _instance_norm(ctx: OpContext, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=ctx.attrs["epsilon"])


def _layer_norm(ctx: OpContext, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
    """Normalises over the axes from `axis` on; scale and bias broadcast against those axes. The optional Mean and
    InvStdDev outputs keep the normalised axes as 1s. stash_type (the precision of the statistics) is the
    interpreter's dtype whatever the attribute says."""
    axis = _axis(ctx.attrs["axis"], x.dim())
    normalized = tuple(x.shape[axis:])
    eps = ctx.attrs["epsilon"]
    if ctx.num_outputs == 1 and tuple(scale.shape) == normalized and (bias is None or bias.shape == scale.shape):
        return F.layer_norm(x, normalized, scale, bias, eps)
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    inv_std = torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    y = centred * inv_std * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv_std) if ctx.num_outputs > 1 else y


def _group_norm(per_channel: bool) -> OpFn:
    """GroupNormalization-18 has one scale and bias per group, -21 one per channel (18 was deprecated for that)."""

    def run(ctx: OpContext, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        groups = ctx.attrs["num_groups"]
        if not per_channel:
            repeat = x.shape[1] // groups
            scale, bias = scale.repeat_interleave(repeat), bias.repeat_interleave(repeat)
        return F.group_norm(x, groups, scale, bias, ctx.attrs["epsilon"])

    return run


def _einsum(ctx: OpContext, *xs: Tensor) -> Tensor:
    # torch.einsum reads ONNX's equations (explicit "->" or implicit output, "..." broadcasting) the same way.
    return torch.einsum(ctx.attrs["equation"].replace(" ", ""), *xs)


def _gemm(ctx: OpContext, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    if ctx.attrs["transA"]:
        a = a.transpose(0, 1)
    if ctx.attrs["transB"]:
        b = b.transpose(0, 1)
    y = a @ b
    if ctx.attrs["alpha"] != 1.0:
        y = y * ctx.attrs["alpha"]
    if c is not None:
        y = y + (c if ctx.attrs["beta"] == 1.0 else c * ctx.attrs["beta"])
    return y


# ---------------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------------

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@dataclass(frozen=True)
class _PoolGeometry:
    """Where each pooling window lies. `pads` are the spec's pads; `reach` is how far past the input's end the last
    window reaches (more than the end pad in ceil mode, negative when floor mode drops trailing cells)."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[tuple[int, int]]
    reach: list[int]

    def window_pads(self) -> list[tuple[int, int]]:
        return [(begin, reach) for (begin, _), reach in zip(self.pads, self.reach)]


def _pool_geometry(ctx: OpContext, in_sizes: Sequence[int]) -> _PoolGeometry:
    kernel = list(ctx.attrs["kernel_shape"])
    strides, dilations = _window_attrs(ctx, len(kernel))
    pads = _spatial_pads(ctx, in_sizes, kernel, strides, dilations)
    ceil_mode = bool(ctx.attrs.get("ceil_mode", 0))
    reach = []
    for n, k, s, d, (begin, end) in zip(in_sizes, kernel, strides, dilations, pads):
        span = n + begin + end - ((k - 1) * d + 1)
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= n + begin:
            out -= 1  # a window may not start in the end padding (ONNX Runtime and torch agree)
        reach.append((out - 1) * s + (k - 1) * d + 1 - n - begin)
    return _PoolGeometry(kernel, strides, dilations, pads, reach)


def _max_pool(ctx: OpContext, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    geo = _pool_geometry(ctx, x.shape[2:])
    spatial = len(geo.kernel)
    with_indices = ctx.num_outputs > 1
    symmetric = all(b == e == r and b <= k // 2 for (b, e), r, k in zip(geo.pads, geo.reach, geo.kernel))
    if symmetric:  # torch's own padding is the same window set: skip the copy
        out = _MAX_POOL[spatial](x, geo.kernel, geo.strides, [b for b, _ in geo.pads], geo.dilations,
                                 return_indices=with_indices)
        begins = [0] * spatial  # torch's indices already count in the unpadded input
        padded = x.shape[2:]
    else:
        padded_x = F.pad(x, _torch_pad_list(geo.window_pads()), value=-math.inf)
        out = _MAX_POOL[spatial](padded_x, geo.kernel, geo.strides, 0, geo.dilations, return_indices=with_indices)
        begins = [b for b, _ in geo.pads]
        padded = padded_x.shape[2:]
    if not with_indices:
        return out
    values, indices = out
    return values, _pool_indices(indices, x.shape, padded, begins, ctx.attrs.get("storage_order", 0))


def _pool_indices(indices: Tensor, in_shape: Sequence[int], padded: Sequence[int], begins: Sequence[int],
                  storage_order: int) -> Tensor:
    """torch's argmax positions (flat within one padded spatial plane) -> ONNX's: flat over the whole unpadded
    input (N, C, spatial...), the spatial part row-major (storage_order=0) or column-major (1), as ONNX Runtime."""
    coords = []
    rest = indices
    for size in reversed(padded):
        coords.append(rest % size)
        rest = rest // size
    coords = [c - b for c, b in zip(reversed(coords), begins)]
    sizes = list(in_shape[2:])
    axes = range(len(sizes)) if storage_order == 0 else reversed(range(len(sizes)))
    flat = torch.zeros_like(indices)
    for axis in axes:
        flat = flat * sizes[axis] + coords[axis]
    planes = torch.arange(in_shape[0] * in_shape[1], device=indices.device).reshape(in_shape[0], in_shape[1],
                                                                                    *[1] * len(sizes))
    return flat + planes * math.prod(sizes)


def _max_unpool(ctx: OpContext, x: Tensor, indices: Tensor, output_shape: Tensor | None = None) -> Tensor:
    """Scatters x to the flat positions MaxPool's indices name; every other cell is 0. The output shape is the
    pooled input's, (n - 1) * stride + kernel - pads per axis, unless output_shape gives it."""
    shape = _ints(output_shape)
    if not shape:
        spatial = x.dim() - 2
        kernel = ctx.attrs["kernel_shape"]
        strides = ctx.attrs.get("strides") or [1] * spatial
        pads = ctx.attrs.get("pads") or [0] * (2 * spatial)
        shape = [*x.shape[:2], *((n - 1) * s + k - pads[i] - pads[i + spatial]
                                 for i, (n, s, k) in enumerate(zip(x.shape[2:], strides, kernel)))]
    out = x.new_zeros(math.prod(shape)).scatter(0, indices.reshape(-1).to(x.device), x.reshape(-1))
    return out.reshape(shape)


def _window_mean(t: Tensor, geo: _PoolGeometry) -> Tensor:
    spatial = len(geo.kernel)
    if all(d == 1 for d in geo.dilations):
        return _AVG_POOL[spatial](t, geo.kernel, geo.strides)
    # Dilated average (opset 19): a depthwise convolution with a constant kernel.
    channels = t.shape[1]
    weight = torch.full((channels, 1, *geo.kernel), 1.0 / math.prod(geo.kernel), dtype=t.dtype, device=t.device)
    return _CONV[spatial](t, weight, None, geo.strides, 0, geo.dilations, channels)


def _average_pool(ctx: OpContext, x: Tensor) -> Tensor:
    """Window sums divided by how many cells each window counts.

    The count is the window mean of a mask that is 1 on counted cells: the input, plus the pads when
    count_include_pad=1. Cells a ceil-mode window reaches beyond the pads are never counted (ONNX Runtime, torch).
    """
    geo = _pool_geometry(ctx, x.shape[2:])
    if all(b == 0 and r == 0 for (b, _), r in zip(geo.pads, geo.reach)):
        return _window_mean(x, geo)  # every window lies inside the input: the plain mean is exact
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if ctx.attrs.get("count_include_pad", 0):
        mask = F.pad(mask, _torch_pad_list(geo.pads), value=1.0)
        mask = F.pad(mask, _torch_pad_list([(0, r - e) for (_, e), r in zip(geo.pads, geo.reach)]))
    else:
        mask = F.pad(mask, _torch_pad_list(geo.window_pads()))
    x = F.pad(x, _torch_pad_list(geo.window_pads()))
    return _window_mean(x, geo) / _window_mean(mask, geo)


def _global_average_pool(ctx: OpContext, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool(ctx: OpContext, x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _check_pool(ctx: OpContext) -> None:
    _check_auto_pad(ctx)
    if not ctx.attrs.get("kernel_shape"):
        raise DisasmError(f"{ctx.label}: the kernel_shape attribute is required.")


# ---------------------------------------------------------------------------------------------------------------------
# Reductions, softmax, argmax
# ---------------------------------------------------------------------------------------------------------------------


def _reduce(fn: Callable[..., Tensor], x: Tensor, axes: Sequence[int] | None, keepdims: int, noop: int) -> Tensor:
    if (not axes and noop) or x.dim() == 0:
        # Reducing no axes (noop_with_empty_axes, or a scalar) still applies the elementwise part, as ONNX Runtime
        # does: ReduceSumSquare squares, ReduceLogSum takes the log. It runs as a reduction over a new axis of 1.
        return fn(x.unsqueeze(-1), dim=(x.dim(),), keepdim=False)
    axes = axes or range(x.dim())  # no axes: reduce every axis
    return fn(x, dim=tuple(_axis(a, x.dim()) for a in axes), keepdim=bool(keepdims))


def _prod(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    """torch.prod takes one axis at a time."""
    for axis in sorted(dim, reverse=True):
        x = torch.prod(x, dim=axis, keepdim=keepdim)
    return x


def _l1(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return x.abs().sum(dim=dim, keepdim=keepdim)


def _l2(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    # vector_norm's gradient at an all-zero slice is 0, where sqrt(sum(x^2)) would give NaN.
    return torch.linalg.vector_norm(x, 2, dim=dim, keepdim=keepdim)


def _log_sum(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.log(x.sum(dim=dim, keepdim=keepdim))


def _sum_square(x: Tensor, dim: tuple[int, ...], keepdim: bool) -> Tensor:
    return x.square().sum(dim=dim, keepdim=keepdim)


def _reduce_attr(fn: Callable[..., Tensor]) -> OpFn:
    """Reductions before opset 13 (ReduceSum) or 18 (the others): axes is an attribute."""

    def run(ctx: OpContext, x: Tensor) -> Tensor:
        return _reduce(fn, x, ctx.attrs.get("axes"), ctx.attrs["keepdims"], 0)

    return run


def _reduce_input(fn: Callable[..., Tensor]) -> OpFn:
    """Reductions from opset 13 (ReduceSum) or 18 (the others): axes is an optional input."""

    def run(ctx: OpContext, x: Tensor, axes: Tensor | None = None) -> Tensor:
        return _reduce(fn, x, _ints(axes), ctx.attrs["keepdims"], ctx.attrs.get("noop_with_empty_axes", 0))

    return run


def _softmax_flat(fn: Callable[..., Tensor]) -> OpFn:
    """Opset < 13: the input is coerced to 2-D at `axis` and normalised over everything from `axis` on."""

    def run(ctx: OpContext, x: Tensor) -> Tensor:
        axis = _axis(ctx.attrs["axis"], x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
        return fn(flat, dim=1).reshape(x.shape)

    return run


def _softmax_axis(fn: Callable[..., Tensor]) -> OpFn:
    """Opset >= 13: normalised along the single axis `axis` (default -1)."""

    def run(ctx: OpContext, x: Tensor) -> Tensor:
        return fn(x, dim=_axis(ctx.attrs["axis"], x.dim()))

    return run


def _reductions(fn: Callable[..., Tensor], input_since: int = 18) -> tuple[OpImpl, ...]:
    """The two forms of a Reduce* op: axes as an attribute, then (from `input_since`) as an optional host input."""
    return (_op(1, _reduce_attr(fn)), _op(input_since, _reduce_input(fn), host=[1]))


def _arg_extreme(fn: Callable[..., Tensor]) -> OpFn:
    """ArgMax / ArgMin: torch returns the first extreme index, as ONNX asks; select_last_index flips the axis."""

    def run(ctx: OpContext, x: Tensor) -> Tensor:
        axis = _axis(ctx.attrs["axis"], x.dim())
        keep = bool(ctx.attrs["keepdims"])
        if ctx.attrs.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
        return fn(x, dim=axis, keepdim=keep)

    return run


def _cumsum(ctx: OpContext, x: Tensor, axis: Tensor) -> Tensor:
    dim = _axis(_ints(axis)[0], x.dim())
    reverse = ctx.attrs["reverse"]
    if reverse:
        x = x.flip(dim)
    y = torch.cumsum(x, dim)
    if ctx.attrs["exclusive"]:  # shift by one: each cell sums the cells before it only
        y = torch.cat([torch.zeros_like(y.narrow(dim, 0, 1)), y.narrow(dim, 0, y.shape[dim] - 1)], dim)
    return y.flip(dim) if reverse else y


def _top_k_along(ctx: OpContext, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest (or smallest) along `axis`, in order; among equal values the lower index comes first, as ONNX
    asks (a stable sort guarantees it, torch.topk does not). sorted=0 leaves the order free, so sorted order is
    fine too."""
    axis = _axis(ctx.attrs["axis"], x.dim())
    values, indices = torch.sort(x, dim=axis, descending=bool(ctx.attrs.get("largest", 1)), stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


def _top_k_attr(ctx: OpContext, x: Tensor) -> tuple[Tensor, Tensor]:
    return _top_k_along(ctx, x, ctx.attrs["k"])


def _top_k(ctx: OpContext, x: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    return _top_k_along(ctx, x, _ints(k)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Shapes, indexing and data movement
# ---------------------------------------------------------------------------------------------------------------------


def _identity(ctx: OpContext, x: Tensor) -> Tensor:
    return x


def _dropout(ctx: OpContext, x: Tensor, *_: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """Inference: the identity. The optional mask output is all true (nothing dropped)."""
    if ctx.num_outputs > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


def _shape(ctx: OpContext, x: Tensor) -> Tensor:
    # start/end (opset 15) follow Python slice rules: negative counts from the end, out of range clamps.
    dims = list(x.shape)[slice(ctx.attrs.get("start", 0), ctx.attrs.get("end"))]
    return torch.tensor(dims, dtype=torch.int64)


def _size(ctx: OpContext, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


def _reshape_dims(x: Tensor, dims: list[int], allowzero: int) -> Tensor:
    if not allowzero:  # 0 copies the input's dimension at that position; with allowzero it is a real 0
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _reshape_attr(ctx: OpContext, x: Tensor) -> Tensor:
    return _reshape_dims(x, list(ctx.attrs["shape"]), 0)


def _reshape(ctx: OpContext, x: Tensor, shape: Tensor) -> Tensor:
    return _reshape_dims(x, _ints(shape), ctx.attrs.get("allowzero", 0))


def _flatten(ctx: OpContext, x: Tensor) -> Tensor:
    axis = _axis(ctx.attrs["axis"], x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(ctx: OpContext, x: Tensor) -> Tensor:
    perm = ctx.attrs.get("perm") or list(reversed(range(x.dim())))
    return x.permute(list(perm))


def _squeeze_axes(x: Tensor, axes: Sequence[int]) -> Tensor:
    if not axes:
        return x.squeeze()  # no axes: drop every dimension of size 1
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _squeeze_attr(ctx: OpContext, x: Tensor) -> Tensor:
    return _squeeze_axes(x, ctx.attrs.get("axes") or [])


def _squeeze(ctx: OpContext, x: Tensor, axes: Tensor | None = None) -> Tensor:
    return _squeeze_axes(x, _ints(axes))


def _unsqueeze_axes(x: Tensor, axes: Sequence[int]) -> Tensor:
    rank = x.dim() + len(axes)  # axes are positions in the OUTPUT
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _unsqueeze_attr(ctx: OpContext, x: Tensor) -> Tensor:
    return _unsqueeze_axes(x, ctx.attrs["axes"])


def _unsqueeze(ctx: OpContext, x: Tensor, axes: Tensor) -> Tensor:
    return _unsqueeze_axes(x, _ints(axes))


def _concat(ctx: OpContext, *xs: Tensor) -> Tensor:
    return torch.cat(xs, dim=_axis(ctx.attrs["axis"], xs[0].dim()))


def _split_sizes(ctx: OpContext, length: int, split: Sequence[int]) -> list[int]:
    if split:
        return list(split)
    num_outputs = ctx.attrs.get("num_outputs")
    if num_outputs:  # opset 18: chunks of ceil(length / n), the last one smaller
        chunk = -(-length // num_outputs)
        return [chunk] * (num_outputs - 1) + [length - chunk * (num_outputs - 1)]
    if length % ctx.num_outputs:
        raise DisasmError(f"{ctx.label}: cannot split a dimension of {length} into {ctx.num_outputs} equal parts; "
                          "give the `split` sizes.")
    return [length // ctx.num_outputs] * ctx.num_outputs


def _split_along(ctx: OpContext, x: Tensor, split: Sequence[int]) -> tuple[Tensor, ...]:
    axis = _axis(ctx.attrs["axis"], x.dim())
    return tuple(torch.split(x, _split_sizes(ctx, x.shape[axis], split), dim=axis))


def _split_attr(ctx: OpContext, x: Tensor) -> tuple[Tensor, ...]:
    return _split_along(ctx, x, ctx.attrs.get("split") or [])


def _split(ctx: OpContext, x: Tensor, split: Tensor | None = None) -> tuple[Tensor, ...]:
    return _split_along(ctx, x, _ints(split))


def _slice_tensor(x: Tensor, starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> Tensor:
    """ONNX Slice: per axis, negative starts/ends count from the end, then clamp (to [0, n] for positive steps,
    [0, n-1] / [-1, n-1] for negative ones), so INT_MAX and INT_MIN mean "to the end". torch has no negative steps:
    those axes are gathered with an explicit index."""
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    reversed_axes = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        n = x.shape[axis]
        start, end = (start + n if start < 0 else start), (end + n if end < 0 else end)
        if step > 0:
            index[axis] = slice(min(max(start, 0), n), min(max(end, 0), n), step)
        elif step < 0:
            reversed_axes.append((axis, min(max(start, 0), n - 1), min(max(end, -1), n - 1), step))
        else:
            raise DisasmError("Slice: a step of 0 is not allowed.")
    y = x[tuple(index)]
    for axis, start, end, step in reversed_axes:
        y = y.index_select(axis, torch.arange(start, end, step, device=x.device))
    return y


def _slice_attr(ctx: OpContext, x: Tensor) -> Tensor:
    return _slice_tensor(x, list(ctx.attrs["starts"]), list(ctx.attrs["ends"]), list(ctx.attrs.get("axes") or []), [])


def _slice(ctx: OpContext, x: Tensor, starts: Tensor, ends: Tensor, axes: Tensor | None = None,
           steps: Tensor | None = None) -> Tensor:
    return _slice_tensor(x, _ints(starts), _ints(ends), _ints(axes), _ints(steps))


def _gather(ctx: OpContext, x: Tensor, indices: Tensor) -> Tensor:
    axis = _axis(ctx.attrs["axis"], x.dim())
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)  # negative indices count from the end
    picked = x.index_select(axis, indices.reshape(-1))
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))  # a tuple: () is a valid shape


def _positive(indices: Tensor, sizes: Sequence[int] | int) -> Tensor:
    """Negative indices count from the end of their axis (`sizes`: one size, or one per index in the last axis)."""
    size = torch.as_tensor(sizes, dtype=indices.dtype, device=indices.device)
    return torch.where(indices < 0, indices + size, indices)


def _gather_elements(ctx: OpContext, x: Tensor, indices: Tensor) -> Tensor:
    axis = _axis(ctx.attrs["axis"], x.dim())
    return torch.gather(x, axis, _positive(indices, x.shape[axis]))


def _gather_nd(ctx: OpContext, x: Tensor, indices: Tensor) -> Tensor:
    """Each row of the last index axis (length m) picks x[b..., i1, ..., im] (a cell or a slice). The first
    batch_dims axes of x and indices are paired, not indexed: they become one leading axis of rows."""
    batch_dims = ctx.attrs.get("batch_dims", 0)
    m = indices.shape[-1]
    rows = math.prod(x.shape[:batch_dims])
    per_row = math.prod(indices.shape[batch_dims:-1])
    flat = x.reshape(rows, *x.shape[batch_dims:])
    index = _positive(indices.reshape(rows, per_row, m), list(x.shape[batch_dims:batch_dims + m]))
    row = torch.arange(rows, device=index.device).unsqueeze(1)
    picked = flat[(row, *index.unbind(-1))]  # (rows, per_row, *slice shape)
    return picked.reshape((*indices.shape[:-1], *x.shape[batch_dims + m:]))  # a tuple: () is a valid shape


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _check_scatter(ctx: OpContext) -> None:
    _check_choice(ctx, "reduction", ["none", *_SCATTER_REDUCE])


def _scatter_elements(ctx: OpContext, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    axis = _axis(ctx.attrs["axis"], x.dim())
    indices = _positive(indices, x.shape[axis])
    reduction = ctx.attrs.get("reduction", "none")
    if reduction == "none":
        return x.scatter(axis, indices, updates)
    return x.scatter_reduce(axis, indices, updates, _SCATTER_REDUCE[reduction], include_self=True)


def _scatter_nd(ctx: OpContext, x: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    """Each row of the last index axis (length m) addresses a cell or slice of x; updates hold one per row. Runs as
    index_copy / index_add / scatter_reduce on x viewed as (cells of the first m axes, *slice shape)."""
    m = indices.shape[-1]
    lead, tail = list(x.shape[:m]), list(x.shape[m:])
    count = math.prod(indices.shape[:-1])
    index = _positive(indices.reshape(count, m), lead)
    strides = torch.tensor([math.prod(lead[i + 1:]) for i in range(m)], dtype=torch.int64, device=index.device)
    cells = (index * strides).sum(1)
    flat, updates = x.reshape(math.prod(lead), *tail), updates.reshape(count, *tail)
    reduction = ctx.attrs.get("reduction", "none")
    if reduction == "none":
        out = flat.index_copy(0, cells, updates)
    elif reduction == "add":
        out = flat.index_add(0, cells, updates)
    else:
        cells = cells.reshape(-1, *[1] * len(tail)).expand_as(updates)
        out = flat.scatter_reduce(0, cells, updates, _SCATTER_REDUCE[reduction], include_self=True)
    return out.reshape(x.shape)


def _one_hot(ctx: OpContext, indices: Tensor, depth: Tensor, values: Tensor) -> Tensor:
    """values = [off, on]; `axis` is the new axis's position in the output. Indices outside [-depth, depth) give a
    row of `off` values."""
    size = int(_floats(depth)[0])
    axis = _axis(ctx.attrs["axis"], indices.dim() + 1)
    index = _positive(indices.long(), size)  # float indices truncate, as ONNX Runtime casts them
    classes = torch.arange(size, device=index.device).reshape(size, *[1] * (indices.dim() - axis))
    hit = (index.unsqueeze(axis) == classes).to(values.device)
    return torch.where(hit, values[1], values[0])


def _non_zero(ctx: OpContext, x: Tensor) -> Tensor:
    """The coordinates of the non-zero cells, one column per cell in row-major order: shape (rank, count)."""
    return torch.stack(torch.nonzero(x.reshape(-1) if x.dim() == 0 else x, as_tuple=True)).cpu()


def _col2im(ctx: OpContext, x: Tensor, image_shape: Tensor, block_shape: Tensor) -> Tensor:
    """F.fold (what the exporters write it as): sums the columns (N, C * block cells, blocks) back into the image.
    Folds into the padded image, then crops, as torch pads only symmetrically."""
    image, block = _ints(image_shape), _ints(block_shape)
    spatial = len(image)
    if spatial != 2:
        raise DisasmError(f"{ctx.label}: only 2-D images are supported (F.fold), got image_shape {image}.")
    strides, dilations = _window_attrs(ctx, spatial)
    pads = ctx.attrs.get("pads") or [0] * (2 * spatial)
    padded = [n + pads[i] + pads[i + spatial] for i, n in enumerate(image)]
    y = F.fold(x, padded, block, dilation=dilations, padding=0, stride=strides)
    return y[..., pads[0]:pads[0] + image[0], pads[1]:pads[1] + image[1]]


def _trilu(ctx: OpContext, x: Tensor, k: Tensor | None = None) -> Tensor:
    diagonal = _ints(k)[0] if k is not None and k.numel() else 0
    return torch.triu(x, diagonal) if ctx.attrs["upper"] else torch.tril(x, diagonal)


def _expand(ctx: OpContext, x: Tensor, shape: Tensor) -> Tensor:
    # Bidirectional broadcast: the target may be shorter than x or hold 1 where x has n.
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


def _tile(ctx: OpContext, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(*_ints(repeats))


def _range(ctx: OpContext, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    if start.is_floating_point():
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=ctx.dtype, device=ctx.device)
    return torch.arange(int(start), int(limit), int(delta), dtype=torch.int64)


def _cast(ctx: OpContext, x: Tensor) -> Tensor:
    return x.to(torch_dtype(ctx.attrs["to"], ctx.dtype))  # float -> int truncates toward zero, as in ONNX Runtime


def _check_cast(ctx: OpContext) -> None:
    torch_dtype(ctx.attrs["to"], ctx.dtype)  # raises for strings and other unsupported targets


def _cast_like(ctx: OpContext, x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


def _constant_of_shape(ctx: OpContext, shape: Tensor) -> Tensor:
    value = ctx.attrs.get("value")
    if value is None:
        value = torch.zeros((), dtype=ctx.dtype, device=ctx.device)  # the spec's default: float32 zero
    dims = _ints(shape)
    return value.reshape(()).repeat(dims) if dims else value.reshape(()).clone()


def _constant(ctx: OpContext) -> Tensor:
    attrs = ctx.attrs
    if "value" in attrs or "sparse_value" in attrs:
        return attrs.get("value", attrs.get("sparse_value"))
    if "value_float" in attrs or "value_floats" in attrs:
        return torch.tensor(attrs.get("value_float", attrs.get("value_floats")), dtype=ctx.dtype, device=ctx.device)
    if "value_int" in attrs or "value_ints" in attrs:
        return torch.tensor(attrs.get("value_int", attrs.get("value_ints")), dtype=torch.int64)
    raise DisasmError(f"{ctx.label}: needs one of value, sparse_value, value_float(s) or value_int(s); string "
                      "constants are not supported.")


def _pad_index(n: int, begin: int, end: int, mode: str, device: torch.device) -> Tensor:
    """Source index of every output cell along one axis for the non-constant pad modes (negative pads crop)."""
    i = torch.arange(-begin, n + end, device=device)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i % n  # torch's % is a floor modulo, as needed for the negative positions
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)  # reflect: ... 2 1 | 0 1 2 3 | 2 1 0 ...
    i = i % period
    return torch.where(i >= n, period - i, i)


def _pad_tensor(x: Tensor, pads: list[int], mode: str, value: float, axes: list[int]) -> Tensor:
    rank = x.dim()
    axes = [_axis(a, rank) for a in axes] if axes else list(range(rank))
    count = len(axes)
    per_axis = {axis: (pads[i], pads[i + count]) for i, axis in enumerate(axes)}
    if mode == "constant":
        return F.pad(x, _torch_pad_list([per_axis.get(axis, (0, 0)) for axis in range(rank)]), value=value)
    for axis, (begin, end) in per_axis.items():
        if begin or end:
            x = x.index_select(axis, _pad_index(x.shape[axis], begin, end, mode, x.device))
    return x


def _pad_attr(ctx: OpContext, x: Tensor) -> Tensor:
    return _pad_tensor(x, list(ctx.attrs["pads"]), ctx.attrs["mode"], ctx.attrs["value"], [])


def _pad(ctx: OpContext, x: Tensor, pads: Tensor, value: Tensor | None = None, axes: Tensor | None = None) -> Tensor:
    fill = value.item() if value is not None and value.numel() else 0.0
    return _pad_tensor(x, _ints(pads), ctx.attrs["mode"], fill, _ints(axes))


def _check_pad(ctx: OpContext) -> None:
    _check_choice(ctx, "mode", ["constant", "reflect", "edge", "wrap"])


def _depth_to_space(ctx: OpContext, x: Tensor) -> Tensor:
    bs = ctx.attrs["blocksize"]
    n, c, h, w = x.shape
    if ctx.attrs.get("mode", "DCR") == "DCR":  # depth-column-row: the block index is the outer part of the channel
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD: the block index is the inner part of the channel
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // bs**2, h * bs, w * bs)


def _space_to_depth(ctx: OpContext, x: Tensor) -> Tensor:
    bs = ctx.attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs * bs, h // bs, w // bs)


# ---------------------------------------------------------------------------------------------------------------------
# Resize and Upsample
# ---------------------------------------------------------------------------------------------------------------------

_RESIZE_MODES = ["nearest", "linear", "cubic"]
_COORDINATE_MODES = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                     "tf_half_pixel_for_nn"]
_NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
_F32 = np.float32


@dataclass(frozen=True)
class _Interpolation:
    """How one Resize/Upsample node maps output cells to input cells. nearest_mode "simple" is the rule of Upsample
    and Resize-10, which have no nearest_mode attribute: truncate when upsampling, ceil when downsampling."""

    mode: str
    coordinate_mode: str
    nearest_mode: str
    cubic_a: float = -0.75
    exclude_outside: bool = False
    antialias: bool = False


def _source_coordinates(n_in: int, n_out: int, scale: float, coordinate_mode: str) -> Tensor:
    """Input coordinate of every output cell, in float32 with ONNX Runtime's order of operations, so that nearest
    rounding and tap choice fall on the same side of every boundary."""
    x = torch.arange(n_out, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    if coordinate_mode == "asymmetric":
        return x / s
    if coordinate_mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / s
    if coordinate_mode == "align_corners":
        return torch.zeros_like(x) if n_out == 1 else x * float(n_in - 1) / float(n_out - 1)
    if coordinate_mode == "pytorch_half_pixel" and n_out <= 1:
        return torch.zeros_like(x)
    if coordinate_mode == "half_pixel_symmetric":
        # Centres the resized grid when n_out was rounded from n_in * scale.
        adjustment = _F32(n_out) / (_F32(scale) * _F32(n_in))
        offset = float(_F32(n_in) / _F32(2) * (_F32(1) - adjustment))
        return (offset + (x.double() + 0.5) / float(s) - 0.5).float()
    return (x + 0.5) / s - 0.5  # half_pixel and pytorch_half_pixel


def _nearest_taps(coords: Tensor, n_in: int, scale: float, nearest_mode: str) -> Tensor:
    c = coords.double()  # rounding in double is exact for float32 values (float32 `x + 0.5` is not)
    if nearest_mode == "round_prefer_floor":
        i = torch.ceil(c - 0.5)
    elif nearest_mode == "round_prefer_ceil":
        i = torch.floor(c + 0.5)
    elif nearest_mode == "floor":
        i = torch.floor(c)
    elif nearest_mode == "ceil" or (nearest_mode == "simple" and scale < 1):
        i = torch.ceil(c)
    else:  # simple, upsampling: C++ truncation (coordinates are >= 0 in asymmetric mode)
        i = torch.trunc(c)
    return i.long().clamp(0, n_in - 1).unsqueeze(1)


def _linear_taps(coords: Tensor, n_in: int) -> tuple[Tensor, Tensor]:
    x = coords.clamp(0, n_in - 1)  # linear clamps the coordinate itself, i.e. the edge value extends outward
    low = x.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = (x - low).double()
    return torch.stack([low, high], 1), torch.stack([1.0 - frac, frac], 1)


def _cubic_taps(coords: Tensor, n_in: int, a: float, exclude_outside: bool) -> tuple[Tensor, Tensor]:
    """Keys' cubic convolution on the 4 cells around floor(x); outside cells repeat the edge value, or get weight 0
    (renormalised) with exclude_outside. The coordinate is NOT clamped, unlike linear."""
    base = coords.floor()
    s = (coords - base).double()  # in [0, 1): taps base-1 and base+2 are 1..2 away, base and base+1 0..1 away

    def near(d: Tensor) -> Tensor:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = torch.stack([far(s + 1), near(s), near(1 - s), far(2 - s)], 1)
    taps = base.long().unsqueeze(1) + torch.arange(-1, 3).unsqueeze(0)
    if exclude_outside:
        weights = torch.where((taps >= 0) & (taps < n_in), weights, torch.zeros_like(weights))
        weights = weights / weights.sum(1, keepdim=True)
    return taps.clamp(0, n_in - 1), weights


def _antialias_taps(coords: Tensor, n_in: int, scale: float, how: _Interpolation) -> tuple[Tensor, Tensor]:
    """antialias=1 (linear, cubic): Pillow's resampling, as ONNX Runtime and torch's antialias=True run it. When
    shrinking, the filter is stretched by 1 / scale, so every input cell under the output cell's footprint counts.
    Each output cell takes the cells whose centres lie within the filter's support around its own centre, weighted
    by the filter and normalised to sum 1; cells outside the input repeat the edge value, or are dropped with
    exclude_outside (the torch exporter sets it). Windows differ in width: the short ones are padded with weight 0."""
    stretch = float(1 / _F32(scale)) if scale < 1 else 1.0
    support = (1.0 if how.mode == "linear" else 2.0) * stretch
    centre = coords.float() + 0.5  # float32, then the bounds in double, as ONNX Runtime rounds them
    low = torch.floor((centre - support).double() + 0.5).long()
    high = torch.floor((centre + support).double() + 0.5).long()
    if how.exclude_outside:
        low, high = low.clamp(min=0), high.clamp(max=n_in)
    taps = low.unsqueeze(1) + torch.arange(int((high - low).max())).unsqueeze(0)
    d = ((taps - centre.double().unsqueeze(1) + 0.5) / stretch).abs()
    if how.mode == "linear":
        weights = (1 - d).clamp(min=0)
    else:
        a = how.cubic_a
        weights = torch.where(d < 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                              torch.where(d < 2, ((d - 5) * d + 8) * d * a - 4 * a, torch.zeros_like(d)))
    weights = torch.where(taps < high.unsqueeze(1), weights, torch.zeros_like(weights))
    total = weights.sum(1, keepdim=True)
    weights = torch.where(total != 0, weights / total, weights)
    return taps.clamp(0, n_in - 1), weights


def _axis_taps(n_in: int, n_out: int, scale: float, how: _Interpolation) -> tuple[Tensor, Tensor | None]:
    coords = _source_coordinates(n_in, n_out, scale, how.coordinate_mode)
    if how.mode == "nearest":
        return _nearest_taps(coords, n_in, scale, how.nearest_mode), None
    if how.antialias:
        return _antialias_taps(coords, n_in, scale, how)
    if how.mode == "linear":
        return _linear_taps(coords, n_in)
    return _cubic_taps(coords, n_in, how.cubic_a, how.exclude_outside)


def _resample_axis(x: Tensor, axis: int, taps: Tensor, weights: Tensor | None) -> Tensor:
    """Separable resampling along one axis: a weighted sum of k gathered copies."""
    taps = taps.to(x.device)
    if weights is None:
        return x.index_select(axis, taps[:, 0])
    view = (-1,) + (1,) * (x.dim() - axis - 1)
    weights = weights.to(device=x.device, dtype=x.dtype)
    out = None
    for k in range(taps.shape[1]):
        term = x.index_select(axis, taps[:, k]) * weights[:, k].reshape(view)
        out = term if out is None else out + term
    return out


def _interpolate_fast(x: Tensor, scales: list[float], out_sizes: list[int], how: _Interpolation,
                      from_sizes: bool) -> Tensor | None:
    """F.interpolate where it is provably the same map: linear mode on the trailing 1-3 axes (batch and channel
    untouched), half_pixel / pytorch_half_pixel (more than one output cell) / align_corners, and a source step that
    torch computes from the same numbers (sizes were given, or n_out == n_in * scale exactly). Both clamp the
    coordinate into the input the same way; floor choices at exact integers may differ, which linear interpolation
    does not see. Returns None where any condition fails."""
    rank = x.dim()
    if how.mode != "linear" or how.antialias or rank not in (3, 4, 5) or scales[0] != 1.0 or scales[1] != 1.0:
        return None
    axes = range(2, rank)
    if how.coordinate_mode == "align_corners":
        align = True
    elif how.coordinate_mode == "half_pixel" or (
        how.coordinate_mode == "pytorch_half_pixel" and all(out_sizes[a] > 1 for a in axes)
    ):
        align = False
    else:
        return None
    if not align and not from_sizes and any(out_sizes[a] != x.shape[a] * float(_F32(scales[a])) for a in axes):
        return None
    mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
    return F.interpolate(x, size=[out_sizes[a] for a in axes], mode=mode, align_corners=align)


def _resize(x: Tensor, scales: list[float], out_sizes: list[int], how: _Interpolation, from_sizes: bool) -> Tensor:
    if list(x.shape) == out_sizes:
        return x  # ONNX Runtime copies the input whenever the shape does not change, whatever the scales
    fast = _interpolate_fast(x, scales, out_sizes, how, from_sizes)
    if fast is not None:
        return fast
    # An axis with scale exactly 1 maps each cell to itself in ONNX Runtime, even for tf_half_pixel_for_nn.
    order = sorted((a for a in range(x.dim()) if scales[a] != 1.0), key=lambda a: scales[a])  # shrink first
    for axis in order:
        taps, weights = _axis_taps(x.shape[axis], out_sizes[axis], scales[axis], how)
        x = _resample_axis(x, axis, taps, weights)
    return x


def _sizes_from_scales(in_sizes: Sequence[int], scales: list[float]) -> list[int]:
    """floor(n * scale), computed in float32 like ONNX Runtime: in double, 10 * float32(0.7) would give 6, not 7."""
    return [int(_F32(s) * _F32(n)) for n, s in zip(in_sizes, scales)]


def _resize_geometry(ctx: OpContext, x: Tensor, scales: Tensor | None,
                     sizes: Tensor | None) -> tuple[list[float], list[int], bool]:
    """Per-axis (scale, output size) from the `scales` or `sizes` input, with opset 18's axes and
    keep_aspect_ratio_policy. When sizes are given the scale is out / in in float32."""
    rank = x.dim()
    axes = [_axis(a, rank) for a in (ctx.attrs.get("axes") or range(rank))]
    in_sizes = list(x.shape)
    if sizes is not None and sizes.numel():
        out = list(in_sizes)
        for axis, size in zip(axes, _ints(sizes)):
            out[axis] = size
        full = [float(_F32(o) / _F32(n)) if n else 1.0 for o, n in zip(out, in_sizes)]
        policy = ctx.attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            common = pick(full[a] for a in axes)
            for axis in axes:
                full[axis] = common
                out[axis] = int(math.floor(abs(float(_F32(common) * _F32(in_sizes[axis]))) + 0.5))  # std::round
        return full, out, True
    if scales is None or not scales.numel():
        raise DisasmError(f"{ctx.label}: needs a non-empty `scales` or `sizes` input.")
    full = [1.0] * rank
    for axis, scale in zip(axes, _floats(scales)):
        full[axis] = scale
    return full, _sizes_from_scales(in_sizes, full), False


def _interpolation(ctx: OpContext) -> _Interpolation:
    mode = "linear" if ctx.attrs["mode"] in ("linear", "bilinear", "trilinear") else ctx.attrs["mode"]
    if ctx.opset < 11 or "coordinate_transformation_mode" not in ctx.attrs:  # Upsample and Resize-10
        return _Interpolation(mode, "asymmetric", "simple")
    return _Interpolation(mode, ctx.attrs["coordinate_transformation_mode"], ctx.attrs["nearest_mode"],
                          ctx.attrs["cubic_coeff_a"], bool(ctx.attrs["exclude_outside"]),
                          bool(ctx.attrs.get("antialias", 0)))


def _check_resize(ctx: OpContext) -> None:
    _check_choice(ctx, "mode", _RESIZE_MODES + ["bilinear", "trilinear"])
    _check_choice(ctx, "coordinate_transformation_mode", _COORDINATE_MODES)
    _check_choice(ctx, "nearest_mode", _NEAREST_MODES)
    _check_choice(ctx, "keep_aspect_ratio_policy", ["stretch", "not_larger", "not_smaller"])
    if ctx.attrs.get("antialias", 0) and ctx.attrs.get("mode", "nearest") == "nearest":
        raise DisasmError(f"{ctx.label}: antialias=1 needs mode 'linear' or 'cubic'; ONNX Runtime refuses it with "
                          "'nearest' as well.")


def _resize_10(ctx: OpContext, x: Tensor, scales: Tensor) -> Tensor:
    full, out, _ = _resize_geometry(ctx, x, scales, None)
    return _resize(x, full, out, _interpolation(ctx), False)


def _resize_11(ctx: OpContext, x: Tensor, roi: Tensor | None = None, scales: Tensor | None = None,
               sizes: Tensor | None = None) -> Tensor:
    full, out, from_sizes = _resize_geometry(ctx, x, scales, sizes)  # roi only matters for tf_crop_and_resize
    return _resize(x, full, out, _interpolation(ctx), from_sizes)


def _upsample_attr(ctx: OpContext, x: Tensor) -> Tensor:
    full = list(ctx.attrs["scales"])
    return _resize(x, full, _sizes_from_scales(x.shape, full), _interpolation(ctx), False)


_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
               "cubic": "bicubic"}  # opset 16 names, then opset 20's


def _grid_sample(ctx: OpContext, x: Tensor, grid: Tensor) -> Tensor:
    """F.grid_sample is the operator ONNX copied: the same modes, padding modes and align_corners (torch supports
    cubic on 4-D inputs only)."""
    return F.grid_sample(x, grid, mode=_GRID_MODES[ctx.attrs["mode"]], padding_mode=ctx.attrs["padding_mode"],
                         align_corners=bool(ctx.attrs["align_corners"]))


def _check_grid_sample(ctx: OpContext) -> None:
    _check_choice(ctx, "mode", list(_GRID_MODES))
    _check_choice(ctx, "padding_mode", ["zeros", "border", "reflection"])


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------


def _op(since: int, fn: OpFn, host: Sequence[int] = (), outputs: int | None = 1,
        validate: Callable[[OpContext], None] | None = None) -> OpImpl:
    return OpImpl(since, fn, frozenset(host), outputs, validate)


def _one(fn: OpFn, host: Sequence[int] = (), validate: Callable[[OpContext], None] | None = None) -> tuple[OpImpl]:
    return (_op(1, fn, host, validate=validate),)


OP_TABLE: Mapping[str, tuple[OpImpl, ...]] = {
    # elementwise math
    "Abs": _one(_unary(torch.abs)),
    "Add": _one(_binary(torch.add)),
    "Ceil": _one(_unary(torch.ceil)),
    "Div": _one(_div),
    "Erf": _one(_unary(torch.erf)),
    "Exp": _one(_unary(torch.exp)),
    "Floor": _one(_unary(torch.floor)),
    "Log": _one(_unary(torch.log)),
    "Max": _one(_variadic(torch.maximum)),
    "Mean": _one(_mean),
    "Min": _one(_variadic(torch.minimum)),
    "Mod": (_op(10, _mod),),
    "Mul": _one(_binary(torch.mul)),
    "Neg": _one(_unary(torch.neg)),
    "Pow": _one(_pow),
    "Reciprocal": _one(_unary(torch.reciprocal)),
    "Round": (_op(11, _unary(torch.round)),),  # both round half to even
    "Sign": (_op(9, _unary(torch.sign)),),
    "Sqrt": _one(_unary(torch.sqrt)),
    "Sub": _one(_binary(torch.sub)),
    "Sum": _one(_variadic(torch.add)),
    # trigonometry (positional encodings)
    "Acos": (_op(7, _unary(torch.acos)),),
    "Asin": (_op(7, _unary(torch.asin)),),
    "Atan": (_op(7, _unary(torch.atan)),),
    "Cos": (_op(7, _unary(torch.cos)),),
    "Sin": (_op(7, _unary(torch.sin)),),
    "Tan": (_op(7, _unary(torch.tan)),),
    # logic
    "And": _one(_binary(torch.logical_and)),
    "Equal": _one(_binary(torch.eq)),
    "Greater": _one(_binary(torch.gt)),
    "GreaterOrEqual": (_op(12, _binary(torch.ge)),),
    "IsInf": (_op(10, _is_inf),),
    "IsNaN": (_op(9, _unary(torch.isnan)),),
    "Less": _one(_binary(torch.lt)),
    "LessOrEqual": (_op(12, _binary(torch.le)),),
    "Not": _one(_unary(torch.logical_not)),
    "Or": _one(_binary(torch.logical_or)),
    "Where": _one(_where),
    "Xor": _one(_binary(torch.logical_xor)),
    # activations
    "Celu": (_op(12, _celu),),
    "Clip": (_op(1, _clip_attrs), _op(11, _clip_inputs)),
    "Elu": _one(_elu),
    "Gelu": (_op(20, _gelu, validate=lambda ctx: _check_choice(ctx, "approximate", ["none", "tanh"])),),
    "HardSigmoid": _one(_hard_sigmoid),
    "HardSwish": (_op(14, _unary(F.hardswish)),),
    "LeakyRelu": _one(_leaky_relu),
    "Mish": (_op(18, _unary(F.mish)),),
    "PRelu": _one(_prelu),
    "Relu": _one(_unary(torch.relu)),
    "Selu": _one(_selu),
    "Shrink": (_op(9, _shrink),),
    "Sigmoid": _one(_unary(torch.sigmoid)),
    "Softplus": _one(_unary(F.softplus)),
    "Softsign": _one(_unary(F.softsign)),
    "Tanh": _one(_unary(torch.tanh)),
    "ThresholdedRelu": (_op(10, _thresholded_relu),),
    # convolution, normalisation, dense
    "BatchNormalization": (_op(1, _batch_norm, validate=_check_batch_norm),),
    "Conv": _one(_conv, validate=_check_auto_pad),
    "ConvTranspose": _one(_conv_transpose, validate=_check_auto_pad),
    "Einsum": (_op(12, _einsum),),
    "Gemm": _one(_gemm),
    "GroupNormalization": (_op(18, _group_norm(per_channel=False)), _op(21, _group_norm(per_channel=True))),
    "InstanceNormalization": _one(_instance_norm),
    "LayerNormalization": (_op(17, _layer_norm, outputs=3),),
    "MatMul": _one(_binary(torch.matmul)),
    # pooling
    "AveragePool": _one(_average_pool, validate=_check_pool),
    "GlobalAveragePool": _one(_global_average_pool),
    "GlobalMaxPool": _one(_global_max_pool),
    "MaxPool": (_op(1, _max_pool, outputs=2, validate=_check_pool),),
    "MaxUnpool": (_op(9, _max_unpool, host=[2], validate=_check_pool),),
    # reductions, scans, softmax, argmax, top-k
    "ArgMax": _one(_arg_extreme(torch.argmax)),
    "ArgMin": _one(_arg_extreme(torch.argmin)),
    "CumSum": (_op(11, _cumsum, host=[1]),),
    "LogSoftmax": (_op(1, _softmax_flat(torch.log_softmax)), _op(13, _softmax_axis(torch.log_softmax))),
    "ReduceL1": _reductions(_l1),
    "ReduceL2": _reductions(_l2),
    "ReduceLogSum": _reductions(_log_sum),
    "ReduceLogSumExp": _reductions(torch.logsumexp),
    "ReduceMax": _reductions(torch.amax),
    "ReduceMean": _reductions(torch.mean),
    "ReduceMin": _reductions(torch.amin),
    "ReduceProd": _reductions(_prod),
    "ReduceSum": _reductions(torch.sum, input_since=13),
    "ReduceSumSquare": _reductions(_sum_square),
    "Softmax": (_op(1, _softmax_flat(torch.softmax)), _op(13, _softmax_axis(torch.softmax))),
    "TopK": (_op(1, _top_k_attr, outputs=2), _op(10, _top_k, host=[1], outputs=2)),
    # shapes, indexing, data movement
    "Cast": _one(_cast, validate=_check_cast),
    "CastLike": (_op(15, _cast_like),),
    "Col2Im": (_op(18, _col2im, host=[1, 2]),),
    "Concat": _one(_concat),
    "Constant": _one(_constant),
    "ConstantOfShape": _one(_constant_of_shape, host=[0]),
    "DepthToSpace": _one(_depth_to_space),
    "Dropout": (_op(1, _dropout, host=[1, 2], outputs=2),),
    "Expand": _one(_expand, host=[1]),
    "Flatten": _one(_flatten),
    "Gather": _one(_gather),
    "GatherElements": (_op(11, _gather_elements),),
    "GatherND": (_op(11, _gather_nd),),
    "Identity": _one(_identity),
    "NonZero": (_op(9, _non_zero),),
    "OneHot": (_op(9, _one_hot, host=[1]),),
    "Pad": (_op(1, _pad_attr, validate=_check_pad), _op(11, _pad, host=[1, 2, 3], validate=_check_pad)),
    "Range": _one(_range, host=[0, 1, 2]),
    "Reshape": (_op(1, _reshape_attr), _op(5, _reshape, host=[1])),
    "ScatterElements": (_op(11, _scatter_elements, validate=_check_scatter),),
    "ScatterND": (_op(11, _scatter_nd, validate=_check_scatter),),
    "Shape": _one(_shape),
    "Size": _one(_size),
    "Slice": (_op(1, _slice_attr), _op(10, _slice, host=[1, 2, 3, 4])),
    "SpaceToDepth": _one(_space_to_depth),
    "Split": (_op(1, _split_attr, outputs=None), _op(13, _split, host=[1], outputs=None)),
    "Squeeze": (_op(1, _squeeze_attr), _op(13, _squeeze, host=[1])),
    "Tile": _one(_tile, host=[1]),
    "Transpose": _one(_transpose),
    "Trilu": (_op(14, _trilu, host=[1]),),
    "Unsqueeze": (_op(1, _unsqueeze_attr), _op(13, _unsqueeze, host=[1])),
    # resampling
    "GridSample": (_op(16, _grid_sample, validate=_check_grid_sample),),
    "Resize": (_op(10, _resize_10, host=[1], validate=_check_resize),
               _op(11, _resize_11, host=[1, 2, 3], validate=_check_resize)),
    "Upsample": (_op(7, _upsample_attr, validate=_check_resize),
                 _op(9, _resize_10, host=[1], validate=_check_resize)),
}


def find_op(op_type: str, opset: int) -> OpImpl | None:
    """The variant for the model's opset: the newest one whose since-version is at most `opset`.

    A model that uses an op below its first version (HardSwish at opset 13, say) is not valid ONNX, but its meaning is
    not in doubt, so it gets the first variant instead of an error.
    """
    variants = OP_TABLE.get(op_type)
    if not variants:
        return None
    chosen = variants[0]
    for impl in variants:
        if impl.since <= opset:
            chosen = impl
    return chosen


def supported_op_types() -> set[str]:
    return set(OP_TABLE)


def onnx_schema_defaults(op_type: str, version: int) -> dict[str, onnx.AttributeProto]:
    """The attribute defaults the ONNX schema declares for this op at this opset (empty if ONNX has no schema)."""
    try:
        schema = onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return {}
    return {name: a.default_value for name, a in schema.attributes.items() if a.default_value.type}
