"""With every channel alive, FLOP cost equals FlopCounterMode and size equals the weight count."""

import pytest
import torch
import torchvision

import morphnet
from nets import counted_flops, weight_count

# (name, input size, regularizer family). Gamma where the model has BatchNorm everywhere it matters;
# GroupLasso (threshold 0: every nonzero channel alive) elsewhere.
ZOO = [
    ("resnet18", 64, "gamma"), ("resnet50", 64, "gamma"), ("resnext50_32x4d", 64, "gamma"),
    ("wide_resnet50_2", 32, "gamma"), ("mobilenet_v2", 64, "gamma"), ("mobilenet_v3_small", 64, "gamma"),
    ("mobilenet_v3_large", 64, "gamma"), ("efficientnet_b0", 64, "gamma"), ("mnasnet0_5", 64, "gamma"),
    ("densenet121", 64, "gamma"), ("googlenet", 64, "gamma"), ("inception_v3", 299, "gamma"),
    ("shufflenet_v2_x0_5", 64, "gamma"), ("squeezenet1_1", 64, "group_lasso"), ("vgg11", 64, "group_lasso"),
    ("vgg11_bn", 64, "gamma"), ("alexnet", 64, "group_lasso"), ("regnet_x_400mf", 64, "gamma"),
    ("regnet_y_400mf", 64, "gamma"), ("convnext_tiny", 64, "group_lasso"), ("vit_b_32", 224, "group_lasso"),
    ("swin_t", 224, "group_lasso"),
]


def _build(name):
    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=True, init_weights=False)
    torch.manual_seed(0)
    return torchvision.models.get_model(name, **kwargs)


def _regularizers(model, x, family):
    if family == "gamma":
        return (morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=0.0),
                morphnet.GammaModelSizeRegularizer(model, x, gamma_threshold=0.0))
    return (morphnet.GroupLassoFlopsRegularizer(model, x, threshold=0.0),
            morphnet.GroupLassoModelSizeRegularizer(model, x, threshold=0.0))


@pytest.mark.parametrize("name,size,family", ZOO, ids=[z[0] for z in ZOO])
def test_all_alive_cost_equals_flop_counter_and_weight_count(name, size, family):
    model = _build(name)
    x = torch.randn(1, 3, size, size)
    flops, params = _regularizers(model, x, family)
    assert flops.get_cost().item() == counted_flops(model, x)
    assert params.get_cost().item() == weight_count(model)
    assert flops.cost_name == "FLOPs" and params.cost_name == "ModelSize"
    assert morphnet.StructureExporter(flops).get_alive_counts(), "something must be prunable"


def test_shufflenet_prunes_channels_across_the_shuffle():
    model = _build("shufflenet_v2_x0_5")
    reg = morphnet.GammaFlopsRegularizer(model, torch.randn(1, 3, 64, 64), gamma_threshold=0.0)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert "stage2.1.branch2.0" in counts
    assert "stage2.1.branch2.5" in counts  # concatenated, shuffled and chunked: followed exactly
    assert reg.analysis.fixed_group.mean() <= 0.10


def test_vit_prunes_heads_and_the_mlp_hidden_width():
    model = _build("vit_b_32")
    reg = morphnet.GroupLassoFlopsRegularizer(model, torch.randn(1, 3, 224, 224), threshold=0.0)
    counts = morphnet.StructureExporter(reg).get_alive_counts()
    assert counts and all(k.endswith(("mlp.0", "self_attention")) for k in counts), sorted(counts)[:5]
    assert len(counts) == 24
