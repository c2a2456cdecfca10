"""What lets an interrupted run continue: checkpoint timing, RNG state, finished stages, Ctrl-C.

A stage's loop asks :class:`Checkpointer` after every step whether to save (every
``CHECKPOINT_SECONDS``, at steps the stage always saves, and when Ctrl-C asked to stop) and
whether to stop. The first Ctrl-C inside a loop lets the step finish, saves and stops; a second
one stops at once (the run then resumes from the previous checkpoint). Under torchrun, rank 0
decides at logging steps and every rank follows, so all ranks save and stop at the same step.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from morphnet.pipeline import files
from morphnet.pipeline.distributed import DistContext

#: At most this much work (seconds) is lost when a run dies without a chance to save.
CHECKPOINT_SECONDS = 120.0


def rng_state() -> dict[str, Any]:
    """This process's random number generators (torch, CUDA, NumPy, Python)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng(ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective under torchrun)."""
    state = rng_state()
    if not ctx.distributed:
        return [state]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(ctx: DistContext, states: list[dict[str, Any]]) -> None:
    """Put this rank's RNG back where the checkpoint left it."""
    if len(states) != ctx.world_size:
        raise ValueError(f"the checkpoint was written by {len(states)} process(es), this run has {ctx.world_size}; "
                         f"resume with the same number of processes")
    set_rng_state(states[ctx.rank])


class RunState:
    """``checkpoints/state.json``: which stages of a run finished, and what each produced."""

    def __init__(self, run_dir: Path, ctx: DistContext, load: bool):
        self.path = Path(run_dir) / files.STATE
        self.ctx = ctx
        self.stages: dict[str, Any] = files.read_json(self.path)["stages"] if load and self.path.is_file() else {}

    def done(self, stage: str) -> Any:
        """What ``stage`` produced when it finished in an earlier process, else None."""
        return self.stages.get(stage)

    def finish(self, stage: str, result: Any) -> None:
        self.stages[stage] = result
        if self.ctx.is_main:
            files.write_json(self.path, {"stages": self.stages})


class Checkpointer:
    """When a training loop saves its state and when it stops (see the module docstring)."""

    def __init__(self, ctx: DistContext, every_seconds: float = CHECKPOINT_SECONDS, log=print):
        self.ctx = ctx
        self.every = every_seconds
        self.last = time.monotonic()
        self.stop_requested = False
        self.log = log
        self._in_loop = False
        self._previous = None

    def install(self) -> None:
        """Catch Ctrl-C (main thread only; elsewhere Ctrl-C keeps Python's behaviour)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if not self._in_loop or self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print("morphnet: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    @contextmanager
    def loop(self) -> Iterator["Checkpointer"]:
        """The region where the first Ctrl-C waits for the end of the step."""
        self._in_loop, self.last = True, time.monotonic()
        try:
            yield self
        finally:
            self._in_loop = False

    def poll(self, *, always: bool = False, sync_point: bool = True) -> tuple[bool, bool]:
        """(save, stop) at the end of a step. ``always``: this step saves regardless (it must be
        the same on every rank). Under torchrun only ``sync_point`` steps decide (rank 0's view)."""
        if self.ctx.distributed and not sync_point:
            return False, False
        stop = self.stop_requested
        save = always or stop or time.monotonic() - self.last >= self.every
        if self.ctx.distributed:
            save, stop = self.ctx.broadcast((save, stop))
        if save:
            self.last = time.monotonic()
        return save, stop


class Interrupted(KeyboardInterrupt):
    """Raised after a stage saved its state on Ctrl-C; the run resumes with ``--resume``."""
