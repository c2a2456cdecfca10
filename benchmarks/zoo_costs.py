"""Every torchvision classification model: analysis time, FLOP cost vs FlopCounterMode, size vs weights.

With every channel alive (GroupLasso, threshold 0), ``get_cost()`` of the FLOP regularizer must
equal what FlopCounterMode counts for the convolution and linear ops of one example (eval mode,
MHA fast path off), and the model-size cost must equal the conv + linear weight count.

    python benchmarks/zoo_costs.py [NAME ...] [--out benchmarks/results/zoo_costs.json]

Names are torchvision models, or ``timm:NAME`` for timm models (randomly initialized; needs
``pip install timm``; transformers and MLP mixers get 224x224 inputs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

import morphnet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nets import counted_flops, weight_count  # noqa: E402


_TOKEN_MODELS = ("vit", "deit", "swin", "maxvit", "beit", "mixer", "coat", "levit", "eva", "former", "xcit", "cait",
                 "pit", "mlp", "crossvit")


def input_size(name: str) -> int:
    if any(k in name for k in _TOKEN_MODELS):
        return 224
    return 299 if name.startswith("inception") else 64


def check(name: str) -> dict:
    kwargs = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=True, init_weights=False)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[len("timm:"):], pretrained=False, num_classes=10)
    else:
        model = torchvision.models.get_model(name, **kwargs)
    x = torch.randn(1, 3, input_size(name), input_size(name))
    start = time.perf_counter()
    flops = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=0.0)
    build = time.perf_counter() - start
    size = morphnet.GroupLassoModelSizeRegularizer(model, x, threshold=0.0)
    a = flops.analysis
    row = {"model": name, "input": input_size(name), "build_s": round(build, 3),
           "flops": flops.get_cost().item(), "flop_counter": counted_flops(model, x),
           "size": size.get_cost().item(), "weights": weight_count(model),
           "prunable_layers": len(morphnet.StructureExporter(flops).get_alive_counts()),
           "groups": int(a.num_groups), "fixed_group_fraction": round(float(a.fixed_group.mean()), 3)}
    row["exact"] = row["flops"] == row["flop_counter"] and row["size"] == row["weights"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="torchvision model names (default: all classification models)")
    parser.add_argument("--out", default="benchmarks/results/zoo_costs.json")
    args = parser.parse_args()
    names = args.names or torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        try:
            rows.append(check(name))
        except Exception as e:  # report every model, refused or not
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"[:300], "exact": False})
        r = rows[-1]
        print(f"{name:22s} " + (f"ERROR {r['error']}" if "error" in r else
              f"{'exact' if r['exact'] else 'MISMATCH'} flops {r['flops']:.0f} / {r['flop_counter']} "
              f"size {r['size']:.0f} / {r['weights']} build {r['build_s']:.2f}s prunable layers "
              f"{r['prunable_layers']} fixed groups {r['fixed_group_fraction']:.0%}"), flush=True)
    print(f"\n{sum(r['exact'] for r in rows)} of {len(rows)} models exact")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "rows": rows},
                              indent=2))


if __name__ == "__main__":
    main()
