"""Strength control for compressing a trained network: steer the landing scale, not the cost.

On a trained seed the target-cost law of :mod:`morphnet.control.strength` winds up: the BatchNorm
scales start large, so the alive cost stays at the seed's until many of them reach the threshold
at once; meanwhile the integral keeps raising the strength, and when the cost finally moves it
falls far below the target and accuracy collapses (docs/benchmarks.md, "Prune and fine-tune").

This law watches a quantity that moves as soon as any scale shrinks: the *landing scale*, the factor
by which the alive threshold would have to be raised for the structure to land on the target now
(``NetworkRegularizer.threshold_scale_for_cost``). It is large on a trained seed (the channels the
budget must cut still have scales far above the threshold) and reaches 1 when every channel the
budget cuts is already below the threshold, so removing them changes almost nothing. The reference
falls *linearly* from the seed's landing scale to ``final`` (below 1: a margin) over the ramp, then
holds: an L1 push shrinks a scale by a constant amount per step, so a linear path asks for an even
push all along, and the network has the whole ramp to move what the cut channels did into the kept
ones (a geometric path asked for most of the shrinking in the first steps: on a trained ResNet-20 the
task loss more than doubled within 300 steps). The law is proportional-integral on log(strength),
driven by log((scale + 1) / (reference + 1)): relative far above the threshold, an absolute difference
near it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LandingController:
    """PI control of log(strength) on log(landing scale / reference(step)).

    ``update(step, scale)`` returns the strength for the next step. Above the reference the channels
    to cut are not shrinking fast enough: the strength rises (the integral, at most ``exp(raise_limit)``
    times the initial strength); below it, the proportional part cuts it at once and the integral
    comes down ``undershoot_gain`` times faster, so channels the budget keeps are not pushed needlessly.
    """

    initial_scale: float
    initial_strength: float
    ramp_steps: int
    final: float = 0.5
    kp: float = 1.0
    ki: float = 0.03
    undershoot_gain: float = 2.0
    raise_limit: float = math.log(1e4)
    integral_limit: float = 10.0
    integral: float = field(default=0.0, init=False)
    strength: float = field(default=0.0, init=False)

    def __post_init__(self):
        if min(self.initial_scale, self.initial_strength, self.final) <= 0 or self.ramp_steps < 1:
            raise ValueError("initial scale, initial strength, final scale and ramp steps must be positive")
        self.strength = self.initial_strength

    def reference(self, step: int) -> float:
        """The landing scale the structure should have at ``step``."""
        start = max(self.initial_scale, self.final)
        progress = min(1.0, step / self.ramp_steps)
        return start + (self.final - start) * progress

    def update(self, step: int, scale: float, steps: int = 1) -> float:
        """Advance the law by ``steps`` steps (the reads in between held ``scale``), ending at ``step``."""
        error = math.log((max(scale, 0.0) + 1.0) / (self.reference(step) + 1.0))
        gain = self.ki * (self.undershoot_gain if error < 0 else 1.0) * steps
        self.integral = max(-self.integral_limit, min(self.raise_limit, self.integral + gain * error))
        level = self.integral + self.kp * error
        self.strength = self.initial_strength * math.exp(min(level, self.raise_limit))
        return self.strength

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"LandingController.load_state_dict: unknown keys {sorted(unknown)}")
        for name, value in state.items():
            setattr(self, name, value)
