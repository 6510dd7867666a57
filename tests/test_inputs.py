"""disasm-compile on the shapes real-world models come in: NHWC tf2onnx graphs at opset 9, probability and sigmoid
heads, dynamic sizes, external data, preprocessing flags, masks by stem, and one line + exit code 2 for bad input.

Every model is a tiny graph built here with onnx.helper:

    image -[Transpose 0,3,1,2]-> Conv 3x3 (C->8) -> ReLU6 -> Conv 3x3 /2 (8->16) -> ReLU6 -> 2x upsample
          -> Conv 1x1 (16->4 classes) -[Transpose 0,2,3,1]-> [Softmax | Sigmoid] -> output

(the Transposes only for NHWC). The class conv's weights are scaled up so the untrained net is confident: every class
wins somewhere with probability > 0.8, so attribution finds masks at the default tau.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from disasm.compiler import pipeline
from disasm.compiler.cli import main
from disasm.compiler.errors import DisasmError
from disasm.compiler.images import load_images, load_masks, scan_images
from disasm.compiler.load import Overrides, load_model

SIZE = 16
LABELS = "background,red,green,blue"
IR_VERSION = {9: 4, 11: 6, 13: 7, 17: 8}


def seg_model(layout: str = "nchw", opset: int = 17, head: str | None = None, channels: int = 3,
              size: tuple | None = (SIZE, SIZE), batch: int | str = "N", metadata: dict | None = None) -> onnx.ModelProto:
    """The graph of the module docstring. size None: dynamic H and W. head: None (logits), 'softmax', 'sigmoid'."""
    rng = np.random.default_rng(0)

    def weights(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    consts = {"w1": weights(8, channels, 3, 3), "b1": weights(8, scale=0.1), "w2": weights(16, 8, 3, 3),
              "b2": weights(16, scale=0.1), "w3": weights(4, 16, 1, 1, scale=3.0), "b3": weights(4, scale=0.1),
              "scales": np.array([1, 1, 2, 2], np.float32)}
    nchw_in = "image" if layout == "nchw" else "image_nchw"
    nodes = [] if layout == "nchw" else [helper.make_node("Transpose", ["image"], [nchw_in], perm=[0, 3, 1, 2])]

    def relu6(x: str, y: str) -> onnx.NodeProto:
        if opset < 11:
            return helper.make_node("Clip", [x], [y], min=0.0, max=6.0)
        return helper.make_node("Clip", [x, "zero", "six"], [y])

    if opset >= 11:
        consts |= {"zero": np.array(0, np.float32), "six": np.array(6, np.float32)}
    nodes += [helper.make_node("Conv", [nchw_in, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), relu6("c1", "r1"),
              helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]), relu6("c2", "r2")]
    if opset < 11:
        nodes.append(helper.make_node("Upsample", ["r2", "scales"], ["up"], mode="nearest"))
    else:
        consts["roi"] = np.zeros(0, np.float32)
        nodes.append(helper.make_node("Resize", ["r2", "roi", "scales"], ["up"], mode="nearest"))
    scores = "output" if head is None and layout == "nchw" else "scores"
    nodes.append(helper.make_node("Conv", ["up", "w3", "b3"], [scores if layout == "nchw" else "scores_nchw"]))
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["scores_nchw"], ["output" if head is None else scores],
                                      perm=[0, 2, 3, 1]))
    if head == "softmax":
        nodes.append(helper.make_node("Softmax", [scores], ["output"], axis=1 if layout == "nchw" else 3))
    elif head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [scores], ["output"]))
    h, w = size or ("H", "W")
    in_shape = [batch, channels, h, w] if layout == "nchw" else [batch, h, w, channels]
    out_shape = [batch, 4, h, w] if layout == "nchw" else [batch, h, w, 4]
    graph = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("image", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type.lower()}_{i}"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION[opset])
    helper.set_model_props(model, metadata or {})
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, location=path.name + ".data")
    return path


def write_scene(path: Path, mask_path: Path | None, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> None:
    """Grey background with a red, a green and a blue rectangle; the mask holds their class indices 1, 2, 3."""
    rng = np.random.default_rng(seed)
    h, w = size
    pixels = np.full((h, w, 3), 128, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for k in range(3):
        y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
        pixels[y:y + 5, x:x + 5] = 0
        pixels[y:y + 5, x:x + 5, k] = 230
        mask[y:y + 5, x:x + 5] = k + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    if mask_path is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(mask_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """images/scene_i.png and masks/scene_i.png (grey class indices), 16x16."""
    root = tmp_path_factory.mktemp("scenes")
    for i in range(6):
        write_scene(root / "images" / f"scene_{i}.png", root / "masks" / f"scene_{i}.png", seed=i)
    return root


def compile_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), "--categories", "red,green", "--labels", LABELS, "--images", str(data / "images"),
            "--out", str(out), "--runs", "1", "--quiet", "--no-cache", "--compensate", "mean", *extra]


def compiled(argv: list[str]) -> tuple[dict, onnx.ModelProto, dict]:
    """Run disasm-compile; return report.json, the pruned model (weights loaded) and its metadata."""
    assert main(argv) == 0
    out = Path(argv[argv.index("--out") + 1])
    pruned = onnx.load(str(out / "pruned.onnx"))
    return json.loads((out / "report.json").read_text()), pruned, {p.key: p.value for p in pruned.metadata_props}


def run_pruned(out: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def test_nhwc_tf2onnx_model_at_opset_9(data, tmp_path):
    """Transposes around an NCHW body, Clip-based ReLU6, Upsample: NHWC in and out, found from the graph."""
    model = save(seg_model(layout="nhwc", opset=9), tmp_path / "tf.onnx")
    out = tmp_path / "out"
    report, pruned, meta = compiled(compile_args(model, data, out, "--masks", str(data / "masks"), "--keep-ratio", "0.5",
                                                 "--round-to", "4"))
    assert (report["model"]["layout"], report["model"]["class_axis"], report["model"]["output"]) == ("nhwc", 3, "logits")
    assert report["model"]["sources"]["layout"].startswith("graph: Transpose")
    assert report["kept_classes"] == ["background", "red", "green"] and report["output"]["class_conv"].startswith("kept whole")
    inner = [g for g in report["channels"]["per_group"] if g["depth"] in (1, 2)]
    assert [(g["size"], g["kept"] + g["padded"]) for g in inner] == [(8, 4), (16, 8)]  # both convs inside lose half
    assert report["fidelity"]["miou_full"] is not None and report["images"]["masks"]
    assert meta["disasm.layout"] == "nhwc" and pruned.opset_import[0].version == 9
    assert run_pruned(out, np.zeros((2, SIZE, SIZE, 3), np.float32)).shape == (2, SIZE, SIZE, 3)


def test_softmax_probability_output(data, tmp_path):
    """A Softmax over the classes is read as probabilities. Slicing the class conv would renormalise them, so the
    class conv stays whole and the chosen classes are taken after the Softmax: with nothing else cut, the pruned
    output is exactly the full model's probabilities of those classes, and "none" (background) is the largest
    probability of the others (background, blue)."""
    model = save(seg_model(head="softmax"), tmp_path / "probs.onnx")
    out = tmp_path / "out"
    report, _, meta = compiled(compile_args(model, data, out, "--keep-ratio", "1"))
    assert report["model"]["output"] == "probs" and report["model"]["sources"]["output"].startswith("graph: Softmax")
    assert report["output"]["class_conv"].startswith("kept whole")
    assert "Softmax" in report["output"]["class_conv_kept_whole_because"]
    assert report["kept_classes"] == ["background", "red", "green"] and meta["disasm.output"] == "probs"
    x = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)
    full = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    expected = np.concatenate([full[:, [0, 3]].max(1, keepdims=True), full[:, [1, 2]]], axis=1)
    np.testing.assert_allclose(run_pruned(out, x), expected, atol=1e-5, rtol=1e-5)


def test_sigmoid_multi_label_head_and_preprocessing_flags(data, tmp_path):
    """A Sigmoid head is cut to the chosen classes; --mean/--std/--bgr are what the pruned model's metadata says."""
    model = save(seg_model(head="sigmoid"), tmp_path / "multi.onnx")
    out = tmp_path / "out"
    argv = compile_args(model, data, out, "--mean", "127.5", "--std", "127.5,64,32", "--bgr")
    argv[argv.index("--labels") + 1] = "road,car,person,sky"
    argv[argv.index("--categories") + 1] = "car,sky"
    report, _, meta = compiled(argv)
    assert report["model"]["output"] == "sigmoid" and report["kept_classes"] == ["car", "sky"]
    assert meta["disasm.output"] == "sigmoid" and meta["disasm.classes"] == "car,sky"
    assert (meta["disasm.mean"], meta["disasm.std"], meta["disasm.color"]) == ("127.5,127.5,127.5", "127.5,64,32", "bgr")
    assert report["model"]["sources"]["mean"] == "--mean" and report["model"]["sources"]["color"] == "--bgr"
    assert run_pruned(out, np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (1, 2, SIZE, SIZE)


def test_dynamic_size_grey_model_needs_input_size_for_mixed_images(data, tmp_path, capsys):
    images = tmp_path / "mixed"
    write_scene(images / "small.png", None, seed=1, size=(16, 16))
    write_scene(images / "wide.png", None, seed=2, size=(16, 24))
    model = save(seg_model(channels=1, size=None), tmp_path / "dynamic.onnx")
    argv = compile_args(model, data, tmp_path / "out")
    argv[argv.index("--images") + 1] = str(images)
    assert "pass --input-size" in error_line(capsys, argv)
    report, _, _ = compiled(argv + ["--input-size", "16x16"])
    assert report["images"]["size"] == [16, 16] and report["model"]["input_channels"] == 1
    assert report["model"]["input_shape"] == [1, 1, 16, 16]


def test_external_data_in_and_out(data, tmp_path):
    model = save(seg_model(), tmp_path / "model" / "torch.onnx", external=True)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.parent.iterdir()}
    assert set(before) == {"torch.onnx", "torch.onnx.data"}
    out = tmp_path / "out"
    report, _, _ = compiled(compile_args(model, data, out))
    assert report["model"]["external_data"] == ["torch.onnx.data"]
    assert (out / "pruned.onnx.data").stat().st_size > 0
    assert any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.load(str(out / "pruned.onnx"), load_external_data=False).graph.initializer)
    assert run_pruned(out, np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (1, 3, SIZE, SIZE)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.parent.iterdir()} == before


# ---- detection rules and their precedence: flag > metadata > graph ------------------------------------------------

@pytest.mark.parametrize("layout, opset, head, expected", [
    ("nchw", 17, None, ("nchw", 1, "logits")),
    ("nhwc", 9, None, ("nhwc", 3, "logits")),
    ("nhwc", 11, "softmax", ("nhwc", 3, "probs")),   # opset < 13: Softmax(axis=3) normalises the last axis only
    ("nchw", 13, "softmax", ("nchw", 1, "probs")),
    ("nhwc", 13, "sigmoid", ("nhwc", 3, "sigmoid")),
])
def test_layout_class_axis_and_output_are_read_from_the_graph(tmp_path, layout, opset, head, expected):
    model = load_model(save(seg_model(layout, opset, head), tmp_path / "m.onnx"))
    assert (model.preprocessing.layout, model.class_axis, model.output_kind) == expected


def test_metadata_wins_over_the_graph_and_flags_win_over_both(tmp_path):
    path = save(seg_model(head="sigmoid", metadata={"disasm.output": "logits", "disasm.mean": "1,2,3",
                                                    "disasm.color": "bgr"}), tmp_path / "m.onnx")
    model = load_model(path)
    assert (model.output_kind, model.preprocessing.mean, model.preprocessing.color) == ("logits", (1, 2, 3), "bgr")
    model = load_model(path, overrides=Overrides(output="sigmoid", mean=(5.0,), color="rgb"))
    assert (model.output_kind, model.preprocessing.mean, model.preprocessing.color) == ("sigmoid", (5, 5, 5), "rgb")
    assert model.sources["output"] == "--output"


def test_softmax_over_a_spatial_axis_is_not_probabilities(tmp_path):
    model = seg_model()
    model.graph.node[-1].output[0] = "scores"
    model.graph.node.append(helper.make_node("Softmax", ["scores"], ["output"], axis=3))
    assert load_model(save(model, tmp_path / "m.onnx")).output_kind == "logits"


def test_masks_match_by_relative_path_with_recursive(tmp_path):
    for sub, seed in (("day", 1), ("night", 2)):
        write_scene(tmp_path / "images" / sub / "a.jpg", tmp_path / "masks" / sub / "a.png", seed)
    folder = scan_images(tmp_path / "images", recursive=True)
    masks = load_masks(tmp_path / "masks", folder, None, num_classes=4)
    expected = [np.asarray(Image.open(tmp_path / "masks" / sub / "a.png")) for sub in ("day", "night")]
    np.testing.assert_array_equal(masks, np.stack(expected))


# ---- bad input: one line, exit code 2 ------------------------------------------------------------------------------

def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _bad_masks(data: Path, tmp: Path, how: str) -> Path:
    masks = Path(shutil.copytree(data / "masks", tmp / "masks"))
    first = sorted(masks.iterdir())[0]
    if how == "missing":
        first.unlink()
    elif how == "size":
        Image.new("L", (8, 8)).save(first)
    else:
        Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(first)
    return masks


@pytest.mark.parametrize("extra, expected", [
    (["--layout", "nhcw"], "invalid choice: 'nhcw'"),
    (["--output", "scores"], "invalid choice: 'scores'"),
    (["--mean", "1,2"], "--mean has 2 values"),
    (["--mean", "red"], "--mean='red' is not a comma-separated list"),
    (["--std", "0"], "std must be positive"),
    (["--input-size", "16"], "is not HxW"),
    (["--input-size", "32x32"], "differs from the model's static input size 16x16"),
    (["--masks", "MISSING"], "no mask for 1 of 6 images"),
    (["--masks", "SIZE"], "mask is 8x8 (HxW) but its image"),
    (["--masks", "LABEL"], "holds label(s) [7] but the model has 4 classes"),
    (["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    (["--runs", "0"], "argument --runs: must be >= 1, got 0"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--device", "foo"], "argument --device: 'foo' is not a torch device"),
    (["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here"),
    (["--trt-target", "banana"], "argument --trt-target: 'banana' is not a compute capability"),
    (["--cache", "m.onnx"], "exists and is not a folder"),
])
def test_bad_options(capsys, data, tmp_path, extra, expected):
    """One line, exit 2, and nothing written: every option is checked before the long work."""
    if extra == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    model = save(seg_model(), tmp_path / "m.onnx")
    if extra[0] == "--masks":
        extra = ["--masks", str(_bad_masks(data, tmp_path, extra[1].lower()))]
    if extra[0] == "--cache":
        extra = ["--cache", str(model)]
    argv = compile_args(model, data, tmp_path / "out", *extra)
    argv.remove("--no-cache")
    assert expected in error_line(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"m.onnx", "masks"} & {p.name for p in tmp_path.iterdir()})


def test_library_callers_get_the_same_option_checks(data, tmp_path):
    request = pipeline.Request(model=save(seg_model(), tmp_path / "m.onnx"), categories="red", images=data / "images",
                               labels=LABELS, out=tmp_path / "out")
    for changes, expected in (({"threads": 0}, "--threads must be >= 1"),
                              ({"device": "foo"}, "--device 'foo' is not a torch device"),
                              ({"trt_target": "banana"}, "--trt-target 'banana' is not a compute capability")):
        with pytest.raises(DisasmError, match=expected):
            pipeline.compile_model(replace(request, **changes))
    assert not (tmp_path / "out").exists()


def test_resize_none_needs_images_of_the_model_size(capsys, tmp_path):
    write_scene(tmp_path / "images" / "big.png", None, seed=1, size=(20, 20))
    model = save(seg_model(), tmp_path / "m.onnx")
    err = error_line(capsys, compile_args(model, tmp_path, tmp_path / "out", "--resize", "none"))
    assert "big.png: image is 20x20 (HxW) but the model input is 16x16" in err


@pytest.mark.parametrize("model_kwargs, expected", [
    ({"channels": 4}, "has 4 channels; disasm feeds 1-channel (grey) or 3-channel"),
    ({"batch": 2}, "static batch of 2"),
])
def test_unsupported_inputs(capsys, data, tmp_path, model_kwargs, expected):
    model = save(seg_model(**model_kwargs), tmp_path / "m.onnx")
    assert expected in error_line(capsys, compile_args(model, data, tmp_path / "out"))


def test_missing_external_data(capsys, data, tmp_path):
    model = save(seg_model(), tmp_path / "m.onnx", external=True)
    (tmp_path / "m.onnx.data").unlink()
    assert "external data file missing" in error_line(capsys, compile_args(model, data, tmp_path / "out"))


def test_missing_image_folder_and_output_inside_the_images(capsys, data, tmp_path):
    model = save(seg_model(), tmp_path / "m.onnx")
    argv = compile_args(model, data, tmp_path / "out")
    argv[argv.index("--images") + 1] = str(tmp_path / "nowhere")
    assert "image folder does not exist" in error_line(capsys, argv)
    inside = compile_args(model, data, data / "images" / "run")
    assert "lies inside the input folder" in error_line(capsys, inside)


def test_skipped_images_are_counted_on_the_terminal_and_in_the_report(capsys, data, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for p in (data / "images").iterdir():
        images.joinpath(p.name).write_bytes(p.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (images / "cut.jpg").write_bytes(_jpeg(np.full((SIZE, SIZE, 3), 99, np.uint8))[:300])  # truncated
    model = save(seg_model(), tmp_path / "m.onnx")
    argv = compile_args(model, data, tmp_path / "out")
    argv[argv.index("--images") + 1] = str(images)
    report, _, _ = compiled(argv)
    assert report["images"]["skipped"] == 2 and report["images"]["calibration"] + report["images"]["judged"] == 6
    assert report["images"]["skipped_files"] == [str(images / "broken.jpg"), str(images / "cut.jpg")]
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s)" in err and "cut.jpg (truncated)" in err


# ---- image files: every mode read as it is displayed, bad files skipped or named ------------------------------------

def _jpeg(pixels: np.ndarray, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, **save_kwargs)
    return buffer.getvalue()


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height (8-bit RGB) and holds no pixels: PIL checks the size when it opens it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_truncated_jpeg_is_skipped_and_named(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (tmp_path / "good.jpg").write_bytes(_jpeg(pixels))
    (tmp_path / "cut.jpg").write_bytes(_jpeg(pixels)[:-400])  # PIL's verify() passes this one
    (tmp_path / "empty.png").write_bytes(b"")
    folder = scan_images(tmp_path)
    assert folder.paths == [tmp_path / "good.jpg"]
    assert folder.skipped == [(tmp_path / "cut.jpg", "truncated"), (tmp_path / "empty.png", "not an image")]
    assert load_images(folder.paths, None).shape == (1, 64, 64, 3)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    wide = np.array([[0, 257, 32896], [65535, 65535, 128]], np.uint16)  # -> 0, 1, 128, 255, 255, 0
    Image.fromarray(wide).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = load_images(scan_images(tmp_path).paths, None)
    np.testing.assert_array_equal(pixels[0, ..., 0], [[0, 1, 128], [255, 255, 0]])
    assert (pixels[..., 0] == pixels[..., 2]).all()  # grey


def test_palette_cmyk_and_grey_alpha_become_the_same_rgb(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (200, 30, 90)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "a_palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "b_cmyk.jpg", quality=100)
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "c_grey_alpha.png")
    pixels = load_images(scan_images(tmp_path).paths, None).astype(int)
    np.testing.assert_array_equal(pixels[0], rgb)
    assert np.abs(pixels[1] - rgb).max() <= 8  # JPEG
    np.testing.assert_array_equal(pixels[2], np.repeat(rgb[..., :1], 3, axis=2))


def test_exif_orientation_is_applied_to_images_and_mask_sizes(tmp_path):
    stored = np.zeros((4, 8, 3), np.uint8)  # 4 high, 8 wide as stored; orientation 6: displayed 8 high, 4 wide
    stored[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "phone.jpg").write_bytes(_jpeg(stored, exif=exif))
    folder = scan_images(tmp_path / "images")
    pixels = load_images(folder.paths, None)
    assert pixels.shape == (1, 8, 4, 3) and pixels[0, 0, 3].mean() > 150  # top-left corner turned to top-right
    (tmp_path / "masks").mkdir()
    Image.new("L", (4, 8)).save(tmp_path / "masks" / "phone.png")  # drawn on the displayed image
    assert load_masks(tmp_path / "masks", folder, None).shape == (1, 8, 4)


def test_decompression_bomb_is_the_users_error_naming_the_file(capsys, data, tmp_path):
    images = Path(shutil.copytree(data / "images", tmp_path / "images"))
    huge = _png_header_only(images / "huge.png", 15000, 15000)
    with pytest.raises(DisasmError, match=f"{huge}: image too large to read safely"):
        scan_images(images)
    argv = compile_args(save(seg_model(), tmp_path / "m.onnx"), data, tmp_path / "out")
    argv[argv.index("--images") + 1] = str(images)
    assert f"{huge}: image too large" in error_line(capsys, argv)
    assert not (tmp_path / "out").exists()


# ---- the command line itself: fast, light ----------------------------------------------------------------------------

def test_help_and_argument_errors_import_neither_torch_nor_onnx():
    code = ("import sys, time; start = time.perf_counter(); from disasm.compiler.cli import main; "
            "codes = [main(['--help']), main(['m.onnx', '--layout', 'x'])]; "
            "print(codes, sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules), "
            "round(time.perf_counter() - start, 3))")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    took = time.perf_counter() - start
    assert result.stdout.strip().splitlines()[-1].startswith("[0, 2] []"), result.stdout + result.stderr
    assert took < 5, took  # about 0.1 s; torch alone takes seconds to import


def test_cli_choices_and_defaults_are_those_of_the_modules_that_own_them():
    from disasm.attribution.baselines import CRITERIA
    from disasm.attribution.compensate import METHODS as COMPENSATIONS
    from disasm.attribution.disassembler import AttributionSettings
    from disasm.attribution.select import SelectionSettings
    from disasm.compiler import cli, images, load, outputs

    assert (cli.CRITERIA, cli.LAYOUTS, cli.OUTPUT_KINDS, cli.MODES, cli.RESIZE_POLICIES) == \
        (CRITERIA, load.LAYOUTS, load.OUTPUT_KINDS, outputs.MODES, images.RESIZE_POLICIES)
    assert (cli.ALPHAS, cli.MIN_FIDELITY) == (pipeline.ALPHAS, pipeline.MIN_FIDELITY)
    assert (cli.COMPENSATIONS, cli.CRITERION, cli.COMPENSATION) == \
        (COMPENSATIONS, pipeline.CRITERION, pipeline.COMPENSATION)
    assert (pipeline.Request.criterion, pipeline.Request.compensate) == (pipeline.CRITERION, pipeline.COMPENSATION)
    assert {k: getattr(AttributionSettings(), k) for k in cli.ATTRIBUTION_DEFAULTS} == cli.ATTRIBUTION_DEFAULTS
    assert {k: getattr(SelectionSettings(), k) for k in cli.SELECTION_DEFAULTS} == cli.SELECTION_DEFAULTS


# ---- internal errors: short message, traceback only with --verbose --------------------------------------------------

@pytest.mark.parametrize("verbose", [False, True])
def test_internal_error_traceback_only_with_verbose(capsys, monkeypatch, data, tmp_path, verbose):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "analyse", broken)
    model = save(seg_model(), tmp_path / "m.onnx")
    assert main(compile_args(model, data, tmp_path / "out", *(["--verbose"] if verbose else []))) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: boom (rerun with --verbose" in err
    assert ("Traceback" in err) is verbose


def test_an_interrupt_wrapped_in_another_error_is_an_interrupt(capsys, monkeypatch, data, tmp_path):
    def importing(*args, **kwargs):  # pybind11 turns a Ctrl-C during a module's initialisation into ImportError
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(pipeline, "analyse", importing)
    model = save(seg_model(), tmp_path / "m.onnx")
    assert main(compile_args(model, data, tmp_path / "out")) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "disasm-compile: interrupted; the output folder was left as it was"]
    assert not (tmp_path / "out").exists()


def test_help_documents_the_input_options_with_examples(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for example in ("--layout nhwc", "--output probs", "--input-size 512x1024", "--resize none", "--mean 127.5",
                    "--std 127.5", "--bgr", "--recursive"):
        assert example in text


@pytest.mark.parametrize("exists", [False, True])
def test_external_data_outside_the_model_folder_is_refused_alike(tmp_path, exists):
    """The answer is the same whether or not the file outside the model's folder exists: it tells nothing about it."""
    folder = tmp_path / "models"
    path = save(seg_model(), folder / "m.onnx", external=True)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    path.write_bytes(model.SerializeToString())
    if exists:
        (tmp_path / "secret.data").write_bytes((folder / "m.onnx.data").read_bytes())
    with pytest.raises(DisasmError, match="points outside the model's folder"):
        load_model(path)


def test_subnormal_weights_are_zeroed_at_load(tmp_path):
    """Weights below float32's smallest normal value take a slow path on x86 CPUs; they are set to 0 once, at load,
    so full and pruned models are timed alike."""
    model = seg_model()
    w = next(t for t in model.graph.initializer if t.name == "w2")
    values = numpy_helper.to_array(w).copy()
    values.flat[:5] = [1e-40, -1e-40, 1e-35, -3e-31, 9e-31]  # subnormal, and normal but below TINY_WEIGHT
    values.flat[5] = 2e-30  # kept
    w.CopyFrom(numpy_helper.from_array(values, "w2"))
    loaded = load_model(save(model, tmp_path / "m.onnx"), LABELS)
    assert loaded.subnormals == 5
    zeroed = numpy_helper.to_array(next(t for t in loaded.proto.graph.initializer if t.name == "w2"))
    assert (zeroed.flat[:5] == 0).all() and np.array_equal(zeroed.flat[5:], values.flat[5:])
