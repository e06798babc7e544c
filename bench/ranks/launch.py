"""The parent of a many-rank case (the pytest case): launch its ranks with torchrun, wait, merge their records.

``python -m torch.distributed.run`` (torchrun: torch's own launcher and elastic agent, not a home-made pool)
starts ``world_size / nnodes`` ranks on this node running ``python -m bench.ranks.worker``; each rank writes its
own record. One node: ``--standalone`` (a local rendezvous on a free port). Many nodes: every node's pytest runs
the same cases and torchrun meets the other nodes at ``--rdzv-endpoint`` (c10d rendezvous, one id per case).

A case that runs past ``--rank-timeout`` has its whole process group killed and is an ``error`` record naming
each silent rank (with the last line it wrote to stderr); a rank that fails makes torchrun stop the others
(``--max-restarts 0``), and the record carries that rank's own message. Never a hung suite.

The launch dies with this process (bench/ranks/lifeline.py): ``kill -9`` of pytest takes torchrun and every rank
with it. SIGINT (Ctrl-C) and SIGTERM/SIGHUP during a launch first end it — its ranks killed, its run directory
removed — then take their usual course (pytest's KeyboardInterrupt; the default exit for the others). The run
directory of a launch killed with SIGKILL is removed by the next launch (its name holds the launcher's pid).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.dp.parallel import refusal, uneven_split
from bench.results.record import CaseRecord, RankFigures, RecordError, combine_rank_records, from_jsonl_line

from .job import RankJob
from .lifeline import LAUNCHER_ENV, running, torchrun_preexec

_REPO = Path(__file__).resolve().parents[2]
_KILL_GRACE_S = 10.0
RUN_DIR_PREFIX = "dpmem-ranks-"  # + the launcher's pid + "-" + a random part, in the temporary directory
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class LaunchInterrupted(KeyboardInterrupt):
    """A signal that ends the process arrived during a launch: the launch is ended, then the signal delivered."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} during a many-rank launch")
        self.signum = signum


@dataclass
class LaunchOutcome:
    """How torchrun ended: its exit code (None: killed at the timeout) and the tail of its own output."""

    returncode: int | None
    output_tail: str
    timed_out: bool = False


def run_ranked_case(spec: CaseSpec, config: BenchConfig) -> CaseRecord:
    """The merged record of ``spec`` (world size > 1) on this node's ranks; raises only when interrupted."""
    nproc = spec.world_size // config.ranks.nnodes
    job = job_for(spec, config, nproc)
    base = job.new_record()
    # dpmem's own refusals: no ranks needed to know them
    refused = uneven_split(spec.batch_size, spec.world_size) or refusal(spec.method, spec.parallel)
    if refused:
        return replace(base, status="unsupported", reason=str(refused))
    remove_stale_run_dirs(Path(tempfile.gettempdir()))
    try:
        with _signals_end_the_launch(), tempfile.TemporaryDirectory(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-") as tmp:
            run_dir = Path(tmp)
            job.write(run_dir / "job.json")
            argv = torchrun_argv(job, run_dir, config, nproc, spec.case_id)
            outcome = launch(argv, config.ranks.rank_timeout_s)
            return collect(base, run_dir, outcome, config, nproc)
    except LaunchInterrupted as exc:  # the ranks are gone and the run directory removed: now the signal's course
        signal.raise_signal(exc.signum)
        raise


@contextmanager
def _signals_end_the_launch() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`LaunchInterrupted` (as SIGINT raises KeyboardInterrupt),
    so that the launch is ended before the process is; the previous handlers are back on the way out."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum: int, _frame) -> None:
        raise LaunchInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in _ENDING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def remove_stale_run_dirs(parent: Path) -> list[Path]:
    """Remove the run directories in ``parent`` whose launcher has exited (killed with SIGKILL: nothing of it
    could clean up); returns them. A directory of a running launcher, or of another user, is left alone."""
    removed = []
    for path in parent.glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = path.name[len(RUN_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not running(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


def job_for(spec: CaseSpec, config: BenchConfig, nproc: int) -> RankJob:
    cap = (
        config.measure.memory_cap_bytes // nproc if config.measure.memory_cap_bytes is not None else None
    )  # the node's RAM
    return RankJob(
        spec,
        config.step.privacy,
        optimizer=config.step.optimizer,
        seed=config.step.seed,
        rounds=config.measure.rounds,
        sample_interval_s=config.measure.sample_interval_s,
        memory_cap_bytes=cap,
        runner_label=config.output.runner_label,
        workload_modules=config.matrix.workload_modules,
        torch_threads=config.measure.torch_threads,
        timeout_s=config.ranks.rank_timeout_s,
    )


def torchrun_argv(job: RankJob, run_dir: Path, config: BenchConfig, nproc: int, case_id: str) -> list[str]:
    if config.ranks.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rdzv_id = re.sub(r"[^A-Za-z0-9_-]", "_", f"dpmem-{case_id}")
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", config.ranks.rdzv_endpoint, "--rdzv-id", rdzv_id]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(config.ranks.nnodes),
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
    """Run ``argv`` in a session of its own, tied to this process (it dies when this process does); at
    ``timeout_s``, or when this process is interrupted, kill the whole session (torchrun, and so its ranks)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
        LAUNCHER_ENV: str(os.getpid()),
    }
    proc = subprocess.Popen(
        argv,
        cwd=_REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=torchrun_preexec(),  # one prctl call in the child: safe beside this process's threads
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return LaunchOutcome(proc.returncode, _tail(output))
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        output, _ = proc.communicate()
        return LaunchOutcome(None, _tail(output), timed_out=True)
    except BaseException:  # Ctrl-C, or SIGTERM made LaunchInterrupted: the ranks go before this process does
        _kill_session(proc)
        raise


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
    expected = set(range(base.world_size)) if config.ranks.nnodes == 1 else set(reported)
    for rank in sorted(expected - reported):
        parts.append(replace(base, status="error", ranks=[_silent_rank(rank, run_dir, outcome, config, nproc)]))
    if not parts:  # many nodes and not one rank of this node wrote a record
        why = _launch_failure(outcome, config)
        return replace(base, status="error", reason=f"no rank of this node reported: {why}")
    record = combine_rank_records(parts)
    if outcome.timed_out and record.status == "ok":  # every rank wrote its record, then torchrun hung
        record.notes.append(f"torchrun did not exit within --rank-timeout {config.ranks.rank_timeout_s:g} s; killed")
    return record


def _silent_rank(rank: int, run_dir: Path, outcome: LaunchOutcome, config: BenchConfig, nproc: int) -> RankFigures:
    last = _last_line(_rank_stderr(run_dir, rank % nproc))
    why = _launch_failure(outcome, config)
    return RankFigures(
        rank=rank, status="error", reason=f"no result: {why}" + (f"; its last words: {last}" if last else "")
    )


def _launch_failure(outcome: LaunchOutcome, config: BenchConfig) -> str:
    """How the launch ended, with torchrun's own last line (a rendezvous that never formed says why there)."""
    last = _last_line(outcome.output_tail)
    if outcome.timed_out:
        return f"killed after --rank-timeout {config.ranks.rank_timeout_s:g} s" + (
            f"; torchrun's last line: {last}" if last else ""
        )
    return f"torchrun exited {outcome.returncode}" + (f" ({last})" if last else "")


def _rank_stderr(run_dir: Path, local_rank: int) -> str:
    """What local rank ``local_rank`` wrote to stderr (torchrun --redirects: <log-dir>/<id>/attempt_<n>/<r>/)."""
    files = sorted((run_dir / "logs").glob(f"*/attempt_*/{local_rank}/stderr.log"))
    return files[-1].read_text(encoding="utf-8", errors="replace") if files else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
