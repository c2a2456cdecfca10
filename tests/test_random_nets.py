"""Property test: random small conv nets (chains, residuals, concats, depthwise, grouped, linear heads).

With every channel alive, the FLOP cost equals FlopCounterMode and the size equals the weight
count; after killing random BatchNorm channels, the FLOP cost equals the formula evaluated by hand.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import morphnet
from nets import counted_flops, weight_count


class Block(nn.Module):
    def __init__(self, kind, c_in, c_out, k, stride, groups):
        super().__init__()
        self.kind = kind
        if kind == "depthwise":
            c_out = c_in
            groups = c_in
        self.conv = nn.Conv2d(c_in, c_out if kind != "concat" else c_out // 2 + 1, k, stride=stride,
                              padding=k // 2, groups=groups, bias=False)
        width = self.conv.out_channels
        self.bn = nn.BatchNorm2d(width)
        if kind == "residual":
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
        if kind == "concat":
            self.side = nn.Conv2d(c_in, c_out - width, 1, stride=stride, bias=False)
            self.bn_side = nn.BatchNorm2d(c_out - width)
        self.out_channels = c_out

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if self.kind == "residual":
            y = y + self.bn2(self.conv2(y))
        elif self.kind == "concat":
            y = torch.cat([y, torch.relu(self.bn_side(self.side(x)))], 1)
        return y


class RandomNet(nn.Module):
    def __init__(self, specs, head_linear):
        super().__init__()
        blocks, c = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)], 8
        for kind, width, k, stride, grouped in specs:
            groups = 2 if grouped and c % 2 == 0 and width % 2 == 0 and kind in ("chain", "residual") else 1
            block = Block(kind, c, width, k, stride, groups)
            blocks.append(block)
            c = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head_linear = head_linear
        self.head = nn.Linear(c, 3) if head_linear else nn.Conv2d(c, 3, 1)

    def forward(self, x):
        y = self.blocks(x)
        if self.head_linear:
            return self.head(y.mean((2, 3)))
        return self.head(y)


spec = st.tuples(st.sampled_from(["chain", "residual", "concat", "depthwise"]), st.integers(2, 9).map(lambda n: 2 * n),
                 st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), st.booleans())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(specs=st.lists(spec, min_size=1, max_size=5), head_linear=st.booleans(), size=st.integers(6, 12),
       seed=st.integers(0, 1000))
def test_random_net_costs_match_flop_counter_and_formula(specs, head_linear, size, seed):
    torch.manual_seed(seed)
    net = RandomNet(specs, head_linear)
    x = torch.randn(1, 3, size, size)
    flops = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.5)
    assert flops.get_cost().item() == counted_flops(net, x)
    size_reg = morphnet.GammaModelSizeRegularizer(net, x, gamma_threshold=0.5)
    assert size_reg.get_cost().item() == weight_count(net)
    # kill random BatchNorm channels and compare with the formula: conv FLOPs scale with alive in x out
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_((torch.rand(m.num_features) > 0.4).float())
    assert flops.get_cost().item() <= counted_flops(net, x)
    assert flops.get_cost().item() == _expected_flops(net, flops, x)


def _expected_flops(net, reg, x):
    """Sum over convs / linears of C * A_in * A_out / groups, from per-group alive flags."""
    alive = reg.alive_groups().numpy()
    a = reg.analysis
    total = 0.0
    for call in a.layer_calls:
        a_in = alive[a.group_of[call.in_ids]].sum()
        a_out = alive[a.group_of[call.out_ids]].sum()
        total += call.flop_coef * (a_out if call.depthwise else a_in * a_out / call.groups)
    return total
