"""The real-model corpus (../shared/corpus/corpus.json): its entries, each model loaded as disasm-compile loads it, and
the disasm-compile arguments that describe it. Shared by the corpus benchmarks and tests, so all read it one way."""

from __future__ import annotations

import json
from pathlib import Path

from disasm.compiler.load import Model, Overrides, load_model, parse_floats

CALIBRATION_EVERY = 4  # every fourth image of a folder calibrates; the rest are only judged


def corpus_entries(corpus: Path) -> list[dict]:
    return json.loads((corpus / "corpus.json").read_text())["models"]


def head_and_labels(entry: dict) -> tuple[str | None, list[str]]:
    """The output holding the class scores (None: the only one) and its class names."""
    labels = entry["labels"]
    if isinstance(labels, dict):  # several heads: the first listed, with its own names
        head, names = next(iter(labels.items()))
        return head, list(names)
    return entry.get("segmentation_output"), list(labels)


def compile_args(corpus: Path, entry: dict) -> list[str]:
    """disasm-compile arguments naming the model, its labels, head and input flags (no images, categories or --out)."""
    head, labels = head_and_labels(entry)
    return [str(corpus / entry["model"]), "--labels", ",".join(labels), *(["--head", head] if head else []),
            *entry["flags"]]


def load_corpus_model(corpus: Path, entry: dict) -> Model:
    head, labels = head_and_labels(entry)
    flags = entry["flags"]
    value = {f: flags[i + 1] for i, f in enumerate(flags[:-1]) if f in ("--mean", "--std")}
    overrides = Overrides(mean=parse_floats(value["--mean"], "--mean") if "--mean" in value else None,
                          std=parse_floats(value["--std"], "--std") if "--std" in value else None,
                          color="bgr" if "--bgr" in flags else None, head=head)
    return load_model(corpus / entry["model"], ",".join(labels), overrides)


def split_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(calibration, judged): every CALIBRATION_EVERY-th image of the folder, sorted by name, and the rest."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    calibration = images[::CALIBRATION_EVERY]
    return calibration, [p for p in images if p not in calibration]
