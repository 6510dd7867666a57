"""Calibration and evaluation inputs: image folders, ground-truth masks, and the model's preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from disasm.compiler.errors import DisasmError
from disasm.compiler.load import Preprocessing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
IGNORE_INDEX = 255


@dataclass
class ImageFolder:
    """Readable images of a folder (sorted by relative path) and the files that were skipped, with why."""

    root: Path
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def scan_images(folder: str | Path, recursive: bool = False, size: tuple[int, int] | None = None) -> ImageFolder:
    """List the images of `folder`, checking that each decodes; unreadable files are skipped and reported."""
    root = Path(folder)
    if not root.is_dir():
        raise DisasmError(f"{root}: image folder does not exist" if not root.exists() else f"{root}: not a folder")
    candidates = sorted(p for p in (root.rglob("*") if recursive else root.iterdir())
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    result = ImageFolder(root, [])
    for p in candidates:
        try:
            with Image.open(p) as img:
                img.verify()
            result.paths.append(p)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            result.skipped.append((p, type(e).__name__))
    if not result.paths:
        found = f" ({len(result.skipped)} unreadable)" if result.skipped else ""
        raise DisasmError(f"{root}: no readable images (PNG/JPEG){found}")
    return result


def load_images(paths: list[Path], size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB, resized to `size` (H, W) when given; all images must then share one size."""
    images = [_read_image(p, size) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DisasmError(f"images have different sizes {sorted(shapes)[:3]}; the model has a dynamic input size, "
                          f"so pass --input-size to resize them")
    return np.stack(images)


def preprocess(images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """float32 model input from uint8 [N, H, W, 3] RGB pixels: colour order, (x - mean) / std, layout."""
    x = images[..., ::-1] if pre.color == "bgr" else images
    x = (x.astype(np.float32) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pre.layout == "nchw" else x)


def load_masks(folder: str | Path, images: ImageFolder, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 [N, H, W] class-index masks (grey or palette PNG, 255 = ignore) matched to `images` by file stem."""
    root = Path(folder)
    if not root.is_dir():
        raise DisasmError(f"{root}: mask folder does not exist")
    by_stem = {p.stem: p for p in root.iterdir() if p.suffix.lower() == ".png"}
    missing = [p.name for p in images.paths if p.stem not in by_stem]
    if missing:
        raise DisasmError(f"{root}: no mask for {len(missing)} of {len(images.paths)} images (e.g. {missing[0]}); "
                          f"masks are matched by file stem")
    masks = []
    for p in images.paths:
        with Image.open(by_stem[p.stem]) as m:
            if m.mode not in ("L", "P"):
                raise DisasmError(f"{by_stem[p.stem]}: mask must be a grey or palette PNG of class indices, not {m.mode}")
            if size is not None and m.size != (size[1], size[0]):
                m = m.resize((size[1], size[0]), Image.NEAREST)
            masks.append(np.asarray(m, dtype=np.uint8))
    return np.stack(masks)
