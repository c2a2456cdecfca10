"""The walker's state and the records it leaves: the types shared by the channel walk
(``analysis.py``), the op handlers (``handlers/``), the coverage pass (``coverage.py``) and the
later stages.

A ``Walker`` holds the channel ids each tensor carries (``Chan``) and the element table of
their unions while ``analyze_channels`` runs the handler table over the graph; the handlers
read and write it through its methods and append layer calls, data ops, products and shape
checks. ``ChannelAnalysis`` is the result. Kept apart from ``analysis.py`` so that the
handlers and the coverage pass import these types without importing the walk that imports
them (no import cycle inside ``channels/``, checked by tests/test_architecture.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from morphnet.capture.graph import Graph, OpNode, ValueRef
from morphnet.channels.elements import ElementTable
from morphnet.errors import UnsupportedGraphError


@dataclass
class Chan:
    """The channel dim of a tensor and the element id of each entry along it."""

    dim: int
    ids: np.ndarray


@dataclass
class StateView:
    """A tensor that is a view of a parameter or buffer: tensor dim -> state dim (or None)."""

    name: str
    dims: tuple


@dataclass
class LayerCall:
    """One call of a conv or linear layer (a weight-carrying op)."""

    module: str
    weight: str
    kind: str  # "conv" | "linear"
    in_ids: np.ndarray
    out_ids: np.ndarray
    groups: int
    depthwise: bool
    flop_coef: float  # per example: FLOPs = flop_coef * A_in * A_out / groups (depthwise: * A_out)
    kernel: int  # weights per (input, output) channel pair
    in_numel: float  # per example, per input channel element
    out_numel: float  # per example, per output channel element
    node: int


@dataclass
class WeightInfo:
    """A conv / linear weight: its output channel elements and its norm layout."""

    module: str
    name: str
    out_dim: int
    out_ids: np.ndarray
    in_ids: np.ndarray
    kernel: int
    groups: int
    depthwise: bool


@dataclass
class TensorUse:
    """An activation read or written by a data-moving op (for memory / latency)."""

    ids: np.ndarray | None  # channel elements, or None when its width is fixed
    numel: float  # per example: per channel element if ids is not None, else in total


@dataclass
class DataOp:
    """An op that moves data: what it reads and writes."""

    node: int
    module: str
    name: str
    uses: list[TensorUse]


@dataclass
class ProductCall:
    """A product between activations (attention's q.k^T and attn x v).

    FLOPs per example are ``flop_coef * A(ids)``, or ``flop_coef`` when ``ids`` is None
    (nothing prunable rides on the product)."""

    module: str
    ids: np.ndarray | None
    flop_coef: float
    node: int


@dataclass
class ShapeCheck:
    """A split the analysis followed: in the rebuilt model, output ``pos`` of node ``node``
    must have as many entries along ``dim`` as ``ids`` has surviving copies."""

    node: int
    pos: int
    dim: int
    ids: np.ndarray


@dataclass
class ChannelAnalysis:
    """Result of the channel stage: groups, per-layer element arrays, sources."""

    graph: Graph
    group_of: np.ndarray
    num_groups: int
    fixed_group: np.ndarray
    alignments: dict[tuple[str, int], np.ndarray]
    opaque_states: set[str]
    layer_calls: list[LayerCall]
    weights: dict[str, WeightInfo]
    gamma_sources: dict[str, np.ndarray]  # BN weight name -> elements
    data_ops: list[DataOp]
    module_out_ids: dict[str, np.ndarray]  # conv / linear / BN module -> output elements
    blacklisted_group: np.ndarray
    value_chans: dict[int, Chan]  # value index -> its channel dim and element ids (see coverage.py)
    zero_points: dict[str, list[int]]  # source state -> values that are zero where its entries are
    # conv / linear weight -> the bias added to its output channels: a state name, or the parts of a bias
    # joined from several 1-D states (``torch.cat((q_bias, k_bias, v_bias))``) as (state, first row); read
    # it with ``bias_parts``
    biases: dict[str, str | list[tuple[str, int]]]
    products: list[ProductCall] = field(default_factory=list)
    shape_checks: list[ShapeCheck] = field(default_factory=list)
    normalized: list[np.ndarray] = field(default_factory=list)  # channels prunable only by prune_normalized
    # value index -> (view, first index per sliced dim) of a part of a parameter (see ``Walker.parts``)
    parts: dict[int, tuple[StateView, dict[int, int]]] = field(default_factory=dict)
    # value index -> (state, first entry) per part of a joined 1-D value (see ``Walker.joined``)
    joined: dict[int, list[tuple[str, int]]] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.graph.batch_size

    def bias_parts(self, weight: str) -> list[tuple[str, int]]:
        """The states added to ``weight``'s output channels, each with the first row it goes with: [(bias, 0)]
        for one bias, several for a joined one, [] for none."""
        bias = self.biases.get(weight)
        if bias is None:
            return []
        return [(bias, 0)] if isinstance(bias, str) else list(bias)


class Walker:
    """Generic graph walker; handlers call its methods to read and write channel state."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.elements = ElementTable()
        self.chans: dict[int, Chan] = {}
        self.state_views: dict[int, StateView] = {}
        # a contiguous part of a 1-D or 2-D parameter (``w.chunk(3)``, ``b[:n]``): its view and, per
        # sliced parameter dim, the part's first index; a reader that does not take it for what it is
        # (a linear layer's rows or columns, a bias) makes the parameter opaque
        self.parts: dict[int, tuple[StateView, dict[int, int]]] = {}
        self.part_readers: set[tuple[int, int]] = set()  # (node, value): a part read as what it is
        # a 1-D value joined from whole 1-D parameters / buffers (``torch.cat((q_bias, k_bias, v_bias))``):
        # (state, first entry in the value) per part; readers that take it for a bias follow each part
        self.joined: dict[int, list[tuple[str, int]]] = {}
        self.derived: dict[int, set[str]] = {}
        self.slots: dict[tuple[str, int], np.ndarray] = {}
        self.opaque: set[str] = set()
        self.layer_calls: list[LayerCall] = []
        self.weights: dict[str, WeightInfo] = {}
        self.gamma: dict[str, np.ndarray] = {}
        self.data_ops: list[DataOp] = []
        self.module_out: dict[str, np.ndarray] = {}
        self.products: list[ProductCall] = []
        self.shape_checks: list[ShapeCheck] = []
        self.modules: dict[str, nn.Module] = {}  # the model's modules by name, when the model is known
        self.prune_normalized = False  # LayerNorm'd channels prunable (not function-preserving)
        self.normalized: list[np.ndarray] = []
        self.zero_points: dict[str, list[int]] = {}
        self.biases: dict[str, str | list[tuple[str, int]]] = {}
        self.node: OpNode | None = None
        self._consumers: dict[int, list[int]] | None = None
        for v in graph.values:
            if v.state_name is not None:
                self.state_views[v.index] = StateView(v.state_name, tuple(range(len(v.shape))))

    # ---- reading -------------------------------------------------------------
    def shape(self, v: int) -> tuple[int, ...]:
        return self.graph.values[v].shape

    def chan(self, v: int | None) -> Chan | None:
        return None if v is None else self.chans.get(v)

    def state_view(self, v: int | None) -> StateView | None:
        return None if v is None else self.state_views.get(v)

    def part_view(self, v: int | None) -> tuple[StateView, dict[int, int]] | None:
        """A view of a parameter or buffer (no starts), or of a part of a parameter (see ``parts``)."""
        if v is None:
            return None
        sv = self.state_views.get(v)
        return (sv, {}) if sv is not None else self.parts.get(v)

    def part_slot(self, v: int, dim: int) -> np.ndarray:
        """Element ids of the parameter entries along dim ``dim`` of ``v`` (a view or a part of one)."""
        sv, starts = self.part_view(v)
        start = starts.get(sv.dims[dim], 0)
        ids = self.slot(sv.name, sv.dims[dim])[start:start + self.shape(v)[dim]]
        if self.node is not None and v in self.parts:
            self.part_readers.add((self.node.index, v))
        return ids

    def carry_part(self, x: int, out: int, dims: tuple | None) -> None:
        """``out`` is ``x`` (a part of a parameter) with its dims moved to ``dims`` (parameter dims)."""
        part = self.parts.get(x)
        if part is None or dims is None or not set(part[1]) <= {d for d in dims if d is not None}:
            return
        self.parts[out] = (StateView(part[0].name, tuple(dims)), part[1])
        if self.node is not None:
            self.part_readers.add((self.node.index, x))

    def states_in(self, v: int) -> set[str]:
        sv = self.state_views.get(v)
        out = set(self.derived.get(v, ()))
        if sv is not None:
            out.add(sv.name)
        return out

    def per_example(self, v: int) -> float:
        shape = self.shape(v)
        return float(np.prod(shape, dtype=np.float64)) / self.graph.batch_size

    def consumers(self, v: int) -> list[int]:
        """Indices of the nodes that read value ``v``."""
        if self._consumers is None:
            self._consumers = {}
            for node in self.graph.nodes:
                for u in node.tensor_inputs():
                    self._consumers.setdefault(u, []).append(node.index)
        return self._consumers.get(v, [])

    # ---- writing -------------------------------------------------------------
    def set_chan(self, v: int | None, chan: Chan | None) -> None:
        if v is not None and chan is not None:
            if chan.dim < 0:
                chan = Chan(chan.dim + len(self.shape(v)), chan.ids)
            if self.shape(v)[chan.dim] != len(chan.ids):
                raise AssertionError(f"channel ids do not match shape in {self.describe()}")
            self.chans[v] = chan

    def fix(self, v: int | None) -> None:
        c = self.chan(v)
        if c is not None:
            self.elements.fix(c.ids)
        self.make_opaque(v)

    def make_opaque(self, v: int | None) -> None:
        if v is not None:
            self.opaque |= self.states_in(v)

    def need_chan(self, v: int, dim: int) -> np.ndarray:
        """Element ids along ``dim`` of ``v``; fresh fixed ids when the dim carries none."""
        dim = dim % len(self.shape(v))
        c = self.chan(v)
        if c is not None and c.dim == dim:
            return c.ids
        if c is not None:
            self.elements.fix(c.ids)
        ids = self.elements.new(self.shape(v)[dim], fixed=True)
        self.chans[v] = Chan(dim, ids)
        return ids

    def slot(self, state: str, dim: int) -> np.ndarray:
        key = (state, dim)
        if key not in self.slots:
            self.slots[key] = self.elements.new(self.graph.state_shapes[state][dim])
        return self.slots[key]

    def align(self, state: str, dim: int, ids: np.ndarray) -> None:
        """Entries of state ``dim`` follow the channels ``ids`` (sliced together on rebuild)."""
        slot = self.slot(state, dim)
        if len(slot) != len(ids):
            self.elements.fix(ids)
            self.opaque.add(state)
        else:
            self.elements.union(slot, ids)

    def align_value(self, v: int | None, ids: np.ndarray, dim: int = 0) -> bool:
        """Align dim ``dim`` of value ``v`` (a view of a parameter or buffer) with ``ids``.

        A value that is not a plain view of model state fixes the channels instead.
        Returns whether it was aligned.
        """
        if v is None:
            return False
        sv = self.state_view(v)
        if sv is not None and sv.dims[dim] is not None:
            self.align(sv.name, sv.dims[dim], ids)
            return True
        self.elements.fix(ids)
        self.make_opaque(v)
        return False

    def zero_point(self, state: str, out: int | None) -> None:
        """``out`` is zero in the channels where the source ``state`` is (a BatchNorm's or a conv's output)."""
        if out is not None:
            self.zero_points.setdefault(state, []).append(out)

    def derive(self, out: int | None, *sources: int | None) -> None:
        """Mark ``out`` as computed from model state in a way that is not a plain view."""
        if out is None:
            return
        names: set[str] = set()
        for s in sources:
            if s is not None:
                names |= self.states_in(s)
        if names:
            self.derived[out] = names

    # ---- errors --------------------------------------------------------------
    def describe(self) -> str:
        n = self.node
        return f"aten op '{n.name}' in {self.graph.owner_description(n.module)}" if n else "the graph"

    def unsupported(self, why: str) -> UnsupportedGraphError:
        return UnsupportedGraphError(
            f"{self.describe()}: {why}. torch-morphnet cannot map its channels exactly. Exclude the "
            f"module from the analysis with input_boundary=[...] (everything upstream of it) or "
            f"output_boundary=[...] (it and everything downstream), or report the op."
        )


def bind(node: OpNode) -> dict[str, Any]:
    """Arguments of ``node`` by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(node.op._schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def vid(x) -> int | None:
    return x.index if isinstance(x, ValueRef) else None


__all__ = ["ChannelAnalysis", "Chan", "DataOp", "LayerCall", "ProductCall", "ShapeCheck", "StateView",
           "TensorUse", "WeightInfo", "Walker", "bind", "vid"]
