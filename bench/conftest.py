"""pytest hooks of the dpmem benchmark (``pytest bench/ --benchmark-json=out.json``).

The options (root ``conftest.py`` → ``bench/config/options.py``) resolve into a ``BenchConfig`` (config/settings.py);
the matrix of cases is parametrized from it in :func:`pytest_generate_tests`. Bad option values are usage
errors (exit 4). Cases that pytest-benchmark did not time (OOM, unsupported, max-batch searches) are results
too: they go into the benchmark JSON under ``dpmem_untimed`` (pytest-benchmark's own tools read only
``benchmarks``, so they keep working on our files) and into the JSON-lines results file. Meta cases may run in
worker processes (``--jobs``, bench/case/pool.py); their items still run here, in collection order, and take
their records from the pool (:func:`run_dp_case`).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from bench.messages import did_you_mean
from bench.results.files import RecordNotWrittenError, ResultsWriter, ResultsWriterError
from bench.results.terminal import SessionSummary, quiet_known_warnings, set_table_defaults

if TYPE_CHECKING:  # torch, opacus and the registries load in pytest_configure, after the options parsed
    from bench.case.spec import CaseSpec
    from bench.config.settings import BenchConfig
    from bench.results.record import CaseRecord, MaxBatchRecord
    from bench.trackers.timing import StepTimer

BENCH_CONFIG = pytest.StashKey["BenchConfig"]()
UNTIMED_ENTRIES = pytest.StashKey[list]()  # JSON entries of cases pytest-benchmark did not time
SESSION_START = pytest.StashKey[float]()
RESULTS_WRITER = pytest.StashKey[ResultsWriter]()
RANKED_MATRIX = pytest.StashKey[bool]()  # whether some case of the matrix runs on many ranks
META_POOL = pytest.StashKey["MetaCasePool"]()  # worker processes running the meta cases (--jobs), if any


def pytest_configure(config: pytest.Config) -> None:
    from bench.config.settings import BenchConfig, BenchUsageError

    try:
        bench_config = BenchConfig.from_pytest(config)
        writer = ResultsWriter(bench_config.output.results_path)  # checks the file is writable before any case runs
    except (BenchUsageError, ResultsWriterError) as exc:
        raise pytest.UsageError(str(exc)) from None
    if bench_config.measure.torch_threads is not None:
        import torch

        torch.set_num_threads(bench_config.measure.torch_threads)
    # Every case collects garbage at its boundaries; with torch and opacus imported, a full collection walks
    # hundreds of thousands of long-lived objects (~0.3 s each time). Move them out of the collector's way.
    gc.freeze()
    config.stash[BENCH_CONFIG] = bench_config
    config.stash[RESULTS_WRITER] = writer
    config.stash[UNTIMED_ENTRIES] = []
    config.stash[SESSION_START] = time.time()
    set_table_defaults(config)
    quiet_known_warnings(config)
    summary = SessionSummary(writer.path, config.stash[UNTIMED_ENTRIES], config.getoption("benchmark_json", None))
    config.pluginmanager.register(summary, "dpmem-session-summary")


@pytest.fixture(scope="session")
def bench_cfg(pytestconfig) -> BenchConfig:
    return pytestconfig.stash[BENCH_CONFIG]


@pytest.fixture
def run_dp_case(pytestconfig, bench_cfg):
    """``run_dp_case(spec, timer)``: the case's record, from the meta worker pool when it ran there, else run
    here (bench.case.runner.run_case)."""
    from bench.case.runner import run_case

    pool = pytestconfig.stash.get(META_POOL, None)

    def run(spec: CaseSpec, timer: StepTimer | None) -> CaseRecord:
        if pool is not None and spec in pool:
            return pool.record(spec)
        return run_case(spec, bench_cfg, timer)

    return run


def pytest_collection_finish(session: pytest.Session) -> None:
    """Once the items are final (deselected, ``-k``): hand the meta cases, in collection order, to worker
    processes when ``--jobs`` (or its auto choice) asks for more than one (bench/config/settings.py,
    ``meta_workers``)."""
    from bench.config.settings import meta_workers
    from bench.trackers.contention import available_cpu_cores

    cfg = session.config.stash[BENCH_CONFIG]
    items = [item for item in session.items if "dp_case" in getattr(item, "fixturenames", ())]
    meta = [spec for spec in (item.callspec.params["dp_case"] for item in items) if spec.device == "meta"]
    workers = meta_workers(cfg.measure.jobs, len(meta), cfg.matrix.devices, available_cpu_cores())
    if workers > 1 and not session.config.option.collectonly:
        from bench.case.pool import MetaCasePool

        session.config.stash[META_POOL] = MetaCasePool(cfg, meta, workers)


def pytest_sessionfinish(session: pytest.Session) -> None:
    pool = session.config.stash.get(META_POOL, None)
    if pool is not None:
        pool.close()


@pytest.fixture
def keep_result(pytestconfig):
    """``keep_result(result, name, data)``: append the case's record (``data``: its ``to_dict()``, made once for
    the benchmark JSON too) to the results file (a file that cannot take it fails the case), then fail the case
    as ``name`` when its record is an error."""

    def keep(result: CaseRecord | MaxBatchRecord, name: str, data: dict) -> None:
        try:  # after the benchmark JSON has the record: a results file that cannot take it loses nothing else
            pytestconfig.stash[RESULTS_WRITER].append(result, data)
        except RecordNotWrittenError as exc:
            pytest.fail(str(exc), pytrace=False)
        if result.status == "error":
            pytest.fail(f"{name}: {result.reason}", pytrace=False)

    return keep


@pytest.fixture
def record_untimed(request):
    """``record_untimed(params, extra_info)``: keep a case that pytest-benchmark did not time in the JSON."""

    def record(params: dict, extra_info: dict) -> None:
        node = request.node
        entry = {"name": node.name, "fullname": node.nodeid, "param": node.callspec.id, "params": params}
        request.config.stash[UNTIMED_ENTRIES].append({**entry, "extra_info": extra_info})

    return record


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    from bench.case.spec import CaseSpec

    cfg = metafunc.config.stash[BENCH_CONFIG]
    if "dp_case" in metafunc.fixturenames:
        # Batch sizes innermost and ascending: once a batch runs out of memory the larger ones are skipped.
        specs = [
            CaseSpec(w, m, b, d, world_size, parallel, precision=p, checkpointing=c, trainable=t)
            for w in cfg.matrix.workloads
            for m in cfg.matrix.methods
            for world_size, parallel in cfg.matrix.case_strategies()
            for d in _devices_of(cfg.matrix.devices, world_size)
            for p in cfg.matrix.precisions
            for c in cfg.matrix.checkpointings
            for t in cfg.matrix.trainables
            for b in sorted(cfg.matrix.batch_sizes)
            if cfg.matrix.includes(m, b) and cfg.matrix.includes_mode(w, p, c, t)
        ]
        # One CaseSpec per case; test_dp_step writes its fields as the JSON's "params" (CaseSpec.params).
        metafunc.parametrize("dp_case", specs, ids=[s.case_id for s in specs])
        metafunc.config.stash[RANKED_MATRIX] = any(s.world_size > 1 for s in specs)
    elif "max_batch_case" in metafunc.fixturenames:
        cases = [
            CaseSpec(w, m, 0, d, precision=p, checkpointing=c, trainable=t)
            for w in cfg.matrix.workloads
            for m in cfg.matrix.methods
            for d in cfg.matrix.devices
            for p in cfg.matrix.precisions
            for c in cfg.matrix.checkpointings
            for t in cfg.matrix.trainables
            if cfg.matrix.includes_mode(w, p, c, t)
        ]
        ids = ["-".join((s.workload, s.method, s.device, *s.mode.id_parts)) for s in cases]
        metafunc.parametrize("max_batch_case", cases, ids=ids)


def _devices_of(devices: tuple[str, ...], world_size: int) -> list[str]:
    """The devices of the cases with ``world_size`` ranks: as given for one process; for many, each device type
    once ("cuda": rank r runs on its node's GPU LOCAL_RANK) and never meta (one process predicts many ranks:
    ``python -m bench.ranks.predict``; the run's header says so)."""
    if world_size == 1:
        return list(devices)
    return list(dict.fromkeys("cuda" if d.startswith("cuda") else d for d in devices if d != "meta"))


@pytest.fixture
def case_params(dp_case: CaseSpec, pytestconfig) -> dict[str, object]:
    """``dp_case``'s ``params`` in pytest-benchmark's JSON: with world_size and parallel whenever some case of the
    run has many ranks (every timed case then has them, so results group alike)."""
    return dp_case.params(ranks=pytestconfig.stash[RANKED_MATRIX])


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """`--max-batch` runs only the max-batch search; without it only the matrix runs (no skipped noise).
    A ``--snapshot`` case id that names no case of the matrix is a usage error, before anything runs."""
    cfg = config.stash[BENCH_CONFIG]
    want = "max_batch_case" if cfg.capacity.max_batch else "dp_case"
    deselected = [item for item in items if want not in getattr(item, "fixturenames", ())]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if want in getattr(item, "fixturenames", ())]
    if cfg.measure.snapshot_case not in (None, "all"):
        ids = [item.callspec.id for item in items if hasattr(item, "callspec")]
        if cfg.measure.snapshot_case not in ids:
            hint = did_you_mean(cfg.measure.snapshot_case, ids) or " (case ids look like dit-s-2-cond-bk-bs16-cuda:0)"
            raise pytest.UsageError(f"--snapshot: no case of this run has id {cfg.measure.snapshot_case!r}{hint}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Options that meta cases ignore, said once at the top of the run (nothing fails because of them)."""
    cfg = config.stash.get(BENCH_CONFIG, None)
    return [f"dpmem: {note}" for note in cfg.output.meta_notes] if cfg is not None else []


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    from bench.system.machine import machine_info as dpmem_machine_info

    info = dpmem_machine_info()
    label = config.stash[BENCH_CONFIG].output.runner_label
    if label:
        info["runner_label"] = label
    machine_info["dpmem"] = info


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    output_json["dpmem_untimed"] = list(config.stash.get(UNTIMED_ENTRIES, []))


def pytest_unconfigure(config: pytest.Config) -> None:
    """pytest-benchmark writes no ``--benchmark-json`` when nothing was timed (a meta run, a max-batch search, a
    run where every case ran out of memory); write it then, with the untimed results, so a report can be made
    from it as from any run."""
    path, entries = config.getoption("benchmark_json", None), config.stash.get(UNTIMED_ENTRIES, [])
    if path is None or not entries:
        return
    path = Path(path)
    if path.exists() and path.stat().st_mtime >= config.stash[SESSION_START]:
        return  # pytest-benchmark wrote it (with our untimed entries)
    from bench.system.machine import machine_info

    label = config.stash[BENCH_CONFIG].output.runner_label
    info = {**machine_info(), **({"runner_label": label} if label else {})}
    data = {"machine_info": {"dpmem": info}, "benchmarks": [], "dpmem_untimed": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, allow_nan=False))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    cfg = config.stash.get(BENCH_CONFIG, None)
    for note in cfg.output.meta_notes if cfg is not None else ():
        terminalreporter.write_line(f"dpmem: {note}")
    writer = config.stash.get(RESULTS_WRITER, None)
    for index, line in enumerate(writer.summary() if writer is not None else ()):
        # the first line counts the records written whole; any further one is about records that failed
        terminalreporter.write_line(f"dpmem: {line}", red=index > 0 or not writer.count)
