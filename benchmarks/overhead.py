"""Training-step overhead of the MorphNet regularizers, against two baselines.

One SGD step (forward, loss, backward, update) with and without a regularizer, timed in one
process. Variants run interleaved, round by round, in a rotating order, so load drift on a shared
machine hits all of them alike; a variant's figure is its median step time over every round after
warm-up, and its overhead the ratio to the plain step's median; the spread is the interquartile
range of the per-round ratios. The variant's own work is also timed alone (term forward and
backward, or the gradient injection): a steadier estimate where step times are noisy.

Variants: the plain step; Gamma FLOPs; Group Lasso FLOPs (l1_fraction 0 and 0.5); LogisticSigmoid
FLOPs (gates inserted; the gated model without the term is timed too, so the gates' own cost shows
apart from the term's); and two baselines written here: a per-layer Python loop that computes a
Gamma-FLOPs term layer by layer (what a direct port of the TensorFlow original does) and network
slimming's uniform L1 on BatchNorm scales added to ``.grad`` after backward (Torch-Pruning's
BNScalePruner). ``extra_ops`` counts the non-view aten ops a variant adds to one step.

Settings: on CUDA, bf16 autocast and channels_last, CIFAR ResNet-56 at batch 512 and torchvision
ResNet-50 at batch 256 (224x224); on CPU, fp32, the digits CNN at batch 64 and CIFAR ResNet-20 at
batch 32. Inputs are fixed random tensors already on the device (no data loading is timed).

    python benchmarks/overhead.py [--device auto|cpu|cuda] [--quick] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from common import RESULTS, environment, median, quartiles, resolve_device, setup_cpu, synchronize, write_results
from scaling import OpCounter
from torch import nn

import morphnet
from morphnet.seeds import create_seed


@dataclass
class Case:
    model: str
    batch: int
    shape: tuple[int, ...]
    classes: int = 10


CASES = {
    "cuda": [Case("resnet56", 512, (3, 32, 32)), Case("torchvision:resnet50", 256, (3, 224, 224), 1000)],
    "cpu": [Case("digits_cnn", 64, (1, 8, 8)), Case("resnet20", 32, (3, 32, 32))],
}
QUICK_CASES = [Case("digits_cnn", 16, (1, 8, 8))]


class PerLayerGammaFlops:
    """The per-layer baseline: a Python loop over conv / linear layers, each adding
    C * (A_in * sum|g_out| + A_out * sum|g_in|) from the BatchNorm scales that follow it and that
    of its input, with alive counts recomputed on every call.

    The pairing comes from one traced forward: the BatchNorm that reads a layer's output, and for
    the input side the latest earlier layer with as many output channels. That is exact for chains
    and approximate across residual adds (groups are not merged), which changes the value of the
    term but not the number of ops, which is what this baseline is for.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, threshold: float = 1e-2):
        self.threshold = threshold
        order: list[tuple[nn.Module, torch.Size]] = []
        producer: dict[int, nn.Module] = {}
        norm_of: dict[nn.Module, nn.Module] = {}

        def on_layer(module, inputs, output):
            order.append((module, output.shape))
            producer[id(output)] = module

        def on_norm(module, inputs, output):
            if id(inputs[0]) in producer:
                norm_of.setdefault(producer[id(inputs[0])], module)

        hooks = [m.register_forward_hook(on_layer) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        hooks += [m.register_forward_hook(on_norm) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example)
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        self.layers = []  # (coefficient, BN before, BN after, input channels, output channels)
        for i, (layer, shape) in enumerate(order):
            if isinstance(layer, nn.Conv2d):
                coef = 2.0 * layer.kernel_size[0] * layer.kernel_size[1] * shape[2] * shape[3] / layer.groups
                cin, cout = layer.in_channels, layer.out_channels
            else:
                coef, cin, cout = 2.0 * shape[:-1].numel() / shape[0], layer.in_features, layer.out_features
            before = next((norm_of[m] for m, s in reversed(order[:i]) if s[1] == cin and m in norm_of), None)
            self.layers.append((coef, before, norm_of.get(layer), cin, cout))

    def __call__(self) -> torch.Tensor:
        term = 0.0
        for coef, before, after, cin, cout in self.layers:
            if after is None:  # no BatchNorm after it (logits): only the input side is regularized
                if before is not None:
                    term = term + coef * cout * before.weight.abs().sum()
                continue
            g_out = after.weight.abs()
            a_out = (g_out > self.threshold).sum()
            if before is None:
                term = term + coef * cin * g_out.sum()
            else:
                g_in = before.weight.abs()
                a_in = (g_in > self.threshold).sum()
                term = term + coef * (a_in * g_out.sum() + a_out * g_in.sum())
        return term


def slimming_injection(model: nn.Module, strength: float = 1e-4) -> Callable[[], None]:
    """Network slimming as Torch-Pruning does it: after backward, add strength * sign(gamma) to the
    gradient of every BatchNorm scale, one layer at a time."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]

    def inject() -> None:
        for m in norms:
            m.weight.grad.add_(strength * torch.sign(m.weight.detach()))

    return inject


Term = Callable[[], torch.Tensor]
Hook = Callable[[], None]


def _per_cost(reg) -> Term:
    """The term times 1 / initial cost (the usual starting strength), as a user adds it."""
    strength = 1.0 / float(reg.get_cost())
    return lambda: strength * reg.get_regularization_term()


def plain(model: nn.Module, example: torch.Tensor) -> tuple[Term | None, Hook | None]:
    return None, None


def gamma_flops(model, example):
    return _per_cost(morphnet.GammaFlopsRegularizer(model, example, gamma_threshold=1e-2)), None


def group_lasso_flops(model, example):
    return _per_cost(morphnet.GroupLassoFlopsRegularizer(model, example, threshold=1e-2)), None


def group_lasso_flops_l1_half(model, example):
    return _per_cost(morphnet.GroupLassoFlopsRegularizer(model, example, threshold=1e-2, l1_fraction=0.5)), None


def gated_no_term(model, example):
    morphnet.add_gates(model, example)
    return None, None


def logistic_sigmoid_flops(model, example):
    morphnet.add_gates(model, example)
    return _per_cost(morphnet.LogisticSigmoidFlopsRegularizer(model, example)), None


def per_layer_loop(model, example):
    loop = PerLayerGammaFlops(model, example)
    strength = 1.0 / float(loop().detach())
    return (lambda: strength * loop()), None


def slimming_grad_injection(model, example):
    return None, slimming_injection(model)


# Each variant may modify its own copy of the model (gates) and returns (term, after-backward hook).
VARIANTS = {f.__name__: f for f in [plain, gamma_flops, group_lasso_flops, group_lasso_flops_l1_half, gated_no_term,
                                     logistic_sigmoid_flops, per_layer_loop, slimming_grad_injection]}


class Runner:
    """One variant: its own copy of the model, optimizer, term and step function."""

    def __init__(self, name: str, seed_model: nn.Module, case: Case, device: torch.device, x, y, example):
        self.name = name
        self.device = device
        model = copy.deepcopy(seed_model)
        self.term, self.after_backward = VARIANTS[name](model, example)
        self.low_precision = device.type == "cuda"
        if self.low_precision:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.y = x, y
        self.times: list[float] = []
        self.round_medians: list[float] = []

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.low_precision):
            loss = F.cross_entropy(self.model(self.x), self.y)
            if self.term is not None:
                loss = loss + self.term()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        self.opt.step()

    def timed(self, steps: int) -> None:
        times = []
        for _ in range(steps):
            synchronize(self.device)
            start = time.perf_counter()
            self.step()
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        self.times += times
        self.round_medians.append(median(times))

    def isolated(self, reps: int) -> float | None:
        """Median seconds of the variant's own work alone (term forward + backward, or the
        gradient injection), a steadier estimate than the difference of two step times."""
        if self.term is None and self.after_backward is None:
            return None
        times = []
        for _ in range(reps):
            synchronize(self.device)
            start = time.perf_counter()
            if self.term is not None:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.low_precision):
                    term = self.term()
                term.backward()
            else:
                self.after_backward()
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        self.opt.zero_grad(set_to_none=True)
        return median(times)

    def op_count(self) -> int:
        counter = OpCounter()
        with counter:
            self.step()
        synchronize(self.device)
        return counter.count


def run_case(case: Case, device: torch.device, *, warmup: int, rounds: int, steps: int) -> list[dict]:
    """Time every variant on ``case``; one row per variant."""
    torch.manual_seed(0)
    seed = create_seed(case.model, num_classes=case.classes, in_channels=case.shape[0]).to(device)
    example = torch.randn(1, *case.shape, device=device)
    x = torch.randn(case.batch, *case.shape, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, case.classes, (case.batch,), device=device)
    runners = [Runner(name, seed, case, device, x, y, example) for name in VARIANTS]
    ops = {}
    for r in runners:
        for _ in range(warmup):
            r.step()
        ops[r.name] = r.op_count()
    for i in range(rounds):
        for r in runners[i % len(runners):] + runners[:i % len(runners)]:
            r.timed(steps)
    base = runners[0]
    plain_step = median(base.times)
    rows = []
    for r in runners:
        ratios = [a / b for a, b in zip(r.round_medians, base.round_medians)]
        q1, q3 = quartiles(r.times)
        r1, r3 = quartiles(ratios)
        alone = r.isolated(rounds * steps)
        rows.append({
            "model": case.model, "batch": case.batch, "variant": r.name, "steps_timed": len(r.times),
            "median_ms": round(1e3 * median(r.times), 3), "q1_ms": round(1e3 * q1, 3), "q3_ms": round(1e3 * q3, 3),
            "ratio": round(median(r.times) / plain_step, 4),
            "round_ratio_q1": round(r1, 4), "round_ratio_q3": round(r3, 4),
            "isolated_ms": None if alone is None else round(1e3 * alone, 4),
            "isolated_pct_of_step": None if alone is None else round(100 * alone / plain_step, 2),
            "extra_ops": ops[r.name] - ops[base.name],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="one tiny case, a few steps (used by the test suite)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 10 on CUDA, 20 on CPU, 2 quick)")
    parser.add_argument("--steps", type=int, help="timed steps per variant and round (default 20 CUDA, 3 CPU, 2 quick)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/overhead_<device>.json; CSV beside it)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    setup_cpu(args.threads)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    cases = QUICK_CASES if args.quick else CASES[device.type]
    rounds = args.rounds or (2 if args.quick else 10 if gpu else 20)
    steps = args.steps or (2 if args.quick else 20 if gpu else 3)
    warmup = 2 if args.quick else 20 if gpu else 5
    env = environment(device)
    rows = []
    for case in cases:
        rows += run_case(case, device, warmup=warmup, rounds=rounds, steps=steps)
        print(f"\n{case.model} batch {case.batch} on {env['device_name']}")
        print(f"{'variant':26s} {'median ms':>10s} {'IQR ms':>15s} {'ratio':>7s} {'round ratio IQR':>15s} "
              f"{'alone ms':>9s} {'alone %':>8s} {'extra ops':>9s}")
        for r in rows:
            if r["model"] == case.model:
                alone = ("-", "-") if r["isolated_ms"] is None else (f"{r['isolated_ms']:.3f}",
                                                                     f"{r['isolated_pct_of_step']:.2f}")
                print(f"{r['variant']:26s} {r['median_ms']:10.2f} {r['q1_ms']:7.2f}-{r['q3_ms']:<7.2f} "
                      f"{r['ratio']:7.3f} {r['round_ratio_q1']:7.3f}-{r['round_ratio_q3']:<7.3f} "
                      f"{alone[0]:>9s} {alone[1]:>8s} {r['extra_ops']:9d}", flush=True)
    env["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    out = args.out or RESULTS / f"overhead_{device.type}{'_quick' if args.quick else ''}.json"
    settings = {"warmup": warmup, "rounds": rounds, "steps_per_round": steps,
                "precision": "bf16 autocast, channels_last" if gpu else "fp32"}
    write_results(out, {"environment": env, "settings": settings, "rows": rows}, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
