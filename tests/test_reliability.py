"""disasm-compile as a user meets it when things go wrong (issue 11), each case run as its own process.

Every case asserts the exit code, stderr (one line, never a traceback) and the file system afterwards: the output
folder holds the earlier set byte for byte or the complete new one, nothing is left beside it (staging folder, lock),
and the inputs are unchanged.

Runs are forked from one server process that has imported the pipeline once: each is still a process of its own
(pid, stdout, stderr, exit code, signals) running the CLI's `main`, but without 4 s of torch and onnx imports each,
which two shared cores cannot afford twenty times. Start-up itself (a Ctrl-C during those imports) and the argument
checks run the real console script. A run can be held in a stage: its function is called again and again ("loop")
or waits ("gate") until a Ctrl-C arrives, so the signal lands inside that stage; a marker file says it got there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from PIL import Image

from disasm.compiler.transaction import LOCK_SUFFIX, STAGING_TAG
from test_inputs import LABELS, _jpeg, _png_header_only, save, seg_model, write_scene
from test_transaction import leftovers, snapshot

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, and reads /proc")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("disasm-compile")  # the console script, next to this interpreter
ENTRY = [str(SCRIPT)] if SCRIPT.exists() else ["-m", "disasm.compiler.cli"]  # what `python` runs as the command
INTERRUPTED = "disasm-compile: interrupted; the output folder was left as it was"
DEADLINE = 120.0  # seconds any awaited event may take on a loaded machine before the test fails
HAS_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))

SERVER = r'''
import importlib, json, os, sys, time, traceback
from disasm.compiler import pipeline, transaction  # the imports every run shares, done once
from disasm.compiler.cli import main


def hold(kind, spec, folder):
    """Replace module:function so that the run stays in it until a Ctrl-C: "loop" calls the real function again and
    again, "gate" waits (for the Ctrl-C or a release file) and then calls it once."""
    module, name = spec.split(":")
    owner = importlib.import_module(module)
    real = getattr(owner, name)

    def held(*args, **kwargs):
        open(os.path.join(folder, "reached"), "w").close()
        deadline = time.monotonic() + 60
        if kind == "gate":
            while not (transaction.interrupted() or os.path.exists(os.path.join(folder, "release"))
                       or time.monotonic() > deadline):
                time.sleep(0.01)
            return real(*args, **kwargs)
        result = real(*args, **kwargs)
        while not transaction.interrupted() and time.monotonic() < deadline:
            result = real(*args, **kwargs)
        return result

    setattr(owner, name, held)


print("ready", flush=True)
for line in iter(sys.stdin.readline, ""):
    command = json.loads(line)
    if "wait" in command:
        print(os.waitstatus_to_exitcode(os.waitpid(command["wait"], 0)[1]), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    code = 70  # main raised: the traceback is in stderr
    try:
        folder = command["folder"]
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        for kind, spec in command["hold"]:
            hold(kind, spec, folder)
        if command["argv"] == ["--probe-cuda"]:  # asked here, never in the server: forks must not inherit CUDA
            import torch
            code = int(torch.cuda.is_available())
        else:
            code = main(command["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
'''


def _without_root_override() -> None:
    """As root, drop the capabilities that ignore file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the
    bounding set before exec, so that a read-only folder is read-only for the runs, as it is for any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly without CAP_SETPCAP


@dataclass
class Run:
    """One forked disasm-compile: its pid, and the folder of its stdout, stderr and marker files."""

    pid: int
    folder: Path

    def reached(self) -> bool:
        return (self.folder / "reached").exists()

    def release(self) -> None:
        (self.folder / "release").touch()

    def stderr(self) -> list[str]:
        return (self.folder / "stderr").read_text().splitlines()

    def ended(self) -> bool:
        """Whether it exited (a zombie until the server waits for it)."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True


class ForkServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=ROOT,
                                        preexec_fn=_without_root_override if os.geteuid() == 0 else None)
        assert self._reply() == "ready"

    def start(self, argv: list[str], folder: Path, hold: tuple[tuple[str, str], ...] = ()) -> Run:
        folder.mkdir(parents=True)
        self._send({"argv": [str(a) for a in argv], "folder": str(folder), "hold": hold})
        return Run(pid=int(self._reply()), folder=folder)

    def wait(self, run: Run) -> int:
        """The run's exit code (-N: killed by signal N)."""
        self._send({"wait": run.pid})
        try:
            return int(self._reply())
        except AssertionError:
            os.kill(run.pid, signal.SIGKILL)
            self._reply()
            raise AssertionError(f"run {run.pid} did not end: {run.stderr()}") from None

    def overrides_permissions(self) -> bool:
        """Whether the runs write where file permissions forbid it (root that could not drop the capabilities)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff")), 16)
        return os.geteuid() == 0 and bool(effective & 0b110)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=DEADLINE)

    def _send(self, command: dict) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def _reply(self) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE)
        assert ready, "the fork server did not answer"
        return self.process.stdout.readline().strip()


def wait_for(condition, run: Run | None = None, process: subprocess.Popen | None = None) -> None:
    """Poll for an event (a marker file, a mapped library) with a deadline; fail at once if the process ended."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert not (run and run.ended()), f"ended before the event: {run.stderr()}"
        assert not (process and process.poll() is not None), f"ended before the event: {process.communicate()}"
        assert time.monotonic() < deadline, "the event never came"
        time.sleep(0.005)


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def argv(inputs: SimpleNamespace, out: Path, *extra: str, engines: bool = False, cache: bool = False) -> list[str]:
    return [str(inputs.model), "--categories", "red,green", "--labels", LABELS, "--images", str(inputs.images),
            "--out", str(out), "--runs", "1", "--quiet", "--compensate", "mean",
            *([] if cache else ["--no-cache"]), *(["--trt-target", "sm86"] if engines else ["--no-engines"]), *extra]


@pytest.fixture(scope="module")
def server():
    forks = ForkServer()
    yield forks
    forks.close()


@pytest.fixture(scope="module")
def inputs(server, tmp_path_factory) -> SimpleNamespace:
    """A 16x16 model, six images, and the output set of an earlier run (the results a failed rerun must keep)."""
    root = tmp_path_factory.mktemp("inputs")
    for i in range(6):
        write_scene(root / "images" / f"scene_{i}.png", None, seed=i)
    inputs = SimpleNamespace(root=root, model=save(seg_model(), root / "model" / "m.onnx"), images=root / "images",
                             earlier=root / "earlier")
    run = server.start(argv(inputs, inputs.earlier), root / "runs" / "earlier")
    assert server.wait(run) == 0, run.stderr()
    return inputs


@pytest.fixture(autouse=True)
def inputs_untouched(inputs):
    """No run modifies the model, the images, or the earlier results it was given."""
    before = snapshot(inputs.root)
    yield
    assert snapshot(inputs.root) == before


@pytest.fixture
def earlier_copy(inputs, tmp_path) -> Path:
    return Path(shutil.copytree(inputs.earlier, tmp_path / "out"))


def complete_set(out: Path, inputs: SimpleNamespace) -> bool:
    """The same files as the earlier run wrote, the report naming this folder (so it is the new set)."""
    return (snapshot(out).keys() == snapshot(inputs.earlier).keys()
            and json.loads((out / "report.json").read_text())["out_dir"] == str(out))


# ---- --force replaces the earlier set only with a complete new one ---------------------------------------------------

def _bomb(images: Path) -> tuple[str, str]:
    huge = _png_header_only(images / "huge.png", 15000, 15000)  # 225 Mpixels claimed, PIL refuses to open it
    return (f"disasm-compile: error: {huge}: image too large to read safely (",
            "downscale it or move it out of the folder")


def _nothing_readable(images: Path) -> tuple[str, str]:
    for p in images.iterdir():
        p.write_bytes(p.read_bytes()[:40])  # cut off after the header
    return (f"disasm-compile: error: {images}: no readable images (PNG/JPEG/BMP/WebP) (6 unreadable)",
            "; images in subfolders need --recursive")


@pytest.mark.parametrize("bad_images", [_bomb, _nothing_readable], ids=["decompression bomb", "nothing readable"])
def test_failed_force_run_keeps_the_earlier_set_byte_identical(server, inputs, earlier_copy, tmp_path, bad_images):
    images = Path(shutil.copytree(inputs.images, tmp_path / "images"))
    starts, ends = bad_images(images)
    given, before = snapshot(images), snapshot(earlier_copy)
    run = server.start(argv(SimpleNamespace(model=inputs.model, images=images), earlier_copy, "--force"),
                       tmp_path / "run")
    assert server.wait(run) == 2
    [line] = run.stderr()
    assert line.startswith(starts) and line.endswith(ends), line
    assert snapshot(earlier_copy) == before and leftovers(earlier_copy) == []
    assert snapshot(images) == given


# ---- Ctrl-C: exit 130, one line, the earlier set or the complete new one ---------------------------------------------

STAGES = {  # stage -> the function a run is held in until the Ctrl-C
    "attribution": "disasm.compiler.pipeline:calibrate",
    "budget search": "disasm.compiler.pipeline:search_budget",
    "write": "disasm.compiler.pipeline:write_onnx",
    "engine build": "disasm.compiler.pipeline:build_engine",  # real TensorRT builds, one after the other
    "reports": "disasm.runtime.plots:write_png",
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigint_in_a_stage_leaves_the_earlier_set(server, inputs, earlier_copy, tmp_path, stage):
    engines = stage == "engine build"
    if engines and not HAS_TRT:
        pytest.skip("no TensorRT module installed")
    before = snapshot(earlier_copy)
    run = server.start(argv(inputs, earlier_copy, "--force", engines=engines), tmp_path / "run",
                       hold=(("loop", STAGES[stage]),))
    wait_for(run.reached, run)
    os.kill(run.pid, signal.SIGINT)
    assert server.wait(run) == 130
    assert run.stderr() == [INTERRUPTED]
    assert snapshot(earlier_copy) == before and leftovers(earlier_copy) == []


def test_sigint_during_the_commit_completes_it(server, inputs, earlier_copy, tmp_path):
    """The swap of the new set for the earlier one is never cut in half: the Ctrl-C is honoured right after it."""
    run = server.start(argv(inputs, earlier_copy, "--force"), tmp_path / "run",
                       hold=(("gate", "disasm.compiler.transaction:_exchange"),))
    wait_for(run.reached, run)
    os.kill(run.pid, signal.SIGINT)
    assert server.wait(run) == 130
    assert run.stderr() == [f"disasm-compile: interrupted after the results were written to {earlier_copy}"]
    assert complete_set(earlier_copy, inputs) and leftovers(earlier_copy) == []


def test_sigint_while_the_command_imports_torch(inputs, earlier_copy):
    before = snapshot(earlier_copy)
    process = subprocess.Popen([sys.executable, *ENTRY, *argv(inputs, earlier_copy, "--force")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: "libtorch" in Path(f"/proc/{process.pid}/maps").read_text(), process=process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=DEADLINE)
    assert (process.returncode, stderr.splitlines()) == (130, [INTERRUPTED])
    assert snapshot(earlier_copy) == before and leftovers(earlier_copy) == []


_HELD_IMPORT = """
import os, runpy, sys, time
def hold(event, args):  # keep the start-up inside this import until the Ctrl-C arrives
    if event == "import" and args[0] == "disasm.compiler.transaction":
        open(os.environ["REACHED"], "w").close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
sys.addaudithook(hold)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed")
def test_sigint_while_the_command_line_module_is_imported(inputs, earlier_copy, tmp_path):
    before = snapshot(earlier_copy)
    reached = tmp_path / "reached"
    process = subprocess.Popen([sys.executable, "-c", _HELD_IMPORT, str(SCRIPT), *argv(inputs, earlier_copy)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"REACHED": str(reached)})
    wait_for(reached.exists, process=process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=DEADLINE)
    assert snapshot(earlier_copy) == before and leftovers(earlier_copy) == []
    assert (process.returncode, stderr.splitlines()) == (130, [INTERRUPTED])


# ---- one run per output folder ---------------------------------------------------------------------------------------

def test_a_second_run_into_the_same_new_folder_is_refused_while_the_first_runs(server, inputs, tmp_path):
    out = tmp_path / "new"
    first = server.start(argv(inputs, out), tmp_path / "first", hold=(("gate", STAGES["attribution"]),))
    wait_for(first.reached, first)  # it holds the lock and writes its staging folder
    second = server.start(argv(inputs, out), tmp_path / "second")
    assert server.wait(second) == 2
    assert second.stderr() == [f"disasm-compile: error: {out}: another disasm-compile run (pid {first.pid}) is "
                               f"writing this output folder; wait for it to finish or choose another --out"]
    assert not out.exists()
    first.release()
    assert server.wait(first) == 0 and first.stderr() == []
    assert complete_set(out, inputs) and leftovers(out) == []


def test_the_lock_and_staging_folder_of_a_killed_run_are_recovered(server, inputs, tmp_path):
    out = tmp_path / "out"
    killed = server.start(argv(inputs, out), tmp_path / "killed", hold=(("gate", STAGES["attribution"]),))
    wait_for(killed.reached, killed)
    os.kill(killed.pid, signal.SIGKILL)
    assert server.wait(killed) == -signal.SIGKILL
    left = leftovers(out)
    assert f".out{LOCK_SUFFIX}" in left and any(STAGING_TAG in name for name in left), left  # what it left
    assert (tmp_path / f".out{LOCK_SUFFIX}").read_text().strip() == str(killed.pid)
    rerun = server.start(argv(inputs, out), tmp_path / "rerun")
    assert server.wait(rerun) == 0 and rerun.stderr() == []
    assert complete_set(out, inputs) and leftovers(out) == []


# ---- image files: read as they are displayed; unreadable ones skipped, counted and named -----------------------------

def _image_modes(scenes: Path, reference: Path, modes: Path) -> Path:
    """`modes` holds the scenes as a 16-bit PNG, a palette PNG, an EXIF-rotated JPEG and a CMYK JPEG (plus two plain
    PNGs and a truncated JPEG); `reference` holds, as 8-bit RGB PNGs, the pixels each must be read as. Returns the
    truncated file."""
    reference.mkdir()
    modes.mkdir()
    pixels = [np.asarray(Image.open(scenes / f"scene_{i}.png").convert("RGB")) for i in range(6)]
    expected = list(pixels)

    grey = pixels[0].mean(axis=2).astype(np.uint8)  # 16 bit: 0..65535 is 0..255 scaled, not clipped to white
    Image.fromarray(grey.astype(np.uint16) * 257).save(modes / "scene_0.png")
    assert Image.open(modes / "scene_0.png").mode.startswith("I")
    expected[0] = np.repeat(grey[..., None], 3, axis=2)

    colours, index = np.unique(pixels[1].reshape(-1, 3), axis=0, return_inverse=True)  # at most 256 in 16x16
    palette = Image.frombytes("P", (16, 16), index.astype(np.uint8).tobytes())
    palette.putpalette(colours.astype(np.uint8).ravel().tolist())
    palette.save(modes / "scene_1.png")
    assert Image.open(modes / "scene_1.png").mode == "P"

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored turned the other way
    (modes / "scene_2.jpg").write_bytes(_jpeg(np.ascontiguousarray(np.rot90(pixels[2], 1)), exif=exif))
    stored = np.asarray(Image.open(modes / "scene_2.jpg"))
    expected[2] = np.rot90(stored, -1)
    assert not np.array_equal(expected[2], stored)

    cmyk = np.dstack([255 - pixels[3], np.zeros((16, 16), np.uint8)])
    Image.frombytes("CMYK", (16, 16), cmyk.tobytes()).save(modes / "scene_3.jpg", quality=95)
    decoded = np.asarray(Image.open(modes / "scene_3.jpg"))
    assert Image.open(modes / "scene_3.jpg").mode == "CMYK" and (decoded[..., 3] == 0).all()
    expected[3] = 255 - decoded[..., :3]  # no black ink: R, G, B = 255 - C, M, Y

    for i in (4, 5):
        shutil.copy(scenes / f"scene_{i}.png", modes)
    for i, rgb in enumerate(expected):
        Image.fromarray(np.ascontiguousarray(rgb)).save(reference / f"scene_{i}.png")
    cut = modes / "scene_6_cut.jpg"
    cut.write_bytes(_jpeg(pixels[4])[:-200])
    return cut


def attribution(out: Path) -> dict[str, np.ndarray]:
    """The arrays of the output set's attribution entry (its file name hashes the image files, so it differs)."""
    [entry] = (out / "attribution").glob("*.npz")
    with np.load(entry) as arrays:
        return {name: arrays[name] for name in arrays.files}


def test_image_modes_are_read_as_displayed_and_a_truncated_jpeg_is_skipped(server, inputs, tmp_path):
    """Both folders must give the same pixels, hence the same attribution (activations and gradients summed over the
    pixels of every image) and the same pruned model, byte for byte."""
    reference, modes = tmp_path / "reference", tmp_path / "modes"
    cut = _image_modes(inputs.images, reference, modes)
    given = snapshot(modes)
    runs = {name: server.start(argv(SimpleNamespace(model=inputs.model, images=folder), tmp_path / f"{name}-out"),
                               tmp_path / "runs" / name)
            for name, folder in (("reference", reference), ("modes", modes))}
    codes = {name: server.wait(run) for name, run in runs.items()}  # both run at once
    assert codes == {"reference": 0, "modes": 0}, {name: run.stderr() for name, run in runs.items()}
    assert runs["reference"].stderr() == []
    assert runs["modes"].stderr() == [f"disasm-compile: warning: skipped 1 unreadable file(s) in {modes}: "
                                      f"{cut.name} (truncated)"]
    expected, got = attribution(tmp_path / "reference-out"), attribution(tmp_path / "modes-out")
    assert got.keys() == expected.keys() and [k for k in got if not np.array_equal(got[k], expected[k])] == []
    pruned = {name: (tmp_path / f"{name}-out" / "pruned.onnx").read_bytes() for name in runs}
    assert pruned["modes"] == pruned["reference"]
    report = json.loads((tmp_path / "modes-out" / "report.json").read_text())["images"]
    assert (report["calibration"] + report["judged"], report["skipped"], report["skipped_files"]) == (6, 1, [str(cut)])
    assert f"1 unreadable file skipped: {cut}" in (tmp_path / "modes-out" / "report.md").read_text()
    assert snapshot(modes) == given


# ---- the user's mistakes: exit 2, one line, before the long work, nothing written ------------------------------------

def _read_only_output(tmp_path: Path) -> tuple[Path, Path, str]:
    out = tmp_path / "out"
    out.mkdir()
    return out, out, f"{out}: {out} is not writable"


def _read_only_parent(tmp_path: Path) -> tuple[Path, Path, str]:
    parent = tmp_path / "parent"
    parent.mkdir()
    return parent / "out", parent, f"{parent / 'out'}: cannot write in {parent} (Permission denied)"


@pytest.mark.parametrize("setup", [_read_only_output, _read_only_parent], ids=["output folder", "parent folder"])
def test_read_only_folder_is_refused_before_attribution(server, inputs, tmp_path, setup):
    if server.overrides_permissions():
        pytest.skip("root without the means to drop CAP_DAC_OVERRIDE writes into read-only folders")
    case = tmp_path / "case"
    case.mkdir()
    out, read_only, expected = setup(case)
    before = listing(case)
    read_only.chmod(0o555)
    try:  # with the attribution cache on: had attribution run, attribution-cache/ would be beside the output
        run = server.start(argv(inputs, out, cache=True), tmp_path / "run")
        assert server.wait(run) == 2
        [line] = run.stderr()
    finally:
        read_only.chmod(0o755)
    assert line.startswith(f"disasm-compile: error: {expected}"), line
    assert listing(case) == before


def test_device_cuda_without_cuda_is_refused_before_attribution(server, inputs, tmp_path):
    probe = server.start(["--probe-cuda"], tmp_path / "probe")
    if server.wait(probe) == 1:
        pytest.skip("CUDA is available here")
    run = server.start(argv(inputs, tmp_path / "case" / "out", "--device", "cuda", cache=True), tmp_path / "run")
    assert server.wait(run) == 2
    assert run.stderr() == ["disasm-compile: error: --device cuda: torch sees no CUDA GPU here; leave --device out "
                            "or use cpu"]
    assert not (tmp_path / "case").exists()


HEAVY = {"torch", "onnx", "onnxruntime", "onnx_graphsurgeon", "matplotlib", "tensorrt", "tensorrt_rtx"}


@pytest.mark.parametrize("extra, expected", [
    (["--help"], None),
    (["--device", "foo"], "argument --device: 'foo' is not a torch device; use cpu, cuda or cuda:N"),
    (["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    (["--trt-target", "banana"], "argument --trt-target: 'banana' is not a compute capability; use e.g. sm86, 8.6 "
                                 "or 86"),
], ids=["--help", "--device foo", "--threads -1", "--trt-target banana"])
def test_help_and_argument_errors_answer_before_any_heavy_import(inputs, tmp_path, extra, expected):
    """The console script as a user runs it. Its wall time is printed, not asserted (about 0.1 s here; torch alone
    takes seconds to import): what is asserted is that nothing heavy was imported."""
    out = tmp_path / "out"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", *ENTRY, *argv(inputs, out, *extra, cache=True)],
                            capture_output=True, text=True, timeout=DEADLINE)
    print(f"disasm-compile {' '.join(extra)}: {time.perf_counter() - start:.2f} s wall, with -X importtime")
    lines = result.stderr.splitlines()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    assert not imported & HEAVY
    said = [line for line in lines if not line.startswith("import time:")]
    if expected is None:
        assert result.returncode == 0 and said == [] and "--categories" in result.stdout
    else:
        assert result.returncode == 2 and said == [f"disasm-compile: error: {expected} (see disasm-compile --help)"]
    assert listing(tmp_path) == []


def test_external_data_outside_the_model_folder_is_refused_by_its_path_alone(server, inputs, tmp_path):
    """The same answer whether the target exists, is missing, or is the model's own data file named by an absolute
    path: judged by the text, so it tells nothing about files outside the folder."""
    case = tmp_path / "case"
    path = save(seg_model(), case / "model" / "m.onnx", external=True)
    (case / "outside.data").write_bytes((case / "model" / "m.onnx.data").read_bytes())
    for i, location in enumerate(("../outside.data", "../missing.data", str(case / "model" / "m.onnx.data"))):
        model = onnx.load(str(path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        moved = case / "model" / f"moved_{i}.onnx"
        moved.write_bytes(model.SerializeToString())
        before = snapshot(case)
        run = server.start(argv(SimpleNamespace(model=moved, images=inputs.images), case / "out"),
                           tmp_path / "runs" / str(i))
        assert server.wait(run) == 2
        assert run.stderr() == [f"disasm-compile: error: {moved}: external data location {location!r} points "
                                f"outside the model's folder"]
        assert snapshot(case) == before and not (case / "out").exists()
