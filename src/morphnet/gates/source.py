"""Gate source: the masks (or probabilities) of every LogisticSigmoidGate, as one vector.

In training mode the mask is recomputed from the logits and the noise the gate drew in its
last forward pass: the same value the network used, with a fresh autograd graph (so the
term can be built before or after the forward pass, or twice). In eval mode it is the
deterministic inference mask (value 1[l > 0], gradient of sigmoid(l / temperature)), so
after training the alive channels are exactly those the gated network uses at inference.
Groups combine as 1 - prod(1 - p); alive is value >= ``alive_threshold``. The vector is a
few ``cat`` and element-wise ops whatever the number of gates.

A ``LogisticSigmoidHeadGate`` contributes one entry per head (its logits are aligned with the
heads' channel groups), so a head's penalty is its probability times the head's cost.

Gate settings (straight-through, soft inference mask, keep-first-channel) are read when the
regularizer is built.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels.walker import ChannelAnalysis
from morphnet.gates.gate import LogisticSigmoidGate, relaxed_mask
from morphnet.sources.base import Source, probabilistic_gates


class LogisticSigmoidSource(Source):
    """Probabilistic gates as MorphNet sources (FiGS)."""

    description = "probabilistic gate (LogisticSigmoidGate)"
    combine = "prob"

    def __init__(self, model: nn.Module, analysis: ChannelAnalysis, *, alive_threshold: float = 0.1,
                 regularize_on_mask: bool = True, mask_as_alive_vector: bool = True):
        if not 0.0 <= alive_threshold <= 1.0:
            raise ValueError(f"alive_threshold must be in [0, 1] (it is compared with masks or probabilities), "
                             f"got {alive_threshold}")
        self.threshold = float(alive_threshold)
        self.regularize_on_mask = bool(regularize_on_mask)
        self.mask_as_alive_vector = bool(mask_as_alive_vector)
        found = probabilistic_gates(analysis)
        self.names = sorted(n for n in found if isinstance(model.get_submodule(n), LogisticSigmoidGate))
        self.gates: list[LogisticSigmoidGate] = [model.get_submodule(n) for n in self.names]
        self.elements = np.concatenate([found[n] for n in self.names]) if self.names else np.zeros(0, np.int64)
        self.zero_values = [v for n in self.names for v in analysis.zero_points.get(f"{n}.logits" if n else "logits", [])]

        def per_entry(flag) -> np.ndarray:
            return np.concatenate([np.full(g.num_logits, flag(g), bool) for g in self.gates]) if self.gates \
                else np.zeros(0, bool)

        first = np.zeros(len(self.elements), bool)
        offsets = np.cumsum([0] + [g.num_logits for g in self.gates[:-1]])
        first[offsets[[g.keep_first_channel_alive for g in self.gates]]] = True
        self._np = {"straight_through": per_entry(lambda g: g.straight_through),
                    "soft": per_entry(lambda g: g.soft_mask_for_inference), "first": first}
        self._cache: dict = {}

    def _tensor(self, key, device) -> torch.Tensor:
        if (key, device) not in self._cache:
            value = self._np[key] if isinstance(key, str) else np.concatenate(
                [np.full(g.num_logits, t, bool) for g, t in zip(self.gates, key)])
            self._cache[(key, device)] = torch.as_tensor(value, device=device)
        return self._cache[(key, device)]

    def _logits(self) -> torch.Tensor:
        return torch.cat([g.logits for g in self.gates])

    def _keep_first(self, v: torch.Tensor) -> torch.Tensor:
        return torch.where(self._tensor("first", v.device), torch.ones_like(v), v)

    def masks(self) -> torch.Tensor:
        """The mask every gate applies now: its last training sample, or its inference mask in eval mode."""
        logits = self._logits()
        dev = logits.device
        modes = tuple(g.training for g in self.gates)
        tau = torch.cat([g.tau.expand(g.num_logits) for g in self.gates])
        if any(modes):
            noise = torch.cat([g.noise for g in self.gates])
            sampled = relaxed_mask(logits, noise, tau, self._tensor("straight_through", dev))
        if not all(modes):
            hard = relaxed_mask(logits, torch.zeros_like(logits), tau, True)
            inference = torch.where(self._tensor("soft", dev), hard * torch.sigmoid(logits), hard)
        if all(modes):
            mask = sampled
        elif not any(modes):
            mask = inference
        else:
            mask = torch.where(self._tensor(modes, dev), sampled, inference)
        return self._keep_first(mask)

    def probabilities(self) -> torch.Tensor:
        return self._keep_first(torch.sigmoid(self._logits()))

    def values(self) -> torch.Tensor:
        return self.masks() if self.regularize_on_mask else self.probabilities()

    def alive(self, values: torch.Tensor) -> torch.Tensor:
        if self.mask_as_alive_vector != self.regularize_on_mask:
            with torch.no_grad():
                values = self.masks() if self.mask_as_alive_vector else self.probabilities()
        return values >= self.threshold
