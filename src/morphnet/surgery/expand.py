"""Uniform expansion of a structure, rounding, and the width multiplier that meets a cost target.

Layers coupled by residual adds or depthwise convs share channel groups, so widths are
scaled per *atom*, never per layer: an atom is the set of channel groups held by the same
listed layers (a residual stage; one branch of a concat read by a depthwise conv). An
atom with n kept groups gets ``round(factor * n)`` of them, rounded to the unit that
makes its part of every layer's width a multiple of ``round_to`` (a grouped conv with 8
groups already comes in blocks of 8). An atom that had channels keeps at least one unit;
one that vanished stays at zero. Channels that cannot be pruned (model outputs, ...) keep their width and
are not rounded. Widths may exceed the seed's: ``apply_structure`` then builds fresh
channels (expanded structures are for retraining from scratch).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
from torch import nn

from morphnet.costs import build_cost_program, resolve_latency_hardware
from morphnet.evaluation import CostEvaluator
from morphnet.regularizers import NetworkRegularizer
from morphnet.surgery.structure import Structure, _fill, copies_for_counts, keep_nonempty, resolve

_RESOURCES = ("flops", "size", "latency")


def expand_structure(model: nn.Module, structure, example_inputs, factor: float, *,
                     round_to: int | None = None) -> dict[str, int]:
    """Scale every width of ``structure`` by ``factor`` (coupled layers together), rounded to ``round_to``."""
    if not factor >= 0 or math.isinf(factor):
        raise ValueError(f"factor must be a finite number >= 0, got {factor}")
    s = _resolve_counts(model, structure, example_inputs)
    return _Expander(s, round_to).counts(factor)


def find_width_multiplier(model: nn.Module, structure, example_inputs, target_cost: float, *,
                          resource: str = "flops", hardware=None, round_to: int | None = None,
                          tolerance: float | None = 0.01, batch_size: int | None = None) -> tuple[float, dict[str, int]]:
    """The factor whose expansion of ``structure`` costs ``target_cost`` (within ``tolerance``, a
    fraction; ``None`` takes the closest cost the integer widths allow), and its counts.

    The cost is that of ``apply_structure(model, counts, example_inputs)``: FLOPs per
    example, weight count ('size'), or latency on ``hardware`` (a roofline entry at
    ``batch_size``, default 1; ``"measured"`` or a ``morphnet.measure_latency`` table, at its batch).
    The counts are ``expand_structure(..., factor, round_to=round_to)``, except that atoms
    reaching their next rounding step at exactly this factor step up only as far as the
    target needs (equal layers would otherwise all jump at once).
    """
    if not target_cost > 0:
        raise ValueError(f"target_cost must be > 0, got {target_cost}")
    costing = _Costing(model, structure, example_inputs, resource, hardware, round_to, batch_size)
    try:
        factor, counts, _ = costing.search(target_cost, tolerance)
    except _NoFactorWithin as error:
        raise ValueError(f"{error}; tolerance=None takes the closest") from None
    return factor, counts


def fit_to_budget(model: nn.Module, structure, example_inputs, target: float, *, resource: str = "flops",
                  hardware=None, round_to: int | None = None, tolerance: float = 0.01,
                  batch_size: int | None = None) -> tuple[float | None, dict[str, int]]:
    """Land ``structure`` on a budget with the uniform width multiplier, as ``morphnet run`` does
    after learning: returns ``(multiplier, counts)`` for ``apply_structure(model, counts, ...)``.

    ``target`` <= 1 is a fraction of ``model``'s cost, > 1 an absolute cost in ``resource`` units.
    A structure whose cost (as rebuilt, with ``round_to``) is already within ``tolerance`` of it is
    returned as it is, with multiplier None: learned widths are not rescaled for a residual.
    Otherwise every width is scaled by the factor that lands within ``tolerance``; when the
    integer widths allow none (whole attention heads, ``round_to``), by the one that comes
    closest, with a warning saying how far it lands. ``structure``: alive counts (for example
    ``TargetCost.best_structure()``), a structure file or a network regularizer.
    """
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ValueError(f"fit_to_budget: tolerance must be a positive fraction, got {tolerance!r}")
    if not target > 0:
        raise ValueError(f"fit_to_budget: target must be positive (<= 1: a fraction of the model's cost, > 1: "
                         f"an absolute cost), got {target}")
    costing = _Costing(model, structure, example_inputs, resource, hardware, round_to, batch_size)
    budget = target * costing.full_cost() if target <= 1 else float(target)
    if round_to:
        units = costing.ex.units(1.0)
        as_is, counts = costing.cost(units), costing.s.counts(costing.ex.copies(units))
    else:
        as_is, counts = costing.structure_cost(), costing.s.counts()
    if abs(as_is / budget - 1) <= tolerance:
        return None, counts
    try:
        factor, counts, _ = costing.search(budget, tolerance)
    except _NoFactorWithin as error:
        factor, counts, reached = costing.search(budget, None)
        warnings.warn(f"fit_to_budget: {error}; took the closest, x{factor:.4f} ({reached / budget - 1:+.1%} from "
                      f"the budget)", stacklevel=2)
    return factor, counts


class _NoFactorWithin(ValueError):
    """No width multiplier lands within the tolerance (the integer widths step over it)."""


class _Costing:
    """A structure resolved against ``model`` with the cost of any of its expansions (cached)."""

    def __init__(self, model: nn.Module, structure, example_inputs, resource: str, hardware, round_to: int | None,
                 batch_size: int | None = None):
        if resource not in _RESOURCES:
            raise ValueError(f"resource must be one of {', '.join(_RESOURCES)}, got {resource!r}")
        if resource == "latency" and hardware is None:
            raise ValueError("resource='latency' needs hardware=..., e.g. 'V100', 'H100' or 'measured'")
        self.resource, self.round_to = resource, round_to
        self.s = _resolve_counts(model, structure, example_inputs)
        if resource == "latency":  # a roofline entry at batch_size (default 1), or a measured table at its batch
            hardware, batch_size = resolve_latency_hardware(hardware, model=model, example_inputs=example_inputs,
                                                            batch_size=batch_size, analysis=self.s.analysis,
                                                            what="find_width_multiplier")
        program = build_cost_program(self.s.analysis, resource, hardware=hardware if resource == "latency" else None,
                                     batch_size=batch_size or 1)
        self.evaluator = CostEvaluator(program, self.s.analysis.group_of, self.s.analysis.num_groups)
        self.ex = _Expander(self.s, round_to)
        self.cost = functools.lru_cache(maxsize=None)(self._cost)

    def _cost(self, units: tuple[int, ...]) -> float:
        s = self.s
        counts = s.counts(self.ex.copies(units))
        copies = keep_nonempty(s, copies_for_counts(s.table, counts, s.names), warn=False)
        return float(self.evaluator.evaluate(torch.as_tensor(copies, dtype=torch.float64), None)[0])

    def structure_cost(self) -> float:
        """The cost of the structure as ``apply_structure`` builds it."""
        copies = keep_nonempty(self.s, self.s.copies, warn=False)
        return float(self.evaluator.evaluate(torch.as_tensor(copies, dtype=torch.float64), None)[0])

    def full_cost(self) -> float:
        """The cost of the model itself (every channel)."""
        ones = torch.ones(self.s.analysis.num_groups, dtype=torch.float64)
        return float(self.evaluator.evaluate(ones, None)[0])

    def search(self, target_cost: float, tolerance: float | None) -> tuple[float, dict[str, int], float]:
        """The factor whose expansion costs ``target_cost`` within ``tolerance`` (None: the closest),
        its counts and their cost."""
        ex, cost, resource, round_to = self.ex, self.cost, self.resource, self.round_to

        def at(f: float) -> float:
            return cost(ex.units(f))

        lo, hi = 0.0, 1.0
        while at(hi) < target_cost:
            if hi > 1e4:
                raise ValueError(f"target_cost {target_cost:.6g} is out of reach: the expanded structure costs at "
                                 f"most {at(hi):.6g} {resource} (no layer of the structure can grow)")
            lo, hi = hi, hi * 2
        while at(lo) < target_cost:
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if at(mid) < target_cost:
                lo = mid
            else:
                hi = mid
        # Atoms of equal size reach their next rounding step at the same factor (DenseNet's layers,
        # RegNet's blocks): between lo and hi, step them up one at a time and keep the closest cost.
        factor, units = lo, ex.units(lo)
        tried = {units: cost(units)}
        if tried[units] < target_cost:
            current, step_to = list(units), ex.units(hi)
            for i in [i for i, (a, b) in enumerate(zip(units, step_to)) for _ in range(b - a)]:
                current[i] += 1
                tried[tuple(current)] = cost(tuple(current))
                if tried[tuple(current)] >= target_cost:
                    break
        best = min(tried, key=lambda u: abs(tried[u] - target_cost))
        if tolerance is not None and abs(tried[best] - target_cost) > tolerance * target_cost:
            below = max((c for c in tried.values() if c < target_cost), default=None)
            above = min((c for c in tried.values() if c >= target_cost), default=None)
            raise _NoFactorWithin(
                f"no width multiplier puts the cost within {tolerance:.0%} of {target_cost:.6g} {resource}: the "
                f"nearest expansions cost {below} and {above}"
                + (f" (round_to={round_to} makes the steps coarse; try a smaller one)" if round_to else ""))
        return (factor if best == units else hi), self.s.counts(ex.copies(best)), tried[best]


def _resolve_counts(model: nn.Module, structure, example_inputs) -> Structure:
    """Widths only: a regularizer contributes its alive counts, read against the default analysis."""
    if isinstance(structure, NetworkRegularizer):
        structure = structure.alive_counts()
    return resolve(model, structure, example_inputs)


class _Expander:
    """Atoms of a structure (groups shared by the same listed layers) and their scaling.

    Every listed layer's channels are a union of atoms: a residual stage is one atom, a
    depthwise conv after a concat holds one atom per concatenated branch. Scaling and
    rounding atoms keeps every coupled layer consistent and every width a sum of rounded
    parts.
    """

    def __init__(self, s: Structure, round_to: int | None):
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
        self.s = s
        members: dict[int, list[int]] = {}  # group -> listed layers holding it
        mults: dict[tuple[int, int], int] = {}
        for i, name in enumerate(s.names):
            layer = s.table.layers[name]
            for g, m in zip(layer.groups[~layer.fixed], layer.mult[~layer.fixed]):
                members.setdefault(int(g), []).append(i)
                mults[int(g), i] = int(m)
        atoms: dict[tuple[int, ...], list[int]] = {}
        for g, layers in members.items():
            atoms.setdefault(tuple(layers), []).append(g)
        self.atoms = []  # (groups in order, unit in groups)
        for layers, groups in atoms.items():
            unit = 1
            if round_to:
                for i in layers:
                    step = int(np.gcd.reduce([mults[g, i] for g in groups]))
                    unit = math.lcm(unit, round_to // math.gcd(round_to, step))
            self.atoms.append((np.array(groups, np.int64), unit))

    def units(self, factor: float) -> tuple[int, ...]:
        """Rounding units per atom at ``factor`` (at least one where the atom had channels)."""
        out = []
        for groups, unit in self.atoms:
            n = int(self.s.copies[groups].sum())
            out.append(0 if n == 0 else max(1, math.floor(factor * n / unit + 0.5)))
        return tuple(out)

    def copies(self, units) -> np.ndarray:
        copies = self.s.copies.copy()
        for (groups, unit), k in zip(self.atoms, units):
            copies[groups] = _fill(np.ones(len(groups), np.int64), int(k) * unit)
        return copies

    def counts(self, factor: float) -> dict[str, int]:
        return self.s.counts(self.copies(self.units(factor)))
