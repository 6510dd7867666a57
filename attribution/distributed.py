"""Distributed attribution: shard the calibration images over processes, all-reduce the sums, fill the cache.

    torchrun --standalone --nproc-per-node N -m disasm.attribution.distributed MODEL --images DIR --cache DIR [--lsq]

Each rank attributes every N-th image (on its own GPU with NCCL when CUDA is available, else on CPU with gloo). The
attribution is a set of sums over images, so an all-reduce of the shards' sums equals the single-process result up to
floating-point summation order. The one decision that is not a sum, which categories fall back to their predicted
pixels, is taken by every rank from counts summed over all ranks before the gradient pass (calibrate's `gather`), so
all shards use the same masks. Finiteness is checked after the reduction, on every rank alike. Rank 0 writes the
cache entry under the same key disasm-compile computes for the whole image folder, so any later
`disasm-compile ... --cache DIR` finds it and chooses any category subset at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from disasm.attribution import cache as attribution_cache
from disasm.attribution.calibration import cache_keys, calibrate
from disasm.attribution.disassembler import Attribution, AttributionSettings, check_finite
from disasm.compiler.channels import analyse
from disasm.compiler.errors import DisasmError
from disasm.compiler.images import load_images, preprocess, scan_images
from disasm.compiler.load import load_model


def _reduce(arrays: dict, device: torch.device) -> dict:
    out = {}
    for key in sorted(arrays):  # every rank must reduce in the same order
        t = torch.from_numpy(np.ascontiguousarray(arrays[key], dtype=np.float64)).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[key] = t.cpu().numpy()
    return out


def sum_counts(device: torch.device):
    """calibrate's `gather`: an int64 count array summed over all ranks (exact in float64 below 2**53)."""
    def gather(counts: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float64)).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy().round().astype(np.int64)
    return gather


def all_reduce(attribution: Attribution, device: torch.device) -> Attribution:
    """The sum of every rank's attribution (each rank passes its shard's). The fallback decision is the same on every
    rank (it was taken over summed counts); a rank that disagrees is a bug, reported as such."""
    tensors = attribution.tensors
    fields = {"forward": attribution.forward_sum, "backward": attribution.backward_sum, "mean": attribution.mean_sum,
              "taylor": attribution.taylor_sum}
    flat = {f"{name}/{t}": values[t] for name, values in fields.items() for t in tensors}
    flat |= {f"moments/{k}": v for k, v in attribution.moments.items()}
    flat["images_per_class"] = attribution.images_per_class
    flat["images"] = np.array([attribution.images])
    flat["predicted_pixels"] = attribution.predicted_pixels
    flat["mask_pixels"] = attribution.mask_pixels
    flat["fallback"] = attribution.fallback
    summed = _reduce(flat, device)
    if not np.array_equal(summed["fallback"], attribution.fallback * dist.get_world_size()):
        raise DisasmError("distributed attribution: the ranks took different fallback decisions")
    per = {name: {t: summed[f"{name}/{t}"] for t in tensors} for name in fields}
    return Attribution(tensors, per["forward"], per["backward"], per["mean"],
                       summed["images_per_class"].round().astype(np.int64), int(round(summed["images"][0])),
                       {k: summed[f"moments/{k}"] for k in attribution.moments}, per["taylor"],
                       summed["predicted_pixels"].round().astype(np.int64),
                       summed["mask_pixels"].round().astype(np.int64), attribution.fallback.copy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disasm.attribution.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--images", type=Path, required=True, help="calibration image folder")
    parser.add_argument("--cache", type=Path, required=True, help="attribution cache folder to fill")
    parser.add_argument("--lsq", action="store_true", help="also gather the moments least-squares compensation needs")
    parser.add_argument("--recursive", action="store_true")
    parser.add_argument("--tau", type=float, default=AttributionSettings.tau)
    parser.add_argument("--batch-size", type=int, default=AttributionSettings.batch_size)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    try:
        model = load_model(args.model)
        analysis = analyse(model.proto)
        settings = AttributionSettings(tau=args.tau, batch_size=args.batch_size)
        images = scan_images(args.images, args.recursive, model.image_size)
        shard = images.paths[rank::world]
        if not shard:
            raise DisasmError(f"{len(images.paths)} images cannot be shared by {world} processes")
        inputs = preprocess(load_images(shard, model.image_size), model.preprocessing)
        local = calibrate(model, analysis, inputs, settings, str(device), moments=args.lsq,
                          gather=sum_counts(device), check=False)
        total = all_reduce(local, device)
        check_finite(total, model.classes)  # on every rank: the sums are the same everywhere
        if rank == 0:
            key = cache_keys(model, analysis, attribution_cache.images_digest(images.paths), settings, args.lsq)[0]
            path = attribution_cache.save(args.cache, key, total)
            print(f"attribution of {total.images} images by {world} processes -> {path}")
    except DisasmError as e:
        print(f"disasm distributed attribution: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
