"""``morphnet cost``: the per-layer cost table of a seed network, or of its slim version for a
structure file, on one input of the job's data."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import morphnet
from morphnet.pipeline import latency
from morphnet.pipeline.config import RunConfig
from morphnet.pipeline.rebuild import check_structure
from morphnet.pipeline.session import prepare_model_and_data
from morphnet.seeds import create_seed


def cost_report(cfg: RunConfig, structure: str | Path | None = None) -> tuple[list[dict], str]:
    """``morphnet cost``: the per-layer table of the seed, or of the slim network for
    ``structure``, and a line saying what it was measured on (input, data, latency hardware)."""
    data, kwargs = prepare_model_and_data(cfg, log=lambda message: print(message, file=sys.stderr))
    torch.manual_seed(cfg.seed)
    model = create_seed(cfg.model, num_classes=data.num_classes, in_channels=data.input_shape[0], **kwargs)
    example = data.example_inputs(1)
    if structure is not None:
        model = morphnet.apply_structure(model, check_structure(model, structure, example), example)
    hardware, latency_note = latency.cost_hardware(cfg, model, example)
    rows = morphnet.cost_table(model, example, hardware=hardware)
    header = (f"{cfg.model}{' with ' + str(structure) if structure else ''}: one "
              f"{'x'.join(map(str, example.shape[1:]))} input of {data.name} (batch 1); {latency_note}")
    return rows, header


def cost_only(cfg: RunConfig, structure: str | Path | None = None) -> list[dict]:
    """``morphnet cost``'s rows: the per-layer table of the seed, or of the slim network for ``structure``."""
    return cost_report(cfg, structure)[0]
