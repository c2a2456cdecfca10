"""A per-layer floor: no layer is proposed narrower than a fraction of its width.

Without it a cost-weighted penalty can thin a block-internal convolution to 1-5 channels while a
residual stream next to it stays wide (a residual group has several BatchNorm scales, a
bottleneck one; see docs/benchmarks.md). With ``min_layer_fraction=f`` the channel groups with
the largest values in each conv / linear layer, enough to cover ceil(f x width) of its output
channels, carry no penalty and count as alive in the cost and the exported structure; the other
channels pay for them. The floor only ever keeps channels, so it cannot make a pruned model
compute something else.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class LayerFloor:
    """Protects the top groups of every listed layer: a fixed number of batched ops per call."""

    def __init__(self, layers: list[tuple[str, np.ndarray]], regularized: np.ndarray, fraction: float):
        layer_ids, groups, channels, need = [], [], [], []
        for layer, (_, group_of_channel) in enumerate(layers):
            ids, counts = np.unique(group_of_channel, return_counts=True)
            free = regularized[ids]
            fixed_channels = int(counts[~free].sum())
            need.append(max(0, math.ceil(fraction * len(group_of_channel)) - fixed_channels))
            layer_ids += [layer] * int(free.sum())
            groups += ids[free].tolist()
            channels += counts[free].tolist()
        self._np = {"layer": np.asarray(layer_ids, np.int64), "group": np.asarray(groups, np.int64),
                    "channels": np.asarray(channels, np.int64), "need": np.asarray(need, np.int64)}
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _tensors(self, device) -> dict[str, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = {k: torch.as_tensor(v, device=device) for k, v in self._np.items()}
        return self._cache[device]

    def protected(self, reg_g: torch.Tensor) -> torch.Tensor:
        """Bool per group: kept by the floor of some layer (largest values first)."""
        t = self._tensors(reg_g.device)
        protect = torch.zeros(reg_g.shape[0], dtype=torch.bool, device=reg_g.device)
        if t["group"].numel() == 0:
            return protect
        order = torch.argsort(reg_g.detach()[t["group"]], descending=True, stable=True)
        order = order[torch.argsort(t["layer"][order], stable=True)]  # by layer, largest first within
        layer, channels = t["layer"][order], t["channels"][order]
        total = torch.cumsum(channels, 0)
        first = torch.searchsorted(layer, layer)  # index of each entry's layer's first entry
        before = total - channels - (total[first] - channels[first])  # channels ahead of it in its layer
        keep = before < t["need"][layer]
        protect[t["group"][order][keep]] = True
        return protect

    def __call__(self, alive_g: torch.Tensor, reg_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        protect = self.protected(reg_g)
        return torch.where(protect, 1.0, alive_g), torch.where(protect, 0.0, reg_g)
