"""Reports of dpmem results: load result files, tables, figures, report.md/html, and the regression gate.

One job per module: ``load`` (result files, read by :mod:`bench.results.files`, into tables; ``is_predicted``),
``tables`` (typed overhead and fit tables), ``grid`` (a table as written: cells, compaction, Markdown),
``summary`` (the first screen: matrix and ranked summary per machine × device), ``pivots`` (the detail tables),
``figures``, ``html`` (report.md + report.html), ``compare`` (gate + github-action-benchmark export),
``screenshot`` (headless Chromium, standalone); ``__main__`` is the CLI.
"""

from .load import ReportInputError, Results, load_results

__all__ = ["ReportInputError", "Results", "load_results"]
