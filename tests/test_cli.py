"""disasm-compile end to end on the shipped example, and its answers to bad input (one line, exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from disasm.compiler.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes_seg.onnx"
DATA = ROOT / "examples" / "data"
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="example model not built")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A few calibration and evaluation images, so the end-to-end run takes seconds."""
    root = tmp_path_factory.mktemp("data")
    for sub, count in (("calib", 16), ("eval/images", 8), ("eval/masks", 8)):
        (root / sub).mkdir(parents=True)
        for p in sorted((DATA / sub).glob("*.png"))[:count]:
            shutil.copy(p, root / sub / p.name)
    return root


def compile_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(EXAMPLE), "--categories", "circle,star", "--images", str(data / "calib"),
            "--eval-images", str(data / "eval/images"), "--masks", str(data / "eval/masks"), "--out", str(out),
            "--runs", "3", "--quiet", *extra]


@pytest.fixture(scope="module")
def compiled(small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "run"
    assert main(compile_args(small_data, out)) == 0
    return out


def test_compile_writes_a_smaller_model_for_the_chosen_classes(compiled, small_data):
    report = json.loads((compiled / "report.json").read_text())
    assert report["kept_classes"] == ["background", "circle", "star"]
    assert report["cost"]["pruned"]["macs"] < report["cost"]["full"]["macs"]
    assert report["cost"]["pruned"]["params"] < report["cost"]["full"]["params"]
    assert 0.0 <= report["fidelity"]["agreement"] <= 1.0
    assert report["fidelity"]["miou_full"] is not None and report["fidelity"]["miou_pruned"] is not None
    assert report["latency"]["full"]["runs"] == 3 and report["latency"]["speedup"] > 0
    assert "## Channel groups" in (compiled / "report.md").read_text()
    assert (compiled / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if report["engines"] is not None:  # with the trt extra: engines for SM86, built without a GPU
        for name in ("full.fp32", "pruned.fp32", "full.fp16", "pruned.fp16"):
            assert (compiled / "engines" / f"{name}.engine").stat().st_size > 0
        assert report["engines"]["pruned.fp32"]["weight_bytes"] < report["engines"]["full.fp32"]["weight_bytes"]
    entries = list((compiled / "attribution").glob("*.npz"))
    assert len(entries) == 1 and entries[0].with_suffix(".json").exists()
    umask = os.umask(0)
    os.umask(umask)
    for written in (entries[0], compiled / "report.json", compiled / "pruned.onnx"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, f"{written.name}: not the usual permissions"
    assert report["attribution"]["consumers_with_moments"] == 0  # the default sequential refit runs on the images
    assert report["compensation"]["method"] == "sequential" and report["settings"]["criterion"] == "disassembler+taylor"

    pruned = onnx.load(str(compiled / "pruned.onnx"))
    meta = {p.key: p.value for p in pruned.metadata_props}
    assert meta["disasm.classes"] == "background,circle,star"
    assert meta["disasm.background"] == "background"
    assert meta["disasm.source_sha256"] == report["model"]["sha256"]
    assert json.loads(meta["disasm.settings"])["categories"] == ["circle", "star"]
    session = ort.InferenceSession(str(compiled / "pruned.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((1, 3, 128, 128), np.float32)})[0]
    assert out.shape == (1, 3, 128, 128)


def test_same_inputs_give_the_same_pruned_model_bytes(compiled, small_data, tmp_path):
    assert main(compile_args(small_data, tmp_path / "again")) == 0
    assert (tmp_path / "again" / "pruned.onnx").read_bytes() == (compiled / "pruned.onnx").read_bytes()


def test_other_categories_reuse_the_cached_attribution(compiled, small_data, tmp_path):
    """One attribution run serves every category subset; the cache changes nothing in the result."""
    cached = compiled.parent / "ring-cross"
    assert main(compile_args(small_data, cached)[:2] + ["ring,cross"] + compile_args(small_data, cached)[3:]) == 0
    assert json.loads((cached / "report.json").read_text())["attribution"]["cache_hit"] is True
    fresh = tmp_path / "fresh"
    args = compile_args(small_data, fresh, "--no-cache")
    args[2] = "ring,cross"
    assert main(args) == 0
    assert json.loads((fresh / "report.json").read_text())["attribution"]["cache_hit"] is False
    assert (fresh / "pruned.onnx").read_bytes() == (cached / "pruned.onnx").read_bytes()


def test_changed_images_invalidate_the_cache(compiled, small_data, tmp_path):
    calib = tmp_path / "calib"
    shutil.copytree(small_data / "calib", calib)
    next(calib.iterdir()).unlink()
    args = compile_args(small_data, compiled.parent / "fewer-images", "--cache", str(compiled.parent / "attribution-cache"))
    args[args.index("--images") + 1] = str(calib)
    assert main(args) == 0
    assert json.loads((compiled.parent / "fewer-images" / "report.json").read_text())["attribution"]["cache_hit"] is False


def test_json_flag_prints_the_report(small_data, tmp_path, capsys):
    assert main(compile_args(small_data, tmp_path / "j", "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "j" / "report.json").read_text())


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_missing_model_file(capsys, small_data, tmp_path):
    args = compile_args(small_data, tmp_path / "o")
    args[0] = str(tmp_path / "nope.onnx")
    assert "no such file" in error_line(capsys, args)


def test_file_that_is_not_onnx(capsys, small_data, tmp_path):
    fake = tmp_path / "fake.onnx"
    fake.write_text("this is not a protobuf")
    args = compile_args(small_data, tmp_path / "o")
    args[0] = str(fake)
    assert "not an ONNX model" in error_line(capsys, args)


def test_unknown_category_suggests_the_closest_names(capsys, small_data, tmp_path):
    args = compile_args(small_data, tmp_path / "o")
    args[2] = "circel,star"
    assert "did you mean 'circle'" in error_line(capsys, args)


def test_empty_image_folder(capsys, small_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    args = compile_args(small_data, tmp_path / "o")
    args[args.index("--images") + 1] = str(empty)
    assert "no readable images" in error_line(capsys, args)


def test_unreadable_images_are_skipped_and_counted(small_data, tmp_path):
    calib = tmp_path / "calib"
    shutil.copytree(small_data / "calib", calib)
    (calib / "broken.png").write_bytes(b"\x89PNG not really")
    args = compile_args(small_data, tmp_path / "o")
    args[args.index("--images") + 1] = str(calib)
    assert main(args) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["images"]["skipped_files"] == [str(calib / "broken.png")]
    assert report["images"]["calibration"] == 16


def test_existing_output_folder_needs_force(capsys, compiled, small_data):
    assert "--force" in error_line(capsys, compile_args(small_data, compiled))


def test_failed_force_rerun_keeps_the_earlier_results_byte_identical(capsys, compiled, small_data, tmp_path):
    """--force replaces the earlier results only when the new set is complete: a rerun that fails (here on its
    images) leaves every file as it was, and nothing beside the folder."""
    before = {p.relative_to(compiled): p.read_bytes() for p in compiled.rglob("*") if p.is_file()}
    args = compile_args(small_data, compiled, "--force")
    args[args.index("--images") + 1] = str(tmp_path / "no-such-folder")
    assert "image folder does not exist" in error_line(capsys, args)
    assert {p.relative_to(compiled): p.read_bytes() for p in compiled.rglob("*") if p.is_file()} == before
    assert not [p for p in compiled.parent.iterdir() if p.name.startswith(f".{compiled.name}.")]


def test_model_that_is_not_a_segmentation_network(capsys, small_data, tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["y"])], "classifier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 192])])
    path = tmp_path / "classifier.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    args = compile_args(small_data, tmp_path / "o")
    args[0] = str(path)
    assert "segmentation network" in error_line(capsys, args)


def test_console_script_help_documents_the_options():
    result = subprocess.run([sys.executable, "-m", "disasm.compiler.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--categories", "--images", "--masks", "--out", "--force", "--alpha", "--round-to", "--json"):
        assert option in result.stdout


def test_labels_option_overrides_the_metadata_names(small_data, tmp_path):
    names = "bg,disc,box,tri,star,donut,plus,hex"
    args = compile_args(small_data, tmp_path / "renamed", "--labels", names)
    args[2] = "Disc,STAR"
    assert main(args) == 0
    report = json.loads((tmp_path / "renamed" / "report.json").read_text())
    assert report["kept_classes"] == ["bg", "disc", "star"] and report["model"]["labels_source"] == "command line"
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "renamed" / "pruned.onnx")).metadata_props}
    assert meta["disasm.classes"] == "bg,disc,star" and meta["disasm.background"] == "bg"


def test_label_count_mismatch_is_a_clear_error(capsys, small_data, tmp_path):
    args = compile_args(small_data, tmp_path / "o", "--labels", "voc")
    assert "21 class names" in error_line(capsys, args)


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The disasm-compile lines of README.md work verbatim (from a copy of the repository's examples/)."""
    import shlex

    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("disasm-compile examples/")]
    assert len(lines) == 3
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.chdir(tmp_path)
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line
    capsys.readouterr()
    reports = [json.loads((tmp_path / "disasm-out" / name / "report.json").read_text())
               for name in ("circle-star", "ring-cross", "ring-cross-l1")]
    assert [r["attribution"]["cache_hit"] for r in reports] == [False, True, True]
    assert reports[2]["settings"]["criterion"] == "l1"
    assert reports[2]["cost"]["macs_ratio"] == pytest.approx(reports[1]["cost"]["macs_ratio"])  # equal budget
