"""Distributed attribution: a 2-process gloo run equals the single-process one, and disasm-compile reuses it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from disasm.attribution import cache as attribution_cache
from disasm.attribution.calibration import cache_keys, calibrate
from disasm.attribution.disassembler import AttributionSettings
from disasm.attribution.select import SelectionSettings
from disasm.compiler.channels import analyse
from disasm.compiler.cli import main as compile_main
from disasm.compiler.pipeline import specialise
from disasm.compiler.images import load_images, preprocess, scan_images
from disasm.compiler.load import load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes_seg.onnx"
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="example model not built")


@pytest.fixture(scope="module")
def distributed_cache(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    images = root / "calib"
    images.mkdir()
    for p in sorted((ROOT / "examples" / "data" / "calib").glob("*.png"))[:10]:
        shutil.copy(p, images / p.name)
    cache = root / "cache"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "disasm.attribution.distributed", str(EXAMPLE), "--images", str(images),
                             "--cache", str(cache), "--lsq", "--batch-size", "4"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attribution of 10 images by 2 processes" in result.stdout
    return images, cache


def test_two_processes_equal_one(distributed_cache):
    images, cache = distributed_cache
    model = load_model(EXAMPLE)
    analysis = analyse(model.proto)
    folder = scan_images(images)
    settings = AttributionSettings(batch_size=3)  # other batching than the shards: the sums must not care
    single = calibrate(model, analysis, preprocess(load_images(folder.paths, model.image_size), model.preprocessing),
                       settings, "cpu", moments=True)
    key = cache_keys(model, analysis, attribution_cache.images_digest(folder.paths), settings, moments=True)[0]
    shared = attribution_cache.load(cache, key)
    assert shared is not None and shared.images == single.images == 10
    np.testing.assert_array_equal(shared.images_per_class, single.images_per_class)
    # one category of these ten images is never confident but predicted: both runs fall back alike, although the
    # shards each see only part of its pixels
    assert single.fallback.any()
    for a, b in ((shared.fallback, single.fallback), (shared.mask_pixels, single.mask_pixels),
                 (shared.predicted_pixels, single.predicted_pixels)):
        np.testing.assert_array_equal(a, b)
    for t in single.tensors:
        for a, b in ((shared.forward_sum, single.forward_sum), (shared.backward_sum, single.backward_sum),
                     (shared.mean_sum, single.mean_sum), (shared.taylor_sum, single.taylor_sum)):
            np.testing.assert_allclose(a[t], b[t], rtol=1e-4, atol=1e-6)  # float32 kernels see other batches
    for node in single.moments:
        np.testing.assert_allclose(shared.moments[node], single.moments[node], rtol=1e-4, atol=1e-4)
    chosen = [specialise(model, analysis, a, ["circle", "star"], SelectionSettings(), "lsq", {}) for a in (shared, single)]
    assert chosen[0].keep_sets.keys() == chosen[1].keep_sets.keys()
    for g in chosen[0].keep_sets:
        np.testing.assert_array_equal(chosen[0].keep_sets[g], chosen[1].keep_sets[g])


def test_compile_reuses_the_distributed_attribution(distributed_cache, tmp_path):
    images, cache = distributed_cache
    out = tmp_path / "out"
    # with --eval-images, every image of --images calibrates (none is held out), as in the distributed run
    assert compile_main([str(EXAMPLE), "--categories", "ring", "--images", str(images), "--eval-images", str(images),
                         "--cache", str(cache), "--out", str(out), "--runs", "2", "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["attribution"]["cache_hit"] is True
