"""The suite runs on every core (tox: ``pytest -n auto``, pytest-xdist: one worker process per core).

* Each worker runs torch on one intra-op thread: the workers already fill the cores, and tiny ops on two OpenMP
  threads each would contend for them.
* Many tests start ``pytest bench/`` in a child process, which must run as a user's would; pytest-benchmark turns
  itself off in any process that looks like an xdist worker (it reads ``PYTEST_XDIST_WORKER`` from the
  environment), so a worker keeps its own markers from the processes it starts.
"""

import os

import torch

XDIST_ENVIRONMENT = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)
    for name in XDIST_ENVIRONMENT:
        os.environ.pop(name, None)
