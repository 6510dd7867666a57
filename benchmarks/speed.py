"""Do the kept channel counts matter for ONNX Runtime CPU latency? Single layers, small stacks and corpus models.

    python benchmarks/speed.py                        # writes benchmarks/results/speed.{json,md}
    python benchmarks/speed.py --only layers          # or: --only models, --models road-segmentation-adas-0001

ONNX Runtime's CPU provider (ORT_ENABLE_ALL) rewrites convs into its blocked NCHWc layout (MLAS): channels in blocks
of 16 floats where the CPU has AVX-512F, 8 with AVX2 only. A channel count that is not a multiple of the block is
padded up to it inside the kernel, so the time should be a staircase in the channel count; counts the rewrite cannot
take (it wants input channels below the block or a multiple of 4) run the plain im2col + GEMM path instead, behind
ReorderInput/ReorderOutput layout changes. Two parts:

1. layers: one model per channel count, all counts of a sweep timed interleaved in one process (same session
   options, same thread count, rotating order): 3x3 convs C -> C, 1x1 convs, depthwise 3x3, and small stacks where
   only the inner count changes (conv3x3 64 -> C -> 64, an inverted residual 32 -> C -> dw -> 32), for C around 64
   and around 128. Each row says whether ONNX Runtime ran the conv(s) in NCHWc (read from its optimised graph).
2. models: corpus models pruned at a fixed alpha with round_to 1, 4, 8, 16, 32 (compiler.pipeline.specialise, the
   attribution of a few calibration images, mean compensation: the weights differ from lsq's, the shapes do not),
   timed interleaved with the full model as loaded (folded, one head: the pipeline's like-for-like baseline) and a
   second session of that same full model (the A/A control: its ratio to the full model is the noise floor of every
   ratio in the table). Speed-ups come with the p10-p90 of the per-round ratios.

Denormals. Some trained models hold float32 weights below 1.2e-38 (subnormal: TwinLiteNet 11 % of its weights,
road-segmentation-adas 1 %), typically whole dead channels. x86 cores take a slow microcode path for every
multiplication by one unless the thread runs with denormals-are-zero, which ONNX Runtime only sets on its worker
threads when asked ("session.set_denormal_as_zero"), never on the calling thread. Those weights cost 2-3x on such
models and contribute nothing (the outputs are bitwise the same with them set to 0); pruning removes the dead channels
and with them the slow path, so a cut model looks much faster than its MACs say. The table therefore also times the
full model with those weights set to 0 ("full, denormals flushed"), and the pruned variants are flushed the same way
(--keep-denormals times them as the pipeline writes them): the round_to comparison is about channel counts only.

The machine is shared and noisy: only ratios measured side by side in one run are quoted; absolute milliseconds are
indicative. Threads default to 1 (the steadiest on a loaded 2-core machine; --threads 2 for the whole machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from disasm.compiler.files import write_atomic
from disasm.compiler.load import flush_subnormals
from disasm.runtime.latency import LatencyStats, measure_latency, paired_speedup
from disasm.runtime.onnxrt import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_MODELS = ("road-segmentation-adas-0001", "pan-mnv3s-skin-clothes-hair", "twinlitenet-drivable-lanes")
ROUND_TOS = (1, 4, 8, 16, 32)


# ---- machine ---------------------------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    flags = cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "nchwc_block": 16 if "avx512f" in flags else 8 if "avx2" in flags else None,
            "onnxruntime": ort.__version__, "load_average_at_start": list(os.getloadavg())}


# ---- ONNX Runtime's own view of a model ---------------------------------------------------------------------------------


def optimised_ops(model: bytes) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs at ORT_ENABLE_ALL on this machine (its NCHWc convs show as
    'com.microsoft.nchwc:Conv')."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(tmp, "optimised.onnx")
        options.log_severity_level = 3
        ort.set_default_logger_severity(3)  # "serializing an NCHWc-optimised model" is a warning meant for deployers
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def layout_summary(ops: dict[str, int]) -> dict[str, int]:
    """Convs in NCHWc, convs not in NCHWc, and the layout changes ONNX Runtime inserted."""
    nchwc = sum(n for op, n in ops.items() if op.endswith("nchwc:Conv"))
    plain = sum(n for op, n in ops.items() if op in ("Conv", "com.microsoft:FusedConv"))
    reorders = sum(n for op, n in ops.items() if op.endswith(("ReorderInput", "ReorderOutput")))
    return {"nchwc_convs": nchwc, "plain_convs": plain, "reorders": reorders}


# ---- part 1: layers ------------------------------------------------------------------------------------------------------


def _conv(rng, name: str, x: str, cin: int, cout: int, k: int, group: int = 1) -> tuple[list, list]:
    w = numpy_helper.from_array((rng.standard_normal((cout, cin // group, k, k)) * 0.1).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b")
    nodes = [helper.make_node("Conv", [x, w.name, b.name], [f"{name}_c"], pads=[k // 2] * 4, group=group),
             helper.make_node("Relu", [f"{name}_c"], [name])]
    return nodes, [w, b]


def layer_model(kind: str, c: int, size: int, outer: int) -> tuple[bytes, int, tuple[int, ...]]:
    """(model bytes, MACs, input shape) of one sweep point: `c` is the channel count the sweep varies."""
    rng = np.random.default_rng(c)
    layers = {  # (input channels, [(cin, cout, kernel, group)])
        "conv3x3 C->C": (c, [(c, c, 3, 1)]),
        "conv1x1 C->C": (c, [(c, c, 1, 1)]),
        "depthwise3x3 C": (c, [(c, c, 3, c)]),
        "conv3x3 stack O->C->O": (outer, [(outer, c, 3, 1), (c, outer, 3, 1)]),
        "inverted residual O->C->dw->O": (outer, [(outer, c, 1, 1), (c, c, 3, c), (c, outer, 1, 1)]),
    }[kind]
    cin, convs = layers
    nodes, weights, x, macs = [], [], "x", 0
    for i, (a, b, k, g) in enumerate(convs):
        more_nodes, more_weights = _conv(rng, f"l{i}", x, a, b, k, g)
        nodes += more_nodes
        weights += more_weights
        x = f"l{i}"
        macs += size * size * b * (a // g) * k * k
    shape = (1, cin, size, size)
    graph = helper.make_graph(nodes, "sweep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), macs, shape


SWEEPS = [  # (kind, channel counts, spatial size, outer channels of stacks)
    ("conv3x3 C->C", range(48, 65), 64, 0),
    ("conv3x3 C->C", range(112, 129), 32, 0),
    ("conv1x1 C->C", range(112, 129), 64, 0),
    ("depthwise3x3 C", range(112, 129), 64, 0),
    ("conv3x3 stack O->C->O", range(48, 65), 64, 64),
    ("inverted residual O->C->dw->O", range(112, 129), 64, 32),
]


def run_sweep(kind: str, counts, size: int, outer: int, threads: int, runs: int) -> dict:
    runners, points = {}, []
    for c in counts:
        model, macs, shape = layer_model(kind, c, size, outer)
        runner = OnnxRuntimeRunner(model, threads=threads, spinning=False)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        runners[str(c)] = (lambda r=runner, x=x: r.infer(x))
        points.append({"channels": c, "macs": macs, **layout_summary(optimised_ops(model))})
    stats = measure_latency(runners, runs=runs, warmup=5)
    top = stats[str(max(counts))]
    for p in points:
        s = stats[str(p["channels"])]
        p.update(_stat_fields(s))
        p["macs_vs_largest"] = p["macs"] / points[-1]["macs"]
        p["time_vs_largest"] = s.median_ms / top.median_ms
        p["time_vs_largest_p10"] = s.p10_ms / top.p10_ms  # the fastest calls: least disturbed by other jobs
        pair = paired_speedup(s, top)  # base / new per round: this count's time over the largest count's
        p["time_vs_largest_rounds_p10_p90"] = [pair.p10, pair.p90]
    return {"kind": kind, "size": size, "outer": outer or None, "threads": threads, "runs": runs, "points": points}


def _stat_fields(s: LatencyStats) -> dict:
    return {"median_ms": s.median_ms, "p10_ms": s.p10_ms, "p25_ms": s.p25_ms, "p75_ms": s.p75_ms,
            "p90_ms": s.p90_ms, "first_ms": s.first_ms, "warmup": s.warmup}


# ---- part 2: corpus models ----------------------------------------------------------------------------------------------


def corpus_variants(name: str, alpha: float, round_tos: tuple[int, ...], calibration: int, cache: Path,
                    threads: int, runs: int, flush: bool = True) -> dict:
    import torch

    from corpus_models import corpus_entries, load_corpus_model, split_images
    from disasm.attribution.disassembler import AttributionSettings
    from disasm.attribution.select import SelectionSettings
    from disasm.compiler.channels import analyse
    from disasm.compiler.cost import model_cost
    from disasm.compiler.images import load_images, parse_size, preprocess
    from disasm.compiler.pipeline import Stages, cached_attribution, calibration_digest, cache_keys, specialise

    torch.set_num_threads(os.cpu_count() or 1)
    entry = next(e for e in corpus_entries(CORPUS) if e["name"] == name)
    model = load_corpus_model(CORPUS, entry)
    flags = entry["flags"]
    size = model.image_size or parse_size(flags[flags.index("--input-size") + 1])
    calibration_paths, judged = split_images(CORPUS / entry["images"])
    calibration_paths = calibration_paths[:calibration]
    inputs = preprocess(load_images(calibration_paths, size), model.preprocessing)
    analysis = analyse(model.proto)
    settings = AttributionSettings(batch_size=1 if model.input_shape[0] == 1 else 8)
    keys = cache_keys(model, analysis, calibration_digest(calibration_paths, {}), settings, moments=False)
    start = time.perf_counter()
    attribution, hit = cached_attribution(model, analysis, inputs, settings, "cpu", keys, cache, Stages())
    attribution_seconds = time.perf_counter() - start
    categories = list(entry["categories"][0])
    input_shape = (1, *inputs.shape[1:])
    sample = preprocess(load_images(judged[:1], size), model.preprocessing)
    full_bytes = model.proto.SerializeToString()
    full_cost = model_cost(model.proto, input_shape)
    flushed_full, denormals = flush_subnormals(model.proto)
    variants = {"full": full_bytes, "full (second session, A/A control)": full_bytes}
    rows = {"full": {"round_to": None, "macs_ratio": 1.0, **layout_summary(optimised_ops(full_bytes))}}
    if denormals:
        variants["full, denormals flushed"] = flushed_full.SerializeToString()
        rows["full, denormals flushed"] = {"round_to": None, "macs_ratio": 1.0,
                                           **layout_summary(optimised_ops(variants["full, denormals flushed"]))}
    for round_to in round_tos:
        selection = SelectionSettings(alpha=alpha, round_to=round_to)
        result = specialise(model, analysis, attribution, categories, selection, "mean", {})
        pruned = (flush_subnormals(result.pruned)[0] if flush else result.pruned).SerializeToString()
        key = f"round_to {round_to}"
        variants[key] = pruned
        counts = [c.total for c in result.choices if c.total < c.size]
        block = machine()["nchwc_block"] or 8
        rows[key] = {"round_to": round_to, "macs_ratio": model_cost(result.pruned, input_shape).macs / full_cost.macs,
                     "cut_groups": len(counts), "kept_counts": sorted(counts),
                     "cut_counts_off_block": sum(1 for c in counts if c % block),
                     **layout_summary(optimised_ops(pruned))}
    runners = {k: OnnxRuntimeRunner(v, threads=threads, spinning=False) for k, v in variants.items()}
    stats = measure_latency({k: (lambda r=r: r.infer(sample)) for k, r in runners.items()}, runs=runs, warmup=5)
    full = stats["full"]
    control = paired_speedup(full, stats["full (second session, A/A control)"])
    base = stats["full, denormals flushed"] if denormals and flush else full
    for key, row in rows.items():
        s = stats[key]
        row.update(_stat_fields(s))
        if key != "full":
            pair, flushed_pair = paired_speedup(full, s), paired_speedup(base, s)
            row.update(speedup=pair.of_medians, speedup_p10=pair.p10, speedup_p90=pair.p90,
                       speedup_vs_flushed=flushed_pair.of_medians, speedup_vs_flushed_p10=flushed_pair.p10,
                       speedup_vs_flushed_p90=flushed_pair.p90, theoretical=1 / row["macs_ratio"],
                       realised_over_theoretical=flushed_pair.of_medians * row["macs_ratio"])
    return {"model": name, "categories": categories, "alpha": alpha, "input_shape": list(input_shape),
            "calibration_images": len(calibration_paths), "attribution_cached": hit,
            "attribution_seconds": attribution_seconds, "threads": threads, "runs": runs,
            "denormal_weights": denormals, "pruned_flushed": flush,
            "conditions": runners["full"].conditions,
            "control": {"speedup": control.of_medians, "p10": control.p10, "p90": control.p90}, "rows": rows}


# ---- report --------------------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Channel counts and ONNX Runtime CPU latency", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, AVX2 {'yes' if m['avx2'] else 'no'}, AVX-512F "
             f"{'yes' if m['avx512f'] else 'no'} (MLAS NCHWc block: {m['nchwc_block']} floats); ONNX Runtime "
             f"{m['onnxruntime']}; load average at start {', '.join(f'{v:.1f}' for v in m['load_average_at_start'])}. "
             "Shared and noisy: compare ratios within one table (timed interleaved in one process, same session "
             "options), not milliseconds across tables. Generated by `benchmarks/speed.py`.", ""]
    for sweep in result.get("layers", []):
        outer = f", outer O={sweep['outer']}" if sweep["outer"] else ""
        lines += [f"## {sweep['kind']} at {sweep['size']}x{sweep['size']}{outer} ({sweep['threads']} thread(s), "
                  f"{sweep['runs']} rounds)", "",
                  "| C | C mod 4 / 8 / 16 | MACs vs largest | time vs largest: p10s, medians | median ms (p10-p90) "
                  "| NCHWc convs / plain / reorders |",
                  "|---:|---|---:|---:|---:|---|"]
        for p in sweep["points"]:
            c = p["channels"]
            lines.append(f"| {c} | {c % 4} / {c % 8} / {c % 16} | {p['macs_vs_largest']:.2f} | "
                         f"{p['time_vs_largest_p10']:.2f}, {p['time_vs_largest']:.2f} | "
                         f"{p['median_ms']:.3f} ({p['p10_ms']:.3f}-{p['p90_ms']:.3f}) | "
                         f"{p['nchwc_convs']} / {p['plain_convs']} / {p['reorders']} |")
        lines.append("")
    for model in result.get("models", []):
        c = model["control"]
        lines += [f"## {model['model']}: {', '.join(model['categories'])}, alpha {model['alpha']}, input "
                  f"{model['input_shape']} ({model['threads']} thread(s), {model['runs']} rounds)", "",
                  f"A/A control (the full model against a second session of itself): {c['speedup']:.2f}x "
                  f"(p10-p90 {c['p10']:.2f}-{c['p90']:.2f}x), the noise floor of the ratios below. "
                  f"Subnormal weights in the model: {model['denormal_weights']}"
                  f"{'; the pruned variants have them flushed to 0' if model['pruned_flushed'] else ''}.", "",
                  "| variant | MACs ratio | theoretical | speed-up vs full as loaded (p10-p90 of rounds) | "
                  "speed-up vs full flushed (p10-p90) | realised / theoretical (vs flushed) | median ms | "
                  "cut groups (off-block counts) | NCHWc convs / plain / reorders |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for key, r in model["rows"].items():
            if key == "full":
                lines.append(f"| full (as loaded) | 1.000 | 1.00x | 1.00x | | | {r['median_ms']:.1f} | | "
                             f"{r['nchwc_convs']} / {r['plain_convs']} / {r['reorders']} |")
                continue
            cut = f"{r['cut_groups']} ({r['cut_counts_off_block']})" if "cut_groups" in r else ""
            lines.append(f"| {key} | {r['macs_ratio']:.3f} | {r['theoretical']:.2f}x | {r['speedup']:.2f}x "
                         f"({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}) | {r['speedup_vs_flushed']:.2f}x "
                         f"({r['speedup_vs_flushed_p10']:.2f}-{r['speedup_vs_flushed_p90']:.2f}) | "
                         f"{r['realised_over_theoretical']:.2f} | "
                         f"{r['median_ms']:.1f} | {cut} | "
                         f"{r['nchwc_convs']} / {r['plain_convs']} / {r['reorders']} |")
        lines.append("")
    if result.get("findings"):
        lines += ["## Findings", "", *result["findings"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("layers", "models"), help="run one part only")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="corpus model names, comma-separated")
    parser.add_argument("--round-to", default=",".join(map(str, ROUND_TOS)))
    parser.add_argument("--alpha", type=float, default=0.1, help="fixed selection threshold (default %(default)s)")
    parser.add_argument("--calibration", type=int, default=4, help="calibration images per corpus model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds per model table")
    parser.add_argument("--layer-runs", type=int, default=80, help="interleaved rounds per layer sweep")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "disasm-speed-cache",
                        help="attribution cache for the corpus models")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="time the pruned variants with their subnormal weights as written (default: set to 0)")
    parser.add_argument("--findings", type=Path, help="a text file of findings (one paragraph a line) to append")
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite speed.md (and the findings in speed.json) from the existing speed.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.render_only:
        result = json.loads((args.out / "speed.json").read_text())
        if args.findings:
            result["findings"] = [line for line in args.findings.read_text().splitlines() if line.strip()]
        write_atomic(args.out / "speed.json", (json.dumps(result, indent=1) + "\n").encode())
        write_atomic(args.out / "speed.md", markdown(result).encode())
        return

    result: dict = {"machine": machine(), "threads": args.threads, "runs": args.runs, "layer_runs": args.layer_runs}
    if args.only in (None, "layers"):
        result["layers"] = []
        for kind, counts, size, outer in SWEEPS:
            print(f"== {kind} {counts.start}..{counts.stop - 1} at {size}x{size}", file=sys.stderr, flush=True)
            result["layers"].append(run_sweep(kind, counts, size, outer, args.threads, args.layer_runs))
    if args.only in (None, "models"):
        result["models"] = []
        round_tos = tuple(int(v) for v in args.round_to.split(","))
        for name in args.models.split(","):
            print(f"== {name}", file=sys.stderr, flush=True)
            result["models"].append(corpus_variants(name, args.alpha, round_tos, args.calibration, args.cache,
                                                    args.threads, args.runs, flush=not args.keep_denormals))
    if args.findings:
        result["findings"] = [line for line in args.findings.read_text().splitlines() if line.strip()]
    write_atomic(args.out / "speed.json", (json.dumps(result, indent=1) + "\n").encode())
    write_atomic(args.out / "speed.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
