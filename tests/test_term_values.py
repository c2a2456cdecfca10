"""Regularization terms and costs against values worked out by hand from the weights.

The expected numbers use only the cost convention of docs/architecture.md (sections 3-5), written
out here for each layer: for a layer with coefficient C, alive input / output channels A_in / A_out
and summed regularization vectors R_in / R_out, cost = C * A_in * A_out and term =
C * (A_in * R_out + A_out * R_in); group lasso's vector is, per output channel,
``l1_fraction * mean|w| + (1 - l1_fraction) * sqrt(mean(w**2))`` over that channel's weights;
latency is per op max(FLOPs x batch / peak, bytes / bandwidth) with 4-byte elements, and its term
follows the side that is slower. Nothing here reads the library's own coefficients.
"""

import pytest
import torch
from torch import nn

import morphnet

PIXELS = 8 * 8
X = torch.randn(1, 3, 8, 8)


class ConvHead(nn.Module):
    """conv 3->8 (3x3, padding 1, no bias) -> BN -> ReLU -> head conv 8->2 (1x1, no bias), input 3x8x8.
    Without ``bn`` (for group lasso, whose zero rows a BatchNorm's shift would make non-zero) the
    conv feeds the ReLU directly."""

    def __init__(self, bn: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.head = nn.Conv2d(8, 2, 1, bias=False)
        if bn:
            with torch.no_grad():
                self.bn.weight.copy_(torch.tensor([0.9, 0.05, -0.5, 0.0, 0.3, 0.02, 0.7, -0.2]))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class ConvLinear(nn.Module):
    """conv 3->6 (3x3, stride 2, padding 1) -> BN -> ReLU -> flatten -> linear 96->5, input 3x8x8.
    Each of the 6 channels owns 4 x 4 = 16 features of the linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(96, 5)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([0.4, -0.01, 0.25, 0.0, -0.6, 0.15]))

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def lasso_norms(weight: torch.Tensor, l1_fraction: float) -> torch.Tensor:
    rows = weight.detach().double().reshape(weight.shape[0], -1)
    return l1_fraction * rows.abs().mean(1) + (1 - l1_fraction) * rows.pow(2).mean(1).sqrt()


def half_alive_threshold(norms: torch.Tensor) -> float:
    """A threshold between the 4th and 5th smallest of 8 channel norms: 4 alive, none near it."""
    ordered = norms.sort().values
    return (ordered[3] + ordered[4]).item() / 2


@pytest.mark.parametrize("l1_fraction", [0.0, 0.5, 1.0])
def test_group_lasso_flops_and_size_terms_by_hand(l1_fraction):
    net = ConvHead(bn=False)
    norms = lasso_norms(net.conv.weight, l1_fraction)
    threshold = half_alive_threshold(norms)
    r, a = norms.sum().item(), int((norms > threshold).sum())
    assert a == 4
    # conv: C = 2 * 9 * 64 per (input, output) pair, 3 fixed inputs (R_in = 0); head: C = 2 * 64, 2 fixed outputs
    flops = morphnet.GroupLassoFlopsRegularizer(net, X, threshold=threshold, l1_fraction=l1_fraction)
    assert flops.get_cost().item() == 2 * 9 * PIXELS * 3 * a + 2 * PIXELS * a * 2
    assert flops.get_regularization_term().item() == pytest.approx(2 * 9 * PIXELS * 3 * r + 2 * PIXELS * 2 * r,
                                                                   rel=1e-6)
    size = morphnet.GroupLassoModelSizeRegularizer(net, X, threshold=threshold, l1_fraction=l1_fraction)
    assert size.get_cost().item() == 9 * 3 * a + a * 2
    assert size.get_regularization_term().item() == pytest.approx(9 * 3 * r + 2 * r, rel=1e-6)
    assert size.get_regularization_term(["head"]).item() == pytest.approx(2 * r, rel=1e-6)


def test_group_lasso_l1_fraction_changes_the_norm_as_documented():
    """The three mixes give three different terms, in the order mean|w| <= sqrt(mean w^2)."""
    net = ConvHead(bn=False)
    terms = [morphnet.GroupLassoFlopsRegularizer(net, X, threshold=0.0, l1_fraction=f).get_regularization_term().item()
             for f in (0.0, 0.5, 1.0)]
    assert terms[0] > terms[1] > terms[2]
    assert terms[1] == pytest.approx((terms[0] + terms[2]) / 2, rel=1e-6)


def test_gamma_model_size_through_flatten_into_a_linear_layer_by_hand():
    net = ConvLinear()
    g = net.bn.weight.detach().double().abs()
    a, r = int((g > 0.1).sum()), g.sum().item()
    assert a == 4
    reg = morphnet.GammaModelSizeRegularizer(net, X, gamma_threshold=0.1)
    # conv: 9 weights per (input, output) pair, 3 fixed inputs; fc: 16 features per channel x 5 fixed outputs
    assert reg.get_cost().item() == 9 * 3 * a + 16 * a * 5
    assert reg.get_cost(["fc"]).item() == 16 * a * 5 == net.fc.weight[:, : 16 * a].numel()
    assert reg.get_regularization_term().item() == pytest.approx(9 * 3 * r + 16 * 5 * r, rel=1e-6)
    # FLOPs: conv on 4 x 4 outputs; the linear layer on one token
    flops = morphnet.GammaFlopsRegularizer(net, X, gamma_threshold=0.1)
    assert flops.get_cost().item() == 2 * 9 * 16 * 3 * a + 2 * 16 * a * 5
    assert flops.get_regularization_term().item() == pytest.approx(2 * 9 * 16 * 3 * r + 2 * 16 * 5 * r, rel=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_gamma_latency_cost_and_term_by_hand(batch):
    """peak 1 GFLOP/s, 1 GB/s: the conv is compute bound, the head and the BN / ReLU are memory bound,
    so the term takes the FLOP surrogate for the first and the byte surrogate for the rest."""
    morphnet.register_hardware("hand-roofline", 1.0, 1.0, overwrite=True)
    net = ConvHead()
    g = net.bn.weight.detach().double().abs()
    a, r = int((g > 0.1).sum()), g.sum().item()
    assert a == 5
    conv_flops, conv_bytes = 2 * 9 * PIXELS * 3 * a * batch, 4 * ((3 + a) * PIXELS * batch + 9 * 3 * a)
    head_flops, head_bytes = 2 * PIXELS * a * 2 * batch, 4 * ((a + 2) * PIXELS * batch + a * 2)
    bn_bytes = relu_bytes = 4 * 2 * a * PIXELS * batch  # read and write every alive channel
    assert conv_flops > conv_bytes and head_bytes > head_flops
    reg = morphnet.GammaLatencyRegularizer(net, X, gamma_threshold=0.1, hardware="hand-roofline", batch_size=batch)
    assert reg.get_cost().item() == pytest.approx(conv_flops + bn_bytes + relu_bytes + head_bytes, rel=1e-9)
    conv_term = 2 * 9 * PIXELS * batch * (3 * r)  # FLOP surrogate: C * (A_in R_out + A_out R_in), R_in = 0
    bn_term = relu_term = 4 * 2 * PIXELS * batch * r  # byte surrogate: read and write
    head_term = 4 * (PIXELS * batch * r + 2 * r)  # input activations and weights (2 fixed outputs)
    assert reg.get_regularization_term().item() == pytest.approx(conv_term + bn_term + relu_term + head_term, rel=1e-6)
    assert reg.get_regularization_term(["head"]).item() == pytest.approx(head_term, rel=1e-6)


@pytest.mark.parametrize("l1_fraction", [0.0, 0.5])
def test_group_lasso_activation_cost_and_term_by_hand(l1_fraction):
    """Activation count: cost A_out, term R_out per layer; the head's 2 outputs are fixed (A = 2, R = 0)."""
    net = ConvHead(bn=False)
    norms = lasso_norms(net.conv.weight, l1_fraction)
    threshold = half_alive_threshold(norms)
    a, r = int((norms > threshold).sum()), norms.sum().item()
    assert a == 4
    reg = morphnet.GroupLassoActivationRegularizer(net, X, threshold=threshold, l1_fraction=l1_fraction)
    assert (reg.name, reg.cost_name) == ("GroupLassoActivation", "Activations")
    assert reg.get_cost().item() == a + 2 and reg.get_cost(["conv"]).item() == a
    assert reg.get_regularization_term().item() == pytest.approx(r, rel=1e-6)
    assert reg.get_regularization_term(["head"]).item() == 0


@pytest.mark.parametrize("l1_fraction, batch", [(0.0, 1), (0.5, 3)])
def test_group_lasso_latency_cost_and_term_by_hand(l1_fraction, batch):
    """peak 1 GFLOP/s, 1 GB/s, as for Gamma above: the conv is compute bound, the ReLU and the head
    memory bound; the norms are group lasso's, the conv has no BatchNorm after it."""
    morphnet.register_hardware("hand-roofline", 1.0, 1.0, overwrite=True)
    net = ConvHead(bn=False)
    norms = lasso_norms(net.conv.weight, l1_fraction)
    threshold = half_alive_threshold(norms)
    a, r = int((norms > threshold).sum()), norms.sum().item()
    assert a == 4
    conv_flops, conv_bytes = 2 * 9 * PIXELS * 3 * a * batch, 4 * ((3 + a) * PIXELS * batch + 9 * 3 * a)
    head_flops, head_bytes = 2 * PIXELS * a * 2 * batch, 4 * ((a + 2) * PIXELS * batch + a * 2)
    relu_bytes = 4 * 2 * a * PIXELS * batch
    assert conv_flops > conv_bytes and head_bytes > head_flops
    reg = morphnet.GroupLassoLatencyRegularizer(net, X, threshold=threshold, hardware="hand-roofline",
                                                batch_size=batch, l1_fraction=l1_fraction)
    assert (reg.name, reg.cost_name) == ("GroupLassoLatency", "Latency")
    assert reg.get_cost().item() == pytest.approx(conv_flops + relu_bytes + head_bytes, rel=1e-9)
    conv_term = 2 * 9 * PIXELS * batch * (3 * r)  # FLOP surrogate, 3 fixed inputs (R_in = 0)
    relu_term = 4 * 2 * PIXELS * batch * r  # byte surrogate: read and write
    head_term = 4 * (PIXELS * batch * r + 2 * r)  # input activations and weights (2 fixed outputs)
    assert reg.get_regularization_term().item() == pytest.approx(conv_term + relu_term + head_term, rel=1e-6)
    assert reg.get_regularization_term(["conv"]).item() == pytest.approx(conv_term, rel=1e-6)
