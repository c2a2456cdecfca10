"""MorphNet versus uniform width multipliers: test accuracy against FLOPs, retrained from scratch.

For every seed s:
- uniform arm: the seed network scaled by one width multiplier to each FLOP target (and at 1x);
- MorphNet arms: structure learning with the pipeline's ``learn_structure`` at fixed strengths
  (k / seed FLOPs) with the Gamma regularizer and, where it exists, the LogisticSigmoid one;
  every learned structure is kept as learned and also scaled by one width multiplier to each
  FLOP target (MorphNet's expand step, ``morphnet.find_width_multiplier``);
- every network, uniform or learned, is built the same way: ``morphnet.apply_structure`` from
  alive counts (fresh ``reset_parameters`` initialization after ``torch.manual_seed(s + 1)``),
  then trained from scratch with the pipeline's ``train`` (same steps, learning rate, batch and
  data order) and scored with ``evaluate`` on the test split, which is the same for every seed.

Statistics over the seeds: for each MorphNet network scaled to a target, the accuracy gap to the
uniform curve at its FLOPs (each seed's uniform accuracies interpolated linearly in log-FLOPs),
with the pooled standard error sqrt(var_m / n + var_u / n); a win (or loss) is called only when
the gap exceeds twice that (``stats.pooled_verdict``, shared by every benchmark). The FLOP saving at equal accuracy is read off the mean uniform curve:
1 - FLOPs(MorphNet) / FLOPs(uniform at the same mean accuracy).

Settings: ``cpu`` is scikit-learn's digits with the pipeline's default seed (the digits CNN,
5.9 MFLOPs; widths matter only in its 20k-300k FLOP range); ``gpu`` is the generated CIFAR-sized
set with a CIFAR ResNet (``--model resnet20`` or ``resnet56``), targets as fractions of its FLOPs.

    python benchmarks/pareto.py [--setting cpu|gpu] [--quick] [--seeds 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, environment, resolve_device, setup_cpu, write_results
from stats import mean_sd, pooled_verdict
from torch import nn

import morphnet
from morphnet.data import load_data
from morphnet.pipeline import RunConfig, regularizer_names
from morphnet.pipeline.controller import resolve_target
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.learn import learn_structure
from morphnet.pipeline.training import count_flops, count_params, evaluate, train
from morphnet.seeds import create_seed


@dataclass
class Setting:
    """One benchmark configuration: data, seed network, budgets and the training recipe."""

    data: str
    model: str
    targets: list[float]  # FLOPs; <= 1 means a fraction of the seed's
    strengths: dict[str, list[float]]  # regularizer -> k, strength = k / seed FLOPs
    learn_steps: int
    retrain_steps: int
    batch_size: int = 64
    lr: float = 0.05
    seeds: int = 3
    thresholds: dict[str, float | None] = field(default_factory=lambda: {"gamma": 1e-2})


SETTINGS = {
    # Strengths calibrated by hand on this setting (600 steps at lr 0.05): Gamma k=15 / 30 learn
    # ~270k / ~130k FLOPs, k >= 45 collapses every layer; LogisticSigmoid needs k ~ 3000 to shrink.
    "cpu": Setting(data="digits", model="digits_cnn", targets=[20e3, 40e3, 80e3, 160e3],
                   strengths={"gamma": [15, 30], "logistic-sigmoid": [3000]}, learn_steps=600, retrain_steps=600),
    # Calibrated on an H200 (one seed, --learn-only, docs/benchmarks.md): Gamma k = 1.5 / 4 learn 0.53 / 0.05
    # of ResNet-20's FLOPs (0.66 / 0.14 of ResNet-56's); k = 15 / 30 kill almost everything here.
    # LogisticSigmoid k = 3000 learns 0.12 of ResNet-20's FLOPs.
    # The smallest target is a 0.25x-wide ResNet's FLOPs: the uniform arm checks the data's calibration.
    "gpu": Setting(data="synthetic:20000", model="resnet20", targets=[0.0625, 0.125, 0.25, 0.5],
                   strengths={"gamma": [1.5, 4], "logistic-sigmoid": [3000]}, learn_steps=2000, retrain_steps=3000,
                   batch_size=128),
}


def quick(setting: Setting) -> Setting:
    """A run of seconds that goes through every code path (used by the test suite)."""
    first = {name: ks[-1:] for name, ks in setting.strengths.items()}
    return replace(setting, targets=setting.targets[2:3], strengths=first, learn_steps=20, retrain_steps=20, seeds=1)


class Bench:
    """Data, seed factory, and the build-and-train path shared by every arm."""

    def __init__(self, setting: Setting, device: torch.device):
        self.s = setting
        self.ctx = DistContext(device=device)
        self.data = load_data(setting.data, seed=0)
        self.example = self.data.example_inputs(1)
        self.seed_flops = morphnet.compute_cost(self.new_seed(0), self.example)
        self.targets = [resolve_target(t, self.seed_flops) for t in setting.targets]

    def new_seed(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return create_seed(self.s.model, num_classes=self.data.num_classes, in_channels=self.data.input_shape[0])

    def full_counts(self, model: nn.Module) -> dict[str, int]:
        reg = morphnet.GammaFlopsRegularizer(model, self.example, gamma_threshold=0.0)
        return morphnet.StructureExporter(reg).get_alive_counts()

    def learn(self, regularizer: str, k: float, seed: int) -> tuple[dict[str, int], float]:
        """Structure learning at strength k / seed FLOPs; the last step's counts and their FLOPs."""
        with tempfile.TemporaryDirectory() as out:
            cfg = RunConfig(model=self.s.model, data=self.s.data, regularizer=regularizer, strength=k / self.seed_flops,
                            threshold=self.s.thresholds.get(regularizer), steps=self.s.learn_steps,
                            batch_size=self.s.batch_size, lr=self.s.lr, out=out, seed=seed, quiet=True)
            model = self.new_seed(seed).to(self.ctx.device)
            result = learn_structure(cfg, self.ctx, self.data, model)
        return result.chosen.counts, result.chosen.cost

    def scale_to(self, counts: dict[str, int], target: float) -> tuple[float, dict[str, int]]:
        """The width multiplier of ``counts`` whose FLOPs are nearest ``target`` (within 1% when the
        widths allow; otherwise the closest in log-FLOPs, found by bisection)."""
        seed = self.new_seed(0)
        try:
            return morphnet.find_width_multiplier(seed, counts, self.example, target)
        except ValueError:
            pass  # the widths are too coarse to land within 1%
        best = None  # (|log(flops / target)|, factor, counts)

        def probe(factor: float) -> float:
            nonlocal best
            scaled = morphnet.expand_structure(seed, counts, self.example, factor)
            flops = self.flops_of(scaled)
            miss = abs(math.log(flops / target))
            if best is None or miss < best[0]:
                best = (miss, factor, scaled)
            return flops

        lo, hi = 0.01, 1.0
        while probe(hi) < target and hi < 64:
            lo, hi = hi, hi * 2
        for _ in range(10):  # geometric bisection: the factor to within 1%
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if probe(mid) < target else (lo, mid)
        return best[1], best[2]

    def flops_of(self, counts: dict[str, int]) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return morphnet.compute_cost(morphnet.apply_structure(self.new_seed(0), counts, self.example), self.example)

    def train_and_score(self, counts: dict[str, int], seed: int) -> dict:
        """Build ``counts`` from the seed network, train from scratch, evaluate."""
        seed_model = self.new_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(seed + 1)
            model = morphnet.apply_structure(seed_model, counts, self.example)
        flops = morphnet.compute_cost(model, self.example)
        row = {"flops": flops, "flops_counted": count_flops(model, self.example), "params": count_params(model),
               "counts": counts, "rebuild_warnings": len(caught)}
        start = time.perf_counter()
        model.to(self.ctx.device)
        train(model, self.data.train, steps=self.s.retrain_steps, lr=self.s.lr, batch_size=self.s.batch_size,
              seed=seed, ctx=self.ctx, log_every=self.s.retrain_steps)
        row["accuracy"] = evaluate(model, self.data.test, self.ctx.device)
        row["train_seconds"] = round(time.perf_counter() - start, 2)
        return row


def arm_label(arm: str, k: float | None) -> str:
    return arm if k is None else f"{arm} k={k:g}"


def trained_row(bench: Bench, seed: int, arm: str, k: float | None, target: float | None, factor: float,
                counts: dict, **extra) -> dict:
    """Build, train and score one network; print a line and return its row."""
    row = {"seed": seed, "arm": arm, "k": k, "target": target, "factor": round(factor, 5), **extra,
           **bench.train_and_score(counts, seed)}
    where = "as learned" if target is None and arm != "uniform" else f"target {target or 'seed':>8}"
    print(f"seed {seed} {arm_label(arm, k):24s} {where:17s} {row['flops']:>10.0f} FLOPs "
          f"acc {row['accuracy']:.4f} ({row['train_seconds']:.0f} s)", flush=True)
    return row


def run(bench: Bench, first_seed: int = 0) -> list[dict]:
    """Train every network of every arm for every seed; one row each."""
    s, rows = bench.s, []
    for seed in range(first_seed, first_seed + s.seeds):
        full = bench.full_counts(bench.new_seed(seed))
        rows.append(trained_row(bench, seed, "uniform", None, None, 1.0, full))
        for target in bench.targets:
            rows.append(trained_row(bench, seed, "uniform", None, target, *bench.scale_to(full, target)))
        for regularizer, ks in s.strengths.items():
            if regularizer not in regularizer_names():
                print(f"skipping {regularizer}: the pipeline has no such regularizer", flush=True)
                continue
            for k in ks:
                start = time.perf_counter()
                learned, cost = bench.learn(regularizer, k, seed)
                extra = {"learned_flops": cost, "learn_seconds": round(time.perf_counter() - start, 2)}
                if cost == 0:
                    rows.append({"seed": seed, "arm": regularizer, "k": k, "target": None, "collapsed": True, **extra})
                    print(f"seed {seed} {arm_label(regularizer, k)}: every channel died, nothing to retrain",
                          flush=True)
                    continue
                rows.append(trained_row(bench, seed, regularizer, k, None, 1.0, learned, **extra))
                for target in bench.targets:
                    scaled = bench.scale_to(learned, target)
                    rows.append(trained_row(bench, seed, regularizer, k, target, *scaled, **extra))
    return rows


def learn_only(bench: Bench, first_seed: int = 0, train_seed_network: bool = True) -> list[dict]:
    """The calibration step of a new setting: per seed, the seed network trained once (its accuracy
    and how long a retraining takes) and each strength's learned FLOPs, with no retraining of the
    learned structures. Tells which strengths land in the range of the targets."""
    s, rows = bench.s, []
    for seed in range(first_seed, first_seed + s.seeds):
        if train_seed_network:
            rows.append(trained_row(bench, seed, "uniform", None, None, 1.0, bench.full_counts(bench.new_seed(seed))))
        for regularizer, ks in s.strengths.items():
            for k in ks:
                start = time.perf_counter()
                _, cost = bench.learn(regularizer, k, seed)
                rows.append({"seed": seed, "arm": regularizer, "k": k, "learned_flops": cost,
                             "learned_fraction": round(cost / bench.seed_flops, 4),
                             "learn_seconds": round(time.perf_counter() - start, 2)})
                print(f"seed {seed} {arm_label(regularizer, k):24s} learned {cost:.0f} FLOPs "
                      f"({cost / bench.seed_flops:.3f} of the seed) in {rows[-1]['learn_seconds']:.0f} s", flush=True)
    return rows


def parse_strengths(text: str) -> dict[str, list[float]]:
    """``gamma=15,30;logistic-sigmoid=3000`` -> {"gamma": [15.0, 30.0], "logistic-sigmoid": [3000.0]}."""
    out = {}
    for part in filter(None, text.split(";")):
        name, _, ks = part.partition("=")
        if name.strip() not in regularizer_names() or not ks:
            raise SystemExit(f"--strengths: {part!r} is not NAME=K[,K...] with NAME one of {regularizer_names()}")
        out[name.strip()] = [float(k) for k in ks.split(",")]
    return out


def _log_interp(points: list[tuple[float, float]], flops: float) -> float:
    """Accuracy at ``flops`` on a curve of (FLOPs, accuracy) points, linear in log-FLOPs (clamped)."""
    points = sorted(points)
    return float(np.interp(math.log(flops), [math.log(f) for f, _ in points], [a for _, a in points]))


def _flops_at_accuracy(curve: list[tuple[float, float]], accuracy: float) -> float | None:
    """The fewest FLOPs at which ``curve`` (sorted by FLOPs) first reaches ``accuracy``, or None when
    it is already there at its smallest point or never gets there."""
    if accuracy <= curve[0][1]:
        return None
    for (f1, a1), (f2, a2) in itertools.pairwise(curve):
        if a1 < accuracy <= a2:
            t = (accuracy - a1) / (a2 - a1)
            return math.exp(math.log(f1) + t * (math.log(f2) - math.log(f1)))
    return None


def compare(rows: list[dict]) -> list[dict]:
    """Each MorphNet point (arm, k, target) against the uniform curve of the same seeds."""
    trained = [r for r in rows if "accuracy" in r]
    uniform = [r for r in trained if r["arm"] == "uniform"]
    per_seed: dict[int, list[tuple[float, float]]] = {}
    for r in uniform:
        per_seed.setdefault(r["seed"], []).append((r["flops"], r["accuracy"]))
    levels: dict[float | None, list[dict]] = {}
    for r in uniform:
        levels.setdefault(r["target"], []).append(r)
    mean_curve = sorted((math.exp(statistics.fmean(math.log(r["flops"]) for r in rs)),
                         statistics.fmean(r["accuracy"] for r in rs)) for rs in levels.values())
    groups: dict[tuple, list[dict]] = {}
    for r in trained:
        if r["arm"] != "uniform":
            groups.setdefault((r["arm"], r["k"], r["target"]), []).append(r)
    out = []
    for (arm, k, target), rs in groups.items():
        acc_m = [r["accuracy"] for r in rs]
        acc_u = [_log_interp(per_seed[r["seed"]], r["flops"]) for r in rs]
        (mean_m, sd_m), (mean_u, sd_u) = mean_sd(acc_m), mean_sd(acc_u)
        versus = pooled_verdict(acc_m, acc_u)
        flops = math.exp(statistics.fmean(math.log(r["flops"]) for r in rs))
        uniform_flops = _flops_at_accuracy(mean_curve, mean_m)
        out.append({
            "arm": arm, "k": k, "target": target, "seeds": len(rs), "flops": round(flops),
            "accuracy_mean": round(mean_m, 4), "accuracy_std": round(sd_m, 4),
            "uniform_accuracy_mean": round(mean_u, 4), "uniform_accuracy_std": round(sd_u, 4),
            "gap": round(versus["gap"], 4), "pooled_se": round(versus["two_se"] / 2, 4), "verdict": versus["verdict"],
            "uniform_flops_at_same_accuracy": None if uniform_flops is None else round(uniform_flops),
            "flop_saving": None if uniform_flops is None else round(1 - flops / uniform_flops, 4),
        })
    return out


def plot(rows: list[dict], settings: dict, path: Path) -> None:
    """Accuracy against FLOPs (log scale): each arm's mean and standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if "accuracy" in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    arms = list(dict.fromkeys((r["arm"], r["k"]) for r in trained))
    colors = dict(zip(arms, ["#444444", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]))
    for arm, k in arms:
        mine = [r for r in trained if (r["arm"], r["k"]) == (arm, k)]
        ax.scatter([r["flops"] for r in mine], [r["accuracy"] for r in mine], s=9, alpha=0.3, color=colors[(arm, k)])
        levels: dict = {}
        for r in mine:
            if r["target"] is not None:
                levels.setdefault(r["target"], []).append(r)
        if arm == "uniform":
            levels[None] = [r for r in mine if r["target"] is None]
        points = sorted((math.exp(statistics.fmean(math.log(r["flops"]) for r in rs)),
                         *mean_sd([r["accuracy"] for r in rs])) for rs in levels.values())
        label = "uniform width multiplier" if arm == "uniform" else f"MorphNet {arm_label(arm, k)}, scaled"
        spread = [0 if math.isnan(p[2]) else p[2] for p in points]
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=spread, marker="o", ms=4, capsize=3,
                    lw=1.5, color=colors[(arm, k)], label=label)
        learned = [r for r in mine if r["target"] is None and arm != "uniform"]
        if learned:
            m, sd = mean_sd([r["accuracy"] for r in learned])
            f = math.exp(statistics.fmean(math.log(r["flops"]) for r in learned))
            ax.errorbar([f], [m], yerr=[0 if math.isnan(sd) else sd], marker="D", mfc="white", ms=6, capsize=3,
                        color=colors[(arm, k)], ls="none", label=f"MorphNet {arm_label(arm, k)}, as learned")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per example (log scale)")
    ax.set_ylabel("test accuracy")
    seeds = len({r["seed"] for r in trained})
    ax.set_title(f"{settings['model']} on {settings['data']}: {seeds} seed{'s' if seeds > 1 else ''}, every network "
                 f"retrained {settings['retrain_steps']} steps (mean ± std)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(comparisons: list[dict]) -> None:
    print(f"\n{'arm':24s} {'target':>8s} {'FLOPs':>9s} {'accuracy':>15s} {'uniform':>15s} {'gap':>7s} {'2 SE':>6s} "
          f"{'verdict':7s} {'FLOP saving':>11s}")
    for c in comparisons:
        saving = "-" if c["flop_saving"] is None else f"{c['flop_saving']:.1%}"
        target = "learned" if c["target"] is None else f"{c['target']:.0f}"
        print(f"{arm_label(c['arm'], c['k']):24s} {target:>8s} {c['flops']:9d} "
              f"{c['accuracy_mean']:.4f}±{c['accuracy_std']:.4f} {c['uniform_accuracy_mean']:.4f}±"
              f"{c['uniform_accuracy_std']:.4f} {c['gap']:+.4f} {2 * c['pooled_se']:6.4f} {c['verdict']:7s} "
              f"{saving:>11s}")


def combine(files: list[str]) -> tuple[dict, list[dict]]:
    """Settings and rows of runs over disjoint seeds (``--first-seed``) of one setting."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    keep = ("name", "data", "model", "targets_flops", "strengths", "learn_steps", "retrain_steps", "batch_size", "lr")
    first = runs[0]["settings"]
    for f, run_ in zip(files, runs):
        if any(run_["settings"][k] != first[k] for k in keep):
            raise SystemExit(f"{f} was run with other settings than {files[0]}; only seeds may differ")
    rows = [row for run_ in runs for row in run_["rows"]]
    seeds = sorted({row["seed"] for row in rows})
    if len(seeds) != sum(run_["settings"]["seeds"] for run_ in runs):
        raise SystemExit("the runs share seeds; give each its own --first-seed")
    return {**first, "seeds": len(seeds), "combined_from": files}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--model", help="seed network of the gpu setting (resnet20 or resnet56)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds from this one on (to split a long run)")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="no training: merge the rows of runs over disjoint seeds, compare and plot them")
    parser.add_argument("--quick", action="store_true", help="one seed, one target, a few steps (test suite)")
    parser.add_argument("--learn-only", action="store_true",
                        help="calibration: train the seed once and report what each strength learns (no retraining)")
    parser.add_argument("--skip-seed-network", action="store_true", help="with --learn-only: do not train the seed")
    parser.add_argument("--strengths", help="override the setting's strengths, e.g. 'gamma=15,30;logistic-sigmoid=3000'")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/pareto_cpu.json or "
                                      "pareto_gpu_<model>.json; CSV and PNG beside it)")
    args = parser.parse_args()
    setup_cpu(args.threads)
    setting = SETTINGS[args.setting]
    if args.model:
        setting = replace(setting, model=args.model)
    if args.quick:
        setting = quick(setting)
    if args.seeds:
        setting = replace(setting, seeds=args.seeds)
    if args.strengths:
        setting = replace(setting, strengths=parse_strengths(args.strengths))
    name = "pareto_cpu" if args.setting == "cpu" else f"pareto_gpu_{setting.model}"
    out = Path(args.out or RESULTS / f"{name}{'_quick' if args.quick else ''}.json")
    if args.combine:
        settings, rows = combine(args.combine)
        env = {"combined": [json.loads(Path(f).read_text())["environment"] for f in args.combine]}
    else:
        device = resolve_device(args.device)
        bench = Bench(setting, device)
        env = environment(device)
        print(f"{setting.model} on {setting.data} ({bench.seed_flops:.0f} FLOPs), targets "
              f"{[round(t) for t in bench.targets]}, on {env['device_name']}", flush=True)
        start = time.perf_counter()
        rows = (learn_only(bench, args.first_seed, not args.skip_seed_network) if args.learn_only
                else run(bench, args.first_seed))
        env["wall_seconds"] = round(time.perf_counter() - start)
        settings = {"name": args.setting, **vars(setting), "first_seed": args.first_seed,
                    "targets_flops": bench.targets, "seed_flops": bench.seed_flops}
        if args.learn_only:
            write_results(out, {"environment": env, "settings": settings, "rows": rows}, rows)
            print(f"wrote {out}")
            return
    comparisons = compare(rows)
    report(comparisons)
    write_results(out, {"environment": env, "settings": settings, "comparisons": comparisons, "rows": rows}, rows)
    plot(rows, settings, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.csv').name}, {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
