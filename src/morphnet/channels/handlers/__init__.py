"""The op-handler table: how each aten op maps channels.

One small function per op family, registered with ``@handles`` (aten ops) or
``@handles_module`` (whole module calls); the walk in ``analysis.py`` and its ``Walker``
(``walker.py``) know nothing about particular ops. A handler reads the channel ids of its
inputs (``w.chan``), records couplings (``w.elements.union``), fixes channels it cannot
follow exactly (``w.fix``) and sets the channel ids of its outputs. Ops not in the table raise
``UnsupportedGraphError`` when they touch a channel-carrying tensor.
"""

from morphnet.channels.handlers import (  # noqa: F401
    concat,
    elementwise,
    layers,
    norms,
    reductions,
    selection,
    shape_ops,
    shuffle,
)
from morphnet.channels.handlers.elementwise import register_pointwise_tagged
from morphnet.channels.handlers.registry import (
    HANDLERS,
    LEAF_HANDLERS,
    handle_unknown,
    handles,
    handles_module,
    leaf_handler,
    leaf_types,
)

register_pointwise_tagged()  # after every explicit handler, which takes precedence

__all__ = ["HANDLERS", "LEAF_HANDLERS", "handle_unknown", "handles", "handles_module", "leaf_handler", "leaf_types"]
