"""pytest stash keys shared by the root conftest and the bench cases (one module, so one identity)."""

import pytest

BENCH_CONFIG = pytest.StashKey["object"]()  # bench.config.BenchConfig of the session
UNTIMED_RECORDS = pytest.StashKey[list]()  # oom/unsupported cases, added to the benchmark JSON at the end
RESULTS_WRITER = pytest.StashKey["object"]()  # bench.results.ResultsWriter, once a case has run
