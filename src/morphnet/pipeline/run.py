"""The whole pipeline, and the stages the CLI runs on their own: learn, rebuild, retrain, report.

Every function here writes into one run folder (see ``files``); only rank 0 writes or prints. A
folder that already holds a run is never replaced silently: a new job there needs ``resume``
(continue from the last checkpoint, skipping finished stages) or ``overwrite`` (remove the old
run first).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

import morphnet
from morphnet.data import DataBundle, load_data
from morphnet.pipeline import distributed, files
from morphnet.pipeline import latency  # measured latency: the run's table and the end-of-run check
from morphnet.pipeline.config import RunConfig
from morphnet.pipeline.controller import resolve_target
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.learn import CHECKPOINT as LEARN_CHECKPOINT
from morphnet.pipeline.learn import LearnResult, learn_structure
from morphnet.pipeline.rebuild import EXPANDABLE, Rebuilt, load_structure, rebuild
from morphnet.pipeline.regularizers import UNITS, make_regularizer
from morphnet.pipeline.resume import Checkpointer, Interrupted, RunState, gather_rng, restore_rng
from morphnet.pipeline.training import count_flops, count_params, evaluate, train
from morphnet.reporting import format_attention, format_number, format_summary, format_widths, write_report
from morphnet.seeds import create_seed
from morphnet.seeds.registry import takes_image_size
from morphnet.surgery.attention import head_counts

#: In target-cost mode a learned structure further than this from the target is corrected with a
#: uniform width multiplier (the controller usually lands closer; this only trims the residual).
CORRECTION_THRESHOLD = 0.01
#: The learned model with its gates removed, kept so a resumed run rebuilds from the same weights.
LEARNED = f"{files.CHECKPOINTS}/learned.pt"
#: How a job treats a run folder that may hold a run: refuse one ("new"), continue it ("resume"),
#: replace it ("overwrite"), or add to it without touching the run's own files ("reuse": rebuild).
MODES = ("new", "resume", "overwrite", "reuse")


class LineProgress:
    """Progress as plain lines on stdout (every tenth of the total), for output that is not a
    terminal: logs and CI keep readable lines instead of carriage-return animations."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.every = max(1, total // 10)

    def update(self, count: int = 1) -> None:
        before, self.n = self.n, self.n + count
        if self.n // self.every > before // self.every or (self.n == self.total and before < self.total):
            print(f"{self.desc}: {self.n}/{self.total} steps{self.postfix}", flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {key} {value}" for key, value in values.items())

    def close(self) -> None:
        pass


def fixed_input_size(model: nn.Module) -> int | None:
    """The one square input size a model accepts, when it declares one (timm ViT, DeiT, Swin:
    ``patch_embed.img_size`` with a strict size); None when any size works."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or getattr(embed, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True):
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]) if size[0] == size[1] else None


def prepare_model_and_data(cfg: RunConfig, log=print) -> tuple[DataBundle, dict[str, Any]]:
    """Load ``cfg.data`` and check that ``cfg.model`` runs on it; return the data and the extra
    arguments of ``create_seed``. A model with a fixed input size (timm ViT: ``img_size``) gets
    the data resized to that size, or is built for ``--image-size`` when given (timm only); a
    built-in seed with an ``image_size`` parameter (``vit_tiny``) is built for the data's size.
    Anything else that does not fit ends in one ``ValueError`` that names the option to change."""
    data = load_data(cfg.data, seed=cfg.seed, image_size=cfg.image_size)
    kwargs: dict[str, Any] = {}
    if takes_image_size(cfg.model):  # e.g. vit_tiny: built for the data's size (its position embedding)
        kwargs["image_size"] = data.input_shape[-1]

    def build() -> nn.Module:
        torch.manual_seed(cfg.seed)
        return create_seed(cfg.model, num_classes=data.num_classes, in_channels=data.input_shape[0], **kwargs)

    model = build()
    fixed, size = fixed_input_size(model), data.input_shape[-1]
    if fixed is not None and fixed != size:
        if cfg.image_size is None:
            log(f"{cfg.model} takes {fixed}x{fixed} images (its img_size): resizing {data.name} to {fixed}x{fixed}; "
                f"pass --image-size N to build the model for another size")
            cfg.image_size = fixed
            data = load_data(cfg.data, seed=cfg.seed, image_size=fixed)
        elif cfg.model.startswith("timm:"):
            kwargs["img_size"] = cfg.image_size
            model = build()
        else:
            raise ValueError(f"model '{cfg.model}' takes {fixed}x{fixed} images only; pass --image-size {fixed}")
    example = data.example_inputs(1)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as error:
        raise ValueError(
            f"model '{cfg.model}' fails on a {'x'.join(map(str, example.shape))} batch of {data.name} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); pass a --data "
            f"or --image-size that fits the model"
        ) from error
    model.train(was_training)
    return data, kwargs


class Session:
    """What every stage needs: the config, the process group, the data, a seed factory, the run
    folder's state and the checkpointer. Nothing is written before the config, the data and the
    model have been checked and the folder's mode (see ``MODES``) allows it."""

    def __init__(self, cfg: RunConfig, mode: str = "new"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        self.cfg = cfg
        self.mode = mode
        self.out = Path(cfg.out)
        self.writer = None
        self.state: RunState | None = None
        self.threads = torch.get_num_threads()  # restored by close()
        self.ctx: DistContext = distributed.setup(cfg.device)
        self.checkpointer = Checkpointer(self.ctx)
        try:
            if self.ctx.device.type == "cpu":
                torch.set_num_threads(cfg.threads or idle_threads())
            self.data, self.seed_kwargs = prepare_model_and_data(cfg, self.log)
            if mode == "resume":
                self._check_resumable()
            self.example = self.data.example_inputs(1)
            self._prepare_folder()
        except BaseException:
            self.close()
            raise
        if mode != "reuse":
            self.state = RunState(self.out, self.ctx, load=mode == "resume")
            self.checkpointer.install()

    def _check_resumable(self) -> None:
        config = self.out / files.CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"'{self.out}' holds no run to resume (no {files.CONFIG}); start one without --resume")
        saved = RunConfig.from_saved(files.read_json(config))
        differences = saved.differences(self.cfg)
        if differences:
            raise ValueError(f"--resume continues the run in '{self.out}' as it was configured, but "
                             f"{'; '.join(differences)}; leave these options out, or start a new run with "
                             f"--overwrite or another --out")

    def _prepare_folder(self) -> None:
        """Refuse, clear or keep the run folder (rank 0 decides, every rank follows)."""
        problem = None
        if self.ctx.is_main:
            try:
                if self.mode == "new":
                    files.refuse_existing_run(self.out)
                elif self.mode == "overwrite":
                    files.clear_run(self.out)
                self.out.mkdir(parents=True, exist_ok=True)
                if self.mode in ("new", "overwrite"):
                    files.write_json(self.out / files.CONFIG, self.cfg.to_dict())
            except (OSError, ValueError) as error:
                problem = error
        problem = self.ctx.broadcast(problem)
        if problem is not None:
            raise problem

    @property
    def resuming(self) -> bool:
        return self.mode == "resume"

    def new_seed(self) -> nn.Module:
        """A freshly initialized seed network (the same weights every call)."""
        torch.manual_seed(self.cfg.seed)
        return create_seed(self.cfg.model, num_classes=self.data.num_classes, in_channels=self.data.input_shape[0],
                           **self.seed_kwargs)

    def start_seed(self) -> nn.Module:
        """The seed the run starts from: ``new_seed()`` with ``--seed-weights`` loaded when given."""
        model = self.new_seed()
        if self.cfg.seed_weights:
            path = Path(self.cfg.seed_weights).expanduser()
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            try:
                model.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as error:
                raise ValueError(f"--seed-weights {path} does not fit '{self.cfg.model}': {error}") from None
        return model

    def log(self, message: str) -> None:
        if self.ctx.is_main and not self.cfg.quiet:
            print(message, flush=True)

    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Any]:
        """A tqdm bar on rank 0 when stderr is a terminal, plain lines otherwise; nothing when quiet."""
        if self.cfg.quiet or not self.ctx.is_main:
            bar: Any = None
        elif sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        else:
            bar = LineProgress(total, desc)
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()

    def tensorboard(self):
        """The run's TensorBoard writer (rank 0 only; None elsewhere)."""
        if self.writer is None and self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / files.TENSORBOARD))
        return self.writer

    def close(self) -> None:
        latency.release(self)
        self.checkpointer.uninstall()
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
    with session.progress(cfg.steps, "learn") as bar, session.checkpointer.loop():
        result = learn_structure(cfg, ctx, session.data, seed, writer=session.tensorboard(), progress=bar,
                                 checkpointer=session.checkpointer, resume=resume)
    seed = morphnet.remove_gates(seed).cpu()  # FiGS gates served structure learning; the slim net retrains without
    if ctx.is_main:
        files.save_checkpoint(session.out / LEARNED, {"model": seed.state_dict()})
    session.state.finish("learn", result.to_dict())
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
            "structure_file": str(Path(result.structure_file).relative_to(cfg.out)),
        },
        "seconds": {"learn": result.seconds},
    }


def outcome(summary: dict[str, Any]) -> list[str]:
    """Plain warnings about how the run ended: learning far from the target, and a target that
    only the uniform width multiplier reached. Empty when the learned structure landed."""
    target, learned, slim = summary["target"], summary["learned"], summary.get("slim", {})
    cfg = summary["config"]
    notes = []
    error = learned.get("target_error")
    if error is not None and abs(error) > target["tolerance"]:
        direction = "above" if error > 0 else "below"
        advice = ("more --steps (the strength ramps up over the first half of learning) or a higher starting "
                  "--strength" if error > 0 else "a lower starting --strength or more --steps")
        notes.append(f"structure learning ended {abs(error):.0%} {direction} the target after {cfg['steps']} steps "
                     f"(tolerance {target['tolerance']:.0%}); try {advice}")
        if slim.get("width_multiplier") is not None:
            notes.append(f"the slim network reaches the target only through the uniform width multiplier "
                         f"(x{slim['width_multiplier']:.3f} on every layer), not through learned widths")
    notes += latency.notes(summary)
    return notes


def reduction(summary: dict[str, Any]) -> dict[str, float] | None:
    """How the seed's cost became the slim network's: the learned widths' share and the uniform
    width multiplier's share, as ratios that multiply to ``slim / seed``."""
    seed, learned, slim = summary["seed"], summary["learned"], summary.get("slim")
    if not slim or not seed.get("cost") or not learned.get("cost"):
        return None
    return {"learning": learned["cost"] / seed["cost"], "width_multiplier": slim["cost"] / learned["cost"],
            "total": slim["cost"] / seed["cost"]}


def layer_table(seed: nn.Module, slim: nn.Module | None, learned: dict[str, int], example: torch.Tensor) -> list[dict]:
    """Per conv / linear layer: seed, learned and slim widths, seed and slim FLOPs, and the
    layer's share of the slim network's FLOPs (of the seed's when there is no slim network)."""
    seed_rows = [r for r in morphnet.cost_table(seed.cpu(), example) if r.get("channels")]
    slim_rows = {r["name"]: r for r in morphnet.cost_table(slim.cpu(), example)} if slim is not None else {}
    total = sum(r["flops"] for r in (slim_rows.values() if slim is not None else seed_rows)) or 1.0
    table = []
    for row in seed_rows:
        name, thin = row["name"], slim_rows.get(row["name"], {})
        flops = thin.get("flops", 0.0) if slim is not None else row["flops"]
        table.append({"name": name, "seed": row["channels"], "learned": learned.get(name, row["channels"]),
                      "slim": thin.get("channels", 0) if slim is not None else None,
                      "seed_flops": row["flops"], "slim_flops": thin.get("flops", 0.0) if slim is not None else None,
                      "share": flops / total})
    return table


def _block_of(module: str, attention: list[str], regularized: list[str]) -> tuple[str, list[str]]:
    """The block of attention ``module``: its closest ancestor that holds a regularized layer outside
    the module (the MLP of a ViT / BERT block), without holding another attention module; and
    those layers. (The parent and no layers when there is none.)"""

    def inside(name: str, outer: str) -> bool:
        return outer == "" or name.startswith(outer + ".")

    parts = module.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        block = ".".join(parts[:depth])
        if any(inside(other, block) for other in attention if other != module):
            break
        layers = [n for n in regularized if inside(n, block) and n != module and not inside(n, module)]
        if layers:
            return block, layers
    return ".".join(parts[:-1]), []


def attention_table(seed: nn.Module, learned: nn.Module | None, slim: nn.Module | None, seed_widths: dict[str, int],
                    learned_counts: dict[str, int], slim_counts: dict[str, int] | None) -> list[dict]:
    """Per attention module (any module with a head count, see ``morphnet.surgery.attention.head_counts``):
    its block, head width, seed / learned / slim head counts and the widths of the block's other
    regularized layers (its MLP). The counts are read from the models themselves (the seed, the
    learned structure rebuilt, the slim model). Empty for a model without attention."""
    seed_heads = head_counts(seed)
    if not seed_heads:
        return []
    learned_heads = head_counts(learned) if learned is not None else {}
    slim_heads = head_counts(slim) if slim is not None else {}
    table = []
    for module, (heads, head_dim) in seed_heads.items():
        block, layers = _block_of(module, list(seed_heads), list(seed_widths))
        table.append({
            "module": module, "block": block, "head_dim": head_dim, "seed": heads,
            "learned": learned_heads.get(module, (None,))[0], "slim": slim_heads.get(module, (None,))[0],
            "mlp": [{"name": name[len(block) + 1:] if block else name, "seed": seed_widths[name],
                     "learned": learned_counts.get(name, seed_widths[name]),
                     "slim": None if slim_counts is None else slim_counts.get(name, seed_widths[name])}
                    for name in layers],
        })
    return table


def _learned_model(seed: nn.Module, counts: dict[str, int], example: torch.Tensor,
                   slim: nn.Module | None = None, slim_counts: dict[str, int] | None = None) -> nn.Module | None:
    """The seed rebuilt with the learned ``counts`` (the slim model when it has them), for reading its
    head counts; None for a model without attention (nothing to read, so nothing rebuilt)."""
    if not head_counts(seed):
        return None
    if slim is not None and slim_counts == counts:
        return slim
    with torch.random.fork_rng(devices=[]):  # its fresh weights must not shift the run's random stream
        return morphnet.apply_structure(seed, counts, example)


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

    def build(budget: float | None, tolerance: float | None = 0.01) -> Rebuilt:
        torch.manual_seed(cfg.seed + 1)
        return rebuild(seed, counts, session.example, resource=cfg.target, budget=budget,
                       hardware=cfg.hardware, round_to=cfg.round_to, tolerance=tolerance)

    try:
        rebuilt = build(budget)
    except ValueError as error:
        if not trim:
            raise
        # widths too coarse to land within 1% (whole heads, rounding): the closest multiplier is still
        # nearer the target than the untrimmed learned widths, which may be far off it
        session.log(f"closest width multiplier taken: {error}")
        rebuilt = build(budget, tolerance=None)
    if budget is None and not cfg.round_to and learned_cost is not None:
        predicted = learned_cost
    else:
        predicted = float(morphnet.compute_cost(rebuilt.model, session.example, resource=cfg.target,
                                                hardware=cfg.hardware))
    if rebuilt.width_multiplier is not None:
        session.log(f"uniform width multiplier {rebuilt.width_multiplier:.4f} to reach "
                    f"{format_number(budget)} {UNITS[cfg.target]}")
    return rebuilt, predicted


def keep_weights_stage(session: Session, learned: nn.Module) -> tuple[Rebuilt, float]:
    """With ``--finetune``: the slim network keeps the learned network's surviving weights and
    BatchNorm statistics (the channels alive at the end of learning; no width multiplier, which
    would need new weights). Returns it with its predicted cost."""
    cfg = session.cfg
    learned = learned.cpu()
    reg = make_regularizer(cfg.regularizer, cfg.target, learned, session.example, threshold=cfg.threshold,
                           hardware=cfg.hardware, min_layer_fraction=cfg.min_layer_fraction)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    model = morphnet.apply_structure(learned, reg, session.example, keep_weights=True)
    return Rebuilt(model=model, counts=counts, width_multiplier=None), float(reg.get_cost())


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
    stats = _measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
    session.log(f"training the seed shrunk uniformly (x{rebuilt.width_multiplier:.3f}) to the slim cost, for comparison")
    accuracy, seconds = retrain_stage(session, rebuilt.model, "retrain_uniform", history)
    return {**stats, "accuracy": accuracy, "widths": rebuilt.counts, "width_multiplier": rebuilt.width_multiplier}, seconds


def finish(session: Session, summary: dict, history: dict) -> dict:
    """Write summary.json, history.json, plots and report.html (rank 0); print the summary."""
    summary["seconds"]["total"] = sum(summary["seconds"].values())
    summary["reduction"] = reduction(summary)
    summary["warnings"] = outcome(summary)
    summary["input"] = {"data": session.data.name, "shape": list(session.data.input_shape),
                        "num_classes": session.data.num_classes, "seed_kwargs": session.seed_kwargs}
    if session.ctx.is_main:
        files.write_json(session.out / files.SUMMARY, summary)
        files.write_json(session.out / files.HISTORY, history)
        write_report(session.out)
        print(format_summary(summary, session.out), flush=True)
    return summary


def _mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    return "resume" if resume else "overwrite" if overwrite else "new"


def run_pipeline(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Learn the structure, rebuild, retrain slim and seed with the same recipe, evaluate, report.

    ``cfg.out`` must not hold a run unless ``resume`` (continue it from its last checkpoint) or
    ``overwrite`` (replace it). Returns the summary (also written to ``cfg.out/summary.json``).
    """
    session = Session(cfg, _mode(resume, overwrite))
    try:
        latency.prepare(session)
        seed, result = learn_stage(session)
        seed_stats = _measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        summary = learn_summary(cfg, session.ctx, result, seed_stats)
        history: dict[str, Any] = {"learn": result.history}
        start = time.perf_counter()
        if cfg.finetune:
            rebuilt, predicted = keep_weights_stage(session, seed)
        else:
            rebuilt, predicted = rebuild_stage(session, seed, result.chosen.counts, learned_cost=result.chosen.cost,
                                               seed_cost=result.seed_cost, target_cost=result.target_cost)
        slim_stats = _measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
        learned_counts = rebuilt.counts if cfg.finetune else result.chosen.counts
        summary["layers"] = layer_table(seed, copy.deepcopy(rebuilt.model), learned_counts, session.example)
        summary["attention"] = attention_table(
            seed, _learned_model(seed, learned_counts, session.example, rebuilt.model, rebuilt.counts), rebuilt.model,
            result.seed_widths, learned_counts, rebuilt.counts)
        summary["seconds"]["rebuild"] = time.perf_counter() - start
        summary["slim"] = {**slim_stats, "predicted_cost": predicted, "widths": rebuilt.counts,
                           "width_multiplier": rebuilt.width_multiplier, "dir": files.SLIM,
                           "training": (f"fine-tuned {cfg.retrain_steps} steps from the learned network's kept "
                                        "weights" if cfg.finetune else f"retrained {cfg.retrain_steps} steps from "
                                        "scratch")}
        if result.target_cost is not None:
            summary["slim"]["target_error"] = slim_stats["cost"] / result.target_cost - 1
        session.log("fine-tuning the slim network from its kept weights" if cfg.finetune
                    else "retraining the slim network from scratch")
        summary["slim"]["accuracy"], summary["seconds"]["retrain_slim"] = retrain_stage(
            session, rebuilt.model, "retrain_slim", history,
            save=lambda model: morphnet.save_slim(session.out / files.SLIM, model.cpu(), rebuilt.counts),
            lr=(cfg.finetune_lr or cfg.retrain_lr / 5) if cfg.finetune else None)
        summary["seed"]["accuracy"] = None
        if cfg.seed_weights:
            session.log("measuring the seed network with the given weights (--seed-weights), for comparison")
            summary["seed"]["accuracy"] = evaluate(session.start_seed().to(session.ctx.device), session.data.test,
                                                   session.ctx.device)
            summary["seed"]["training"] = f"as given ({cfg.seed_weights})"
        elif cfg.baseline:
            session.log("training the seed network with the same recipe, for comparison")
            baseline = session.new_seed()
            summary["seed"]["accuracy"], summary["seconds"]["retrain_seed"] = retrain_stage(
                session, baseline, "retrain_seed", history,
                save=lambda model: files.save_checkpoint(session.out / files.CHECKPOINTS / "seed.pt",
                                                         {"model": model.state_dict()}))
            summary["seed"]["training"] = f"trained {cfg.retrain_steps} steps from scratch"
        if cfg.uniform_baseline:
            summary["uniform"], summary["seconds"]["retrain_uniform"] = uniform_stage(
                session, result.seed_widths, slim_stats["cost"], history)
        summary["latency"] = latency.measure_run(session, summary, result.seed_widths, rebuilt.model)
        return finish(session, summary, history)
    finally:
        session.close()


def learn_only(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Structure learning alone (``morphnet learn``): structures, checkpoint, summary, plots.
    ``resume`` and ``overwrite`` as in :func:`run_pipeline`."""
    session = Session(cfg, _mode(resume, overwrite))
    try:
        latency.prepare(session)
        seed, result = learn_stage(session)
        seed_stats = _measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        summary = learn_summary(cfg, session.ctx, result, seed_stats)
        summary["layers"] = layer_table(seed, None, result.chosen.counts, session.example)
        summary["attention"] = attention_table(seed, _learned_model(seed, result.chosen.counts, session.example), None,
                                               result.seed_widths, result.chosen.counts, None)
        return finish(session, summary, {"learn": result.history})
    finally:
        session.close()


def rebuild_only(cfg: RunConfig, structure: str | Path | None = None, *, retrain: bool = False,
                 slim_dir: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``morphnet rebuild``: build the slim network from a structure file (default: the latest in
    ``cfg.out``), optionally expanded to ``cfg.expand_to``; save it, and with ``retrain`` train it
    from scratch and evaluate it.

    The slim model goes to ``cfg.out/<slim_dir>`` (default: ``slim`` or, when taken, the next free
    ``slim_N``), with ``rebuild.json`` describing it; an existing folder is replaced only with
    ``overwrite``, and the run's summary then records that its slim model was replaced.
    """
    out = Path(cfg.out)
    if structure is None:
        structure = files.latest_structure(out)
        if structure is None:
            raise FileNotFoundError(
                f"no learned_structure/alive_*.json in '{cfg.out}'; run `morphnet learn --out {cfg.out}` "
                "first or pass --structure FILE"
            )
    counts = load_structure(structure)
    name = slim_dir or files.new_slim_dir(out)
    if Path(name).name != name or name in files.RUN_FILES and name != files.SLIM:
        raise ValueError(f"--slim-dir must be a plain folder name other than the run's own files, got '{name}'")
    if (out / name).exists() and not overwrite:
        raise files.RunExists(f"'{out / name}' already exists; pass --overwrite to replace it, or another --slim-dir")
    session = Session(cfg, "reuse")
    try:
        latency.prepare(session)
        seed = session.new_seed()
        seed_stats = _measure(session.new_seed(), session.example, cfg.target, cfg.hardware)
        rebuilt, predicted = rebuild_stage(session, seed, counts, learned_cost=None,
                                           seed_cost=seed_stats["cost"], target_cost=None)
        slim_stats = _measure(copy.deepcopy(rebuilt.model), session.example, cfg.target, cfg.hardware)
        channels = {row["name"]: row["channels"] for row in morphnet.cost_table(seed, session.example)}
        seed_widths = {n: channels[n] for n in rebuilt.counts}
        attention = attention_table(seed, _learned_model(seed, counts, session.example, rebuilt.model, rebuilt.counts),
                                    rebuilt.model, seed_widths, counts, rebuilt.counts)
        summary = {
            "structure_file": str(structure), "seed": seed_stats, "config": cfg.to_dict(),
            "input": {"data": session.data.name, "shape": list(session.data.input_shape),
                      "num_classes": session.data.num_classes, "seed_kwargs": session.seed_kwargs},
            "slim": {**slim_stats, "predicted_cost": predicted, "widths": rebuilt.counts,
                     "width_multiplier": rebuilt.width_multiplier, "dir": name},
            "attention": attention,
        }
        if retrain:
            summary["slim"]["accuracy"], _ = retrain_stage(session, rebuilt.model, "retrain_slim", {})
        if session.ctx.is_main:
            morphnet.save_slim(out / name, rebuilt.model.cpu(), rebuilt.counts)
            files.write_json(out / name / files.REBUILD_SUMMARY, summary)
            _note_replaced_slim(out, name)
            expanded = rebuilt.counts if rebuilt.counts != counts else None
            print(format_widths(seed_widths, counts, expanded), flush=True)
            if attention:  # the table `morphnet run` prints (seed -> slim heads per block)
                print(format_attention({"attention": attention}), flush=True)
            print(f"seed {format_number(seed_stats['flops'])} FLOPs, {format_number(seed_stats['params'])} params -> "
                  f"slim {format_number(slim_stats['flops'])} FLOPs (counted "
                  f"{format_number(slim_stats['flops_counted'])}), {format_number(slim_stats['params'])} params; "
                  f"saved to {out / name}", flush=True)
            if "accuracy" in summary["slim"]:
                print(f"slim test accuracy after retraining: {summary['slim']['accuracy']:.2%}", flush=True)
        return summary
    finally:
        session.close()


def _note_replaced_slim(out: Path, name: str) -> None:
    """When ``rebuild --overwrite`` replaced the slim folder a run's summary describes, say so in
    the summary and the report instead of leaving figures that no longer match the files."""
    summary_file = out / files.SUMMARY
    if not summary_file.is_file():
        return
    summary = files.read_json(summary_file)
    if summary.get("slim", {}).get("dir") == name:
        summary["slim"]["replaced_by"] = f"{name}/{files.REBUILD_SUMMARY}"
        files.write_json(summary_file, summary)
        write_report(out)


def cost_report(cfg: RunConfig, structure: str | Path | None = None) -> tuple[list[dict], str]:
    """``morphnet cost``: the per-layer table of the seed, or of the slim network for
    ``structure``, and a line saying what it was measured on (input, data, latency hardware)."""
    data, kwargs = prepare_model_and_data(cfg, log=lambda message: print(message, file=sys.stderr))
    torch.manual_seed(cfg.seed)
    model = create_seed(cfg.model, num_classes=data.num_classes, in_channels=data.input_shape[0], **kwargs)
    example = data.example_inputs(1)
    if structure is not None:
        model = morphnet.apply_structure(model, load_structure(structure), example)
    hardware, latency_note = latency.cost_hardware(cfg, model, example)
    rows = morphnet.cost_table(model, example, hardware=hardware)
    header = (f"{cfg.model}{' with ' + str(structure) if structure else ''}: one "
              f"{'x'.join(map(str, example.shape[1:]))} input of {data.name} (batch 1); {latency_note}")
    return rows, header


def cost_only(cfg: RunConfig, structure: str | Path | None = None) -> list[dict]:
    """``morphnet cost``'s rows: the per-layer table of the seed, or of the slim network for ``structure``."""
    return cost_report(cfg, structure)[0]
