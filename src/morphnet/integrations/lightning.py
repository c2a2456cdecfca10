"""MorphNet in PyTorch Lightning: ``trainer = L.Trainer(..., callbacks=[MorphNet(target_cost=0.5)])``.

The callback builds the regularizer on the LightningModule (or one of its submodules) from the first
training batch, adds ``strength * term`` to the training objective through the gradients (see
:mod:`morphnet.integrations.core` for why: it runs in ``on_before_optimizer_step``, after AMP's
unscaling and DDP's averaging, before gradient clipping), logs ``morphnet/*`` metrics through the
module's ``log``, writes ``learned_structure/alive_<step>.json`` under ``trainer.log_dir`` and keeps its
state in Lightning checkpoints. Needs ``pip install lightning``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "morphnet.integrations.lightning needs PyTorch Lightning: pip install lightning"
    ) from error
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from morphnet.integrations.core import MorphNetRun, RunAccess


class MorphNet(RunAccess, pl.Callback):
    """Learn the layer widths of a LightningModule while it trains.

    ``target_cost``: land on this cost (a fraction of the seed's when <= 1, else absolute), with the
    strength steered by :class:`morphnet.TargetCost` over the trainer's total optimizer steps;
    ``strength``: a fixed strength (the original MorphNet), or the initial one with a target. With
    neither, ``target_cost=0.5``. ``regularizer``: ``"auto"`` (Gamma when the model has BatchNorms,
    else group lasso), ``"gamma"``, ``"group-lasso"``, a regularizer or a function ``(model, example)``.
    ``resource``: flops, size, latency (with ``hardware``), activations. ``module``: the submodule to
    regularize (its name in the LightningModule, e.g. ``"model"``), default the LightningModule itself.
    ``example_input``: a tensor / tuple for ``module(*example)``, or a function of the batch; default
    the first training batch (itself, its first item, or its ``pixel_values`` / ``input_ids`` / ...).
    ``log_every`` (steps between cost reads, each one logged) defaults to the trainer's
    ``log_every_n_steps``, or a divisor of it that gives at least 100 reads; ``export_every`` to a
    tenth of the steps.
    ``log_layers``: also log the alive channels of every layer (``morphnet/alive/<layer>``).

    After ``fit``, ``structure_file`` is the structure kept (target mode: the latest within 1% of the
    target, else within tolerance, else the closest; fixed strength: the last step's), ready for
    ``morphnet.apply_structure(module, callback.structure_file, example_input)``.
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
        module: str | nn.Module | None = None,
        example_input: Any = None,
        tolerance: float = 0.05,
        log_every: int | None = None,
        export_every: int | None = None,
        log_layers: bool = True,
    ):
        self.run = MorphNetRun(
            target_cost, strength=strength, regularizer=regularizer, resource=resource, threshold=threshold,
            hardware=hardware, example_input=example_input, tolerance=tolerance, log_every=log_every,
            export_every=export_every, log_layers=log_layers,
        )
        self.module = module
        self.log_dir: Path | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_cost=self.run.target_cost, strength=self.run.fixed_strength,
                                        resource=self.run.resource, module=str(self.module))

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        if isinstance(self.module, nn.Module):
            return self.module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError as error:
            raise ValueError(f"MorphNet: module='{self.module}' is not a submodule of "
                             f"{type(pl_module).__name__}; see named_modules()") from error

    # ---- Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective: every rank calls it

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.run.built:
            return
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if steps == float("inf"):
            steps = 0
        self.run.build(self._target(pl_module), self.run.example_for(batch), steps=int(steps),
                       log_every=trainer.log_every_n_steps)
        self._last_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.run.built:
            self.run.add_term_gradient(p for group in optimizer.param_groups for p in group["params"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.run.built or step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = step
        metrics = self.run.after_step(step)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self.run.should_export(step) and trainer.is_global_zero:
            self.run.export(self.log_dir, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.run.built:
            return
        step, counts = self.run.chosen(trainer.global_step)
        if trainer.is_global_zero:
            path = self.run.write_chosen(self.log_dir, step, counts)
            rank_zero_info(f"MorphNet: learned structure (step {step}) in {path}")
        else:
            self.run.structure_file = self.log_dir / "learned_structure" / f"alive_{step}.json"

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run.load_state_dict(state_dict)
