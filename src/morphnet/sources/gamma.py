"""BatchNorm-gamma source: |gamma| is the regularization vector, alive = |gamma| > threshold.

A small gamma is evidence only for what flows out of that BatchNorm: the channel is dead
where every reader of its group reads it through one of the group's BatchNorms (a
post-activation conv-BN pair, a pre-activation stack whose raw stream only BatchNorms and
adds read), not where a reader sees the raw value (MaxViT's MBConv shortcut). As in the
original MorphNet, a dead channel stands for a zero output: its beta is dropped with it,
so ``apply_structure(..., keep_weights=True)`` is exact when dead channels' betas are zero
(a non-zero beta is a constant the rebuild does not fold; it warns about them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels.walker import ChannelAnalysis
from morphnet.sources.base import Source, _param


class GammaSource(Source):
    """L1 on BatchNorm scales; the whole vector is one ``cat`` and one ``abs``."""

    description = "BatchNorm scale (gamma)"

    def __init__(self, model: nn.Module, analysis: ChannelAnalysis, threshold: float):
        if threshold < 0:
            raise ValueError(f"gamma_threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        names = sorted(n for n in analysis.gamma_sources if n not in analysis.opaque_states)
        self.names = names
        self._owners = [_param(model, n) for n in names]
        self.elements = (np.concatenate([analysis.gamma_sources[n] for n in names])
                         if names else np.zeros(0, np.int64))
        self.zero_values = [v for n in names for v in analysis.zero_points.get(n, [])]

    def values(self) -> torch.Tensor:
        return torch.cat([getattr(m, attr).reshape(-1) for m, attr in self._owners]).abs()

    def alive(self, values: torch.Tensor) -> torch.Tensor:
        return values > self.threshold

    def alive_ratio(self, values: torch.Tensor) -> torch.Tensor | None:
        return values / self.threshold if self.threshold > 0 else None
