"""Map a channel dimension (and parameter dimensions) through view / reshape."""

from __future__ import annotations

import math

import numpy as np

_MAX_EXPANDED = 20_000_000  # elements materialized when following a channel through a merge


def view_groups(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape into groups of consecutive dims with equal products."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        ga, gb = [i], [j]
        pa, pb = old[i], new[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb and i < len(old):
                ga.append(i)
                pa *= old[i]
                i += 1
            elif j < len(new):
                gb.append(j)
                pb *= new[j]
                j += 1
            else:
                break
        groups.append((ga, gb))
    if groups:
        groups[-1][0].extend(range(i, len(old)))
        groups[-1][1].extend(range(j, len(new)))
    elif old or new:
        groups.append((list(range(len(old))), list(range(len(new)))))
    return groups


def map_channel_through_view(old, new, dim: int, ids: np.ndarray):
    """Return (new_dim, new_ids), or None when the view splits the channel dim.

    Merging the channel dim with others (flatten) is exact: each channel then owns
    several consecutive (or strided) entries of the merged dim, which repeat its id.
    """
    for ga, gb in view_groups(tuple(old), tuple(new)):
        if dim not in ga:
            continue
        sizes = [old[d] for d in ga]
        if math.prod(sizes) > _MAX_EXPANDED:
            return None
        shape = [1] * len(ga)
        shape[ga.index(dim)] = len(ids)
        full = np.broadcast_to(ids.reshape(shape), sizes).reshape([new[d] for d in gb])
        varying = [k for k in range(len(gb)) if full.shape[k] > 1 and not _constant_along(full, k)]
        if len(varying) == 1:
            k = varying[0]
            index = [0] * len(gb)
            index[k] = slice(None)
            return gb[k], np.ascontiguousarray(full[tuple(index)])
        return None
    return None


def split_channel_through_view(old, new, dim: int, ids: np.ndarray, head_dim: int | None = None):
    """Follow a view that splits the channel dim into several dims (heads, groups).

    Returns ``(carrier, carrier_ids, ties)`` or None when the view does not split the
    channel dim. Batch dims merged into the split (``[L, B, C] -> [L, B * heads, d]``)
    repeat the ids of the carrier. One new dim, the
    *carrier*, keeps the channel ids; every other dim of the split keeps its size, so
    the entries along them are tied (``ties``: pairs of id arrays to unite). The carrier
    is the head dim (the one before an innermost dim of ``head_dim`` entries) when
    ``head_dim`` is given and matches: a head is pruned as a whole. Otherwise it is the
    innermost dim (``view(n, groups, C // groups)``: the group count is kept and every
    group keeps the same positions, as in a grouped convolution).
    """
    for ga, gb in view_groups(tuple(old), tuple(new)):
        if dim not in ga:
            continue
        old_sizes = [old[d] for d in ga]
        sizes = [new[d] for d in gb]
        if math.prod(old_sizes) > _MAX_EXPANDED:
            return None
        shape = [1] * len(ga)
        shape[ga.index(dim)] = len(ids)
        full = np.broadcast_to(ids.reshape(shape), old_sizes).reshape(sizes)
        big = [k for k, s in enumerate(sizes) if s > 1 and not _constant_along(full, k)]
        if len(big) < 2:
            return None
        carrier = big[-1]
        if head_dim is not None and sizes[big[-1]] == head_dim:
            carrier = big[-2]
        full = np.moveaxis(full, carrier, 0).reshape(sizes[carrier], -1)
        carrier_ids = np.ascontiguousarray(full[:, 0])
        rest = full.shape[1]
        ties = (np.repeat(carrier_ids, rest), full.ravel())
        return gb[carrier], carrier_ids, ties
    return None


def _constant_along(a: np.ndarray, axis: int) -> bool:
    return bool(np.all(a == np.take(a, [0], axis=axis)))


def map_state_dims_through_view(old, new, dims: tuple):
    """Map the parameter dims of a state view through a reshape; None if mixed."""
    out: list = [None] * len(new)
    for ga, gb in view_groups(tuple(old), tuple(new)):
        big_a = [d for d in ga if old[d] != 1]
        big_b = [d for d in gb if new[d] != 1]
        mapped = [dims[d] for d in big_a if dims[d] is not None]
        if not mapped:
            continue
        if len(big_a) == 1 and len(big_b) == 1 and old[big_a[0]] == new[big_b[0]]:
            out[big_b[0]] = dims[big_a[0]]
        else:
            return None
    return tuple(out)
