"""timm models as seeds (``pip install "torch-morphnet[timm]"``): with every channel alive the FLOP
cost equals FlopCounterMode and the size the weight count; with a quarter of the channel groups
exactly dead, the keep_weights rebuild computes the same function at the predicted FLOPs.
Small inputs and small variants keep each case to a few seconds."""

import pytest
import torch

import morphnet
from nets import counted_flops, weight_count
from test_rebuild_zoo import kill_quarter, regularizer

timm = pytest.importorskip("timm")

# (timm name, input size, source, constructor arguments): one model per family
FAMILIES = [
    ("resnet18d", 64, "gamma", {}),  # ResNet-D: deep stem, average-pool shortcut downsampling
    ("efficientnet_b0", 64, "gamma", {}),  # depthwise convs, squeeze-and-excitation, SiLU
    ("regnety_002", 64, "gamma", {}),  # grouped convs, squeeze-and-excitation
    ("convnext_atto", 64, "group_lasso", {}),  # LayerNorm2d, depthwise 7x7, layer scale
    ("vit_tiny_patch16_224", 32, "group_lasso", {"img_size": 32, "depth": 4}),  # attention, MLP hidden width
    # rotary embeddings (interleaved pairs; mixed: learned per-head frequencies), heads pruned whole
    ("vit_small_patch16_rope_224", 32, "group_lasso", {"img_size": 32, "depth": 2}),
    ("vit_small_patch16_rope_mixed_224", 32, "group_lasso", {"img_size": 32, "depth": 2}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,size,source,kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_timm_costs_are_exact_and_dead_channels_rebuild_exactly(name, size, source, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    if source == "gamma":
        flops = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.0)
        size_reg = morphnet.GammaModelSizeRegularizer(model, x, gamma_threshold=0.0)
    else:
        flops = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=0.0)
        size_reg = morphnet.GroupLassoModelSizeRegularizer(model, x, threshold=0.0)
    seed_flops = counted_flops(model, x)
    assert flops.get_cost().item() == seed_flops
    assert size_reg.get_cost().item() == weight_count(model)

    reg = regularizer(model, x, source)
    kill_quarter(model, reg, source)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True)
    assert type(slim) is type(model)
    with torch.no_grad():
        want, got = model(x), slim.eval()(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert counted_flops(slim, x) == reg.get_cost().item() < seed_flops


def test_rotary_attention_heads_are_pruned_whole():
    """timm's AttentionRope: the rotary embedding pairs channels inside a head, so whole heads are channel
    groups (q, k and v rows of a head with the output projection's columns); removing some keeps the
    others' pairs and computes the same function. (The 'mixed' variant learns frequencies per head in a
    model-level table that the analysis does not slice with the heads: its heads stay, MLPs prune.)"""
    from morphnet.surgery.attention import head_counts

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, num_classes=10, img_size=32,
                              depth=2).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    a, qkv = reg.analysis, ("blocks.0.attn.qkv.weight", 0)
    groups = a.group_of[a.alignments[qkv]]
    assert len(set(groups.tolist())) == model.blocks[0].attn.num_heads == 6  # one group per head
    assert reg.grouping.regularized[groups].all()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.view(3, 6, 64, -1)[:, [1, 4]] = 0  # heads 1 and 4 of block 0
        model.blocks[0].attn.qkv.bias.view(3, 6, 64)[:, [1, 4]] = 0
        want = model(x)
    slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    assert head_counts(slim)["blocks.0.attn"] == (4, 64) and head_counts(slim)["blocks.1.attn"] == (6, 64)
    with torch.no_grad():
        got = slim(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert counted_flops(slim, x) == reg.get_cost().item()
