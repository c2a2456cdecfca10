"""apply_structure on small nets: widths, coupled layers, weights, zero widths, widening, errors."""

import json
import warnings

import pytest
import torch
from torch import nn

import morphnet
from nets import ConcatNet, ResidualNet, counted_flops

X_CONCAT = torch.randn(1, 3, 17, 19)
X8 = torch.randn(1, 3, 8, 8)


def golden_regularizer(model):
    return morphnet.GammaFlopsRegularizer(model, X_CONCAT, gamma_threshold=0.45)


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class Block(nn.Module):
    """pointwise -> depthwise (multiplier ``mult``) -> pointwise, each with BN, plus a residual."""

    def __init__(self, mult=1):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw1 = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16 * mult, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16 * mult)
        self.pw2 = nn.Conv2d(16 * mult, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.pw1(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        x = x + self.bn3(self.pw2(y))
        return self.head(x.mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gconv = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(8, 32)
        self.conv3 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.norm(self.gconv(torch.relu(self.conv1(x))))))


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class LayerScale(nn.Module):
    """A per-channel parameter used in functional code, as in ConvNeXt."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 1)
        self.gamma = nn.Parameter(torch.rand(10, 1, 1) + 0.5)
        self.conv2 = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.conv2(self.gamma * torch.relu(self.conv1(x)))


# ---- counts ----------------------------------------------------------------------------------

def test_counts_give_every_listed_layer_its_width_and_coupled_layers_follow():
    model = ConcatNet()
    slim = morphnet.apply_structure(model, {"conv1": 7, "conv2": 11, "conv3": 10, "conv4": 17}, X_CONCAT)
    assert (slim.conv1.out_channels, slim.conv2.out_channels, slim.conv3.out_channels) == (7, 11, 10)
    assert (slim.bn1.num_features, slim.bn2.num_features, slim.bn4.num_features) == (7, 11, 17)
    assert slim.conv3.in_channels == slim.conv4.in_channels == 18  # through the concat
    assert (slim.head3.in_channels, slim.head4.in_channels, slim.head4.out_channels) == (10, 17, 2)
    assert slim.conv3.weight.shape == (10, 18, 3, 3) and slim.bn3.running_var.shape == (10,)
    # the golden GammaFlops costs of tests/test_golden_costs.py plus the two heads
    assert counted_flops(slim, X_CONCAT) == golden_regularizer(model).get_cost().item()


def test_layers_absent_from_the_counts_keep_their_width():
    slim = morphnet.apply_structure(ConcatNet(), {"conv2": 5}, X_CONCAT)
    assert (slim.conv1.out_channels, slim.conv2.out_channels, slim.conv3.in_channels) == (13, 5, 18)
    assert slim.conv3.out_channels == 29


def test_input_model_is_untouched():
    model = ConcatNet().train()
    before = state_copy(model)
    slim = morphnet.apply_structure(model, {"conv1": 3}, X_CONCAT, keep_weights=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.conv1.out_channels == 13 and model.training and slim.training
    assert type(slim.conv1) is nn.Conv2d and slim.conv1 is not model.conv1


def test_counts_keep_the_first_channels_with_keep_weights():
    model = ConcatNet()
    with pytest.warns(UserWarning, match="keeps the first channels of every narrowed layer"):
        slim = morphnet.apply_structure(model, {"conv1": 4, "conv3": 6}, X_CONCAT, keep_weights=True)
    assert torch.equal(slim.conv1.weight, model.conv1.weight[:4])
    keep_in = torch.cat([torch.arange(4), torch.arange(13, 36)])
    assert torch.equal(slim.conv3.weight, model.conv3.weight[:6, keep_in])
    assert torch.equal(slim.bn1.running_var, model.bn1.running_var[:4])


def test_fresh_init_resets_parameters_and_then_runs_init_fn():
    model = ConcatNet()
    seen = []
    torch.manual_seed(0)
    slim = morphnet.apply_structure(model, {"conv1": 4}, X_CONCAT, init_fn=seen.append)
    assert seen == [slim]
    assert torch.equal(slim.bn1.weight, torch.ones(4))  # gammas of the golden net were 0.8 / 0.2: reset
    assert not torch.equal(slim.conv2.weight, model.conv2.weight)  # even layers whose width did not change
    torch.manual_seed(0)
    again = morphnet.apply_structure(model, {"conv1": 4}, X_CONCAT, init_fn=seen.append)
    assert all(torch.equal(a, b) for a, b in zip(slim.state_dict().values(), again.state_dict().values()))


def test_path_and_pathlike_structures(tmp_path):
    path = tmp_path / "alive.json"
    path.write_text(json.dumps({"conv1": 7, "conv2": 11}))
    for structure in (path, str(path)):
        slim = morphnet.apply_structure(ConcatNet(), structure, X_CONCAT)
        assert slim.conv3.in_channels == 18


def test_exporter_file_round_trip(tmp_path):
    model = ConcatNet()
    reg = golden_regularizer(model)
    path = morphnet.StructureExporter(reg).create_file_and_save_alive_counts(tmp_path, 100)
    from_file = morphnet.apply_structure(model, path, X_CONCAT)
    from_reg = morphnet.apply_structure(model, reg, X_CONCAT)
    assert [p.shape for p in from_file.parameters()] == [p.shape for p in from_reg.parameters()]


# ---- coupled layers ------------------------------------------------------------------------------

def test_residual_layers_must_agree():
    model = ResidualNet()
    slim = morphnet.apply_structure(model, {"conv0": 5, "conv1": 5}, X8)
    assert slim.conv0.out_channels == slim.conv1.out_channels == slim.bn0.num_features == slim.head.in_channels == 5
    with pytest.raises(ValueError, match=r"'conv1'.*coupled with 'conv0'"):
        morphnet.apply_structure(model, {"conv0": 5, "conv1": 6}, X8)


def test_depthwise_conv_follows_its_input_and_its_groups_shrink():
    model = Block()
    slim = morphnet.apply_structure(model, {"pw1": 10}, X8)
    assert (slim.dw.in_channels, slim.dw.out_channels, slim.dw.groups) == (10, 10, 10)
    assert slim.bn2.num_features == slim.pw2.in_channels == 10
    with pytest.raises(ValueError, match="coupled"):
        morphnet.apply_structure(model, {"pw1": 10, "dw": 12}, X8)


def test_depthwise_multiplier_prunes_outputs_in_pairs():
    model = Block(mult=2)
    slim = morphnet.apply_structure(model, {"dw": 12}, X8)
    assert (slim.pw1.out_channels, slim.dw.out_channels, slim.dw.groups, slim.pw2.in_channels) == (6, 12, 6, 12)
    with pytest.raises(ValueError, match="tied blocks of 2"):
        morphnet.apply_structure(model, {"dw": 11}, X8)
    reg = morphnet.GammaFlopsRegularizer(model, X8, gamma_threshold=0.1)
    assert counted_flops(morphnet.apply_structure(model, {"dw": 12}, X8), X8) < reg.get_cost().item()


def test_grouped_conv_keeps_its_groups_and_groupnorm_prunes_whole_groups():
    model = Grouped()
    x = torch.randn(1, 3, 6, 6)
    slim = morphnet.apply_structure(model, {"conv1": 8, "gconv": 16}, x)
    assert (slim.gconv.in_channels, slim.gconv.out_channels, slim.gconv.groups) == (8, 16, 4)
    assert (slim.norm.num_channels, slim.norm.num_groups) == (16, 4)
    assert counted_flops(slim, x) == 2 * 36 * (3 * 9 * 8 + 16 * 2 * 9 + 16 * 4)
    with pytest.raises(ValueError, match="tied blocks of 4"):
        morphnet.apply_structure(model, {"conv1": 6}, x)
    with pytest.raises(ValueError, match="tied blocks of"):
        morphnet.apply_structure(model, {"gconv": 18}, x)


def test_flatten_into_a_linear_layer_keeps_each_channel_block():
    model = FlattenNet().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model.bn.weight[[1, 4]] = 0
        model.bn.bias[[1, 4]] = 0
    reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-3)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert slim.fc1.in_features == 4 * 16
    assert torch.allclose(slim(x), model(x), atol=1e-6)


def test_per_channel_parameters_in_functional_code_are_narrowed():
    model = LayerScale()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        model.conv1.weight[3:6] = 0
        model.conv1.bias[3:6] = 0
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert slim.gamma.shape == (7, 1, 1) and isinstance(slim.gamma, nn.Parameter)
    assert torch.allclose(slim(x), model(x), atol=1e-6)


def test_tied_parameters_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 2)
            self.b2 = self.b  # one module under two names, called twice

        def forward(self, x):
            return self.c(torch.relu(self.b2(torch.relu(self.b(torch.relu(self.a(x)))))))

    slim = morphnet.apply_structure(Tied(), {"a": 3}, torch.randn(2, 4))
    assert slim.b is slim.b2 and slim.b.in_features == slim.b.out_features == 3


class SharedEncoding(nn.Module):
    """A module registered under two names and called once, as CoaT's conv position encodings
    (``cpe1`` and ``serial_blocks1[0].cpe``); the hidden layer ``fc1`` is prunable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.blocks = nn.ModuleList([nn.ModuleDict({"pos": self.pos, "fc1": nn.Conv2d(8, 12, 1),
                                                    "fc2": nn.Conv2d(12, 8, 1)})])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["pos"](x)
            x = x + block["fc2"](torch.relu(block["fc1"](x)))
        return x.mean((2, 3))


def test_a_module_under_two_names_keeps_its_weights_in_the_slim_and_the_original_model():
    model = SharedEncoding().eval()
    reg = morphnet.GroupLassoFlopsRegularizer(model, X8, threshold=1e-6)
    with torch.no_grad():
        model.blocks[0]["fc1"].weight[7:] = 0
        model.blocks[0]["fc1"].bias[7:] = 0
        want = model(X8)
    for structure in (reg, {"blocks.0.fc1": 7}):
        slim = morphnet.apply_structure(model, structure, X8, keep_weights=True).eval()
        for m in (model, slim):
            assert not [n for n, t in m.state_dict().items() if t.is_meta]
        assert slim.pos is slim.blocks[0]["pos"] and slim.blocks[0]["fc1"].out_channels == 7
        with torch.no_grad():
            assert torch.allclose(slim(X8), want, atol=1e-6) and torch.equal(model(X8), want)


# ---- regularizers and keep_weights ---------------------------------------------------------------

def test_regularizer_structure_keeps_the_alive_channels_and_their_statistics():
    model = ConcatNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3, model.bn4):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.bias.normal_()
    reg = golden_regularizer(model)
    slim = morphnet.apply_structure(model, reg, X_CONCAT, keep_weights=True)
    alive = model.bn3.weight.abs() > 0.45
    assert torch.equal(slim.bn3.running_mean, model.bn3.running_mean[alive])
    assert torch.equal(slim.head3.weight, model.head3.weight[:, alive])
    assert counted_flops(slim, X_CONCAT) == reg.get_cost().item()


def test_regularizer_of_another_architecture_is_refused():
    reg = golden_regularizer(ConcatNet())
    with pytest.raises(ValueError, match="different model"):
        morphnet.apply_structure(ResidualNet(), reg, X8)


def test_regularizer_of_another_instance_of_the_same_architecture_is_accepted():
    reg = golden_regularizer(ConcatNet())
    assert morphnet.apply_structure(ConcatNet(gammas=False), reg, X_CONCAT).conv1.out_channels == 7


# ---- zero width ------------------------------------------------------------------------------------

def test_a_linear_layer_may_vanish_and_its_consumer_sees_only_its_bias():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "apply_structure.keep_weights=True. with alive counts")
        slim = morphnet.apply_structure(model, {"2": 0}, x, keep_weights=True)
    assert slim[2].out_features == 0 and slim[4].in_features == 0
    assert torch.equal(slim(x), model[4].bias.expand(2, 3))


def test_a_vanished_concat_branch_keeps_one_channel_with_a_warning():
    with pytest.warns(UserWarning, match="'conv1'.*zero width.*keeping 1 channel"):
        slim = morphnet.apply_structure(ConcatNet(), {"conv1": 0}, X_CONCAT)
    assert slim.conv1.out_channels == 1 and slim.conv3.in_channels == 24


def test_a_dead_residual_branch_keeps_one_dead_channel_and_the_same_function():
    model = ResidualNet(width=6).eval()
    with torch.no_grad():  # every channel of the branch's input is dead
        model.bn0.weight.zero_()
        model.bn0.bias.zero_()
    x = torch.randn(1, 3, 8, 8)

    class Branchy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.mid = nn.Conv2d(6, 6, 1, bias=False)
            self.bnm = nn.BatchNorm2d(6)

        def forward(self, x):
            x0 = self.inner.conv0(x)
            branch = self.inner.conv1(torch.relu(self.bnm(self.mid(torch.relu(self.inner.bn0(x0))))))
            return self.inner.head(torch.relu(self.inner.bn1(x0 + branch)))

    net = Branchy(model).eval()
    with torch.no_grad():
        net.bnm.weight.zero_()
        net.bnm.bias.zero_()
    reg = morphnet.GammaFlopsRegularizer(net, x, gamma_threshold=1e-3)
    with pytest.warns(UserWarning, match="'mid'"):
        slim = morphnet.apply_structure(net, reg, x, keep_weights=True).eval()
    assert slim.mid.out_channels == 1 and slim.inner.conv1.in_channels == 1
    assert slim.inner.conv0.out_channels == 6  # the skip stays
    assert torch.allclose(slim(x), net(x), atol=1e-6)


# ---- widening --------------------------------------------------------------------------------------

def test_counts_above_the_seed_build_fresh_wider_layers():
    model = ConcatNet()
    slim = morphnet.apply_structure(model, {"conv1": 20, "conv3": 40}, X_CONCAT)
    assert (slim.conv1.out_channels, slim.bn1.running_mean.shape[0], slim.conv3.in_channels) == (20, 20, 43)
    assert (slim.conv3.out_channels, slim.head3.in_channels) == (40, 40)
    with pytest.raises(ValueError, match="keep_weights=True needs every width at most"):
        morphnet.apply_structure(model, {"conv1": 20}, X_CONCAT, keep_weights=True)


def test_widening_a_grouped_conv_keeps_groups_equal():
    # gconv's channel j is tied to j + 8, j + 16, j + 24 (conv groups) and GroupNorm ties 4 neighbours:
    # its 32 outputs are 2 blocks of 16
    slim = morphnet.apply_structure(Grouped(), {"conv1": 24, "gconv": 48}, torch.randn(1, 3, 6, 6))
    assert (slim.gconv.in_channels, slim.gconv.out_channels, slim.gconv.groups) == (24, 48, 4)
    assert (slim.norm.num_channels, slim.norm.num_groups) == (48, 12)


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("counts,message", [
    ({"conv9": 3}, r"'conv9' is not a module of ConcatNet; did you mean 'conv4'"),
    ({"bn1": 3}, r"'bn1' is a BatchNorm2d, not a conv or linear layer"),
    ({"conv1": -1}, r"'conv1' asks for -1 channels"),
    ({"conv1": 2.5}, r"count of 'conv1' must be an integer"),
    ({"head3": 1}, r"'head3' asks for 1 channels but 2 of its 2 output channels cannot be pruned"),
])
def test_bad_counts_are_clear_errors(counts, message):
    with pytest.raises(ValueError, match=message):
        morphnet.apply_structure(ConcatNet(), counts, X_CONCAT)


def test_prefix_stripped_names_get_a_hint():
    model = nn.Sequential()
    model.add_module("body", ConcatNet())
    with pytest.raises(ValueError, match="remove_common_prefix"):
        morphnet.apply_structure(model, {"conv1": 3}, X_CONCAT)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        morphnet.apply_structure(ConcatNet(), tmp_path / "nope.json", X_CONCAT)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        morphnet.apply_structure(ConcatNet(), bad, X_CONCAT)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"conv1": "7"}')
    with pytest.raises(ValueError, match="wrong.json.*conv1"):
        morphnet.apply_structure(ConcatNet(), wrong, X_CONCAT)


def test_other_structure_types_are_refused():
    with pytest.raises(TypeError, match="structure must be"):
        morphnet.apply_structure(ConcatNet(), [("conv1", 3)], X_CONCAT)


def test_a_width_stored_in_an_attribute_fails_loudly():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))
            self.width = 8

        def forward(self, x):
            return x * self.scale.view(1, self.width, 1, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.custom = Custom()
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.custom(self.conv(x)))

    with pytest.raises(RuntimeError, match=r"does not run on example_inputs.*'custom' \(Custom\)"):
        morphnet.apply_structure(Net(), {"conv": 4}, torch.randn(1, 3, 4, 4))
