"""The layout of a run folder, and atomic writes (a crash never leaves half a file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from morphnet.export import atomic_write, write_json

__all__ = ["atomic_write", "write_json", "read_json", "save_checkpoint", "structure_path", "latest_structure"]

CONFIG = "config.json"
SUMMARY = "summary.json"
HISTORY = "history.json"
STRUCTURES = "learned_structure"
CHECKPOINTS = "checkpoints"
SLIM = "slim"
TENSORBOARD = "tensorboard"


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` a dict of tensors and numbers, atomically."""
    return atomic_write(path, lambda handle: torch.save(state, handle), binary=True)


def structure_path(run_dir: Path, step: int) -> Path:
    """Where the exporter writes the alive counts of ``step``."""
    return Path(run_dir) / STRUCTURES / f"alive_{step}.json"


def latest_structure(run_dir: Path) -> Path | None:
    """The structure file of the highest step in ``run_dir``, or None."""
    files = list((Path(run_dir) / STRUCTURES).glob("alive_*.json"))
    numbered = [(int(f.stem.split("_")[1]), f) for f in files if f.stem.split("_")[1].isdigit()]
    return max(numbered)[1] if numbered else None
