"""MorphNet against the width multiplier at fixed FLOP budgets, on a CPU setting that can tell.

The setting was fixed, and the uniform curve calibrated on the validation split, before any
MorphNet arm ran (docs/benchmarks.md records the calibration):
- data: the generated image set (``morphnet.data.synthetic``, task seed 0), average-pooled from
  32x32 to 16x16 so that a CIFAR ResNet trains in about a minute on one core; 20,000 training,
  5,000 validation and 10,000 test images, each split drawn with its own sample seed;
- seed network: CIFAR ResNet-14 (16/32/64 channels, 13 3x3 convs and 2 1x1 shortcuts over
  16x16, 8x8 and 4x4; 13.3 MFLOPs);
- recipe: every network is built from alive counts by ``morphnet.apply_structure`` (fresh
  initialization after ``torch.manual_seed(seed + 1)``) and trained from scratch with the
  pipeline's ``train`` (2000 steps, batch 64, SGD lr 0.05, warm-up and cosine decay, weight decay
  5e-4, data order from the seed); structure learning is the pipeline's ``learn_structure`` in
  target-cost mode (Gamma FLOPs, threshold 0.01, 2000 steps), the learned structure brought to the
  exact budget with one width multiplier, as ``morphnet run`` does.

Arms, for every seed and budget b in {1/8, 1/4, 1/2} of the seed's FLOPs:
- ``uniform``: the seed scaled by one width multiplier to b (and the seed itself at 1x);
- ``at-budget``: structure learned at b;
- ``shrink-expand``: structure learned at b/2, then expanded by one factor to b (the paper's method);
- ``expand-full``: the structure learned at 1/2 expanded to the seed's own FLOPs, against the seed;
- ``unweighted`` (phase ``ablation``): the same Gamma source with an unweighted L1 penalty (network
  slimming's), steered by the same controller to the same FLOP budget, used at the budget.

Choice rule, fixed before the run: at each budget, "MorphNet" is whichever of at-budget and
shrink-and-expand has the higher mean validation accuracy over the seeds. The test split is read
only for the table. A win (loss) is called only when the test gap to the uniform network exceeds
(falls below minus) twice the pooled standard error sqrt(sd_m^2 / n + sd_u^2 / n)
(``stats.pooled_verdict``, shared by every benchmark).

Every network appends one JSON line to ``OUT.jsonl`` as soon as it is trained, and a rerun with
the same ``--out`` skips what is already there, so every phase is resumable; runs over disjoint
seeds (``--first-seed``, ``--seeds``) merge with ``--combine``.

    python benchmarks/budgets.py --phase calibrate                 # before any MorphNet arm
    python benchmarks/budgets.py --phase core --first-seed 0 --seeds 3 --out benchmarks/results/budgets_a
    python benchmarks/budgets.py --phase core --first-seed 3 --seeds 2 --out benchmarks/results/budgets_b
    python benchmarks/budgets.py --combine benchmarks/results/budgets_a.jsonl benchmarks/results/budgets_b.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, environment, resolve_device, setup_cpu, write_results
from stats import mean_sd, paired_verdict, pooled_verdict
from torch import nn

import morphnet
from morphnet.data import DataBundle, TensorImages
from morphnet.data.synthetic import SyntheticImages
from morphnet.pipeline import RunConfig
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.learn import learn_structure
from morphnet.pipeline.regularizers import register_regularizer
from morphnet.pipeline.training import count_flops, count_params, evaluate, train
from morphnet.seeds import create_seed
from morphnet.seeds.registry import register_seed


@dataclass(frozen=True)
class Setting:
    """Data, seed network and recipe; fixed before any MorphNet arm ran (task A; tasks B and C in
    ``TASKS`` change the network and the image distribution, issue 23)."""

    model: str = "resnet14"
    image_size: int = 16
    task: str = "A"
    task_seed: int = 0  # the generator's classes and atoms
    num_classes: int = 10
    noise: float = 0.35
    distractors: int = 4
    seed_options: tuple[tuple[str, object], ...] = ()  # extra arguments of the seed network
    n_train: int = 20000
    n_val: int = 5000
    n_test: int = 10000
    budgets: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)
    steps: int = 2000  # every training from scratch
    learn_steps: int = 2000  # structure learning
    batch_size: int = 64
    lr: float = 0.05
    threshold: float = 1e-2
    seeds: int = 5
    calibration_widths: tuple[float, ...] = (1.0, 0.5, 0.25)
    calibration_seeds: int = 3


#: ``--quick`` (the test suite): tiny data, a few steps, one seed, on any task.
QUICK_SIZES = dict(n_train=512, n_val=256, n_test=256, budgets=(1 / 4,), steps=10, learn_steps=10, seeds=1,
                   calibration_widths=(1.0, 0.25), calibration_seeds=1)


@register_seed
def vgg6(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """A plain VGG-style network for task C: five 3x3 conv-BN-ReLU layers (32-64-64-128-128 channels
    at ``width`` 1, max-pooling after the second and fourth), global average pooling, one linear."""
    widths = [max(1, round(c * width)) for c in (32, 64, 64, 128, 128)]
    layers, previous = [], in_channels
    for i, c in enumerate(widths):
        layers += [nn.Conv2d(previous, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i in (1, 3):
            layers.append(nn.MaxPool2d(2))
        previous = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes))


#: The reliability tasks (issue 23): unlike task A in network family, number of classes, image
#: distribution (another generator seed, noise and distractors) and, for C, resolution. Fixed
#: before any of their rows (docs/benchmarks.md, "Reliability beyond one task").
TASKS = {
    "A": Setting(),
    "B": Setting(model="mobilenetv2_cifar", seed_options=(("width", 0.5),), task="B", task_seed=1, num_classes=20,
                 noise=0.3, distractors=3),
    "C": Setting(model="vgg6", image_size=24, task="C", task_seed=2, num_classes=10, noise=0.25, distractors=6),
}


def load_splits(s: Setting) -> tuple[DataBundle, TensorImages]:
    """The generated task at ``s.image_size``: a bundle whose ``test`` is the validation split
    (all learning and every choice sees only it), and the test split apart."""
    generator = SyntheticImages(seed=s.task_seed, num_classes=s.num_classes, noise=s.noise, distractors=s.distractors)

    def split(n: int, sample_seed: int) -> TensorImages:
        x, y = generator.sample(n, seed=sample_seed)
        if x.shape[-1] != s.image_size:  # area averaging (exactly avg_pool2d where the sizes divide)
            x = F.adaptive_avg_pool2d(x.float(), s.image_size).round().clamp(0, 255).to(torch.uint8)
        return TensorImages(x, y, mean=0.5, std=0.25)

    train_set, val_set, test_set = split(s.n_train, 1001), split(s.n_val, 1002), split(s.n_test, 1003)
    bundle = DataBundle(name=f"synthetic{s.image_size}", train=train_set, test=val_set, num_classes=s.num_classes,
                        input_shape=(3, s.image_size, s.image_size))
    return bundle, test_set


class UnweightedGammaFlops(morphnet.GammaFlopsRegularizer):
    """The ablation: Gamma FLOPs' source, alive test and cost (so the controller steers FLOPs), but
    network slimming's penalty: every channel group weighs the same (GammaActivation's term), scaled
    so that at the start it equals the FLOP-weighted term (same initial push, other distribution)."""

    def __init__(self, model, example_inputs, gamma_threshold: float, min_layer_fraction: float = 0.0):
        super().__init__(model, example_inputs, gamma_threshold=gamma_threshold, min_layer_fraction=min_layer_fraction)
        self._plain = morphnet.GammaActivationRegularizer(model, example_inputs, gamma_threshold=gamma_threshold,
                                                          min_layer_fraction=min_layer_fraction)
        with torch.no_grad():
            self._scale = float(super().get_regularization_term()) / float(self._plain.get_regularization_term())

    def get_regularization_term(self, modules=None) -> torch.Tensor:
        return self._scale * self._plain.get_regularization_term(modules)


register_regularizer("gamma-unweighted", "flops",
                     lambda model, example, threshold, hardware: UnweightedGammaFlops(model, example, threshold))


class SumGroupedGammaFlops(morphnet.GammaFlopsRegularizer):
    """Recipe candidate: a channel group shared by several BatchNorms (a residual stream) is penalized
    by the sum of their |gamma|, not the max. Under the max only the largest member is pushed at a
    time, so a group of k members takes about k times longer to die than a lone bottleneck for the
    same FLOP saving; the sum pushes every member with the group's full cost. Alive is still the OR."""

    def __init__(self, model, example_inputs, gamma_threshold: float):
        super().__init__(model, example_inputs, gamma_threshold=gamma_threshold)
        grouping, max_vectors = self.grouping, self.grouping.group_vectors

        def sum_vectors(values, alive, with_reg=True):
            alive_g, _ = max_vectors(values, alive, with_reg=False)
            if not with_reg:
                return alive_g, None
            t = grouping.tensors(values.device)
            reg_g = torch.zeros(grouping.num_groups, dtype=torch.float64, device=values.device)
            reg_g = reg_g.scatter_add(0, t["group"], values.to(torch.float64))
            return alive_g, reg_g * t["regularized"]

        grouping.group_vectors = sum_vectors


#: Recipe candidate: the per-layer floor (``min_layer_fraction``, regularizers/floor.py) at a quarter of
#: every convolution's width, so that no layer is thinned to the 1-5 channel bottlenecks of the core phase.
register_regularizer("gamma-floor", "flops", lambda model, example, threshold, hardware:
                     morphnet.GammaFlopsRegularizer(model, example, gamma_threshold=threshold, min_layer_fraction=0.25))
register_regularizer("gamma-sum", "flops",
                     lambda model, example, threshold, hardware: SumGroupedGammaFlops(model, example, threshold))
#: The ablation of the adopted recipe: the unweighted penalty with the same floor.
register_regularizer("gamma-unweighted-floor", "flops", lambda model, example, threshold, hardware:
                     UnweightedGammaFlops(model, example, threshold, min_layer_fraction=0.25))
#: Recipe candidate (third session): the adopted floor recipe with the penalty applied as a proximal
#: soft-threshold step (``morphnet.ProximalStep``: exact zeros, no oscillation under momentum).
register_regularizer("gamma-floor-prox", "flops", lambda model, example, threshold, hardware:
                     morphnet.GammaFlopsRegularizer(model, example, gamma_threshold=threshold, min_layer_fraction=0.25))


class RmsGroupedGammaFlops(morphnet.GammaFlopsRegularizer):
    """Recipe candidate (fourth session): a channel group shared by several BatchNorms is penalized by the
    root mean square of their |gamma| (what group lasso now does for a head's rows) instead of the max.
    Under the max the term's gradient reaches only the largest member of a residual group; the root mean
    square pushes every member in proportion to its scale, with about the max's total (the sum, rejected
    above, pushes each member with the group's full cost). Alive is still the OR."""

    def _make_source(self, model):
        source = super()._make_source(model)
        source.combine = "rms"
        return source


#: Recipe candidate (fourth session): the adopted floor recipe with root-mean-square grouping.
register_regularizer("gamma-floor-rms", "flops", lambda model, example, threshold, hardware:
                     RmsGroupedGammaFlops(model, example, gamma_threshold=threshold, min_layer_fraction=0.25))
#: Recipe candidates of phase ``recipe`` (validation split only): --recipe NAME; a name ending in
#: ``-prox`` learns with the proximal step.
RECIPES = ("gamma-sum", "gamma-floor", "gamma-unweighted", "gamma-unweighted-floor", "gamma-floor-prox",
           "gamma-floor-rms")


class Bench:
    """Data, seed factory and the build-train-score path shared by every arm."""

    def __init__(self, s: Setting, device: torch.device, out: Path):
        self.s = s
        self.ctx = DistContext(device=device)
        self.data, self.test = load_splits(s)
        self.example = self.data.example_inputs(1)
        self.seed_flops = morphnet.compute_cost(self.new_seed(0), self.example)
        self.out = out
        self.rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

    def new_seed(self, seed: int, width: float = 1.0) -> nn.Module:
        torch.manual_seed(seed)
        options = dict(self.s.seed_options)
        width *= options.pop("width", 1.0)  # the task's seed width, times the calibration's multiplier
        return create_seed(self.s.model, num_classes=self.s.num_classes, in_channels=3, width=width, **options)

    def done(self, seed: int, arm: str, budget: float | None) -> dict | None:
        for row in self.rows:
            if (row["seed"], row["arm"], row["budget"]) == (seed, arm, budget):
                return row
        return None

    def record(self, row: dict) -> dict:
        self.rows.append(row)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return row

    def seed_weights(self, seed: int) -> Path:
        """Where the core phase keeps the trained 1x seed of ``seed`` (the fine-tune phase starts from it)."""
        return self.out.with_name(self.out.stem + "_weights") / f"seed{seed}.pt"

    def full_counts(self) -> dict[str, int]:
        reg = morphnet.GammaFlopsRegularizer(self.new_seed(0), self.example, gamma_threshold=0.0)
        return morphnet.StructureExporter(reg).get_alive_counts()

    def scale_to(self, counts: dict[str, int], fraction: float) -> tuple[float, dict[str, int]]:
        """One width multiplier that brings ``counts`` within 1% of ``fraction`` of the seed's FLOPs
        (or as close as the integer widths allow; every row records the FLOPs it got)."""
        return morphnet.find_width_multiplier(self.new_seed(0), counts, self.example, fraction * self.seed_flops,
                                              tolerance=None)

    def learn(self, seed: int, budget: float, regularizer: str = "gamma", *, model: nn.Module | None = None,
              steps: int | None = None, lr: float | None = None, arm: str | None = None) -> dict:
        """Target-cost structure learning at ``budget`` from a fresh seed (or from ``model``, trained in
        place), cached as a row of arm ``learn:<regularizer>``."""
        arm = arm or f"learn:{regularizer}"
        row = self.done(seed, arm, budget)
        if row is not None:
            return row
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = RunConfig(model=self.s.model, data=self.data.name, regularizer=regularizer, target_cost=budget,
                            threshold=self.s.threshold, steps=steps or self.s.learn_steps,
                            batch_size=self.s.batch_size, lr=lr or self.s.lr, out=tmp, seed=seed, quiet=True,
                            min_layer_fraction=0.0, proximal=regularizer.endswith("-prox"))
            model = model if model is not None else self.new_seed(seed)
            result = learn_structure(cfg, self.ctx, self.data, model.to(self.ctx.device))
        chosen = result.chosen
        print(f"seed {seed} {arm:22s} budget {budget:.4f}: {chosen.cost / self.seed_flops:.4f}x "
              f"at step {chosen.step} ({time.perf_counter() - start:.0f} s)", flush=True)
        return self.record({"seed": seed, "arm": arm, "budget": budget, "counts": chosen.counts,
                            "learned_fraction": chosen.cost / self.seed_flops, "learned_step": chosen.step,
                            "learn_seconds": round(time.perf_counter() - start, 1)})

    def trained(self, seed: int, arm: str, budget: float | None, counts: dict[str, int] | None, *,
                test: bool = True, sealed: bool = False, model: nn.Module | None = None, steps: int | None = None,
                lr: float | None = None,
                keep: Path | None = None, **extra) -> dict:
        """Build ``counts`` from the seed (or take ``model`` as it is), train it, score it on validation
        (and test), cache the row; ``keep`` saves the trained weights there."""
        row = self.done(seed, arm, budget)
        if row is not None:
            return row
        if model is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(seed + 1)
                model = morphnet.apply_structure(self.new_seed(seed), counts, self.example)
        flops = morphnet.compute_cost(model, self.example)
        start = time.perf_counter()
        model.to(self.ctx.device)
        train(model, self.data.train, steps=steps or self.s.steps, lr=lr or self.s.lr, batch_size=self.s.batch_size,
              seed=seed, ctx=self.ctx, log_every=steps or self.s.steps)
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), keep)
        row = {"seed": seed, "arm": arm, "budget": budget, **extra, "flops": flops,
               "flops_fraction": flops / self.seed_flops, "flops_counted": count_flops(model, self.example),
               "params": count_params(model), "counts": counts,
               "val": evaluate(model, self.data.test, self.ctx.device),
               **({"sealed_test" if sealed else "test": evaluate(model, self.test, self.ctx.device)} if test else {}),
               "train_seconds": round(time.perf_counter() - start, 1)}
        print(f"seed {seed} {arm:14s} {'1x' if budget is None else f'{budget:.4f}':>7s} {row['flops_fraction']:.4f}x "
              f"FLOPs  val {row['val']:.4f}  ({row['train_seconds']:.0f} s)", flush=True)
        return self.record(row)


def calibrate(bench: Bench, first_seed: int) -> None:
    """Uniform widths on the validation split: is the task unsaturated, do seeds agree?"""
    full = bench.full_counts()
    for seed in range(first_seed, first_seed + bench.s.calibration_seeds):
        for width in bench.s.calibration_widths:
            counts = morphnet.StructureExporter(morphnet.GammaFlopsRegularizer(
                bench.new_seed(0, width), bench.example, gamma_threshold=0.0)).get_alive_counts()
            assert counts.keys() == full.keys()
            bench.trained(seed, "calibration", width, counts, test=False, width=width)


def uniform(bench: Bench, first_seed: int) -> None:
    """The uniform curve alone (the seed and one width multiplier per budget), for every seed: what
    a recipe phase over new seeds is compared with."""
    full = bench.full_counts()
    for seed in range(first_seed, first_seed + bench.s.seeds):
        bench.trained(seed, "uniform", None, full, factor=1.0, keep=bench.seed_weights(seed))
        for budget in bench.s.budgets:
            factor, counts = bench.scale_to(full, budget)
            bench.trained(seed, "uniform", budget, counts, factor=factor)


def core(bench: Bench, first_seed: int) -> None:
    s = bench.s
    uniform(bench, first_seed)  # the uniform curve first, for every seed
    # Then the learned arms, most important first across all seeds, so that a run cut short still
    # has whole columns: at-budget, shrink-and-expand from the structures already learned, the
    # extra learning at budget/2 for the smallest budget, and last the expansion to the seed's FLOPs.
    def arm(seed: int, name: str, budget: float, source: float) -> None:
        learned = bench.learn(seed, source)
        factor, counts = bench.scale_to(learned["counts"], budget)
        bench.trained(seed, name, budget, counts, factor=factor, learned_at=source,
                      learned_fraction=learned["learned_fraction"])

    seeds = range(first_seed, first_seed + s.seeds)
    for seed in seeds:
        for budget in s.budgets:
            arm(seed, "at-budget", budget, budget)
    for seed in seeds:
        for budget in s.budgets:
            if budget / 2 in s.budgets:
                arm(seed, "shrink-expand", budget, budget / 2)
    for seed in seeds:
        for budget in s.budgets:
            if budget / 2 not in s.budgets:
                arm(seed, "shrink-expand", budget, budget / 2)
    for seed in seeds:
        arm(seed, "expand-full", 1.0, max(s.budgets))


def ablation(bench: Bench, first_seed: int) -> None:
    for seed in range(first_seed, first_seed + bench.s.seeds):
        for budget in bench.s.budgets:
            learned = bench.learn(seed, budget, "gamma-unweighted")
            factor, counts = bench.scale_to(learned["counts"], budget)
            bench.trained(seed, "unweighted", budget, counts, factor=factor, learned_at=budget,
                          learned_fraction=learned["learned_fraction"])


def finetune(bench: Bench, first_seed: int) -> None:
    """Prune and fine-tune, how most users meet pruning: from the core phase's trained 1x seed, learn
    for a quarter of the from-scratch steps at the budget (lr / 5), rebuild with ``keep_weights=True``
    and fine-tune for another quarter (lr / 5). Its reference, ``uniform-long``, is the uniform network
    at the same FLOPs trained from scratch for the same total steps (seed training + learning +
    fine-tuning)."""
    s = bench.s
    full = bench.full_counts()
    quarter, lr = max(1, s.steps // 4), s.lr / 5
    for seed in range(first_seed, first_seed + s.seeds):
        weights = bench.seed_weights(seed)
        if not weights.exists():
            raise SystemExit(f"{weights} is missing: run --phase core for seed {seed} with the same --out first")
        for budget in s.budgets:
            if bench.done(seed, "finetune", budget) is None:
                model = bench.new_seed(seed)
                model.load_state_dict(torch.load(weights, map_location="cpu"))
                bench.learn(seed, budget, model=model, steps=quarter, lr=lr, arm="learn-trained:gamma")
                reg = morphnet.GammaFlopsRegularizer(model, bench.example.to(bench.ctx.device),
                                                     gamma_threshold=s.threshold)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    slim = morphnet.apply_structure(model, reg, bench.example, keep_weights=True)
                counts = morphnet.StructureExporter(reg).get_alive_counts()
                bench.trained(seed, "finetune", budget, counts, model=slim, steps=quarter, lr=lr,
                              total_steps=s.steps + 2 * quarter)
            fraction = bench.done(seed, "finetune", budget)["flops_fraction"]
            factor, counts = bench.scale_to(full, fraction)
            bench.trained(seed, "uniform-long", budget, counts, steps=s.steps + 2 * quarter, factor=factor)


def finetune_gentle(bench: Bench, first_seed: int) -> None:
    """Prune and fine-tune, second schedule (third session): the first one collapsed the trained
    seed (one seed's validation: accuracy at chance within 250 learning steps, 15.5% after learning,
    25% after fine-tuning). From the trained 1x seed (retrained here as the uniform phase trains it
    when its weights are not at hand), learn for half the from-scratch steps at lr / 5 with the
    adopted floor recipe, rebuild with ``keep_weights=True`` and fine-tune for another half at lr / 5.
    Reference ``uniform-long-2x``: the uniform network at the same FLOPs trained from scratch for the
    same total steps (seed training + learning + fine-tuning = 2x)."""
    s = bench.s
    full = bench.full_counts()
    half, lr = max(1, s.steps // 2), s.lr / 5
    for seed in range(first_seed, first_seed + s.seeds):
        weights = bench.seed_weights(seed)
        if not weights.exists():
            bench.trained(seed, "seed-for-finetune", None, full, factor=1.0, keep=weights)
        for budget in s.budgets:
            if bench.done(seed, "finetune-gentle", budget) is None:
                model = bench.new_seed(seed)
                model.load_state_dict(torch.load(weights, map_location="cpu"))
                bench.learn(seed, budget, "gamma-floor", model=model, steps=half, lr=lr,
                            arm="learn-trained:gamma-floor")
                reg = morphnet.GammaFlopsRegularizer(model, bench.example.to(bench.ctx.device),
                                                     gamma_threshold=s.threshold, min_layer_fraction=0.25)
                learned_val = evaluate(model, bench.data.test, bench.ctx.device)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    slim = morphnet.apply_structure(model, reg, bench.example, keep_weights=True)
                counts = morphnet.StructureExporter(reg).get_alive_counts()
                bench.trained(seed, "finetune-gentle", budget, counts, model=slim, steps=half, lr=lr,
                              total_steps=s.steps + 2 * half, learned_val=learned_val,
                              rebuilt_val=evaluate(slim, bench.data.test, bench.ctx.device))
            fraction = bench.done(seed, "finetune-gentle", budget)["flops_fraction"]
            factor, counts = bench.scale_to(full, fraction)
            bench.trained(seed, "uniform-long-2x", budget, counts, steps=s.steps + 2 * half, factor=factor)


#: Phase ``long``: the floor recipe's arm picked by validation at each budget (10-seed table).
LONG_PICKS = {1 / 8: ("at-budget", 1 / 8), 1 / 4: ("at-budget", 1 / 4), 1 / 2: ("shrink-expand", 1 / 4)}


def long(bench: Bench, first_seed: int) -> None:
    """Retraining length: every network trained twice as long (uniform and the floor recipe's pick by
    validation), the structures those of the recipe round (``learn:gamma-floor`` rows, learned
    again when absent). Does the gap to the width multiplier hold, and do seeds agree better?"""
    s = bench.s
    full, steps = bench.full_counts(), 2 * s.steps
    for seed in range(first_seed, first_seed + s.seeds):
        for budget in s.budgets:
            factor, counts = bench.scale_to(full, budget)
            bench.trained(seed, "uniform-2x", budget, counts, steps=steps, factor=factor)
            arm, learned_at = LONG_PICKS.get(budget, ("at-budget", budget))
            learned = bench.learn(seed, learned_at, "gamma-floor")
            factor, counts = bench.scale_to(learned["counts"], budget)
            bench.trained(seed, f"{arm}-2x:gamma-floor", budget, counts, steps=steps, factor=factor,
                          learned_at=learned_at, learned_fraction=learned["learned_fraction"])


def recipe(bench: Bench, first_seed: int, name: str = "gamma-sum", at_budget_only: bool = False) -> None:
    """A recipe candidate, chosen or rejected on the validation split: structures learned with
    regularizer ``name`` at every budget, used at the budget and, from the structure learned at half
    the budget, expanded to it. Their test accuracy is stored sealed (``sealed_test``, left out of
    every table and printout) so that a candidate adopted on validation needs no retraining; it
    enters the table only with ``--unseal``, once the choice is made. ``at_budget_only``: the
    structures used at the budget they were learned at and nothing else (the README's recipe, what
    issue 23's rule 1 reads; a third of the phase's training runs fewer)."""
    s = bench.s
    for seed in range(first_seed, first_seed + s.seeds):
        for budget in s.budgets:
            learned = bench.learn(seed, budget, name)
            factor, counts = bench.scale_to(learned["counts"], budget)
            bench.trained(seed, f"at-budget:{name}", budget, counts, sealed=True, factor=factor, learned_at=budget,
                          learned_fraction=learned["learned_fraction"])
        for budget in s.budgets if not at_budget_only else ():
            if budget / 2 in s.budgets:
                learned = bench.learn(seed, budget / 2, name)
                factor, counts = bench.scale_to(learned["counts"], budget)
                bench.trained(seed, f"shrink-expand:{name}", budget, counts, sealed=True, factor=factor,
                              learned_at=budget / 2, learned_fraction=learned["learned_fraction"])
    if at_budget_only:
        return
    for seed in range(first_seed, first_seed + s.seeds if max(s.budgets) >= 0.25 else first_seed):
        # last: the largest budget's structure at full cost (not for a run at small budgets only)
        learned = bench.learn(seed, max(s.budgets), name)
        factor, counts = bench.scale_to(learned["counts"], 1.0)
        bench.trained(seed, f"expand-full:{name}", 1.0, counts, sealed=True, factor=factor,
                      learned_at=max(s.budgets), learned_fraction=learned["learned_fraction"])


PHASES = {"calibrate": calibrate, "uniform": uniform, "core": core, "ablation": ablation, "finetune": finetune,
          "finetune-gentle": finetune_gentle, "recipe": recipe, "long": long}
#: The reference each arm is compared with (default: the uniform network at the same budget).
REFERENCE = {"finetune": "uniform-long", "finetune-gentle": "uniform-long-2x", "at-budget-2x:gamma-floor": "uniform-2x",
             "shrink-expand-2x:gamma-floor": "uniform-2x"}


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation for tables and error bars (0 for a single seed)."""
    mean, sd = mean_sd(values)
    return mean, (0.0 if math.isnan(sd) else sd)


def compare(rows: list[dict], recipe: str | None = None) -> dict:
    """Per budget: each arm against the uniform network of the same budget; MorphNet's pick by validation
    between at-budget and shrink-and-expand (of the recipe phase's candidate ``recipe`` when given)."""
    trained = [r for r in rows if "test" in r and r["arm"] != "calibration"]
    by: dict[tuple[str, float | None], list[dict]] = {}
    for r in trained:
        by.setdefault((r["arm"], r["budget"]), []).append(r)
    table, picks = [], {}
    for budget in sorted({b for (arm, b) in by if b is not None}):
        arms = [a for (a, b) in by if b == budget and not a.startswith("uniform")]
        for arm in arms:
            reference = by.get((REFERENCE.get(arm, "uniform"), budget if budget != 1.0 else None), [])
            if not reference:
                continue
            u_test, u_sd = _stats([r["test"] for r in reference])
            rs = by[(arm, budget)]
            m_test, m_sd = _stats([r["test"] for r in rs])
            versus = pooled_verdict([r["test"] for r in rs], [r["test"] for r in reference])
            table.append({
                "budget": budget, "arm": arm, "seeds": len(rs),
                "flops_fraction": statistics.fmean(r["flops_fraction"] for r in rs),
                "val_mean": statistics.fmean(r["val"] for r in rs), "test_mean": m_test, "test_sd": m_sd,
                "reference": REFERENCE.get(arm, "uniform"),
                "uniform_flops_fraction": statistics.fmean(r["flops_fraction"] for r in reference),
                "uniform_val_mean": statistics.fmean(r["val"] for r in reference),
                "uniform_test_mean": u_test, "uniform_test_sd": u_sd,
                "gap": versus["gap"], "two_pooled_se": versus["two_se"], "verdict": versus["verdict"],
            })
        pickable = [f"{arm}:{recipe}" if recipe else arm for arm in ("at-budget", "shrink-expand")]
        candidates = [t for t in table if t["budget"] == budget and t["arm"] in pickable]
        if candidates:
            pick = max(candidates, key=lambda t: t["val_mean"])
            picks[str(budget)] = {"arm": pick["arm"], "gap": pick["gap"], "two_pooled_se": pick["two_pooled_se"],
                                  "verdict": pick["verdict"]}
    return {"table": table, "morphnet_by_validation": picks}


#: Issue 23's goal at one budget (docs/benchmarks.md, "Reliability beyond one task", rule 1): the learned
#: structure's per-seed gap to its uniform twin (same seed, same data order and schedule)
WORST_SEED_GAP = -0.01


def reliability(rows: list[dict]) -> list[dict]:
    """Rule 1 per budget and learned arm: the paired gap to the uniform network of the same seed, on
    validation and (where the rows carry it: unsealed) on test. The goal holds when the mean gap is
    positive, no seed is more than a point below its twin and the learned sd is no larger than the
    uniform one's; each row says which of the three fail."""
    twins = {(r["arm"], r["seed"], r["budget"]): r for r in rows if r["arm"].startswith("uniform")}
    arms = sorted({(r["arm"], r["budget"]) for r in rows if r["budget"] not in (None, 1.0)
                   and not r["arm"].startswith(("uniform", "calibration", "learn", "seed"))},
                  key=lambda k: (k[1], k[0]))
    out = []
    for arm, budget in arms:
        reference = REFERENCE.get(arm, "uniform")  # the twin trained on the same schedule, as in ``compare``
        pairs = sorted((r["seed"], r, twins[(reference, r["seed"], budget)]) for r in rows
                       if r["arm"] == arm and r["budget"] == budget and (reference, r["seed"], budget) in twins)
        if not pairs:
            continue
        entry = {"budget": budget, "arm": arm, "reference": reference, "seeds": [seed for seed, _, _ in pairs]}
        for split in ("val", "test"):
            if not all(split in a and split in u for _, a, u in pairs):
                continue
            learned, matched = [a[split] for _, a, _ in pairs], [u[split] for _, _, u in pairs]
            verdict = paired_verdict(learned, matched)
            learned_sd, uniform_sd = (_stats(v)[1] for v in (learned, matched))
            failed = [why for why, bad in (("mean gap not positive", verdict["gap"] <= 0),
                                           ("a seed more than 1 point below its twin",
                                            min(verdict["diffs"]) < WORST_SEED_GAP),
                                           ("learned sd above the uniform one's", learned_sd > uniform_sd + 1e-9)) if bad]
            entry[split] = {"gaps": verdict["diffs"], "mean_gap": verdict["gap"], "two_paired_se": verdict["two_se"],
                            "worst_gap": min(verdict["diffs"]), "learned_sd": learned_sd, "uniform_sd": uniform_sd,
                            "goal_met": not failed and len(pairs) > 1, "failed": failed}
        out.append(entry)
    return out


def reliability_report(entries: list[dict]) -> str:
    """Rule 1 as Markdown: per budget and arm, the per-seed gaps and whether the goal holds."""
    lines = ["| budget | arm | split | per-seed gap (points) | mean ± 2 paired SE | sd learned / uniform | goal |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for split in ("val", "test"):
            if split not in e:
                continue
            r = e[split]
            gaps = ", ".join(f"{100 * g:+.2f}" for g in r["gaps"])
            goal = "met" if r["goal_met"] else "not met: " + "; ".join(r["failed"] or ["one seed"])
            lines.append(f"| {e['budget']:g} | {e['arm']} | {split} | {gaps} | {100 * r['mean_gap']:+.2f} ± "
                         f"{100 * r['two_paired_se']:.2f} | {100 * r['learned_sd']:.2f} / {100 * r['uniform_sd']:.2f} | "
                         f"{goal} |")
    return "\n".join(lines)


def calibration_summary(rows: list[dict]) -> list[dict]:
    out = []
    widths = sorted({r["budget"] for r in rows if r["arm"] == "calibration"}, reverse=True)
    for width in widths:
        rs = [r for r in rows if r["arm"] == "calibration" and r["budget"] == width]
        mean, sd = _stats([r["val"] for r in rs])
        out.append({"width": width, "seeds": len(rs), "flops_fraction": rs[0]["flops_fraction"],
                    "val_mean": mean, "val_sd": sd, "train_seconds": statistics.fmean(r["train_seconds"] for r in rs)})
    return out


def report(summary: dict, calibration: list[dict]) -> None:
    if calibration:
        print("\ncalibration (validation accuracy, uniform widths)")
        for c in calibration:
            print(f"  width {c['width']:.2f}  {c['flops_fraction']:.3f}x FLOPs  {c['val_mean']:.4f} ± {c['val_sd']:.4f}"
                  f"  ({c['seeds']} seeds, {c['train_seconds']:.0f} s each)")
    if summary["table"]:
        print(f"\n{'budget':>7s} {'arm':14s} {'FLOPs':>7s} {'val':>7s} {'test':>15s} {'uniform test':>15s} "
              f"{'gap':>7s} {'2 SE':>6s} verdict")
        for t in summary["table"]:
            print(f"{t['budget']:7.4f} {t['arm']:14s} {t['flops_fraction']:7.4f} {t['val_mean']:7.4f} "
                  f"{t['test_mean']:.4f}±{t['test_sd']:.4f} {t['uniform_test_mean']:.4f}±{t['uniform_test_sd']:.4f} "
                  f"{100 * t['gap']:+6.2f}p {100 * t['two_pooled_se']:5.2f}p {t['verdict']}")
        for budget, pick in summary["morphnet_by_validation"].items():
            print(f"budget {float(budget):.4f}: MorphNet = {pick['arm']} (by validation): gap {100 * pick['gap']:+.2f} "
                  f"points, 2 SE {100 * pick['two_pooled_se']:.2f}: {pick['verdict']}")


def markdown(summary: dict) -> str:
    """The comparison table as Markdown, for docs/benchmarks.md."""
    lines = ["| budget | arm | FLOPs | val | test (mean ± sd) | reference test | gap | 2 x pooled SE | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in summary["table"]:
        lines.append(f"| {t['budget']:g} | {t['arm']} | {t['flops_fraction']:.4f}x | {100 * t['val_mean']:.2f} | "
                     f"{100 * t['test_mean']:.2f} ± {100 * t['test_sd']:.2f} | {t['reference']} "
                     f"{100 * t['uniform_test_mean']:.2f} ± {100 * t['uniform_test_sd']:.2f} | "
                     f"{100 * t['gap']:+.2f} | {100 * t['two_pooled_se']:.2f} | {t['verdict']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, seed_flops: float, recipe: str | None = None) -> None:
    """Test accuracy against FLOPs (fraction of the seed's), mean ± sd over seeds, one line per arm;
    with ``recipe``, that candidate's arms in full colour and the original recipe's faded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if "test" in r and r["arm"] != "calibration"]
    if not trained:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"uniform": ("#444444", "o"), "at-budget": ("#1f77b4", "s"), "shrink-expand": ("#2ca02c", "D"),
              "unweighted": ("#d62728", "v"), "expand-full": ("#9467bd", "*")}
    lines = [(arm, arm, color, marker, 1.0 if recipe is None or arm == "uniform" else 0.3)
             for arm, (color, marker) in styles.items()]
    if recipe:
        lines += [(f"{arm}:{recipe}", f"{arm}, {recipe}", color, marker, 1.0)
                  for arm, (color, marker) in styles.items() if arm != "uniform"]
        lines += [(arm, f"unweighted, {arm.split(':', 1)[1]}", *styles["unweighted"], 1.0)
                  for arm in sorted({r["arm"] for r in trained}) if arm.startswith("at-budget:gamma-unweighted")]
    for arm, label, color, marker, alpha in lines:
        levels: dict = {}
        for r in trained:
            if r["arm"] == arm:
                levels.setdefault(r["budget"], []).append(r)
        if not levels:
            continue
        points = sorted((statistics.fmean(r["flops_fraction"] for r in rs), *_stats([r["test"] for r in rs]))
                        for rs in levels.values())
        ax.errorbar([p[0] for p in points], [100 * p[1] for p in points], yerr=[100 * p[2] for p in points],
                    marker=marker, ms=5, capsize=3, lw=1.2, color=color, label=label, alpha=alpha)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"FLOPs / seed FLOPs ({seed_flops / 1e6:.1f} M), log scale")
    ax.set_ylabel("test accuracy (%)")
    seeds = len({r["seed"] for r in trained})
    ax.set_title(f"ResNet-14 on generated 16x16 images: MorphNet vs width multiplier ({seeds} seeds, mean ± sd)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(PHASES), default="core")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5; calibration 3)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--budgets", type=float, nargs="+", metavar="FRACTION",
                        help="run the phase at these budgets only (default 1/8 1/4 1/2)")
    parser.add_argument("--combine", nargs="+", metavar="JSONL", help="no training: merge runs, compare and plot")
    parser.add_argument("--quick", action="store_true", help="tiny data, a few steps, one seed (test suite)")
    parser.add_argument("--task", choices=sorted(TASKS), default="A",
                        help="A: the budget benchmark's task (default); B, C: the reliability tasks of issue 23")
    parser.add_argument("--recipe", choices=RECIPES, default="gamma-sum", help="the candidate of --phase recipe")
    parser.add_argument("--at-budget-only", action="store_true",
                        help="--phase recipe: only the structures at the budget they were learned at (no "
                             "shrink-and-expand, no expansion to full cost)")
    parser.add_argument("--unseal", action="store_true",
                        help="count the recipe phase's sealed test scores in the table (after choosing on validation)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="path prefix for OUT.jsonl (rows), OUT.json, OUT.csv, OUT.png "
                                      "(default benchmarks/results/budgets_cpu)")
    args = parser.parse_args()
    setup_cpu(args.threads)
    task = TASKS[args.task]
    s = replace(task, **QUICK_SIZES) if args.quick else task
    if args.seeds:
        s = replace(s, seeds=args.seeds, calibration_seeds=args.seeds)
    if args.budgets:
        s = replace(s, budgets=tuple(args.budgets))
    out = Path(args.out or RESULTS / f"budgets_cpu{'' if args.task == 'A' else '_task' + args.task}"
                                     f"{'_quick' if args.quick else ''}")
    if args.combine:
        rows, seen = [], set()
        for f in args.combine:
            for line in Path(f).read_text().splitlines():
                row = json.loads(line)
                key = (row["seed"], row["arm"], row["budget"])
                if key in seen:
                    raise SystemExit(f"{f}: seed {row['seed']} arm {row['arm']} budget {row['budget']} appears "
                                     "twice; combine runs over disjoint seeds")
                seen.add(key)
                rows.append(row)
        env = {"combined_from": args.combine}
        seed_flops = None
    else:
        device = resolve_device(args.device)
        bench = Bench(s, device, out.with_suffix(".jsonl"))
        env = environment(device)
        seed_flops = bench.seed_flops
        print(f"task {s.task}: {s.model} at {s.image_size}x{s.image_size}, {s.num_classes} classes "
              f"({bench.seed_flops:.0f} FLOPs), phase {args.phase}, "
              f"seeds {args.first_seed}..{args.first_seed + s.seeds - 1}, on {env['device_name']}", flush=True)
        start = time.perf_counter()
        options = {"name": args.recipe, "at_budget_only": args.at_budget_only} if args.phase == "recipe" else {}
        if args.at_budget_only and args.phase != "recipe":
            raise SystemExit("--at-budget-only belongs to --phase recipe")
        PHASES[args.phase](bench, args.first_seed, **options)
        env["wall_seconds"] = round(time.perf_counter() - start)
        rows = bench.rows
    if args.unseal:
        rows = [{**{k: v for k, v in r.items() if k != "sealed_test"}, "test": r["sealed_test"]}
                if "sealed_test" in r else r for r in rows]
    summary = compare(rows, args.recipe if args.unseal else None)
    calibration = calibration_summary(rows)
    report(summary, calibration)
    if summary["table"]:
        print("\n" + markdown(summary))
    paired = reliability(rows)
    if paired:
        print("\nrule 1 (issue 23): paired by seed against the uniform twin\n" + reliability_report(paired))
    trained = [r for r in rows if "flops" in r]
    if seed_flops is None and trained:
        seed_flops = trained[0]["flops"] / trained[0]["flops_fraction"]
    payload = {"environment": env, "setting": vars(s) if not args.combine else None, "calibration": calibration,
               **summary, "reliability": paired, "rows": rows}
    write_results(out.with_suffix(".json"), payload, trained or None)
    if seed_flops:
        plot(rows, out.with_suffix(".png"), seed_flops, args.recipe if args.unseal else None)
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
