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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Value:
    """One tensor version in the graph."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...] = ()
    state_name: str | None = None  # parameter or buffer name when the tensor is model state
    is_parameter: bool = False
    is_input: bool = False
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

    @property
    def name(self) -> str:
        return str(self.op)

    def tensor_inputs(self) -> list[int]:
        flat, _ = pytree.tree_flatten((self.args, self.kwargs))
        return [a.index for a in flat if isinstance(a, ValueRef)]


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

    def training_only(self, module: str) -> bool:
        """True for ops of modules that run only in training (auxiliary heads)."""
        return self.eval_modules is not None and module not in self.eval_modules

    def owner_description(self, module: str) -> str:
        if not module:
            return "the top-level model"
        kind = self.module_types.get(module)
        return f"module '{module}'" + (f" ({kind.__name__})" if kind else "")


class _ModuleStack:
    """Global forward hooks that track which named module is running."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.stack: list[str] = []

    def pre(self, module, args):
        name = self.names.get(id(module))
        self.stack.append(name if name is not None else (self.stack[-1] if self.stack else ""))

    def post(self, module, args, output):
        if self.stack:
            self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: Graph, state_ids: dict[int, tuple[str, bool]], modules: _ModuleStack):
        super().__init__()
        self.graph = graph
        self.state_ids = state_ids
        self.modules = modules
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
                idx = self.new_value(t, state_name=state[0], is_parameter=state[1])
            else:  # a tensor created outside the recorded run (a constant attribute)
                idx = self.new_value(t)
        return ValueRef(idx)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec_args, rec_kwargs = pytree.tree_map_only(torch.Tensor, self.ref, (args, kwargs))
        node = OpNode(len(self.graph.nodes), func, rec_args, rec_kwargs, [], self.modules.current)
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                idx = self.new_value(o, producer=node.index)
                node.outputs.append(idx)
            else:
                node.outputs.append(None)
        self.graph.nodes.append(node)
        return out


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


def _run(model: nn.Module, inputs: tuple, graph: Graph, state_ids) -> Any:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    stack = _ModuleStack(names)
    h1 = nn.modules.module.register_module_forward_pre_hook(stack.pre)
    h2 = nn.modules.module.register_module_forward_hook(stack.post, always_call=True)
    recorder = _Recorder(graph, state_ids, stack)
    try:
        for x in pytree.tree_leaves(inputs):
            if isinstance(x, torch.Tensor):
                graph.inputs.append(recorder.new_value(x, is_input=True))
        with torch.no_grad(), recorder:
            out = model(*inputs)
        graph.outputs = [recorder.value_of[id(t)] if id(t) in recorder.value_of else recorder.ref(t).index
                         for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    finally:
        h1.remove()
        h2.remove()
    return out


def _modules_run_in_eval(model: nn.Module, inputs: tuple) -> set[str]:
    """Names of the modules that run in eval mode (training-only branches are absent)."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    ran: set[str] = {""}

    def pre(module, args):
        if id(module) in names:
            ran.add(names[id(module)])

    handle = nn.modules.module.register_module_forward_pre_hook(pre)
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        handle.remove()
    return ran


def capture_graph(model: nn.Module, example_inputs) -> Graph:
    """Run ``model(*example_inputs)`` once in training mode and record its aten ops.

    Per-example costs divide by the batch size, the size of dimension 0 of the first
    example input. If training mode cannot run on that batch (BatchNorm needs more
    than one value per channel), the inputs are repeated to a batch of two: shapes
    per example are unchanged.
    """
    inputs = _as_tuple(example_inputs)
    tensors = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    if not tensors:
        raise ValueError("example_inputs must contain at least one tensor that the model accepts")
    state_ids: dict[int, tuple[str, bool]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        state_ids.setdefault(id(p), (n, True))
    for n, b in model.named_buffers(remove_duplicate=False):
        state_ids.setdefault(id(b), (n, False))
    module_types = {n: type(m) for n, m in model.named_modules()}
    state_shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    for n, p in model.named_parameters(remove_duplicate=False):
        state_shapes.setdefault(n, tuple(p.shape))
    for n, b in model.named_buffers(remove_duplicate=False):
        state_shapes.setdefault(n, tuple(b.shape))
    parameters = {n for n, _ in model.named_parameters(remove_duplicate=False)}

    with preserved_state(model):
        model.train()
        graph = Graph(module_types=module_types, state_shapes=state_shapes, parameters=parameters)
        try:
            _run(model, inputs, graph, state_ids)
        except ValueError as e:
            if "Expected more than 1 value per channel" not in str(e):
                raise
            inputs = pytree.tree_map_only(torch.Tensor, lambda t: torch.cat([t, t]) if t.dim() else t, inputs)
            graph = Graph(module_types=module_types, state_shapes=state_shapes, parameters=parameters)
            _run(model, inputs, graph, state_ids)
        graph.eval_modules = _modules_run_in_eval(model, inputs)
    graph.batch_size = int(graph.values[graph.inputs[0]].shape[0]) if graph.values[graph.inputs[0]].shape else 1
    return graph
