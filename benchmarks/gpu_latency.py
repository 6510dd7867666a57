"""Torch latency of full vs pruned (FP16, CUDA graphs on a GPU) for the corpus models at their default cut and the
shipped example.

    python benchmarks/gpu_latency.py                                  # CUDA; the corpus at ../shared/corpus if there
    python benchmarks/gpu_latency.py --corpus DIR --out DIR --budget-s 240
    python benchmarks/gpu_latency.py --device cpu --only example --alpha-from benchmarks/results/corpus.json

Writes OUT/gpu_latency_<device type>.{json,md} (again after every model, so a run cut short keeps what it measured).
For the shipped example (circle,star) and then every model of CORPUS/corpus.json (its first listed categories;
calibration every fourth image of its folder, the rest judged, as benchmarks/corpus.py):
1. disasm-compile at defaults (compiler.pipeline.compile_model: the budget search for category fidelity 0.9),
   engines off, attribution on --device. `--alpha-from corpus.json` fixes each model's alpha to the one recorded
   there instead of searching (faster; the cut then matches the recorded one up to attribution's float rounding).
2. The full model as loaded (constants folded, one head: the pipeline's like-for-like baseline) and pruned.onnx, each
   on a runtime.torchrun.TorchRunner (FP16, CUDA graphs and cuDNN's autotuner by default on CUDA; float32, eager on a
   CPU), fed the first judged image; timed interleaved (runtime.latency.measure_latency: device work only, no host
   copies), p10 / median / p90 of each and the per-round speed-up's spread, against the theoretical speed-up
   1 / MACs ratio.
3. A check of what was timed: pixel agreement of the torch runner's argmax with ONNX Runtime's (float32, CPU) on the
   same image, full and pruned.
Without the corpus folder only the shipped example runs (said in the output). A model whose compile or timing fails
is a row with its error; `--budget-s` skips the models not started within that many seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disasm.compiler.files import write_atomic
from disasm.compiler.images import load_images, preprocess, scan_images
from disasm.compiler.load import Model, load_model
from disasm.compiler.pipeline import Request, Stages, compile_model
from disasm.runtime.latency import LatencyStats, measure_latency, paired_speedup
from disasm.runtime.onnxrt import OnnxRuntimeRunner
from disasm.runtime.torchrun import TorchRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus import corpus_request, example_request  # noqa: E402
from corpus_models import CORPUS, corpus_entries, load_corpus_model, split_images  # noqa: E402

EXAMPLE = "example"
EXAMPLE_ROW = "shapes_seg (shipped example)"  # its name in benchmarks/results/corpus.json


def jobs(corpus: Path, only: set[str] | None) -> list[tuple[str, Any]]:
    """(name, entry or None for the example): the example first (it is always there, and quick), then the corpus in
    its order; only those named in `only`."""
    listed = [(EXAMPLE, None)]
    listed += [(e["name"], e) for e in corpus_entries(corpus)] if (corpus / "corpus.json").is_file() else []
    return [(name, entry) for name, entry in listed if only is None or name in only]


def recorded_alphas(path: Path | None) -> dict[str, float]:
    """Model name -> the alpha disasm-compile's search chose in a benchmarks/corpus.py result (corpus.json)."""
    if path is None:
        return {}
    alphas = {}
    for row in json.loads(path.read_text())["rows"]:
        trials, chosen = row.get("trials") or [], row.get("chosen_trial")
        setting = trials[chosen]["setting"] if chosen is not None and chosen < len(trials) else ""
        if setting.startswith("alpha "):
            alphas[EXAMPLE if row["model"] == EXAMPLE_ROW else row["model"]] = float(setting.split()[1])
    return alphas


def request_for(name: str, entry: dict | None, corpus: Path, work: Path, args: argparse.Namespace,
                alphas: dict[str, float]) -> Request:
    request = example_request(work) if entry is None else corpus_request(entry, work, corpus)
    request = replace(request, device=args.device, engines=False, runs=args.compile_runs,
                      cache=args.cache, no_cache=args.cache is None, force=True)
    if name in alphas:
        request = replace(request, selection=replace(request.selection, alpha=alphas[name]), budget_fixed=True)
    return request


def loaded_model(entry: dict | None, corpus: Path) -> Model:
    """The full model as disasm-compile loads it: the like-for-like baseline."""
    return load_model(ROOT / "examples" / "shapes_seg.onnx") if entry is None else load_corpus_model(corpus, entry)


def judged_image(entry: dict | None, corpus: Path, model: Model, input_shape: list[int]) -> np.ndarray:
    """The first judged image, preprocessed to the model's input of `input_shape` ([1, ...], as compiled)."""
    if entry is None:
        path = scan_images(ROOT / "examples" / "data" / "eval" / "images").paths[0]
    else:
        path = split_images(corpus / entry["images"])[1][0]
    size = tuple(input_shape[2:4]) if model.preprocessing.layout == "nchw" else tuple(input_shape[1:3])
    return preprocess(load_images([path], size), model.preprocessing)


def agreement(actual: np.ndarray, expected: np.ndarray, class_axis: int) -> float:
    """Share of pixels whose argmax over the classes is the same."""
    return float((actual.argmax(class_axis) == expected.argmax(class_axis)).mean())


def _ms(stats: LatencyStats) -> dict[str, float]:
    return {"median": stats.median_ms, "p10": stats.p10_ms, "p90": stats.p90_ms, "min": stats.min_ms,
            "first": stats.first_ms}


def time_models(full_model: Model, pruned_path: Path, image: np.ndarray, class_axis: int,
                args: argparse.Namespace) -> dict[str, Any]:
    """Full and pruned on torch runners, interleaved; their argmax against ONNX Runtime's."""
    settings = {"device": args.device, "fp16": args.precision == "fp16", "cuda_graphs": args.cuda_graphs}
    with TorchRunner(full_model.proto, **settings) as full, TorchRunner(pruned_path, **settings) as pruned:
        calls = {"full": full.device_call(image), "pruned": pruned.device_call(image)}  # captures the graphs here
        stats = measure_latency(calls, runs=args.runs, warmup=args.warmup)
        outputs = {"full": full.infer(image)[0], "pruned": pruned.infer(image)[0]}
        conditions = {"full": full.conditions, "pruned": pruned.conditions}
        failures = {k: r.capture_failure for k, r in (("full", full), ("pruned", pruned)) if r.capture_failure}
    with OnnxRuntimeRunner(full_model.proto.SerializeToString() if not full_model.external_data
                           else full_model.path) as ort_full, OnnxRuntimeRunner(pruned_path) as ort_pruned:
        reference = {"full": ort_full.infer(image)[0], "pruned": ort_pruned.infer(image)[0]}
    pair = paired_speedup(stats["full"], stats["pruned"])
    return {"full_ms": _ms(stats["full"]), "pruned_ms": _ms(stats["pruned"]),
            "speedup": pair.of_medians, "speedup_p10": pair.p10, "speedup_p90": pair.p90, "rounds": pair.rounds,
            "argmax_agreement_with_onnxruntime": {k: agreement(outputs[k], reference[k], class_axis)
                                                  for k in outputs},
            "conditions": conditions["full"], "conditions_equal": conditions["full"] == conditions["pruned"],
            "capture_failures": failures}


def measure(name: str, entry: dict | None, corpus: Path, work: Path, args: argparse.Namespace,
            alphas: dict[str, float]) -> dict[str, Any]:
    start = time.perf_counter()
    request = request_for(name, entry, corpus, work, args, alphas)
    print(f"[{name}] compiling at defaults ({'alpha ' + str(alphas[name]) if name in alphas else 'budget search'}, "
          f"attribution on {args.device})", flush=True)
    report = compile_model(request, Stages(quiet=not args.verbose)).to_dict()
    compiled = time.perf_counter() - start
    macs = report["cost"]["macs_ratio"]
    print(f"[{name}] compiled in {compiled:.0f} s: {macs:.3f}x MACs, category fidelity "
          f"{report['fidelity'].get('category_fidelity')}; timing {args.runs} interleaved rounds", flush=True)
    model = loaded_model(entry, corpus)
    image = judged_image(entry, corpus, model, report["model"]["input_shape"])
    timing = time_models(model, Path(report["out_dir"]) / "pruned.onnx", image, report["model"]["class_axis"], args)
    theoretical = 1.0 / macs if macs > 0 else float("nan")
    print(f"[{name}] full {timing['full_ms']['median']:.3f} ms, pruned {timing['pruned_ms']['median']:.3f} ms: "
          f"{timing['speedup']:.2f}x (p10-p90 {timing['speedup_p10']:.2f}-{timing['speedup_p90']:.2f}), "
          f"theoretical {theoretical:.2f}x", flush=True)
    return {"model": name if entry is not None else EXAMPLE_ROW, "categories": report["categories"],
            "input_shape": report["model"]["input_shape"], "macs_ratio": macs, "theoretical_speedup": theoretical,
            "realised_over_theoretical": timing["speedup"] / theoretical,
            "category_fidelity": report["fidelity"].get("category_fidelity"), "contract_met": report["contract"]["met"],
            "budget": f"alpha {alphas[name]} (recorded)" if name in alphas else "searched",
            "chosen": report["search"]["trials"][report["search"]["chosen"]]["setting"]
            if report["search"].get("chosen") is not None else None,
            "attribution_seconds": report["stage_seconds"].get("attribution"),
            "compile_seconds": round(compiled, 1), **timing}


def markdown(result: dict[str, Any]) -> str:
    c = result["conditions"]
    lines = [f"# Torch latency of full vs pruned ({result['device_name']})", "",
             f"Device {result['device']}, {result['precision'].upper()}, CUDA graphs "
             f"{'on' if result['cuda_graphs'] else 'off'}, torch {c.get('torch')}; {result['runs']} interleaved "
             f"rounds after {result['warmup']} warm-up rounds, device work only (no host copies). Full: the model as "
             "loaded (constants folded, one head), the pipeline's like-for-like baseline; pruned: disasm-compile at "
             "defaults (" + ("alphas recorded in " + result["alpha_from"] if result["alpha_from"]
                             else "budget search for category fidelity 0.9") + "), engines off. Speed-up: ratio of "
             "the medians, with the p10-p90 of the per-round ratios; theoretical: 1 / MACs ratio. Argmax agreement: "
             "share of pixels where the torch runner's answer equals ONNX Runtime's (float32, CPU) on the same judged "
             "image. Generated by `benchmarks/gpu_latency.py`.", ""]
    if result["note"]:
        lines += [result["note"], ""]
    lines += ["| model | MACs ratio | full ms (p10-p90) | pruned ms (p10-p90) | speed-up (p10-p90) | theoretical | "
              "realised / theoretical | category fidelity | argmax agreement full / pruned | compile s (attribution) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['model']} | {'error: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}"
                         " | | | | | | | | |")
            continue
        f, p, a = r["full_ms"], r["pruned_ms"], r["argmax_agreement_with_onnxruntime"]
        fid = "n/a" if r["category_fidelity"] is None else f"{r['category_fidelity']:.3f}"
        lines.append(f"| {r['model']} | {r['macs_ratio']:.3f} | {f['median']:.3f} ({f['p10']:.3f}-{f['p90']:.3f}) | "
                     f"{p['median']:.3f} ({p['p10']:.3f}-{p['p90']:.3f}) | {r['speedup']:.2f}x "
                     f"({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}) | {r['theoretical_speedup']:.2f}x | "
                     f"{r['realised_over_theoretical']:.2f} | {fid} | {a['full']:.4f} / {a['pruned']:.4f} | "
                     f"{r['compile_seconds']:.0f} ({r['attribution_seconds'] or 0:.0f}) |")
    failures = [f"{r['model']}: {r['capture_failures']}" for r in result["rows"] if r.get("capture_failures")]
    if failures:
        lines += ["", "CUDA graph capture failed (these ran eagerly): " + "; ".join(failures)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="folder with corpus.json (default: %(default)s); "
                        "without it only the shipped example runs")
    parser.add_argument("--only", help="comma-separated model names ('example' for the shipped one)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp16", "fp32"), help="default: fp16 on CUDA, fp32 on a CPU")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run the torch runners eagerly on CUDA (graphs are never used on a CPU)")
    parser.add_argument("--runs", type=int, help="timed rounds (default: 200 on CUDA, 20 on a CPU)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default: 20 on CUDA, 2 on a CPU)")
    parser.add_argument("--alpha-from", type=Path, help="a benchmarks/corpus.py result (corpus.json): use its chosen "
                        "alpha per model instead of the budget search")
    parser.add_argument("--budget-s", type=float, help="start no further model after this many seconds")
    parser.add_argument("--compile-runs", type=int, default=3, help="rounds of the pipeline's own ONNX Runtime CPU "
                        "latency, not used here (default: %(default)s)")
    parser.add_argument("--cache", type=Path, help="attribution cache folder (default: none)")
    parser.add_argument("--work", type=Path, help="folder for the compiled models (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="default: %(default)s")
    parser.add_argument("--verbose", action="store_true", help="show the pipeline's progress bars")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not cuda:
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    args.precision = args.precision or ("fp16" if on_cuda else "fp32")
    args.cuda_graphs = args.cuda_graphs and on_cuda
    args.runs = args.runs or (200 if on_cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (20 if on_cuda else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    have_corpus = (args.corpus / "corpus.json").is_file()
    note = "" if have_corpus else f"No corpus at {args.corpus}: the shipped example only."
    print(note or f"corpus: {args.corpus}", flush=True)
    todo = jobs(args.corpus, only)
    if not todo:
        print(f"nothing to run: --only {args.only} names none of the models", file=sys.stderr)
        return 2
    alphas = recorded_alphas(args.alpha_from)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # the fastest kernels for each model's own channel counts (conditions)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    result: dict[str, Any] = {"device": args.device, "device_name": device_name, "precision": args.precision,
                              "cuda_graphs": args.cuda_graphs, "runs": args.runs, "warmup": args.warmup,
                              "alpha_from": str(args.alpha_from) if args.alpha_from else None,
                              "corpus": str(args.corpus) if have_corpus else None, "note": note,
                              "conditions": {"torch": torch.__version__}, "rows": []}
    start = time.perf_counter()
    suffix = args.device.split(":")[0]
    with tempfile.TemporaryDirectory() as tmp:
        work_root = args.work or Path(tmp)
        for index, (name, entry) in enumerate(todo):
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                row = {"model": name, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
                print(f"[{name}] skipped: {row['skipped']}", flush=True)
            else:
                print(f"== {name} ({index + 1}/{len(todo)}, {time.perf_counter() - start:.0f} s so far)", flush=True)
                try:
                    row = measure(name, entry, args.corpus, work_root / name, args, alphas)
                    result["conditions"] = row["conditions"]
                except Exception as e:  # one model's failure is a row of the table, not the end of the benchmark
                    row = {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                    print(f"[{name}] error: {row['error']}", flush=True)
            result["rows"].append(row)
            result["seconds"] = round(time.perf_counter() - start, 1)
            write_atomic(args.out / f"gpu_latency_{suffix}.json", (json.dumps(result, indent=2) + "\n").encode())
            write_atomic(args.out / f"gpu_latency_{suffix}.md", markdown(result).encode())
    print(markdown(result), flush=True)
    return 0 if any("speedup" in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
