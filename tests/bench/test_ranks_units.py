"""Many-rank cases without launching ranks: record, options, ids, the launcher's timeout and its merging of ranks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.case.spec import CaseSpec
from bench.config.options import BadValue, parallel_strategies, rendezvous_endpoint, world_sizes
from bench.config.settings import BenchConfig, BenchUsageError, _check_ranks
from bench.conftest import _devices_of
from bench.dp import resolve_privacy
from bench.ranks.job import RankJob
from bench.ranks.launch import (
    RUN_DIR_PREFIX,
    LaunchOutcome,
    collect,
    launch,
    remove_stale_run_dirs,
    run_ranked_case,
    torchrun_argv,
)
from bench.ranks.step import time_rounds
from bench.results.record import (
    CaseRecord,
    RankFigures,
    RecordError,
    StepMemory,
    combine_rank_records,
    from_jsonl_line,
    to_jsonl_line,
)
from bench.trackers.timing import MIN_ROUND_S


def _config(**kw) -> BenchConfig:
    base = dict(
        preset="cpu-smoke",
        workloads=("dit-tiny-cond",),
        methods=("bk",),
        batch_sizes=(4,),
        devices=("cpu",),
        rounds=1,
        privacy=resolve_privacy(1.0),
        world_sizes=(2,),
        parallel=("ddp",),
        rank_timeout_s=1.0,
    )
    base.update(kw)
    return BenchConfig.from_fields(**base)


def _rank_record(rank: int, peak: int | None, status: str = "ok", reason: str = "", notes=()) -> CaseRecord:
    record = CaseRecord(
        "dit-tiny-cond", "bk", 4, "cpu", status=status, reason=reason, world_size=2, parallel="ddp", notes=list(notes)
    )
    record.memory = StepMemory(peak_tensor_bytes=peak, breakdown={"other": peak} if peak else {})
    record.ranks = [RankFigures(rank=rank, status=status, reason=reason, peak_tensor_bytes=peak)]
    record.peak_rank = rank
    return record


# --- the record ---------------------------------------------------------------------------------------------------


def test_a_many_rank_record_round_trips_with_its_ranks():
    record = combine_rank_records([_rank_record(0, 100), _rank_record(1, 120)])
    again = from_jsonl_line(to_jsonl_line(record))
    assert again == record
    assert again.ranks[1] == RankFigures(rank=1, peak_tensor_bytes=120)
    assert again.rank_max == {"peak_tensor_bytes": 120} and again.rank_mean == {"peak_tensor_bytes": 110.0}
    data = record.to_dict()  # flat: ranks is a list of plain objects beside the other keys
    assert data["ranks"][0]["rank"] == 0 and data["world_size"] == 2 and data["parallel"] == "ddp"


def test_combining_ranks_takes_the_peak_rank_and_the_worst_status():
    ok = combine_rank_records([_rank_record(0, 100, notes=["n"]), _rank_record(1, 120, notes=["n"])])
    assert ok.status == "ok" and ok.peak_rank == 1 and ok.memory.peak_tensor_bytes == 120
    assert ok.notes == ["n"]  # one note per distinct line
    failed = combine_rank_records([_rank_record(0, 100), _rank_record(1, None, "error", "RuntimeError: boom")])
    assert failed.status == "error" and failed.reason == "rank 1: RuntimeError: boom"
    assert failed.peak_rank == 0 and failed.memory.peak_tensor_bytes == 100  # the rank that measured


def test_nodes_records_combine_into_one_case():
    """Per-node records (each node's pytest merges its local ranks) become one record with every rank."""
    node0 = combine_rank_records([_rank_record(0, 100), _rank_record(1, 100)])
    node1 = combine_rank_records([_rank_record(2, 130), _rank_record(3, 100)])
    whole = combine_rank_records([node0, node1])
    assert [r.rank for r in whole.ranks] == [0, 1, 2, 3]
    assert whole.peak_rank == 2 and whole.memory.peak_tensor_bytes == 130
    assert whole.rank_mean["peak_tensor_bytes"] == pytest.approx(107.5)


@pytest.mark.parametrize("key,value", [("world_size", 0), ("world_size", "2"), ("parallel", "zero")])
def test_record_refuses_a_bad_world_size_or_strategy(key, value):
    data = {**_rank_record(0, 1).to_dict(), key: value}
    with pytest.raises(RecordError, match=key):
        CaseRecord.from_dict(data)


# --- options, ids, matrix ------------------------------------------------------------------------------------------


def test_world_sizes_and_strategies_parse_or_say_why():
    assert world_sizes("1, 2,8") == (1, 2, 8)
    assert parallel_strategies("ddp,fsdp") == ("ddp", "fsdp")
    assert rendezvous_endpoint("node0.cluster:29500") == "node0.cluster:29500"
    with pytest.raises(BadValue, match="world size must be >= 1"):
        world_sizes("0")
    with pytest.raises(BadValue, match=r"did you mean fsdp.*valid: ddp, fsdp"):
        parallel_strategies("fsd")
    with pytest.raises(BadValue, match="HOST:PORT"):
        rendezvous_endpoint("node0")


@pytest.mark.parametrize(
    "args,message",
    [
        (((2,), 2, None, ("cpu",), False), "needs --rdzv-endpoint"),
        (((3,), 2, "h:1", ("cpu",), False), "do not split evenly over --nnodes 2"),
        (((2,), 1, None, ("cpu",), True), "--max-batch searches one process"),
    ],
)
def test_many_rank_settings_that_cannot_run_are_usage_errors(args, message):
    with pytest.raises(BenchUsageError, match=message):
        _check_ranks(*args)


def test_more_cpu_ranks_than_cores_are_refused_unless_oversubscribed(monkeypatch):
    monkeypatch.setattr("bench.config.settings.available_cpu_cores", lambda: 2)
    _check_ranks((1, 2), 1, None, ("cpu",), False)  # one rank per core runs
    with pytest.raises(BenchUsageError, match=r"start 64 CPU processes per node, this node has 2 cores; pass "):
        _check_ranks((64,), 1, None, ("cpu",), False)
    _check_ranks((64,), 1, None, ("cpu",), False, oversubscribe=True)  # asked for: started
    _check_ranks((4,), 2, "localhost:29500", ("cpu",), False)  # 2 per node


def test_a_rendezvous_host_that_does_not_resolve_fails_at_once():
    """torchrun would retry the name until --rank-timeout (900 s), then die with only its own 'gai error'."""
    with pytest.raises(BenchUsageError, match=r"--rdzv-endpoint notahost.invalid:29500: host 'notahost.invalid' "):
        _check_ranks((2,), 2, "notahost.invalid:29500", ("cpu",), False)
    _check_ranks((2,), 2, "127.0.0.1:29500", ("cpu",), False)


def test_a_timed_out_launch_keeps_torchruns_own_last_line(tmp_path):
    outcome = LaunchOutcome(None, "... RendezvousTimeoutError: no peer joined", timed_out=True)
    base = CaseRecord("dit-tiny-cond", "bk", 4, "cpu", world_size=2, parallel="ddp")
    record = collect(base, tmp_path, outcome, _config(rank_timeout_s=5.0, nnodes=2, rdzv_endpoint="h:1"), 1)
    assert record.status == "error"
    assert record.reason == (
        "no rank of this node reported: killed after --rank-timeout 5 s; torchrun's last line: "
        "... RendezvousTimeoutError: no peer joined"
    )


def test_case_ids_are_unchanged_for_one_process_and_name_strategy_and_ranks_otherwise():
    assert CaseSpec("gpt-tiny", "bk", 4, "cpu").case_id == "gpt-tiny-bk-bs4-cpu"
    assert CaseSpec("gpt-tiny", "bk", 16, "cuda", 8, "fsdp").case_id == "gpt-tiny-bk-bs16-cuda-fsdp8"
    assert _config(world_sizes=(1, 2), parallel=("ddp", "fsdp")).matrix.case_strategies() == [
        (1, None),
        (2, "ddp"),
        (2, "fsdp"),
    ]
    assert _devices_of(("cuda:0", "cuda:1", "cpu"), 1) == ["cuda:0", "cuda:1", "cpu"]
    assert _devices_of(("cuda:0", "cuda:1", "cpu"), 4) == ["cuda", "cpu"]  # ranks take GPUs 0..n-1 of each node
    assert _devices_of(("cpu", "meta"), 1) == ["cpu", "meta"]
    assert _devices_of(("cpu", "meta"), 2) == ["cpu"]  # meta runs one process; the run's header says so


def test_a_batch_that_does_not_split_over_the_ranks_is_unsupported_without_a_launch():
    record = run_ranked_case(CaseSpec("dit-tiny-cond", "bk", 3, "cpu", 2, "ddp"), _config())
    assert record.status == "unsupported" and "does not split evenly over 2 ranks" in record.reason
    assert record.world_size == 2 and record.parallel == "ddp" and record.ranks == []


def test_dpmems_own_refusal_is_recorded_without_a_launch():
    record = run_ranked_case(CaseSpec("dit-tiny-cond", "bk", 4, "cpu", 2, "fsdp"), _config())
    assert record.status == "unsupported" and "bk under FSDP is not implemented by dpmem" in record.reason


@pytest.mark.parametrize(
    "spec, settings, message",
    [
        (CaseSpec("dit-tiny-cond", "bk", 4, "cpu", 2, "ddp", precision="bf16"), {}, "training mode bf16"),
        (CaseSpec("dit-tiny-cond", "bk", 4, "cpu", 2, "ddp"), {"attention": "math"}, "--attention math"),
        (CaseSpec("dit-tiny-cond", "bk", 4, "cpu", 2, "ddp"), {"optimizer_impl": "foreach"}, "--optimizer-impl"),
    ],
)
def test_a_setting_the_ranks_cannot_honour_is_unsupported_without_a_launch(spec, settings, message):
    from bench.case.runner import run_case

    record = run_case(spec, _config(**settings), timer=None)
    assert record.status == "unsupported" and message in record.reason, record.reason
    assert record.world_size == 2 and record.ranks == []


def test_rank_job_round_trips_through_json_with_an_infinite_epsilon():
    job = RankJob(CaseSpec("dit-tiny-cond", "bk", 4, "cpu", 2, "fsdp"), resolve_privacy(1.0, noise_multiplier=0.0))
    assert math.isinf(job.privacy.epsilon)
    assert RankJob.from_json(job.to_json()) == job


def test_torchrun_command_single_node_and_many_nodes(tmp_path):
    job = RankJob(CaseSpec("gpt-tiny", "bk", 16, "cuda", 16, "fsdp"), resolve_privacy(1.0))
    single = torchrun_argv(job, tmp_path, _config(), 16, "gpt-tiny-bk-bs16-cuda-fsdp16")
    assert single[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in single
    assert single[single.index("--nproc-per-node") + 1] == "16" and single[-4:-2] == ["-m", "bench.ranks.worker"]
    config = _config(nnodes=2, rdzv_endpoint="node0:29500")
    many = torchrun_argv(job, tmp_path, config, 8, "gpt-tiny:seq_len=8-bk-bs16-cuda-fsdp16")
    assert "--standalone" not in many and many[many.index("--nnodes") + 1] == "2"
    assert many[many.index("--rdzv-endpoint") + 1] == "node0:29500"
    assert many[many.index("--rdzv-id") + 1] == "dpmem-gpt-tiny_seq_len_8-bk-bs16-cuda-fsdp16"  # same on every node


# --- the launcher: timeout, silent and failing ranks ---------------------------------------------------------------


_PARENT_OF_A_SLEEPER = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print(child.pid, flush=True); time.sleep(60)"
)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to a container's init does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_a_launch_past_its_timeout_is_killed_with_its_children():
    """Like torchrun and its ranks: the launched process and the process it started both go."""
    started = time.perf_counter()
    outcome = launch([sys.executable, "-c", _PARENT_OF_A_SLEEPER], 2.0)
    assert outcome.timed_out and outcome.returncode is None
    assert time.perf_counter() - started < 15
    grandchild = int(outcome.output_tail.split()[0])
    deadline = time.perf_counter() + 5
    while _running(grandchild) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild)


def _stderr_log(run_dir: Path, local_rank: int, text: str) -> None:
    log = run_dir / "logs" / "abc" / "attempt_0" / str(local_rank) / "stderr.log"
    log.parent.mkdir(parents=True)
    log.write_text(text)


def test_a_silent_rank_is_an_error_naming_the_timeout_and_its_last_words(tmp_path):
    (tmp_path / "rank0.json").write_text(to_jsonl_line(_rank_record(0, 100)))
    _stderr_log(tmp_path, 1, "Traceback (most recent call last):\n  ...\nRuntimeError: rank 1 stuck\n")
    base = CaseRecord("dit-tiny-cond", "bk", 4, "cpu", world_size=2, parallel="ddp")
    record = collect(base, tmp_path, LaunchOutcome(None, "", timed_out=True), _config(rank_timeout_s=5.0), 2)
    assert record.status == "error"
    assert record.reason == (
        "rank 1: no result: killed after --rank-timeout 5 s; its last words: RuntimeError: rank 1 stuck"
    )
    assert [r.rank for r in record.ranks] == [0, 1] and record.ranks[0].peak_tensor_bytes == 100


def test_a_failing_rank_gives_its_own_message_and_the_others_figures_stay(tmp_path):
    (tmp_path / "rank0.json").write_text(to_jsonl_line(_rank_record(0, 100)))
    (tmp_path / "rank1.json").write_text(to_jsonl_line(_rank_record(1, None, "oom", "batch 4: out of memory")))
    base = CaseRecord("dit-tiny-cond", "bk", 4, "cpu", world_size=2, parallel="ddp")
    record = collect(base, tmp_path, LaunchOutcome(1, "torchrun: ChildFailedError"), _config(), 2)
    assert record.status == "oom" and record.reason == "rank 1: batch 4: out of memory"
    assert record.rank_max == {"peak_tensor_bytes": 100}


def test_ranks_time_themselves_in_calibrated_rounds():
    timing = time_rounds(lambda: time.sleep(0.002), rounds=3, one_call_s=0.002, device=torch.device("cpu"))
    assert timing.rounds == 3 and timing.iterations > 1  # a 2 ms step is repeated to fill a round
    assert timing.time_min_s <= timing.time_median_s <= timing.time_max_s
    assert timing.time_median_s >= 0.002


def _time_collective_rounds(rank: int, store: str, out: str) -> None:
    """One of 2 gloo ranks: time an all-reduce 'step' after a warm-up 25× slower on rank 1 than on rank 0."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    one = torch.ones(1)
    timing = time_rounds(
        lambda: dist.all_reduce(one), rounds=2, one_call_s=0.001 if rank == 0 else 0.025, device=torch.device("cpu")
    )
    Path(out, f"rank{rank}").write_text(str(timing.iterations))
    dist.destroy_process_group()


def test_ranks_whose_warm_ups_differ_agree_on_calls_per_round(tmp_path):
    """Under load one rank's warm-up is slower: were each rank's count its own, the rank with more calls would
    wait in an all-reduce for a peer that has left (the load-dependent 'Connection closed by peer')."""
    import torch.multiprocessing as mp

    mp.spawn(_time_collective_rounds, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    counts = [int((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert counts == [math.ceil(MIN_ROUND_S / 0.001)] * 2  # the larger count, from the faster warm-up


def test_the_next_launch_removes_run_directories_whose_launcher_is_gone(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{RUN_DIR_PREFIX}{int(gone.stdout)}-abc"
    live = tmp_path / f"{RUN_DIR_PREFIX}{os.getpid()}-def"
    for path in (stale, live):
        (path / "logs").mkdir(parents=True)
    assert remove_stale_run_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
