"""Latency harness (interleaving, rotation, statistics, errors) and the ONNX Runtime backend. No timing assertions:
statistics are checked against a fake clock, real runs only for counts and shapes."""

import gc
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from disasm.runtime import latency
from disasm.runtime.latency import LatencyStats, SpeedupStats, measure_latency, paired_speedup, speedup
from disasm.runtime.onnxrt import OnnxRuntimeRunner

# ---- latency harness -------------------------------------------------------------------------------------------------


def _recorders(names, calls):
    return {name: (lambda name=name: calls.append(name)) for name in names}


def test_candidates_run_interleaved_in_rotating_order():
    calls = []
    measure_latency(_recorders("abc", calls), runs=4, warmup=1)
    warmup_round = ["a", "b", "c"]
    timed_rounds = ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert calls == warmup_round + timed_rounds


def test_two_candidates_alternate_who_goes_first():
    calls = []
    measure_latency(_recorders(["full", "pruned"], calls), runs=4, warmup=0)
    firsts = calls[::2]
    assert firsts == ["full", "pruned", "full", "pruned"]


def test_each_candidate_is_timed_runs_times_after_warmup_calls():
    calls = []
    stats = measure_latency(_recorders(["full", "pruned"], calls), runs=7, warmup=3)
    assert calls.count("full") == calls.count("pruned") == 3 + 7
    assert list(stats) == ["full", "pruned"]
    for name, stat in stats.items():
        assert isinstance(stat, LatencyStats) and stat.name == name and stat.runs == 7
        assert stat.min_ms <= stat.p10_ms <= stat.median_ms <= stat.p90_ms
        assert stat.min_ms <= stat.mean_ms


def test_progress_is_reported_after_every_timed_round():
    reports = []
    measure_latency({"only": lambda: None}, runs=3, warmup=2, progress=lambda *args: reports.append(args))
    assert reports == [(1, 3), (2, 3), (3, 3)]


def test_statistics_and_speedup_from_a_fake_clock(monkeypatch):
    now = [0]
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter_ns=lambda: now[0]))
    slow_durations_ms = iter([99, 99] + list(range(1, 11)))  # two warm-up calls, then 1..10 ms

    def advance(ms):
        now[0] += int(ms * 1_000_000)

    stats = measure_latency(
        {"slow": lambda: advance(next(slow_durations_ms)), "fast": lambda: advance(2.75)}, runs=10, warmup=2
    )
    slow, fast = stats["slow"], stats["fast"]
    assert (slow.median_ms, slow.min_ms, slow.mean_ms) == (5.5, 1.0, 5.5)  # warm-up calls (99 ms) are not counted
    assert (slow.p10_ms, slow.p90_ms) == pytest.approx((1.9, 9.1))  # numpy's linear interpolation
    assert (fast.median_ms, fast.p10_ms, fast.p90_ms, fast.min_ms) == (2.75, 2.75, 2.75, 2.75)
    assert speedup(slow, fast) == pytest.approx(2.0)
    assert speedup(fast, slow) == pytest.approx(0.5)


def test_spread_warmup_and_samples_are_recorded(monkeypatch):
    now = [0]
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter_ns=lambda: now[0]))
    durations_ms = iter([40, 7] + list(range(1, 11)))  # warm-up calls take 40 then 7 ms

    def call():
        now[0] += int(next(durations_ms) * 1_000_000)

    (stat,) = measure_latency({"model": call}, runs=10, warmup=2).values()
    assert stat.samples_ms == tuple(float(v) for v in range(1, 11))  # timed calls in round order
    assert (stat.warmup, stat.first_ms, stat.max_ms) == (2, 40.0, 10.0)
    assert (stat.p25_ms, stat.p75_ms, stat.iqr_ms) == pytest.approx((3.25, 7.75, 4.5))
    assert stat.spread == pytest.approx((9.1 - 1.9) / 5.5)


def test_paired_speedup_takes_the_ratio_within_each_round(monkeypatch):
    """A slow phase of the machine (rounds 3-4 take 10x) moves both candidates alike: every round's ratio is 2, so the
    paired spread is nil although each candidate's own p10-p90 range spans 10x."""
    now = [0]
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter_ns=lambda: now[0]))
    full_ms, pruned_ms = iter([4, 4, 40, 40, 4, 4]), iter([2, 2, 20, 20, 2, 2])

    def advance(durations):
        now[0] += next(durations) * 1_000_000

    stats = measure_latency({"full": lambda: advance(full_ms), "pruned": lambda: advance(pruned_ms)}, runs=6, warmup=0)
    pair = paired_speedup(stats["full"], stats["pruned"])
    assert isinstance(pair, SpeedupStats) and (pair.base, pair.new, pair.rounds) == ("full", "pruned", 6)
    assert (pair.p10, pair.p25, pair.median, pair.p75, pair.p90, pair.of_medians) == pytest.approx((2,) * 6)
    assert stats["full"].p90_ms / stats["full"].p10_ms == pytest.approx(10)
    assert pair.text() == "2.00x (p10-p90 2.00-2.00x over 6 rounds)"


def test_paired_speedup_needs_samples_from_one_measurement():
    a = LatencyStats("full", 2, 1.0, 1.0, 1.0, 1.0, 1.0, samples_ms=(1.0, 1.0))
    b = LatencyStats("pruned", 3, 1.0, 1.0, 1.0, 1.0, 1.0, samples_ms=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="both must come from one measure_latency call"):
        paired_speedup(a, b)
    with pytest.raises(ValueError, match="both must come from one measure_latency call"):
        paired_speedup(LatencyStats("hand-made", 5, 1.0, 1.0, 1.0, 1.0, 1.0), b)


def test_speedup_of_a_zero_median_is_an_error():
    zero = LatencyStats("noop", 5, 0.0, 0.0, 0.0, 0.0, 0.0)
    base = LatencyStats("full", 5, 1.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="'noop': its median latency is 0.0 ms"):
        speedup(base, zero)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"candidates": {}}, "at least one candidate"),
        ({"candidates": {"a": 3}}, r"not callable: \['a'\]"),
        ({"candidates": [lambda: None]}, "must be a dict from name to callable, got list"),
        ({"runs": 0}, "runs must be an integer >= 1, got 0"),
        ({"runs": 2.5}, "runs must be an integer >= 1, got 2.5"),
        ({"warmup": -1}, "warmup must be an integer >= 0, got -1"),
        ({"progress": "yes"}, "progress must be a callable"),
    ],
)
def test_bad_arguments_are_rejected_before_anything_runs(kwargs, message):
    calls = []
    arguments = {"candidates": _recorders("a", calls)} | kwargs
    with pytest.raises(ValueError, match=message):
        measure_latency(**arguments)
    assert calls == []


def test_a_failing_candidate_keeps_its_error_and_is_named():
    def broken():
        raise KeyError("input")

    with pytest.raises(KeyError) as caught:
        measure_latency({"ok": lambda: None, "pruned": broken}, runs=2, warmup=0)
    assert any("'pruned' in timed round 1 of 2" in note for note in caught.value.__notes__)
    assert gc.isenabled()  # the harness paused the collector while timing and restored it


# ---- ONNX Runtime backend --------------------------------------------------------------------------------------------


def _conv_relu_model(batch: int | str = 1) -> tuple[bytes, np.ndarray, np.ndarray]:
    """X[batch,3,6,6] -> Conv(4 out, 3x3, pad 1) -> Relu -> Y[batch,4,6,6]; opset 17. Returns (bytes, W, B)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["X", "W", "B"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["Y"], name="relu"),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 4, 6, 6])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString(), weight, bias


def _conv_relu_reference(x, weight, bias):
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), dtype=np.float64)
    for i, j in np.ndindex(x.shape[2], x.shape[3]):
        out[:, :, i, j] = np.einsum("nchw,ochw->no", padded[:, :, i : i + 3, j : j + 3], weight)
    return np.maximum(out + bias[None, :, None, None], 0)


@pytest.fixture(scope="module")
def conv_relu():
    return _conv_relu_model()


@pytest.fixture(scope="module")
def conv_relu_path(conv_relu, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "conv_relu.onnx"
    path.write_bytes(conv_relu[0])
    return path


@pytest.fixture
def image():
    return np.random.default_rng(1).normal(size=(1, 3, 6, 6)).astype(np.float32)


def test_runner_computes_conv_relu_from_path_and_from_bytes(conv_relu, conv_relu_path, image):
    model_bytes, weight, bias = conv_relu
    expected = _conv_relu_reference(image, weight, bias)
    for source in (conv_relu_path, str(conv_relu_path), model_bytes):
        runner = OnnxRuntimeRunner(source, threads=1)
        (output,) = runner.infer(image)
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)
        assert runner.last_inference_ms is not None and runner.last_inference_ms >= 0


def test_runner_describes_its_model(conv_relu):
    runner = OnnxRuntimeRunner(conv_relu[0], threads=2, optimization="basic")
    assert runner.name == "onnxruntime-cpu"
    assert (runner.input_name, runner.input_names, runner.output_names) == ("X", ["X"], ["Y"])
    assert runner.providers == ["CPUExecutionProvider"]
    assert "threads=2" in repr(runner) and "'basic'" in repr(runner)


@pytest.mark.parametrize("optimization", ["disabled", "basic", "extended", "all"])
def test_every_optimization_level_gives_the_same_output(conv_relu, image, optimization):
    reference = OnnxRuntimeRunner(conv_relu[0], threads=1, optimization="disabled").infer(image)[0]
    output = OnnxRuntimeRunner(conv_relu[0], threads=1, optimization=optimization).infer({"X": image})[0]
    np.testing.assert_allclose(output, reference, rtol=1e-5, atol=1e-6)


def test_dynamic_batch_accepts_any_batch_size(image):
    model_bytes, weight, bias = _conv_relu_model(batch="N")
    batch = np.concatenate([image, -image])
    (output,) = OnnxRuntimeRunner(model_bytes, threads=1).infer(batch)
    assert output.shape == (2, 4, 6, 6)
    np.testing.assert_allclose(output, _conv_relu_reference(batch, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "feed, message",
    [
        ({"x": None}, r"missing \['X'\], unknown \['x'\]; expected \['X'\]"),
        (np.zeros((1, 3, 6, 6), np.float64), r"input 'X': expected dtype float32, got float64"),
        (np.zeros((1, 3, 5, 6), np.float32), r"input 'X': expected shape \[1, 3, 6, 6\], got \[1, 3, 5, 6\]"),
        (np.zeros((3, 6, 6), np.float32), r"expected shape \[1, 3, 6, 6\], got \[3, 6, 6\]"),
        ([1.0, 2.0], "feed must be a numpy array or a dict"),
    ],
)
def test_bad_feeds_name_the_input_and_what_was_expected(conv_relu, feed, message):
    runner = OnnxRuntimeRunner(conv_relu[0], threads=1)
    with pytest.raises(ValueError, match=message):
        runner.infer(feed)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"threads": 0}, ValueError, "threads must be a positive integer or None"),
        ({"optimization": "max"}, ValueError, "unknown optimization level 'max'; choose one of: disabled, basic"),
    ],
)
def test_bad_runner_settings_are_rejected(conv_relu, kwargs, error, message):
    with pytest.raises(error, match=message):
        OnnxRuntimeRunner(conv_relu[0], **kwargs)


def test_missing_or_broken_models_say_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model not found: .*absent.onnx"):
        OnnxRuntimeRunner(tmp_path / "absent.onnx")
    with pytest.raises(Exception) as caught:
        OnnxRuntimeRunner(b"not an onnx model")
    assert any("<17 bytes of ONNX>" in note for note in caught.value.__notes__)
    with pytest.raises(ValueError, match="model must be a path, serialized ONNX bytes or an onnx.ModelProto, got int"):
        OnnxRuntimeRunner(3)


def test_runner_closes_at_the_end_of_a_with_block(conv_relu, image):
    with OnnxRuntimeRunner(conv_relu[0], threads=1) as runner:
        assert runner.infer(image)[0].shape == (1, 4, 6, 6)
    with pytest.raises(RuntimeError, match="is closed"):
        runner.infer(image)


def test_latency_of_two_runners_side_by_side(conv_relu, conv_relu_path, image):
    full = OnnxRuntimeRunner(conv_relu_path, threads=1, spinning=False)
    pruned = OnnxRuntimeRunner(conv_relu[0], threads=1, spinning=False)
    assert full.conditions == pruned.conditions  # like for like: the same session settings
    candidates = {"full": lambda: full.infer(image), "pruned": lambda: pruned.infer(image)}
    stats = measure_latency(candidates, runs=3, warmup=1)
    assert [s.runs for s in stats.values()] == [3, 3]
    assert speedup(stats["full"], stats["pruned"]) > 0
    assert paired_speedup(stats["full"], stats["pruned"]).rounds == 3


def test_runner_conditions_name_every_setting_that_changes_timings(conv_relu, image):
    spinning = OnnxRuntimeRunner(conv_relu[0], threads=2, optimization="extended", spinning=True)
    assert spinning.conditions | {"onnxruntime": None} == {
        "backend": "onnxruntime-cpu", "onnxruntime": None, "providers": ["CPUExecutionProvider"],
        "intra_op_threads": 2, "inter_op_threads": 1, "execution_mode": "sequential", "optimization": "extended",
        "spinning": True}
    quiet = OnnxRuntimeRunner(conv_relu[0], threads=2, optimization="extended", spinning=False)
    assert quiet.conditions != spinning.conditions
    np.testing.assert_array_equal(quiet.infer(image)[0], spinning.infer(image)[0])
    with pytest.raises(ValueError, match="spinning must be True, False or None"):
        OnnxRuntimeRunner(conv_relu[0], spinning="no")


def test_runtime_modules_import_neither_compiler_nor_attribution():
    code = (
        "import sys, disasm.runtime.runner, disasm.runtime.onnxrt, disasm.runtime.latency, disasm.runtime.metrics\n"
        "print(sorted(m for m in sys.modules if m.startswith(('disasm.compiler', 'disasm.attribution'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # only the one user-error type (DisasmError, a module without imports) comes along: no graph code
    assert result.stdout.strip() == "['disasm.compiler', 'disasm.compiler.errors']"
