"""The compile report: one dict, written as report.json and report.md, and shown as a table on the terminal.

Everything the terminal table shows is in report.json; report.md holds the same tables for humans and reviews. The
headline is category fidelity (IoU of the pruned model's answer with the full model's, per chosen category) against
the contract's minimum: the first line of both the terminal report and report.md says whether the contract was met.
Every key may be missing on older or partial reports; what is missing is left out, never guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from disasm.compiler.files import write_atomic
from disasm.runtime.latency import LatencyStats, SpeedupStats, paired_speedup

ENGINE_NAMES = ("full.fp32", "pruned.fp32", "full.fp16", "pruned.fp16")
_NO_ENGINES = "TensorRT engines: none built (--no-engines, or no TensorRT module installed)"


def _ratio(new: float | None, old: float | None) -> str:
    return f"{new / old:.3f}x" if new is not None and old else "n/a"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _images(fid: dict[str, Any]) -> str:
    """Which images fidelity was judged on, as a phrase: the report's `source` sentence, else the image count."""
    source, count = fid.get("source"), fid.get("images")
    if source:
        return str(source)
    if count is not None:
        return f"{count} evaluation image{'' if count == 1 else 's'}"
    return "the evaluation images"


def contract_state(report: dict[str, Any]) -> bool | None:
    """True if the contract was met, False if missed, None if the report has no contract."""
    met = _dict(report.get("contract")).get("met")
    return None if met is None else bool(met)


def _has_verdict(message: str) -> bool:
    """Whether a contract message already opens with its verdict ("CONTRACT MISSED: ...", "contract met: ...")."""
    return re.match(r"contract [a-z ]{2,20}:", message, re.IGNORECASE) is not None


def headline(report: dict[str, Any]) -> str:
    """The report's first line: whether the category-fidelity contract was met, in plain words."""
    contract, fid = _dict(report.get("contract")), _dict(report.get("fidelity"))
    message = str(contract.get("message") or "").strip()
    score, minimum = fid.get("category_fidelity"), contract.get("min_fidelity")
    state = contract_state(report)
    if state is False:
        if not message:
            message = f"category fidelity {_num(score)} < {_num(minimum)} on {_images(fid)}"
        return message if _has_verdict(message) else f"CONTRACT MISSED: {message}"
    if state is True:
        if not message:
            message = f"category fidelity {_num(score)} >= {_num(minimum)} on {_images(fid)}"
        return message[0].upper() + message[1:] if _has_verdict(message) else f"Contract met: {message}"
    if "category_fidelity" not in fid:
        return "Category fidelity not measured" + (f" (fidelity judged on {_images(fid)} by older measures)"
                                                   if fid else "")
    if score is None:
        return f"Category fidelity undefined on {_images(fid)}" + (f": {fid['note']}" if fid.get("note") else "")
    return f"Category fidelity {_num(score)} on {_images(fid)} (no minimum set)"


def _output(report: dict[str, Any]) -> dict[str, Any]:
    """report["output"], completed from older keys (kept_classes, fidelity.output_classes) where missing."""
    output, fid = dict(_dict(report.get("output"))), _dict(report.get("fidelity"))
    output.setdefault("classes", fid.get("output_classes") or report.get("kept_classes") or [])
    output.setdefault("none", fid.get("none"))
    output.setdefault("mode", fid.get("mode"))
    return output


def _categories(report: dict[str, Any]) -> list[str]:
    output = _output(report)
    return list(report.get("categories") or [c for c in output["classes"] if c != output.get("none")])


def _engine_latency_text(engines: dict[str, Any]) -> str | None:
    latency = engines.get("latency")
    if isinstance(latency, str) and latency.strip():
        return re.sub(r"^built only[:;,]?\s*", "", latency.strip(), flags=re.IGNORECASE)
    return None


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, full, pruned, pruned/full) rows: category fidelity first, then cost, latency, engines, pixel
    agreement (secondary) and mIoU."""
    rows: list[tuple[str, str, str, str]] = []
    fid, contract = _dict(report.get("fidelity")), _dict(report.get("contract"))
    if "category_fidelity" in fid:
        minimum, state = contract.get("min_fidelity"), contract_state(report)
        verdict = "" if minimum is None else f"min {minimum:.2f}: " + {True: "met", False: "MISSED"}.get(state, "")
        rows.append(("category fidelity (vs full model)", "", _num(fid.get("category_fidelity")),
                     verdict))
        for name, v in _dict(fid.get("per_category")).items():
            rows.append((f"  IoU {name}", "", _num(v), "" if v is not None else "absent from both"))
    output = _output(report)
    full_classes = _dict(report.get("model")).get("classes")
    if output["classes"] or full_classes:
        rows.append(("output classes", str(len(full_classes)) if full_classes else "",
                     str(len(output["classes"])) if output["classes"] else "", ""))
    cost = _dict(report.get("cost"))
    full, pruned = _dict(cost.get("full")), _dict(cost.get("pruned"))
    if full.get("macs") is not None and pruned.get("macs") is not None:
        rows.append(("MACs (per image)", f"{full['macs'] / 1e6:.1f} M", f"{pruned['macs'] / 1e6:.1f} M",
                     _ratio(pruned["macs"], full["macs"])))
    if full.get("params") is not None and pruned.get("params") is not None:
        rows.append(("parameters", f"{full['params'] / 1e3:.1f} K", f"{pruned['params'] / 1e3:.1f} K",
                     _ratio(pruned["params"], full["params"])))
    rows += _latency_rows(_dict(report.get("latency")))
    engines = _dict(report.get("engines"))
    for precision in ("fp32", "fp16"):
        e_full = _dict(engines.get(f"full.{precision}")).get("weight_bytes")
        e_pruned = _dict(engines.get(f"pruned.{precision}")).get("weight_bytes")
        if e_full and e_pruned:
            rows.append((f"TensorRT {precision} weights ({engines.get('target', '?')})", f"{e_full / 1e3:.0f} KB",
                         f"{e_pruned / 1e3:.0f} KB", _ratio(e_pruned, e_full)))
    if fid.get("agreement") is not None:
        rows.append(("pixel agreement (secondary)", "", _pct(fid["agreement"]), ""))
    if fid.get("miou_full") is not None or fid.get("miou_pruned") is not None:
        mode = fid.get("mode") or output.get("mode") or "kept classes"
        m_full, m_pruned = fid.get("miou_full"), fid.get("miou_pruned")
        diff = f"{100 * (m_pruned - m_full):+.2f} pts" if m_full is not None and m_pruned is not None else ""
        rows.append((f"mIoU vs ground truth ({mode})", _pct(m_full), _pct(m_pruned), diff))
    return rows


def _latency_rows(lat: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The median of full and pruned with the speed-up, then their p10-p90 with the speed-up's p10-p90 over the
    paired rounds: one run on a shared machine can be 1.1x or 1.7x, so the median alone says too little."""
    full, pruned = _dict(lat.get("full")), _dict(lat.get("pruned"))
    if full.get("median_ms") is None or pruned.get("median_ms") is None:
        return []
    speedup = lat.get("speedup")
    rows = [(f"latency median ({lat.get('backend', '?')})", f"{full['median_ms']:.2f} ms",
             f"{pruned['median_ms']:.2f} ms", "" if speedup is None else _speed_text(speedup))]
    spreads = [f"{d['p10_ms']:.2f}-{d['p90_ms']:.2f} ms" if d.get("p10_ms") is not None and d.get("p90_ms") is not None
               else "n/a" for d in (full, pruned)]
    if spreads != ["n/a", "n/a"]:
        paired = _paired_speedup(full, pruned)
        runs = lat.get("runs") or full.get("runs")
        counted = f" ({runs} run{'' if runs == 1 else 's'})" if runs else ""
        rows.append((f"  p10-p90{counted}", *spreads,
                     "" if paired is None else f"{paired.p10:.2f}-{paired.p90:.2f}x"))
    return rows


def _speed_text(speedup: float) -> str:
    """'1.25x faster' or '1.15x slower': never '0.87x faster', which reads as a gain."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _speed_line(report: dict[str, Any]) -> str | None:
    """A warning when the pruned model ran slower than the full one in (nearly) every paired round: smaller is not
    faster on this backend, and the user should not have to find that in a ratio column."""
    lat = _dict(report.get("latency"))
    full, pruned = _dict(lat.get("full")), _dict(lat.get("pruned"))
    paired = _paired_speedup(full, pruned) if full and pruned else None
    if paired is None or paired.p90 >= 1:
        return None
    return (f"warning: the pruned model ran {_speed_text(lat.get('speedup') or paired.of_medians)} than the full one on "
            f"{lat.get('backend', 'this backend')} (p10-p90 of the paired rounds {paired.p10:.2f}-{paired.p90:.2f}x): "
            "fewer MACs did not become time on this backend")


def _paired_speedup(full: dict[str, Any], pruned: dict[str, Any]) -> SpeedupStats | None:
    """latency.paired_speedup from the samples report.json keeps, or None where they are missing or unusable."""
    def stats(d: dict[str, Any]) -> LatencyStats:
        known = {f.name for f in fields(LatencyStats)}
        return LatencyStats(**{k: v for k, v in d.items() if k in known} | {"samples_ms": tuple(d["samples_ms"])})

    try:
        return paired_speedup(stats(full), stats(pruned))
    except (KeyError, TypeError, ValueError):
        return None


def _output_line(report: dict[str, Any]) -> str | None:
    output = _output(report)
    if not output["classes"]:
        return None
    none = f"; none = {output['none']}" if output.get("none") else "; no none channel"
    mode = f" ({output['mode']})" if output.get("mode") else ""
    return f"output channels: {', '.join(output['classes'])}{none}{mode}"


def _fidelity_line(report: dict[str, Any]) -> str | None:
    fid = _dict(report.get("fidelity"))
    if not fid:
        return None
    count = fid.get("images")
    source = str(fid.get("source") or "")
    named = count is None or not source or str(count) in source  # the sentence already gives the count
    counted = "" if named else f" ({count} image{'' if count == 1 else 's'})"
    return f"fidelity measured on {_images(fid)}{counted}"


def _images_line(report: dict[str, Any]) -> str | None:
    """How many images each figure rests on, whether the judged ones overlap the calibration set, and which files
    were skipped as unreadable (named, so a user can fix or remove them)."""
    images = _dict(report.get("images"))
    if not images:
        return None
    parts = []
    if images.get("calibration") is not None:
        parts.append(f"{images['calibration']} calibration (attribution, compensation)")
    if images.get("judged") is not None:
        parts.append(f"{images['judged']} judged (fidelity, budget search)")
    overlap = images.get("judged_in_calibration")
    if overlap:
        parts.append(f"{overlap} of the judged are also calibration images, so fidelity on them is optimistic")
    elif overlap == 0:
        parts.append("none of the judged is a calibration image")
    skipped = [str(p) for p in images.get("skipped_files") or []]
    count = images.get("skipped", len(skipped))
    if count:
        named = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        parts.append(f"{count} unreadable file{'' if count == 1 else 's'} skipped" + (f": {named}" if named else ""))
    elif "skipped" in images:
        parts.append("no file skipped")
    return "images: " + "; ".join(parts) if parts else None


def _search_line(report: dict[str, Any]) -> str | None:
    search = _dict(report.get("search"))
    trials = search.get("trials") or []
    if not trials and not search.get("note"):
        return None
    chosen = search.get("chosen")
    picked = (f"chosen: {trials[chosen].get('setting', '?')}"
              if isinstance(chosen, int) and 0 <= chosen < len(trials) else "none chosen")
    note = f"; {search['note']}" if search.get("note") else ""
    return f"budget search: {len(trials)} trial{'' if len(trials) == 1 else 's'}, {picked}{note}"


def terminal_table(report: dict[str, Any]) -> Table:
    name = Path(str(_dict(report.get("model")).get("path", "model"))).name
    table = Table(title=f"disasm-compile {name} -> {', '.join(_categories(report))}", title_justify="left")
    for col, justify in (("", "left"), ("full", "right"), ("pruned", "right"), ("pruned / full", "right")):
        table.add_column(col, justify=justify)
    for row in summary_rows(report):
        table.add_row(*row)
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    state = contract_state(report)
    style = {False: "bold red", True: "bold green", None: "bold"}[state]
    console.print(Text(headline(report), style=style))
    console.print(terminal_table(report))
    for line in (_output_line(report), _fidelity_line(report), _images_line(report), _note(report),
                 _search_line(report), _speed_line(report), _engines_line(report)):
        if line:
            console.print(Text(line, style="yellow" if line.startswith("warning:") else ""))
    ch = _dict(report.get("channels"))
    if ch:
        fragile = (f"; fragile (consumer output loss > {ch['fragile_threshold']:.0%}): {ch['fragile']}"
                   if ch.get("fragile") else "")
        console.print(Text(f"channel groups: {ch.get('groups')} ({ch.get('cut')} cut, {ch.get('whole')} kept whole)"
                           f"{fragile}; channels kept {ch.get('kept')}/{ch.get('total')}; "
                           f"outputs in {report.get('out_dir')}"))


def _note(report: dict[str, Any]) -> str | None:
    note = _dict(report.get("fidelity")).get("note")
    return f"note: {note}" if note else None


def _engines_line(report: dict[str, Any]) -> str | None:
    if "engines" in report and report["engines"] is None:
        return _NO_ENGINES
    engines = _dict(report.get("engines"))
    text = _engine_latency_text(engines) if engines else None
    if not text:
        return None
    return f"TensorRT engines were only built for {engines.get('target', '?')}, not run ({text})"


def _engines_section(report: dict[str, Any]) -> list[str]:
    """Which engines were built, for what, and whether they were run (a built engine proves the graph compiles;
    only a run engine gives a latency)."""
    if "engines" in report and report["engines"] is None:
        backend = _dict(report.get("latency")).get("backend")
        return ["", "## TensorRT engines", "", _NO_ENGINES + (f"; latency is {backend}'s only." if backend else ".")]
    engines = _dict(report.get("engines"))
    if not engines:
        return []
    built = [name for name in ENGINE_NAMES if isinstance(engines.get(name), dict)]
    text = _engine_latency_text(engines)
    module = f" with {engines['module']}" if engines.get("module") else ""
    return ["", "## TensorRT engines", "",
            f"Engines built for {engines.get('target', '?')}{module}: {', '.join(built) or 'none recorded'}; "
            + (f"they were only built, not run ({text})." if text else "see the table for their weights.")]


def _trial_table(report: dict[str, Any]) -> list[str]:
    search = _dict(report.get("search"))
    trials = [t for t in search.get("trials") or [] if isinstance(t, dict)]
    lines = ["", "## Budget search", ""]
    if search.get("note"):
        lines += [str(search["note"]), ""]
    minimum = _dict(report.get("contract")).get("min_fidelity")
    if minimum is not None:
        lines += [f"Minimum category fidelity: {minimum:.2f}.", ""]
    if not trials:
        return lines + ["No trials recorded."]
    names: list[str] = []
    for t in trials:
        names += [n for n in _dict(t.get("per_category")) if n not in names]
    chosen = search.get("chosen")
    lines += ["| # | setting | MACs ratio | category fidelity | " + "".join(f"IoU {n} | " for n in names) + "chosen |",
              "|---:|---|---:|---:|" + "---:|" * len(names) + "---|"]
    for i, t in enumerate(trials):
        mark = "**chosen**" if i == chosen else ""
        macs = t.get("macs_ratio")
        per = _dict(t.get("per_category"))
        cells = [str(i), str(t.get("setting", "")), "n/a" if macs is None else f"{macs:.3f}",
                 _num(t.get("category_fidelity")), *(_num(per.get(n)) for n in names), mark]
        if i == chosen:
            cells[:-1] = [f"**{c}**" for c in cells[:-1]]
        lines.append("| " + " | ".join(cells) + " |")
    if not (isinstance(chosen, int) and 0 <= chosen < len(trials)):
        lines += ["", "No trial was chosen."]
    return lines


def markdown(report: dict[str, Any]) -> str:
    model = _dict(report.get("model"))
    lines = [headline(report), "", f"# disasm-compile report: {Path(str(model.get('path', 'model'))).name}", ""]
    categories = _categories(report)
    if categories:
        lines.append(f"Chosen categories: {', '.join(categories)}  ")
    for line in (_output_line(report), _fidelity_line(report), _images_line(report), _note(report),
                 _speed_line(report)):
        if line:
            lines.append(line[0].upper() + line[1:] + "  ")
    if model.get("sha256"):
        lines.append(f"Source sha256: `{model['sha256']}`")
    lines += ["", "Category fidelity: for each chosen category, the IoU of the pruned model's answer with the full "
              "model's answer read the same way (chosen category or none), summed over the images; the headline is "
              "their mean. Pixel agreement is secondary: a model that answers none everywhere scores the none share.",
              "", "| metric | full | pruned | pruned / full |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary_rows(report)]
    if report.get("search"):
        lines += _trial_table(report)
    fid = _dict(report.get("fidelity"))
    if fid.get("per_class"):
        none = _output(report).get("none")
        counted = (f"ground truth of other classes counted as {none}" if none
                   else "ground truth of other classes not scored" if fid.get("mode") == "restricted"
                   else "each category scored on its own")
        lines += ["", f"## Per-class IoU vs ground truth ({fid.get('mode') or 'kept classes'}; {counted}; "
                  "label 255 ignored)", "", "| class | full | pruned |", "|---|---:|---:|"]
        lines += [f"| {name} | {_pct(_dict(v).get('full'))} | {_pct(_dict(v).get('pruned'))} |"
                  for name, v in fid["per_class"].items()]
    lines += _engines_section(report)
    channels = _dict(report.get("channels"))
    if channels.get("per_group"):
        lines += ["", "## Channel groups", "",
                  "Output loss: the largest share of a consumer's output energy (calibration data) the cut still loses "
                  "after compensation; groups above the fragile threshold are where the cut changes most.", "",
                  "| group | producers | channels | kept | padded | output loss | note |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        for g in channels["per_group"]:
            producers = ", ".join(g["producers"][:2]) + (" ..." if len(g["producers"]) > 2 else "")
            loss = "" if g.get("output_loss") is None else f"{100 * g['output_loss']:.2f}%"
            lines.append(f"| {g['group']} | {producers} | {g['size']} | {g['kept']} | {g['padded']} | {loss} | "
                         f"{g['reason']} |")
    if report.get("settings") is not None:
        lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomic(out_dir / "report.json", text.encode())
    write_atomic(out_dir / "report.md", markdown(report).encode())
