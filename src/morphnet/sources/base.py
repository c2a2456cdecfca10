"""What every source provides, and how per-channel vectors become per-group vectors.

A source is evidence of death only for the values it zeroes: a group some reader sees
through another path (a raw shortcut around the BatchNorm) is not regularized by it
("uncovered": alive, no penalty; see ``channels/coverage.py``).

Entries of one group combine by the source's ``combine`` mode: ``'amax'`` (element-wise
max; BatchNorm gammas), ``'rms'`` (root mean square; group lasso: a group of k rows, an
attention head's q, k and v rows, is penalized as one group-lasso norm over all its weights,
so every row shrinks at once; with the max only the largest row is pushed, and a head's
other rows stay put) or ``'prob'`` (probabilistic gates: the probability that at least one
entry is on, 1 - prod(1 - p)). Alive is the OR in all three. A module class
marks itself as a probabilistic gate with the class attribute ``gate_logits`` (the name of
its per-channel logits, aligned with the channels it gates); a source that combines by
max cannot share a group with such a gate, because the gate alone can switch the
channels off and the cost would count them alive.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels.walker import ChannelAnalysis
from morphnet.channels.coverage import covered_groups


class Source:
    """A kind of per-channel penalty: values (>= 0) and alive flags for a list of elements.

    Subclasses set ``elements`` (np.int64 element ids, one per entry of ``values()``) and
    ``zero_values`` (the graph values its dead entries make zero: a BatchNorm's output, a
    conv's output, a gate's output), and implement ``values()`` and ``alive(values)``.
    A group is regularized by the source only where those zeros reach every reader of the
    group (``covered_groups``); elsewhere a dead source would not make the channel dead.
    """

    elements: np.ndarray
    zero_values: list[int] = []  # graph values that are zero where the entries are (see channels/coverage.py)
    description: str = "source"
    combine: str = "amax"  # how entries of one group combine: 'amax' (max), 'rms' or 'prob' (1 - prod(1 - p)); alive: OR

    def values(self) -> torch.Tensor:
        raise NotImplementedError

    def alive(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alive_ratio(self, values: torch.Tensor) -> torch.Tensor | None:
        """``values`` relative to the alive threshold (alive exactly where the ratio is > 1), for sources
        whose alive test is a threshold on the values; None for the others (gates)."""
        return None


def _param(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def probabilistic_gates(analysis: ChannelAnalysis) -> dict[str, np.ndarray]:
    """Gate module name -> elements of its logits, for every probabilistic gate the analysis mapped."""
    gates = {}
    for name, kind in analysis.graph.module_types.items():
        attr = getattr(kind, "gate_logits", None)
        state = f"{name}.{attr}" if name else attr
        if attr and (state, 0) in analysis.alignments and state not in analysis.opaque_states:
            gates[name] = analysis.alignments[(state, 0)]
    return gates


class SourceGrouping:
    """Scatters source entries onto channel groups (max or 1 - prod(1 - p); alive = OR)."""

    def __init__(self, analysis: ChannelAnalysis, source: Source):
        if source.combine not in ("amax", "rms", "prob"):
            raise ValueError(f"source combine mode must be 'amax', 'rms' or 'prob', got {source.combine!r}")
        self.num_groups = analysis.num_groups
        self.combine = source.combine
        group = analysis.group_of[source.elements] if len(source.elements) else np.zeros(0, np.int64)
        has_source = np.zeros(analysis.num_groups, dtype=bool)
        has_source[group] = True
        candidates = has_source & ~analysis.fixed_group & ~analysis.blacklisted_group
        covered = covered_groups(analysis, source.zero_values) if candidates.any() else candidates
        if analysis.normalized and candidates.any():
            # prune_normalized=True: removing these is not exact anyway (a LayerNorm's statistics);
            # the rebuild measures the deviation and says so, whatever else reads them
            covered[analysis.group_of[np.concatenate(analysis.normalized)]] = True
        regularized = candidates & covered & ~_sole_groups(analysis)
        if source.combine != "prob":
            _check_no_gates(analysis, source, regularized)
        self.regularized = regularized
        self.uncovered = candidates & ~covered  # reached by the source, but read where it does not zero them
        entries = np.maximum(np.bincount(group, minlength=analysis.num_groups), 1).astype(np.float64)
        self._np = {"group": group.astype(np.int64), "regularized": regularized, "entries": entries}
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
        if self.combine == "prob":  # P(some entry is on); scatter 'prod' has exact gradients at p = 1
            off = torch.ones_like(z).scatter_reduce(0, t["group"], 1.0 - values.to(torch.float64), "prod",
                                                    include_self=True)
            reg_g = 1.0 - off
        elif self.combine == "rms":  # sqrt at 0 has no gradient: clamp (a group of zeros gets none)
            squares = z.scatter_add(0, t["group"], values.to(torch.float64).square())
            reg_g = (squares / t["entries"]).clamp_min(1e-30).sqrt()
        else:
            reg_g = z.scatter_reduce(0, t["group"], values.to(torch.float64), "amax", include_self=True)
        return alive_g, reg_g * t["regularized"]


def _sole_groups(analysis: ChannelAnalysis) -> np.ndarray:
    """Bool per group: the only channel group of some layer's output. The rebuild keeps at least one
    group per layer (here, the whole layer), so such a group cannot die: penalizing it or counting it
    dead would make the predicted cost lie (ShuffleNetV2's shuffled stages are one group)."""
    sole = np.zeros(analysis.num_groups, dtype=bool)
    for info in analysis.weights.values():
        groups = np.unique(analysis.group_of[info.out_ids])
        if len(groups) == 1:
            sole[groups[0]] = True
    return sole


def _check_no_gates(analysis: ChannelAnalysis, source: Source, regularized: np.ndarray) -> None:
    """A max-combined source must not share a regularized group with a probabilistic gate."""
    for name, ids in sorted(probabilistic_gates(analysis).items()):
        if regularized[analysis.group_of[ids]].any():
            raise ValueError(
                f"the {source.description} source and the probabilistic gate '{name}' reach the same channel "
                f"group: the gate can switch channels off that this regularizer counts as alive, and gate "
                f"probabilities do not mix with its values. Use a LogisticSigmoid regularizer on a gated model, "
                f"or fold the gates into the model first (morphnet.fold_gates / morphnet.remove_gates).")
