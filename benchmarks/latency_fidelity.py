"""Latency fidelity: does a predicted cost rank rebuilt networks the way measured latency does?

For each seed network (on CPU: CIFAR ResNet-20, the MobileNetV2-style ``mobilenetv2_cifar`` with
depthwise convs, and the small ViT ``vit_tiny``; on CUDA: ResNet-56), variants rebuilt with
``morphnet.apply_structure`` from alive counts:
- random structures: every conv / linear layer keeps a random 10-100% of the channel groups it
  writes first (BatchNorm channels, attention heads, MLP widths; coupled layers agree because the
  groups are shared), read back with the exporter; as many as it takes to reach ``--variants``
  distinct variants (default 50) with the others;
- learned structures: the snapshots of one structure-learning run (the pipeline's
  ``learn_structure``: Gamma FLOPs for BatchNorm networks, group lasso for the ViT) as it shrinks
  the network;
- every structure also rounded to multiples of 8 (``morphnet.expand_structure(..., 1.0, round_to=8)``).
Measured: forward latency in eval mode. On CUDA (bf16 weights and inputs, channels_last): batch 1
replayed from a CUDA graph, and batch 256. On CPU (fp32, eager): batch 1 and batch 32. Rounds go
through every variant in a shuffled order; a variant's latency is the median of its per-round
medians (the fastest round, least disturbed on a shared machine, is reported beside it).
Predicted, for the measured batch size:
- FLOPs (``morphnet.compute_cost``);
- roofline latency on a hardware entry: the GPU's own on CUDA (``--hardware``, default H100), and
  on CPU an entry registered from this machine's measured matmul throughput and copy bandwidth;
- the measured latency model: ``morphnet.measure_latency`` on the seed (its ops timed at a few
  widths on this device, dtype and batch size), used for every variant (a slim network's ops are
  the seed's ops at other widths).
Reported: Spearman rank correlation of measured latency with each prediction, per network and batch
size, side by side, and the measured effect of rounding to multiples of 8.

    python benchmarks/latency_fidelity.py [--device auto|cpu|cuda] [--models a,b] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, environment, median, resolve_device, setup_cpu, synchronize, write_results
from scipy.stats import spearmanr
from torch import nn

import morphnet
from morphnet.costs.measured import extend_table
from morphnet.data import load_data
from morphnet.pipeline import RunConfig
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.learn import learn_structure
from morphnet.seeds import create_seed
from morphnet.seeds.registry import takes_image_size

CPU_HARDWARE = "bench-cpu"
PREDICTIONS = ("flops", "roofline", "measured")


def measure_cpu_roofline(threads: int) -> tuple[float, float]:
    """Rough peak GFLOP/s (best of a few 1024^3 fp32 matmuls) and GB/s (best 64 MiB copy) here."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.empty(16 * 2**20), torch.empty(16 * 2**20)
    flops, copy_ = [], []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        flops.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        dst.copy_(src)
        copy_.append(2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return max(flops), max(copy_)


def build_seed(name: str, bundle) -> nn.Module:
    kwargs = {"image_size": bundle.input_shape[-1]} if takes_image_size(name) else {}
    return create_seed(name, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0], **kwargs)


def source_regularizer(model: nn.Module, example: torch.Tensor, **kw):
    """A Gamma regularizer where BatchNorm reaches the prunable channels, else group lasso (the ViT);
    threshold 0: every channel of a fresh network is alive."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nothing regularized: use the weights instead
            return morphnet.GammaFlopsRegularizer(model, example, gamma_threshold=0.0, **kw), "gamma"
    except (ValueError, UserWarning):
        return morphnet.GroupLassoFlopsRegularizer(model, example, threshold=0.0, **kw), "group-lasso"


class ForcedAlive:
    """A regularizer decorator that replaces the alive vector of the regularized groups."""

    def __init__(self, regularized: np.ndarray):
        self.regularized = torch.as_tensor(regularized)
        self.alive: torch.Tensor | None = None

    def __call__(self, alive: torch.Tensor, reg: torch.Tensor):
        return torch.where(self.regularized.to(alive.device), self.alive.to(alive), alive), reg


def random_structures(seed_model: nn.Module, example: torch.Tensor, rng: random.Random):
    """An endless supply of random structures: each conv / linear layer keeps a random 10-100% of the
    regularized channel groups it writes first; groups shared by several layers follow the first."""
    forced = ForcedAlive(np.zeros(1, bool))
    reg, _ = source_regularizer(seed_model, example, regularizer_decorator=forced)
    a = reg.analysis
    forced.regularized = torch.as_tensor(reg.grouping.regularized)
    owner: dict[int, str] = {}
    for name in sorted(a.weights):
        for g in a.group_of[a.weights[name].out_ids]:
            owner.setdefault(int(g), a.weights[name].module)
    layers = sorted(set(owner.values()))
    exporter = morphnet.StructureExporter(reg)
    while True:
        keep = {layer: rng.uniform(0.1, 1.0) for layer in layers}
        forced.alive = torch.tensor([rng.random() < keep.get(owner.get(g), 1.0) for g in range(a.num_groups)],
                                    dtype=torch.float64)
        yield exporter.get_alive_counts()


def learned_structures(model_name: str, data: str, device: torch.device, steps: int, batch: int, learn: dict) -> list[dict]:
    """Snapshots of one structure-learning run (ten exports along the way): ``learn`` holds a FLOPs
    ``target_cost`` (steered) or a ``strength`` k (fixed, k / seed FLOPs)."""
    bundle = load_data(data, seed=0)
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(0)
        model = build_seed(model_name, bundle).to(device)
        _, regularizer = source_regularizer(model, bundle.example_inputs(1).to(device))
        seed_flops = morphnet.compute_cost(model, bundle.example_inputs(1).to(device))
        target = ({"target_cost": learn["target_cost"]} if "target_cost" in learn
                  else {"strength": learn["strength"] / seed_flops})
        cfg = RunConfig(model=model_name, data=data, regularizer=regularizer, steps=steps, batch_size=batch,
                        export_every=max(1, steps // 10), log_every=max(1, steps // 10), out=out, quiet=True,
                        min_layer_fraction=0.0, **target)
        learn_structure(cfg, DistContext(device=device), bundle, model)
        files = sorted(Path(out, "learned_structure").glob("alive_*.json"), key=lambda p: int(p.stem.split("_")[1]))
        return [json.loads(p.read_text()) for p in files]


def forward_timer(model: nn.Module, batch: int, shape: tuple[int, ...], device: torch.device, graph: bool):
    """A function that runs ``reps`` forwards and returns the seconds of one: on CUDA the mean of a
    burst between two events (replaying a CUDA graph when ``graph``), on CPU the median."""
    x = torch.randn(batch, *shape, device=device)
    if device.type == "cpu":
        def run_cpu(reps: int) -> float:
            times = []
            with torch.inference_mode():
                for _ in range(reps):
                    start = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - start)
            return median(times)
        return run_cpu

    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            return model(x)

    call = forward
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            forward()
        call = cuda_graph.replay

    def run_cuda(reps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    return run_cuda


def build_variants(seed_model, example, structures: list[tuple[str, dict]], round_to: int,
                   seen: set | None = None) -> list[dict]:
    """Every distinct structure as given and rounded to multiples of ``round_to`` (``seen``: keys of
    variants already built, updated)."""
    variants, seen = [], set() if seen is None else seen
    for i, (kind, counts) in structures:
        rounded = morphnet.expand_structure(seed_model, counts, example, 1.0, round_to=round_to)
        for is_rounded, final in ((False, counts), (True, rounded)):
            key = json.dumps(final, sort_keys=True)
            if key not in seen:
                seen.add(key)
                variants.append({"structure": i, "kind": kind, "rounded": is_rounded, "counts": final})
    return variants


SETTINGS = {
    "cuda": {"models": ("resnet56",), "data": "synthetic:20000", "batches": (1, 256), "variants": 50,
             "learn_steps": 1500, "learn_batch": 128, "learn": {"strength": 30}, "rounds": 5,
             "reps": {1: 200, 256: 20}},
    "cpu": {"models": ("resnet20", "mobilenetv2_cifar", "vit_tiny"), "data": "synthetic:2000", "batches": (1, 32),
            "variants": 50, "learn_steps": 150, "learn_batch": 32, "learn": {"target_cost": 0.25}, "rounds": 9,
            "reps": {1: 30, 32: 8}},
    "quick": {"models": ("digits_cnn", "vit_tiny"), "data": "digits", "batches": (1, 8), "variants": 6,
              "learn_steps": 20, "learn_batch": 32, "learn": {"target_cost": 0.5}, "rounds": 1,
              "reps": {1: 2, 8: 2}},
}


def latency_tables(seed_model: nn.Module, example: torch.Tensor, device: torch.device, batches, quick: bool) -> dict:
    """The measured latency model of the seed per batch size, timed on this device (not cached)."""
    tables = {}
    model = copy.deepcopy(seed_model).eval().to(device)
    dtype, fmt = (torch.bfloat16, "channels_last") if device.type == "cuda" else (torch.float32, "contiguous")
    for b in batches:
        start = time.perf_counter()
        tables[b] = morphnet.measure_latency(model, example.to(device), device=device, dtype=dtype, batch_size=b,
                                             memory_format=fmt, cache=False, rounds=1 if quick else 5,
                                             warmup=1 if quick else 3)
        tables[b].seconds = time.perf_counter() - start
    return tables


def measured_prediction(table, slim: nn.Module, example: torch.Tensor) -> float:
    """The measured model's latency (ns) of ``slim``; op shapes the seed's table lacks (a rebuilt
    attention module's own ops, a width above the seed's) are timed first, never the variant whole."""
    try:
        return morphnet.compute_cost(slim, example, "latency", hardware=table)
    except ValueError:
        extend_table(table, slim, example, calibrate=False)
        return morphnet.compute_cost(slim, example, "latency", hardware=table)


def run_model(name: str, cfg: dict, device: torch.device, hardware: str, quick: bool, rng: random.Random):
    """Variants of one seed network, timed and predicted: (rows, summary, settings)."""
    bundle = load_data(cfg["data"], seed=0)
    shape, example = bundle.input_shape, bundle.example_inputs(1)
    torch.manual_seed(0)
    seed_model = build_seed(name, bundle)
    full = morphnet.StructureExporter(source_regularizer(seed_model, example)[0])
    start = time.perf_counter()
    learned = learned_structures(name, cfg["data"], device, cfg["learn_steps"], cfg["learn_batch"], cfg["learn"])
    print(f"{name}: learned structures in {time.perf_counter() - start:.0f} s", flush=True)
    structures = [("seed", full.get_alive_counts())] + [("learned", c) for c in learned]
    seen: set = set()
    variants = build_variants(seed_model, example, list(enumerate(structures)), 8, seen)
    supply = random_structures(seed_model, example, rng)
    for _ in range(20 * cfg["variants"]):
        if len(variants) >= cfg["variants"]:
            break
        structures.append(("random", next(supply)))
        variants += build_variants(seed_model, example, [(len(structures) - 1, structures[-1])], 8, seen)
    start = time.perf_counter()
    tables = latency_tables(seed_model, example, device, cfg["batches"], quick)
    print(f"{name}: measured latency model in {time.perf_counter() - start:.0f} s "
          f"({', '.join(f'batch {b}: {len(t.ops)} op shapes' for b, t in tables.items())})", flush=True)

    timers = []
    for v in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers kept at one channel instead of zero
            slim = morphnet.apply_structure(seed_model, v["counts"], example)
        v["model"] = name
        v["flops"] = morphnet.compute_cost(slim, example, "flops")
        for b in cfg["batches"]:
            v[f"roofline_ns_b{b}"] = morphnet.compute_cost(slim, example, "latency", hardware, batch_size=b)
            v[f"measured_ns_b{b}"] = measured_prediction(tables[b], slim, example)
        slim = slim.eval().to(device)
        if device.type == "cuda":
            slim = slim.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        timers.append({b: forward_timer(slim, b, shape, device, graph=device.type == "cuda" and b == 1)
                       for b in cfg["batches"]})
    samples = [{b: [] for b in cfg["batches"]} for _ in variants]
    for t in timers:  # warm-up
        for b, run in t.items():
            run(2)
    start = time.perf_counter()
    order = list(range(len(variants)))
    for _ in range(cfg["rounds"]):
        rng.shuffle(order)
        for i in order:
            for b, run in timers[i].items():
                samples[i][b].append(run(cfg["reps"][b]))
    synchronize(device)
    print(f"{name}: timed {len(variants)} variants in {time.perf_counter() - start:.0f} s", flush=True)
    for v, s in zip(variants, samples):
        for b in cfg["batches"]:
            v[f"latency_ms_b{b}"] = round(1e3 * median(s[b]), 4)
            v[f"fastest_round_ms_b{b}"] = round(1e3 * min(s[b]), 4)
            v[f"round_spread_b{b}"] = round((max(s[b]) - min(s[b])) / median(s[b]), 4)
            v[f"rounds_ms_b{b}"] = [round(1e3 * t, 4) for t in s[b]]

    summary = {}
    for b in cfg["batches"]:
        measured = [v[f"latency_ms_b{b}"] for v in variants]
        fastest = [v[f"fastest_round_ms_b{b}"] for v in variants]
        predictions = {"flops": [v["flops"] for v in variants],
                       "roofline": [v[f"roofline_ns_b{b}"] for v in variants],
                       "measured": [v[f"measured_ns_b{b}"] for v in variants]}
        s = {f"spearman_{k}": _spearman(measured, p) for k, p in predictions.items()}
        s.update({f"fraction_error_{k}": _fraction_error(measured, p, variants.index(seed_row(variants)))
                  for k, p in predictions.items()})
        s.update({f"spearman_{k}_fastest_round": _spearman(fastest, p) for k, p in predictions.items()})
        s["spearman_repeat"] = split_half_spearman([v[f"rounds_ms_b{b}"] for v in variants])
        seed_row_ = seed_row(variants)
        s.update({
            "rounding_speedup_median": _rounding_effect(variants, f"latency_ms_b{b}"),
            "round_spread_median": round(median([v[f"round_spread_b{b}"] for v in variants]), 4),
            "seed_ms": seed_row_[f"latency_ms_b{b}"], "seed_measured_model_ms": round(seed_row_[f"measured_ns_b{b}"] / 1e6, 4),
            "measured_model_ratio_median": round(median([v[f"measured_ns_b{b}"] / 1e6 / v[f"latency_ms_b{b}"]
                                                         for v in variants]), 4),
            "slower_than_seed": sum(v[f"latency_ms_b{b}"] > seed_row_[f"latency_ms_b{b}"] for v in variants
                                    if v is not seed_row_),
        })
        summary[f"batch_{b}"] = s
    summary["rounding_flop_ratio_median"] = _rounding_effect(variants, "flops")
    kinds = {kind: sum(k == kind for k, _ in structures) for kind in ("seed", "random", "learned")}
    settings = {"structures": kinds, "variants": len(variants),
                "tables": {str(b): {"seconds": round(t.seconds, 1), "op_shapes": len(t.ops), "timing": t.timing,
                                    "key": t.key, "models": t.models} for b, t in tables.items()}}
    return variants, summary, settings


def _spearman(a, b) -> float:
    return round(float(spearmanr(a, b)[0]), 3)


def split_half_spearman(rounds: list[list[float]]) -> float | None:
    """How well the timing ranks the variants against itself: Spearman between the medians of the
    even and of the odd timing rounds (None with fewer than 2 rounds). No predictor can be expected
    to rank the variants much better than the measurement repeats its own ranking."""
    if min(len(r) for r in rounds) < 2:
        return None
    return _spearman([median(r[0::2]) for r in rounds], [median(r[1::2]) for r in rounds])


def seed_row(variants: list[dict]) -> dict:
    return next(v for v in variants if v["kind"] == "seed" and not v["rounded"])


def _fraction_error(measured, predicted, seed: int, skip: tuple[int, ...] = ()) -> float:
    """What a target given as a fraction of the seed's latency depends on: the median over variants of
    |predicted fraction of the seed / measured fraction of the seed - 1| (``skip``: rows left out)."""
    errors = [abs((p / predicted[seed]) / (m / measured[seed]) - 1)
              for i, (m, p) in enumerate(zip(measured, predicted)) if i != seed and i not in skip]
    return round(float(median(errors)), 4)


def reanalyse(path: str) -> None:
    """From a saved run: each predictor's fraction error, and what a two-point calibration of the
    measured model (real = a x prediction + b through the seed and the variant predicted nearest
    half of it, that variant then left out) would have made of it. Calibration keeps the ranking."""
    data = json.loads(Path(path).read_text())
    print(f"{'network':20} {'batch':>5} {'FLOPs':>7} {'roofline':>9} {'measured':>9} {'two-point':>10}   "
          f"(median |predicted / measured fraction of the seed - 1|)")
    for name in dict.fromkeys(r["model"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["model"] == name]
        seed = rows.index(seed_row(rows))
        for b in sorted({int(k.split("_b")[1]) for k in rows[0] if k.startswith("latency_ms_b")}):
            real = np.array([r[f"latency_ms_b{b}"] for r in rows])
            pred = {"flops": np.array([r["flops"] for r in rows], float),
                    "roofline": np.array([r[f"roofline_ns_b{b}"] for r in rows]),
                    "measured": np.array([r[f"measured_ns_b{b}"] for r in rows])}
            p = pred["measured"]
            half = int(np.argmin(np.abs(p / p[seed] - 0.5) + np.eye(len(p))[seed]))
            a = (real[seed] - real[half]) / (p[seed] - p[half])
            two_point = a * p + (real[seed] - a * p[seed])
            errors = [_fraction_error(real, pred[k], seed, (half,)) for k in ("flops", "roofline", "measured")]
            print(f"{name:20} {b:5d} " + " ".join(f"{e:9.3f}" for e in errors)
                  + f" {_fraction_error(real, two_point, seed, (half,)):10.3f}   (scale {a * 1e6:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a few tiny variants (used by the test suite)")
    parser.add_argument("--models", help="comma-separated seed networks (default resnet56 on CUDA; resnet20, "
                                         "mobilenetv2_cifar, vit_tiny on CPU)")
    parser.add_argument("--variants", type=int, help="distinct variants per network (default 50)")
    parser.add_argument("--hardware", default="H100", help="roofline entry for CUDA runs (default H100)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/latency_fidelity_<device>.json)")
    parser.add_argument("--reanalyse", metavar="JSON", help="no timing: fraction errors of a saved run, and what a "
                                                            "two-point calibration would have made of them")
    args = parser.parse_args()
    if args.reanalyse:
        return reanalyse(args.reanalyse)
    setup_cpu(args.threads)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    cfg = dict(SETTINGS["quick" if args.quick else device.type])
    if args.models:
        cfg["models"] = tuple(args.models.split(","))
    if args.variants:
        cfg["variants"] = args.variants
    env = environment(device)
    if device.type == "cuda":
        hardware, measured_entry = args.hardware, None
    else:
        peak, bandwidth = measure_cpu_roofline(args.threads)
        morphnet.register_hardware(CPU_HARDWARE, peak, bandwidth, overwrite=True)
        hardware = CPU_HARDWARE
        measured_entry = {"peak_gflops": round(peak, 1), "bandwidth_gbps": round(bandwidth, 1)}
        print(f"{CPU_HARDWARE}: measured {peak:.0f} GFLOP/s (fp32 matmul) and {bandwidth:.1f} GB/s (copy) "
              f"with {args.threads} thread(s)", flush=True)

    rng = random.Random(0)
    rows, summary, per_model = [], {}, {}
    for name in cfg["models"]:
        variants, summary[name], per_model[name] = run_model(name, cfg, device, hardware, args.quick, rng)
        rows += variants
    env["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    print(f"\nSpearman rank correlation with measured latency on {env['device_name']} ({device.type}), "
          f"{'bf16 channels_last' if device.type == 'cuda' else f'fp32, {args.threads} thread(s)'}:")
    print(f"{'network':20} {'batch':>5} {'variants':>8} {'FLOPs':>7} {'roofline':>9} {'measured':>9}   "
          f"{'repeat':>7} {'seed ms':>8} {'model/real':>10} {'spread':>7} {'slower':>6}")
    for name in cfg["models"]:
        for b in cfg["batches"]:
            s = summary[name][f"batch_{b}"]
            print(f"{name:20} {b:5d} {per_model[name]['variants']:8d} {s['spearman_flops']:+7.3f} "
                  f"{s['spearman_roofline']:+9.3f} {s['spearman_measured']:+9.3f}   "
                  f"{'n/a' if s['spearman_repeat'] is None else format(s['spearman_repeat'], '+.3f'):>7} {s['seed_ms']:8.3f} "
                  f"{s['measured_model_ratio_median']:10.3f} {s['round_spread_median']:7.1%} {s['slower_than_seed']:6d}")
    print("model/real: the measured model's prediction over the measured latency (median over variants); "
          "slower: variants slower than the seed")
    out = args.out or RESULTS / f"latency_fidelity_{device.type}{'_quick' if args.quick else ''}.json"
    write_results(out, {"environment": env, "settings": {**cfg, "hardware": hardware, "cpu_hardware_entry": measured_entry,
                                                         "per_model": per_model},
                        "summary": summary, "rows": rows}, rows)
    print(f"wrote {out}")


def _rounding_effect(variants: list[dict], key: str) -> float | None:
    """Median over structures of value(unrounded) / value(rounded) (or rounded / unrounded for FLOPs)."""
    by = {(v["structure"], v["rounded"]): v[key] for v in variants}
    pairs = [(by[(i, False)], by[(i, True)]) for i, r in by if r and (i, False) in by]
    if not pairs:
        return None
    ratios = [b / a if key == "flops" else a / b for a, b in pairs]
    return round(median(ratios), 4)


if __name__ == "__main__":
    main()
