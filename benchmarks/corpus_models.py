"""The real-model corpus (../shared/corpus/corpus.json): its entries, each model loaded as disasm-compile loads it, and
the disasm-compile arguments that describe it. Shared by the corpus benchmarks and tests, so all read it one way."""

from __future__ import annotations

import json
from pathlib import Path

from disasm.compiler.load import Model, Overrides, load_model, parse_floats

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"  # beside the repository, never inside it
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


def flag(entry: dict, name: str) -> str | None:
    """The value corpus.json gives a disasm-compile flag of this model, if it gives one."""
    flags = entry["flags"]
    return flags[flags.index(name) + 1] if name in flags else None


def corpus_overrides(entry: dict) -> Overrides:
    """What the model's disasm-compile flags say about its input, and its head."""
    mean, std = flag(entry, "--mean"), flag(entry, "--std")
    return Overrides(mean=parse_floats(mean, "--mean") if mean else None,
                     std=parse_floats(std, "--std") if std else None,
                     color="bgr" if "--bgr" in entry["flags"] else None, head=head_and_labels(entry)[0])


def load_corpus_model(corpus: Path, entry: dict) -> Model:
    return load_model(corpus / entry["model"], ",".join(head_and_labels(entry)[1]), corpus_overrides(entry))


def split_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(calibration, judged): every CALIBRATION_EVERY-th image of the folder, sorted by name, and the rest."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    calibration = images[::CALIBRATION_EVERY]
    return calibration, [p for p in images if p not in calibration]
