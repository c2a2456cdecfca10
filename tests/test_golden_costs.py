"""Golden cases with exact numbers, worked out by hand from the cost convention of
docs/architecture.md (sections 3-5) on ``nets.ConcatNet`` (input 1x3x17x19, gamma threshold 0.45:
alive 7, 11, 10, 17 of 13, 23, 29, 31 channels).

FLOPs = 2 x kernel area x alive inputs x alive outputs x output pixels:
conv1 2 * 7*5 * 3 * 7 * 17*19 = 474810; conv2 2 * 1 * 3 * 11 * 323 = 21318; conv3 (stride 2, 9x10
outputs, 7 + 11 = 18 alive inputs through the concat) 2 * 9 * 18 * 10 * 90 = 291600;
conv4 2 * 1 * 18 * 17 * 323 = 197676. Model size = kernel area x alive inputs x alive outputs:
35 * 3 * 7 = 735, 3 * 11 = 33, 9 * 18 * 10 = 1620, 18 * 17 = 306. Activations: alive outputs, with
the term the sum of |gamma| of the layer's outputs (bn1: 7 * 0.8 + 6 * 0.2 = 6.8, ...).
"""

import pytest
import torch

import morphnet
from nets import ConcatNet, ResidualNet

X = torch.randn(1, 3, 17, 19)
CONVS = ["conv1", "conv2", "conv3", "conv4"]


def test_concat_gamma_flops_costs_per_layer():
    reg = morphnet.GammaFlopsRegularizer(ConcatNet(), X, gamma_threshold=0.45)
    costs = [reg.get_cost([n]).item() for n in CONVS]
    assert costs == [474810, 21318, 291600, 197676]


def test_concat_alive_counts_exported():
    reg = morphnet.GammaFlopsRegularizer(ConcatNet(), X, gamma_threshold=0.45)
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"conv1": 7, "conv2": 11, "conv3": 10, "conv4": 17}


def test_concat_activation_costs_and_terms():
    reg = morphnet.GammaActivationRegularizer(ConcatNet(), X, gamma_threshold=0.45)
    assert [reg.get_cost([n]).item() for n in CONVS] == [7, 11, 10, 17]
    terms = [reg.get_regularization_term([n]).item() for n in CONVS]
    assert terms == pytest.approx([6.8, 8.9, 11.7, 14.1], rel=1e-6)


def test_concat_model_size_costs():
    reg = morphnet.GammaModelSizeRegularizer(ConcatNet(), X, gamma_threshold=0.45)
    assert [reg.get_cost([n]).item() for n in CONVS] == [735, 33, 1620, 306]


def test_concat_flops_term_matches_bilinear_formula():
    net = ConcatNet()
    reg = morphnet.GammaFlopsRegularizer(net, X, gamma_threshold=0.45)
    g = {n: getattr(net, "bn" + n[-1]).weight.abs() for n in CONVS}
    alive = {n: (g[n] > 0.45).sum().item() for n in CONVS}
    cat_r = torch.cat([g["conv1"], g["conv2"]]).sum().item()
    # conv3: C = 2 * 9 * 90; A_in = 18 alive through the concat, R_in = sum over the concat's channels
    expected = 1620 * (18 * g["conv3"].sum().item() + alive["conv3"] * cat_r)
    assert reg.get_regularization_term(["conv3"]).item() == pytest.approx(expected, rel=1e-5)


def test_residual_sum_is_one_group_with_max_regularizer():
    net = ResidualNet(width=8)
    with torch.no_grad():
        net.bn0.weight.copy_(torch.tensor([0.9, 0.1, 0.5, 0.0, 0.3, 0.02, 0.7, 0.2]))
        net.bn1.weight.copy_(torch.tensor([0.1, 0.6, 0.5, 0.0, -0.8, 0.01, 0.1, 0.2]))
    reg = morphnet.GammaActivationRegularizer(net, torch.randn(1, 3, 8, 8), gamma_threshold=0.15)
    expected_r = torch.maximum(net.bn0.weight.abs(), net.bn1.weight.abs())
    # conv0 and conv1 outputs are the same group: the term of each is sum(max(|g0|, |g1|))
    for name in ("conv0", "conv1"):
        assert reg.get_regularization_term([name]).item() == pytest.approx(expected_r.sum().item(), rel=1e-6)
        assert reg.get_cost([name]).item() == (expected_r > 0.15).sum().item()
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert counts == {"conv0": 6, "conv1": 6}  # head's output width is what the model returns: absent
    a = reg.analysis
    assert set(a.group_of[a.weights["conv0.weight"].out_ids]) == set(a.group_of[a.weights["conv1.weight"].out_ids])
    assert a.fixed_group[a.group_of[a.weights["head.weight"].out_ids]].all()
