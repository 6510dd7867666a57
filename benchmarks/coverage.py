"""How much of each model the channel analysis can cut: the corpus models and the test fixture architectures.

    python benchmarks/coverage.py             # writes benchmarks/results/coverage.{json,md}

For every model of ../shared/corpus/corpus.json (loaded as disasm-compile loads it, with its head and flags) and every
fixture architecture of tests/architectures.py: the share of conv MACs that lie in cuttable channel groups (a conv
counts when its output channels or its input channels belong to a group the analysis can cut), and every group kept
whole with its reason and the conv MACs behind it. The class conv counts as cuttable when its rows can be sliced.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx

from disasm.compiler.channels import ChannelAnalysis, analyse
from disasm.compiler.cost import conv_macs
from disasm.compiler.files import write_atomic
from disasm.compiler.load import Model, load_model

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
sys.path.insert(0, str(ROOT / "benchmarks"))
from corpus_models import corpus_entries, load_corpus_model  # noqa: E402
from surgery import FIXTURES, export  # noqa: E402


def coverage(proto: onnx.ModelProto, analysis: ChannelAnalysis, input_shape: tuple[int, ...]) -> dict:
    """Share of conv MACs in cuttable groups, and the whole groups by reason (with the MACs they hold)."""
    macs = conv_macs(proto, input_shape)
    by_name = {n.name or n.output[0]: n for n in proto.graph.node}
    total = cuttable = outputs_cuttable = 0
    blocked_macs: dict[int, int] = defaultdict(int)
    for name, count in macs.items():
        node = by_name[name]
        groups = set()
        for tensor in (node.input[0], node.output[0]):
            lay = analysis.tensors.get(tensor)
            if lay is not None:
                groups |= {s.group for s in lay.segments}
        out = analysis.tensors.get(node.output[0])
        total += count
        free = [g for g in groups if analysis.groups[g].prunable]
        if out is not None and all(analysis.groups[s.group].prunable for s in out.segments):
            outputs_cuttable += count
        if free:
            cuttable += count
        else:
            for g in groups:
                blocked_macs[g] += count
    reasons: dict[str, dict] = {}
    for g in analysis.groups:
        if g.blocked and g.producers:
            entry = reasons.setdefault(g.blocked[0], {"groups": 0, "channels": 0, "macs": 0})
            entry["groups"] += 1
            entry["channels"] += g.size
            entry["macs"] += blocked_macs.get(g.id, 0)
    groups = [g for g in analysis.groups if g.producers]
    return {"conv_macs": total, "cuttable_share": cuttable / total if total else 0.0,
            "output_cuttable_share": outputs_cuttable / total if total else 0.0,
            "groups": len(groups), "cuttable_groups": sum(g.prunable for g in groups),
            "class_conv_sliceable": analysis.class_group is not None and analysis.groups[analysis.class_group].prunable,
            "whole": dict(sorted(reasons.items(), key=lambda kv: -kv[1]["macs"]))}


def model_input_shape(model: Model) -> tuple[int, ...]:
    dims = list(model.input_shape)
    dims[0] = 1
    size = model.image_size or (512, 512)
    spatial = (1, 2) if model.preprocessing.layout == "nhwc" else (2, 3)
    for axis, value in zip(spatial, size):
        dims[axis] = dims[axis] or value
    return tuple(dims)


def run(out_dir: Path) -> dict:
    rows = []
    for entry in corpus_entries(CORPUS):
        model = load_corpus_model(CORPUS, entry)
        row = coverage(model.proto, analyse(model.proto), model_input_shape(model))
        rows.append({"model": entry["name"], "kind": "corpus", **row})
        print(f"{entry['name']}: {100 * row['cuttable_share']:.1f}% of conv MACs cuttable", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (factory, exporter) in FIXTURES.items():
            proto = export(factory(), Path(tmp), f"m{len(rows)}", 64, exporter)
            path = Path(tmp) / f"m{len(rows)}.onnx"
            model = load_model(path)
            row = coverage(model.proto, analyse(model.proto), model_input_shape(model))
            rows.append({"model": name, "kind": "fixture", **row})
            del proto
    result = {"rows": rows}
    write_atomic(out_dir / "coverage.json", (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(out_dir / "coverage.md", markdown(rows).encode())
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["# Channel-analysis coverage", "",
             "Share of conv MACs in channel groups the analysis can cut (a conv counts when its input or output "
             "channels can be cut; the stricter column counts only convs whose own output channels can be cut), per "
             "model as disasm-compile loads it. Generated by `benchmarks/coverage.py`.", "",
             "| model | kind | conv MACs | cuttable (input or output) | cuttable (output) | groups cuttable | "
             "class conv sliceable |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['kind']} | {r['conv_macs'] / 1e6:.1f} M | {100 * r['cuttable_share']:.1f}% | "
                     f"{100 * r['output_cuttable_share']:.1f}% | "
                     f"{r['cuttable_groups']}/{r['groups']} | {'yes' if r['class_conv_sliceable'] else 'no'} |")
    lines += ["", "## Groups kept whole, by reason", ""]
    for r in rows:
        if not r["whole"]:
            continue
        lines += [f"**{r['model']}**", "", "| reason | groups | channels | conv MACs held |", "|---|---:|---:|---:|"]
        lines += [f"| {reason} | {v['groups']} | {v['channels']} | {v['macs'] / 1e6:.2f} M |"
                  for reason, v in r["whole"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
