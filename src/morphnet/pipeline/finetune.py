"""``morphnet run --seed-weights PATH --finetune``: compress a trained network with ``morphnet.compress``.

The job differs from learning a structure from scratch: the seed is trained already, so the run
lands on the budget at once from its BatchNorm scales (or after ``--learn-fraction`` of the steps
of MorphNet's penalty), keeps the surviving weights, re-estimates BatchNorm statistics and
fine-tunes for ``--retrain-steps`` steps distilling the seed (docs/benchmarks.md, "Compressing a
trained network", says why). With ``--uniform-baseline`` the uniform width multiplier of the same
cost is fine-tuned the same way, from the same weights: the comparison the summary shows.

A compress stage runs in one process and is not checkpointed inside: Ctrl-C stops it at once and
``--resume`` starts it again (the stages before and after it resume as usual).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import morphnet
from morphnet.control import Candidate
from morphnet.pipeline import files
from morphnet.pipeline.learn import LearnResult
from morphnet.pipeline.rebuild import Rebuilt
from morphnet.pipeline.session import Session
from morphnet.pipeline.training import evaluate

#: the stage names in checkpoints/state.json
STAGES = {"scales": "compress", "uniform": "compress_uniform"}


def compress_stage(session: Session, selection: str = "scales") -> tuple[nn.Module, dict[str, Any]]:
    """``morphnet.compress`` on the trained seed (``selection="uniform"``: the uniform baseline);
    returns the fine-tuned slim model (on the CPU) and compress's report. A stage that finished in an
    earlier job is loaded from its saved model instead."""
    cfg, ctx = session.cfg, session.ctx
    name = STAGES[selection]
    folder = files.SLIM if selection == "scales" else files.SLIM_UNIFORM
    done = session.state.done(name)
    if done is not None:
        session.log(f"{name} finished earlier; loading its network")
        return morphnet.load_slim(session.new_seed, session.out / folder, session.example), done
    if ctx.world_size > 1:
        raise ValueError("--finetune compresses the trained seed in one process; run it without torchrun")
    seed = session.start_seed().to(ctx.device)
    loader = DataLoader(session.data.train, cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    report: dict[str, Any] = {}
    session.log(f"compressing the trained {cfg.model} to {cfg.target_cost} of its {cfg.target} "
                + ("with the uniform width multiplier (the baseline)" if selection == "uniform" else
                   f"({cfg.retrain_steps} steps, {cfg.learn_fraction:.0%} of them learning)"))
    with session.progress(cfg.retrain_steps, name) as bar:
        slim = morphnet.compress(
            seed, session.example.to(ctx.device), cfg.target_cost, data=loader, steps=cfg.retrain_steps,
            lr=cfg.finetune_lr or cfg.retrain_lr / 5, learn_fraction=cfg.learn_fraction if selection == "scales" else 0,
            resource=cfg.target, hardware=cfg.hardware, threshold=cfg.threshold, regularizer=cfg.regularizer,
            min_layer_fraction=cfg.min_layer_fraction, selection=selection, report=report, log=session.log,
            on_step=(lambda phase, step: bar.update(1)) if bar is not None else None)
    slim = slim.cpu()
    report = {k: v for k, v in report.items() if k != "history"} | {"history": report.get("history", [])}
    if ctx.is_main:
        morphnet.save_slim(session.out / folder, slim, report["widths"])
    session.state.finish(name, report)
    return slim, report


def learn_result(session: Session, report: dict[str, Any]) -> LearnResult:
    """What the pipeline's summary reads from structure learning, from compress's report; the landed
    structure is written to ``learned_structure/alive_<learning steps>.json``."""
    cfg = session.cfg
    step = report["steps"]["learn"]
    structure_file = files.structure_path(session.out, step)
    if session.ctx.is_main:
        files.write_json(structure_file, report["widths"])
    strengths = [h["strength"] for h in report["history"]]
    return LearnResult(
        regularizer_name=report["regularizer"], cost_name=report["cost_name"], seed_cost=report["seed_cost"],
        seed_widths=report["seed_widths"], chosen=Candidate(step, report["cost"], report["widths"]),
        structure_file=structure_file, initial_strength=report.get("initial_strength", 0.0),
        final_strength=strengths[-1] if strengths else 0.0, target_cost=report["target_cost"], ranks_agree=True,
        seconds=report["seconds"], history=[{"step": h["step"], "cost": h["cost"] * report["seed_cost"],
                                             "strength": h["strength"], "loss": h["task_loss"]}
                                            for h in report["history"]])


def finetuned(session: Session, slim: nn.Module, report: dict[str, Any]) -> tuple[Rebuilt, float, float]:
    """The compressed network as the summary wants it: (rebuilt, predicted cost, test accuracy)."""
    accuracy = evaluate(slim.to(session.ctx.device), session.data.test, session.ctx.device)
    return Rebuilt(model=slim.cpu(), counts=report["widths"], width_multiplier=None), report["cost"], accuracy
