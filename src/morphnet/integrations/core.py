"""What every framework integration does, without knowing the framework.

A :class:`MorphNetRun` builds the network regularizer on the model once an example input is known
(from the first batch, or given), holds the strength (fixed, or steered by :class:`morphnet.TargetCost`),
adds ``strength * d(term)/d(parameter)`` to the gradients just before each optimizer step, gives the
metrics to log every ``log_every`` steps, writes ``learned_structure/alive_<step>.json`` files and
saves / restores its state.

Why the gradient and not the loss: a callback cannot change the loss that Lightning's automatic
optimization or the Hugging Face Trainer back-propagates, but both call a hook between the backward
pass and the optimizer step. At that point the task gradients are already unscaled (AMP's
GradScaler), averaged over ranks (DDP) and summed over accumulation steps, so adding the term's
gradient there is exactly ``loss + strength * term`` per optimizer step, under any precision, any
accumulation and any number of ranks: every rank holds the same parameters, so every rank adds the
same term gradient and no collective is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

import morphnet
from morphnet.export import write_json

#: Resource name -> class-name suffix of morphnet's regularizers.
RESOURCES = {"flops": "Flops", "size": "ModelSize", "latency": "Latency", "activations": "Activation"}
#: Keys tried, in order, to find the model input in a dict batch.
INPUT_KEYS = ("pixel_values", "input_ids", "input_values", "inputs", "input", "x", "image", "images")
_STATE_VERSION = 1


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def example_from_batch(batch: Any) -> Any:
    """The model input of a batch: the batch itself (a tensor), its first item (a tuple or list) or
    the first of :data:`INPUT_KEYS` (a dict)."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if torch.is_tensor(batch.get(key)):
                return batch[key]
    raise ValueError(
        f"MorphNet: cannot tell the model input in a batch of type {type(batch).__name__}; "
        "pass example_input=<tensor or tuple of tensors> or example_input=<function batch -> input>"
    )


def read_interval(logging_interval: int, steps: int, reads: int = 100) -> int:
    """Steps between cost reads: the framework's logging interval, or the largest divisor of it that
    still gives ``reads`` reads over ``steps`` (so reads fall on logging steps, and a short run is
    steered often enough)."""
    logging_interval = max(1, int(logging_interval))
    fits = [k for k in range(1, logging_interval + 1) if logging_interval % k == 0 and steps // k >= reads]
    return max(fits) if fits else 1


def first_example(inputs: Any) -> Any:
    """``inputs`` cut to one example (costs are per example; the capture stays cheap)."""
    if torch.is_tensor(inputs):
        return inputs[:1].detach() if inputs.dim() > 0 else inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(first_example(x) for x in inputs)
    return inputs


class RunAccess:
    """What both callbacks expose of their :class:`MorphNetRun` (held as ``self.run``)."""

    run: "MorphNetRun"

    @property
    def regularizer(self):
        """The network regularizer, once training has begun (None before)."""
        return self.run.reg

    @property
    def target_cost(self):
        """The :class:`morphnet.TargetCost` controller in target-cost mode (else None)."""
        return self.run.controller

    @property
    def structure_file(self) -> Path | None:
        """The structure file kept at the end of training (None before)."""
        return self.run.structure_file


class MorphNetRun:
    """The framework-free half of the integrations (see the module docs).

    ``target_cost`` (a fraction of the seed's cost when <= 1, else an absolute cost) steers the
    strength with :class:`morphnet.TargetCost`, starting from ``strength`` or 1 / seed cost;
    ``strength`` alone is the original fixed-strength MorphNet. With neither, ``target_cost=0.5``.
    ``regularizer``: ``"auto"`` (Gamma when the model has BatchNorms, else group lasso), ``"gamma"``,
    ``"group-lasso"``, a network regularizer already built, or a function ``(model, example_input)
    -> regularizer``. ``resource``: flops, size, latency (with ``hardware``) or activations.
    ``threshold``: the alive threshold as the regularizer class takes it: a BatchNorm scale (Gamma,
    default 1e-2) or an absolute weight norm (group lasso; default the API's relative one, 0.1 x
    each layer's initial channel-norm scale).
    ``log_layers``: also log ``morphnet/alive/<layer>`` for every prunable layer.
    """

    def __init__(
        self,
        target_cost: float | None = None,
        *,
        strength: float | None = None,
        regularizer: str | Callable | Any = "auto",
        resource: str = "flops",
        threshold: float | None = None,
        hardware: str | None = None,
        example_input: Any = None,
        tolerance: float = 0.05,
        log_every: int | None = None,
        export_every: int | None = None,
        log_layers: bool = True,
    ):
        if target_cost is None and strength is None:
            target_cost = 0.5
        if target_cost is not None and not target_cost > 0:
            raise ValueError(f"MorphNet: target_cost must be positive, got {target_cost}")
        if strength is not None and not strength >= 0:
            raise ValueError(f"MorphNet: strength must be >= 0, got {strength}")
        if target_cost is not None and strength == 0:
            raise ValueError("MorphNet: with target_cost, strength is the initial strength and must be positive")
        if resource not in RESOURCES:
            raise ValueError(f"MorphNet: unknown resource '{resource}'; choose one of {', '.join(RESOURCES)}")
        if resource == "latency" and not hardware:
            raise ValueError("MorphNet: resource='latency' needs hardware=NAME (for example 'V100', 'H100', or 'measured' "
                             "to time the model on its device)")
        if isinstance(regularizer, str) and regularizer not in ("auto", "gamma", "group-lasso"):
            raise ValueError(f"MorphNet: unknown regularizer '{regularizer}'; choose auto, gamma or group-lasso, "
                             "or pass a regularizer or a function (model, example_input) -> regularizer")
        for name, value in (("log_every", log_every), ("export_every", export_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"MorphNet: {name} must be a positive integer, got {value!r}")
        self.target_cost = target_cost
        self.fixed_strength = strength
        self.regularizer_spec = regularizer
        self.resource = resource
        self.threshold = threshold
        self.hardware = hardware
        self.example_input = example_input
        self.tolerance = tolerance
        self.log_every = log_every
        self.export_every = export_every
        self.log_layers = log_layers
        self.reg = None
        self.exporter: morphnet.StructureExporter | None = None
        self.controller: morphnet.TargetCost | None = None
        self.steps = 0
        self.seed_cost = math.nan
        self.term: torch.Tensor | None = None  # the last term added (detached)
        self.structure_file: Path | None = None  # the structure kept, once written
        self._pending_state: dict[str, Any] | None = None

    # ---- building -------------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.reg is not None

    def example_for(self, batch: Any) -> Any:
        """The example input: given, computed from ``batch``, or found in ``batch``; one example."""
        if self.example_input is None:
            example = example_from_batch(batch)
        elif callable(self.example_input) and not torch.is_tensor(self.example_input):
            example = self.example_input(batch)
        else:
            example = self.example_input
        return first_example(example)

    def build(self, model: nn.Module, example: Any, *, steps: int, log_every: int) -> None:
        """Build the regularizer on ``model`` and the strength controller. Under torch.distributed,
        call on every rank (the target-cost controller broadcasts rank 0's seed cost)."""
        if steps < 1:
            raise ValueError(f"MorphNet: the number of training steps must be known and positive, got {steps}; "
                             "set max_steps (or max_epochs with a sized data loader)")
        self.steps = steps
        self.log_every = self.log_every or read_interval(log_every, steps)
        self.export_every = self.export_every or max(1, steps // 10)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if torch.is_tensor(example):
            example = example.to(device)
        elif isinstance(example, tuple):
            example = tuple(x.to(device) if torch.is_tensor(x) else x for x in example)
        self.reg = self._make_regularizer(model, example)
        self.exporter = morphnet.StructureExporter(self.reg)
        if self.target_cost is not None:
            self.controller = morphnet.TargetCost(
                self.reg, self.target_cost, steps=steps, tolerance=self.tolerance,
                initial_strength=self.fixed_strength, log_every=self.log_every,
            )
            self.seed_cost = self.controller.seed_cost
        else:
            self.seed_cost = float(self.reg.get_cost())
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def _make_regularizer(self, model: nn.Module, example: Any):
        spec = self.regularizer_spec
        if not isinstance(spec, str):
            return spec(model, example) if callable(spec) and not hasattr(spec, "get_cost") else spec
        if spec == "auto":
            spec = "gamma" if has_batchnorm(model) else "group-lasso"
        suffix = RESOURCES[self.resource]
        kwargs: dict[str, Any] = {"hardware": self.hardware} if self.resource == "latency" else {}
        if spec == "gamma":
            threshold = 1e-2 if self.threshold is None else self.threshold
            return getattr(morphnet, f"Gamma{suffix}Regularizer")(model, example, gamma_threshold=threshold, **kwargs)
        # group lasso: the API's default when none is given (relative: 0.1 x each layer's initial
        # channel-norm scale), else the absolute norm given, as in the API
        return getattr(morphnet, f"GroupLasso{suffix}Regularizer")(model, example, threshold=self.threshold, **kwargs)

    # ---- training -------------------------------------------------------------------------------
    @property
    def strength(self) -> float:
        if self.controller is not None:
            return self.controller.strength
        return self.fixed_strength if self.fixed_strength is not None else 0.0

    def add_term_gradient(self, params: Iterable[torch.Tensor]) -> bool:
        """Add ``strength * d(term)/d(p)`` to ``p.grad`` for the parameters ``params`` that the term
        depends on. Does nothing (returns False) when no parameter has a gradient: the backward pass
        was skipped, so is the step."""
        params = [p for p in params if p.requires_grad]
        if not params or all(p.grad is None for p in params):
            return False
        strength = self.strength
        term = self.reg.get_regularization_term()
        self.term = term.detach()
        if strength == 0:
            return True
        grads = torch.autograd.grad(strength * term, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().to(p.dtype)
            else:
                p.grad.add_(g.to(p.grad.dtype))
        return True

    def after_step(self, step: int) -> dict[str, float] | None:
        """Call after each optimizer step (``step`` counts from 1, the framework's global step).
        Returns the metrics to log on log steps, else None."""
        used = self.strength
        if self.controller is not None:
            self.controller.update(step)
            if self.controller.last_read_step != step:
                return None
            cost = self.controller.cost
        else:
            if step % self.log_every != 0 and step != self.steps:
                return None
            cost = float(self.reg.get_cost())
        metrics = {
            "morphnet/cost": cost,
            "morphnet/cost_fraction": cost / self.seed_cost,
            "morphnet/strength": used,
        }
        if self.term is not None:
            metrics["morphnet/term"] = float(self.term)
        if self.controller is not None:
            metrics["morphnet/target_fraction"] = self.controller.target / self.seed_cost
        counts = self.exporter.get_alive_counts()
        metrics["morphnet/alive_channels"] = float(sum(counts.values()))
        if self.log_layers:
            metrics.update({f"morphnet/alive/{name}": float(n) for name, n in counts.items()})
        return metrics

    def should_export(self, step: int) -> bool:
        return step % self.export_every == 0

    def export(self, directory: str | Path, step: int) -> Path:
        """Write the current structure as ``directory/learned_structure/alive_<step>.json``."""
        return self.exporter.create_file_and_save_alive_counts(directory, step)

    def chosen(self, step: int) -> tuple[int, dict[str, int]]:
        """The structure to keep at the end: in target-cost mode the controller's choice, else the
        current one (at ``step``)."""
        if self.controller is not None and self.controller.last_read_step > 0:
            best = self.controller.best()
            return best.step, best.counts
        return step, self.exporter.get_alive_counts()

    def write_chosen(self, directory: str | Path, step: int, counts: dict[str, int]) -> Path:
        self.structure_file = write_json(Path(directory) / "learned_structure" / f"alive_{int(step)}.json", counts)
        return self.structure_file

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.built:
            return dict(self._pending_state or {})
        return {
            "version": _STATE_VERSION,
            "seed_cost": self.seed_cost,
            "target_cost": self.controller.state_dict() if self.controller is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; before the regularizer is built the state waits until it is."""
        if not state:
            return
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"MorphNet: unknown checkpoint state version {state.get('version')!r}")
        if not self.built:
            self._pending_state = dict(state)
            return
        self.seed_cost = state["seed_cost"]
        if state["target_cost"] is not None and self.controller is not None:
            self.controller.load_state_dict(state["target_cost"])
