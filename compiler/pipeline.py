"""The compile flow as one library function: load -> attribute -> search the budget -> prune -> measure -> report.

`compile_model(request)` does everything `disasm-compile` does, without argparse: the CLI parses arguments into a
`Request`, calls it and prints the `Report`. Benchmarks call it directly. This module only orchestrates; every
algorithm lives in compiler/, attribution/ and runtime/.

The budget: unless `--alpha` or `--keep-ratio` fix it, the selection threshold is searched over `ALPHAS` (larger
alpha, fewer channels) for the smallest model whose category fidelity on the judged images (never used by attribution
or compensation) is at least `min_fidelity`. A trial is selection, compensation (by default the sequential refit, run
on the calibration images), surgery, finetuning when `--finetune` asks for it, and inference on the judged images,
from the cached attribution. When no trial meets the target, the uncut model (every channel kept, the output still
"chosen or none") is written, and the report says so on its first line.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disasm.attribution import cache as attribution_cache
from disasm.attribution.baselines import CRITERIA, criterion_scores
from disasm.attribution.cache import CacheKey, images_digest
from disasm.attribution.calibration import cache_keys, calibrate
from disasm.attribution.compensate import METHODS as COMPENSATIONS
from disasm.attribution.compensate import consumer_losses, lsq_compensation, mean_compensation
from disasm.attribution.disassembler import Attribution, AttributionSettings
from disasm.attribution.refit import sequential_compensation
from disasm.attribution.select import GroupChoice, SelectionSettings, group_scores, select_channels, select_with_budget
from disasm.compiler.channels import ChannelAnalysis, analyse
from disasm.compiler.cost import model_cost
from disasm.compiler.errors import DisasmError
from disasm.compiler.images import ImageFolder, load_images, load_masks, parse_size, preprocess, scan_images
from disasm.compiler.labels import LabelSet, match_categories
from disasm.compiler.load import Model, Overrides, flush_subnormals, load_model, write_onnx
from disasm.compiler.outputs import OutputPlan, add_output_head, plan_outputs
from disasm.compiler.prune import prune
from disasm.compiler.transaction import OutputTransaction, deferred_interrupts, raise_if_interrupted
from disasm.runtime.fidelity import evaluate_fidelity
from disasm.runtime.latency import measure_latency, speedup
from disasm.runtime.onnxrt import OnnxRuntimeRunner
from disasm.runtime.tensorrt import build_engine, save_engine, trt_available, trt_module

FRAGILE_LOSS = 0.05  # a cut group is fragile when a consumer still loses >5% of its output energy after compensation
MIN_FIDELITY = 0.9   # default contract: mean IoU of the chosen categories against the full model's own answers
# Selection thresholds the budget search tries, lightest cut first. Scores are normalised per group to a maximum of
# 1, so the ladder spans "cut only the channels that never matter" to "keep only the strongest tenth".
ALPHAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
SEARCH_TRIALS = len(ALPHAS).bit_length()  # trials of the binary search, at most
HOLD_OUT_EVERY = 4   # without --eval-images, every fourth calibration image is held out for judging
# Defaults chosen by benchmarks/results/frontier.md: at the fidelity target, the mean of the Disassembler and Taylor
# scores with the sequential refit cut no corpus model less than the Disassembler with the independent refit, and 3
# of 8 more (road 0.928x -> 0.867x MACs, PAN 0.760x -> 0.685x, TwinLiteNet 0.612x -> 0.585x). Finetuning is off by
# default: on 2-5 calibration images it moved no model's frontier and made BodyPix's cuts worse on the judged images.
CRITERION = "disassembler+taylor"
COMPENSATION = "sequential"


@dataclass(frozen=True)
class Request:
    """Everything a compile needs; the CLI fills it from the command line."""

    model: Path
    categories: str
    images: Path
    out: Path | None = None
    labels: str | None = None
    overrides: Overrides = field(default_factory=Overrides)
    eval_images: Path | None = None
    masks: Path | None = None
    recursive: bool = False
    force: bool = False
    cache: Path | None = None
    no_cache: bool = False
    input_size: str | None = None
    resize: str = "stretch"
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    device: str | None = None
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    budget_fixed: bool = False      # --alpha or --keep-ratio given: no search
    min_fidelity: float = MIN_FIDELITY
    others: str = "chosen-or-none"
    criterion: str = CRITERION
    compensate: str = COMPENSATION
    finetune: int = 0               # epochs of label-free finetuning of every cut trial (attribution.finetune)
    runs: int = 30
    threads: int | None = None
    trt_target: str | None = None
    engines: bool = True
    reports: bool = False           # also write report.json, report.md and report.png into the output set (the CLI)


@dataclass
class Report:
    """What a compile measured and decided; `to_dict()` is report.json."""

    model: dict[str, Any]
    categories: list[str]
    output: dict[str, Any]
    out_dir: str
    contract: dict[str, Any]
    fidelity: dict[str, Any]
    search: dict[str, Any]
    cost: dict[str, Any]
    latency: dict[str, Any]
    channels: dict[str, Any]
    images: dict[str, Any]
    calibration: dict[str, Any]
    attribution: dict[str, Any]
    compensation: dict[str, Any]
    settings: dict[str, Any]
    engines: dict[str, Any] | None
    stage_seconds: dict[str, float]

    @property
    def kept_classes(self) -> list[str]:
        return self.output["classes"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"kept_classes": self.kept_classes}


class Stages:
    """Progress bars and wall-clock time per stage (recorded in the report)."""

    def __init__(self, quiet: bool = True):
        self.console = Console(stderr=True, quiet=quiet)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        start = time.perf_counter()
        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=total or 1)
            yield lambda done, _total=None: progress.update(task, completed=done)
            progress.update(task, completed=total or 1)
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


@dataclass(frozen=True)
class Calibration:
    """What the refit and finetuning that run per trial need besides the attribution: the calibration images
    (preprocessed, never the judged ones) and how to run them."""

    inputs: np.ndarray
    batch_size: int = 1
    device: str = "cpu"
    threads: int | None = None
    finetune: int = 0                # epochs
    teacher: Any = None              # attribution.finetune.TeacherTargets, computed once per compile


@dataclass
class Specialised:
    """A category-specialised model and the decisions that produced it."""

    pruned: onnx.ModelProto
    keep_sets: dict[int, np.ndarray]
    choices: list[GroupChoice]
    plan: OutputPlan
    compensation_fallbacks: list[str]  # consumers the least-squares refit could not model: folded by mean
    output_loss: dict[int, float]      # per cut group: worst share of a consumer's output energy lost (moments only)
    class_conv_blocked: str | None     # why the class conv could not be sliced (classes taken at the output)
    finetune: list[dict[str, Any]] = field(default_factory=list)  # per epoch: loss, kept, seconds


def class_output_blocker(analysis: ChannelAnalysis) -> str | None:
    """Why the class conv cannot be sliced to the output's classes (they are then taken at the output), or None."""
    if analysis.class_group is None:
        return "no single conv makes the class scores"
    blocked = analysis.groups[analysis.class_group].blocked
    return blocked[0] if blocked else None


@dataclass(frozen=True)
class OutputLayout:
    """How the class conv meets the output plan: sliced to the plan's classes, or kept whole with every class
    gathered at the output (a Softmax over the classes follows it, say)."""

    plan: OutputPlan
    blocked: str | None  # why the class conv could not be sliced, or None
    rows: np.ndarray     # the class conv's rows in the pruned model, as full-model class ids

    @property
    def sliced(self) -> bool:
        """Whether the class conv's rows are the output's channels (else a head takes them apart at the output)."""
        return self.blocked is None and self.plan.single_sources is not None

    @property
    def targets(self) -> list[int]:
        """The classes whose channels the output needs: those of its channels. A "none" channel is the max of every
        class not chosen, so each of them must still win where the full model answers it (else a road pixel turns
        car)."""
        return sorted({k for sources in self.plan.sources for k in sources})


def output_layout(model: Model, analysis: ChannelAnalysis, categories: list[str],
                  others: str = "chosen-or-none") -> OutputLayout:
    plan = plan_outputs(model.classes, categories, model.background, model.output_kind, others)
    blocked = class_output_blocker(analysis)
    if blocked is not None:
        rows = np.arange(len(model.classes))  # every class, in the model's order
    elif plan.single_sources is not None:
        rows = plan.single_sources  # exactly the output's classes
    else:
        rows = plan.row_order  # every class, reordered so that one Split takes the output's channels apart
    return OutputLayout(plan, blocked, rows)


def every_channel(analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The uncut keep-sets: every channel of every group, the class conv's rows as the layout keeps them."""
    return {g: (np.arange(analysis.groups[g].size) if g != analysis.class_group else keep)
            for g, keep in keep_sets.items()}


def compensate(model: Model, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray], attribution: Attribution,
               method: str, calibration: Calibration | None, **refit: Any) -> tuple[dict | None, list[str], Any]:
    """New weights for the consumers of cut channels by `method` (COMPENSATIONS): (replacements, the consumers
    folded by mean instead, the sequential refit's levels). `refit`: ridge (lsq, sequential) and scope (sequential)."""
    if method == "mean":
        return mean_compensation(model.proto, analysis, keep_sets, attribution), [], None
    if method == "lsq":
        return (*lsq_compensation(model.proto, analysis, keep_sets, attribution, **refit), None)
    if method == "sequential":
        if calibration is None:
            raise ValueError("the sequential refit needs the calibration images")
        import torch

        with torch.no_grad():
            result = sequential_compensation(model.proto, analysis, keep_sets, calibration.inputs,
                                             device=calibration.device, batch_size=calibration.batch_size,
                                             threads=calibration.threads, **refit)
        return result.replacements, result.fallbacks, result.levels
    return None, [], None


def assemble(model: Model, analysis: ChannelAnalysis, layout: OutputLayout, keep_sets: dict[int, np.ndarray],
             replacements: dict | None, metadata: dict[str, str], calibration: Calibration | None = None,
             history: list[dict[str, Any]] | None = None) -> onnx.ModelProto:
    """The surgery, the chosen-or-none head where the class conv keeps every class, `calibration.finetune` epochs of
    label-free finetuning when given (attribution.finetune; per epoch into `history`), and last the loader's rule
    for tiny weights (refitted and trained weights obey it too)."""
    pruned = prune(model.proto, analysis, keep_sets, metadata=metadata, replacements=replacements)
    if not layout.sliced:
        pruned = add_output_head(pruned, layout.plan, model.class_axis, layout.rows)
    if calibration is not None and calibration.finetune > 0:
        from disasm.attribution.finetune import finetune

        pruned = finetune(pruned, model.proto, calibration.inputs, layout.plan.sources, model.output_kind,
                          model.class_axis, calibration.finetune, device=calibration.device, history=history,
                          teacher=calibration.teacher)
    return flush_subnormals(pruned)[0]


def specialise(model: Model, analysis: ChannelAnalysis, attribution: Attribution, categories: list[str],
               selection: SelectionSettings, compensation: str, settings: dict[str, Any],
               criterion: str = "disassembler", others: str = "chosen-or-none", cut: bool = True,
               calibration: Calibration | None = None) -> Specialised:
    """Keep-sets for `categories` (plus background), compensation, the surgery, the output head with
    self-describing metadata, and finetuning when `calibration.finetune` asks for it. A criterion other than the
    Disassembler picks its own channels within the Disassembler's per-group budget. With `cut` False every channel is
    kept (the uncut model, same output, never finetuned). The sequential refit and finetuning need `calibration`."""
    layout = output_layout(model, analysis, categories, others)
    plan = layout.plan
    scores = group_scores(attribution, analysis, layout.targets, selection)
    keep_sets, choices = select_channels(analysis, scores, selection, layout.rows)
    if criterion != "disassembler":
        baseline = criterion_scores(criterion, model.proto, analysis, attribution, layout.targets, selection)
        keep_sets = select_with_budget(baseline, choices, keep_sets)
    if not cut:
        keep_sets = every_channel(analysis, keep_sets)
        choices = [replace(c, kept=c.size, padded=0, reason=c.reason or "uncut: no trial met the fidelity target")
                   if c.group != analysis.class_group else c for c in choices]
    replacements, fallbacks, _ = compensate(model, analysis, keep_sets, attribution, compensation, calibration)
    metadata = {"disasm.classes": ",".join(plan.names), "disasm.background": plan.none or "",
                "disasm.output": model.output_kind, **model.preprocessing.metadata(),
                "disasm.source_sha256": model.sha256, "disasm.settings": json.dumps(settings, sort_keys=True)}
    history: list[dict[str, Any]] = []  # finetuning: cut trials only (the uncut model is the full one)
    pruned = assemble(model, analysis, layout, keep_sets, replacements, metadata, calibration if cut else None,
                      history)
    losses = consumer_losses(model.proto, analysis, keep_sets, attribution, replacements)
    return Specialised(pruned, keep_sets, choices, plan, fallbacks, losses, layout.blocked, history)


def parse_categories(text: str, model: Model) -> list[str]:
    """The requested object classes, in the model's output order (background is never requested)."""
    labels = LabelSet(model.classes, model.background, model.labels_source)
    return [model.classes[i] for i in match_categories(text, labels) if model.classes[i] != model.background]


def output_dir(request: Request, categories: list[str]) -> Path:
    out = request.out or Path("disasm-out") / "-".join([request.model.stem, *categories])
    inputs = [request.model, request.images, request.eval_images, request.masks]
    for given in filter(None, inputs):
        if out.resolve() == given.resolve() or given.resolve().is_relative_to(out.resolve()):
            raise DisasmError(f"output folder {out} would overwrite the input {given}; choose another --out")
    for folder in filter(None, inputs[1:]):  # report.png would become an input image of the next run
        if out.resolve().is_relative_to(folder.resolve()):
            raise DisasmError(f"output folder {out} lies inside the input folder {folder}; choose another --out")
    if out.exists() and not out.is_dir():
        raise DisasmError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not request.force:
        raise DisasmError(f"{out}: output folder exists; pass --force to replace its contents or choose another --out")
    return out  # OutputTransaction.begin locks it and checks it can be written and replaced


def input_size(model: Model, request: Request) -> tuple[int, int] | None:
    """(H, W) images are fed at: the model's static size, else --input-size, else None (each image's own size)."""
    requested = parse_size(request.input_size) if request.input_size else None
    static = model.image_size
    if static and requested and requested != static:
        raise DisasmError(f"--input-size {requested[0]}x{requested[1]} differs from the model's static input size "
                          f"{static[0]}x{static[1]}; leave --input-size out")
    return static or requested


def calibration_digest(paths: list[Path], changed_inputs: dict[str, Any]) -> str:
    """The cache's image-set hash, extended by the settings that change what attribution sees (preprocessing, size,
    output kind, head). Without such settings it is the plain image hash, as the distributed runner computes it."""
    digest = images_digest(paths)
    if not changed_inputs:
        return digest
    return hashlib.sha256(json.dumps({"images": digest, "inputs": changed_inputs}, sort_keys=True).encode()).hexdigest()


def cached_attribution(model: Model, analysis: ChannelAnalysis, inputs: np.ndarray, settings: AttributionSettings,
                       device: str, keys: list[CacheKey], cache_dir: Path | None,
                       stages: Stages) -> tuple[Attribution, bool]:
    """The attribution of these inputs from the cache when an entry serves (keys, best first), else computed and
    stored under keys[0]. Returns it and whether it came from the cache."""
    if cache_dir:
        for key in keys:
            found = attribution_cache.load(cache_dir, key)
            if found is not None:
                return found, True
    with stages.stage("attribution", len(inputs)) as progress:
        attribution = calibrate(model, analysis, inputs, settings, device, progress, moments=bool(keys[0].consumers))
    if cache_dir:
        attribution_cache.save(cache_dir, keys[0], attribution)
    return attribution, False


def channels_report(analysis: ChannelAnalysis, result: Specialised) -> dict[str, Any]:
    """What happened to every channel group: kept, padded, why kept whole, output loss; and the fragile ones."""
    choices = result.choices
    per_group = [{"group": c.group, "producers": analysis.groups[c.group].producers, "size": c.size, "kept": c.kept,
                  "padded": c.padded, "reason": c.reason, "depth": analysis.groups[c.group].depth,
                  "output_loss": result.output_loss.get(c.group)} for c in choices]
    fragile = sorted((g for g, loss in result.output_loss.items() if loss > FRAGILE_LOSS),
                     key=lambda g: -result.output_loss[g])
    cut = sum(not c.reason for c in choices)
    return {"groups": len(choices), "cut": cut, "whole": len(choices) - cut, "fragile": fragile,
            "fragile_threshold": FRAGILE_LOSS, "total": sum(c.size for c in choices),
            "kept": sum(c.total for c in choices), "per_group": per_group}


def compile_engines(model: Model, full_path: Path, pruned_path: Path, out: Path, target: str | None,
                    input_shape: tuple[int, ...]) -> dict[str, Any]:
    """engines/{full,pruned}.{fp32,fp16}.engine with what the builds say: weights, layers, build time. The target is
    the local GPU, else (TensorRT for RTX, no GPU) SM86 ahead of time."""
    import torch

    if target is None and not torch.cuda.is_available():
        target = "sm86"
    shapes = {model.input_name: input_shape}
    builds: dict[str, Any] = {"target": target or "local GPU", "module": trt_module().__name__}
    for precision in ("fp32", "fp16"):
        for name, source in (("full", full_path), ("pruned", pruned_path)):
            with deferred_interrupts():  # raised in TensorRT's logger, a Ctrl-C is printed and swallowed
                build = build_engine(source, target, fp16=precision == "fp16", input_shapes=shapes)
            raise_if_interrupted()  # so it is only recorded during the build, and raised after it
            save_engine(out / "engines" / f"{name}.{precision}.engine", build.serialized)
            builds[f"{name}.{precision}"] = {"build_seconds": round(build.build_seconds, 3),
                                             "bytes": build.size_bytes, "weight_bytes": build.weight_bytes,
                                             "layers": build.layer_count}
    builds["latency"] = "built only: running them needs a GPU of the engine's architecture" \
        if not torch.cuda.is_available() else "not measured by this version"
    return builds


@dataclass
class _Judge:
    """The judged images and the full model's outputs on them, computed once for every trial."""

    inputs: np.ndarray
    masks: np.ndarray | None
    source: str
    full_outputs: list[np.ndarray]

    def full(self, x: np.ndarray) -> np.ndarray:
        return self.full_outputs[self._index(x)]

    def _index(self, x: np.ndarray) -> int:
        for i in range(len(self.inputs)):
            if np.shares_memory(x, self.inputs[i:i + 1]) or np.array_equal(x, self.inputs[i:i + 1]):
                return i
        raise ValueError("not a judged image")


def _fidelity(model: Model, judge: _Judge, pruned: onnx.ModelProto, plan: OutputPlan, threads: int | None,
              progress=None) -> dict[str, Any]:
    runner = OnnxRuntimeRunner(pruned.SerializeToString(), threads=threads)
    return evaluate_fidelity(judge.full, lambda x: runner.infer(x)[0], judge.inputs, judge.masks, model.classes,
                             list(plan.names), plan.none, model.output_kind, plan.mode, progress, model.class_axis)


def _trial_row(setting: str, macs_ratio: float, fidelity: dict[str, Any]) -> dict[str, Any]:
    return {"setting": setting, "macs_ratio": macs_ratio, "category_fidelity": fidelity.get("category_fidelity"),
            "per_category": fidelity.get("per_category", {})}


def _meets(fidelity: dict[str, Any], target: float) -> bool:
    value = fidelity.get("category_fidelity")
    return value is not None and value >= target


def search_budget(model: Model, analysis: ChannelAnalysis, attribution: Attribution, categories: list[str],
                  request: Request, settings: dict[str, Any], judge: _Judge, input_shape: tuple[int, ...],
                  stages: Stages, calibration: Calibration) -> tuple[Specialised, dict[str, Any], dict[str, Any]]:
    """The smallest model meeting the fidelity target on the judged images (binary search over ALPHAS, assuming
    fidelity falls as alpha rises), or the uncut one. Returns it, its fidelity, and the search record."""
    full_macs = model_cost(model.proto, input_shape).macs
    trials: list[dict[str, Any]] = []
    with stages.stage("budget search", SEARCH_TRIALS + 1) as progress:
        def trial(selection: SelectionSettings, cut: bool = True) -> tuple[Specialised, dict[str, Any]]:
            start = time.perf_counter()
            result = specialise(model, analysis, attribution, categories, selection, request.compensate, settings,
                                request.criterion, request.others, cut, calibration)
            fidelity = _fidelity(model, judge, result.pruned, result.plan, request.threads)
            setting = _setting(selection) if cut else "uncut (every channel kept)"
            trials.append(_trial_row(setting, model_cost(result.pruned, input_shape).macs / full_macs, fidelity)
                          | {"seconds": round(time.perf_counter() - start, 3), "finetune": result.finetune})
            progress(len(trials))
            return result, fidelity

        if request.budget_fixed:
            result, fidelity = trial(request.selection)
            return result, fidelity, {"trials": trials, "chosen": 0, "note": "budget fixed by --alpha/--keep-ratio"}
        best = None  # (model, fidelity, trial index) at the largest alpha known to meet the target
        lo, hi = -1, len(ALPHAS)  # ALPHAS[lo] meets the target (-1: none known), ALPHAS[hi] misses it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            result, fidelity = trial(replace(request.selection, alpha=ALPHAS[mid], keep_ratio=None))
            if _meets(fidelity, request.min_fidelity):
                lo, best = mid, (result, fidelity, len(trials) - 1)
            else:
                hi = mid
        if best is not None:
            note = f"alpha {ALPHAS[lo]} is the largest tried that keeps category fidelity >= {request.min_fidelity}"
            return best[0], best[1], {"trials": trials, "chosen": best[2], "note": note}
        result, fidelity = trial(request.selection, cut=False)
        note = (f"even the lightest cut (alpha {ALPHAS[0]}) misses category fidelity {request.min_fidelity}: "
                f"the uncut model was written")
        return result, fidelity, {"trials": trials, "chosen": len(trials) - 1, "note": note}


def _setting(selection: SelectionSettings) -> str:
    return f"keep-ratio {selection.keep_ratio}" if selection.keep_ratio is not None else f"alpha {selection.alpha}"


def _contract(fidelity: dict[str, Any], search: dict[str, Any], target: float, judged: str) -> dict[str, Any]:
    """Whether the written model keeps the fidelity target, in one sentence a user reads first."""
    value = fidelity.get("category_fidelity")
    chosen = search["trials"][search["chosen"]] if search["trials"] else {"setting": "", "macs_ratio": 0.0}
    nothing_cut = chosen["setting"].startswith("uncut") or chosen["macs_ratio"] >= 1.0
    if value is None:
        message, met = (f"CONTRACT UNCHECKED: the chosen categories appear in neither model's answers on {judged}, "
                        f"so category fidelity cannot be measured"), False
    elif nothing_cut and value >= target:
        message, met = (f"contract met: category fidelity {value:.3f} >= {target:.2f} on {judged}, but NOTHING WAS "
                        f"CUT: every cut tried falls below {target:.2f}, so the written model is the full one with "
                        f"a chosen-or-none output"), True
    elif value < target:
        message, met = (f"CONTRACT MISSED: category fidelity {value:.3f} < {target:.2f} on {judged} "
                        f"(budget fixed by hand)"), False
    else:
        message, met = f"contract met: category fidelity {value:.3f} >= {target:.2f} on {judged}", True
    return {"min_fidelity": target, "met": met, "message": message}


@dataclass
class _Images:
    calibration: list[Path]
    calibration_inputs: np.ndarray
    judged: list[Path]
    judged_inputs: np.ndarray
    masks: np.ndarray | None  # ground truth of the judged images
    source: str               # which images are judged, in a sentence
    skipped: list[Path]       # unreadable files, skipped
    judged_in_calibration: int = 0  # judged images that are also calibration images (same bytes)


def _images(request: Request, model: Model, size: tuple[int, int] | None) -> _Images:
    """Calibration and judged images, preprocessed. Judged: --eval-images, else every HOLD_OUT_EVERY-th image of
    --images, held out from attribution and compensation. Every image and mask is checked, held out or not."""
    calib = scan_images(request.images, request.recursive, size)
    _warn_skipped(calib)
    pixels = load_images(calib.paths, size, request.resize)
    if request.eval_images:
        evaluation = scan_images(request.eval_images, request.recursive, size)
        _warn_skipped(evaluation)
        masks = load_masks(request.masks, evaluation, size, len(model.classes)) if request.masks else None
        same = _same_files(calib.paths, evaluation.paths)
        overlap = f", {same} of them also calibration images (fidelity on them is optimistic)" if same else ""
        return _Images(calib.paths, preprocess(pixels, model.preprocessing), evaluation.paths,
                       preprocess(load_images(evaluation.paths, size, request.resize), model.preprocessing), masks,
                       f"{len(evaluation.paths)} images of --eval-images {request.eval_images}{overlap}",
                       [p for p, _ in calib.skipped + evaluation.skipped], same)
    masks = load_masks(request.masks, calib, size, len(model.classes)) if request.masks else None
    inputs = preprocess(pixels, model.preprocessing)
    if len(calib.paths) < 2:
        return _Images(calib.paths, inputs, calib.paths, inputs, masks,
                       "the only calibration image, since no --eval-images were given: it is not held out, so the "
                       "fidelity is optimistic", [p for p, _ in calib.skipped], 1)
    held = np.zeros(len(calib.paths), bool)
    held[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY] = True
    held[-1] |= not held.any()
    return _Images([p for p, h in zip(calib.paths, held) if not h], inputs[~held],
                   [p for p, h in zip(calib.paths, held) if h], inputs[held],
                   None if masks is None else masks[held],
                   f"{int(held.sum())} images held out of --images (every {HOLD_OUT_EVERY}th), not used by "
                   f"attribution or compensation", [p for p, _ in calib.skipped])


def _same_files(calibration: list[Path], judged: list[Path]) -> int:
    """How many judged images have the bytes of a calibration image (a copy under another name counts)."""
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in calibration}
    return sum(hashlib.sha256(p.read_bytes()).hexdigest() in digests for p in judged)


def _warn_skipped(folder: ImageFolder) -> None:
    if folder.skipped:
        shown = ", ".join(f"{p.name} ({why})" for p, why in folder.skipped[:3])
        more = f" and {len(folder.skipped) - 3} more" if len(folder.skipped) > 3 else ""
        print(f"disasm-compile: warning: skipped {len(folder.skipped)} unreadable file(s) in {folder.root}: "
              f"{shown}{more}", file=sys.stderr)


def _calibration_report(model: Model, attribution: Attribution, tau: float) -> dict[str, Any]:
    """Which images and pixels each category's attribution used, and which categories fell back from confident
    pixels (probability > tau) to the pixels where the model predicts them."""
    fallback = {model.classes[k]: pixels for k, pixels in attribution.fallback_pixels().items()}
    return {"images_per_class": dict(zip(model.classes, attribution.images_per_class.tolist())),
            "mask_pixels": dict(zip(model.classes, attribution.mask_pixels.tolist())),
            "predicted_pixels": dict(zip(model.classes, attribution.predicted_pixels.tolist())),
            "fallback_pixels": fallback,
            "note": (f"no pixel above tau {tau} for {', '.join(fallback)}: their masks are the pixels where the model "
                     f"predicts them") if fallback else None}


def validate(request: Request) -> None:
    """Option checks that need no model, before any long work."""
    if request.runs < 1:
        raise DisasmError(f"--runs must be >= 1, got {request.runs}")
    if request.compensate not in COMPENSATIONS:
        raise DisasmError(f"--compensate {request.compensate!r} unknown; choose one of {', '.join(COMPENSATIONS)}")
    if not 0.0 < request.min_fidelity <= 1.0:
        raise DisasmError(f"--min-fidelity must be in (0, 1], got {request.min_fidelity}")
    if request.threads is not None and request.threads < 1:
        raise DisasmError(f"--threads must be >= 1, got {request.threads}")
    if request.finetune < 0:
        raise DisasmError(f"--finetune must be >= 0 epochs, got {request.finetune}")
    if request.criterion not in CRITERIA:
        raise DisasmError(f"--criterion {request.criterion!r} unknown; choose one of {', '.join(CRITERIA)}")
    if request.attribution.batch_size < 1:
        raise DisasmError(f"--batch-size must be >= 1, got {request.attribution.batch_size}")
    _check_device(request.device)
    if request.engines:
        _check_trt_target(request.trt_target)
    if request.cache is not None and not request.no_cache:
        _check_writable(request.cache, "--cache")


def _check_device(device: str | None) -> None:
    """--device names a torch device that exists here (default: cuda if available, else cpu)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DisasmError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DisasmError(f"--device {device}: torch sees no CUDA GPU here; leave --device out or use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DisasmError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s) here "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return
    backend = getattr(torch.backends, parsed.type, None) or getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise DisasmError(f"--device {device}: not available here; use cpu or cuda")


def _check_trt_target(target: str | None) -> None:
    """--trt-target is a compute capability the installed TensorRT builds for (e.g. sm86, 8.6 or 86)."""
    import re

    if target is not None and not re.fullmatch(r"(sm_?)?\d+(\.\d+)?", target.strip().lower()):
        raise DisasmError(f"--trt-target {target!r} is not a compute capability; use e.g. sm86, 8.6 or 86")
    if not trt_available():
        return
    import torch

    from disasm.runtime.tensorrt import _resolve_target  # the check build_engine makes, before any work

    local = target is None and torch.cuda.is_available()
    _resolve_target(trt_module(), None if local else (target or "sm86").replace("_", ""))


def _check_writable(folder: Path, what: str) -> None:
    """`folder` is a folder that can be written, or can be created (its nearest existing ancestor is writable)."""
    import os

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        raise DisasmError(f"{what} {folder}: exists and is not a folder")
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DisasmError(f"{what} {folder}: {existing} is not a writable folder")


def compile_model(request: Request, stages: Stages | None = None) -> Report:
    """Specialise `request.model` to `request.categories`, write pruned.onnx into the output folder, and measure
    what it gained and kept. Raises DisasmError for a user's mistake (before the long work where it can be checked).

    The output set (pruned.onnx, attribution/, engines/, with `request.reports` report.json/md/png) is one
    transaction (compiler/transaction.py): built beside the output folder and moved into place only when complete,
    replacing an earlier set (--force) at that moment; a failure or an interrupt leaves the folder as it was."""
    stages = stages or Stages()
    with OutputTransaction(force=request.force) as output:
        report = _compile(request, stages, output)
        if request.reports:
            from disasm.runtime.plots import write_png
            from disasm.runtime.report import write_report

            write_report(report.to_dict(), output.staging)
            write_png(report.to_dict(), output.staging)
        output.commit()
    return report


def _compile(request: Request, stages: Stages, output: OutputTransaction) -> Report:
    """compile_model's flow, writing into the transaction's staging folder (`staged`); the report names `out`."""
    validate(request)
    model = load_model(request.model, request.labels, request.overrides)
    categories = parse_categories(request.categories, model)
    out = output_dir(request, categories)
    staged = output.begin(out)
    size = input_size(model, request)
    images = _images(request, model, size)
    calib_paths, calib_inputs, judged_inputs, judged = (images.calibration, images.calibration_inputs,
                                                        images.judged_inputs, images.source)
    batch_size = request.attribution.batch_size if model.input_shape[0] is None else 1  # a static batch of 1
    attribution_settings = replace(request.attribution, batch_size=batch_size)
    inputs = {"layout": model.preprocessing.layout, "class_axis": model.class_axis, "output": model.output_kind,
              "size": list(size) if size else None, "resize": request.resize}
    changed_inputs = {k: v for k, v in {**asdict(request.overrides), "size": request.input_size and size}.items() if v}

    analysis = analyse(model.proto)
    import torch

    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    keys = cache_keys(model, analysis, calibration_digest(calib_paths, changed_inputs), attribution_settings,
                      moments=request.compensate == "lsq")
    cache_dir = None if request.no_cache else (request.cache or out.resolve().parent / "attribution-cache")
    attribution, cache_hit = cached_attribution(model, analysis, calib_inputs, attribution_settings, device, keys,
                                                cache_dir, stages)
    missing = [c for c in categories if attribution.images_per_class[model.class_index(c)] == 0]
    if missing:
        raise DisasmError(f"the model never predicts {', '.join(missing)} on the calibration images; add images "
                          f"that contain it")
    used_fallback = [c for c in categories if attribution.fallback[model.class_index(c)]]
    if used_fallback:
        print(f"disasm-compile: note: no calibration pixel of {', '.join(used_fallback)} is above --tau "
              f"{attribution_settings.tau}; their attribution uses the pixels where the model predicts them",
              file=sys.stderr)
    settings = {"attribution": attribution_settings.to_dict(), "selection": request.selection.to_dict(),
                "criterion": request.criterion, "compensation": request.compensate, "finetune": request.finetune,
                "categories": categories, "others": request.others, "min_fidelity": request.min_fidelity,
                "input": inputs}

    input_shape = (1, *[d if d else 0 for d in model.input_shape[1:]])
    if 0 in input_shape:
        input_shape = (1, *judged_inputs.shape[1:])
    # The full model as loaded (folded, one head), like for like with the pruned one, in a file beside it: TensorRT
    # and ONNX Runtime with external data read files. Removed before the output set is committed.
    full_path = staged / ".full.onnx"
    write_onnx(model.proto, full_path, external_data=bool(model.external_data))
    full_runner = OnnxRuntimeRunner(full_path, threads=request.threads, spinning=False)
    with stages.stage("full model", len(judged_inputs)) as progress:
        outputs = []
        for i in range(len(judged_inputs)):
            outputs.append(full_runner.infer(judged_inputs[i:i + 1])[0])
            progress(i + 1)
    judge = _Judge(judged_inputs, images.masks, judged, outputs)
    calibration = Calibration(calib_inputs, batch_size, device, request.threads, request.finetune)
    if request.finetune:
        from disasm.attribution.finetune import TeacherTargets

        with stages.stage("teacher"):  # the full model's answers on the calibration images, for every trial
            plan = plan_outputs(model.classes, categories, model.background, model.output_kind, request.others)
            calibration = replace(calibration, teacher=TeacherTargets(
                model.proto, calib_inputs, plan.sources, model.output_kind, model.class_axis, device, batch_size))
    result, fidelity, search = search_budget(model, analysis, attribution, categories, request, settings, judge,
                                             input_shape, stages, calibration)
    fidelity = fidelity | {"source": judged}
    with stages.stage("write"):
        write_onnx(result.pruned, staged / "pruned.onnx", external_data=bool(model.external_data))
        attribution_cache.save(staged / "attribution", keys[-1] if attribution.moments else keys[0], attribution)
    cost_full, cost_pruned = model_cost(model.proto, input_shape), model_cost(result.pruned, input_shape)
    pruned_runner = OnnxRuntimeRunner(staged / "pruned.onnx", threads=request.threads, spinning=False)
    engines = None
    if trt_available() and request.engines:
        with stages.stage("engines"):
            engines = compile_engines(model, full_path, staged / "pruned.onnx", staged, request.trt_target,
                                      input_shape)
    with stages.stage("latency", request.runs) as progress:
        sample = judged_inputs[:1]
        stats = measure_latency({"full": lambda: full_runner.infer(sample),
                                 "pruned": lambda: pruned_runner.infer(sample)}, runs=request.runs, progress=progress)
    for loaded in (full_path, full_path.with_name(full_path.name + ".data")):
        loaded.unlink(missing_ok=True)  # the sessions hold what they read
    return Report(
        model={"path": str(request.model), "sha256": model.sha256, "classes": list(model.classes),
               "background": model.background, "labels_source": model.labels_source, "input_shape": list(input_shape),
               "output": model.output_kind, "output_name": model.output_name, "layout": model.preprocessing.layout,
               "class_axis": model.class_axis, "input_channels": model.preprocessing.channels,
               "external_data": list(model.external_data), "removed_heads": list(model.removed_heads),
               "subnormal_weights_zeroed": model.subnormals,
               "sources": model.sources},
        categories=categories,
        output={"classes": list(result.plan.names), "none": result.plan.none, "mode": result.plan.mode,
                "class_conv": "sliced" if result.class_conv_blocked is None and result.plan.single_sources is not None
                else "kept whole; classes taken at the output",
                "class_conv_kept_whole_because": result.class_conv_blocked},
        out_dir=str(out),
        contract=_contract(fidelity, search, request.min_fidelity, judged),
        fidelity=fidelity, search=search,
        cost={"full": cost_full.to_dict(), "pruned": cost_pruned.to_dict(),
              "macs_ratio": cost_pruned.macs / cost_full.macs, "params_ratio": cost_pruned.params / cost_full.params},
        latency={"backend": full_runner.name, "runs": request.runs, "full": asdict(stats["full"]),
                 "pruned": asdict(stats["pruned"]), "speedup": speedup(stats["full"], stats["pruned"]),
                 "baseline": "the full model as loaded (constants folded, subnormal weights zeroed, one head), "
                             "re-saved, same session options"},
        channels=channels_report(analysis, result),
        images={"calibration": len(calib_paths), "judged": len(images.judged), "judged_source": judged,
                "judged_in_calibration": images.judged_in_calibration, "skipped": len(images.skipped),
                "skipped_files": [str(p) for p in images.skipped], "size": inputs["size"], "resize": request.resize,
                "masks": images.masks is not None},
        calibration=_calibration_report(model, attribution, request.attribution.tau),
        attribution={"cache_hit": cache_hit, "cache": str(cache_dir) if cache_dir else None,
                     "tensors": len(attribution.tensors), "consumers_with_moments": len(attribution.moments)},
        compensation={"method": request.compensate, "mean_fallbacks": result.compensation_fallbacks,
                      "finetune_epochs": request.finetune, "finetune": result.finetune},
        settings=settings | {"runs": request.runs, "threads": request.threads, "device": device},
        engines=engines,
        stage_seconds=stages.seconds,
    )
