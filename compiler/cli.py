"""disasm-compile: specialise a segmentation network to a few categories and prove what it gained and kept.

Examples:
  # the shipped example: class names and preprocessing come from its metadata
  disasm-compile examples/shapes_seg.onnx --categories circle,star \\
      --images examples/data/calib --eval-images examples/data/eval/images --masks examples/data/eval/masks
  # a torch export with a dynamic input size, weights in model.onnx.data next to it; images of mixed sizes
  disasm-compile model.onnx --categories person,car --labels voc --images calib/ --input-size 512x512
  # a tf2onnx export: NHWC input, probabilities out, BGR pixels in [-1, 1]
  disasm-compile tf_model.onnx --categories road --labels cityscapes --images calib/ --layout nhwc \\
      --output probs --mean 127.5 --std 127.5 --bgr --resize none
  # images and masks in subfolders (masks matched by relative path without suffix)
  disasm-compile model.onnx --categories car --images val/images --masks val/masks --recursive --out car/ --force

Flow (one direction): load the model -> Disassembler attribution on the calibration images (all categories) ->
select the channels the chosen categories need -> ONNX surgery -> ONNX Runtime latency of full vs pruned (interleaved,
same process) and fidelity on the evaluation images -> pruned.onnx, report.json, report.md in --out.
This module only orchestrates; every algorithm lives in compiler/, attribution/ and runtime/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disasm.attribution import cache as attribution_cache
from disasm.attribution.baselines import CRITERIA, criterion_scores
from disasm.attribution.cache import CacheKey, images_digest
from disasm.attribution.calibration import cache_keys, calibrate
from disasm.attribution.compensate import METHODS as COMPENSATIONS
from disasm.attribution.compensate import consumer_losses, lsq_compensation, mean_compensation
from disasm.attribution.disassembler import Attribution, AttributionSettings
from disasm.attribution.select import (GroupChoice, SelectionSettings, class_keep_set, group_scores, select_channels,
                                       select_with_budget)
from disasm.compiler.channels import ChannelAnalysis, analyse
from disasm.compiler.cost import model_cost
from disasm.compiler.errors import DisasmError
from disasm.compiler.images import RESIZE_POLICIES, ImageFolder, load_images, load_masks, parse_size, preprocess, scan_images
from disasm.compiler.labels import LabelSet, match_categories
from disasm.compiler.load import LAYOUTS, OUTPUT_KINDS, Model, Overrides, load_model, parse_floats, write_onnx
from disasm.compiler.prune import prune
from disasm.runtime.fidelity import evaluate_fidelity
from disasm.runtime.latency import measure_latency, speedup
from disasm.runtime.onnxrt import OnnxRuntimeRunner
from disasm.runtime.plots import write_png
from disasm.runtime.report import print_report, write_report
from disasm.runtime.tensorrt import build_engine, save_engine, trt_available, trt_module


FRAGILE_LOSS = 0.05  # a cut group is fragile when a consumer still loses >5% of its output energy after compensation
ARTIFACT_FILES = ("pruned.onnx", "pruned.onnx.data", "report.json", "report.md", "report.png")
ARTIFACT_FOLDERS = ("engines", "attribution")


class _Parser(argparse.ArgumentParser):
    """argparse with the command's error convention: one line on stderr and exit code 2, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="disasm-compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the segmentation model (.onnx); never modified")
    p.add_argument("--categories", required=True, help="comma-separated class names to keep, e.g. circle,star "
                   "(case and ' ', '_', '-' are ignored when matching)")
    p.add_argument("--labels", help="class names of the output channels, overriding the model metadata: a built-in set "
                   "(voc, coco-voc, cityscapes, ade20k), a text file (one name per line), or a comma-separated list")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--images", type=Path, required=True, help="calibration image folder (PNG/JPEG/BMP/WebP) for "
                    "attribution, e.g. --images calib/; unreadable files are skipped and counted")
    io.add_argument("--eval-images", type=Path, help="evaluation image folder for fidelity (default: --images)")
    io.add_argument("--masks", type=Path, help="ground-truth masks for the evaluation images, matched by file stem "
                                               "(grey or palette PNG of class indices, 255 = ignore); adds mIoU, "
                                               "e.g. --eval-images val/images --masks val/masks")
    io.add_argument("--recursive", action="store_true", help="also read images (and masks) in subfolders; masks are "
                    "then matched by relative path without suffix (images/a/b.jpg <-> masks/a/b.png)")
    io.add_argument("--out", type=Path, help="output folder (default: disasm-out/<model>-<categories>)")
    io.add_argument("--force", action="store_true", help="replace the contents of an existing output folder")
    io.add_argument("--cache", type=Path, help="attribution cache folder, shared by runs with other --categories "
                                               "(default: attribution-cache/ next to the output folder)")
    io.add_argument("--no-cache", action="store_true", help="neither read nor write the attribution cache")
    mo = p.add_argument_group("model input and output (default: the model's disasm.* metadata, else read from the "
                              "graph, else ImageNet RGB)")
    mo.add_argument("--layout", choices=LAYOUTS, help="image input layout: nchw ([N,C,H,W]) or nhwc ([N,H,W,C], "
                    "tf2onnx exports), e.g. --layout nhwc; the class axis of the output is read from the graph")
    mo.add_argument("--output", choices=OUTPUT_KINDS, help="what the output holds: logits, probs (softmax over the "
                    "classes) or sigmoid (independent per-class probabilities), e.g. --output probs")
    mo.add_argument("--input-size", metavar="HxW", help="image size for a model with a dynamic input size, e.g. "
                    "--input-size 512x1024 (needed when its images differ in size; static models use their own)")
    mo.add_argument("--resize", choices=RESIZE_POLICIES, default="stretch", help="stretch: resize images (bilinear) "
                    "and masks (nearest) to the input size; none: images must already have it, e.g. --resize none "
                    "(default %(default)s)")
    mo.add_argument("--mean", help="per-channel mean in pixel units (0-255), subtracted before dividing by --std, "
                    "e.g. --mean 123.675,116.28,103.53 (one value applies to every channel: --mean 127.5)")
    mo.add_argument("--std", help="per-channel standard deviation in pixel units, e.g. --std 58.395,57.12,57.375 or "
                    "--std 127.5")
    color = mo.add_mutually_exclusive_group()
    color.add_argument("--bgr", dest="color", action="store_const", const="bgr", help="feed channels in BGR order "
                       "(OpenCV/Caffe-trained models), e.g. --bgr")
    color.add_argument("--rgb", dest="color", action="store_const", const="rgb", help="feed channels in RGB order "
                       "even if the metadata says disasm.color=bgr")
    at = p.add_argument_group("attribution (Disassembler)")
    at.add_argument("--tau", type=float, default=AttributionSettings.tau, help="pixel confidence of the category masks (default %(default)s)")
    at.add_argument("--gradient", default=AttributionSettings.gradient, help="gradient policy: positive, negative, absolute (default %(default)s)")
    at.add_argument("--target", default=AttributionSettings.target, help="back-propagated score: logit or prob (default %(default)s)")
    at.add_argument("--batch-size", type=int, default=AttributionSettings.batch_size, help="images per attribution forward and (image, category) rows per backward; bounds memory (default %(default)s)")
    at.add_argument("--device", default=None, help="torch device for attribution (default: cuda if available, else cpu)")
    se = p.add_argument_group("selection")
    se.add_argument("--alpha", type=float, default=SelectionSettings.alpha, help="keep channels whose normalised score exceeds alpha (default %(default)s)")
    se.add_argument("--beta", type=float, default=SelectionSettings.beta, help="backward threshold of the 'and' rule (default %(default)s)")
    se.add_argument("--rule", default=SelectionSettings.rule, help="combination of the two vectors: prod or and (default %(default)s)")
    se.add_argument("--round-to", type=int, default=SelectionSettings.round_to, help="keep a multiple of this many channels per group (default %(default)s)")
    se.add_argument("--last-n", type=int, default=None, help="cut only groups within N convs of the output (default: all)")
    se.add_argument("--keep-ratio", type=float, default=None,
                    help="per-group budget: keep this fraction of every cut group by score, instead of --alpha")
    se.add_argument("--criterion", default="disassembler", choices=CRITERIA,
                    help="channel criterion; baselines keep as many channels per group as the Disassembler would, "
                         "for comparisons at equal MACs (default %(default)s)")
    se.add_argument("--compensate", default="lsq", help="compensate cut channels in their consumers: none, mean "
                    "(calibration mean folded into the bias) or lsq (ridge least-squares refit of each consumer; "
                    "default %(default)s)")
    bench = p.add_argument_group("benchmark")
    bench.add_argument("--runs", type=int, default=30, help="interleaved latency rounds, full vs pruned (default %(default)s)")
    bench.add_argument("--trt-target", default=None,
                       help="TensorRT engine target, e.g. sm86 (default: the local GPU; without one, sm86 with "
                            "TensorRT for RTX). Engines are built when a TensorRT module is installed (the trt extra)")
    bench.add_argument("--no-engines", action="store_true", help="do not build TensorRT engines")
    bench.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)")
    out = p.add_argument_group("output")
    out.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    out.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    out.add_argument("--verbose", action="store_true", help="show tracebacks of internal errors")
    return p


def parse_categories(text: str, model: Model) -> list[str]:
    """The requested object classes, in the model's output order (background is always kept, never requested)."""
    labels = LabelSet(model.classes, model.background, model.labels_source)
    return [model.classes[i] for i in match_categories(text, labels) if model.classes[i] != model.background]


def output_dir(args: argparse.Namespace, categories: list[str]) -> Path:
    out = args.out or Path("disasm-out") / "-".join([args.model.stem, *categories])
    inputs = [args.model, args.images, args.eval_images, args.masks]
    for given in filter(None, inputs):
        if out.resolve() == given.resolve() or given.resolve().is_relative_to(out.resolve()):
            raise DisasmError(f"output folder {out} would overwrite the input {given}; choose another --out")
    for folder in filter(None, inputs[1:]):  # report.png would become an input image of the next run
        if out.resolve().is_relative_to(folder.resolve()):
            raise DisasmError(f"output folder {out} lies inside the input folder {folder}; choose another --out")
    if out.exists() and not out.is_dir():
        raise DisasmError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise DisasmError(f"{out}: output folder exists; pass --force to replace its contents or choose another --out")
    return out


def remove_previous_artifacts(out: Path) -> None:
    """With --force, drop what an earlier run wrote (and only that), so no stale artifact outlives its report."""
    for name in ARTIFACT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in ARTIFACT_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


class Stages:
    """Progress bars and wall-clock time per stage (recorded in the report)."""

    def __init__(self, quiet: bool):
        self.console = Console(stderr=True, quiet=quiet)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator:
        start = time.perf_counter()
        with Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=total or 1)
            yield lambda done, _total=None: progress.update(task, completed=done)
            progress.update(task, completed=total or 1)
        self.seconds[name] = round(time.perf_counter() - start, 3)


def class_output_blocker(analysis: ChannelAnalysis) -> str | None:
    """Why the class conv cannot be sliced to the chosen classes (they are then gathered at the output), or None."""
    if analysis.class_group is None:
        return "no single conv makes the class scores"
    blocked = analysis.groups[analysis.class_group].blocked
    return blocked[0] if blocked else None


def model_overrides(args: argparse.Namespace) -> Overrides:
    """What the command line says about the model's input and output (None where it says nothing)."""
    return Overrides(layout=args.layout, output=args.output,
                     mean=parse_floats(args.mean, "--mean") if args.mean is not None else None,
                     std=parse_floats(args.std, "--std") if args.std is not None else None, color=args.color)


def input_size(model: Model, args: argparse.Namespace) -> tuple[int, int] | None:
    """(H, W) images are fed at: the model's static size, else --input-size, else None (each image's own size)."""
    requested = parse_size(args.input_size) if args.input_size else None
    static = model.image_size
    if static and requested and requested != static:
        raise DisasmError(f"--input-size {requested[0]}x{requested[1]} differs from the model's static input size "
                          f"{static[0]}x{static[1]}; leave --input-size out")
    return static or requested


def calibration_digest(paths: list[Path], changed_inputs: dict[str, Any]) -> str:
    """The cache's image-set hash, extended by the flags that change what attribution sees (preprocessing, size,
    output kind). Without such flags it is the plain image hash, as the distributed runner computes it."""
    digest = images_digest(paths)
    if not changed_inputs:
        return digest
    return hashlib.sha256(json.dumps({"images": digest, "inputs": changed_inputs}, sort_keys=True).encode()).hexdigest()


def warn_skipped(folders: list[ImageFolder]) -> None:
    for folder in folders:
        if folder.skipped:
            shown = ", ".join(f"{p.name} ({why})" for p, why in folder.skipped[:3])
            more = f" and {len(folder.skipped) - 3} more" if len(folder.skipped) > 3 else ""
            print(f"disasm-compile: warning: skipped {len(folder.skipped)} unreadable file(s) in {folder.root}: "
                  f"{shown}{more}", file=sys.stderr)


@dataclass
class Specialised:
    """A category-specialised model and the decisions that produced it."""

    pruned: onnx.ModelProto
    keep_sets: dict[int, np.ndarray]
    choices: list[GroupChoice]
    class_keep: np.ndarray
    kept_classes: list[str]
    compensation_fallbacks: list[str]  # consumers that `lsq` could not refit (no moments) and folded by mean
    output_loss: dict[int, float]      # per cut group: worst share of a consumer's output energy lost (moments only)
    class_conv_blocked: str | None     # why the class conv could not be sliced (classes gathered at the output)


def specialise(model: Model, analysis: ChannelAnalysis, attribution: Attribution, categories: list[str],
               selection: SelectionSettings, compensation: str, settings: dict[str, Any],
               criterion: str = "disassembler") -> Specialised:
    """Keep-sets for `categories` (plus background), compensation, and the surgery, with self-describing metadata.
    A criterion other than the Disassembler picks its own channels within the Disassembler's per-group budget."""
    missing = [c for c in categories if attribution.images_per_class[model.class_index(c)] == 0]
    if missing:
        raise DisasmError(f"no calibration image has confident pixels of {', '.join(missing)}; add images that "
                          f"contain it or lower --tau")
    targets = [model.class_index(c) for c in categories] + ([model.class_index(model.background)] if model.background else [])
    scores = group_scores(attribution, analysis, targets, selection)
    class_keep = class_keep_set(model.classes, categories, model.background)
    keep_sets, choices = select_channels(analysis, scores, selection, class_keep)
    if criterion != "disassembler":
        baseline = criterion_scores(criterion, model.proto, analysis, attribution, targets, selection)
        keep_sets = select_with_budget(baseline, choices, keep_sets)
    replacements, fallbacks = None, []
    if compensation == "mean":
        replacements = mean_compensation(model.proto, analysis, keep_sets, attribution)
    elif compensation == "lsq":
        replacements, fallbacks = lsq_compensation(model.proto, analysis, keep_sets, attribution)
    kept_classes = [model.classes[i] for i in class_keep]
    metadata = {"disasm.classes": ",".join(kept_classes), "disasm.background": model.background or "",
                "disasm.output": model.output_kind, **model.preprocessing.metadata(),
                "disasm.source_sha256": model.sha256, "disasm.settings": json.dumps(settings, sort_keys=True)}
    blocked = class_output_blocker(analysis)  # the class conv cannot be sliced: select the classes at the output
    pruned = prune(model.proto, analysis, keep_sets, metadata=metadata, replacements=replacements,
                   output_keep=class_keep if blocked else None, output_axis=model.class_axis)
    losses = consumer_losses(model.proto, analysis, keep_sets, attribution, replacements)
    return Specialised(pruned, keep_sets, choices, class_keep, kept_classes, fallbacks, losses, blocked)


def compile_engines(model: Model, pruned_path: Path, out: Path, target: str | None,
                    input_shape: tuple[int, ...]) -> dict[str, Any]:
    """engines/{full,pruned}.{fp32,fp16}.engine with what the builds say: weights, layers, build time. The target is
    the local GPU, else (TensorRT for RTX, no GPU) SM86 ahead of time."""
    if target is None and not torch.cuda.is_available():
        target = "sm86"
    shapes = {model.input_name: input_shape}
    builds: dict[str, Any] = {"target": target or "local GPU", "module": trt_module().__name__}
    for precision in ("fp32", "fp16"):
        for name, source in (("full", model.path), ("pruned", pruned_path)):
            build = build_engine(source, target, fp16=precision == "fp16", input_shapes=shapes)
            save_engine(out / "engines" / f"{name}.{precision}.engine", build.serialized)
            builds[f"{name}.{precision}"] = {"build_seconds": round(build.build_seconds, 3), "bytes": build.size_bytes,
                                             "weight_bytes": build.weight_bytes, "layers": build.layer_count}
    builds["latency"] = "needs a GPU of the engine's architecture; not measured here" \
        if not torch.cuda.is_available() else "not measured by this version"
    return builds


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


def run(args: argparse.Namespace, stages: Stages) -> dict[str, Any]:
    model = load_model(args.model, args.labels, model_overrides(args))
    categories = parse_categories(args.categories, model)
    batch_size = args.batch_size if model.input_shape[0] is None else 1  # a static batch of 1 takes one at a time
    attribution_settings = AttributionSettings(tau=args.tau, gradient=args.gradient, target=args.target,
                                               batch_size=batch_size)
    selection_settings = SelectionSettings(alpha=args.alpha, beta=args.beta, rule=args.rule, round_to=args.round_to,
                                           last_n=args.last_n, keep_ratio=args.keep_ratio)
    if args.runs < 1:
        raise DisasmError(f"--runs must be >= 1, got {args.runs}")
    if args.compensate not in COMPENSATIONS:
        raise DisasmError(f"--compensate {args.compensate!r} unknown; choose one of {', '.join(COMPENSATIONS)}")
    out = output_dir(args, categories)
    remove_previous_artifacts(out)
    size = input_size(model, args)
    calib = scan_images(args.images, args.recursive, size)
    evaluation = scan_images(args.eval_images, args.recursive, size) if args.eval_images else calib
    folders = [calib] if evaluation is calib else [calib, evaluation]
    warn_skipped(folders)
    masks = load_masks(args.masks, evaluation, size, len(model.classes)) if args.masks else None
    calib_inputs = preprocess(load_images(calib.paths, size, args.resize), model.preprocessing)
    eval_inputs = calib_inputs if evaluation is calib else \
        preprocess(load_images(evaluation.paths, size, args.resize), model.preprocessing)
    inputs = {"layout": model.preprocessing.layout, "class_axis": model.class_axis, "output": model.output_kind,
              "size": list(size) if size else None, "resize": args.resize}
    changed_inputs = {k: v for k, v in {**asdict(model_overrides(args)), "size": args.input_size and size}.items() if v}

    analysis = analyse(model.proto)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    keys = cache_keys(model, analysis, calibration_digest(calib.paths, changed_inputs), attribution_settings,
                      moments=args.compensate == "lsq")
    cache_dir = None if args.no_cache else (args.cache or out.resolve().parent / "attribution-cache")
    attribution, cache_hit = cached_attribution(model, analysis, calib_inputs, attribution_settings, device, keys,
                                                cache_dir, stages)
    settings = {"attribution": attribution_settings.to_dict(), "selection": selection_settings.to_dict(),
                "criterion": args.criterion, "compensation": args.compensate, "categories": categories,
                "input": inputs}
    with stages.stage("surgery"):
        result = specialise(model, analysis, attribution, categories, selection_settings, args.compensate, settings,
                            args.criterion)
        pruned, class_keep, kept_names = result.pruned, result.class_keep, result.kept_classes
        write_onnx(pruned, out / "pruned.onnx", external_data=bool(model.external_data))
        attribution_cache.save(out / "attribution", keys[-1] if attribution.moments else keys[0], attribution)

    input_shape = (1, *[d if d else 0 for d in model.input_shape[1:]])
    if 0 in input_shape:
        input_shape = (1, *eval_inputs.shape[1:])
    cost_full, cost_pruned = model_cost(model.proto, input_shape), model_cost(pruned, input_shape)
    full_runner = OnnxRuntimeRunner(model.path, threads=args.threads)
    pruned_runner = OnnxRuntimeRunner(out / "pruned.onnx", threads=args.threads)
    engines = None
    if trt_available() and not args.no_engines:
        with stages.stage("engines"):
            engines = compile_engines(model, out / "pruned.onnx", out, args.trt_target, input_shape)
    with stages.stage("fidelity", len(eval_inputs)) as progress:
        background = model.class_index(model.background) if model.background else None
        fidelity = evaluate_fidelity(lambda x: full_runner.infer(x)[0], lambda x: pruned_runner.infer(x)[0],
                                     eval_inputs, masks, model.classes, class_keep, background, progress,
                                     model.class_axis)
    with stages.stage("latency", args.runs) as progress:
        sample = eval_inputs[:1]
        stats = measure_latency({"full": lambda: full_runner.infer(sample), "pruned": lambda: pruned_runner.infer(sample)},
                                runs=args.runs, progress=progress)

    return {
        "model": {"path": str(args.model), "sha256": model.sha256, "classes": list(model.classes),
                  "background": model.background, "labels_source": model.labels_source, "input_shape": list(input_shape),
                  "output": model.output_kind, "layout": model.preprocessing.layout, "class_axis": model.class_axis,
                  "input_channels": model.preprocessing.channels, "external_data": list(model.external_data),
                  "sources": model.sources},
        "categories": categories, "kept_classes": kept_names, "out_dir": str(out),
        "class_output": {"sliced_at": "class conv" if result.class_conv_blocked is None else "output (Gather)",
                         "class_conv_kept_whole_because": result.class_conv_blocked},
        "images": {"calibration": len(calib.paths), "calibration_skipped": [str(p) for p, _ in calib.skipped],
                   "evaluation": len(evaluation.paths), "evaluation_skipped": [str(p) for p, _ in evaluation.skipped],
                   "skipped": sum(len(f.skipped) for f in folders), "size": inputs["size"], "resize": args.resize,
                   "masks": bool(masks is not None),
                   "confident_images_per_class": dict(zip(model.classes, attribution.images_per_class.tolist()))},
        "settings": settings | {"runs": args.runs, "threads": args.threads, "device": device},
        "attribution": {"cache_hit": cache_hit, "cache": str(cache_dir) if cache_dir else None,
                        "tensors": len(attribution.tensors), "consumers_with_moments": len(attribution.moments)},
        "compensation": {"method": args.compensate, "mean_fallbacks": result.compensation_fallbacks},
        "channels": channels_report(analysis, result),
        "cost": {"full": cost_full.to_dict(), "pruned": cost_pruned.to_dict(),
                 "macs_ratio": cost_pruned.macs / cost_full.macs, "params_ratio": cost_pruned.params / cost_full.params},
        "latency": {"backend": full_runner.name, "runs": args.runs, "full": asdict(stats["full"]),
                    "pruned": asdict(stats["pruned"]), "speedup": speedup(stats["full"], stats["pruned"])},
        "fidelity": fidelity,
        "engines": engines,
        "stage_seconds": stages.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, one line already printed)
        return int(e.code or 0)
    stages = Stages(quiet=args.quiet or args.json)
    try:
        report = run(args, stages)
        write_report(report, Path(report["out_dir"]))
        write_png(report, Path(report["out_dir"]))
    except DisasmError as e:
        print(f"disasm-compile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("disasm-compile: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user mistake: short message, traceback on request
        if args.verbose:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"disasm-compile: internal error: {type(e).__name__}: {first} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        print_report(report, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
