"""Label-free finetuning of a pruned model, with the full model as teacher (`disasm-compile --finetune EPOCHS`).

The pruned model answers "each chosen category, or none" (compiler/outputs.py): channel c of its output is the
largest score of the full model's classes `sources[c]`. Finetuning trains its float parameters on the calibration
images so that its answers match the full model's, without labels:

- Targets. The teacher is the full model with its final Softmax/Sigmoid made an Identity (as in
  calibration.attribution_graph), so its output is logits. For softmax models (`logits`, `probs`) the target of a
  pixel is the teacher's chosen-or-none distribution: the softmax over the classes the output covers, the
  probability of each output channel's sources summed. For sigmoid models it is the teacher's probability of each
  chosen class.
- What the student is trained on: the logits *before* the output head. Where the pruned model ends in the head of
  compiler.outputs (pieces of the class conv's output, each a Gather, a Split output or the whole, some folded by a
  ReduceMax, then a Concat; read from the graph, so the class conv's rows may be in any order), the student's scores
  are the head's input, every class of the full model (its final Softmax/Sigmoid also made an Identity), and its
  chosen-or-none distribution is formed like the teacher's: log-probability of channel c =
  logsumexp(scores[rows of c]) - logsumexp(scores[rows of every channel]). The head's max passes the gradient to
  one class only and a softmax over [chosen, max of the others] is not a distribution the teacher has; logsumexp is
  the max's smooth upper bound, and the written model's answer (the max) is the argmax of the trained classes.
  Where the class conv was sliced (no head), the output channels are the classes.
- Loss: KL(teacher || student) per pixel, averaged over pixels (softmax models); the per-class Bernoulli KL
  (sigmoid models). Measured on SINet at 0.97x MACs (5 calibration images) against a temperature of 4, the squared
  difference of centred logits, cross-entropy with the teacher's argmax and KL + that cross-entropy: none judged
  better than the plain KL. No feature maps are matched: the pruned feature maps hold a subset of the full model's
  channels, whose identity the pruned ONNX no longer records.
- Parameters: every float initializer read only where an op takes learnable values: Conv/ConvTranspose/Gemm weights
  and biases, BatchNormalization/InstanceNormalization/LayerNormalization/GroupNormalization scale and bias, PRelu
  slopes, and non-scalar constants of Add/Sub/Mul/MatMul (per-channel scales and shifts). Scalars of elementwise
  ops (hard-swish's 3 and 1/6, pre-processing), normalisation statistics, Clip bounds, Resize scales and shapes stay.
- Optimiser: Adam, with each tensor's learning rate `lr` times the tensor's RMS. Exported graphs hold weights of
  every scale (folded BatchNorm, pre-processing folded into the first conv) and Adam steps every element by about
  its learning rate, so one absolute rate is too large for some tensors and too small for others: on SINet an
  absolute 1e-3 (and 1e-2) broke the model in the first steps, and a relative 1e-3 still did; a relative 3e-4 (the
  default) raised fidelity on every corpus model tried, 1e-3 was faster on one and unstable on another.
  `batch_size` images per step (default 1: calibration sets are small), gradients accumulated image by image where
  the model has a static batch of 1, the image order of each epoch a permutation drawn from `seed`.
- Never worse on the calibration images: the loss over every image is measured before training and after each
  epoch; an epoch that does not lower it is undone and the learning rate divided by 3, so the written weights are
  those with the lowest calibration loss measured (the pruned model's own when no epoch helped). Adam's first step
  moves every weight by its full rate whatever its gradient; the first step of each fresh Adam is repeated at a
  third of the rate while it raises its own images' loss. (The EdgeTPU DeepLab of the corpus needs about 3e-5: at
  3e-4 one step multiplied the loss of one calibration image by 50; the other corpus models gain at 3e-4.) This
  costs one forward pass over the images per epoch.
- Deterministic: the same seed, inputs and device give the same bytes (torch's deterministic algorithms are switched
  on for the run and restored afterwards; torch's global random state is not touched).
- The teacher's targets (TeacherTargets) depend only on the full model, the images and the output plan: a budget
  search computes them once and passes them to each trial's `finetune`.

The trained values are written into a copy of the pruned ONNX model: same graph, same names, each initializer in its
own element type, so ONNX Runtime on the written model reproduces the trained torch outputs (float32 weights round
trip exactly; a float16 model gets its weights rounded once more).

    model = finetune(pruned, full, calibration_inputs, plan.sources, model.output_kind, model.class_axis, epochs=1)
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from disasm.attribution.interpreter import TorchGraph
from disasm.compiler.errors import DisasmError

LR = 3e-4
BATCH_SIZE = 1
LR_BACKOFF = 3.0  # the learning rate is divided by this when a step or an epoch makes the loss worse
MAX_BACKOFFS = 4  # at most this many divisions for the first step (3e-4 -> 3.7e-6)
OUTPUT_KINDS = ("logits", "probs", "sigmoid")

# Input positions at which an initializer is a learnable parameter. Elementwise ops (second set) only count non-scalar
# constants: a scalar there is part of an activation or pre-processing formula.
_PARAMETER_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2), "GroupNormalization": (1, 2), "PRelu": (1,),
    "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "MatMul": (0, 1),
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "MatMul"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# Ops between the final Softmax/Sigmoid and the scores that neither compute nor normalise them (as in compiler.load).
_NOT_SCORING = {"Identity", "Cast", "Dropout", "Resize", "Upsample", "Transpose"}
_HEAD_OPS = {"Concat", "Identity"}


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """Names of the float initializers finetuning trains (module docstring), in the file's order."""
    graph = model.graph
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer if t.data_type in _FLOAT_TYPES}
    good: set[str] = set()
    bad: set[str] = set()
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name not in sizes:
                continue
            learnable = (node.domain in ("", "ai.onnx") and position in _PARAMETER_INPUTS.get(node.op_type, ())
                         and (node.op_type not in _ELEMENTWISE or sizes[name] > 1))
            (good if learnable else bad).add(name)
    for sub in (a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH):
        bad.update(i for n in sub.node for i in n.input)  # read inside a subgraph: leave it alone
    return [t.name for t in graph.initializer if t.name in good and t.name not in bad]


class TeacherTargets:
    """What the full model answers on the calibration images, per image: the log-probabilities of the
    chosen-or-none channels (softmax models) or the logits of the chosen classes (sigmoid models), [pixels, channels],
    on the CPU. Computed once per compile: every budget trial trains against the same targets.

    Args: as `finetune`'s; `batch_size` images run at once (one where the model has a static batch of 1).
    """

    def __init__(self, full: onnx.ModelProto, inputs: np.ndarray, plan_sources: Sequence[Sequence[int]],
                 output_kind: str, class_axis: int, device: str = "cpu", batch_size: int = BATCH_SIZE):
        _check_kind(output_kind)
        if len(inputs) == 0:
            raise DisasmError("finetune: no calibration images")
        _deterministic_cublas(torch.device(device))
        self.sources = tuple(tuple(int(k) for k in s) for s in plan_sources)
        self.kind, self.class_axis, self.count = output_kind, class_axis, len(inputs)
        proto, scores, logits = _scores_graph(full, output_kind)
        graph = TorchGraph(_with_output(proto, scores), device=device)
        name = _single_input(graph, "full")
        step = 1 if _static_batch(full) else max(1, batch_size)
        self.per_image: list[torch.Tensor] = []
        with torch.no_grad():
            for first in range(0, len(inputs), step):
                x = torch.from_numpy(np.ascontiguousarray(inputs[first:first + step]))
                out = graph.run({name: x})[graph.output_names[0]].float()
                for one in out.split(1):
                    values = _classes_last(one, class_axis)
                    values = values if logits else _as_logits(values, output_kind)
                    self.per_image.append(_grouped(values, self.sources, output_kind).cpu())


class Finetuner:
    """The training state behind `finetune`: the student's parameters, the teacher's targets, Adam.

    `train_epoch()` runs one pass over the images; `outputs(x)` runs the pruned model (head and activation
    included) with the current weights in torch; `to_onnx()` writes them into a copy of the pruned model.
    Arguments as `finetune`'s.
    """

    def __init__(self, pruned: onnx.ModelProto, full: onnx.ModelProto, inputs: np.ndarray,
                 plan_sources: Sequence[Sequence[int]], output_kind: str, class_axis: int, seed: int = 0,
                 device: str = "cpu", lr: float = LR, batch_size: int = BATCH_SIZE,
                 teacher: TeacherTargets | None = None):
        _check_kind(output_kind)
        if batch_size < 1 or not lr > 0:
            raise DisasmError(f"finetune: batch size must be >= 1 and the learning rate > 0, got {batch_size}, {lr}")
        self.pruned = pruned
        self.inputs = np.ascontiguousarray(inputs)
        self.device = torch.device(device)
        _deterministic_cublas(self.device)
        self.teacher = teacher or TeacherTargets(full, inputs, plan_sources, output_kind, class_axis, device,
                                                 batch_size)
        sources = tuple(tuple(int(k) for k in s) for s in plan_sources)
        if (self.teacher.sources, self.teacher.kind, self.teacher.class_axis, self.teacher.count) != (
                sources, output_kind, class_axis, len(inputs)):
            raise DisasmError("finetune: the teacher's targets were computed for other images or another output")
        self.kind, self.class_axis, self.batch_size = output_kind, class_axis, batch_size
        self.epochs_done = 0
        self._order = np.random.default_rng(seed)
        self.trainable = trainable_initializers(pruned)
        if not self.trainable:
            raise DisasmError("finetune: the pruned model has no float weights to train")
        self._head = _head(pruned)
        proto, scores, self._student_logits = _scores_graph(pruned, output_kind)
        self.student = TorchGraph(_with_output(proto, scores), device=self.device)
        self.input_name = _single_input(self.student, "pruned")
        self.parameters = _make_trainable(self.student, self.trainable)
        self.lr = lr
        self._scales = _rms(self.parameters)
        self.optimizer = self._adam()
        self.micro = 1 if _static_batch(pruned) else batch_size  # images per forward pass
        self._groups: list[tuple[int, ...]] | None = None  # per output channel, its channels of the student's scores
        self._plain: TorchGraph | None = None
        self.initial_loss: float | None = None  # mean KL over the images before training, measured on first use
        self._best: tuple[float, dict[str, torch.Tensor]] | None = None  # lowest loss measured and its weights

    # -- training --------------------------------------------------------------------------------------------------

    def train_epoch(self) -> dict:
        """One pass over the images in a seeded order, `batch_size` per Adam step, then the loss over every image.
        Weights that lose to the best measured so far (the pruned model's to begin with) are put back and the
        learning rate is divided by LR_BACKOFF; the first step of each fresh Adam is repeated at a lower rate until
        it lowers its own images' loss (at most MAX_BACKOFFS times). Returns epoch, loss (mean KL per pixel over the
        images after the epoch's steps), kept (whether those weights were kept), lr (the rate the next epoch uses)."""
        if self._best is None:
            self.initial_loss = self.evaluate()
            self._best = (self.initial_loss, self._snapshot())
        order = self._order.permutation(len(self.inputs))
        with _deterministic():
            for first in range(0, len(order), self.batch_size):
                batch = order[first:first + self.batch_size]
                self.optimizer.zero_grad(set_to_none=True)
                before = 0.0
                for micro in range(0, len(batch), self.micro):
                    images = batch[micro:micro + self.micro]
                    loss, count = self._loss(images)
                    (loss / (count * len(batch) / len(images))).backward()
                    before += loss.item()
                if self.epochs_done == 0 and first == 0:
                    self._check_gradients()
                if self._fresh:
                    self._first_step(batch, before)
                else:
                    self.optimizer.step()
        self.epochs_done += 1
        loss = self.evaluate()
        kept = loss < self._best[0]
        if kept:
            self._best = (loss, self._snapshot())
        else:
            self._restore(self._best[1])
            self.lr /= LR_BACKOFF
            self.optimizer = self._adam()
        return {"epoch": self.epochs_done, "loss": loss, "kept": kept, "lr": self.lr}

    def _first_step(self, batch: np.ndarray, before: float) -> None:
        """Adam's first step (and the first after an undone epoch, with a fresh Adam) moves every weight by its full
        learning rate, whatever its gradient: on a sensitive model (the EdgeTPU DeepLab of the corpus) that can
        multiply the loss. Repeated from the same gradient at a lower rate while it raises the loss of its images."""
        start = self._snapshot()
        self._fresh = False
        for attempt in range(MAX_BACKOFFS + 1):
            self.optimizer.step()
            if attempt == MAX_BACKOFFS:
                return
            with torch.no_grad():
                after = sum(self._loss(batch[i:i + self.micro])[0].item() for i in range(0, len(batch), self.micro))
            if after <= before:
                return
            self._restore(start)  # the gradients stay
            self.lr /= LR_BACKOFF
            self.optimizer = self._adam()
            self._fresh = False

    def evaluate(self) -> float:
        """Mean KL per pixel over every image, at the current weights."""
        total, pixels = 0.0, 0
        with torch.no_grad(), _deterministic():
            for first in range(0, len(self.inputs), self.micro):
                loss, count = self._loss(np.arange(first, min(first + self.micro, len(self.inputs))))
                total, pixels = total + loss.item(), pixels + count
        return total / pixels

    def _adam(self) -> torch.optim.Adam:
        """Adam with one group per tensor, its learning rate `lr` times the tensor's RMS (module docstring)."""
        self._fresh = True  # its first step is checked (_first_step)
        return torch.optim.Adam([{"params": [p], "lr": self.lr * self._scales[name]}
                                 for name, p in self.parameters.items()])

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.parameters.items()}

    def _restore(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(values[name])

    def _loss(self, images: np.ndarray) -> tuple[torch.Tensor, int]:
        """The divergence summed over the pixels of these images, and their count."""
        x = torch.from_numpy(self.inputs[np.sort(images)])
        target = torch.cat([self.teacher.per_image[i] for i in np.sort(images)]).to(self.device)
        scores = _classes_last(self.student.run({self.input_name: x})[self.student.output_names[0]], self.class_axis)
        scores = scores if self._student_logits else _as_logits(scores, self.kind)
        student = _grouped(scores, self._student_groups(scores.shape[1]), self.kind)
        return _divergence(student, target, self.kind), len(target)

    def _student_groups(self, channels: int) -> list[tuple[int, ...]]:
        if self._groups is None:
            groups = self._head.groups(channels)
            if len(groups) != len(self.teacher.sources) or max(max(g) for g in groups) >= channels:
                raise DisasmError(f"finetune: the pruned output has {len(groups)} channels made from {channels} "
                                  f"scores, but the output plan lists {len(self.teacher.sources)} channels")
            self._groups = groups
        return self._groups

    def _check_gradients(self) -> None:
        """Some parameter must reach the loss: if none does, the interpreter no longer reads its initializers from
        the constants finetuning replaced, and training would silently change nothing. (A single parameter without
        gradient is possible: one behind a comparison or an ArgMax; it stays as it is.)"""
        if all(p.grad is None for p in self.parameters.values()):
            raise DisasmError("finetune: no gradient reaches any weight: the interpreter does not read the "
                              "initializers from its constants at run time")

    # -- results ---------------------------------------------------------------------------------------------------

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The pruned model's own output (head and final activation included) with the current weights, in torch."""
        if self._plain is None:
            self._plain = TorchGraph(self.pruned, device=self.device)
            for name, parameter in self.parameters.items():
                self._plain.set_constant(name, parameter)
        with torch.no_grad():
            out = self._plain.run({self.input_name: torch.from_numpy(np.ascontiguousarray(x))})
        return out[self._plain.output_names[0]].cpu().numpy()

    def round_to_onnx_types(self) -> None:
        """Rounds each parameter to its initializer's element type (float16, bfloat16), so that torch computes with
        the weights the written model holds."""
        types = {t.name: t.data_type for t in self.pruned.graph.initializer}
        low = {onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                if types[name] in low:
                    parameter.copy_(parameter.to(low[types[name]]).to(parameter.dtype))

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the pruned model with the trained weights, each initializer in its own element type."""
        model = onnx.ModelProto()
        model.CopyFrom(self.pruned)
        for tensor in model.graph.initializer:
            parameter = self.parameters.get(tensor.name)
            if parameter is None:
                continue
            value = parameter.detach().cpu().numpy().astype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
            tensor.CopyFrom(numpy_helper.from_array(value.reshape(tuple(tensor.dims)), tensor.name))
        return model


def finetune(pruned: onnx.ModelProto, full: onnx.ModelProto, inputs: np.ndarray,
             plan_sources: Sequence[Sequence[int]], output_kind: str, class_axis: int, epochs: int, seed: int = 0,
             device: str = "cpu", lr: float = LR, batch_size: int = BATCH_SIZE,
             progress: Callable[[int], None] | None = None, history: list[dict] | None = None,
             teacher: TeacherTargets | None = None) -> onnx.ModelProto:
    """The pruned model with its weights trained for `epochs` passes over `inputs`, the full model as teacher.

    Args:
        pruned: the specialised model (compiler.pipeline.specialise(...).pruned), one input, one output.
        full: the full model it was cut from (Model.proto: one head, the same input).
        inputs: preprocessed calibration images [N, ...] as the models take them (never the judged ones).
        plan_sources: per output channel of `pruned`, the full model's class ids it is the max of (OutputPlan.sources).
        output_kind: the full model's output kind, "logits", "probs" or "sigmoid" (Model.output_kind).
        class_axis: the axis of both outputs that holds the classes (Model.class_axis).
        epochs: passes over the images (0: the pruned model unchanged, as a copy).
        seed: draws the image order of each epoch; the same seed gives the same bytes (on the same device).
        device: "cpu", "cuda", ...
        lr: Adam's learning rate relative to each tensor's RMS (see the module docstring).
        batch_size: images per Adam step.
        progress: called with the number of epochs done after each epoch.
        history: when given, one dict per epoch is appended: epoch, loss (mean KL per pixel over `inputs` after the
            epoch), kept (whether the epoch's weights were kept), lr (for the next epoch), initial_loss (before
            training), seconds since the start.
        teacher: the full model's targets on `inputs` (TeacherTargets), when several pruned models train against
            the same images; computed here otherwise.

    Returns:
        A copy of `pruned` with the trained weights (same graph and names; see the module docstring).
    """
    if epochs < 0:
        raise DisasmError(f"finetune: epochs must be >= 0, got {epochs}")
    if epochs == 0:
        copy = onnx.ModelProto()
        copy.CopyFrom(pruned)
        return copy
    start = time.perf_counter()
    trainer = Finetuner(pruned, full, inputs, plan_sources, output_kind, class_axis, seed, device, lr, batch_size,
                        teacher)
    for epoch in range(epochs):
        record = trainer.train_epoch()
        if history is not None:
            history.append(record | {"initial_loss": trainer.initial_loss,
                                     "seconds": round(time.perf_counter() - start, 3)})
        if progress:
            progress(epoch + 1)
    trainer.round_to_onnx_types()
    return trainer.to_onnx()


# ---------------------------------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------------------------------


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output if name}


def _constant_ints(graph: onnx.GraphProto, name: str) -> list[int] | None:
    for tensor in graph.initializer:
        if tensor.name == name:
            return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            value = next((a for a in node.attribute if a.name == "value"), None)
            return None if value is None else [int(v) for v in numpy_helper.to_array(value.t).reshape(-1)]
    return None


@dataclass(frozen=True)
class _Head:
    """How the output is made from one tensor of scores: `scores`, and per output channel the channels of `scores`
    it is the max of (`parts`: per piece of the output, its channels of `scores` or None for all of them, and
    whether a ReduceMax folds the piece into one channel)."""

    scores: str
    parts: tuple[tuple[tuple[int, ...] | None, bool], ...]

    def groups(self, channels: int) -> list[tuple[int, ...]]:
        groups: list[tuple[int, ...]] = []
        for part, folded in self.parts:
            part = tuple(range(channels)) if part is None else part
            groups.extend([part] if folded else [(c,) for c in part])
        return groups


def _head(model: onnx.ModelProto) -> _Head:
    """The chosen-or-none head of compiler.outputs, read from the graph: the output as a Concat (or Identity) of
    pieces of one score tensor, each a Gather, a Split output or the whole tensor, some folded by a ReduceMax. Without
    such a head, the output itself holds one channel per output channel."""
    graph = model.graph
    output = graph.output[0].name
    plain = _Head(output, ((None, False),))
    producers = _producers(graph)
    node = producers.get(output)
    if node is None or node.op_type not in _HEAD_OPS:
        return plain
    read, parts = set(), []
    for name in node.input:
        piece = producers.get(name)
        folded = piece is not None and piece.op_type == "ReduceMax"
        if folded:
            name = piece.input[0]
            piece = producers.get(name)
        if piece is not None and piece.op_type == "Gather":
            channels = _constant_ints(graph, piece.input[1])
            if channels is None:
                return plain
            read.add(piece.input[0])
        elif piece is not None and piece.op_type == "Split":
            sizes = (_constant_ints(graph, piece.input[1]) if len(piece.input) > 1 and piece.input[1]
                     else next((list(a.ints) for a in piece.attribute if a.name == "split"), None))
            if sizes is None:
                return plain
            start = sum(sizes[:list(piece.output).index(name)])
            channels = list(range(start, start + sizes[list(piece.output).index(name)]))
            read.add(piece.input[0])
        else:
            channels = None
            read.add(name)
        parts.append((None if channels is None else tuple(channels), folded))
    if len(read) != 1:
        return plain
    return _Head(read.pop(), tuple(parts))


def _scores_graph(model: onnx.ModelProto, output_kind: str) -> tuple[onnx.ModelProto, str, bool]:
    """(a copy of the model whose final Softmax/Sigmoid is an Identity, the tensor holding its class scores, whether
    they are logits). The scores are the head's input where there is a head, else the output."""
    scores = _head(model).scores
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    if output_kind == "logits":
        return proto, scores, True
    producers = _producers(proto.graph)
    wanted = "Softmax" if output_kind == "probs" else "Sigmoid"
    name = scores
    while name in producers and producers[name].op_type in _NOT_SCORING:
        name = producers[name].input[0]
    node = producers.get(name)
    if node is None or node.op_type != wanted:
        return proto, scores, False  # probabilities without a final activation to strip: read through a log
    node.CopyFrom(helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name))
    return proto, scores, True


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model with `name` as its only output, without the nodes it no longer needs."""
    if model.graph.output[0].name == name and len(model.graph.output) == 1:
        return model
    producers = _producers(model.graph)
    needed, stack = set(), [name]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in model.graph.node if id(n) in needed]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    model.graph.output.append(helper.make_empty_tensor_value_info(name))
    return model


def _static_batch(model: onnx.ModelProto) -> bool:
    """Whether the image input has a fixed batch size (then images run one at a time)."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in initializers:
            dims = value.type.tensor_type.shape.dim
            return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0
    return False


def _single_input(graph: TorchGraph, which: str) -> str:
    if len(graph.input_names) != 1:
        raise DisasmError(f"finetune: the {which} model takes {graph.input_names}; expected one image input")
    return graph.input_names[0]


def _make_trainable(graph: TorchGraph, names: list[str]) -> dict[str, torch.nn.Parameter]:
    constants = graph.constants
    missing = [n for n in names if n not in constants]
    if missing:
        raise DisasmError(f"finetune: the interpreter holds no value for the initializers {missing[:5]}")
    parameters = {}
    for name in names:
        parameters[name] = torch.nn.Parameter(constants[name].detach().clone().float())
        graph.set_constant(name, parameters[name])
    return parameters


def _check_kind(output_kind: str) -> None:
    if output_kind not in OUTPUT_KINDS:
        raise DisasmError(f"finetune: output kind {output_kind!r}; expected one of {', '.join(OUTPUT_KINDS)}")


def _classes_last(scores: torch.Tensor, class_axis: int) -> torch.Tensor:
    """[pixels, classes] from an output with its classes on `class_axis`."""
    return scores.movedim(class_axis, -1).reshape(-1, scores.shape[class_axis])


def _grouped(scores: torch.Tensor, groups: Sequence[Sequence[int]], kind: str) -> torch.Tensor:
    """Per pixel and output channel: the log-probability of the channel's classes (softmax models), the logit of
    its class (sigmoid models)."""
    if kind == "sigmoid":
        return scores[:, [g[0] for g in groups]]
    return _grouped_log_probs(scores, groups)


def _divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(teacher || student) summed over pixels: of the chosen-or-none distributions (softmax models; arguments are
    log-probabilities), of each chosen class's Bernoulli (sigmoid models; arguments are logits)."""
    if kind == "sigmoid":
        p = torch.sigmoid(teacher)
        cross = F.binary_cross_entropy_with_logits(student, p, reduction="sum")
        entropy = F.binary_cross_entropy_with_logits(teacher, p, reduction="sum")
        return cross - entropy
    p = teacher.exp()
    return (p * (teacher - student)).sum()


def _rms(parameters: dict[str, torch.nn.Parameter]) -> dict[str, float]:
    """Each tensor's RMS; an all-zero tensor takes the median RMS of the others."""
    scales = {name: float(p.detach().pow(2).mean().sqrt()) for name, p in parameters.items()}
    fallback = float(np.median([v for v in scales.values() if v > 0] or [1.0]))
    return {name: v or fallback for name, v in scales.items()}


def _grouped_log_probs(scores: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """log P(channel c) per pixel, where P is the softmax over every class in some group and channel c takes the
    probability of its group's classes: logsumexp over the group minus logsumexp over all groups' classes."""
    union = sorted({k for g in groups for k in g})
    if union == list(range(scores.shape[1])):
        norm = torch.logsumexp(scores, dim=1)
    else:
        norm = torch.logsumexp(scores[:, union], dim=1)
    parts = [scores[:, g[0]] if len(g) == 1 else torch.logsumexp(scores[:, list(g)], dim=1) for g in groups]
    return torch.stack(parts, dim=1) - norm[:, None]


def _as_logits(probabilities: torch.Tensor, kind: str) -> torch.Tensor:
    """Probabilities read back as logits (for a model whose final activation could not be stripped)."""
    p = probabilities.clamp(1e-7, 1 - 1e-7)
    return torch.log(p) - torch.log1p(-p) if kind == "sigmoid" else torch.log(p)


def _deterministic_cublas(device: torch.device) -> None:
    """cuBLAS is deterministic only with a fixed workspace, which it reads when this process first uses it."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextmanager
def _deterministic() -> Iterator[None]:
    """torch's deterministic algorithms (and cuDNN's) for the duration, restored afterwards. Ops without a
    deterministic implementation warn instead of failing; those warnings are not shown."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


__all__ = ["Finetuner", "TeacherTargets", "finetune", "trainable_initializers"]
