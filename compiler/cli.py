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
The output folder is written as one transaction: built beside it, moved into place when complete (--force replaces
the earlier results at that moment), left as it was after an error or Ctrl-C; one run at a time per folder.
This module only parses the command line, calls compiler.pipeline.compile_model and prints the report.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from disasm.compiler.errors import DisasmError
from disasm.compiler.transaction import interrupted, interrupts

if TYPE_CHECKING:
    from disasm.compiler.load import Overrides
    from disasm.compiler.pipeline import Request

# Choices and defaults of the options, written out so that --help and argument errors need neither torch nor onnx
# (seconds of imports). tests/test_cli.py checks each against the module that owns it.
CRITERIA = ("disassembler+taylor", "disassembler", "taylor", "l1", "magnitude", "random")  # baselines.CRITERIA
COMPENSATIONS = ("none", "mean", "lsq", "sequential")               # attribution.compensate.METHODS
CRITERION, COMPENSATION = "disassembler+taylor", "sequential"       # compiler.pipeline.CRITERION, COMPENSATION
LAYOUTS = ("nchw", "nhwc")                                          # compiler.load.LAYOUTS
OUTPUT_KINDS = ("logits", "probs", "sigmoid")                       # compiler.load.OUTPUT_KINDS
MODES = ("chosen-or-none", "restricted")                            # compiler.outputs.MODES
RESIZE_POLICIES = ("stretch", "none")                               # compiler.images.RESIZE_POLICIES
ALPHAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # compiler.pipeline.ALPHAS
MIN_FIDELITY = 0.9                                                  # compiler.pipeline.MIN_FIDELITY
ATTRIBUTION_DEFAULTS = {"tau": 0.8, "gradient": "positive", "target": "logit", "batch_size": 8}  # AttributionSettings
SELECTION_DEFAULTS = {"alpha": 0.1, "beta": 0.2, "rule": "prod", "round_to": None}  # select.SelectionSettings


def _int_at_least(minimum: int):
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _round_to(text: str) -> int | None:
    """argparse type: 'auto' (None) or an integer >= 1."""
    return None if text.strip().lower() == "auto" else _positive_int(text)


def _device(text: str) -> str:
    """argparse type: a torch device name (whether it exists here is checked after parsing, with torch)."""
    if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda or cuda:N")
    return text.strip()


def _trt_target(text: str) -> str:
    """argparse type: a compute capability (whether the TensorRT module builds for it is checked after parsing)."""
    if not re.fullmatch(r"(sm_?)?\d+(\.\d+)?", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a compute capability; use e.g. sm86, 8.6 or 86")
    return text.strip()


class _Parser(argparse.ArgumentParser):
    """argparse with the command's error convention: one line on stderr and exit code 2, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="disasm-compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the segmentation model (.onnx); never modified")
    p.add_argument("--categories", required=True, help="comma-separated class names to keep, e.g. circle,star "
                   "(case and ' ', '_', '-' are ignored when matching)")
    p.add_argument("--head", help="the output that holds the class scores, for models with several outputs "
                   "(default: the only one, or the one whose channel count matches the labels), e.g. --head seg")
    p.add_argument("--labels", help="class names of the output channels, overriding the model metadata: a built-in set "
                   "(voc, coco-voc, cityscapes, ade20k), a text file (one name per line), or a comma-separated list")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--images", type=Path, required=True, help="calibration image folder (PNG/JPEG/BMP/WebP) for "
                    "attribution, e.g. --images calib/; unreadable files are skipped and counted")
    io.add_argument("--eval-images", type=Path, help="images for judging fidelity and searching the budget, never "
                    "used by attribution (default: every 4th image of --images, held out)")
    io.add_argument("--masks", type=Path, help="ground-truth masks for the evaluation images, matched by file stem "
                                               "(grey or palette PNG of class indices, 255 = ignore); adds mIoU, "
                                               "e.g. --eval-images val/images --masks val/masks")
    io.add_argument("--recursive", action="store_true", help="also read images (and masks) in subfolders; masks are "
                    "then matched by relative path without suffix (images/a/b.jpg <-> masks/a/b.png)")
    io.add_argument("--out", type=Path, help="output folder (default: disasm-out/<model>-<categories>)")
    io.add_argument("--force", action="store_true", help="replace an earlier output folder of disasm-compile; it is "
                    "replaced only once the new results are complete (never a folder holding other files)")
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
    at.add_argument("--tau", type=float, default=ATTRIBUTION_DEFAULTS["tau"], help="pixel confidence of the category masks (default %(default)s)")
    at.add_argument("--gradient", default=ATTRIBUTION_DEFAULTS["gradient"], help="gradient policy: positive, negative, absolute (default %(default)s)")
    at.add_argument("--target", default=ATTRIBUTION_DEFAULTS["target"], help="back-propagated score: logit or prob (default %(default)s)")
    at.add_argument("--batch-size", type=_positive_int, default=ATTRIBUTION_DEFAULTS["batch_size"], help="images per attribution forward and (image, category) rows per backward; bounds memory (default %(default)s)")
    at.add_argument("--device", type=_device, default=None, help="torch device for attribution (default: cuda if available, else cpu)")
    se = p.add_argument_group("selection")
    se.add_argument("--min-fidelity", type=float, default=MIN_FIDELITY, help="the contract: smallest category "
                    "fidelity (mean IoU of the chosen categories against the full model's answers, on the judged "
                    "images) the budget search accepts (default %(default)s)")
    se.add_argument("--others", choices=MODES, default=MODES[0], help="chosen-or-none: one output per chosen "
                    "category plus 'none' (background, else 'other'); restricted: the chosen classes plus background, "
                    "the paper's protocol (default %(default)s)")
    se.add_argument("--alpha", type=float, default=None, help="fix the budget by hand: keep channels whose "
                    f"normalised score exceeds alpha (default: searched over {', '.join(map(str, ALPHAS))})")
    se.add_argument("--beta", type=float, default=SELECTION_DEFAULTS["beta"], help="backward threshold of the 'and' rule (default %(default)s)")
    se.add_argument("--rule", default=SELECTION_DEFAULTS["rule"], help="combination of the two vectors: prod or and (default %(default)s)")
    se.add_argument("--round-to", type=_round_to, default=SELECTION_DEFAULTS["round_to"], metavar="auto|N",
                    help="kept channel counts per group: multiples of N where the group size is one; auto: 8 where "
                         "the size is a multiple of 8 (TensorRT FP16), else 4 where it is a multiple of 4 (ONNX "
                         "Runtime CPU's blocked convs), else any count (default auto)")
    se.add_argument("--last-n", type=int, default=None, help="cut only groups within N convs of the output (default: all)")
    se.add_argument("--keep-ratio", type=float, default=None,
                    help="fix the budget by hand: keep this fraction of every cut group by score")
    se.add_argument("--criterion", default=CRITERION, choices=CRITERIA,
                    help="which channels a group keeps; the Disassembler always sets how many. disassembler+taylor: "
                         "the mean of the Disassembler and Taylor scores; the others score alone, for comparisons at "
                         "equal MACs (default %(default)s)")
    se.add_argument("--compensate", default=COMPENSATION, choices=COMPENSATIONS, help="refit the consumers of cut "
                    "channels: sequential (ridge least squares, one depth level at a time, on the inputs the pruned "
                    "network gives them), lsq (the same, each on the full network's inputs, from attribution "
                    "statistics), mean (calibration means folded into the biases) or none (default %(default)s)")
    se.add_argument("--finetune", type=_non_negative_int, default=0, metavar="EPOCHS", help="after each cut, train "
                    "the pruned model's weights for EPOCHS passes over the calibration images with the full model as "
                    "teacher (no labels; seeded, deterministic; on --device); the budget search then looks for the "
                    "smallest model that meets --min-fidelity after finetuning, e.g. --finetune 1 (default 0)")
    bench = p.add_argument_group("benchmark")
    bench.add_argument("--runs", type=_positive_int, default=30, help="interleaved latency rounds, full vs pruned (default %(default)s)")
    bench.add_argument("--trt-target", type=_trt_target, default=None,
                       help="TensorRT engine target, e.g. sm86 (default: the local GPU; without one, sm86 with "
                            "TensorRT for RTX). Engines are built when a TensorRT module is installed (the trt extra)")
    bench.add_argument("--no-engines", action="store_true", help="do not build TensorRT engines")
    bench.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)")
    out = p.add_argument_group("output")
    out.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    out.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    out.add_argument("--verbose", action="store_true", help="show tracebacks of internal errors")
    return p


def model_overrides(args: argparse.Namespace) -> Overrides:
    """What the command line says about the model's input and output (None where it says nothing)."""
    from disasm.compiler.load import Overrides, parse_floats

    return Overrides(layout=args.layout, output=args.output,
                     mean=parse_floats(args.mean, "--mean") if args.mean is not None else None,
                     std=parse_floats(args.std, "--std") if args.std is not None else None, color=args.color,
                     head=args.head)


def request_from_args(args: argparse.Namespace) -> Request:
    """The pipeline's Request (imports torch: call it after the arguments are parsed)."""
    from disasm.attribution.disassembler import AttributionSettings
    from disasm.attribution.select import SelectionSettings
    from disasm.compiler.pipeline import Request

    attribution = AttributionSettings(tau=args.tau, gradient=args.gradient, target=args.target,
                                      batch_size=args.batch_size)
    selection = SelectionSettings(alpha=args.alpha if args.alpha is not None else SelectionSettings.alpha,
                                  beta=args.beta, rule=args.rule, round_to=args.round_to, last_n=args.last_n,
                                  keep_ratio=args.keep_ratio)
    return Request(model=args.model, categories=args.categories, images=args.images, out=args.out,
                   labels=args.labels, overrides=model_overrides(args), eval_images=args.eval_images,
                   masks=args.masks, recursive=args.recursive, force=args.force, cache=args.cache,
                   no_cache=args.no_cache, input_size=args.input_size, resize=args.resize, attribution=attribution,
                   device=args.device, selection=selection,
                   budget_fixed=args.alpha is not None or args.keep_ratio is not None,
                   min_fidelity=args.min_fidelity, others=args.others, criterion=args.criterion,
                   compensate=args.compensate, finetune=args.finetune, runs=args.runs, threads=args.threads,
                   trt_target=args.trt_target, engines=not args.no_engines, reports=True)


def main(argv: list[str] | None = None) -> int:
    """disasm-compile: 0 done, 2 the user's mistake (one line), 1 an internal error, 130 interrupted (Ctrl-C)."""
    with interrupts():
        try:
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as e:  # --help (0) or a bad option (2, one line already printed)
                return int(e.code or 0)
            return _run(args)
        except KeyboardInterrupt:
            print("disasm-compile: interrupted; the output folder was left as it was", file=sys.stderr)
            return 130


def _run(args: argparse.Namespace) -> int:
    try:
        from disasm.compiler.pipeline import Stages, compile_model  # torch, onnx: after the arguments are read

        report = compile_model(request_from_args(args), Stages(quiet=args.quiet or args.json)).to_dict()
    except DisasmError as e:
        print(f"disasm-compile: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not a user mistake: short message, traceback on request
        if _caused_by_interrupt(e):  # e.g. Ctrl-C inside a compiled module's import: pybind11 makes it ImportError
            raise KeyboardInterrupt from e
        if args.verbose:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"disasm-compile: internal error: {type(e).__name__}: {first} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1
    try:
        if interrupted():  # Ctrl-C while the finished set was moved into place: it is complete, but stop here
            raise KeyboardInterrupt
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        elif not args.quiet:
            from rich.console import Console

            from disasm.runtime.report import print_report

            print_report(report, Console())
    except KeyboardInterrupt:
        print(f"disasm-compile: interrupted after the results were written to {report['out_dir']}", file=sys.stderr)
        return 130
    return 0


def _caused_by_interrupt(error: BaseException) -> bool:
    seen = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
