"""timm's EvaAttention (EVA-02, the vit_*_rope_reg* ViTs): heads are pruned whole, exactly.

Its fused projection adds a joined bias, ``torch.cat((q_bias, k_bias, v_bias))`` (k_bias a zero buffer):
each part goes with its rows of the projection, so the rebuild slices all three with the heads, and group
lasso sees the parts as the biases of their rows (a head whose rows are zero but whose v_bias is not
still outputs a constant the projection reads: alive); added after the projection (``qkv_bias_separate``) it
is folded into the projection's bias the same way. Its forward merges the heads back to the input
width, so a rebuilt module with fewer heads gets a forward that merges them to num_heads * head_dim.
"""

import pytest
import torch

import morphnet
from morphnet.surgery.attention import _eva_attention_forward, _slim_class, head_counts
from nets import counted_flops, kill_groups, random_dead_groups

timm = pytest.importorskip("timm")
from timm.models.eva import EvaAttention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [("eva02_tiny_patch14_224", 56), ("vit_medium_patch16_rope_reg1_gap_256", 64)]
IDS = [name for name, _ in MODELS]


def eva(name: str, size: int, **kwargs):
    """A two-block model with biases that are not zero by accident (EVA initializes them to zero)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size, depth=2, **kwargs).eval()
    with torch.no_grad():
        for attention in attentions(model):
            for bias in biases(attention):
                bias.normal_(0, 0.1)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def attentions(model):
    return [m for m in model.modules() if isinstance(m, EvaAttention)]


def biases(attention):
    """The trainable q / v biases (k has none: a zero buffer, or a projection without bias)."""
    if attention.qkv is not None:
        return [b for b in (attention.q_bias, attention.v_bias) if b is not None]
    return [p.bias for p in (attention.q_proj, attention.v_proj) if p.bias is not None]


def kill_heads(attention, heads: list[int]) -> None:
    """Zero the q, k and v rows and the q / v biases of ``heads``."""
    h, d = attention.num_heads, attention.head_dim
    with torch.no_grad():
        if attention.qkv is not None:
            attention.qkv.weight.view(3, h, d, -1)[:, heads] = 0
        else:
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                projection.weight.view(h, d, -1)[heads] = 0
        for bias in biases(attention):
            bias.view(h, d)[heads] = 0


def relative_error(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name,size", MODELS, ids=IDS)
def test_eva_heads_are_channel_groups_and_removed_exactly(name, size):
    model, x = eva(name, size)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    seed_flops = counted_flops(model, x)
    assert reg.get_cost().item() == seed_flops
    a = reg.analysis
    h, d = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    for i in range(2):
        groups = a.group_of[a.alignments[(f"blocks.{i}.attn.qkv.weight", 0)]]
        per_head = groups.reshape(3, h, d)
        assert (per_head == per_head[:1, :, :1]).all()  # q, k and v rows of a head: one group
        assert len(set(groups.tolist())) == h  # one group per head
        assert reg.grouping.regularized[groups].all()
        for part, first in (("q_bias", 0), ("k_bias", h * d), ("v_bias", 2 * h * d)):  # each part with its rows
            assert (a.group_of[a.alignments[(f"blocks.{i}.attn.{part}", 0)]] == groups[first:first + h * d]).all()
    assert a.bias_parts("blocks.0.attn.qkv.weight") == [
        ("blocks.0.attn.q_bias", 0), ("blocks.0.attn.k_bias", h * d), ("blocks.0.attn.v_bias", 2 * h * d)]

    kill_heads(model.blocks[0].attn, [0, h - 1])
    kill_heads(model.blocks[1].attn, [1])
    assert reg.alive_counts()["blocks.0.attn.qkv"] == 3 * (h - 2) * d
    with torch.no_grad():
        want = model(x)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert head_counts(slim) == {"blocks.0.attn": (h - 2, d), "blocks.1.attn": (h - 1, d)}
    assert slim.blocks[0].attn.q_bias.shape == slim.blocks[0].attn.k_bias.shape == ((h - 2) * d,)
    with torch.no_grad():
        got = slim(x)
    assert relative_error(got, want) < 1e-5
    assert counted_flops(slim, x) == reg.get_cost().item() < seed_flops


@pytest.mark.parametrize("name,size,separate", [(*m, False) for m in MODELS] + [(*MODELS[0], True)],
                         ids=IDS + ["bias_added_after_the_projection"])
def test_a_head_whose_v_bias_lives_is_not_dead(name, size, separate):
    """Zero q, k and v rows with a non-zero v_bias entry: v is that constant, which the output projection
    reads, so the head is alive and the rebuild keeps it."""
    model, x = eva(name, size)
    for attention in attentions(model):
        attention.qkv_bias_separate = separate
    attention = model.blocks[0].attn
    h, d = attention.num_heads, attention.head_dim
    kill_heads(attention, [0])
    with torch.no_grad():
        attention.v_bias.view(h, d)[0, 3] = 0.5
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    a = reg.analysis
    head = a.group_of[a.alignments[("blocks.0.attn.v_bias", 0)][3]]
    assert reg.alive_groups()[head]
    assert reg.alive_counts()["blocks.0.attn.qkv"] == 3 * h * d
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert head_counts(slim)["blocks.0.attn"] == (h, d)
    with torch.no_grad():
        assert relative_error(slim(x), model(x)) < 1e-6
        attention.v_bias.view(h, d)[0, 3] = 0  # now the head is dead
    assert not reg.alive_groups()[head]
    assert reg.alive_counts()["blocks.0.attn.qkv"] == 3 * (h - 1) * d


@pytest.mark.parametrize("name,size", MODELS, ids=IDS)
def test_a_quarter_of_the_groups_dead_rebuilds_exactly(name, size):
    """Heads and MLP units together (``kill_groups`` zeroes each part of the joined bias with its rows)."""
    model, x = eva(name, size)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    dead, _ = random_dead_groups(reg, seed=0)
    kill_groups(model, reg, dead)
    a = reg.analysis
    assert dead[a.group_of[a.alignments[("blocks.0.attn.qkv.weight", 0)]]].any()  # some head dies
    assert not reg.alive_groups().numpy()[dead].any()
    with torch.no_grad():
        want = model(x)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    with torch.no_grad():
        got = slim(x)
    assert relative_error(got, want) < 1e-5
    assert counted_flops(slim, x) == reg.get_cost().item() < counted_flops(model, x)


VARIANTS = {
    "separate_projections": ({"qkv_fused": False}, None),
    "qk_norm": ({"qk_norm": True}, None),
    "explicit_attention": ({}, lambda m: setattr(m, "fused_attn", False)),
    "all_heads_of_a_block": ({}, None),
    # the joined bias added to the projection's output (folded into the projection's bias)
    "bias_added_after_the_projection": ({}, lambda m: setattr(m, "qkv_bias_separate", True)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eva_variants_rebuild_exactly(variant):
    kwargs, tweak = VARIANTS[variant]
    model, x = eva("eva02_tiny_patch14_224", 56, **kwargs)
    for attention in attentions(model):
        if tweak is not None:
            tweak(attention)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    assert reg.get_cost().item() == counted_flops(model, x)
    h, d = model.blocks[0].attn.num_heads, model.blocks[0].attn.head_dim
    dead = list(range(h)) if variant == "all_heads_of_a_block" else [1]
    kill_heads(model.blocks[0].attn, dead)
    with torch.no_grad():
        want = model(x)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert head_counts(slim)["blocks.0.attn"] == (h - len(dead), d)
    with torch.no_grad():
        got = slim(x)
    assert relative_error(got, want) < 1e-5
    assert counted_flops(slim, x) == reg.get_cost().item()


CONFIGS = {
    "fused_qkv_rope_prefix": dict(qkv_fused=True, num_prefix_tokens=1),
    "half_rotation_two_prefix": dict(qkv_fused=True, rotate_half=True, num_prefix_tokens=2),
    "bias_separate": dict(qkv_fused=True, qkv_bias_separate=True),
    "separate_gated_scale_norm": dict(qkv_fused=False, gated=True, scale_norm=True, qk_norm=True),
    "no_bias": dict(qkv_bias=False),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused", [True, False])
def test_the_slim_forward_computes_what_timms_does(config, fused):
    """With every head kept, the rebuild's forward equals EvaAttention's own: projections and biases,
    q / k norms, rotary embedding after the prefix tokens, scale, mask, output norm and gate."""
    torch.manual_seed(0)
    attention = EvaAttention(32, num_heads=4, norm_layer=torch.nn.LayerNorm, **CONFIGS[config]).eval()
    attention.fused_attn = fused
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.3)
    prefix = attention.num_prefix_tokens
    x = torch.randn(2, 7, 32)
    rope = torch.randn(7 - prefix, 2 * attention.head_dim)
    mask = torch.randn(2, 1, 7, 7)
    slim = _slim_class(EvaAttention, _eva_attention_forward)
    with torch.no_grad():
        for kwargs in ({"rope": rope}, {"rope": rope, "attn_mask": mask}, {}, {"is_causal": True}):
            want = attention(x, **kwargs)
            attention.__class__ = slim
            got = attention(x, **kwargs)
            attention.__class__ = EvaAttention
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_proximal_step_shrinks_the_q_and_v_biases_with_their_heads():
    """The joined bias's trainable parts shrink with their rows; the zero k_bias buffer is a constant."""
    model, x = eva("eva02_tiny_patch14_224", 56)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    prox = morphnet.ProximalStep(reg)
    attention = model.blocks[0].attn
    assert not any(p is attention.k_bias for p in prox._params)
    assert any(p is attention.v_bias for p in prox._params)
    prox.step(1e9, 1.0)  # past every group's norm: all regularized rows and their biases reach zero
    assert attention.qkv.weight.abs().sum() == attention.q_bias.abs().sum() == attention.v_bias.abs().sum() == 0
    assert reg.alive_counts()["blocks.0.attn.qkv"] == 0


def test_an_eva_attention_of_an_older_timm_keeps_its_heads(monkeypatch):
    """The rebuilt forward follows timm's current EvaAttention (masks through ``resolve_self_attn_mask``);
    without it the heads stay fixed, the safe behaviour."""
    import timm.layers

    monkeypatch.delattr(timm.layers, "resolve_self_attn_mask")
    model, x = eva("eva02_tiny_patch14_224", 56)
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    a = reg.analysis
    assert a.fixed_group[a.group_of[a.alignments[("blocks.0.attn.qkv.weight", 0)]]].all()
    assert reg.get_cost().item() == counted_flops(model, x)
