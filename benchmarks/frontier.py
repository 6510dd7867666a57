"""The compression frontier on the real-model corpus: per model and method, the smallest MACs ratio that keeps
category fidelity >= 0.9 on images the calibration did not see.

    python benchmarks/frontier.py                        # writes benchmarks/results/frontier.{json,md,png}
    python benchmarks/frontier.py --only sinet-portrait --methods disassembler,sequential --update

Per model of ../shared/corpus/corpus.json (first listed categories) and the shipped example: calibration = every
fourth image of the model's folder (the example: its calib folder), judged = the rest (the example: its eval
folder). One attribution run with moments per model (cached in --cache). Each method is a budget search exactly like
disasm-compile's (binary search over a ladder, assuming fidelity falls as the cut grows; the uncut model when nothing
meets the target): a trial is selection, compensation, surgery and ONNX Runtime inference on the judged images.

Methods (rows):
- disassembler: the Disassembler alone (its scores, one threshold alpha for every group over ALPHAS, independent
  least-squares refit from attribution moments): disasm-compile's default until this table chose another.
- sequential: the same keep-sets, consumers refitted in depth order on the pruned network's inputs (attribution.refit).
- sequential-all: the same, and every conv behind a cut refitted too (scope 'downstream').
- mean, none: the same keep-sets with the mean fold, without compensation.
- global, global+sequential: channels best Disassembler score first, counts per group from the loss-per-MAC greedy
  (attribution.allocate) at a ladder of MAC targets; independent or sequential refit.
- taylor, magnitude, l1, random: other criteria choosing the channels within the Disassembler's per-group counts at
  each alpha (equal MACs), independent refit; disassembler+taylor: their combination (attribution.baselines).
- taylor+sequential, disassembler+taylor+sequential: those channels, sequential refit. The latter is today's
  disasm-compile default (DEFAULT).
- finetune-1, finetune-3: today's default, each cut model then finetuned for 1 or 3 epochs on the calibration images
  with the full model as teacher (attribution.finetune; the search judges the finetuned models).
Wall time: the whole search (every trial: compensation, surgery, inference on the judged images), 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from disasm.attribution import cache as attribution_cache
from disasm.attribution.allocate import LossCurves, MacModel, allocate, mac_model
from disasm.attribution.baselines import criterion_scores
from disasm.attribution.cache import images_digest
from disasm.attribution.calibration import cache_keys, calibrate
from disasm.attribution.compensate import DEFAULT_RIDGE
from disasm.attribution.disassembler import Attribution, AttributionSettings
from disasm.attribution.finetune import TeacherTargets
from disasm.attribution.select import SelectionSettings, group_scores, select_channels, select_with_budget
from disasm.compiler.channels import ChannelAnalysis, analyse
from disasm.compiler.cost import model_cost
from disasm.compiler.files import write_atomic
from disasm.compiler.images import load_images, load_masks, parse_size, preprocess, scan_images
from disasm.compiler.load import Model, load_model
from disasm.compiler.pipeline import (ALPHAS, MIN_FIDELITY, Calibration, assemble, compensate, every_channel,
                                      output_layout, parse_categories)
from disasm.runtime.fidelity import evaluate_fidelity
from disasm.runtime.onnxrt import OnnxRuntimeRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus_models import CORPUS, corpus_entries, flag, load_corpus_model, split_images  # noqa: E402

EXAMPLE = "shapes_seg (shipped example)"
# MAC targets of the global allocation, lightest first (its ladder plays the role of ALPHAS)
MACS_TARGETS = (0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


@dataclass(frozen=True)
class Method:
    name: str
    criterion: str = "disassembler"
    allocation: str = "threshold"   # threshold (alpha per group) or global (MAC target)
    compensation: str = "lsq"       # none, mean, lsq, sequential
    ridge: float = DEFAULT_RIDGE
    scope: str = "cut"              # sequential: refit the cut consumers, or every conv downstream of a cut
    finetune: int = 0               # epochs of label-free finetuning after the cut

    @property
    def ladder(self) -> tuple[float, ...]:
        return MACS_TARGETS if self.allocation == "global" else ALPHAS


METHODS = {m.name: m for m in [
    Method("disassembler"), Method("sequential", compensation="sequential"),
    Method("sequential-all", compensation="sequential", scope="downstream"),
    Method("mean", compensation="mean"), Method("none", compensation="none"),
    Method("global", allocation="global"), Method("global+sequential", allocation="global", compensation="sequential"),
    Method("taylor", "taylor"), Method("magnitude", "magnitude"), Method("l1", "l1"), Method("random", "random"),
    Method("disassembler+taylor", "disassembler+taylor"),
    Method("taylor+sequential", "taylor", compensation="sequential"),
    Method("disassembler+taylor+sequential", "disassembler+taylor", compensation="sequential"),
    Method("finetune-1", "disassembler+taylor", compensation="sequential", finetune=1),
    Method("finetune-3", "disassembler+taylor", compensation="sequential", finetune=3)]}
DEFAULT = "disassembler+taylor+sequential"  # compiler.pipeline.CRITERION with COMPENSATION


@dataclass
class Bench:
    """One model with its calibration and judged images, attribution and the full model's answers."""

    name: str
    model: Model
    analysis: ChannelAnalysis
    categories: list[str]
    calibration: np.ndarray
    judged: np.ndarray
    masks: np.ndarray | None
    attribution: Attribution
    attribution_seconds: float
    full_outputs: list[np.ndarray]
    input_shape: tuple[int, ...]
    full_macs: int
    batch_size: int
    threads: int | None
    macs: MacModel | None = None
    curves: dict[str, LossCurves] = field(default_factory=dict)
    trials: dict[tuple[str, float], "Trial"] = field(default_factory=dict)  # (method, setting) -> measured
    teacher: Any = None  # the full model's targets on the calibration images (finetuning), computed once

    def full(self, x: np.ndarray) -> np.ndarray:
        for i in range(len(self.judged)):
            if np.shares_memory(x, self.judged[i:i + 1]) or np.array_equal(x, self.judged[i:i + 1]):
                return self.full_outputs[i]
        raise ValueError("not a judged image")


def load_bench(name: str, cache: Path, threads: int | None) -> Bench:
    if name == EXAMPLE:
        model = load_model(ROOT / "examples" / "shapes_seg.onnx")
        data = ROOT / "examples" / "data"
        calib_paths = scan_images(data / "calib").paths
        evaluation = scan_images(data / "eval" / "images")
        judged_paths, size = evaluation.paths, model.image_size
        masks = load_masks(data / "eval" / "masks", evaluation, size)
        categories = ["circle", "star"]
    else:
        entry = next(e for e in corpus_entries(CORPUS) if e["name"] == name)
        model = load_corpus_model(CORPUS, entry)
        size = model.image_size or parse_size(flag(entry, "--input-size"))
        calib_paths, judged_paths = split_images(CORPUS / entry["images"])
        masks = None
        categories = entry["categories"][0]
    categories = parse_categories(",".join(categories), model)
    calibration = preprocess(load_images(calib_paths, size, "stretch"), model.preprocessing)
    judged = preprocess(load_images(judged_paths, size, "stretch"), model.preprocessing)
    analysis = analyse(model.proto)
    batch = AttributionSettings().batch_size if model.input_shape[0] is None else 1
    settings = AttributionSettings(batch_size=batch)
    key = cache_keys(model, analysis, images_digest(calib_paths), settings, moments=True)[0]
    attribution = attribution_cache.load(cache, key)
    timing = cache / f"{key.digest()}.seconds"  # how long the cached run took, for the table
    if attribution is None:
        start = time.perf_counter()
        attribution = calibrate(model, analysis, calibration, settings, "cpu", moments=True)
        attribution_cache.save(cache, key, attribution)
        write_atomic(timing, f"{time.perf_counter() - start:.1f}\n".encode())
    seconds = float(timing.read_text()) if timing.exists() else float("nan")
    with OnnxRuntimeRunner(model.proto.SerializeToString(), threads=threads or None) as runner:
        outputs = [runner.infer({model.input_name: judged[i:i + 1]})[0] for i in range(len(judged))]
    input_shape = (1, *judged.shape[1:])
    return Bench(name, model, analysis, categories, calibration, judged, masks, attribution, seconds, outputs,
                 input_shape, model_cost(model.proto, input_shape).macs, batch, threads)


@dataclass
class Trial:
    setting: float
    macs_ratio: float
    category_fidelity: float | None
    per_category: dict[str, Any]
    seconds: float
    levels: int | None = None


def specialise(bench: Bench, method: Method, setting: float, cut: bool = True) -> tuple[onnx.ModelProto, Any, int | None]:
    """pipeline.specialise with the method's criterion, allocation and compensation (alpha or MAC target)."""
    model, analysis, attribution = bench.model, bench.analysis, bench.attribution
    layout = output_layout(model, analysis, bench.categories)
    selection = SelectionSettings() if method.allocation == "global" else SelectionSettings(alpha=setting)
    scores = group_scores(attribution, analysis, layout.targets, selection)
    if method.allocation == "global":
        if bench.macs is None:
            bench.macs = mac_model(model.proto, analysis, bench.input_shape)
        keep_sets, _, curves = allocate(model.proto, analysis, attribution, scores, selection, layout.rows,
                                        bench.macs, setting, curves=bench.curves.get(method.criterion))
        bench.curves[method.criterion] = curves
    else:
        keep_sets, choices = select_channels(analysis, scores, selection, layout.rows)
        if method.criterion != "disassembler":
            baseline = criterion_scores(method.criterion, model.proto, analysis, attribution, layout.targets,
                                        selection)
            keep_sets = select_with_budget(baseline, choices, keep_sets)
    if not cut:
        keep_sets = every_channel(analysis, keep_sets)
    calibration = Calibration(bench.calibration, bench.batch_size, threads=bench.threads, finetune=method.finetune)
    refit = {"ridge": method.ridge} | ({"scope": method.scope} if method.compensation == "sequential" else {})
    replacements, _, levels = compensate(model, analysis, keep_sets, attribution, method.compensation, calibration,
                                         **refit)
    if method.finetune and cut and bench.teacher is None:  # the full model's targets, once per model
        bench.teacher = TeacherTargets(model.proto, bench.calibration, layout.plan.sources, model.output_kind,
                                       model.class_axis, batch_size=bench.batch_size)
    metadata = {"disasm.classes": ",".join(layout.plan.names), "disasm.background": layout.plan.none or ""}
    pruned = assemble(model, analysis, layout, keep_sets, replacements, metadata,
                      replace(calibration, teacher=bench.teacher) if cut else None)
    return pruned, layout.plan, levels


def trial(bench: Bench, method: Method, setting: float, cut: bool = True) -> Trial:
    if cut and (method.name, setting) in bench.trials:
        return bench.trials[(method.name, setting)]
    start = time.perf_counter()
    pruned, plan, levels = specialise(bench, method, setting, cut)
    runner = OnnxRuntimeRunner(pruned.SerializeToString(), threads=bench.threads or None)
    name = bench.model.input_name
    fidelity = evaluate_fidelity(bench.full, lambda x: runner.infer({name: x})[0], bench.judged, bench.masks,
                                 bench.model.classes, list(plan.names), plan.none, bench.model.output_kind, plan.mode,
                                 class_axis=bench.model.class_axis)
    ratio = model_cost(pruned, bench.input_shape).macs / bench.full_macs
    result = Trial(setting if cut else -1.0, ratio, fidelity.get("category_fidelity"),
                   fidelity.get("per_category", {}), time.perf_counter() - start, levels)
    if cut:
        bench.trials[(method.name, setting)] = result
    return result


def equal_budget(bench: Bench, rows: dict[str, dict], methods: list[str], log=None) -> list[dict[str, Any]]:
    """Fidelity of every threshold method at the same alphas (same per-group counts, hence equal MACs for the
    criteria and equal keep-sets for the reconstructions): the alpha the Disassembler alone chose and the next larger
    one (the first two of ALPHAS where it chose none)."""
    chosen = rows.get("disassembler", {}).get("setting", -1.0)
    start = ALPHAS.index(chosen) if chosen in ALPHAS else 0
    out = []
    for alpha in ALPHAS[start:start + 2]:
        cells = {}
        for name in methods:
            if METHODS[name].allocation != "threshold":
                continue
            t = trial(bench, METHODS[name], alpha)
            cells[name] = {"macs_ratio": t.macs_ratio, "category_fidelity": t.category_fidelity}
            if log:
                log(f"  equal {name:16s} {alpha:<6} MACs {t.macs_ratio:.3f}  fidelity {_f(t.category_fidelity)}")
        out.append({"alpha": alpha, "methods": cells})
    return out


def search(bench: Bench, method: Method, target: float = MIN_FIDELITY, log=None) -> dict[str, Any]:
    """The budget search of compiler.pipeline.search_budget over the method's ladder."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    ladder = method.ladder
    trials: list[Trial] = []
    best = None
    lo, hi = -1, len(ladder)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t = trial(bench, method, ladder[mid])
        trials.append(t)
        if log:
            log(f"  {method.name:18s} {ladder[mid]:<6} MACs {t.macs_ratio:.3f}  fidelity {_f(t.category_fidelity)}  "
                f"{t.seconds:.0f}s")
        if t.category_fidelity is not None and t.category_fidelity >= target:
            lo, best = mid, t
        else:
            hi = mid
    if best is None:
        best = Trial(-1.0, 1.0, None, {}, 0.0)  # uncut: every channel kept (fidelity 1 up to rounding)
    return {"method": method.name, "criterion": method.criterion, "allocation": method.allocation,
            "compensation": method.compensation, "macs_ratio": best.macs_ratio, "setting": best.setting,
            "category_fidelity": best.category_fidelity, "met": best.setting != -1.0,
            "seconds": round(time.perf_counter() - start, 1), "load": [round(load, 1), round(os.getloadavg()[0], 1)],
            "trials": [t.__dict__ for t in trials]}


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown(models: list[dict], methods: list[str]) -> str:
    lines = ["# Compression frontier on the real-model corpus", "",
             "Smallest MACs ratio (pruned / full) whose category fidelity on the judged images is >= 0.9, found by "
             "disasm-compile's budget search for each method; `uncut` where no trial met it. Calibration: every "
             "fourth image of the model's folder; judged: the rest (the shipped example: its own calib and eval "
             "folders). Attribution and compensation see only the calibration images. **The defaults recommended "
             "from this table were chosen on these same judged images** (there are no others: 12-13 per street/people "
             "model, 4 for PAN), so the winning row is optimistic by selection; the corpus is small and the "
             "differences between rows of a few percent of MACs are within one ladder step. Generated by "
             "`benchmarks/frontier.py`; seconds are wall time of the whole search (all trials: compensation, surgery, "
             "ONNX Runtime inference on the judged images) on 2 CPU cores shared with other work, so only their "
             "order of magnitude is meaningful. Every row follows disasm-compile's binary search, which assumes "
             "fidelity falls as alpha rises; where it does not, the search can stop one ladder step early. Today's "
             f"disasm-compile default is the row {DEFAULT}; `disassembler` was the default before this table. Kept "
             "channel counts follow `--round-to auto` (multiples of 8 where a group's size is one, else of 4, else "
             "any). The rows of sinet-portrait, sinet-portrait-softmax, twinlitenet-drivable-lanes and the example "
             "were measured with it; the other models' groups are all multiples of 8 (or single channels), where auto "
             "and the former rounding to 8 keep the same counts, so their rows, measured before, hold. All rows "
             "predate the loader zeroing weights below 1e-30 (road-segmentation, SINet, TwinLiteNet have such "
             "weights); the default's cuts and fidelities of those models came out identical after it (corpus.md).",
             ""]
    header = "| method | " + " | ".join(m["model"] for m in models) + " |"
    lines += ["Cells: MACs ratio (category fidelity there).", "", header, "|---|" + "---:|" * len(models)]
    for name in methods:
        cells = []
        for m in models:
            row = m["methods"].get(name)
            if row is None:
                cells.append("")
            elif "error" in row:
                cells.append("error")
            else:
                cells.append(f"{row['macs_ratio']:.3f} ({row['category_fidelity']:.3f})" if row["met"] else "uncut")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Against today's default, {DEFAULT} (smaller MACs ratio at the target = better; `uncut` counts as "
              "1.0):", ""]
    for name in methods:
        if name == DEFAULT:
            continue
        better = worse = same = 0
        for m in models:
            ours, base = m["methods"].get(name), m["methods"].get(DEFAULT)
            if not ours or not base or "error" in ours or "error" in base:
                continue
            a = ours["macs_ratio"] if ours["met"] else 1.0
            b = base["macs_ratio"] if base["met"] else 1.0
            better, worse, same = better + (a < b - 1e-9), worse + (a > b + 1e-9), same + (abs(a - b) <= 1e-9)
        lines.append(f"- {name}: smaller on {better}, equal on {same}, larger on {worse} of the models")
    loads = [v for m in models for r in m["methods"].values() if isinstance(r, dict) for v in r.get("load", [])]
    load = f" (1-minute load average of the machine {min(loads):.1f}-{max(loads):.1f})" if loads else ""
    lines += ["", f"Seconds per search{load}:", "", header, "|---|" + "---:|" * len(models)]
    for name in methods:
        cells = [f"{m['methods'][name]['seconds']:.0f}" if name in m["methods"] and "error" not in m["methods"][name]
                 else "" for m in models]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Equal budgets", "",
              "Category fidelity of the threshold methods at the same alphas: the one the Disassembler alone chose "
              "and the next larger one. Reconstructions (disassembler = independent lsq, sequential, sequential-all, "
              "mean, none) share the keep-sets; criteria keep the Disassembler's count per group (equal MACs).", ""]
    for m in models:
        equal = m.get("equal_budget")
        if not equal or "error" in equal:
            continue
        names = [n for n in methods if n in equal[0]["methods"]]
        lines += [f"**{m['model']}**", "", "| alpha | MACs | " + " | ".join(names) + " |",
                  "|---:|---:|" + "---:|" * len(names)]
        for e in equal:
            macs = e["methods"][names[0]]["macs_ratio"]
            lines.append(f"| {e['alpha']} | {macs:.3f} | " +
                         " | ".join(_f(e["methods"][n]["category_fidelity"]) for n in names) + " |")
        lines.append("")
    lines += ["## Trials", ""]
    for m in models:
        lines += [f"**{m['model']}** ({', '.join(m['categories'])}; {m['calibration_images']} calibration / "
                  f"{m['judged_images']} judged images; attribution {m['attribution_seconds']:.0f} s when the cache "
                  f"was filled, under whatever load the machine had then):", ""]
        for name in methods:
            row = m["methods"].get(name)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"- {name}: error: {row['error']}")
                continue
            lines.append(f"- {name}: " + "; ".join(
                f"{t['setting']}: {t['macs_ratio']:.3f}x {_f(t['category_fidelity'])}" for t in row["trials"]))
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(models: list[dict], methods: list[str], path: Path) -> None:
    """A methods x models map of the smallest MACs ratio meeting the target (darker = smaller model), annotated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.full((len(methods), len(models)), np.nan)
    labels = [["" for _ in models] for _ in methods]
    for i, name in enumerate(methods):
        for j, m in enumerate(models):
            row = m["methods"].get(name)
            if row is None:
                continue
            if "error" in row:
                labels[i][j] = "error"
            elif not row["met"]:
                labels[i][j] = "uncut"
            else:
                values[i, j] = row["macs_ratio"]
                labels[i][j] = f"{row['macs_ratio']:.3f}"
    fig, ax = plt.subplots(figsize=(1.3 * len(models) + 3, 0.42 * len(methods) + 1.6))
    image = ax.imshow(values, cmap="viridis", vmin=0.4, vmax=1.0, aspect="auto")
    for i in range(len(methods)):
        for j in range(len(models)):
            dark = not np.isnan(values[i, j]) and values[i, j] < 0.75
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([m["model"].split(" ")[0] for m in models], rotation=25, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods, fontsize=7)
    ax.set_title("smallest MACs ratio with category fidelity >= 0.9 on judged images", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "disasm-frontier-cache",
                        help="attribution cache (one run per model and calibration set)")
    parser.add_argument("--only", help="comma-separated model names (default: every corpus model and the example)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="frontier", help="output file stem")
    parser.add_argument("--update", action="store_true",
                        help="add these methods to the models of an existing <name>.json instead of starting anew")
    parser.add_argument("--render", action="store_true", help="only rewrite <name>.md and .png from <name>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.out / f"{args.name}.json"
    if args.render:
        render(json.loads(path.read_text())["models"], args.out, args.name)
        return
    names = [e["name"] for e in corpus_entries(CORPUS)] + [EXAMPLE]
    if args.only:
        names = [n for n in names if n in args.only.split(",") or n.split(" ")[0] in args.only.split(",")]
    methods = args.methods.split(",")
    previous = {m["model"]: m for m in json.loads(path.read_text())["models"]} if args.update and path.exists() else {}
    models = [m for n, m in previous.items() if n not in names]
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        bench = load_bench(name, args.cache, args.threads)
        row = previous.get(name) or {"model": name, "methods": {}}
        row.update({"categories": bench.categories, "calibration_images": len(bench.calibration),
                    "judged_images": len(bench.judged)})
        if not np.isnan(bench.attribution_seconds) or "attribution_seconds" not in row:
            row["attribution_seconds"] = bench.attribution_seconds
        for method in methods:
            try:
                row["methods"][method] = search(bench, METHODS[method],
                                                log=lambda s: print(s, file=sys.stderr, flush=True))
            except Exception as e:  # one method's failure is a cell of the table, not the end of the benchmark
                row["methods"][method] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                print(f"  {method}: {row['methods'][method]['error']}", file=sys.stderr, flush=True)
        try:
            equal = equal_budget(bench, row["methods"], methods, log=lambda s: print(s, file=sys.stderr, flush=True))
            old = {e["alpha"]: e for e in row.get("equal_budget", []) if isinstance(e, dict) and "alpha" in e}
            for e in equal:
                old.setdefault(e["alpha"], {"alpha": e["alpha"], "methods": {}})["methods"].update(e["methods"])
            row["equal_budget"] = [old[a] for a in sorted(old)]
        except Exception as e:
            row["equal_budget"] = {"error": f"{type(e).__name__}: {e}"}
        models.append(row)
        write_atomic(path, (json.dumps({"models": models}, indent=2) + "\n").encode())
    order = [e["name"] for e in corpus_entries(CORPUS)] + [EXAMPLE]
    models.sort(key=lambda m: order.index(m["model"]) if m["model"] in order else len(order))
    write_atomic(path, (json.dumps({"models": models}, indent=2) + "\n").encode())
    render(models, args.out, args.name)


def render(models: list[dict], out: Path, name: str) -> None:
    shown = [m for m in METHODS if any(m in r["methods"] for r in models)]
    write_atomic(out / f"{name}.md", markdown(models, shown).encode())
    plot(models, shown, out / f"{name}.png")


if __name__ == "__main__":
    main()
