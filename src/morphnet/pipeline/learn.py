"""Stage 1 of the pipeline: structure learning with a MorphNet regularizer.

Train the seed with ``task loss + strength * regularization term`` at a fixed learning rate,
record the proposed structure (alive counts and its cost) as it evolves, write
``learned_structure/alive_<step>.json`` periodically and at the last step, and checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import nn

import morphnet
from morphnet.data import DataBundle
from morphnet.pipeline import files
from morphnet.pipeline.config import RunConfig
from morphnet.control import Candidate
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.regularizers import make_regularizer
from morphnet.pipeline.resume import Checkpointer, Interrupted, gather_rng, restore_rng
from morphnet.pipeline.training import Meter, evaluate, infinite_batches, make_optimizer


@dataclass
class LearnResult:
    """What structure learning produced."""

    regularizer_name: str
    cost_name: str
    seed_cost: float
    seed_widths: dict[str, int]
    chosen: Candidate
    structure_file: Path
    initial_strength: float
    final_strength: float
    target_cost: float | None
    ranks_agree: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (for ``checkpoints/state.json``)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                "chosen": asdict(self.chosen), "structure_file": str(self.structure_file)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LearnResult":
        return cls(**{**data, "chosen": Candidate(**data["chosen"]), "structure_file": Path(data["structure_file"])})


#: The checkpoint of structure learning, inside the run folder.
CHECKPOINT = f"{files.CHECKPOINTS}/learn.pt"


def learn_structure(
    cfg: RunConfig, ctx: DistContext, data: DataBundle, model: nn.Module, *, writer=None, progress=None,
    checkpointer: Checkpointer | None = None, resume: dict | None = None,
) -> LearnResult:
    """Run structure learning on ``model`` (on ``ctx.device``; trained in place) and return the
    chosen structure: the last step's, or in target-cost mode the latest one that lands within
    tolerance of the target (else the closest).

    The loop's whole state goes to ``checkpoints/learn.pt`` at every export step and whenever
    ``checkpointer`` says so; ``resume`` (that file's content) continues from its step. Raises
    ``Interrupted`` after saving when the checkpointer says stop (Ctrl-C).
    """
    start = time.perf_counter()
    out = Path(cfg.out)
    example = data.example_inputs(1).to(ctx.device)
    reg = make_regularizer(
        cfg.regularizer, cfg.target, model, example, threshold=cfg.threshold, hardware=cfg.hardware,
        min_layer_fraction=cfg.min_layer_fraction,
    )
    exporter = morphnet.StructureExporter(reg)
    seed_cost = float(reg.get_cost())
    seed_widths = exporter.get_alive_counts()
    if seed_cost <= 0:
        raise ValueError(f"the seed's {reg.cost_name} is 0: no layer of '{cfg.model}' has a cost to reduce")

    initial_strength = cfg.strength if cfg.strength is not None else 1.0 / seed_cost
    controller = None
    if cfg.target_cost is not None:  # reads the cost every log_every steps, broadcast from rank 0
        controller = morphnet.TargetCost(reg, cfg.target_cost, steps=cfg.steps, tolerance=cfg.tolerance,
                                         initial_strength=initial_strength, log_every=cfg.log_every)
    target_cost = controller.target if controller is not None else None
    strength = initial_strength

    optimizer = make_optimizer(model, cfg.lr, weight_decay=0.0)
    prox = morphnet.ProximalStep(reg) if cfg.proximal else None  # the penalty as a soft-threshold step
    meter = Meter()
    history: list[dict[str, Any]] = []
    last: Candidate | None = None  # fixed strength: the last step's structure (TargetCost keeps its own)
    exported: set[int] = set()
    first, earlier_seconds = 1, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        meter.load_state_dict(resume["meter"])
        strength, history, last = resume["strength"], resume["history"], resume["last"]
        exported, earlier_seconds, first = set(resume["exported"]), resume["seconds"], resume["step"] + 1
        if controller is not None:
            controller.load_state_dict(resume["controller"])
        if progress is not None:
            progress.update(first - 1)
    net = ctx.wrap(model)
    net.train()
    batches = infinite_batches(data.train, cfg.batch_size, seed=cfg.seed, ctx=ctx, start=first - 1)
    export_every = cfg.export_every or max(1, cfg.steps // 10)
    if resume is not None:
        restore_rng(ctx, resume["rng"])

    def save(step: int) -> None:
        rng = gather_rng(ctx)
        if ctx.is_main:
            files.save_checkpoint(out / CHECKPOINT, {
                "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "strength": strength, "controller": controller.state_dict() if controller else None,
                "meter": meter.state_dict(), "history": history, "last": last,
                "exported": sorted(exported), "rng": rng, "world_size": ctx.world_size,
                "seconds": earlier_seconds + time.perf_counter() - start,
            })

    for step in range(first, cfg.steps + 1):
        x, y = next(batches)
        logits = net(x)
        task_loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if prox is None:
            reg_loss = reg.get_regularization_term()
            loss = task_loss + strength * reg_loss
            loss.backward()
            optimizer.step()
        else:
            task_loss.backward()
            optimizer.step()
            reg_loss = prox.step(strength, optimizer)
            loss = task_loss.detach() + strength * reg_loss
        meter.add(loss=loss.detach(), task_loss=task_loss.detach(), reg_loss=reg_loss.detach(),
                  correct=(logits.argmax(1) == y).sum(), count=len(y))
        if progress is not None:
            progress.update(1)

        logging = step % cfg.log_every == 0 or step == cfg.steps
        export = logging and (step % export_every == 0 or step == cfg.steps)
        next_strength = controller.update(step) if controller is not None else strength
        if logging:
            if controller is not None:
                cost = controller.cost  # read by update() at this very step (same schedule)
            else:
                cost = ctx.broadcast(float(reg.get_cost()))
                last = Candidate(step, cost, ctx.broadcast(exporter.get_alive_counts()))
            record = {"step": step, "cost": cost, "strength": strength, **meter.flush()}
            if controller is not None:
                record["reference"] = controller.reference(step)
            if export and ctx.is_main:
                exporter.create_file_and_save_alive_counts(out, step)
                exported.add(step)
                record["test_accuracy"] = evaluate(model, data.test, ctx.device)
            history.append(record)
            if writer is not None:
                morphnet.write_summaries(writer, reg, step, alive_counts=True)
                for key in ("loss", "task_loss", "strength", "train_accuracy", "test_accuracy"):
                    if key in record:
                        writer.add_scalar(f"learn/{key}", record[key], step)
            if progress is not None:
                progress.set_postfix(cost=f"{cost / seed_cost:.3f}x", acc=f"{record['train_accuracy']:.3f}")
        strength = next_strength
        if checkpointer is not None:
            do_save, stop = checkpointer.poll(always=export, sync_point=logging)
        else:
            do_save, stop = export, False
        if do_save:
            save(step)
        if stop and step < cfg.steps:
            raise Interrupted(f"structure learning stopped after step {step} of {cfg.steps}")

    # target-cost mode: the latest structure within 1% of the target, else within tolerance, else
    # the closest (TargetCost keeps it, identical on every rank); fixed strength: the last step's.
    chosen = controller.best() if controller is not None else last
    agree = ctx.all_equal(exporter.get_alive_counts())
    structure_file = files.structure_path(out, chosen.step)
    if ctx.is_main and chosen.step not in exported:
        files.write_json(structure_file, chosen.counts)
    ctx.barrier()
    return LearnResult(
        regularizer_name=reg.name, cost_name=reg.cost_name, seed_cost=seed_cost, seed_widths=seed_widths,
        chosen=chosen, structure_file=structure_file, initial_strength=initial_strength,
        final_strength=strength, target_cost=target_cost, ranks_agree=agree,
        seconds=earlier_seconds + time.perf_counter() - start, history=history,
    )
