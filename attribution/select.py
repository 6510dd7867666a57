"""From per-category channel scores to keep-sets per channel group (shared/algorithm.md section 3, steps 4-7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from disasm.attribution.disassembler import Attribution
from disasm.compiler.channels import ChannelAnalysis
from disasm.compiler.errors import DisasmError

RULES = ("prod", "and")


@dataclass(frozen=True)
class SelectionSettings:
    # Defaults measured on the shipped example with lsq compensation (benchmarks/results/tradeoff.md): prod at
    # alpha 0.1 kept >= 95.8% pixel agreement on three category pairs at 0.43-0.54x MACs.
    alpha: float = 0.1        # keep channel c if its normalised score (prod: P*R; and: P) exceeds alpha
    beta: float = 0.2         # threshold on the normalised backward vector R, for the 'and' rule
    rule: str = "prod"        # prod: P*R > alpha;  and: P > alpha and R > beta (each normalised by its max)
    round_to: int | None = None  # kept counts: multiples of this where the group size is one; None: auto (unit)
    last_n: int | None = None  # only groups within this many convs of the output are cut (None: all)
    keep_ratio: float | None = None  # per-group budget: keep this fraction of every cut group, best scores first,
    #                                  instead of the alpha threshold (which lets kept counts differ per group)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise DisasmError(f"combination rule {self.rule!r} unknown; choose one of {', '.join(RULES)}")
        if not 0.0 <= self.alpha < 1.0 or not 0.0 <= self.beta < 1.0:
            raise DisasmError(f"alpha and beta must be in [0, 1), got {self.alpha} and {self.beta}")
        if self.round_to is not None and self.round_to < 1:
            raise DisasmError(f"round-to must be >= 1, got {self.round_to}")
        if self.last_n is not None and self.last_n < 1:
            raise DisasmError(f"last-n must be >= 1, got {self.last_n}")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise DisasmError(f"keep-ratio must be in (0, 1], got {self.keep_ratio}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def unit(self, size: int) -> int:
        """Kept counts of a group of `size` channels are multiples of this. Auto (round_to None), measured in
        benchmarks/results/latency.md: 8 where the size is a multiple of 8 (TensorRT FP16's channel vectors; ONNX
        Runtime CPU was as fast at 8 as at 4, and 16 was never faster), else 4 where it is a multiple of 4 (fewer
        sends ONNX Runtime's conv to its plain kernel: 3-81 such convs cost the corpus models 0.57-0.84x of the
        8-rounded speed), else 1: the full model already runs that group off the blocks, so any count costs no
        layout change. A given round_to: its multiples where the size is one, else 1."""
        if self.round_to is not None:
            return self.round_to if size % self.round_to == 0 else 1
        return next(u for u in (8, 4, 1) if size % u == 0)


@dataclass(frozen=True)
class GroupChoice:
    """What selection decided for one group, for the report."""

    group: int
    size: int
    kept: int      # channels the scores asked for
    padded: int    # channels added to reach a multiple of round_to
    reason: str    # why it was kept whole, or '' when cut by score

    @property
    def total(self) -> int:
        return self.kept + self.padded


def _normalised(v: np.ndarray) -> np.ndarray | None:
    top = v.max()
    return v / top if top > 0 else None


def category_scores(attribution: Attribution, tensor: str, categories: list[int], settings: SelectionSettings) -> np.ndarray | None:
    """[C] score of each channel of `tensor` for the target set: max over categories of the combined, max-normalised
    Disassembler score (so a channel needed by any target is kept: the union of the per-category sets)."""
    best = None
    fwd_all, bwd_all = attribution.forward(tensor), attribution.backward(tensor)
    for k in categories:
        if attribution.images_per_class[k] == 0:
            continue
        fwd, bwd = _normalised(fwd_all[k]), _normalised(bwd_all[k])
        if fwd is None or bwd is None:
            continue
        if settings.rule == "prod":
            score = _normalised(fwd * bwd)
            if score is None:
                continue
        else:  # 'and': pass both thresholds; score by the smaller margin so rounding adds the nearest misses
            score = np.minimum(fwd - settings.alpha, bwd - settings.beta) + settings.alpha
        best = score if best is None else np.maximum(best, score)
    return best


def group_scores(attribution: Attribution, analysis: ChannelAnalysis, categories: list[int],
                 settings: SelectionSettings) -> dict[int, np.ndarray]:
    """Disassembler score per channel of every group that attribution observed."""
    return scatter_to_groups(analysis, {t: category_scores(attribution, t, categories, settings)
                                        for t in attribution.tensors})


def scatter_to_groups(analysis: ChannelAnalysis, per_tensor: dict[str, np.ndarray | None]) -> dict[int, np.ndarray]:
    """[size] score per channel of every group, from per-tensor channel scores. A group seen through several tensors
    (a residual stream read by several convs, a concat member) takes the max: needed anywhere means kept."""
    scores: dict[int, np.ndarray] = {}
    for tensor, s in per_tensor.items():
        if s is None:
            continue
        offset = 0
        for seg in analysis.tensors[tensor].segments:
            part = s[offset:offset + seg.size]
            offset += seg.size
            full = scores.setdefault(seg.group, np.full(analysis.groups[seg.group].size, -np.inf))
            full[seg.start:seg.stop] = np.maximum(full[seg.start:seg.stop], part)
    return {g: np.where(np.isfinite(s), s, 0.0) for g, s in scores.items()}


def class_keep_set(classes: tuple[str, ...], categories: list[str], background: str | None) -> np.ndarray:
    """Output channels kept: the chosen categories plus background, in the model's original order."""
    wanted = set(categories) | ({background} if background else set())
    return np.array([i for i, c in enumerate(classes) if c in wanted], dtype=np.int64)


def select_with_budget(scores: dict[int, np.ndarray], choices: list[GroupChoice],
                       keep_sets: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Other criteria at an equal channel budget: every group cut by `choices` keeps the same number of channels,
    chosen as the top of `scores` (best first, ties by index), so MACs and parameters match exactly."""
    budgeted = dict(keep_sets)
    for c in choices:
        if c.reason:
            continue  # kept whole or the class head: not the criterion's choice
        s = scores.get(c.group)
        if s is None:
            raise ValueError(f"criterion gives no scores for group {c.group}")
        budgeted[c.group] = np.sort(np.lexsort((np.arange(c.size), -s))[:c.total])
    return budgeted


def select_channels(analysis: ChannelAnalysis, scores: dict[int, np.ndarray], settings: SelectionSettings,
                    class_keep: np.ndarray) -> tuple[dict[int, np.ndarray], list[GroupChoice]]:
    """Keep-sets per group: channels scoring above alpha (or the keep_ratio best), rounded up to a multiple of
    the group's unit (SelectionSettings.unit) with the next best."""
    keep_sets: dict[int, np.ndarray] = {}
    choices: list[GroupChoice] = []
    for group in analysis.groups:
        if group.id == analysis.class_group:
            if group.prunable:
                keep_sets[group.id] = class_keep
                choices.append(GroupChoice(group.id, group.size, len(class_keep), 0, "class output: chosen categories"))
            else:  # e.g. a Softmax over the classes follows: the classes are gathered at the output instead
                choices.append(GroupChoice(group.id, group.size, group.size, 0,
                                           f"class conv kept whole ({group.blocked[0]}); classes gathered at the output"))
            continue
        reason = ""
        if group.blocked:
            reason = group.blocked[0]
        elif settings.last_n is not None and group.depth > settings.last_n:
            reason = f"outside the last {settings.last_n} layers"
        elif group.id not in scores:
            reason = "no attribution signal for the chosen categories"
        if reason:
            choices.append(GroupChoice(group.id, group.size, group.size, 0, reason))
            continue
        s = scores[group.id]
        if settings.keep_ratio is None:
            wanted = int((s > settings.alpha).sum())
        else:
            wanted = int(np.ceil(settings.keep_ratio * group.size))
        unit = settings.unit(group.size)
        total = min(group.size, max(unit, -(-wanted // unit) * unit))
        order = np.lexsort((np.arange(group.size), -s))  # best first; ties by index keep the result deterministic
        keep = np.sort(order[:total])
        keep_sets[group.id] = keep
        choices.append(GroupChoice(group.id, group.size, min(wanted, total), total - min(wanted, total), ""))
    return keep_sets, choices
