"""Recipes on top of the public API: whole jobs in one call (compressing a trained network)."""

from morphnet.recipes.batchnorm import recalibrate_batchnorm
from morphnet.recipes.compress import compress

__all__ = ["compress", "recalibrate_batchnorm"]
