"""What every source provides, and how per-channel vectors become per-group vectors."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels.analysis import ChannelAnalysis


class Source:
    """A kind of per-channel penalty: values (>= 0) and alive flags for a list of elements.

    Subclasses set ``elements`` (np.int64 element ids, one per entry of ``values()``)
    and implement ``values()`` and ``alive(values)``.
    """

    elements: np.ndarray
    description: str = "source"
    combine: str = "amax"  # how entries of one group combine: 'amax' (max / OR)

    def values(self) -> torch.Tensor:
        raise NotImplementedError

    def alive(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _param(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


class SourceGrouping:
    """Scatters source entries onto channel groups (element-wise max, alive = OR)."""

    def __init__(self, analysis: ChannelAnalysis, source: Source):
        self.num_groups = analysis.num_groups
        group = analysis.group_of[source.elements] if len(source.elements) else np.zeros(0, np.int64)
        has_source = np.zeros(analysis.num_groups, dtype=bool)
        has_source[group] = True
        regularized = has_source & ~analysis.fixed_group & ~analysis.blacklisted_group
        self.regularized = regularized
        self._np = {"group": group.astype(np.int64), "regularized": regularized}
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def tensors(self, device) -> dict[str, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = {k: torch.as_tensor(v, device=device) for k, v in self._np.items()}
        return self._cache[device]

    def group_vectors(self, values: torch.Tensor, alive: torch.Tensor, with_reg: bool = True):
        """Per-group (alive, reg) as float64; unregularized groups are alive with reg 0."""
        t = self.tensors(values.device)
        z = torch.zeros(self.num_groups, dtype=torch.float64, device=values.device)
        alive_g = z.scatter_reduce(0, t["group"], alive.to(torch.float64), "amax", include_self=True)
        alive_g = torch.where(t["regularized"], alive_g, 1.0)
        if not with_reg:
            return alive_g, None
        reg_g = z.scatter_reduce(0, t["group"], values.to(torch.float64), "amax", include_self=True)
        return alive_g, reg_g * t["regularized"]
