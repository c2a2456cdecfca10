"""RMSNorm written out in Python (Hugging Face's LlamaRMSNorm: ``x * rsqrt(x.pow(2).mean(-1, keepdim=True)
+ eps) * weight``) is treated as the fused ``rms_norm``: the channels it normalizes (a transformer's
residual width) stay fixed by default and become prunable with ``prune_normalized=True``. Any other use
of a reduction over channels keeps them fixed. A rebuild that removes some of them differs from the
original only by the statistic: with the original divisor put back it computes the same function.
"""

import types
import warnings

import numpy as np
import pytest
import torch
from nets import counted_flops, kill_groups, random_dead_groups
from torch import nn

import morphnet
from morphnet.channels.coverage import ZeroPass, covered_groups

EPS = 1e-6


class RMS(nn.Module):
    """RMSNorm in Python; ``variant`` says how (the recognized forms, and forms that deviate)."""

    def __init__(self, width: int, variant: str = "llama"):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(width))
        self.variant = variant
        self.divisor = None  # set in a rebuilt copy: the original width, to compare functions

    def forward(self, h):
        v = self.variant
        if self.divisor is not None:  # mean over the original width (removed channels count as zeros)
            return self.weight * (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.divisor + EPS))
        if v == "torch":  # on CPU its aten op decomposes into the chain below (add_ for + eps)
            return nn.functional.rms_norm(h, (h.shape[-1],), self.weight, EPS)
        if v == "t5":  # T5LayerNorm: the statistic in float32, the product with x itself
            var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return self.weight * (h * torch.rsqrt(var + EPS)).to(h.dtype)
        hf = h.to(torch.float32)
        square = hf * hf if v == "square" else hf.pow(2)
        if v == "tokens":  # the statistic over tokens and channels
            var = square.mean((-2, -1), keepdim=True)
        elif v == "sum":  # an L2 normalization: not recognized
            var = square.sum(-1, keepdim=True)
        else:
            var = square.mean(-1, keepdim=True)
        y = torch.relu(hf) if v == "other" else hf  # "other": the statistic of x scales another tensor
        out = self.weight * (y * torch.rsqrt(var + EPS)).to(h.dtype)
        if v == "leak":  # the statistic also read outside the normalization
            out = out + var
        return out


class Net(nn.Module):
    """A residual stream (from ``embed``) normalized by RMS before each reader, like a pre-norm transformer."""

    def __init__(self, variant: str = "llama", width: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.norm1 = RMS(width, variant)
        self.fc1 = nn.Linear(width, 32)
        self.fc2 = nn.Linear(32, width)
        self.norm2 = RMS(width, variant)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(torch.relu(self.fc1(self.norm1(h))))
        return self.head(self.norm2(h))


def _residual(reg) -> np.ndarray:
    a = reg.analysis
    return a.group_of[a.weights["embed.weight"].out_ids]


def _regs(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6),
                morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6, prune_normalized=True))


@pytest.mark.parametrize("variant", ["llama", "square", "torch"])
def test_the_residual_width_is_fixed_by_default_and_prunable_with_prune_normalized(variant):
    torch.manual_seed(0)
    model, x = Net(variant).eval(), torch.randn(2, 5, 8)
    exact, normalized = _regs(model, x)
    assert exact.analysis.fixed_group[_residual(exact)].all() and not exact.analysis.normalized
    groups = _residual(normalized)
    assert not normalized.analysis.fixed_group[groups].any()
    assert normalized.grouping.regularized[groups].all() and len(set(groups.tolist())) == 16
    a = normalized.analysis
    assert all(np.array_equal(a.group_of[ids], groups) for ids in a.normalized) and len(a.normalized) == 2
    for norm in ("norm1", "norm2"):  # its weight follows the channels
        assert np.array_equal(a.group_of[a.alignments[(f"{norm}.weight", 0)]], groups)
    assert normalized.get_cost().item() == exact.get_cost().item() == counted_flops(model, x)


@pytest.mark.parametrize("variant", ["llama", "t5"])
def test_in_half_precision_the_dtype_copies_around_the_statistic_are_followed(variant):
    torch.manual_seed(0)
    model, x = Net(variant).to(torch.bfloat16).eval(), torch.randn(2, 5, 8, dtype=torch.bfloat16)
    exact, normalized = _regs(model, x)
    assert any(n.name == "aten._to_copy.default" for n in normalized.analysis.graph.nodes if n.module == "norm1")
    assert exact.analysis.fixed_group[_residual(exact)].all()
    assert normalized.grouping.regularized[_residual(normalized)].all()


@pytest.mark.parametrize("variant", ["tokens", "sum", "leak", "other"])
def test_a_reduction_over_channels_that_is_not_the_rmsnorm_statistic_keeps_them_fixed(variant):
    torch.manual_seed(0)
    model, x = Net(variant).eval(), torch.randn(2, 5, 8)
    exact, normalized = _regs(model, x)
    for reg in (exact, normalized):
        assert reg.analysis.fixed_group[_residual(reg)].all() and not reg.analysis.normalized
    assert normalized.get_cost().item() == exact.get_cost().item()


def test_a_statistic_read_by_something_else_before_the_normalization_keeps_them_fixed():
    class Peek(RMS):
        def forward(self, h):
            var = h.pow(2).mean(-1, keepdim=True)
            scale = torch.rsqrt(var + EPS)
            return self.weight * (h * scale) * scale.mean()  # the scale is read twice

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 8)
    model.norm1 = Peek(16)
    _, normalized = _regs(model, x)
    assert normalized.analysis.fixed_group[_residual(normalized)].all()


@pytest.mark.parametrize("variant", ["llama", "torch"])
def test_zeros_in_stay_zeros_out_of_the_rmsnorm_for_the_coverage_pass(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), RMS(16, variant), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6, prune_normalized=True).analysis
    zero = a.zero_points["0.weight"]
    groups = a.group_of[a.weights["0.weight"].out_ids]
    assert covered_groups(a, zero)[groups].all()  # the linear after the norm reads zeros only
    zp = ZeroPass(a, zero)
    zp.run()
    read = next(n for n in a.graph.nodes if n.module == "2" and n.name == "aten.addmm.default")
    assert zp.z(read.tensor_inputs()[1]).all() and len(zp.z(read.tensor_inputs()[1])) == 16


def test_a_rebuild_that_removes_normalized_channels_differs_only_by_the_statistic():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 8)
    reg = _regs(model, x)[1]
    dead, _ = random_dead_groups(reg, 3)
    dead[_residual(reg)[:5]] = True
    kill_groups(model, reg, dead, 0)
    with pytest.warns(UserWarning, match=r"not function-preserving: relative output deviation [0-9.e-]+"):
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)
    width = slim.embed.out_features
    assert width == 16 - int(dead[_residual(reg)].sum())
    assert slim.norm1.weight.shape == slim.norm2.weight.shape == (width,)
    for norm in (slim.norm1, slim.norm2):
        norm.divisor = 16
    with torch.no_grad():
        assert torch.allclose(slim(x), model(x), atol=1e-5)


try:
    import transformers
except ImportError:  # the hand-written modules above still run
    transformers = None
transformers_missing = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


def _llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 96, (2, 12))


@transformers_missing
def test_hf_llama_prune_normalized_makes_its_residual_width_prunable():
    torch.manual_seed(0)
    model, x = _llama()
    full = counted_flops(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shares = [1.0 - morphnet.GroupLassoFlopsRegularizer(model, x, threshold=float("inf"), prune_normalized=p)
                  .get_cost().item() / full for p in (False, True)]
    assert shares[0] < 0.99 <= shares[1]


@transformers_missing
def test_hf_llama_rebuilt_without_some_residual_channels_runs_generates_and_differs_only_by_the_statistic():
    torch.manual_seed(0)
    model, x = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6, prune_normalized=True)
    a = reg.analysis
    residual = a.group_of[a.alignments[("model.norm.weight", 0)]]
    assert reg.grouping.regularized[residual].all() and len(a.normalized) == 5  # 2 per layer, the final norm
    dead, _ = random_dead_groups(reg, 0)
    assert 0 < dead[residual].sum() < len(residual)
    kill_groups(model, reg, dead, 0)
    with torch.no_grad():  # the embedding is no source: zero its dead columns too, to compare functions
        model.model.embed_tokens.weight[:, torch.as_tensor(dead[residual])] = 0
    with pytest.warns(UserWarning, match=r"LlamaForCausalLM is not function-preserving: relative output deviation"):
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)
    width = 32 - int(dead[residual].sum())
    norms = [m for m in slim.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(m.weight.shape == (width,) for m in norms)
    assert slim.model.embed_tokens.embedding_dim == slim.lm_head.in_features == slim.config.hidden_size == width
    assert model.config.hidden_size == 32 and all(layer.hidden_size == width for layer in slim.model.layers)
    assert all(layer.mlp.hidden_size == layer.mlp.gate_proj.in_features == width for layer in slim.model.layers)
    with torch.no_grad():
        tokens = slim.generate(x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 9)

    def original_divisor(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / 32 + self.variance_epsilon))

    for m in norms:
        m.forward = types.MethodType(original_divisor, m)
    with torch.no_grad():
        want, got = model(x).logits, slim(x).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_a_token_embedding_carries_its_columns_but_proves_nothing_dead_without_prune_normalized():
    class Tokens(nn.Module):
        def __init__(self, norm: bool):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.proj = nn.Linear(16, 16)
            self.norm = RMS(16) if norm else nn.Identity()
            self.head = nn.Linear(16, 4)

        def forward(self, t):
            h = self.embed(t)
            return self.head(self.norm(h + self.proj(torch.relu(h))))

    torch.manual_seed(0)
    t = torch.randint(0, 10, (2, 5))
    for norm in (False, True):
        model = Tokens(norm).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reg = morphnet.GroupLassoFlopsRegularizer(model, t, threshold=1e-6, prune_normalized=True)
        a = reg.analysis
        residual = a.group_of[a.weights["proj.weight"].out_ids]
        assert np.array_equal(a.group_of[a.alignments[("embed.weight", 1)]], residual)
        # the embedding is no source: its columns keep the residual non-zero, so only prune_normalized's
        # normalized channels are regularized, and the rebuild then says it is not exact
        assert reg.grouping.regularized[residual].all() == norm and reg.grouping.uncovered[residual].all() != norm
