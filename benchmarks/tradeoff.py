"""Fidelity vs cost of category specialisation on the shipped example, over selection settings and category pairs.

    python benchmarks/tradeoff.py                       # writes benchmarks/results/tradeoff.{json,md}

One attribution run (all categories) serves every row: that reuse is the point of attributing once. For each category
set and setting: MACs and parameters of the pruned model relative to the full one, pixel agreement with the full
model restricted to the kept classes, and restricted mIoU of both against the ground truth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxruntime as ort

from disasm.attribution.disassembler import AttributionSettings
from disasm.attribution.select import SelectionSettings
from disasm.compiler.channels import analyse
from disasm.attribution.calibration import calibrate
from disasm.compiler.cli import specialise
from disasm.compiler.cost import model_cost
from disasm.compiler.images import load_images, load_masks, preprocess, scan_images
from disasm.compiler.load import load_model
from disasm.runtime.fidelity import evaluate_fidelity
from disasm.runtime.report import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [  # (label, selection settings, compensation)
    ("prod a=0.05", SelectionSettings(rule="prod", alpha=0.05), "lsq"),
    ("prod a=0.1 (default)", SelectionSettings(), "lsq"),
    ("prod a=0.1, mean comp.", SelectionSettings(), "mean"),
    ("prod a=0.1, no comp.", SelectionSettings(), "none"),
    ("prod a=0.2", SelectionSettings(rule="prod", alpha=0.2), "lsq"),
    ("and a=0.2 b=0.05", SelectionSettings(rule="and", alpha=0.2, beta=0.05), "lsq"),
    ("and a=0.2 b=0.05, mean comp.", SelectionSettings(rule="and", alpha=0.2, beta=0.05), "mean"),
    ("and a=0.3 b=0.2", SelectionSettings(rule="and", alpha=0.3, beta=0.2), "lsq"),
]


def session(proto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "shapes_seg.onnx")
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--pairs", default="circle,star;ring,cross;square,triangle")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    model = load_model(args.model)
    analysis = analyse(model.proto)
    size = model.image_size
    calib = preprocess(load_images(scan_images(args.data / "calib").paths, size), model.preprocessing)
    evaluation = scan_images(args.data / "eval" / "images")
    eval_inputs = preprocess(load_images(evaluation.paths, size), model.preprocessing)
    masks = load_masks(args.data / "eval" / "masks", evaluation, size)
    start = time.perf_counter()
    attribution = calibrate(model, analysis, calib, AttributionSettings(), "cpu", moments=True)
    attribution_seconds = time.perf_counter() - start
    full = session(model.proto)
    input_shape = (1, 3, *size)
    full_cost = model_cost(model.proto, input_shape)
    background = model.class_index(model.background)

    rows = []
    for pair in args.pairs.split(";"):
        categories = pair.split(",")
        for label, selection, compensation in SETTINGS:
            result = specialise(model, analysis, attribution, categories, selection, compensation, {})
            pruned = session(result.pruned)
            fidelity = evaluate_fidelity(lambda x: full.run(None, {model.input_name: x})[0],
                                         lambda x: pruned.run(None, {model.input_name: x})[0],
                                         eval_inputs, masks, model.classes, result.class_keep, background)
            cost = model_cost(result.pruned, input_shape)
            rows.append({"categories": pair, "setting": label, "compensation": compensation,
                         "selection": selection.to_dict(), "macs_ratio": cost.macs / full_cost.macs,
                         "params_ratio": cost.params / full_cost.params, "agreement": fidelity["agreement"],
                         "miou_full": fidelity["miou_full"], "miou_pruned": fidelity["miou_pruned"]})
            print(f"{pair:18s} {label:28s} MACs {rows[-1]['macs_ratio']:.3f}x  agreement {fidelity['agreement']:.4f}  "
                  f"mIoU {fidelity['miou_full']:.4f} -> {fidelity['miou_pruned']:.4f}", flush=True)

    report = {"model": str(args.model), "sha256": model.sha256, "calibration_images": len(calib),
              "evaluation_images": len(eval_inputs), "attribution_seconds": attribution_seconds, "rows": rows}
    lines = ["# Fidelity vs cost on the shipped example", "",
             f"{len(calib)} calibration images, {len(eval_inputs)} evaluation images with masks; one attribution run "
             f"({attribution_seconds:.1f} s on CPU) for all rows. Agreement: pixels where the pruned model's argmax "
             f"equals the full model's argmax over the kept classes. mIoU over the kept classes + background.", "",
             "| categories | setting | MACs | params | agreement | mIoU full | mIoU pruned |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['categories']} | {r['setting']} | {r['macs_ratio']:.3f}x | {r['params_ratio']:.3f}x | "
              f"{100 * r['agreement']:.2f}% | {100 * r['miou_full']:.2f}% | {100 * r['miou_pruned']:.2f}% |" for r in rows]
    write_atomic(args.out / "tradeoff.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(args.out / "tradeoff.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
