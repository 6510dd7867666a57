"""Sequential least squares: refit the consumers of cut channels one depth level at a time, each on the inputs the
already-pruned (and already-refitted) network gives it, towards the full network's own outputs (ThiNet, Luo et al.
2017; channel pruning, He et al. 2017).

The independent refit (attribution.compensate.lsq_compensation) fits every consumer on the *full* network's inputs:
once an upstream consumer is cut and refitted, a downstream consumer no longer sees those inputs, and the errors
compound. Here a consumer c with kept input patch z' (from the pruned network) and full input patch z (from the full
network, same image and pixel) gets
    Theta'_K = argmin E||Theta'_K z' - Theta z||^2 + lam ||Theta'_K - Theta0_K||^2
             = (Theta B^T + lam Theta0_K) (A + lam I)^-1,      A = E[z' z'^T],  B = E[z' z^T],
with the anchor Theta0_K the kept columns whose bias makes the output means agree (Theta0_K E[z'] = Theta E[z]) and
lam = ridge * mean diagonal of A, as in compensate.refit. When nothing upstream of c is cut, z' is the kept part of z
and this is exactly the independent refit. Consumers the refit cannot model (grouped convs, ConvTranspose, a
squeeze-excite Gemm, convs with more than `max_features` patch entries) get the bias that matches the output means
the same way (b' = b + W E[x] - W_K E[x'_K], W summed over taps): the sequential form of the mean fold.

Bookkeeping. The pruned network is the masked reference (compiler.prune.masked_reference: removed channels zeroed at
every consumer; the surgery is tested to equal it), whose tensors keep their names and full channel counts; the kept
channels of a consumer's input are read from it. A consumer's level is 1 + the largest level of the cut consumers
upstream of it (1: none). Every node gets the stage of the deepest cut consumer upstream of it (or its own level),
which orders the graph topologically; stage s is run as one ONNX sub-graph (ONNX Runtime on the CPU, where it is
several times faster than attribution.interpreter.TorchGraph, which runs it on other devices), for the full and the
pruned network, a batch of calibration images at a time (one for a static batch), keeping only the tensors later
stages read. Before stage s runs, the consumers of level s are refitted from the moments of their inputs, and their
new weights go into the pruned network. So the full and the pruned network each run once over the calibration
images, up to the deepest consumer. Products of patches are summed in float64; the result is deterministic.

scope='downstream' also refits every conv behind a cut that reads nothing cut (all its inputs kept): its inputs
changed too. Measured in benchmarks/results/frontier.md, it is not the default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from disasm.attribution.compensate import (DEFAULT_RIDGE, CutConsumer, consumer_at, cut_consumers, kept_features,
                                           refit_cross, theta_matrix)
from disasm.attribution.interpreter import TorchGraph, topological_order
from disasm.attribution.moments import MAX_FEATURES, Consumer, patches
from disasm.compiler.channels import ChannelAnalysis
from disasm.compiler.errors import DisasmError
from disasm.compiler.prune import masked_reference

PIXEL_CHUNK = 4096  # patch rows multiplied at once in float32, their products summed in float64


@dataclass
class _Fit:
    """What one consumer accumulates over the calibration images."""

    consumer: CutConsumer
    output: str                         # its first output's name: how it is found in both networks
    level: int = 0
    patch: Consumer | None = None       # plain convs refitted by least squares: the full input's unfolding
    kept_patch: Consumer | None = None  # ... and the kept input's
    cross: np.ndarray | None = None     # sum z' z^T  (kept x full patch entries)
    kept_moment: np.ndarray | None = None  # sum z' z'^T
    full_sum: np.ndarray | None = None  # sum z (fallbacks: per-channel sums of the full input)
    kept_sum: np.ndarray | None = None  # sum z' (fallbacks: of the pruned input, all channels; kept ones are read)
    count: float = 0.0                  # pixels (rows) summed


@dataclass
class SequentialRefit:
    replacements: dict[tuple[int, int], np.ndarray]
    fallbacks: list[str]                # consumers not refitted by least squares (their bias matches the means)
    levels: int                         # depth of the chain of cut consumers (stages run)
    stage_seconds: list[float] = field(default_factory=list)


def _patch_consumer(c: CutConsumer, channels: int) -> Consumer:
    spec = c.spec
    pads = spec.pads
    return Consumer(c.node, c.name, c.tensor, channels, spec.kernel, spec.strides, spec.dilations,
                    (pads[0], pads[1], pads[2], pads[3]), spec.auto_pad)


def _refittable(c: CutConsumer, max_features: int) -> bool:
    return c.plain and len(c.spec.kernel) == 2 and c.spec.in_channels * int(np.prod(c.spec.kernel)) <= max_features


class _Network:
    """A graph split into stages (see the module docstring), built stage by stage as ONNX sub-graphs."""

    def __init__(self, proto: onnx.ModelProto, fits: dict[str, _Fit]):
        graph = proto.graph
        self.proto = proto
        self.initializers = {t.name: t for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in self.initializers]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in graph.node for a in n.attribute):
            raise DisasmError("sequential refit: graphs with sub-graphs (If/Loop/Scan) are not supported")
        self.nodes = topological_order(list(graph.node), set(self.input_names) | set(self.initializers))
        by_output = {o: n for n in self.nodes for o in n.output if o}
        missing = [name for name in fits if name not in by_output]
        if missing:
            raise DisasmError(f"sequential refit: consumers {missing[:3]} not found in the pruned network")
        self.consumers = {id(by_output[name]): fits[name] for name in fits}
        self.stage: dict[int, int] = {}
        reach: dict[str, int] = {}  # tensor -> stage of its producer
        for n in self.nodes:
            upstream = max((reach.get(i, 0) for i in n.input if i), default=0)
            fit = self.consumers.get(id(n))
            if fit is not None:
                fit.level = max(fit.level, upstream + 1)  # both networks agree: same structure
            stage = fit.level if fit is not None else upstream
            self.stage[id(n)] = stage
            for o in n.output:
                reach[o] = stage
        # nodes worth running: those the consumers' inputs depend on
        wanted = {f.consumer.tensor for f in fits.values()}
        self.needed: set[int] = set()
        for n in reversed(self.nodes):
            if any(o in wanted for o in n.output):
                self.needed.add(id(n))
                wanted.update(i for i in n.input if i)
        self.overrides: dict[str, np.ndarray] = {}  # initializer name -> value (refitted weights)
        self.renamed: dict[tuple[int, int], str] = {}  # (node id, input index) -> new input name

    def set_input(self, fit: _Fit, index: int, value: np.ndarray) -> None:
        node = next(n for n in self.nodes if id(n) in self.consumers and self.consumers[id(n)] is fit)
        name = f"{fit.output}__sequential_refit_{index}"
        self.renamed[(id(node), index)] = name
        self.overrides[name] = np.ascontiguousarray(value)

    def _node_inputs(self, n: onnx.NodeProto) -> list[str]:
        inputs = list(n.input)
        for (node_id, index), name in self.renamed.items():
            if node_id == id(n):
                inputs += [""] * (index + 1 - len(inputs))
                inputs[index] = name
        return inputs

    def stage_graph(self, s: int, later_reads: set[str],
                    env: dict[str, torch.Tensor]) -> tuple[onnx.ModelProto | None, list[str]]:
        """Stage s as an ONNX model: its inputs are what earlier stages (or the image) computed, typed like their
        values in `env`; its outputs what later stages read."""
        nodes = [n for n in self.nodes if self.stage[id(n)] == s and id(n) in self.needed]
        produced = {o for n in nodes for o in n.output if o}
        outputs = [o for n in nodes for o in n.output if o and o in later_reads]
        if not outputs:
            return None, []
        copies, reads, consts = [], [], {}
        for n in nodes:
            inputs = self._node_inputs(n)
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            del copy.input[:]
            copy.input.extend(inputs)
            copies.append(copy)
            for i in inputs:
                if not i or i in produced or i in consts:
                    continue
                if i in self.overrides:
                    consts[i] = numpy_helper.from_array(self.overrides[i], i)
                elif i in self.initializers:
                    consts[i] = self.initializers[i]
                elif i not in reads:
                    reads.append(i)
        types = [helper.np_dtype_to_tensor_dtype(np.dtype(str(env[i].dtype).removeprefix("torch."))) for i in reads]
        graph = helper.make_graph(copies, f"stage{s}",
                                  [helper.make_tensor_value_info(i, t, None) for i, t in zip(reads, types)],
                                  [onnx.ValueInfoProto(name=o) for o in outputs], list(consts.values()))
        model = helper.make_model(graph, opset_imports=list(self.proto.opset_import))
        model.ir_version = self.proto.ir_version
        return model, reads

    def reads_after(self, s: int) -> set[str]:
        """Tensors read by the needed nodes of stages after s, and the inputs of consumers of levels after s."""
        reads = {i for n in self.nodes if self.stage[id(n)] > s and id(n) in self.needed for i in self._node_inputs(n)}
        reads |= {f.consumer.tensor for f in self.consumers.values() if f.level > s}
        return reads


def _runner(model: onnx.ModelProto, device: str, threads: int | None) -> Callable[[dict], dict]:
    """Runs a stage: ONNX Runtime on the CPU (several times faster there than the interpreter, and what the pruned
    model is judged with), attribution.interpreter.TorchGraph on other devices. Values are torch tensors."""
    if torch.device(device).type != "cpu":
        graph = TorchGraph(model, device=device)

        def run_torch(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return graph.run(feeds)
        return run_torch
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run_ort(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = session.run(names, {k: v.numpy() for k, v in feeds.items()})
        return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(names, values)}
    return run_ort


def _patches(x: torch.Tensor, c: Consumer) -> torch.Tensor:
    """[B * positions, C*k*k] unfolded input patches, as moments.patches but without its trailing column of ones,
    and without copies where none are needed (1x1 convs, symmetric padding)."""
    top, left, bottom, right = c.pads
    if c.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return patches(x, c)[:, :-1]
    if c.auto_pad == "VALID":
        top = left = bottom = right = 0
    if c.kernel == (1, 1) and not any((top, left, bottom, right)):
        x = x[:, :, ::c.stride[0], ::c.stride[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if (top, left) == (bottom, right):
        z = F.unfold(x, c.kernel, dilation=c.dilation, padding=(top, left), stride=c.stride)
    else:
        z = F.unfold(F.pad(x, (left, right, top, bottom)), c.kernel, dilation=c.dilation, stride=c.stride)
    return z.transpose(1, 2).reshape(-1, z.shape[1])


def _add(total: np.ndarray | None, value: torch.Tensor) -> np.ndarray:
    value = value.double().cpu().numpy()
    return value if total is None else total + value


def _accumulate(fit: _Fit, full: torch.Tensor, pruned: torch.Tensor) -> None:
    """Adds one batch: for a refit, the sums of z' z^T, z' z'^T, z' and z (float32 products of PIXEL_CHUNK rows,
    summed in float64); for a mean match, the per-channel sums of both inputs."""
    c = fit.consumer
    if fit.patch is not None:
        z = _patches(full, fit.patch)
        zk = _patches(pruned.index_select(1, torch.as_tensor(c.kept, device=pruned.device)), fit.kept_patch)
        for start in range(0, z.shape[0], PIXEL_CHUNK):
            a, b = zk[start:start + PIXEL_CHUNK], z[start:start + PIXEL_CHUNK]
            ones = torch.ones(1, a.shape[0], dtype=a.dtype, device=a.device)
            fit.cross = _add(fit.cross, a.T @ b)
            fit.kept_moment = _add(fit.kept_moment, a.T @ a)
            fit.kept_sum = _add(fit.kept_sum, (ones @ a)[0])  # a matrix product: fast on the strided unfolding
            fit.full_sum = _add(fit.full_sum, (ones @ b)[0])
        fit.count += float(z.shape[0])
        return
    axes = [a for a in range(full.dim()) if a != 1]
    fit.full_sum = _add(fit.full_sum, full.sum(dim=axes, dtype=torch.float64))
    fit.kept_sum = _add(fit.kept_sum, pruned.sum(dim=axes, dtype=torch.float64))
    fit.count += float(full.numel() // full.shape[1])


def _with_ones(moment: np.ndarray, left: np.ndarray, right: np.ndarray, count: float) -> np.ndarray:
    """E[[u;1][v;1]^T] from sum u v^T, sum u, sum v and the count."""
    out = np.empty((moment.shape[0] + 1, moment.shape[1] + 1))
    out[:-1, :-1], out[:-1, -1], out[-1, :-1], out[-1, -1] = moment, left, right, count
    return out / count


def _solve(fit: _Fit, ridge: float) -> dict[int, np.ndarray]:
    """New inputs of the consumer: {1: weight, 2: bias} for a least-squares refit (original shapes, removed columns
    keeping their original values as compensate.lsq_compensation returns them), {2: bias} for the mean match."""
    c = fit.consumer
    if fit.count == 0:
        return {}
    if fit.patch is not None:
        weight = c.spec.weight
        taps = int(np.prod(c.spec.kernel))
        features = weight.shape[1] * taps
        theta = theta_matrix(weight, c.bias)
        columns = kept_features(c.kept, taps, features)
        new = theta.copy()
        kept_moment = _with_ones(fit.kept_moment, fit.kept_sum, fit.kept_sum, fit.count)
        cross = _with_ones(fit.cross, fit.kept_sum, fit.full_sum, fit.count)
        if c.fixed_bias:  # no intercept: drop the trailing 1 of z'
            columns, kept_moment, cross = columns[:-1], kept_moment[:-1, :-1], cross[:-1]
        new[:, columns] = refit_cross(theta, kept_moment, cross, columns, ridge)
        out = {1: new[:, :features].reshape(weight.shape).astype(weight.dtype)}
        return out if c.fixed_bias else out | {2: new[:, features].astype(weight.dtype)}
    if c.fixed_bias:
        return {}
    full_mean, kept_mean = fit.full_sum / fit.count, fit.kept_sum / fit.count
    delta = c.weights @ full_mean - c.weights[:, c.kept] @ kept_mean[c.kept]
    bias = (c.bias + delta) / c.bias_scale
    return {2: bias.reshape(c.bias_shape).astype(c.bias.dtype)}


def _masked_value(fit: _Fit, index: int, value: np.ndarray) -> np.ndarray:
    """What the masked network's consumer holds: a refitted weight with the removed input channels zeroed."""
    if index != 1:
        return value
    masked = np.zeros_like(value)
    masked[:, fit.consumer.kept] = value[:, fit.consumer.kept]
    return masked


def _downstream(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                cut: list[CutConsumer]) -> list[CutConsumer]:
    """Every conv and Gemm (with constant weights) that reads nothing cut but whose input the cuts upstream change:
    the descendants of the cut consumers."""
    graph = gs.import_onnx(model)
    nodes = list(model.graph.node)
    position = {id(n): i for i, n in enumerate(nodes)}
    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input} | initializers
    tainted = {nodes[c.node].output[0] for c in cut}
    done = {c.node for c in cut}
    found = []
    for n in topological_order(nodes, inputs):
        if not any(i in tainted for i in n.input if i):
            continue
        tainted.update(o for o in n.output if o)
        index = position[id(n)]
        if index not in done and n.input and n.input[0] in tainted:
            consumer = consumer_at(graph, index, analysis, keep_sets)
            if consumer is not None:
                found.append(consumer)
    return found


def sequential_compensation(model: onnx.ModelProto, analysis: ChannelAnalysis, keep_sets: dict[int, np.ndarray],
                            inputs: np.ndarray, ridge: float = DEFAULT_RIDGE, device: str = "cpu",
                            max_features: int = MAX_FEATURES, batch_size: int = 1, threads: int | None = None,
                            scope: str = "cut", progress: Callable[[int, int], None] | None = None) -> SequentialRefit:
    """New weights and biases (original shapes, keyed by (node index, input index) like lsq_compensation) for every
    consumer that reads cut channels, refitted level by level on the calibration `inputs` ([N, ...] preprocessed
    images, run `batch_size` at a time: 1 for models with a static batch). Plain convs with at most `max_features`
    patch entries get the least-squares refit; the others the mean-matching bias (named in `fallbacks`), or nothing
    where they have no bias to adjust. scope: 'cut' (the consumers of cut channels) or 'downstream' (also every conv
    and Gemm behind them)."""
    consumers = list(cut_consumers(model, analysis, keep_sets))
    if not consumers:
        return SequentialRefit({}, [], 0)
    if scope == "downstream":
        consumers += _downstream(model, analysis, keep_sets, consumers)
    elif scope != "cut":
        raise ValueError(f"scope must be 'cut' or 'downstream', got {scope!r}")
    fits: dict[str, _Fit] = {}
    for c in consumers:
        fit = _Fit(c, model.graph.node[c.node].output[0])
        if _refittable(c, max_features):
            fit.patch, fit.kept_patch = _patch_consumer(c, c.spec.in_channels), _patch_consumer(c, len(c.kept))
        fits[fit.output] = fit
    masked_proto = masked_reference(model, analysis, keep_sets)
    full, pruned = _Network(model, fits), _Network(masked_proto, fits)
    levels = max(f.level for f in fits.values())
    if len(full.input_names) != 1 or len(pruned.input_names) != 1:
        raise DisasmError("sequential refit: the model must have exactly one image input")
    batches = [torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size]))
               for i in range(0, len(inputs), batch_size)]
    envs_full = [{full.input_names[0]: b.to(device)} for b in batches]
    envs_pruned = [{pruned.input_names[0]: b.to(device)} for b in batches]
    replacements: dict[tuple[int, int], np.ndarray] = {}
    seconds: list[float] = []
    for level in range(1, levels + 1):
        start = time.perf_counter()
        # run stage level-1, which computes the inputs of this level's consumers
        for network, envs in ((full, envs_full), (pruned, envs_pruned)):
            later = network.reads_after(level - 1)
            stage, reads = network.stage_graph(level - 1, later, envs[0])
            run = None if stage is None else _runner(stage, device, threads)
            for env in envs:
                if run is not None:
                    env.update(run({r: env[r] for r in reads}))
                for name in [k for k in env if k not in later]:
                    del env[name]
        now = [f for f in fits.values() if f.level == level]
        for fit in now:
            for env_f, env_p in zip(envs_full, envs_pruned):
                _accumulate(fit, env_f[fit.consumer.tensor], env_p[fit.consumer.tensor])
            for index, value in _solve(fit, ridge).items():
                replacements[(fit.consumer.node, index)] = value
                pruned.set_input(fit, index, _masked_value(fit, index, value))
            fit.cross = fit.kept_moment = None  # free the moments
        seconds.append(time.perf_counter() - start)
        if progress is not None:
            progress(level, levels)
    fallbacks = [f.consumer.name for f in fits.values() if f.patch is None]
    return SequentialRefit(replacements, fallbacks, levels, seconds)
