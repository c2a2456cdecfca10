"""Stage 3: per-channel regularization and alive vectors (BatchNorm gamma, group lasso)."""

from morphnet.sources.base import Source, SourceGrouping
from morphnet.sources.gamma import GammaSource
from morphnet.sources.group_lasso import GroupLassoSource

__all__ = ["Source", "SourceGrouping", "GammaSource", "GroupLassoSource"]
