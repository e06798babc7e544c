"""What every dpmem command line shares: a usage error is one line, Ctrl-C is one line.

``python -m bench.plan``, ``python -m bench.ranks.predict``, ``python -m bench.dp``, ``python -m models``,
``python -m reports`` (and its subcommands) and the other ``python -m`` tools build their parser with
:class:`OneLineParser` and end with ``sys.exit(run(main, PROG))``:

* a usage error prints ``PROG: error: MESSAGE (see --help)`` on stderr and exits 2 (argparse would print its
  whole usage block first; ``--help`` still prints it), and a bad value found after parsing (an unknown
  workload or method) is the same one line, :func:`usage_error`;
* Ctrl-C (``KeyboardInterrupt``) prints ``PROG: interrupted`` and exits 130 (128 + SIGINT, the shell's
  convention) instead of a traceback through torch.

Torch-free on purpose, so a usage error costs no torch import.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["INTERRUPTED", "USAGE_ERROR", "OneLineParser", "pytest_bench_command", "run", "usage_error"]

USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.exit(usage_error(self.prog, f"{message} (see --help)"))


def usage_error(prog: str, message: str) -> int:
    """Print ``PROG: error: MESSAGE`` on stderr (a bad value found after parsing, too); returns 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def run(main: Callable[[], int], prog: str) -> int:
    """``main()``'s exit status; ``prog: interrupted`` on stderr and 130 when Ctrl-C stops it."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def pytest_bench_command(*args: str) -> list[str]:
    """The command line of ``pytest bench/`` in a child process (quiet, no cache directory), then ``args``."""
    return [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider", *args]
