"""pytest options, presets and hooks of the dpmem benchmark (`pytest bench/ --benchmark-json=out.json`).

The options resolve into one :class:`bench.config.BenchConfig` (kept in ``config.stash``); the matrix of
cases is parametrized from it in :func:`pytest_generate_tests`. Bad option values are usage errors (exit 4).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.config import (
    PRESETS,
    BenchConfig,
    BenchUsageError,
    check_names,
    check_sample_interval,
    default_preset,
    parse_batch_sizes,
    parse_bytes,
    split_list,
)
from bench.keys import BENCH_CONFIG, RESULTS_WRITER, UNTIMED_RECORDS


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("dpmem", "dpmem benchmark matrix (see README: options and presets)")
    g.addoption(
        "--preset",
        default=None,
        help=f"case matrix preset: {', '.join(PRESETS)} (default: gpu-small with a GPU, else cpu-smoke)",
    )
    g.addoption("--workloads", default=None, help="comma list of workloads (replaces the preset's)")
    g.addoption("--methods", default=None, help="comma list of DP methods (replaces the preset's)")
    g.addoption("--batch-sizes", default=None, help="comma list of batch sizes (replaces the preset's)")
    g.addoption(
        "--devices", default=None, help="comma list of devices, e.g. cuda:0,cuda:1 (default: every GPU, else cpu)"
    )
    g.addoption(
        "--workload-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE, which registers workloads with models.register_workload (repeatable)",
    )
    g.addoption(
        "--sample-interval", type=float, default=0.001, help="NVML/RSS sampling interval in seconds (default 0.001)"
    )
    g.addoption(
        "--target-epsilon", type=float, default=None, help="resolve the noise multiplier for this ε (Opacus accountant)"
    )
    g.addoption("--target-delta", type=float, default=1e-5, help="δ of the privacy guarantee (default 1e-5)")
    g.addoption(
        "--noise-multiplier", type=float, default=None, help="noise multiplier σ (default 1.0 unless --target-epsilon)"
    )
    g.addoption("--accountant", default="prv", help="Opacus accountant: prv, rdp, gdp (default prv)")
    g.addoption(
        "--sample-rate", type=float, default=0.01, help="Poisson sampling rate q for the accountant (default 0.01)"
    )
    g.addoption("--privacy-steps", type=int, default=1000, help="training steps the guarantee covers (default 1000)")
    g.addoption("--max-grad-norm", type=float, default=1.0, help="per-sample clipping norm C (default 1.0)")
    g.addoption("--optimizer", default="adamw", help="adamw (default), adam or sgd")
    g.addoption("--rounds", type=int, default=None, help="timed rounds per case (default: the preset's)")
    g.addoption(
        "--memory-cap",
        default=None,
        help="CPU only: live tensor bytes above this are an OOM, e.g. 8GiB (default: 75%% of RAM)",
    )
    g.addoption(
        "--results",
        default=None,
        help="JSON-lines file each finished case is appended to (default: results/dpmem-<time>.jsonl)",
    )
    g.addoption(
        "--snapshot",
        default=None,
        metavar="CASE_ID",
        help="export a CUDA memory snapshot for this case id (e.g. dit-s-2-cond-bk-bs16-cuda:0) into --snapshot-dir",
    )
    g.addoption(
        "--snapshot-dir", default="results/snapshots", help="where --snapshot writes (default results/snapshots)"
    )
    g.addoption("--runner-label", default=None, help="label of this machine in results (default: $DPMEM_RUNNER_LABEL)")
    g.addoption("--seed", type=int, default=0, help="seed of batches and DP noise (default 0)")
    g.addoption(
        "--max-batch",
        action="store_true",
        help="max-batch mode: per workload × method × device, find the "
        "largest batch that fits (doubling, then bisection) and fit peak(B) = fixed + per_sample·B",
    )
    g.addoption("--max-batch-limit", type=int, default=4096, help="largest batch size the max-batch search tries")
    g.addoption(
        "--predict-memory",
        default="16GiB,24GiB,40GiB,80GiB,141GiB",
        help="memory sizes the max-batch fit predicts a max batch for (comma list)",
    )


def _build_config(opts: pytest.Config) -> BenchConfig:
    import models
    from bench import dp
    from bench.devices import visible_devices
    from bench.machine import ram_bytes

    for module in opts.getoption("--workload-module"):
        try:
            models.load_workload_module(module)
        except models.WorkloadError as exc:
            raise BenchUsageError(f"--workload-module: {exc}") from None

    preset_name = opts.getoption("--preset") or default_preset()
    check_names("--preset", [preset_name], list(PRESETS))
    preset = PRESETS[preset_name]

    workloads = split_list("--workloads", opts.getoption("--workloads")) or list(preset.workloads)
    check_names("--workloads", workloads, models.list_workloads())
    methods = split_list("--methods", opts.getoption("--methods")) or list(preset.methods or dp.available_methods())
    check_names("--methods", methods, dp.available_methods())
    text = opts.getoption("--batch-sizes")
    batch_sizes = parse_batch_sizes(text) if text is not None else list(preset.batch_sizes)
    visible = visible_devices()
    devices = split_list("--devices", opts.getoption("--devices")) or visible
    for device in devices:
        if device not in visible:
            raise BenchUsageError(f"--devices: {device!r} does not exist here; visible devices: {', '.join(visible)}")

    rounds = opts.getoption("--rounds") or preset.rounds
    if rounds < 1:
        raise BenchUsageError(f"--rounds: must be >= 1, got {rounds}")
    cap_text = opts.getoption("--memory-cap")
    if cap_text is not None:
        memory_cap = parse_bytes("--memory-cap", cap_text)
    else:  # 75 % of RAM; no cap where RAM cannot be read
        ram = ram_bytes()
        memory_cap = int(ram * 0.75) if ram else None
    if opts.getoption("--max-batch-limit") < 1:
        raise BenchUsageError("--max-batch-limit: must be >= 1")
    predict = [
        parse_bytes("--predict-memory", s) for s in split_list("--predict-memory", opts.getoption("--predict-memory"))
    ]

    privacy_kwargs = dict(
        max_grad_norm=opts.getoption("--max-grad-norm"),
        noise_multiplier=opts.getoption("--noise-multiplier"),
        target_epsilon=opts.getoption("--target-epsilon"),
        target_delta=opts.getoption("--target-delta"),
        accountant=opts.getoption("--accountant"),
        sample_rate=opts.getoption("--sample-rate"),
        steps=opts.getoption("--privacy-steps"),
    )
    try:
        privacy = dp.resolve_privacy(**privacy_kwargs)
        check_names("--optimizer", [opts.getoption("--optimizer")], list(dp.OPTIMIZERS))
    except dp.DPConfigError as exc:
        raise BenchUsageError(str(exc)) from None

    results = opts.getoption("--results") or f"results/dpmem-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    return BenchConfig(
        preset=preset_name,
        workloads=tuple(workloads),
        methods=tuple(methods),
        batch_sizes=tuple(batch_sizes),
        devices=tuple(devices),
        rounds=rounds,
        privacy=privacy,
        sample_interval_s=check_sample_interval(opts.getoption("--sample-interval")),
        optimizer=opts.getoption("--optimizer"),
        memory_cap_bytes=memory_cap,
        snapshot_case=opts.getoption("--snapshot"),
        snapshot_dir=opts.getoption("--snapshot-dir"),
        results_path=results,
        runner_label=opts.getoption("--runner-label") or os.environ.get("DPMEM_RUNNER_LABEL") or None,
        seed=opts.getoption("--seed"),
        max_batch=opts.getoption("--max-batch"),
        max_batch_limit=opts.getoption("--max-batch-limit"),
        predict_memory_bytes=tuple(predict),
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        config.stash[BENCH_CONFIG] = _build_config(config)
    except BenchUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[UNTIMED_RECORDS] = []


@pytest.fixture(scope="session")
def bench_cfg(pytestconfig) -> BenchConfig:
    return pytestconfig.stash[BENCH_CONFIG]


@pytest.fixture(scope="session")
def results_writer(pytestconfig, bench_cfg):
    from bench.results import ResultsWriter

    writer = ResultsWriter(bench_cfg.results_path)
    pytestconfig.stash[RESULTS_WRITER] = writer
    return writer


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cfg = metafunc.config.stash[BENCH_CONFIG]
    if "dp_case" in metafunc.fixturenames:
        # Batch sizes innermost and ascending: once a batch runs out of memory the larger ones are skipped.
        cases = [
            (w, m, b, d)
            for w in cfg.workloads
            for m in cfg.methods
            for d in cfg.devices
            for b in sorted(cfg.batch_sizes)
        ]
        metafunc.parametrize(
            "workload,method,batch_size,device",
            cases,
            ids=[f"{w}-{m}-bs{b}-{d}" for w, m, b, d in cases],
        )
    elif "max_batch_case" in metafunc.fixturenames:
        cases = [(w, m, d) for w in cfg.workloads for m in cfg.methods for d in cfg.devices]
        metafunc.parametrize("workload,method,device", cases, ids=[f"{w}-{m}-{d}" for w, m, d in cases])


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """`--max-batch` runs only the max-batch search; without it only the matrix runs (no skipped noise)."""
    want = "max_batch_case" if config.stash[BENCH_CONFIG].max_batch else "dp_case"
    other = "dp_case" if want == "max_batch_case" else "max_batch_case"
    deselected = [item for item in items if other in getattr(item, "fixturenames", ())]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if other not in getattr(item, "fixturenames", ())]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    from bench.machine import machine_info as dpmem_machine_info

    info = dpmem_machine_info()
    label = config.stash[BENCH_CONFIG].runner_label
    if label:
        info["runner_label"] = label
    machine_info["dpmem"] = info


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """pytest-benchmark only writes cases it timed; OOM and unsupported cases are results too, so add them."""
    for entry in config.stash.get(UNTIMED_RECORDS, []):
        output_json.setdefault("benchmarks", []).append(entry)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    writer = config.stash.get(RESULTS_WRITER, None)
    if writer is not None and writer.count:
        terminalreporter.write_line(f"dpmem: {writer.count} result record(s) appended to {Path(writer.path)}")
