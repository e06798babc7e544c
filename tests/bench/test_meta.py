"""The meta device: a case predicts the CPU's tensor figures byte for byte, and says what it cannot run.

Fidelity: every tiny workload × every method runs on CPU and on meta with the same attention kernel (math, which
both devices have) and the same optimizer implementation (foreach); peak, baseline, breakdown and peak phase
agree exactly, up to two differences this file names and accounts for to the byte:

* AdamW's ``state["step"]`` counters are CPU scalars (``capturable=False``): a CPU run counts them (4 bytes per
  parameter tensor, optimizer state), a meta run does not, and neither does a CUDA run — meta is right for a GPU;
* ``opacus-ghost``: Opacus copies ``p.grad`` into ``p.summed_grad`` with ``copy.deepcopy``; on CPU (and CUDA)
  ``Tensor.__deepcopy__`` copies the storage outside the dispatcher, so the tracker first meets the copy as an
  op input and counts it as live since the step began (bench/trackers/memory/tensors.py, "adopted"); on meta the copy
  is a ``clone`` through the dispatcher, counted from when it is made. The CPU figure is too high by those
  copies until they exist; the meta one is right.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import bench.case.runner as case_module
import models
from bench import dp
from bench.case.runner import run_case, set_optimizer_impl
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.results.record import CaseRecord, RecordError
from models import Batch, Workload
from models.catalog import TINY_WORKLOADS

METHODS = dp.available_methods()
COUNTER_BYTES = 4  # one float32 AdamW step counter per parameter tensor
BATCH = 3


def _config(**overrides) -> BenchConfig:
    return BenchConfig.from_fields(
        preset="test",
        workloads=(),
        methods=(),
        batch_sizes=(),
        devices=(),
        rounds=1,
        privacy=dp.resolve_privacy(1.0),
        **overrides,
    )


@pytest.fixture(scope="module")
def frozen_heap():
    """Every CPU case collects garbage at its boundaries; with torch and Opacus loaded a full collection costs
    ~0.3 s, so once they are (one case of each kind has run) the long-lived objects are frozen out of it for
    this module — what each case frees is still collected."""
    for method in ("nondp", "opacus-hooks", "torch-func"):
        run_case(CaseSpec("gpt-tiny", method, 2, "cpu"), _config(), None)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def fidelity(frozen_heap) -> dict[tuple[str, str, str], CaseRecord]:
    # a slow RSS sampler: the CPU side's RSS is not compared, and 1 ms polling slows each step
    config = _config(attention="math", optimizer_impl="foreach", sample_interval_s=0.5)
    return {
        (w, m, d): run_case(CaseSpec(w, m, BATCH, d), config, None)
        for w in TINY_WORKLOADS
        for m in METHODS
        for d in ("cpu", "meta")
    }


def _parameter_tensors(workload: str) -> int:
    model = models.get_workload(workload).build_model("meta")
    return sum(1 for p in model.parameters() if p.requires_grad)


def _trainable_bytes(workload: str) -> int:
    model = models.get_workload(workload).build_model("meta")
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# What meta cannot run, and the op it names (bench/case/meta_device.py; docs/meta-and-planner.md): no built-in
# method on no tiny workload any more. opacus-functorch runs: the torch.amp.autocast(device_type="meta") its
# sampler enters for an nn.Embedding's int64 ids is emulated (bench/dp/autocast_emulation.py); opacus-ghost runs:
# its torch.unique of (sample, id) pairs reads the ids' CPU values (bench/case/meta_values.py).
META_UNSUPPORTED: dict[str, str] = {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("workload", TINY_WORKLOADS)
def test_meta_predicts_the_cpu_figures_byte_for_byte(fidelity, workload, method):
    cpu, meta = fidelity[workload, method, "cpu"], fidelity[workload, method, "meta"]
    assert meta.measurement == "predicted" and cpu.measurement == "measured"
    if meta.status == "unsupported" and cpu.status == "ok":
        assert META_UNSUPPORTED[method] in meta.reason
        return
    _assert_same_figures(cpu, meta, workload, method)
    if cpu.status == "ok":
        assert cpu.attention_kernels == ["math"]


def _assert_same_figures(cpu: CaseRecord, meta: CaseRecord, workload: str, method: str) -> None:
    """The meta record's figures are the CPU record's, up to the differences the module docstring accounts for."""
    assert cpu.status == meta.status, (cpu.reason, meta.reason)
    if cpu.status != "ok":  # e.g. ghost clipping refuses gpt-tiny's tied weights on both, with the same words
        assert cpu.reason == meta.reason
        return
    counters = COUNTER_BYTES * _parameter_tensors(workload)
    copies = _trainable_bytes(workload) if method == "opacus-ghost" else 0
    c, m = cpu.memory, meta.memory
    assert c.baseline_tensor_bytes - m.baseline_tensor_bytes == counters + copies
    assert c.breakdown["optimizer_state"] - m.breakdown["optimizer_state"] == counters
    if copies and c.peak_phase != m.peak_phase:  # the CPU peak is one the adopted copies made up
        assert m.peak_tensor_bytes < c.peak_tensor_bytes - counters
        return
    assert c.peak_tensor_bytes - m.peak_tensor_bytes == counters
    assert c.peak_phase == m.peak_phase
    assert {k: v for k, v in c.breakdown.items() if k != "optimizer_state"} == {
        k: v for k, v in m.breakdown.items() if k != "optimizer_state"
    }
    assert cpu.attention_kernels == meta.attention_kernels
    assert cpu.optimizer_impl == meta.optimizer_impl == "foreach"


# Ghost clipping's norm of an nn.Embedding groups equal (sample, id) pairs with torch.unique, whose result size
# depends on the ids; they keep their values on meta (bench/case/meta_values.py), so it runs wherever the CPU runs.
GHOST_EMBEDDING_SPECS = ("dit-tiny-cond:learnable_pos_embed=True:pos_embed_in_submodule=True",)  # + a position buffer


def test_opacus_ghost_runs_on_meta_on_every_embedding_model(fidelity):
    for workload in TINY_WORKLOADS:
        cpu, meta = fidelity[workload, "opacus-ghost", "cpu"], fidelity[workload, "opacus-ghost", "meta"]
        expected = "unsupported" if workload == "gpt-tiny" else "ok"  # tied weights: ghost refuses on both
        assert cpu.status == meta.status == expected, (workload, cpu.reason, meta.reason)


@pytest.mark.parametrize("workload", GHOST_EMBEDDING_SPECS)
def test_opacus_ghost_on_meta_reads_the_values_of_an_integer_buffer(frozen_heap, workload):
    config = _config(attention="math", optimizer_impl="foreach", sample_interval_s=0.5)
    cpu, meta = (run_case(CaseSpec(workload, "opacus-ghost", BATCH, d), config, None) for d in ("cpu", "meta"))
    assert meta.status == "ok", meta.reason
    _assert_same_figures(cpu, meta, workload, "opacus-ghost")


def test_a_meta_record_is_predicted_untimed_and_sampler_free(fidelity):
    record = fidelity["dit-tiny-cond", "nondp", "meta"]
    assert record.device == "meta" and record.device_name == "meta" and record.device_memory_bytes is None
    assert record.timing.rounds == 0 and record.memory.peak_rss_bytes is None
    assert record.memory.nvml_peak_used_bytes is None and record.memory.peak_reserved_bytes is None
    assert record.memory.phases and record.memory.timeline.tensor_bytes
    assert any("meta device" in note for note in record.notes)
    again = CaseRecord.from_dict(record.to_dict())
    assert again.measurement == "predicted" and again.attention_kernels == ["math"]


def test_a_record_with_an_unknown_measurement_does_not_parse(fidelity):
    data = fidelity["gpt-tiny", "nondp", "meta"].to_dict()
    data["measurement"] = "guessed"
    with pytest.raises(RecordError, match="measurement"):
        CaseRecord.from_dict(data)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in case_module.FULL_WARM_UP_ON_META])
def test_the_state_warm_up_on_meta_leaves_what_a_full_step_leaves(frozen_heap, monkeypatch, method):
    """Methods without lazy state skip the model in their meta warm-up; the record must not notice."""
    config = _config()
    for workload in ("dit-tiny-cond", "gpt-tiny-untied"):
        short = run_case(CaseSpec(workload, method, BATCH, "meta"), config, None)
        with monkeypatch.context() as patch:
            patch.setattr(case_module, "FULL_WARM_UP_ON_META", tuple(METHODS))
            full = run_case(CaseSpec(workload, method, BATCH, "meta"), config, None)
        assert short.status == full.status == "ok"
        assert (short.memory.peak_tensor_bytes, short.memory.baseline_tensor_bytes, short.memory.peak_phase) == (
            full.memory.peak_tensor_bytes,
            full.memory.baseline_tensor_bytes,
            full.memory.peak_phase,
        )
        assert short.memory.breakdown == full.memory.breakdown


def test_meta_auto_attention_and_optimizer_are_what_cuda_would_run(frozen_heap):
    record = run_case(CaseSpec("gpt-tiny", "nondp", BATCH, "meta"), _config(), None)
    assert record.attention == "auto" and record.attention_kernels == ["efficient"]  # fp32 on a GPU
    assert record.optimizer_impl == "foreach"
    cpu = run_case(CaseSpec("gpt-tiny", "nondp", BATCH, "cpu"), _config(), None)
    assert cpu.attention_kernels == ["flash"]  # observed: torch's CPU flash kernel
    assert cpu.optimizer_impl == "for-loop"


def test_foreach_adamw_holds_a_parameter_sized_temporary_the_loop_does_not(frozen_heap):
    """Why meta must use CUDA's optimizer implementation: the peak of a step whose optimizer phase dominates."""
    loop = run_case(CaseSpec("gpt-tiny", "nondp", 1, "meta"), _config(optimizer_impl="for-loop"), None)
    foreach = run_case(CaseSpec("gpt-tiny", "nondp", 1, "meta"), _config(), None)
    assert loop.optimizer_impl == "for-loop" and foreach.optimizer_impl == "foreach"
    assert foreach.memory.peak_phase == "optimizer"
    assert foreach.memory.peak_tensor_bytes - loop.memory.peak_tensor_bytes >= _trainable_bytes("gpt-tiny") // 2


def test_set_optimizer_impl_unwraps_and_reports():
    params = [nn.Parameter(torch.zeros(2, device="meta"))]
    optimizer = torch.optim.AdamW(params)
    assert set_optimizer_impl(optimizer, "auto", torch.device("meta")) == "foreach"
    assert optimizer.param_groups[0]["foreach"] is True
    assert set_optimizer_impl(optimizer, "for-loop", torch.device("meta")) == "for-loop"
    cpu_optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    assert set_optimizer_impl(cpu_optimizer, "auto", torch.device("cpu")) == "for-loop"
    assert cpu_optimizer.param_groups[0]["foreach"] is None  # auto off meta leaves torch's choice alone


class _IdsDependent(nn.Module):
    """A bring-your-own model whose forward depends on the values of its integer input (labels from the batch)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.linear, self.embedding = how, nn.Linear(4, 4), nn.Embedding(8, 4)

    def forward(self, x, ids):
        h = self.linear(x) + self.embedding(ids)
        if self.how == "item":
            return h * (ids.max().item() + 1)
        if self.how == "unique":
            return h * torch.unique(ids).numel()
        return h[:, : 1 + (ids > 3).nonzero().shape[0] % 4]  # nonzero: how many are > 3 decides the width


def _ids_dependent_workload(how: str) -> Workload:
    def batch(batch_size: int, generator: torch.Generator) -> Batch:
        x = torch.randn(batch_size, 4, generator=generator)
        ids = torch.randint(0, 8, (batch_size,), generator=generator)
        return Batch(inputs=(x, ids), target=torch.zeros(batch_size))

    return Workload(
        name=f"ids-dependent-{how}",
        model_fn=lambda: _IdsDependent(how),
        batch_fn=batch,
        loss_fn=lambda out, target: out.pow(2).mean(dim=1),
        input_names=("x", "ids"),
    )


@pytest.mark.parametrize("how", ["item", "unique", "nonzero"])
def test_a_model_reading_the_values_of_its_integer_input_runs_on_meta(frozen_heap, monkeypatch, how):
    models.list_workloads()
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    name = models.register_workload(_ids_dependent_workload(how))
    config = _config(attention="math", optimizer_impl="foreach", sample_interval_s=0.5)
    cpu, meta = (run_case(CaseSpec(name, "nondp", 6, d), config, None) for d in ("cpu", "meta"))
    assert meta.status == "ok", meta.reason
    _assert_same_figures(cpu, meta, name, "nondp")
    # ghost clipping: its Embedding norm runs torch.unique on the ids too. Whether the CPU peak falls before the
    # adopted p.grad copies exist (module docstring) depends on the model; the meta peak is within them.
    cpu, meta = (run_case(CaseSpec(name, "opacus-ghost", 6, d), config, None) for d in ("cpu", "meta"))
    assert cpu.status == meta.status == "ok", meta.reason
    counters, copies = COUNTER_BYTES * _parameter_tensors(name), _trainable_bytes(name)
    assert cpu.memory.baseline_tensor_bytes - meta.memory.baseline_tensor_bytes == counters + copies
    assert counters <= cpu.memory.peak_tensor_bytes - meta.memory.peak_tensor_bytes <= counters + copies


class _ValueDependent(nn.Module):
    """A bring-your-own model whose forward depends on tensor values (it cannot run on meta)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.linear = how, nn.Linear(4, 4)

    def forward(self, x):
        h = self.linear(x)
        if self.how == "item":
            return h * 2 if h.sum() > 0 else h  # bool(tensor) -> Tensor.item()
        if self.how == "nonzero":
            return h + h.nonzero().shape[0]
        return h * len(h.tolist())


def _value_dependent_workload(how: str) -> Workload:
    def batch(batch_size: int, generator: torch.Generator) -> Batch:
        return Batch(inputs=(torch.randn(batch_size, 4, generator=generator),), target=torch.zeros(batch_size))

    return Workload(
        name=f"value-dependent-{how}",
        model_fn=lambda: _ValueDependent(how),
        batch_fn=batch,
        loss_fn=lambda out, target: out.pow(2).mean(dim=1),
    )


@pytest.mark.parametrize(
    "how, op",
    [("item", "Tensor.item()"), ("nonzero", "aten::nonzero"), ("tolist", "aten::")],
)
def test_a_value_dependent_model_is_unsupported_on_meta_naming_the_op(frozen_heap, monkeypatch, how, op):
    models.list_workloads()
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    name = models.register_workload(_value_dependent_workload(how))
    meta = run_case(CaseSpec(name, "nondp", 2, "meta"), _config(), None)
    assert meta.status == "unsupported" and "meta device" in meta.reason and op in meta.reason, meta.reason
    assert "\n" not in meta.reason
    assert run_case(CaseSpec(name, "nondp", 2, "cpu"), _config(), None).status == "ok"
    # the next case is not affected
    assert run_case(CaseSpec("gpt-tiny", "bk", 2, "meta"), _config(), None).status == "ok"
