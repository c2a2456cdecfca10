"""The network regularizers of the public API."""

from morphnet.regularizers.network import (
    GammaActivationRegularizer, GammaFlopsRegularizer, GammaLatencyRegularizer, GammaModelSizeRegularizer,
    GroupLassoActivationRegularizer, GroupLassoFlopsRegularizer, GroupLassoLatencyRegularizer,
    GroupLassoModelSizeRegularizer, NetworkRegularizer,
)

__all__ = [
    "NetworkRegularizer", "GammaFlopsRegularizer", "GroupLassoFlopsRegularizer", "GammaModelSizeRegularizer",
    "GroupLassoModelSizeRegularizer", "GammaLatencyRegularizer", "GroupLassoLatencyRegularizer",
    "GammaActivationRegularizer", "GroupLassoActivationRegularizer",
]
