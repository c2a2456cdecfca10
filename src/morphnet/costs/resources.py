"""Resource functions: turn the channel analysis into a cost program.

A cost program is a list of *terms*, each attached to a layer (an op) and a kind
(compute or memory). With A(S) = alive channels of element set S and R(S) = the sum
of the regularization vector over S:

- bilinear term  c * A(x) * A(y)      regularizer  c * (A(x) R(y) + A(y) R(x))
- linear term    c * A(x)             regularizer  c * (R(x) + R(z))   (z: depthwise input)
- constant       c                    regularizer  0

Costs describe the inference network: ops of branches that run only in training
(auxiliary heads) are analyzed for channel groups but cost nothing, except in model
size, which counts every conv / linear weight of the module.

Conventions (docs/architecture.md, sections 3-5): FLOPs per example are 2 x MACs of conv and linear
ops and of the products between activations (attention's q.k^T and attn x v, linear
in the heads they carry); grouped convs divide by the groups (which pruning keeps); depthwise convs cost
C * A_out. Model size counts conv / linear weights once per parameter. Activation
count is A_out per conv / linear call. Memory is 4 bytes per element of
(inputs + outputs) x batch + weights. Latency is, per op, the max of
FLOPs x batch / peak and bytes / bandwidth (roofline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from morphnet.channels.walker import ChannelAnalysis
from morphnet.costs.hardware import Hardware

COMPUTE, MEMORY = 0, 1
BYTES_PER_ELEMENT = 4


@dataclass
class CostProgram:
    """Element sets and cost terms; evaluated by ``morphnet.evaluation``."""

    sets: list[np.ndarray] = field(default_factory=list)
    layer_modules: list[str] = field(default_factory=list)
    bilinear: list[tuple[int, int, float, int, int]] = field(default_factory=list)  # layer, kind, c, x, y
    linear: list[tuple[int, int, float, int, int]] = field(default_factory=list)  # layer, kind, c, x, z
    const: list[tuple[int, int, float]] = field(default_factory=list)  # layer, kind, c
    roofline: bool = False
    _set_ids: dict = field(default_factory=dict)

    def set_of(self, ids: np.ndarray | None) -> int:
        """Index of an element set (-1 for none); identical arrays share one set."""
        if ids is None:
            return -1
        key = id(ids)
        if key not in self._set_ids:
            self._set_ids[key] = (len(self.sets), ids)
            self.sets.append(ids)
        return self._set_ids[key][0]

    def layer(self, module: str) -> int:
        """A new layer (op) of ``module``; costs and terms are bucketed per layer."""
        self.layer_modules.append(module)
        return len(self.layer_modules) - 1


def _inference_calls(a: ChannelAnalysis):
    """Layer calls that also run in eval mode: training-only branches cost nothing at inference."""
    return [c for c in a.layer_calls if not a.graph.training_only(a.graph.nodes[c.node].module)]


def _flops(p: CostProgram, a: ChannelAnalysis, layer_of=None, scale: float = 1.0) -> None:
    for call in _inference_calls(a):
        li = layer_of(call) if layer_of else p.layer(call.module)
        x, y = p.set_of(call.in_ids), p.set_of(call.out_ids)
        if call.depthwise:
            p.linear.append((li, COMPUTE, call.flop_coef * scale, y, x))
        else:
            p.bilinear.append((li, COMPUTE, call.flop_coef / call.groups * scale, x, y))
    for prod in a.products:  # products between activations (attention): linear in the heads they carry
        if a.graph.training_only(prod.module):
            continue
        li = layer_of(prod) if layer_of else p.layer(prod.module)
        if prod.ids is None:
            p.const.append((li, COMPUTE, prod.flop_coef * scale))
        else:
            p.linear.append((li, COMPUTE, prod.flop_coef * scale, p.set_of(prod.ids), -1))


def _size(p: CostProgram, a: ChannelAnalysis) -> None:
    for wi in a.weights.values():
        li = p.layer(wi.module)
        x, y = p.set_of(wi.in_ids), p.set_of(wi.out_ids)
        if wi.depthwise:
            p.linear.append((li, COMPUTE, float(wi.kernel), y, x))
        else:
            p.bilinear.append((li, COMPUTE, wi.kernel / wi.groups, x, y))


def _activations(p: CostProgram, a: ChannelAnalysis) -> None:
    for call in _inference_calls(a):
        li = p.layer(call.module)
        p.linear.append((li, COMPUTE, 1.0, p.set_of(call.out_ids), -1))


def _memory(p: CostProgram, a: ChannelAnalysis, batch_size: int, scale: float, layer_of) -> None:
    b = BYTES_PER_ELEMENT * scale
    for call in _inference_calls(a):
        li = layer_of(call)
        x, y = p.set_of(call.in_ids), p.set_of(call.out_ids)
        p.linear.append((li, MEMORY, b * batch_size * call.in_numel, x, -1))
        p.linear.append((li, MEMORY, b * batch_size * call.out_numel, y, -1))
        if call.weight:
            if call.depthwise:
                p.linear.append((li, MEMORY, b * call.kernel, y, -1))
            else:
                p.bilinear.append((li, MEMORY, b * call.kernel / call.groups, x, y))
    products = {prod.node for prod in a.products}
    for op in a.data_ops:
        if a.graph.training_only(op.module) or _is_dropout(a.graph.module_types.get(op.module)):
            continue
        li = layer_of(op) if op.node in products else p.layer(op.module)  # one roofline with its FLOPs
        for use in op.uses:
            if use.ids is None:
                p.const.append((li, MEMORY, b * batch_size * use.numel))
            else:
                p.linear.append((li, MEMORY, b * batch_size * use.numel, p.set_of(use.ids), -1))


def _is_dropout(module_type) -> bool:
    """Dropout and stochastic depth are identities at inference: they move no data."""
    return module_type is not None and any(k.__name__.endswith(("Dropout", "DropoutNd", "StochasticDepth", "DropPath"))
                                           for k in module_type.__mro__)


def _layer_per_call(p: CostProgram):
    cache: dict[int, int] = {}

    def layer_of(call):
        if call.node not in cache:
            cache[call.node] = p.layer(call.module)
        return cache[call.node]
    return layer_of


def build_cost_program(a: ChannelAnalysis, resource: str, *, hardware=None, batch_size: int = 1) -> CostProgram:
    """Cost program of ``resource`` ('flops', 'size', 'activations', 'memory', 'latency'). Latency
    takes a roofline ``Hardware`` entry, or a measured table (``costs/measured.py``), which builds
    its own program from its per-op fits."""
    if resource not in RESOURCES:
        raise ValueError(f"unknown resource {resource!r}; choose one of {', '.join(RESOURCES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    p = CostProgram()
    if resource == "flops":
        _flops(p, a)
    elif resource == "size":
        _size(p, a)
    elif resource == "activations":
        _activations(p, a)
    elif resource == "memory":
        _memory(p, a, batch_size, 1.0, _layer_per_call(p))
    else:
        if hardware is None:
            raise ValueError("the latency resource needs a hardware entry")
        if not isinstance(hardware, Hardware):
            return hardware.cost_program(a, batch_size)
        p.roofline = True
        layer_of = _layer_per_call(p)
        _flops(p, a, layer_of, scale=batch_size / hardware.peak_compute)
        _memory(p, a, batch_size, 1.0 / hardware.memory_bandwidth, layer_of)
    return p


RESOURCES = ("flops", "size", "activations", "memory", "latency")
