"""Train the shipped example segmentation model on procedural scenes and export it as ONNX.

    python examples/train.py            # writes examples/shapes_seg.onnx and examples/data/{calib,eval}

Deterministic (fixed seeds, deterministic kernels, 2 threads) and sized for 2 CPU cores in well under 30 minutes.
The architecture is a compact DeepLabV3+-style encoder-decoder, the kind people deploy on edge devices:
residual blocks with BatchNorm, an inverted-residual stage with depthwise convs, squeeze-excite and hardswish,
an ASPP head (parallel dilated branches + a global-pooling branch, concatenated), a decoder skip connection by
concat, and bilinear upsampling back to the input size.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import scenes

HERE = Path(__file__).resolve().parent
MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics in pixel units, as most deployed models use
STD = (58.395, 57.12, 57.375)
TRAIN_SEED_BASE, CALIB_SEED_BASE, EVAL_SEED_BASE = 0, 10_000_000, 20_000_000


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False), nn.BatchNorm2d(cout))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, reduced, 1), nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, dilation: int = 1):
        super().__init__()
        self.expand = conv_bn(cin, expand, 1)
        self.depthwise = conv_bn(expand, expand, 3, stride, dilation, groups=expand)
        self.se = SqueezeExcite(expand, expand // 4)
        self.project = conv_bn(expand, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(F.hardswish(self.depthwise(F.hardswish(self.expand(x))))))
        return x + y if self.residual else y


class ASPP(nn.Module):
    def __init__(self, cin: int, width: int, dilations: tuple[int, ...], pooled_size: int):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(cin, width, 1)] + [conv_bn(cin, width, 3, dilation=d) for d in dilations])
        self.pool = conv_bn(cin, width, 1)
        self.pooled_size = pooled_size
        self.fuse = conv_bn(width * (len(dilations) + 2), width, 1)

    def forward(self, x):
        outs = [F.relu(b(x)) for b in self.branches]
        pooled = F.relu(self.pool(F.adaptive_avg_pool2d(x, 1)))
        # A constant scale keeps the exported graph free of shape arithmetic (the model has a fixed input size).
        outs.append(F.interpolate(pooled, scale_factor=self.pooled_size, mode="nearest"))
        return F.relu(self.fuse(torch.cat(outs, 1)))


class ShapesSeg(nn.Module):
    def __init__(self, num_classes: int = len(scenes.CLASSES), input_size: int = scenes.SIZE):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.ReLU())          # 1/2
        self.stage1 = ResidualBlock(16, 24, 2)                               # 1/4, decoder skip
        self.stage2 = ResidualBlock(24, 48, 2)                               # 1/8
        self.stage3 = InvertedResidual(48, 64, 144, 2)                       # 1/16
        self.stage4 = InvertedResidual(64, 64, 192, 1, dilation=2)
        self.aspp = ASPP(64, 96, (2, 3), input_size // 16)
        self.skip = nn.Sequential(conv_bn(24, 32, 1), nn.ReLU())
        self.decoder = nn.Sequential(conv_bn(96 + 32, 64), nn.ReLU(), conv_bn(64, 64), nn.ReLU())
        self.classifier = nn.Conv2d(64, num_classes, 1)

    def forward(self, x):
        low = self.stage1(self.stem(x))
        high = self.aspp(self.stage4(self.stage3(self.stage2(low))))
        high = F.interpolate(high, scale_factor=4, mode="bilinear", align_corners=False)
        logits = self.classifier(self.decoder(torch.cat([high, self.skip(low)], 1)))
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)


def normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def train(steps: int, batch: int, lr: float) -> ShapesSeg:
    torch.manual_seed(0)
    model = ShapesSeg()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    # Rare small shapes matter as much as background: weight classes by inverse sqrt frequency.
    weight = torch.tensor([0.3] + [1.0] * (len(scenes.CLASSES) - 1))
    start = time.time()
    for step in range(steps):
        images, masks = scenes.make_batch([TRAIN_SEED_BASE + step * batch + i for i in range(batch)])
        loss = F.cross_entropy(model(normalise(images)), torch.from_numpy(masks).long(), weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - start:6.0f}s", flush=True)
    return model.eval()


def export(model: ShapesSeg, path: Path) -> None:
    dummy = torch.zeros(1, 3, scenes.SIZE, scenes.SIZE)
    torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    proto = onnx.load(str(path))
    metadata = {
        "disasm.classes": ",".join(scenes.CLASSES),
        "disasm.background": "background",
        "disasm.mean": ",".join(map(str, MEAN)),
        "disasm.std": ",".join(map(str, STD)),
        "disasm.color": "rgb",
        "disasm.layout": "nchw",
        "disasm.output": "logits",
    }
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name, proto.doc_string = "disasm examples/train.py", "ShapesSeg: 8-class procedural-shapes segmentation"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def write_split(images: Path, masks: Path | None, seed_base: int, count: int) -> None:
    """Scene images as RGB PNGs and, if asked, their masks as grey PNGs of class indices, matched by file stem."""
    for folder in (images, masks):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = scenes.make_scene(seed_base + i)
        Image.fromarray(image).save(images / f"scene_{i:04d}.png", optimize=True)
        if masks is not None:
            Image.fromarray(mask).save(masks / f"scene_{i:04d}.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--out", type=Path, default=HERE / "shapes_seg.onnx")
    parser.add_argument("--data", type=Path, default=HERE / "data")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    model = train(args.steps, args.batch, args.lr)
    export(model, args.out)
    write_split(args.data / "calib", None, CALIB_SEED_BASE, 64)
    write_split(args.data / "eval" / "images", args.data / "eval" / "masks", EVAL_SEED_BASE, 64)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.data}")


if __name__ == "__main__":
    main()
