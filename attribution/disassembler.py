"""The Disassembler (IJCV 2023): category-aware channel attribution for segmentation networks.

For every category k and every tensor a conv consumes (the post-activation maps the next kernels read), on each
calibration image (shared/algorithm.md section 3):
  1. high-confidence mask  M_k = P_k > tau, from the model's own output (P = softmax or sigmoid of the logits);
  2. forward vector        p[c] = sum_{p in M_k} relu(A[c, p]), normalised to sum 1 over channels;
  3. backward vector       r[c] = sum_{p in M_k} phi(d y_k / d A[c, p]) with y_k = sum_{p in M_k} z_k(p) (the class
                           logit), phi = relu (positive gradients), normalised by its max over channels.
Both vectors are normalised per image and averaged over the images where k has a non-empty mask, so big masks and
big images do not dominate. One backward pass per chunk of (image, category present) rows yields the gradients at
every observed tensor at once. Results are kept as sums plus counts, so shards and cached runs add up exactly.

The graph attribution runs should output logits (calibration.attribution_graph removes a final Softmax/Sigmoid):
saturated probabilities (exactly 1.0 in float32) have no usable gradient, and inverting them gives inf and NaN. A
graph that outputs probabilities without such a node still works, through clamped logs (see OUTPUT_KINDS).

Fallback masks. A category that no calibration image predicts above tau (on at least min_mask_fraction of its pixels)
would get no scores and stop the compile, although the model does predict it, only less confidently. Such a
category takes, instead, the pixels where the model predicts it: where it is the argmax (softmax models) or where
p > 0.5 (sigmoid models). The decision is made per category over the whole calibration set (all shards, see
`gather`) by a first pass, before the fallback categories' gradients are computed in a second one; a category the
model never predicts keeps a count of 0. Attribution.fallback and mask_pixels record what was used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

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
# What the output of the graph being attributed holds; P is what the masks threshold, the logit what is back-propagated.
OUTPUT_KINDS = (
    "logits",          # class logits: P = softmax over the classes ("logits" models; "probs" ones, Softmax removed)
    "sigmoid-logits",  # per-class logits: P = sigmoid (a "sigmoid" model without its final Sigmoid)
    "probs",           # softmax probabilities from a graph with no Softmax node to remove: the logit is log p, clamped
    #                    at EPS (log p is the logit up to a per-pixel constant; saturated pixels give zero gradients)
    "sigmoid",         # a "sigmoid" model with no Sigmoid node: probabilities if in [0, 1] (logit = log p - log(1 - p),
    #                    clamped so saturated pixels give zero gradients instead of inf), else already logits
)
SIGMOID_KINDS = ("sigmoid-logits", "sigmoid")
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
    image counts (the images that contributed: a non-empty mask of at least min_mask_fraction). Means are
    sums / counts; categories the model never predicts have count 0 and no scores.
    mean_sum holds, per tensor, the [C] sum over images of each channel's spatial mean: the statistics that
    mean compensation folds into the consumers of cut channels. moments holds, per consumer conv (node index), the
    summed outer products of its unfolded input patches, for the least-squares refit (attribution.moments).
    taylor_sum holds the Taylor baseline from the same gradients: per image, |sum_{p in M_k} A[c,p] * dy_k/dA[c,p]|
    normalised by its max over channels (Molchanov et al. 2017, restricted to the category's mask).
    predicted_pixels [K]: output pixels, over all images, where the model predicts k (argmax for softmax models,
    p > 0.5 for sigmoid ones); 0 means the model never predicts k. mask_pixels [K]: output pixels in the masks of
    the images that contributed. fallback [K] (bool): the categories whose masks are their predicted pixels because
    no image had a confident mask (module docstring); the same on every shard, decided over the whole set."""

    tensors: list[str]
    forward_sum: dict[str, np.ndarray]
    backward_sum: dict[str, np.ndarray]
    mean_sum: dict[str, np.ndarray]
    images_per_class: np.ndarray
    images: int
    moments: dict[int, np.ndarray] = field(default_factory=dict)
    taylor_sum: dict[str, np.ndarray] = field(default_factory=dict)
    predicted_pixels: np.ndarray | None = None  # None: zeros (attributions made by hand, e.g. in tests)
    mask_pixels: np.ndarray | None = None
    fallback: np.ndarray | None = None

    def __post_init__(self) -> None:
        k = len(self.images_per_class)
        zeros = np.zeros(k, np.int64)
        self.predicted_pixels = zeros if self.predicted_pixels is None else np.asarray(self.predicted_pixels, np.int64)
        self.mask_pixels = zeros.copy() if self.mask_pixels is None else np.asarray(self.mask_pixels, np.int64)
        self.fallback = np.zeros(k, bool) if self.fallback is None else np.asarray(self.fallback, bool)

    def forward(self, tensor: str) -> np.ndarray:
        return self.forward_sum[tensor] / np.maximum(self.images_per_class, 1)[:, None]

    def backward(self, tensor: str) -> np.ndarray:
        return self.backward_sum[tensor] / np.maximum(self.images_per_class, 1)[:, None]

    def channel_mean(self, tensor: str) -> np.ndarray:
        return self.mean_sum[tensor] / max(self.images, 1)

    def fallback_pixels(self) -> dict[int, int]:
        """Category index -> pixels of its fallback masks, for each category that used the fallback."""
        return {int(k): int(self.mask_pixels[k]) for k in np.flatnonzero(self.fallback)}

    def merge(self, other: Attribution) -> Attribution:
        """Sum of two attributions of disjoint image sets with the same settings (sharding, incremental runs). Their
        fallback decisions must agree: sums over different kinds of masks do not add up to anything."""
        if not np.array_equal(self.fallback, other.fallback):
            ours, theirs = np.flatnonzero(self.fallback).tolist(), np.flatnonzero(other.fallback).tolist()
            raise DisasmError(f"cannot merge attributions whose categories use different masks (fallback {ours} vs "
                              f"{theirs}); decide the fallback over the whole image set (attribute's `gather`)")

        def add(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {t: a[t] + b[t] for t in self.tensors}

        return Attribution(self.tensors, add(self.forward_sum, other.forward_sum),
                           add(self.backward_sum, other.backward_sum), add(self.mean_sum, other.mean_sum),
                           self.images_per_class + other.images_per_class, self.images + other.images,
                           {k: self.moments[k] + other.moments[k] for k in self.moments},
                           add(self.taylor_sum, other.taylor_sum), self.predicted_pixels + other.predicted_pixels,
                           self.mask_pixels + other.mask_pixels, self.fallback.copy())


def check_finite(attribution: Attribution, classes: Sequence[str] | None = None) -> None:
    """Raise a DisasmError naming the first tensor (and category) with an inf or NaN in any sum: a model that
    overflows on the calibration images must stop the run, not yield scores that select channels at random."""
    hint = ("the model overflows on the calibration images (check the input preprocessing: --mean, --std, --bgr) "
            "or its weights hold inf/NaN")
    for what, sums in (("forward", attribution.forward_sum), ("backward", attribution.backward_sum),
                       ("taylor", attribution.taylor_sum)):
        for t in attribution.tensors:
            bad = ~np.isfinite(sums[t])
            if bad.any():
                k, c = np.argwhere(bad)[0]
                raise DisasmError(f"attribution is not finite: the {what} sum of tensor {t!r} for category "
                                  f"{_category_name(classes, k)} is {sums[t][k, c]} at channel {c} "
                                  f"({int(bad.sum())} non-finite values in this tensor); {hint}")
    for t in attribution.tensors:
        bad = ~np.isfinite(attribution.mean_sum[t])
        if bad.any():
            raise DisasmError(f"attribution is not finite: the channel means of tensor {t!r} hold "
                              f"{int(bad.sum())} non-finite values (first at channel {np.argmax(bad)}); {hint}")
    for node, moments in attribution.moments.items():
        if not np.isfinite(moments).all():
            raise DisasmError(f"attribution is not finite: the input moments of consumer node {node} hold "
                              f"{int((~np.isfinite(moments)).sum())} non-finite values; {hint}")


def _category_name(classes: Sequence[str] | None, k: int) -> str:
    return repr(classes[k]) if classes else f"#{k}"


def _in_unit_range(output: torch.Tensor) -> bool:
    return bool(output.min() >= 0 and output.max() <= 1)


def _class_probabilities(output: torch.Tensor, kind: str) -> torch.Tensor:
    """P [B, K, H, W] from the output with the classes on axis 1."""
    if kind == "logits":
        return torch.softmax(output, dim=1)
    if kind == "sigmoid-logits" or (kind == "sigmoid" and not _in_unit_range(output)):
        return torch.sigmoid(output)
    return output


def _class_scores(output: torch.Tensor, kind: str, target: str) -> torch.Tensor:
    """The per-pixel score whose masked sum is back-propagated: the class logit, or the class probability. Only the
    two kinds without a logit tensor invert probabilities, clamped so that saturated pixels (p = 1 exactly in
    float32) give zero gradients rather than inf - inf = NaN."""
    if target == "prob":
        return _class_probabilities(output, kind)
    if kind == "probs":  # log-probabilities are logits up to a per-pixel constant
        return torch.log(output.clamp_min(EPS))
    if kind == "sigmoid" and _in_unit_range(output):
        p = output.clamp(EPS, 1 - torch.finfo(output.dtype).eps)  # 1 - 1e-8 would round to 1.0 in float32
        return torch.log(p) - torch.log1p(-p)
    return output


def _predicted(probabilities: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, K, H, W] bool: where the model predicts each class, as its segmentation map does. Softmax models: the
    argmax (one class per pixel); sigmoid models: p > 0.5 (independent classes, so none or several per pixel)."""
    if kind in SIGMOID_KINDS:
        return probabilities > 0.5
    # argmax along a contiguous axis: the first maximum as argmax(1) takes it, 3x faster on CPU than across channels
    first = probabilities.movedim(1, -1).contiguous().argmax(-1, keepdim=True).movedim(-1, 1)
    return torch.zeros_like(probabilities, dtype=torch.bool).scatter_(1, first, True)


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


@dataclass(frozen=True)
class _Fallback:
    """The second pass: which categories take their predicted pixels as masks, and per category the smallest mask
    fraction that lets an image count (min_mask_fraction, or 0 where no image reaches it: any predicted pixel)."""

    categories: np.ndarray  # bool [K]
    gate: np.ndarray        # float32 [K]


def _fallback(images_per_class: np.ndarray, predicted_pixels: np.ndarray, predicted_images: np.ndarray,
              min_fraction: float) -> _Fallback | None:
    """The fallback decision from counts over the whole calibration set.

    Why the model's own prediction (argmax / p > 0.5) and not a per-category confidence quantile: it is the set of
    pixels the deployed model labels k, so the channels kept are those that make that decision; it has no parameter
    to choose; and it is empty exactly when the model never predicts k, whereas a quantile always selects pixels and
    would attribute channels to a category the model does not produce. Images where the category covers less than
    min_mask_fraction still guard against noise, unless no image reaches it: then every image where it is predicted
    counts, so that a category the model predicts is never left without scores."""
    categories = (images_per_class == 0) & (predicted_pixels > 0)
    if not categories.any():
        return None
    gate = np.where(predicted_images > 0, min_fraction, 0.0).astype(np.float32)
    return _Fallback(categories, gate)


#: Cost of one backward pass relative to one forward pass of the same rows, for planning the gradient rows (CPU, this
#: interpreter: 1.4 on the shipped example, 1.7 on pan-mnv3s; only input gradients are computed, weights are constants).
BACKWARD_COST = 1.5


def _shared_rounds(rows_per_image: torch.Tensor) -> int:
    """How many backward passes to run through the batch's own forward graph (see _attribute_pass). Round j
    back-propagates every image's j-th category at once, and costs one backward over the whole batch whatever the
    number of images that still have a j-th category; a row left to the repeated passes costs a forward and a backward
    of its own. Round j is worth it while more than BACKWARD_COST / (1 + BACKWARD_COST) of the batch has a j-th row."""
    batch, rounds = len(rows_per_image), 0
    while (1 + BACKWARD_COST) * int((rows_per_image > rounds).sum()) > BACKWARD_COST * batch:
        rounds += 1
    return rounds


def _attribute_pass(graph: TorchGraph, x: torch.Tensor, tensors: list[str], num_classes: int, output_kind: str,
                    settings: AttributionSettings, consumers: Sequence[Consumer], class_axis: int,
                    fallback: _Fallback | None) -> tuple[Attribution, np.ndarray | None, np.ndarray]:
    """One batch of the first pass (fallback None: masks P > tau for every category; also the channel means, the
    moments, and the counts [3, K] that decide the fallback: predicted pixels, images where the predicted share
    reaches min_mask_fraction, non-finite output values), or of the second pass (the predicted-pixel masks of the
    fallback categories only; no means, moments or image count, which the first pass has). Also returns the share of
    each image's pixels where each category is predicted [B, K] (which images the second pass needs). See
    attribute_batch for the passes."""
    first = fallback is None
    x = x.detach().requires_grad_(False)
    capture = list(dict.fromkeys([*tensors, *(c.tensor for c in consumers)])) if first else list(tensors)
    # One forward for everything: with gradients when there is something to differentiate, so that the batch's own
    # graph serves the first backward rounds (no forward without gradients just to find the masks).
    with torch.set_grad_enabled(bool(tensors)):
        values = graph.run({graph.input_names[0]: x}, capture=capture)
    with torch.no_grad():
        output = values[graph.output_names[0]].detach()
        if output.dim() != 4 or output.shape[class_axis] != num_classes:
            raise DisasmError(f"model output has shape {list(output.shape)}: expected {num_classes} classes on "
                              f"axis {class_axis}")
        output = output.movedim(class_axis, 1)
        probabilities = _class_probabilities(output, output_kind)                                    # [B,K,H,W]
        predicted = _predicted(probabilities, output_kind)
        share = predicted.float().mean(dim=(2, 3))                                                     # [B, K]
        if first:
            masks = (probabilities > settings.tau).float()
            fraction = masks.mean(dim=(2, 3))
            present = (fraction >= settings.min_mask_fraction) & (fraction > 0)                        # [B, K]
            counts = torch.stack([predicted.sum(dim=(0, 2, 3)),
                                  ((share >= settings.min_mask_fraction) & (share > 0)).sum(0),
                                  (~torch.isfinite(output)).sum(dim=(0, 2, 3))])
        else:
            masks = (predicted & torch.from_numpy(fallback.categories).to(x.device)[None, :, None, None]).float()
            fraction = masks.mean(dim=(2, 3))
            present = (fraction >= torch.from_numpy(fallback.gate).to(x.device)) & (fraction > 0)
            counts = None
        del probabilities, predicted
        masks = masks * present[:, :, None, None]
        activations = {t: values[t].detach().flatten(2) for t in tensors}                              # [B, C, P]
        on_grid: dict[tuple[int, ...], torch.Tensor] = {}  # masks pooled once per distinct grid
        for t in tensors:
            size = tuple(values[t].shape[-2:])
            if size not in on_grid:
                on_grid[size] = _mask_on_grid(masks, size).flatten(2)
        grid_masks = {t: on_grid[tuple(values[t].shape[-2:])] for t in tensors}                       # [B, K, P]
        mean_sum = {t: a.mean(2).sum(0).double() for t, a in activations.items()} if first else {}
        forward_sum = {t: (_normalised(torch.einsum("bkp,bcp->kbc", grid_masks[t], torch.relu(a)), "sum")
                           * present.T[..., None]).sum(1).double() for t, a in activations.items()}
        moments = accumulate(values, list(consumers)) if first else {}
        mask_pixels = masks.sum(dim=(0, 2, 3), dtype=torch.float64)
    batch, k = present.shape
    backward_sum = {t: torch.zeros_like(v) for t, v in forward_sum.items()}
    taylor_sum = {t: torch.zeros_like(v) for t, v in forward_sum.items()}
    phi = GRADIENT_POLICIES[settings.gradient]

    def add_rows(image: torch.Tensor, category: torch.Tensor, grads, observed: dict[str, torch.Tensor]) -> None:
        """Backward and Taylor vectors of the rows (image[n], category[n]) from their gradients [n, C, ...]."""
        for t, g in zip(tensors, grads):
            if g is None:
                continue  # this tensor does not influence the output (e.g. a dead branch)
            m, g = grid_masks[t][image, category], g.flatten(2)                            # [n, P], [n, C, P]
            backward = torch.einsum("np,ncp->nc", m, phi(g))
            taylor = torch.einsum("np,ncp->nc", m, g * observed[t]).abs()
            backward_sum[t] += _category_sums(_normalised(backward, "max"), category, k)
            taylor_sum[t] += _category_sums(_normalised(taylor, "max"), category, k)

    # [n, 2] (image, category) rows, image-major; without observed tensors there is nothing to differentiate
    pairs = torch.nonzero(present) if tensors else torch.zeros((0, 2), dtype=torch.long, device=x.device)
    rows_per_image = present.sum(1) if tensors else torch.zeros(batch, dtype=torch.long, device=x.device)
    rank = torch.arange(len(pairs), device=x.device) - (torch.cumsum(rows_per_image, 0) - rows_per_image)[pairs[:, 0]]
    rounds = _shared_rounds(rows_per_image)
    if rounds:  # round j: each image's j-th category, through the batch's own graph
        scores = _class_scores(values[graph.output_names[0]].movedim(class_axis, 1), output_kind, settings.target)
        for j in range(rounds):
            image, category = pairs[rank == j].T
            seeds = torch.zeros_like(scores)
            seeds[image, category] = masks[image, category]
            grads = torch.autograd.grad([scores], [values[t] for t in tensors], [seeds], allow_unused=True,
                                        retain_graph=j + 1 < rounds)
            if len(image) == batch:  # every image has a j-th row (always so for one image): no copies
                add_rows(image, category, grads, activations)
            else:
                add_rows(image, category, [None if g is None else g[image] for g in grads],
                         {t: activations[t][image] for t in tensors})
        del scores, grads
    del values  # frees the batch's graph before the repeated rows build theirs
    later = pairs[rank >= rounds]
    for start in range(0, len(later), settings.batch_size):
        image, category = later[start:start + settings.batch_size].T
        repeated = graph.run({graph.input_names[0]: x[image]}, capture=tensors)
        scores = _class_scores(repeated[graph.output_names[0]].movedim(class_axis, 1), output_kind, settings.target)
        seeds = torch.zeros_like(scores)                       # d(sum of row n's category scores in its mask)/d scores
        seeds[torch.arange(len(image), device=x.device), category] = masks[image, category]
        grads = torch.autograd.grad([scores], [repeated[t] for t in tensors], [seeds], allow_unused=True)
        add_rows(image, category, grads, {t: activations[t][image] for t in tensors})

    def host(sums: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {t: v.cpu().numpy() for t, v in sums.items()}  # one transfer per tensor and batch: no GPU stalls

    counts = None if counts is None else counts.cpu().numpy().astype(np.int64)
    part = Attribution(list(tensors), host(forward_sum), host(backward_sum), host(mean_sum),
                       present.sum(0).cpu().numpy().astype(np.int64), batch if first else 0, moments, host(taylor_sum),
                       None if counts is None else counts[0], mask_pixels.cpu().numpy().round().astype(np.int64),
                       None if first else fallback.categories)
    return part, counts, share.cpu().numpy()


def attribute_batch(graph: TorchGraph, x: torch.Tensor, tensors: list[str], num_classes: int, output_kind: str,
                    settings: AttributionSettings, consumers: list[Consumer] = (), class_axis: int = 1) -> Attribution:
    """Disassembler vectors of one batch (sums over its images) with the masks P > tau, and the input moments of
    `consumers`: the first pass of `attribute`, which alone decides the fallback masks (over the whole set).
    `output_kind`: what the graph's output holds (OUTPUT_KINDS). `class_axis` is the output axis that holds the
    classes (1 for [N, K, H, W], 3 for [N, H, W, K] outputs).

    The backward work is one row per (image, category present in it), as in the method. One forward of the batch,
    with gradients, finds the masks and gives the forward vectors, means and moments. Its own graph then serves the
    first backward rounds: round j seeds every image with its j-th category's mask at once (images are independent in
    a batch), so an image with r categories needs no forward of its own for its first rounds. Rounds stop where too
    few images have that many categories (`_shared_rounds`: a round back-propagates the whole batch, zeros included);
    the remaining rows are repeated images, one forward + backward per chunk of `settings.batch_size` rows, seeded
    with each row's own category mask. One backward per category present over the whole batch would back-propagate
    zeros through every image that lacks the category: with many classes (ADE20K, Cityscapes) most of the work.
    Without observed tensors there is no backward at all, and the forward runs without gradients: only masks, counts
    and moments. The sums equal those of one image and one category at a time up to float rounding."""
    _check_kind(output_kind)
    return _attribute_pass(graph, x, tensors, num_classes, output_kind, settings, consumers, class_axis, None)[0]


def _check_kind(output_kind: str) -> None:
    if output_kind not in OUTPUT_KINDS:
        raise DisasmError(f"output kind {output_kind!r} unknown to attribution; one of {', '.join(OUTPUT_KINDS)}")


def _add_categories(total: Attribution, part: Attribution) -> None:
    """Add a second-pass batch (fallback categories only: their rows are zero in `total`) to the first pass."""
    for sums, more in ((total.forward_sum, part.forward_sum), (total.backward_sum, part.backward_sum),
                       (total.taylor_sum, part.taylor_sum)):
        for t in total.tensors:
            sums[t] = sums[t] + more[t]
    total.images_per_class = total.images_per_class + part.images_per_class
    total.mask_pixels = total.mask_pixels + part.mask_pixels


def attribute(graph: TorchGraph, inputs: np.ndarray, tensors: list[str], num_classes: int, output_kind: str,
              settings: AttributionSettings, progress: Callable[[int, int], None] | None = None,
              consumers: list[Consumer] = (), class_axis: int = 1,
              gather: Callable[[np.ndarray], np.ndarray] | None = None, check: bool = True,
              classes: Sequence[str] | None = None) -> Attribution:
    """Disassembler vectors of a whole calibration set, batch by batch (inputs: preprocessed float32 images), and
    the input moments of `consumers` for least-squares compensation. `output_kind`: what the graph's output holds
    (OUTPUT_KINDS); `class_axis`: see attribute_batch.

    Two passes. The first attributes every category with its confident masks and counts, per category, the images
    that contributed and the pixels the model predicts. Categories with no contributing image but predicted pixels
    then get a second pass with their predicted pixels as masks (module docstring), over only the images where some
    such category counts (known from the first pass); it costs nothing when every category has confident images. `gather` sums the [4, K] int64 counts over all shards of a distributed run, so
    that every shard takes the same decision (called once, on every shard; None: this is the whole set). `progress`
    reports the first pass. `check`: raise a DisasmError on any non-finite sum (check_finite); a distributed run
    checks after summing the shards instead, so that every shard stops alike. `classes` names the categories in
    errors."""
    _check_kind(output_kind)
    device = graph.device
    batches = [(s, slice(s, s + settings.batch_size)) for s in range(0, len(inputs), settings.batch_size)]
    if not batches:
        raise DisasmError("no calibration images to attribute")
    total: Attribution | None = None
    predicted = np.zeros((3, num_classes), np.int64)
    shares = []  # [B, K] per batch: where each category is predicted, so the second pass can skip images
    for start, rows in batches:
        x = torch.from_numpy(inputs[rows]).to(device)
        part, counts, share = _attribute_pass(graph, x, tensors, num_classes, output_kind, settings, consumers,
                                              class_axis, None)
        total = part if total is None else total.merge(part)
        predicted += counts
        shares.append(share)
        if progress:
            progress(min(start + settings.batch_size, len(inputs)), len(inputs))
    counts = np.concatenate([total.images_per_class[None], predicted])
    if gather is not None:
        counts = np.asarray(gather(counts), np.int64)
    images_per_class, predicted_pixels, predicted_images, nonfinite = counts
    if nonfinite.any():
        k = int(np.argmax(nonfinite > 0))
        raise DisasmError(f"model output {graph.output_names[0]!r} is not finite on the calibration images "
                          f"({int(nonfinite.sum())} inf/NaN values, the first in category {_category_name(classes, k)});"
                          f" the model overflows (check the input preprocessing: --mean, --std, --bgr)")
    plan = _fallback(images_per_class, predicted_pixels, predicted_images, settings.min_mask_fraction)
    if plan is not None:
        # Only the images where a fallback category's predicted share passes its gate have second-pass rows.
        wanted = np.concatenate([((share >= plan.gate) & (share > 0) & plan.categories).any(1) for share in shares])
        chosen = np.flatnonzero(wanted)
        for start in range(0, len(chosen), settings.batch_size):
            x = torch.from_numpy(inputs[chosen[start:start + settings.batch_size]]).to(device)
            _add_categories(total, _attribute_pass(graph, x, tensors, num_classes, output_kind, settings, consumers,
                                                   class_axis, plan)[0])
        total.fallback = plan.categories.copy()
    if check:
        check_finite(total, classes)
    return total
