"""``python -m bench.plan``: the capacity planner's command line (bench/plan/planner.py)."""

import sys

from bench.config.cli import run
from bench.plan.planner import PROG, main

sys.exit(run(main, PROG))
