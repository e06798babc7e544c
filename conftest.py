"""The dpmem bench's command-line options (``pytest bench/ --workloads ... --methods ...``; see the README).

Only the options live here, so ``pytest --help`` lists them from the repository root and ``pytest tests`` pays
nothing for them: they are parsed by the cheap ``type=`` callables of ``bench/options.py``. Everything that builds
and runs the case matrix is in ``bench/conftest.py``, which pytest loads only for ``pytest bench/``.
"""

from bench.options import add_bench_options


def pytest_addoption(parser):
    add_bench_options(parser)
