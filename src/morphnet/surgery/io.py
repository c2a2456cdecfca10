"""Save and load a slim model without pickles: its structure JSON and its state dict.

A directory holds ``structure.json`` (the alive counts, in the exporter's format) and
``state_dict.pt`` (tensors only, read back with ``torch.load(weights_only=True)``).
Loading rebuilds the architecture from the seed's constructor and the structure, then
loads the weights, so no code is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from morphnet.export import atomic_write, load_alive_counts, write_json
from morphnet.regularizers import NetworkRegularizer
from morphnet.surgery.rebuild import apply_structure

STRUCTURE_FILE = "structure.json"
WEIGHTS_FILE = "state_dict.pt"


def save_slim(path_dir: str | os.PathLike, slim_model: nn.Module, structure) -> Path:
    """Write ``structure`` (counts, a structure file or a regularizer) and ``slim_model``'s weights to ``path_dir``."""
    if isinstance(structure, NetworkRegularizer):
        counts = structure.alive_counts()
    elif isinstance(structure, (str, os.PathLike)):
        counts = load_alive_counts(structure)
    elif isinstance(structure, dict):
        counts = {str(k): int(v) for k, v in structure.items()}
    else:
        raise TypeError(f"structure must be alive counts, a structure file or a network regularizer, "
                        f"got {type(structure).__name__}")
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in slim_model.state_dict().items()}
    atomic_write(path / WEIGHTS_FILE, lambda f: torch.save(state, f), binary=True)
    write_json(path / STRUCTURE_FILE, counts)
    return path


def load_slim(seed_constructor: Callable[[], nn.Module], path_dir: str | os.PathLike, example_inputs) -> nn.Module:
    """Rebuild the slim model saved by ``save_slim`` from a fresh seed and load its weights."""
    path = Path(path_dir)
    for name in (STRUCTURE_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} does not exist; save the slim model with morphnet.save_slim")
    counts = load_alive_counts(path / STRUCTURE_FILE)
    seed = seed_constructor()
    if not isinstance(seed, nn.Module):
        raise TypeError(f"seed_constructor must return an nn.Module, got {type(seed).__name__}")
    slim = apply_structure(seed, counts, example_inputs)
    try:
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path / WEIGHTS_FILE} is not a readable state dict ({e})") from e
    device = next((t.device for t in slim.state_dict().values()), torch.device("cpu"))
    try:
        slim.load_state_dict({k: v.to(device) for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"the weights in {path / WEIGHTS_FILE} do not fit the model that seed_constructor and "
                         f"{path / STRUCTURE_FILE} build; was it saved from this seed? ({e})") from e
    return slim

