"""The stages of a job, one function each: learn the structure, rebuild the slim network (or keep
the learned weights), retrain a network, and the seed and uniform baselines it is compared with.
Each takes the job's ``Session``; a stage that finished in an earlier, interrupted job is skipped
when resuming (``RunState``)."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import torch
from torch import nn

import morphnet
from morphnet.pipeline import files
from morphnet.pipeline.controller import resolve_target
from morphnet.pipeline.learn import CHECKPOINT as LEARN_CHECKPOINT
from morphnet.pipeline.learn import LearnResult, learn_structure
from morphnet.pipeline.rebuild import EXPANDABLE, Rebuilt, rebuild
from morphnet.pipeline.regularizers import UNITS
from morphnet.pipeline.resume import Interrupted, gather_rng, restore_rng
from morphnet.pipeline.session import Session
from morphnet.pipeline.training import count_flops, count_params, evaluate, train
from morphnet.reporting import format_number

#: In target-cost mode a learned structure further than this from the target is corrected with a
#: uniform width multiplier (the controller usually lands closer; this only trims the residual).
CORRECTION_THRESHOLD = 0.01
#: The learned model with its gates removed, kept so a resumed run rebuilds from the same weights.
LEARNED = f"{files.CHECKPOINTS}/learned.pt"


def measure(model: nn.Module, example: torch.Tensor, resource: str, hardware: str | None) -> dict[str, Any]:
    """FLOPs (MorphNet's count and FlopCounterMode's), parameters and cost in ``resource`` units."""
    model = model.cpu()
    flops = morphnet.compute_cost(model, example, resource="flops")
    cost = flops if resource == "flops" else morphnet.compute_cost(model, example, resource=resource, hardware=hardware)
    return {"flops": float(flops), "flops_counted": count_flops(model, example), "params": count_params(model), "cost": float(cost)}


def learn_stage(session: Session) -> tuple[nn.Module, LearnResult]:
    """Structure learning on a fresh seed (continued from its checkpoint when resuming; skipped
    when it finished earlier); writes structures, checkpoints and TensorBoard. Returns the
    learned seed, gates removed, on the CPU."""
    cfg, ctx = session.cfg, session.ctx
    done = session.state.done("learn")
    if done is not None:
        seed = morphnet.remove_gates(session.new_seed())
        seed.load_state_dict(files.load_checkpoint(session.out / LEARNED)["model"])
        session.log("structure learning finished earlier; continuing with the later stages")
        return seed, LearnResult.from_dict(done)
    seed = session.start_seed().to(ctx.device)
    checkpoint = session.out / LEARN_CHECKPOINT
    resume = files.load_checkpoint(checkpoint) if session.resuming and checkpoint.is_file() else None
    session.log(f"learning the structure of {cfg.model} on {session.data.name} "
                f"({cfg.regularizer} regularizer, {cfg.target} target, {cfg.steps} steps, {ctx.world_size} process(es))"
                + (f", resumed after step {resume['step']}" if resume else ""))
    with session.progress(cfg.steps, "learn") as bar, session.checkpointer.loop(), warnings.catch_warnings():
        warnings.simplefilter("ignore", morphnet.TargetMissedWarning)  # summary.json's warnings say it, with advice
        result = learn_structure(cfg, ctx, session.data, seed, writer=session.tensorboard(), progress=bar,
                                 checkpointer=session.checkpointer, resume=resume)
    seed = morphnet.remove_gates(seed).cpu()  # FiGS gates served structure learning; the slim net retrains without
    if ctx.is_main:
        files.save_checkpoint(session.out / LEARNED, {"model": seed.state_dict()})
    session.state.finish("learn", result.to_dict())
    return seed, result



def rebuild_stage(session: Session, seed: nn.Module, counts: dict[str, int], *, learned_cost: float | None,
                  seed_cost: float, target_cost: float | None) -> tuple[Rebuilt, float]:
    """Rebuild with ``counts``; expand to ``--expand-to`` or, in target-cost mode, land the
    residual on the target with ``morphnet.fit_to_budget`` (the width multiplier within 1%, else
    the closest; nothing when the learned widths are within 1% already). Returns the slim model
    and its predicted cost."""
    cfg = session.cfg
    seed = seed.cpu()
    budget = resolve_target(cfg.expand_to, seed_cost) if cfg.expand_to is not None else None
    round_to, multiplier = cfg.round_to, None
    if budget is None and target_cost is not None and learned_cost is not None and cfg.target in EXPANDABLE:
        with warnings.catch_warnings():  # a miss is logged below, with the cost reached
            warnings.filterwarnings("ignore", message="fit_to_budget", category=UserWarning)
            multiplier, counts = morphnet.fit_to_budget(seed, counts, session.example, target_cost, resource=cfg.target,
                                                        hardware=cfg.hardware, round_to=cfg.round_to,
                                                        tolerance=CORRECTION_THRESHOLD)
        round_to = None  # fit_to_budget rounded them
    torch.manual_seed(cfg.seed + 1)
    rebuilt = rebuild(seed, counts, session.example, resource=cfg.target, budget=budget, hardware=cfg.hardware,
                      round_to=round_to)
    if multiplier is not None:
        rebuilt.width_multiplier, budget = multiplier, target_cost
    if budget is None and not cfg.round_to and learned_cost is not None:
        predicted = learned_cost
    else:
        predicted = float(morphnet.compute_cost(rebuilt.model, session.example, resource=cfg.target,
                                                hardware=cfg.hardware))
    if rebuilt.width_multiplier is not None:
        session.log(f"uniform width multiplier {rebuilt.width_multiplier:.4f} to reach "
                    f"{format_number(budget)} {UNITS[cfg.target]}")
        if abs(predicted / budget - 1) > CORRECTION_THRESHOLD:
            # widths too coarse to land within 1% (whole heads, rounding): the closest multiplier is
            # still nearer the target than the untrimmed learned widths, which may be far off it
            session.log(f"closest width multiplier taken: no factor lands within {CORRECTION_THRESHOLD:.0%} of "
                        f"the target (whole heads or --round-to make the steps coarse); the slim network costs "
                        f"{predicted / budget - 1:+.1%} from it")
    return rebuilt, predicted


def retrain_stage(session: Session, model: nn.Module, name: str, history: dict,
                  save=None, lr: float | None = None) -> tuple[float, float]:
    """Train ``model`` from its current weights with the normal recipe (peak ``lr``, default
    ``--retrain-lr``); return (test accuracy, seconds). ``save(model)`` runs on rank 0 once training ends, before the stage counts as done.
    In a run folder, the stage checkpoints to ``checkpoints/<name>.pt``, continues from it when
    resuming, and is skipped when it finished earlier."""
    cfg, ctx, state = session.cfg, session.ctx, session.state
    done = state.done(name) if state is not None else None
    if done is not None:
        history[name] = done["records"]
        return done["accuracy"], done["seconds"]
    checkpoint = session.out / files.CHECKPOINTS / f"{name}.pt"
    resume = files.load_checkpoint(checkpoint) if session.resuming and checkpoint.is_file() else None
    start, earlier = time.perf_counter(), resume["seconds"] if resume else 0.0
    records: list[dict] = resume["records"] if resume else []
    if resume:
        model.load_state_dict(resume["model"])
        session.log(f"{name}: resumed after step {resume['step']}")
    model.to(ctx.device)
    writer = session.tensorboard()
    eval_every = max(1, cfg.retrain_steps // 10)

    def on_log(step: int, metrics: dict) -> None:
        if step % eval_every < cfg.log_every or step == cfg.retrain_steps:
            metrics["test_accuracy"] = evaluate(model, session.data.test, ctx.device)
        records.append({"step": step, **metrics})
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"{name}/{key}", value, step)

    def on_step(step: int, snapshot) -> None:
        save_now, stop = session.checkpointer.poll(sync_point=step % cfg.log_every == 0 or step == cfg.retrain_steps)
        if save_now:
            rng = gather_rng(ctx)
            if ctx.is_main:
                files.save_checkpoint(checkpoint, {**snapshot(), "model": model.state_dict(), "records": records,
                                                   "rng": rng, "seconds": earlier + time.perf_counter() - start})
        if stop and step < cfg.retrain_steps:
            raise Interrupted(f"{name} stopped after step {step} of {cfg.retrain_steps}")

    if resume:
        restore_rng(ctx, resume["rng"])
    with session.progress(cfg.retrain_steps, name) as bar, session.checkpointer.loop():
        if bar is not None and resume:
            bar.update(resume["step"])
        train(model, session.data.train, steps=cfg.retrain_steps, lr=lr or cfg.retrain_lr, batch_size=cfg.batch_size,
              seed=cfg.seed, ctx=ctx, on_log=on_log, log_every=cfg.log_every, progress=bar,
              state=resume, on_step=on_step if state is not None else None)
    if save is not None and ctx.is_main:
        save(model)
    history[name] = records
    accuracy, seconds = records[-1]["test_accuracy"], earlier + time.perf_counter() - start
    if state is not None:
        state.finish(name, {"accuracy": accuracy, "seconds": seconds, "records": records})
        if ctx.is_main and checkpoint.is_file():
            checkpoint.unlink()
    return accuracy, seconds


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
    stats = measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
    session.log(f"training the seed shrunk uniformly (x{rebuilt.width_multiplier:.3f}) to the slim cost, for comparison")
    accuracy, seconds = retrain_stage(
        session, rebuilt.model, "retrain_uniform", history,
        save=lambda model: morphnet.save_slim(session.out / files.SLIM_UNIFORM, model.cpu(), rebuilt.counts))
    return {**stats, "accuracy": accuracy, "widths": rebuilt.counts, "width_multiplier": rebuilt.width_multiplier,
            "dir": files.SLIM_UNIFORM}, seconds


def validation_stage(session: Session, summary: dict[str, Any]) -> None:
    """With ``--val-fraction``: the slim and uniform networks, as saved, scored on the held-out part of
    the training data (``val_accuracy``), and which is better there (``summary["validation"]``): the
    comparison a user may act on without reading the test data."""
    val = session.data.val
    if val is None or not session.ctx.is_main:
        return
    scores = {}
    for name, folder in (("slim", files.SLIM), ("uniform", files.SLIM_UNIFORM)):
        part = summary.get(name)
        if part and (session.out / folder / "structure.json").is_file():
            model = morphnet.load_slim(session.new_seed, session.out / folder, session.example)
            part["val_accuracy"] = scores[name] = evaluate(model.to(session.ctx.device), val, session.ctx.device)
    better = (None if len(scores) < 2 else "tie" if scores["slim"] == scores["uniform"] else
              max(scores, key=scores.get))
    summary["validation"] = {"fraction": session.cfg.val_fraction, "examples": len(val), "better": better}
    session.log(f"validation ({len(val)} held-out training examples): "
                + ", ".join(f"{name} {score:.2%}" for name, score in scores.items()))


def seed_stage(session: Session, history: dict) -> tuple[float | None, float | None, str | None]:
    """The seed's accuracy for comparison: measured as given with ``--seed-weights``, else trained
    from scratch with the slim network's recipe (unless ``--no-baseline``). Returns (accuracy,
    seconds of training or None, how the seed was trained or None); accuracy None when skipped."""
    cfg = session.cfg
    if cfg.seed_weights:
        session.log("measuring the seed network with the given weights (--seed-weights), for comparison")
        accuracy = evaluate(session.start_seed().to(session.ctx.device), session.data.test, session.ctx.device)
        return accuracy, None, f"as given ({cfg.seed_weights})"
    if not cfg.baseline:
        return None, None, None
    session.log("training the seed network with the same recipe, for comparison")
    accuracy, seconds = retrain_stage(
        session, session.new_seed(), "retrain_seed", history,
        save=lambda model: files.save_checkpoint(session.out / files.CHECKPOINTS / "seed.pt",
                                                 {"model": model.state_dict()}))
    return accuracy, seconds, f"trained {cfg.retrain_steps} steps from scratch"


def slim_stage(session: Session, rebuilt: Rebuilt, history: dict) -> tuple[float, float]:
    """Retrain the slim network from scratch (with ``--finetune``: fine-tune it from its kept
    weights at ``--finetune-lr``) and save it to ``slim/``; returns (test accuracy, seconds)."""
    cfg = session.cfg
    session.log("fine-tuning the slim network from its kept weights" if cfg.finetune
                else "retraining the slim network from scratch")
    return retrain_stage(
        session, rebuilt.model, "retrain_slim", history,
        save=lambda model: morphnet.save_slim(session.out / files.SLIM, model.cpu(), rebuilt.counts),
        lr=(cfg.finetune_lr or cfg.retrain_lr / 5) if cfg.finetune else None)
