"""amp on meta is verified, not trusted: the emulation driven by the CPU lists equals real CPU autocast to the byte.

A meta case autocasts by CUDA's op lists (bench/dp/autocast_emulation.py). The same emulation with the *CPU*
lists, on meta, must give what ``torch.autocast("cpu")`` gives on CPU — peak, baseline, breakdown and peak
phase — on every tiny workload × every method × {amp-bf16, amp-fp16} × {no checkpointing, blocks}, with the
same attention kernel (math) and optimizer implementation (foreach). The differences are the two
tests/bench/test_meta.py accounts for (AdamW's CPU step counters; Opacus ghost clipping's deep-copied
gradients), nothing else: the GradScaler's state (scale, growth tracker, found-inf) is the same tensors on both.
Methods under torch.func transforms (torch-func, opacus-functorch) included: amp on meta refuses nothing CPU runs.
"""

from __future__ import annotations

import pytest

from bench import dp
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.dp import autocast_emulation
from models.catalog import TINY_WORKLOADS
from tests.bench.test_meta import (
    BATCH,
    META_UNSUPPORTED,
    _assert_same_figures,
    _config,
    frozen_heap,
)

METHODS = dp.available_methods()

# The same refusal in another kernel's words: ExpandedWeights multiplies a bf16 output gradient with an fp32 input
# (bench/dp/opacus.py); CPU's matmul and the meta kernel word the dtype check differently.
KERNEL_WORDING = {"opacus-ew": ("expected m1 and m2 to have the same dtype", "expected scalar type")}
PRECISIONS = ("amp-bf16", "amp-fp16")
CHECKPOINTINGS = ("none", "blocks")

__all__ = ["frozen_heap"]  # the fixture, shared with test_meta.py


@pytest.fixture(scope="module")
def amp_fidelity(frozen_heap):
    config = _config(attention="math", optimizer_impl="foreach", sample_interval_s=0.5)
    records = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autocast_emulation, "META_POLICIES", autocast_emulation.CPU_POLICIES)
        for w in TINY_WORKLOADS:
            for m in METHODS:
                for p in PRECISIONS:
                    for c in CHECKPOINTINGS:
                        for d in ("cpu", "meta"):
                            spec = CaseSpec(w, m, BATCH, d, precision=p, checkpointing=c)
                            records[w, m, p, c, d] = run_case(spec, config, None)
    return records


@pytest.mark.parametrize("checkpointing", CHECKPOINTINGS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("workload", TINY_WORKLOADS)
def test_emulated_cpu_autocast_on_meta_equals_cpu_autocast_byte_for_byte(
    amp_fidelity, workload, method, precision, checkpointing
):
    cpu = amp_fidelity[workload, method, precision, checkpointing, "cpu"]
    meta = amp_fidelity[workload, method, precision, checkpointing, "meta"]
    if meta.status == "unsupported" and cpu.status == "ok":  # what meta cannot run in any precision
        assert META_UNSUPPORTED[method] in meta.reason
        return
    assert cpu.status == meta.status, (cpu.reason, meta.reason)
    if cpu.status != "ok":  # a method's refusal (Opacus and loss scaling, ew and amp): the same words on both
        if cpu.reason != meta.reason and method in KERNEL_WORDING:
            cpu_words, meta_words = KERNEL_WORDING[method]
            assert cpu_words in cpu.reason and meta_words in meta.reason, (cpu.reason, meta.reason)
            return
        assert cpu.reason == meta.reason
        return
    assert cpu.precision == meta.precision == precision and cpu.checkpointing == meta.checkpointing
    _assert_same_figures(cpu, meta, workload, method)


def test_amp_changes_the_meta_prediction(frozen_heap):
    """Guards the test above against an emulation that casts nothing: at a batch where activations make the
    peak, the amp forward keeps other bytes than the fp32 one."""
    fp32, amp = (
        run_case(CaseSpec("dit-tiny-cond", "nondp", 64, "meta", precision=p), _config(attention="math"), None)
        for p in ("fp32", "amp-bf16")
    )
    assert fp32.status == amp.status == "ok"
    assert fp32.memory.peak_phase == amp.memory.peak_phase == "backward"
    assert amp.memory.peak_tensor_bytes != fp32.memory.peak_tensor_bytes


@pytest.mark.parametrize("method", ["nondp", "bk", "microbatch"])
def test_the_meta_state_warm_up_leaves_the_grad_scaler_a_step_leaves(frozen_heap, monkeypatch, method):
    """amp-fp16 on meta: the state warm-up also leaves the GradScaler's scale and growth tracker."""
    import bench.case.runner as case_module

    config = _config()
    spec = CaseSpec("gpt-tiny-untied", method, BATCH, "meta", precision="amp-fp16")
    short = run_case(spec, config, None)
    monkeypatch.setattr(case_module, "FULL_WARM_UP_ON_META", tuple(METHODS))
    full = run_case(spec, config, None)
    assert short.status == full.status == "ok", (short.reason, full.reason)
    assert short.memory.baseline_tensor_bytes == full.memory.baseline_tensor_bytes
    assert short.memory.peak_tensor_bytes == full.memory.peak_tensor_bytes
    assert short.memory.breakdown == full.memory.breakdown


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_planner_plans_amp_on_meta(capsys, precision):
    from bench.plan import planner

    assert planner.main(["gpt-tiny", "--precision", precision, "--methods", "nondp,bk", "--memory", "64MiB"]) == 0
    out = capsys.readouterr().out
    assert f"predicted on the meta device; {precision};" in out
    rows = [line for line in out.splitlines() if line.startswith(("| nondp |", "| bk |"))]
    assert len(rows) == 2 and not any("unsupported" in row or "error" in row for row in rows), out
