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


def _padding(x: torch.Tensor, c: Consumer) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) zero padding the consumer applies to `x` (auto_pad resolved for its size)."""
    top, left, bottom, right = c.pads
    if c.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        upper = c.auto_pad == "SAME_UPPER"
        top, bottom = _same_pads(x.shape[2], c.kernel[0], c.stride[0], c.dilation[0], upper)
        left, right = _same_pads(x.shape[3], c.kernel[1], c.stride[1], c.dilation[1], upper)
    elif c.auto_pad == "VALID":
        top = left = bottom = right = 0
    return top, left, bottom, right


def _unfolded(x: torch.Tensor, c: Consumer) -> torch.Tensor:
    """[B, C*k*k, positions] input patches of one consumer, channel-major like W (as `patches`, without the bias
    column and without the transpose). A pointwise consumer (1x1, stride 1, no padding) reads its input as it is."""
    top, left, bottom, right = _padding(x, c)
    if c.kernel == (1, 1) and c.stride == (1, 1) and (top, left, bottom, right) == (0, 0, 0, 0):
        return x.flatten(2)
    return F.unfold(F.pad(x, (left, right, top, bottom)), c.kernel, dilation=c.dilation, stride=c.stride)


def _channels_by_positions(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [C, B*h*w] (a copy unless it is already laid out so)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _shifted_gram(x: torch.Tensor, c: Consumer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Z^T Z [F, F], Z's column sums [F], positions) of a stride-1 consumer's unfolded patches Z, without unfolding.

    Feature (ch, i, j) of the patch at output position o is xp[ch, o + (i, j) * dilation], xp the padded input. So the
    block of Z^T Z between kernel offsets a and b = a + delta is the sum of xp[:, q] xp[:, q + delta * dilation]^T over
    q in the output grid moved by a: for one delta, the blocks of neighbouring offsets differ by a strip of the grid
    entering and one leaving. Each delta's first block is one product over the whole grid, every other block of that
    delta is its neighbour's plus and minus two strip products, and the blocks of -delta are transposes: about 13
    whole-grid products for a 3x3 kernel instead of 81, the same float64 sums in another order."""
    top, left, bottom, right = _padding(x, c)
    xp = F.pad(x, (left, right, top, bottom))
    (kh, kw), (dh, dw) = c.kernel, c.dilation
    height, width = xp.shape[2] - (kh - 1) * dh, xp.shape[3] - (kw - 1) * dw  # the output grid
    channels = x.shape[1]
    blocks = torch.empty(channels, kh, kw, channels, kh, kw, dtype=x.dtype, device=x.device)

    def product(i: int, j: int, di: int, dj: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """Sum over grid rows [r0, r1) and columns [c0, c1) of xp[:, q + a] xp[:, q + a + delta]^T, a = (i, j)."""
        (r0, r1), (c0, c1) = rows, cols
        first = xp[:, :, i * dh + r0:i * dh + r1, j * dw + c0:j * dw + c1]
        second = xp[:, :, (i + di) * dh + r0:(i + di) * dh + r1, (j + dj) * dw + c0:(j + dj) * dw + c1]
        return _channels_by_positions(first) @ _channels_by_positions(second).T

    def step(block: torch.Tensor, i: int, j: int, di: int, dj: int, down: bool) -> torch.Tensor:
        """The block of offset a moved one step (down: i + 1, else j + 1), from the block of a."""
        if down:  # the grid moves dh rows: rows [height, height + dh) of a's frame enter, [0, dh) leave
            enter = product(i, j, di, dj, (height, height + dh), (0, width)) if dh < height else None
            leave = product(i, j, di, dj, (0, dh), (0, width)) if dh < height else None
        else:
            enter = product(i, j, di, dj, (0, height), (width, width + dw)) if dw < width else None
            leave = product(i, j, di, dj, (0, height), (0, dw)) if dw < width else None
        if enter is None:  # no overlap between the two grids: a whole product
            return product(i + down, j + (not down), di, dj, (0, height), (0, width))
        return block + enter - leave

    for di in range(0, kh):
        for dj in range(-(kw - 1), kw):
            if di == 0 and dj < 0:
                continue  # the transpose of (0, -dj)
            rows = range(0, kh - di)
            cols = range(max(0, -dj), min(kw, kw - dj))
            row_start = None
            for i in rows:
                if row_start is None:
                    row_start = product(i, cols[0], di, dj, (0, height), (0, width))
                else:
                    row_start = step(row_start, i - 1, cols[0], di, dj, down=True)
                block = row_start
                for j in cols:
                    if j != cols[0]:
                        block = step(block, i, j - 1, di, dj, down=False)
                    blocks[:, i, j, :, i + di, j + dj] = block
                    blocks[:, i + di, j + dj, :, i, j] = block.T
    features = channels * kh * kw
    sums = torch.stack([torch.stack([xp[:, :, i * dh:i * dh + height, j * dw:j * dw + width].sum(dim=(0, 2, 3))
                                     for j in range(kw)], dim=1) for i in range(kh)], dim=1)      # [C, kh, kw]
    return blocks.reshape(features, features), sums.reshape(features), x.shape[0] * height * width


def _gram(x: torch.Tensor, c: Consumer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Z^T Z, Z's column sums, positions) of the consumer's unfolded input patches Z (x in float64)."""
    if c.stride == (1, 1) and c.kernel != (1, 1):
        return _shifted_gram(x, c)
    z = _unfolded(x, c)                                                                   # [B, F, P]
    z = z.transpose(0, 1).reshape(z.shape[1], -1)  # [F, B*P]: one long product (a view for one image)
    return z @ z.T, z.sum(dim=1), z.shape[1]


def accumulate(values: dict[str, torch.Tensor], consumers: list[Consumer]) -> dict[int, np.ndarray]:
    """Per consumer node index: the sum of [z;1][z;1]^T over this batch's output pixels (its last diagonal entry is
    the pixel count).

    float64 throughout: these sums run over every pixel of every image, where float32 would lose ~1e-4 already. The
    input is converted once (before unfolding, so the k*k-times larger patch matrix is written in float64 directly);
    the [Z 1]^T [Z 1] blocks are Z^T Z, the column sums of Z and the count: no copy of Z with a column of ones.
    Stride-1 kxk consumers get Z^T Z without unfolding (_shifted_gram), the others one product over all the batch's
    positions. Equal to summing the outer products of `patches` up to float64 rounding."""
    out = {}
    with torch.no_grad():
        for c in consumers:
            gram, sums, positions = _gram(values[c.tensor].detach().double(), c)
            features = len(sums)
            s = torch.empty(features + 1, features + 1, dtype=torch.float64, device=gram.device)
            s[:features, :features] = gram
            s[:features, features] = sums
            s[features, :features] = sums
            s[features, features] = positions
            out[c.node] = s.cpu().numpy()
    return out
