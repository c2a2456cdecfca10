"""``morphnet report RUN_DIR``: one self-contained HTML page (PNG plots embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from morphnet.export import atomic_write
from morphnet.reporting.latency import latency_html
from morphnet.reporting.plots import plot_accuracy, plot_cost, plot_widths
from morphnet.reporting.text import attention_stage, attention_rows, format_number, load_snippet, reduction_line


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_plots(run_dir: Path) -> list[tuple[Path, str]]:
    """Draw every plot the run's files allow into ``run_dir/plots``; return (path, caption) pairs."""
    summary = json.loads((run_dir / "summary.json").read_text())
    history_file = run_dir / "history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    plots = run_dir / "plots"
    drawn = []
    if history.get("learn"):
        drawn.append((plot_cost(history, summary, plots / "cost.png"), "Cost of the proposed structure during learning"))
        drawn.append((plot_accuracy(history, plots / "accuracy.png"), "Accuracy during learning and retraining"))
    slim = summary.get("slim", {})
    drawn.append((plot_widths(summary["seed"]["widths"], summary["learned"]["widths"], plots / "widths.png",
                              final=slim.get("widths")), "Per-layer widths, seed vs learned"))
    return drawn


def _layers(summary: dict) -> str:
    """The per-layer table: widths, FLOPs and share (from summary['layers'], or widths only)."""
    seed, learned, slim = summary["seed"], summary["learned"], summary.get("slim", {})
    if summary.get("layers"):
        has_slim = any(r.get("slim") is not None for r in summary["layers"])
        header = ["layer", "seed width", "learned width"] + (["slim width"] if has_slim else []) + \
                 ["seed FLOPs"] + (["slim FLOPs"] if has_slim else []) + ["share of FLOPs"]
        rows = [[r["name"], r["seed"], r["learned"]] + ([r["slim"]] if has_slim else []) + [format_number(r["seed_flops"])]
                + ([format_number(r["slim_flops"])] if has_slim else []) + [f"{r['share']:.1%}"]
                for r in summary["layers"]]
        return _table(header, rows)
    final = slim.get("widths", learned["widths"])
    return _table(["layer", "seed", "learned", "slim"],
                  [[n, w, learned["widths"].get(n, w), final.get(n, w)] for n, w in seed["widths"].items()])


def _attention(summary: dict) -> str:
    """The per-block attention table (heads seed -> learned -> slim, head width, MLP widths); empty
    for a model without attention."""
    rows = attention_rows(summary)
    if not rows:
        return ""
    stage = attention_stage(summary)
    table = _table(["block", "attention module", f"heads (seed -> {stage})", "head width", f"MLP widths (seed -> {stage})"],
                   [[r["block"], r["module"], r["heads"], r["head_dim"], r["mlp"]] for r in rows])
    return ("<h2>Attention heads per block</h2><p>Head counts read from the seed, the learned structure rebuilt "
            "and the slim model; '(learned N)' where the width multiplier changed the learned count.</p>" + table)


def _other_slim_models(run_dir: Path, own: str | None) -> str:
    """The slim folders `morphnet rebuild` added to the run, each with what it was built from."""
    items = []
    for folder in sorted(p for p in run_dir.glob("slim*") if p.is_dir() and p.name != own):
        described = folder / "rebuild.json"
        if described.is_file():
            info = json.loads(described.read_text())
            slim = info["slim"]
            items.append(f"<li><code>{html.escape(folder.name)}/</code>: rebuilt from "
                         f"<code>{html.escape(str(info['structure_file']))}</code>, {format_number(slim['flops'])} "
                         f"FLOPs, {format_number(slim['params'])} parameters"
                         + (f", width multiplier {slim['width_multiplier']:.4f}" if slim.get("width_multiplier") else "")
                         + "</li>")
    return f"<h2>Other slim models in this folder</h2><ul>{''.join(items)}</ul>" if items else ""


def write_report(run_dir: str | Path) -> Path:
    """(Re)draw the plots of ``run_dir`` and write ``run_dir/report.html``; return its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"'{run_dir}' has no summary.json; pass the --out folder of a `morphnet run` or `learn`")
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg, target, seed, learned = summary["config"], summary["target"], summary["seed"], summary["learned"]
    slim = summary.get("slim", {})

    def pct(v):
        return "-" if v is None else f"{v:.2%}"

    columns = [seed, slim or {"cost": learned["cost"]}] + ([summary["uniform"]] if summary.get("uniform") else [])
    rows = [("FLOPs (MorphNet)", "flops", format_number), ("FLOPs (FlopCounterMode)", "flops_counted", format_number),
            ("parameters", "params", format_number), ("test accuracy", "accuracy", pct)]
    if any(c.get("val_accuracy") is not None for c in columns):
        rows.append(("validation accuracy", "val_accuracy", pct))
    if target["resource"] != "flops" or not slim:
        rows.insert(0, (f"{target['cost_name']} ({target['unit']})", "cost", format_number))
    figures = [[label] + [fmt(c.get(key)) for c in columns] for label, key, fmt in rows]
    header = ["", "seed", "slim" if slim else "learned"] + (["uniform shrink"] if summary.get("uniform") else [])
    target_line = (f"target {format_number(target['target_cost'])} {target['unit']}, learned structure "
                   f"{format_number(learned['cost'])} ({learned['target_error']:+.2%})"
                   if target.get("target_cost") else f"fixed strength {target['initial_strength']:.3g}")
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in summary.get("warnings", []))
    reduction = reduction_line(summary)
    seconds = summary.get("seconds", {})
    timings = _table(["stage", "seconds"], [[k.replace("_", " "), f"{v:.1f}"] for k, v in seconds.items()])
    if slim:
        slim_note = (f"<p>This report describes the slim model in <code>{html.escape(slim['dir'])}/</code>"
                     + (f"; <b>that folder was replaced by <code>morphnet rebuild</code> after the run</b>, and its "
                        f"figures are in <code>{html.escape(slim['replaced_by'])}</code>" if slim.get("replaced_by") else "")
                     + ".</p>")
        snippet = load_snippet(summary, run_dir, slim["dir"])
        loading = (f"<h2>Loading the slim model</h2><pre>{html.escape(snippet)}</pre>"
                   "<p>The weights are those after retraining; no pickled code is loaded.</p>")
    else:
        slim_note = loading = ""
    images = "".join(_img(path, caption) for path, caption in write_plots(run_dir))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>MorphNet report: {html.escape(cfg['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}
figcaption{{color:#555;font-size:90%}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}
.warn{{background:#fff3cd;border-left:4px solid #e0a800;padding:.5em 1em}}</style></head><body>
<h1>MorphNet report</h1>
<p>Seed <b>{html.escape(cfg['model'])}</b> on <b>{html.escape(cfg['data'])}</b>; regularizer
{html.escape(target['regularizer'])}, target {html.escape(target['resource'])}; {target_line}; structure chosen
at step {learned['step']} of {cfg['steps']} (<code>{html.escape(learned['structure_file'])}</code>).
The slim network was rebuilt with these widths and retrained from scratch with the seed's recipe.</p>
{slim_note}
{warnings}
<h2>Seed vs slim</h2>
{_table(header, figures)}
{f'<p>{html.escape(reduction)}</p>' if reduction else ''}
{latency_html(summary, _table)}
<h2>Time per stage</h2>
{timings}
{_attention(summary)}
<h2>Layers</h2>
{_layers(summary)}
<h2>Learning curves and widths</h2>
{images}
{loading}
{_other_slim_models(run_dir, slim.get('dir'))}
<h2>Configuration</h2>
<pre>{html.escape(json.dumps(cfg, indent=2, sort_keys=True))}</pre>
<p>TensorBoard: <code>tensorboard --logdir {html.escape(str(run_dir / 'tensorboard'))}</code></p>
</body></html>
"""
    return atomic_write(run_dir / "report.html", lambda handle: handle.write(page))
