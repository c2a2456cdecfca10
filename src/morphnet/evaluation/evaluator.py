"""Batched evaluation of a cost program.

Everything that depends on the model's depth lives in index tensors built once:
``get_cost`` / ``get_regularization_term`` run a fixed sequence of about twenty tensor
ops (gather, index_add, elementwise) whatever the number of layers, with no Python
loop over layers and no host-device sync. Costs are computed in float64 so that they
equal integer FLOP counts exactly; the term is cast back to the sources' dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from morphnet.costs.resources import CostProgram


class CostEvaluator:
    """Evaluates cost and regularization term from per-group alive / regularization vectors."""

    def __init__(self, program: CostProgram, group_of: np.ndarray, num_groups: int):
        self.num_layers = len(program.layer_modules)
        self.layer_modules = list(program.layer_modules)
        self.roofline = program.roofline
        pair_set, pair_group, pair_count = [], [], []
        for s, ids in enumerate(program.sets):
            groups, counts = np.unique(group_of[ids], return_counts=True)
            pair_set.append(np.full(len(groups), s))
            pair_group.append(groups)
            pair_count.append(counts)
        self.null_set = len(program.sets)  # an empty set: A = R = 0
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        self._np = {
            "pair_set": cat(pair_set, np.int64), "pair_group": cat(pair_group, np.int64),
            "pair_count": cat(pair_count, np.float64),
            "b_bucket": np.array([2 * t[0] + t[1] for t in program.bilinear], np.int64),
            "b_coef": np.array([t[2] for t in program.bilinear], np.float64),
            "b_x": np.array([t[3] for t in program.bilinear], np.int64),
            "b_y": np.array([t[4] for t in program.bilinear], np.int64),
            "l_bucket": np.array([2 * t[0] + t[1] for t in program.linear], np.int64),
            "l_coef": np.array([t[2] for t in program.linear], np.float64),
            "l_x": np.array([t[3] if t[3] >= 0 else self.null_set for t in program.linear], np.int64),
            "l_z": np.array([t[4] if t[4] >= 0 else self.null_set for t in program.linear], np.int64),
        }
        const = np.zeros(2 * self.num_layers, np.float64)
        for layer, kind, c in program.const:
            const[2 * layer + kind] += c
        self._np["const"] = const
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = {k: torch.as_tensor(v, device=device) for k, v in self._np.items()}
        return self._cache[device]

    def layer_mask(self, layer_selected: np.ndarray, device: torch.device) -> torch.Tensor:
        key = (layer_selected.tobytes(), device)
        if key not in self._mask_cache:
            self._mask_cache[key] = torch.as_tensor(np.repeat(layer_selected.astype(np.float64), 2), device=device)
        return self._mask_cache[key]

    def evaluate(self, alive: torch.Tensor, reg: torch.Tensor | None, mask: torch.Tensor | None = None):
        """Return (cost, term); ``alive`` and ``reg`` are float64 per-group vectors."""
        t = self.tensors(alive.device)
        n_sets = self.null_set + 1
        if reg is None:
            per_pair = alive[t["pair_group"]] * t["pair_count"]
            a = torch.zeros(n_sets, dtype=alive.dtype, device=alive.device).index_add(0, t["pair_set"], per_pair)
            r = None
        else:
            both = torch.stack([alive, reg], 1)[t["pair_group"]] * t["pair_count"][:, None]
            ar = torch.zeros(n_sets, 2, dtype=alive.dtype, device=alive.device).index_add(0, t["pair_set"], both)
            a, r = ar[:, 0], ar[:, 1]
        buckets = 2 * self.num_layers
        ax, ay = a[t["b_x"]], a[t["b_y"]]
        cost = torch.zeros(buckets, dtype=alive.dtype, device=alive.device)
        cost = cost.index_add(0, t["b_bucket"], t["b_coef"] * ax * ay)
        cost = cost.index_add(0, t["l_bucket"], t["l_coef"] * a[t["l_x"]]) + t["const"]
        term = None
        if r is not None:
            term = torch.zeros(buckets, dtype=alive.dtype, device=alive.device)
            term = term.index_add(0, t["b_bucket"], t["b_coef"] * (ax * r[t["b_y"]] + ay * r[t["b_x"]]))
            term = term.index_add(0, t["l_bucket"], t["l_coef"] * (r[t["l_x"]] + r[t["l_z"]]))
        if mask is not None:
            cost = cost * mask
            term = term * mask if term is not None else None
        if not self.roofline:
            return cost.sum(), (term.sum() if term is not None else None)
        c2 = cost.view(-1, 2)
        total = torch.maximum(c2[:, 0], c2[:, 1]).sum()
        if term is None:
            return total, None
        t2 = term.view(-1, 2)
        return total, torch.where(c2[:, 1] > c2[:, 0], t2[:, 1], t2[:, 0]).sum()
