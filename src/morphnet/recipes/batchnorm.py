"""Re-estimate BatchNorm statistics after channels were removed.

Removing channels changes what every later BatchNorm sees, so the running means and variances the
trained network kept no longer fit. A few hundred forward passes in training mode, with the running
statistics reset and averaged cumulatively, fit them again without touching any weight.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn


def recalibrate_batchnorm(model: nn.Module, batches: Iterator[Any], num_batches: int,
                          forward: Callable[[nn.Module, Any], Any]) -> int:
    """Reset the running statistics of every BatchNorm of ``model`` that tracks them and average them
    over ``num_batches`` batches (``forward(model, batch)`` runs one, in training mode, without
    gradients). Weights, the training flag and each BatchNorm's momentum are restored. Returns the
    number of BatchNorm layers re-estimated (0 when there is none or ``num_batches`` is 0)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    try:
        with torch.no_grad():
            for _ in range(num_batches):
                forward(model, next(batches))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)
