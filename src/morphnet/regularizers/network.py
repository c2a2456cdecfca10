"""Network regularizers: analysis + source + cost program behind the public API."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from morphnet.channels import analyze_model
from morphnet.costs import build_cost_program, get_hardware
from morphnet.evaluation import CostEvaluator
from morphnet.regularizers.floor import LayerFloor
from morphnet.sources import GammaSource, GroupLassoSource, Source, SourceGrouping

_COST_NAMES = {"flops": "FLOPs", "size": "ModelSize", "latency": "Latency", "activations": "Activations",
               "memory": "MemoryBytes"}
_RESOURCE_NAMES = {"flops": "Flops", "size": "ModelSize", "latency": "Latency", "activations": "Activation",
                   "memory": "Memory"}


class NetworkRegularizer:
    """A cost-weighted sparsity penalty over the prunable channels of ``model``.

    Subclasses choose the source (what is penalized) and the resource (what it costs).
    The analysis runs once, here; the term and the cost are then a fixed number of
    batched tensor ops that read the model's current parameters.

    ``prune_normalized=True`` also makes channels normalized together by LayerNorm /
    RMSNorm prunable (the residual width of transformers and ConvNeXt). Removing them
    changes the normalization statistics, so the rebuilt model is a starting point for
    fine-tuning or retraining, not the same function; ``apply_structure`` says so.

    ``regularizer_decorator(alive, reg, **decorator_parameters) -> (alive, reg)`` may
    transform the per-group alive (float, 1.0 = alive) and regularization vectors, for
    example to rescale the penalty or to force groups alive.

    ``min_layer_fraction=f`` keeps at least ceil(f x width) output channels of every conv /
    linear layer (``regularizers/floor.py``): no 1-channel bottlenecks.
    """

    source_name = ""

    def __init__(self, model: nn.Module, example_inputs, *, resource: str, hardware=None, batch_size: int = 1,
                 input_boundary: Sequence | None = None, output_boundary: Sequence | None = None,
                 force_group: Sequence[str] | None = None, regularizer_blacklist: Sequence[str] | None = None,
                 regularizer_decorator: Callable | None = None, decorator_parameters: dict | None = None,
                 prune_outputs: bool = False, prune_normalized: bool = False, min_layer_fraction: float = 0.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.resource = resource
        self.hardware = get_hardware(hardware) if hardware is not None else None
        if resource == "latency" and self.hardware is None:
            raise ValueError("latency regularizers need hardware=..., e.g. 'V100' or 'H100'")
        self.batch_size = batch_size
        self.analysis = analyze_model(
            model, example_inputs, input_boundary=input_boundary, output_boundary=output_boundary,
            force_group=force_group, regularizer_blacklist=regularizer_blacklist, prune_outputs=prune_outputs,
            prune_normalized=prune_normalized)
        self.graph = self.analysis.graph
        self.source = self._make_source(model)
        self.grouping = SourceGrouping(self.analysis, self.source)
        if not self.grouping.regularized.any():
            if not self.grouping.uncovered.any():
                raise ValueError(self._no_source_message())
            warnings.warn(f"{type(self).__name__}: {self._uncovered_message()} Nothing is left to regularize: "
                          f"the term is 0 and every channel stays alive.", stacklevel=2)
        self.program = build_cost_program(self.analysis, resource, hardware=self.hardware, batch_size=batch_size)
        self.evaluator = CostEvaluator(self.program, self.analysis.group_of, self.analysis.num_groups)
        self.decorator = regularizer_decorator
        self.decorator_parameters = dict(decorator_parameters or {})
        self._module_names = {n for n, _ in model.named_modules()}
        self._module_ids = {id(m): n for n, m in model.named_modules()}
        self._export = self._export_table()
        self.floor: LayerFloor | None = None
        self.set_min_layer_fraction(min_layer_fraction)

    # ---- subclass hooks ---------------------------------------------------------------------------
    def _make_source(self, model: nn.Module) -> Source:
        raise NotImplementedError

    def _no_source_message(self) -> str:
        return (f"{type(self).__name__}: no {self.source.description} reaches a prunable channel group of "
                f"{type(self.model).__name__}, so there is nothing to regularize.")

    def _uncovered_message(self) -> str:
        layers = self.coverage_summary()["uncovered_layers"]
        return (f"{int(self.grouping.uncovered.sum())} channel groups reached by the {self.source.description} "
                f"are also read where it does not zero them (for example "
                f"{', '.join(repr(n) for n in layers[:3]) or 'a raw shortcut'}), so a small value would not make "
                f"them dead; they stay alive and carry no penalty.")

    def coverage_summary(self) -> dict:
        """How many channel groups the source regularizes, and which layers it cannot prune.

        ``uncovered``: groups the source reaches but some reader sees around it (a raw
        shortcut next to a BatchNorm, a BatchNorm after a group-lasso conv); they stay alive.
        """
        g = self.grouping
        uncovered = [name for name, groups in self._layer_groups() if g.uncovered[groups].any()]
        return {"groups": int(self.analysis.num_groups), "regularized": int(g.regularized.sum()),
                "uncovered": int(g.uncovered.sum()), "fixed": int(self.analysis.fixed_group.sum()),
                "uncovered_layers": uncovered}

    def _layer_groups(self) -> list[tuple[str, np.ndarray]]:
        rows: dict[str, np.ndarray] = {}
        for name in sorted(self.analysis.weights):
            info = self.analysis.weights[name]
            rows.setdefault(info.module, self.analysis.group_of[info.out_ids])
        return sorted(rows.items())

    # ---- public API -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.source_name}{_RESOURCE_NAMES[self.resource]}"

    @property
    def cost_name(self) -> str:
        return _COST_NAMES[self.resource]

    def get_regularization_term(self, modules=None) -> torch.Tensor:
        """Differentiable 0-dim penalty on the sources' device and dtype."""
        values = self.source.values()
        alive_g, reg_g = self._group_vectors(values, with_reg=True)
        _, term = self.evaluator.evaluate(alive_g, reg_g, self._mask(modules, values.device))
        return term.to(values.dtype)

    def get_cost(self, modules=None) -> torch.Tensor:
        """Cost of the network with the currently alive channels (0-dim, no gradient)."""
        with torch.no_grad():
            values = self.source.values()
            alive_g, _ = self._group_vectors(values, with_reg=False)
            cost, _ = self.evaluator.evaluate(alive_g, None, self._mask(modules, values.device))
        return cost

    def set_min_layer_fraction(self, fraction: float) -> None:
        """Keep at least ``fraction`` of every conv / linear layer's output channels: the groups with
        the largest values, enough to cover it, carry no penalty and count as alive (0 turns it off)."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"min_layer_fraction must be a number in [0, 1], got {fraction!r}")
        self.min_layer_fraction = float(fraction)
        self.floor = LayerFloor(self._export, self.grouping.regularized, fraction) if fraction > 0 else None

    def minimum_cost(self) -> float:
        """The smallest cost a learned structure can have: every regularized channel group dead
        except what each conv / linear layer keeps, its floor (``min_layer_fraction``) or, without
        one, one channel (the rebuild keeps one in every convolution; a layer with none cuts the
        network). Unregularized groups count as alive, as in ``get_cost``. A target below it
        cannot be reached (``TargetCost`` refuses one)."""
        with torch.no_grad():
            values = self.source.values()
            _, reg_g = self.grouping.group_vectors(values, self.source.alive(values), True)
            regularized = torch.as_tensor(self.grouping.regularized, device=reg_g.device)
            alive_g = torch.where(regularized, 0.0, 1.0).to(reg_g.dtype)
            if self._export:
                # a floor with a vanishing fraction keeps ceil(eps x width) = 1 channel per layer
                keep = LayerFloor(self._export, self.grouping.regularized, max(self.min_layer_fraction, 1e-9))
                alive_g, _ = keep(alive_g, reg_g)
            cost, _ = self.evaluator.evaluate(alive_g, None, None)
        return float(cost)

    # ---- internals ------------------------------------------------------------------------------
    def _group_vectors(self, values: torch.Tensor, with_reg: bool):
        alive = self.source.alive(values)
        need_reg = with_reg or self.decorator is not None or self.floor is not None
        alive_g, reg_g = self.grouping.group_vectors(values, alive, need_reg)
        if self.floor is not None:
            alive_g, reg_g = self.floor(alive_g, reg_g)
        if self.decorator is not None:
            alive_g, reg_g = self.decorator(alive_g, reg_g, **self.decorator_parameters)
        return alive_g, reg_g

    def group_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (alive, regularization) float64 vectors, decorator applied (no gradient)."""
        with torch.no_grad():
            return self._group_vectors(self.source.values(), with_reg=True)

    def alive_groups(self) -> torch.Tensor:
        """Per-group alive flags (bool, on the sources' device)."""
        with torch.no_grad():
            values = self.source.values()
            alive_g, _ = self._group_vectors(values, with_reg=False)
        return alive_g > 0.5

    def _mask(self, modules, device) -> torch.Tensor | None:
        if modules is None:
            return None
        if isinstance(modules, (str, nn.Module)):
            modules = [modules]
        names = []
        for m in modules:
            name = self._module_ids.get(id(m)) if isinstance(m, nn.Module) else m
            if name is None or name not in self._module_names:
                raise ValueError(f"modules: {m!r} is not a module of the model (see model.named_modules())")
            names.append(name)
        layer_mods = self.evaluator.layer_modules
        sel = np.array([any(lm == n or lm.startswith(n + ".") or n == "" for n in names) for lm in layer_mods],
                       dtype=bool)
        return self.evaluator.layer_mask(sel, device)

    def _export_table(self) -> list[tuple[str, np.ndarray]]:
        """(module, output-channel groups) for conv / linear layers with regularized outputs.

        A module that owns several weights (functional code) is listed under its first
        weight's output channels.
        """
        rows: dict[str, np.ndarray] = {}
        for name in sorted(self.analysis.weights):
            info = self.analysis.weights[name]
            groups = self.analysis.group_of[info.out_ids]
            if info.module not in rows and self.grouping.regularized[groups].any():
                rows[info.module] = groups
        return sorted(rows.items(), key=lambda row: row[0])

    def alive_counts(self) -> dict[str, int]:
        """Alive output channels of every conv / linear layer whose outputs are regularized."""
        if not self._export:
            return {}
        alive = self.alive_groups().cpu().numpy()
        return {name: int(alive[groups].sum()) for name, groups in self._export}


class _Gamma(NetworkRegularizer):
    source_name = "Gamma"

    def __init__(self, model, example_inputs, *, gamma_threshold: float, **kw):
        self.gamma_threshold = gamma_threshold
        super().__init__(model, example_inputs, **kw)

    def _make_source(self, model):
        return GammaSource(model, self.analysis, self.gamma_threshold)

    def _no_source_message(self) -> str:
        return (super()._no_source_message() + " Gamma regularizers need BatchNorm layers after the prunable "
                "convs / linears; use the GroupLasso variant of this regularizer, which penalizes the weights.")


#: The default alive threshold of group lasso, relative: a channel is dead when its weight norm falls
#: below 0.1 x its layer's channel-norm scale (root mean square) when the regularizer is built. A
#: fixed norm depends on the initialization's scale: 1e-2 counted half of mobilenet_v3_small's
#: classifier (initialized with std 0.01) dead before training. The API, ``morphnet run`` and the
#: Lightning / Hugging Face callbacks all use it when no threshold is given.
GROUP_LASSO_THRESHOLD = 0.1


class _GroupLasso(NetworkRegularizer):
    """``threshold=None``: the relative default, :data:`GROUP_LASSO_THRESHOLD` x each layer's initial
    channel-norm scale. A number given is an absolute norm, unless ``relative_threshold=True``."""

    source_name = "GroupLasso"

    def __init__(self, model, example_inputs, *, threshold: float | None = None, l1_fraction: float = 0.0,
                 relative_threshold: bool | None = None, penalize_bias: bool = True, **kw):
        if not 0.0 <= l1_fraction <= 1.0:
            raise ValueError(f"l1_fraction must be in [0, 1], got {l1_fraction}")
        if threshold is None and relative_threshold is False:
            raise ValueError("group lasso: relative_threshold=False needs an absolute threshold=...; leave both "
                             f"out for the relative default ({GROUP_LASSO_THRESHOLD} x each layer's initial scale)")
        self.threshold = GROUP_LASSO_THRESHOLD if threshold is None else threshold
        self.l1_fraction = l1_fraction
        # threshold x each layer's initial channel-norm scale
        self.relative_threshold = threshold is None if relative_threshold is None else relative_threshold
        self.penalize_bias = penalize_bias  # a channel's bias is part of its group's norm
        super().__init__(model, example_inputs, **kw)

    def _make_source(self, model):
        return GroupLassoSource(model, self.analysis, self.threshold, self.l1_fraction, relative=self.relative_threshold,
                                penalize_bias=self.penalize_bias)


class GammaFlopsRegularizer(_Gamma):
    """L1 on BatchNorm gammas weighted by FLOPs."""

    def __init__(self, model, example_inputs, gamma_threshold: float, **kw):
        super().__init__(model, example_inputs, gamma_threshold=gamma_threshold, resource="flops", **kw)


class GroupLassoFlopsRegularizer(_GroupLasso):
    """Group lasso on conv / linear weights weighted by FLOPs."""

    def __init__(self, model, example_inputs, threshold: float | None = None, l1_fraction: float = 0.0, **kw):
        super().__init__(model, example_inputs, threshold=threshold, l1_fraction=l1_fraction, resource="flops", **kw)


class GammaModelSizeRegularizer(_Gamma):
    """L1 on BatchNorm gammas weighted by weight count."""

    def __init__(self, model, example_inputs, gamma_threshold: float, **kw):
        super().__init__(model, example_inputs, gamma_threshold=gamma_threshold, resource="size", **kw)


class GroupLassoModelSizeRegularizer(_GroupLasso):
    """Group lasso weighted by weight count."""

    def __init__(self, model, example_inputs, threshold: float | None = None, l1_fraction: float = 0.0, **kw):
        super().__init__(model, example_inputs, threshold=threshold, l1_fraction=l1_fraction, resource="size", **kw)


class GammaLatencyRegularizer(_Gamma):
    """L1 on BatchNorm gammas weighted by roofline latency on ``hardware``."""

    def __init__(self, model, example_inputs, gamma_threshold: float, hardware, batch_size: int = 1, **kw):
        super().__init__(model, example_inputs, gamma_threshold=gamma_threshold, resource="latency",
                         hardware=hardware, batch_size=batch_size, **kw)


class GroupLassoLatencyRegularizer(_GroupLasso):
    """Group lasso weighted by roofline latency on ``hardware``."""

    def __init__(self, model, example_inputs, threshold: float | None = None, hardware=None, batch_size: int = 1,
                 l1_fraction: float = 0.0, **kw):
        super().__init__(model, example_inputs, threshold=threshold, l1_fraction=l1_fraction, resource="latency",
                         hardware=hardware, batch_size=batch_size, **kw)


class GammaActivationRegularizer(_Gamma):
    """L1 on BatchNorm gammas weighted by the alive activation count."""

    def __init__(self, model, example_inputs, gamma_threshold: float, **kw):
        super().__init__(model, example_inputs, gamma_threshold=gamma_threshold, resource="activations", **kw)


class GroupLassoActivationRegularizer(_GroupLasso):
    """Group lasso weighted by the alive activation count."""

    def __init__(self, model, example_inputs, threshold: float | None = None, l1_fraction: float = 0.0, **kw):
        super().__init__(model, example_inputs, threshold=threshold, l1_fraction=l1_fraction,
                         resource="activations", **kw)
