"""The Disassembler (IJCV 2023): category-aware channel attribution for segmentation networks.

For every category k and every tensor a conv consumes (the post-activation maps the next kernels read), on each
calibration image (shared/algorithm.md section 3):
  1. high-confidence mask  M_k = P_k > tau, from the model's own output (P = softmax / probabilities / sigmoid);
  2. forward vector        p[c] = sum_{p in M_k} relu(A[c, p]), normalised to sum 1 over channels;
  3. backward vector       r[c] = sum_{p in M_k} phi(d y_k / d A[c, p]) with y_k = sum_{p in M_k} z_k(p) (the class
                           logit), phi = relu (positive gradients), normalised by its max over channels.
Both vectors are normalised per image and averaged over the images where k has a non-empty mask, so big masks and
big images do not dominate. One backward pass per chunk of (image, category present) rows yields the gradients at
every observed tensor at once. Results are kept as sums plus counts, so shards and cached runs add up exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from disasm.attribution.interpreter import TorchGraph
from disasm.attribution.moments import Consumer, accumulate
from disasm.compiler.errors import DisasmError

GRADIENT_POLICIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "positive": torch.relu,
    "negative": lambda g: torch.relu(-g),
    "absolute": torch.abs,
}
TARGETS = ("logit", "prob")
EPS = 1e-8


@dataclass(frozen=True)
class AttributionSettings:
    tau: float = 0.8                 # pixel confidence of the high-confidence masks (tau2: 0.8 for VOC in the paper)
    min_mask_fraction: float = 0.002  # an image counts for a category if its mask covers at least this fraction
    gradient: str = "positive"       # phi: positive (the paper's best), negative, absolute
    target: str = "logit"            # back-propagate the masked class logit sum or the masked probability sum
    batch_size: int = 8              # images per forward, and (image, category) gradient rows per backward

    def __post_init__(self) -> None:
        if not 0.0 < self.tau < 1.0:
            raise DisasmError(f"tau must be in (0, 1), got {self.tau}")
        if self.gradient not in GRADIENT_POLICIES:
            raise DisasmError(f"gradient policy {self.gradient!r} unknown; choose one of {', '.join(GRADIENT_POLICIES)}")
        if self.target not in TARGETS:
            raise DisasmError(f"target {self.target!r} unknown; choose one of {', '.join(TARGETS)}")
        if self.batch_size < 1:
            raise DisasmError(f"batch size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Attribution:
    """Per observed tensor, [K, C] sums over images of the per-image forward / backward vectors, and per-category
    image counts. Means are sums / counts; categories never confidently predicted have count 0 and no scores.
    mean_sum holds, per tensor, the [C] sum over images of each channel's spatial mean: the statistics that
    mean compensation folds into the consumers of cut channels. moments holds, per consumer conv (node index), the
    summed outer products of its unfolded input patches, for the least-squares refit (attribution.moments).
    taylor_sum holds the Taylor baseline from the same gradients: per image, |sum_{p in M_k} A[c,p] * dy_k/dA[c,p]|
    normalised by its max over channels (Molchanov et al. 2017, restricted to the category's mask)."""

    tensors: list[str]
    forward_sum: dict[str, np.ndarray]
    backward_sum: dict[str, np.ndarray]
    mean_sum: dict[str, np.ndarray]
    images_per_class: np.ndarray
    images: int
    moments: dict[int, np.ndarray] = field(default_factory=dict)
    taylor_sum: dict[str, np.ndarray] = field(default_factory=dict)

    def forward(self, tensor: str) -> np.ndarray:
        return self.forward_sum[tensor] / np.maximum(self.images_per_class, 1)[:, None]

    def backward(self, tensor: str) -> np.ndarray:
        return self.backward_sum[tensor] / np.maximum(self.images_per_class, 1)[:, None]

    def channel_mean(self, tensor: str) -> np.ndarray:
        return self.mean_sum[tensor] / max(self.images, 1)

    def merge(self, other: Attribution) -> Attribution:
        """Sum of two attributions of disjoint image sets with the same settings (sharding, incremental runs)."""
        def add(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {t: a[t] + b[t] for t in self.tensors}

        return Attribution(self.tensors, add(self.forward_sum, other.forward_sum),
                           add(self.backward_sum, other.backward_sum), add(self.mean_sum, other.mean_sum),
                           self.images_per_class + other.images_per_class, self.images + other.images,
                           {k: self.moments[k] + other.moments[k] for k in self.moments},
                           add(self.taylor_sum, other.taylor_sum))


def _class_probabilities(output: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "logits":
        return torch.softmax(output, dim=1)
    if kind == "sigmoid":
        return output if output.min() >= 0 and output.max() <= 1 else torch.sigmoid(output)
    return output


def _class_scores(output: torch.Tensor, kind: str, target: str) -> torch.Tensor:
    """The per-pixel score whose masked sum is back-propagated: the class logit, or the class probability."""
    if target == "prob":
        return _class_probabilities(output, kind)
    if kind == "probs":  # log-probabilities are logits up to a per-pixel constant
        return torch.log(output.clamp_min(EPS))
    if kind == "sigmoid" and output.min() >= 0 and output.max() <= 1:
        p = output.clamp(EPS, 1 - EPS)
        return torch.log(p) - torch.log1p(-p)
    return output


def _mask_on_grid(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks [B, K, H, W] as area fractions on a tensor's grid: soft weights, so small objects at stride 16-32 still
    count with the share of the cell they cover (a hard > 0.5 threshold would drop them)."""
    if masks.shape[-2:] == size:
        return masks
    return F.adaptive_avg_pool2d(masks, size)


def _normalised(vectors: torch.Tensor, by: str) -> torch.Tensor:
    """Per-image vectors [..., C] divided by their sum (forward) or max (backward) over channels."""
    scale = vectors.sum(-1, keepdim=True) if by == "sum" else vectors.amax(-1, keepdim=True)
    return vectors / (scale + EPS)


def _category_sums(vectors: torch.Tensor, categories: torch.Tensor, k: int) -> torch.Tensor:
    """[K, C] float64 sums of per-(image, category) rows [N, C] by category: a matrix product with the one-hot
    category matrix, so the order of the sums, and the result, is the same on every run and device."""
    return F.one_hot(categories, k).T.double() @ vectors.double()


def attribute_batch(graph: TorchGraph, x: torch.Tensor, tensors: list[str], num_classes: int, output_kind: str,
                    settings: AttributionSettings, consumers: list[Consumer] = (), class_axis: int = 1) -> Attribution:
    """Disassembler vectors of one batch (sums over its images), and the input moments of `consumers`.
    `class_axis` is the output axis that holds the classes (1 for [N, K, H, W], 3 for [N, H, W, K] outputs).

    The backward work is one row per (image, category present in it), as in the method: a forward without gradients
    finds the masks (and gives the forward vectors, means and moments); then the images are repeated once per
    category they contain and one forward + backward over those rows, seeded with each row's own category mask,
    gives every row's gradients at every observed tensor at once. One backward per category present over the whole
    batch would back-propagate zeros through every image that lacks the category: with many classes (ADE20K,
    Cityscapes) most of the work. Rows go in chunks of `settings.batch_size`, which bounds the memory."""
    x = x.detach().requires_grad_(False)
    capture = list(dict.fromkeys([*tensors, *(c.tensor for c in consumers)]))
    with torch.no_grad():
        values = graph.run({graph.input_names[0]: x}, capture=capture)
        output = values[graph.output_names[0]]
        if output.dim() != 4 or output.shape[class_axis] != num_classes:
            raise DisasmError(f"model output has shape {list(output.shape)}: expected {num_classes} classes on "
                              f"axis {class_axis}")
        masks = (_class_probabilities(output.movedim(class_axis, 1), output_kind) > settings.tau).float()  # [B,K,H,W]
        present = masks.mean(dim=(2, 3)) >= settings.min_mask_fraction                                # [B, K]
        masks = masks * present[:, :, None, None]
        activations = {t: values[t].flatten(2) for t in tensors}                                       # [B, C, P]
        grid_masks = {t: _mask_on_grid(masks, tuple(values[t].shape[-2:])).flatten(2) for t in tensors}  # [B,K,P]
        mean_sum = {t: a.mean(2).sum(0).double() for t, a in activations.items()}
        forward_sum = {t: (_normalised(torch.einsum("bkp,bcp->kbc", grid_masks[t], torch.relu(a)), "sum")
                           * present.T[..., None]).sum(1).double() for t, a in activations.items()}
        moments = accumulate(values, list(consumers))
    batch, k = present.shape
    backward_sum = {t: torch.zeros_like(v) for t, v in forward_sum.items()}
    taylor_sum = {t: torch.zeros_like(v) for t, v in forward_sum.items()}
    phi = GRADIENT_POLICIES[settings.gradient]
    pairs = torch.nonzero(present)                                                         # [n, 2]: image, category
    for start in range(0, len(pairs), settings.batch_size):
        image, category = pairs[start:start + settings.batch_size].T
        repeated = graph.run({graph.input_names[0]: x[image]}, capture=tensors)
        scores = _class_scores(repeated[graph.output_names[0]].movedim(class_axis, 1), output_kind, settings.target)
        seeds = torch.zeros_like(scores)                       # d(sum of row n's category scores in its mask)/d scores
        seeds[torch.arange(len(image), device=x.device), category] = masks[image, category]
        grads = torch.autograd.grad([scores], [repeated[t] for t in tensors], [seeds], allow_unused=True)
        for t, g in zip(tensors, grads):
            if g is None:
                continue  # this tensor does not influence the output (e.g. a dead branch)
            m, g = grid_masks[t][image, category], g.flatten(2)                            # [n, P], [n, C, P]
            backward = torch.einsum("np,ncp->nc", m, phi(g))
            taylor = torch.einsum("np,ncp->nc", m, g * repeated[t].detach().flatten(2)).abs()
            backward_sum[t] += _category_sums(_normalised(backward, "max"), category, k)
            taylor_sum[t] += _category_sums(_normalised(taylor, "max"), category, k)

    def host(sums: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {t: v.cpu().numpy() for t, v in sums.items()}  # one transfer per tensor and batch: no GPU stalls

    return Attribution(list(tensors), host(forward_sum), host(backward_sum), host(mean_sum),
                       present.sum(0).cpu().numpy().astype(np.int64), batch, moments, host(taylor_sum))


def attribute(graph: TorchGraph, inputs: np.ndarray, tensors: list[str], num_classes: int, output_kind: str,
              settings: AttributionSettings, progress: Callable[[int, int], None] | None = None,
              consumers: list[Consumer] = (), class_axis: int = 1) -> Attribution:
    """Disassembler vectors of a whole calibration set, batch by batch (inputs: preprocessed float32 images), and
    the input moments of `consumers` for least-squares compensation. `class_axis`: see attribute_batch."""
    total: Attribution | None = None
    device = graph.device
    for start in range(0, len(inputs), settings.batch_size):
        x = torch.from_numpy(inputs[start:start + settings.batch_size]).to(device)
        part = attribute_batch(graph, x, tensors, num_classes, output_kind, settings, consumers, class_axis)
        total = part if total is None else total.merge(part)
        if progress:
            progress(min(start + settings.batch_size, len(inputs)), len(inputs))
    if total is None:
        raise DisasmError("no calibration images to attribute")
    return total
