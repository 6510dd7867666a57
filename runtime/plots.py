"""report.png: where the channels went (kept vs cut per group, in data-flow order), what it bought, and the budget
search (each trial's MACs ratio against its category fidelity, the minimum, the chosen trial).

Every key may be missing on older or partial reports; a panel without data says so instead of failing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402

from disasm.compiler.files import write_atomic  # noqa: E402


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _categories(report: dict[str, Any]) -> list[str]:
    output = _dict(report.get("output"))
    classes = output.get("classes") or report.get("kept_classes") or []
    return list(report.get("categories") or [c for c in classes if c != output.get("none")])


def _channels_panel(ax: Any, report: dict[str, Any]) -> None:
    groups = _dict(report.get("channels")).get("per_group") or []
    if not groups:
        ax.text(0.5, 0.5, "no channel groups in this report", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    x = range(len(groups))
    kept = [g["kept"] for g in groups]
    padded = [g["padded"] for g in groups]
    cut = [g["size"] - g["kept"] - g["padded"] for g in groups]
    ax.bar(x, kept, color="#2b6cb0", label="kept (score)")
    ax.bar(x, padded, bottom=kept, color="#90cdf4", label="kept (rounding)")
    ax.bar(x, cut, bottom=[k + p for k, p in zip(kept, padded)], color="#e2e8f0", label="cut")
    for i, g in enumerate(groups):
        if g["kept"] + g["padded"] == g["size"] and g.get("reason"):
            ax.text(i, g["size"], "whole", ha="center", va="bottom", fontsize=7, rotation=90, color="#4a5568")
    ax.set_xticks(list(x), [str(g["group"]) for g in groups], fontsize=7)
    ax.set_xlabel("channel group (graph order)")
    ax.set_ylabel("channels")
    ax.set_title(f"channels kept for {', '.join(_categories(report))}")
    ax.legend(fontsize=8, loc="upper left")


def _ratios_panel(ax: Any, report: dict[str, Any]) -> None:
    cost, lat, fid = _dict(report.get("cost")), _dict(report.get("latency")), _dict(report.get("fidelity"))
    metrics = [(label, value, color) for label, value, color in (
        ("category\nfidelity", fid.get("category_fidelity"), "#6b46c1"),
        ("MACs", cost.get("macs_ratio"), "#2f855a"),
        ("params", cost.get("params_ratio"), "#2f855a"),
        ("latency", 1 / lat["speedup"] if lat.get("speedup") else None, "#c05621"),
        ("agreement\n(secondary)", fid.get("agreement"), "#a0aec0"),
    ) if value is not None]
    if not metrics:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    labels, values, colors = zip(*metrics)
    bars = ax.bar(labels, values, color=colors)
    ax.axhline(1.0, color="#4a5568", linewidth=0.8, linestyle="--")
    minimum = _dict(report.get("contract")).get("min_fidelity")
    if minimum is not None and fid.get("category_fidelity") is not None:
        ax.hlines(minimum, -0.4, 0.4, color="#c53030", linewidth=1.5)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(0, max(1.15, 1.1 * max(values)))  # a slower pruned model's bar and label stay inside the axes
    backend = f", latency on {lat['backend']}" if lat.get("backend") and lat.get("speedup") else ""
    ax.set_title(f"pruned / full{backend}", fontsize=10)


def _search_panel(ax: Any, report: dict[str, Any]) -> None:
    search = _dict(report.get("search"))
    trials = [t for t in search.get("trials") or [] if isinstance(t, dict)]
    minimum = _dict(report.get("contract")).get("min_fidelity")
    chosen = search.get("chosen")
    scored = [(i, t) for i, t in enumerate(trials)
              if t.get("macs_ratio") is not None and t.get("category_fidelity") is not None]
    if scored:
        ax.plot([t["macs_ratio"] for _, t in scored], [t["category_fidelity"] for _, t in scored], "o",
                color="#2b6cb0", markersize=5, label="trial")
    picked = [t for i, t in scored if i == chosen]
    if picked:
        ax.plot(picked[0]["macs_ratio"], picked[0]["category_fidelity"], "*", color="#d69e2e", markersize=16,
                markeredgecolor="#1a202c", label=f"chosen: {picked[0].get('setting', '')}")
    if minimum is not None:
        ax.axhline(minimum, color="#c53030", linewidth=1, linestyle="--", label=f"min fidelity {minimum:.2f}")
    unscored = len(trials) - len(scored)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MACs ratio (pruned / full)")
    ax.set_ylabel("category fidelity")
    title = f"budget search: {len(trials)} trial{'' if len(trials) == 1 else 's'}"
    ax.set_title(title + (f" ({unscored} without a score)" if unscored else ""), fontsize=10)
    if scored or minimum is not None:
        ax.legend(fontsize=7, loc="lower right")


def render_png(report: dict[str, Any]) -> bytes:
    search = bool(_dict(report.get("search")).get("trials"))
    ratios = [2.2, 1.2, 1.3] if search else [2.2, 1.2]
    fig, axes = plt.subplots(1, len(ratios), figsize=(17 if search else 13, 4.8), gridspec_kw={"width_ratios": ratios})
    _channels_panel(axes[0], report)
    _ratios_panel(axes[1], report)
    if search:
        _search_panel(axes[2], report)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_png(report: dict[str, Any], out_dir: Path) -> None:
    write_atomic(out_dir / "report.png", render_png(report))
