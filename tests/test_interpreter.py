"""The ONNX-to-PyTorch interpreter against ONNX Runtime: per-op golden cases, exported conv nets, gradients, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from helpers_onnx import OpCase, assert_close_to_ort, make_model, run_ort
from onnx import TensorProto, helper, numpy_helper

from disasm.attribution.interpreter import TorchGraph
from disasm.compiler.errors import DisasmError, UnsupportedOpsError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes_seg.onnx"
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def _rand(*shape: int, seed: int = 0, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


X4 = _rand(1, 4, 5, 6)
X_POS = _rand(2, 3, 4, low=0.1, high=3.0)


# ---------------------------------------------------------------------------------------------------------------------
# Golden per-op cases (one factory per op family; ids name the tricky attribute)
# ---------------------------------------------------------------------------------------------------------------------


def elementwise_cases() -> list[OpCase]:
    x = _rand(2, 3, 4)
    cases = [OpCase(op, op, ["x"], {"x": x}) for op in
             ["Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "Floor", "Ceil", "Softplus", "Identity",
              "Sin", "Cos", "Tan", "Atan", "Sign", "Softsign"]]
    cases += [OpCase(op, op, ["x"], {"x": X_POS}) for op in ["Log", "Sqrt", "Reciprocal"]]
    cases += [OpCase(op, op, ["x"], {"x": x / 2.5}) for op in ["Asin", "Acos"]]
    special = _f32(np.inf, -np.inf, np.nan, 0, -1.5, 2)
    cases += [
        OpCase("HardSwish", "HardSwish", ["x"], {"x": x * 3}, opset=14),
        OpCase("LeakyRelu-default", "LeakyRelu", ["x"], {"x": x}),
        OpCase("LeakyRelu-alpha", "LeakyRelu", ["x"], {"x": x}, attrs={"alpha": 0.3}),
        OpCase("PRelu-channel-slope", "PRelu", ["x", "s"], {"x": X4}, {"s": _rand(4, 1, 1, seed=1)}),
        OpCase("HardSigmoid", "HardSigmoid", ["x"], {"x": x * 4}, attrs={"alpha": 0.3, "beta": 0.4}),
        OpCase("Elu", "Elu", ["x"], {"x": x}, attrs={"alpha": 0.7}),
        OpCase("Selu-default", "Selu", ["x"], {"x": x}),
        OpCase("Selu-custom", "Selu", ["x"], {"x": x}, attrs={"alpha": 1.5, "gamma": 0.9}),
        OpCase("Gelu-none", "Gelu", ["x"], {"x": x}, opset=20),
        OpCase("Gelu-tanh", "Gelu", ["x"], {"x": x}, attrs={"approximate": "tanh"}, opset=20),
        OpCase("Clip-6-attrs", "Clip", ["x"], {"x": x}, attrs={"min": -0.5, "max": 1.0}, opset=6),
        OpCase("Clip-6-relu6", "Clip", ["x"], {"x": x * 5}, attrs={"min": 0.0, "max": 6.0}, opset=9),
        OpCase("Clip-11-both", "Clip", ["x", "lo", "hi"], {"x": x}, {"lo": _f32(-1)[0], "hi": _f32(0.5)[0]}, opset=11),
        OpCase("Clip-13-max-only", "Clip", ["x", "", "hi"], {"x": x}, {"hi": _f32(0.2)[0]}, opset=13),
        OpCase("Clip-13-none", "Clip", ["x"], {"x": x}, opset=13),
        OpCase("Not", "Not", ["b"], {"b": x > 0}),
        OpCase("Round-half-to-even", "Round", ["x"], {"x": _f32(-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 1.2, -3.7)}, opset=11),
        OpCase("Mish", "Mish", ["x"], {"x": x * 3}, opset=18),
        OpCase("Celu", "Celu", ["x"], {"x": x}, attrs={"alpha": 0.7}, opset=12),
        OpCase("ThresholdedRelu", "ThresholdedRelu", ["x"], {"x": x}, attrs={"alpha": 0.5}, opset=10),
        OpCase("Shrink-default", "Shrink", ["x"], {"x": x}, opset=9),
        OpCase("Shrink-bias", "Shrink", ["x"], {"x": x}, attrs={"lambd": 0.7, "bias": 0.2}, opset=9),
        OpCase("IsNaN", "IsNaN", ["x"], {"x": special}, opset=13),
        OpCase("IsInf-both", "IsInf", ["x"], {"x": special}, opset=10),
        OpCase("IsInf-positive", "IsInf", ["x"], {"x": special}, attrs={"detect_negative": 0}, opset=10),
        OpCase("IsInf-negative", "IsInf", ["x"], {"x": special}, attrs={"detect_positive": 0}, opset=10),
    ]
    return cases


def binary_cases() -> list[OpCase]:
    a, b = _rand(2, 3, 4, seed=1), _rand(3, 1, seed=2)
    ints_a, ints_b = _i64(7, -7, 9, 4), _i64(2, 2, -4, 4)
    cases = [OpCase(f"{op}-broadcast", op, ["a", "b"], {"a": a, "b": b}) for op in ["Add", "Sub", "Mul", "Div"]]
    cases += [
        OpCase("Div-int-truncates", "Div", ["a", "b"], {"a": ints_a, "b": ints_b}),
        OpCase("Pow-float", "Pow", ["a", "b"], {"a": X_POS, "b": _rand(4, seed=3)}),
        OpCase("Pow-int-exponent", "Pow", ["a", "b"], {"a": a}, {"b": np.array(2, dtype=np.int64)}),
        OpCase("Equal-int", "Equal", ["a", "b"], {"a": ints_a, "b": ints_b * 0 + 4}),
        OpCase("Greater", "Greater", ["a", "b"], {"a": a, "b": b}),
        OpCase("Less", "Less", ["a", "b"], {"a": a, "b": b}),
        OpCase("And", "And", ["a", "b"], {"a": a > 0, "b": b > -1}),
        OpCase("Or", "Or", ["a", "b"], {"a": a > 0, "b": b > 1}),
        OpCase("Xor", "Xor", ["a", "b"], {"a": a > 0, "b": b > 0}),
        OpCase("GreaterOrEqual", "GreaterOrEqual", ["a", "b"], {"a": ints_a, "b": ints_b}, opset=12),
        OpCase("LessOrEqual", "LessOrEqual", ["a", "b"], {"a": a, "b": np.round(b)}, opset=16),
        OpCase("Mod-int-sign-of-divisor", "Mod", ["a", "b"], {"a": ints_a, "b": ints_b}, opset=13),
        OpCase("Mod-fmod-float", "Mod", ["a", "b"], {"a": a * 3, "b": b}, attrs={"fmod": 1}, opset=13),
        OpCase("Mod-fmod-int", "Mod", ["a", "b"], {"a": ints_a, "b": ints_b}, attrs={"fmod": 1}, opset=10),
        OpCase("Where", "Where", ["c", "a", "b"], {"c": a > 0, "a": a, "b": b}),
        OpCase("MatMul-2d", "MatMul", ["a", "b"], {"a": _rand(3, 4)}, {"b": _rand(4, 5, seed=4)}),
        OpCase("MatMul-batched", "MatMul", ["a", "b"], {"a": _rand(2, 3, 4)}, {"b": _rand(4, 2, seed=4)}),
        OpCase("Gemm-default", "Gemm", ["a", "b", "c"], {"a": _rand(3, 4)}, {"b": _rand(4, 5, seed=5),
                                                                             "c": _rand(5, seed=6)}),
        OpCase("Gemm-trans-alpha-beta", "Gemm", ["a", "b", "c"], {"a": _rand(4, 3)},
               {"b": _rand(5, 4, seed=5), "c": _rand(3, 1, seed=6)},
               attrs={"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
        OpCase("Gemm-no-c", "Gemm", ["a", "b"], {"a": _rand(3, 4)}, {"b": _rand(4, 2, seed=5)}),
    ]
    for op in ["Sum", "Max", "Min", "Mean"]:
        cases.append(OpCase(f"{op}-variadic", op, ["a", "b", "c"],
                            {"a": a, "b": b, "c": _rand(4, seed=7)}))
    cases.append(OpCase("Max-single", "Max", ["a"], {"a": a}))
    q, k = _rand(2, 4, 6, seed=8), _rand(2, 4, 5, seed=9)
    cases += [
        OpCase("Einsum-attention", "Einsum", ["q", "k"], {"q": q, "k": k}, {}, {"equation": "bcn,bcm->bnm"}, 12),
        OpCase("Einsum-implicit-output", "Einsum", ["a", "b"], {"a": _rand(3, 4)}, {"b": _rand(4, 2, seed=3)},
               attrs={"equation": "ij,jk"}, opset=12),
        OpCase("Einsum-ellipsis-spaces", "Einsum", ["x"], {"x": _rand(2, 3, 4, 5)}, {},
               {"equation": "...ij -> ...ji"}, 12),
        OpCase("Einsum-reduce-three-operands", "Einsum", ["a", "b", "c"],
               {"a": _rand(2, 3), "b": _rand(3, 4, seed=1), "c": _rand(4, seed=2)}, attrs={"equation": "ij,jk,k->i"},
               opset=12),
    ]
    return cases


def conv_cases() -> list[OpCase]:
    x = _rand(1, 4, 7, 8)
    w = _rand(6, 4, 3, 3, seed=1)
    bias = _rand(6, seed=2)
    cases = [
        OpCase("Conv-pads", "Conv", ["x", "w", "b"], {"x": x}, {"w": w, "b": bias}, {"pads": [1, 1, 1, 1]}),
        OpCase("Conv-no-bias-stride-dilation", "Conv", ["x", "w"], {"x": x}, {"w": w},
               {"strides": [2, 1], "dilations": [2, 2], "pads": [2, 1, 2, 1]}),
        OpCase("Conv-asymmetric-pads", "Conv", ["x", "w", "b"], {"x": x}, {"w": w, "b": bias}, {"pads": [0, 2, 1, 0]}),
        OpCase("Conv-group", "Conv", ["x", "w"], {"x": x}, {"w": _rand(6, 2, 3, 3, seed=3)}, {"group": 2}),
        OpCase("Conv-depthwise", "Conv", ["x", "w"], {"x": x}, {"w": _rand(4, 1, 3, 3, seed=3)},
               {"group": 4, "pads": [1, 1, 1, 1]}),
        OpCase("Conv-1d", "Conv", ["x", "w"], {"x": _rand(1, 2, 9)}, {"w": _rand(3, 2, 3, seed=3)},
               {"pads": [1, 0], "strides": [2]}),
        OpCase("Conv-3d", "Conv", ["x", "w"], {"x": _rand(1, 2, 4, 5, 4)}, {"w": _rand(3, 2, 3, 3, 3, seed=3)},
               {"pads": [1, 1, 1, 1, 1, 1]}),
    ]
    for auto_pad, stride in itertools.product(["SAME_UPPER", "SAME_LOWER", "VALID"], [1, 2]):
        cases.append(OpCase(f"Conv-{auto_pad}-s{stride}", "Conv", ["x", "w"], {"x": x}, {"w": _rand(3, 4, 4, 3)},
                            {"auto_pad": auto_pad, "strides": [stride, stride]}))
    wt = _rand(4, 3, 3, 3, seed=4)
    cases += [
        OpCase("ConvTranspose-s2-p1-outpad", "ConvTranspose", ["x", "w", "b"], {"x": x}, {"w": wt, "b": _rand(3)},
               {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}),
        OpCase("ConvTranspose-asymmetric-pads", "ConvTranspose", ["x", "w"], {"x": x}, {"w": wt},
               {"strides": [2, 1], "pads": [0, 1, 2, 0]}),
        OpCase("ConvTranspose-group-dilation", "ConvTranspose", ["x", "w"], {"x": x}, {"w": _rand(4, 2, 3, 3)},
               {"group": 2, "dilations": [2, 1]}),
        OpCase("ConvTranspose-output-shape", "ConvTranspose", ["x", "w"], {"x": x}, {"w": wt},
               {"strides": [2, 2], "output_shape": [15, 16]}),
        OpCase("ConvTranspose-SAME_UPPER", "ConvTranspose", ["x", "w"], {"x": x}, {"w": wt},
               {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        OpCase("ConvTranspose-SAME_LOWER", "ConvTranspose", ["x", "w"], {"x": x}, {"w": wt},
               {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ]
    stats = {"s": _rand(4, seed=1), "b": _rand(4, seed=2), "m": _rand(4, seed=3), "v": _rand(4, seed=4, low=0.5)}
    cases += [
        OpCase(f"BatchNormalization-{opset}", "BatchNormalization", ["x", "s", "b", "m", "v"], {"x": X4}, stats,
               {"epsilon": 1e-3}, opset=opset) for opset in (9, 15)
    ]
    cases.append(OpCase("InstanceNormalization", "InstanceNormalization", ["x", "s", "b"], {"x": X4},
                        {"s": stats["s"], "b": stats["b"]}, {"epsilon": 1e-4}))
    channels_last = X4.transpose(0, 2, 3, 1)  # nn.LayerNorm over channels, as exported after a permute
    cases += [
        OpCase("LayerNormalization-last-axis", "LayerNormalization", ["x", "s", "b"], {"x": channels_last},
               {"s": stats["s"], "b": stats["b"]}, opset=17),
        OpCase("LayerNormalization-axis1-no-bias", "LayerNormalization", ["x", "s"], {"x": X4},
               {"s": _rand(4, 5, 6, seed=5)}, {"axis": 1, "epsilon": 1e-3}, opset=17),
        OpCase("LayerNormalization-broadcast-scale", "LayerNormalization", ["x", "s", "b"], {"x": X4},
               {"s": _rand(6, seed=5), "b": _rand(1, 6, seed=6)}, {"axis": -2}, opset=17),
        OpCase("LayerNormalization-statistics", "LayerNormalization", ["x", "s", "b"], {"x": X4},
               {"s": _rand(6, seed=5), "b": _rand(6, seed=6)}, opset=17, outputs=3),
        OpCase("GroupNormalization-18-per-group", "GroupNormalization", ["x", "s", "b"], {"x": X4},
               {"s": _rand(2, seed=5), "b": _rand(2, seed=6)}, {"num_groups": 2, "epsilon": 1e-3}, opset=18),
        OpCase("GroupNormalization-21-per-channel", "GroupNormalization", ["x", "s", "b"], {"x": X4},
               {"s": stats["s"], "b": stats["b"]}, {"num_groups": 2}, opset=21),
    ]
    return cases


def pool_cases() -> list[OpCase]:
    x = _rand(1, 3, 7, 8)
    cases = [
        OpCase("MaxPool-2x2", "MaxPool", ["x"], {"x": x}, attrs={"kernel_shape": [2, 2], "strides": [2, 2]}),
        OpCase("MaxPool-3x3-s2-p1", "MaxPool", ["x"], {"x": x},
               attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        OpCase("MaxPool-ceil", "MaxPool", ["x"], {"x": x},
               attrs={"kernel_shape": [3, 2], "strides": [2, 3], "ceil_mode": 1}),
        OpCase("MaxPool-ceil-pads", "MaxPool", ["x"], {"x": x},
               attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
        OpCase("MaxPool-asymmetric-pads", "MaxPool", ["x"], {"x": x},
               attrs={"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]}),
        OpCase("MaxPool-dilations", "MaxPool", ["x"], {"x": x},
               attrs={"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}),
        OpCase("MaxPool-SAME_UPPER", "MaxPool", ["x"], {"x": x},
               attrs={"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        OpCase("MaxPool-SAME_LOWER", "MaxPool", ["x"], {"x": x},
               attrs={"kernel_shape": [2, 2], "strides": [1, 1], "auto_pad": "SAME_LOWER"}),
        OpCase("MaxPool-opset8", "MaxPool", ["x"], {"x": x}, attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
               opset=8),
        OpCase("MaxPool-1d", "MaxPool", ["x"], {"x": _rand(1, 2, 9)}, attrs={"kernel_shape": [3], "strides": [2]}),
        OpCase("MaxPool-indices", "MaxPool", ["x"], {"x": _rand(2, 3, 7, 8)}, outputs=2,
               attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        OpCase("MaxPool-indices-asymmetric-ceil", "MaxPool", ["x"], {"x": x}, outputs=2,
               attrs={"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 1, 2, 0], "ceil_mode": 1}),
        OpCase("MaxPool-indices-column-major", "MaxPool", ["x"], {"x": x}, outputs=2,
               attrs={"kernel_shape": [2, 2], "strides": [2, 2], "storage_order": 1}),
        OpCase("MaxPool-indices-1d", "MaxPool", ["x"], {"x": _rand(2, 2, 9)}, outputs=2,
               attrs={"kernel_shape": [3], "strides": [2]}),
        OpCase("AveragePool-plain", "AveragePool", ["x"], {"x": x}, attrs={"kernel_shape": [2, 3], "strides": [2, 2]}),
        OpCase("GlobalAveragePool", "GlobalAveragePool", ["x"], {"x": x}),
        OpCase("GlobalMaxPool", "GlobalMaxPool", ["x"], {"x": x}),
    ]
    for include, ceil in itertools.product([0, 1], [0, 1]):
        cases.append(OpCase(f"AveragePool-pads-include{include}-ceil{ceil}", "AveragePool", ["x"], {"x": x},
                            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 2],
                                   "count_include_pad": include, "ceil_mode": ceil}))
    for auto_pad in ["SAME_UPPER", "SAME_LOWER"]:
        cases.append(OpCase(f"AveragePool-{auto_pad}", "AveragePool", ["x"], {"x": x},
                            attrs={"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": auto_pad}))
    cases.append(OpCase("AveragePool-19-dilations", "AveragePool", ["x"], {"x": x}, opset=19,
                        attrs={"kernel_shape": [2, 2], "dilations": [2, 1], "pads": [1, 1, 1, 1]}))
    # MaxUnpool takes MaxPool's indices: flat over (N, C, H, W) of the pooled input, one per 2x2 window here.
    pooled = _rand(1, 2, 3, 4, seed=3)
    row, col = np.meshgrid(np.arange(3) * 2, np.arange(4) * 2, indexing="ij")
    picks = [(row + r) * 8 + col + c + plane * 48 for plane, (r, c) in enumerate([(0, 1), (1, 0)])]
    indices = np.stack(picks)[None].astype(np.int64)
    cases += [
        OpCase("MaxUnpool", "MaxUnpool", ["x", "i"], {"x": pooled}, {"i": indices},
               attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=11),
        OpCase("MaxUnpool-output-shape", "MaxUnpool", ["x", "i", "s"], {"x": pooled},
               {"i": indices, "s": _i64(1, 2, 7, 8)}, attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=11),
    ]
    return cases


def reduce_cases() -> list[OpCase]:
    x = _rand(2, 3, 4, 5)
    cases = []
    for op in ["ReduceMean", "ReduceMax", "ReduceMin"]:
        cases += [
            OpCase(f"{op}-13-attr", op, ["x"], {"x": x}, attrs={"axes": [2, -1]}, opset=13),
            OpCase(f"{op}-13-all-keepdims0", op, ["x"], {"x": x}, attrs={"keepdims": 0}, opset=13),
            OpCase(f"{op}-18-input", op, ["x", "axes"], {"x": x}, {"axes": _i64(-2, 1)}, opset=18),
            OpCase(f"{op}-18-noop", op, ["x"], {"x": x}, attrs={"noop_with_empty_axes": 1}, opset=18),
        ]
    cases += [
        OpCase("ReduceSum-11-attr", "ReduceSum", ["x"], {"x": x}, attrs={"axes": [1], "keepdims": 0}, opset=11),
        OpCase("ReduceSum-13-input", "ReduceSum", ["x", "axes"], {"x": x}, {"axes": _i64(-1)}, opset=13),
        OpCase("ReduceSum-13-all", "ReduceSum", ["x"], {"x": x}, opset=13),
        OpCase("ReduceSum-13-noop", "ReduceSum", ["x", "axes"], {"x": x}, {"axes": _i64()},
               attrs={"noop_with_empty_axes": 1}, opset=13),
    ]
    x_pos = np.abs(x) + 0.5  # ReduceLogSum needs positive sums; ReduceProd stays well scaled
    for op in ["ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"]:
        data = x_pos if op == "ReduceLogSum" else x
        cases += [
            OpCase(f"{op}-13-attr", op, ["x"], {"x": data}, attrs={"axes": [1, -1]}, opset=13),
            OpCase(f"{op}-13-all-keepdims0", op, ["x"], {"x": data}, attrs={"keepdims": 0}, opset=13),
            OpCase(f"{op}-18-input", op, ["x", "axes"], {"x": data}, {"axes": _i64(-2)}, opset=18),
            # noop still applies the elementwise part (square, log, abs)
            OpCase(f"{op}-18-noop", op, ["x"], {"x": data}, attrs={"noop_with_empty_axes": 1}, opset=18),
        ]
    cases.append(OpCase("ReduceL2-zero-slice", "ReduceL2", ["x"], {"x": np.zeros((2, 3), np.float32)},
                        attrs={"axes": [1]}, opset=13))
    cases.append(OpCase("ReduceSumSquare-scalar", "ReduceSumSquare", ["x"], {"x": _f32(-1.5).reshape(())}, opset=18))
    for op, opset, axis in itertools.product(["Softmax", "LogSoftmax"], [11, 13], [1, -1]):
        cases.append(OpCase(f"{op}-{opset}-axis{axis}", op, ["x"], {"x": x}, attrs={"axis": axis}, opset=opset))
    ties = np.array([[1, 3, 3, 0], [2, 2, 1, 2]], dtype=np.float32)
    cases += [
        OpCase("ArgMax-keepdims", "ArgMax", ["x"], {"x": x}, attrs={"axis": 1}),
        OpCase("ArgMax-noKeep-negative-axis", "ArgMax", ["x"], {"x": x}, attrs={"axis": -1, "keepdims": 0}),
        OpCase("ArgMax-ties-first", "ArgMax", ["x"], {"x": ties}, attrs={"axis": 1}),
        OpCase("ArgMax-ties-last", "ArgMax", ["x"], {"x": ties}, attrs={"axis": 1, "select_last_index": 1}),
        OpCase("ArgMin-keepdims", "ArgMin", ["x"], {"x": x}, attrs={"axis": 2}),
        OpCase("ArgMin-ties-first", "ArgMin", ["x"], {"x": ties}, attrs={"axis": 1, "keepdims": 0}),
        OpCase("ArgMin-ties-last", "ArgMin", ["x"], {"x": ties}, attrs={"axis": -1, "select_last_index": 1}),
    ]
    for exclusive, reverse in itertools.product([0, 1], [0, 1]):
        cases.append(OpCase(f"CumSum-exclusive{exclusive}-reverse{reverse}", "CumSum", ["x", "a"], {"x": x},
                            {"a": np.array(2, np.int64)}, {"exclusive": exclusive, "reverse": reverse}, opset=14))
    cases.append(OpCase("CumSum-int-negative-axis", "CumSum", ["x", "a"], {"x": _i64(3, -1, 4, 1, -5, 9).reshape(2, 3)},
                        {"a": _i64(-1)}, opset=11))
    cases += [
        OpCase("TopK-1-attr", "TopK", ["x"], {"x": x}, attrs={"k": 2, "axis": 1}, opset=1, outputs=2),
        OpCase("TopK-10-input", "TopK", ["x", "k"], {"x": x}, {"k": _i64(3)}, opset=10, outputs=2),
        OpCase("TopK-11-smallest", "TopK", ["x", "k"], {"x": x}, {"k": _i64(2)}, attrs={"largest": 0, "axis": -2},
               opset=11, outputs=2),
        OpCase("TopK-11-ties-lower-index-first", "TopK", ["x", "k"], {"x": ties}, {"k": _i64(3)}, opset=11, outputs=2),
        OpCase("TopK-11-smallest-ties", "TopK", ["x", "k"], {"x": ties}, {"k": _i64(3)}, attrs={"largest": 0},
               opset=11, outputs=2),
    ]
    return cases


def shape_cases() -> list[OpCase]:
    x = _rand(2, 3, 4, 5)
    return [
        OpCase("Shape", "Shape", ["x"], {"x": x}),
        OpCase("Shape-start-end", "Shape", ["x"], {"x": x}, attrs={"start": 1, "end": -1}, opset=15),
        OpCase("Size", "Size", ["x"], {"x": x}),
        OpCase("Reshape-0-and-minus1", "Reshape", ["x", "s"], {"x": x}, {"s": _i64(0, -1, 5)}),
        OpCase("Reshape-allowzero", "Reshape", ["x", "s"], {"x": np.zeros((0, 4), np.float32)}, {"s": _i64(4, 0)},
               attrs={"allowzero": 1}, opset=14),
        OpCase("Flatten-axis0", "Flatten", ["x"], {"x": x}, attrs={"axis": 0}),
        OpCase("Flatten-axis2", "Flatten", ["x"], {"x": x}, attrs={"axis": 2}),
        OpCase("Flatten-negative", "Flatten", ["x"], {"x": x}, attrs={"axis": -1}),
        OpCase("Transpose-perm", "Transpose", ["x"], {"x": x}, attrs={"perm": [0, 2, 3, 1]}),
        OpCase("Transpose-default", "Transpose", ["x"], {"x": x}),
        OpCase("Unsqueeze-11-attr", "Unsqueeze", ["x"], {"x": x}, attrs={"axes": [0, -1]}, opset=11),
        OpCase("Unsqueeze-13-input", "Unsqueeze", ["x", "a"], {"x": x}, {"a": _i64(-1, 1)}, opset=13),
        OpCase("Squeeze-11-attr", "Squeeze", ["x"], {"x": _rand(1, 3, 1, 2)}, attrs={"axes": [-2]}, opset=11),
        OpCase("Squeeze-13-input", "Squeeze", ["x", "a"], {"x": _rand(1, 3, 1, 2)}, {"a": _i64(0, 2)}, opset=13),
        OpCase("Squeeze-13-all", "Squeeze", ["x"], {"x": _rand(1, 3, 1, 2)}, opset=13),
        OpCase("Concat-negative-axis", "Concat", ["a", "b"], {"a": x, "b": _rand(2, 3, 4, 2)}, attrs={"axis": -1}),
        OpCase("Concat-channels", "Concat", ["a", "b", "c"], {"a": x, "b": x * 2, "c": _rand(2, 1, 4, 5)},
               attrs={"axis": 1}),
        OpCase("Split-11-attr", "Split", ["x"], {"x": x}, attrs={"axis": 1, "split": [1, 2]}, opset=11, outputs=2),
        OpCase("Split-11-equal", "Split", ["x"], {"x": x}, attrs={"axis": -2}, opset=11, outputs=2),
        OpCase("Split-13-input", "Split", ["x", "s"], {"x": x}, {"s": _i64(2, 1, 2)}, attrs={"axis": -1},
               opset=13, outputs=3),
        OpCase("Split-18-num-outputs-uneven", "Split", ["x"], {"x": x}, attrs={"axis": 3, "num_outputs": 2},
               opset=18, outputs=2),
        OpCase("Slice-9-attrs", "Slice", ["x"], {"x": x}, attrs={"starts": [1, -3], "ends": [INT64_MAX, -1],
                                                                  "axes": [1, 3]}, opset=9),
        OpCase("Slice-13-steps", "Slice", ["x", "st", "en", "ax", "sp"], {"x": x},
               {"st": _i64(0, 1), "en": _i64(INT64_MAX, 4), "ax": _i64(-1, 2), "sp": _i64(2, 2)}, opset=13),
        OpCase("Slice-13-negative-steps", "Slice", ["x", "st", "en", "ax", "sp"], {"x": x},
               {"st": _i64(-1, 10), "en": _i64(INT64_MIN, 0), "ax": _i64(3, 1), "sp": _i64(-2, -1)}, opset=13),
        OpCase("Slice-13-no-axes", "Slice", ["x", "st", "en"], {"x": x}, {"st": _i64(1, 0), "en": _i64(2, -1)},
               opset=13),
        OpCase("Gather-scalar-negative", "Gather", ["x", "i"], {"x": x}, {"i": np.array(-1, np.int64)},
               attrs={"axis": 1}),
        # Shape -> Gather(scalar) -> a 0-d value: how legacy exports read one dimension of a shape
        OpCase("Gather-scalar-from-1d", "Gather", ["x", "i"], {"x": np.arange(4, dtype=np.float32)},
               {"i": np.array(2, np.int64)}, attrs={"axis": 0}),
        OpCase("Gather-2d-indices", "Gather", ["x", "i"], {"x": x}, {"i": _i64(0, 3, -1, 1).reshape(2, 2)},
               attrs={"axis": 2}),
        OpCase("Expand-bidirectional", "Expand", ["x", "s"], {"x": _rand(3, 1)}, {"s": _i64(2, 1, 4)}),
        OpCase("Tile", "Tile", ["x", "r"], {"x": _rand(2, 3)}, {"r": _i64(2, 3)}),
        OpCase("Range-int", "Range", ["a", "b", "c"], {}, {"a": np.array(1, np.int64), "b": np.array(10, np.int64),
                                                           "c": np.array(3, np.int64)}),
        OpCase("Range-float", "Range", ["a", "b", "c"], {"a": np.array(0.5, np.float32)},
               {"b": np.array(-2.0, np.float32), "c": np.array(-0.75, np.float32)}),
        OpCase("Cast-float-to-int", "Cast", ["x"], {"x": x * 3}, attrs={"to": TensorProto.INT64}),
        OpCase("Cast-int-to-float", "Cast", ["x"], {"x": _i64(3, -2)}, attrs={"to": TensorProto.FLOAT}),
        OpCase("Cast-float-to-bool", "Cast", ["x"], {"x": _f32(0, 1.5, -2)}, attrs={"to": TensorProto.BOOL}),
        OpCase("CastLike", "CastLike", ["x", "t"], {"x": _i64(3, -2)}, {"t": _f32(1)}, opset=15),
        OpCase("ConstantOfShape-default", "ConstantOfShape", ["s"], {}, {"s": _i64(2, 3)}),
        OpCase("ConstantOfShape-int", "ConstantOfShape", ["s"], {}, {"s": _i64(3)},
               attrs={"value": numpy_helper.from_array(_i64(7))}),
        OpCase("DepthToSpace-DCR", "DepthToSpace", ["x"], {"x": _rand(1, 8, 2, 3)}, attrs={"blocksize": 2}),
        OpCase("DepthToSpace-CRD", "DepthToSpace", ["x"], {"x": _rand(1, 8, 2, 3)},
               attrs={"blocksize": 2, "mode": "CRD"}),
        OpCase("SpaceToDepth", "SpaceToDepth", ["x"], {"x": _rand(1, 2, 4, 6)}, attrs={"blocksize": 2}),
        OpCase("Dropout-7", "Dropout", ["x"], {"x": x}, opset=7),
        OpCase("Dropout-13-mask", "Dropout", ["x", "r"], {"x": x}, {"r": np.array(0.5, np.float32)}, opset=13,
               outputs=2),
    ]


def pad_cases() -> list[OpCase]:
    x = _rand(1, 2, 4, 5)
    pads = _i64(0, 0, 1, 2, 0, 0, 2, 1)
    cases = [OpCase(f"Pad-11-{mode}", "Pad", ["x", "p"], {"x": x}, {"p": pads}, attrs={"mode": mode}, opset=11)
             for mode in ["constant", "reflect", "edge"]]
    cases += [
        OpCase("Pad-11-constant-value", "Pad", ["x", "p", "v"], {"x": x}, {"p": pads, "v": np.array(1.5, np.float32)},
               opset=11),
        OpCase("Pad-11-negative-crops", "Pad", ["x", "p"], {"x": x}, {"p": _i64(0, 0, -1, 2, 0, 0, 1, -2)}, opset=11),
        OpCase("Pad-2-attrs", "Pad", ["x"], {"x": x}, attrs={"pads": [0, 0, 1, 0, 0, 0, 0, 2], "mode": "reflect"},
               opset=2),
        OpCase("Pad-2-value", "Pad", ["x"], {"x": x}, attrs={"pads": [0, 1, 1, 0, 0, 0, 0, 2], "value": -3.0},
               opset=2),
        OpCase("Pad-18-axes", "Pad", ["x", "p", "", "a"], {"x": x}, {"p": _i64(1, 2, 3, 0), "a": _i64(-1, 2)},
               attrs={"mode": "edge"}, opset=18),
        OpCase("Pad-19-wrap", "Pad", ["x", "p"], {"x": x}, {"p": pads}, attrs={"mode": "wrap"}, opset=19),
    ]
    return cases


def constant_cases() -> list[OpCase]:
    dense = numpy_helper.from_array(_rand(2, 3, seed=9))
    attrs: list[tuple[str, dict]] = [
        ("value", {"value": dense}), ("value_float", {"value_float": 2.5}), ("value_floats", {"value_floats": [1, 2]}),
        ("value_int", {"value_int": 7}), ("value_ints", {"value_ints": [3, 4]}),
    ]
    return [OpCase(f"Constant-{name}", "Constant", [], {}, attrs=a, opset=13) for name, a in attrs]


def resize_cases() -> list[OpCase]:
    """Every Resize combination ONNX Runtime supports, on an axis that grows (4 -> 7) and one that shrinks (5 -> 3),
    given by sizes and by scales; plus opset 10, 18 (axes, keep_aspect_ratio_policy), NHWC, and Upsample 7/9."""
    x = _rand(1, 2, 4, 5, seed=11)
    sizes = {"s": _i64(1, 2, 7, 3)}
    scales = {"r": np.zeros(0, np.float32), "k": _f32(1, 1, 1.75, 0.6)}
    cases = []

    def add(name: str, attrs: dict, by: str = "sizes", opset: int = 13, data: np.ndarray = x, **consts) -> None:
        if by == "sizes" and opset == 11:  # roi and scales are required (but may be empty) before opset 13
            inputs, given = ["x", "r", "e", "s"], {**sizes, "r": scales["r"], "e": scales["r"], **consts}
        elif by == "sizes":
            inputs, given = ["x", "", "", "s"], {**sizes, **consts}
        else:
            inputs, given = ["x", "r", "k"], {**scales, **consts}
        cases.append(OpCase(f"Resize-{name}-{by}", "Resize", inputs, {"x": data}, given, attrs, opset))

    coords = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"]
    for coord, nearest in itertools.product(coords, ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]):
        opset = 11 if coord == "tf_half_pixel_for_nn" else 13  # deprecated in 13
        add(f"nearest-{coord}-{nearest}", {"mode": "nearest", "coordinate_transformation_mode": coord,
                                           "nearest_mode": nearest}, opset=opset)
    for coord in coords[:4]:
        for by in ["sizes", "scales"]:
            add(f"linear-{coord}", {"mode": "linear", "coordinate_transformation_mode": coord}, by)
        add(f"cubic-{coord}", {"mode": "cubic", "coordinate_transformation_mode": coord})
    for coord, mode in itertools.product(["half_pixel_symmetric"], ["nearest", "linear", "cubic"]):
        add(f"{mode}-{coord}", {"mode": mode, "coordinate_transformation_mode": coord}, "scales", opset=19)
    add("cubic-exclude-outside-a-0.5", {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5})
    add("cubic-exclude-outside", {"mode": "cubic", "exclude_outside": 1}, "scales")
    add("cubic-a-0.5-align", {"mode": "cubic", "cubic_coeff_a": -0.5,
                              "coordinate_transformation_mode": "align_corners"})
    add("nearest-default", {}, "scales", opset=11)
    add("nearest-x2-asymmetric-floor", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                        "nearest_mode": "floor"}, "scales", k=_f32(1, 1, 2, 2))
    add("linear-x2-fast-path", {"mode": "linear"}, "scales", k=_f32(1, 1, 2, 2))
    add("linear-inexact-scale", {"mode": "linear"}, "scales", k=_f32(1, 1, 1.3, 1.7))
    add("linear-to-1x1-pytorch", {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        s=_i64(1, 2, 1, 1))
    add("linear-nhwc", {"mode": "linear"}, "scales", data=_rand(1, 4, 5, 3), k=_f32(1, 2, 0.6, 1))
    add("linear-scale-not-one-same-size", {"mode": "linear"}, "scales", k=_f32(1, 1, 1.2, 1.1))
    cases += [
        OpCase("Resize-10-nearest-up-down", "Resize", ["x", "k"], {"x": x}, {"k": _f32(1, 1, 2, 0.6)},
               {"mode": "nearest"}, opset=10),
        OpCase("Resize-10-linear", "Resize", ["x", "k"], {"x": x}, {"k": _f32(1, 1, 1.5, 2)}, {"mode": "linear"},
               opset=10),
        OpCase("Resize-18-axes-sizes", "Resize", ["x", "", "", "s"], {"x": x}, {"s": _i64(6, 3)},
               {"mode": "linear", "axes": [2, -1]}, opset=18),
        OpCase("Resize-18-axes-scales", "Resize", ["x", "", "k"], {"x": x}, {"k": _f32(2.5, 0.5)},
               {"mode": "cubic", "axes": [2, 3]}, opset=18),
    ]
    # antialias (opset 18): F.interpolate(..., antialias=True) as the dynamo exporter writes it (exclude_outside=1),
    # shrinking by integer and fractional factors, and growing (where the filter is not stretched)
    big = _rand(1, 2, 11, 13, seed=12)
    for mode, coord, exclude in itertools.product(["linear", "cubic"], ["half_pixel", "pytorch_half_pixel",
                                                                        "align_corners", "asymmetric"], [0, 1]):
        cases.append(OpCase(f"Resize-18-antialias-{mode}-{coord}-exclude{exclude}", "Resize", ["x", "", "", "s"],
                            {"x": big}, {"s": _i64(1, 2, 4, 6)},
                            {"mode": mode, "antialias": 1, "coordinate_transformation_mode": coord,
                             "exclude_outside": exclude}, opset=18))
    cases += [
        OpCase("Resize-18-antialias-scales-shrink-and-grow", "Resize", ["x", "", "k"], {"x": big},
               {"k": _f32(1, 1, 0.5, 1.6)}, {"mode": "linear", "antialias": 1}, opset=18),
        OpCase("Resize-18-antialias-cubic-a-0.5-axes", "Resize", ["x", "", "", "s"], {"x": big}, {"s": _i64(3, 7)},
               {"mode": "cubic", "antialias": 1, "cubic_coeff_a": -0.5, "axes": [2, 3]}, opset=18),
    ]
    for policy in ["not_larger", "not_smaller"]:
        cases.append(OpCase(f"Resize-18-{policy}", "Resize", ["x", "", "", "s"], {"x": x}, {"s": _i64(9, 7)},
                            {"mode": "nearest", "axes": [2, 3], "keep_aspect_ratio_policy": policy}, opset=18))
    cases += [
        OpCase("Upsample-7-nearest", "Upsample", ["x"], {"x": x}, attrs={"scales": [1.0, 1.0, 2.0, 3.0]}, opset=7),
        OpCase("Upsample-7-linear", "Upsample", ["x"], {"x": x}, attrs={"scales": [1.0, 1.0, 2.0, 1.5],
                                                                        "mode": "linear"}, opset=7),
        OpCase("Upsample-9-nearest", "Upsample", ["x", "k"], {"x": x}, {"k": _f32(1, 1, 1.5, 2)}, opset=9),
        OpCase("Upsample-9-linear", "Upsample", ["x", "k"], {"x": x}, {"k": _f32(1, 1, 2, 2)}, {"mode": "linear"},
               opset=9),
    ]
    return cases


def indexing_cases() -> list[OpCase]:
    """GatherND / ScatterND and friends: how the dynamo exporter writes adaptive pooling with uneven windows,
    in-place index assignment and max_unpool."""
    x = _rand(2, 3, 4, 5)
    along_1 = np.array([[[[0, 2, -1, 1, 0]] * 4, [[1, 1, 0, -3, 2]] * 4]], np.int64)  # (1, 2, 4, 5) on axis 1
    repeated = np.abs(along_1) % 2  # two updates land on the same cell in some columns
    # Adaptive pooling 4x5 -> 3x2 as the dynamo exporter writes it: for each output cell, the (row, col) of every cell
    # of its 2x3 window, gathered from the input transposed to (H, W, N, C).
    rows, cols = [[0, 1], [1, 2], [2, 3]], [[0, 1, 2], [2, 3, 4]]
    windows = np.array([[[[(r, c) for c in cw] for r in rw] for cw in cols] for rw in rows], np.int64)
    cases = [
        OpCase("GatherElements-negative", "GatherElements", ["x", "i"], {"x": x}, {"i": along_1}, {"axis": 1}),
        OpCase("GatherElements-last-axis", "GatherElements", ["x", "i"], {"x": _rand(3, 4)},
               {"i": _i64(3, 0, -1, 1, 1, 2).reshape(3, 2)}, {"axis": -1}),
        OpCase("GatherND-cells", "GatherND", ["x", "i"], {"x": x}, {"i": _i64(0, 1, 3, 4, 1, -1, 0, 2).reshape(2, 4)}),
        OpCase("GatherND-slices", "GatherND", ["x", "i"], {"x": x}, {"i": _i64(1, 2, 0, -3, 1, 1).reshape(3, 1, 2)}),
        OpCase("GatherND-pooling-windows", "GatherND", ["x", "i"], {"x": x.transpose(2, 3, 0, 1)}, {"i": windows}),
        OpCase("GatherND-batch-dims", "GatherND", ["x", "i"], {"x": x},
               {"i": _i64(1, 3, 2, 0, -1, -1).reshape(2, 1, 3)}, {"batch_dims": 1}, opset=12),
        OpCase("GatherND-batch-dims-2", "GatherND", ["x", "i"], {"x": x},
               {"i": np.arange(12, dtype=np.int64).reshape(2, 3, 2, 1) % 4}, {"batch_dims": 2}, opset=13),
        OpCase("GatherND-int", "GatherND", ["x", "i"], {"x": _i64(4, 5, 6, 7).reshape(2, 2)}, {"i": _i64(1, 0)}),
        OpCase("ScatterElements-none", "ScatterElements", ["x", "i", "u"], {"x": x, "u": _rand(1, 2, 4, 5, seed=2)},
               {"i": along_1}, {"axis": 1}, opset=13),
        OpCase("ScatterElements-negative-index", "ScatterElements", ["x", "i", "u"],
               {"x": _rand(3, 4), "u": _rand(3, 1, seed=2)}, {"i": _i64(-1, 0, -4).reshape(3, 1)}, {"axis": 1},
               opset=11),
    ]
    for reduction, opset in [("add", 16), ("mul", 16), ("max", 18), ("min", 18)]:  # repeated indices accumulate
        cases.append(OpCase(f"ScatterElements-{reduction}", "ScatterElements", ["x", "i", "u"],
                            {"x": x, "u": _rand(1, 2, 4, 5, seed=2)}, {"i": repeated},
                            {"axis": 1, "reduction": reduction}, opset))
        cases.append(OpCase(f"ScatterND-{reduction}", "ScatterND", ["x", "i", "u"],
                            {"x": x, "u": _rand(3, 4, 5, seed=2)}, {"i": _i64(1, 0, 0, 2, 1, 0).reshape(3, 2)},
                            {"reduction": reduction}, opset))
    cases += [
        OpCase("ScatterND-cells", "ScatterND", ["x", "i", "u"], {"x": x, "u": _rand(3, seed=2)},
               {"i": _i64(0, 1, 2, 3, 1, 2, 0, 0, 1, -1, -2, -1).reshape(3, 4)}),
        OpCase("ScatterND-slices", "ScatterND", ["x", "i", "u"], {"x": x, "u": _rand(2, 2, 4, 5, seed=2)},
               {"i": _i64(1, 0, 0, 2, 1, 1, 0, 1).reshape(2, 2, 2)}, opset=13),
        OpCase("ScatterND-int", "ScatterND", ["x", "i", "u"], {"x": _i64(1, 2, 3, 4), "u": _i64(9, 8)},
               {"i": _i64(3, 0).reshape(2, 1)}),
        OpCase("OneHot-last-axis", "OneHot", ["i", "d", "v"], {"i": _i64(0, 3, -1, 5, 2, -5).reshape(2, 3)},
               {"d": _i64(4), "v": _f32(-1, 2)}, opset=11),
        OpCase("OneHot-float-channel-axis", "OneHot", ["i", "d", "v"], {"i": _f32(0, 2, 1, 1).reshape(1, 2, 2)},
               {"d": np.array(3.0, np.float32), "v": _f32(0, 1)}, {"axis": 1}, opset=11),
        OpCase("NonZero-float", "NonZero", ["x"], {"x": np.round(_rand(3, 4))}, opset=13),
        OpCase("NonZero-bool-3d", "NonZero", ["x"], {"x": _rand(2, 3, 4) > 0.5}, opset=13),
        # F.fold: columns of 2x3 blocks back into a 5x6 image
        OpCase("Col2Im", "Col2Im", ["x", "i", "b"], {"x": _rand(2, 12, 16)}, {"i": _i64(5, 6), "b": _i64(2, 3)},
               opset=18),
        OpCase("Col2Im-strides-dilations-pads", "Col2Im", ["x", "i", "b"], {"x": _rand(1, 8, 9)},
               {"i": _i64(6, 7), "b": _i64(2, 2)}, {"strides": [2, 2], "dilations": [1, 2], "pads": [1, 0, 0, 1]},
               opset=18),
        OpCase("Trilu-upper", "Trilu", ["x"], {"x": _rand(2, 4, 5)}, opset=14),
        OpCase("Trilu-lower-k", "Trilu", ["x", "k"], {"x": _rand(2, 4, 5)}, {"k": np.array(-1, np.int64)},
               {"upper": 0}, opset=14),
        OpCase("Trilu-upper-k", "Trilu", ["x", "k"], {"x": _rand(5, 3)}, {"k": np.array(2, np.int64)}, opset=14),
    ]
    return cases


def grid_sample_cases() -> list[OpCase]:
    x = _rand(2, 3, 5, 6, seed=13)
    grid = _rand(2, 4, 7, 2, seed=14, low=-1.3, high=1.3)  # some points outside [-1, 1]: padding_mode matters
    cases = []
    for mode, padding, align in itertools.product(["bilinear", "nearest", "bicubic"], ["zeros", "border", "reflection"],
                                                  [0, 1]):
        cases.append(OpCase(f"GridSample-16-{mode}-{padding}-align{align}", "GridSample", ["x", "g"],
                            {"x": x, "g": grid}, attrs={"mode": mode, "padding_mode": padding, "align_corners": align},
                            opset=16))
    for mode in ["linear", "nearest", "cubic"]:
        cases.append(OpCase(f"GridSample-20-{mode}", "GridSample", ["x", "g"], {"x": x, "g": grid},
                            attrs={"mode": mode}, opset=20))
    return cases


GOLDEN = (elementwise_cases() + binary_cases() + conv_cases() + pool_cases() + reduce_cases() + shape_cases()
          + indexing_cases() + pad_cases() + constant_cases() + resize_cases() + grid_sample_cases())


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: c.id)
def test_op_matches_onnxruntime(case: OpCase) -> None:
    assert_close_to_ort(case.model(), case.feeds)


def test_golden_cases_cover_every_supported_op() -> None:
    from disasm.attribution.ops import supported_op_types

    assert len({c.id for c in GOLDEN}) == len(GOLDEN), "case ids must be unique"
    assert set(GRADIENT_CASE_IDS) <= {c.id for c in GOLDEN}
    assert supported_op_types() - {c.op for c in GOLDEN} == set()


# One case per op whose float outputs are differentiable, among those added for the exporters' decompositions.
GRADIENT_CASE_IDS = [
    "Celu", "Mish", "Shrink-bias", "Softsign", "Atan", "Mod-fmod-float", "Einsum-attention",
    "LayerNormalization-statistics", "LayerNormalization-broadcast-scale", "GroupNormalization-18-per-group",
    "CumSum-exclusive1-reverse1", "ReduceL2-13-attr", "ReduceL2-zero-slice", "ReduceProd-13-attr",
    "ReduceLogSumExp-18-input", "TopK-10-input", "GatherND-pooling-windows", "GatherND-batch-dims",
    "GatherElements-negative", "ScatterND-slices", "ScatterND-max", "ScatterElements-mul", "Trilu-lower-k",
    "GridSample-16-bilinear-zeros-align0", "GridSample-16-bicubic-border-align1", "MaxPool-indices-asymmetric-ceil",
    "MaxUnpool", "Resize-18-antialias-cubic-half_pixel-exclude0", "Col2Im-strides-dilations-pads",
]


@pytest.mark.parametrize("case", [c for c in GOLDEN if c.id in GRADIENT_CASE_IDS], ids=lambda c: c.id)
def test_op_gradients_pass_gradcheck(case: OpCase) -> None:
    """autograd through the op (float64) agrees with finite differences w.r.t. every float input; the finite
    values of ReduceL2's gradient at an all-zero slice included."""
    graph = TorchGraph(case.model(), dtype=torch.float64)
    feeds = {name: torch.from_numpy(np.asarray(value)) for name, value in case.feeds.items()}
    names = [name for name, value in feeds.items() if value.is_floating_point()]

    def outputs(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = graph.run({**feeds, **dict(zip(names, values))})
        return tuple(value for value in out.values() if value.is_floating_point())

    args = tuple(feeds[name].double().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(outputs, args, eps=1e-6, atol=1e-5, fast_mode=True)


def test_sparse_constant_is_densified() -> None:
    # ONNX Runtime returns a sparse Constant as a sparse tensor, so the constant feeds an Add here.
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(_f32(5, 6)), numpy_helper.from_array(_i64(1, 4)),
                                       [2, 3])
    nodes = [helper.make_node("Constant", [], ["c"], sparse_value=sparse), helper.make_node("Add", ["x", "c"], ["y"])]
    feeds = {"x": _rand(2, 3)}
    model = make_model(nodes, feeds, ["y"], opset=13)
    assert_close_to_ort(model, feeds)
    expected = feeds["x"].copy()
    expected.flat[[1, 4]] += [5, 6]
    np.testing.assert_allclose(run_ort(model, feeds)["y"], expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Small conv nets built with plain torch, exported by both exporters
# ---------------------------------------------------------------------------------------------------------------------


def _randomise_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics, so that folding BN into the convolutions changes the weights."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1) -> list:
    pad = dilation * (k // 2)
    return [torch.nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False), torch.nn.BatchNorm2d(cout)]


class ResidualNet(torch.nn.Module):
    """stem conv-BN-ReLU, max pool, one basic residual block, 1x1 classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(*_conv_bn(3, 8, stride=2))
        self.stem_relu = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.block = torch.nn.Sequential(*_conv_bn(8, 8), torch.nn.ReLU(), *_conv_bn(8, 8))
        self.head = torch.nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem_relu(self.stem(x)))
        return self.head(torch.relu(x + self.block(x)))


class SqueezeExciteNet(torch.nn.Module):
    """MobileNetV3-style: expand, depthwise stride 2, hardswish, squeeze-excite with hardsigmoid, project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = torch.nn.Sequential(*_conv_bn(3, 12, k=1), torch.nn.Hardswish())
        self.depthwise = torch.nn.Sequential(*_conv_bn(12, 12, stride=2, groups=12), torch.nn.Hardswish())
        self.squeeze = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(12, 4, 1), torch.nn.ReLU(),
                                           torch.nn.Conv2d(4, 12, 1), torch.nn.Hardsigmoid())
        self.project = torch.nn.Sequential(*_conv_bn(12, 6, k=1))
        self.head = torch.nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.expand(x))
        return self.head(self.project(x * self.squeeze(x)))


class AsppNet(torch.nn.Module):
    """DeepLabV3-style ASPP: 1x1 and dilated 3x3 branches plus global pooling, concatenated and projected."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(*_conv_bn(3, 8, stride=2), torch.nn.ReLU())
        self.branches = torch.nn.ModuleList([
            torch.nn.Sequential(*_conv_bn(8, 6, k=1), torch.nn.ReLU()),
            torch.nn.Sequential(*_conv_bn(8, 6, dilation=2), torch.nn.ReLU()),
            torch.nn.Sequential(*_conv_bn(8, 6, dilation=3), torch.nn.ReLU()),
        ])
        self.pooling = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 6, 1), torch.nn.ReLU())
        self.project = torch.nn.Sequential(*_conv_bn(24, 8, k=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)
        pooled = torch.nn.functional.interpolate(self.pooling(x), size=x.shape[-2:], mode="bilinear",
                                                 align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class UpsampleNet(torch.nn.Module):
    """Encoder-decoder: strided convs, a bilinear skip fusion (align_corners=True), bilinear back to input size,
    softmax over classes."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = torch.nn.Sequential(*_conv_bn(3, 8, stride=2), torch.nn.ReLU())
        self.down2 = torch.nn.Sequential(*_conv_bn(8, 8, stride=2), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down1(x)
        deep = torch.nn.functional.interpolate(self.down2(skip), scale_factor=2.0, mode="bilinear",
                                               align_corners=True)
        logits = torch.nn.functional.interpolate(self.head(skip + deep), size=x.shape[-2:], mode="bilinear",
                                                 align_corners=False)
        return torch.softmax(logits, dim=1)


NETS = {"residual": ResidualNet, "squeeze_excite": SqueezeExciteNet, "aspp": AsppNet, "upsample": UpsampleNet}
EXPORTS = ["torchscript-13", "torchscript-17", "dynamo-18"]
NET_INPUT = torch.from_numpy(_rand(1, 3, 24, 32, seed=5))


def _build_net(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomise_batch_norms(NETS[name]())


def _export(model: torch.nn.Module, exporter: str, path: Path, x: torch.Tensor = NET_INPUT) -> onnx.ModelProto:
    kind, opset = exporter.split("-")
    kwargs = {"dynamo": False, "do_constant_folding": True} if kind == "torchscript" else {"dynamo": True}
    torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["out"],
                      opset_version=int(opset), **kwargs)
    return onnx.load(str(path))  # also loads a dynamo export's side .onnx.data file


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """Exports each (net, exporter) once per module; dynamo exports take about a second each."""
    cache: dict[tuple[str, str], tuple[torch.nn.Module, onnx.ModelProto]] = {}

    def get(name: str, exporter: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
        if (name, exporter) not in cache:
            model = _build_net(name)
            path = tmp_path_factory.mktemp(f"{name}-{exporter}") / "model.onnx"
            cache[name, exporter] = model, _export(model, exporter, path)
        return cache[name, exporter]

    return get


@pytest.mark.parametrize("exporter", EXPORTS)
@pytest.mark.parametrize("name", list(NETS))
def test_exported_net_matches_onnxruntime_and_torch(exported, name: str, exporter: str) -> None:
    model, proto = exported(name, exporter)
    expected_opset = int(exporter.split("-")[1])
    assert TorchGraph(proto).opset == expected_opset
    feeds = {"image": NET_INPUT.numpy()}
    assert_close_to_ort(proto, feeds)
    with torch.no_grad():
        ours = TorchGraph(proto).run({"image": NET_INPUT})["out"]
        torch.testing.assert_close(ours, model(NET_INPUT), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# What the exporters decompose segmentation decoders into: GatherND (uneven adaptive pooling), Einsum,
# LayerNormalization, CumSum, ReduceL2, DepthToSpace, ...
# ---------------------------------------------------------------------------------------------------------------------


class PyramidPoolingNet(torch.nn.Module):
    """PSPNet's pyramid pooling: adaptive average pools of 1, 2, 3, 6 cells on a 13x15 map (3 and 6 divide neither
    side, so the dynamo exporter writes them as GatherND windows plus ReduceMean; the TorchScript exporter refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(*_conv_bn(3, 8, stride=2))
        self.stem_relu = torch.nn.ReLU()
        self.stages = torch.nn.ModuleList([
            torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(size), torch.nn.Conv2d(8, 2, 1), torch.nn.ReLU())
            for size in (1, 2, 3, 6)
        ])
        self.head = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem(x))
        pyramid = [F.interpolate(stage(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
                   for stage in self.stages]
        return self.head(torch.cat([x, *pyramid], 1))


class TransformerDecoderNet(torch.nn.Module):
    """Patch embedding, LayerNorm over channels (channels-last permute), GELU, einsum attention, GroupNorm, SiLU,
    hardswish/hardsigmoid, F.normalize, cumsum, a where mask, ConvTranspose with output_padding, PixelShuffle and a
    bicubic resize back to the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, 4)
        self.norm = torch.nn.LayerNorm(8)
        self.qkv = torch.nn.Conv2d(8, 24, 1)
        self.group = torch.nn.GroupNorm(2, 8)
        self.up = torch.nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.shuffle = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.PixelShuffle(2))
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        q, k, v = self.qkv(F.gelu(h)).flatten(2).chunk(3, dim=1)
        attention = torch.einsum("bcn,bcm->bnm", q, k).softmax(-1)
        h = h + torch.einsum("bnm,bcm->bcn", attention, v).reshape(h.shape)
        h = F.silu(self.group(h)) * F.hardsigmoid(h) + F.hardswish(h)
        h = F.normalize(h, dim=1) + torch.cumsum(h, dim=2) / h.shape[2]
        h = torch.where(h > 0, h, 0.1 * h)
        logits = self.head(self.shuffle(self.up(h)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bicubic", align_corners=False)


class InterpolateNet(torch.nn.Module):
    """F.interpolate as decoders call it: nearest x2, bilinear by a fractional factor, bicubic with align_corners to
    a size, bilinear back to x.shape[-2:]; with antialias=True, a Pillow-style shrink first (the dynamo exporter
    writes Resize antialias=1; the TorchScript exporter refuses it)."""

    def __init__(self, antialias: bool = False) -> None:
        super().__init__()
        self.antialias = antialias
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(12, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if self.antialias:
            h = F.interpolate(h, scale_factor=0.5, mode="bicubic", antialias=True)
        near = F.interpolate(h, scale_factor=2.0, mode="nearest")
        frac = F.interpolate(h, scale_factor=1.5, mode="bilinear", align_corners=False)
        cubic = F.interpolate(h, size=(17, 19), mode="bicubic", align_corners=True)
        size = x.shape[-2:]
        branches = [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in (near, frac, cubic)]
        return self.head(torch.cat(branches, 1))


DECODERS = {"pyramid": PyramidPoolingNet, "transformer": TransformerDecoderNet, "interpolate": InterpolateNet,
            "interpolate-antialias": lambda: InterpolateNet(antialias=True)}
DECODER_INPUTS = {"pyramid": torch.from_numpy(_rand(1, 3, 26, 30, seed=15))}


@pytest.fixture(scope="module")
def decoder_exports(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple[str, str], tuple[torch.nn.Module, onnx.ModelProto]] = {}

    def get(name: str, exporter: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            model = _randomise_batch_norms(DECODERS[name]())
            path = tmp_path_factory.mktemp(f"{name}-{exporter}") / "model.onnx"
            cache[name, exporter] = model, _export(model, exporter, path, DECODER_INPUTS.get(name, NET_INPUT))
        return cache[name, exporter]

    return get


def _check_export_and_gradient(model: torch.nn.Module, proto: onnx.ModelProto, x: torch.Tensor,
                               capture: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The interpreter equals ONNX Runtime and the torch module, and d(weighted output)/d(captured tensor) is finite
    and non-zero. Returns that gradient and the output weights."""
    assert_close_to_ort(proto, {"image": x.numpy()})
    out = TorchGraph(proto).run({"image": x}, capture=[capture])
    torch.testing.assert_close(out["out"].detach(), model(x).detach(), rtol=1e-4, atol=1e-4)
    weights = torch.from_numpy(_rand(*out["out"].shape, seed=16))
    (grad,) = torch.autograd.grad((out["out"] * weights).sum(), [out[capture]])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    return grad, weights


def test_pyramid_pooling_dynamo_export_runs_gathernd_with_gradients(decoder_exports) -> None:
    model, proto = decoder_exports("pyramid", "dynamo-18")
    assert "GatherND" in {n.op_type for n in proto.graph.node}
    x = DECODER_INPUTS["pyramid"]
    relu = next(n.output[0] for n in proto.graph.node if n.op_type == "Relu")  # the stem, before every pool
    ours, weights = _check_export_and_gradient(model, proto, x, relu)
    seen = {}
    handle = model.stem_relu.register_forward_hook(lambda m, i, o: seen.setdefault("act", o))
    try:
        (theirs,) = torch.autograd.grad((model(x) * weights).sum(), [seen["act"]])
    finally:
        handle.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exporter", ["torchscript-17", "dynamo-18"])
def test_transformer_decoder_export_matches_onnxruntime_with_gradients(decoder_exports, exporter: str) -> None:
    model, proto = decoder_exports("transformer", exporter)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Einsum", "LayerNormalization", "CumSum", "ReduceL2", "DepthToSpace", "ConvTranspose"} <= ops
    norm = next(n.output[0] for n in proto.graph.node if n.op_type == "LayerNormalization")
    _check_export_and_gradient(model, proto, NET_INPUT, norm)


@pytest.mark.parametrize(("name", "exporter"), [("interpolate", "torchscript-13"), ("interpolate", "torchscript-17"),
                                                ("interpolate", "dynamo-18"), ("interpolate-antialias", "dynamo-18")])
def test_interpolate_variants_match_onnxruntime_with_gradients(decoder_exports, name: str, exporter: str) -> None:
    model, proto = decoder_exports(name, exporter)
    antialiased = [n for n in proto.graph.node for a in n.attribute if a.name == "antialias" and a.i == 1]
    assert len(antialiased) == (name == "interpolate-antialias")
    relu = next(n.output[0] for n in proto.graph.node if n.op_type == "Relu")
    _check_export_and_gradient(model, proto, NET_INPUT, relu)


# ---------------------------------------------------------------------------------------------------------------------
# Captures and gradients
# ---------------------------------------------------------------------------------------------------------------------


def test_gradient_at_captured_tensor_matches_torch(exported) -> None:
    """d(loss)/d(stem ReLU output) through the interpreter equals torch's on the same architecture."""
    model, proto = exported("residual", "torchscript-17")
    relu_name = next(node.output[0] for node in proto.graph.node if node.op_type == "Relu")
    weights = torch.from_numpy(_rand(1, 5, 6, 8, seed=8))

    graph = TorchGraph(proto)
    out = graph.run({"image": NET_INPUT}, capture=[relu_name])
    (ours,) = torch.autograd.grad((out["out"] * weights).sum(), [out[relu_name]])

    seen = {}
    handle = model.stem_relu.register_forward_hook(lambda m, i, o: seen.setdefault("act", o))
    try:
        loss = (model(NET_INPUT) * weights).sum()
        (theirs,) = torch.autograd.grad(loss, [seen["act"]])
    finally:
        handle.remove()
    torch.testing.assert_close(out[relu_name].detach(), seen["act"].detach(), rtol=1e-4, atol=1e-4)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _mixed_graph() -> onnx.ModelProto:
    """x -> Pad(reflect) -> Conv -> h -> Resize(linear, inexact scale: gather path) -> AveragePool(pads) -> Tanh
    -> Resize(linear x2: F.interpolate path) -> Softmax -> y."""
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "w", "b"], ["h"]),
        helper.make_node("Resize", ["h", "", "up"], ["r"], mode="linear"),
        helper.make_node("AveragePool", ["r"], ["a"], kernel_shape=[2, 2], pads=[1, 0, 0, 1]),
        helper.make_node("Tanh", ["a"], ["t"]),
        helper.make_node("Resize", ["t", "", "x2"], ["u"], mode="linear"),
        helper.make_node("Softmax", ["u"], ["y"], axis=1),
    ]
    consts = {"pads": _i64(0, 0, 1, 1, 0, 0, 1, 1), "w": _rand(3, 2, 3, 3, seed=1), "b": _rand(3, seed=2),
              "up": _f32(1, 1, 1.3, 1.7), "x2": _f32(1, 1, 2, 2)}
    return make_model(nodes, {"x": _rand(1, 2, 4, 4)}, ["y"], consts, opset=18)


def test_gradients_pass_finite_difference_check() -> None:
    """autograd through the interpreter (float64) agrees with finite differences, w.r.t. the input and a capture."""
    graph = TorchGraph(_mixed_graph(), dtype=torch.float64)
    x = torch.from_numpy(_rand(1, 2, 4, 4, seed=3)).double().requires_grad_()
    weights = torch.from_numpy(_rand(1, 3, 10, 12, seed=4)).double()
    assert torch.autograd.gradcheck(lambda t: (graph.run({"x": t})["y"] * weights).sum(), (x,), eps=1e-6, atol=1e-5)

    out = graph.run({"x": x.detach()}, capture=["h"])
    (grad_h,) = torch.autograd.grad((out["y"] * weights).sum(), [out["h"]])
    h = out["h"].detach()
    direction = torch.from_numpy(_rand(*h.shape, seed=6)).double()
    downstream = TorchGraph(_downstream_of_h(), dtype=torch.float64)
    eps = 1e-6
    loss = [(downstream.run({"h": h + s * eps * direction})["y"] * weights).sum() for s in (1, -1)]
    numeric = (loss[0] - loss[1]) / (2 * eps)
    torch.testing.assert_close((grad_h * direction).sum(), numeric, rtol=1e-5, atol=1e-7)


def _downstream_of_h() -> onnx.ModelProto:
    """The part of _mixed_graph after `h`, with `h` as its input."""
    full = _mixed_graph()
    nodes = [n for n in full.graph.node if n.op_type not in ("Pad", "Conv")]
    consts = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer if t.name in ("up", "x2")}
    return make_model(nodes, {"h": np.zeros((1, 3, 4, 4), np.float32)}, ["y"], consts, opset=18)


def test_capture_returns_the_intermediate_values() -> None:
    model = _mixed_graph()
    feeds = {"x": _rand(1, 2, 4, 4, seed=3)}
    model.graph.output.extend([helper.make_value_info(name, onnx.TypeProto()) for name in ("h", "a")])
    expected = run_ort(model, feeds)
    model.graph.output.pop()
    model.graph.output.pop()
    out = TorchGraph(model).run({"x": torch.from_numpy(feeds["x"])}, capture=["h", "a", "x"])
    assert list(out) == ["y", "h", "a", "x"]
    for name in ("y", "h", "a"):
        np.testing.assert_allclose(out[name].detach().numpy(), expected[name], rtol=1e-4, atol=1e-4)
    assert out["h"].requires_grad and out["x"].requires_grad  # captured leaves join the autograd graph
    with torch.no_grad():
        assert not TorchGraph(model).run({"x": torch.from_numpy(feeds["x"])}, capture=["h"])["h"].requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# Errors a user sees
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_ops_are_all_named_at_construction() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("FancyNorm", ["a"], ["b"]),
             helper.make_node("FusedConv", ["b"], ["c"], domain="com.microsoft"),
             helper.make_node("FancyNorm", ["c"], ["y"])]
    model = make_model(nodes, {"x": _rand(1, 2)}, ["y"])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UnsupportedOpsError) as raised:
        TorchGraph(model)
    assert raised.value.op_types == {"FancyNorm", "com.microsoft.FusedConv"}
    message = str(raised.value)
    assert "FancyNorm, com.microsoft.FusedConv" in message and "Supported:" in message and "Resize" in message


def test_unsupported_attribute_fails_at_construction() -> None:
    node = helper.make_node("Resize", ["x", "", "k"], ["y"], mode="linear",
                            coordinate_transformation_mode="tf_crop_and_resize")
    model = make_model([node], {"x": _rand(1, 1, 4, 4)}, ["y"], {"k": _f32(1, 1, 0.5, 0.5)}, opset=18)
    with pytest.raises(DisasmError, match=r"Resize node .*coordinate_transformation_mode='tf_crop_and_resize' is not "
                                          r"supported; supported values: 'half_pixel'"):
        TorchGraph(model)
    node = helper.make_node("Resize", ["x", "", "k"], ["y"], mode="nearest", antialias=1)
    model = make_model([node], {"x": _rand(1, 1, 4, 4)}, ["y"], {"k": _f32(1, 1, 0.5, 0.5)}, opset=18)
    with pytest.raises(DisasmError, match=r"Resize node .*antialias=1 needs mode 'linear' or 'cubic'"):
        TorchGraph(model)
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="xor")
    model = make_model([node], {"x": _rand(3), "u": _rand(1)}, ["y"], {"i": _i64(0).reshape(1, 1)}, opset=18)
    with pytest.raises(DisasmError, match=r"ScatterND node .*reduction='xor' is not supported"):
        TorchGraph(model)


def test_bad_run_arguments_are_reported() -> None:
    graph = TorchGraph(_mixed_graph())
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(DisasmError, match=r"cannot capture \['nope'\]"):
        graph.run({"x": x}, capture=["nope"])
    with pytest.raises(DisasmError, match=r"missing \['x'\], unknown \['image'\]"):
        graph.run({"image": x})
    with pytest.raises(DisasmError, match=r"input 'x' must have rank 4, got shape \(2, 4, 4\)"):
        graph.run({"x": x[0]})
    assert graph.input_names == ["x"] and graph.output_names == ["y"]


# ---------------------------------------------------------------------------------------------------------------------
# The shipped example and CUDA
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not EXAMPLE.exists(), reason="examples/shapes_seg.onnx has not been built (examples/train.py)")
def test_shipped_example_matches_onnxruntime() -> None:
    model = onnx.load(str(EXAMPLE))
    graph = TorchGraph(model)
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = {graph.input_names[0]: _rand(*dims, seed=12, low=-1.0, high=1.0)}
    assert_close_to_ort(model, feeds)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(exported) -> None:
    _, proto = exported("aspp", "torchscript-13")  # Shape/Slice/Concat arithmetic next to CUDA activations
    x = NET_INPUT
    on_cpu = TorchGraph(proto).run({"image": x})["out"]
    graph = TorchGraph(proto, device="cuda")
    out = graph.run({"image": x}, capture=[graph.output_names[0]])
    assert out["out"].device.type == "cuda"
    torch.testing.assert_close(out["out"].detach().cpu(), on_cpu.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(TorchGraph(_mixed_graph(), device="cuda").run({"x": x[:, :2, :4, :4]})["y"].cpu(),
                               TorchGraph(_mixed_graph()).run({"x": x[:, :2, :4, :4]})["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_golden_cases_and_decoders_match_cpu(decoder_exports) -> None:
    """Every golden case, and the exported decoders with a gradient, give the CPU's values on CUDA: index tensors,
    host inputs and constants cross devices in every op. (Tolerances allow cuDNN's TF32 convolutions.)"""
    for case in GOLDEN:
        feeds = {name: torch.from_numpy(np.asarray(value)) for name, value in case.feeds.items()}
        with torch.no_grad():
            on_cpu = TorchGraph(case.model()).run(feeds)
            on_cuda = TorchGraph(case.model(), device="cuda").run(feeds)
        for name, want in on_cpu.items():
            torch.testing.assert_close(on_cuda[name].cpu(), want, rtol=1e-3, atol=1e-3, equal_nan=True,
                                       msg=lambda text, case=case: f"{case.id}: {text}")
    for name in ("pyramid", "transformer"):
        _, proto = decoder_exports(name, "dynamo-18")
        x = DECODER_INPUTS.get(name, NET_INPUT)
        capture = next(n.output[0] for n in proto.graph.node if n.op_type in ("Relu", "LayerNormalization"))
        grads = []
        for device in ("cpu", "cuda"):
            out = TorchGraph(proto, device=device).run({"image": x}, capture=[capture])
            weights = torch.from_numpy(_rand(*out["out"].shape, seed=16)).to(device)
            grads.append(torch.autograd.grad((out["out"] * weights).sum(), [out[capture]])[0].cpu())
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4)


def test_a_constant_set_by_name_is_what_later_runs_read():
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "w")])
    interpreter = TorchGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = torch.ones(2)
    assert interpreter.run({"x": x})["y"].tolist() == [2.0, 3.0]
    weight = torch.nn.Parameter(torch.tensor([5.0, 7.0]))
    interpreter.set_constant("w", weight)
    y = interpreter.run({"x": x})["y"]
    assert y.tolist() == [5.0, 7.0] and interpreter.constants["w"] is weight
    y.sum().backward()
    assert weight.grad.tolist() == [1.0, 1.0]  # trainable through the interpreter
    with pytest.raises(DisasmError, match="no initializer named 'v'"):
        interpreter.set_constant("v", weight)
    with pytest.raises(TypeError):
        interpreter.constants["w"] = weight  # read-only: set_constant is the one way in
