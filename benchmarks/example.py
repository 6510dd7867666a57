"""The shipped example as benchmarks use it: model, channel analysis, calibration and evaluation data, one
attribution run (with the compensation moments) for all categories, and the full model's ONNX Runtime session."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from disasm.attribution.calibration import calibrate
from disasm.attribution.disassembler import Attribution, AttributionSettings
from disasm.attribution.select import SelectionSettings
from disasm.compiler.channels import ChannelAnalysis, analyse
from disasm.compiler.pipeline import specialise
from disasm.compiler.cost import model_cost
from disasm.compiler.files import write_atomic
from disasm.compiler.images import load_images, load_masks, preprocess, scan_images
from disasm.compiler.load import Model, load_model
from disasm.runtime.fidelity import evaluate_fidelity

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "shapes_seg.onnx"
DATA = ROOT / "examples" / "data"


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@dataclass
class Example:
    model: Model
    analysis: ChannelAnalysis
    calibration: np.ndarray
    eval_inputs: np.ndarray
    masks: np.ndarray
    attribution: Attribution
    attribution_seconds: float
    full: ort.InferenceSession

    def run_full(self, x: np.ndarray) -> np.ndarray:
        return self.full.run(None, {self.model.input_name: x})[0]

    def measure(self, categories: list[str], selection: SelectionSettings, compensation: str,
                criterion: str = "disassembler") -> dict[str, float]:
        """Specialise to `categories` from the shared attribution and measure cost and fidelity against the full model."""
        result = specialise(self.model, self.analysis, self.attribution, categories, selection, compensation, {},
                            criterion)
        pruned = session(result.pruned)
        fidelity = evaluate_fidelity(self.run_full, lambda x: pruned.run(None, {self.model.input_name: x})[0],
                                     self.eval_inputs, self.masks, self.model.classes, result.plan.names,
                                     result.plan.none, self.model.output_kind, result.plan.mode,
                                     class_axis=self.model.class_axis)
        shape = (1, 3, *self.model.image_size)
        full, cut = model_cost(self.model.proto, shape), model_cost(result.pruned, shape)
        return {"macs_ratio": cut.macs / full.macs, "params_ratio": cut.params / full.params,
                "category_fidelity": fidelity["category_fidelity"], "agreement": fidelity["agreement"],
                "miou_full": fidelity["miou_full"], "miou_pruned": fidelity["miou_pruned"]}


def write_results(out: Path, name: str, report: dict, markdown_lines: list[str]) -> None:
    """benchmarks/results/<name>.json and <name>.md, written atomically."""
    write_atomic(out / f"{name}.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(out / f"{name}.md", ("\n".join(markdown_lines) + "\n").encode())


def load_example(model_path: Path = MODEL, data: Path = DATA) -> Example:
    model = load_model(model_path)
    analysis = analyse(model.proto)
    size = model.image_size
    calibration = preprocess(load_images(scan_images(data / "calib").paths, size), model.preprocessing)
    evaluation = scan_images(data / "eval" / "images")
    eval_inputs = preprocess(load_images(evaluation.paths, size), model.preprocessing)
    masks = load_masks(data / "eval" / "masks", evaluation, size)
    start = time.perf_counter()
    attribution = calibrate(model, analysis, calibration, AttributionSettings(), "cpu", moments=True)
    return Example(model, analysis, calibration, eval_inputs, masks, attribution, time.perf_counter() - start,
                   session(model.proto))
