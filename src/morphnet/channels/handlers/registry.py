"""The op-handler registry: ``@handles`` for aten ops, ``@handles_module`` for whole modules.

One small function per op family, registered with ``@handles``; the walk in
``analysis.py`` and its ``Walker`` (``walker.py``) know nothing about particular ops. A
handler reads the channel ids of its inputs (``w.chan``), records couplings
(``w.elements.union``), fixes channels it cannot follow exactly (``w.fix``) and sets the
channel ids of its outputs. Ops not in this table raise ``UnsupportedGraphError`` when
they touch a channel-carrying tensor.
"""

from __future__ import annotations

from typing import Callable

import torch

from morphnet.channels.walker import DataOp, TensorUse, Walker

aten = torch.ops.aten
HANDLERS: dict = {}


def handles(*ops) -> Callable:
    def register(fn):
        for op in ops:
            HANDLERS[op] = fn
        return fn
    return register


def _ops(*names: str) -> list:
    """aten overload packets by name, skipping those this torch build lacks."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _owner(state: str) -> str:
    return state.rsplit(".", 1)[0] if "." in state else ""


def _record_data(w: Walker, node, values) -> None:
    """Memory traffic of a data-moving op over its activation (non-state) tensors."""
    if not any(w.graph.values[v].state_name is None for v in node.tensor_inputs()):
        return  # bookkeeping on model state (BatchNorm's num_batches_tracked += 1)
    uses = []
    for v in values:
        if v is None or w.graph.values[v].state_name is not None:
            continue
        c = w.chan(v)
        total = w.per_example(v)
        if c is not None and len(c.ids):
            uses.append(TensorUse(c.ids, total / len(c.ids)))
        else:
            uses.append(TensorUse(None, total))
    w.data_ops.append(DataOp(node.index, node.module, node.name, uses))


def _io(node) -> list:
    return node.tensor_inputs() + [o for o in node.outputs if o is not None]


# Module types recorded as one node (their internals are not recorded), with their handlers.
LEAF_HANDLERS: dict[type, Callable] = {}


def handles_module(*module_types: type) -> Callable:
    """Register a handler for whole calls of these module types (see ``capture_graph``)."""
    def register(fn):
        for t in module_types:
            LEAF_HANDLERS[t] = fn
        return fn
    return register


def leaf_handler(op) -> Callable:
    for klass in op.module_type.__mro__:
        if klass in LEAF_HANDLERS:
            return LEAF_HANDLERS[klass]
    raise AssertionError(f"no handler for leaf module type {op.module_type}")


def leaf_types() -> tuple:
    return tuple(LEAF_HANDLERS)


def pass_unless_along(w: Walker, node, x: int, dims) -> None:
    """Output keeps ``x``'s channels, unless the op acts along the channel dim: then they stay fixed."""
    out = node.outputs[0]
    c = w.chan(x)
    if c is not None:
        if c.dim in dims:
            w.fix(x)
        else:
            w.set_chan(out, c)
    w.derive(out, x)
    _record_data(w, node, _io(node))


def handle_unknown(w: Walker, node) -> None:
    """An op with no handler: fine on channel-free tensors, an error on channel-carrying ones."""
    for v in node.tensor_inputs():
        if w.chan(v) is not None:
            raise w.unsupported("the op has no channel handler and its input carries prunable channels")
    for o in node.outputs:
        w.derive(o, *node.tensor_inputs())
