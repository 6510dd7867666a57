"""Small ONNX graph factories and ONNX Runtime as an oracle, for tests that run ONNX graphs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

# ONNX Runtime 1.32 reads IR versions up to 11; 9 covers every opset these tests use (up to 20).
IR_VERSION = 9


def make_model(nodes: Sequence[onnx.NodeProto], feeds: Mapping[str, np.ndarray], outputs: Sequence[str],
               consts: Mapping[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A one-graph model: `feeds` become typed graph inputs, `consts` initializers. Outputs are left untyped; ONNX
    Runtime infers their types."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
              for name, a in feeds.items()]
    initializers = [numpy_helper.from_array(np.asarray(a), name) for name, a in (consts or {}).items()]
    graph = helper.make_graph(list(nodes), "test", inputs, [helper.make_value_info(o, onnx.TypeProto())
                                                             for o in outputs], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


@dataclass(frozen=True)
class OpCase:
    """One node of `op` with the given inputs ("" for an omitted optional input), run by both engines."""

    id: str
    op: str
    inputs: Sequence[str]
    feeds: Mapping[str, np.ndarray]
    consts: Mapping[str, np.ndarray] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)
    opset: int = 17
    outputs: int = 1

    def model(self) -> onnx.ModelProto:
        names = [f"y{i}" for i in range(self.outputs)]
        node = helper.make_node(self.op, list(self.inputs), names, name=self.id, **self.attrs)
        return make_model([node], self.feeds, names, self.consts, self.opset)


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def run_interpreter(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    import torch

    from disasm.attribution.interpreter import TorchGraph

    graph = TorchGraph(model, **kwargs)
    with torch.no_grad():
        out = graph.run({name: torch.from_numpy(np.asarray(a)) for name, a in feeds.items()})
    return {name: value.detach().cpu().numpy() for name, value in out.items()}


def assert_close_to_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], tol: float = 1e-4) -> None:
    """Every graph output of the interpreter equals ONNX Runtime's in shape and value (bools and ints exactly)."""
    expected = run_ort(model, feeds)
    actual = run_interpreter(model, feeds)
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want.astype(np.float32), rtol=tol, atol=tol, err_msg=name)
