"""LogisticSigmoidGate sampling and inference, gate insertion, folding and removal."""

import math

import pytest
import torch
from torch import nn

import morphnet
from morphnet.gates import ChannelScale, gated_modules
from nets import ConcatNet, ResidualNet

N = 20000  # channels per sampling test: the standard error of the mean mask is below 0.0035


def sample_mean(logit: float, **options) -> torch.Tensor:
    gate = morphnet.LogisticSigmoidGate(N, keep_first_channel_alive=False, **options)
    with torch.no_grad():
        gate.logits.fill_(logit)
        return gate(torch.ones(2, N, 3, 3))


@pytest.mark.parametrize("logit,want,tol", [(5.5, 0.996, 0.002), (0.5, 0.6, 0.03), (-5.5, 0.004, 0.002)])
def test_mean_mask_is_the_probability_of_the_logit(logit, want, tol):
    torch.manual_seed(0)
    mean = sample_mean(logit).mean().item()
    assert abs(mean - want) < tol
    assert abs(mean - 1 / (1 + math.exp(-logit))) < 3 * math.sqrt(want * (1 - want) / N) + 1e-4


@pytest.mark.parametrize("logit,value", [(-1000.0, 0.0), (1000.0, 1.0)])
def test_extreme_logits_give_exact_masks(logit, value):
    torch.manual_seed(0)
    for straight_through in (False, True):
        out = sample_mean(logit, straight_through=straight_through)
        assert torch.equal(out, torch.full_like(out, value))


def test_one_sample_per_channel_shared_by_batch_and_space():
    torch.manual_seed(0)
    gate = morphnet.LogisticSigmoidGate(64, temperature=1.0)
    x = torch.rand(4, 64, 5, 6) + 0.5
    ratio = gate(x) / x
    assert torch.allclose(ratio, ratio[:1, :, :1, :1].expand_as(ratio))
    assert ratio[0, :, 0, 0].std() > 0.01  # channels differ
    assert torch.equal(gate.noise != 0, torch.ones(64, dtype=torch.bool))  # kept for the regularizer


def test_sampling_is_deterministic_under_manual_seed():
    gate = morphnet.LogisticSigmoidGate(256, temperature=0.5)
    x = torch.ones(1, 256)
    torch.manual_seed(3)
    a = gate(x)
    torch.manual_seed(3)
    b = gate(x)
    c = gate(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_inference_with_large_logits_is_the_identity():
    x = torch.randn(2, 16, 4, 4)
    for soft in (False, True):
        gate = morphnet.LogisticSigmoidGate(16, soft_mask_for_inference=soft).eval()
        with torch.no_grad():
            gate.logits.fill_(1000.0)
        assert torch.equal(gate(x), x)


def test_inference_mask_is_logit_above_zero_optionally_times_probability():
    logits = torch.tensor([-3.0, -1e-4, 1e-4, 0.7, 4.0])
    for soft in (False, True):
        gate = morphnet.LogisticSigmoidGate(5, soft_mask_for_inference=soft, keep_first_channel_alive=False).eval()
        with torch.no_grad():
            gate.logits.copy_(logits)
        want = (logits > 0).float() * (torch.sigmoid(logits) if soft else 1)
        assert torch.equal(gate(torch.ones(1, 5)), want[None])


def test_first_channel_can_be_kept_alive():
    torch.manual_seed(0)
    for training in (True, False):
        gate = morphnet.LogisticSigmoidGate(8).train(training)
        with torch.no_grad():
            gate.logits.fill_(-1000.0)
        assert torch.equal(gate(torch.ones(1, 8)), torch.tensor([[1.0] + [0.0] * 7]))


def test_token_layout_gates_the_last_dim_and_wrong_dim_is_a_clear_error():
    torch.manual_seed(0)
    gate = morphnet.LogisticSigmoidGate(6, channel_dim=-1, temperature=1.0)
    x = torch.rand(2, 9, 6) + 0.5
    ratio = gate(x) / x
    assert torch.allclose(ratio, ratio[:1, :1].expand_as(ratio))
    with pytest.raises(ValueError, match="channel_dim"):
        morphnet.LogisticSigmoidGate(6)(x)


def test_straight_through_is_hard_forward_with_relaxed_gradient():
    torch.manual_seed(0)
    gate = morphnet.LogisticSigmoidGate(500, temperature=1.0, straight_through=True, keep_first_channel_alive=False)
    with torch.no_grad():
        gate.logits.fill_(0.3)
    out = gate(torch.ones(1, 500))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    out.sum().backward()
    assert (gate.logits.grad > 0).all()


def test_temperature_anneals_tenfold_every_annealing_rate_steps():
    gate = morphnet.LogisticSigmoidGate(4, temperature=1.0, annealing_rate=10)
    for _ in range(21):
        gate(torch.ones(1, 4))
    assert gate.num_steps.item() == 21
    assert gate.tau.item() == pytest.approx(0.01)
    assert "num_steps" in gate.state_dict()


def test_invalid_gate_arguments_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        morphnet.LogisticSigmoidGate(4, temperature=0.0)
    with pytest.raises(ValueError, match="num_channels"):
        morphnet.LogisticSigmoidGate(0)


# ---- insertion ----------------------------------------------------------------------------------

def test_gates_go_after_batchnorm_and_keep_names_types_and_state_keys():
    model = ConcatNet()
    keys = set(model.state_dict())
    morphnet.add_gates(model, torch.randn(1, 3, 17, 19), temperature=0.01)
    assert sorted(gated_modules(model)) == ["bn1.gate", "bn2.gate", "bn3.gate", "bn4.gate"]
    assert type(model.bn1) is nn.BatchNorm2d and model.bn3.gate.num_channels == 29
    assert model.bn1.gate.temperature == 0.01
    assert set(model.state_dict()) == keys | {f"bn{i}.gate.logits" for i in range(1, 5)}


def test_every_path_of_a_residual_group_is_gated():
    """conv0 feeds bn0 and the add, so it is gated itself; conv1 feeds the add; the head is fixed."""
    model = morphnet.add_gates(ResidualNet(), torch.randn(2, 3, 8, 8))
    assert sorted(gated_modules(model)) == ["bn0.gate", "bn1.gate", "conv0.gate", "conv1.gate"]


def test_where_restricts_the_gated_layers_and_must_match():
    x = torch.randn(1, 3, 17, 19)
    model = morphnet.add_gates(ConcatNet(), x, where=["conv3", r"^bn4$"])
    assert sorted(gated_modules(model)) == ["bn3.gate", "bn4.gate"]
    with pytest.raises(ValueError, match="matches no layer"):
        morphnet.add_gates(ConcatNet(), x, where=["nothing"])
    with pytest.raises(ValueError, match="already has gates"):
        morphnet.add_gates(model, x)


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (N, tokens, 8)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))).mean(1))


def test_linear_layers_on_tokens_get_last_dim_gates():
    model = morphnet.add_gates(TokenMLP(), torch.randn(1, 5, 8))
    assert sorted(gated_modules(model)) == ["fc1.gate", "fc2.gate"]
    assert model.fc1.gate.channel_dim == -1
    model(torch.randn(3, 5, 8)).sum().backward()
    assert model.fc1.gate.logits.grad is not None


# ---- folding and removal ------------------------------------------------------------------------

class NoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6, affine=False)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.bn(self.conv(x)))))


def random_logits(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gated_modules(model).values():
            gate.logits.copy_(torch.randn(gate.logits.shape, generator=gen) * 3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("net,shape", [(ConcatNet, (2, 3, 17, 19)), (ResidualNet, (2, 3, 8, 8)),
                                       (TokenMLP, (2, 5, 8)), (NoAffine, (2, 3, 8, 8))])
def test_folding_keeps_the_eval_function_and_removes_the_gates(net, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = morphnet.add_gates(net(), x, soft_mask_for_inference=net is ResidualNet)
    random_logits(model)
    model.eval()
    with torch.no_grad():
        want = model(x)
        morphnet.fold_gates(model)
        got = model(x)
    assert not gated_modules(model)
    assert torch.allclose(got, want, atol=1e-6) if isinstance(got, torch.Tensor) else all(
        torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    scales = [m for m in model.modules() if isinstance(m, ChannelScale)]
    assert len(scales) == (1 if net is NoAffine else 0)  # BatchNorm without affine keeps a fixed scale


def test_gates_take_the_dtype_of_their_host_even_without_parameters():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = morphnet.add_gates(NoAffine().double(), x)
    assert model.bn.gate.logits.dtype == torch.float64 and model(x).dtype == torch.float64


def test_a_folded_fixed_scale_is_still_mapped_by_the_analysis():
    x = torch.randn(2, 3, 8, 8)
    model = morphnet.fold_gates(morphnet.add_gates(NoAffine(), x))
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    a = reg.analysis
    assert not a.fixed_group[a.group_of[a.module_out_ids["conv"]]].any()  # mapped through the scale
    # but zero conv rows are not zero after BatchNorm(affine=False) in eval mode ((0 - mean) / std)
    assert reg.coverage_summary()["uncovered_layers"] == ["conv"]
    assert morphnet.StructureExporter(reg).get_alive_counts() == {"up": 4}


def test_remove_gates_restores_the_original_modules_and_state():
    x = torch.randn(2, 3, 8, 8)
    model = ResidualNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    morphnet.remove_gates(morphnet.add_gates(model, x))
    assert not gated_modules(model) and all(not m._forward_hooks for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_hand_placed_gates_fold_to_a_scale_and_remove_to_identity():
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 5, 1), morphnet.LogisticSigmoidGate(5), nn.Conv2d(5, 2, 1)).eval()
    random_logits(model)
    with torch.no_grad():
        want = model(x)
    folded = morphnet.fold_gates(__import__("copy").deepcopy(model))
    assert isinstance(folded[1], ChannelScale) and torch.allclose(folded(x), want)
    assert isinstance(morphnet.remove_gates(model)[1], nn.Identity)


def test_analysis_leaves_a_gated_model_as_it_found_it():
    x = torch.randn(2, 3, 17, 19)
    model = morphnet.add_gates(ConcatNet(), x, annealing_rate=100)
    model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    noise = model.bn1.gate.noise.clone()
    rng = torch.get_rng_state()
    morphnet.LogisticSigmoidFlopsRegularizer(model, x)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(model.bn1.gate.noise, noise)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
