"""Reports of a run: the printed summary, PNG plots (matplotlib, Agg) and one HTML page."""

from morphnet.reporting.html import write_report
from morphnet.reporting.plots import plot_accuracy, plot_cost, plot_widths
from morphnet.reporting.text import (attention_rows, format_attention, format_cost_table, format_number,
                                     format_summary, format_widths, load_snippet, reduction_line)

__all__ = [
    "attention_rows",
    "format_attention",
    "format_cost_table",
    "format_number",
    "format_summary",
    "format_widths",
    "load_snippet",
    "plot_accuracy",
    "plot_cost",
    "plot_widths",
    "reduction_line",
    "write_report",
]
