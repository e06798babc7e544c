"""The parent of a many-rank case (the pytest case): launch its ranks with torchrun, wait, merge their records.

``python -m torch.distributed.run`` (torchrun: torch's own launcher and elastic agent, not a home-made pool)
starts ``world_size / nnodes`` ranks on this node running ``python -m bench.ranks.worker``; each rank writes its
own record. One node: ``--standalone`` (a local rendezvous on a free port). Many nodes: every node's pytest runs
the same cases and torchrun meets the other nodes at ``--rdzv-endpoint`` (c10d rendezvous, one id per case).

A case that runs past ``--rank-timeout`` has its whole process group killed and is an ``error`` record naming
each silent rank (with the last line it wrote to stderr); a rank that fails makes torchrun stop the others
(``--max-restarts 0``), and the record carries that rank's own message. Never a hung suite.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from bench.case import CaseSpec, new_record
from bench.config import BenchConfig
from bench.dp.parallel import refusal
from bench.record import CaseRecord, RankFigures, RecordError, combine_rank_records, from_jsonl_line

from .job import RankJob

_REPO = Path(__file__).resolve().parents[2]
_KILL_GRACE_S = 10.0


@dataclass
class LaunchOutcome:
    """How torchrun ended: its exit code (None: killed at the timeout) and the tail of its own output."""

    returncode: int | None
    output_tail: str
    timed_out: bool = False


def run_ranked_case(spec: CaseSpec, config: BenchConfig) -> CaseRecord:
    """The merged record of ``spec`` (world size > 1) on this node's ranks; never raises."""
    base = new_record(spec, config)
    if spec.batch_size % spec.world_size:
        base.status = "unsupported"
        base.reason = (
            f"batch {spec.batch_size} does not split evenly over {spec.world_size} ranks (batch sizes are the "
            f"global logical batch; choose a multiple of {spec.world_size})"
        )
        return base
    refused = refusal(spec.method, spec.parallel)
    if refused is not None:  # dpmem's own refusal: no ranks needed to know it
        base.status, base.reason = "unsupported", str(refused)
        return base
    nproc = spec.world_size // config.nnodes
    job = job_for(spec, config, nproc)
    with tempfile.TemporaryDirectory(prefix="dpmem-ranks-") as tmp:
        run_dir = Path(tmp)
        job.write(run_dir / "job.json")
        argv = torchrun_argv(job, run_dir, config, nproc, spec.case_id)
        outcome = launch(argv, config.rank_timeout_s)
        return collect(base, run_dir, outcome, config, nproc)


def job_for(spec: CaseSpec, config: BenchConfig, nproc: int) -> RankJob:
    cap = config.memory_cap_bytes // nproc if config.memory_cap_bytes is not None else None  # the node's RAM
    return RankJob(
        workload=spec.workload,
        method=spec.method,
        batch_size=spec.batch_size,
        device=spec.device,
        world_size=spec.world_size,
        parallel=spec.parallel,
        privacy=config.privacy,
        optimizer=config.optimizer,
        lr=config.lr,
        seed=config.seed,
        rounds=config.rounds,
        sample_interval_s=config.sample_interval_s,
        memory_cap_bytes=cap,
        runner_label=config.runner_label,
        workload_modules=config.workload_modules,
        torch_threads=config.torch_threads,
        timeout_s=config.rank_timeout_s,
    )


def torchrun_argv(job: RankJob, run_dir: Path, config: BenchConfig, nproc: int, case_id: str) -> list[str]:
    if config.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rdzv_id = re.sub(r"[^A-Za-z0-9_-]", "_", f"dpmem-{case_id}")
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", config.rdzv_endpoint, "--rdzv-id", rdzv_id]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(config.nnodes),
        "--nproc-per-node",
        str(nproc),
        *rendezvous,
        "--max-restarts",
        "0",
        "--log-dir",
        str(run_dir / "logs"),
        "--redirects",
        "3",  # each rank's stdout and stderr into its own file under --log-dir
        "-m",
        "bench.ranks.worker",
        str(run_dir / "job.json"),
        str(run_dir),
    ]


def launch(argv: list[str], timeout_s: float) -> LaunchOutcome:
    """Run ``argv`` in a session of its own; at ``timeout_s`` kill the whole session (torchrun and its ranks)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        argv,
        cwd=_REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return LaunchOutcome(proc.returncode, _tail(output))
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        output, _ = proc.communicate()
        return LaunchOutcome(None, _tail(output), timed_out=True)


def _kill_session(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)  # the session launch() started: torchrun and every rank
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(output: str | None, lines: int = 20) -> str:
    return "\n".join((output or "").strip().splitlines()[-lines:])


def collect(base: CaseRecord, run_dir: Path, outcome: LaunchOutcome, config: BenchConfig, nproc: int) -> CaseRecord:
    """One record from the rank files in ``run_dir``; a rank without one is an error naming why."""
    parts: list[CaseRecord] = []
    for path in sorted(run_dir.glob("rank*.json")):
        try:
            record = from_jsonl_line(path.read_text(encoding="utf-8"))
        except RecordError as exc:
            record = None
            base.notes.append(f"{path.name}: unreadable ({exc})")
        if isinstance(record, CaseRecord):
            parts.append(record)
    reported = {r.rank for part in parts for r in part.ranks}
    expected = set(range(base.world_size)) if config.nnodes == 1 else set(reported)
    for rank in sorted(expected - reported):
        parts.append(replace(base, status="error", ranks=[_silent_rank(rank, run_dir, outcome, config, nproc)]))
    if not parts:  # many nodes and not one rank of this node wrote a record
        why = _launch_failure(outcome, config)
        return replace(base, status="error", reason=f"no rank of this node reported: {why}")
    record = combine_rank_records(parts)
    if outcome.timed_out and record.status == "ok":  # every rank wrote its record, then torchrun hung
        record.notes.append(f"torchrun did not exit within --rank-timeout {config.rank_timeout_s:g} s; killed")
    return record


def _silent_rank(rank: int, run_dir: Path, outcome: LaunchOutcome, config: BenchConfig, nproc: int) -> RankFigures:
    last = _last_line(_rank_stderr(run_dir, rank % nproc))
    why = _launch_failure(outcome, config)
    return RankFigures(
        rank=rank, status="error", reason=f"no result: {why}" + (f"; its last words: {last}" if last else "")
    )


def _launch_failure(outcome: LaunchOutcome, config: BenchConfig) -> str:
    if outcome.timed_out:
        return f"killed after --rank-timeout {config.rank_timeout_s:g} s"
    last = _last_line(outcome.output_tail)
    return f"torchrun exited {outcome.returncode}" + (f" ({last})" if last else "")


def _rank_stderr(run_dir: Path, local_rank: int) -> str:
    """What local rank ``local_rank`` wrote to stderr (torchrun --redirects: <log-dir>/<id>/attempt_<n>/<r>/)."""
    files = sorted((run_dir / "logs").glob(f"*/attempt_*/{local_rank}/stderr.log"))
    return files[-1].read_text(encoding="utf-8", errors="replace") if files else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
