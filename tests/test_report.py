"""The compile report: category fidelity is the headline, the first line says whether the contract was met, the
budget search is listed trial by trial, and partial or older reports still render."""

from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import asdict

import pytest
from rich.console import Console

from disasm.runtime.latency import LatencyStats
from disasm.runtime.plots import render_png
from disasm.runtime.report import headline, markdown, print_report, summary_rows, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def full_report(met: bool = False) -> dict:
    score = 0.95 if met else 0.62
    return {
        "model": {"path": "/models/deeplab.onnx", "sha256": "ab" * 32,
                  "classes": ["background", "person", "bus", "car"]},
        "categories": ["person", "car"],
        "kept_classes": ["background", "person", "car"],
        "output": {"classes": ["background", "person", "car"], "none": "background", "mode": "chosen-or-none"},
        "out_dir": "/tmp/out",
        "cost": {"full": {"macs": 2_000_000_000, "params": 2_500_000},
                 "pruned": {"macs": 1_200_000_000, "params": 1_000_000}, "macs_ratio": 0.6, "params_ratio": 0.4},
        "latency": {"backend": "onnxruntime-cpu", "full": {"median_ms": 40.0}, "pruned": {"median_ms": 25.0},
                    "speedup": 1.6},
        "engines": {"target": "sm86", "module": "tensorrt_rtx",
                    "full.fp32": {"weight_bytes": 10_000_000}, "pruned.fp32": {"weight_bytes": 4_000_000},
                    "full.fp16": {"weight_bytes": 5_000_000}, "pruned.fp16": {"weight_bytes": 2_000_000},
                    "latency": "needs a GPU of the engine's architecture; not measured here"},
        "fidelity": {"images": 9, "source": "held-out share of --images: 9 of 12, not used by attribution or "
                                            "compensation",
                     "mode": "chosen-or-none", "category_fidelity": score,
                     "per_category": {"person": score + 0.05, "car": score - 0.05}, "note": None,
                     "agreement": 0.97, "miou_full": 0.83, "miou_pruned": 0.71,
                     "per_class": {"background": {"full": 0.9, "pruned": 0.88}, "person": {"full": 0.8, "pruned": 0.7},
                                   "car": {"full": 0.79, "pruned": None}}},
        "contract": {"min_fidelity": 0.9, "met": met,
                     "message": (f"category fidelity {score:.2f} >= 0.90 on 9 held-out images" if met else
                                 f"category fidelity {score:.2f} < 0.90 on 9 held-out images; "
                                 "the uncut model was written")},
        "search": {"trials": [
            {"setting": "keep 0.3", "macs_ratio": 0.35, "category_fidelity": 0.41,
             "per_category": {"person": 0.5, "car": 0.32}},
            {"setting": "keep 0.5", "macs_ratio": 0.6, "category_fidelity": score,
             "per_category": {"person": score + 0.05, "car": score - 0.05}},
            {"setting": "keep 0.7", "macs_ratio": 0.8, "category_fidelity": None,
             "per_category": {"person": None, "car": None}},
        ], "chosen": 1 if met else None, "note": "bisection on the keep ratio, 3 trials"},
        "channels": {"groups": 2, "cut": 1, "whole": 1, "fragile": [], "fragile_threshold": 0.5, "total": 96,
                     "kept": 64, "per_group": [
                         {"group": 0, "producers": ["conv1"], "size": 32, "kept": 16, "padded": 0,
                          "output_loss": 0.1, "reason": ""},
                         {"group": 1, "producers": ["conv2", "conv3", "conv4"], "size": 64, "kept": 48, "padded": 0,
                          "output_loss": None, "reason": "class output"}]},
        "settings": {"criterion": "disassembler"},
    }


def terminal_text(report: dict) -> str:
    buffer = io.StringIO()
    print_report(report, Console(file=buffer, width=200, color_system=None))
    return buffer.getvalue()


def test_missed_contract_is_the_first_line_of_terminal_and_markdown():
    report = full_report(met=False)
    expected = "CONTRACT MISSED: category fidelity 0.62 < 0.90 on 9 held-out images; the uncut model was written"
    assert headline(report) == expected
    assert terminal_text(report).splitlines()[0] == expected
    assert markdown(report).splitlines()[0] == expected


def test_met_contract_is_said_briefly_on_the_first_line():
    report = full_report(met=True)
    assert terminal_text(report).splitlines()[0].startswith("Contract met: category fidelity 0.95")
    assert markdown(report).splitlines()[0].startswith("Contract met:")


def test_headline_keeps_a_message_that_states_its_own_verdict():
    report = full_report(met=False)
    report["contract"]["message"] = "CONTRACT UNCHECKED: the chosen categories appear in neither model's answers"
    assert headline(report) == report["contract"]["message"]
    report = full_report(met=True)
    report["contract"]["message"] = "contract met: category fidelity 0.950 >= 0.90 on 9 held-out images"
    assert headline(report) == "Contract met: category fidelity 0.950 >= 0.90 on 9 held-out images"


def test_headline_without_message_or_contract_still_says_the_score():
    report = full_report()
    report["contract"]["message"] = ""
    assert headline(report).startswith("CONTRACT MISSED: category fidelity 0.620 < 0.900 on held-out share")
    del report["contract"]
    assert headline(report).startswith("Category fidelity 0.620 on held-out share") and "no minimum" in headline(report)
    report["fidelity"] |= {"category_fidelity": None, "note": "no chosen category appears"}
    assert "undefined" in headline(report) and "no chosen category appears" in headline(report)


def test_rows_put_category_fidelity_first_and_agreement_as_secondary():
    labels = [row[0] for row in summary_rows(full_report())]
    assert labels[0].startswith("category fidelity")
    assert labels[1:3] == ["  IoU person", "  IoU car"]
    order = [next(i for i, label in enumerate(labels) if label.startswith(prefix))
             for prefix in ("category fidelity", "MACs", "parameters", "latency", "TensorRT fp32", "pixel agreement",
                            "mIoU")]
    assert order == sorted(order)
    assert "secondary" in labels[order[5]]
    first = summary_rows(full_report())[0]
    assert first[2] == "0.620" and "MISSED" in first[3]


def test_markdown_lists_every_trial_and_marks_the_chosen_one():
    text = markdown(full_report(met=True))
    assert "## Budget search" in text and "bisection on the keep ratio" in text
    assert "| # | setting | MACs ratio | category fidelity | IoU person | IoU car | chosen |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "keep 0." in line]
    assert len(rows) == 3
    assert "**chosen**" in rows[1] and "**chosen**" not in rows[0] + rows[2]
    assert "| 0 | keep 0.3 | 0.350 | 0.410 | 0.500 | 0.320 |  |" in text
    assert "n/a" in rows[2]
    assert "No trial was chosen." in markdown(full_report(met=False))


def test_markdown_says_which_images_how_many_and_that_engines_were_not_run():
    text = markdown(full_report())
    assert "Fidelity measured on held-out share of --images: 9 of 12, not used by attribution" in text
    report = full_report()
    report["fidelity"]["source"] = "--eval-images"
    assert "Fidelity measured on --eval-images (9 images)" in markdown(report)
    assert "only built, not run" in text and "needs a GPU" in text
    assert "Output channels: background, person, car; none = background (chosen-or-none)" in text
    assert "counted as background" in text


def test_terminal_report_lists_source_search_and_engines():
    text = terminal_text(full_report())
    assert "fidelity measured on held-out share" in text
    assert "budget search: 3 trials, none chosen" in text
    assert "TensorRT engines were only built for sm86, not run (needs a GPU" in text


@pytest.mark.parametrize("drop", ["contract", "search", "output", "engines", "latency", "fidelity", "channels", "cost",
                                  "settings", "model"])
def test_partial_reports_render(drop, tmp_path):
    report = full_report()
    del report[drop]
    assert markdown(report).splitlines()[0]
    assert terminal_text(report)
    assert render_png(report)[:8] == PNG


def test_a_much_slower_pruned_model_still_renders_without_a_warning():
    report = full_report()
    report["latency"]["speedup"] = 0.1  # pruned 10x slower: a noisy run of a tiny model, or a bad cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Tight layout not applied" would reach the user's terminal
        assert render_png(report)[:8] == PNG


def test_an_old_report_without_new_keys_renders():
    old = copy.deepcopy(full_report())
    for key in ("contract", "search", "output", "categories"):
        del old[key]
    old["fidelity"] = {"images": 4, "agreement": 0.9, "miou_full": 0.7, "miou_pruned": 0.6,
                       "per_class": {"background": {"full": 0.9, "pruned": 0.8}}}
    old["engines"]["latency"] = None
    text = markdown(old)
    assert text.splitlines()[0] == ("Category fidelity not measured "
                                    "(fidelity judged on 4 evaluation images by older measures)")
    assert not summary_rows(old)[0][0].startswith("category fidelity")
    assert "Budget search" not in text and "only built" not in text
    assert render_png(old)[:8] == PNG
    assert markdown({}).splitlines()[0] == "Category fidelity not measured"
    assert render_png({})[:8] == PNG


def test_write_report_writes_json_and_markdown(tmp_path):
    report = full_report(met=True)
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["contract"]["met"] is True
    assert (tmp_path / "report.md").read_text().startswith("Contract met:")
    assert render_png(report)[:8] == PNG


def test_markdown_says_what_every_figure_rests_on():
    """Image counts and the skipped files by name, which engines were built and that none was run, and latency as
    p10-p90 of full and pruned with the speed-up's spread over the paired rounds (one run can say 1.1x or 1.7x)."""
    report = full_report()
    report["images"] = {"calibration": 12, "judged": 4, "skipped": 1, "skipped_files": ["/data/calib/cut.jpg"]}
    full = LatencyStats("full", 3, 40.0, 38.0, 50.0, 42.7, 38.0, samples_ms=(40.0, 38.0, 50.0))
    pruned = LatencyStats("pruned", 3, 25.0, 24.0, 30.0, 23.3, 20.0, samples_ms=(20.0, 25.0, 25.0))
    report["latency"] |= {"runs": 3, "full": json.loads(json.dumps(asdict(full))),  # as report.json holds them
                          "pruned": json.loads(json.dumps(asdict(pruned)))}
    text = markdown(report)
    assert ("Images: 12 calibration (attribution, compensation); 4 judged (fidelity, budget search); 1 unreadable "
            "file skipped: /data/calib/cut.jpg") in text
    ratios = sorted([40 / 20, 38 / 25, 50 / 25])  # per round: full / pruned
    p10, p90 = ratios[0] + 0.2 * (ratios[1] - ratios[0]), ratios[1] + 0.8 * (ratios[2] - ratios[1])
    assert f"|   p10-p90 (3 runs) | 38.00-50.00 ms | 24.00-30.00 ms | {p10:.2f}-{p90:.2f}x |" in text
    assert ("Engines built for sm86 with tensorrt_rtx: full.fp32, pruned.fp32, full.fp16, pruned.fp16; they were "
            "only built, not run") in text
    report["engines"] = None
    assert "TensorRT engines: none built (--no-engines, or no TensorRT module installed)" in markdown(report)
    assert "none built" in terminal_text(report)
    del report["latency"]["full"]["samples_ms"]  # an older report: the spreads without the paired one
    assert "|   p10-p90 (3 runs) | 38.00-50.00 ms | 24.00-30.00 ms |  |" in markdown(report)


def test_images_line_says_when_judged_images_are_calibration_images():
    report = full_report()
    report["images"] = {"calibration": 8, "judged": 8, "judged_in_calibration": 8, "skipped": 0}
    assert "8 of the judged are also calibration images, so fidelity on them is optimistic" in markdown(report)
    report["images"]["judged_in_calibration"] = 0
    assert "none of the judged is a calibration image; no file skipped" in markdown(report)


def test_a_slower_pruned_model_is_called_slower_and_warned_about():
    """0.87x must read '1.15x slower', not '0.87x faster'; when the pruned model lost in (nearly) every paired round
    a warning line says so in the terminal and in report.md, and a win or a tie inside the noise gives none."""
    report = full_report(met=True)
    full = LatencyStats("full", 3, 40.0, 39.0, 41.0, 40.0, 39.0, samples_ms=(40.0, 39.0, 41.0))
    slower = LatencyStats("pruned", 3, 46.0, 45.0, 48.0, 46.3, 45.0, samples_ms=(46.0, 45.0, 48.0))
    report["latency"] |= {"runs": 3, "full": asdict(full), "pruned": asdict(slower), "speedup": 40.0 / 46.0}
    assert summary_rows(report)[[r[0] for r in summary_rows(report)].index(
        "latency median (onnxruntime-cpu)")][3] == "1.15x slower"
    warning = "warning: the pruned model ran 1.15x slower than the full one on onnxruntime-cpu"
    assert warning in terminal_text(report) and warning.capitalize() in markdown(report)
    mixed = LatencyStats("pruned", 3, 40.0, 30.0, 46.0, 38.7, 30.0, samples_ms=(46.0, 30.0, 40.0))  # one round won
    report["latency"] |= {"pruned": asdict(mixed), "speedup": 1.0}
    assert "warning" not in terminal_text(report).lower() and "1.00x faster" in terminal_text(report)
    report["latency"] |= {"pruned": {"median_ms": 25.0}, "speedup": 1.6}  # no samples: no paired spread, no warning
    assert "1.60x faster" in terminal_text(report) and "warning" not in markdown(report).lower()
