"""The layout of a run folder, and atomic writes (a crash never leaves half a file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CONFIG = "config.json"
SUMMARY = "summary.json"
HISTORY = "history.json"
STRUCTURES = "learned_structure"
CHECKPOINTS = "checkpoints"
SLIM = "slim"
TENSORBOARD = "tensorboard"


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON with sorted keys, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return _atomic(path, lambda handle: handle.write(text.encode()))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` a dict of tensors and numbers, atomically."""
    return _atomic(path, lambda handle: torch.save(state, handle))


def structure_path(run_dir: Path, step: int) -> Path:
    """Where the exporter writes the alive counts of ``step``."""
    return Path(run_dir) / STRUCTURES / f"alive_{step}.json"


def latest_structure(run_dir: Path) -> Path | None:
    """The structure file of the highest step in ``run_dir``, or None."""
    files = list((Path(run_dir) / STRUCTURES).glob("alive_*.json"))
    numbered = [(int(f.stem.split("_")[1]), f) for f in files if f.stem.split("_")[1].isdigit()]
    return max(numbered)[1] if numbered else None
