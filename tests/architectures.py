"""Segmentation architectures for tests, in plain torch (torchvision cannot be installed beside torch 2.13 here).

Each factory returns a small eval-mode module with non-trivial BatchNorm statistics, so folded and unfolded exports
both carry real per-channel constants. Widths are tiny: tests run on 2 CPU cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dilation * (k - 1) // 2, dilation, groups, bias=False),
                         nn.BatchNorm2d(cout))


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.short(x))


class SEBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, squeeze-excite, hardswish, 1x1 project, residual add."""

    def __init__(self, c: int, expand: int):
        super().__init__()
        self.expand, self.dw = conv_bn(c, expand, 1), conv_bn(expand, expand, 3, groups=expand)
        self.reduce, self.excite = nn.Conv2d(expand, expand // 4, 1), nn.Conv2d(expand // 4, expand, 1)
        self.project = conv_bn(expand, c, 1)

    def forward(self, x):
        y = F.hardswish(self.dw(F.hardswish(self.expand(x))))
        y = y * F.hardsigmoid(self.excite(F.relu(self.reduce(F.adaptive_avg_pool2d(y, 1)))))
        return x + self.project(y)


class MiniDeepLab(nn.Module):
    """Residual encoder, SE stage, ASPP with dilated branches + global pooling + concat, decoder skip by concat."""

    def __init__(self, classes: int = 5, size: int = 32):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.ReLU())
        self.low = Residual(8, 16, 2)
        self.high = nn.Sequential(Residual(16, 24, 2), SEBlock(24, 48))
        self.branches = nn.ModuleList([conv_bn(24, 16, 1), conv_bn(24, 16, 3, dilation=2)])
        self.pool = conv_bn(24, 16, 1)
        self.pooled = size // 8
        self.fuse = conv_bn(48, 16, 1)
        self.skip = conv_bn(16, 8, 1)
        self.decode = conv_bn(24, 16)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        low = self.low(self.stem(x))
        h = self.high(low)
        outs = [F.relu(b(h)) for b in self.branches]
        outs.append(F.interpolate(F.relu(self.pool(F.adaptive_avg_pool2d(h, 1))), scale_factor=self.pooled))
        h = F.interpolate(F.relu(self.fuse(torch.cat(outs, 1))), scale_factor=2, mode="bilinear", align_corners=False)
        y = self.head(F.relu(self.decode(torch.cat([h, F.relu(self.skip(low))], 1))))
        return F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False)


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def export(model: nn.Module, path, size: int = 32, opset: int = 17, metadata: dict[str, str] | None = None) -> None:
    """Legacy (TorchScript) exporter with folded constants, plus disasm metadata when given."""
    import onnx

    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["image"], output_names=["logits"],
                      opset_version=opset, dynamo=False, dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}})
    if metadata:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(path))
