"""The compile report: one dict, written as report.json and report.md, and shown as a table on the terminal.

Everything the terminal table shows is in report.json; report.md holds the same tables for humans and reviews.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from disasm.compiler.files import write_atomic


def _ratio(new: float, old: float) -> str:
    return f"{new / old:.3f}x" if old else "n/a"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, full, pruned, pruned/full) rows: the headline numbers of a compile run."""
    cost, lat = report["cost"], report.get("latency")
    rows = [
        ("classes", str(len(report["model"]["classes"])), str(len(report["kept_classes"])), ""),
        ("MACs (per image)", f"{cost['full']['macs'] / 1e6:.1f} M", f"{cost['pruned']['macs'] / 1e6:.1f} M",
         _ratio(cost["pruned"]["macs"], cost["full"]["macs"])),
        ("parameters", f"{cost['full']['params'] / 1e3:.1f} K", f"{cost['pruned']['params'] / 1e3:.1f} K",
         _ratio(cost["pruned"]["params"], cost["full"]["params"])),
    ]
    if lat:
        rows.append((f"latency median ({lat['backend']})", f"{lat['full']['median_ms']:.2f} ms",
                     f"{lat['pruned']['median_ms']:.2f} ms", f"{lat['speedup']:.2f}x faster"))
    engines = report.get("engines")
    if engines:
        for precision in ("fp32", "fp16"):
            full, pruned = engines[f"full.{precision}"]["weight_bytes"], engines[f"pruned.{precision}"]["weight_bytes"]
            if full and pruned:
                rows.append((f"TensorRT {precision} weights ({engines['target']})", f"{full / 1e3:.0f} KB",
                             f"{pruned / 1e3:.0f} KB", _ratio(pruned, full)))
    fid = report.get("fidelity")
    if fid:
        rows.append(("pixel agreement with full model", "", _pct(fid["agreement"]), ""))
        if fid.get("miou_full") is not None:
            rows.append(("mIoU, kept classes (vs ground truth)", _pct(fid["miou_full"]), _pct(fid["miou_pruned"]),
                         f"{100 * (fid['miou_pruned'] - fid['miou_full']):+.2f} pts"))
    return rows


def terminal_table(report: dict[str, Any]) -> Table:
    kept = ", ".join(report["kept_classes"])
    table = Table(title=f"disasm-compile {Path(report['model']['path']).name} -> {kept}", title_justify="left")
    for col, justify in (("", "left"), ("full", "right"), ("pruned", "right"), ("pruned / full", "right")):
        table.add_column(col, justify=justify)
    for row in summary_rows(report):
        table.add_row(*row)
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(terminal_table(report))
    ch = report["channels"]
    fragile = f"; fragile (consumer output loss > {ch['fragile_threshold']:.0%}): {ch['fragile']}" if ch["fragile"] else ""
    console.print(f"channel groups: {ch['groups']} ({ch['cut']} cut, {ch['whole']} kept whole){fragile}; "
                  f"channels kept {ch['kept']}/{ch['total']}; outputs in {report['out_dir']}")


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# disasm-compile report: {Path(report['model']['path']).name}", "",
             f"Kept classes (output order): {', '.join(report['kept_classes'])}  ",
             f"Source sha256: `{report['model']['sha256']}`", "",
             "| metric | full | pruned | pruned / full |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    fid = report.get("fidelity")
    if fid and fid.get("per_class"):
        lines += ["", "## Per-class IoU (kept classes, ground truth of other classes counted as background)", "",
                  "| class | full | pruned |", "|---|---:|---:|"]
        lines += [f"| {name} | {_pct(v['full'])} | {_pct(v['pruned'])} |" for name, v in fid["per_class"].items()]
    lines += ["", "## Channel groups", "",
              "Output loss: the largest share of a consumer's output energy (calibration data) the cut still loses "
              "after compensation; groups above the fragile threshold are where the cut changes most.", "",
              "| group | producers | channels | kept | padded | output loss | note |",
              "|---:|---|---:|---:|---:|---:|---|"]
    for g in report["channels"]["per_group"]:
        producers = ", ".join(g["producers"][:2]) + (" ..." if len(g["producers"]) > 2 else "")
        loss = "" if g.get("output_loss") is None else f"{100 * g['output_loss']:.2f}%"
        lines.append(f"| {g['group']} | {producers} | {g['size']} | {g['kept']} | {g['padded']} | {loss} | {g['reason']} |")
    lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    write_atomic(out_dir / "report.json", (json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    write_atomic(out_dir / "report.md", markdown(report).encode())
