"""Reports of dpmem results: load result files, tables, figures, report.md/html, and the regression gate.

One job per module: ``load`` (the only code that knows the file formats), ``tables``, ``figures``, ``summary``,
``html`` (report.md + report.html), ``compare`` (gate + github-action-benchmark export); ``__main__`` is the CLI.
"""

from .load import ReportInputError, Results, load_results

__all__ = ["ReportInputError", "Results", "load_results"]
