"""How much of a model's compute MorphNet can remove: the prunable FLOP share.

For each model, with the public API: share = 1 - cost(every regularized group dead) /
cost(every group alive), both from ``GroupLassoFlopsRegularizer.get_cost()`` (FLOPs,
attention matmuls included), with the threshold at infinity (every regularized group dead)
and at 0 (every group alive); ``prunable_flop_share_normalized`` is the same with
``prune_normalized=True`` (LayerNorm'd or RMSNorm'd residual widths prunable too, not function-preserving
on rebuild); ``prunable_flop_share_gamma`` with ``GammaFlopsRegularizer`` (BatchNorm scales as
the evidence; None for a model without BatchNorm), since group lasso proves nothing for channels
read through a BatchNorm. Also recorded: the fraction of channel groups kept fixed,
the number of prunable conv / linear layers, and whether the all-alive cost equals
FlopCounterMode's count (with the fused CPU attention kernel counted by PyTorch's own SDPA
formula, as ``get_cost`` counts it). What stays is what the analysis keeps fixed on purpose:
LayerNorm'd residual streams, stems, the model's output width.

Models are randomly initialized (no weights are downloaded). timm models are skipped with a
note when timm is not installed.

    python benchmarks/prunable_share.py [--quick] [--out PATH] [--device cpu] [MODEL ...]

MODEL is a torchvision name, ``timm:NAME``, ``hf:llama_tiny`` (a 4-layer Hugging Face Llama, 64 tokens),
or ``NAME@SIZE`` for another input size (tokens for ``hf:``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from common import RESULTS, environment, write_results
from torch.utils import flop_counter

import morphnet

FULL = ["vit_b_16", "timm:deit_tiny_patch16_224", "swin_t", "convnext_tiny", "shufflenet_v2_x1_0",
        "shufflenet_v2_x0_5", "timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224", "hf:llama_tiny"]
QUICK = ["tiny_vit@32", "shufflenet_v2_x0_5@64", "swin_t@64"]

FUSED_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                   lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)}


def build(spec: str) -> tuple[torch.nn.Module, int] | None:
    """The model and its input size for ``spec``; None when its framework is missing."""
    name, _, size = spec.partition("@")
    torch.manual_seed(0)
    if name == "tiny_vit":  # a small torchvision VisionTransformer, for the quick mode
        import torchvision

        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                     hidden_dim=64, mlp_dim=128, num_classes=10)
        return model, int(size or 32)
    if name == "hf:llama_tiny":  # Hugging Face Llama from a small config (grouped-query, RoPE): tokens
        try:
            import transformers
        except ImportError:
            return None
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                                          bos_token_id=0, eos_token_id=0)
        return transformers.LlamaForCausalLM(config), int(size or 64)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            return None
        return timm.create_model(name[5:], num_classes=10), int(size or 224)
    import torchvision

    return torchvision.models.get_model(name, num_classes=10), int(size or 224)


def counted_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's total per example in eval mode (MHA fast path off, fused CPU SDPA counted)."""
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=FUSED_ATTENTION) as counter, torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return counter.get_total_flops() // x.shape[0]


def gamma_share(model: torch.nn.Module, x: torch.Tensor, full: float) -> float | None:
    """The same share with BatchNorm scales as the evidence (GammaFlops); None without BatchNorms.
    Group lasso proves nothing for channels read through a BatchNorm (its shift)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dead = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=float("inf"))
        except ValueError:
            return None
    return round(1.0 - dead.get_cost().item() / full, 4)


def measure(spec: str) -> dict | None:
    built = build(spec)
    if built is None:
        return None
    model, size = built
    x = torch.randint(0, 256, (1, size)) if spec.startswith("hf:") else torch.randn(1, 3, size, size)
    start = time.perf_counter()
    alive = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=0.0)
    dead = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=float("inf"))
    seconds = time.perf_counter() - start
    full, rest = alive.get_cost().item(), dead.get_cost().item()
    normalized = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=float("inf"), prune_normalized=True)
    a = alive.analysis
    return {"model": spec, "input": size, "flops": full, "flops_all_dead": rest,
            "prunable_flop_share": round(1.0 - rest / full, 4),
            "prunable_flop_share_normalized": round(1.0 - normalized.get_cost().item() / full, 4),
            "prunable_flop_share_gamma": gamma_share(model, x, full),
            "fixed_group_fraction": round(float(a.fixed_group.mean()), 3), "groups": int(a.num_groups),
            "prunable_layers": len(morphnet.StructureExporter(alive).get_alive_counts()),
            "exact": full == counted_flops(model, x), "analysis_s": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="models to measure (default: the full list, or the quick one)")
    parser.add_argument("--quick", action="store_true", help="small models at small inputs (seconds)")
    parser.add_argument("--out", default=str(RESULTS / "prunable_share.json"))
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="the analysis runs on CPU only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = args.models or (QUICK if args.quick else FULL)
    rows, skipped = [], []
    for spec in specs:
        row = measure(spec)
        if row is None:
            skipped.append(spec)
            print(f"{spec}: skipped (timm / transformers is not installed)", flush=True)
            continue
        rows.append(row)
        print(f"{spec:36s} prunable FLOP share {row['prunable_flop_share']:.4f} "
              f"(prune_normalized {row['prunable_flop_share_normalized']:.4f}, gamma "
              f"{row['prunable_flop_share_gamma']})  fixed groups "
              f"{row['fixed_group_fraction']:.1%}  prunable layers {row['prunable_layers']}  "
              f"exact {row['exact']}  ({row['analysis_s']} s)", flush=True)
    write_results(args.out, {"environment": environment(torch.device("cpu")), "skipped": skipped, "rows": rows},
                  rows)


if __name__ == "__main__":
    main()
