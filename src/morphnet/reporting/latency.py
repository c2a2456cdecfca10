"""The measured-latency table of a run (``summary["latency"]``), as text and as HTML."""

from __future__ import annotations

import html
from typing import Any

COLUMNS = (("seed", "seed"), ("slim", "slim"), ("uniform", "uniform (same cost)"))


def latency_rows(summary: dict[str, Any]) -> list[list[str]]:
    """[network, median ms, spread over rounds, x seed] per timed network; empty when none was timed."""
    latency = summary.get("latency")
    if not latency:
        return []
    rows = []
    for key, label in COLUMNS:
        part = latency.get(key)
        if part:
            ratio = part.get("ratio")
            rows.append([label, f"{part['median_ms']:.4g}", f"{part['spread']:.1%}",
                         "1.000x" if key == "seed" else "-" if ratio is None else f"{ratio:.3f}x"])
    return rows


def latency_caption(summary: dict[str, Any]) -> str:
    latency = summary["latency"]
    timing = latency.get("timing", {})
    rounds = timing.get("rounds", len(latency["seed"]["rounds_ms"]))
    threads = f", {latency['threads']} thread(s)" if latency.get("threads") else ""
    return (f"measured latency on {latency['device']} ({latency['device_type']}{threads}), batch "
            f"{latency['batch_size']}, {latency['dtype']}, eval mode: median of {rounds} interleaved rounds "
            f"(spread: (slowest - fastest round) / median)")


def format_latency(summary: dict[str, Any]) -> str:
    """The latency lines of the printed summary ('' when nothing was timed)."""
    rows = latency_rows(summary)
    if not rows:
        return ""
    lines = [latency_caption(summary) + ":", f"{'':24}{'ms':>12}{'spread':>12}{'x seed':>12}"]
    lines += [f"{row[0]:24}{row[1]:>12}{row[2]:>12}{row[3]:>12}" for row in rows]
    return "\n".join(lines)


def latency_html(summary: dict[str, Any], table) -> str:
    """The report's latency section ('' when nothing was timed); ``table`` renders rows as HTML."""
    rows = latency_rows(summary)
    if not rows:
        return ""
    return (f"<h2>Measured latency</h2><p>{html.escape(latency_caption(summary))}.</p>"
            + table(["network", "median (ms)", "spread", "x seed"], rows))
