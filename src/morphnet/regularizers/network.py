"""Network regularizers: analysis + source + cost program behind the public API."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from morphnet.channels import analyze_model
from morphnet.costs import build_cost_program, resolve_latency_hardware
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

    def __init__(self, model: nn.Module, example_inputs, *, resource: str, hardware=None, batch_size: int | None = None,
                 input_boundary: Sequence | None = None, output_boundary: Sequence | None = None,
                 force_group: Sequence[str] | None = None, regularizer_blacklist: Sequence[str] | None = None,
                 regularizer_decorator: Callable | None = None, decorator_parameters: dict | None = None,
                 prune_outputs: bool = False, prune_normalized: bool = False, min_layer_fraction: float = 0.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.resource = resource
        if resource == "latency" and hardware is None:
            raise ValueError("latency regularizers need hardware=..., e.g. 'V100', 'H100' or 'measured' (timed on "
                             "this device)")
        self.analysis = analyze_model(
            model, example_inputs, input_boundary=input_boundary, output_boundary=output_boundary,
            force_group=force_group, regularizer_blacklist=regularizer_blacklist, prune_outputs=prune_outputs,
            prune_normalized=prune_normalized)
        # a roofline entry, or latency measured on the device (a table, or "measured": timed now or cached)
        self.hardware, self.batch_size = (resolve_latency_hardware(
            hardware, model=model, example_inputs=example_inputs, batch_size=batch_size, analysis=self.analysis,
            what=type(self).__name__) if resource == "latency" else (None, batch_size or 1))
        self.graph = self.analysis.graph
        self.source = self._make_source(model)
        self.grouping = SourceGrouping(self.analysis, self.source)
        if not self.grouping.regularized.any():
            if not self.grouping.uncovered.any():
                raise ValueError(self._no_source_message())
            warnings.warn(f"{type(self).__name__}: {self._uncovered_message()} Nothing is left to regularize: "
                          f"the term is 0 and every channel stays alive.", stacklevel=2)
        self.program = build_cost_program(self.analysis, resource, hardware=self.hardware, batch_size=self.batch_size)
        self.evaluator = CostEvaluator(self.program, self.analysis.group_of, self.analysis.num_groups)
        self.decorator = regularizer_decorator
        self.decorator_parameters = dict(decorator_parameters or {})
        self._module_names = {n for n, _ in model.named_modules()}
        self._module_ids = {id(m): n for n, m in model.named_modules()}
        self._export = self._export_table()
        self.floor: LayerFloor | None = None
        self.set_min_layer_fraction(min_layer_fraction)
        self.threshold_scale = 1.0
        self.revived: torch.Tensor | None = None  # groups kept alive by land_on_cost, whatever their values

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

    def set_threshold_scale(self, scale: float) -> None:
        """Multiply the alive threshold by ``scale`` (1 restores it) for everything that reads alive
        channels: ``get_cost``, the exporter, ``apply_structure``. A scale above 1 declares the
        weakest alive channels dead too (the landing of ``morphnet.compress``); below 1 revives the
        strongest dead ones. Sources without a threshold on their values (gates) accept only 1."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or not np.isfinite(scale):
            raise ValueError(f"threshold scale must be a positive number, got {scale!r}")
        if scale != 1.0 and self.source.alive_ratio(self.source.values().detach()) is None:
            raise ValueError(f"{type(self).__name__}: the {self.source.description} source has no alive threshold "
                             f"to scale (a threshold of 0, or probabilistic gates)")
        self.threshold_scale = float(scale)

    def threshold_scale_for_cost(self, target: float) -> float:
        """The smallest threshold scale at which the cost is at most ``target`` (an absolute cost in
        ``cost_name`` units): the channels kept are the strongest ones, as many as the target allows.
        Raises ``ValueError`` naming the lowest reachable cost when even the largest scale (every
        regularized channel dead but the per-layer floor) costs more. The current scale is kept."""
        with torch.no_grad():
            values = self.source.values().detach()
            ratio = self.source.alive_ratio(values)
            if ratio is None:
                raise ValueError(f"{type(self).__name__}: the {self.source.description} source has no alive "
                                 f"threshold to scale (a threshold of 0, or probabilistic gates)")
            candidates = torch.unique(ratio.double()).cpu()
            candidates = candidates[torch.isfinite(candidates) & (candidates > 0)]
            if len(candidates) == 0:
                candidates = torch.ones(1, dtype=torch.float64)
            saved = self.threshold_scale
            try:
                def cost(scale: float) -> float:
                    self.threshold_scale = scale
                    return float(self.get_cost())

                top = float(candidates[-1])  # every entry dead at its own ratio (alive: ratio > scale)
                lowest = cost(top)
                if lowest > target:
                    raise ValueError(f"{type(self).__name__}: a {self.cost_name} target of {target:.6g} is below "
                                     f"the lowest cost this structure allows, {lowest:.6g} (every regularized "
                                     f"channel dead but the fixed ones and the per-layer floor)")
                lo, hi = -1, len(candidates) - 1  # cost(candidates[hi]) <= target; lo is below the range
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if cost(float(candidates[mid])) <= target:
                        hi = mid
                    else:
                        lo = mid
                return float(candidates[hi])
            finally:
                self.threshold_scale = saved

    def value_gradients(self) -> torch.Tensor:
        """d(term) / d(value) for every source entry (BatchNorm scale, weight row norm), in the order of
        the source's values: what a unit of that value costs in the regularization term right now (0 for
        entries that carry no penalty: unregularized, floored, or not the largest of their group)."""
        values = self.source.values().detach().requires_grad_(True)
        alive_g, reg_g = self._group_vectors(values, with_reg=True)
        _, term = self.evaluator.evaluate(alive_g, reg_g, None)
        if not term.requires_grad:
            return torch.zeros_like(values)
        (grad,) = torch.autograd.grad(term, values)
        return grad

    def group_ratios(self) -> torch.Tensor:
        """Per channel group, the largest of its entries' values over the alive threshold (alive: > 1 at
        threshold scale 1); float64, 0 for groups without entries."""
        with torch.no_grad():
            values = self.source.values().detach()
            ratio = self.source.alive_ratio(values)
            if ratio is None:
                raise ValueError(f"{type(self).__name__}: the {self.source.description} source has no alive "
                                 f"threshold to compare values with")
            t = self.grouping.tensors(values.device)
            out = torch.zeros(self.grouping.num_groups, dtype=torch.float64, device=values.device)
            return out.scatter_reduce(0, t["group"], ratio.double(), "amax", include_self=True)

    def land_on_cost(self, target: float, scores: torch.Tensor | None = None) -> float:
        """Make the alive channels the strongest set that costs at most ``target``: the threshold
        scaled as :meth:`threshold_scale_for_cost` says, then the strongest dead channel groups revived
        one by one wherever one still fits (a cheap group can fit where a costly one just above it did
        not), so the cost lands within a small fraction of a group of the target. ``scores`` (one per
        channel group, higher kept first) replaces the source's values as the ranking. Returns the cost.
        Stays in force (exporter, ``apply_structure``) until :meth:`reset_landing`."""
        self.reset_landing()
        with torch.no_grad():
            regularized = self.grouping.tensors(self.source.values().device)["regularized"]
            if scores is None:
                self.set_threshold_scale(self.threshold_scale_for_cost(target))
                strength = self.group_ratios()
                revived = torch.zeros(self.grouping.num_groups, dtype=torch.bool, device=strength.device)
                self.revived = revived
            else:
                strength = scores.detach().to(regularized.device, torch.float64)
                revived = self._revive_by_score(strength, regularized, target)
            dead = (~self.alive_groups()) & regularized
            order = [int(g) for g in torch.argsort(strength, descending=True) if dead[g]]
            cost = float(self.get_cost())
            # Reviving group g sets its alive entry to 1 and changes nothing else (the floor reads the values,
            # not the alive test), so the fill flips entries of one alive vector instead of recomputing it per
            # group: thousands of groups (a MobileNetV2) in seconds. A decorator may couple groups: recompute.
            alive_g = self._group_vectors(self.source.values(), with_reg=False)[0] if self.decorator is None else None
            for group in order:
                revived[group] = True
                if alive_g is None:
                    trial = float(self.get_cost())
                else:
                    previous = float(alive_g[group])
                    alive_g[group] = 1.0
                    trial = float(self.evaluator.evaluate(alive_g, None, None)[0])
                if trial <= target:
                    cost = trial
                else:
                    revived[group] = False
                    if alive_g is not None:
                        alive_g[group] = previous
        return cost

    def _revive_by_score(self, scores: torch.Tensor, regularized: torch.Tensor, target: float) -> torch.Tensor:
        """Every regularized group dead by its values, alive by ``scores`` above the lowest cut that
        costs at most ``target`` (bisection over the distinct scores); returns the revived mask in force."""
        self.threshold_scale = math.inf  # the source's own alive test: every regularized group dead
        revived = torch.zeros_like(regularized)
        self.revived = revived
        if float(self.get_cost()) > target:
            raise ValueError(f"{type(self).__name__}: a {self.cost_name} target of {target:.6g} is below the lowest "
                             f"cost this structure allows, {float(self.get_cost()):.6g} (every regularized channel "
                             f"dead but the fixed ones and the per-layer floor)")
        cuts = torch.unique(scores[regularized]).cpu()
        lo, hi = -1, len(cuts)  # hi: the index of a cut that fits (len: nothing revived)

        def fits(k: int) -> bool:
            revived.copy_(regularized & (scores > cuts[k].item()))
            return float(self.get_cost()) <= target

        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid
        revived.copy_(regularized & (scores > cuts[hi].item()) if hi < len(cuts) else torch.zeros_like(regularized))
        return revived

    def reset_landing(self) -> None:
        """Undo :meth:`land_on_cost` (and any threshold scale): alive is the plain threshold test again."""
        self.threshold_scale = 1.0
        self.revived = None

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
        if self.threshold_scale == 1.0:
            alive = self.source.alive(values)
        else:
            alive = self.source.alive_ratio(values) > self.threshold_scale
        need_reg = with_reg or self.decorator is not None or self.floor is not None
        alive_g, reg_g = self.grouping.group_vectors(values, alive, need_reg)
        if self.revived is not None:
            alive_g = torch.where(self.revived.to(alive_g.device), 1.0, alive_g)
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
    """L1 on BatchNorm gammas weighted by latency on ``hardware``: a roofline entry ('V100', 'H100', ...),
    ``"measured"`` (timed on the model's device, cached) or a ``morphnet.measure_latency`` table.
    ``batch_size`` defaults to 1 (a table's own batch size)."""

    def __init__(self, model, example_inputs, gamma_threshold: float, hardware, batch_size: int | None = None, **kw):
        super().__init__(model, example_inputs, gamma_threshold=gamma_threshold, resource="latency",
                         hardware=hardware, batch_size=batch_size, **kw)


class GroupLassoLatencyRegularizer(_GroupLasso):
    """Group lasso weighted by latency on ``hardware`` (as ``GammaLatencyRegularizer``)."""

    def __init__(self, model, example_inputs, threshold: float | None = None, hardware=None,
                 batch_size: int | None = None,
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
