"""Run reports: self-contained report.html with embedded PNG figures (report/html.py, report/plots.py)."""

from .html import build_report, figures

__all__ = ["build_report", "figures"]
