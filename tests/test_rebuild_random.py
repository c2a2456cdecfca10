"""Property test: random small nets round-trip through rebuild.

Nets are chains of conv / residual / concat / depthwise (multiplier 1 or 2) / grouped blocks with
a pooled or flattened linear head, with BatchNorm (Gamma source) or without (GroupLasso, biases).
Killing random channel groups exactly and rebuilding with keep_weights must give the same outputs
and the predicted FLOPs; counts-only and expanded rebuilds must give the widths asked for.
"""

import warnings

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import morphnet
from morphnet.surgery.structure import LayerTable
from nets import assert_most_examples_pruned, counted_flops, weight_count
from test_rebuild_zoo import kill_quarter

KINDS = ("conv", "residual", "concat", "depthwise", "grouped")


class Unit(nn.Module):
    """conv (+ BN) + ReLU."""

    def __init__(self, c_in, c_out, k=3, groups=1, bn=True, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=not bn)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.relu = relu

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.relu else y


class RandomBlock(nn.Module):
    def __init__(self, kind, c_in, width, mult, bn):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.a = Unit(c_in, width, bn=bn)
        elif kind == "residual":
            self.a = Unit(c_in, width, bn=bn)
            self.b = Unit(width, width, bn=bn, relu=False)
        elif kind == "concat":
            self.a = Unit(c_in, width, 1, bn=bn)
            self.b = Unit(c_in, width + 1, 3, bn=bn)
        elif kind == "depthwise":
            self.a = Unit(c_in, c_in * mult, 3, groups=c_in, bn=bn)
        else:  # grouped: 2 groups
            self.a = Unit(c_in - c_in % 2, 2 * width, 3, groups=2, bn=bn)
        self.out_channels = {"concat": 2 * width + 1, "depthwise": c_in * mult, "grouped": 2 * width}.get(kind, width)

    def forward(self, x):
        if self.kind == "residual":
            y = self.a(x)
            return torch.relu(y + self.b(y))
        if self.kind == "concat":
            return torch.cat([self.a(x), self.b(x)], 1)
        if self.kind == "grouped":
            return self.a(x[:, : self.a.conv.in_channels] if x.shape[1] % 2 else x)
        return self.a(x)


class RandomNet(nn.Module):
    def __init__(self, specs, bn, flatten):
        super().__init__()
        self.stem = Unit(3, 6, bn=bn)
        c, blocks = 6, []
        for kind, width, mult in specs:
            blocks.append(RandomBlock(kind, c, width, mult, bn))
            c = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.flatten = flatten
        self.hidden = nn.Linear(c * 4 if flatten else c, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        y = self.blocks(self.stem(x))
        y = nn.functional.adaptive_avg_pool2d(y, 2).flatten(1) if self.flatten else y.mean((2, 3))
        return self.head(torch.relu(self.hidden(y)))


nets = st.builds(
    RandomNet,
    st.lists(st.tuples(st.sampled_from(KINDS), st.integers(2, 6), st.sampled_from([1, 2])), min_size=1, max_size=4),
    st.booleans(), st.booleans(),
)
X = torch.randn(1, 3, 6, 6)


def randomize_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def test_random_nets_rebuild_to_the_same_function_and_the_predicted_flops():
    pruned = []

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(net=nets, seed=st.integers(0, 2**16))
    def check(net, seed):
        torch.manual_seed(seed)
        model = net.eval()
        randomize_norms(model)
        bn = isinstance(model.stem.bn, nn.BatchNorm2d)
        reg = (morphnet.GammaFlopsRegularizer(model, X, gamma_threshold=1e-3) if bn else
               morphnet.GroupLassoFlopsRegularizer(model, X, threshold=1e-6))
        kill_quarter(model, reg, "gamma" if bn else "group_lasso", seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            slim = morphnet.apply_structure(model, reg, X, keep_weights=True).eval()
        revived = [w for w in caught if "cannot have zero width" in str(w.message)]
        with torch.no_grad():
            assert torch.allclose(slim(X), model(X), rtol=1e-4, atol=1e-5)
        flops = counted_flops(slim, X)
        if revived:  # a layer kept one (dead) channel: a little more than predicted
            assert flops > reg.get_cost().item()
        else:
            assert flops == reg.get_cost().item()
        pruned.append(weight_count(slim) < weight_count(model))

    check()
    assert_most_examples_pruned(pruned)  # keeping every channel would also give the same function


@settings(max_examples=15, deadline=None, derandomize=True)
@given(net=nets, fraction=st.floats(0.1, 1.0), factor=st.sampled_from([0.5, 1.0, 1.6]))
def test_random_nets_rebuild_counts_and_expansions_to_the_widths_asked_for(net, fraction, factor):
    model = net.eval()
    a = morphnet.GammaFlopsRegularizer(model, X, gamma_threshold=0.0).analysis if isinstance(
        model.stem.bn, nn.BatchNorm2d) else morphnet.GroupLassoFlopsRegularizer(model, X, threshold=0.0).analysis
    table = LayerTable(a)
    # one count per cluster of coupled layers: copies per group, then each layer's width from them
    copies = np.ones(a.num_groups, np.int64)
    for layer in table.layers.values():
        free = layer.groups[~layer.fixed]
        copies[free[int(np.ceil(fraction * len(free))):]] = 0
    for layer in table.layers.values():  # no layer vanishes (convs would keep a channel: tested elsewhere)
        if layer.count(copies) == 0:
            copies[layer.groups[0]] = 1
    counts = {n: layer.count(copies) for n, layer in table.layers.items() if (~layer.fixed).any()}
    counts = morphnet.expand_structure(model, counts, X, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slim = morphnet.apply_structure(model, counts, X)
    for name, count in counts.items():
        module = slim.get_submodule(name)
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        assert width == count
    assert slim(X).shape == (1, 3)
