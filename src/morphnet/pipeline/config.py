"""Every knob of a run in one dataclass, shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_TARGET_COST = 0.5


@dataclass
class RunConfig:
    """Settings of a MorphNet run. The defaults are the embedded default job: the digits CNN on
    scikit-learn's digits, FLOPs target, landing on half the seed's FLOPs.

    ``strength`` alone gives the original fixed-strength behaviour; ``target_cost`` (a fraction of
    the seed's cost when <= 1, else an absolute cost in the target's unit) steers the strength,
    starting from ``strength`` or 1/seed cost. With neither, ``target_cost`` defaults to 0.5.
    """

    model: str = "digits_cnn"
    data: str = "digits"
    target: str = "flops"
    regularizer: str = "gamma"
    hardware: str | None = None
    strength: float | None = None
    target_cost: float | None = None
    tolerance: float = 0.05
    threshold: float | None = None
    steps: int = 1500
    retrain_steps: int | None = None
    batch_size: int = 64
    lr: float = 0.05
    retrain_lr: float = 0.05
    log_every: int = 10
    export_every: int | None = None
    expand_to: float | None = None
    round_to: int | None = None
    baseline: bool = True
    uniform_baseline: bool = False
    image_size: int | None = None
    out: str = "morphnet_run"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    quiet: bool = False

    def __post_init__(self):
        if self.strength is None and self.target_cost is None:
            self.target_cost = DEFAULT_TARGET_COST
        if self.strength is not None and self.strength < 0:
            raise ValueError(f"--strength must be >= 0, got {self.strength}")
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if self.retrain_steps is None:
            self.retrain_steps = self.steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """A config from a saved ``config.json`` (unknown keys ignored, for older/newer runs)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
