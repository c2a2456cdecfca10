"""Channel-analysis handler of the gate: one node whose output channels are its input channels.

A gate call is recorded as one leaf node (its sampling ops are not recorded). Its logits
(and the noise buffer that goes with them) are aligned with the channels it gates, so
rebuilding slices them with the layer, and ``morphnet.sources.probabilistic_gates`` finds
the gate through that alignment. A closed gate is evidence of death for what it outputs
only: the gated tensor may also be read elsewhere (see ``channels/coverage.py``). The gate moves no
data at inference once folded into the layer next to it, so it adds nothing to memory or latency
costs. A head gate's logit stands for a whole head: its channels are tied into one group.
"""

from __future__ import annotations

import numpy as np

from morphnet.channels.walker import Chan, Walker
from morphnet.channels.coverage import keeps_zero, zero_rule_module
from morphnet.channels.handlers import handles_module
from morphnet.gates.gate import LogisticSigmoidGate, LogisticSigmoidHeadGate


@handles_module(LogisticSigmoidGate)
def logistic_sigmoid_gate(w: Walker, node) -> None:
    """gate(x): output channels are x's channels along the gate's channel dim; logits follow them."""
    x = node.tensor_inputs()[0]
    module = node.kwargs["module"]
    dim = node.kwargs["attributes"].get("channel_dim", 1) % len(w.shape(x))
    ids = w.need_chan(x, dim)  # fresh fixed ids when x carries no prunable channels there
    prefix = f"{module}." if module else ""
    for state in ("logits", "noise"):
        if prefix + state in w.graph.state_shapes:
            w.align(prefix + state, 0, ids)
    w.module_out.setdefault(module, ids)
    w.set_chan(node.outputs[0], Chan(dim, ids))
    w.zero_point(prefix + "logits", node.outputs[0])  # a closed gate zeroes what it outputs


@handles_module(LogisticSigmoidHeadGate)
def logistic_sigmoid_head_gate(w: Walker, node) -> None:
    """head_gate(x): like a gate, but logit h is shared by the ``head_dim`` channels of head h. Those
    channels are tied into one group (the gate removes them together), and the logits follow the
    heads; a gate whose channels do not split into heads fixes them."""
    x = node.tensor_inputs()[0]
    module = node.kwargs["module"]
    attributes = node.kwargs["attributes"]
    dim = attributes.get("channel_dim", -1) % len(w.shape(x))
    head_dim = attributes["head_dim"]
    ids = w.need_chan(x, dim)
    prefix = f"{module}." if module else ""
    heads = len(ids) // head_dim
    if len(ids) % head_dim == 0 and heads == w.graph.state_shapes.get(prefix + "logits", (None,))[0]:
        per_head = ids.reshape(heads, head_dim)
        w.elements.union(np.repeat(per_head[:, :1], head_dim, axis=1), per_head)
        for state in ("logits", "noise"):
            if prefix + state in w.graph.state_shapes:
                w.align(prefix + state, 0, np.ascontiguousarray(per_head[:, 0]))
    else:
        w.elements.fix(ids)
    w.module_out.setdefault(module, ids)
    w.set_chan(node.outputs[0], Chan(dim, ids))
    w.zero_point(prefix + "logits", node.outputs[0])


zero_rule_module(LogisticSigmoidGate)(keeps_zero)  # x * mask: zero in, zero out
