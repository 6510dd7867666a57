"""The output folder as one transaction: built beside --out, moved into place only when complete; an error or a Ctrl-C
at any stage (start-up, attribution, writing, the TensorRT build, the reports) leaves the folder as it was, exits 1, 2
or 130 with one line and no traceback; one run at a time per folder; what a killed run left is recovered."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from disasm.compiler import pipeline, transaction
from disasm.compiler.cli import main
from disasm.compiler.errors import DisasmError
from disasm.compiler.transaction import OutputTransaction, deferred_interrupts, interrupted, interrupts
from test_inputs import LABELS, save, seg_model, write_scene

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256); {} when it does not exist."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """What a run may leave beside its output folder: staging folders, the lock, an earlier set moved aside."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def earlier_set(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pruned.onnx").write_bytes(b"earlier model")
    (folder / "report.json").write_text("{}")
    (folder / "attribution").mkdir()
    (folder / "attribution" / "x.npz").write_bytes(b"earlier attribution")
    return folder


# ---- the transaction itself -------------------------------------------------------------------------------------------

def test_commit_moves_the_complete_set_into_place(tmp_path):
    out = tmp_path / "new" / "out"
    with OutputTransaction() as output:
        staged = output.begin(out)
        assert staged.parent == out.parent and staged.name.startswith(".out.disasm-") and not out.exists()
        (staged / "pruned.onnx").write_bytes(b"model")
        (staged / "engines").mkdir()
        (staged / "engines" / "a.engine").write_bytes(b"engine")
        output.commit()
        assert output.committed and snapshot(out) == {"pruned.onnx": hashlib.sha256(b"model").hexdigest(),
                                                       "engines/a.engine": hashlib.sha256(b"engine").hexdigest()}
    assert leftovers(out) == []
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


@pytest.mark.parametrize("exchange", [True, False])
def test_force_replaces_the_earlier_set_at_the_commit_and_not_before(tmp_path, monkeypatch, exchange):
    out = earlier_set(tmp_path / "out")
    before = snapshot(out)
    if not exchange:  # systems without renameat2: two renames, the earlier set parked under a known name
        monkeypatch.setattr(transaction, "_exchange", lambda a, b: False)
    with OutputTransaction(force=True) as output:
        staged = output.begin(out)
        (staged / "pruned.onnx").write_bytes(b"new model")
        assert snapshot(out) == before
        output.commit()
    assert snapshot(out) == {"pruned.onnx": hashlib.sha256(b"new model").hexdigest()}
    assert leftovers(out) == []


@pytest.mark.parametrize("how", [KeyboardInterrupt, RuntimeError, DisasmError])
def test_an_error_or_interrupt_before_the_commit_leaves_the_folder_as_it_was(tmp_path, how):
    out = earlier_set(tmp_path / "out")
    before = snapshot(out)
    with pytest.raises(how):
        with OutputTransaction(force=True) as output:
            staged = output.begin(out)
            (staged / "pruned.onnx").write_bytes(b"half")
            raise how("stop")
    assert snapshot(out) == before and leftovers(out) == []
    with pytest.raises(KeyboardInterrupt):
        with OutputTransaction() as output:
            output.begin(tmp_path / "fresh")
            raise KeyboardInterrupt
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path / "fresh") == []


def test_existing_folder_needs_force_and_force_never_deletes_other_files(tmp_path):
    out = earlier_set(tmp_path / "out")
    with pytest.raises(DisasmError, match="pass --force"):
        with OutputTransaction() as output:
            output.begin(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DisasmError, match="also holds notes.txt"):
        with OutputTransaction(force=True) as output:
            output.begin(out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DisasmError, match="exists and is not a folder"):
        with OutputTransaction() as output:
            output.begin(tmp_path / "file")
    with pytest.raises(DisasmError, match="cannot create the folder it goes in"):
        with OutputTransaction() as output:
            output.begin(tmp_path / "file" / "out")
    assert (out / "notes.txt").read_text() == "mine" and leftovers(out) == []


def test_empty_folder_is_filled_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputTransaction() as output:
        (output.begin(out) / "report.json").write_text("{}")
        output.commit()
    assert snapshot(out).keys() == {"report.json"} and leftovers(out) == []


def test_symlinked_output_folder_is_filled_where_it_points(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with OutputTransaction() as output:
        (output.begin(tmp_path / "link") / "report.json").write_text("{}")
        output.commit()
    assert (tmp_path / "link").is_symlink() and (real / "report.json").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "out"
    with OutputTransaction() as first:
        first.begin(out)
        with pytest.raises(DisasmError, match=rf"another disasm-compile run \(pid {os.getpid()}\) is writing"):
            with OutputTransaction() as second:
                second.begin(tmp_path / "." / "out")  # the same folder, spelled differently
        with OutputTransaction() as other:  # another folder beside it is free
            other.begin(tmp_path / "other")
    with OutputTransaction() as third:  # released
        third.begin(out)


def test_a_stale_lock_and_what_a_killed_run_left_are_recovered(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = earlier_set(tmp_path / "out")
    before = snapshot(out)
    (tmp_path / f".out{transaction.LOCK_SUFFIX}").write_text(f"{dead.pid}\n")
    stale = tmp_path / ".out.disasm-0123abcd"
    stale.mkdir()
    (stale / "pruned.onnx").write_bytes(b"half")
    unrelated = tmp_path / ".out.disasm-notmine"  # not a staging name: left alone
    unrelated.mkdir()
    with OutputTransaction() as output:
        output.begin(tmp_path / "elsewhere")  # another folder's leftovers are not touched
    assert stale.exists()
    with pytest.raises(DisasmError, match="pass --force"):
        with OutputTransaction() as output:
            output.begin(out)
    assert not stale.exists() and unrelated.exists() and snapshot(out) == before
    assert not (tmp_path / f".out{transaction.LOCK_SUFFIX}").exists()

    # killed between the two renames of the fallback swap: the earlier set goes back
    os.rename(out, tmp_path / f".out{transaction.PREVIOUS_SUFFIX}")
    with OutputTransaction(force=True) as output:
        output.begin(out)
    assert snapshot(out) == before
    # killed after the swap, while removing the earlier set: it is removed
    shutil.copytree(out, tmp_path / f".out{transaction.PREVIOUS_SUFFIX}")
    with OutputTransaction(force=True) as output:
        output.begin(out)
    assert snapshot(out) == before and not (tmp_path / f".out{transaction.PREVIOUS_SUFFIX}").exists()


def test_output_folder_that_cannot_be_written_is_refused_at_begin(tmp_path, monkeypatch):
    out = earlier_set(tmp_path / "out")
    real_access = os.access
    monkeypatch.setattr(transaction.os, "access",
                        lambda p, mode: False if Path(p) == out / "attribution" else real_access(p, mode))
    with pytest.raises(DisasmError, match="attribution is not writable"):
        with OutputTransaction(force=True) as output:
            output.begin(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_folder(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(DisasmError, match="cannot write in"):
            with OutputTransaction() as output:
                output.begin(parent / "out")
    finally:
        parent.chmod(0o755)


def test_a_pending_interrupt_aborts_the_commit_and_one_during_it_is_only_recorded(tmp_path, monkeypatch):
    out = earlier_set(tmp_path / "out")
    before = snapshot(out)
    with interrupts():
        transaction._interrupt["pending"] = True  # what a swallowed KeyboardInterrupt leaves
        with pytest.raises(KeyboardInterrupt):
            with OutputTransaction(force=True) as output:
                (output.begin(out) / "pruned.onnx").write_bytes(b"new")
                output.commit()
        assert snapshot(out) == before and leftovers(out) == []

    real_exchange = transaction._exchange

    def exchange_with_a_ctrl_c(a, b):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here: deferred, it only records
        return real_exchange(a, b)

    monkeypatch.setattr(transaction, "_exchange", exchange_with_a_ctrl_c)
    with interrupts():
        with OutputTransaction(force=True) as output:
            (output.begin(out) / "pruned.onnx").write_bytes(b"new")
            output.commit()
        assert interrupted()
    assert snapshot(out) == {"pruned.onnx": hashlib.sha256(b"new").hexdigest()} and leftovers(out) == []
    assert signal.getsignal(signal.SIGINT) is not transaction._on_sigint  # restored


def test_interrupts_raise_keyboardinterrupt_and_are_remembered():
    with interrupts():
        assert not interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert interrupted()
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    with interrupts():
        assert not interrupted()  # each run starts clean


# ---- the CLI: every stage, on a tiny model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A 16x16 model, six images and one finished output set (the 'earlier results')."""
    root = tmp_path_factory.mktemp("tiny")
    for i in range(6):
        write_scene(root / "images" / f"scene_{i}.png", None, seed=i)
    model = save(seg_model(), root / "m.onnx")
    earlier = root / "earlier"
    assert main(argv(model, root, earlier)) == 0
    return SimpleNamespace(root=root, model=model, earlier=earlier)


def argv(model: Path, root: Path, out: Path, *extra: str, engines: bool = False) -> list[str]:
    return [str(model), "--categories", "red,green", "--labels", LABELS, "--images", str(root / "images"),
            "--out", str(out), "--runs", "1", "--quiet", "--no-cache", "--compensate", "mean",
            *([] if engines else ["--no-engines"]), *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _raise(error: BaseException):
    def stage(*args, **kwargs):
        raise error
    return stage


def _write_then_raise(error: BaseException, real):
    """The stage does its writing, then fails: what reaches the disk before a failure must never be seen."""
    def stage(*args, **kwargs):
        real(*args, **kwargs)
        raise error
    return stage


def _engines_then_raise(error: BaseException):
    def stage(model, full, pruned_path, out, target, input_shape):
        (out / "engines").mkdir()
        (out / "engines" / "full.fp32.engine").write_bytes(b"half an engine")
        raise error
    return stage


STAGES = {  # where: how to make that stage fail with `error` (monkeypatch, error) -> None
    "load": lambda mp, e: mp.setattr(pipeline, "load_model", _raise(e)),
    "images": lambda mp, e: mp.setattr(pipeline, "scan_images", _raise(e)),
    "attribution": lambda mp, e: mp.setattr(pipeline, "calibrate", _raise(e)),
    "budget search": lambda mp, e: mp.setattr(pipeline, "search_budget", _raise(e)),
    "write": lambda mp, e: mp.setattr(pipeline.attribution_cache, "save",
                                      _write_then_raise(e, pipeline.attribution_cache.save)),
    "engines": lambda mp, e: (mp.setattr(pipeline, "trt_available", lambda: True),
                              mp.setattr(pipeline, "_check_trt_target", lambda target: None),
                              mp.setattr(pipeline, "compile_engines", _engines_then_raise(e))),
    "latency": lambda mp, e: mp.setattr(pipeline, "measure_latency", _raise(e)),
    "report.md": lambda mp, e: mp.setattr("disasm.runtime.report.markdown", _raise(e)),
    "report.png": lambda mp, e: mp.setattr("disasm.runtime.plots.write_png", _raise(e)),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_interrupt_at_any_stage_leaves_the_earlier_results_byte_identical(tiny, tmp_path, monkeypatch, capsys, stage):
    out = Path(shutil.copytree(tiny.earlier, tmp_path / "out"))
    before = snapshot(out)
    STAGES[stage](monkeypatch, KeyboardInterrupt())
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    assert main(argv(tiny.model, tiny.root, out, "--force", engines=stage == "engines")) == 130
    assert one_line(capsys) == "disasm-compile: interrupted; the output folder was left as it was"
    assert snapshot(out) == before and leftovers(out) == []
    assert signal.getsignal(signal.SIGINT) is handler  # main restores the caller's handler


@pytest.mark.parametrize("stage, error, code", [
    ("write", RuntimeError("disk on fire"), 1),
    ("engines", DisasmError("TensorRT could not build"), 2),
    ("report.png", MemoryError(), 1),
])
def test_a_failure_at_a_late_stage_writes_nothing(tiny, tmp_path, monkeypatch, capsys, stage, error, code):
    STAGES[stage](monkeypatch, error)
    fresh, engines = tmp_path / "fresh", stage == "engines"
    assert main(argv(tiny.model, tiny.root, fresh, engines=engines)) == code
    one_line(capsys)
    assert not fresh.exists() and leftovers(fresh) == []
    forced = Path(shutil.copytree(tiny.earlier, tmp_path / "forced"))
    before = snapshot(forced)
    assert main(argv(tiny.model, tiny.root, forced, "--force", engines=engines)) == code
    one_line(capsys)
    assert snapshot(forced) == before and leftovers(forced) == []


def test_force_rerun_replaces_the_set_whole(tiny, tmp_path):
    out = Path(shutil.copytree(tiny.earlier, tmp_path / "out"))
    (out / "engines").mkdir()
    (out / "engines" / "stale.engine").write_bytes(b"from an older run")
    assert main(argv(tiny.model, tiny.root, out, "--force")) == 0
    assert snapshot(out).keys() == snapshot(tiny.earlier).keys()  # nothing of the older run survives
    assert leftovers(out) == []


def test_swallowed_ctrl_c_in_the_tensorrt_build_is_raised_after_it(tiny, tmp_path, monkeypatch, capsys):
    """TensorRT's logger catches a KeyboardInterrupt raised in it (it prints "[ERROR] Exception caught in log():
    KeyboardInterrupt" and a stack, and builds on). So during a build a Ctrl-C is only recorded, and raised after it;
    were it raised and swallowed anyway, the flag still stops the run."""
    builds = []

    def build_engine(source, target, fp16=False, input_shapes=None):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler raises here, inside the "logger"
        except KeyboardInterrupt:
            print("[ERROR] Exception caught in log(): KeyboardInterrupt", file=sys.stderr)
        builds.append(source)
        return SimpleNamespace(serialized=b"engine", build_seconds=0.0, size_bytes=6, weight_bytes=1, layer_count=1)

    monkeypatch.setattr(pipeline, "trt_available", lambda: True)
    monkeypatch.setattr(pipeline, "trt_module", lambda: SimpleNamespace(__name__="fake_trt"))
    monkeypatch.setattr(pipeline, "_check_trt_target", lambda target: None)
    monkeypatch.setattr(pipeline, "build_engine", build_engine)
    out = tmp_path / "out"
    assert main(argv(tiny.model, tiny.root, out, "--trt-target", "sm86", engines=True)) == 130
    assert len(builds) == 1  # stopped right after the build the Ctrl-C hit
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("disasm-compile: interrupted")
    assert not out.exists() and leftovers(out) == []


def test_a_second_run_into_the_same_output_folder_is_refused(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with OutputTransaction() as running:  # another run holds the folder
        running.begin(out)
        assert main(argv(tiny.model, tiny.root, out)) == 2
        assert "another disasm-compile run" in one_line(capsys)
    assert not out.exists()
    assert main(argv(tiny.model, tiny.root, out)) == 0  # free again


def test_read_only_output_folder_is_found_before_attribution(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(transaction.os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    monkeypatch.setattr(pipeline, "calibrate", _raise(AssertionError("attribution ran")))
    assert main(argv(tiny.model, tiny.root, out)) == 2
    assert f"{out}: {out} is not writable" in one_line(capsys)


# ---- real signals, in a subprocess -------------------------------------------------------------------------------------

def _spawn(args: list[str], driver: str | None = None) -> subprocess.Popen:
    code = driver or "import sys; from disasm.compiler.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the interrupt: {proc.communicate()}"
        assert time.monotonic() < deadline, "the stage never came"
        time.sleep(0.005)


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


_SLOW_BUILD = """
import sys, time
from disasm.compiler import pipeline, transaction
from disasm.compiler.cli import main
real = pipeline.build_engine
def build_engine(*args, **kwargs):  # real TensorRT builds, again and again, until a Ctrl-C comes
    start, build = time.monotonic(), real(*args, **kwargs)
    while not transaction.interrupted() and time.monotonic() - start < 60:
        build = real(*args, **kwargs)
    return build
pipeline.build_engine = build_engine
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/<pid>/maps")
@pytest.mark.parametrize("when", ["start-up", "engine build"])
def test_real_sigint(tiny, tmp_path, when):
    """SIGINT while torch is being imported, and during a real TensorRT build: exit 130, one line, nothing written."""
    out = tmp_path / "out"
    if when == "start-up":
        proc = _spawn(argv(tiny.model, tiny.root, out))
        _wait_for(proc, lambda: _loaded(proc.pid, "libtorch"))
    else:
        from disasm.runtime.tensorrt import trt_available

        if not trt_available():
            pytest.skip("no TensorRT module")
        proc = _spawn(argv(tiny.model, tiny.root, out, "--trt-target", "sm86", engines=True), _SLOW_BUILD)
        _wait_for(proc, lambda: any(tmp_path.glob(".out.disasm-*/.full.onnx")))
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if "Exception caught in log()" not in line]
    assert lines == ["disasm-compile: interrupted; the output folder was left as it was"], stderr
    assert not out.exists() and leftovers(out) == []
