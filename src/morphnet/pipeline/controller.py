"""Target-cost mode: steer the regularization strength so the learned structure lands on a budget.

The plant is awkward for a controller: the strength sets how fast BatchNorm scales (or weight
groups) shrink, and the cost only moves once some of them cross the alive threshold, so the
response lags. A proportional-integral law on the *logarithm* of the strength, driven by the log of
cost/target, is scale free (the same gains work for FLOPs, weights or nanoseconds) and reacts at
once to an overshoot through its proportional part. The integral part finds the strength that holds
the cost at the target. Whatever the trajectory, the pipeline then keeps the latest recorded
structure within tolerance (else the closest one) and can close the remaining gap with a uniform
width multiplier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class StrengthController:
    """PI control of log(strength) on log(cost / target).

    ``update(cost)`` returns the strength to use until the next update. ``ki`` is the change of
    log(strength) per update for a cost at e times the target; ``kp`` the immediate change.
    """

    target: float
    initial_strength: float
    kp: float = 1.0
    ki: float = 0.05
    max_error: float = 1.0
    integral: float = field(default=0.0, init=False)
    strength: float = field(default=0.0, init=False)

    def __post_init__(self):
        if self.target <= 0 or self.initial_strength <= 0:
            raise ValueError("target cost and initial strength must be positive")
        self.strength = self.initial_strength

    def update(self, cost: float) -> float:
        error = max(-self.max_error, min(self.max_error, math.log(max(cost, 1e-12) / self.target)))
        self.integral += self.ki * error
        self.strength = self.initial_strength * math.exp(self.integral + self.kp * error)
        return self.strength


@dataclass
class Candidate:
    """A structure recorded during learning: its step, predicted cost and alive counts."""

    step: int
    cost: float
    counts: dict[str, int]


def select_candidate(candidates: list[Candidate], target: float, tolerance: float = 0.05) -> Candidate:
    """The latest candidate within ``tolerance`` of ``target`` (most trained), else the closest one
    (the latest among equals)."""
    if not candidates:
        raise ValueError("no structure was recorded; run at least one learning step")
    within = [c for c in candidates if abs(c.cost / target - 1) <= tolerance]
    if within:
        return within[-1]
    return min(reversed(candidates), key=lambda c: abs(math.log(max(c.cost, 1e-12) / target)))


def resolve_target(value: float, seed_cost: float) -> float:
    """``value`` <= 1 is a fraction of the seed's cost, > 1 an absolute cost in the target's unit."""
    if value <= 0:
        raise ValueError(f"target cost must be positive, got {value}")
    return value * seed_cost if value <= 1 else value
