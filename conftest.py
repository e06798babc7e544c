"""The dpmem bench's command-line options (``pytest bench/ --workloads ... --methods ...``; see docs/running.md).

Only the options live here, so ``pytest --help`` lists them from the repository root and ``pytest tests`` pays
nothing for them: they are parsed by the cheap ``type=`` callables of ``bench/config/options.py``.
Everything that builds
and runs the case matrix is in ``bench/conftest.py``, which pytest loads only for ``pytest bench/``.
"""

import pytest

from bench.config.options import add_bench_options, refused_option


def pytest_addoption(parser):
    add_bench_options(parser)


@pytest.hookimpl(tryfirst=True)  # before bench/conftest.py reads the options
def pytest_configure(config):
    """A value an option's parser refused is one line, ``ERROR: argument --batch-sizes: ...``, exit 4."""
    message = refused_option(vars(config.option).values())
    if message is not None:
        raise pytest.UsageError(message)
