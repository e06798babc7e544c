"""bench/trackers/timing.py: rounds paired with non-DP rounds, their ratio, the reliability rule — on a fake clock, so
nothing here depends on how loaded the machine running the tests is."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.dp import resolve_privacy
from bench.results.record import Timing
from bench.trackers import timing
from bench.trackers.contention import Reading, conditions_between
from bench.trackers.timing import Reference, benchmark_timer, median_and_iqr, paired_ratios, unreliable_reasons


class FakeMachine:
    """A clock that only moves when a fake step runs: a step costs its quiet seconds × the load's slowdown, and
    the load starts (every step ``slowdown``× slower) once ``load_from_s`` of fake time has passed."""

    def __init__(self, slowdown: float = 1.0, load_from_s: float = float("inf"), wait_fraction: float | None = None):
        self.now_s = 0.0
        self.slowdown, self.load_from_s, self.wait_fraction = slowdown, load_from_s, wait_fraction
        self.ran_ns = self.waited_ns = 0

    def step(self, quiet_s: float):
        def run() -> None:
            cost = quiet_s * (self.slowdown if self.now_s >= self.load_from_s else 1.0)
            self.now_s += cost
            if self.wait_fraction is not None:  # the step waited this share of its wall time for a CPU
                self.waited_ns += round(cost * self.wait_fraction * 1e9)
                self.ran_ns += round(cost * (1 - self.wait_fraction) * 1e9)

        return run

    def clock(self) -> float:
        return self.now_s

    def read(self) -> Reading:
        threads = {1: (self.ran_ns, self.waited_ns)} if self.wait_fraction is not None else None
        return Reading(self.now_s, self.now_s, threads_ns=threads, load_average_1m=0.5, cpus_available=2)


def real_benchmark(clock, disabled: bool = False) -> BenchmarkFixture:
    """pytest-benchmark's own fixture (its pedantic mode, teardown hook and statistics) on the fake clock."""
    return BenchmarkFixture(
        SimpleNamespace(name="case", nodeid="case"),
        disable_gc=False,
        timer=SimpleNamespace(target=clock),
        min_rounds=1,
        min_time=0,
        max_time=1,
        precision=None,
        confidence=None,
        warmup=False,
        warmup_iterations=0,
        calibration_precision=10,
        add_stats=lambda stats: None,
        logger=None,
        warner=None,
        disabled=disabled,
        cprofile=False,
        cprofile_loops=None,
        cprofile_dump=None,
    )


# Step costs exact in binary, so the fake clock's sums and differences are exact too: 2 and 4 calls fill a round.
METHOD_S, NONDP_S = 2**-5, 2**-6


def time_case(machine: FakeMachine, method_s: float, nondp_s: float | None, rounds: int = 5) -> Timing:
    timer = benchmark_timer(real_benchmark(machine.clock), rounds, read=machine.read)
    reference = (lambda: Reference(machine.step(nondp_s), nondp_s)) if nondp_s is not None else None
    return timer(machine.step(method_s), method_s, reference, [])


# --- pairing ------------------------------------------------------------------------------------------------------
def test_each_method_round_is_divided_by_the_mean_of_the_nondp_rounds_either_side():
    assert paired_ratios([4.0, 9.0], [1.0, 3.0, 6.0]) == [2.0, 2.0]
    with pytest.raises(ValueError, match="2 method rounds need 3 non-DP rounds, got 2"):
        paired_ratios([4.0, 9.0], [1.0, 3.0])


def test_median_and_iqr_use_inclusive_quartiles():
    assert median_and_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0)
    assert median_and_iqr([2.5]) == (2.5, 0.0)


def test_a_paired_case_records_every_round_and_the_paired_ratio():
    record = time_case(FakeMachine(), METHOD_S, NONDP_S, rounds=4)
    assert record.rounds == 4 and record.iterations == 2 and record.paired_nondp_iterations == 4
    assert record.round_times_s == [METHOD_S] * 4
    assert record.paired_nondp_round_times_s == [NONDP_S] * 5  # one before the first round, one after each
    assert record.round_cpu_s == [METHOD_S] * 4 and record.cpu_time_median_s == METHOD_S
    assert record.paired_nondp_round_cpu_s == [NONDP_S] * 5
    assert record.paired_time_ratio == 2.0 and record.paired_time_ratio_iqr == 0.0
    assert record.time_median_s == METHOD_S  # pytest-benchmark's statistics: the method's rounds alone
    assert record.time_reliable is True and record.time_unreliable_reason == ""


def test_a_load_that_starts_mid_case_leaves_the_paired_ratio_right_and_the_unpaired_one_wrong():
    """The non-DP case ran quiet; during the DP case every step becomes 10× slower after its first round. The
    ratio of the two cases' medians is then 10× off; the paired ratio divides rounds that saw the same load."""
    machine = FakeMachine(slowdown=10.0)
    nondp_case = time_case(machine, NONDP_S, None)
    # after the DP case's calibration calls (1 + 1), N₀ (4 calls) and A₁ (2 calls)
    machine.load_from_s = machine.now_s + METHOD_S + NONDP_S + NONDP_S * 4 + METHOD_S * 2
    dp_case = time_case(machine, METHOD_S, NONDP_S)
    assert dp_case.round_times_s == [METHOD_S] + [METHOD_S * 10] * 4
    unpaired = dp_case.time_median_s / nondp_case.time_median_s
    assert unpaired == 20.0  # the true ratio is 2
    assert dp_case.paired_time_ratio == 2.0
    assert dp_case.time_reliable is True  # four of the five pairs agree exactly


def test_a_nondp_case_is_not_paired():
    record = time_case(FakeMachine(), NONDP_S, None, rounds=3)
    assert record.paired_time_ratio is None and record.paired_nondp_round_times_s == []
    assert record.round_times_s == [NONDP_S] * 3 and record.time_reliable is True


# 1: its calibration call fails; 7: after the calibration call and N₀ (4 calls), a call into N₁
@pytest.mark.parametrize("failing_call", [1, 7])
def test_a_failing_nondp_call_leaves_the_method_timed_unpaired_with_a_note(failing_call):
    machine = FakeMachine()
    calls = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) >= failing_call:
            raise RuntimeError("out of memory beside the method")
        machine.step(NONDP_S)()

    notes: list[str] = []
    timer = benchmark_timer(real_benchmark(machine.clock), 3, read=machine.read)
    record = timer(machine.step(METHOD_S), METHOD_S, lambda: Reference(flaky, NONDP_S), notes)
    assert record.rounds == 3 and record.paired_time_ratio is None and record.paired_nondp_round_times_s == []
    failure = "RuntimeError: out of memory beside the method"
    assert notes == [f"timing: a non-DP round failed ({failure}); the method's rounds are unpaired"]


def test_benchmark_disable_runs_the_step_once_and_builds_no_reference():
    machine = FakeMachine()
    ran = []
    timer = benchmark_timer(real_benchmark(machine.clock, disabled=True), 3, read=machine.read)
    record = timer(lambda: ran.append(1), 1.0, lambda: pytest.fail("reference built"), [])
    assert ran == [1] and record.rounds == 0 and record.time_reliable is None


# --- the load readings ----------------------------------------------------------------------------------------
def test_conditions_between_two_readings():
    start = Reading(10.0, 1.0, threads_ns={1: (100, 0), 2: (50, 50)}, machine_ticks=(1000, 10, 2000))
    # thread 2 ended, thread 3 was born: each counts from what it has; 2 s wall on 2 CPUs at 100 ticks/s = 400 ticks
    end = Reading(12.0, 2.0, threads_ns={1: (400, 100), 3: (100, 0)}, machine_ticks=(1300, 50, 2400))
    conditions = conditions_between(start, end)
    assert conditions.wall_s == 2.0 and conditions.cpu_s == 1.0
    assert conditions.run_queue_wait == pytest.approx(100 / 500)
    if timing.contention._CLOCK_TICKS == 100:
        assert conditions.other_cpus == pytest.approx((300 / 100 - 1.0) / 2.0)  # 3 CPU-s busy, 1 of them ours
    assert conditions.steal == pytest.approx(40 / 400)
    assert conditions_between(Reading(0.0, 0.0), Reading(1.0, 0.5)).run_queue_wait is None


def test_a_case_whose_threads_waited_for_a_cpu_is_unreliable():
    record = time_case(FakeMachine(wait_fraction=0.6), METHOD_S, NONDP_S)
    assert record.cpu_wait_fraction == pytest.approx(0.6)
    assert record.time_reliable is False
    assert record.time_unreliable_reason == "its threads waited for a CPU 60% of the time they could run (limit 25%)"
    assert time_case(FakeMachine(wait_fraction=0.1), METHOD_S, NONDP_S).time_reliable is True


# --- the rule -----------------------------------------------------------------------------------------------------
def _timing(**figures) -> Timing:
    quiet = dict(round_times_s=[0.02] * 5, paired_time_ratio=2.0, paired_time_ratio_iqr=0.02, cpu_wait_fraction=0.01)
    return Timing(**{**quiet, **figures})


def test_the_rule_vouches_for_a_quiet_case():
    assert unreliable_reasons(_timing()) == []


@pytest.mark.parametrize(
    "figures, reason",
    [
        ({"cpu_wait_fraction": 0.3}, "its threads waited for a CPU 30% of the time they could run (limit 25%)"),
        ({"cpu_steal_fraction": 0.3}, "the hypervisor stole 30% of the CPU time (limit 25%)"),
        ({"paired_time_ratio_iqr": 0.4}, "its 5 round pairs disagree: IQR 20% of the ratio (limit 15%)"),
        (
            {"cpu_wait_fraction": None, "load_average_1m": 2.5, "cpus_available": 2},
            "load average 2.5 above the 2 CPUs available",
        ),
    ],
)
def test_the_rule_names_what_it_cannot_vouch_for(figures, reason):
    assert unreliable_reasons(_timing(**figures)) == [reason]


def test_the_rule_uses_the_load_average_only_without_run_queue_figures():
    assert unreliable_reasons(_timing(load_average_1m=5.0, cpus_available=2)) == []  # run-queue figures say quiet
    assert unreliable_reasons(_timing(cpu_wait_fraction=None, load_average_1m=1.9, cpus_available=2)) == []


def test_the_spread_of_too_few_pairs_is_not_judged():
    few = _timing(round_times_s=[0.02] * (timing.MIN_SPREAD_PAIRS - 1), paired_time_ratio_iqr=1.0)
    assert unreliable_reasons(few) == []


# --- through the case runner, on a real tiny workload and the real clock (nothing asserted about durations) --------
def test_a_dp_case_records_its_paired_rounds_and_the_same_memory_figures_as_untimed():
    """The non-DP rounds run after the measured round on a model of their own: the memory figures are those of an
    untimed run of the case, to the byte."""
    config = BenchConfig.from_fields(
        preset="cpu-smoke",
        workloads=("gpt-tiny",),
        methods=("bk",),
        batch_sizes=(2,),
        devices=("cpu",),
        rounds=3,
        privacy=resolve_privacy(1.0),
        memory_cap_bytes=None,
    )
    spec = CaseSpec("gpt-tiny", "bk", 2, "cpu")
    timed = run_case(spec, config, benchmark_timer(real_benchmark(time.perf_counter), 3, min_round_s=0.001))
    assert timed.status == "ok", timed.reason
    t = timed.timing
    assert len(t.round_times_s) == len(t.round_cpu_s) == 3 and len(t.paired_nondp_round_times_s) == 4
    assert len(t.paired_nondp_round_cpu_s) == 4 and t.paired_nondp_iterations >= 1
    assert t.paired_time_ratio > 0 and t.paired_time_ratio_iqr >= 0 and t.cpu_time_median_s >= 0
    assert isinstance(t.time_reliable, bool) and (t.time_reliable == (t.time_unreliable_reason == ""))
    untimed = run_case(spec, config, None)
    assert timed.memory.peak_tensor_bytes == untimed.memory.peak_tensor_bytes
    assert timed.memory.baseline_tensor_bytes == untimed.memory.baseline_tensor_bytes
    assert timed.memory.breakdown == untimed.memory.breakdown and timed.memory.peak_phase == untimed.memory.peak_phase
    nondp = run_case(
        CaseSpec("gpt-tiny", "nondp", 2, "cpu"), config, benchmark_timer(real_benchmark(time.perf_counter), 3)
    )
    assert nondp.timing.paired_time_ratio is None and nondp.timing.paired_nondp_round_times_s == []
    assert len(nondp.timing.round_times_s) == 3 and isinstance(nondp.timing.time_reliable, bool)
