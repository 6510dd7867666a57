"""Fidelity vs cost of category specialisation on the shipped example, over selection settings and category pairs.

    python benchmarks/tradeoff.py                       # writes benchmarks/results/tradeoff.{json,md}

One attribution run (all categories) serves every row: that reuse is the point of attributing once. For each category
set and setting: MACs and parameters of the pruned model relative to the full one, pixel agreement with the full
model restricted to the kept classes, and restricted mIoU of both against the ground truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from disasm.attribution.select import SelectionSettings
from example import DATA, MODEL, ROOT, load_example, write_results  # benchmarks/example.py, beside this script
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--pairs", default="circle,star;ring,cross;square,triangle")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    ex = load_example(args.model, args.data)
    rows = []
    for pair in args.pairs.split(";"):
        for label, selection, compensation in SETTINGS:
            row = ex.measure(pair.split(","), selection, compensation)
            rows.append({"categories": pair, "setting": label, "compensation": compensation,
                         "selection": selection.to_dict(), **row})
            print(f"{pair:18s} {label:28s} MACs {row['macs_ratio']:.3f}x  agreement {row['agreement']:.4f}  "
                  f"mIoU {row['miou_full']:.4f} -> {row['miou_pruned']:.4f}", flush=True)

    report = {"model": str(args.model), "sha256": ex.model.sha256, "calibration_images": len(ex.calibration),
              "evaluation_images": len(ex.eval_inputs), "attribution_seconds": ex.attribution_seconds, "rows": rows}
    lines = ["# Fidelity vs cost on the shipped example", "",
             f"{len(ex.calibration)} calibration images, {len(ex.eval_inputs)} evaluation images with masks; one "
             f"attribution run ({ex.attribution_seconds:.1f} s on CPU) for all rows. Agreement: pixels where the pruned model's argmax "
             f"equals the full model's argmax over the kept classes. mIoU over the kept classes + background.", "",
             "| categories | setting | MACs | params | agreement | mIoU full | mIoU pruned |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['categories']} | {r['setting']} | {r['macs_ratio']:.3f}x | {r['params_ratio']:.3f}x | "
              f"{100 * r['agreement']:.2f}% | {100 * r['miou_full']:.2f}% | {100 * r['miou_pruned']:.2f}% |" for r in rows]
    write_results(args.out, "tradeoff", report, lines)


if __name__ == "__main__":
    main()
