"""Compress a trained network: MorphNet against Torch-Pruning, ModelOpt FastNAS and OTO v3, head to head.

The job most users bring (issues 20 and 25): a trained network that should cost 1/2 or 1/4 of its
FLOPs, losing as little accuracy as possible. Every arm starts from the same trained seed network and
gets the same number of extra optimizer steps after it (its sparse-learning phase, if any, plus
fine-tuning); every pruned network is counted by FlopCounterMode and must land within 2% of the
budget. The setting (data, networks, training, budgets, statistics, the verdict rule) was fixed and
committed before any arm ran; docs/benchmarks.md records it.

- data: the generated image set (``morphnet.data.synthetic``, task seed 3: a task of its own, not the
  budget benchmark's), average-pooled 32x32 -> 16x16; 40,000 training, 5,000 validation and 10,000
  test images, each split drawn with its own sample seed;
- networks: CIFAR ResNet-20 (``resnet20``) and a MobileNetV2-style network (``mobilenetv2_cifar`` at half
  width with a stride-2 stem: inverted residuals with depthwise convolutions), each trained from scratch per seed for
  ``seed_steps`` steps (batch 64, SGD Nesterov lr 0.05, warm-up and cosine, weight decay 5e-4; seed s:
  initialization and data order from s);
- arms, each from the trained seed s, for budgets 1/2 and 1/4 of the seed's FLOPs, ``extra_steps``
  steps in all, fine-tuning (shared code: ``morphnet.recipes.compress.finetune``, lr 0.01, warm-up and
  cosine) after re-estimating BatchNorm statistics on 100 training batches:
  ``morphnet`` (``morphnet.compress`` as shipped: land at once on the trained BatchNorm scales with the
  per-layer floor, re-estimate BatchNorm statistics, fine-tune every step distilling the seed),
  ``morphnet-no-kd`` (the same fine-tuned without distillation, as every other arm is: it isolates the
  channel selection), ``morphnet-learn`` (half the steps learning with MorphNet's FLOP-weighted penalty
  before landing), ``uniform-l1`` (one width multiplier, each layer's largest-L1 channels kept),
  ``tp-local`` / ``tp-global`` (Torch-Pruning magnitude pruning, per layer and global), ``tp-bnscale``
  (network slimming), ``tp-groupnorm`` (DepGraph's group sparse learning), ``fastnas`` (ModelOpt),
  ``oto`` (OTO v3 HESSO); sparse-learning peers spend half the steps sparse-learning (see
  compress_peers.py); reference ``uniform-scratch``: the uniform network at the budget trained from
  scratch for seed_steps + extra_steps;
- statistics: per network, budget and arm, mean ± sd of test accuracy over the seeds; MorphNet minus
  each other arm paired by seed, with twice the standard error of the paired difference
  (``stats.paired_verdict``): a win or a loss only beyond it.

Every network appends one JSON line to ``OUT.jsonl`` when it is done; a rerun with the same ``--out``
skips what is there, so a run is resumable; runs over disjoint seeds merge with ``--combine``.

    python benchmarks/compress.py --phase seeds --first-seed 0 --seeds 3 --out RUN/a   # train the seeds
    python benchmarks/compress.py --phase arms --first-seed 0 --seeds 3 --out RUN/a
    python benchmarks/compress.py --combine RUN/a.jsonl RUN/b.jsonl --out benchmarks/results/compress_cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, environment, setup_cpu, write_results
from stats import mean_sd, paired_verdict
from torch import nn
from torch.utils.data import DataLoader, Subset

import morphnet
from morphnet.data import TensorImages
from morphnet.data.synthetic import SyntheticImages
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.training import count_flops, evaluate, infinite_batches, train
from morphnet.recipes.compress import finetune, shrink_uniformly
from morphnet.seeds import create_seed


@dataclass(frozen=True)
class Setting:
    """Fixed before any arm ran (docs/benchmarks.md, "Compressing a trained network")."""

    networks: tuple[str, ...] = ("resnet20", "mobilenetv2_cifar")
    task_seed: int = 3
    noise: float = 0.25
    distractors: int = 3
    image_size: int = 16
    n_train: int = 40000
    n_val: int = 5000
    n_test: int = 10000
    score_images: int = 1000  # the validation subset FastNAS scores its candidates on
    seed_steps: int = 6000
    extra_steps: int = 1000
    sparse_fraction: float = 0.5  # of the extra steps, for the arms that learn before pruning
    batch_size: int = 64
    seed_lr: float = 0.05
    finetune_lr: float = 0.01
    fastnas_divisor: int = 4  # ModelOpt's channel divisor (its 32 leaves a ResNet-20 no subnet below 0.84x)
    bn_batches: int = 100
    budgets: tuple[float, ...] = (0.5, 0.25)
    seeds: int = 5


#: The depthwise network at half width with a stride-2 stem: on one CPU core the full-width one at 16x16 takes
#: 5x a ResNet-20's time per step (depthwise convolutions), this one about 1.2x.
NETWORK_OPTIONS = {"mobilenetv2_cifar": {"width": 0.5, "stem_stride": 2}}

QUICK = Setting(networks=("resnet20",), n_train=512, n_val=256, n_test=256, score_images=128, seed_steps=20,
                extra_steps=8, bn_batches=2, budgets=(0.5,), seeds=1, fastnas_divisor=8)

#: every arm but the reference, in the order they run; MorphNet first
ARMS = ("morphnet", "morphnet-no-kd", "morphnet-learn", "uniform-l1", "tp-local", "tp-global", "tp-bnscale",
        "tp-groupnorm", "fastnas", "oto", "uniform-scratch")
#: run after every arm above, as time allows (the cost weighting's ablation, on the learning variant)
LATE_ARMS = ("morphnet-learn-unweighted",)


def load_splits(s: Setting) -> tuple[TensorImages, TensorImages, TensorImages]:
    generator = SyntheticImages(seed=s.task_seed, noise=s.noise, distractors=s.distractors)

    def split(n: int, sample_seed: int) -> TensorImages:
        x, y = generator.sample(n, seed=sample_seed)
        factor = x.shape[-1] // s.image_size
        if factor > 1:
            x = F.avg_pool2d(x.float(), factor).round().clamp(0, 255).to(torch.uint8)
        return TensorImages(x, y, mean=0.5, std=0.25)

    return split(s.n_train, 11), split(s.n_val, 12), split(s.n_test, 13)


class Bench:
    """Data, the trained seeds and the prune-recalibrate-fine-tune path every arm shares."""

    def __init__(self, s: Setting, out: Path, seeds_from: Path | None = None):
        self.s = s
        self.seeds_from = seeds_from
        self.ctx = DistContext(device=torch.device("cpu"))
        self.train_set, self.val_set, self.test_set = load_splits(s)
        self.example = torch.zeros(1, 3, s.image_size, s.image_size)
        self.out = out
        self.rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []

    # ---- rows ------------------------------------------------------------------------------------
    def done(self, net: str, seed: int, arm: str, budget: float | None) -> dict | None:
        for row in self.rows:
            if (row["network"], row["seed"], row["arm"], row["budget"]) == (net, seed, arm, budget):
                return row
        return None

    def record(self, row: dict) -> dict:
        self.rows.append(row)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        return row

    # ---- data ------------------------------------------------------------------------------------
    def batches(self, seed: int):
        """Endless shuffled training batches; the order is a function of ``seed``."""
        return infinite_batches(self.train_set, self.s.batch_size, seed=1000 + seed, ctx=self.ctx)

    def loader(self, seed: int) -> DataLoader:
        return DataLoader(self.train_set, self.s.batch_size, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(1000 + seed))

    def val(self, model: nn.Module) -> float:
        return evaluate(model, self.val_set, self.ctx.device)

    def score(self, model: nn.Module) -> float:
        return evaluate(model, Subset(self.val_set, range(self.s.score_images)), self.ctx.device)

    def flops(self, model: nn.Module) -> int:
        return count_flops(model, self.example)

    # ---- seeds -----------------------------------------------------------------------------------
    def new_seed(self, net: str, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return create_seed(net, num_classes=10, in_channels=3, **NETWORK_OPTIONS.get(net, {}))

    def weights(self, net: str, seed: int) -> Path:
        prefix = self.seeds_from or self.out
        return prefix.with_name(prefix.stem + "_weights") / f"{net}_seed{seed}.pt"

    def trained_seed(self, net: str, seed: int) -> nn.Module:
        """The trained seed network (trained and saved on first use; with ``seeds_from``, waited for)."""
        path = self.weights(net, seed)
        model = self.new_seed(net, seed)
        if self.seeds_from is not None:
            rows = self.seeds_from.with_suffix(".jsonl")
            while not (path.exists() and rows.exists() and any(
                    (r["network"], r["seed"], r["arm"]) == (net, seed, "seed")
                    for r in map(json.loads, rows.read_text().splitlines()))):
                time.sleep(30)
            model.load_state_dict(torch.load(path, map_location="cpu"))
            return model
        if self.done(net, seed, "seed", None) is not None and path.exists():
            model.load_state_dict(torch.load(path, map_location="cpu"))
            return model
        start = time.perf_counter()
        train(model, self.train_set, steps=self.s.seed_steps, lr=self.s.seed_lr, batch_size=self.s.batch_size,
              seed=seed, ctx=self.ctx, log_every=self.s.seed_steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        row = {"network": net, "seed": seed, "arm": "seed", "budget": None, "flops": self.flops(model),
               "val": self.val(model), "test": evaluate(model, self.test_set, self.ctx.device),
               "seconds": round(time.perf_counter() - start, 1)}
        print(f"{net} seed {seed}: trained {self.s.seed_steps} steps, val {row['val']:.4f} ({row['seconds']:.0f} s)",
              flush=True)
        self.record(row)
        return model

    # ---- arms ------------------------------------------------------------------------------------
    def run_arm(self, net: str, seed: int, arm: str, budget: float) -> dict:
        row = self.done(net, seed, arm, budget)
        if row is not None:
            return row
        seed_model = self.trained_seed(net, seed)
        seed_flops = self.flops(seed_model)
        start = time.perf_counter()
        base = {"network": net, "seed": seed, "arm": arm, "budget": budget, "seed_flops": seed_flops}
        try:
            torch.manual_seed(seed + 7)
            model, info = RUNNERS[arm](self, net, copy.deepcopy(seed_model), seed, budget)
        except Exception as error:  # a peer (or our own code) that crashed is reported, never dropped
            info = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
            model = None
        row = {**base, **{k: v for k, v in info.items() if k != "model"}}
        if model is not None:
            flops = self.flops(model)
            row.update(flops=flops, flops_fraction=flops / seed_flops, target_error=flops / (budget * seed_flops) - 1,
                       on_budget=abs(flops / (budget * seed_flops) - 1) <= 0.02,
                       val=self.val(model), test=evaluate(model, self.test_set, self.ctx.device))
        row["seconds"] = round(time.perf_counter() - start, 1)
        shown = (f"{row['flops_fraction']:.4f}x val {row['val']:.4f}" if model is not None
                 else f"CRASHED {row['error']}")
        print(f"{net} seed {seed} {arm:20s} {budget:.3f}: {shown} ({row['seconds']:.0f} s)", flush=True)
        return self.record(row)

    def finish(self, model: nn.Module, seed: int, steps: int) -> dict:
        """The shared end of every non-MorphNet arm: BatchNorm statistics re-estimated, then fine-tuned."""
        batches = self.batches(seed)
        morphnet.recalibrate_batchnorm(model, batches, self.s.bn_batches, lambda m, b: m(b[0]))
        val_pruned = self.val(model)
        if steps:
            finetune(model, batches, steps, lr=self.s.finetune_lr)
        return {"val_pruned": val_pruned, "finetune_steps": steps, "widths": _conv_widths(model)}

    def peer_task(self, model: nn.Module, seed: int, budget: float, sparse_steps: int):
        from compress_peers import PeerTask

        return PeerTask(example=self.example, budget_flops=budget * self.flops(model), train_batches=self.batches,
                        val_score=self.score, count_flops=self.flops, sparse_steps=sparse_steps,
                        lr=self.s.finetune_lr, seed=1000 + seed, ignored=[_classifier(model)])


def _conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution by module name: the structure a peer chose, to set beside
    MorphNet's (its ``widths``)."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _classifier(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _morphnet(bench: Bench, net: str, model: nn.Module, seed: int, budget: float, **options) -> tuple:
    """``morphnet.compress`` with its defaults (as shipped) unless ``options`` say otherwise."""
    report: dict = {}
    s = bench.s
    slim = morphnet.compress(model, bench.example, budget, data=bench.loader(seed), steps=s.extra_steps,
                             lr=s.finetune_lr, bn_batches=s.bn_batches, val_fn=bench.val, log=None, report=report,
                             **options)
    scores = report["scores"]
    return slim, {"sparse_steps": report["steps"]["learn"], "finetune_steps": report["steps"]["finetune"],
                  "distill": report["distill"], "val_seed": scores["seed"], "val_learned": scores.get("learned"),
                  "val_landed": scores["landed"], "val_pruned": scores["recalibrated"],
                  "function_check": report["function_check"], "widths": report["widths"],
                  "threshold_scale": report["threshold_scale"],
                  "strength": [h["strength"] for h in report["history"]][::10],
                  "landing_scale": [h["landing_scale"] for h in report["history"]][::10]}


def _morphnet_learn_unweighted(bench: Bench, net: str, model: nn.Module, seed: int, budget: float) -> tuple:
    from budgets import UnweightedGammaFlops

    return _morphnet(bench, net, model, seed, budget, learn_fraction=bench.s.sparse_fraction,
                     regularizer=lambda m, x: UnweightedGammaFlops(m, x, 0.01, min_layer_fraction=0.25))


def _uniform_l1(bench: Bench, net: str, model: nn.Module, seed: int, budget: float) -> tuple:
    slim = shrink_uniformly(model, bench.example, budget)
    return slim, {"sparse_steps": 0, **bench.finish(slim, seed, bench.s.extra_steps),
                  "function_check": "kept-weights rebuild of the largest-L1 channels (exact by construction, "
                                    "tests/test_compress.py)"}


def _peer(name: str, **kwargs):
    def run(bench: Bench, net: str, model: nn.Module, seed: int, budget: float) -> tuple:
        import compress_peers

        sparse = round(bench.s.extra_steps * bench.s.sparse_fraction) if name in SPARSE_PEERS else 0
        task = bench.peer_task(model, seed, budget, sparse)
        options = {"channel_divisor": bench.s.fastnas_divisor, **kwargs} if name == "prune_fastnas" else kwargs
        pruned, info = getattr(compress_peers, name)(model, task, **options)
        if info.get("error") or pruned is None:
            return None, info
        used = int(info.get("sparse_steps", 0))
        return pruned, {**info, **bench.finish(pruned, seed, bench.s.extra_steps - used)}

    return run


SPARSE_PEERS = ("prune_tp_bnscale", "prune_tp_groupnorm", "prune_oto_hesso")


def _uniform_scratch(bench: Bench, net: str, model: nn.Module, seed: int, budget: float) -> tuple:
    """The reference: the uniform network at the budget trained from scratch for the seed's steps plus the
    extra steps, with the seed's recipe."""
    reg = morphnet.GammaFlopsRegularizer(model, bench.example, gamma_threshold=0.0)
    full = morphnet.StructureExporter(reg).get_alive_counts()
    factor, counts = morphnet.find_width_multiplier(model, full, bench.example, budget * float(reg.get_cost()),
                                                    tolerance=None)
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = morphnet.apply_structure(bench.new_seed(net, seed), counts, bench.example)
    steps = bench.s.seed_steps + bench.s.extra_steps
    train(fresh, bench.train_set, steps=steps, lr=bench.s.seed_lr, batch_size=bench.s.batch_size, seed=seed,
          ctx=bench.ctx, log_every=steps)
    return fresh, {"width_multiplier": factor, "train_steps": steps}


RUNNERS = {
    "morphnet": _morphnet,
    "morphnet-no-kd": lambda bench, net, model, seed, budget: _morphnet(bench, net, model, seed, budget,
                                                                         distill=False),
    "morphnet-learn": lambda bench, net, model, seed, budget: _morphnet(bench, net, model, seed, budget,
                                                                         learn_fraction=bench.s.sparse_fraction),
    "morphnet-learn-unweighted": _morphnet_learn_unweighted,
    "uniform-l1": _uniform_l1,
    "tp-local": _peer("prune_tp_magnitude", global_pruning=False),
    "tp-global": _peer("prune_tp_magnitude", global_pruning=True),
    "tp-bnscale": _peer("prune_tp_bnscale"),
    "tp-groupnorm": _peer("prune_tp_groupnorm"),
    "fastnas": _peer("prune_fastnas"),
    "oto": _peer("prune_oto_hesso"),
    "uniform-scratch": _uniform_scratch,
}


def seeds_phase(bench: Bench, first: int, arms=None) -> None:
    for net in bench.s.networks:
        for seed in range(first, first + bench.s.seeds):
            bench.trained_seed(net, seed)


def arms_phase(bench: Bench, first: int, arms=None) -> None:
    """Seed by seed, so that a run cut short has whole seeds; within a seed MorphNet first."""
    for seed in range(first, first + bench.s.seeds):
        for net in bench.s.networks:
            for budget in bench.s.budgets:
                for arm in arms or ARMS:
                    bench.run_arm(net, seed, arm, budget)


PHASES = {"seeds": seeds_phase, "arms": arms_phase}


# ---- tables ----------------------------------------------------------------------------------------
def changed_function(row: dict) -> bool:
    """Whether the pruned network's outputs moved away from the original's with the removed channels zeroed
    by more than float noise (relative to the outputs' scale where the peer recorded it)."""
    check = row.get("function_check")
    if not isinstance(check, (int, float)):
        return False  # not computable for this arm; counted as unchecked
    return check > 1e-4 * max(1.0, float(row.get("function_check_scale") or 1.0))


def compare(rows: list[dict]) -> list[dict]:
    """Per network, budget and arm: accuracy over seeds and MorphNet minus the arm, paired by seed."""
    table = []
    scored = [r for r in rows if r["arm"] != "seed"]
    for net in sorted({r["network"] for r in scored}):
        for budget in sorted({r["budget"] for r in scored if r["network"] == net}, reverse=True):
            here = [r for r in scored if r["network"] == net and r["budget"] == budget]
            mine = {r["seed"]: r for r in here if r["arm"] == "morphnet" and "test" in r}
            for arm in [a for a in ARMS + LATE_ARMS if any(r["arm"] == a for r in here)]:
                rs = [r for r in here if r["arm"] == arm]
                ok = [r for r in rs if "test" in r]
                entry = {"network": net, "budget": budget, "arm": arm, "seeds": len(rs), "crashed": len(rs) - len(ok),
                         "off_budget": sum(not r["on_budget"] for r in ok),
                         "changed_function": sum(changed_function(r) for r in ok),
                         "unchecked": sum(not isinstance(r.get("function_check"), (int, float)) for r in ok)}
                if ok:
                    entry.update(
                        flops_fraction=statistics.fmean(r["flops_fraction"] for r in ok),
                        val=statistics.fmean(r["val"] for r in ok),
                        val_pruned=statistics.fmean(r["val_pruned"] for r in ok) if all("val_pruned" in r for r in ok)
                        else None,
                        test=mean_sd([r["test"] for r in ok]))
                pairs = sorted(set(mine) & {r["seed"] for r in ok})
                if arm != "morphnet" and len(pairs) > 0:
                    other = {r["seed"]: r for r in ok}
                    entry["morphnet_minus"] = paired_verdict([mine[p]["test"] for p in pairs],
                                                             [other[p]["test"] for p in pairs])
                table.append(entry)
    return table


def summary_markdown(table: list[dict]) -> str:
    """The README's condensed table: per network, each arm's test accuracy at every budget and MorphNet
    minus it (paired by seed, with twice its SE and the verdict)."""
    lines = []
    for net in sorted({t["network"] for t in table}):
        here = [t for t in table if t["network"] == net]
        budgets = sorted({t["budget"] for t in here}, reverse=True)
        lines += ["", f"{net}: test accuracy over trained seeds (mean ± sd); MorphNet minus the arm, paired by seed "
                      "(± twice its SE): verdict", "",
                  "| arm | " + " | ".join(f"{b:g} of the FLOPs | MorphNet minus arm" for b in budgets) + " |",
                  "|---|" + "---|---|" * len(budgets)]
        for arm in [a for a in ARMS + LATE_ARMS if any(t["arm"] == a for t in here)]:
            cells = []
            for b in budgets:
                t = next((t for t in here if t["arm"] == arm and t["budget"] == b), None)
                if t is None or "test" not in t:
                    cells += ["not run" if t is None else "crashed", ""]
                    continue
                m, sd = t["test"]
                notes = "".join([f", {t['off_budget']} off budget" if t["off_budget"] else "",
                                 f", {t['crashed']} crashed" if t["crashed"] else "",
                                 f", {t['changed_function']} changed function" if t.get("changed_function") else ""])
                cells.append(f"{100 * m:.2f} ± {100 * (0 if math.isnan(sd) else sd):.2f} (n={t['seeds']}{notes})")
                v = t.get("morphnet_minus")
                cells.append(f"{100 * v['gap']:+.2f} ± {100 * v['two_se']:.2f}: {v['verdict']}" if v else "")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(table: list[dict]) -> str:
    lines = ["| network | budget | arm | seeds | FLOPs | val after pruning | val | test (mean ± sd) | "
             "MorphNet minus arm | 2 x SE | verdict (MorphNet) | ahead |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        if "test" not in t:
            lines.append(f"| {t['network']} | {t['budget']:g} | {t['arm']} | {t['seeds']} | crashed in every seed "
                         f"| | | | | | | |")
            continue
        m, sd = t["test"]
        v = t.get("morphnet_minus")
        notes = "".join([f", {t['crashed']} crashed" if t["crashed"] else "",
                         f", {t['off_budget']} off budget" if t["off_budget"] else "",
                         f", {t['changed_function']} changed function" if t.get("changed_function") else ""])
        vp = "" if t["val_pruned"] is None else f"{100 * t['val_pruned']:.2f}"
        lines.append(
            f"| {t['network']} | {t['budget']:g} | {t['arm']} | {t['seeds']}{notes} | {t['flops_fraction']:.4f}x | "
            f"{vp} | {100 * t['val']:.2f} | {100 * m:.2f} ± {100 * (0 if math.isnan(sd) else sd):.2f} | "
            + (f"{100 * v['gap']:+.2f} | {100 * v['two_se']:.2f} | {v['verdict']} | {v['ahead']}/{v['n']} |"
               if v else "| | | |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(PHASES), default="arms")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--networks", nargs="+", help="run these networks only")
    parser.add_argument("--budgets", type=float, nargs="+", help="run these budgets only")
    parser.add_argument("--arms", nargs="+", choices=ARMS + LATE_ARMS, help="run these arms only")
    parser.add_argument("--seeds-from", metavar="PREFIX",
                        help="take the trained seeds from the run with this --out (waiting for the ones still "
                             "training) instead of training them here")
    parser.add_argument("--combine", nargs="+", metavar="JSONL", help="no training: merge runs and compare")
    parser.add_argument("--quick", action="store_true", help="tiny data, a few steps, one seed (test suite)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu only (the setting is a CPU one)")
    parser.add_argument("--out", help="path prefix for OUT.jsonl (rows), OUT.json, OUT.csv "
                                      "(default benchmarks/results/compress_cpu)")
    args = parser.parse_args()
    setup_cpu(args.threads)
    s = QUICK if args.quick else Setting()
    if args.seeds:
        s = replace(s, seeds=args.seeds)
    if args.networks:
        s = replace(s, networks=tuple(args.networks))
    if args.budgets:
        s = replace(s, budgets=tuple(args.budgets))
    out = Path(args.out or RESULTS / f"compress_cpu{'_quick' if args.quick else ''}").with_suffix("")
    if args.combine:
        rows, seen = [], set()
        for f in args.combine:
            for line in Path(f).read_text().splitlines():
                row = json.loads(line)
                key = (row["network"], row["seed"], row["arm"], row["budget"])
                if key in seen:
                    raise SystemExit(f"{f}: {key} appears twice; combine runs over disjoint seeds")
                seen.add(key)
                rows.append(row)
        env = {"combined_from": args.combine}
    else:
        bench = Bench(s, out.with_suffix(".jsonl"), Path(args.seeds_from).with_suffix("") if args.seeds_from else None)
        env = environment(torch.device("cpu"))
        print(f"compress benchmark, phase {args.phase}, networks {', '.join(s.networks)}, seeds "
              f"{args.first_seed}..{args.first_seed + s.seeds - 1}, budgets {s.budgets}", flush=True)
        start = time.perf_counter()
        PHASES[args.phase](bench, args.first_seed, args.arms)
        env["wall_seconds"] = round(time.perf_counter() - start)
        env["load_average_1m_after"] = round(__import__("os").getloadavg()[0], 2)
        rows = bench.rows
    table = compare(rows)
    if table:
        print("\n" + markdown(table))
        print(summary_markdown(table))
    write_results(out.with_suffix(".json"), {"environment": env, "setting": asdict(s) if not args.combine else None,
                                             "table": table, "rows": rows},
                  [{k: v for k, v in r.items() if k not in ("traceback", "widths", "strength")} for r in rows] or None)
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
