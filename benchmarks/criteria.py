"""Disassembler vs baseline channel criteria at an equal channel budget, on the shipped example.

    python benchmarks/criteria.py                       # writes benchmarks/results/criteria.{json,md}

For each category pair the Disassembler chooses how many channels every group keeps (default settings); each baseline
(Taylor, L1 filter norm, activation magnitude, random) keeps the same number per group, chosen by its own score, so
MACs are identical and only the choice differs. Measured with and without least-squares compensation: pixel agreement
with the full model restricted to the kept classes, and restricted mIoU against the ground truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnxruntime as ort

from disasm.attribution.baselines import CRITERIA
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


def session(proto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "shapes_seg.onnx")
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data")
    parser.add_argument("--pairs", default="circle,star;ring,cross;square,triangle")
    parser.add_argument("--alpha", type=float, default=SelectionSettings.alpha)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    model = load_model(args.model)
    analysis = analyse(model.proto)
    size = model.image_size
    calib = preprocess(load_images(scan_images(args.data / "calib").paths, size), model.preprocessing)
    evaluation = scan_images(args.data / "eval" / "images")
    eval_inputs = preprocess(load_images(evaluation.paths, size), model.preprocessing)
    masks = load_masks(args.data / "eval" / "masks", evaluation, size)
    attribution = calibrate(model, analysis, calib, AttributionSettings(), "cpu", moments=True)
    full = session(model.proto)
    full_macs = model_cost(model.proto, (1, 3, *size)).macs
    background = model.class_index(model.background)
    selection = SelectionSettings(alpha=args.alpha)

    rows = []
    for pair in args.pairs.split(";"):
        for compensation in ("lsq", "none"):
            for criterion in CRITERIA:
                result = specialise(model, analysis, attribution, pair.split(","), selection, compensation, {}, criterion)
                pruned = session(result.pruned)
                fidelity = evaluate_fidelity(lambda x: full.run(None, {model.input_name: x})[0],
                                             lambda x: pruned.run(None, {model.input_name: x})[0],
                                             eval_inputs, masks, model.classes, result.class_keep, background)
                rows.append({"categories": pair, "compensation": compensation, "criterion": criterion,
                             "macs_ratio": model_cost(result.pruned, (1, 3, *size)).macs / full_macs,
                             "agreement": fidelity["agreement"], "miou_full": fidelity["miou_full"],
                             "miou_pruned": fidelity["miou_pruned"]})
                print(f"{pair:16s} {compensation:5s} {criterion:13s} MACs {rows[-1]['macs_ratio']:.3f}x  "
                      f"agreement {fidelity['agreement']:.4f}  mIoU {fidelity['miou_pruned']:.4f}", flush=True)

    report = {"model": str(args.model), "sha256": model.sha256, "alpha": args.alpha, "rows": rows}
    lines = ["# Disassembler vs baselines at equal MACs (shipped example)", "",
             f"Per-group channel budget from the Disassembler at alpha={args.alpha}; every criterion keeps that many "
             "channels per group. Agreement with the full model restricted to the kept classes; restricted mIoU "
             "against ground truth (the full model's is in the last column).", "",
             "| categories | compensation | criterion | MACs | agreement | mIoU pruned | mIoU full |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['categories']} | {r['compensation']} | {r['criterion']} | {r['macs_ratio']:.3f}x | "
              f"{100 * r['agreement']:.2f}% | {100 * r['miou_pruned']:.2f}% | {100 * r['miou_full']:.2f}% |" for r in rows]
    write_atomic(args.out / "criteria.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(args.out / "criteria.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
