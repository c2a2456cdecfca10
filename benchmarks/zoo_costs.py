"""Every torchvision classification model: analysis time, FLOP cost vs FlopCounterMode, size vs weights,
and kill-and-rebuild.

With every channel alive (GroupLasso, threshold 0), ``get_cost()`` of the FLOP regularizer must
equal what FlopCounterMode counts for the convolution and linear ops of one example (eval mode,
MHA fast path off), and the model-size cost must equal the conv + linear weight count.

Kill and rebuild: with the Gamma FLOP regularizer (GroupLasso where no BatchNorm regularizes
anything, or always with ``--source group_lasso``, after random BatchNorm statistics), a random
quarter of the regularized channel groups is made exactly dead (gamma and beta zero; weight rows
and biases zero), the model is rebuilt with
``apply_structure(model, reg, x, keep_weights=True)``, and the slim model must compute the
original's output (relative error < 1e-4) at the FLOPs ``get_cost()`` predicted.

    python benchmarks/zoo_costs.py [NAME ...] [--no-rebuild] [--source auto|group_lasso]
        [--out benchmarks/results/zoo_costs.json]

Names are torchvision models, or ``timm:NAME`` for timm models (randomly initialized; needs
``pip install timm``; transformers and MLP mixers get 224x224 inputs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import morphnet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nets import counted_flops, kill_groups, random_dead_groups, weight_count  # noqa: E402


_TOKEN_MODELS = ("vit", "deit", "swin", "maxvit", "beit", "mixer", "coat", "levit", "eva", "former", "xcit", "cait",
                 "pit", "mlp", "crossvit")


def input_size(name: str) -> int:
    name = name.removeprefix("timm:")
    if any(k in name for k in _TOKEN_MODELS):
        return 224
    return 299 if name.startswith("inception") else 64


def build(name: str) -> torch.nn.Module:
    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=True, init_weights=False)
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[len("timm:"):], pretrained=False, num_classes=10)
    else:
        model = torchvision.models.get_model(name, **kwargs)
    for m in model.modules():  # zero-initialized heads (ViT, MLP-Mixer, CoaT): every output would be 0
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    return model


def randomize_batchnorms(model: torch.nn.Module, seed: int = 2) -> None:
    """Random BatchNorm scales, shifts and statistics, so that a BatchNorm of zeros is not zero: a group-lasso
    group killed where a BatchNorm still reads it would change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def kill_and_rebuild(model: torch.nn.Module, x: torch.Tensor, source: str = "auto") -> dict:
    """Kill a quarter of the regularized groups exactly, rebuild with keep_weights, compare outputs.

    ``source``: 'auto' (Gamma, GroupLasso where no BatchNorm regularizes anything) or 'group_lasso'
    (GroupLasso, with random BatchNorm statistics and shifts first)."""
    reg = None
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        if source == "group_lasso":
            randomize_batchnorms(model)
        else:
            try:
                reg = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-3)
            except ValueError:
                pass
        if reg is None or not reg.grouping.regularized.any():
            reg = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-6)
    model.eval()
    summary = reg.coverage_summary()
    row = {"source": reg.source_name, "regularized_groups": summary["regularized"],
           "uncovered_groups": summary["uncovered"],
           "prunable_layers": len(morphnet.StructureExporter(reg).get_alive_counts())}
    if not summary["regularized"]:
        row.update(rebuild_exact=True, rebuild_note="nothing regularized")
        return row
    dead, _ = random_dead_groups(reg, seed=0)
    kill_groups(model, reg, dead, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers that keep one channel group
        slim = morphnet.apply_structure(model, reg, x, keep_weights=True).eval()
    with torch.no_grad():
        want, got = model(x), slim(x)
    rel = ((got - want).norm() / want.norm()).item()
    predicted, counted = reg.get_cost().item(), counted_flops(slim, x)
    row.update(killed_groups=int(dead.sum()), rel_error=float(f"{rel:.3g}"),
               param_fraction=round(sum(p.numel() for p in slim.parameters()) /
                                    sum(p.numel() for p in model.parameters()), 3),
               rebuild_flops_match=predicted == counted, rebuild_exact=bool(rel < 1e-4 and predicted == counted))
    return row


def check(name: str, rebuild: bool = True, source: str = "auto") -> dict:
    model = build(name)
    x = torch.randn(1, 3, input_size(name), input_size(name), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm nets: group lasso regularizes nothing, costs still count
        start = time.perf_counter()
        try:
            flops = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=0.0)
        except ValueError as e:  # no weight norm reaches a prunable group (weight-standardized convs, gMLP)
            if "nothing to regularize" not in str(e):
                raise
            return nothing_prunable(name, model, x, str(e))
        seconds = time.perf_counter() - start
        size = morphnet.GroupLassoModelSizeRegularizer(model, x, threshold=0.0)
    a = flops.analysis
    row = {"model": name, "input": input_size(name), "build_s": round(seconds, 3),
           "flops": flops.get_cost().item(), "flop_counter": counted_flops(model, x),
           "size": size.get_cost().item(), "weights": weight_count(model),
           "prunable_layers": len(morphnet.StructureExporter(flops).get_alive_counts()),
           "groups": int(a.num_groups), "fixed_group_fraction": round(float(a.fixed_group.mean()), 3)}
    row["exact"] = row["flops"] == row["flop_counter"] and row["size"] == row["weights"]
    if rebuild:
        row.update(kill_and_rebuild(model, x, source))
    return row


def nothing_prunable(name: str, model: torch.nn.Module, x: torch.Tensor, why: str) -> dict:
    """A model no regularizer can prune: the costs of ``morphnet.compute_cost`` are still checked."""
    from morphnet.channels import analyze_model

    start = time.perf_counter()
    a = analyze_model(model, x)
    seconds = time.perf_counter() - start
    row = {"model": name, "input": input_size(name), "build_s": round(seconds, 3),
           "flops": morphnet.compute_cost(model, x, "flops"), "flop_counter": counted_flops(model, x),
           "size": morphnet.compute_cost(model, x, "size"), "weights": weight_count(model), "prunable_layers": 0,
           "groups": int(a.num_groups), "fixed_group_fraction": round(float(a.fixed_group.mean()), 3),
           "source": None, "regularized_groups": 0, "rebuild_exact": True,
           "rebuild_note": f"nothing regularized: {why}"[:300]}
    row["exact"] = row["flops"] == row["flop_counter"] and row["size"] == row["weights"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="torchvision model names (default: all classification models)")
    parser.add_argument("--no-rebuild", action="store_true", help="skip the kill-and-rebuild check")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (default 1)")
    parser.add_argument("--source", choices=["auto", "group_lasso"], default="auto",
                        help="regularizer of the kill-and-rebuild check: 'auto' (Gamma, GroupLasso where no BatchNorm "
                             "regularizes anything) or 'group_lasso' (with random BatchNorm statistics and shifts)")
    parser.add_argument("--out", default="benchmarks/results/zoo_costs.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.names or torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        try:
            rows.append(check(name, rebuild=not args.no_rebuild, source=args.source))
        except Exception as e:  # report every model, refused or not
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"[:300], "exact": False})
        r = rows[-1]
        write(args.out, rows)
        rebuilt = "" if "rebuild_exact" not in r else (
            f" rebuild {r['source']} {'exact' if r['rebuild_exact'] else 'WRONG'}"
            + (f" err {r['rel_error']:.1e} params {r['param_fraction']:.0%}" if "rel_error" in r else
               f" ({r['rebuild_note']})"))
        print(f"{name:22s} " + (f"ERROR {r['error']}" if "error" in r else
              f"{'exact' if r['exact'] else 'MISMATCH'} flops {r['flops']:.0f} / {r['flop_counter']} "
              f"size {r['size']:.0f} / {r['weights']} build {r['build_s']:.2f}s prunable layers "
              f"{r['prunable_layers']} fixed groups {r['fixed_group_fraction']:.0%}{rebuilt}"), flush=True)
    print(f"\n{sum(r['exact'] for r in rows)} of {len(rows)} models exact")
    if not args.no_rebuild:
        print(f"{sum(bool(r.get('rebuild_exact')) for r in rows)} of {len(rows)} rebuilt exactly")


def write(path: str, rows: list[dict]) -> None:
    """Rewritten after every model, so a long run that stops early keeps what it measured."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "rows": rows},
                              indent=2))


if __name__ == "__main__":
    main()
