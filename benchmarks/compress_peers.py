"""The peers of the compression benchmark (``compress.py``): other tools that prune a trained network
to a FLOP budget, each driven the way its own documentation and reproduce scripts drive it.

Every peer takes the trained seed network and a :class:`PeerTask` and returns the pruned network,
ready for the benchmark's fine-tuning (the same for every arm), and a dict of what it did. The
contract every peer keeps:

- the model it is given is its own copy (it may train and prune it in place);
- it spends at most ``task.sparse_steps`` optimizer steps on training before pruning (0 for one-shot
  pruning), with SGD (momentum 0.9, Nesterov, weight decay 5e-4) at the constant ``task.lr``, on
  ``task.train_batches(task.seed)``; the steps it used are reported as ``info["sparse_steps"]``;
- the pruned network lands within 2% of ``task.budget_flops`` as ``task.count_flops`` counts it
  (FlopCounterMode on one example); where the peer cannot land there, it says so in ``info["note"]``
  and returns what it got (the benchmark reports it, never drops it);
- ``info["function_check"]``: the largest difference between the pruned network's outputs and the
  original network's with the removed channels zeroed, where that can be computed, else a string
  saying why not; ``info["error"]`` when the peer crashed (the benchmark records the crash).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass
class PeerTask:
    """What a peer needs to prune one trained seed network to one budget."""

    example: torch.Tensor  # one example, (1, C, H, W), on the CPU
    budget_flops: float  # the FLOP budget (FlopCounterMode's count of one example, eval mode)
    train_batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # seed -> endless shuffled batches
    val_score: Callable[[nn.Module], float]  # accuracy on a fixed validation subset (scores FastNAS's candidates)
    count_flops: Callable[[nn.Module], int]  # FlopCounterMode on one example, eval mode
    sparse_steps: int  # optimizer steps a peer may spend before pruning (its sparse-learning phase)
    lr: float  # the constant learning rate of that phase
    seed: int
    ignored: list[str] = field(default_factory=list)  # module names whose outputs must keep their width (classifier)
