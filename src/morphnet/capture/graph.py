"""Record the aten ops a model runs, with shapes and the module each op sits in.

Why a dispatch-mode recorder instead of torch.fx or torch.export: the model runs
eagerly once (in training mode, so branches that run only in training, such as the
auxiliary heads of GoogLeNet and Inception-v3, are recorded), and a
``TorchDispatchMode`` sees every aten op below autograd with concrete shapes. That
works on any model that runs (data-dependent Python control flow, functional code
that uses parameters directly, modules called twice), needs no tracing
restrictions, and sees exactly the ops that ``torch.utils.flop_counter.FlopCounterMode``
counts, which makes the FLOP costs agree with PyTorch's own counter by
construction. Global forward hooks give the owning module of every op.

The graph is in SSA form: an in-place op produces a new value, and later uses of the
mutated tensor refer to it. The model is left exactly as found: training flags,
buffers (BatchNorm running statistics, ``num_batches_tracked``) and RNG state are
restored after the run, and parameters are never written.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger(__name__)


@dataclass
class Value:
    """One tensor version in the graph."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...] = ()
    state_name: str | None = None  # parameter or buffer name when the tensor is model state
    producer: int | None = None  # index of the OpNode that made it


@dataclass
class ValueRef:
    """Placeholder for a tensor argument inside an OpNode's args."""

    index: int


@dataclass
class OpNode:
    """One aten op call."""

    index: int
    op: Any  # torch._ops.OpOverload
    args: tuple
    kwargs: dict
    outputs: list[int | None]  # flat outputs (None for non-tensor results)
    module: str  # owning module name ("" for the top-level model)
    python_op: str = ""  # the torch function that issued it, when capture tracks it ("chunk")

    @property
    def name(self) -> str:
        return str(self.op)

    def tensor_inputs(self) -> list[int]:
        flat, _ = pytree.tree_flatten((self.args, self.kwargs))
        return [a.index for a in flat if isinstance(a, ValueRef)]


@dataclass(frozen=True)
class LeafOp:
    """Stands for a whole module call recorded as one node (its internals are not recorded)."""

    module_type: type

    def __str__(self) -> str:
        return f"module:{self.module_type.__name__}"

    @property
    def overloadpacket(self):
        return self


@dataclass
class Graph:
    """The recorded program: values, op nodes, inputs and outputs."""

    values: list[Value] = field(default_factory=list)
    nodes: list[OpNode] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    batch_size: int = 1
    module_types: dict[str, type] = field(default_factory=dict)
    state_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    parameters: set[str] = field(default_factory=set)  # names of parameters (the rest of state: buffers)
    eval_modules: set[str] | None = None  # modules that also run in eval mode (None: unknown)
    recorded_on: str = ""  # "meta" (stand-ins, no arithmetic) or "real" (fallback: the model ran for real)

    def training_only(self, module: str) -> bool:
        """True for ops of modules that run only in training (auxiliary heads)."""
        return self.eval_modules is not None and module not in self.eval_modules

    def owner_description(self, module: str) -> str:
        if not module:
            return "the top-level model"
        kind = self.module_types.get(module)
        return f"module '{module}'" + (f" ({kind.__name__})" if kind else "")


class _ModuleStack:
    """Global forward hooks that track which named module is running.

    Modules of ``leaf_types`` are recorded as one ``LeafOp`` node each: the recorder
    skips the ops inside them.
    """

    def __init__(self, names: dict[int, str], leaf_types: tuple = ()):
        self.names = names
        self.stack: list[str] = []
        self.leaf_types = leaf_types
        self.leaf_depth = 0
        self.recorder: _Recorder | None = None
        self._leaf_args: tuple = ()

    def pre(self, module, args):
        name = self.names.get(id(module))
        self.stack.append(name if name is not None else (self.stack[-1] if self.stack else ""))
        if self.leaf_depth:
            self.leaf_depth += 1
        elif self.leaf_types and isinstance(module, self.leaf_types) and self.recorder is not None:
            self.leaf_depth = 1
            self._leaf_args = args

    def post(self, module, args, output):
        if self.leaf_depth:
            self.leaf_depth -= 1
            if self.leaf_depth == 0 and self.recorder is not None:
                attributes = getattr(module, "leaf_attributes", None)
                self.recorder.record_leaf(type(module), self._leaf_args, output, self.current,
                                          attributes() if callable(attributes) else {})
        if self.stack:
            self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""


class _PythonOps(TorchFunctionMode):
    """Names the torch functions whose aten ops cannot tell them apart: ``chunk(n)`` computes
    its part size from the tensor's width, ``split(size)`` takes a constant, both become
    ``aten.split``. Only the first can follow a pruned width."""

    TRACKED = {torch.chunk: "chunk", torch.Tensor.chunk: "chunk"}

    def __init__(self, recorder: "_Recorder"):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.TRACKED.get(func)
        if name is None:
            return func(*args, **(kwargs or {}))
        outer, self.recorder.python_op = self.recorder.python_op, name
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.recorder.python_op = outer


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: Graph, state_ids: dict[int, str], modules: _ModuleStack):
        super().__init__()
        self.graph = graph
        self.state_ids = state_ids
        self.modules = modules
        self.python_op = ""
        self.value_of: dict[int, int] = {}  # id(tensor) -> value index
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive so ids stay unique

    def new_value(self, t: torch.Tensor, **kw) -> int:
        v = Value(len(self.graph.values), tuple(t.shape), t.dtype, tuple(t.stride()) if t.layout == torch.strided else (), **kw)
        self.graph.values.append(v)
        self.value_of[id(t)] = v.index
        self.keep.append(t)
        return v.index

    def ref(self, t: torch.Tensor) -> ValueRef:
        idx = self.value_of.get(id(t))
        if idx is None:
            state = self.state_ids.get(id(t))
            if state is not None:
                idx = self.new_value(t, state_name=state)
            else:  # a tensor created outside the recorded run (a constant attribute)
                idx = self.new_value(t)
        return ValueRef(idx)

    def record_leaf(self, module_type: type, args: tuple, out, module: str, attributes: dict) -> None:
        """One node for a whole module call; ``attributes`` (from the module's optional
        ``leaf_attributes()``) tell its handler what the shapes cannot, e.g. which dim it acts on."""
        rec_args = pytree.tree_map_only(torch.Tensor, self.ref, tuple(args))
        node = OpNode(len(self.graph.nodes), LeafOp(module_type), rec_args,
                      {"module": module, "attributes": dict(attributes)}, [], module)
        for o in pytree.tree_leaves(out):
            node.outputs.append(self.new_value(o, producer=node.index) if isinstance(o, torch.Tensor) else None)
        self.graph.nodes.append(node)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _fast_meta(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        if self.modules.leaf_depth:
            return out
        rec_args, rec_kwargs = pytree.tree_map_only(torch.Tensor, self.ref, (args, kwargs))
        node = OpNode(len(self.graph.nodes), func, rec_args, rec_kwargs, [], self.modules.current, self.python_op)
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                idx = self.new_value(o, producer=node.index)
                node.outputs.append(idx)
            else:
                node.outputs.append(None)
        self.graph.nodes.append(node)
        return out


_BATCH_NORMS = {
    getattr(torch.ops.aten, name).default
    for name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                 "_batch_norm_with_update", "_batch_norm_no_update")
    if hasattr(torch.ops.aten, name)
}


def _fast_meta(func, args, kwargs):
    """Shapes of BatchNorm outputs on meta tensors without running its Python meta decomposition."""
    if func not in _BATCH_NORMS or not isinstance(args[0], torch.Tensor) or args[0].device.type != "meta":
        return None
    x = args[0]
    channels = x.shape[1] if x.dim() > 1 else x.shape[0]
    stats = (x.new_empty(channels, dtype=torch.float32), x.new_empty(channels, dtype=torch.float32))
    if func.__name__.startswith("_batch_norm"):
        return (torch.empty_like(x), *stats, x.new_empty(0, dtype=torch.uint8))
    return (torch.empty_like(x), *stats)


class _FastMeta(TorchDispatchMode):
    """Runs ops as usual, except BatchNorm on meta tensors (see ``_fast_meta``)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _fast_meta(func, args, kwargs)
        return func(*args, **kwargs) if out is None else out


def _as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Restore training flags, buffers and RNG state of ``model`` on exit."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _forward(model: nn.Module, inputs: tuple, state: dict | None):
    if state is None:
        return model(*inputs)
    return torch.func.functional_call(model, state, inputs, strict=False)


def _run(model: nn.Module, inputs: tuple, graph: Graph, state_ids, state: dict | None,
         leaf_types: tuple = ()) -> Any:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    stack = _ModuleStack(names, leaf_types)
    h1 = nn.modules.module.register_module_forward_pre_hook(stack.pre)
    h2 = nn.modules.module.register_module_forward_hook(stack.post, always_call=True)
    recorder = _Recorder(graph, state_ids, stack)
    stack.recorder = recorder
    try:
        for x in pytree.tree_leaves(inputs):
            if isinstance(x, torch.Tensor):
                graph.inputs.append(recorder.new_value(x))
        with torch.no_grad(), recorder, _PythonOps(recorder):
            out = _forward(model, inputs, state)
        graph.outputs = [recorder.value_of[id(t)] if id(t) in recorder.value_of else recorder.ref(t).index
                         for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    finally:
        h1.remove()
        h2.remove()
    return out


def _modules_run_in_eval(model: nn.Module, inputs: tuple, state: dict | None) -> set[str]:
    """Names of the modules that run in eval mode (training-only branches are absent)."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    ran: set[str] = {""}

    def pre(module, args):
        if id(module) in names:
            ran.add(names[id(module)])

    handle = nn.modules.module.register_module_forward_pre_hook(pre)
    try:
        model.eval()
        with torch.no_grad(), _FastMeta():
            _forward(model, inputs, state)
    finally:
        handle.remove()
    return ran


def _meta(t: torch.Tensor) -> torch.Tensor:
    if t.layout != torch.strided:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta-device stand-ins for every parameter and buffer, under their first names.

    Tied tensors (a module or parameter reachable under two names) appear once;
    ``functional_call`` ties the other names to them.
    """
    return {n: _meta(t) for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def meta_forward(model: nn.Module, inputs: tuple) -> Any:
    """One forward of ``model`` on meta stand-ins for ``inputs``, parameters and buffers (shapes only).

    Every parameter, buffer and tensor attribute is put back afterwards, also for a module
    reachable under two names (``functional_call`` alone would leave meta tensors there).
    """
    inputs = pytree.tree_map_only(torch.Tensor, _meta, inputs)
    with _state_restored(model), torch.no_grad():
        return _forward(model, inputs, _meta_state(model))


@contextlib.contextmanager
def _state_restored(model: nn.Module):
    """Put back every parameter and buffer object if a functional call is interrupted, and plain tensor
    attributes a forward reassigns (torchvision's AnchorGenerator caches ``cell_anchors`` moved to the
    input's device: the meta run must not leave meta tensors there)."""
    saved = [(m, "_parameters", dict(m._parameters)) for m in model.modules()]
    saved += [(m, "_buffers", dict(m._buffers)) for m in model.modules()]
    attributes = [(m, {k: v for k, v in vars(m).items() if _holds_tensors(v)}) for m in model.modules()]
    try:
        yield
    finally:
        for module, attr, entries in saved:
            getattr(module, attr).update(entries)
        for module, entries in attributes:
            vars(module).update(entries)


def _holds_tensors(value) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value))


def _record(model: nn.Module, inputs: tuple, state: dict | None, info: dict, leaf_types: tuple) -> Graph:
    """Record in training mode (retrying at batch 2 when BatchNorm needs it), then find eval modules."""
    source = state if state is not None else dict(
        list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)))
    state_ids: dict[int, str] = {}
    for n, t in source.items():
        state_ids.setdefault(id(t), n)
    model.train()
    graph = Graph(**info)
    try:
        _run(model, inputs, graph, state_ids, state, leaf_types)
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        inputs = double_batch(inputs)
        graph = Graph(**info)
        _run(model, inputs, graph, state_ids, state, leaf_types)
    graph.eval_modules = _modules_run_in_eval(model, inputs, state)
    graph.batch_size = examples_in(inputs)
    return graph


def examples_in(inputs: tuple) -> int:
    """How many examples ``inputs`` (positional arguments) hold: the length of a list of tensors
    given first (torchvision's detection models take one [C, H, W] tensor per image), else the
    size of dimension 0 of the first tensor (1 for a scalar)."""
    if inputs and _example_list(inputs[0]):
        return len(inputs[0])
    first = next(t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))
    return int(first.shape[0]) if first.dim() else 1


def double_batch(inputs: tuple) -> tuple:
    """``inputs`` with every example twice (BatchNorm cannot train on a single value per channel):
    every list argument repeated when the examples come as a list (images and their targets),
    else every tensor concatenated with itself along dimension 0."""
    if inputs and _example_list(inputs[0]):
        return tuple(list(v) + list(v) if isinstance(v, list) else v for v in inputs)
    return pytree.tree_map_only(torch.Tensor, lambda t: torch.cat([t, t]) if t.dim() else t, inputs)


def _example_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, torch.Tensor) for t in value)


def capture_graph(model: nn.Module, example_inputs, *, leaf_types: tuple = ()) -> Graph:
    """Run ``model(*example_inputs)`` once in training mode and record its aten ops.

    The run uses meta-device stand-ins for the inputs, parameters and buffers, so it
    costs no arithmetic; models that cannot run on the meta device (data-dependent
    code) are run for real instead (``graph.recorded_on`` says which, and a debug line of the
    ``morphnet.capture.graph`` logger says why). Per-example costs divide by the batch size, the
    size of dimension 0 of the first example input, or the length of a list of tensors given as
    the first argument (one tensor per image, as torchvision's detection models take them). If
    training mode cannot run on that batch (BatchNorm needs more than one value per channel),
    every example is repeated (``double_batch``): shapes per example are unchanged. Calls of modules of
    ``leaf_types`` are recorded as single ``LeafOp`` nodes.
    """
    inputs = _as_tuple(example_inputs)
    tensors = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    if not tensors:
        raise ValueError("example_inputs must contain at least one tensor that the model accepts")
    state_shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        state_shapes.setdefault(n, tuple(t.shape))
    info = dict(module_types={n: type(m) for n, m in model.named_modules()}, state_shapes=state_shapes,
                parameters={n for n, _ in model.named_parameters(remove_duplicate=False)})
    with preserved_state(model):
        try:
            meta_inputs = pytree.tree_map_only(torch.Tensor, _meta, inputs)
            with _state_restored(model):
                graph = _record(model, meta_inputs, _meta_state(model), info, tuple(leaf_types))
            graph.recorded_on = "meta"
        except Exception as error:  # data-dependent code cannot run on meta tensors: run it for real
            logger.debug("capture: %s cannot run on the meta device (%s: %s); running it for real",
                         type(model).__name__, type(error).__name__, error)
            graph = _record(model, inputs, None, info, tuple(leaf_types))
            graph.recorded_on = "real"
        else:
            logger.debug("capture: %s recorded on the meta device", type(model).__name__)
    return graph
