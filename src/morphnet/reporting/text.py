"""Plain-text tables for the terminal, built from summary.json so that print and file agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morphnet.reporting.latency import format_latency


def format_number(value: float | None) -> str:
    """1234567 -> '1.235M'; None -> '-'."""
    if value is None:
        return "-"
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.4g}{suffix}"
    return f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _ratio(slim: float | None, seed: float | None) -> str:
    return "-" if not slim or not seed else f"{slim / seed:.3f}x"


def reduction_line(summary: dict[str, Any]) -> str:
    """Where the cost reduction came from: learned widths vs the uniform width multiplier."""
    parts = summary.get("reduction")
    if not parts:
        return ""
    return (f"cost of the slim network: {parts['total']:.3f}x the seed's = learned widths {parts['learning']:.3f}x "
            f"* uniform width multiplier {parts['width_multiplier']:.3f}x")


def load_snippet(summary: dict[str, Any], run_dir: str | Path, slim_dir: str) -> str:
    """The Python lines that load the slim model in ``run_dir/slim_dir`` with its trained weights."""
    cfg, given = summary["config"], summary.get("input", {})
    kwargs = {"num_classes": given.get("num_classes", 10), "in_channels": (given.get("shape") or [1])[0],
              **given.get("seed_kwargs", {})}
    arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    return (
        "import morphnet\n"
        "from morphnet.data import load_data\n"
        "from morphnet.seeds import create_seed\n\n"
        f"data = load_data({cfg['data']!r}, seed={cfg.get('seed', 0)!r}, image_size={cfg.get('image_size')!r})\n"
        f"slim = morphnet.load_slim(lambda: create_seed({cfg['model']!r}, {arguments}),\n"
        f"                          {str(Path(run_dir) / slim_dir)!r}, data.example_inputs(1))\n"
        "slim.eval()"
    )


def format_summary(summary: dict[str, Any], run_dir: str | Path) -> str:
    """The end-of-run table: seed vs slim (and the uniformly shrunk seed, when trained): cost,
    FLOPs (predicted and counted), params, accuracy."""
    cfg, target, seed, learned = summary["config"], summary["target"], summary["seed"], summary["learned"]
    slim = summary.get("slim", {})
    unit = target["unit"]
    cost_label = target["cost_name"] if target["cost_name"] == unit else f"{target['cost_name']} ({unit})"
    columns = [("seed", seed), ("slim", slim) if slim else ("learned", {"cost": learned["cost"]})]
    if summary.get("uniform"):
        columns.append(("uniform", summary["uniform"]))
    compressed = bool(cfg.get("finetune"))  # morphnet.compress on a trained seed
    lines = [
        (f"MorphNet compress ({target['regularizer']}) on {cfg['model']} / {cfg['data']}: {cfg['retrain_steps']} steps "
         f"from the trained seed, {learned['step']} of them learning" if compressed else
         f"MorphNet {target['regularizer']} on {cfg['model']} / {cfg['data']}: {cfg['steps']} learning steps, "
         f"{summary['world_size']} process(es)"),
        f"{'':24}" + "".join(f"{name:>12}" for name, _ in columns) + f"{columns[1][0] + '/seed':>14}",
    ]

    def row(label: str, key: str, fmt=format_number, ratio=True) -> None:
        values = [column.get(key) for _, column in columns]
        lines.append(f"{label:24}" + "".join(f"{fmt(v):>12}" for v in values)
                     + (f"{_ratio(values[1], values[0]):>14}" if ratio else ""))

    if not slim or cfg["target"] != "flops":
        row(cost_label, "cost")
    if slim:
        row("FLOPs (MorphNet)", "flops")
        row("FLOPs (FlopCounterMode)", "flops_counted")
        row("parameters", "params")
        row("test accuracy", "accuracy", _percent, ratio=False)
        if any(column.get("val_accuracy") is not None for _, column in columns):
            row("validation accuracy", "val_accuracy", _percent, ratio=False)
    if target["target_cost"] is not None and compressed:
        lines.append(f"target {format_number(target['target_cost'])} {unit}: landed at {format_number(learned['cost'])} "
                     f"({learned['target_error']:+.2%}; never above it, within one channel group)")
    elif target["target_cost"] is not None:
        lines.append(
            f"target {format_number(target['target_cost'])} {unit} (+-{target['tolerance']:.0%}): learned structure "
            f"{format_number(learned['cost'])} ({learned['target_error']:+.2%}) at step {learned['step']}"
            + (f", slim {format_number(slim['cost'])} ({slim['target_error']:+.2%})" if "target_error" in slim else "")
        )
    else:
        lines.append(f"learned structure at step {learned['step']}: {format_number(learned['cost'])} {unit} "
                     f"({learned['cost_ratio']:.3f}x the seed) with strength {target['initial_strength']:.3g}")
    if slim.get("width_multiplier") is not None:
        lines.append(f"uniform width multiplier applied after rebuild: {slim['width_multiplier']:.4f}")
    for name, part in (("slim", slim), ("seed", seed)):
        if part.get("training"):
            lines.append(f"{name} network: {part['training']}")
    if reduction_line(summary):
        lines.append(reduction_line(summary))
    if format_latency(summary):
        lines += format_latency(summary).split("\n")
    if format_attention(summary):
        lines += format_attention(summary).split("\n")
    run_dir = Path(run_dir)
    lines.append(f"structure: {run_dir / learned['structure_file']}")
    if slim:
        lines.append(f"slim model: {run_dir / slim['dir']}")
    seconds = summary.get("seconds", {})
    lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in seconds.items()))
    lines.append(f"report: {run_dir / 'report.html'} (rebuild it with `morphnet report {run_dir}`)")
    lines += [f"warning: {note}" for note in summary.get("warnings", [])]
    return "\n".join(line.rstrip() for line in lines)


def _change(seed: int, learned: int | None, slim: int | None) -> str:
    """'4 -> 2': seed -> slim (seed -> learned without a slim model), with '(learned 3)' added when
    the slim model's width multiplier moved the count away from the learned one."""
    final = slim if slim is not None else learned
    text = str(seed) if final is None else f"{seed} -> {final}"
    if slim is not None and learned is not None and learned != slim:
        text += f" (learned {learned})"
    return text


def attention_stage(summary: dict[str, Any]) -> str:
    """What the attention rows compare the seed with: 'slim', or 'learned' when the run has no slim model."""
    return "slim" if any(e.get("slim") is not None for e in summary.get("attention") or []) else "learned"


def attention_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """summary['attention'] as display strings: block, module, heads and MLP widths (seed -> slim, or
    seed -> learned without a slim model), head width."""
    rows = []
    for entry in summary.get("attention") or []:
        mlp = ", ".join(f"{layer['name']} {_change(layer['seed'], layer['learned'], layer['slim'])}"
                        for layer in entry["mlp"])
        rows.append({"block": entry["block"] or entry["module"], "module": entry["module"],
                     "heads": _change(entry["seed"], entry["learned"], entry["slim"]),
                     "head_dim": "-" if entry["head_dim"] is None else str(entry["head_dim"]), "mlp": mlp or "-"})
    return rows


def format_attention(summary: dict[str, Any]) -> str:
    """Per attention block: heads (seed -> slim), head width and the block's MLP widths, e.g.
    ``encoder.layers.encoder_layer_3  heads 4 -> 2, head width 16, mlp.0 256 -> 97``.
    Empty for a model without attention."""
    rows = attention_rows(summary)
    if not rows:
        return ""
    width = max(len(r["block"]) for r in rows)
    lines = [f"attention heads per block (seed -> {attention_stage(summary)}):"]
    for r in rows:
        lines.append(f"  {r['block']:{width}}  heads {r['heads']}, head width {r['head_dim']}"
                     + (f", {r['mlp']}" if r["mlp"] != "-" else ""))
    return "\n".join(lines)


def format_widths(seed: dict[str, int], learned: dict[str, int], final: dict[str, int] | None = None) -> str:
    """Per-layer widths: seed, learned and (when expanded) final."""
    names = list(seed) + [n for n in learned if n not in seed]
    width = max([len(n) for n in names] + [5])
    header = f"{'layer':{width}}  {'seed':>6}  {'learned':>7}" + (f"  {'final':>6}" if final else "")
    lines = [header]
    for name in names:
        line = f"{name:{width}}  {seed.get(name, '-'):>6}  {learned.get(name, seed.get(name, '-')):>7}"
        if final:
            line += f"  {final.get(name, '-'):>6}"
        lines.append(line)
    return "\n".join(lines)


def format_cost_table(rows: list[dict[str, Any]]) -> str:
    """``morphnet.cost_table`` rows as an aligned table with a total line.

    Text columns (``gamma``: whether a BatchNorm scale can prune the layer, see ``cost_table``)
    are printed as they are and have no total."""
    columns = [c for c in ("channels", "flops", "size", "latency_ns", "gamma") if any(c in r for r in rows)]
    width = max([len(str(r["name"])) for r in rows] + [5])
    lines = [f"{'layer':{width}}" + "".join(f"{c:>14}" for c in columns)]
    for r in rows:
        lines.append(f"{str(r['name']):{width}}" + "".join(f"{_cell(c, r.get(c)):>14}" for c in columns))
    totals = {c: sum(r[c] for r in rows if isinstance(r.get(c), (int, float))) for c in columns
              if c not in ("channels", "gamma")}
    lines.append(f"{'total':{width}}" + "".join(
        f"{format_number(totals[c]) if c in totals else '':>14}" for c in columns).rstrip())
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if column in ("channels", "gamma") else format_number(value)
