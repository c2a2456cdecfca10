"""Analysis time and regularization-term op count versus depth.

For ResNet-18/50/101/152, DenseNet-121/201 and a synthetic chain of N conv+BN layers:
time to build a GammaFlopsRegularizer (median of three builds; 224x224 input for the
torchvision models) and the number of non-view aten ops dispatched by
``get_regularization_term()`` and its backward (Gamma and GroupLasso). Prints a table and
writes JSON (and the rows as CSV beside it).

    python benchmarks/scaling.py [--quick] [--out benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torchvision
from common import environment, write_results
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import morphnet


class OpCounter(TorchDispatchMode):
    """Counts aten ops that are not views (views launch no kernels)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def term_ops(reg) -> int:
    counter = OpCounter()
    with counter:
        reg.get_regularization_term().backward()
    return counter.count


def chain(n: int) -> nn.Module:
    layers = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    for _ in range(n - 1):
        layers += [nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    layers += [nn.Conv2d(16, 10, 1)]
    return nn.Sequential(*layers)


def measure(name: str, model: nn.Module, x: torch.Tensor) -> dict:
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    builds = []
    for _ in range(3):  # median of three builds: the first one also pays one-off warm-up costs
        start = time.perf_counter()
        gamma = morphnet.GammaFlopsRegularizer(model, x, gamma_threshold=1e-2)
        builds.append(time.perf_counter() - start)
    build = sorted(builds)[1]
    lasso = morphnet.GroupLassoFlopsRegularizer(model, x, threshold=1e-3)
    return {"model": name, "layers": layers, "build_s": round(build, 3), "gamma_term_ops": term_ops(gamma),
            "group_lasso_term_ops": term_ops(lasso)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and models (used by the test suite)")
    parser.add_argument("--out", default="benchmarks/results/scaling.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    size = 32 if args.quick else 224
    cases = [("resnet18", None), ("resnet50", None)] if args.quick else [
        ("resnet18", None), ("resnet50", None), ("resnet101", None), ("resnet152", None), ("densenet121", None),
        ("densenet201", None)]
    chains = [10, 50] if args.quick else [100, 250, 500, 1000]
    rows = []
    for name, _ in cases:
        rows.append(measure(name, torchvision.models.get_model(name), torch.randn(1, 3, size, size)))
        print(rows[-1], flush=True)
    for n in chains:
        rows.append(measure(f"chain{n}", chain(n), torch.randn(1, 3, 8, 8)))
        print(rows[-1], flush=True)
    print(f"\n{'model':12s} {'layers':>6s} {'build s':>8s} {'gamma ops':>9s} {'lasso ops':>9s}")
    for r in rows:
        print(f"{r['model']:12s} {r['layers']:6d} {r['build_s']:8.3f} {r['gamma_term_ops']:9d} "
              f"{r['group_lasso_term_ops']:9d}")
    out = Path(args.out)
    write_results(out, {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                        "threads": torch.get_num_threads(), "input": size, "rows": rows,
                        "environment": environment(torch.device("cpu"))}, rows)
    print(f"wrote {out} and {out.with_suffix('.csv').name}")


if __name__ == "__main__":
    main()
