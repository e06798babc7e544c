"""A fixture for test modules that run thousands of tiny ops: on a shared 2-core machine OpenMP barriers stall
each op by milliseconds, so such a module runs torch on one thread (import the fixture into the module)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
