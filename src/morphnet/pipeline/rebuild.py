"""Stage 2: rebuild the seed with the learned widths, optionally expanded to a budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import morphnet
from morphnet.export import load_alive_counts
from morphnet.surgery.structure import resolve

# Resources that ``morphnet.find_width_multiplier`` can aim at.
EXPANDABLE = ("flops", "size", "latency")


@dataclass
class Rebuilt:
    """The slim network and the widths it was built with."""

    model: nn.Module
    counts: dict[str, int]
    width_multiplier: float | None


def load_structure(path: str | Path) -> dict[str, int]:
    """Alive counts from an exporter JSON file, with a clear error when it is missing or wrong."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"structure file '{path}' does not exist; run `morphnet learn --out DIR` first")
    return load_alive_counts(path)


def check_structure(seed: nn.Module, path: str | Path, example_inputs: Any) -> dict[str, int]:
    """The counts of structure file ``path``, checked against ``seed``: every name a conv / linear
    layer of it, every count between what the layer cannot lose and its width in the seed (999
    channels for a 32-channel layer is a typo or another model's file; ``--expand-to`` is the way
    to widen a structure). Errors name the file and the layer."""
    counts = load_structure(path)
    s = resolve(seed, Path(path), example_inputs)  # unknown names, negative counts: errors naming the file
    for name in s.names:
        width = s.table.layers[name].width
        if counts[name] > width:
            raise ValueError(f"structure file {path}: '{name}' has {counts[name]} channels, but the layer has {width} "
                             f"in the seed; a learned structure is never wider than its seed (was it learned on "
                             f"another model? --expand-to scales a structure up)")
    return counts


def rebuild(
    seed: nn.Module, counts: dict[str, int], example_inputs: Any, *,
    resource: str = "flops", budget: float | None = None, hardware: str | None = None, round_to: int | None = None,
    tolerance: float | None = 0.01,
) -> Rebuilt:
    """A freshly initialized slim copy of ``seed`` with ``counts`` widths. With ``budget`` (an
    absolute cost in ``resource`` units), every width is first scaled by the one multiplier that
    spends it within ``tolerance`` (MorphNet's uniform expansion; None: the closest the integer
    widths allow); ``round_to`` rounds widths to a multiple."""
    multiplier = None
    if budget is not None:
        if resource not in EXPANDABLE:
            raise ValueError(f"expansion to a budget supports {', '.join(EXPANDABLE)}, not '{resource}'")
        multiplier, counts = morphnet.find_width_multiplier(
            seed, counts, example_inputs, budget, resource=resource, hardware=hardware, round_to=round_to,
            tolerance=tolerance,
        )
    elif round_to:
        counts = morphnet.expand_structure(seed, counts, example_inputs, 1.0, round_to=round_to)
    slim = morphnet.apply_structure(seed, counts, example_inputs)
    return Rebuilt(model=slim, counts=dict(counts), width_multiplier=multiplier)
