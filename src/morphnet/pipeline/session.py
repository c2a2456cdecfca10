"""A job's session: the checked config, data and seed factory, the process group, and the run
folder it writes into. A folder that already holds a run is never replaced silently: a new job
there needs ``resume`` (continue from the last checkpoint, skipping finished stages) or
``overwrite`` (remove the old run first)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from morphnet.control.strength import unreachable_target
from morphnet.data import DataBundle, load_data
from morphnet.pipeline import distributed, files, latency
from morphnet.pipeline.config import RunConfig
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.progress import progress_bar
from morphnet.pipeline.regularizers import UNITS, make_regularizer
from morphnet.pipeline.resume import Checkpointer, RunState
from morphnet.seeds import create_seed
from morphnet.seeds.registry import takes_image_size

#: How a job treats a run folder that may hold a run: refuse one ("new"), continue it ("resume"),
#: replace it ("overwrite"), or add to it without touching the run's own files ("reuse": rebuild).
MODES = ("new", "resume", "overwrite", "reuse")


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
    A first batch of the training data is decoded. Anything else that does not fit ends in one
    ``ValueError`` that names the option to change."""
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
    data.example_inputs(min(cfg.batch_size, len(data.train)))  # a first batch and a test example decode:
    data.test[0]  # a broken file among them fails now, before the run folder is made
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


def check_target(cfg: RunConfig, seed: nn.Module, example: torch.Tensor) -> None:
    """Refuse a ``--target-cost`` below the smallest cost the seed's structure allows (every layer
    at its ``--min-layer-fraction`` floor, or one channel), naming that minimum and the unit:
    learning toward it would run to the end, kill every channel it may, and miss anyway. A latency
    target on a measured table is checked once the run has measured it (``pipeline/latency.py``):
    measuring it here too would time every op twice."""
    if cfg.target_cost is None or (cfg.target == "latency" and cfg.hardware == "measured"):
        return
    reg = make_regularizer(cfg.regularizer, cfg.target, seed, example, threshold=cfg.threshold,
                           hardware=cfg.hardware, min_layer_fraction=cfg.min_layer_fraction)
    why = unreachable_target(cfg.target_cost, float(reg.get_cost()), reg.minimum_cost(), UNITS[cfg.target],
                             floor=cfg.min_layer_fraction, floor_name="--min-layer-fraction")
    if why is not None:
        raise ValueError(f"--target-cost {why}")


class Session:
    """What every stage needs: the config, the process group, the data, a seed factory, the run
    folder's state and the checkpointer. Nothing is written before the config, the data, the
    model and the target have been checked and the folder's mode (see ``MODES``) allows it."""

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
            if cfg.val_fraction:  # the same draw on every rank and on --resume (seeded by --seed)
                self.data = self.data.with_validation(cfg.val_fraction, cfg.seed)
            if mode == "resume":
                self._check_resumable()
            self.example = self.data.example_inputs(1)
            if mode in ("new", "overwrite"):
                check_target(cfg, self.new_seed(), self.example)
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
        """A progress bar on rank 0 (see ``progress.progress_bar``); nothing when quiet."""
        with progress_bar(total, desc, enabled=not self.cfg.quiet and self.ctx.is_main) as bar:
            yield bar

    def note_resume(self, error: BaseException, command: str) -> None:
        """Say in ``error`` (raised after the run folder was prepared: a broken image found
        mid-run, say) how to go on: the folder holds a run, so the same command again is refused."""
        if self.mode != "reuse":
            note = (f"the run in '{self.out}' stopped there; once that is fixed, `morphnet {command} --resume --out "
                    f"{self.out}` continues it (finished stages are kept), --overwrite starts it again")
            error.__notes__ = [*getattr(error, "__notes__", []), note]

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




def folder_mode(resume: bool, overwrite: bool) -> str:
    """The ``MODES`` entry of a job started with ``--resume`` / ``--overwrite`` (or neither)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run or replace it")
    return "resume" if resume else "overwrite" if overwrite else "new"
