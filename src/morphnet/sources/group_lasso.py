"""Group-lasso source: the norm of each output channel's weights of conv / linear layers.

norm = l1_fraction * mean|w| + (1 - l1_fraction) * sqrt(mean(w ** 2)) over the weights of
one output channel; alive = norm > threshold, or with ``relative=True`` norm > threshold x the
layer's scale (the root mean square of its channel norms when the source is built), which no
channel of a freshly initialized layer is below, whatever the initialization's scale (a fixed
1e-2 marked half of mobilenet_v3_small's classifier, initialized with std 0.01, dead before
training). The ``morphnet`` pipeline's default is relative, 0.1. A channel whose bias is above
the same limit is alive too: rows of zeros still output their bias, a constant the next layer
reads, so such a channel is not dead; the bias is therefore part of the channel's norm (the
mean runs over the row and its bias) and shrinks with it (``penalize_bias=False``: weights
only). The rows of one channel group (an attention head's q, k and v rows, the members of a
residual group) combine by root mean square: one group-lasso norm. Zero rows are evidence only for the layer's own
output: a conv followed by a BatchNorm outputs ``beta - gamma * mean / std`` there, so groups
read through a BatchNorm are not regularized by group lasso (use a Gamma regularizer on such
networks). Weights are bucketed by row length (input
channels x kernel area); each bucket costs one ``cat`` and a few element-wise ops, so the
op count grows with the number of distinct row shapes, not with depth (ResNet-18 and
ResNet-152 have the same buckets; DenseNet's growing inputs make more).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphnet.channels.walker import ChannelAnalysis
from morphnet.sources.base import Source, _param


class GroupLassoSource(Source):
    description = "conv / linear weight group norm"
    combine = "rms"  # a group of several rows (an attention head) is one norm over all of them

    def __init__(self, model: nn.Module, analysis: ChannelAnalysis, threshold: float, l1_fraction: float = 0.0,
                 relative: bool = False, penalize_bias: bool = True):
        if not 0.0 <= l1_fraction <= 1.0:
            raise ValueError(f"l1_fraction must be in [0, 1], got {l1_fraction}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.l1_fraction = float(l1_fraction)
        self.penalize_bias = bool(penalize_bias)
        buckets: dict[int, list] = {}
        for name in sorted(analysis.weights):
            info = analysis.weights[name]
            if name in analysis.opaque_states:
                continue
            shape = analysis.graph.state_shapes[name]
            rows = shape[info.out_dim]
            row_len = int(np.prod(shape, dtype=np.int64)) // rows
            buckets.setdefault(row_len, []).append((name, info))
        self.buckets = []
        elements = []
        self.zero_values = []
        # per entry, in the order of values(): its bias as parts (module, attribute, rows), or its row count
        self._biases = []
        for row_len in sorted(buckets):
            # one row per entry of the weight's output dim (per group for transposed grouped convs)
            rows = [(n, i.out_dim, analysis.alignments[(n, i.out_dim)]) for n, i in buckets[row_len]]
            self.buckets.append((row_len, [(_param(model, n), d, len(ids)) for n, d, ids in rows]))
            elements.extend(ids for _, _, ids in rows)
            for n, _, ids in rows:
                parts = _bias_parts(model, analysis, n, len(ids))
                if parts is None:
                    self._biases.append(len(ids))  # a bias that does not follow the rows: never zero evidence
                    continue
                self.zero_values.extend(analysis.zero_points.get(n, []))
                self._biases.append(parts or len(ids))
        self.elements = np.concatenate(elements) if elements else np.zeros(0, np.int64)
        # per bucket: the biases of its entries (in values() order) and each row's bias count
        self._bucket_biases = []
        start = 0
        for row_len, entries in self.buckets:
            specs = self._biases[start:start + len(entries)]
            start += len(entries)
            counts = [np.full(b, 0.0) if isinstance(b, int) else
                      np.concatenate([np.full(rows, float(getattr(m, a).numel() // rows)) for m, a, rows in b])
                      for b in specs]
            has = self.penalize_bias and any(not isinstance(b, int) for b in specs)
            self._bucket_biases.append((specs, torch.as_tensor(np.concatenate(counts) + row_len)) if has else None)
        self._size_cache: dict = {}
        self.limits: torch.Tensor | float = self.threshold
        if relative and elements:
            with torch.no_grad():
                norms = self.values().detach().cpu()
            sizes = [n for _, entries in self.buckets for _, _, n in entries]
            scales = [part.square().mean().sqrt() for part in torch.split(norms, sizes)]
            self.limits = torch.cat([self.threshold * scale.expand(n) for scale, n in zip(scales, sizes)])
        self._zeros: dict = {}

    def values(self) -> torch.Tensor:
        norms = []
        for i, ((row_len, entries), biases) in enumerate(zip(self.buckets, self._bucket_biases)):
            rows = torch.cat([(getattr(m, a) if d == 0 else getattr(m, a).movedim(d, 0)).reshape(n, row_len)
                              for (m, a), d, n in entries])
            extra = size = None
            if biases is not None:  # the bias of each row is part of its group: zero rows with a bias are not dead
                extra = [rows.new_zeros(spec, 1) if isinstance(spec, int) else self._bias_rows(spec).to(rows)
                         for spec in biases[0]]
                size = self._sizes(i, rows)

            def mean(f):
                """f (square or abs) averaged over each row and its biases."""
                if extra is None:
                    return f(rows).mean(1)
                return (f(rows).sum(1) + torch.cat([f(e).sum(1) for e in extra])) / size

            norm = None
            if self.l1_fraction < 1.0:
                norm = (1.0 - self.l1_fraction) * mean(torch.square).clamp_min(1e-30).sqrt()  # no NaN grad at 0
            if self.l1_fraction > 0.0:
                l1 = self.l1_fraction * mean(torch.abs)
                norm = l1 if norm is None else norm + l1
            norms.append(norm)
        return torch.cat(norms)

    def _sizes(self, bucket: int, like: torch.Tensor) -> torch.Tensor:
        """Weights plus biases of every row of ``bucket``, on ``like``'s device (cached: no copy per step)."""
        key = (bucket, like.device, like.dtype)
        if key not in self._size_cache:
            self._size_cache[key] = self._bucket_biases[bucket][1].to(like)
        return self._size_cache[key]

    @staticmethod
    def _bias_rows(parts) -> torch.Tensor:
        """A bias as (rows, biases per row): one, or g for a transposed grouped conv (channel j of every
        group comes from row j); the parts of a joined bias one after the other (one bias per row)."""
        return torch.cat([getattr(module, attr).reshape(-1, rows).t() for module, attr, rows in parts])

    def bias_magnitudes(self, like: torch.Tensor) -> torch.Tensor:
        """|bias| of every entry's output channel (0 for layers without a bias), one ``cat``."""
        parts = []
        for b in self._biases:
            if isinstance(b, int):
                key = (b, like.device, like.dtype)
                if key not in self._zeros:
                    self._zeros[key] = torch.zeros(b, device=like.device, dtype=like.dtype)
                parts.append(self._zeros[key])
            else:
                for module, attr, rows in b:
                    bias = getattr(module, attr).detach().to(like.dtype)
                    parts.append(bias if len(bias) == rows else bias.abs().reshape(-1, rows).amax(0))
        return torch.cat(parts).abs()

    def alive(self, values: torch.Tensor) -> torch.Tensor:
        """Weights above the limit, or a bias above it: zero weights with a bias still output a constant."""
        limits = self.limits
        if isinstance(limits, torch.Tensor) and limits.device != values.device:
            limits = self.limits = limits.to(values.device)
        alive = values > limits
        if any(not isinstance(b, int) for b in self._biases):
            alive = alive | (self.bias_magnitudes(values) > limits)
        return alive

    def alive_ratio(self, values: torch.Tensor) -> torch.Tensor | None:
        """The larger of the norm and the bias over the limit (alive where > 1)."""
        if self.threshold <= 0:
            return None
        limits = self.limits
        if isinstance(limits, torch.Tensor) and limits.device != values.device:
            limits = self.limits = limits.to(values.device)
        ratio = values / limits
        if any(not isinstance(b, int) for b in self._biases):
            ratio = torch.maximum(ratio, self.bias_magnitudes(values) / limits)
        return ratio


def _bias_parts(model: nn.Module, analysis: ChannelAnalysis, weight: str, rows: int) -> list | None:
    """``weight``'s bias as parts (module, attribute, rows it goes with), in row order: [] without a bias,
    None for a bias that does not follow the rows. One bias: a transposed grouped conv's row j makes output
    channel j of every group, so it has g entries per row. A joined bias (``torch.cat((q_bias, k_bias,
    v_bias))``): one entry per row, each part covering its rows."""
    parts = sorted(analysis.bias_parts(weight), key=lambda part: part[1])
    if not parts:
        return []
    shapes = [analysis.graph.state_shapes.get(name) for name, _ in parts]
    if len(parts) == 1:
        if len(shapes[0]) != 1 or shapes[0][0] % rows or parts[0][1] != 0:
            return None
        return [(*_param(model, parts[0][0]), rows)]
    if any(len(shape) != 1 for shape in shapes):
        return None
    ends = np.cumsum([0] + [shape[0] for shape in shapes])
    if [start for _, start in parts] != ends[:-1].tolist() or ends[-1] != rows:
        return None
    return [(*_param(model, name), shape[0]) for (name, _), shape in zip(parts, shapes)]
