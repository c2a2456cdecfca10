"""End to end on latency measured on the device: does ``morphnet run --target latency --hardware measured``
at half the seed's latency give a network that runs at half the seed's measured latency, and is it
at least as accurate as the uniform network of the same measured-latency cost?

For every seed s, one run in WORK/seed_<s> (resumed when interrupted, skipped when finished):

    morphnet run --model M --data D --target latency --hardware measured --target-cost 0.5
                 --latency-batch-size B --uniform-baseline --no-baseline --steps N --seed s

The latency table is measured by the first run and reused from WORK/latency_cache by the others
(same device, dtype, batch, threads and torch). Each run ends with its own latency check (seed,
slim, uniform; 5 rounds). Afterwards every network of every seed is timed again, all in the same
``--rounds`` interleaved rounds: the seed network and each seed's slim and uniform networks,
rebuilt from their widths (weights do not change latency). Reported per seed: measured latency of
slim and uniform over the seed's (goal for slim: 0.45-0.55), the predicted ratio, test accuracy of
both; over seeds: median ratios, and the accuracy gap slim - uniform against twice its standard
error, pooled (separately trained networks, ``stats.pooled_verdict``) and, for reference, paired
by seed (``stats.paired_verdict``).

    python benchmarks/latency_end_to_end.py [--model resnet20] [--seeds 3] [--latency-batch-size 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, environment, resolve_device, setup_cpu, write_results
from stats import paired_verdict, pooled_verdict

import morphnet
from morphnet.costs.timing import DeviceTimer, time_models
from morphnet.data import load_data
from morphnet.pipeline import RunConfig, files, run_pipeline
from morphnet.seeds import create_seed

SETTINGS = {
    "full": {"model": "resnet20", "data": "synthetic:20000", "seeds": 3, "steps": 1500, "batch_size": 64,
             "rounds": 10, "target_cost": 0.5},
    # the digits CNN's measured latency is mostly fixed per-op overhead: with every layer at its floor (a quarter
    # of its channels) it still takes about 0.62 of the seed's time, so half is refused as impossible
    "quick": {"model": "digits_cnn", "data": "digits", "seeds": 2, "steps": 20, "batch_size": 32, "rounds": 2,
              "target_cost": 0.85},
}
GOAL = (0.45, 0.55)


def run_seed(s: int, cfg: dict, args, work: Path) -> dict:
    """The run of seed ``s`` (its summary): finished earlier, resumed, or started."""
    out = work / f"seed_{s}"
    if (out / files.SUMMARY).is_file():
        return files.read_json(out / files.SUMMARY)
    config = RunConfig(model=cfg["model"], data=cfg["data"], target="latency", hardware="measured",
                       target_cost=args.target_cost, latency_batch_size=args.latency_batch_size,
                       uniform_baseline=True, baseline=False, steps=cfg["steps"], batch_size=cfg["batch_size"],
                       seed=s, device=args.device, threads=args.threads, out=str(out), quiet=True)
    start = time.perf_counter()
    summary = run_pipeline(config, resume=(out / files.CONFIG).is_file())
    print(f"seed {s}: run in {time.perf_counter() - start:.0f} s", flush=True)
    return summary


def retime(summaries: dict[int, dict], cfg: dict, device: torch.device, batch: int, rounds: int) -> dict:
    """Median latency (ms) and spread of the seed and of every seed's slim and uniform networks, all
    timed in the same interleaved rounds."""
    first = next(iter(summaries.values()))
    given = first["input"]
    data = load_data(cfg["data"], seed=0, image_size=first["config"].get("image_size"))
    example = data.example_inputs(1)
    torch.manual_seed(0)
    seed = create_seed(cfg["model"], num_classes=given["num_classes"], in_channels=given["shape"][0],
                       **given["seed_kwargs"])
    models = {"seed": seed}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers kept at one channel instead of zero
        for s, summary in summaries.items():
            models[f"slim_{s}"] = morphnet.apply_structure(seed, summary["slim"]["widths"], example)
            if summary.get("uniform"):
                models[f"uniform_{s}"] = morphnet.apply_structure(seed, summary["uniform"]["widths"], example)
    stats = time_models(models, example, device=device, batch_size=batch, timer=DeviceTimer(device, rounds=rounds))
    return {name: {"ms": st.median * 1e3, "spread": st.spread} for name, st in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="digits CNN, two seeds, a few steps (the test suite)")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="structure learning and retraining steps (default 1500)")
    parser.add_argument("--target-cost", type=float,
                        help="fraction of the seed's latency (default 0.5; 0.85 with --quick)")
    parser.add_argument("--latency-batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, help="rounds of the final timing (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on a shared machine)")
    parser.add_argument("--work", help="folder of the runs (default benchmarks/results/latency_end_to_end_runs)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/latency_end_to_end.json)")
    args = parser.parse_args()
    setup_cpu(args.threads)
    device = resolve_device(args.device)
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    for key in ("model", "data", "seeds", "steps", "rounds", "target_cost"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    args.target_cost = cfg["target_cost"]
    out = Path(args.out or RESULTS / f"latency_end_to_end{'_quick' if args.quick else ''}.json")
    work = Path(args.work) if args.work else out.with_name(out.stem + "_runs")
    os.environ["MORPHNET_LATENCY_CACHE"] = str(work / "latency_cache")  # one table for every seed's run
    env = environment(device)

    seeds = list(range(args.first_seed, args.first_seed + cfg["seeds"]))
    summaries = {s: run_seed(s, cfg, args, work) for s in seeds}
    start = time.perf_counter()
    timed = retime(summaries, cfg, device, args.latency_batch_size, cfg["rounds"])
    print(f"timed {len(timed)} networks in {time.perf_counter() - start:.0f} s", flush=True)
    env["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    rows = []
    for s, summary in summaries.items():
        uniform, in_run = summary.get("uniform") or {}, summary.get("latency") or {}
        row = {"seed": s, "seed_ms": timed["seed"]["ms"], "slim_ms": timed[f"slim_{s}"]["ms"],
               "slim_ratio": timed[f"slim_{s}"]["ms"] / timed["seed"]["ms"],
               "predicted_ratio": summary["slim"]["cost"] / summary["seed"]["cost"],
               "learned_ratio": summary["learned"]["cost_ratio"], "width_multiplier": summary["slim"]["width_multiplier"],
               "slim_accuracy": summary["slim"]["accuracy"], "slim_spread": timed[f"slim_{s}"]["spread"],
               "in_run_slim_ratio": in_run.get("slim", {}).get("ratio"),
               "in_run_uniform_ratio": in_run.get("uniform", {}).get("ratio"),
               "warnings": summary.get("warnings", [])}
        if f"uniform_{s}" in timed:
            row.update(uniform_ms=timed[f"uniform_{s}"]["ms"], uniform_ratio=timed[f"uniform_{s}"]["ms"] / timed["seed"]["ms"],
                       uniform_accuracy=uniform.get("accuracy"), uniform_multiplier=uniform.get("width_multiplier"))
        rows.append(row)
    paired = [r for r in rows if r.get("uniform_accuracy") is not None]
    slim_acc, uniform_acc = [r["slim_accuracy"] for r in paired], [r["uniform_accuracy"] for r in paired]
    result = {
        "slim_ratio_median": statistics.median(r["slim_ratio"] for r in rows),
        "slim_ratio_range": [min(r["slim_ratio"] for r in rows), max(r["slim_ratio"] for r in rows)],
        "slim_ratio_in_goal": sum(GOAL[0] <= r["slim_ratio"] <= GOAL[1] for r in rows),
        "uniform_ratio_median": statistics.median(r["uniform_ratio"] for r in paired) if paired else None,
        "accuracy_pooled": pooled_verdict(slim_acc, uniform_acc) if paired else None,
        "accuracy_paired": paired_verdict(slim_acc, uniform_acc) if paired else None,
        "seed_ms": timed["seed"]["ms"], "seed_spread": timed["seed"]["spread"],
    }
    print(f"\n{cfg['model']} on {cfg['data']}: --target latency --hardware measured --target-cost {args.target_cost}, "
          f"batch {args.latency_batch_size}, {len(rows)} seed(s), on {env['device_name']}")
    print(f"{'seed':>4} {'slim/seed':>10} {'predicted':>10} {'uniform/seed':>13} {'slim acc':>9} {'uniform acc':>12}")
    for r in rows:
        uni = f"{r['uniform_ratio']:.3f}" if "uniform_ratio" in r else "-"
        acc = f"{r['uniform_accuracy']:.2%}" if r.get("uniform_accuracy") is not None else "-"
        print(f"{r['seed']:4d} {r['slim_ratio']:10.3f} {r['predicted_ratio']:10.3f} {uni:>13} "
              f"{r['slim_accuracy']:9.2%} {acc:>12}")
    print(f"slim / seed measured latency: median {result['slim_ratio_median']:.3f}, {result['slim_ratio_in_goal']} of "
          f"{len(rows)} in [{GOAL[0]}, {GOAL[1]}] (seed {result['seed_ms']:.3f} ms)")
    for name in ("accuracy_pooled", "accuracy_paired"):
        v = result[name]
        if v:
            print(f"accuracy slim - uniform ({name.split('_')[1]} SE): {v['gap']:+.2%} +- {v['two_se']:.2%} -> {v['verdict']}")
    settings = {**cfg, "target_cost": args.target_cost, "latency_batch_size": args.latency_batch_size,
                "threads": args.threads, "seeds": seeds, "work": str(work), "goal": GOAL}
    write_results(out, {"environment": env, "settings": settings, "summary": result, "rows": rows}, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
