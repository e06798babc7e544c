"""`python -m reports`: render the report, compare two result sets, export or merge results.

    python -m reports RESULTS... --out DIR                 tables (md+csv), figures (png+svg), report.md/.html
    python -m reports compare BASE NEW... --max-regression 5% [--export-benchmark-action FILE]
    python -m reports export RESULTS... --out FILE         github-action-benchmark customSmallerIsBetter JSON
    python -m reports merge RESULTS... --out FILE.jsonl    one JSON-lines file (e.g. a CI baseline)

Exit status: 0 ok; 1 a regression (compare); 2 bad input or usage (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from bench.record import to_jsonl_line

from .compare import ThresholdError, benchmark_action_entries, compare_results, format_comparison, parse_threshold
from .figures import FigureOptions, render_figures
from .html import ReportContent, ReportTable, write_html, write_markdown
from .load import ReportInputError, Results, load_results
from .summary import summary_lines
from .tables import FIT_NOTES, OVERHEAD_NOTES, write_table

SUBCOMMANDS = ("render", "compare", "export", "merge")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other bad input of the reports."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    """One parser per subcommand (render is the default when the first argument is not a subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--skip-bad", action="store_true", help="warn about unreadable input files and go on")

    render = _OneLineParser(
        prog="python -m reports",
        parents=[common],
        description="Render tables, figures, report.md and report.html from result files.",
    )
    render.add_argument("results", nargs="+", help="pytest-benchmark JSON and/or dpmem JSON-lines files")
    render.add_argument("--out", default="report", help="output directory (default: report)")
    render.add_argument("--workload", help="workload of the breakdown/timeline figures (default: chosen)")
    render.add_argument("--batch-size", type=int, help="batch size of the breakdown/timeline figures")
    render.add_argument("--title", default="dpmem: memory and time of DP-SGD", help="report title")

    compare = _OneLineParser(
        prog="python -m reports compare",
        parents=[common],
        description="Compare NEW results with BASE; exit 1 on a memory regression or ok→OOM.",
    )
    compare.add_argument("base", help="baseline result file")
    compare.add_argument("new", nargs="+", help="new result file(s)")
    compare.add_argument(
        "--max-regression", default="5%", help='allowed peak-memory growth: "5%%" or "0.05" (default 5%%)'
    )
    compare.add_argument(
        "--export-benchmark-action",
        metavar="FILE",
        help="also write NEW's memory figures as github-action-benchmark customSmallerIsBetter JSON",
    )

    export = _OneLineParser(
        prog="python -m reports export",
        parents=[common],
        description="Write memory figures as github-action-benchmark customSmallerIsBetter JSON.",
    )
    export.add_argument("results", nargs="+")
    export.add_argument("--out", required=True, help="output JSON file")

    merge = _OneLineParser(
        prog="python -m reports merge",
        parents=[common],
        description="Merge result files into one JSON-lines file (e.g. a CI baseline).",
    )
    merge.add_argument("results", nargs="+")
    merge.add_argument("--out", required=True, help="output .jsonl file")
    return {"render": render, "compare": compare, "export": export, "merge": merge}


def render_report(results: Results, out_dir: Path, options: FigureOptions, title: str) -> list[Path]:
    """Everything from saved results: tables (md+csv), figures (png+svg), report.md and report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = [
        ReportTable("DP overhead over non-DP", OVERHEAD_NOTES, results.overhead, "overhead"),
        ReportTable("Fixed and per-sample memory, max batch", FIT_NOTES, results.fits, "memory_fit"),
    ]
    written: list[Path] = []
    for table in tables:
        written += write_table(table.table, out_dir, table.stem, table.notes)
    figures = render_figures(results, out_dir / "figures", options)
    written += [p for f in figures for p in f.paths]
    content = ReportContent(title, results.sources, summary_lines(results), tables, figures, results.warnings)
    written += [write_markdown(content, out_dir), write_html(content, out_dir)]
    return written


def _load(paths: list[str], skip_bad: bool) -> Results:
    return load_results(paths, skip_bad=skip_bad)


def _write_json(path: str, payload) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "render"
    args = build_parsers()[command].parse_args(argv)
    try:
        if command == "render":
            results = _load(args.results, args.skip_bad)
            options = FigureOptions(workload=args.workload, batch_size=args.batch_size)
            written = render_report(results, Path(args.out), options, args.title)
            print(f"wrote {len(written)} file(s) to {args.out} (report.md, report.html)")
            return 0
        if command == "compare":
            threshold = parse_threshold(args.max_regression)
            base = _load([args.base], args.skip_bad)
            new = _load(args.new, args.skip_bad)
            comparison = compare_results(base, new, threshold)
            print(format_comparison(comparison))
            if args.export_benchmark_action:
                _write_json(args.export_benchmark_action, benchmark_action_entries(new))
            return 1 if comparison.failed else 0
        if command == "export":
            _write_json(args.out, benchmark_action_entries(_load(args.results, args.skip_bad)))
            return 0
        # merge: every record, with the machine facts the loader filled from pytest-benchmark's machine_info
        results = _load(args.results, args.skip_bad)
        lines = []
        for _, row in results.cases.iterrows():
            record = dataclasses.replace(
                results.record(row), device_name=row["device_name"], runner_label=row["runner_label"]
            )
            lines.append(to_jsonl_line(record))
        lines += [to_jsonl_line(r) for r in results.max_batch_records]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return 0
    except (ReportInputError, ThresholdError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
