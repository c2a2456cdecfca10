"""Stage 2: walk the captured graph with the op-handler table and build channel groups.

The walker is generic; knowledge about ops lives in ``handlers/``. Each tensor value
carries at most one channel dimension (an array of element ids along it); a dim that
carries no ids always has a fixed size, so whenever a handler cannot follow a channel
dim exactly it *fixes* those channels (they keep their width) instead of guessing.
Ops with unknown channel semantics that touch channel-carrying tensors raise
``UnsupportedGraphError``. The walker's state and the types it records live in
``walker.py``, which the handlers and the coverage pass import.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
from torch import nn

from morphnet.capture import capture_graph
from morphnet.capture.graph import Graph, LeafOp, OpNode, ValueRef
from morphnet.channels.coverage import fold_bias_adds
from morphnet.channels.handlers import HANDLERS, handle_unknown, leaf_handler, leaf_types
from morphnet.channels.walker import ChannelAnalysis, Walker


def _norm_names(items, model: nn.Module | None, what: str) -> list[str]:
    if not items:
        return []
    by_id = {id(m): n for n, m in model.named_modules()} if model is not None else {}
    names = []
    for it in items:
        if isinstance(it, nn.Module):
            if id(it) not in by_id:
                raise ValueError(f"{what}: module {type(it).__name__} is not part of the model")
            names.append(by_id[id(it)])
        elif isinstance(it, str):
            names.append(it)
        else:
            raise TypeError(f"{what}: expected module names or modules, got {type(it).__name__}")
    return names


def _inside(module: str, names: Iterable[str]) -> bool:
    return any(module == n or module.startswith(n + ".") or n == "" for n in names)


def analyze_channels(
    graph: Graph,
    *,
    model: nn.Module | None = None,
    input_boundary=None,
    output_boundary=None,
    force_group=None,
    regularizer_blacklist=None,
    prune_outputs: bool = False,
    prune_normalized: bool = False,
) -> ChannelAnalysis:
    """Walk ``graph`` and return the channel groups and per-layer data.

    ``prune_normalized``: channels normalized together by LayerNorm / RMSNorm become
    prunable; removing them changes the statistics, so such a rebuild is not exact."""
    in_bound = _norm_names(input_boundary, model, "input_boundary")
    out_bound = _norm_names(output_boundary, model, "output_boundary")
    for n in in_bound + out_bound:
        if n not in graph.module_types:
            raise ValueError(f"boundary module '{n}' is not a module of the model (see model.named_modules())")
    skip = _excluded_nodes(graph, in_bound, out_bound)

    w = Walker(graph)
    if model is not None:
        w.modules = dict(model.named_modules())
    w.prune_normalized = prune_normalized
    for node in graph.nodes:
        w.node = node
        if node.index in skip:
            if skip[node.index] == "output":
                for v in node.tensor_inputs():
                    if graph.values[v].producer is None or graph.values[v].producer not in skip:
                        w.fix(v)
            continue
        handler = leaf_handler(node.op) if isinstance(node.op, LeafOp) else (
            HANDLERS.get(node.op) or HANDLERS.get(node.op.overloadpacket) or HANDLERS.get(str(node.op.overloadpacket)))
        if handler is None:
            handle_unknown(w, node)
        else:
            handler(w, node)
        for v in node.tensor_inputs():  # a part of a parameter read otherwise: its positions are constants
            if v in w.parts and (node.index, v) not in w.part_readers:
                w.opaque.add(w.parts[v][0].name)
        _fix_writes_through_views(w, node)
    w.node = None
    if not prune_outputs:
        for v in graph.outputs:
            w.fix(v)
    for name in w.opaque:
        for (state, dim), ids in w.slots.items():
            if state == name:
                w.elements.fix(ids)

    _force_groups(w, force_group)
    group_of, num_groups, fixed = w.elements.components()
    blacklisted = np.zeros(num_groups, dtype=bool)
    for pattern in regularizer_blacklist or []:
        hits = [n for n in w.module_out if re.search(pattern, n)]
        if not hits:
            raise ValueError(f"regularizer_blacklist pattern {pattern!r} matches no conv, linear or "
                             f"BatchNorm module; names look like {sorted(w.module_out)[:3]}")
        for n in hits:
            blacklisted[group_of[w.module_out[n]]] = True
    analysis = ChannelAnalysis(
        graph=graph, group_of=group_of, num_groups=num_groups, fixed_group=fixed,
        alignments=dict(w.slots), opaque_states=set(w.opaque), layer_calls=w.layer_calls,
        weights=w.weights, gamma_sources=w.gamma, data_ops=w.data_ops, module_out_ids=w.module_out,
        blacklisted_group=blacklisted, products=w.products, shape_checks=w.shape_checks,
        normalized=w.normalized, value_chans=w.chans, zero_points=w.zero_points, biases=w.biases,
        parts={v: part for v, part in w.parts.items() if part[0].name not in w.opaque},
        joined={v: parts for v, parts in w.joined.items() if not any(name in w.opaque for name, _ in parts)},
    )
    fold_bias_adds(analysis)
    return analysis


def _writes_first_arg(op) -> bool:
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    info = schema.arguments[0].alias_info
    return info is not None and info.is_write


def _fix_writes_through_views(w: Walker, node: OpNode) -> None:
    """An in-place op on a view also changes its base, which SSA values do not follow.

    When the base (or a view between) is read again later, the channels involved stay fixed.
    """
    if not _writes_first_arg(node.op) or not node.args or not isinstance(node.args[0], ValueRef):
        return
    graph = w.graph
    target = node.args[0].index
    producer = graph.values[target].producer
    chain = [target]
    while producer is not None and getattr(graph.nodes[producer].op, "is_view", False):
        inputs = graph.nodes[producer].tensor_inputs()
        if not inputs:
            break
        target = inputs[0]
        chain.append(target)
        producer = graph.values[target].producer
    if len(chain) == 1 or not any(u > node.index for v in chain[1:] for u in w.consumers(v)):
        return
    for v in chain + node.tensor_inputs() + [o for o in node.outputs if o is not None]:
        w.fix(v)


def _force_groups(w: Walker, patterns) -> None:
    for pattern in patterns or []:
        hits = sorted(n for n in w.module_out if re.search(pattern, n))
        if not hits:
            raise ValueError(f"force_group pattern {pattern!r} matches no conv, linear or BatchNorm "
                             f"module; names look like {sorted(w.module_out)[:3]}")
        first = w.module_out[hits[0]]
        for n in hits[1:]:
            ids = w.module_out[n]
            if len(ids) != len(first):
                raise ValueError(f"force_group pattern {pattern!r}: '{hits[0]}' has {len(first)} output "
                                 f"channels but '{n}' has {len(ids)}; only equal widths can be grouped")
            w.elements.union(first, ids)


def _excluded_nodes(graph: Graph, in_bound: list[str], out_bound: list[str]) -> dict[int, str]:
    """Nodes excluded by the boundaries: 'input' (upstream side) or 'output' (downstream side)."""
    skip: dict[int, str] = {}
    if in_bound:
        consumers: dict[int, list[int]] = {}
        for node in graph.nodes:
            for v in node.tensor_inputs():
                consumers.setdefault(v, []).append(node.index)
        for node in graph.nodes:
            if _inside(node.module, in_bound):
                skip[node.index] = "input"
        outputs = set(graph.outputs)
        for node in reversed(graph.nodes):  # upstream nodes that only feed excluded ones
            if node.index in skip:
                continue
            outs = [v for v in node.outputs if v is not None]
            users = [u for v in outs for u in consumers.get(v, [])]
            if outs and users and all(u in skip for u in users) and not outputs.intersection(outs):
                skip[node.index] = "input"
    if out_bound:
        tainted: set[int] = set()
        for node in graph.nodes:
            if _inside(node.module, out_bound) or tainted.intersection(node.tensor_inputs()):
                if node.index not in skip:
                    skip[node.index] = "output"
                tainted.update(v for v in node.outputs if v is not None)
    return skip


def analyze_model(model: nn.Module, example_inputs, **options) -> ChannelAnalysis:
    """Capture ``model`` on ``example_inputs`` and analyze its channels (options as analyze_channels)."""
    graph = capture_graph(model, example_inputs, leaf_types=leaf_types())
    return analyze_channels(graph, model=model, **options)


__all__ = ["ChannelAnalysis", "analyze_channels", "analyze_model"]
