"""Procedural scenes for the shipped example model: coloured shapes on textured backgrounds.

Every image holds several objects of random category, scale, rotation and colour, drawn in painter's order so that
later objects occlude earlier ones; the mask records the visible category of every pixel. Colour is random per object,
so the network has to recognise shape, not hue. Everything is a pure function of the seed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("background", "circle", "square", "triangle", "star", "ring", "cross", "hexagon")
SIZE = 128


def _regular_polygon(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def _star(radius: float, phase: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        a = phase + math.pi * i / 5
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _cross(radius: float, phase: float) -> list[tuple[float, float]]:
    w = radius * 0.32
    outline = [(w, w), (w, radius), (-w, radius), (-w, w), (-radius, w), (-radius, -w),
               (-w, -w), (-w, -radius), (w, -radius), (w, -w), (radius, -w), (radius, w)]
    c, s = math.cos(phase), math.sin(phase)
    return [(x * c - y * s, x * s + y * c) for x, y in outline]


def _shape_mask(category: str, cx: float, cy: float, radius: float, phase: float) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of one shape centred at (cx, cy)."""
    canvas = Image.new("1", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)

    def polygon(points: list[tuple[float, float]]) -> None:
        draw.polygon([(cx + x, cy + y) for x, y in points], fill=1)

    if category == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    elif category == "ring":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
        inner = radius * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif category == "square":
        polygon(_regular_polygon(4, radius * 1.1, phase))
    elif category == "triangle":
        polygon(_regular_polygon(3, radius * 1.15, phase))
    elif category == "hexagon":
        polygon(_regular_polygon(6, radius, phase))
    elif category == "star":
        polygon(_star(radius * 1.15, phase))
    elif category == "cross":
        polygon(_cross(radius, phase))
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CLASSES[1:]}")
    return np.asarray(canvas, dtype=bool)


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A float [SIZE, SIZE, 3] texture in [0, 1]: gradient, stripes, checker or smooth noise, in two random colours."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    kind = rng.integers(4)
    if kind == 0:
        angle = rng.uniform(0, math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle) + 1.5) / 3.0
    elif kind == 1:
        angle, freq = rng.uniform(0, math.pi), rng.uniform(4, 14)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    elif kind == 2:
        cells = int(rng.integers(3, 10))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    else:
        grid = rng.random((int(rng.integers(3, 8)),) * 2).astype(np.float32)
        t = np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.BICUBIC))
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    a, b = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
    return a * t[..., None] + b * (1 - t[..., None])


def make_scene(seed: int, max_objects: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 [SIZE, SIZE, 3] RGB, mask uint8 [SIZE, SIZE] of class indices into CLASSES)."""
    rng = np.random.default_rng(seed)
    image = _texture(rng) * rng.uniform(0.35, 1.0)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for _ in range(int(rng.integers(2, max_objects + 1))):
        label = int(rng.integers(1, len(CLASSES)))
        radius = rng.uniform(7, 30)
        cx, cy = rng.uniform(0, SIZE, size=2)
        shape = _shape_mask(CLASSES[label], cx, cy, radius, rng.uniform(0, 2 * math.pi))
        fill = _texture(rng) if rng.random() < 0.3 else np.broadcast_to(rng.random(3).astype(np.float32), image.shape)
        image = np.where(shape[..., None], fill, image)
        mask[shape] = label
    image = image + rng.normal(0, rng.uniform(0.0, 0.06), image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def make_batch(seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    images, masks = zip(*(make_scene(s) for s in seeds))
    return np.stack(images), np.stack(masks)
