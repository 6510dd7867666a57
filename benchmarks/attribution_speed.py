"""Attribution cost per image against one ONNX Runtime forward of the same model, and against an earlier version.

    python benchmarks/attribution_speed.py                     # the shipped example and every corpus model
    python benchmarks/attribution_speed.py --models example --moments --baseline HEAD~3 --threads 1

Writes benchmarks/results/attribution_speed_<device>[_moments].{json,md}. Per model, on a batch of its calibration
images (the graph calibration runs: logits behind a final Softmax/Sigmoid), timed interleaved in rounds in one process
(runtime.latency.measure_latency; the machines are shared and noisy, so ratios of medians, with the p10-p90 of the
per-round ratios):
- attribution: attribute_batch at defaults (with --moments also the least-squares compensation moments);
- baseline (with --baseline REV): the same call with attribution/disassembler.py, moments.py and interpreter.py as
  they were at git revision REV, loaded beside the current ones; its sums are checked against the current ones first;
- passes floor: the passes the method cannot avoid: one forward with gradients and, per image, one backward per
  (image, category present) row (as many backward passes of the summed logits through the batch's graph as the
  attribution has rows per image), nothing captured or reduced;
- torch forward: one forward without gradients through the same interpreter;
- ONNX Runtime forward: the model as loaded (its subnormal weights 0, as attribution sees it), one image at a time
  (what deployment runs), same thread count.
Attribution / ONNX Runtime forward is the figure the issue tracks (target: at most 10x at defaults).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

from disasm.attribution import disassembler
from disasm.attribution.calibration import attribution_graph, observed_tensors
from disasm.attribution.interpreter import TorchGraph
from disasm.attribution.moments import find_consumers
from disasm.compiler.channels import analyse
from disasm.compiler.files import write_atomic
from disasm.compiler.images import load_images, parse_size, preprocess, scan_images
from disasm.compiler.load import load_model
from disasm.runtime.latency import measure_latency, paired_speedup
from disasm.runtime.onnxrt import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
sys.path.insert(0, str(ROOT / "benchmarks"))


def baseline_module(revision: str) -> types.ModuleType:
    """attribution/disassembler.py (with its moments.py and interpreter.py) as at git `revision`, as modules beside
    the current ones; the returned disassembler module has the old TorchGraph as `TorchGraph`."""
    modules = {}
    for name in ("moments", "interpreter", "disassembler"):
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:attribution/{name}.py"],
                                capture_output=True, text=True, check=True).stdout
        for imported in ("moments", "interpreter"):
            source = source.replace(f"from disasm.attribution.{imported} import",
                                    f"from disasm_baseline_{imported} import")
        module = types.ModuleType(f"disasm_baseline_{name}")
        module.__file__ = f"{revision}:attribution/{name}.py"
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        modules[name] = module
    return modules["disassembler"]


def load(name: str, images: int):
    """(model, preprocessed calibration images) of the shipped example or a corpus model."""
    if name == "example":
        model = load_model(ROOT / "examples" / "shapes_seg.onnx")
        paths, size = scan_images(ROOT / "examples" / "data" / "calib").paths[:images], model.image_size
    else:
        from corpus_models import corpus_entries, load_corpus_model, split_images
        entry = next(e for e in corpus_entries(CORPUS) if e["name"] == name)
        model = load_corpus_model(CORPUS, entry)
        flags = entry["flags"]
        size = model.image_size or parse_size(flags[flags.index("--input-size") + 1])
        paths = split_images(CORPUS / entry["images"])[0][:images]
    return model, preprocess(load_images(paths, size), model.preprocessing)


def _max_relative_difference(a, b) -> float:
    worst = 0.0
    for what in ("forward_sum", "backward_sum", "taylor_sum", "mean_sum"):
        for t in a.tensors:
            u, v = getattr(a, what)[t], getattr(b, what)[t]
            worst = max(worst, float(np.abs(u - v).max() / max(np.abs(u).max(), 1e-30)))
    for node in a.moments:
        worst = max(worst, float(np.abs(a.moments[node] - b.moments[node]).max() / np.abs(a.moments[node]).max()))
    return worst


def measure(name: str, args, baseline: types.ModuleType | None) -> dict:
    model, images = load(name, args.images)
    batch = 1 if model.input_shape[0] == 1 else min(args.batch_size, len(images))
    analysis = analyse(model.proto)
    proto, output_kind = attribution_graph(model)
    graph = TorchGraph(proto, device=args.device)
    tensors = observed_tensors(analysis)
    consumers = find_consumers(model.proto, analysis) if args.moments else []
    x = torch.from_numpy(images[:batch]).to(args.device)
    input_name, output_name = graph.input_names[0], graph.output_names[0]

    baseline_graph = None if baseline is None else baseline.TorchGraph(proto, device=args.device)

    def attribution(module=disassembler):
        settings = module.AttributionSettings(batch_size=batch)
        return module.attribute_batch(graph if module is disassembler else baseline_graph, x, tensors,
                                      len(model.classes), output_kind, settings, consumers, model.class_axis)

    reference = attribution()
    rows = int(reference.images_per_class.sum())
    backward_rounds = max(1, -(-rows // len(x)))

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def passes_floor() -> None:
        values = graph.run({input_name: x}, capture=tensors[:1])
        for j in range(backward_rounds if tensors else 0):
            torch.autograd.grad(values[output_name].sum(), [values[tensors[0]]], retain_graph=j + 1 < backward_rounds)
        sync()

    def torch_forward() -> None:
        with torch.no_grad():
            graph.run({input_name: x})
        sync()

    # the model as loaded: its subnormal weights are already 0 (compiler.load.flush_subnormals)
    runner = OnnxRuntimeRunner(model.proto, threads=torch.get_num_threads(), spinning=False)
    one = images[:1]

    def ort_forward(session=runner) -> None:
        for _ in range(len(x)):  # as many single-image runs as the batch has images
            session.infer(one)

    candidates = {"attribution": lambda: (attribution(), sync())}
    result = {"model": name, "batch": len(x), "rows_per_image": rows / len(x), "tensors": len(tensors),
              "consumers_with_moments": len(consumers), "fallback_categories": int(reference.fallback.sum())}
    if baseline is not None:
        before = attribution(baseline)
        result["max_relative_difference_vs_baseline"] = _max_relative_difference(before, reference)
        result["counts_equal_baseline"] = bool(np.array_equal(before.images_per_class, reference.images_per_class)
                                               and np.array_equal(before.mask_pixels, reference.mask_pixels))
        candidates["baseline"] = lambda: (attribution(baseline), sync())
    candidates |= {"passes floor": passes_floor, "torch forward": torch_forward, "onnxruntime forward": ort_forward}
    result["subnormal_weights"] = model.subnormals
    stats = measure_latency(candidates, runs=args.rounds, warmup=1)
    per_image = {k: s.median_ms / 1000 / len(x) for k, s in stats.items()}
    result["seconds_per_image"] = per_image
    result["seconds_per_image_p10_p90"] = {k: [s.p10_ms / 1000 / len(x), s.p90_ms / 1000 / len(x)]
                                           for k, s in stats.items()}

    def ratio(base: str, new: str) -> dict:
        pair = paired_speedup(stats[base], stats[new])
        return {"median": pair.of_medians, "p10": pair.p10, "p90": pair.p90}

    result["attribution_over_onnxruntime_forward"] = ratio("attribution", "onnxruntime forward")
    result["attribution_over_torch_forward"] = ratio("attribution", "torch forward")
    result["attribution_over_passes_floor"] = ratio("attribution", "passes floor")
    if baseline is not None:
        result["speedup_vs_baseline"] = ratio("baseline", "attribution")
    return result


def markdown(rows: list[dict], args, threads: int) -> str:
    baseline = args.baseline is not None
    lines = [f"# Attribution speed ({args.device}, {threads} thread(s){', with moments' if args.moments else ''})", "",
             "Seconds per image (medians over interleaved rounds) and ratios with the p10-p90 of the per-round "
             "ratios. ONNX Runtime forward: the model as loaded (subnormal weights 0), one image per run, same "
             "thread count. Passes floor: "
             "one forward with gradients and one backward per (image, category) row, nothing captured. Generated by "
             "`benchmarks/attribution_speed.py`." + (f" Baseline: attribution as at git revision `{args.baseline}`."
                                                     if baseline else ""), "",
             "| model | batch | rows / image | attribution s/img | ONNX Runtime fwd s/img | attribution / ORT fwd | "
             "attribution / torch fwd | attribution / passes floor |"
             + (" baseline s/img | speed-up vs baseline | max rel. difference |" if baseline else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if baseline else "")]
    for r in rows:
        s = r["seconds_per_image"]

        def fmt(key: str) -> str:
            v = r[key]
            return f"{v['median']:.1f}x ({v['p10']:.1f}-{v['p90']:.1f})"

        line = (f"| {r['model']} | {r['batch']} | {r['rows_per_image']:.2f} | {s['attribution']:.3f} | "
                f"{s['onnxruntime forward']:.3f} | {fmt('attribution_over_onnxruntime_forward')} | "
                f"{fmt('attribution_over_torch_forward')} | {fmt('attribution_over_passes_floor')} |")
        if baseline:
            v = r["speedup_vs_baseline"]
            line += (f" {s['baseline']:.3f} | {v['median']:.2f}x ({v['p10']:.2f}-{v['p90']:.2f}) | "
                     f"{r['max_relative_difference_vs_baseline']:.1e} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="'example' and/or corpus model names, comma-separated (default: all)")
    parser.add_argument("--images", type=int, default=8, help="calibration images loaded per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--moments", action="store_true")
    parser.add_argument("--baseline", help="git revision whose attribution to time beside the current one")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = baseline_module(args.baseline) if args.baseline else None
    rows = []
    from corpus_models import corpus_entries
    names = args.models.split(",") if args.models else ["example", *(e["name"] for e in corpus_entries(CORPUS))]
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(measure(name, args, baseline))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    result = {"device": args.device, "threads": threads, "moments": args.moments, "rounds": args.rounds,
              "baseline": args.baseline, "rows": rows}
    suffix = f"{args.device.split(':')[0]}{'_moments' if args.moments else ''}"
    write_atomic(args.out / f"attribution_speed_{suffix}.json", (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(args.out / f"attribution_speed_{suffix}.md", markdown(rows, args, threads).encode())
    print(markdown(rows, args, threads))


if __name__ == "__main__":
    main()
