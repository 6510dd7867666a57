"""Calibration and evaluation inputs: image folders, ground-truth masks, and the model's preprocessing."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from disasm.compiler.errors import DisasmError

if TYPE_CHECKING:  # load imports onnx (a second or more); images are read without it
    from disasm.compiler.load import Preprocessing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
IGNORE_INDEX = 255
RESIZE_POLICIES = ("stretch", "none")  # stretch: resize to the model's input size; none: images must have it
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as PIL's "L" mode


@dataclass
class ImageFolder:
    """Readable images of a folder (sorted by relative path) and the files that were skipped, with why."""

    root: Path
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    recursive: bool = False

    def key(self, path: Path) -> str:
        """What a mask is matched by: the file stem, or with --recursive the relative path without its suffix."""
        return path.relative_to(self.root).with_suffix("").as_posix() if self.recursive else path.stem


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' (e.g. 512x1024) -> (H, W)."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise DisasmError(f"--input-size {text!r} is not HxW with positive integers, e.g. 512x1024")
    return int(parts[0]), int(parts[1])


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey PNGs open in one of these
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def _open(path: Path) -> Image.Image:
    """Image.open, with a decompression bomb (more pixels than PIL's limit) as the user's error, naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        raise DisasmError(f"{path}: image too large to read safely ({e}); downscale it or move it out of the "
                          f"folder") from None


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5 to 8 turn the stored pixels by 90 degrees."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: the pixels as stored
        orientation = 1
    return (img.height, img.width) if orientation in (5, 6, 7, 8) else img.size


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as the image is displayed: EXIF orientation applied; 16-bit grey scaled to 8 bit (not clipped to
    white); palette, grey, grey+alpha, RGBA, CMYK and YCbCr converted by PIL (alpha dropped)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: the pixels as stored
        pass
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def _read_image(path: Path, size: tuple[int, int] | None, resize: str) -> np.ndarray:
    with _open(path) as img:
        img = to_rgb(img)
        if size is not None and img.size != (size[1], size[0]):
            if resize == "none":
                raise DisasmError(f"{path}: image is {img.height}x{img.width} (HxW) but the model input is "
                                  f"{size[0]}x{size[1]} and --resize none was given; resize the images or use "
                                  f"--resize stretch")
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _why(error: BaseException) -> str:
    """A short reason a file was skipped, e.g. 'truncated' or 'not an image'."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    text = str(error).strip()
    if "truncated" in text.lower():
        return "truncated"
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}"[:120] if first else type(error).__name__


def _decodes(path: Path) -> None:
    """Decode the whole file (a JPEG at reduced scale: the same stream, a fraction of the work), so that a truncated
    or corrupt file is found here and not in the middle of the run. Raises what PIL raises."""
    with _open(path) as img:
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()


def scan_images(folder: str | Path, recursive: bool = False, size: tuple[int, int] | None = None) -> ImageFolder:
    """List the images of `folder`, checking that each decodes in full; unreadable files (not an image, truncated,
    corrupt) are skipped and reported with why. An image over PIL's decompression-bomb limit is the user's error."""
    root = Path(folder)
    if not root.is_dir():
        raise DisasmError(f"{root}: image folder does not exist" if not root.exists() else f"{root}: not a folder")
    candidates = sorted((p for p in (root.rglob("*") if recursive else root.iterdir())
                         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                        key=lambda p: p.relative_to(root).as_posix())
    result = ImageFolder(root, [], recursive=recursive)
    for p in candidates:
        try:
            _decodes(p)
            result.paths.append(p)
        except DECODE_ERRORS as e:
            result.skipped.append((p, _why(e)))
    if not result.paths:
        found = f" ({len(result.skipped)} unreadable)" if result.skipped else ""
        deeper = "" if recursive else "; images in subfolders need --recursive"
        raise DisasmError(f"{root}: no readable images (PNG/JPEG/BMP/WebP){found}{deeper}")
    return result


def load_images(paths: list[Path], size: tuple[int, int] | None, resize: str = "stretch") -> np.ndarray:
    """uint8 [N, H, W, 3] RGB. With `size` (H, W), images are resized to it (`resize` stretch) or must have it
    (`resize` none); without it, all images must share one size."""
    images = []
    for p in paths:
        try:
            images.append(_read_image(p, size, resize))
        except DECODE_ERRORS as e:  # decoded by scan_images, so the file changed since (or PIL disagrees with itself)
            raise DisasmError(f"{p}: cannot decode the image ({_why(e)})") from None
    shapes = {im.shape[:2] for im in images}
    if len(shapes) != 1:
        raise DisasmError(f"images have different sizes (HxW {', '.join(f'{h}x{w}' for h, w in sorted(shapes)[:3])}"
                          f"{', ...' if len(shapes) > 3 else ''}); the model has a dynamic input size, so pass "
                          f"--input-size HxW to resize them")
    return np.stack(images)


def preprocess(images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """float32 model input from uint8 [N, H, W, 3] RGB pixels: grey or colour order, (x - mean) / std, layout."""
    if pre.channels == 1:
        x = images.astype(np.float32) @ GREY_WEIGHTS
        x = x[..., None]
    else:
        x = (images[..., ::-1] if pre.color == "bgr" else images).astype(np.float32)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pre.layout == "nchw" else x)


def load_masks(folder: str | Path, images: ImageFolder, size: tuple[int, int] | None,
               num_classes: int | None = None) -> np.ndarray:
    """uint8 [N, H, W] class-index masks (grey or palette PNG, 255 = ignore) matched to `images` by file stem, or by
    relative path without suffix when the images were scanned recursively. A mask must have its image's size; both
    are resized (nearest for masks) to `size` when given. Labels must be < `num_classes` or 255."""
    root = Path(folder)
    if not root.is_dir():
        raise DisasmError(f"{root}: mask folder does not exist" if not root.exists() else f"{root}: not a folder")
    found = sorted(p for p in (root.rglob("*") if images.recursive else root.iterdir())
                   if p.is_file() and p.suffix.lower() == ".png")
    by_key: dict[str, Path] = {}
    for p in found:
        by_key.setdefault(p.relative_to(root).with_suffix("").as_posix() if images.recursive else p.stem, p)
    missing = [p for p in images.paths if images.key(p) not in by_key]
    if missing:
        how = "relative path without suffix (--recursive)" if images.recursive else "file stem"
        raise DisasmError(f"{root}: no mask for {len(missing)} of {len(images.paths)} images (e.g. "
                          f"{images.key(missing[0])}.png for {missing[0].name}); masks are PNGs matched by {how}")
    masks = [_read_mask(by_key[images.key(p)], p, size, num_classes) for p in images.paths]
    return np.stack(masks)


def _read_mask(path: Path, image: Path, size: tuple[int, int] | None, num_classes: int | None) -> np.ndarray:
    try:
        with _open(image) as img:
            image_size = oriented_size(img)
        with _open(path) as m:
            if m.mode not in ("L", "P"):
                raise DisasmError(f"{path}: mask must be a grey or palette PNG of class indices, not mode {m.mode}")
            if m.size != image_size:
                raise DisasmError(f"{path}: mask is {m.height}x{m.width} (HxW) but its image {image.name} is "
                                  f"{image_size[1]}x{image_size[0]}")
            if size is not None and m.size != (size[1], size[0]):
                m = m.resize((size[1], size[0]), Image.NEAREST)
            mask = np.asarray(m, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DisasmError(f"{path}: unreadable mask ({type(e).__name__})") from None
    if num_classes is not None:
        bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise DisasmError(f"{path}: mask holds label(s) {bad[:5].tolist()} but the model has {num_classes} classes "
                              f"(0..{num_classes - 1}; {IGNORE_INDEX} = ignore)")
    return mask
