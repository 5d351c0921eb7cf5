"""What a person reads: a self-contained HTML report (plots embedded) of a compression run."""

from hessq.report._html import render_report, results_table, write_report

__all__ = ["render_report", "results_table", "write_report"]
