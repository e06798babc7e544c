"""`python -m reports`: render the report, compare two result sets, export or merge results.

    python -m reports RESULTS... --out DIR                 tables (md+csv), figures (png+svg), report.md/.html
    python -m reports compare BASE NEW... --max-regression 5% [--gate-figures A,B] [--allow-no-overlap]
                                          [--allow-status-change] [--allow-missing]
                                          [--export-benchmark-action FILE]
    python -m reports export RESULTS... --out FILE         github-action-benchmark customSmallerIsBetter JSON
    python -m reports merge RESULTS... --out FILE.jsonl    one JSON-lines file (e.g. a CI baseline)
    python -m reports paper RESULTS... --workloads W[,W] [--by batch|mode|budget] [--mode fp32] [--batch-size B]
                                          [--value peak|time] [--gpu NAME]
                                          [--out FILE.md]   a README paper-scale table (Markdown, stdout)
    python -m reports frontier PLAN.json --out FILE.png   the memory–time frontier of a `bench.plan --format json`

Exit status: 0 ok; 1 the gate failed (compare: memory grew, a case broke or disappeared); 2 bad input, usage or
an unwritable output (one line on stderr); 130 interrupted (Ctrl-C, one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from bench.config.cli import OneLineParser, run
from bench.plan.gpus import get_gpu
from bench.results.record import to_jsonl_line

from .compare import (
    GATED_BY_DEFAULT,
    CompareUsageError,
    benchmark_action_entries,
    compare_results,
    format_comparison,
    parse_gate_figures,
    parse_threshold,
)
from .figures import FigureOptions, FigureResult, render_figures
from .frontier import draw_frontier, frontier_methods, read_plan
from .grid import compact, frame_grid, table_markdown, write_table
from .html import ReportContent, Section, write_html, write_markdown
from .load import PEAK_COLUMNS, ReportInputError, Results, load_results
from .paper import SHAPES, VALUES, PaperTableError, paper_table
from .pivots import fit_grids, memory_pivot, time_pivot
from .summary import blocks, matrix_grid, overview, ranked_grid, ranked_summary
from .tables import (
    FIT_NOTES,
    MODE_COLUMNS,
    OVERHEAD_NOTES,
    fit_display,
    overhead_display,
    overhead_warnings,
    status_label,
)

SUBCOMMANDS = ("render", "compare", "export", "merge", "paper", "frontier")


class OutputError(ValueError):
    """An output path that cannot be written; one line naming the option and the path."""


def _files_to_one_output(
    name: str, common: argparse.ArgumentParser, description: str, output_kind: str
) -> argparse.ArgumentParser:
    """A subcommand that reads result files and writes one ``--out`` file."""
    parser = OneLineParser(prog=f"python -m reports {name}", parents=[common], description=description)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True, help=f"output {output_kind} file")
    return parser


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    """One parser per subcommand (render is the default when the first argument is not a subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--skip-bad", action="store_true", help="warn about unreadable input files and go on")

    render = OneLineParser(
        prog="python -m reports",
        parents=[common],
        description="Render tables, figures, report.md and report.html from result files.",
    )
    render.add_argument("results", nargs="+", help="pytest-benchmark JSON and/or dpmem JSON-lines files")
    render.add_argument("--out", default="report", help="output directory (default: report)")
    render.add_argument("--workload", help="workload of the breakdown/timeline figures (default: chosen)")
    render.add_argument("--batch-size", type=int, help="batch size of the breakdown/timeline figures")
    render.add_argument("--title", default="dpmem: memory and time of DP-SGD", help="report title")

    compare = _compare_parser(common)

    export = _files_to_one_output(
        "export", common, "Write memory figures as github-action-benchmark customSmallerIsBetter JSON.", "JSON"
    )
    merge = _files_to_one_output(
        "merge", common, "Merge result files into one JSON-lines file (e.g. a CI baseline).", ".jsonl"
    )
    frontier = OneLineParser(
        prog="python -m reports frontier",
        description="Draw the memory–time frontier (per method: max batch vs estimated samples/s) of a capacity "
        "plan, `python -m bench.plan WORKLOAD --format json`.",
    )
    frontier.add_argument("plan", help="a plan JSON file (python -m bench.plan ... --format json)")
    frontier.add_argument("--out", required=True, help="output figure (.png, or .svg/.pdf)")
    parsers = {"render": render, "compare": compare, "export": export, "merge": merge}
    return parsers | {"paper": _paper_parser(common), "frontier": frontier}


def _paper_parser(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m reports paper``: one of the README's paper-scale tables (reports/paper.py)."""
    paper = OneLineParser(
        prog="python -m reports paper",
        parents=[common],
        description="Write one paper-scale table (peak GiB ×nondp by batch or by training mode, or max batch by "
        "memory budget) as Markdown.",
    )
    paper.add_argument("results", nargs="+", help="pytest-benchmark JSON and/or dpmem JSON-lines files")
    paper.add_argument("--workloads", required=True, type=_names, help="workload (--by budget: comma list)")
    paper.add_argument("--by", choices=SHAPES, default="batch", help="the columns: batch sizes, modes or budgets")
    paper.add_argument(
        "--mode", default="fp32", help="training mode of --by batch/budget, e.g. amp-bf16+blocks, fp32+lora:r=8"
    )
    paper.add_argument("--batch-size", type=int, help="batch size of --by mode")
    paper.add_argument(
        "--value",
        choices=VALUES,
        default="peak",
        help="peak: peak live tensor GiB (default); time: the estimated step ms of predicted (meta) cases",
    )
    paper.add_argument(
        "--gpu",
        type=_gpu_name,
        help="--value time: the catalogue GPU to estimate for (default: the records' estimate GPU, else h100-80gb)",
    )
    paper.add_argument("--out", help="write the table to this Markdown file (default: stdout)")
    return paper


def _gpu_name(text: str) -> str:
    try:
        return get_gpu(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one workload name")
    return names


def _compare_parser(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``python -m reports compare``: the regression gate's options."""
    compare = OneLineParser(
        prog="python -m reports compare",
        parents=[common],
        description="Compare NEW results with BASE; exit 1 on a memory regression, a case that went from ok to "
        "OOM, error or unsupported, or a case missing from NEW; 2 on bad input.",
    )
    compare.add_argument("base", help="baseline result file")
    compare.add_argument("new", nargs="+", help="new result file(s)")
    compare.add_argument(
        "--max-regression",
        default="5%",
        help='allowed growth of a gated peak figure: a percentage "5%%" or a fraction <= 1 "0.05" (default 5%%)',
    )
    compare.add_argument(
        "--gate-figures",
        default=",".join(GATED_BY_DEFAULT),
        help=f"comma list of the peak figures that fail the gate (default: the isolated ones, "
        f"{','.join(GATED_BY_DEFAULT)}); the others are shown for information. Choose from {','.join(PEAK_COLUMNS)}",
    )
    compare.add_argument(
        "--allow-no-overlap",
        action="store_true",
        help="exit 0 when BASE and NEW have no case in common (default: an error, exit 2)",
    )
    compare.add_argument(
        "--allow-status-change",
        action="store_true",
        help="let a case that went from ok to error or unsupported pass (shown; ok→OOM still fails)",
    )
    compare.add_argument(
        "--allow-missing",
        action="store_true",
        help="let a BASE case missing from NEW pass (shown); machines NEW does not hold are never compared",
    )
    compare.add_argument(
        "--export-benchmark-action",
        metavar="FILE",
        help="also write NEW's memory figures as github-action-benchmark customSmallerIsBetter JSON",
    )
    return compare


# Which figures illustrate which section (reports.figures.FIGURES names), in the order they are drawn.
SECTION_FIGURES = {
    "Peak memory": ("peak_vs_batch", "breakdown"),
    "Step time": ("timeline",),
    "Max batch: what fits": ("max_batch", "fixed_vs_per_sample"),
    "Across machines and model families": ("gpu_comparison", "proxy_validity"),
    "Many ranks: memory per rank": ("per_rank_peak",),
}


def report_content(results: Results, figures: list[FigureResult], title: str) -> ReportContent:
    """The report's sections: the first screen (matrix and ranked summary per machine × device), then peak memory,
    step time and max batch (tables next to their figures), then cross-machine figures and the definitions."""
    produced = {f.name: f for f in figures if f.skipped is None and f.png is not None}
    glance, legends = [], set()
    for matrix in overview(results):
        for grid in (matrix_grid(matrix), ranked_grid(matrix.block, ranked_summary(results, matrix))):
            # each legend once: a predicted block's (its estimates) or one with JAX columns differs from the first's
            glance.append(grid if grid.legend not in legends else dataclasses.replace(grid, legend=""))
            legends.add(grid.legend)
    block_rows = blocks(results)
    grids = {
        "Peak memory": [memory_pivot(block, rows, results.overhead) for block, rows in block_rows],
        "Step time": [g for block, rows in block_rows if (g := time_pivot(block, rows, results.overhead))],
        "Max batch: what fits": fit_grids(results),
        "Across machines and model families": [],
        "Many ranks: memory per rank": [],  # the per-rank rows are in overhead.csv / overhead.md
    }
    sections = [
        Section(
            "At a glance",
            "Which DP method costs how much memory (and time) relative to non-DP, and what fits: one matrix and "
            "one ranked summary per machine × device.",
            glance,
            empty=_glance_empty(results, "per_rank_peak" in produced),
        )
    ]
    for name, section_grids in grids.items():
        section_figures = [produced[f] for f in SECTION_FIGURES[name] if f in produced]
        if section_grids or section_figures:
            sections.append(Section(name, grids=section_grids, figures=section_figures))
    sections.append(
        Section(
            "Definitions and full tables",
            "Every case, long form: overhead.csv / overhead.md (ratios, timing noise, statuses) and "
            "memory_fit.csv / memory_fit.md (the affine fit), next to this report.",
            details=(OVERHEAD_NOTES, FIT_NOTES),
        )
    )
    return ReportContent(
        title,
        results.sources,
        _subtitle(results),
        sections,
        skipped=[f for f in figures if f.skipped is not None],
        warnings=[*results.warnings, *overhead_warnings(results.overhead)],
    )


def _glance_empty(results: Results, per_rank_figure: bool) -> str:
    """What the first screen says when it has no matrix: where the input's results are instead."""
    cases = results.cases
    many = int((cases["world_size"] > 1).sum())
    where = []
    if many:
        shown = "the per-rank figure under Many ranks and " if per_rank_figure else ""
        where.append(f"its {many} case(s) on many ranks are in {shown}overhead.md")
    if len(results.max_batches):
        where.append(f"its {len(results.max_batches)} max-batch search(es) are under Max batch")
    if len(cases) > many:  # one-process cases, none with a DP method beside nondp
        where.append("its one-process cases have no DP method to compare with nondp (see Peak memory)")
    return "No workload × DP method matrix for this input: " + "; ".join(where or ["it holds no case"]) + "."


def _subtitle(results: Results) -> str:
    """ "54 cases (52 ok, 2 unsupported): 3 workloads × 9 methods × 2 batch sizes on AMD EPYC · cpu." """
    cases = results.cases
    if cases.empty:
        return f"{len(results.max_batches)} max-batch search(es), no case rows."
    counts = cases["status"].value_counts()
    statuses = ", ".join(f"{counts[s]} {status_label(s)}" for s in ("ok", "oom", "unsupported", "error") if s in counts)
    # the one-process blocks' order, then the machines and devices only cases on many ranks ran on
    where = "; ".join(
        dict.fromkeys(
            [
                *(f"{b.machine} · {b.device}" for b, _ in blocks(results)),
                *(f"{machine} · {device}" for machine, device in zip(cases["machine"], cases["device"])),
            ]
        )
    )
    modes = len(cases[list(MODE_COLUMNS)].drop_duplicates())
    ranks = len(cases[["world_size", "parallel"]].drop_duplicates())
    extra = (f" × {modes} training modes" if modes > 1 else "") + (f" × {ranks} rank settings" if ranks > 1 else "")
    return (
        f"{len(cases)} cases ({statuses}): {cases['workload'].nunique()} workloads × {cases['method'].nunique()} "
        f"methods × {cases['batch_size'].nunique()} batch sizes{extra} on {where}."
    )


def render_report(results: Results, out_dir: Path, options: FigureOptions, title: str) -> list[Path]:
    """Everything from saved results: tables (md+csv), figures (png+svg), report.md and report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    long_tables = [
        ("overhead", "DP overhead over non-DP, every case", OVERHEAD_NOTES, results.overhead, overhead_display),
        ("memory_fit", "Fixed and per-sample memory, max batch", FIT_NOTES, results.fits, fit_display),
    ]
    written: list[Path] = []
    for stem, table_title, notes, table, display in long_tables:
        grid = frame_grid(display(table), table, table_title, "One row per case; CSV: the numbers and statuses.")
        written += write_table(compact(grid), out_dir, stem, notes, table)
    figures = render_figures(results, out_dir / "figures", options)
    written += [p for f in figures for p in f.paths]
    content = report_content(results, figures, title)
    written += [write_markdown(content, out_dir), write_html(content, out_dir)]
    return written


def check_writable(path: Path, option: str, *, directory: bool) -> None:
    """Raise :class:`OutputError` unless ``path`` (a directory or a file) can be created or written, before any
    work is done, so a long render or a gate verdict is not lost to a bad output path."""
    kind = "directory" if directory else "file"
    if path.exists():
        if directory != path.is_dir():
            raise OutputError(f"{option} {path}: exists and is not a {kind}")
        target = path if directory else path.parent
        if not os.access(target, os.W_OK | os.X_OK) or (not directory and not os.access(path, os.W_OK)):
            raise OutputError(f"{option} {path}: not writable")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot create it ({ancestor} is not a writable directory)")


def _write_text(path: Path, option: str, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write ({exc.strerror or exc})") from None


def _render(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_writable(out, "--out", directory=True)
    results = load_results(args.results, skip_bad=args.skip_bad)
    options = FigureOptions(workload=args.workload, batch_size=args.batch_size)
    try:
        written = render_report(results, out, options, args.title)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    print(f"wrote {len(written)} file(s) to {out} (report.md, report.html)")
    print(f"{out / 'report.html'}: {_subtitle(results)}")  # what the report found, in one line
    return 0


def _compare(args: argparse.Namespace) -> int:
    threshold = parse_threshold(args.max_regression)
    gate_figures = parse_gate_figures(args.gate_figures)
    export = Path(args.export_benchmark_action) if args.export_benchmark_action else None
    if export is not None:
        check_writable(export, "--export-benchmark-action", directory=False)
    base = load_results([args.base], skip_bad=args.skip_bad)
    new = load_results(args.new, skip_bad=args.skip_bad)
    comparison = compare_results(
        base,
        new,
        threshold,
        gate_figures,
        allow_status_change=args.allow_status_change,
        allow_missing=args.allow_missing,
    )
    print(format_comparison(comparison))
    if export is not None:
        _write_text(export, "--export-benchmark-action", json.dumps(benchmark_action_entries(new), indent=2))
    if not comparison.overlaps and not args.allow_no_overlap:
        raise ReportInputError(
            f"no case of {args.base} is in the new results: nothing was compared (check runner labels / GPU names "
            "match, or pass --allow-no-overlap)"
        )
    return 1 if comparison.failed else 0


def _paper(args: argparse.Namespace) -> int:
    if args.out:
        check_writable(Path(args.out), "--out", directory=False)
    results = load_results(args.results, skip_bad=args.skip_bad)
    grid = paper_table(results, args.by, args.workloads, args.mode, args.batch_size, args.value, args.gpu)
    text = "\n".join(table_markdown(grid)).rstrip("\n") + "\n"
    if args.out:
        _write_text(Path(args.out), "--out", text)
    else:
        print(text, end="")
    return 0


def _frontier(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_writable(out, "--out", directory=False)
    plan = read_plan(args.plan)
    try:
        draw_frontier(plan, out)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    print(
        f"wrote {out}: {len(plan.points)} method(s) on {plan.gpu}, frontier {', '.join(frontier_methods(plan.points))}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "render"
    args = build_parsers()[command].parse_args(argv)
    try:
        if command == "render":
            return _render(args)
        if command == "compare":
            return _compare(args)
        if command == "paper":
            return _paper(args)
        if command == "frontier":
            return _frontier(args)
        out = Path(args.out)
        check_writable(out, "--out", directory=False)
        results = load_results(args.results, skip_bad=args.skip_bad)
        if command == "export":
            _write_text(out, "--out", json.dumps(benchmark_action_entries(results), indent=2))
            return 0
        # merge: every record as loaded, completed with the machine facts the loader read from machine_info
        lines = [to_jsonl_line(case.completed_record()) for case in results.loaded_cases]
        lines += [to_jsonl_line(record) for record in results.max_batch_records]
        _write_text(out, "--out", "".join(line + "\n" for line in lines))
        return 0
    except (ReportInputError, CompareUsageError, OutputError, PaperTableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(main, "python -m reports"))
