"""A JAX method's bench case: compiled once (apart from the timed rounds), its memory XLA's compiled analysis
labelled ``xla-compiled``, RSS measured on CPU; on meta lowered with stand-ins, nothing run."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("jax", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
pytest.importorskip("jax_privacy", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")

from bench import dp
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.results.record import MEASUREMENTS, CaseRecord


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


def _temp_bytes(record) -> int:
    return int(next(n for n in record.notes if n.startswith("xla: temp")).split()[2])


def test_microbatching_is_recorded_and_shrinks_the_temp_buffers():
    whole = run_case(CaseSpec("dit-tiny-cond", "jax-privacy", 8, "meta"), _config(), None)
    spec = CaseSpec("dit-tiny-cond", "jax-privacy:microbatch=2", 8, "meta")
    chunked = run_case(spec, _config(), None)
    assert whole.status == chunked.status == "ok", whole.reason + chunked.reason
    assert whole.microbatch_size is None and "jax-privacy microbatch_size: None" in whole.notes
    assert chunked.microbatch_size == 2 and "jax-privacy microbatch_size: 2" in chunked.notes
    assert spec.case_id == "dit-tiny-cond-jax-privacy:microbatch=2-bs8-meta"
    assert CaseRecord.from_dict(json.loads(json.dumps(chunked.to_dict()))) == chunked  # the field is loaded back
    # 2 examples' gradients at a time instead of 8: XLA's temp buffers shrink
    assert _temp_bytes(chunked) < _temp_bytes(whole)


def test_a_microbatch_that_does_not_divide_the_batch_is_unsupported_naming_both():
    record = run_case(CaseSpec("gpt-tiny", "jax-privacy:microbatch=3", 4, "meta"), _config(), None)
    assert record.status == "unsupported" and record.microbatch_size == 3
    assert "microbatch size 3 does not divide batch size 4" in record.reason and "\n" not in record.reason


@pytest.mark.parametrize(
    "spec, message",
    [
        ("jax-privacy:microbatch=0", "microbatch must be an integer >= 1, got '0'"),
        ("jax-privacy:micro=2", "bad option 'micro=2'; valid: microbatch=K"),
        ("jax-vmap:microbatch=2", "DP method 'jax-vmap' takes no options"),
    ],
)
def test_a_bad_method_option_is_a_one_line_config_error(spec, message):
    with pytest.raises(dp.DPConfigError, match=re.escape(message)):
        dp.get_method(spec)


def test_the_spec_is_canonical():
    method = dp.get_method("jax-privacy:microbatch= 04")
    assert method.name == "jax-privacy:microbatch=4" and method.microbatch_size == 4
    assert dp.get_method("jax-privacy").microbatch_size is None  # the registered method is left as it was
