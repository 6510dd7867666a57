"""Class names of a segmentation model's output channels, and matching `--categories` against them.

Names come from, in order: an explicit spec (a built-in label set, a text file, or a comma-separated list), the model's
`disasm.classes` / `disasm.background` metadata, or generic names `class0..class{K-1}`. Matching a requested category
ignores case and treats ' ', '_' and '-' alike, so 'Traffic_Light' names 'traffic light'.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from disasm.compiler.errors import DisasmError

# PASCAL VOC 2012 segmentation, 21 output channels, index 0 is the background. Spelling and order as in
# mmsegmentation's VOCDataset (open-mmlab/mmsegmentation: mmseg/datasets/voc.py).
VOC = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# torchvision's segmentation weights (DeepLabV3 / FCN / LR-ASPP `COCO_WITH_VOC_LABELS_V1`): trained on COCO images
# restricted to the 20 VOC classes, 21 output channels, index 0 is the background. Their meta["categories"] is
# torchvision's `_VOC_CATEGORIES` (pytorch/vision: torchvision/models/_meta.py, imported by
# torchvision/models/segmentation/deeplabv3.py), spelled exactly so.
COCO_VOC = ("__background__",) + VOC[1:]

# Cityscapes train ids 0..18, 19 output channels, no background class (label 255 is ignored, not predicted). Order and
# spelling as in mmsegmentation's CityscapesDataset.METAINFO (open-mmlab/mmsegmentation: mmseg/datasets/cityscapes.py).
CITYSCAPES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# ADE20K SceneParsing, 150 output channels, no background class: annotation 0 ("other") is dropped by
# reduce_zero_label, so channel i is annotation i + 1. Copied from mmsegmentation's ADE20KDataset.METAINFO["classes"]
# (open-mmlab/mmsegmentation: mmseg/datasets/ade.py, commit 088894bd). The source spells index 7 'bed ' with a
# trailing space; it is 'bed' here, since names are stripped wherever they are read.
ADE20K = (  # ten per row; the comment gives the row's channel indices
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",  # 0-9
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",  # 10-19
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",  # 20-29
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",  # 30-39
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",  # 40-49
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",  # 50-59
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",  # 60-69
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",  # 70-79
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",  # 80-89
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",  # 90-99
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",  # 100-109
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",  # 110-119
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",  # 120-129
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",  # 130-139
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",  # 140-149
)

# name -> (class names in output-channel order, background class or None)
BUILTIN_LABEL_SETS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "voc": (VOC, "background"),
    "coco-voc": (COCO_VOC, "__background__"),
    "cityscapes": (CITYSCAPES, None),
    "ade20k": (ADE20K, None),
}

BACKGROUND_NAMES = ("background", "bg")  # compared after normalize(), so '__background__' counts too
SHOWN_NAMES = 10  # how many available names an error message lists


@dataclass(frozen=True)
class LabelSet:
    """Class names in output-channel order, the background class among them (or None), and where they came from.

    `source` reads well after "labels from": "built-in voc", "file labels.txt", "command line", "model metadata",
    "generic".
    """

    names: tuple[str, ...]
    background: str | None
    source: str


def normalize(name: str) -> str:
    """The form names are compared in: lower case, runs of ' ', '_', '-' as one space, no outer separators."""
    return re.sub(r"[\s_-]+", " ", name.lower()).strip()


def resolve_labels(spec: str | None, metadata: dict[str, str], num_classes: int) -> LabelSet:
    """The class names of a model with `num_classes` output channels.

    Args:
        spec: A built-in label set name (voc, coco-voc, cityscapes, ade20k), a path to a UTF-8 text file with one name
            per line ('#' comment lines and blank lines skipped), or a comma-separated list of names. An existing file
            wins over a built-in of the same name. Defaults to the model metadata, then to generic names.
        metadata: The model's metadata_props; `disasm.classes` and `disasm.background` are read.
        num_classes: The number of output channels the names must match.

    Raises:
        DisasmError: if the spec is none of the three forms, a name is empty or repeated, the metadata background is
            not one of the metadata classes, or the number of names differs from `num_classes`.
    """
    labels = _labels_from_spec(spec) if spec is not None else _labels_from_metadata(metadata, num_classes)
    labels = _apply_metadata_background(labels, metadata)
    _check_unique(labels)
    _check_count(labels, num_classes)
    return labels


def given_label_count(spec: str | None, metadata: dict[str, str]) -> int | None:
    """How many class names `spec` or the metadata give (None when neither names any), before any count check."""
    if spec is not None:
        return len(_labels_from_spec(spec).names)
    if "disasm.classes" in metadata:
        return len(_split_names(metadata["disasm.classes"], "model metadata disasm.classes"))
    return None


def match_categories(requested: str, labels: LabelSet) -> list[int]:
    """Output-channel indices (ascending) of the comma-separated category names in `requested`.

    Matching ignores case and treats ' ', '_', '-' alike. Repeated names count once. Naming the background is allowed
    and ignored (the background is always kept). Raises DisasmError for unknown names, with the closest known ones.
    """
    keys = {normalize(name): i for i, name in enumerate(labels.names)}
    wanted = _first_spellings(requested.split(","))
    if not wanted:
        raise DisasmError(f"no categories given ({requested!r}); name at least one class, e.g. "
                          f"{','.join(_object_names(labels)[:2])}")
    unknown = [name for name in wanted if normalize(name) not in keys]
    if unknown:
        raise DisasmError(_unknown_message(unknown, labels))
    background = normalize(labels.background) if labels.background is not None else None
    indices = sorted({keys[normalize(w)] for w in wanted if normalize(w) != background})
    if not indices:
        raise DisasmError(f"the categories name only the background class {labels.background!r}, which is always "
                          f"kept; name at least one object class, e.g. {_object_names(labels)[0]}")
    return indices


def _first_spellings(parts: list[str]) -> list[str]:
    """The non-empty names in `parts`, stripped, each counted once (ignoring case and separators), in order."""
    first: dict[str, str] = {}
    for part in parts:
        first.setdefault(normalize(part), part.strip())
    first.pop("", None)
    return list(first.values())


def _labels_from_spec(spec: str) -> LabelSet:
    path = Path(spec)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError:  # e.g. a long comma list is no valid file name
        is_file = is_dir = False
    if spec.strip() and is_file:
        return _with_leading_background(_read_label_file(path), f"file {spec}")
    if spec.strip() and is_dir:
        raise DisasmError(f"labels {spec!r}: is a folder; give a text file with one class name per line")
    builtin_name = normalize(spec).replace(" ", "-")  # 'COCO_VOC' names coco-voc
    if builtin_name in BUILTIN_LABEL_SETS:
        names, background = BUILTIN_LABEL_SETS[builtin_name]
        return LabelSet(names=names, background=background, source=f"built-in {builtin_name}")
    if "," not in spec:
        raise DisasmError(f"labels {spec!r}: not a file, not a built-in label set ({', '.join(BUILTIN_LABEL_SETS)}), "
                          "and not a comma-separated list")
    return _with_leading_background(_split_names(spec, f"labels {spec!r}"), "command line")


def _labels_from_metadata(metadata: dict[str, str], num_classes: int) -> LabelSet:
    if "disasm.classes" in metadata:
        names = _split_names(metadata["disasm.classes"], "model metadata disasm.classes")
        return LabelSet(names=names, background=None, source="model metadata")
    return LabelSet(names=tuple(f"class{i}" for i in range(num_classes)), background=None, source="generic")


def _apply_metadata_background(labels: LabelSet, metadata: dict[str, str]) -> LabelSet:
    """Use `disasm.background` where it names one of the classes; it must, when the classes came from the metadata."""
    wanted = metadata.get("disasm.background", "").strip()
    if not wanted:
        return labels
    found = [name for name in labels.names if normalize(name) == normalize(wanted)]
    if found:
        return LabelSet(names=labels.names, background=found[0], source=labels.source)
    if labels.source == "model metadata":
        raise DisasmError(f"model metadata disasm.background={wanted!r} is not one of the classes in "
                          f"disasm.classes ({_shown(labels.names)}); fix the metadata or pass the labels explicitly")
    return labels


def _read_label_file(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DisasmError(f"labels file {path}: not UTF-8 text (bad byte at offset {e.start}); "
                          "save it as UTF-8") from None
    names = []
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if "," in name:
            raise DisasmError(f"labels file {path}, line {number}: {name!r} contains a comma; class names are stored "
                              "comma-separated in the model metadata, so rename it")
        names.append(name)
    if not names:
        raise DisasmError(f"labels file {path}: no class names (only blank lines and '#' comments)")
    return tuple(names)


def _split_names(text: str, where: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    empty = [i for i, name in enumerate(names) if not name]
    if empty:
        raise DisasmError(f"{where}: name {empty[0] + 1} of {len(names)} is empty; remove the extra comma")
    return names


def _with_leading_background(names: tuple[str, ...], source: str) -> LabelSet:
    background = names[0] if normalize(names[0]) in BACKGROUND_NAMES else None
    return LabelSet(names=names, background=background, source=source)


def _check_unique(labels: LabelSet) -> None:
    spellings: dict[str, list[str]] = {}
    for name in labels.names:
        spellings.setdefault(normalize(name), []).append(name)
    repeated = [" / ".join(repr(n) for n in dict.fromkeys(names)) + f" ({len(names)}x)"
                for names in spellings.values() if len(names) > 1]
    if repeated:
        raise DisasmError(f"labels from {labels.source}: duplicate class names {', '.join(repeated)} (names are "
                          "compared ignoring case and ' ', '_', '-'); every output channel needs its own name")


def _check_count(labels: LabelSet, num_classes: int) -> None:
    count = len(labels.names)
    if count == num_classes:
        return
    message = (f"{count} class names from {labels.source}, but the model's output has {num_classes} channels; "
               f"give exactly {num_classes} names, in output-channel order")
    if count == len(ADE20K) and num_classes == len(ADE20K) + 1:
        message += (". ADE20K models trained with reduce_zero_label=False have an extra 'background' at index 0: "
                    "pass a file with 'background' on the first line followed by the 150 ADE20K names")
    raise DisasmError(message)


def _object_names(labels: LabelSet) -> list[str]:
    return [name for name in labels.names if name != labels.background] or list(labels.names)


def _shown(names: tuple[str, ...]) -> str:
    listed = ", ".join(names[:SHOWN_NAMES])
    return listed if len(names) <= SHOWN_NAMES else f"{listed}, ... ({len(names)} in all)"


def _unknown_message(unknown: list[str], labels: LabelSet) -> str:
    by_key = {normalize(name): name for name in labels.names}
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(normalize(name), list(by_key), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(by_key[c]) for c in close)}?)" if close else ""
        parts.append(f"{name!r}{hint}")
    noun = "category" if len(unknown) == 1 else "categories"
    return f"unknown {noun} {'; '.join(parts)}; labels from {labels.source}: {_shown(labels.names)}"
