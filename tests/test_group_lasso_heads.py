"""Group lasso learns attention heads: a head's q, k and v rows are one group-lasso norm (their root mean
square), so the penalty shrinks all of them at once, and a channel's bias is part of its norm.

With the max of the rows (the grouping BatchNorm scales use), the term's gradient reached one row of a head
per step: 800 learning steps of the small ViT example at the strength cap killed MLP units down to the floor
and never a head (docs/benchmarks.md, the ViT example).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphnet
from morphnet.seeds import create_seed
from morphnet.surgery.attention import head_counts
from nets import counted_flops, kill_groups

X16 = torch.randn(1, 3, 16, 16)


def vit16():
    torch.manual_seed(0)
    return create_seed("vit_tiny", image_size=16)


def head_rows(attention: nn.MultiheadAttention, head: int) -> torch.Tensor:
    """Row indices of one head in the packed q / k / v projection."""
    d, e = attention.head_dim, attention.embed_dim
    return torch.cat([torch.arange(part * e + head * d, part * e + (head + 1) * d) for part in range(3)])


def test_the_terms_gradient_reaches_every_row_of_a_head_in_proportion_to_its_weights():
    model = vit16()
    reg = morphnet.GroupLassoFlopsRegularizer(model, X16, threshold=0.1, relative_threshold=True)
    reg.get_regularization_term().backward()
    attention = model.encoder.layers[1].self_attention
    w, g = attention.in_proj_weight.detach(), attention.in_proj_weight.grad
    b, gb = attention.in_proj_bias.detach(), attention.in_proj_bias.grad
    for head in range(attention.num_heads):
        rows = head_rows(attention, head)
        ratio = g[rows] / w[rows]  # d sqrt(mean of squares over the head) / d w: one factor for the whole head
        factor = ratio[0, 0]
        torch.testing.assert_close(ratio, factor.expand_as(ratio), rtol=1e-4, atol=0)
        nonzero = b[rows] != 0
        torch.testing.assert_close(gb[rows][nonzero] / b[rows][nonzero], factor.expand(int(nonzero.sum())),
                                   rtol=1e-4, atol=0)  # and the same for the head's biases
        assert factor > 0


def test_learning_with_group_lasso_removes_whole_heads_and_the_rebuild_is_exact():
    """80 steps on one fixed batch with a strong penalty: heads die (the max grouping kills none here, only
    MLP units), whole heads are removed, and the slim model computes what the learned one does where its
    dead groups are zeroed."""
    model = vit16()
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    reg = morphnet.GroupLassoFlopsRegularizer(model, X16, threshold=0.1, relative_threshold=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(80):
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + 1e-4 * reg.get_regularization_term()).backward()
        optimizer.step()
    counts = reg.alive_counts()
    attention = sorted(k for k in counts if k.endswith("self_attention"))
    assert all(counts[k] % 48 == 0 for k in attention), counts  # whole heads (q, k, v rows of 16 each)
    learned_heads = {k: counts[k] // 48 for k in attention}
    assert sum(learned_heads.values()) < 16, counts  # some head died
    kill_groups(model, reg, (~reg.alive_groups()).numpy())  # below the threshold -> exactly zero
    model.eval()
    slim = morphnet.apply_structure(model, reg, X16, keep_weights=True).eval()
    assert {k: head_counts(slim)[k][0] for k in attention} == learned_heads
    with torch.no_grad():
        expected, got = model(x), slim(x)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert float(reg.get_cost()) == pytest.approx(counted_flops(slim, X16), rel=1e-6)
