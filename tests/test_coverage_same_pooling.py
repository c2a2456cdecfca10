"""Zeros pass through a max pooling whose input was padded with a constant <= 0 (timm's "same" max pooling
pads with -inf first: NASNet-A, PNASNet), when every window holds an unpadded entry: the max of zeros and
-inf is 0. A window made of padding alone outputs the constant, and a positive constant is the maximum of
zeros, so those stay readers' non-zero values."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphnet
from nets import counted_flops, kill_groups, random_dead_groups

X = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(0))


class PaddedPool(nn.Module):
    """conv -> bn -> pad(value) -> max_pool2d -> 1x1 conv -> mean."""

    def __init__(self, value, pads, kernel, stride, dilation=1, padding=0, ceil_mode=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)
        self.pool = (value, pads, kernel, stride, padding, dilation, ceil_mode)

    def forward(self, x):
        value, pads, kernel, stride, padding, dilation, ceil_mode = self.pool
        y = F.pad(self.bn(self.conv(x)), pads, value=value)
        return self.head(F.max_pool2d(y, kernel, stride, padding, dilation, ceil_mode=ceil_mode)).mean((2, 3))


def regularizer(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncovered cases leave nothing to regularize
        return morphnet.GammaFlopsRegularizer(model, X, gamma_threshold=1e-3)


@pytest.mark.parametrize("pool", [
    (float("-inf"), (0, 1, 0, 1), 3, 2),  # timm's "same" padding of a 3x3 / 2 pool on 9x9
    (float("-inf"), (1, 1, 1, 1), 3, 1),
    (-1.0, (1, 1, 1, 1), 3, 1),
    (float("-inf"), (2, 2, 2, 2), 3, 1, 2),  # dilated: taps 0, 2, 4 of the first window reach entry 2
])
def test_max_pooling_after_a_non_positive_pad_keeps_zeros(pool):
    model = PaddedPool(*pool)
    reg = regularizer(model)
    assert reg.coverage_summary()["uncovered"] == 0 and reg.grouping.regularized.sum() == 6
    dead, _ = random_dead_groups(reg, seed=0, fraction=0.5)
    kill_groups(model, reg, dead, seed=0)
    slim = morphnet.apply_structure(model.eval(), reg, X, keep_weights=True).eval()
    assert slim.conv.out_channels == 3
    with torch.no_grad():
        want, got = model(X), slim(X)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert counted_flops(slim, X) == reg.get_cost().item()


@pytest.mark.parametrize("pool", [
    (1.0, (1, 1, 1, 1), 3, 1),  # max(0, 1) = 1
    (float("-inf"), (3, 0, 0, 0), 2, 2),  # the first window is padding only: -inf
    (float("-inf"), (1, 1, 1, 1), 2, 2, 1, 1, True),  # the pool's own padding and the pad fill the first window
])
def test_windows_that_can_see_only_the_constant_are_not_zero(pool):
    reg = regularizer(PaddedPool(*pool))
    assert reg.coverage_summary()["uncovered"] == 6 and not reg.grouping.regularized.any()
