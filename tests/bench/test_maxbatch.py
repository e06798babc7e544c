"""Max-batch search and affine fit, on a synthetic memory model (no device needed)."""

import pytest

from bench import maxbatch
from bench.record import BatchProbe


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
