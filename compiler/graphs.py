"""Writing an onnx-graphsurgeon graph back as a model that keeps its source's identity.

onnx-graphsurgeon's export writes its own IR version, opset list and producer and drops metadata; every stage that
edits a graph (folding at load, choosing a head, the surgery, the output head) needs the source's instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
import onnx_graphsurgeon as gs


def export_like(graph: gs.Graph, source: onnx.ModelProto, metadata: Mapping[str, str] | None = None,
                ir_version: int | None = None) -> onnx.ModelProto:
    """`graph` (cleaned up and sorted) as a model with `source`'s IR version (or `ir_version`), opsets, producer and
    metadata, the latter updated by `metadata`."""
    graph.cleanup().toposort()
    proto = gs.export_onnx(graph, do_type_check=False)
    proto.ir_version = ir_version or source.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(source.opset_import)
    proto.producer_name, proto.producer_version = source.producer_name, source.producer_version
    onnx.helper.set_model_props(proto, {p.key: p.value for p in source.metadata_props} | dict(metadata or {}))
    return proto
