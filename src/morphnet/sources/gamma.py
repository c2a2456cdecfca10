"""BatchNorm-gamma source: |gamma| is the regularization vector, alive = |gamma| > threshold."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels.analysis import ChannelAnalysis
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

    def values(self) -> torch.Tensor:
        return torch.cat([getattr(m, attr).reshape(-1) for m, attr in self._owners]).abs()

    def alive(self, values: torch.Tensor) -> torch.Tensor:
        return values > self.threshold
