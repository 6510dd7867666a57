"""On-disk cache of attribution runs: one run serves every category subset of the same model and images.

An entry holds the per-category sums for *all* categories (and, when they were computed, the compensation moments)
under a key that hashes everything the sums depend on: the model bytes, the calibration images' bytes, the
attribution settings and the observed tensors. Any change gives another key, so stale entries are never read; an
entry without moments also never stands in for a run that needs them.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disasm.attribution.disassembler import Attribution
from disasm.compiler.files import write_atomic

# Bump when the stored arrays, or what they mean, change: older entries are then never read. 3: logits behind a final
# Softmax/Sigmoid are back-propagated, fallback masks, predicted_pixels / mask_pixels / fallback arrays.
FORMAT = 3


@dataclass(frozen=True)
class CacheKey:
    model_sha256: str
    images_sha256: str
    settings: dict
    tensors: tuple[str, ...]
    consumers: tuple[int, ...]  # consumer node indices with moments; () when moments were not computed

    def digest(self) -> str:
        payload = json.dumps({"format": FORMAT, "model": self.model_sha256, "images": self.images_sha256,
                              "settings": self.settings, "tensors": list(self.tensors),
                              "consumers": list(self.consumers)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def images_digest(paths: list[Path]) -> str:
    """Content hash of an image set (names and bytes, in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _arrays(attribution: Attribution) -> dict[str, np.ndarray]:
    arrays = {"images_per_class": attribution.images_per_class, "images": np.array(attribution.images),
              "predicted_pixels": attribution.predicted_pixels, "mask_pixels": attribution.mask_pixels,
              "fallback": attribution.fallback}
    for i, t in enumerate(attribution.tensors):
        arrays[f"forward/{i}"] = attribution.forward_sum[t]
        arrays[f"backward/{i}"] = attribution.backward_sum[t]
        arrays[f"mean/{i}"] = attribution.mean_sum[t]
        arrays[f"taylor/{i}"] = attribution.taylor_sum[t]
    for node, moments in attribution.moments.items():
        arrays[f"moments/{node}"] = moments
    return arrays


def save(folder: Path, key: CacheKey, attribution: Attribution) -> Path:
    """Write one entry atomically (`<digest>.npz` + `<digest>.json`); returns the npz path."""
    digest = key.digest()
    npz = io.BytesIO()
    np.savez_compressed(npz, **_arrays(attribution))
    write_atomic(folder / f"{digest}.npz", npz.getvalue())
    meta = {"format": FORMAT, "model_sha256": key.model_sha256, "images_sha256": key.images_sha256,
            "settings": key.settings, "tensors": list(key.tensors), "consumers": list(key.consumers),
            "images": attribution.images,
            "fallback_pixels": {str(k): pixels for k, pixels in attribution.fallback_pixels().items()}}
    write_atomic(folder / f"{digest}.json", json.dumps(meta, indent=2, sort_keys=True).encode())
    return folder / f"{digest}.npz"


def load(folder: Path, key: CacheKey) -> Attribution | None:
    """The entry for `key`, or None if there is none (or it cannot be read: the caller then recomputes)."""
    path = folder / f"{key.digest()}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            tensors = list(key.tensors)
            return Attribution(
                tensors,
                {t: data[f"forward/{i}"] for i, t in enumerate(tensors)},
                {t: data[f"backward/{i}"] for i, t in enumerate(tensors)},
                {t: data[f"mean/{i}"] for i, t in enumerate(tensors)},
                data["images_per_class"], int(data["images"]),
                {node: data[f"moments/{node}"] for node in key.consumers},
                {t: data[f"taylor/{i}"] for i, t in enumerate(tensors)},
                data["predicted_pixels"], data["mask_pixels"], data["fallback"])
    except (OSError, KeyError, ValueError):
        return None
