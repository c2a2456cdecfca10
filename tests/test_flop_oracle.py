"""The pipeline's FlopCounterMode figure counts what the cost convention counts, attention included.

In eval mode under ``no_grad``, ``nn.MultiheadAttention`` takes a fused fast path whose q/k/v and
output projections FlopCounterMode does not see. The pipeline counts with that path off, so on a
transformer "FLOPs (FlopCounterMode)" equals "FLOPs (MorphNet)" (README, "Reading a run folder").
"""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import VisionTransformer

from morphnet.cli.main import main
from morphnet.pipeline.training import count_flops

FACTORY = """
from torchvision.models import VisionTransformer


def build(num_classes=10):
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)
"""


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


def by_hand(hidden=32, mlp=64, tokens=17, layers=2, patches=16, patch_pixels=3 * 8 * 8, classes=10,
            attention=True) -> int:
    """2 x multiply-adds of the patch embedding, the q/k/v and output projections and the MLP of every
    layer on every token, the attention matmuls (q.k^T and attention x v: tokens^2 x hidden each,
    which run in a fused SDPA kernel on CPU that plain FlopCounterMode does not count), and the head
    on the class token."""
    per_layer = tokens * (hidden * 3 * hidden + hidden * hidden + hidden * mlp + mlp * hidden)
    if attention:
        per_layer += 2 * tokens * tokens * hidden
    return 2 * (patches * patch_pixels * hidden + layers * per_layer + hidden * classes)


def eval_no_grad_flops(model, x) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_count_flops_sees_the_attention_input_projection_and_restores_the_fast_path():
    model, x = tiny_vit().train(), torch.randn(1, 3, 32, 32)
    assert torch.backends.mha.get_fastpath_enabled()
    assert count_flops(model, x) == by_hand()
    assert torch.backends.mha.get_fastpath_enabled() and model.training
    # what a plain eval-mode count gives: the fast path hides the q/k/v and output projections, and
    # FlopCounterMode leaves out the fused CPU attention kernel
    assert eval_no_grad_flops(model, x) == by_hand(attention=False) - 2 * 2 * 17 * (32 * 3 * 32 + 32 * 32)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert count_flops(model, x) == by_hand()
        assert not torch.backends.mha.get_fastpath_enabled()  # a user's setting is kept too
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_run_on_a_transformer_prints_equal_flops_from_both_counters(tmp_path, capsys):
    (tmp_path / "vit.py").write_text(FACTORY)
    out = tmp_path / "run"
    assert main(["run", "--model", f"{tmp_path / 'vit.py'}:build", "--data", "synthetic:64", "--regularizer",
                 "group-lasso", "--steps", "4", "--retrain-steps", "2", "--strength", "1e-9", "--no-baseline",
                 "--threads", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for network in ("seed", "slim"):
        assert summary[network]["flops_counted"] == summary[network]["flops"] == by_hand(), network
    rows = {line[:24].strip(): line[24:].split() for line in printed.splitlines() if line.startswith("FLOPs (")}
    assert rows["FLOPs (FlopCounterMode)"] == rows["FLOPs (MorphNet)"]
