"""Rebuild a model with a learned structure: a narrower deep copy with the same classes.

Every parameter / buffer dimension whose entries follow channels (the analysis's
``alignments``: conv and linear weights on both sides, biases, BatchNorm statistics,
GroupNorm affine parameters, per-channel parameters used in functional code, linear
inputs after a flatten, ...) is rebuilt by repeating each entry ``copies[group]`` times,
in place: 0 drops it, 1 keeps it, more builds fresh channels. Then the attributes that
store widths are updated by module type (conv in / out channels and depthwise groups,
BatchNorm / InstanceNorm ``num_features``, GroupNorm, LayerNorm, Linear, PReLU,
Embedding). Modules of other types keep their attributes; if their forward reads a
width from one, the check run at the end fails and the error names them.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from morphnet.capture import capture_graph
from morphnet.capture.graph import double_batch, meta_forward, preserved_state
from morphnet.channels.handlers import leaf_types
from morphnet.surgery.attention import fix_attention
from morphnet.surgery.structure import Structure, keep_nonempty, resolve


def apply_structure(model: nn.Module, structure, example_inputs, *, keep_weights: bool = False,
                    init_fn: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A new, narrower copy of ``model`` with the widths of ``structure``; ``model`` is untouched.

    ``structure``: alive counts ``{layer name: output channels}``, a path to an exporter
    JSON file, or a network regularizer (its currently alive channels). Layers absent from
    a counts dict keep their width; counts above a layer's width build fresh channels.
    ``keep_weights=True`` keeps the weights (and BatchNorm statistics) of the surviving
    channels: with a regularizer whose dead channels are exactly zero, the result computes
    the same outputs. Otherwise every submodule's ``reset_parameters()`` runs, then
    ``init_fn(slim)`` if given (for example the seed family's own initialization);
    parameters of modules without ``reset_parameters`` (ViT's class token) keep their values
    unless ``init_fn`` sets them.

    A layer reduced to zero channels: a linear layer may vanish (its consumer then sees
    only its bias); convolutions and normalization layers keep one channel group, with a
    warning, because PyTorch cannot run them with zero width.

    Counts are read against the default analysis, where the model's outputs keep their
    width; a structure learned with ``prune_outputs=True`` or boundaries should be passed
    as the regularizer itself.
    """
    s = resolve(model, structure, example_inputs)
    copies = keep_nonempty(s, s.copies)
    if keep_weights and s.regularizer is not None:
        _warn_dropped_shifts(model, s, copies)
    if keep_weights and s.regularizer is None and (copies < 1).any():
        warnings.warn("apply_structure(keep_weights=True) with alive counts keeps the first channels of every "
                      "narrowed layer: counts say how many channels survive, not which. To keep the channels a "
                      "regularizer found alive (the same function with dead channels zeroed), pass the "
                      "regularizer as the structure.", stacklevel=2)
    return _build(model, s, copies, example_inputs, keep_weights=keep_weights, init_fn=init_fn)


def _warn_dropped_shifts(model: nn.Module, s: Structure, copies: np.ndarray) -> None:
    """A BatchNorm channel with gamma ~ 0 outputs its shift beta, a constant: removing the channel removes
    that constant too. MorphNet's convention (dead means zero) makes that the intended structure, but the
    slim model then computes exactly the original only where the dropped betas are zero."""
    a = s.analysis
    state = dict(model.named_parameters())
    dropped, where = 0, []
    for name, ids in a.gamma_sources.items():
        beta = state.get(name.rpartition(".")[0] + ".bias")
        if beta is None or beta.shape != (len(ids),):
            continue
        gone = torch.as_tensor(copies[a.group_of[ids]] == 0, device=beta.device)
        n = int((beta.detach()[gone] != 0).sum())
        if n:
            dropped += n
            where.append(name.rpartition(".")[0])
    if dropped:
        warnings.warn(f"apply_structure(keep_weights=True): {dropped} pruned BatchNorm channels (in "
                      f"{', '.join(repr(w) for w in where[:3])}{', ...' if len(where) > 3 else ''}) have a non-zero "
                      f"shift (beta); each outputs that constant in the original model, which the slim model drops, "
                      f"so outputs match only where a later op zeroes it (a ReLU after beta < 0)", stacklevel=2)


def _build(model: nn.Module, s: Structure, copies: np.ndarray, example_inputs, *, keep_weights: bool = False,
          init_fn: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The copy of ``model`` with ``copies[g]`` instances of every channel group ``g``."""
    a = s.analysis
    if keep_weights and (copies > 1).any():
        wide = [n for n, layer in s.table.layers.items() if layer.count(copies) > layer.width]
        raise ValueError(f"keep_weights=True needs every width at most the model's, but the structure widens "
                         f"{', '.join(repr(n) for n in wide[:5])}; use keep_weights=False for expanded structures")
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    by_state: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, dim), ids in a.alignments.items():
        by_state.setdefault(name, []).append((dim, ids))
    replaced: dict[int, torch.Tensor] = {}  # id of an original tensor -> its rebuilt version
    with torch.no_grad():
        for name, dims in by_state.items():
            indices = [(d, np.repeat(np.arange(len(ids)), copies[a.group_of[ids]])) for d, ids in sorted(dims)]
            indices = [(d, i) for d, i in indices if not np.array_equal(i, np.arange(a.graph.state_shapes[name][d]))]
            if not indices:
                continue
            if name in a.opaque_states:
                raise AssertionError(f"internal error: '{name}' is used in a way the analysis cannot map, "
                                     f"yet the structure changes its channels")
            if name not in state:
                raise ValueError(f"'{name}' is not a parameter or buffer of {type(model).__name__}")
            old = state[name]
            t = old
            for d, i in indices:
                t = t.index_select(d, torch.as_tensor(i, device=t.device))
            replaced[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else t
    # deepcopy takes the rebuilt tensors from its memo: no copy of the old ones, tied tensors stay tied
    slim = copy.deepcopy(model, memo=dict(replaced))
    changed = {n for n, m in model.named_modules()
               if any(id(t) in replaced for t in list(m._parameters.values()) + list(m._buffers.values()))}
    originals = dict(model.named_modules())
    unknown = []
    for name, module in slim.named_modules():
        if not _update_attributes(module, originals[name], name, a, copies) and name in changed:
            unknown.append(f"'{name}' ({type(module).__name__})")
    if not keep_weights:
        with warnings.catch_warnings():  # layers that vanished have zero-element weights
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            for module in slim.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
        if init_fn is not None:
            init_fn(slim)
    _check_runs(slim, model, example_inputs, unknown, same_outputs=s.regularizer is None)
    _check_splits(slim, a, copies, example_inputs)
    if keep_weights and any((copies[a.group_of[ids]] == 0).any() for ids in a.normalized):
        warnings.warn(f"keep_weights=True: the structure removes channels that LayerNorm / RMSNorm normalize "
                      f"together (learned with prune_normalized=True), which changes their statistics, so the "
                      f"rebuilt {type(model).__name__} is not function-preserving: relative output deviation "
                      f"{_deviation(model, slim, example_inputs):.3g} on example_inputs. Fine-tune or retrain it.",
                      stacklevel=3)
    return slim


def _deviation(model: nn.Module, slim: nn.Module, example_inputs) -> float:
    """Largest relative deviation (L2) of ``slim``'s outputs from ``model``'s, in eval mode."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    worst = 0.0
    with preserved_state(model), preserved_state(slim), torch.no_grad():
        model.eval()
        slim.eval()
        want = [t for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
        got = [t for t in pytree.tree_leaves(slim(*inputs)) if isinstance(t, torch.Tensor)]
        for w, g in zip(want, got):
            if w.shape == g.shape and w.is_floating_point():
                worst = max(worst, float((g - w).norm() / w.norm().clamp_min(1e-30)))
    return worst


def _check_splits(slim: nn.Module, a, copies: np.ndarray, example_inputs) -> None:
    """The splits of channels the analysis followed (heads, chunks, shuffles) split the same way in ``slim``.

    The analysis assumes that a split's other dims are constants (a group count, a head
    width) and the carrying dim follows the width; code with a different habit would
    compute something else, so a mismatch is an error, never a silent change."""
    checks = a.shape_checks
    if not checks:
        return
    graph = capture_graph(slim, example_inputs, leaf_types=leaf_types())
    slim_nodes = {key: node for node, key in zip(graph.nodes, _node_keys(graph))}
    keys = _node_keys(a.graph)
    for c in checks:
        module = a.graph.nodes[c.node].module
        if graph.module_types.get(module) is not a.graph.module_types.get(module):
            continue  # a module whose forward the rebuild replaced (attention with pruned heads)
        node = slim_nodes.get(keys[c.node])
        if node is None or node.outputs[c.pos] is None:
            warnings.warn(f"the rebuilt {type(slim).__name__} no longer runs aten op '{a.graph.nodes[c.node].name}' "
                          f"in {a.graph.owner_description(a.graph.nodes[c.node].module)}; the channel split there "
                          f"could not be checked", stacklevel=3)
            continue
        got = graph.values[node.outputs[c.pos]].shape[c.dim]
        want = int(copies[a.group_of[c.ids]].sum())
        if got != want:
            raise RuntimeError(
                f"the rebuilt {type(slim).__name__} splits channels differently from the analysis: aten op "
                f"'{node.name}' in {graph.owner_description(node.module)} has {got} entries along dim {c.dim} "
                f"instead of {want}. Its code probably splits by a constant size; keep those channels with "
                f"input_boundary / output_boundary on that module, or report the model.")


def _width_from_data(name: str, a, copies: np.ndarray) -> int | None:
    """Channels a parameter-free module sees, from the ops it runs (None when unknown or fixed)."""
    for op in a.data_ops:
        if op.module == name and op.uses:
            ids = op.uses[0].ids
            return None if ids is None else int(copies[a.group_of[ids]].sum())
    return None


def _update_attributes(module: nn.Module, original: nn.Module, name: str, a, copies: np.ndarray) -> bool:
    """Set the width attributes of a module of a known type from its new state; False if unknown type."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        depthwise = original.groups > 1 and original.groups == original.in_channels
        if module.transposed:
            module.in_channels = w.shape[0]
            if depthwise:
                module.groups = module.in_channels
            module.out_channels = w.shape[1] * module.groups
        else:
            module.out_channels = w.shape[0]
            if depthwise:
                module.groups = module.out_channels * original.in_channels // original.out_channels
            module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Bilinear):
        module.out_features, module.in1_features, module.in2_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, SyncBatchNorm, InstanceNorm
        state = module.weight if module.weight is not None else module.running_mean
        width = state.shape[0] if state is not None else _width_from_data(name, a, copies)
        if width is not None:
            module.num_features = width
    elif isinstance(module, nn.GroupNorm):
        width = module.weight.shape[0] if module.weight is not None else _width_from_data(name, a, copies)
        if width is not None:
            module.num_groups = width // (original.num_channels // original.num_groups)
            module.num_channels = width
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    else:
        return fix_attention(module, original)
    return True


def _node_keys(graph) -> list[tuple[str, str, int]]:
    """(module, op, how many times the module ran that op before): stable across a rebuild."""
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for node in graph.nodes:
        k = (node.module, node.name)
        keys.append((node.module, node.name, seen.get(k, 0)))
        seen[k] = seen.get(k, 0) + 1
    return keys


def _check_runs(slim: nn.Module, model: nn.Module, example_inputs, unknown: list[str], same_outputs: bool) -> None:
    """Run ``slim`` in training and eval mode (on meta tensors when possible); clear error if it fails.

    With ``same_outputs`` its outputs must have the model's shapes (they do unless a
    regularizer with ``prune_outputs=True`` proposed the structure)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        for training in (True, False):
            got = _shapes(slim, inputs, training)
            want = _shapes(model, inputs, training) if same_outputs else got
            if got != want:
                raise RuntimeError(f"its outputs have shapes {got} instead of {want}")
    except Exception as e:
        culprits = (f" Modules of types this library does not know had parameters narrowed and may store a width "
                    f"in an attribute: {', '.join(unknown)}." if unknown else "")
        raise RuntimeError(f"the rebuilt {type(model).__name__} does not run on example_inputs: {e}.{culprits} "
                           f"Put such modules behind an input_boundary / output_boundary when learning the "
                           f"structure, or report the model.") from e


def _shapes(model: nn.Module, inputs: tuple, training: bool) -> list[tuple[int, ...]]:
    """Output shapes of one forward; batch doubled when BatchNorm cannot train on one example."""
    with preserved_state(model):
        model.train(training)
        try:
            out = _run_meta(model, inputs)
        except Exception:  # data-dependent code cannot run on meta tensors: run it for real
            with torch.no_grad():
                try:
                    out = model(*inputs)
                except ValueError as e:
                    if "Expected more than 1 value per channel" not in str(e):
                        raise
                    out = model(*double_batch(inputs))
    return [tuple(t.shape[1:]) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]




def _run_meta(model: nn.Module, inputs: tuple):
    """One forward on meta stand-ins (no arithmetic); every tensor of ``model`` is put back afterwards."""
    return meta_forward(model, double_batch(inputs))
