"""PNG plots of a run, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from morphnet.export import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as PNG atomically (a crash never leaves half an image)."""
    fig.tight_layout()
    try:
        return atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)
    finally:
        plt.close(fig)


def plot_cost(history: dict[str, Any], summary: dict[str, Any], path: Path) -> Path:
    """Cost of the proposed structure over learning (with the target band), and below it, on its
    own log axis, the strength. Legends sit beside the axes so they never hide a curve."""
    learn = history.get("learn", [])
    target, seed = summary["target"], summary["seed"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in learn]
    ax.plot(steps, [r["cost"] for r in learn], color="tab:blue", label=f"proposed {target['cost_name']}")
    ax.axhline(seed["cost"], color="grey", linestyle=":", label="seed")
    if any("reference" in r for r in learn):
        ax.plot(steps, [r.get("reference") for r in learn], color="tab:green", linestyle="--", label="reference")
    if target.get("target_cost"):
        t, tol = target["target_cost"], target["tolerance"]
        ax.axhspan(t * (1 - tol), t * (1 + tol), color="tab:green", alpha=0.2, label=f"target +-{tol:.0%}")
    learned = summary["learned"]
    ax.plot([learned["step"]], [learned["cost"]], "o", color="tab:red", label=f"chosen (step {learned['step']})")
    unit = target["unit"]
    ax.set_ylabel(target["cost_name"] if target["cost_name"] == unit else f"{target['cost_name']} ({unit})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax.set_title("Cost of the learned structure during structure learning")
    ax2.plot(steps, [r["strength"] for r in learn], color="tab:orange")
    ax2.set_yscale("log")
    ax2.set_ylabel("strength")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy(history: dict[str, Any], path: Path) -> Path:
    """Training accuracy (and test accuracy where measured) over structure learning and retraining."""
    phases = [(k, history[k]) for k in ("learn", "retrain_slim", "retrain_seed", "retrain_uniform") if history.get(k)]
    fig, axes = plt.subplots(1, max(1, min(2, len(phases))), figsize=(10 if len(phases) > 1 else 6, 4), squeeze=False)
    labels = {"learn": "structure learning", "retrain_slim": "slim (retrained)", "retrain_seed": "seed (same recipe)",
              "retrain_uniform": "uniform shrink (same cost)"}
    for name, records in phases:
        ax = axes[0][0 if name == "learn" else min(1, len(axes[0]) - 1)]
        steps = [r["step"] for r in records]
        line, = ax.plot(steps, [r["train_accuracy"] for r in records], label=f"{labels[name]}: train")
        tested = [r for r in records if "test_accuracy" in r]
        if tested:
            ax.plot([r["step"] for r in tested], [r["test_accuracy"] for r in tested], "o--",
                    color=line.get_color(), label=f"{labels[name]}: test")
    for ax, title in zip(axes[0], ("Structure learning", "Retraining from scratch")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", framealpha=0.8)
    return _save(fig, path)


def plot_widths(seed: dict[str, int], learned: dict[str, int], path: Path, final: dict[str, int] | None = None) -> Path:
    """Per-layer output channels: seed vs learned (and final, when expanded), as grouped bars."""
    names = list(seed) + [n for n in learned if n not in seed]
    series = [("seed", seed), ("learned", learned)] + ([("final", final)] if final and final != learned else [])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    bar = 0.8 / len(series)
    for i, (label, widths) in enumerate(series):
        positions = [j + (i - (len(series) - 1) / 2) * bar for j in range(len(names))]
        ax.bar(positions, [widths.get(n, seed.get(n, 0)) for n in names], bar, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7 if len(names) > 20 else 9)
    ax.set_ylabel("output channels")
    ax.set_title("Layer widths: seed vs learned")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
