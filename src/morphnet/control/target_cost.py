"""Target-cost mode for any training loop: ``TargetCost`` steers the strength onto a cost budget.

It sits on top of the public regularizer API (``get_cost()``, ``StructureExporter``) and drives the
proportional-integral law of :mod:`morphnet.control.strength`. Two things make it cheap on a GPU and
safe under DistributedDataParallel:

- The cost is read (one scalar copied to the host) only every ``log_every`` steps. The law's gains
  are tuned per step, so a read advances the law once for every step since the previous read, with
  the cost just read held over that interval: the integral moves as it would have with a read every
  step; only the reaction comes up to ``log_every`` steps later.
- Under ``torch.distributed`` the cost read is broadcast from rank 0 (one collective per read, none
  in between), and so are the alive counts it keeps, so every rank computes the same strength and
  keeps the same structure even if their parameters drifted apart.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from morphnet.control.strength import Candidate, StrengthController, resolve_target, unreachable_target
from morphnet.export import StructureExporter
from morphnet.surgery import fit_to_budget

_STATE_VERSION = 1


class TargetMissedWarning(UserWarning):
    """Structure learning under :class:`TargetCost` ended outside the tolerance of its target, or
    kept the seed's structure (no channel died)."""


class TargetCost:
    """Adapt the regularization strength so the learned structure lands on ``target``.

    ``target`` <= 1 is a fraction of the seed's cost (read once, here), > 1 an absolute cost in the
    regularizer's unit. ``steps`` is the number of optimizer steps of structure learning: the cost
    reference glides from the seed's cost to the target over ``ramp_fraction`` of them, then holds.
    The strength starts at ``initial_strength`` (default 1 / seed cost).

    Use it in any loop::

        tc = morphnet.TargetCost(reg, target=0.5, steps=N)
        for step in range(1, N + 1):
            loss = task_loss + tc.strength * reg.get_regularization_term()
            ...backward, optimizer step...
            tc.update(step)
        structure = tc.best_structure()   # {module: alive channels}, for morphnet.apply_structure

    The structure kept is the latest one read within ``tolerance / 5`` of the target, else the
    latest within ``tolerance``, else the closest (the pipeline's rule). Under torch.distributed,
    build it and call ``update`` on every rank (both hold collectives on read steps).

    When learning misses, a :class:`TargetMissedWarning` says so, at most once per object: at the
    read of the last step (``update(steps)``), or at ``best_structure()`` / ``best()`` when the loop
    stopped before it, whenever the kept structure is outside ``tolerance`` of the target or is the
    seed's (too few steps, or a strength far off). ``best_structure(trim=True, example_inputs=x)``
    then lands it with the uniform width multiplier, as ``morphnet run`` does.
    """

    def __init__(
        self,
        regularizer,
        target: float = 0.5,
        *,
        steps: int,
        tolerance: float = 0.05,
        initial_strength: float | None = None,
        log_every: int = 10,
        ramp_fraction: float = 0.5,
        process_group=None,
    ):
        if not callable(getattr(regularizer, "get_cost", None)):
            raise TypeError(
                f"TargetCost needs a morphnet network regularizer (with get_cost()), got {type(regularizer).__name__}"
            )
        for name, value in (("steps", steps), ("log_every", log_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TargetCost: {name} must be a positive integer, got {value!r}")
        if not tolerance > 0:
            raise ValueError(f"TargetCost: tolerance must be positive, got {tolerance}")
        if not 0 < ramp_fraction <= 1:
            raise ValueError(f"TargetCost: ramp_fraction must be in (0, 1], got {ramp_fraction}")
        if initial_strength is not None and not initial_strength > 0:
            raise ValueError(f"TargetCost: initial_strength must be positive, got {initial_strength}")
        self.regularizer = regularizer
        self.steps = steps
        self.tolerance = float(tolerance)
        self.log_every = log_every
        self.process_group = process_group
        self._exporter = StructureExporter(regularizer)
        seed_cost = self._read_cost()
        if seed_cost <= 0:
            raise ValueError(f"TargetCost: the seed's {getattr(regularizer, 'cost_name', 'cost')} is 0; "
                             "no layer has a cost to reduce")
        minimum = getattr(regularizer, "minimum_cost", None)
        if minimum is not None and float(target) > 0:
            why = unreachable_target(float(target), seed_cost, minimum(), getattr(regularizer, "cost_name", "cost"),
                                     floor=getattr(regularizer, "min_layer_fraction", 0.0))
            if why is not None:
                raise ValueError(f"TargetCost: target {why}")
        self.controller = StrengthController(
            target=resolve_target(float(target), seed_cost), seed_cost=seed_cost,
            initial_strength=float(initial_strength) if initial_strength is not None else 1.0 / seed_cost,
            ramp_steps=max(1, int(steps * ramp_fraction)),
        )
        self.cost: float | None = None  # the cost at the last read
        self.last_read_step = 0
        self._last_step = 0  # the step the law has been advanced to
        self._kept: dict[str, Candidate | None] = {"tight": None, "within": None, "closest": None}
        self._warned = False  # TargetMissedWarning is given at most once

    # ---- what a loop reads ------------------------------------------------------------------
    @property
    def strength(self) -> float:
        """The strength to multiply the regularization term with (a Python float: no device sync)."""
        return self.controller.strength

    @property
    def target(self) -> float:
        """The target as an absolute cost."""
        return self.controller.target

    @property
    def seed_cost(self) -> float:
        return self.controller.seed_cost

    @property
    def initial_strength(self) -> float:
        return self.controller.initial_strength

    def reference(self, step: int) -> float:
        """The cost the structure should have at ``step``."""
        return self.controller.reference(step)

    def due(self, step: int) -> bool:
        """Whether ``update(step)`` reads the cost: ``log_every`` steps after the last read, and at
        the last step."""
        return step > self.last_read_step and (step - self.last_read_step >= self.log_every or step == self.steps)

    def update(self, step: int) -> float:
        """Call after each optimizer step (``step`` counts from 1); returns the strength for the next.

        Reads the cost only when :meth:`due`; other calls return at once.
        """
        step = int(step)
        if not self.due(step):
            return self.strength
        cost = self._read_cost()
        for s in range(self._last_step + 1, step + 1):
            self.controller.update(s, cost)
        self._last_step = max(self._last_step, step)
        self.cost, self.last_read_step = cost, step
        self._keep(step, cost)
        if step >= self.steps:
            self._warn_if_missed(stacklevel=3)
        return self.strength

    # ---- the structure kept ---------------------------------------------------------------------
    def best(self) -> Candidate:
        """The kept structure with its step and cost (see the class docs for the rule)."""
        kept = self._best()
        if self.last_read_step < self.steps:
            self._warn_if_missed(stacklevel=4)  # the caller of best_structure()
        return kept

    def _best(self) -> Candidate:
        for key in ("tight", "within", "closest"):
            if self._kept[key] is not None:
                return self._kept[key]
        raise ValueError("TargetCost: no cost was read yet; call update(step) after each optimizer step")

    def best_structure(self, trim: bool = False, *, example_inputs=None, model=None,
                       round_to: int | None = None) -> dict[str, int]:
        """``{module name: alive output channels}`` of the kept structure (for ``apply_structure``).

        ``trim=True`` lands it on the target as ``morphnet run`` does, with
        :func:`morphnet.fit_to_budget`: unchanged when its cost is within 1% of the target, else
        every width scaled by the one factor that lands within 1% (or, when whole heads or
        ``round_to`` make the steps too coarse, the closest, with a warning). It needs the
        ``example_inputs`` the regularizer was built with; ``model`` defaults to the regularizer's.
        The multiplier reaches FLOPs, size and latency (batch size 1) targets."""
        counts = dict(self.best().counts)
        if not trim:
            return counts
        model = model if model is not None else getattr(self.regularizer, "model", None)
        if example_inputs is None or model is None:
            raise ValueError("TargetCost.best_structure(trim=True) needs example_inputs=... (what the regularizer "
                             "was built with)" + ("" if model is not None else " and model=..."))
        resource = getattr(self.regularizer, "resource", "flops")
        if resource == "latency" and getattr(self.regularizer, "batch_size", 1) != 1:
            raise ValueError("TargetCost.best_structure(trim=True): the width multiplier lands latency at batch "
                             f"size 1, but the regularizer counts batch size {self.regularizer.batch_size}")
        return fit_to_budget(model, counts, example_inputs, self.target, resource=resource,
                             hardware=getattr(self.regularizer, "hardware", None), round_to=round_to)[1]

    def _warn_if_missed(self, stacklevel: int) -> None:
        """Warn (once, on rank 0) when the kept structure is outside the tolerance or the seed's."""
        if self._warned or self.last_read_step == 0:
            return
        kept = self._best()
        error = kept.cost / self.target - 1
        unpruned = kept.cost >= self.seed_cost
        if abs(error) <= self.tolerance and not unpruned:
            return
        self._warned = True
        if self._distributed() and torch.distributed.get_rank() != self._src():
            return
        what = ("the structure kept is the seed's (no channel died)" if unpruned else
                f"learning ended {abs(error):.0%} {'above' if error > 0 else 'below'} the target")
        when = (f"after {self.steps} steps" if self.last_read_step >= self.steps else
                f"after step {self.last_read_step} of {self.steps} (learning has not reached its last step)")
        advice = ("more steps (the target is reached over the first half of them) or a higher initial_strength"
                  if error > 0 else "a lower initial_strength or more steps")
        warnings.warn(
            f"TargetCost: {what} {when}: the kept structure (step {kept.step}) costs {kept.cost / self.seed_cost:.3f}x "
            f"the seed's for a target of {self.target / self.seed_cost:.3f}x (tolerance {self.tolerance:.0%}); try "
            f"{advice}, or land it with best_structure(trim=True, example_inputs=...), the width multiplier "
            "morphnet run uses", TargetMissedWarning, stacklevel=stacklevel)

    def _keep(self, step: int, cost: float) -> None:
        """Incremental form of :func:`morphnet.control.strength.select_candidate`: only candidates
        that may be chosen are kept, so alive counts are read only for those."""
        ratio = cost / self.target
        updates = []
        if abs(ratio - 1) <= self.tolerance / 5:
            updates.append("tight")
        if abs(ratio - 1) <= self.tolerance:
            updates.append("within")
        closest = self._kept["closest"]
        distance = abs(math.log(max(cost, 1e-12) / self.target))
        if closest is None or distance <= abs(math.log(max(closest.cost, 1e-12) / self.target)):
            updates.append("closest")
        if updates:
            candidate = Candidate(step, cost, self._broadcast_object(self._exporter.get_alive_counts()))
            for key in updates:
                self._kept[key] = candidate

    # ---- distributed ------------------------------------------------------------------------------
    def _distributed(self) -> bool:
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def _src(self) -> int:
        return torch.distributed.get_global_rank(self.process_group, 0) if self.process_group is not None else 0

    def _read_cost(self) -> float:
        cost = self.regularizer.get_cost().detach()
        if self._distributed():
            cost = cost.reshape(1).clone()
            torch.distributed.broadcast(cost, src=self._src(), group=self.process_group)
        return float(cost.reshape(()))

    def _broadcast_object(self, value: Any) -> Any:
        if not self._distributed():
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=self._src(), group=self.process_group)
        return box[0]

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the seed cost, the target, the law's state and the kept
        structures (plain Python values)."""
        return {
            "version": _STATE_VERSION,
            "steps": self.steps,
            "tolerance": self.tolerance,
            "log_every": self.log_every,
            "controller": self.controller.state_dict(),
            "cost": self.cost,
            "last_read_step": self.last_read_step,
            "last_step": self._last_step,
            "kept": {k: None if c is None else {"step": c.step, "cost": c.cost, "counts": dict(c.counts)}
                     for k, c in self._kept.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. The seed cost and the target come from the state, not
        from the (already thinned) model this object was built on."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"TargetCost.load_state_dict: unknown state version {state.get('version')!r}; "
                             "pass what TargetCost.state_dict() returned")
        self.steps, self.tolerance, self.log_every = state["steps"], state["tolerance"], state["log_every"]
        self.controller.load_state_dict(state["controller"])
        self.cost, self.last_read_step, self._last_step = state["cost"], state["last_read_step"], state["last_step"]
        self._kept = {k: None if c is None else Candidate(c["step"], c["cost"], dict(c["counts"]))
                      for k, c in state["kept"].items()}

    def __repr__(self) -> str:
        return (f"TargetCost(target={self.target:.6g}, seed_cost={self.seed_cost:.6g}, steps={self.steps}, "
                f"strength={self.strength:.4g}, cost={self.cost})")
