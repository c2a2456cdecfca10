"""The network regularizers of the public API."""

from morphnet.regularizers.network import (
    GammaActivationRegularizer, GammaFlopsRegularizer, GammaLatencyRegularizer, GammaModelSizeRegularizer,
    GroupLassoActivationRegularizer, GroupLassoFlopsRegularizer, GroupLassoLatencyRegularizer,
    GroupLassoModelSizeRegularizer, NetworkRegularizer,
)
from morphnet.regularizers.proximal import ProximalStep

__all__ = [
    "NetworkRegularizer", "ProximalStep", "GammaFlopsRegularizer", "GroupLassoFlopsRegularizer", "GammaModelSizeRegularizer",
    "GroupLassoModelSizeRegularizer", "GammaLatencyRegularizer", "GroupLassoLatencyRegularizer",
    "GammaActivationRegularizer", "GroupLassoActivationRegularizer",
]
