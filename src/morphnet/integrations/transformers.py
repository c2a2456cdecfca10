"""MorphNet in the Hugging Face Trainer: ``Trainer(..., callbacks=[MorphNetCallback(target_cost=0.5)])``.

A ``TrainerCallback`` cannot change the loss the Trainer back-propagates, but it can change the
gradients: ``on_pre_optimizer_step`` runs after the backward passes of every accumulation step,
after DDP's averaging and after the gradients were unscaled (transformers >= 5 always unscales
there: it clips, or measures the norm, first), just before ``optimizer.step()``. The callback adds
``strength * d(term)/dp`` there (see :mod:`morphnet.integrations.core`), so no Trainer subclass is
needed. One difference with adding the term to the loss: ``max_grad_norm`` clips the task gradient
only (the Trainer clips before this hook).

Logging: the latest ``morphnet/*`` metrics join the Trainer's log (``state.log_history``, the progress
bar, the ``logs`` of callbacks after this one) at the Trainer's logging steps. Files:
``<output_dir>/learned_structure/alive_<step>.json``. State: saved in every checkpoint's
``trainer_state.json`` and restored by ``trainer.train(resume_from_checkpoint=...)``.
Needs ``pip install "transformers[torch]"`` (transformers and accelerate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'morphnet.integrations.transformers needs Hugging Face transformers: pip install "transformers[torch]"'
    ) from error
from torch import nn

from morphnet.integrations.core import MorphNetRun, RunAccess


class MorphNetCallback(RunAccess, TrainerCallback, ExportableState):
    """Learn the layer widths of a model while the Hugging Face Trainer trains it.

    Options as :class:`morphnet.integrations.lightning.MorphNet`: ``target_cost`` (default 0.5
    unless ``strength`` is given), ``strength``, ``regularizer`` (``"auto"``: Gamma when the model
    has BatchNorms, else group lasso), ``resource``, ``threshold``, ``hardware``, ``module`` (name of
    the submodule to regularize, default the whole model), ``example_input`` (default: the first
    training example, collated; its ``pixel_values`` / ``input_ids`` / ... entry), ``tolerance``,
    ``log_every`` (steps between cost reads; default the Trainer's ``logging_steps``, or a divisor of
    it that gives at least 100 reads), ``export_every`` (a tenth of the steps), ``log_layers`` (also log
    ``morphnet/alive/<layer>`` for every layer; off by default because the Trainer prints every value).
    The number of steps is the Trainer's ``max_steps``.
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
        module: str | None = None,
        example_input: Any = None,
        tolerance: float = 0.05,
        log_every: int | None = None,
        export_every: int | None = None,
        log_layers: bool = False,
    ):
        self.run = MorphNetRun(
            target_cost, strength=strength, regularizer=regularizer, resource=resource, threshold=threshold,
            hardware=hardware, example_input=example_input, tolerance=tolerance, log_every=log_every,
            export_every=export_every, log_layers=log_layers,
        )
        self.module = module
        # what the Trainer may rebuild this callback from (restore_callback_states_from_checkpoint=True)
        self._args = {"target_cost": target_cost, "strength": strength, "resource": resource,
                      "threshold": threshold, "hardware": hardware, "module": module, "tolerance": tolerance,
                      "log_every": log_every, "export_every": export_every, "log_layers": log_layers}
        if isinstance(regularizer, str):
            self._args["regularizer"] = regularizer
        self.saved_state: dict[str, Any] | None = None
        self._metrics: dict[str, float] | None = None

    def state(self) -> dict:
        """For the Trainer's checkpoints (``trainer_state.json``): JSON values only."""
        return {"args": dict(self._args), "attributes": {"saved_state": self.run.state_dict()}}

    # ---- Trainer events ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.run.built:
            return
        target = model if self.module is None else _submodule(model, self.module)
        batch = None if self.run.example_input is not None else _first_batch(train_dataloader)
        log_every = args.logging_steps
        if log_every < 1:  # a fraction of the steps
            log_every = math.ceil(state.max_steps * log_every)
        self.run.build(target, self.run.example_for(batch), steps=state.max_steps, log_every=max(1, int(log_every)))
        saved = self.saved_state
        if saved is None and state.global_step > 0:  # resuming: our entry in the checkpoint's trainer state
            entry = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(entry, list):
                entry = entry[0] if entry else None
            saved = (entry or {}).get("attributes", {}).get("saved_state")
        if saved:
            self.run.load_state_dict(saved)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.run.built:
            self.run.add_term_gradient(p for group in optimizer.param_groups for p in group["params"])

    def on_step_end(self, args, state, control, **kwargs):
        if not self.run.built:
            return
        step = state.global_step
        metrics = self.run.after_step(step)
        if metrics:
            self._metrics = metrics  # joins the Trainer's next log
        if self.run.should_export(step) and state.is_world_process_zero:
            self.run.export(args.output_dir, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._metrics:
            return
        if logs is not None:
            logs.update(self._metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._metrics)
        self._metrics = None

    def on_train_end(self, args, state, control, **kwargs):
        if not self.run.built:
            return
        step, counts = self.run.chosen(state.global_step)
        if state.is_world_process_zero:
            self.run.write_chosen(args.output_dir, step, counts)
        else:
            self.run.structure_file = Path(args.output_dir) / "learned_structure" / f"alive_{step}.json"


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise ValueError(f"MorphNetCallback: module='{name}' is not a submodule of {type(model).__name__}; "
                         "see model.named_modules()") from error


def _first_batch(loader) -> Any:
    """One collated training example, without touching the loader's sampler when the dataset is
    indexable (so the Trainer's data order is unchanged)."""
    if loader is None:
        raise ValueError("MorphNetCallback: the Trainer passed no train_dataloader; give example_input=")
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if dataset is not None and collate is not None and hasattr(dataset, "__getitem__"):
        try:
            return collate([dataset[0]])
        except (TypeError, KeyError, IndexError, NotImplementedError):
            pass
    return next(iter(loader))
