"""Meta fidelity in the fine-tuning modes (``--trainable``): a meta case predicts the CPU's tensor figures byte
for byte, up to the two differences tests/bench/test_meta.py names (AdamW's CPU step counters, one per *trainable*
parameter tensor; Opacus ghost's adopted ``summed_grad`` copies, of the *trainable* parameters), and the breakdown
puts the frozen parameters apart from the trainable ones. A LoRA case on meta costs no more than the full case.
"""

from __future__ import annotations

import pytest

import models
from bench import dp
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.dp import TrainingMode, prepare_model

from .test_meta import BATCH, COUNTER_BYTES, META_UNSUPPORTED, _config, frozen_heap  # noqa: F401  (a fixture)

pytest.importorskip("peft")

METHODS = dp.available_methods()
TRAINABLES = ("bitfit", "attention", "lora:r=4")
# every trainable mode on the DiT, LoRA on the GPT (the other GPT modes freeze and train the same layer types)
CASES = [("dit-tiny-cond", t) for t in TRAINABLES] + [("gpt-tiny-untied", "lora:r=4")]


@pytest.fixture(scope="module")
def fidelity(frozen_heap):  # noqa: F811
    config = _config(attention="math", optimizer_impl="foreach", sample_interval_s=0.5)
    return {
        (w, t, m, d): run_case(CaseSpec(w, m, BATCH, d, trainable=t), config, None)
        for w, t in CASES
        for m in METHODS
        for d in ("cpu", "meta")
    }


def _prepared(workload: str, trainable: str):
    spec = models.get_workload(workload)
    model = spec.build_model("meta")
    prepare_model(model, spec, TrainingMode(trainable=trainable), "meta")
    return model


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("workload,trainable", CASES)
def test_meta_predicts_the_cpu_figures_byte_for_byte_when_fine_tuning(fidelity, workload, trainable, method):
    cpu, meta = fidelity[workload, trainable, method, "cpu"], fidelity[workload, trainable, method, "meta"]
    assert cpu.trainable == meta.trainable == trainable
    if meta.status == "unsupported" and cpu.status == "ok":
        assert META_UNSUPPORTED[method] in meta.reason
        return
    assert cpu.status == meta.status == "ok", (cpu.reason, meta.reason)
    model = _prepared(workload, trainable)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert cpu.params_trainable == meta.params_trainable == sum(p.numel() for p in trained)
    assert cpu.params_total == meta.params_total == sum(p.numel() for p in model.parameters())
    counters = COUNTER_BYTES * len(trained)
    copies = _bytes(trained) if method == "opacus-ghost" else 0
    c, m = cpu.memory, meta.memory
    assert c.breakdown["frozen_parameters"] == m.breakdown["frozen_parameters"] == _bytes(frozen)
    assert c.baseline_tensor_bytes - m.baseline_tensor_bytes == counters + copies
    assert c.breakdown["optimizer_state"] - m.breakdown["optimizer_state"] == counters
    if copies and c.peak_phase != m.peak_phase:
        assert m.peak_tensor_bytes < c.peak_tensor_bytes - counters
        return
    if copies and c.peak_tensor_bytes - m.peak_tensor_bytes == counters + copies:
        # the peak of a fine-tuning step comes before Opacus makes its summed_grad copies (few and small, they
        # rarely make the peak): the CPU counts them as live from the start, meta does not yet
        assert c.breakdown["other"] - m.breakdown["other"] == copies
        return
    assert c.peak_tensor_bytes - m.peak_tensor_bytes == counters
    assert c.peak_phase == m.peak_phase
    assert {k: v for k, v in c.breakdown.items() if k != "optimizer_state"} == {
        k: v for k, v in m.breakdown.items() if k != "optimizer_state"
    }


def test_fine_tuning_shrinks_the_optimizer_state_and_keeps_the_weights(fidelity):
    full = run_case(CaseSpec("dit-tiny-cond", "opacus-hooks", BATCH, "meta"), _config(), None)
    lora = fidelity["dit-tiny-cond", "lora:r=4", "opacus-hooks", "meta"]
    # DiT's fixed sin-cos position table is a frozen Parameter, in full training too
    frozen_pos = _bytes(
        p for p in models.get_workload("dit-tiny-cond").build_model("meta").parameters() if not p.requires_grad
    )
    assert full.memory.breakdown["frozen_parameters"] == frozen_pos > 0
    weights = lora.memory.breakdown["parameters"] + lora.memory.breakdown["frozen_parameters"]
    assert weights > full.memory.breakdown["parameters"]  # the adapters come on top of the frozen base
    assert lora.memory.breakdown["optimizer_state"] < full.memory.breakdown["optimizer_state"] / 10
    assert lora.memory.breakdown["per_sample"] < full.memory.breakdown["per_sample"] / 10


def test_a_lora_case_on_meta_injects_its_adapters_once_per_workload(frozen_heap, monkeypatch):  # noqa: F811
    """peft's injection costs more than a paper-size DiT's whole meta step, so the meta template of a workload is
    kept per trainable mode, adapters injected once; every case gets a copy, prepared as the CPU's is (the
    fidelity test above), and a LoRA case on meta then costs no more than the full one beyond its step."""
    import peft

    calls = []
    inject = peft.inject_adapter_in_model
    monkeypatch.setattr(peft, "inject_adapter_in_model", lambda *a, **k: calls.append(1) or inject(*a, **k))
    config = _config()
    spec = "gpt-tiny-untied:n_layer=3"  # a workload no other test built a template of
    for batch in (2, 4):
        record = run_case(CaseSpec(spec, "bk", batch, "meta", trainable="lora:r=8"), config, None)
        assert record.status == "ok" and record.trainable == "lora:r=8", record.reason
    assert len(calls) == 1
