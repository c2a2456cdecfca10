"""Target-cost mode: steer the regularization strength so the learned structure lands on a budget.

The plant is awkward for a controller. The strength sets how fast BatchNorm scales (or weight
groups) shrink, so the cost only moves once some of them cross the alive threshold (a lag), and a
channel that died rarely comes back (the process is close to irreversible: an overshoot cannot be
undone by lowering the strength afterwards). So the controller does not aim at the target at
once: it tracks a reference that glides geometrically from the seed's cost down to the target over
the first half of learning, and then holds it. Few channels are "in flight" at any time, so the
cost approaches the target from above with little overshoot.

The law is proportional-integral on log(strength), driven by log(cost / reference): scale free
(the same gains serve FLOPs, weights or nanoseconds); the strong proportional part cuts the
strength at once when the cost falls below the reference (it never pushes up), the integral finds
the strength that keeps channels dying at the reference's pace, capped at 1000x the initial
strength: beyond some strength the scales oscillate around zero and count as alive again, and a
controller that kept pushing would run away. The structure kept is the latest recorded one within
1% of the target (else within tolerance, else the closest); the pipeline can close the residual with
a uniform width multiplier.

This module is the law alone, on plain floats; :class:`morphnet.TargetCost` drives it from a network
regularizer in any training loop, and the pipeline uses that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class StrengthController:
    """PI control of log(strength) on log(cost / reference(step)).

    ``reference`` goes from ``seed_cost`` at step 0 to ``target`` at ``ramp_steps`` (geometric),
    then stays at ``target``. Below the reference the integral moves ``undershoot_gain`` times
    faster: a dead channel rarely revives, so stopping deaths matters more than speeding them up.
    The strength rises only through the integral and at most to ``exp(raise_limit)`` times the
    initial strength. ``update(step, cost)`` returns the strength for the next step.
    """

    target: float
    seed_cost: float
    initial_strength: float
    ramp_steps: int
    kp: float = 10.0
    ki: float = 0.02
    undershoot_gain: float = 5.0
    integral_limit: float = 10.0
    raise_limit: float = math.log(1000.0)  # at most 1000x the initial strength
    integral: float = field(default=0.0, init=False)
    best_cost: float = field(default=math.inf, init=False)
    best_level: float = field(default=0.0, init=False)
    strength: float = field(default=0.0, init=False)

    def __post_init__(self):
        if min(self.target, self.seed_cost, self.initial_strength) <= 0:
            raise ValueError("target cost, seed cost and initial strength must be positive")
        self.strength = self.initial_strength

    def reference(self, step: int) -> float:
        """The cost the structure should have at ``step``."""
        progress = min(1.0, step / max(1, self.ramp_steps))
        return self.seed_cost * (self.target / self.seed_cost) ** progress

    def update(self, step: int, cost: float) -> float:
        level = math.log(self.strength / self.initial_strength)
        if cost < self.best_cost:
            self.best_cost, self.best_level = cost, level
        elif cost > 1.5 * self.best_cost and level > self.best_level:
            # the cost rose again under a stronger push: past the point where scales oscillate
            # around zero and count as alive. Never push beyond the strength of the lowest cost.
            self.raise_limit = min(self.raise_limit, self.best_level)
        error = math.log(max(cost, 1e-12) / self.reference(step))
        gain = self.ki * (self.undershoot_gain if error < 0 else 1.0)
        self.integral = max(-self.integral_limit, min(self.raise_limit, self.integral + gain * error))
        # The proportional part only cuts: above some strength the scales oscillate around zero and
        # count as alive again, so a strong push up on a high cost would run away (cost up, push harder).
        self.strength = self.initial_strength * math.exp(self.integral + self.kp * min(error, 0.0))
        return self.strength

    def state_dict(self) -> dict[str, Any]:
        """Every field (settings and state) as plain floats, for checkpoints."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; unknown keys are an error."""
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"StrengthController.load_state_dict: unknown keys {sorted(unknown)}")
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class Candidate:
    """A structure recorded during learning: its step, predicted cost and alive counts."""

    step: int
    cost: float
    counts: dict[str, int]


def select_candidate(candidates: list[Candidate], target: float, tolerance: float = 0.05) -> Candidate:
    """The latest candidate within a fifth of ``tolerance`` of ``target``, else the latest within
    ``tolerance`` (later ones had more training), else the closest one (the latest among equals)."""
    if not candidates:
        raise ValueError("no structure was recorded; run at least one learning step")
    for band in (tolerance / 5, tolerance):
        within = [c for c in candidates if abs(c.cost / target - 1) <= band]
        if within:
            return within[-1]
    return min(reversed(candidates), key=lambda c: abs(math.log(max(c.cost, 1e-12) / target)))


def resolve_target(value: float, seed_cost: float) -> float:
    """``value`` <= 1 is a fraction of the seed's cost, > 1 an absolute cost in the target's unit."""
    if value <= 0:
        raise ValueError(f"target cost must be positive, got {value}")
    return value * seed_cost if value <= 1 else value


def _amount(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def unreachable_target(value: float, seed_cost: float, minimum: float, unit: str, *,
                       floor: float = 0.0, floor_name: str = "min_layer_fraction") -> str | None:
    """Why target ``value`` (as given: <= 1 a fraction of ``seed_cost``, > 1 absolute) cannot be
    reached when no structure costs less than ``minimum`` (``NetworkRegularizer.minimum_cost``),
    or None when it can. Learning toward such a target kills every channel it may and still
    misses, so it is refused before anything runs (``--target-cost 2`` meant 2 FLOPs)."""
    absolute = resolve_target(value, seed_cost)
    if absolute >= minimum:
        return None
    share = minimum / seed_cost
    if share >= 1:
        return (f"{value:g} cannot be reached: the regularizer can prune no channel of this network (nothing it "
                f"covers is regularized), so every structure costs the seed's {_amount(seed_cost)} {unit}")
    given = (f"{value:g} is an absolute cost, {_amount(absolute)} {unit} (values <= 1 are fractions of the seed's "
             f"{_amount(seed_cost)} {unit}, values > 1 absolute costs)" if value > 1 else
             f"{value:g} of the seed's {_amount(seed_cost)} {unit} is {_amount(absolute)} {unit}")
    keeps = (f"every layer keeps {floor_name}={floor:g} of its channels" if floor > 0
             else "every layer keeps one channel")
    return (f"{given}, below the smallest cost this network allows, {_amount(minimum)} {unit} = {share:.3g} of the "
            f"seed's ({keeps}); ask for at least {math.ceil(share * 1000) / 1000:g} (a fraction) or "
            f"{_amount(math.ceil(minimum))} (an absolute cost)")
