"""Input moments of the convs that read cut channels: the statistics a least-squares refit of each consumer needs.

For a consumer conv with input x (C channels) and a k x k kernel, every output pixel is W z + b, where z is the
unfolded input patch (C*k*k values, zero padding included exactly as the conv sees it). Accumulating
S = sum over pixels and images of [z; 1][z; 1]^T gives everything the refit needs: means, second moments, and the
cross terms with the full model's own output (which is linear in z). S is a sum, so it shards, caches and all-reduces
like the attribution scores.

Memory bound: S has (C*k*k + 1)^2 entries. Consumers with C*k*k above `max_features` (default 2048, 32 MB in float64)
get no moments; compensation then falls back to the channel means for them and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from disasm.compiler.channels import ChannelAnalysis, conv_spec

MAX_FEATURES = 2048


@dataclass(frozen=True)
class Consumer:
    """A plain (group=1) 2-D Conv that reads a cuttable tensor, with what unfolding its input needs."""

    node: int              # index in the graph's node list, as in the channel analysis edits
    name: str
    tensor: str            # its input tensor
    channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (explicit; auto_pad is resolved per batch)
    auto_pad: str

    @property
    def features(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]


def find_consumers(model: onnx.ModelProto, analysis: ChannelAnalysis, max_features: int = MAX_FEATURES) -> list[Consumer]:
    """The plain 2-D convs whose input channels a cut can remove, small enough for exact patch moments. Grouped
    convs and ConvTranspose get none: the refit models a dense conv over its whole input patch."""
    graph = gs.import_onnx(model)  # weights are read lazily, only the consumers'
    consumers = []
    for edit in analysis.edits:
        node = graph.nodes[edit.node]
        if edit.kind != "consume" or node.op != "Conv":
            continue
        spec = conv_spec(node)
        if spec is None or spec.group != 1 or len(spec.kernel) != 2:
            continue
        pads = spec.pads
        consumer = Consumer(edit.node, node.name, node.inputs[0].name, spec.in_channels, spec.kernel, spec.strides,
                            spec.dilations, (pads[0], pads[1], pads[2], pads[3]), spec.auto_pad)
        if consumer.features <= max_features:
            consumers.append(consumer)
    return consumers


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small, large = total // 2, total - total // 2
    return (small, large) if upper else (large, small)


def patches(x: torch.Tensor, c: Consumer) -> torch.Tensor:
    """[B * positions, C*k*k + 1] unfolded input patches of one consumer, with a trailing 1 for the bias."""
    z = _unfolded(x, c)                                                  # [B, C*k*k, P], channel-major like W
    z = z.transpose(1, 2).reshape(-1, z.shape[1])
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], dim=1)


def _unfolded(x: torch.Tensor, c: Consumer) -> torch.Tensor:
    """[B, C*k*k, positions] input patches of one consumer, channel-major like W (as `patches`, without the bias
    column and without the transpose). A pointwise consumer (1x1, stride 1, no padding) reads its input as it is."""
    top, left, bottom, right = c.pads
    if c.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        upper = c.auto_pad == "SAME_UPPER"
        top, bottom = _same_pads(x.shape[2], c.kernel[0], c.stride[0], c.dilation[0], upper)
        left, right = _same_pads(x.shape[3], c.kernel[1], c.stride[1], c.dilation[1], upper)
    elif c.auto_pad == "VALID":
        top = left = bottom = right = 0
    if c.kernel == (1, 1) and c.stride == (1, 1) and (top, left, bottom, right) == (0, 0, 0, 0):
        return x.flatten(2)
    return F.unfold(F.pad(x, (left, right, top, bottom)), c.kernel, dilation=c.dilation, stride=c.stride)


def accumulate(values: dict[str, torch.Tensor], consumers: list[Consumer]) -> dict[int, np.ndarray]:
    """Per consumer node index: the sum of [z;1][z;1]^T over this batch's output pixels (its last diagonal entry is
    the pixel count).

    float64 throughout: these sums run over every pixel of every image, where float32 would lose ~1e-4 already. The
    input is converted once (before unfolding, so the k*k-times larger patch matrix is written in float64 directly);
    the [Z 1]^T [Z 1] blocks are Z^T Z (one product over all the batch's positions, written in place), the column sums
    of Z, and the count: no copy of Z with a column of ones. Equal to summing the outer products of `patches`
    up to float64 rounding."""
    out = {}
    with torch.no_grad():
        for c in consumers:
            z = _unfolded(values[c.tensor].detach().double(), c)                       # [B, F, P]
            features = z.shape[1]
            z = z.transpose(0, 1).reshape(features, -1)  # [F, B*P]: one long product (a view for one image)
            s = torch.empty(features + 1, features + 1, dtype=torch.float64, device=z.device)
            torch.mm(z, z.T, out=s[:features, :features])
            sums = z.sum(dim=1)
            s[:features, features] = sums
            s[features, :features] = sums
            s[features, features] = z.shape[1]
            out[c.node] = s.cpu().numpy()
    return out
