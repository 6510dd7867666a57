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
    """Non-trivial BatchNorm statistics and affine parameters (and PReLU slopes), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        elif isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
    return model.eval()


def export(model: nn.Module, path, size: int = 32, opset: int = 17, metadata: dict[str, str] | None = None,
           exporter: str = "legacy", keep_batchnorm: bool = False, dynamic_batch: bool = True) -> None:
    """Export to ONNX, plus disasm metadata when given.

    exporter: "legacy" (TorchScript, `dynamo=False`, at `opset`, dynamic batch, constants folded) or "dynamo" (the
    default exporter at its default opset 18, static shapes, weights in a side `.data` file). keep_batchnorm (legacy
    only): export with training=PRESERVE and without constant folding, so BatchNormalization nodes stay in the graph
    in eval semantics. dynamic_batch (legacy only): a symbolic batch axis; without it the exporter folds the
    run-time size computations into constants. A model with `layout = "nhwc"` takes [N, H, W, 3] images.
    """
    import onnx

    shape = (1, size, size, 3) if getattr(model, "layout", "nchw") == "nhwc" else (1, 3, size, size)
    args = (torch.randn(*shape),)
    if exporter == "legacy":
        extra = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False) if keep_batchnorm else {}
        torch.onnx.export(model, args, str(path), input_names=["image"], output_names=["logits"], opset_version=opset,
                          dynamo=False, **extra,
                          dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}} if dynamic_batch else None)
    elif exporter == "dynamo":
        torch.onnx.export(model, args, str(path), input_names=["image"], output_names=["logits"], dynamo=True,
                          verbose=False)
    else:
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
    if metadata:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Reference segmentation architectures (torchvision-shaped, tiny widths). Each takes `classes` and returns logits at the
# input resolution. Diagrams name the couplings the tests assert.
# ---------------------------------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (stride or dilation), 1x1 expand, + identity or 1x1 projection shortcut.

        x ─► 1x1 ─► 3x3 ─► 1x1 ─┐
        └──────► [1x1 proj] ────┴► Add ─► ReLU     (the expand conv and the shortcut share a channel group)
    """

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.reduce, self.conv = conv_bn(cin, width, 1), conv_bn(width, width, 3, stride, dilation)
        self.expand = conv_bn(width, cout, 1)
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = self.expand(F.relu(self.conv(F.relu(self.reduce(x)))))
        return F.relu(y + self.short(x))


# (bottleneck width, output channels, blocks, stride, dilation) per stage
SMALL_RESNET = ((4, 16, 2, 1, 1), (8, 24, 2, 2, 1), (8, 32, 2, 1, 2))
RESNET50 = ((64, 256, 3, 1, 1), (128, 512, 4, 2, 1), (256, 1024, 6, 1, 2), (512, 2048, 3, 1, 4))


class ResNetBackbone(nn.Module):
    """Stem (kxk s2 + maxpool), then bottleneck stages; later stages are dilated instead of strided (output stride 8).
    Returns (stride-4 features, last features). The defaults are tiny; RESNET50 with stem=64, stem_kernel=7 gives the
    real ResNet-50 widths."""

    def __init__(self, stem: int = 8, stages: tuple[tuple[int, int, int, int, int], ...] = SMALL_RESNET,
                 stem_kernel: int = 3):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem, stem_kernel, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], stem
        for width, cout, blocks, stride, dilation in stages:
            layers.append(nn.Sequential(*[Bottleneck(cin if i == 0 else cout, width, cout, stride if i == 0 else 1,
                                                     dilation) for i in range(blocks)]))
            cin = cout
        self.layers = nn.ModuleList(layers)
        self.channels = cin

    def forward(self, x):
        low = self.layers[0](self.stem(x))
        h = low
        for layer in self.layers[1:]:
            h = layer(h)
        return low, h


class ASPP(nn.Module):
    """1x1 branch, dilated 3x3 branches, image pooling branch (pool -> 1x1 -> upsample), concat, 1x1 projection."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (2, 3)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(cin, cout, 1)] + [conv_bn(cin, cout, 3, dilation=r) for r in rates])
        self.pooling = conv_bn(cin, cout, 1)
        self.project = conv_bn(cout * (len(rates) + 2), cout, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        outs = [F.relu(b(x)) for b in self.branches]
        pooled = F.relu(self.pooling(F.adaptive_avg_pool2d(x, 1)))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.dropout(F.relu(self.project(torch.cat(outs, 1))))


class DeepLabV3(nn.Module):
    """ResNet-bottleneck backbone + ASPP + 3x3 conv + 1x1 classifier, upsampled to the input size."""

    def __init__(self, classes: int = 5, backbone: ResNetBackbone | None = None, aspp: int = 16,
                 rates: tuple[int, ...] = (2, 3)):
        super().__init__()
        self.backbone = backbone or ResNetBackbone()
        self.aspp = ASPP(self.backbone.channels, aspp, rates)
        self.head = nn.Sequential(conv_bn(aspp, aspp), nn.ReLU())
        self.classifier = nn.Conv2d(aspp, classes, 1)

    def forward(self, x):
        _, h = self.backbone(x)
        y = self.classifier(self.head(self.aspp(h)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3_resnet50_sized(classes: int = 21) -> DeepLabV3:
    """torchvision's deeplabv3_resnet50 at full widths (64..2048, ASPP 256, rates 12/24/36): about 40M parameters."""
    return DeepLabV3(classes, ResNetBackbone(64, RESNET50, 7), aspp=256, rates=(12, 24, 36))


class FCN(nn.Module):
    """ResNet-bottleneck backbone + FCNHead (3x3 conv, BN, ReLU, dropout, 1x1 classifier)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.backbone = ResNetBackbone()
        self.head = nn.Sequential(conv_bn(self.backbone.channels, 16), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Conv2d(16, classes, 1))

    def forward(self, x):
        _, h = self.backbone(x)
        return F.interpolate(self.head(h), size=x.shape[-2:], mode="bilinear", align_corners=False)


class SqueezeExcite(nn.Module):
    """MobileNetV3 SE: global pool, 1x1 reduce + ReLU, 1x1 excite + hardsigmoid, scale the input per channel."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.reduce, self.excite = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.excite(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise kxk (stride), optional SE, activation, 1x1 project, residual if shapes
    allow. The expand conv, the depthwise conv and the SE excite conv share one channel group."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int = 1, se: bool = False, act: str = "hardswish"):
        super().__init__()
        self.act = F.hardswish if act == "hardswish" else F.relu
        self.expand = conv_bn(cin, expand, 1) if expand != cin else None
        self.dw = conv_bn(expand, expand, 3, stride, groups=expand)
        self.se = SqueezeExcite(expand, max(4, expand // 4)) if se else None
        self.project = conv_bn(expand, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.act(self.expand(x)) if self.expand is not None else x
        y = self.act(self.dw(y))
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class MobileNetV3Backbone(nn.Module):
    """Returns (stride-4 low-level features, stride-8 high-level features)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.Hardswish())
        self.low = nn.Sequential(InvertedResidual(8, 8, 8, se=True, act="relu"),
                                 InvertedResidual(8, 24, 12, 2, act="relu"), InvertedResidual(12, 36, 12, act="relu"))
        self.high = nn.Sequential(InvertedResidual(12, 36, 16, 2, se=True), InvertedResidual(16, 48, 16, se=True))

    def forward(self, x):
        low = self.low(self.stem(x))
        return low, self.high(low)


class LRASPP(nn.Module):
    """Lite R-ASPP: y = relu(bn(1x1(x))) * sigmoid(1x1(avgpool(x))), upsampled; logits = low_cls(low) + high_cls(y).
    The two classifier convs share the class group."""

    def __init__(self, classes: int = 5, inter: int = 16):
        super().__init__()
        self.backbone = MobileNetV3Backbone()
        self.cbr = nn.Sequential(conv_bn(16, inter, 1), nn.ReLU())
        self.scale = nn.Conv2d(16, inter, 1, bias=False)
        self.low_classifier, self.high_classifier = nn.Conv2d(12, classes, 1), nn.Conv2d(inter, classes, 1)

    def forward(self, x):
        low, high = self.backbone(x)
        y = self.cbr(high) * torch.sigmoid(self.scale(F.adaptive_avg_pool2d(high, 1)))
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.low_classifier(low) + self.high_classifier(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class UNet(nn.Module):
    """Two-level U-Net: double convs (ReLU6, exported as Clip), max-pool down, ConvTranspose up, concat skips, PReLU in
    the decoder.

        e1 ──────────────────────────────► cat ─► d1 ─► head
        └► pool ─► e2 ───────────► cat ─► d2 ─► up1 ┘
                   └► pool ─► mid ─► up2 ┘
    """

    def __init__(self, classes: int = 5):
        super().__init__()

        def double(cin: int, cout: int, act: type[nn.Module]) -> nn.Sequential:
            return nn.Sequential(conv_bn(cin, cout), act(), conv_bn(cout, cout), act())

        self.e1, self.e2, self.mid = double(3, 8, nn.ReLU6), double(8, 16, nn.ReLU6), double(16, 24, nn.ReLU6)
        self.up2, self.up1 = nn.ConvTranspose2d(24, 16, 2, 2), nn.ConvTranspose2d(16, 8, 2, 2)
        self.d2 = nn.Sequential(conv_bn(32, 16), nn.PReLU(16))
        self.d1 = nn.Sequential(conv_bn(16, 8), nn.PReLU(8))
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.up2(m), e2], 1))
        return self.head(self.d1(torch.cat([self.up1(d2), e1], 1)))


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return F.relu(x + self.b(F.relu(self.a(x))))


class DDRNet(nn.Module):
    """Dual-resolution net: a high-res branch (stride 4) and a low-res branch (stride 8) with bilateral fusion after
    each stage. low += bn(3x3 s2 conv(high)); high += upsample(bn(1x1 conv(low))). Each fusion add unifies a branch
    with the other branch's projection, so each branch's residual stream is one group."""

    def __init__(self, classes: int = 5, high: int = 8, low: int = 16, stages: int = 2):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, high, 3, 2), nn.ReLU(), conv_bn(high, high, 3, 2), nn.ReLU())
        self.to_low = nn.Sequential(conv_bn(high, low, 3, 2), nn.ReLU())
        self.high_blocks = nn.ModuleList([BasicBlock(high) for _ in range(stages)])
        self.low_blocks = nn.ModuleList([BasicBlock(low) for _ in range(stages)])
        self.down = nn.ModuleList([conv_bn(high, low, 3, 2) for _ in range(stages)])
        self.compress = nn.ModuleList([conv_bn(low, high, 1) for _ in range(stages)])
        self.final = conv_bn(low, high, 1)
        self.head = nn.Sequential(conv_bn(high, 16), nn.ReLU(), nn.Conv2d(16, classes, 1))

    def forward(self, x):
        h = self.stem(x)
        lo = self.to_low(h)
        for hb, lb, down, compress in zip(self.high_blocks, self.low_blocks, self.down, self.compress):
            h, lo = hb(h), lb(lo)
            h, lo = (h + F.interpolate(compress(lo), size=h.shape[-2:], mode="bilinear", align_corners=False),
                     lo + down(h))
            h, lo = F.relu(h), F.relu(lo)
        h = h + F.interpolate(self.final(lo), size=h.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(self.head(h), size=x.shape[-2:], mode="bilinear", align_corners=False)


class SplitNet(nn.Module):
    """Channel split into two branches (torch.chunk: Split), a static channel Slice, ReLU6 and PReLU.

        stem ─► Split ─► a ─► conv ─┐
                      └► b ─────────┴► Concat ─► conv ─► x[:, :8] ─► head
    """

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.ReLU6())
        self.branch = nn.Sequential(conv_bn(8, 8), nn.PReLU(8))
        self.fuse = nn.Sequential(conv_bn(16, 12), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        y = self.fuse(torch.cat([self.branch(a), b], 1))
        return F.interpolate(self.head(y[:, :8]), size=x.shape[-2:], mode="bilinear", align_corners=False)


class NHWC(nn.Module):
    """tf2onnx-style layout: NHWC image in, Transpose to NCHW, the body, Transpose back to NHWC class maps."""

    layout = "nhwc"

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SigmoidHead(nn.Module):
    """Multi-label output: per-class probabilities Sigmoid(logits). Slicing classes is exact (sigmoid is per class)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.sigmoid(self.body(x))


class SoftmaxHead(nn.Module):
    """Probabilities Softmax(logits) over the class axis: the class group cannot be sliced exactly."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.softmax(self.body(x), dim=1)


class NonLocal(nn.Module):
    """A non-local (self-attention) block reshapes channels into a matrix and multiplies: the energies q^T q sum over
    the query channels, so that group stays whole; the value path ([N,C,HW] x [HW,HW]) keeps its channels where the
    reshapes are constant (the legacy exporter reads them from Shape at run time, which keeps them whole too)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.ReLU())
        self.query, self.value = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.out = conv_bn(8, 8, 1)
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        h = self.stem(x)
        n, c, hh, ww = h.shape
        q = self.query(h).flatten(2)                       # [N, C, HW]
        attn = torch.softmax(q.transpose(1, 2) @ q, -1)    # [N, HW, HW]
        v = (self.value(h).flatten(2) @ attn).reshape(n, c, hh, ww)
        y = F.relu(h + self.out(v))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def opset9_model(classes: int = 4, size: int = 16, seed: int = 0):
    """A small net built node by node at opset 9, the way old converters write it: BatchNormalization nodes, Clip
    with min/max attributes (ReLU6), Split with a `split` attribute, Slice with starts/ends attributes, Upsample with a
    scales input, and PRelu.

        conv1 ─► BN ─► Clip = a ─► Split ─► [0:4] ─► conv2 ─► Relu ─┐
                                         └► [4:8] ──────────────────┴► Concat ─► Slice[:6] ─► conv3 s2 ─► Upsample x2
        Add(Upsample, a) ─► PRelu ─► head
    conv1 and conv3 share one group through the Add.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.normal(size=shape) * scale).astype(np.float32)

    consts = {"w1": w(8, 3, 3, 3), "b1": w(8), "scale": w(8) + 1, "shift": w(8), "mean": w(8),
              "var": (rng.random(8) + 0.5).astype(np.float32), "w2": w(4, 4, 3, 3), "b2": w(4), "w3": w(8, 6, 3, 3),
              "b3": w(8), "up": np.array([1, 1, 2, 2], np.float32), "wh": w(classes, 8, 1, 1), "bh": w(classes),
              "slope": (rng.random((8, 1, 1)) * 0.5).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["n1"], name="bn1"),
        helper.make_node("Clip", ["n1"], ["a"], name="relu6", min=0.0, max=6.0),
        helper.make_node("Split", ["a"], ["s0", "s1"], name="split", axis=1, split=[4, 4]),
        helper.make_node("Conv", ["s0", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Concat", ["r2", "s1"], ["cat"], name="concat", axis=1),
        helper.make_node("Slice", ["cat"], ["sl"], name="slice", starts=[0], ends=[6], axes=[1]),
        helper.make_node("Conv", ["sl", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Upsample", ["c3", "up"], ["u"], name="upsample", mode="nearest"),
        helper.make_node("Add", ["u", "a"], ["sum"], name="add"),
        helper.make_node("PRelu", ["sum", "slope"], ["p"], name="prelu"),
        helper.make_node("Conv", ["p", "wh", "bh"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "opset9", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", classes, size, size])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)
    onnx.checker.check_model(model, full_check=True)
    return model


def dynamic_slice_model(classes: int = 4, channels: int = 8):
    """A Slice on channels whose end is read from the image height at run time (a dynamic dim): how many channels it
    keeps is unknown until then, so the analysis must keep the sliced group whole.

        image ─► conv ─► Slice(channels [0 : height]) ─► head
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"w": rng.normal(size=(channels, 3, 3, 3)).astype(np.float32), "zero": np.array([0], np.int64),
              "two": np.array(2, np.int64), "axis0": np.array([0], np.int64), "channel_axis": np.array([1], np.int64),
              "wh": rng.normal(size=(classes, channels, 1, 1)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["features"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["image"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "two"], ["height"], name="height"),
        helper.make_node("Unsqueeze", ["height", "axis0"], ["end"], name="end"),
        helper.make_node("Slice", ["features", "zero", "end", "channel_axis"], ["sliced"], name="slice"),
        helper.make_node("Conv", ["sliced", "wh"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_slice", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", classes, "h", "w"])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model, full_check=True)
    return model
