"""A JAX method's bench case: compiled once (apart from the timed rounds), its memory XLA's compiled analysis
labelled ``xla-compiled``, RSS measured on CPU; on meta lowered with stand-ins, nothing run."""

from __future__ import annotations

import pytest

pytest.importorskip("jax", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
pytest.importorskip("jax_privacy", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")

from bench import dp
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.results.record import MEASUREMENTS


def _config() -> BenchConfig:
    return BenchConfig.from_fields(
        preset="test", workloads=(), methods=(), batch_sizes=(), devices=(), rounds=1, privacy=dp.resolve_privacy(1.0)
    )


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_jax_case_records_xla_compiled_bytes(device):
    record = run_case(CaseSpec("dit-tiny-cond", "jax-vmap", 4, device), _config(), None)
    assert record.status == "ok", record.reason
    assert record.measurement == "xla-compiled" and "xla-compiled" in MEASUREMENTS
    memory = record.memory
    xla = next(n for n in record.notes if n.startswith("xla: temp"))
    temp, arguments, outputs, aliases = (int(word) for word in xla.replace(",", "").split() if word.isdigit())
    assert memory.peak_tensor_bytes == temp + arguments + outputs - aliases > 0
    assert memory.baseline_tensor_bytes == arguments
    # the weights and AdamW's two moments, fp32, are arguments of the step
    assert arguments >= 3 * 4 * record.params_trainable
    assert not memory.breakdown and not memory.phases  # the tensor tracker never saw a JAX array
    assert any("compiled in" in n and "not in any timed round" in n for n in record.notes)
    if device == "cpu":
        assert memory.peak_rss_bytes >= memory.baseline_rss_bytes > 0
    else:
        assert memory.peak_rss_bytes is None and record.timing.rounds == 0
        assert any("XLA-CPU's buffer assignment, not a GPU's" in n for n in record.notes)


def test_microbatching_is_recorded():
    record = run_case(CaseSpec("gpt-tiny", "jax-privacy", 4, "meta"), _config(), None)
    assert record.status == "ok", record.reason
    assert "jax-privacy microbatch_size: None" in record.notes
