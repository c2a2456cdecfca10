"""The layout of a run folder, atomic writes (a crash never leaves half a file), and the guard
that keeps a new job from silently replacing a run already in the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from morphnet.export import atomic_write, write_json

__all__ = [
    "RunExists", "atomic_write", "chosen_structure", "clear_run", "latest_structure", "new_slim_dir", "read_json", "refuse_existing_run", "run_entries",
    "save_checkpoint", "load_checkpoint", "structure_path", "write_json", "write_text",
]

CONFIG = "config.json"
SUMMARY = "summary.json"
HISTORY = "history.json"
REPORT = "report.html"
STRUCTURES = "learned_structure"
CHECKPOINTS = "checkpoints"
STATE = "checkpoints/state.json"  # which stages finished, and what they produced
SLIM = "slim"
SLIM_UNIFORM = "slim_uniform"  # the uniform network of the same cost, when trained for comparison
PLOTS = "plots"
TENSORBOARD = "tensorboard"
#: What a run writes into its folder; ``--overwrite`` removes exactly these (and slim_*/ folders).
RUN_FILES = (CONFIG, SUMMARY, HISTORY, REPORT, STRUCTURES, CHECKPOINTS, SLIM, PLOTS, TENSORBOARD)
REBUILD_SUMMARY = "rebuild.json"  # inside a slim folder written by `morphnet rebuild`


class RunExists(ValueError):
    """The run folder already holds a run and the job was not told what to do with it."""


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text))


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` a dict of tensors and numbers, atomically."""
    return atomic_write(path, lambda handle: torch.save(state, handle), binary=True)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by ``save_checkpoint`` (our own file: full unpickling, on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def structure_path(run_dir: Path, step: int) -> Path:
    """Where the exporter writes the alive counts of ``step``."""
    return Path(run_dir) / STRUCTURES / f"alive_{step}.json"


def latest_structure(run_dir: Path) -> Path | None:
    """The structure file of the highest step in ``run_dir``, or None."""
    files = list((Path(run_dir) / STRUCTURES).glob("alive_*.json"))
    numbered = [(int(f.stem.split("_")[1]), f) for f in files if f.stem.split("_")[1].isdigit()]
    return max(numbered)[1] if numbered else None


def chosen_structure(run_dir: Path) -> Path | None:
    """The structure file the run in ``run_dir`` chose (``learned.structure_file`` of its
    summary.json), or None when the folder holds no finished learning."""
    summary = Path(run_dir) / SUMMARY
    if not summary.is_file():
        return None
    name = read_json(summary).get("learned", {}).get("structure_file")
    return Path(run_dir) / name if name else None


def _slim_dirs(run_dir: Path) -> list[Path]:
    """The slim_*/ folders `morphnet rebuild` wrote (they hold a structure file or rebuild.json)."""
    return sorted(p for p in Path(run_dir).glob("slim_*")
                  if p.is_dir() and ((p / "structure.json").is_file() or (p / REBUILD_SUMMARY).is_file()))


def run_entries(run_dir: str | Path) -> list[str]:
    """The names of a run's files and folders present in ``run_dir`` (empty: no run there)."""
    run_dir = Path(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    return present + [p.name for p in _slim_dirs(run_dir)]


def refuse_existing_run(run_dir: str | Path) -> None:
    """Raise ``RunExists`` naming the folder and the choices when ``run_dir`` holds a run."""
    present = run_entries(run_dir)
    if present:
        raise RunExists(
            f"'{run_dir}' already holds a run ({', '.join(present[:4])}{', ...' if len(present) > 4 else ''}); "
            f"pass --resume to continue it, --overwrite to replace it, or another --out"
        )


def clear_run(run_dir: str | Path) -> None:
    """Remove every file and folder a run wrote into ``run_dir`` (other files stay)."""
    run_dir = Path(run_dir)
    for name in run_entries(run_dir):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def new_slim_dir(run_dir: str | Path) -> str:
    """The name of the first slim folder not yet in ``run_dir``: slim, then slim_2, slim_3, ..."""
    run_dir = Path(run_dir)
    if not (run_dir / SLIM).exists():
        return SLIM
    number = 2
    while (run_dir / f"{SLIM}_{number}").exists():
        number += 1
    return f"{SLIM}_{number}"
