"""Realised ONNX Runtime CPU speed-up of the default cut, against the like-for-like baseline, and where it falls short.

    python benchmarks/latency.py --pruned /tmp/disasm-latency --round-to-variants 1,4,16   # latency.{json,md}
    python benchmarks/latency.py --only twinlitenet-drivable-lanes --runs 20 --threads 1 --pruned /tmp/disasm-latency
    python benchmarks/latency.py --render-only                   # rewrite latency.md from latency.json (+ findings)

The one command that regenerates the committed results end to end is the first (about 45 minutes on 2 loaded cores:
a compile at defaults of every model and three fixed-budget ones, then the timings); with the compiled models already
in --pruned (and made with the current defaults) it only times, about 15 minutes. The hand-written analysis in
benchmarks/latency_findings.md is appended to latency.md; re-read it against new numbers.

Models: every model of ../shared/corpus/corpus.json with its first listed categories (--images every fourth image of
its folder, the rest --eval-images; benchmarks/corpus.py's request), and the shipped example (circle,star,
examples/data/calib, eval images examples/data/eval/images). Each is compiled by compile_model at the pipeline's
defaults (budget search; engines off) into --pruned DIR/<model>/ (pruned.onnx, report.json); a folder holding both,
made from the same model with the settings a compile would use now by the same compiler/ and attribution/ source
(DIR/<model>.code-sha256), is reused, so a later run times the same models (a stale one is compiled again).
Without --pruned they go to a temporary folder.

Timed, interleaved in one process (disasm.runtime.latency.measure_latency: every round runs each candidate once,
rotating the order), all ONNX Runtime CPU sessions with the same options (--threads intra-op threads, thread spinning
off, ORT_ENABLE_ALL, sequential), on one judged image preprocessed as the pipeline does:

- `full`: the like-for-like baseline, the model as compiler.load.load_model leaves it (constants folded, subnormal
  weights flushed to 0, one head, re-saved), nothing cut: what the pruned model is the surgery of;
- `full A/A`: a second session of that same file, the A/A control: its ratio to `full` is the noise band of every
  speed-up in the table (p10-p90 of the per-round ratios);
- `pruned`: the compiled pruned.onnx (its chosen-or-none head included);
- `raw source`: the file as shipped (no folding, subnormals kept, every head), shown beside, never the baseline;
- `full, tiny weights zeroed` / `pruned, tiny weights zeroed`, where a model holds weights below 1e-30 (normal floats
  whose products with activations are subnormal; the loader zeroes them since compiler.load.TINY_WEIGHT, so this pair
  only differs for models compiled before): both with compiler.load.flush_subnormals applied again (the outputs it
  changes are recorded);
- `full, DAZ/FTZ` / `pruned, DAZ/FTZ`: the stricter pair for every model, both run with denormals flushed by the CPU
  (`flushing`), so that subnormal weights, activations and products cost what normal ones do;
- with --round-to-variants 1,4,16: the same alpha re-specialised with another --round-to (budget fixed).

Realised speed-up = median(full) / median(pruned); theoretical = 1 / MACs ratio (conv, Gemm and MatMul MACs of one
image, compiler.cost); realised / theoretical is the share of the MAC saving that became time.

Where the time goes: ONNX Runtime's own profiler (SessionOptions.enable_profiling) on the full and pruned models, as
they run and with DAZ/FTZ (--profile-runs rounds, interleaved, the first dropped), per node of the graph
ONNX Runtime actually runs (its optimised graph, saved alongside: NCHWc convs and the ReorderInput/ReorderOutput layout
changes it inserts show there), summed per op kind and per run, medians over runs. `excess over ideal` is, per op
kind, pruned time minus full time x MACs ratio: what keeps realised / theoretical below 1, in milliseconds of the
profiled run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from disasm.compiler.cost import model_cost
from disasm.compiler.files import write_atomic
from disasm.compiler.images import load_images, parse_size, preprocess
from disasm.compiler.load import TINY_WEIGHT as TINY
from disasm.compiler.load import Model, flush_subnormals, load_model, write_onnx
from disasm.compiler.pipeline import Request, Stages, compile_model
from disasm.runtime.latency import LatencyStats, measure_latency, paired_speedup
from disasm.runtime.onnxrt import OnnxRuntimeRunner
from disasm.runtime.onnxrt import session_options as runner_session_options

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus import corpus_request, example_request  # noqa: E402
from corpus_models import CORPUS, corpus_entries, flag, load_corpus_model, split_images  # noqa: E402
from speed import layout_summary, machine, optimised_ops  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FINDINGS = ROOT / "benchmarks" / "latency_findings.md"  # hand-written analysis, appended to latency.md
CUT_HARD = 0.8      # models at or below this MACs ratio must reach REALISED_TARGET (issue #12)
REALISED_TARGET = 0.85
STRICT_FULL, STRICT_PRUNED = "full, tiny weights zeroed", "pruned, tiny weights zeroed"
DAZ_FULL, DAZ_PRUNED = "full, DAZ/FTZ", "pruned, DAZ/FTZ"  # denormals flushed by the CPU (`flushing`)
BASELINES = {STRICT_PRUNED: STRICT_FULL, DAZ_PRUNED: DAZ_FULL}
HEAD_SUFFIXES = ("__parts", "__head", "__none", "__keep_classes")  # node names compiler/outputs.py and prune give
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu",
               "PRelu", "Sum", "Max", "Min", "Neg", "Exp", "Sqrt", "Pow", "Erf", "Where", "Cast", "Identity",
               "BatchNormalization", "QuickGelu", "Gelu"}
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum"}
RESIZE = {"Resize", "Upsample", "ConvTranspose"}
MOVES = {"Transpose", "Concat", "Split", "Slice", "Gather", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Pad",
         "DepthToSpace", "SpaceToDepth", "Expand", "Tile"}


# ---- the models ------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One row: how to compile it, how the pipeline loads it, and the image it is timed on."""

    name: str
    key: str                                  # its folder under --pruned
    request: Callable[[Path], Request]        # work folder -> compile request at defaults
    load: Callable[[], Model]
    sample: Path                              # the first judged image
    size: tuple[int, int] | None              # the size images are fed at (None: their own)


def jobs() -> list[Job]:
    found = []
    for entry in corpus_entries(CORPUS):
        model = load_corpus_model(CORPUS, entry)
        size = model.image_size or (parse_size(flag(entry, "--input-size")) if flag(entry, "--input-size") else None)
        found.append(Job(entry["name"], entry["name"], lambda w, e=entry: corpus_request(e, w),
                         lambda e=entry: load_corpus_model(CORPUS, e), split_images(CORPUS / entry["images"])[1][0],
                         size))
    example = ROOT / "examples" / "shapes_seg.onnx"
    model = load_model(example)
    evaluation = sorted((ROOT / "examples" / "data" / "eval" / "images").glob("*.png"))
    found.append(Job("shapes_seg (shipped example)", "shapes_seg", example_request, lambda: load_model(example),
                     evaluation[0], model.image_size))
    return found


def chosen_alpha(report: dict) -> float | None:
    """The alpha of the trial the budget search kept (None: nothing was cut, or the budget was fixed otherwise)."""
    setting = report["search"]["trials"][report["search"]["chosen"]]["setting"]
    return float(setting.split()[1]) if setting.startswith("alpha ") else None


def _code_digest() -> str:
    """The source of everything that decides a pruned model (loader, analysis, selection, refit, surgery): a folder
    compiled by other code (the loader's tiny-weight rule once changed both models without changing a setting) is
    compiled again."""
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("compiler", "attribution") for p in (ROOT / folder).rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _matches(report: dict, request: Request) -> bool:
    """Whether a kept compile was made by the same model and the settings `request` would use now (the defaults
    change between releases: a stale folder is compiled again)."""
    settings = report.get("settings", {})
    wanted = {"selection": request.selection.to_dict(), "criterion": request.criterion,
              "compensation": request.compensate, "min_fidelity": request.min_fidelity,
              "finetune": request.finetune}
    return all(settings.get(k, 0 if k == "finetune" else None) == v for k, v in wanted.items())


def compiled(job: Job, folder: Path, cache: Path | None, round_to: int | None = None,
             alpha: float | None = None) -> tuple[Path, dict]:
    """(pruned.onnx, report.json) of the job at defaults (or re-specialised at `alpha` with `round_to`, budget fixed),
    reused from `folder` when it holds both from the same settings, else compiled into it."""
    out = folder / (job.key if round_to is None else f"{job.key}-round{round_to}")
    with tempfile.TemporaryDirectory() as work:
        request = replace(job.request(Path(work)), out=out, force=True, runs=1, engines=False, reports=True,
                          no_cache=cache is None, cache=cache)
        if round_to is not None:
            request = replace(request, budget_fixed=True,
                              selection=replace(request.selection, alpha=alpha, round_to=round_to))
        code, stamp = _code_digest(), out.with_name(out.name + ".code-sha256")
        if (out / "pruned.onnx").is_file() and (out / "report.json").is_file() and stamp.is_file():
            report = json.loads((out / "report.json").read_text())
            if (_matches(report, request) and report["model"]["sha256"] == job.load().sha256
                    and stamp.read_text().strip() == code):
                print(f"   reusing {out}", file=sys.stderr, flush=True)
                return out / "pruned.onnx", report
        print(f"   compiling into {out}" + (f" (alpha {alpha}, round_to {round_to})" if round_to else ""),
              file=sys.stderr, flush=True)
        compile_model(request, Stages(quiet=False))
        write_atomic(stamp, (code + "\n").encode())
    return out / "pruned.onnx", json.loads((out / "report.json").read_text())


# ---- ONNX Runtime's view: the optimised graph and the per-node profile ----------------------------------------------


def session_options(threads: int, profile_prefix: str | None = None, optimised_path: str | None = None,
                    flush: bool = False) -> ort.SessionOptions:
    """The options OnnxRuntimeRunner uses (spinning off), plus profiling / saving the optimised graph, and with
    `flush` denormals-are-zero on ONNX Runtime's worker threads (the calling thread: `flushing`)."""
    options = runner_session_options(threads, spinning=False)
    if flush:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimised_path:
        options.optimized_model_filepath = optimised_path
    return options


def node_kinds(optimised: onnx.ModelProto) -> dict[str, str]:
    """Node name -> its kind for the tables: 'nchwc:Conv', 'ReorderInput', 'Conv' (plain), 'FusedConv', ..."""
    kinds = {}
    for node in optimised.graph.node:
        kind = node.op_type
        if node.domain == "com.microsoft.nchwc":
            kind = f"nchwc:{node.op_type}"
        kinds[node.name] = kind
    return kinds


def category(kind: str, node: str) -> str:
    """The op kinds grouped by what pruning does to them."""
    op = kind.split(":")[-1]
    if node.endswith(HEAD_SUFFIXES) or "__part" in node or "__none" in node:
        return "chosen-or-none head (added)"
    if op in ("ReorderInput", "ReorderOutput"):
        return "NCHWc reorders"
    if op in ("Conv", "FusedConv") and kind.startswith("nchwc"):
        return "conv (NCHWc)"
    if op in ("Conv", "FusedConv"):
        return "conv (plain im2col+GEMM)"
    if op in ("Gemm", "MatMul", "FusedMatMul", "FusedGemm"):
        return "matmul"
    if op in RESIZE:
        return "resize / upsample"
    if op in ("Softmax", "LogSoftmax"):
        return "softmax"
    if op == "Transpose":
        return "transpose"
    if op in POOLING:
        return "pooling / reduce"
    if op in ELEMENTWISE:
        return "elementwise"
    if op in MOVES:
        return "concat / split / shape"
    return f"other ({op})"


def flushing(run: Callable[[], object]) -> Callable[[], object]:
    """`run` with denormals-are-zero and flush-to-zero set on the calling thread for the call (x86 MXCSR, through
    torch.set_flush_denormal): subnormal weights, activations and products then cost what normal ones do. ONNX
    Runtime's own "session.set_denormal_as_zero" reaches only its worker threads; at 1 thread all work is on this
    one."""
    import torch

    def call() -> object:
        torch.set_flush_denormal(True)
        try:
            return run()
        finally:
            torch.set_flush_denormal(False)

    return call


def profile(paths: dict[str, Path], sample: np.ndarray, threads: int, runs: int,
            flushed: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per variant: the optimised graph's op counts and the profiled time per node kind and per category (median over
    `runs` runs after one dropped, the variants interleaved), and per node (median). The variants named in `flushed`
    run with denormals flushed (`flushing`)."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, kinds = {}, {}
        for name, path in paths.items():
            safe = "".join(c if c.isalnum() else "_" for c in name)
            optimised = os.path.join(tmp, f"{safe}.optimised.onnx")
            ort.set_default_logger_severity(3)
            options = session_options(threads, os.path.join(tmp, safe), optimised, flush=name in flushed)
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            kinds[name] = node_kinds(onnx.load(optimised, load_external_data=False))
        feed = {name: {s.get_inputs()[0].name: sample} for name, s in sessions.items()}
        calls = {name: (lambda s=s, f=feed[name]: s.run(None, f)) for name, s in sessions.items()}
        calls = {name: flushing(call) if name in flushed else call for name, call in calls.items()}
        for _ in range(runs + 1):
            for call in calls.values():
                call()
        for name, session in sessions.items():
            events = json.loads(Path(session.end_profiling()).read_text())
            result[name] = _summarise(events, kinds[name], runs)
    return result


def _summarise(events: list[dict], kinds: dict[str, str], runs: int) -> dict:
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    per_node: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(model_runs))
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        run = next((i for i, (a, b) in enumerate(model_runs) if a <= e["ts"] <= b), None)
        if run is not None:
            per_node[e["name"][:-len("_kernel_time")]][run] += e["dur"] / 1000.0
    by_kind: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(model_runs)))
    by_category: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(model_runs)))
    for node, times in per_node.items():
        kind = kinds.get(node, "?")
        by_kind[kind] += times
        by_category[category(kind, node)] += times
    counts: dict[str, int] = defaultdict(int)
    for kind in kinds.values():
        counts[kind] += 1
    total = np.array([(b - a) / 1000.0 for a, b in model_runs])
    return {"run_ms": float(np.median(total)), "nodes_ms": float(np.median(sum(by_kind.values()))),
            "by_kind_ms": {k: float(np.median(v)) for k, v in sorted(by_kind.items())},
            "by_category_ms": {k: float(np.median(v)) for k, v in sorted(by_category.items())},
            "node_ms": {k: float(np.median(v)) for k, v in per_node.items()},
            "kinds": dict(sorted(counts.items())), "kinds_by_node": kinds}


# ---- channel counts of the convs the pruned model runs ---------------------------------------------------------------


def conv_channels(model: onnx.ModelProto) -> list[dict]:
    """Per Conv of `model`: name, input and output channels, group, kernel (from its weight)."""
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        shape = weights[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        convs.append({"name": node.name, "out": shape[0], "in": shape[1] * group, "group": group,
                      "kernel": list(shape[2:])})
    return convs


def runtime_names(model: onnx.ModelProto, kinds: dict[str, str]) -> dict[str, str]:
    """Conv node name of `model` -> the name of the node ONNX Runtime runs for it. ONNX Runtime keeps a plain conv's
    name and names an NCHWc conv after the tensor it writes plus "_nchwc", that tensor being the conv's own output
    or, when it fused an activation or a residual Add into the conv, that op's output."""
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for name in kinds:
        if name in found.values():
            continue
        tensor = name.removesuffix("_nchwc").removesuffix("_fused")
        node = producers.get(tensor)
        for _ in range(3):  # back through a fused Relu/Clip/Sigmoid/Add to the conv
            if node is None or node.op_type == "Conv":
                break
            node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "Conv"),
                        producers.get(node.input[0]) if node.input else None)
        if node is not None and node.op_type == "Conv":
            found.setdefault(node.name, name)
    for name in kinds:
        if any(n.name == name and n.op_type == "Conv" for n in model.graph.node):
            found[name] = name
    return found


def conv_table(full: onnx.ModelProto, pruned: onnx.ModelProto, full_profile: dict, pruned_profile: dict,
               block: int) -> dict:
    """The pruned convs whose counts changed, with their kernel (NCHWc or plain) and time in both models: the kept
    counts off the block, the convs that fell out of NCHWc, and the conv time the cut saved against its MACs."""
    before = {c["name"]: c for c in conv_channels(full)}
    names = [runtime_names(full, full_profile["kinds_by_node"]), runtime_names(pruned, pruned_profile["kinds_by_node"])]
    profiles = (full_profile, pruned_profile)
    rows = []
    for c in conv_channels(pruned):
        b = before.get(c["name"])
        if b is None or (b["in"], b["out"]) == (c["in"], c["out"]):
            continue
        macs = (c["out"] * c["in"] / c["group"]) / (b["out"] * b["in"] / b["group"])
        rows.append({"name": c["name"], "in": [b["in"], c["in"]], "out": [b["out"], c["out"]], "group": c["group"],
                     "kernel": c["kernel"], "macs_ratio": macs,
                     "kind": [p["kinds_by_node"].get(n.get(c["name"], "")) for p, n in zip(profiles, names)],
                     "ms": [p["node_ms"].get(n.get(c["name"], "")) for p, n in zip(profiles, names)]})
    off = [r for r in rows if r["out"][1] % block or (r["in"][1] % block and r["group"] == 1)]
    return {"changed": rows, "off_block": len(off), "block": block}


# ---- one model -------------------------------------------------------------------------------------------------------


def _stats(s: LatencyStats) -> dict:
    return {"median_ms": s.median_ms, "p10_ms": s.p10_ms, "p90_ms": s.p90_ms}


def _pair(profiles: dict, base: str, new: str, ratio: float, full: onnx.ModelProto, pruned: onnx.ModelProto) -> dict:
    """The profile comparison of one (full, pruned) pair: excess over ideal per category, and the cut convs."""
    a, b = profiles[base]["by_category_ms"], profiles[new]["by_category_ms"]
    return {"base": base, "new": new, "macs_ratio": ratio,
            "excess_over_ideal_ms": {c: b.get(c, 0.0) - ratio * a.get(c, 0.0) for c in sorted(set(a) | set(b))},
            "convs": conv_table(full, pruned, profiles[base], profiles[new], machine()["nchwc_block"] or 8)}


def measure_job(job: Job, folder: Path, cache: Path | None, threads: int, runs: int, profile_runs: int,
                round_tos: tuple[int, ...]) -> dict:
    pruned_path, report = compiled(job, folder, cache)
    model = job.load()
    sample = preprocess(load_images([job.sample], job.size), model.preprocessing)
    input_shape = tuple(sample.shape)
    work = folder / job.key
    full_path = work / "full.onnx"  # the baseline re-saved, as the pipeline's loader leaves it
    write_onnx(model.proto, full_path)
    pruned = onnx.load(pruned_path)
    full_cost, pruned_cost = model_cost(model.proto, input_shape), model_cost(pruned, input_shape)
    variants = {"full": full_path, "full A/A": full_path, "pruned": pruned_path, "raw source": model.path}
    macs = {"pruned": pruned_cost.macs / full_cost.macs}
    strict_full, tiny_full = flush_subnormals(model.proto)  # the loader's rule, again: 0 once it applied it
    strict_pruned, tiny_pruned = flush_subnormals(pruned)
    strict = {}
    if tiny_full or tiny_pruned:
        for name, proto in ((STRICT_FULL, strict_full), (STRICT_PRUNED, strict_pruned)):
            strict[name] = work / f"{name.split(',')[0]}.tiny-zeroed.onnx"
            write_onnx(proto, strict[name])
        variants |= strict
        macs[STRICT_PRUNED] = macs["pruned"]
    alpha = chosen_alpha(report)
    for r in round_tos:
        if alpha is None or macs["pruned"] >= 1.0:
            continue
        path, _ = compiled(job, folder, cache, r, alpha)
        variants[f"pruned round_to {r}"] = path
        macs[f"pruned round_to {r}"] = model_cost(onnx.load(path), input_shape).macs / full_cost.macs
    runners = {k: OnnxRuntimeRunner(p, threads=threads, spinning=False) for k, p in variants.items()}
    calls = {k: (lambda r=r: r.infer(sample)[0]) for k, r in runners.items()}
    for name, path in ((DAZ_FULL, full_path), (DAZ_PRUNED, pruned_path)):  # same options, denormals flushed
        session = ort.InferenceSession(str(path), session_options(threads, flush=True),
                                       providers=["CPUExecutionProvider"])
        calls[name] = flushing(lambda s=session: s.run(None, {s.get_inputs()[0].name: sample})[0])
    macs[DAZ_PRUNED] = macs["pruned"]
    same = {}  # how much the outputs change when denormals go (0: bitwise identical on the timed image)
    for name, base in ((STRICT_FULL, "full"), (STRICT_PRUNED, "pruned"), (DAZ_FULL, "full"), (DAZ_PRUNED, "pruned")):
        if name in calls:
            same[name] = float(np.abs(calls[name]() - calls[base]()).max())
    print(f"   timing {', '.join(calls)} ({runs} rounds, {threads} thread(s))", file=sys.stderr, flush=True)
    stats = measure_latency(calls, runs=runs, warmup=3)
    rows = {}
    for key, s in stats.items():
        row = _stats(s)
        base = BASELINES.get(key, "full")
        if key != base:
            pair = paired_speedup(stats[base], s)
            row |= {"speedup": pair.of_medians, "speedup_p10": pair.p10, "speedup_p90": pair.p90, "baseline": base}
        if key in macs:
            row |= {"macs_ratio": macs[key], "theoretical": 1 / macs[key],
                    "realised_over_theoretical": row["speedup"] * macs[key]}
        if key in ("full", "pruned") or key.startswith("pruned round_to"):  # ONNX Runtime's kernels for it
            row["layout"] = layout_summary(optimised_ops(str(variants[key])))
        rows[key] = row
    profiled = {"full": full_path, "pruned": pruned_path, DAZ_FULL: full_path, DAZ_PRUNED: pruned_path}
    print(f"   profiling {', '.join(profiled)} ({profile_runs} runs)", file=sys.stderr, flush=True)
    profiles = profile(profiled, sample, threads, profile_runs, flushed=(DAZ_FULL, DAZ_PRUNED))
    pairs = [_pair(profiles, "full", "pruned", macs["pruned"], model.proto, pruned),
             _pair(profiles, DAZ_FULL, DAZ_PRUNED, macs["pruned"], model.proto, pruned)]
    for p in profiles.values():  # per node: only the cut convs' times are kept (in the pairs' conv tables)
        p.pop("kinds_by_node")
        p.pop("node_ms")
    for path in [full_path, *strict.values()]:
        os.remove(path)
    return {"model": job.name, "categories": report["categories"], "output": report["output"]["classes"],
            "input_shape": list(input_shape), "threads": threads, "runs": runs,
            "chosen": report["search"]["trials"][report["search"]["chosen"]]["setting"],
            "compile_settings": {k: report["settings"].get(k) for k in ("criterion", "compensation", "finetune")}
            | {"round_to": report["settings"]["selection"]["round_to"]},
            "category_fidelity": report["fidelity"].get("category_fidelity"),
            "contract": report["contract"]["message"], "subnormals_flushed": model.subnormals,
            "tiny_weights": {"limit": TINY, "full": tiny_full, "pruned": tiny_pruned},
            "max_output_change": same,
            "removed_heads": list(model.removed_heads), "conditions": runners["full"].conditions,
            "full_macs": full_cost.macs, "pruned_macs": pruned_cost.macs, "rows": rows,
            "control": {"speedup": rows["full A/A"]["speedup"], "p10": rows["full A/A"]["speedup_p10"],
                        "p90": rows["full A/A"]["speedup_p90"]},
            "profile": profiles, "pairs": pairs}


# ---- report ----------------------------------------------------------------------------------------------------------


def _f(v: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{suffix}"


def _defaults(rows: list[dict]) -> str:
    found = {json.dumps(r["compile_settings"], sort_keys=True) for r in rows if "compile_settings" in r}
    if len(found) != 1:
        return "settings per model in latency.json"
    settings = json.loads(found.pop())
    finetune = f", finetune {settings['finetune']} epochs" if settings.get("finetune") else ""
    return (f"criterion {settings['criterion']}, compensation {settings['compensation']}, round_to "
            f"{settings['round_to']}{finetune}")


def summary_table(rows: list[dict]) -> list[str]:
    lines = ["| model | budget (category fidelity) | MACs ratio | theoretical | realised vs like-for-like (p10-p90 of "
             "rounds) | realised / theoretical | A/A band (p10-p90) | full ms (p10-p90) | pruned ms | realised, both "
             "DAZ/FTZ (r/t) | raw source ms (x full's time) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | | | | | |")
            continue
        p, f, raw, c = r["rows"]["pruned"], r["rows"]["full"], r["rows"]["raw source"], r["control"]
        flagged = " **(< 0.85)**" if p["macs_ratio"] <= CUT_HARD and p["realised_over_theoretical"] < REALISED_TARGET \
            else ""
        fidelity = _f(r["category_fidelity"], ".3f")
        d = r["rows"].get(DAZ_PRUNED)
        daz = "" if d is None else f"{d['speedup']:.2f}x ({d['realised_over_theoretical']:.2f})"
        lines.append(f"| {r['model']} | {r['chosen']} ({fidelity}) | {p['macs_ratio']:.3f} | {p['theoretical']:.2f}x | "
                     f"{p['speedup']:.2f}x "
                     f"({p['speedup_p10']:.2f}-{p['speedup_p90']:.2f}) | {p['realised_over_theoretical']:.2f}"
                     f"{flagged} | {c['speedup']:.2f}x ({c['p10']:.2f}-{c['p90']:.2f}) | {f['median_ms']:.1f} "
                     f"({f['p10_ms']:.1f}-{f['p90_ms']:.1f}) | {p['median_ms']:.1f} | {daz} | {raw['median_ms']:.1f} "
                     f"({raw['median_ms'] / f['median_ms']:.2f}x) |")
    return lines


def variant_table(rows: list[dict]) -> list[str]:
    found = [r for r in rows if "error" not in r and any(k.startswith("pruned round_to") for k in r["rows"])]
    if not found:
        return []
    lines = ["", "## Other --round-to at the same alpha (timed in the same rounds)", "",
             "Budget fixed at the alpha the search chose; only --round-to differs. A group whose size is not a "
             "multiple of --round-to is not rounded (attribution/select.py). Kernels: convs ONNX Runtime runs in "
             "NCHWc / plain im2col+GEMM, and the layout reorders it inserts.", "",
             "| model | variant | MACs ratio | theoretical | realised vs like-for-like (p10-p90) | realised / "
             "theoretical | kernels: NCHWc / plain / reorders |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in found:
        keys = ["full", "pruned"] + sorted((k for k in r["rows"] if k.startswith("pruned round_to")),
                                           key=lambda k: int(k.split()[-1]))
        for k in keys:
            v, layout = r["rows"][k], r["rows"][k].get("layout")
            kernels = "" if layout is None else \
                f"{layout['nchwc_convs']} / {layout['plain_convs']} / {layout['reorders']}"
            if k == "full":
                lines.append(f"| {r['model']} | full | 1.000 | 1.00x | 1.00x | | {kernels} |")
                continue
            label = (f"default (round_to {r['compile_settings']['round_to']})" if k == "pruned"
                     else k.removeprefix("pruned "))
            lines.append(f"| {r['model']} | {label} | {v['macs_ratio']:.3f} | {v['theoretical']:.2f}x | "
                         f"{v['speedup']:.2f}x ({v['speedup_p10']:.2f}-{v['speedup_p90']:.2f}) | "
                         f"{v['realised_over_theoretical']:.2f} | {kernels} |")
    return lines


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def profile_section(r: dict, pair: dict) -> list[str]:
    full, pruned = r["profile"][pair["base"]], r["profile"][pair["new"]]
    ratio, excess, row = pair["macs_ratio"], pair["excess_over_ideal_ms"], r["rows"][pair["new"]]
    title = "" if pair["base"] == "full" else f" ({pair['base']} vs {pair['new']})"
    lines = [f"### {r['model']}{title}: {ratio:.3f}x MACs, realised / theoretical "
             f"{row['realised_over_theoretical']:.2f}", "",
             f"Profiled run: {pair['base']} {full['run_ms']:.1f} ms, {pair['new']} {pruned['run_ms']:.1f} ms (ratio "
             f"{full['run_ms'] / pruned['run_ms']:.2f}x; node kernels {full['nodes_ms']:.1f} / "
             f"{pruned['nodes_ms']:.1f} ms). Ideal pruned time at {ratio:.3f}x MACs: {ratio * full['run_ms']:.1f} ms.",
             "",
             "| op kind (ONNX Runtime's optimised graph) | full ms | pruned ms | pruned / full | excess over ideal "
             "ms |",
             "|---|---:|---:|---:|---:|"]
    for c in sorted(excess, key=lambda c: -abs(excess[c])):
        a, b = full["by_category_ms"].get(c, 0.0), pruned["by_category_ms"].get(c, 0.0)
        lines.append(f"| {c} | {a:.2f} | {b:.2f} | {_f(b / a if a else None)} | {excess[c]:+.2f} |")
    counts = sorted(set(full["kinds"]) | set(pruned["kinds"]))
    lines += ["", "Nodes ONNX Runtime runs (full -> pruned): " + ", ".join(
        f"{k} {full['kinds'].get(k, 0)}->{pruned['kinds'].get(k, 0)}" for k in counts
        if full["kinds"].get(k, 0) != pruned["kinds"].get(k, 0) or k.startswith(("nchwc", "Conv", "Fused"))) + "."]
    convs = pair["convs"]

    def moved(a: str, b: str) -> list[dict]:
        return [c for c in convs["changed"] if c["kind"][0] and c["kind"][1] and c["kind"][0].startswith(a)
                and c["kind"][1].startswith(b)]

    def listed(found: list[dict]) -> str:
        shown = ", ".join(f"{_short(c['name'])} {c['in'][0]}->{c['out'][0]} to {c['in'][1]}->{c['out'][1]}"
                          for c in found[:4])
        return f"{len(found)}" + (f" ({shown}{', ...' if len(found) > 4 else ''})" if found else "")

    lines += ["", f"Cut convs: {len(convs['changed'])}; with a kept count off the {convs['block']}-float block: "
              f"{convs['off_block']}; moved from NCHWc to the plain kernel: {listed(moved('nchwc', 'Conv'))}; "
              f"from the plain kernel to NCHWc: {listed(moved('Conv', 'nchwc'))}."]
    timed = [c for c in convs["changed"] if c["ms"][0] and c["ms"][1]]
    if timed:
        conv_full, conv_pruned = sum(c["ms"][0] for c in timed), sum(c["ms"][1] for c in timed)
        conv_ideal = sum(c["ms"][0] * c["macs_ratio"] for c in timed)
        lines += [f"Those cut convs: {conv_full:.1f} -> {conv_pruned:.1f} ms (ideal at their MACs "
                  f"{conv_ideal:.1f} ms); the 6 slowest: " + ", ".join(
                      f"{_short(c['name'])} {c['in'][0]}->{c['out'][0]} to {c['in'][1]}->{c['out'][1]} "
                      f"{c['ms'][0]:.2f}->{c['ms'][1]:.2f} ms (MACs {c['macs_ratio']:.2f})"
                      for c in sorted(timed, key=lambda c: -c["ms"][0])[:6]) + "."]
    return lines + [""]


def denormal_table(rows: list[dict]) -> list[str]:
    found = [r for r in rows if "error" not in r and DAZ_PRUNED in r["rows"]]
    if not found:
        return []
    lines = ["", "## Denormals: stricter like for like", "",
             "Subnormal floats take a slow microcode path on x86 unless the thread runs with denormals-are-zero / "
             f"flush-to-zero (DAZ/FTZ). The loader zeroes weights below {TINY:g}, subnormal ones and the tiny normal "
             "ones whose products are subnormal (rows measured before it did only zeroed the subnormal ones), and it "
             "cannot touch subnormal activations. The "
             "refit rewrites the consumers of cut channels, removing many tiny weights, and cut channels take their "
             "subnormal activations with them: against the baseline as loaded, both count as speed-up. Two stricter "
             f"pairs, timed in the same rounds: **tiny zeroed**, weights below {TINY:g} set to 0 in both models; "
             "**DAZ/FTZ**, both run with denormals flushed by the CPU (the calling thread's MXCSR and ONNX Runtime's "
             "workers). Output change: largest absolute difference from the model as timed above (0: bitwise "
             "identical on the timed image).", "",
             "| model | tiny weights full / pruned | full, tiny zeroed vs full | realised, both tiny zeroed (r/t) | "
             "full DAZ/FTZ vs full | realised, both DAZ/FTZ (p10-p90) | realised / theoretical, DAZ/FTZ | as loaded "
             "| output change (tiny / DAZ) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in found:
        t, rows_ = r["tiny_weights"], r["rows"]
        change = r.get("max_output_change", {})
        if STRICT_PRUNED in rows_:
            z, zp = rows_[STRICT_FULL], rows_[STRICT_PRUNED]
            tiny = (f"{z['speedup']:.2f}x ({z['speedup_p10']:.2f}-{z['speedup_p90']:.2f}) | {zp['speedup']:.2f}x "
                    f"({zp['realised_over_theoretical']:.2f})")
        else:
            tiny = "none | "
        d, dp = rows_[DAZ_FULL], rows_[DAZ_PRUNED]
        changes = "/".join(f"{max(change.get(a, 0.0), change.get(b, 0.0)):.1e}"
                           for a, b in ((STRICT_FULL, STRICT_PRUNED), (DAZ_FULL, DAZ_PRUNED)))
        lines.append(f"| {r['model']} | {t['full']} / {t['pruned']} | {tiny} | {d['speedup']:.2f}x "
                     f"({d['speedup_p10']:.2f}-{d['speedup_p90']:.2f}) | {dp['speedup']:.2f}x ({dp['speedup_p10']:.2f}-"
                     f"{dp['speedup_p90']:.2f}) | {dp['realised_over_theoretical']:.2f} | "
                     f"{rows_['pruned']['realised_over_theoretical']:.2f} | {changes} |")
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    rows = result["rows"]
    lines = ["# Realised ONNX Runtime CPU speed-up of the default cut", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, AVX2 {'yes' if m['avx2'] else 'no'}, AVX-512F "
             f"{'yes' if m['avx512f'] else 'no'} (MLAS NCHWc block {m['nchwc_block']} floats); ONNX Runtime "
             f"{m['onnxruntime']}; load average at start {', '.join(f'{v:.1f}' for v in m['load_average_at_start'])}; "
             f"{result['threads']} intra-op thread(s), {result['runs']} interleaved rounds per model. Generated by "
             f"`benchmarks/latency.py` ({result['seconds']:.0f} s); regenerate with `{result['command']}`.", "",
             "Each model compiled by disasm-compile at defaults (budget search for category fidelity >= 0.9; "
             f"{_defaults(rows)}; corpus: first listed categories, every fourth image calibrates). **full** is the "
             "like-for-like baseline: the model as the loader leaves it (constants folded, subnormal weights flushed, "
             "one head, re-saved), nothing cut. Realised = median(full) / median(pruned), with the p10-p90 of the per-"
             "round ratios; theoretical = 1 / MACs ratio. **A/A band**: the baseline against a second session of "
             "itself, timed in the same rounds: a speed-up inside it is noise. **raw source**: the file as shipped "
             "(no folding, subnormals kept, every head), for reference only.", ""]
    lines += summary_table(rows)
    hard = [r for r in rows if "error" not in r and r["rows"]["pruned"]["macs_ratio"] <= CUT_HARD]
    short = [r for r in hard if r["rows"]["pruned"]["realised_over_theoretical"] < REALISED_TARGET]
    strict = [r for r in hard if DAZ_PRUNED in r["rows"]]

    def both(r: dict) -> str:
        extra = (f" (both with denormals flushed, DAZ/FTZ: {r['rows'][DAZ_PRUNED]['realised_over_theoretical']:.2f})"
                 if DAZ_PRUNED in r["rows"] else "")
        return f"{r['model']} {r['rows']['pruned']['realised_over_theoretical']:.2f}{extra}"

    lines += ["", f"Models cut to {CUT_HARD}x MACs or less: {len(hard)}, realised / theoretical: "
              + ", ".join(both(r) for r in hard) + f". Below {REALISED_TARGET} against the baseline as loaded: "
              f"{len(short)}; with denormals flushed in both: "
              f"{sum(r['rows'][DAZ_PRUNED]['realised_over_theoretical'] < REALISED_TARGET for r in strict)}."]
    lines += denormal_table(rows)
    lines += variant_table(rows)
    lines += ["", "## Where the time goes (ONNX Runtime profiler, full vs pruned)", "",
              "Per op kind of the graph ONNX Runtime runs, median over the profiled runs (profiling adds a little per "
              "node; ratios are what to read). *Excess over ideal* = pruned ms - full ms x MACs ratio: positive rows "
              "are what keeps realised / theoretical below 1; they sum to the profiled run's excess.", ""]
    for r in rows:
        for pair in r.get("pairs", []):
            lines += profile_section(r, pair)
    if result.get("findings"):
        lines += ["## Findings", "", result["findings"].strip(), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only the model with this name (corpus name, or 'shapes_seg')")
    parser.add_argument("--runs", type=int, default=20, help="interleaved timing rounds per model (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--profile-runs", type=int, default=10, help="profiled runs per model (default 10)")
    parser.add_argument("--pruned", type=Path, help="folder of compiled models to reuse, or to compile into")
    parser.add_argument("--round-to-variants", default="", help="also time the chosen alpha at these --round-to "
                        "values, comma-separated (e.g. 16)")
    parser.add_argument("--findings", type=Path, default=FINDINGS, help="hand-written findings appended to the .md")
    parser.add_argument("--render-only", action="store_true", help="rewrite latency.md from latency.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    findings = args.findings.read_text() if args.findings and args.findings.is_file() else None
    if args.render_only:
        result = json.loads((args.out / "latency.json").read_text()) | {"findings": findings}
        write_atomic(args.out / "latency.md", markdown(result).encode())
        return
    start = time.perf_counter()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    round_tos = tuple(int(v) for v in args.round_to_variants.split(",") if v)
    result = {"machine": machine(), "threads": args.threads, "runs": args.runs, "profile_runs": args.profile_runs,
              "command": "python benchmarks/latency.py " + " ".join(sys.argv[1:]), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.pruned or Path(tmp)
        cache = folder / "attribution-cache"
        for job in jobs():
            if args.only and args.only not in (job.name, job.key):
                continue
            print(f"== {job.name}", file=sys.stderr, flush=True)
            try:
                result["rows"].append(measure_job(job, folder, cache, args.threads, args.runs, args.profile_runs,
                                                  round_tos))
            except Exception as e:  # one model's failure is a row of the table, not the end of the benchmark
                if os.environ.get("DISASM_DEBUG"):
                    raise
                result["rows"].append({"model": job.name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            row = result["rows"][-1]
            print("   " + (row.get("error") or "speed-up {speedup:.2f}x at {macs_ratio:.3f}x MACs".format(
                **row["rows"]["pruned"])), file=sys.stderr, flush=True)
    result["seconds"] = time.perf_counter() - start
    result["findings"] = findings
    suffix = f"-{args.only.split()[0]}" if args.only else ""
    write_atomic(args.out / f"latency{suffix}.json", (json.dumps(result, indent=1) + "\n").encode())
    write_atomic(args.out / f"latency{suffix}.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
