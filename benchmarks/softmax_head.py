"""Why road-segmentation-adas-0001 runs slower once cut: ONNX Runtime's Softmax in place, and exact heads after it.

    python benchmarks/softmax_head.py        # writes benchmarks/results/softmax_head.{json,md}

The model ends NCHW logits [1,4,512,896] -> Transpose to NHWC -> Softmax over the 4 classes -> graph output. Its
chosen-or-none head (compiler/outputs.py) has to read those probabilities, and a Softmax over the classes cannot be
cut or moved behind the head. Timed here on that tail alone, with ONNX Runtime's profiler (kernel time per op kind,
median over the runs, 1 thread), on random logits:

- `softmax -> output`: the full model's tail;
- `softmax -> Neg`: any node reading the probabilities; the Softmax's input dies at it, so ONNX Runtime may write its
  output in place;
- `softmax -> Neg, input kept`: the same, with the Softmax's input also a graph output, so it cannot run in place;
- the exact heads for `--categories road` (none = max of background, curb, mark): Gather + ReduceMax + Concat (what
  compiler/outputs.py builds), Split + Max + Concat, and Softmax on NCHW planes before the Transpose. Each head's
  output is checked bitwise against the full tail's probabilities read as chosen-or-none.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from disasm.compiler.files import write_atomic
from disasm.runtime.onnxrt import session_options

ROOT = Path(__file__).resolve().parents[1]
H, W, RUNS = 512, 896, 20
NONE, CHOSEN = [0, 2, 3], [1]


def _model(nodes: list, layout: str, outputs: dict[str, list[int]], constants=()) -> onnx.ModelProto:
    shape = [1, 4, H, W] if layout == "nchw" else [1, H, W, 4]
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
                              initializer=list(constants))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def variants() -> dict[str, onnx.ModelProto]:
    node, nhwc4, nhwc2 = helper.make_node, [1, H, W, 4], [1, H, W, 2]
    transpose = node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1])
    softmax = node("Softmax", ["t"], ["s"], axis=3)
    none_rows = helper.make_tensor("none_rows", TensorProto.INT64, [3], NONE)
    chosen_rows = helper.make_tensor("chosen_rows", TensorProto.INT64, [1], CHOSEN)
    ones = helper.make_tensor("ones", TensorProto.INT64, [4], [1, 1, 1, 1])
    return {
        "softmax -> output": _model([transpose, node("Softmax", ["t"], ["y"], axis=3)], "nchw", {"y": nhwc4}),
        "softmax -> Neg": _model([transpose, softmax, node("Neg", ["s"], ["y"])], "nchw", {"y": nhwc4}),
        "softmax -> Neg, input kept": _model([transpose, softmax, node("Neg", ["s"], ["y"])], "nchw",
                                             {"y": nhwc4, "t": nhwc4}),
        "head: Gather + ReduceMax + Concat": _model(
            [transpose, softmax, node("Gather", ["s", "none_rows"], ["o"], axis=3),
             node("Gather", ["s", "chosen_rows"], ["c"], axis=3),
             node("ReduceMax", ["o"], ["m"], axes=[3], keepdims=1), node("Concat", ["m", "c"], ["y"], axis=3)],
            "nchw", {"y": nhwc2}, [none_rows, chosen_rows]),
        "head: Split + Max + Concat": _model(
            [transpose, softmax, node("Split", ["s", "ones"], ["s0", "s1", "s2", "s3"], axis=3),
             node("Max", ["s0", "s2", "s3"], ["m"]), node("Concat", ["m", "s1"], ["y"], axis=3)],
            "nchw", {"y": nhwc2}, [ones]),
        "head: Softmax on NCHW planes, then Transpose": _model(
            [node("Softmax", ["x"], ["p"], axis=1), node("Split", ["p", "ones"], ["s0", "s1", "s2", "s3"], axis=1),
             node("Max", ["s0", "s2", "s3"], ["m"]), node("Concat", ["m", "s1"], ["u"], axis=1),
             node("Transpose", ["u"], ["y"], perm=[0, 2, 3, 1])],
            "nchw", {"y": nhwc2}, [ones]),
    }


def profile(model: onnx.ModelProto, x: np.ndarray, prefix: str) -> tuple[np.ndarray, dict[str, float]]:
    """The first output and the median kernel milliseconds per op kind over RUNS profiled runs (1 thread)."""
    options = session_options(1, spinning=False)  # as OnnxRuntimeRunner's sessions
    options.enable_profiling, options.profile_file_prefix = True, prefix
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = session.run(["y"], {"x": x})[0]
    for _ in range(RUNS):
        session.run(["y"], {"x": x})
    trace = Path(session.end_profiling())
    per_run: dict[str, list[float]] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_run.setdefault(event["args"]["op_name"], []).append(event["dur"] / 1000)
    trace.unlink()
    return out, {op: float(np.median(ms[1:])) for op, ms in per_run.items()}  # the first run warms up


def main() -> None:
    x = (np.random.default_rng(0).standard_normal((1, 4, H, W)) * 5).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        outputs = {}
        for name, model in variants().items():
            outputs[name], ops = profile(model, x, f"{work}/p")
            rows.append({"variant": name, "ms_per_op": ops, "total_ms": sum(ops.values())})
            print(f"{name}: {rows[-1]['total_ms']:.2f} ms {ops}", file=sys.stderr, flush=True)
    p = outputs["softmax -> output"]
    reference = np.concatenate([p[..., NONE].max(3, keepdims=True), p[..., CHOSEN]], 3)
    for row in rows:
        if row["variant"].startswith("head"):
            row["bitwise_equal"] = bool(np.array_equal(outputs[row["variant"]], reference))
    out = ROOT / "benchmarks" / "results"
    result = {"onnxruntime": ort.__version__, "shape": [1, H, W, 4], "runs": RUNS, "threads": 1, "rows": rows}
    write_atomic(out / "softmax_head.json", (json.dumps(result, indent=2) + "\n").encode())
    lines = ["# The Softmax at the end of road-segmentation-adas-0001 and exact chosen-or-none heads after it", "",
             f"ONNX Runtime {ort.__version__}, CPU, 1 thread; probabilities NHWC [1,{H},{W},4]; kernel time per op "
             f"kind from ONNX Runtime's profiler, median of {RUNS} runs. Generated by `benchmarks/softmax_head.py`.",
             "", "| variant | Softmax ms | other ops ms | total ms | head bitwise equal |", "|---|---:|---:|---:|---|"]
    for row in rows:
        soft = row["ms_per_op"].get("Softmax", 0.0)
        equal = {True: "yes", False: "NO"}.get(row.get("bitwise_equal"), "")
        lines.append(f"| {row['variant']} | {soft:.2f} | {row['total_ms'] - soft:.2f} | {row['total_ms']:.2f} | "
                     f"{equal} |")
    write_atomic(out / "softmax_head.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
