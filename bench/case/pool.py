"""Meta cases on several worker processes (``pytest bench/ --devices meta --jobs N``), their records back in the
pytest process.

A meta case is single-threaded Python (every aten op passes through the op cache and the tensor tracker), so a
paper-size matrix uses one core; N processes use N. The pytest process stays what it is — every case is its
pytest item, with its outcome, in collection order, writing its record to the benchmark JSON and the results
file — but a meta item takes its record from the pool instead of running the case:

* :class:`MetaCasePool` starts ``workers`` processes with ``spawn`` (a fresh interpreter: the pytest process has
  imported torch, numpy and opacus, whose thread pools a ``fork`` would copy half-alive), hands each the session's
  :class:`~bench.config.settings.BenchConfig` once and the cases in collection order, two at a time per worker
  (one running, one queued, so a worker never waits for the pytest process between cases);
* a worker runs :func:`bench.case.runner.run_case` exactly as the pytest process would and sends back the record's
  ``to_dict()`` (plain JSON values) and the warnings the case raised, which the item re-raises where pytest's
  warning filters see them; a Python exception that escapes the case comes back as its traceback text and fails
  the item;
* a worker that dies (a crash in a library, the kernel's OOM killer) fails the one case it was running as an
  ``error`` record naming the exit code; the cases it had queued go to a fresh worker.

Only our own objects cross the pipes (the config and case specs one way, JSON-able dicts and strings the
other), and the records are the same as a one-process run's (tests/bench/test_pool.py compares them).
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import signal
import sys
import traceback
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from bench.case.spec import CaseSpec, new_record
from bench.config.settings import BenchConfig
from bench.results.record import CaseRecord

__all__ = ["CaseFailedInWorker", "MetaCasePool"]

_QUEUED_PER_WORKER = 2  # cases handed to a worker ahead: the one it runs and the next


class CaseFailedInWorker(RuntimeError):
    """A Python exception escaped a case in a worker (a bug, not an outcome): its traceback, as the worker saw it."""


@dataclass(frozen=True)
class CaughtWarning:
    """A warning a case raised in a worker, sent back as text and re-raised in the case's pytest item."""

    category: str  # "module:qualname" of the warning class
    message: str
    filename: str
    lineno: int

    @classmethod
    def of(cls, caught: warnings.WarningMessage) -> CaughtWarning:
        category = f"{caught.category.__module__}:{caught.category.__qualname__}"
        return cls(category, str(caught.message), caught.filename, caught.lineno)

    def reraise(self) -> None:
        warnings.warn_explicit(self.message, _warning_class(self.category), self.filename, self.lineno)


def _warning_class(name: str) -> type[Warning]:
    """The warning class named ``module:qualname`` if this process has imported its module (nothing is imported
    for it), else UserWarning."""
    module_name, _, qualname = name.partition(":")
    found: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    queued: deque[int] = dataclasses.field(default_factory=deque)  # case indices sent, oldest (running) first


class MetaCasePool:
    """``workers`` processes running ``specs`` (meta cases, in collection order); :meth:`record` returns a case's
    record once its worker sent it back. Close it (:meth:`close`) at the end of the session."""

    def __init__(self, config: BenchConfig, specs: Sequence[CaseSpec], workers: int):
        self.config = config
        self.specs = list(specs)
        self._todo = deque(range(len(self.specs)))  # not yet handed to a worker
        self._index_of: dict[CaseSpec, deque[int]] = {}
        for index, spec in enumerate(self.specs):
            self._index_of.setdefault(spec, deque()).append(index)
        self._done: dict[int, tuple[dict | str, list[CaughtWarning]]] = {}
        self._context = multiprocessing.get_context("spawn")
        self._workers = [self._start() for _ in range(min(workers, len(self.specs)))]
        for worker in self._workers:
            self._feed(worker)

    def __contains__(self, spec: CaseSpec) -> bool:
        return bool(self._index_of.get(spec))

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(theirs, self.config), daemon=True, name="dpmem-meta")
        process.start()
        theirs.close()
        return _Worker(process, ours)

    def _feed(self, worker: _Worker) -> None:
        while self._todo and len(worker.queued) < _QUEUED_PER_WORKER:
            index = self._todo.popleft()
            worker.conn.send((index, self.specs[index]))
            worker.queued.append(index)

    def record(self, spec: CaseSpec) -> CaseRecord:
        """``spec``'s record, waiting for it; its warnings are re-raised here. CaseFailedInWorker if the case
        raised."""
        index = self._index_of[spec].popleft()
        while index not in self._done:
            self._receive()
        data, caught = self._done.pop(index)
        for warning in caught:
            warning.reraise()
        if isinstance(data, str):
            raise CaseFailedInWorker(f"in a meta worker process:\n{data}")
        return CaseRecord.from_dict(data)

    def _receive(self) -> None:
        """Wait for any worker: take the records it sent and hand it more cases; replace a worker that died."""
        by_wait_handle = {w.conn: w for w in self._workers} | {w.process.sentinel: w for w in self._workers}
        for ready in wait(list(by_wait_handle)):
            worker = by_wait_handle[ready]
            if ready is worker.conn:
                try:
                    index, data, caught = worker.conn.recv()
                except (EOFError, OSError):
                    continue  # the worker died; its sentinel says so
                worker.queued.remove(index)
                self._done[index] = (data, caught)
                self._feed(worker)
            elif worker in self._workers:
                self._replace(worker)

    def _replace(self, dead: _Worker) -> None:
        """The case ``dead`` was running is an error record; the ones it had queued go back to the front."""
        dead.process.join()
        self._workers.remove(dead)
        dead.conn.close()
        if dead.queued:
            running = dead.queued.popleft()
            record = new_record(self.specs[running], self.config)
            record.status = "error"
            record.reason = (
                f"the meta worker process running this case (pid {dead.process.pid}) exited with code "
                f"{dead.process.exitcode} before it sent a record"
            )
            self._done[running] = (record.to_dict(), [])
            self._todo.extendleft(reversed(dead.queued))
        if self._todo:
            worker = self._start()
            self._workers.append(worker)
            self._feed(worker)

    def close(self) -> None:
        """Stop the workers: those idle exit at once, those still running a case (an interrupted session) are
        terminated."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=2 if not worker.queued else 0)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join()
            worker.conn.close()
        self._workers = []


def _serve(conn: Connection, config: BenchConfig) -> None:
    """A worker: run each case it is sent, as the pytest process would, until it is sent None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pytest process's to handle; it stops us
    import torch

    import models
    from bench.case.runner import run_case

    for module in config.matrix.workload_modules:
        models.load_workload_module(module)
    # A meta case computes nothing (one thread is all it uses), but drawing its batch on CPU would start a thread
    # per core in every worker. Meta records hold no thread count (no timed rounds).
    torch.set_num_threads(config.measure.torch_threads or 1)
    gc.freeze()  # as in the pytest process (bench/conftest.py): the imports' objects out of the collector's way
    while (task := conn.recv()) is not None:
        index, spec = task
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                data: dict | str = run_case(spec, config, None).to_dict()
            except Exception:
                data = traceback.format_exc()
        conn.send((index, data, [CaughtWarning.of(w) for w in caught]))
    conn.close()
    os._exit(0)  # nothing left to flush; skip the interpreter's slow teardown of torch
