"""report.png: where the channels went (kept vs cut per group, in data-flow order) and what it bought."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

from disasm.compiler.files import write_atomic  # noqa: E402


def render_png(report: dict[str, Any]) -> bytes:
    groups = report["channels"]["per_group"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    x = range(len(groups))
    kept = [g["kept"] for g in groups]
    padded = [g["padded"] for g in groups]
    cut = [g["size"] - g["kept"] - g["padded"] for g in groups]
    left.bar(x, kept, color="#2b6cb0", label="kept (score)")
    left.bar(x, padded, bottom=kept, color="#90cdf4", label="kept (rounding)")
    left.bar(x, cut, bottom=[k + p for k, p in zip(kept, padded)], color="#e2e8f0", label="cut")
    for i, g in enumerate(groups):
        if g["kept"] + g["padded"] == g["size"] and g["reason"]:
            left.text(i, g["size"], "whole", ha="center", va="bottom", fontsize=7, rotation=90, color="#4a5568")
    left.set_xticks(list(x), [str(g["group"]) for g in groups], fontsize=7)
    left.set_xlabel("channel group (graph order)")
    left.set_ylabel("channels")
    left.set_title(f"channels kept for {', '.join(report['kept_classes'])}")
    left.legend(fontsize=8, loc="upper left")

    metrics = [("MACs", report["cost"]["macs_ratio"]), ("params", report["cost"]["params_ratio"])]
    if report.get("latency"):
        metrics.append(("latency", 1 / report["latency"]["speedup"]))
    if report.get("fidelity"):
        metrics.append(("agreement", report["fidelity"]["agreement"]))
    labels, values = zip(*metrics)
    bars = right.bar(labels, values, color=["#2f855a", "#2f855a", "#c05621", "#6b46c1"][:len(values)])
    right.axhline(1.0, color="#4a5568", linewidth=0.8, linestyle="--")
    for bar, v in zip(bars, values):
        right.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    right.set_ylim(0, 1.15)
    backend = f", latency on {report['latency']['backend']}" if report.get("latency") else ""
    right.set_title(f"pruned / full{backend}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_png(report: dict[str, Any], out_dir: Path) -> None:
    write_atomic(out_dir / "report.png", render_png(report))
