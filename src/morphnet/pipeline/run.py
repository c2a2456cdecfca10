"""The whole pipeline, and the stages the CLI runs on their own: learn, rebuild, retrain, report.

Every function here writes into one run folder (see ``files``); only rank 0 writes or prints.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

import morphnet
from morphnet.data import DataBundle, load_data
from morphnet.pipeline import distributed, files
from morphnet.pipeline.config import RunConfig
from morphnet.pipeline.controller import resolve_target
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.learn import LearnResult, learn_structure
from morphnet.pipeline.rebuild import EXPANDABLE, Rebuilt, load_structure, rebuild
from morphnet.pipeline.regularizers import UNITS
from morphnet.pipeline.training import count_flops, count_params, evaluate, train
from morphnet.reporting import format_summary, format_widths, write_report
from morphnet.seeds import create_seed

#: In target-cost mode a learned structure further than this from the target is corrected with a
#: uniform width multiplier (the controller usually lands closer; this only trims the residual).
CORRECTION_THRESHOLD = 0.01


class Session:
    """What every stage needs: the config, the process group, the data and a seed factory."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.writer = None
        self.threads = torch.get_num_threads()  # restored by close()
        self.ctx: DistContext = distributed.setup(cfg.device)
        try:
            if self.ctx.device.type == "cpu":
                torch.set_num_threads(cfg.threads or idle_threads())
            self.data: DataBundle = load_data(cfg.data, seed=cfg.seed, image_size=cfg.image_size)
            self.example = self.data.example_inputs(1)
            self.new_seed()  # fail early on an unknown model, before any work
        except BaseException:
            self.close()
            raise
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    def new_seed(self) -> nn.Module:
        """A freshly initialized seed network (the same weights every call)."""
        torch.manual_seed(self.cfg.seed)
        return create_seed(self.cfg.model, num_classes=self.data.num_classes, in_channels=self.data.input_shape[0])

    def log(self, message: str) -> None:
        if self.ctx.is_main and not self.cfg.quiet:
            print(message, flush=True)

    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Any]:
        """A tqdm bar on rank 0 unless quiet."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, disable=self.cfg.quiet or not self.ctx.is_main, leave=False, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    def tensorboard(self):
        """The run's TensorBoard writer (rank 0 only; None elsewhere)."""
        if self.writer is None and self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / files.TENSORBOARD))
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        torch.set_num_threads(self.threads)
        distributed.teardown()


def idle_threads() -> int:
    """PyTorch's thread count, capped at the cores that other work leaves idle (1-minute load
    average), at least 1. On a busy machine PyTorch's threads spin waiting for each other: a step
    of the default job took 0.6-1.3 s with 2 threads against 35 ms with 1 on a loaded 2-core box."""
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(torch.get_num_threads(), round((os.cpu_count() or 1) - busy)))


def _measure(model: nn.Module, example: torch.Tensor, resource: str, hardware: str | None) -> dict[str, Any]:
    """FLOPs (MorphNet's count and FlopCounterMode's), parameters and cost in ``resource`` units."""
    model = model.cpu()
    flops = morphnet.compute_cost(model, example, resource="flops")
    cost = flops if resource == "flops" else morphnet.compute_cost(model, example, resource=resource, hardware=hardware)
    return {"flops": float(flops), "flops_counted": count_flops(model, example), "params": count_params(model), "cost": float(cost)}


def learn_stage(session: Session) -> tuple[nn.Module, LearnResult]:
    """Structure learning on a fresh seed; writes config, structures, checkpoint and TensorBoard."""
    cfg, ctx = session.cfg, session.ctx
    if ctx.is_main:
        files.write_json(session.out / files.CONFIG, cfg.to_dict())
        for stale in (session.out / files.STRUCTURES).glob("alive_*.json"):  # from an earlier run in this folder
            stale.unlink()
    seed = session.new_seed().to(ctx.device)
    session.log(f"learning the structure of {cfg.model} on {session.data.name} "
                f"({cfg.regularizer} regularizer, {cfg.target} target, {cfg.steps} steps, {ctx.world_size} process(es))")
    with session.progress(cfg.steps, "learn") as bar:
        result = learn_structure(cfg, ctx, session.data, seed, writer=session.tensorboard(), progress=bar)
    return seed, result


def learn_summary(cfg: RunConfig, ctx: DistContext, result: LearnResult, seed_stats: dict) -> dict[str, Any]:
    """The part of summary.json that structure learning fills in."""
    target = result.target_cost
    return {
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "ranks_agree": result.ranks_agree,
        "target": {
            "resource": cfg.target, "unit": UNITS[cfg.target], "regularizer": result.regularizer_name,
            "cost_name": result.cost_name, "target_cost": target, "tolerance": cfg.tolerance,
            "initial_strength": result.initial_strength, "final_strength": result.final_strength,
        },
        "seed": {**seed_stats, "cost": result.seed_cost, "widths": result.seed_widths},
        "learned": {
            "step": result.chosen.step, "cost": result.chosen.cost, "widths": result.chosen.counts,
            "cost_ratio": result.chosen.cost / result.seed_cost,
            "target_error": None if target is None else result.chosen.cost / target - 1,
            "structure_file": str(result.structure_file.relative_to(cfg.out)),
        },
        "seconds": {"learn": result.seconds},
    }


def rebuild_stage(session: Session, seed: nn.Module, counts: dict[str, int], *, learned_cost: float | None,
                  seed_cost: float, target_cost: float | None) -> tuple[Rebuilt, float]:
    """Rebuild with ``counts``; expand to ``--expand-to`` or, in target-cost mode, trim the
    residual to the target. Returns the slim model and its predicted cost."""
    cfg = session.cfg
    budget = resolve_target(cfg.expand_to, seed_cost) if cfg.expand_to is not None else None
    trim = (budget is None and target_cost is not None and learned_cost is not None and cfg.target in EXPANDABLE
            and abs(learned_cost / target_cost - 1) > CORRECTION_THRESHOLD)
    if trim:
        budget = target_cost
    seed = seed.cpu()

    def build(budget: float | None) -> Rebuilt:
        torch.manual_seed(cfg.seed + 1)
        return rebuild(seed, counts, session.example, resource=cfg.target, budget=budget,
                       hardware=cfg.hardware, round_to=cfg.round_to)

    try:
        rebuilt = build(budget)
    except ValueError as error:
        if not trim:
            raise
        session.log(f"kept the learned widths: {error}")  # widths too coarse to land within 1%
        budget, rebuilt = None, build(None)
    if budget is None and not cfg.round_to and learned_cost is not None:
        predicted = learned_cost
    else:
        predicted = float(morphnet.compute_cost(rebuilt.model, session.example, resource=cfg.target,
                                                hardware=cfg.hardware))
    if rebuilt.width_multiplier is not None:
        session.log(f"uniform width multiplier {rebuilt.width_multiplier:.4f} to reach {budget:.4g} {UNITS[cfg.target]}")
    return rebuilt, predicted


def retrain_stage(session: Session, model: nn.Module, name: str, history: dict) -> tuple[float, float]:
    """Train ``model`` from its fresh weights with the normal recipe; return (test accuracy, seconds)."""
    cfg, ctx = session.cfg, session.ctx
    start = time.perf_counter()
    model.to(ctx.device)
    records: list[dict] = []
    writer = session.tensorboard()
    eval_every = max(1, cfg.retrain_steps // 10)

    def on_log(step: int, metrics: dict) -> None:
        if step % eval_every < cfg.log_every or step == cfg.retrain_steps:
            metrics["test_accuracy"] = evaluate(model, session.data.test, ctx.device)
        records.append({"step": step, **metrics})
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"{name}/{key}", value, step)

    with session.progress(cfg.retrain_steps, name) as bar:
        train(model, session.data.train, steps=cfg.retrain_steps, lr=cfg.retrain_lr, batch_size=cfg.batch_size,
              seed=cfg.seed, ctx=ctx, on_log=on_log, log_every=cfg.log_every, progress=bar)
    history[name] = records
    return records[-1]["test_accuracy"], time.perf_counter() - start


def uniform_stage(session: Session, seed_widths: dict[str, int], budget: float,
                  history: dict) -> tuple[dict[str, Any] | None, float]:
    """The baseline MorphNet has to beat: the seed with every width scaled by one factor to the
    slim network's cost, retrained with the same recipe. None when no factor lands within 1%."""
    cfg = session.cfg
    torch.manual_seed(cfg.seed + 1)
    try:
        rebuilt = rebuild(session.new_seed(), seed_widths, session.example, resource=cfg.target, budget=budget,
                          hardware=cfg.hardware, round_to=cfg.round_to)
    except ValueError as error:
        session.log(f"no uniform baseline: {error}")
        return None, 0.0
    stats = _measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
    session.log(f"training the seed shrunk uniformly (x{rebuilt.width_multiplier:.3f}) to the slim cost, for comparison")
    accuracy, seconds = retrain_stage(session, rebuilt.model, "retrain_uniform", history)
    return {**stats, "accuracy": accuracy, "widths": rebuilt.counts, "width_multiplier": rebuilt.width_multiplier}, seconds


def finish(session: Session, summary: dict, history: dict) -> dict:
    """Write summary.json, history.json, plots and report.html (rank 0); print the summary."""
    if session.ctx.is_main:
        files.write_json(session.out / files.SUMMARY, summary)
        files.write_json(session.out / files.HISTORY, history)
        write_report(session.out)
        print(format_summary(summary, session.out), flush=True)
    return summary


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    """Learn the structure, rebuild, retrain slim and seed with the same recipe, evaluate, report.

    Returns the summary (also written to ``cfg.out/summary.json``).
    """
    session = Session(cfg)
    try:
        start = time.perf_counter()
        seed, result = learn_stage(session)
        seed = morphnet.remove_gates(seed)  # FiGS gates served structure learning; the slim net retrains without
        seed_stats = _measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        summary = learn_summary(cfg, session.ctx, result, seed_stats)
        history: dict[str, Any] = {"learn": result.history}
        rebuilt, predicted = rebuild_stage(session, seed, result.chosen.counts, learned_cost=result.chosen.cost,
                                           seed_cost=result.seed_cost, target_cost=result.target_cost)
        slim_stats = _measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
        summary["slim"] = {**slim_stats, "predicted_cost": predicted, "widths": rebuilt.counts,
                           "width_multiplier": rebuilt.width_multiplier, "dir": files.SLIM}
        if result.target_cost is not None:
            summary["slim"]["target_error"] = slim_stats["cost"] / result.target_cost - 1
        session.log("retraining the slim network from scratch")
        slim = rebuilt.model
        summary["slim"]["accuracy"], summary["seconds"]["retrain_slim"] = retrain_stage(session, slim, "retrain_slim", history)
        if session.ctx.is_main:
            morphnet.save_slim(session.out / files.SLIM, slim.cpu(), rebuilt.counts)
        summary["seed"]["accuracy"] = None
        if cfg.baseline:
            session.log("training the seed network with the same recipe, for comparison")
            baseline = session.new_seed()
            summary["seed"]["accuracy"], summary["seconds"]["retrain_seed"] = retrain_stage(session, baseline, "retrain_seed", history)
            if session.ctx.is_main:
                files.save_checkpoint(session.out / files.CHECKPOINTS / "seed.pt", {"model": baseline.state_dict()})
        if cfg.uniform_baseline:
            summary["uniform"], summary["seconds"]["retrain_uniform"] = uniform_stage(
                session, result.seed_widths, slim_stats["cost"], history)
        summary["seconds"]["total"] = time.perf_counter() - start
        return finish(session, summary, history)
    finally:
        session.close()


def learn_only(cfg: RunConfig) -> dict[str, Any]:
    """Structure learning alone (``morphnet learn``): structures, checkpoint, summary, plots."""
    session = Session(cfg)
    try:
        _, result = learn_stage(session)
        seed_stats = _measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        summary = learn_summary(cfg, session.ctx, result, seed_stats)
        return finish(session, summary, {"learn": result.history})
    finally:
        session.close()


def rebuild_only(cfg: RunConfig, structure: str | Path | None = None, *, retrain: bool = False) -> dict[str, Any]:
    """``morphnet rebuild``: build the slim network from a structure file (default: the latest in
    ``cfg.out``), optionally expanded to ``cfg.expand_to``; save it, and with ``retrain`` train it
    from scratch and evaluate it."""
    if structure is None:
        structure = files.latest_structure(Path(cfg.out))
        if structure is None:
            raise FileNotFoundError(
                f"no learned_structure/alive_*.json in '{cfg.out}'; run `morphnet learn --out {cfg.out}` "
                "first or pass --structure FILE"
            )
    counts = load_structure(structure)
    session = Session(cfg)
    try:
        seed = session.new_seed()
        seed_stats = _measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        rebuilt, predicted = rebuild_stage(session, seed, counts, learned_cost=None,
                                           seed_cost=seed_stats["cost"], target_cost=None)
        slim_stats = _measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
        summary = {
            "structure_file": str(structure), "seed": seed_stats,
            "slim": {**slim_stats, "predicted_cost": predicted, "widths": rebuilt.counts,
                     "width_multiplier": rebuilt.width_multiplier, "dir": files.SLIM},
        }
        if retrain:
            summary["slim"]["accuracy"], _ = retrain_stage(session, rebuilt.model, "retrain_slim", {})
        if session.ctx.is_main:
            morphnet.save_slim(session.out / files.SLIM, rebuilt.model.cpu(), rebuilt.counts)
            channels = {row["name"]: row["channels"] for row in morphnet.cost_table(seed, session.example)}
            seed_widths = {name: channels[name] for name in rebuilt.counts}
            expanded = rebuilt.counts if rebuilt.counts != counts else None
            print(format_widths(seed_widths, counts, expanded), flush=True)
            print(f"seed {seed_stats['flops']:.4g} FLOPs, {seed_stats['params']} params -> slim "
                  f"{slim_stats['flops']:.4g} FLOPs (counted {slim_stats['flops_counted']}), "
                  f"{slim_stats['params']} params; saved to {session.out / files.SLIM}", flush=True)
            if "accuracy" in summary["slim"]:
                print(f"slim test accuracy after retraining: {summary['slim']['accuracy']:.2%}", flush=True)
        return summary
    finally:
        session.close()


def cost_only(cfg: RunConfig, structure: str | Path | None = None) -> list[dict]:
    """``morphnet cost``: the per-layer table of the seed, or of the slim network for ``structure``."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, seed=cfg.seed, image_size=cfg.image_size)
    model = create_seed(cfg.model, num_classes=data.num_classes, in_channels=data.input_shape[0])
    example = data.example_inputs(1)
    if structure is not None:
        model = morphnet.apply_structure(model, load_structure(structure), example)
    return morphnet.cost_table(model, example, **({"hardware": cfg.hardware} if cfg.hardware else {}))
