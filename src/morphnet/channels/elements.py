"""Channel elements and their union-find.

Every channel of every layer slot (a parameter dimension such as a conv's output
channels) is an *element*. Tensors carry arrays of element ids along their channel
dimension. Ops that couple channels record unions; at the end the connected
components are the channel groups that must be pruned together.
"""

from __future__ import annotations

import numpy as np


class ElementTable:
    """Allocates element ids, records unions and fixed elements, computes groups."""

    def __init__(self) -> None:
        self.size = 0
        self._pairs_a: list[np.ndarray] = []
        self._pairs_b: list[np.ndarray] = []
        self._fixed: list[np.ndarray] = []

    def new(self, count: int, *, fixed: bool = False) -> np.ndarray:
        ids = np.arange(self.size, self.size + count, dtype=np.int64)
        self.size += count
        if fixed:
            self._fixed.append(ids)
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise AssertionError(f"union of element arrays of different lengths {a.shape} and {b.shape}")
        self._pairs_a.append(a)
        self._pairs_b.append(b)

    def union_all(self, ids: np.ndarray) -> None:
        """Tie every element of ``ids`` together."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if len(ids) > 1:
            self.union(ids[:-1], ids[1:])

    def fix(self, ids: np.ndarray) -> None:
        self._fixed.append(np.asarray(ids, dtype=np.int64).ravel())

    def components(self) -> tuple[np.ndarray, int, np.ndarray]:
        """Return (group of each element, number of groups, fixed flag per group)."""
        parent = np.arange(self.size, dtype=np.int64)
        if self._pairs_a:
            a = np.concatenate(self._pairs_a)
            b = np.concatenate(self._pairs_b)
            while True:
                pa, pb = parent[a], parent[b]
                lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
                moving = lo != hi
                if not moving.any():
                    break
                np.minimum.at(parent, hi[moving], lo[moving])
                while True:  # pointer jumping until every element points at its root
                    grand = parent[parent]
                    if np.array_equal(grand, parent):
                        break
                    parent = grand
        roots, group_of = np.unique(parent, return_inverse=True)
        fixed = np.zeros(len(roots), dtype=bool)
        if self._fixed:
            fixed[group_of[np.concatenate(self._fixed)]] = True
        return group_of.astype(np.int64), len(roots), fixed
