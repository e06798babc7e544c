"""Max-batch search and affine fit, on a synthetic memory model (no device needed)."""

import pytest

from bench.plan import maxbatch
from bench.plan.overhead import DEFAULT_OVERHEAD, OverheadModel
from bench.results.record import HOST_OOM, BatchProbe


def _fake_probe(fixed: int, per_sample: int, capacity: int, calls: list):
    def probe(b: int) -> BatchProbe:
        calls.append(b)
        peak = fixed + per_sample * b
        return BatchProbe(b, "ok" if peak <= capacity else "oom", peak_tensor_bytes=peak if peak <= capacity else None)

    return probe


@pytest.mark.parametrize("capacity", [1_000, 1_234, 5_000, 100, 110])
def test_search_finds_exact_boundary_with_doubling_then_bisection(capacity):
    calls: list[int] = []
    max_ok, first_fail, probes = maxbatch.search(_fake_probe(100, 10, capacity, calls), limit=4096)
    expected = (capacity - 100) // 10
    assert max_ok == (expected or None)
    assert first_fail == expected + 1
    # doubling: 1, 2, 4, ... up to the first failure, then bisection: O(log) probes in all
    assert calls[: len(calls)] and calls[0] == 1
    assert len(calls) <= 2 * (expected + 1).bit_length() + 1
    assert [p.batch_size for p in probes] == calls


def test_search_stops_at_limit():
    calls: list[int] = []
    max_ok, first_fail, _ = maxbatch.search(_fake_probe(0, 1, 10**9, calls), limit=100)
    assert (max_ok, first_fail) == (100, None)
    assert max(calls) == 100


def test_search_rejects_bad_limit():
    with pytest.raises(ValueError, match="limit"):
        maxbatch.search(lambda b: BatchProbe(b, "ok"), limit=0)


def test_affine_fit_recovers_line_and_predicts():
    fixed, per_sample = maxbatch.affine_fit([(1, 110.0), (2, 120.0), (8, 180.0)])
    assert fixed == pytest.approx(100.0)
    assert per_sample == pytest.approx(10.0)
    assert maxbatch.predict_max_batch(fixed, per_sample, 1_000) == 90
    assert maxbatch.predict_max_batch(fixed, per_sample, 50) == 0
    assert maxbatch.affine_fit([(4, 1.0), (4, 2.0)]) is None
    # a flat or falling fit bounds nothing: no prediction rather than a made-up number
    assert maxbatch.predict_max_batch(100.0, 0.0, 1_000) is None


def test_build_record_predicts_for_device_and_extra_sizes():
    calls: list[int] = []
    probe = _fake_probe(1000, 100, 10_000, calls)
    max_ok, first_fail, probes = maxbatch.search(probe, limit=4096)
    record = maxbatch.build_record(
        "w",
        "m",
        "cpu",
        probes,
        max_ok,
        first_fail,
        fit_metric="peak_tensor_bytes",
        memory_limit_bytes=10_000,
        predict_for=[20_000],
    )
    assert record.max_batch_measured == 90 and record.first_failing_batch == 91
    assert record.predicted_max_batch == {"10000": 90, "20000": 190}
    assert record.fit_per_sample_bytes == pytest.approx(100)


def test_build_record_unsupported_has_no_fit():
    probes = [BatchProbe(1, "unsupported")]
    record = maxbatch.build_record(
        "w", "m", "cpu", probes, None, 1, fit_metric="peak_tensor_bytes", memory_limit_bytes=10, predict_for=[]
    )
    assert record.status == "unsupported" and record.fit_fixed_bytes is None


def test_cuda_predictions_leave_out_what_the_allocator_never_had():
    """Issue #9 item 9: a GPU's capacity for the allocator is its total memory less the NVML case-start reading
    (CUDA context, other processes); the fit of peak reserved bytes is only valid against that."""
    gib = 2**30
    # reserved(B) = 2 GiB + 0.5 GiB·B; an 80 GiB card that already shows 3 GiB used at case start
    probes = [BatchProbe(b, "ok", peak_reserved_bytes=2 * gib + b * gib // 2) for b in (1, 2, 4, 8)]
    baseline = maxbatch.non_allocator_bytes([3 * gib, None, 3 * gib + 10, 3 * gib - 10])
    assert baseline == 3 * gib
    record = maxbatch.build_record(
        "w",
        "m",
        "cuda:0",
        probes,
        8,
        None,
        fit_metric="peak_reserved_bytes",
        memory_limit_bytes=80 * gib,
        predict_for=[40 * gib],
        capacity=lambda size: size - baseline,
    )
    assert record.predicted_max_batch == {str(40 * gib): 70, str(80 * gib): 150}  # (M − 3 − 2) / 0.5
    unadjusted = maxbatch.build_record(
        "w",
        "m",
        "cuda:0",
        probes,
        8,
        None,
        fit_metric="peak_reserved_bytes",
        memory_limit_bytes=80 * gib,
        predict_for=[],
        capacity=float,
    )
    assert unadjusted.predicted_max_batch[str(80 * gib)] == 156  # what ignoring the context claimed
    assert maxbatch.non_allocator_bytes([None]) is None


def _piecewise_meta_probe(calls: list, fixed: int = 5_000, per_sample: int = 100, flat: int = 20_000):
    """A step whose peak is the optimizer's (flat) at small B and the backward's (affine) at large B."""

    def probe(b: int):
        calls.append(b)
        peak = max(flat, fixed + per_sample * b)
        return BatchProbe(b, "ok", peak_tensor_bytes=peak), {"activations": peak - fixed, "parameters": fixed}

    return probe


@pytest.mark.parametrize("start", [1, 8])
@pytest.mark.parametrize("fixed_overhead, fraction", [(0, 0.0), (1_000, 0.1)])
def test_meta_search_is_exact_for_every_budget(start, fixed_overhead, fraction):

    overhead = OverheadModel(fixed_overhead, fraction)
    budgets = [10_000, 25_000, 60_000, 123_456, 10**9]
    calls: list[int] = []
    answers, probes = maxbatch.search_budgets(_piecewise_meta_probe(calls), budgets, overhead, 4096, start=start)

    def fits(b):
        return overhead.device_bytes(max(20_000, 5_000 + 100 * b))

    for budget, answer in zip(sorted(budgets), answers):
        brute = max((b for b in range(1, 4097) if fits(b) <= budget), default=None)
        assert answer.budget_bytes == budget and answer.max_batch == brute
        if brute is None:
            assert answer.first_failing_batch == 1
        elif brute == 4096:
            assert answer.first_failing_batch is None
        else:
            assert answer.first_failing_batch == brute + 1
            assert {brute, brute + 1} <= set(calls)  # both sides of the boundary really ran
            assert answer.device_bytes == fits(brute) and answer.breakdown["parameters"] == 5_000
    assert len(calls) == len(set(calls)) == len(probes)  # no batch probed twice
    assert len(calls) <= 4 * len(budgets) + 4


def test_meta_search_stops_at_an_unsupported_probe():
    def probe(b):
        return BatchProbe(b, "unsupported"), {}

    answers, probes = maxbatch.search_budgets(probe, [10, 20], DEFAULT_OVERHEAD, 64)
    assert len(probes) == 1 and all(a.max_batch is None and a.first_failing_batch is None for a in answers)


def _host_limited_probe(calls: list, host_limit: int):
    """A meta step of peak 1000 + 100·B bytes whose batch the host cannot draw from ``host_limit`` samples up."""

    def probe(b: int):
        calls.append(b)
        if b >= host_limit:
            return BatchProbe(b, HOST_OOM), {}
        return BatchProbe(b, "ok", peak_tensor_bytes=1000 + 100 * b), {"activations": 100 * b}

    return probe


def test_meta_search_stays_below_the_hosts_limit_and_keeps_what_it_found():
    """Issue #17 item 7: a batch the host cannot draw is the machine's limit, not the budget's: nothing at or above
    it is probed again, a budget whose boundary lies below is answered exactly, one beyond keeps the largest batch
    that fits as a lower bound, saying where the host stopped it."""
    calls: list[int] = []
    overhead = OverheadModel(0, 0.0)
    answers, probes = maxbatch.search_budgets(_host_limited_probe(calls, 30), [500, 2000, 10**6], overhead, 4096)
    nothing, exact, limited = answers
    assert (nothing.max_batch, nothing.first_failing_batch, nothing.first_failing_device_bytes) == (None, 1, 1100)
    assert (exact.max_batch, exact.first_failing_batch, exact.host_limit_batch) == (10, 11, None)
    assert exact.first_failing_device_bytes == 1000 + 100 * 11
    assert (limited.max_batch, limited.first_failing_batch, limited.host_limit_batch) == (29, None, 30)
    assert limited.device_bytes == 1000 + 100 * 29
    refused = [i for i, p in enumerate(probes) if p.status == HOST_OOM]
    for i in refused:  # once refused, never again at or above that batch
        assert all(p.batch_size < probes[i].batch_size for p in probes[i + 1 :])
    assert maxbatch.answer_text(nothing) == "nothing fits in 500 B: batch 1 needs 1.07 KiB"
    assert maxbatch.answer_text(exact) == "10 in 1.95 KiB (batch 11 needs 2.05 KiB)"
    assert maxbatch.answer_text(limited) == "≥29 in 977 KiB (host memory limit at batch 30)"


def test_answer_text_says_when_the_search_limit_fits():
    (answer,), _ = maxbatch.search_budgets(_host_limited_probe([], 10**9), [10**9], OverheadModel(0, 0.0), 64)
    assert (answer.max_batch, answer.first_failing_batch) == (64, None)
    assert maxbatch.answer_text(answer) == "≥64 in 954 MiB (the search limit)"


def test_a_batch_the_host_cannot_draw_on_meta_is_recorded_as_the_hosts_limit(monkeypatch, tmp_path):
    """The real meta search (bench/test_max_batch.py) with the host's allocator failing from batch 40 up (forced):
    the probe is ``host-oom``, the 6 MiB answer (below it) stays exact, the 12 MiB one keeps the largest batch
    found; the record, its reason, the terminal line and the report say it is the host's limit."""
    import models
    from bench.case.spec import CaseSpec
    from bench.config.settings import BenchConfig
    from bench.dp import resolve_privacy
    from bench.plan.overhead import parse_overhead
    from bench.results.record import from_jsonl_line, to_jsonl_line
    from bench.test_max_batch import case_probe, meta_search
    from reports.load import load_results
    from reports.tables import fit_display

    draw = models.Workload.make_batch

    def make_batch(self, batch_size, generator=None, device=None):
        if batch_size >= 40:  # what torch's CPU allocator raises when the host has no room for the batch
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10995116277760 bytes")
        return draw(self, batch_size, generator, device)

    monkeypatch.setattr(models.Workload, "make_batch", make_batch)
    mib = 2**20
    cfg = BenchConfig.from_fields(
        preset="t",
        workloads=("gpt-tiny",),
        methods=("nondp",),
        batch_sizes=(),
        devices=("meta",),
        rounds=1,
        privacy=resolve_privacy(1.0),
        overhead=parse_overhead("512KiB+5%"),
        memory_budgets=(6 * mib, 12 * mib),
    )
    records, said = [], []
    probe = case_probe(CaseSpec("gpt-tiny", "nondp", 1, "meta"), cfg, records)
    record = meta_search("gpt-tiny", "nondp", cfg, probe, records, said.append)
    record = from_jsonl_line(to_jsonl_line(record))  # the new fields survive the results file
    small, large = record.budgets
    assert small.host_limit_batch is None and small.first_failing_batch == small.max_batch + 1 < 40
    refused = sorted(p.batch_size for p in record.probes if p.status == HOST_OOM)
    assert refused and refused[0] == 40  # bisected down to the host's limit, never recorded as plain oom
    assert {p.status for p in record.probes} == {"ok", HOST_OOM}
    assert (large.max_batch, large.first_failing_batch, large.host_limit_batch) == (39, None, 40)
    assert cfg.capacity.overhead.fits(large.peak_tensor_bytes, 12 * mib)
    assert record.reason.startswith("host memory limit at batch ")
    assert "can't allocate memory" in record.reason and record.status == "ok"
    assert "≥39 in 12 MiB (host memory limit at batch 40)" in said[-1] and f"{small.max_batch} in 6 MiB" in said[-1]

    path = tmp_path / "mb.jsonl"
    path.write_text(to_jsonl_line(record) + "\n")
    fits = load_results([path]).fits
    row = fits[fits["memory_bytes"] == 12 * mib].iloc[0]
    assert row["max batch is lower bound"] and row["host_limit_batch"] == 40 and row["measured max batch"] == 39
    shown = fit_display(fits)["measured max batch"].tolist()
    assert shown == [str(small.max_batch), "≥39 in 12 MiB (host memory limit at batch 40)"]
