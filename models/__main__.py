"""`python -m models [SPEC ...] [--filter SUBSTR] [--workload-module MOD ...]`: a table of workloads.

Without SPECs, every registered workload; with them, just those, overrides included
(``python -m models gpt2-large:seq_len=128 dit-xl-2-cond``). Parameter counts come from models built on the
meta device (shapes only, nothing allocated), so the whole table of paper-size models prints in seconds.

Exit status: 0 the table was printed, 2 a bad spec, module or argument (one line on stderr).
"""

from __future__ import annotations

import sys

from bench.config.cli import OneLineParser, run, usage_error

from . import WorkloadError, get_workload, list_workloads, load_workload_module, parameter_counts

PROG = "python -m models"


def workload_rows(specs: list[str]) -> list[dict[str, str]]:
    rows = []
    for spec in specs:
        workload = get_workload(spec)
        total, trainable = parameter_counts(workload.build_model(device="meta"))
        rows.append(
            {
                "workload": workload.name,
                "family": workload.family,
                "config": str(workload.info.get("config", "")),
                "total params": f"{total:,}",
                "trainable": f"{trainable:,}",
                "tokens/sample": "" if workload.tokens_per_sample is None else str(workload.tokens_per_sample),
                "inputs": ", ".join(workload.input_names),
            }
        )
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no workloads)"
    columns = list(rows[0])
    numeric = {"total params", "trainable", "tokens/sample"}
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c].rjust(widths[c]) if c in numeric else values[c].ljust(widths[c]) for c in columns)

    header = line({c: c for c in columns})
    return "\n".join(text.rstrip() for text in [header, "-" * len(header), *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description="List workloads with parameter counts.")
    parser.add_argument(
        "specs",
        nargs="*",
        metavar="SPEC",
        help="workloads to show, with overrides after colons (gpt2-large:seq_len=128); default: every registered one",
    )
    parser.add_argument("--filter", default="", metavar="SUBSTR", help="only workloads whose name contains SUBSTR")
    parser.add_argument(
        "--workload-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a bring-your-own module that registers workloads first (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        for module in args.workload_module:
            load_workload_module(module)
        specs = [s for s in args.specs or list_workloads() if args.filter in s]
        print(format_table(workload_rows(specs)))
    except WorkloadError as exc:
        return usage_error(PROG, str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
