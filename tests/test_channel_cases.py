"""How the analysis couples channels in the constructs issue 2 lists."""

import numpy as np
import pytest
import torch
from torch import nn

import morphnet
from nets import counted_flops, weight_count


def _groups(reg, module):
    a = reg.analysis
    return a.group_of[a.weights[module + ".weight"].out_ids]


def _set_bn(bn, values):
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(values, dtype=torch.float32))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def test_grouped_conv_prunes_the_same_position_in_every_group():
    net = Grouped()
    x = torch.randn(1, 3, 8, 8)
    # position 0 of each group of 4 channels is dead in bn1 only in groups 0-2: group 3 keeps it alive
    g1 = [1.0] * 16
    for ch in (0, 4, 8):
        g1[ch] = 0.0
    g1[1] = g1[5] = g1[9] = g1[13] = 0.0  # position 1 is dead in every group
    _set_bn(net.bn1, g1)
    _set_bn(net.bn2, [0.0, 1.0, 1.0, 1.0] * 4)  # position 0 of conv2's output dead everywhere
    reg = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert counts == {"conv1": 12, "conv2": 12}
    # conv2 costs C * A_in * A_out / groups with C = 2 * 9 * 64
    assert reg.get_cost(["conv2"]).item() == 2 * 9 * 64 * 12 * 12 / 4
    assert reg.get_cost().item() < counted_flops(net, x)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.dw, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.bn2(self.dw(torch.relu(self.bn1(self.conv1(x))))))


def test_depthwise_ties_input_and_output_channels():
    net = Depthwise()
    _set_bn(net.bn1, [1, 0, 0, 1, 0, 0])
    _set_bn(net.bn2, [0, 1, 0, 1, 0, 0])
    reg = morphnet.GammaFlopsRegularizer(net, torch.randn(1, 3, 5, 5), gamma_threshold=0.5)
    assert list(_groups(reg, "conv1")) == list(_groups(reg, "dw"))
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"conv1": 3, "dw": 3}
    # depthwise: cost = C * A_out with C = 2 * 9 * 25
    assert reg.get_cost(["dw"]).item() == 2 * 9 * 25 * 3
    size = morphnet.GammaModelSizeRegularizer(net, torch.randn(1, 3, 5, 5), gamma_threshold=0.5)
    assert size.get_cost(["dw"]).item() == 9 * 3


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def test_flatten_then_linear_counts_features_per_channel():
    net = FlattenLinear()
    _set_bn(net.bn, [1, 1, 0, 1, 0, 1])
    reg = morphnet.GammaFlopsRegularizer(net, torch.randn(1, 3, 4, 4), gamma_threshold=0.5)
    assert reg.get_cost(["fc"]).item() == 2 * (4 * 16) * 5
    a = reg.analysis
    fc_in = a.group_of[a.weights["fc.weight"].in_ids]
    conv_out = a.group_of[a.weights["conv.weight"].out_ids]
    assert list(fc_in) == list(np.repeat(conv_out, 16))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.att = nn.Conv2d(8, 1, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        y = y * gate  # [N, C, 1, 1] x [N, C, H, W]: tied channels
        y = y * torch.sigmoid(self.att(y))  # [N, 1, H, W] x [N, C, H, W]: couples nothing
        return self.head(y)


def test_squeeze_excitation_gate_is_tied_and_spatial_attention_couples_nothing():
    net = SqueezeExcite()
    x = torch.randn(2, 3, 6, 6)
    reg = morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0)
    assert set(_groups(reg, "fc2")) == set(_groups(reg, "conv"))
    assert reg.analysis.fixed_group[_groups(reg, "att")].all()  # one channel broadcast over eight
    assert not reg.analysis.fixed_group[_groups(reg, "conv")].any()
    assert reg.get_cost().item() == counted_flops(net, x)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return {"out": self.head(torch.cat([self.shared(self.a(x)), self.shared(self.b(x))], 1))}


def test_module_called_twice_costs_twice_and_ties_its_inputs():
    net = CalledTwice()
    x = torch.randn(1, 3, 5, 5)
    reg = morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0)
    assert reg.get_cost(["shared"]).item() == 2 * (2 * 9 * 25 * 4 * 5)
    assert list(_groups(reg, "a")) == list(_groups(reg, "b"))
    assert reg.get_cost().item() == counted_flops(net, x)


def test_dict_outputs_keep_their_width_unless_prune_outputs():
    net = CalledTwice()
    x = torch.randn(1, 3, 5, 5)
    kept = morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0)
    assert "head" not in morphnet.StructureExporter(kept).get_alive_counts()
    pruned = morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0, prune_outputs=True)
    assert "head" in morphnet.StructureExporter(pruned).get_alive_counts()


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.out(h.mean(1))


def test_attention_heads_and_the_mlp_are_prunable_and_the_normalized_width_is_not():
    net = Attention()
    x = torch.randn(2, 7, 6)
    reg = morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0)
    assert reg.get_cost().item() == counted_flops(net, x)
    assert morphnet.compute_cost(net, x, "size") == weight_count(net)
    assert morphnet.compute_cost(net, x, "flops") == counted_flops(net, x)
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"fc1", "attn"}
    a = reg.analysis
    heads = a.group_of[a.weights["attn.in_proj_weight"].out_ids]
    assert len(set(heads.tolist())) == 4  # one group per head: q, k and v rows of a head together
    assert a.fixed_group[a.group_of[a.weights["embed.weight"].out_ids]].all()  # LayerNorm'd residual


class Normalized(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


def test_group_norm_prunes_whole_groups():
    net = Normalized(nn.GroupNorm(4, 8, affine=False))  # a group of zeros normalizes to zeros
    with torch.no_grad():
        net.conv.weight[0:2] = 0  # the whole first GroupNorm group
        net.conv.weight[4] = 0  # half of the third group: the group stays
        net.conv.bias.zero_()
    reg = morphnet.GroupLassoFlopsRegularizer(net, torch.randn(1, 3, 4, 4), threshold=1e-6)
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"conv": 6}


def test_group_lasso_does_not_prune_through_a_norm_with_a_bias():
    """GroupNorm(0) = beta: zero conv rows leave a constant the head reads, so the channels are not dead."""
    net = Normalized(nn.GroupNorm(4, 8))
    with pytest.warns(UserWarning, match="Nothing is left to regularize"):
        reg = morphnet.GroupLassoFlopsRegularizer(net, torch.randn(1, 3, 4, 4), threshold=1e-6)
    assert reg.grouping.uncovered.sum() == 4 and not reg.grouping.regularized.any()
    assert reg.coverage_summary()["uncovered_layers"] == ["conv"]


def test_layer_norm_across_channels_keeps_them_fixed():
    class LN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.ln, self.head = nn.Conv2d(3, 8, 1), nn.LayerNorm(8), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.ln(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.head(y)

    with pytest.raises(ValueError, match="nothing to regularize"):
        morphnet.GroupLassoFlopsRegularizer(LN(), torch.randn(1, 3, 4, 4), threshold=0.0)


def test_flip_maps_channels_exactly_and_chunk_ties_its_parts():
    class FlipChunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.conv2, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(7, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            y = y + y.flip(1)
            a, b = self.conv2(x).chunk(2, dim=1)
            return self.head(torch.cat([y, a[:, :3]], 1))

    reg = morphnet.GroupLassoFlopsRegularizer(FlipChunk(), torch.randn(1, 3, 4, 4), threshold=0.0)
    g = _groups(reg, "conv")
    assert g[0] == g[3] and g[1] == g[2] and g[0] != g[1]
    g2 = _groups(reg, "conv2")  # chunk(2): position j of both halves is pruned together
    assert list(g2[:3]) == list(g2[3:]) and len(set(g2)) == 3
    assert not reg.analysis.fixed_group[g2].any()


class Weird(nn.Module):
    def forward(self, x):
        return torch.logcumsumexp(x, dim=-1)


class WithWeird(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.mid, self.bnm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.weird = Weird()
        self.conv, self.bn = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.bnm(self.mid(self.bn0(self.stem(x))))
        return self.head(self.bn(self.conv(self.weird(y))))


def test_unknown_op_fails_fast_naming_op_and_module():
    with pytest.raises(morphnet.UnsupportedGraphError, match=r"aten\.logcumsumexp.*'weird' \(Weird\).*input_boundary"):
        morphnet.GammaFlopsRegularizer(WithWeird(), torch.randn(1, 3, 4, 4), gamma_threshold=0.1)


def test_boundaries_exclude_the_unknown_op():
    x = torch.randn(1, 3, 4, 4)
    net = WithWeird()
    reg = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, input_boundary=[net.weird])
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"conv"}
    assert reg.get_cost(["stem"]).item() == 0  # upstream of the boundary: not analyzed
    reg = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, output_boundary=["weird"])
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"stem"}
    assert reg.analysis.fixed_group[_groups(reg, "mid")].all()  # feeds the boundary: fixed
    assert reg.get_cost(["conv"]).item() == 0  # downstream of the boundary: not analyzed
    with pytest.raises(ValueError, match="not a module"):
        morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, input_boundary=["nope"])


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.bnl = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.right, self.bnr = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.bnl(self.left(x)), self.bnr(self.right(x))], 1))


def test_force_group_and_blacklist():
    net, x = TwoBranches(), torch.randn(1, 3, 4, 4)
    reg = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, force_group=["left|right"])
    assert list(_groups(reg, "left")) == list(_groups(reg, "right"))
    reg = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, regularizer_blacklist=["^left$"])
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"right"}
    with pytest.raises(ValueError, match="matches no"):
        morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, force_group=["nothing_here"])
    with pytest.raises(ValueError, match="matches no"):
        morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, regularizer_blacklist=["nothing_here"])
    with pytest.raises(ValueError, match="equal widths"):
        morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, force_group=["left|head"])


def test_analysis_leaves_the_model_as_found():
    import torchvision
    net = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    net.eval()
    net.inception3a.train()
    modes = [m.training for m in net.modules()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1)
    assert [m.training for m in net.modules()] == modes
    after = net.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(torch.get_rng_state(), rng)


def test_gamma_without_batchnorm_suggests_group_lasso():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="GroupLasso"):
        morphnet.GammaFlopsRegularizer(net, torch.randn(1, 3, 4, 4), gamma_threshold=0.1)


def test_argument_errors():
    net, x = TwoBranches(), torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="l1_fraction"):
        morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.1, l1_fraction=1.5)
    with pytest.raises(ValueError, match="unknown hardware"):
        morphnet.GammaLatencyRegularizer(net, x, gamma_threshold=0.1, hardware="TPUv9")
    reg = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1)
    with pytest.raises(ValueError, match="not a module"):
        reg.get_cost(["nope"])
    assert reg.get_cost([net.left]).item() == reg.get_cost(["left"]).item() > 0
    assert reg.get_cost([""]).item() == reg.get_cost().item()


def test_conv_variants_match_flop_counter():
    class Variants(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 5, 3, stride=2, dilation=2, padding=2)
            self.c3 = nn.Conv3d(1, 4, (2, 3, 3), padding=1)
            self.t = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
            self.fc = nn.Linear(9, 7)

        def forward(self, x1, x3, x2, tokens):
            return self.c1(x1), self.c3(x3), self.t(x2), self.fc(tokens)

    net = Variants()
    xs = (torch.randn(1, 3, 20), torch.randn(1, 1, 4, 6, 6), torch.randn(1, 4, 5, 5), torch.randn(1, 11, 9))
    reg = morphnet.GroupLassoFlopsRegularizer(net, xs, threshold=0.0, prune_outputs=True)
    assert reg.get_cost().item() == counted_flops(net, *xs)
    # a linear layer on 11 tokens costs 11 times one on a vector
    assert reg.get_cost(["fc"]).item() == 11 * 2 * 9 * 7


def test_instance_norm_passes_channels_through():
    net = Normalized(nn.InstanceNorm2d(8, affine=False))
    x = torch.randn(2, 3, 4, 4)
    reg = morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0)
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"conv": 8}
    assert reg.get_cost().item() == counted_flops(net, x)
    net = Normalized(nn.InstanceNorm2d(8, affine=True))  # its bias is a constant where the conv is zero
    with pytest.warns(UserWarning, match="Nothing is left to regularize"):
        reg = morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0)
    a = reg.analysis
    assert ("norm.weight", 0) in a.alignments and not a.fixed_group[a.group_of[a.module_out_ids["conv"]]].any()
    assert reg.get_cost().item() == counted_flops(net, x)


def test_in_place_write_through_a_view_keeps_channels_fixed():
    class IntoBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(3, 5, 1)
            self.bn_b, self.head = nn.BatchNorm2d(5), nn.Conv2d(13, 2, 1)

        def forward(self, x):
            buf = x.new_zeros(x.shape[0], 8, 4, 4)  # its width comes from code, not from layer a
            buf[:, :, :2] = self.bn(self.a(x))[:, :, :2]
            return self.head(torch.cat([buf, self.bn_b(self.b(x))], 1))

    reg = morphnet.GammaFlopsRegularizer(IntoBuffer(), torch.randn(1, 3, 4, 4), gamma_threshold=0.1)
    assert set(morphnet.StructureExporter(reg).get_alive_counts()) == {"b"}


def test_regularizer_decorator_transforms_group_vectors():
    def double_penalty(alive, reg, factor):
        return alive, reg * factor

    net = TwoBranches()
    x = torch.randn(1, 3, 4, 4)
    plain = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1)
    decorated = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=0.1, regularizer_decorator=double_penalty,
                                               decorator_parameters={"factor": 2.0})
    assert decorated.get_regularization_term().item() == pytest.approx(2 * plain.get_regularization_term().item())
    assert decorated.get_cost().item() == plain.get_cost().item()


def test_in_place_activation_on_a_token_linear_output_stays_prunable():
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))
    reg = morphnet.GroupLassoFlopsRegularizer(net, torch.randn(2, 5, 6), threshold=0.0)
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"0": 12}


def test_shared_submodule_is_analyzed_and_left_on_its_device():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.b2 = self.b

        def forward(self, x):
            return self.c(torch.relu(self.b2(torch.relu(self.b(torch.relu(self.a(x)))))))

    net = Tied()
    reg = morphnet.GroupLassoFlopsRegularizer(net, torch.randn(2, 4), threshold=0.0)
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert reg.get_cost(["b"]).item() == 2 * (2 * 6 * 6)  # called twice
    assert set(reg.analysis.group_of[reg.analysis.weights["b.weight"].out_ids]) == \
        set(reg.analysis.group_of[reg.analysis.weights["a.weight"].out_ids])  # b's output feeds b again


def test_module_with_two_weights_exports_its_first():
    class TwoWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(5, 3, 1, 1))
            self.w2 = nn.Parameter(torch.randn(4, 5, 1, 1))
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(torch.relu(torch.nn.functional.conv2d(torch.relu(nn.functional.conv2d(x, self.w1)), self.w2)))

    reg = morphnet.GroupLassoFlopsRegularizer(TwoWeights(), torch.randn(1, 3, 4, 4), threshold=0.0)
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"": 5}


def test_repeat_along_channels_tiles_their_ids():
    class Repeat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.conv(x).repeat(1, 2, 1, 1))

    reg = morphnet.GroupLassoFlopsRegularizer(Repeat(), torch.randn(1, 3, 4, 4), threshold=0.0)
    head_in = reg.analysis.group_of[reg.analysis.weights["head.weight"].in_ids]
    assert list(head_in) == list(np.tile(_groups(reg, "conv"), 2))


def test_standardized_conv_weight_counts_in_size_and_keeps_its_width():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                         training=True, momentum=0.0).reshape_as(self.weight)
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), StdConv(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1))
    x = torch.randn(1, 3, 4, 4)
    assert morphnet.compute_cost(net, x, "size") == weight_count(net)
    assert morphnet.compute_cost(net, x, "flops") == counted_flops(net, x)
    with pytest.raises(ValueError, match="nothing to regularize"):  # everything touches the computed weight
        morphnet.GroupLassoFlopsRegularizer(net, x, threshold=0.0)
