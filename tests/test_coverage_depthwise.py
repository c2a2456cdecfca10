"""Zeros pass through depthwise convolutions (docs/architecture.md, "evidence of death").

A depthwise conv's output channel reads its own input channel only and lies in that channel's group,
so it reads nothing across groups: without a bias a zero channel stays zero; with one it outputs the
bias, a constant its readers see unless the bias is part of the source's evidence (group lasso).
Before this rule the depthwise conv counted as a reader, so a BatchNorm in front of it could not
prove its channels dead (the original MorphNet's network below: conv2 cost 44574 instead of 21318).
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import morphnet
from nets import DepthwiseConcatNet, counted_flops, kill_groups, random_dead_groups

X = torch.randn(1, 3, 17, 19, generator=torch.Generator().manual_seed(0))
LAYERS = ["dw1", "conv1", "conv2", "dw2", "conv3"]


def test_the_original_depthwise_network_costs_what_morphnet_expects():
    """The figures of morph-net's GammaFlopLossWithDepthwiseConvNoBatchNormTest.testCost, by hand
    (17x19 output pixels, 323; conv3 strided to 9x10, 90): dw1 reads the image, whose 3 channels stay:
    2 * 9 * 323 * 3 = 17442; conv1 2 * 35 * 323 * 3 inputs * 7 alive = 474810; conv2 2 * 323 * 3 * 11
    alive = 21318 (11 of bn2's 23 scales above 0.45, the other 12 dead through relu and dw2); dw2 keeps
    its input's 11: 2 * 25 * 323 * 11 = 177650; conv3 (its output pruned as in the original, which
    regularizes output ops) 2 * 9 * 90 * (7 + 11) inputs * 10 alive = 291600."""
    reg = morphnet.GammaFlopsRegularizer(DepthwiseConcatNet(), X, gamma_threshold=0.45, prune_outputs=True)
    assert [reg.get_cost([n]).item() for n in LAYERS] == [17442, 474810, 21318, 177650, 291600]
    assert reg.coverage_summary()["uncovered"] == 0
    fixed_outputs = morphnet.GammaFlopsRegularizer(DepthwiseConcatNet(), X, gamma_threshold=0.45)
    assert fixed_outputs.get_cost(["conv2"]).item() == 21318
    assert morphnet.StructureExporter(fixed_outputs).get_alive_counts() == {"conv1": 7, "conv2": 11, "dw2": 11}


def test_a_depthwise_bias_keeps_its_channels_alive_under_gamma():
    """With a bias, dw2 outputs relu(b) where bn2 is zero, and conv3 reads it: no evidence of death
    (the original ignored the bias and called those channels dead)."""
    reg = morphnet.GammaFlopsRegularizer(DepthwiseConcatNet(dw_bias=True), X, gamma_threshold=0.45)
    assert reg.get_cost(["conv2"]).item() == 44574  # 23 channels alive
    assert reg.coverage_summary()["uncovered_layers"] == ["conv2", "dw2"]


def test_killed_channels_before_a_depthwise_conv_rebuild_exactly():
    model = DepthwiseConcatNet()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.3)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.3)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
            small = bn.weight.abs() < 0.45
            bn.weight[small], bn.bias[small] = 0.0, 0.0  # exactly dead channels
    reg = morphnet.GammaFlopsRegularizer(model, X, gamma_threshold=0.45)
    slim = morphnet.apply_structure(model.eval(), reg, X, keep_weights=True).eval()
    assert (slim.conv2.out_channels, slim.dw2.groups, slim.conv3.in_channels) == (11, 11, 18)
    with torch.no_grad():
        want, got = model(X), slim(X)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert counted_flops(slim, X) == reg.get_cost().item()


class Separable(nn.Module):
    """conv0 -> bn0 -> relu -> depthwise (any multiplier, padding mode, dilation; transposed) -> relu ->
    pointwise -> pooled head."""

    def __init__(self, mode="zeros", mult=1, dilation=1, transposed=False, bias=False):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        if transposed:
            self.dw = nn.ConvTranspose2d(8, 8 * mult, 3, padding=1, groups=8, bias=bias)
        else:
            self.dw = nn.Conv2d(8, 8 * mult, 3, padding=dilation, dilation=dilation, groups=8, bias=bias,
                                padding_mode=mode)
        self.pw = nn.Conv2d(8 * mult, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.pw(torch.relu(self.dw(torch.relu(self.bn0(self.conv0(x))))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("mode, mult, dilation, transposed", [
    ("zeros", 1, 1, False), ("zeros", 2, 2, False), ("reflect", 1, 1, False), ("replicate", 2, 1, False),
    ("reflect", 3, 2, False), ("zeros", 1, 1, True)])
def test_zeros_pass_depthwise_convs_whatever_their_padding_multiplier_and_dilation(mode, mult, dilation,
                                                                                   transposed):
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    model = Separable(mode, mult, dilation, transposed)
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-3)
    assert reg.coverage_summary()["uncovered"] == 0 and reg.grouping.regularized.sum() == 8
    dead, _ = random_dead_groups(reg, seed=0, fraction=0.5)
    kill_groups(model, reg, dead, seed=0)
    slim = morphnet.apply_structure(model.eval(), reg, x, keep_weights=True).eval()
    assert slim.dw.out_channels == 4 * mult
    with torch.no_grad():
        want, got = model(x), slim(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert counted_flops(slim, x) == reg.get_cost().item()


def test_a_biased_depthwise_conv_is_covered_only_where_the_bias_is_evidence():
    """Gamma: the bias is a constant the pointwise conv reads, so bn0's groups stay alive. Group lasso
    with no BatchNorm in between: the depthwise rows and their bias are that group's entries (the
    output is their zero point), so a group whose conv0 rows, depthwise row and bias are all zero dies,
    and the rebuild is exact."""
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing left to regularize
        gamma = morphnet.GammaFlopsRegularizer(Separable(bias=True), x, gamma_threshold=1e-3)
    assert gamma.coverage_summary()["uncovered"] == 8 and not gamma.grouping.regularized.any()
    model = Separable(bias=True)
    model.bn0 = nn.Identity()
    with torch.no_grad():
        model.dw.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(4)))
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    groups = reg.analysis.group_of[reg.analysis.module_out_ids["dw"]]
    assert reg.coverage_summary()["uncovered"] == 0 and reg.grouping.regularized[groups].all()
    dead = np.zeros(reg.analysis.num_groups, dtype=bool)
    dead[groups[[1, 5]]] = True
    kill_groups(model, reg, dead)
    assert not model.dw.bias[[1, 5]].any()
    assert morphnet.StructureExporter(reg).get_alive_counts()["dw"] == 6
    slim = morphnet.apply_structure(model.eval(), reg, x, keep_weights=True).eval()
    with torch.no_grad():
        want, got = model(x), slim(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_the_mobilenetv2_cifar_seed_is_fully_covered():
    from morphnet.seeds.cifar_mobilenet import mobilenetv2_cifar

    reg = morphnet.GammaFlopsRegularizer(mobilenetv2_cifar(), torch.randn(1, 3, 16, 16), gamma_threshold=1e-2)
    summary = reg.coverage_summary()
    assert summary["uncovered"] == 0 and summary["regularized"] + summary["fixed"] == summary["groups"]


class MixedConcat(nn.Module):
    """cat(relu(bn_a(conv_a(x))), conv_r(x)) -> depthwise (multiplier 2) -> pointwise, with conv_r's output
    also read through bn_r: the depthwise conv reads conv_r's channels raw, so bn_r is no evidence for
    them, while bn_a's channels reach the pointwise conv as zeros (outputs 2c and 2c + 1 of channel c)."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv_r, self.bn_r = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.pw, self.head_r = nn.Conv2d(16, 5, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        r = self.conv_r(x)
        y = self.pw(self.dw(torch.cat([torch.relu(self.bn_a(self.conv_a(x))), r], 1)))
        return (y + self.head_r(torch.relu(self.bn_r(r)))).mean((2, 3))


def test_a_depthwise_multiplier_maps_each_input_channel_to_its_own_outputs():
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(5))
    model = MixedConcat()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conv_r's groups are uncovered
        reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-3)
    a, g = reg.analysis, reg.grouping
    assert g.regularized[a.group_of[a.module_out_ids["conv_a"]]].all()
    assert g.uncovered[a.group_of[a.module_out_ids["conv_r"]]].all()
    dead = np.zeros(a.num_groups, dtype=bool)
    dead[a.group_of[a.module_out_ids["conv_a"][[0, 3]]]] = True
    kill_groups(model, reg, dead, seed=1)
    slim = morphnet.apply_structure(model.eval(), reg, x, keep_weights=True).eval()
    assert (slim.conv_a.out_channels, slim.dw.out_channels) == (2, 12)
    with torch.no_grad():
        want, got = model(x), slim(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
