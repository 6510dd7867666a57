"""Cost and speed of the channel surgery on the test fixture architectures and on a DeepLabV3-ResNet50-sized graph.

    python benchmarks/surgery.py              # writes benchmarks/results/surgery.{json,md}

For each architecture of tests/architectures.py (legacy exporter, opset 17, random weights): a fixed, seeded 50%
random keep-set over every prunable group (the class group included), MACs and parameters before and after, and the
time of the channel analysis and of the surgery separately (median of a few runs, on an already loaded and
shape-inferred model). The last row is torchvision's deeplabv3_resnet50 at full widths (about 40M parameters, 512x512
input), exported once into a temporary folder; its analysis + surgery must stay under 3 seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from disasm.compiler.channels import ChannelAnalysis, analyse
from disasm.compiler.cost import model_cost
from disasm.compiler.files import write_atomic
from disasm.compiler.prune import prune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import architectures as A  # noqa: E402  (the fixture architectures live with the tests)

SURGERY_BUDGET_SECONDS = 3.0
FIXTURES: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {  # name -> (module factory, exporter)
    "DeepLabV3 (ResNet bottleneck + ASPP)": (A.DeepLabV3, "legacy"),
    "FCN (ResNet + FCNHead)": (A.FCN, "legacy"),
    "LR-ASPP (MobileNetV3)": (A.LRASPP, "legacy"),
    "U-Net (ConvTranspose, concat skips)": (A.UNet, "legacy"),
    "DDRNet-style dual resolution": (A.DDRNet, "legacy"),
    "NHWC FCN (Transposes around the body)": (lambda: A.NHWC(A.FCN()), "legacy"),
    "U-Net, sigmoid multi-label head": (lambda: A.SigmoidHead(A.UNet()), "legacy"),
    # the legacy exporter writes torch.chunk as Slices with bounds computed at run time, which keeps the split
    # group whole (and defeats shape inference); the dynamo exporter writes a Split with constant sizes
    "Channel split + slice + PReLU (dynamo)": (A.SplitNet, "dynamo"),
}


def export(module: torch.nn.Module, folder: Path, name: str, size: int, exporter: str = "legacy") -> onnx.ModelProto:
    path = folder / f"{name}.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # static batch: fewer size computations at run time, so every conv shape is known to compiler.cost
        A.export(A.randomise_batchnorm(module), path, size=size, opset=17, exporter=exporter, dynamic_batch=False)
    return onnx.shape_inference.infer_shapes(onnx.load(str(path)))


def half_keep_sets(analysis: ChannelAnalysis, model: onnx.ModelProto, seed: int = 0) -> dict[int, np.ndarray]:
    """50% of every prunable group, at random: the first seed from `seed` whose keep-sets leave every Split/Slice
    output non-empty."""
    for attempt in range(seed, seed + 20):
        rng = np.random.default_rng(attempt)
        keep = {g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
                for g in analysis.groups if g.prunable}
        try:
            prune(model, analysis, keep)
            return keep
        except ValueError:
            continue
    raise RuntimeError("no 50% keep-set leaves every split part non-empty")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, model: onnx.ModelProto, input_shape: tuple[int, ...], repeats: int) -> dict:
    analysis = analyse(model)
    keep = half_keep_sets(analysis, model)
    analysis_s = median_seconds(lambda: analyse(model), repeats)
    prune_s = median_seconds(lambda: prune(model, analysis, keep), repeats)
    pruned = prune(model, analysis, keep)
    onnx.checker.check_model(pruned, full_check=True)
    before, after = model_cost(model, input_shape), model_cost(pruned, input_shape)
    row = {"architecture": name, "input_shape": list(input_shape), "groups": len(analysis.groups),
           "prunable_groups": sum(g.prunable for g in analysis.groups), "macs_before": before.macs,
           "macs_after": after.macs, "params_before": before.params, "params_after": after.params,
           "analysis_seconds": analysis_s, "prune_seconds": prune_s, "repeats": repeats}
    print(f"{name:40s} MACs {after.macs / before.macs:.3f}x params {after.params / before.params:.3f}x "
          f"analysis {1000 * analysis_s:.1f} ms prune {1000 * prune_s:.1f} ms", flush=True)
    return row


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def markdown(rows: list[dict]) -> str:
    lines = ["# Channel surgery: cost and speed", "",
             "Seeded 50% random keep-set over every prunable group (class group included); legacy exporter at opset 17 "
             "unless noted, static batch, random weights. Times are medians on an already loaded, shape-inferred "
             "model (CPU).", "",
             "| architecture | input | groups (prunable) | MACs before | MACs after | params before | params after | "
             "analysis | prune |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {'x'.join(map(str, r['input_shape']))} | {r['groups']} "
                     f"({r['prunable_groups']}) | {_si(r['macs_before'])} | {_si(r['macs_after'])} "
                     f"({r['macs_after'] / r['macs_before']:.2f}x) | {_si(r['params_before'])} | "
                     f"{_si(r['params_after'])} ({r['params_after'] / r['params_before']:.2f}x) | "
                     f"{1000 * r['analysis_seconds']:,.1f} ms | {1000 * r['prune_seconds']:,.1f} ms |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=5, help="timing runs per fixture (3 for the large graph)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, (name, (factory, exporter)) in enumerate(FIXTURES.items()):
            module = factory()
            shape = (1, 32, 32, 3) if getattr(module, "layout", "nchw") == "nhwc" else (1, 3, 32, 32)
            rows.append(measure(name, export(module, folder, f"fixture{i}", 32, exporter), shape, args.repeats))
        opset9 = onnx.shape_inference.infer_shapes(A.opset9_model())
        rows.append(measure("Opset-9 net (Split/Slice attributes, Upsample)", opset9, (1, 3, 16, 16), args.repeats))
        large = export(A.deeplabv3_resnet50_sized(), folder, "deeplabv3_resnet50", 512)
        rows.append(measure("DeepLabV3-ResNet50-sized (21 classes)", large, (1, 3, 512, 512), min(3, args.repeats)))
    surgery = rows[-1]["analysis_seconds"] + rows[-1]["prune_seconds"]
    report = {"surgery_budget_seconds": SURGERY_BUDGET_SECONDS, "large_surgery_seconds": surgery,
              "torch": torch.__version__, "onnx": onnx.__version__, "rows": rows}
    text = markdown(rows) + (f"\nDeepLabV3-ResNet50-sized analysis + surgery: {surgery:.2f} s "
                             f"(budget {SURGERY_BUDGET_SECONDS:.0f} s).\n")
    write_atomic(args.out / "surgery.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(args.out / "surgery.md", text.encode())
    print(text)
    if surgery > SURGERY_BUDGET_SECONDS:
        raise SystemExit(f"surgery on the large graph took {surgery:.2f} s, over the {SURGERY_BUDGET_SECONDS:.0f} s "
                         f"budget")


if __name__ == "__main__":
    main()
