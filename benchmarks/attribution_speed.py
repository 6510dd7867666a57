"""Attribution throughput and its overhead against plain passes of the same model on the same device.

    python benchmarks/attribution_speed.py [--device cuda]   # writes benchmarks/results/attribution_speed.{json,md}

Three timings per batch, interleaved in rounds (the machines are shared and noisy; ratios of medians):
- attribution: the Disassembler pass (a forward without gradients for the masks, then forward + backward over one
  row per (image, category present), masked reductions at every observed tensor), on the graph calibration runs:
  a final Softmax/Sigmoid is replaced by an Identity so that gradients come from the logits (attribution_graph);
- same passes: the same forward and backward passes with nothing captured or reduced (as many rows as the
  attribution counts, from its own masks), so the ratio attribution / same passes is the Disassembler's own overhead
  (target: under 1.3x);
- forward+backward: one forward and one backward of the summed logits of the batch, the cost of a training step
  without the optimiser. The method needs one gradient per (image, category present), so against this it costs
  about (rows per image) x more: a lower bound of the method, not of the implementation.
With --moments the attribution also gathers the least-squares compensation moments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from disasm.attribution.calibration import attribution_graph, observed_tensors
from disasm.attribution.disassembler import AttributionSettings, attribute_batch
from disasm.attribution.interpreter import TorchGraph
from disasm.attribution.moments import find_consumers
from disasm.compiler.channels import analyse
from disasm.compiler.files import write_atomic
from disasm.compiler.images import load_images, preprocess, scan_images
from disasm.compiler.load import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "shapes_seg.onnx")
    parser.add_argument("--images", type=Path, default=ROOT / "examples" / "data" / "calib")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--moments", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    model = load_model(args.model)
    analysis = analyse(model.proto)
    proto, output_kind = attribution_graph(model)  # logits behind a final Softmax/Sigmoid, as calibrate runs it
    graph = TorchGraph(proto, device=args.device)
    tensors = observed_tensors(analysis)
    consumers = find_consumers(model.proto, analysis) if args.moments else []
    settings = AttributionSettings(batch_size=args.batch_size)
    x = preprocess(load_images(scan_images(args.images).paths[:args.batch_size], model.image_size), model.preprocessing)
    x = torch.from_numpy(x).to(args.device)
    name, out_name = graph.input_names[0], graph.output_names[0]

    def disassembler():
        return attribute_batch(graph, x, tensors, len(model.classes), output_kind, settings, consumers,
                               model.class_axis)

    # The (image, category present) rows decide how much backward work each variant does: counted by the attribution
    # itself (its masks under the model's own output kind: softmax, or sigmoid per class), not estimated here. Every
    # image has the same size, so that many rows cycling through the batch cost what the attribution's rows cost.
    rows = torch.arange(int(disassembler().images_per_class.sum()), device=args.device) % len(x)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def same_passes() -> None:
        with torch.no_grad():
            graph.run({name: x})
        for chunk in rows.split(args.batch_size):
            xg = x[chunk].requires_grad_(True)
            torch.autograd.grad(graph.run({name: xg})[out_name].sum(), [xg])

    def forward_backward() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(graph.run({name: xg})[out_name].sum(), [xg])

    variants = {"attribution": disassembler, "same passes": same_passes, "forward+backward": forward_backward}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for r in range(args.rounds):
        order = list(variants)[r % 3:] + list(variants)[:r % 3]
        for key in order:
            sync()
            start = time.perf_counter()
            variants[key]()
            sync()
            times[key].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": str(args.model), "device": args.device, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "rows_per_image": len(rows) / len(x), "moments": args.moments,
              "rounds": args.rounds, "median_seconds": median,
              "images_per_second": args.batch_size / median["attribution"],
              "overhead_vs_same_passes": median["attribution"] / median["same passes"],
              "ratio_vs_forward_backward": median["attribution"] / median["forward+backward"]}
    print(json.dumps(result, indent=2))
    suffix = "_moments" if args.moments else ""
    lines = [f"# Attribution speed ({args.device}, batch {args.batch_size}, {len(rows) / len(x):.2f} (image, category) "
             "rows per image)", "",
             "| variant | median s / batch | images / s |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.3f} | {args.batch_size / v:.1f} |" for k, v in median.items()]
    lines += ["", f"Overhead of the Disassembler over the same passes: {result['overhead_vs_same_passes']:.2f}x; "
                  f"against one forward+backward: {result['ratio_vs_forward_backward']:.2f}x (one gradient per "
                  f"(image, category present) is the method: {len(rows) / len(x):.2f} per image here)."]
    write_atomic(args.out / f"attribution_speed_{args.device.split(':')[0]}{suffix}.json",
                 (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(args.out / f"attribution_speed_{args.device.split(':')[0]}{suffix}.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
