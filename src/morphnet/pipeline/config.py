"""Every knob of a run in one dataclass, shared by the Python API and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from morphnet.data import default_data

DEFAULT_TARGET_COST = 0.5
#: The per-layer floor of structure learning (``min_layer_fraction``): the budget benchmark's recipe
#: (docs/benchmarks.md: it removed the 1-5 channel bottlenecks and the loss at 1/2 of the FLOPs).
DEFAULT_MIN_LAYER_FRACTION = 0.25
#: Settings added after runs were saved without them: what those runs did (for resuming them).
LEGACY_DEFAULTS = {"min_layer_fraction": 0.0, "proximal": False, "learn_fraction": 0.0}
#: Fields that do not change what a run computes: a resumed run may set them differently.
RUNTIME_FIELDS = ("out", "device", "threads", "quiet")


@dataclass
class RunConfig:
    """Settings of a MorphNet run. The defaults are the embedded default job: the digits CNN on
    scikit-learn's digits, FLOPs target, landing on half the seed's FLOPs.

    ``strength`` alone gives the original fixed-strength behaviour; ``target_cost`` (a fraction of
    the seed's cost when <= 1, else an absolute cost in the target's unit) steers the strength,
    starting from ``strength`` or 1/seed cost. With neither, ``target_cost`` defaults to 0.5.
    ``data=None`` picks the default data of ``model`` (see ``morphnet.data.default_data``).
    Invalid values raise ``ValueError`` here, before a run writes anything.
    """

    model: str = "digits_cnn"
    data: str | None = None
    target: str = "flops"
    regularizer: str = "gamma"
    hardware: str | None = None
    strength: float | None = None
    target_cost: float | None = None
    tolerance: float = 0.05
    threshold: float | None = None
    min_layer_fraction: float = DEFAULT_MIN_LAYER_FRACTION
    proximal: bool = False
    steps: int = 1500
    retrain_steps: int | None = None
    batch_size: int = 64
    lr: float = 0.05
    retrain_lr: float = 0.05
    log_every: int = 10
    export_every: int | None = None
    expand_to: float | None = None
    round_to: int | None = None
    latency_batch_size: int = 1
    latency_check: bool = True
    baseline: bool = True
    uniform_baseline: bool | None = None  # None: on with --finetune (compare with the uniform network), else off
    seed_weights: str | None = None
    finetune: bool = False
    finetune_lr: float | None = None
    learn_fraction: float = 0.0
    val_fraction: float = 0.0  # > 0: hold out this share of the training data to compare slim and uniform on
    image_size: int | None = None
    out: str = "morphnet_run"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    quiet: bool = False

    def __post_init__(self):
        if self.strength is None and self.target_cost is None:
            self.target_cost = DEFAULT_TARGET_COST
        if self.data is None:
            self.data = default_data(self.model)
        if self.retrain_steps is None:
            self.retrain_steps = self.steps
        if self.uniform_baseline is None:
            self.uniform_baseline = self.finetune
        if self.round_to is None:  # multiples of 8 on a CUDA target; --round-to 1 keeps any width
            from morphnet.pipeline.latency import round_to_default

            self.round_to = round_to_default(self.hardware, self.device, self.finetune)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option when a value cannot work."""
        from morphnet.costs.hardware import get_hardware
        from morphnet.pipeline.regularizers import UNITS, regularizer_names, regularizer_targets

        def positive(name: str, value, allow_zero: bool = False) -> None:
            if value is not None and (value < 0 or (value == 0 and not allow_zero)):
                raise ValueError(f"--{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")

        if self.target not in UNITS:
            raise ValueError(f"--target must be one of {', '.join(UNITS)}, got '{self.target}'")
        if self.regularizer not in regularizer_names():
            raise ValueError(f"--regularizer must be one of {', '.join(regularizer_names())}, got '{self.regularizer}'")
        if self.target not in regularizer_targets(self.regularizer):
            raise ValueError(f"regularizer '{self.regularizer}' has no '{self.target}' target; it supports "
                             f"{', '.join(regularizer_targets(self.regularizer))}")
        if self.target == "latency" and not self.hardware:
            raise ValueError("--target latency needs --hardware NAME (for example V100, T4, H100, or 'measured' to "
                             "time the model on this device)")
        if self.hardware and self.hardware.endswith(".json"):
            if not Path(self.hardware).expanduser().is_file():
                raise ValueError(f"--hardware {self.hardware}: no such latency table (save one with "
                                 "morphnet.measure_latency(...).save(path), or use --hardware measured)")
        elif self.hardware and self.hardware != "measured":
            get_hardware(self.hardware)  # an unknown name raises, listing the known ones
        positive("strength", self.strength, allow_zero=True)
        positive("target-cost", self.target_cost)
        positive("expand-to", self.expand_to)
        positive("threshold", self.threshold, allow_zero=True)
        if not 0 <= self.min_layer_fraction <= 1:
            raise ValueError(f"--min-layer-fraction must be between 0 and 1, got {self.min_layer_fraction}")
        positive("lr", self.lr)
        positive("retrain-lr", self.retrain_lr)
        positive("finetune-lr", self.finetune_lr)
        if self.seed_weights is not None and not Path(self.seed_weights).expanduser().is_file():
            raise ValueError(f"--seed-weights {self.seed_weights}: no such file (a state_dict saved with torch.save, "
                             "or a checkpoint holding one under 'model')")
        if self.finetune and (self.expand_to is not None or self.round_to is not None):
            raise ValueError("--finetune keeps the learned weights, so the widths cannot be scaled: leave out "
                             "--expand-to / --round-to, or retrain from scratch without --finetune")
        if self.proximal and self.regularizer == "logistic-sigmoid":
            raise ValueError("--proximal applies the penalty as a soft-threshold step on BatchNorm scales or weight "
                             "groups: use it with --regularizer gamma or group-lasso, not logistic-sigmoid")
        if self.finetune and self.regularizer == "logistic-sigmoid":
            raise ValueError("--finetune lands on the trained network's own BatchNorm scales (gamma) or weight norms "
                             "(group-lasso); gates would have to be learned first: use --regularizer gamma or "
                             "group-lasso")
        if self.finetune and not self.seed_weights:
            raise ValueError("--finetune compresses a trained network: pass its weights with --seed-weights PATH")
        if self.finetune and self.target_cost is None:
            raise ValueError("--finetune lands on a budget: pass --target-cost (a fraction of the seed's cost)")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.val_fraction and not self.uniform_baseline:
            raise ValueError("--val-fraction holds out data to compare the slim network with the uniform one: "
                             "add --uniform-baseline")
        if not 0 <= self.learn_fraction < 1:
            raise ValueError(f"--learn-fraction must be in [0, 1), got {self.learn_fraction}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"--tolerance must be between 0 and 1, got {self.tolerance}")
        for name in ("steps", "retrain_steps", "batch_size", "log_every", "export_every", "round_to", "image_size",
                     "latency_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, other: "RunConfig") -> list[str]:
        """The settings (other than where and how it runs) in which ``other`` differs from this one."""
        return [f"--{f.name.replace('_', '-')} {getattr(other, f.name)} (the run has {getattr(self, f.name)})"
                for f in fields(self) if f.name not in RUNTIME_FIELDS and getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """A config from a saved ``config.json`` (unknown keys ignored, for older/newer runs)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "RunConfig":
        """The config a saved run ran with: settings it predates take what it did then."""
        return cls.from_dict({**LEGACY_DEFAULTS, **data})
