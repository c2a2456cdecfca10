"""summary.json: what a job found, assembled here from what its stages return (the learned
structure, the slim network, the baselines), with the plain warnings about how it ended. The
report, ``format_summary`` and the benchmarks read it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphnet.pipeline import files, latency
from morphnet.pipeline.config import RunConfig
from morphnet.pipeline.distributed import DistContext
from morphnet.pipeline.learn import LearnResult
from morphnet.pipeline.rebuild import Rebuilt
from morphnet.pipeline.regularizers import UNITS
from morphnet.pipeline.session import Session
from morphnet.reporting import format_summary, write_report


def learn_summary(cfg: RunConfig, ctx: DistContext, result: LearnResult, seed_stats: dict) -> dict[str, Any]:
    """The part of summary.json that structure learning fills in."""
    target = result.target_cost
    return {
        "config": cfg.to_dict(),
        "world_size": ctx.world_size,
        "ranks_agree": result.ranks_agree,
        "target": {
            "resource": cfg.target, "unit": UNITS[cfg.target], "regularizer": result.regularizer_name,
            "cost_name": result.cost_name, "target_cost": target, "tolerance": cfg.tolerance,
            "initial_strength": result.initial_strength, "final_strength": result.final_strength,
        },
        "seed": {**seed_stats, "cost": result.seed_cost, "widths": result.seed_widths},
        "learned": {
            "step": result.chosen.step, "cost": result.chosen.cost, "widths": result.chosen.counts,
            "cost_ratio": result.chosen.cost / result.seed_cost,
            "target_error": None if target is None else result.chosen.cost / target - 1,
            "structure_file": str(Path(result.structure_file).relative_to(cfg.out)),
        },
        "seconds": {"learn": result.seconds},
    }


def slim_summary(cfg: RunConfig, stats: dict[str, Any], predicted: float, rebuilt: Rebuilt,
                 target_cost: float | None) -> dict[str, Any]:
    """The slim network's part of summary.json, before retraining adds its accuracy."""
    slim = {**stats, "predicted_cost": predicted, "widths": rebuilt.counts,
            "width_multiplier": rebuilt.width_multiplier, "dir": files.SLIM,
            "training": (f"fine-tuned {cfg.retrain_steps} steps from the learned network's kept "
                         "weights" if cfg.finetune else f"retrained {cfg.retrain_steps} steps from "
                         "scratch")}
    if target_cost is not None:
        slim["target_error"] = stats["cost"] / target_cost - 1
    return slim


def input_summary(session: Session) -> dict[str, Any]:
    """What the job ran on: the data, its input shape and classes, the seed's extra arguments."""
    return {"data": session.data.name, "shape": list(session.data.input_shape),
            "num_classes": session.data.num_classes, "seed_kwargs": session.seed_kwargs}


def outcome(summary: dict[str, Any]) -> list[str]:
    """Plain warnings about how the run ended: learning far from the target, and a target that
    only the uniform width multiplier reached. Empty when the learned structure landed."""
    target, learned, slim = summary["target"], summary["learned"], summary.get("slim", {})
    cfg = summary["config"]
    notes = []
    error = learned.get("target_error")
    if error is not None and abs(error) > target["tolerance"]:
        direction = "above" if error > 0 else "below"
        advice = ("more --steps (the strength ramps up over the first half of learning) or a higher starting "
                  "--strength" if error > 0 else "a lower starting --strength or more --steps")
        notes.append(f"structure learning ended {abs(error):.0%} {direction} the target after {cfg['steps']} steps "
                     f"(tolerance {target['tolerance']:.0%}); try {advice}")
        if slim.get("width_multiplier") is not None:
            notes.append(f"the slim network reaches the target only through the uniform width multiplier "
                         f"(x{slim['width_multiplier']:.3f} on every layer), not through learned widths")
    notes += uniform_notes(summary)
    notes += latency.notes(summary)
    return notes


def uniform_notes(summary: dict[str, Any]) -> list[str]:
    """A plain warning when the uniform network of the same cost, trained the same way, did better than
    the slim network: one run's learned structure is not always better, and the user should know which
    network to keep (both are saved). Judged on the held-out validation data when the run has it
    (``--val-fraction``), else on the test data, and then it says so."""
    slim, uniform = summary.get("slim") or {}, summary.get("uniform") or {}
    key = "val_accuracy" if slim.get("val_accuracy") is not None and uniform.get("val_accuracy") is not None \
        else "accuracy"
    if slim.get(key) is None or uniform.get(key) is None or uniform[key] <= slim[key]:
        return []
    where = ("on the held-out validation data" if key == "val_accuracy" else
             "on the test data; to choose between them without reading it, run with --val-fraction 0.1")
    return [f"the uniform network of the same cost scored higher than the slim network ({uniform[key]:.2%} "
            f"against {slim[key]:.2%} {where}, trained the same way): this run's learned structure did not pay off. "
            f"Keep the uniform one ({uniform.get('dir', files.SLIM_UNIFORM)}/, load it with morphnet.load_slim), or "
            f"learn again with another --seed or more --steps"]


def reduction(summary: dict[str, Any]) -> dict[str, float] | None:
    """How the seed's cost became the slim network's: the learned widths' share and the uniform
    width multiplier's share, as ratios that multiply to ``slim / seed``."""
    seed, learned, slim = summary["seed"], summary["learned"], summary.get("slim")
    if not slim or not seed.get("cost") or not learned.get("cost"):
        return None
    return {"learning": learned["cost"] / seed["cost"], "width_multiplier": slim["cost"] / learned["cost"],
            "total": slim["cost"] / seed["cost"]}


def finish(session: Session, summary: dict, history: dict) -> dict:
    """Write summary.json, history.json, plots and report.html (rank 0); print the summary."""
    summary["seconds"]["total"] = sum(summary["seconds"].values())
    summary["reduction"] = reduction(summary)
    summary["warnings"] = outcome(summary)
    summary["input"] = input_summary(session)
    if session.ctx.is_main:
        files.write_json(session.out / files.SUMMARY, summary)
        files.write_json(session.out / files.HISTORY, history)
        write_report(session.out)
        print(format_summary(summary, session.out), flush=True)
    return summary


