"""Latency fidelity: does a predicted cost rank rebuilt networks the way measured latency does?

Variants of one seed network, each rebuilt with ``morphnet.apply_structure`` from alive counts:
- random structures: a random fraction of every BatchNorm's channels kept (the analysis merges
  coupled layers, so residual groups stay consistent), read back with the exporter;
- learned structures: the snapshots of one structure-learning run (the pipeline's
  ``learn_structure``, Gamma FLOPs at a fixed strength) as it shrinks the network;
- every structure also rounded to multiples of 8 (``morphnet.expand_structure(..., 1.0, round_to=8)``).
Measured: forward latency in eval mode. On CUDA (bf16 weights and inputs, channels_last): batch 1 replayed
from a CUDA graph, and batch 256. On CPU (fp32, eager): batch 1 and batch 32. Rounds go through
every variant in a shuffled order; a variant's latency is the median of its per-round medians
(the fastest round, least disturbed on a shared machine, is reported beside it).
Predicted: FLOPs and roofline latency (``morphnet.compute_cost``, for the measured batch size) on
a hardware entry: the GPU's own on CUDA (``--hardware``, default H100), and on CPU an entry
registered from this machine's measured matmul throughput and copy bandwidth.
Reported: Spearman rank correlation of measured latency with each prediction, per batch size, and
the measured effect of rounding to multiples of 8.

    python benchmarks/latency_fidelity.py [--device auto|cpu|cuda] [--quick] [--out PATH]
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

import torch
from common import RESULTS, environment, median, resolve_device, setup_cpu, synchronize, write_results
from scipy.stats import spearmanr
from torch import nn

import morphnet
from morphnet.data import load_data
from morphnet.pipeline import RunConfig
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.learn import learn_structure
from morphnet.seeds import create_seed

CPU_HARDWARE = "bench-cpu"


def measure_cpu_roofline(threads: int) -> tuple[float, float]:
    """Rough peak GFLOP/s (best of a few 1024^3 fp32 matmuls) and GB/s (best 64 MiB copy) here."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.empty(16 * 2**20), torch.empty(16 * 2**20)
    flops, copy = [], []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        flops.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return max(flops), max(copy)


def random_structures(seed_model: nn.Module, example: torch.Tensor, count: int, rng: random.Random) -> list[dict]:
    """Alive counts of ``count`` random structures: each BatchNorm keeps a random 10-100% of its
    channels; the Gamma regularizer's analysis makes coupled layers agree (alive = OR)."""
    out = []
    for _ in range(count):
        model = copy.deepcopy(seed_model)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    keep = max(1, round(rng.uniform(0.1, 1.0) * m.num_features))
                    m.weight.zero_()
                    m.weight[rng.sample(range(m.num_features), keep)] = 1.0
        reg = morphnet.GammaFlopsRegularizer(model, example, gamma_threshold=0.5)
        out.append(morphnet.StructureExporter(reg).get_alive_counts())
    return out


def learned_structures(model_name: str, data: str, device: torch.device, steps: int, batch: int) -> list[dict]:
    """Snapshots of one Gamma-FLOPs structure-learning run (ten exports along the way)."""
    bundle = load_data(data, seed=0)
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(0)
        model = create_seed(model_name, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0]).to(device)
        seed_flops = morphnet.compute_cost(model, bundle.example_inputs(1).to(device))
        cfg = RunConfig(model=model_name, data=data, strength=30 / seed_flops, steps=steps, batch_size=batch,
                        export_every=max(1, steps // 10), log_every=max(1, steps // 10), out=out, quiet=True)
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


def build_variants(seed_model, example, structures: list[tuple[str, dict]], round_to: int) -> list[dict]:
    """Every distinct structure as given and rounded to multiples of ``round_to``."""
    variants, seen = [], set()
    for i, (kind, counts) in enumerate(structures):
        rounded = morphnet.expand_structure(seed_model, counts, example, 1.0, round_to=round_to)
        for is_rounded, final in ((False, counts), (True, rounded)):
            key = json.dumps(final, sort_keys=True)
            if key not in seen:
                seen.add(key)
                variants.append({"structure": i, "kind": kind, "rounded": is_rounded, "counts": final})
    return variants


SETTINGS = {
    "cuda": {"model": "resnet56", "data": "synthetic:20000", "batches": (1, 256), "random": 16, "learn_steps": 1500,
             "learn_batch": 128, "rounds": 5, "reps": {1: 200, 256: 20}},
    "cpu": {"model": "resnet20", "data": "synthetic:2000", "batches": (1, 32), "random": 16, "learn_steps": 150,
            "learn_batch": 32, "rounds": 5, "reps": {1: 30, 32: 8}},
    "quick": {"model": "digits_cnn", "data": "digits", "batches": (1, 8), "random": 2, "learn_steps": 20,
              "learn_batch": 32, "rounds": 1, "reps": {1: 2, 8: 2}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a few tiny variants (used by the test suite)")
    parser.add_argument("--model", help="seed network (default resnet56 on CUDA, resnet20 on CPU)")
    parser.add_argument("--hardware", default="H100", help="roofline entry for CUDA runs (default H100)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/latency_fidelity_<device>.json)")
    args = parser.parse_args()
    setup_cpu(args.threads)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    cfg = dict(SETTINGS["quick" if args.quick else device.type])
    if args.model:
        cfg["model"] = args.model
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

    bundle = load_data(cfg["data"], seed=0)
    shape = bundle.input_shape
    example = bundle.example_inputs(1)
    torch.manual_seed(0)
    seed_model = create_seed(cfg["model"], num_classes=bundle.num_classes, in_channels=shape[0])
    full = morphnet.StructureExporter(morphnet.GammaFlopsRegularizer(seed_model, example, gamma_threshold=0.0))
    rng = random.Random(0)
    structures = [("seed", full.get_alive_counts())]
    structures += [("random", c) for c in random_structures(seed_model, example, cfg["random"], rng)]
    start = time.perf_counter()
    structures += [("learned", c) for c in learned_structures(cfg["model"], cfg["data"], device, cfg["learn_steps"],
                                                                  cfg["learn_batch"])]
    print(f"learned structures in {time.perf_counter() - start:.0f} s", flush=True)
    variants = build_variants(seed_model, example, structures, round_to=8)

    timers = []
    for v in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers kept at one channel instead of zero
            slim = morphnet.apply_structure(seed_model, v["counts"], example)
        v["flops"] = morphnet.compute_cost(slim, example, "flops")
        for b in cfg["batches"]:
            v[f"roofline_ns_b{b}"] = morphnet.compute_cost(slim, example, "latency", hardware, batch_size=b)
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
    print(f"measured {len(variants)} variants in {time.perf_counter() - start:.0f} s", flush=True)
    for v, s in zip(variants, samples):
        for b in cfg["batches"]:
            v[f"latency_ms_b{b}"] = round(1e3 * median(s[b]), 4)
            v[f"fastest_round_ms_b{b}"] = round(1e3 * min(s[b]), 4)
            v[f"round_spread_b{b}"] = round((max(s[b]) - min(s[b])) / median(s[b]), 4)

    summary = {}
    for b in cfg["batches"]:
        flops, roofline = [v["flops"] for v in variants], [v[f"roofline_ns_b{b}"] for v in variants]
        measured, fastest = [v[f"latency_ms_b{b}"] for v in variants], [v[f"fastest_round_ms_b{b}"] for v in variants]
        summary[f"batch_{b}"] = {
            "spearman_flops": round(float(spearmanr(measured, flops)[0]), 3),
            "spearman_roofline": round(float(spearmanr(measured, roofline)[0]), 3),
            "spearman_flops_fastest_round": round(float(spearmanr(fastest, flops)[0]), 3),
            "spearman_roofline_fastest_round": round(float(spearmanr(fastest, roofline)[0]), 3),
            "rounding_speedup_median": _rounding_effect(variants, f"latency_ms_b{b}"),
            "round_spread_median": round(median([v[f"round_spread_b{b}"] for v in variants]), 4),
        }
    summary["rounding_flop_ratio_median"] = _rounding_effect(variants, "flops")
    env["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    kinds = {kind: sum(k == kind for k, _ in structures) for kind in ("seed", "random", "learned")}
    print(f"\n{len(variants)} distinct variants of {cfg['model']} from {kinds['random']} random and {kinds['learned']} "
          f"learned structures and the seed, each as is and rounded to 8, on {env['device_name']}")
    for b in cfg["batches"]:
        s = summary[f"batch_{b}"]
        print(f"batch {b:4d}: Spearman(latency, FLOPs) = {s['spearman_flops']:+.3f}   Spearman(latency, roofline on "
              f"{hardware}) = {s['spearman_roofline']:+.3f}   unrounded/rounded latency (median) = "
              f"{s['rounding_speedup_median']}   spread over rounds (median) = {s['round_spread_median']:.1%}")
        print(f"            fastest round instead of median: Spearman with FLOPs "
              f"{s['spearman_flops_fastest_round']:+.3f}, with roofline {s['spearman_roofline_fastest_round']:+.3f}")
    print(f"rounded/unrounded FLOPs (median): {summary['rounding_flop_ratio_median']}")
    out = args.out or RESULTS / f"latency_fidelity_{device.type}{'_quick' if args.quick else ''}.json"
    write_results(out, {"environment": env, "settings": {**cfg, "hardware": hardware, "cpu_hardware_entry": measured_entry},
                        "summary": summary, "rows": variants}, variants)
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
